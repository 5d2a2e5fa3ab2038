import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { createRawClient, createStoreClient, type StoreClient } from '../services/client/store-client';
import type { WatchEvent } from '../services/generated/kv';
import { NO_ENV_FILE, type Proc, root, startStore, tempDir, waitForLine } from './helpers/procs';
import { parsePrometheus } from './helpers/prometheus';
import { type RedisServer, requireRedis, startRedisServer } from './helpers/redis';

function dumpKeys(storePort: number): Promise<string[]> {
  return new Promise((resolve, reject) =>
    execFile(path.join(root, 'bin', 'dump'), [`127.0.0.1:${storePort}`, '--keys-only', '--no-progress'], { env: { PATH: process.env.PATH ?? '', ...NO_ENV_FILE }, timeout: 20_000 }, (err, stdout, stderr) =>
      err ? reject(new Error(`bin/dump failed: ${stderr}`)) : resolve(stdout.split('\n').filter(Boolean)),
    ),
  );
}

async function metricsOf(store: Proc): Promise<Map<string, number>> {
  const { port } = JSON.parse(await waitForLine(store, (l) => l.includes('"metrics listening"'))) as { port: number };
  return parsePrometheus(await (await fetch(`http://127.0.0.1:${port}/metrics`)).text());
}

async function listKeys(client: StoreClient): Promise<string[]> {
  const keys: string[] = [];
  for await (const entry of client.list({ keysOnly: true })) keys.push(entry.key);
  return keys;
}

describe('Two stores sharing one Redis with different REDIS_KEY_PREFIX values (real store processes, real redis-server)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let redis: RedisServer | undefined;
  const stores: Proc[] = [];
  const clients: StoreClient[] = [];

  before(function () {
    requireRedis(this);
    tmp = tempDir();
  });
  afterEach(async () => {
    clients.splice(0).forEach((c) => c.close());
    await Promise.all(stores.splice(0).map((s) => s.stop()));
    await redis?.stop();
    redis = undefined;
  });
  after(() => tmp?.remove());

  async function start(prefix: string): Promise<[Proc, StoreClient]> {
    const store = await startStore(tmp.dir, { STORE_BACKEND: 'redis', REDIS_URL: redis!.url, REDIS_KEY_PREFIX: prefix, STORE_SWEEP_INTERVAL_MS: '100' });
    stores.push(store);
    const client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    clients.push(client);
    await waitForLine(store, (l) => l.includes('"redis ready"'));
    return [store, client];
  }

  it('app: and app2: are separate data sets: Get, Put, Delete, List, bin/dump, Watch, the live count and expiries of one never show the other', async () => {
    redis = await startRedisServer();
    const [storeA, a] = await start('app:');
    const [storeB, b] = await start('app2:');
    const watch = createRawClient({ address: `127.0.0.1:${storeA.port}`, deadlineMs: 3000 }).watch({ prefix: '' });
    const seenByA: string[] = [];
    watch.on('data', (e: WatchEvent) => seenByA.push(e.key));
    watch.on('error', () => undefined);
    try {
      await a.put('mine', Buffer.from('a'), { ttlMs: 60_000 });
      await b.put('mine', Buffer.from('b'), { ttlMs: 60_000 });
      await b.put('short', Buffer.from('b'), { ttlMs: 200 });
      await b.put('gone', Buffer.from('b'), { ttlMs: 60_000 });
      assert.equal(await b.delete('gone'), true);
      assert.equal((await a.get('mine'))?.value.toString(), 'a');
      assert.equal(await a.get('short'), null);
      assert.equal(await a.delete('gone'), false);
      assert.deepEqual(await listKeys(a), ['mine']);
      assert.deepEqual(await dumpKeys(storeA.port), ['mine']);
      await new Promise((r) => setTimeout(r, 600));
      assert.deepEqual(await listKeys(b), ['mine']);
      // The store's own marker key (the prefix itself) is neither an entry nor a live session.
      assert.equal((await metricsOf(storeA)).get('store_live_entries'), 1);
      assert.equal((await metricsOf(storeB)).get('store_live_entries'), 1);
      assert.equal((await metricsOf(storeA)).get('store_expired_swept_total'), 0);
      assert.deepEqual(seenByA, ['mine']);
      assert.ok(!storeA.lines.some((l) => /REDIS_KEY_PREFIX/.test(l)), 'no warning about prefixes');
    } finally {
      watch.cancel();
    }
  });

  for (const [shorter, longer] of [
    ['a:', 'a:b:'],
    ['app', 'app2'],
  ]) {
    it(`nested prefixes ("${shorter}" and "${longer}") are reported in the log of both stores instead of mixing their sessions silently`, async () => {
      redis = await startRedisServer();
      const [storeShort] = await start(shorter);
      const [storeLong, long] = await start(longer);
      const warning = await waitForLine(storeLong, (l) => l.includes(`"other":"${shorter}"`));
      assert.match(warning, new RegExp(`REDIS_KEY_PREFIX=\\\\"${longer}\\\\" starts with \\\\"${shorter}\\\\", the prefix of another store's data set`));
      await long.put('x', Buffer.from('1'), { ttlMs: 60_000 });
      await dumpKeys(storeShort.port);
      await waitForLine(storeShort, (l) => l.includes(`"other":"${longer}"`) && l.includes('starts with this store'));
    });
  }
});
