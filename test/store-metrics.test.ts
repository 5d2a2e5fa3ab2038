import assert from 'node:assert/strict';
import { Metadata, status } from '@grpc/grpc-js';
import { createPipeClient } from '../services/client/pipe-client';
import { createStoreClient, StoreClientError, type StoreClient } from '../services/client/store-client';
import { BatchRequest, GetRequest } from '../services/generated/kv';
import { type Backend, StoreError } from '../services/store/backends/backend';
import { StoreMetrics, throttledCount } from '../services/store/metrics';
import { callRaw, rawStoreClient } from './helpers/raw-grpc';
import { type Proc, startStore, tempDir, waitForLine } from './helpers/procs';
import { parsePrometheus } from './helpers/prometheus';

describe('store metrics endpoint (real store process)', function () {
  this.timeout(30_000);
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let client: StoreClient;
  let metricsUrl: string;

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir, { STORE_SWEEP_INTERVAL_MS: '50' });
    const line = store.lines.map((l) => JSON.parse(l) as { msg: string; port: number; host: string }).find((l) => l.msg === 'metrics listening');
    assert.ok(line && line.port > 0 && line.host === '127.0.0.1', 'the metrics port is logged, bound to STORE_HOST');
    metricsUrl = `http://127.0.0.1:${line.port}/metrics`;
    client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
  });
  after(async () => {
    client?.close();
    await store?.stop();
    tmp?.remove();
  });

  const scrape = async () => {
    const res = await fetch(metricsUrl);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
    return parsePrometheus(await res.text());
  };
  const at = (samples: Map<string, number>, key: string) => samples.get(key) ?? 0;

  it('serves valid Prometheus text with the store families and the default process metrics', async () => {
    const samples = await scrape();
    const names = new Set([...samples.keys()].map((k) => k.split('{')[0]));
    for (const name of [
      'store_live_entries',
      'store_expired_swept_total',
      'process_cpu_user_seconds_total',
      'process_resident_memory_bytes',
      'nodejs_eventloop_lag_seconds',
    ]) {
      assert.ok(names.has(name), `has ${name}`);
    }
    assert.equal((await fetch(metricsUrl.replace('/metrics', '/other'))).status, 404);
  });

  it('counters move with calls: RPCs by method and code, backend latency, batch sizes, live entries, expired entries swept', async () => {
    const before = await scrape();
    for (const k of ['m1', 'm2', 'm3']) await client.put(k, Buffer.from(k), { ttlMs: 60_000 });
    await client.put('short', Buffer.from('x'), { ttlMs: 1 });
    await client.get('m1');
    const raw = rawStoreClient(`127.0.0.1:${store.port}`);
    try {
      const bad = await callRaw(raw, 'Get', [Buffer.from(GetRequest.encode({ key: '', refreshTtlMs: 0 }).finish())], new Metadata());
      assert.equal(bad.code, status.INVALID_ARGUMENT);
      const batch = BatchRequest.encode({
        id: 1,
        ops: [
          { op: { $case: 'get', value: { key: 'm1', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: '' },
          { op: { $case: 'get', value: { key: 'm2', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: '' },
        ],
      }).finish();
      assert.equal((await callRaw(raw, 'Batch', [Buffer.from(batch)])).code, status.OK);
    } finally {
      raw.close();
    }
    let after = await scrape();
    for (let i = 0; i < 100 && at(after, 'store_expired_swept_total') === at(before, 'store_expired_swept_total'); i += 1) {
      await new Promise((r) => setTimeout(r, 50));
      after = await scrape();
    }
    const delta = (key: string) => at(after, key) - at(before, key);
    assert.equal(delta('store_rpc_handled_total{method="Put",code="OK"}'), 4);
    assert.equal(delta('store_rpc_handled_total{method="Get",code="OK"}'), 1);
    assert.equal(delta('store_rpc_handled_total{method="Get",code="INVALID_ARGUMENT"}'), 1);
    assert.equal(delta('store_rpc_handled_total{method="Batch",code="OK"}'), 1);
    assert.equal(delta('store_rpc_duration_seconds_count{method="Put",code="OK"}'), 4);
    assert.ok(delta('store_rpc_duration_seconds_sum{method="Put",code="OK"}') > 0);
    assert.equal(delta('store_backend_duration_seconds_count{op="put"}'), 4);
    assert.equal(delta('store_backend_duration_seconds_count{op="batch"}'), 1);
    assert.equal(delta('store_batch_ops_count'), 1);
    assert.equal(delta('store_batch_ops_sum'), 2);
    assert.equal(at(after, 'store_live_entries'), 3);
    assert.equal(delta('store_expired_swept_total'), 1);
  });
});

describe('failed operations inside batches (real store process)', function () {
  this.timeout(30_000);
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;

  before(async () => {
    tmp = tempDir();
    // One key at most: a second new key is refused with UNAVAILABLE ("the store is full").
    store = await startStore(tmp.dir, { STORE_MAX_ENTRIES: '1', LOG_LEVEL: 'debug' });
  });
  after(async () => {
    await store?.stop();
    tmp?.remove();
  });

  it('an operation refused inside an OK Pipe batch or Batch call is logged at its own level, counted by code, and named in the line', async () => {
    const address = `127.0.0.1:${store.port}`;
    const pipe = createPipeClient({ address, deadlineMs: 5000 });
    try {
      await pipe.put('first', Buffer.from('x'), { ttlMs: 60_000, requestId: 'req-fits' });
      await assert.rejects(pipe.put('second', Buffer.from('x'), { ttlMs: 60_000, requestId: 'req-full' }), (err: unknown) => {
        assert.ok(err instanceof StoreClientError && err.kind === 'unavailable', String(err));
        return true;
      });
    } finally {
      pipe.close();
    }
    const raw = rawStoreClient(address);
    try {
      const batch = BatchRequest.encode({
        id: 1,
        ops: [
          { op: { $case: 'get', value: { key: 'first', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: 'req-bad-batch' },
          { op: { $case: 'get', value: { key: '', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: 'req-bad-batch' },
        ],
      }).finish();
      assert.equal((await callRaw(raw, 'Batch', [Buffer.from(batch)])).code, status.OK);
    } finally {
      raw.close();
    }
    const entry = async (requestId: string) =>
      JSON.parse(await waitForLine(store, (l) => l.includes('"msg":"rpc"') && l.includes(`"requestId":"${requestId}"`))) as Record<string, unknown>;
    const full = await entry('req-full');
    assert.deepEqual([full.method, full.code, full.level, full.failed], ['Pipe', 'OK', 40, { UNAVAILABLE: 1 }], 'UNAVAILABLE at warn, as for a unary call');
    const fits = await entry('req-fits');
    assert.deepEqual([fits.level, fits.failed], [20, undefined], 'a batch whose operations all succeed stays at debug');
    const invalid = await entry('req-bad-batch');
    assert.deepEqual([invalid.method, invalid.code, invalid.level, invalid.failed], ['Batch', 'OK', 30, { INVALID_ARGUMENT: 1 }], 'a refused operation at info');

    const line = store.lines.map((l) => JSON.parse(l) as { msg: string; port: number }).find((l) => l.msg === 'metrics listening');
    const samples = parsePrometheus(await (await fetch(`http://127.0.0.1:${line!.port}/metrics`)).text());
    assert.equal(samples.get('store_batch_op_failures_total{method="Pipe",code="UNAVAILABLE"}'), 1);
    assert.equal(samples.get('store_batch_op_failures_total{method="Batch",code="INVALID_ARGUMENT"}'), 1);
    assert.equal(samples.get('store_rpc_handled_total{method="Pipe",code="OK"}'), 2, 'each Pipe batch is still one OK call');
  });
});

describe('store_live_entries counting', () => {
  it('a slow count runs at most 1% of the time (after one that took 500 ms the value is reused for 50 s), a quick one every time, and calls during a count share it', async () => {
    let clock = 0;
    let calls = 0;
    const count = throttledCount(
      async () => {
        calls += 1;
        clock += calls <= 2 ? 500 : 20; // the first two counts take 500 ms of the fake clock, later ones 20 ms
        return calls * 10;
      },
      0.01,
      () => clock,
    );
    assert.deepEqual(await Promise.all([count(), count()]), [10, 10]);
    assert.equal(calls, 1, 'two scrapes at once share one count');
    clock += 49_000;
    assert.equal(await count(), 10, 'within 500 ms / 1% = 50 s of the last start: the last value');
    assert.equal(calls, 1);
    clock += 1_000;
    assert.equal(await count(), 10, 'after 50 s: the last value at once, and a recount starts');
    assert.equal(calls, 2);
    assert.equal(await count(), 20, 'the recount is in');
    clock += 50_000;
    assert.equal(await count(), 20, 'due again: the last value, and a recount that is quick');
    assert.equal(await count(), 30, 'the quick recount is in');
    assert.equal(await count(), 40, 'after a quick count, every call counts');
    assert.equal(calls, 4);
  });

  it('once a count is slow, a caller never waits for the next one; a recount that fails is reported once, at the next call', async () => {
    let clock = 0;
    const pending: Array<{ resolve: (n: number) => void; reject: (e: Error) => void }> = [];
    const count = throttledCount(
      () =>
        new Promise<number>((resolve, reject) => {
          pending.push({ resolve, reject });
        }),
      0.01,
      () => clock,
    );
    const first = count();
    clock += 1_000;
    pending[0].resolve(5);
    assert.equal(await first, 5, 'the first count is awaited');
    clock += 100_000;
    assert.equal(await count(), 5, 'the due recount does not hold the caller');
    assert.equal(pending.length, 2);
    assert.equal(await count(), 5, 'nor does a call while it runs, and no second recount starts');
    assert.equal(pending.length, 2);
    pending[1].reject(new Error('backend down'));
    await new Promise((r) => setImmediate(r));
    await assert.rejects(count(), /backend down/, 'the failure is reported at the next call');
    assert.equal(pending.length, 3, 'which starts another recount');
    assert.equal(await count(), 5, 'reported once');
  });

  it('a backend that cannot count does not fail the scrape: the gauge keeps its last value and the failure is counted in that same scrape', async () => {
    let down = false;
    const backend: Backend = {
      name: 'fake',
      batch: async () => [],
      list: async function* () {},
      watch: () => () => undefined,
      ping: async () => undefined,
      countLive: async () => {
        if (down) throw new StoreError('unavailable', 'backend down');
        return 7;
      },
      close: async () => undefined,
    };
    const metrics = new StoreMetrics(backend);
    try {
      const read = async () => parsePrometheus(await metrics.registry.metrics());
      assert.equal((await read()).get('store_live_entries'), 7);
      down = true;
      // The last count was quick, so this scrape counts again (and fails): an alert on the counter
      // sees it now, not a scrape later (prom-client reads every metric of a scrape at once).
      const during = await read();
      assert.equal(during.get('store_live_entries'), 7);
      assert.equal(during.get('store_live_entries_count_failures_total'), 1);
    } finally {
      metrics.close();
    }
  });
});
