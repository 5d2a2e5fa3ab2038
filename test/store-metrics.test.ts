import assert from 'node:assert/strict';
import { Metadata, status } from '@grpc/grpc-js';
import { createStoreClient, type StoreClient } from '../services/client/store-client';
import { BatchRequest, GetRequest } from '../services/generated/kv';
import { callRaw, rawStoreClient } from './helpers/raw-grpc';
import { type Proc, startStore, tempDir } from './helpers/procs';
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
