/**
 * The longest event-loop pause while the expiry sweeper deletes many expired rows, for several
 * sweep batch sizes (STORE_SWEEP_BATCH). Each step of the sweeper deletes one batch in one
 * transaction and yields to the event loop before the next, so the pause is one step.
 *
 * Under synchronous=FULL a step also pays the fsync every commit pays.
 *
 *   npx tsc -p tsconfig.json && node dist/test/bench/store-sweep.js [rows] [batch,batch,...]
 */
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { SqliteBackend } from '../../services/store/backends/sqlite';
import { tempDir } from '../helpers/procs';

async function measure(rows: number, sweepBatch: number, synchronous: 'FULL' | 'NORMAL'): Promise<void> {
  const tmp = tempDir('sessions-bench-');
  const backend = new SqliteBackend({ dataDir: tmp.dir, synchronous, sweepIntervalMs: 0, sweepBatch, maxOpsPerCommit: 5000 });
  const value = Buffer.alloc(300, 7);
  for (let i = 0; i < rows; i += 5000) {
    await backend.batch(Array.from({ length: Math.min(5000, rows - i) }, (_, j) => ({ kind: 'put' as const, key: `s:${i + j}`, value, ttlMs: 1 })));
  }
  await new Promise((r) => setTimeout(r, 20));
  let expired = 0;
  const allSwept = new Promise<void>((resolve) =>
    backend.watch('', (event) => {
      if (event.kind === 'expire' && ++expired === rows) resolve();
    }),
  );
  // Time each step too (the sweeper schedules its next step through this.sweep()).
  const steps: number[] = [];
  const step = backend.sweep.bind(backend);
  backend.sweep = () => {
    const t = performance.now();
    const n = step();
    steps.push(performance.now() - t);
    return n;
  };
  const histogram = monitorEventLoopDelay({ resolution: 1 });
  histogram.enable();
  const started = performance.now();
  backend.sweep();
  await allSwept;
  const seconds = (performance.now() - started) / 1000;
  histogram.disable();
  steps.sort((a, b) => a - b);
  console.log(
    `${synchronous.padEnd(6)} batch ${String(sweepBatch).padStart(5)}: ${rows} rows in ${seconds.toFixed(2)} s (${Math.round(rows / seconds)} rows/s); ` +
      `step p50 ${steps[steps.length >> 1].toFixed(1)} ms, p99 ${steps[Math.floor(steps.length * 0.99)].toFixed(1)} ms, max ${steps[steps.length - 1].toFixed(1)} ms; ` +
      `event-loop delay p99 ${(histogram.percentile(99) / 1e6).toFixed(1)} ms, max ${(histogram.max / 1e6).toFixed(1)} ms`,
  );
  await backend.close();
  tmp.remove();
}

async function main(): Promise<void> {
  const rows = Number(process.argv[2] ?? 200_000);
  const batches = (process.argv[3] ?? '100,200,500,2000').split(',').map(Number);
  for (const synchronous of ['FULL', 'NORMAL'] as const) {
    for (const batch of batches) await measure(rows, batch, synchronous);
  }
}

void main();
