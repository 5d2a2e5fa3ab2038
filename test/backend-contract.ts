import assert from 'node:assert/strict';
import type { Backend, BackendOp, StoredEntry } from '../services/store/backends/backend';
import { runOne } from '../services/store/backends/backend';

/** A backend under test and how to dispose of it. */
export interface BackendFixture {
  backend: Backend;
  close(): Promise<void>;
}

const put = (key: string, value: string, ttlMs = 60_000, expectedVersion?: number): BackendOp => ({
  kind: 'put',
  key,
  value: Buffer.from(value),
  ttlMs,
  expectedVersion,
});
const get = (key: string, refreshTtlMs = 0): BackendOp => ({ kind: 'get', key, refreshTtlMs });
const del = (key: string, expectedVersion?: number): BackendOp => ({ kind: 'delete', key, expectedVersion });

async function until(check: () => Promise<boolean>, timeoutMs = 5000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > end) throw new Error('condition not reached in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function collect(iterable: AsyncIterable<StoredEntry>): Promise<string[]> {
  const keys: string[] = [];
  for await (const entry of iterable) keys.push(entry.key);
  return keys;
}

/**
 * The one contract every backend must meet, run against each of them (the same file, the same
 * assertions). `create` gives a fresh, empty backend; `prefix` isolates keys of one run.
 */
