/**
 * npm run bench: starts every system it measures, warms up, measures each for a bounded time in
 * alternating rounds, and prints one table of medians with the ratios the performance goals name.
 * `--smoke` runs everything very briefly (CI keeps the script from rotting; no thresholds).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createPipeClient } from '../../services/client/pipe-client';
import { createStoreClient, type StoreClient } from '../../services/client/store-client';
import { SqliteBackend } from '../../services/store/backends/sqlite';
import Redis from 'ioredis';
import { logCapture, type Proc, root, startProcess, startStore, startWeb, tempDir } from '../helpers/procs';
import { barChart, type Measure, measureOps, measurePage, machineBusyUs, medianMeasure, processCpuUs, startRedisServer } from './lib';

const smoke = process.argv.includes('--smoke');
const arg = (name: string, fallback: number) => {
  const hit = process.argv.find((a) => a.startsWith(`--${name}=`));
  return hit ? Number(hit.split('=')[1]) : fallback;
};
const DURATION_S = arg('duration', smoke ? 1 : 5);
const ROUNDS = arg('rounds', smoke ? 1 : 5);
// Each system is loaded this long before its first round: a page server was still getting faster
// for several seconds after a 1 s warm-up (JIT, heap sizing), which made first rounds unsteady.
const WARMUP_S = arg('warmup', smoke ? 1 : 3);
const CONNECTIONS = 50;
const IN_FLIGHT = 50;
const GROWTH_N = arg('growth', smoke ? 5_000 : 1_000_000);
const outDir = smoke ? path.join(root, 'test', 'artifacts') : path.join(root, 'docs');

const VALUE = Buffer.from(JSON.stringify({ count1: 12, count2: 3, pad: 'x'.repeat(60) })); // ~100 bytes

interface Row {
  name: string;
  unit: string;
  m: Measure;
}

const log = (s: string) => process.stderr.write(s + '\n');

async function main(): Promise<void> {
  logCapture.keep = false; // services log at info as in production; the load generator does not parse it
  const cleanups: Array<() => Promise<void> | void> = [];
  const rows: Row[] = [];
  try {
    const redis = await startRedisServer();
    cleanups.push(() => redis.stop());
    const tmp = tempDir('sessions-bench-');
    cleanups.push(() => tmp.remove());

    // --- systems under test ---
    const store = await startStore(path.join(tmp.dir, 'store'), { LOG_LEVEL: 'info', STORE_SYNCHRONOUS: 'FULL' });
    cleanups.push(() => void store.stop());
    const webEnv = { LOG_LEVEL: 'info' };
    const web = await startWeb(store.port, path.join(tmp.dir, 'web'), { ...webEnv, STORE_TRANSPORT: 'pipe' });
    const webUnary = await startWeb(store.port, path.join(tmp.dir, 'web'), { ...webEnv, STORE_TRANSPORT: 'unary' });
    const redisUrl = `redis://127.0.0.1:${redis.port}`;
    const redisStore = await startStore(path.join(tmp.dir, 'redis-store-1'), { STORE_BACKEND: 'redis', REDIS_URL: redisUrl, REDIS_KEY_PREFIX: 'kv:' });
    const redisStore2 = await startStore(path.join(tmp.dir, 'redis-store-2'), { STORE_BACKEND: 'redis', REDIS_URL: redisUrl, REDIS_KEY_PREFIX: 'kv:' });
    const webRedis = await startWeb(redisStore.port, path.join(tmp.dir, 'web'), { ...webEnv, STORE_TRANSPORT: 'pipe' });
    for (const p of [redisStore, redisStore2, webRedis]) cleanups.push(() => void p.stop());
    const peer = await startProcess('dist/test/bench/peer-app.js', { PORT: '0', REDIS_URL: `redis://127.0.0.1:${redis.port}` });
    const bare = await startProcess('dist/test/bench/bare-koa.js', { PORT: '0' });
    const echo = await startProcess('dist/test/bench/echo-server.js', { PORT: '0' });
    for (const p of [web, webUnary, peer, bare, echo]) cleanups.push(() => void p.stop());

    // --- page throughput, alternating rounds ---
    const pages: Array<[string, Proc]> = [
      ['counter page: ours (SQLite FULL, pipe client)', web],
      ['counter page: express-session + connect-redis', peer],
      ['counter page: ours (Redis backend, pipe client)', webRedis],
      ['counter page: ours, naive unary Get + Put', webUnary],
      ['bare Koa + nunjucks page, no store', bare],
    ];
    const pageRuns = new Map<string, Measure[]>(pages.map(([n]) => [n, []]));
    for (const [, proc] of pages) await measurePage(`http://127.0.0.1:${proc.port}`, CONNECTIONS, WARMUP_S);
    for (let round = 0; round < ROUNDS; round += 1) {
      for (const [name, proc] of pages) {
        const cpuBefore = processCpuUs(proc.child.pid);
        const machineBefore = machineBusyUs();
        const m = await measurePage(`http://127.0.0.1:${proc.port}`, CONNECTIONS, DURATION_S);
        m.cpuUs = (processCpuUs(proc.child.pid) - cpuBefore) / (m.rate * DURATION_S);
        m.machineUs = (machineBusyUs() - machineBefore) / (m.rate * DURATION_S);
        log(
          `round ${round + 1}: ${name}: ${Math.round(m.rate)} req/s, p99 ${m.p99} ms, errors ${m.errors}, ${Math.round(m.cpuUs)} µs CPU/request (machine ${Math.round(m.machineUs)})`,
        );
        pageRuns.get(name)!.push(m);
      }
    }
    for (const [name] of pages) rows.push({ name, unit: 'req/s', m: medianMeasure(pageRuns.get(name)!) });

    // --- store operations at 50 in flight: Get then Put on the loop's own key ---
    const address = `127.0.0.1:${store.port}`;
    const pipe = createPipeClient({ address, deadlineMs: 5000 });
    const unary = createStoreClient({ address, deadlineMs: 5000 });
    const echoClient = createStoreClient({ address: `127.0.0.1:${echo.port}`, deadlineMs: 5000 });
    const onRedis = createPipeClient({ address: `127.0.0.1:${redisStore.port}`, deadlineMs: 5000 });
    const onRedis2 = createPipeClient({ address: `127.0.0.1:${redisStore2.port}`, deadlineMs: 5000 });
    // ioredis with its defaults (no auto-pipelining): the client connect-redis users typically pair.
    const redisClient = new Redis(redis.port, '127.0.0.1');
    cleanups.push(() => {
      for (const c of [pipe, unary, echoClient, onRedis, onRedis2]) c.close();
      redisClient.disconnect();
    });
    const getPut = (client: StoreClient, prefix: string) => async (loop: number, i: number) => {
      const key = `${prefix}${loop}`;
      if (i % 2 === 0) await client.get(key);
      else await client.put(key, VALUE, { ttlMs: 600_000 });
    };
    const redisGetSet = async (loop: number, i: number) => {
      const key = `bench:${loop}`;
      if (i % 2 === 0) await redisClient.get(key);
      else await redisClient.set(key, VALUE, 'PX', 600_000);
    };
    const storeCases: Array<[string, (loop: number, i: number) => Promise<unknown>]> = [
      ['store Get/Put: ours, pipe client', getPut(pipe, 'ops-')],
      ['store Get/Put: ours, naive grpc-js unary', getPut(unary, 'ops-')],
      ['grpc-js unary echo (no storage)', async () => echoClient.get('x')],
      ['redis GET/SET (ioredis, redis-server)', redisGetSet],
      ['store Get/Put: ours on Redis, 1 store instance', getPut(onRedis, 'ops-')],
      ['store Get/Put: ours on Redis, 2 store instances', (loop, i) => getPut(loop % 2 ? onRedis2 : onRedis, 'ops-')(loop, i)],
    ];
    const opsRuns = new Map<string, Measure[]>(storeCases.map(([n]) => [n, []]));
    for (const [, op] of storeCases) await measureOps(op, IN_FLIGHT, WARMUP_S * 1000);
    for (let round = 0; round < ROUNDS; round += 1) {
      for (const [name, op] of storeCases) {
        const machineBefore = machineBusyUs();
        const m = await measureOps(op, IN_FLIGHT, DURATION_S * 1000);
        m.machineUs = (machineBusyUs() - machineBefore) / (m.rate * DURATION_S);
        log(`round ${round + 1}: ${name}: ${Math.round(m.rate)} ops/s, p99 ${m.p99.toFixed(2)} ms, errors ${m.errors} (machine ${Math.round(m.machineUs)} µs CPU/op)`);
        opsRuns.get(name)!.push(m);
      }
    }
    for (const [name] of storeCases) rows.push({ name, unit: 'ops/s', m: medianMeasure(opsRuns.get(name)!) });

    // --- growth: Get/Put with many live sessions vs 1,000 ---
    const growth = await measureGrowth(tmp.dir, cleanups);
    rows.push(...growth);

    report(rows, redis.version);
  } finally {
    for (const cleanup of cleanups.reverse()) await cleanup();
  }
}

/** Fills two data directories (1,000 and GROWTH_N sessions), serves each, measures random Get/Put. */
async function measureGrowth(dir: string, cleanups: Array<() => Promise<void> | void>): Promise<Row[]> {
  const sizes = [1000, GROWTH_N];
  const stores: Array<{ n: number; proc: Proc; client: StoreClient }> = [];
  for (const n of sizes) {
    const dataDir = path.join(dir, `growth-${n}`);
    const started = Date.now();
    const backend = new SqliteBackend({ dataDir, synchronous: 'NORMAL', sweepIntervalMs: 0, sweepBatch: 1, maxOpsPerCommit: 100_000 });
    for (let i = 0; i < n; i += 20_000) {
      const ops = [];
      for (let j = i; j < Math.min(n, i + 20_000); j += 1) ops.push({ kind: 'put' as const, key: sessionKey(j), value: VALUE, ttlMs: 3_600_000 });
      await backend.batch(ops);
    }
    // Then overwrite at random, twice as many times, so that the log holds superseded rows and
    // compaction runs during the measurement as it would in a store that has been up for a while.
    for (let i = 0; i < 2 * n; i += 20_000) {
      const ops = [];
      for (let j = 0; j < 20_000; j += 1) ops.push({ kind: 'put' as const, key: sessionKey(Math.floor(Math.random() * n)), value: VALUE, ttlMs: 3_600_000 });
      await backend.batch(ops);
    }
    await backend.close();
    log(`filled ${n} sessions and overwrote ${2 * n} at random in ${Date.now() - started} ms`);
    const proc = await startStore(dataDir, { LOG_LEVEL: 'info', STORE_SYNCHRONOUS: 'FULL', STORE_SWEEP_INTERVAL_MS: '0' });
    const client = createPipeClient({ address: `127.0.0.1:${proc.port}`, deadlineMs: 5000 });
    cleanups.push(async () => {
      client.close();
      await proc.stop();
    });
    stores.push({ n, proc, client });
  }
  const getPut = (n: number, client: StoreClient) => async (_loop: number, i: number) => {
    const key = sessionKey(Math.floor(Math.random() * n));
    if (i % 2 === 0) await client.get(key);
    else await client.put(key, VALUE, { ttlMs: 3_600_000 });
  };
  // Both stores start cold (their data was written in this process): without a warm-up the small
  // one kept getting faster round after round (27.6k -> 40.4k ops/s over five rounds).
  for (const { n, client } of stores) await measureOps(getPut(n, client), IN_FLIGHT, WARMUP_S * 1000);
  const runs = new Map<number, Measure[]>(sizes.map((n) => [n, []]));
  for (let round = 0; round < ROUNDS; round += 1) {
    for (const { n, client } of stores) {
      const m = await measureOps(getPut(n, client), IN_FLIGHT, DURATION_S * 1000);
      log(`round ${round + 1}: growth ${n}: ${Math.round(m.rate)} ops/s`);
      runs.get(n)!.push(m);
    }
  }
  return sizes.map((n) => ({ name: `store Get/Put, ${n.toLocaleString('en-US')} live sessions`, unit: 'ops/s', m: medianMeasure(runs.get(n)!) }));
}

