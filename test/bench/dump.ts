/**
 * bin/dump benchmark (not part of npm test). Fills a temp SQLite store with session-like entries,
 * starts the real store process on it, and runs bin/dump with stdout to /dev/null in each output
 * form, measuring entries/s, the dump process's peak RSS, and the CPU each side spends per entry
 * (wall time on a shared machine is noisy; CPU per entry is not). The baselines in the same run
 * are bare consumers that print nothing: List (one message per entry) and ListPages with the
 * generated decoder.
 *
 *   npm run build && node dist/test/bench/dump.js [entries]   (default 1,000,000)
 *
 * Targets: >= 100k entries/s and a peak RSS under 150 MB for 1M entries.
 */
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import path from 'node:path';
import { SqliteBackend } from '../../services/store/backends/sqlite';
import type { BackendOp } from '../../services/store/backends/backend';
import { NO_ENV_FILE, root, startStore, tempDir } from '../helpers/procs';

const TARGET_RATE = 100_000;
const TARGET_RSS_MB = 150;
const FILL_BATCH = 20_000;
const RUNS = 2;

interface Measured {
  seconds: number;
  peakRssMb: number;
  /** CPU seconds of the measured process (user + system), when GNU time reports them. */
  cpuSeconds: number;
  code: number | null;
  stderr: string;
}

/** A session id like the web's: 24 url-safe base64 characters. */
function sessionKey(i: number): string {
  return Buffer.from(`session-${i.toString().padStart(10, '0')}`).toString('base64url').slice(0, 24).padEnd(24, 'A');
}

async function fill(dataDir: string, entries: number): Promise<number> {
  const started = process.hrtime.bigint();
  const backend = new SqliteBackend({ dataDir, synchronous: 'NORMAL', sweepIntervalMs: 0, sweepBatch: 500, maxOpsPerCommit: FILL_BATCH });
  for (let i = 0; i < entries; i += FILL_BATCH) {
    const ops: BackendOp[] = [];
    for (let j = i; j < Math.min(entries, i + FILL_BATCH); j++) {
      const value = Buffer.from(JSON.stringify({ count1: j % 1000, count2: j % 7, createdAt: 1_760_000_000_000 + j }));
      ops.push({ kind: 'put', key: sessionKey(j), value, ttlMs: 24 * 3_600_000 });
    }
    const results = await backend.batch(ops);
    const failed = results.find((r) => !r.ok);
    if (failed && !failed.ok) throw failed.error;
  }
  await backend.close();
  return Number(process.hrtime.bigint() - started) / 1e9;
}

/**
 * Runs a node script with stdout to /dev/null and reports wall time and peak RSS: from GNU time -v
 * when installed, else by polling VmHWM (the kernel's own high-water mark) until the process exits.
 */
function measure(args: string[]): Promise<Measured> {
  const gnuTime = existsSync('/usr/bin/time');
  const command = gnuTime ? '/usr/bin/time' : process.execPath;
  const argv = gnuTime ? ['-v', process.execPath, ...args] : args;
  const started = process.hrtime.bigint();
  const child = spawn(command, argv, { cwd: root, stdio: ['ignore', 'ignore', 'pipe'], env: { PATH: process.env.PATH ?? '', ...NO_ENV_FILE } });
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  let polledKb = 0;
  const poll = gnuTime
    ? undefined
    : setInterval(() => {
        try {
          const match = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'));
          if (match) polledKb = Math.max(polledKb, Number(match[1]));
        } catch {
          // the process has exited
        }
      }, 20);
  return new Promise((resolve) => {
    child.on('exit', (code) => {
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      if (poll) clearInterval(poll);
      const timed = /Maximum resident set size \(kbytes\): (\d+)/.exec(stderr);
      const kb = timed ? Number(timed[1]) : polledKb;
      const cpu = (label: string) => Number(new RegExp(`${label} time \\(seconds\\): ([\\d.]+)`).exec(stderr)?.[1] ?? NaN);
      const ownStderr = gnuTime ? stderr.split('\n\tCommand being timed')[0] : stderr;
      resolve({ seconds, peakRssMb: kb / 1024, cpuSeconds: cpu('User') + cpu('System'), code, stderr: ownStderr.trim() });
    });
  });
}