export function describeBackendContract(name: string, create: () => Promise<BackendFixture>): void {
  describe(`backend contract: ${name}`, function () {
    let fixture: BackendFixture;
    let b: Backend;
    beforeEach(async () => {
      fixture = await create();
      b = fixture.backend;
    });
    afterEach(async () => fixture.close());

    it('a put is read back with its value, a positive version and an expiry', async () => {
      const before = Date.now();
      const written = (await runOne(b, put('k1', 'v1', 60_000))) as StoredEntry;
      const read = (await runOne(b, get('k1'))) as StoredEntry;
      assert.equal(read.value.toString(), 'v1');
      assert.equal(read.version, written.version);
      assert.ok(read.version > 0);
      assert.ok(read.expiresAtMs >= before + 60_000 && read.expiresAtMs <= Date.now() + 60_000);
      assert.ok(read.createdAtMs >= before - 5);
    });

    it('a missing key reads as null, not as an error', async () => {
      assert.equal(await runOne(b, get('absent')), null);
      assert.equal(await runOne(b, del('absent')), false);
    });

    it('every write increases the version and keeps createdAt', async () => {
      const a = (await runOne(b, put('k', 'a'))) as StoredEntry;
      const c = (await runOne(b, put('k', 'b'))) as StoredEntry;
      assert.ok(c.version > a.version);
      assert.equal(c.createdAtMs, a.createdAtMs);
    });

    it('compare-and-set: a matching version writes, a stale one fails with conflict and changes nothing', async () => {
      const a = (await runOne(b, put('cas', 'one'))) as StoredEntry;
      const c = (await runOne(b, put('cas', 'two', 60_000, a.version))) as StoredEntry;
      const [stale] = await b.batch([put('cas', 'three', 60_000, a.version)]);
      assert.equal(stale.ok, false);
      assert.equal(!stale.ok && stale.error.kind, 'conflict');
      const read = (await runOne(b, get('cas'))) as StoredEntry;
      assert.equal(read.value.toString(), 'two');
      assert.equal(read.version, c.version);
    });

    it('expected version 0 means "must not exist yet"', async () => {
      await runOne(b, put('new', 'x', 60_000, 0));
      const [again] = await b.batch([put('new', 'y', 60_000, 0)]);
      assert.equal(!again.ok && again.error.kind, 'conflict');
    });

    it('a delete with a stale version fails and keeps the entry', async () => {
      const a = (await runOne(b, put('d', 'x'))) as StoredEntry;
      const [stale] = await b.batch([del('d', a.version + 1)]);
      assert.equal(!stale.ok && stale.error.kind, 'conflict');
      assert.equal(await runOne(b, del('d', a.version)), true);
      assert.equal(await runOne(b, get('d')), null);
    });

    it('versions keep growing across delete and re-create', async () => {
      const a = (await runOne(b, put('re', 'x'))) as StoredEntry;
      await runOne(b, del('re'));
      const c = (await runOne(b, put('re', 'y'))) as StoredEntry;
      assert.ok(c.version > a.version);
    });

    it('an expired entry is never returned by get or list, and is a new key for CAS', async () => {
      await runOne(b, put('exp:a', 'x', 50));
      await runOne(b, put('exp:b', 'y', 60_000));
      await new Promise((r) => setTimeout(r, 80));
      assert.equal(await runOne(b, get('exp:a')), null);
      assert.deepEqual(await collect(b.list({ prefix: 'exp:', startAfter: '', limit: 0, keysOnly: false })), ['exp:b']);
      await runOne(b, put('exp:a', 'z', 60_000, 0));
    });

    it('get with a refresh TTL slides the expiry without changing the version', async () => {
      const a = (await runOne(b, put('slide', 'x', 100))) as StoredEntry;
      const read = (await runOne(b, get('slide', 60_000))) as StoredEntry;
      assert.equal(read.version, a.version);
      assert.ok(read.expiresAtMs > Date.now() + 50_000);
      await new Promise((r) => setTimeout(r, 150));
      assert.ok(await runOne(b, get('slide')));
    });

    it('list streams keys with the prefix in ascending order, honours limit and resumes after a key', async () => {
      for (const key of ['p:c', 'p:a', 'q:z', 'p:b', 'p:d']) await runOne(b, put(key, key));
      const all = await collect(b.list({ prefix: 'p:', startAfter: '', limit: 0, keysOnly: false }));
      assert.deepEqual(all, ['p:a', 'p:b', 'p:c', 'p:d']);
      assert.deepEqual(await collect(b.list({ prefix: 'p:', startAfter: '', limit: 2, keysOnly: false })), ['p:a', 'p:b']);
      assert.deepEqual(await collect(b.list({ prefix: 'p:', startAfter: 'p:b', limit: 0, keysOnly: true })), ['p:c', 'p:d']);
    });

    it('list pages through many entries without duplicates', async () => {
      const keys = Array.from({ length: 1100 }, (_, i) => `many:${String(i).padStart(5, '0')}`);
      await b.batch(keys.map((k) => put(k, 'v')));
      const listed = await collect(b.list({ prefix: 'many:', startAfter: '', limit: 0, keysOnly: true }));
      assert.deepEqual(listed, keys);
    });

    it('a batch runs its operations in order and reports each result on its own', async () => {
      const results = await b.batch([put('bk', '1'), get('bk'), put('bk', '2', 60_000, 12345), del('bk'), get('bk')]);
      assert.equal(results[0].ok, true);
      assert.equal(results[1].ok && (results[1].value as StoredEntry).value.toString(), '1');
      assert.equal(!results[2].ok && results[2].error.kind, 'conflict');
      assert.equal(results[3].ok && results[3].value, true);
      assert.equal(results[4].ok && results[4].value, null);
    });

    it('concurrent compare-and-set increments lose no update', async () => {
      await runOne(b, put('ctr', '0'));
      const increment = async () => {
        for (;;) {
          const cur = (await runOne(b, get('ctr'))) as StoredEntry;
          const [res] = await b.batch([put('ctr', String(Number(cur.value.toString()) + 1), 60_000, cur.version)]);
          if (res.ok) return;
          if (res.error.kind !== 'conflict') throw res.error;
        }
      };
      await Promise.all(Array.from({ length: 50 }, increment));
      assert.equal(((await runOne(b, get('ctr'))) as StoredEntry).value.toString(), '50');
    });

    it('watch reports put, delete and expire for keys with the prefix', async () => {
      const seen: string[] = [];
      const stop = b.watch('w:', (e) => seen.push(`${e.kind} ${e.key}`));
      try {
        await runOne(b, put('w:1', 'x'));
        await runOne(b, put('other', 'x'));
        await runOne(b, del('w:1'));
        await runOne(b, put('w:2', 'x', 50));
        await until(async () => seen.includes('expire w:2'), 10_000);
        assert.deepEqual(seen.slice(0, 2), ['put w:1', 'delete w:1']);
      } finally {
        stop();
      }
    });

    it('ping succeeds and countLive counts only live entries', async () => {
      await b.ping();
      await runOne(b, put('live', 'x'));
      await runOne(b, put('dead', 'x', 30));
      await new Promise((r) => setTimeout(r, 60));
      assert.equal(await b.countLive(), 1);
    });
  });
}