function sessionKey(i: number): string {
  return `s${String(i).padStart(23, '0')}`;
}

function report(rows: Row[], redisVersion: string): void {
  const by = (prefix: string) => rows.find((r) => r.name.startsWith(prefix))!.m;
  const ours = by('counter page: ours (SQLite');
  const peer = by('counter page: express-session');
  // What a page's CPU over the whole machine allows at most: every core busy, nothing else running.
  const fullMachineRate = (m: Measure) => (os.cpus().length * 1e6) / m.machineUs!;
  const ratios: Array<[string, number, string]> = [
    ['counter page req/s, ours ÷ express-session + connect-redis', ours.rate / peer.rate, '≥ 3'],
    ['counter page p99, ours ÷ peer (lower is better)', ours.p99 / peer.p99, '≤ 1'],
    ['bare Koa page (no session, no store) ÷ peer: the most any Koa page reaches here', by('bare Koa').rate / peer.rate, '(ceiling)'],
    ['CPU of the page-serving process per page, ours ÷ peer (store and redis-server not counted)', ours.cpuUs! / peer.cpuUs!, '(report)'],
    [
      'counter page, ours: the most the machine allows (cores ÷ its CPU per page, load generator and kernel included) ÷ peer req/s',
      fullMachineRate(ours) / peer.rate,
      '(report)',
    ],
    ['the same for bare Koa (no session, no store) ÷ peer req/s', fullMachineRate(by('bare Koa')) / peer.rate, '(report)'],
    ['store Get/Put, pipe client ÷ naive grpc-js unary', by('store Get/Put: ours, pipe').rate / by('store Get/Put: ours, naive').rate, '≥ 5'],
    ['store Get/Put, pipe client ÷ ioredis GET/SET', by('store Get/Put: ours, pipe').rate / by('redis GET/SET').rate, '≥ 0.5'],
    ['counter page req/s, Redis backend ÷ SQLite backend', by('counter page: ours (Redis').rate / ours.rate, '(report)'],
    ['store Get/Put, 2 ÷ 1 store instances on Redis', by('store Get/Put: ours on Redis, 2').rate / by('store Get/Put: ours on Redis, 1').rate, '(report)'],
    [
      `store Get/Put, ${GROWTH_N.toLocaleString('en-US')} ÷ 1,000 live sessions`,
      by(`store Get/Put, ${GROWTH_N.toLocaleString('en-US')}`).rate / by('store Get/Put, 1,000 live').rate,
      '≥ 0.8',
    ],
  ];
  const pkg = (name: string) => require(path.join(root, 'node_modules', name, 'package.json')).version as string;
  const versions = [
    `node ${process.version}`,
    `${os.cpus().length} cores (${os.cpus()[0]?.model.trim() ?? 'unknown cpu'})`,
    `@grpc/grpc-js ${pkg('@grpc/grpc-js')}`,
    `koa ${pkg('koa')}`,
    `better-sqlite3 ${pkg('better-sqlite3')}`,
    `express ${pkg('express')}`,
    `express-session ${pkg('express-session')}`,
    `connect-redis ${pkg('connect-redis')}`,
    `redis (node, peer) ${pkg('redis')}`,
    `ioredis ${pkg('ioredis')}`,
    `redis-server ${redisVersion}`,
    `autocannon ${pkg('autocannon')}`,
  ];
  const lines = [
    `Medians of ${ROUNDS} round(s) of ${DURATION_S} s, after ${WARMUP_S} s of warm-up per system; ${CONNECTIONS} connections (one session each) for pages, ${IN_FLIGHT} operations in flight for the store.`,
    '',
    '| system | rate | p50 ms | p99 ms | errors | web process CPU µs per request | machine CPU µs per request |',
    '|---|---:|---:|---:|---:|---:|---:|',
    ...rows.map(
      (r) =>
        `| ${r.name} | ${Math.round(r.m.rate).toLocaleString('en-US')} ${r.unit} | ${r.m.p50.toFixed(2)} | ${r.m.p99.toFixed(2)} | ${r.m.errors} | ${Number.isFinite(r.m.cpuUs) ? Math.round(r.m.cpuUs!) : '–'} | ${Number.isFinite(r.m.machineUs) ? Math.round(r.m.machineUs!) : '–'} |`,
    ),
    '',
    '| ratio | measured | goal |',
    '|---|---:|---:|',
    ...ratios.map(([name, value, goal]) => `| ${name} | ${value.toFixed(2)}× | ${goal} |`),
    '',
    `Versions: ${versions.join(', ')}.`,
  ];
  const table = lines.join('\n');
  process.stdout.write(table + '\n');
  mkdirSync(outDir, { recursive: true });
  writeFileSync(path.join(outDir, 'bench.md'), table + '\n');
  const pageRows = rows.filter((r) => r.unit === 'req/s');
  writeFileSync(
    path.join(outDir, 'bench.svg'),
    barChart(
      `Counter page, ${CONNECTIONS} connections, one session each (median req/s, ${os.cpus().length} cores)`,
      'req/s',
      pageRows.map((r) => ({ label: r.name.replace('counter page: ', ''), value: r.m.rate, highlight: r.name.includes('ours (SQLite') })),
    ),
  );
  log(`wrote ${path.relative(root, path.join(outDir, 'bench.md'))} and bench.svg`);
}

main().catch((err) => {
  process.stderr.write(`bench failed: ${(err as Error).stack}\n`);
  process.exit(1);
});
