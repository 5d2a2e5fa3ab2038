import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { root } from './helpers/procs';
import { requireProgram } from './helpers/system';

describe('benchmark smoke run (seconds, no thresholds: keeps npm run bench from rotting)', function () {
  before(function () {
    requireProgram(this, 'redis-server', 'redis-server');
  });

  it('starts every system, measures each briefly, prints the table with its ratios and stops everything', async function () {
    this.timeout(180_000);
    const { code, stdout, stderr } = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) =>
      execFile(process.execPath, [path.join(root, 'dist/test/bench/run.js'), '--smoke'], { cwd: root, timeout: 170_000 }, (err, out, errOut) =>
        resolve({ code: err ? 1 : 0, stdout: out, stderr: errOut }),
      ),
    );
    assert.equal(code, 0, stderr);
    assert.match(stdout, /\| counter page: ours \(SQLite FULL, pipe client\) \| [\d,]+ req\/s/);
    assert.match(stdout, /\| counter page req\/s, ours ÷ express-session \+ connect-redis \| [\d.]+× \| ≥ 3 \|/);
    // The whole machine's CPU per page (load generator and kernel included) is measured, and what it allows.
    assert.match(stdout, /\| counter page: ours \(SQLite FULL, pipe client\) \|(?: [^|]+ \|){5} \d+ \|\n/);
    assert.match(stdout, /\| counter page, ours: the most the machine allows [^|]+ \| [\d.]+× \| \(report\) \|/);
    assert.match(stdout, /Versions: node v\d+/);
  });
});