/** CPU seconds (user + system) a process has used so far, from /proc. */
function cpuSecondsOf(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

async function main(): Promise<void> {
  const entries = Number(process.argv[2] ?? 1_000_000);
  if (!Number.isSafeInteger(entries) || entries <= 0) throw new Error('usage: node dist/test/bench/dump.js [entries]');
  const tmp = tempDir('sessions-bench-dump-');
  const dump = path.join(root, 'dist', 'services', 'dump', 'main.js');
  const bareList = path.join(root, 'dist', 'test', 'bench', 'bare-list.js');
  try {
    process.stdout.write(`filling ${entries.toLocaleString('en')} entries... `);
    const fillSeconds = await fill(tmp.dir, entries);
    process.stdout.write(`${fillSeconds.toFixed(1)} s\n`);
    const store = await startStore(tmp.dir, { STORE_SWEEP_INTERVAL_MS: '0' });
    const address = `127.0.0.1:${store.port}`;
    const cases: Array<{ name: string; args: string[] }> = [
      { name: 'baseline: bare List, 1 entry/message', args: [bareList, address, 'list'] },
      { name: 'baseline: bare ListPages, no output', args: [bareList, address, 'pages'] },
      { name: 'bin/dump (lines)', args: [dump, address] },
      { name: 'bin/dump --json', args: [dump, address, '--json'] },
      { name: 'bin/dump --keys-only', args: [dump, address, '--keys-only'] },
      { name: 'bin/dump --count', args: [dump, address, '--count'] },
    ];
    const rows: Array<{ name: string; rate: number; rss: number; clientUs: number; storeUs: number }> = [];
    try {
      for (const c of cases) {
        const runs: Measured[] = [];
        const storeCpu: number[] = [];
        for (let i = 0; i < RUNS; i++) {
          const before = cpuSecondsOf(store.child.pid!);
          const run = await measure(c.args);
          storeCpu.push(cpuSecondsOf(store.child.pid!) - before);
          if (run.code !== 0) throw new Error(`${c.name} exited with ${run.code}: ${run.stderr}`);
          runs.push(run);
        }
        rows.push({
          name: c.name,
          rate: entries / median(runs.map((r) => r.seconds)),
          rss: Math.max(...runs.map((r) => r.peakRssMb)),
          clientUs: (median(runs.map((r) => r.cpuSeconds)) * 1e6) / entries,
          storeUs: (median(storeCpu) * 1e6) / entries,
        });
      }
    } finally {
      await store.stop();
    }
    const baseline = rows[0].rate;
    const pad = (s: string, n: number) => s.padEnd(n);
    console.log(`\n${entries.toLocaleString('en')} entries, node ${process.version}, ${cpus().length} cores, median of ${RUNS} runs (wall time incl. start-up)`);
    console.log(
      `${pad('case', 40)} ${'entries/s'.padStart(10)} ${'vs List'.padStart(8)} ${'peak RSS'.padStart(9)} ${'CPU us/entry: client'.padStart(21)} ${'store'.padStart(6)}  target`,
    );
    for (const row of rows) {
      const target = !row.name.startsWith('bin/dump') ? '' : row.rate >= TARGET_RATE && row.rss < TARGET_RSS_MB ? 'ok' : 'MISSED';
      console.log(
        `${pad(row.name, 40)} ${Math.round(row.rate).toLocaleString('en').padStart(10)} ${(row.rate / baseline).toFixed(2).padStart(7)}x ${row.rss.toFixed(0).padStart(6)} MB ${row.clientUs.toFixed(2).padStart(21)} ${row.storeUs.toFixed(2).padStart(6)}  ${target}`,
      );
    }
    console.log(`targets: >= ${TARGET_RATE.toLocaleString('en')} entries/s, peak RSS < ${TARGET_RSS_MB} MB`);
  } finally {
    tmp.remove();
  }
}

main().catch((err) => {
  console.error(`bench: ${(err as Error).message}`);
  process.exit(1);
});
