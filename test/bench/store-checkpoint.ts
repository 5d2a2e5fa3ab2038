/**
 * Put latency with WAL checkpoints on the request path ('inline', SQLite's automatic checkpoint)
 * against checkpoints in a worker thread ('worker', the default). Drives the SQLite backend
 * in-process at a fixed arrival rate (open loop, like site traffic: a stall delays every put that
 * arrives during it) and prints p50/p99/p99.9/max per mode, alternating the modes so that both
 * see the same machine load.
 *
 *   npx tsc -p tsconfig.json && node dist/test/bench/store-checkpoint.js [puts/s] [seconds] [rounds] [FULL|NORMAL]
 */
import { randomBytes } from 'node:crypto';
import { statSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { SqliteBackend } from '../../services/store/backends/sqlite';
import { tempDir } from '../helpers/procs';

type Mode = 'inline' | 'worker';
const KEYS = 50_000;
const VALUE = randomBytes(600);

interface Settings {
  rate: number;
  seconds: number;
  synchronous: 'FULL' | 'NORMAL';
}

async function round(mode: Mode, settings: Settings): Promise<{ latencies: Float64Array; count: number; maxWal: number }> {
  const tmp = tempDir('sessions-bench-');
  const backend = new SqliteBackend({
    dataDir: tmp.dir,
    synchronous: settings.synchronous,
    sweepIntervalMs: 0,
    sweepBatch: 500,
    maxOpsPerCommit: 2000,
    checkpoint: mode,
  });
  // Start from a full table so that both modes update the same rows (no page splits from growth).
  for (let i = 0; i < KEYS; i += 1000) {
    await backend.batch(Array.from({ length: 1000 }, (_, j) => ({ kind: 'put' as const, key: `bench:${i + j}`, value: VALUE, ttlMs: 3_600_000 })));
  }
  const wal = path.join(tmp.dir, 'sessions.db-wal');
  const latencies = new Float64Array(settings.rate * settings.seconds + 1000);
  let count = 0;
  let maxWal = 0;
  const walTimer = setInterval(() => {
    try {
      maxWal = Math.max(maxWal, statSync(wal).size);
    } catch {
      // no WAL yet
    }
  }, 50);
  // Every millisecond, issue the puts that were due since the last tick; a put's latency counts
  // from when it was due, so time spent waiting behind a stalled event loop is included.
  const start = performance.now();
  const total = settings.rate * settings.seconds;
  const pending: Promise<void>[] = [];
  let issued = 0;
  await new Promise<void>((resolve) => {
    const tick = () => {
      const now = performance.now();
      const due = Math.min(total, Math.floor(((now - start) / 1000) * settings.rate));
      for (; issued < due; issued += 1) {
        const dueAt = start + (issued / settings.rate) * 1000;
        const key = `bench:${(issued * 7919) % KEYS}`;
        pending.push(
          backend.batch([{ kind: 'put', key, value: VALUE, ttlMs: 3_600_000 }]).then(() => {
            latencies[count++] = performance.now() - dueAt;
          }),
        );
      }
      if (issued >= total) resolve();
      else setTimeout(tick, 1);
    };
    tick();
  });
  await Promise.all(pending);
  clearInterval(walTimer);
  await backend.close();
  tmp.remove();
  return { latencies: latencies.slice(0, count), count, maxWal };
}

function pct(sorted: Float64Array, p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function main(): Promise<void> {
  const settings: Settings = {
    rate: Number(process.argv[2] ?? 3000),
    seconds: Number(process.argv[3] ?? 5),
    synchronous: (process.argv[5] ?? 'FULL') as Settings['synchronous'],
  };
  const rounds = Number(process.argv[4] ?? 2);
  console.log(`${settings.rate} puts/s for ${settings.seconds} s x ${rounds} rounds per mode, synchronous=${settings.synchronous}, 600-byte values`);
  const all: Record<Mode, number[]> = { inline: [], worker: [] };
  const counts: Record<Mode, number> = { inline: 0, worker: 0 };
  const wal: Record<Mode, number> = { inline: 0, worker: 0 };
  for (let r = 0; r < rounds; r += 1) {
    for (const mode of ['inline', 'worker'] as const) {
      const result = await round(mode, settings);
      all[mode].push(...result.latencies);
      counts[mode] += result.count;
      wal[mode] = Math.max(wal[mode], result.maxWal);
    }
  }
  const rows: Record<Mode, { p50: number; p99: number; p999: number; max: number }> = {} as never;
  for (const mode of ['inline', 'worker'] as const) {
    const sorted = Float64Array.from(all[mode]).sort();
    rows[mode] = { p50: pct(sorted, 50), p99: pct(sorted, 99), p999: pct(sorted, 99.9), max: sorted[sorted.length - 1] };
    const r = rows[mode];
    console.log(
      `${mode.padEnd(7)} puts ${counts[mode]}  ` +
        `p50 ${r.p50.toFixed(2)} ms  p99 ${r.p99.toFixed(2)} ms  p99.9 ${r.p999.toFixed(2)} ms  max ${r.max.toFixed(2)} ms  ` +
        `largest WAL ${(wal[mode] / 1024 / 1024).toFixed(1)} MiB`,
    );
  }
  console.log(`worker/inline: p99 ${(rows.worker.p99 / rows.inline.p99).toFixed(2)}x, p99.9 ${(rows.worker.p999 / rows.inline.p999).toFixed(2)}x, max ${(rows.worker.max / rows.inline.max).toFixed(2)}x`);
}

void main();
