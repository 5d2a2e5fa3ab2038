import assert from 'node:assert/strict';
import { Metadata, type ServiceError, status } from '@grpc/grpc-js';
import { createRawClient, createStoreClient, type StoreClient, StoreClientError } from '../services/client/store-client';
import type {
  BatchRequest,
  BatchResponse,
  DeleteRequest,
  DeleteResponse,
  GetRequest,
  GetResponse,
  PutRequest,
  PutResponse,
  SessionStoreClient,
} from '../services/generated/kv';
import { type WatchEvent, WatchEvent_Kind } from '../services/generated/kv';
import { type Proc, startStore, tempDir } from './helpers/procs';

type Callback<Res> = (err: ServiceError | null, res: Res) => void;
type UnaryFn<Req, Res> = (req: Req, md: Metadata, cb: Callback<Res>) => unknown;

function unary<Req, Res>(fn: UnaryFn<Req, Res>, req: Req): Promise<Res> {
  return new Promise((resolve, reject) => fn(req, new Metadata(), (err, res) => (err ? reject(err) : resolve(res))));
}

async function codeOf(promise: Promise<unknown>): Promise<{ code: number; details: string }> {
  try {
    await promise;
  } catch (err) {
    const e = err as ServiceError;
    return { code: e.code, details: e.details };
  }
  throw new Error('expected the call to fail');
}

