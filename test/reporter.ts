import Mocha from 'mocha';

/** The spec reporter, plus one last line CI reads: "N passed, M failed". */
class SummaryReporter extends Mocha.reporters.Spec {
  constructor(runner: Mocha.Runner, options: Mocha.MochaOptions) {
    super(runner, options);
    runner.once(Mocha.Runner.constants.EVENT_RUN_END, () => {
      const stats = runner.stats!;
      // Registered after Spec's own epilogue listener, so this is the last line printed.
      if (stats.pending > 0) process.stdout.write(`${stats.pending} skipped\n`);
      process.stdout.write(`${stats.passes} passed, ${stats.failures} failed\n`);
    });
  }
}

export = SummaryReporter;