describe('SessionStore over gRPC (real store process, temp SQLite)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let client: StoreClient;
  let raw: SessionStoreClient;

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir, { STORE_MAX_KEY_BYTES: '64', STORE_MAX_VALUE_BYTES: '1024', STORE_MAX_TTL_MS: '3600000' });
    client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 2000 });
    raw = createRawClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 2000 });
  });
  after(async () => {
    client?.close();
    raw?.close();
    await store?.stop();
    tmp?.remove();
  });

  it('Put then Get round-trips value, version and expiry', async () => {
    const written = await client.put('rt', Buffer.from('hello'), { ttlMs: 60_000 });
    const read = await client.get('rt');
    assert.equal(read?.value.toString(), 'hello');
    assert.equal(read?.version, written.version);
    assert.equal(read?.expiresAtMs, written.expiresAtMs);
  });

  it('Get of a missing key answers found=false (the documented not-found answer)', async () => {
    const res = await unary<GetRequest, GetResponse>(raw.get.bind(raw), { key: 'nope', refreshTtlMs: 0 });
    assert.equal(res.found, false);
    assert.equal(await client.get('nope'), null);
  });

  it('Put with a stale expected_version fails with ABORTED and changes nothing', async () => {
    const a = await client.put('cas', Buffer.from('1'), { ttlMs: 60_000 });
    await client.put('cas', Buffer.from('2'), { ttlMs: 60_000, expectedVersion: a.version });
    const err = await codeOf(unary<PutRequest, PutResponse>(raw.put.bind(raw), { key: 'cas', value: Buffer.from('3'), ttlMs: 0, expectedVersion: a.version }));
    assert.equal(err.code, status.ABORTED);
    assert.equal((await client.get('cas'))?.value.toString(), '2');
    await assert.rejects(client.put('cas', Buffer.from('4'), { ttlMs: 1000, expectedVersion: 0 }), (e: StoreClientError) => e.kind === 'conflict');
  });

  it('Delete removes the entry and reports whether it existed', async () => {
    await client.put('del', Buffer.from('x'), { ttlMs: 60_000 });
    assert.equal(await client.delete('del'), true);
    assert.equal(await client.delete('del'), false);
    assert.equal(await client.get('del'), null);
  });

  it('an entry expires after its TTL; Get with refresh slides it', async () => {
    await client.put('short', Buffer.from('x'), { ttlMs: 100 });
    await client.put('slid', Buffer.from('x'), { ttlMs: 150 });
    await new Promise((r) => setTimeout(r, 80));
    assert.ok(await client.get('slid', { refreshTtlMs: 60_000 }));
    await new Promise((r) => setTimeout(r, 120));
    assert.equal(await client.get('short'), null);
    assert.ok(await client.get('slid'));
  });

  it('List streams by prefix in key order with limit and resume point', async () => {
    for (const k of ['l:3', 'l:1', 'm:1', 'l:2']) await client.put(k, Buffer.from(k), { ttlMs: 60_000 });
    const keys = async (opts: Parameters<StoreClient['list']>[0]) => {
      const out: string[] = [];
      for await (const e of client.list(opts)) out.push(e.key);
      return out;
    };
    assert.deepEqual(await keys({ prefix: 'l:' }), ['l:1', 'l:2', 'l:3']);
    assert.deepEqual(await keys({ prefix: 'l:', limit: 2 }), ['l:1', 'l:2']);
    assert.deepEqual(await keys({ prefix: 'l:', startAfter: 'l:1' }), ['l:2', 'l:3']);
  });

  it('Batch answers each operation on its own', async () => {
    const res = await unary<BatchRequest, BatchResponse>(raw.batch.bind(raw), {
      id: 7,
      ops: [
        { op: { $case: 'put', value: { key: 'b1', value: Buffer.from('x'), ttlMs: 0, expectedVersion: undefined } }, timeoutMs: 0, requestId: '' },
        { op: { $case: 'get', value: { key: '', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: '' },
        { op: { $case: 'get', value: { key: 'b1', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: '' },
      ],
    });
    assert.equal(res.id, 7);
    assert.deepEqual(res.results.map((r) => r.code), [status.OK, status.INVALID_ARGUMENT, status.OK]);
  });

  describe('invalid arguments are INVALID_ARGUMENT or RESOURCE_EXHAUSTED, naming the field', () => {
    const cases: Array<[string, () => Promise<unknown>, number, RegExp]> = [
      ['empty key on Get', () => unary<GetRequest, GetResponse>(raw.get.bind(raw), { key: '', refreshTtlMs: 0 }), status.INVALID_ARGUMENT, /key/],
      ['empty key on Put', () => unary<PutRequest, PutResponse>(raw.put.bind(raw), { key: '', value: Buffer.alloc(0), ttlMs: 0, expectedVersion: undefined }), status.INVALID_ARGUMENT, /key/],
      ['negative TTL', () => unary<PutRequest, PutResponse>(raw.put.bind(raw), { key: 'k', value: Buffer.alloc(0), ttlMs: -5, expectedVersion: undefined }), status.INVALID_ARGUMENT, /ttl_ms/],
      ['TTL above the maximum', () => unary<PutRequest, PutResponse>(raw.put.bind(raw), { key: 'k', value: Buffer.alloc(0), ttlMs: 7_200_000, expectedVersion: undefined }), status.INVALID_ARGUMENT, /maximum TTL/],
      ['negative refresh TTL', () => unary<GetRequest, GetResponse>(raw.get.bind(raw), { key: 'k', refreshTtlMs: -1 }), status.INVALID_ARGUMENT, /refresh_ttl_ms/],
      ['key too long', () => unary<GetRequest, GetResponse>(raw.get.bind(raw), { key: 'k'.repeat(65), refreshTtlMs: 0 }), status.RESOURCE_EXHAUSTED, /STORE_MAX_KEY_BYTES/],
      ['value too large', () => unary<PutRequest, PutResponse>(raw.put.bind(raw), { key: 'k', value: Buffer.alloc(1025), ttlMs: 0, expectedVersion: undefined }), status.RESOURCE_EXHAUSTED, /STORE_MAX_VALUE_BYTES/],
      ['empty key on Delete', () => unary<DeleteRequest, DeleteResponse>(raw.delete.bind(raw), { key: '', expectedVersion: undefined }), status.INVALID_ARGUMENT, /key/],
    ];
    for (const [name, call, code, message] of cases) {
      it(name, async () => {
        const err = await codeOf(call());
        assert.equal(err.code, code, err.details);
        assert.match(err.details, message);
      });
    }
  });
});

describe('a full store (STORE_MAX_ENTRIES) whose sessions expired (real store process, sweeper off)', function () {
  this.timeout(20_000);
  it('new sessions get in as soon as held ones have expired, without waiting for the sweeper; each expiry is reported to Watch once, before the put that took its place', async () => {
    const tmp = tempDir();
    const store = await startStore(tmp.dir, { STORE_MAX_ENTRIES: '20', STORE_SWEEP_INTERVAL_MS: '0' });
    const client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 2000 });
    const raw = createRawClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 2000 });
    const events: string[] = [];
    const watch = raw.watch({ prefix: '' }, new Metadata());
    watch.on('data', (e: WatchEvent) => events.push(`${e.kind === WatchEvent_Kind.EXPIRE ? 'expire' : e.kind === WatchEvent_Kind.PUT ? 'put' : 'delete'}:${e.key}`));
    watch.on('error', () => undefined);
    try {
      // Watch is open once a put is seen on it.
      // Long enough that none of the 20 held keys expires before the refused put, however slow the
      // machine; the test then waits for all of them to have expired.
      const heldTtlMs = 3000;
      await client.put('probe', Buffer.from('p'), { ttlMs: heldTtlMs });
      for (let i = 0; events.length === 0 && i < 100; i += 1) await new Promise((r) => setTimeout(r, 20));
      for (let i = 0; i < 19; i += 1) await client.put(`old:${i}`, Buffer.from('o'), { ttlMs: heldTtlMs });
      const lastHeldAt = Date.now();
      const refused = await client.put('new:0', Buffer.from('n'), { ttlMs: 60_000 }).then(
        () => undefined,
        (err: unknown) => err,
      );
      assert.ok(refused instanceof StoreClientError && refused.code === status.UNAVAILABLE, 'full: a new key is refused');
      assert.match(refused.message, /the store is full.*STORE_MAX_ENTRIES/);
      await new Promise((r) => setTimeout(r, lastHeldAt + heldTtlMs + 100 - Date.now()));
      for (let i = 0; i < 20; i += 1) await client.put(`new:${i}`, Buffer.from('n'), { ttlMs: 60_000 });
      assert.equal((await client.get('new:19'))?.value.toString(), 'n');
      assert.equal(await client.get('old:0'), null);
      const keys: string[] = [];
      for await (const entry of client.list({ keysOnly: true })) keys.push(entry.key);
      assert.equal(keys.length, 20);
      assert.ok(keys.every((key) => key.startsWith('new:')));
      await new Promise((r) => setTimeout(r, 200));
      const expired = events.filter((e) => e.startsWith('expire:'));
      assert.equal(new Set(expired).size, 20, `every key held before (old:0-18 and probe) is reported expired once: ${expired.join(' ')}`);
      assert.equal(expired.length, 20);
      assert.ok(events.indexOf(expired[0]) < events.indexOf('put:new:0'), 'an expiry comes before the first new put');
    } finally {
      watch.cancel();
      client.close();
      raw.close();
      await store.stop();
      tmp.remove();
    }
  });
});
