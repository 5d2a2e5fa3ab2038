import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import calculateSlot from 'cluster-key-slot';
import { Redis } from 'ioredis';
import { RedisBackend } from '../services/store/backends/redis';
import { createStoreClient, type StoreClient } from '../services/client/store-client';
import { NO_ENV_FILE, type Proc, root, startStore, tempDir } from './helpers/procs';
import { type RedisClusterProcs, redisCli, redisCommand, requireRedis, startRedisCluster } from './helpers/redis';

const ENTRIES = 3000;
const keyOf = (i: number) => `k${String(i).padStart(5, '0')}`;
const valueOf = (key: string) => `{"count1":1,"of":"${key}"}`;

interface DumpResult {
  code: number;
  stdout: string;
  stderr: string;
}

function dump(storePort: number, ...args: string[]): Promise<DumpResult> {
  return new Promise((resolve) =>
    execFile(path.join(root, 'bin', 'dump'), [`127.0.0.1:${storePort}`, '--no-progress', ...args], { env: { PATH: process.env.PATH ?? '', ...NO_ENV_FILE }, timeout: 20_000, maxBuffer: 64 << 20 }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    ),
  );
}

interface Master {
  id: string;
  port: number;
  owns(slot: number): boolean;
}

/** The masters of the cluster, from one node's CLUSTER NODES. */
async function clusterMasters(port: number): Promise<Master[]> {
  const lines = (await redisCommand(port, 'CLUSTER', 'NODES')).split('\n').filter(Boolean).map((l) => l.split(' '));
  return lines
    .filter((n) => n[2].includes('master'))
    .map((n) => ({
      id: n[0],
      port: Number(n[1].split('@')[0].split(':')[1]),
      owns: (slot: number) =>
        n.slice(8).some((range) => {
          const [low, high = low] = range.split('-').map(Number);
          return slot >= low && slot <= high;
        }),
    }));
}

/** Moves a slot and its keys from one master to another, as redis-cli --cluster reshard does. */
async function moveSlot(slot: number, from: Master, to: Master, masters: Master[]): Promise<void> {
  await redisCommand(to.port, 'CLUSTER', 'SETSLOT', String(slot), 'IMPORTING', from.id);
  await redisCommand(from.port, 'CLUSTER', 'SETSLOT', String(slot), 'MIGRATING', to.id);
  const keys = (await redisCli('-p', String(from.port), 'CLUSTER', 'GETKEYSINSLOT', String(slot), '100000')).split('\n').filter(Boolean);
  await redisCommand(from.port, 'MIGRATE', '127.0.0.1', String(to.port), '', '0', '5000', 'KEYS', ...keys);
  for (const master of masters) await redisCommand(master.port, 'CLUSTER', 'SETSLOT', String(slot), 'NODE', to.id);
}

describe('List and bin/dump on a Redis Cluster while slots move between masters (real store, real redis-cli --cluster reshard)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let cluster: RedisClusterProcs | undefined;
  let store: Proc | undefined;
  let client: StoreClient | undefined;
  const keys = Array.from({ length: ENTRIES }, (_, i) => keyOf(i));

  before(async function () {
    requireRedis(this);
    tmp = tempDir();
    cluster = await startRedisCluster(3);
    // A window smaller than the data: each listing takes several passes over the masters.
    store = await startStore(tmp.dir, { STORE_BACKEND: 'redis', REDIS_CLUSTER_NODES: cluster.seeds, REDIS_COMMAND_TIMEOUT_MS: '2000', REDIS_LIST_WINDOW: '1000' });
    client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 5000 });
    for (let i = 0; i < ENTRIES; i += 200) {
      await Promise.all(keys.slice(i, i + 200).map((key) => client!.put(key, Buffer.from(valueOf(key)), { ttlMs: 600_000 })));
    }
  });
  after(async () => {
    client?.close();
    await store?.stop();
    await cluster?.stop();
    tmp?.remove();
  });

  it('every listing during a resharding (bin/dump, and List paged by start_after) has each entry exactly once, in order, with its value, while a writer runs', async function () {
    this.timeout(60_000);
    const masters = await clusterMasters(cluster!.masters[0].port);
    let stop = false;
    let reshards = 0;
    const resharder = (async () => {
      for (let i = 0; !stop; i += 1) {
        const [from, to] = [masters[i % 3], masters[(i + 1) % 3]];
        await redisCli('--cluster', 'reshard', `127.0.0.1:${from.port}`, '--cluster-from', from.id, '--cluster-to', to.id, '--cluster-slots', '300', '--cluster-yes', '--cluster-pipeline', '20');
        reshards += 1;
      }
    })();
    const writes = { ok: 0, failed: [] as string[] };
    const writer = (async () => {
      for (let i = 0; !stop; i += 1) {
        await client!.put(`w${i % 100}`, Buffer.from('x'), { ttlMs: 60_000 }).then(
          () => (writes.ok += 1),
          (err: Error) => writes.failed.push(err.message),
        );
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    const listings: string[] = [];
    try {
      const started = Date.now();
      while (Date.now() - started < 12_000 || reshards < 2) {
        assert.ok(Date.now() - started < 40_000, 'the resharding went on too long');
        const dumped = await dump(store!.port, '--prefix', 'k');
        assert.equal(dumped.code, 0, `bin/dump failed during the resharding: ${dumped.stderr}`);
        const lines = dumped.stdout.split('\n').filter(Boolean);
        assert.deepEqual(lines, keys.map((key) => `${key} ${valueOf(key)}`), 'bin/dump: every entry once, in order, with its value');
        listings.push('dump');

        const paged: string[] = [];
        let after = '';
        for (;;) {
          const page: string[] = [];
          for await (const entry of client!.list({ prefix: 'k', startAfter: after, limit: 700 })) {
            assert.equal(entry.value.toString(), valueOf(entry.key));
            page.push(entry.key);
          }
          paged.push(...page);
          if (page.length < 700) break;
          after = page[page.length - 1];
        }
        assert.deepEqual(paged, keys, 'List paged by start_after: every entry once, in order');
        listings.push('list');
      }
    } finally {
      stop = true;
      await resharder;
      await writer;
    }
    assert.ok(listings.length >= 4, `listings: ${listings.length}`);
    assert.deepEqual(writes.failed, [], `writes during the resharding (${writes.ok} ok)`);
  });

  it('a key MIGRATEd from a master not scanned yet to one already scanned is still listed (the slots that moved during the scan are read again)', async function () {
    this.timeout(30_000);
    const masters = await clusterMasters(cluster!.masters[0].port);
    const [slow, other] = masters;
    // 300,000 keys of another application on one master, in one slot it keeps: its SCAN takes
    // a few hundred round trips, the other masters' a handful.
    let tag = 0;
    while (!slow.owns(calculateSlot(`{other${tag}}`))) tag += 1;
    const filler = new Redis({ host: '127.0.0.1', port: slow.port });
    try {
      for (let i = 0; i < 300_000; i += 20_000) {
        const pipeline = filler.pipeline();
        for (let j = i; j < i + 20_000; j += 1) pipeline.set(`{other${tag}}:${j}`, '1');
        await pipeline.exec();
      }
    } finally {
      filler.disconnect();
    }
    const backend = new RedisBackend({ url: 'redis://127.0.0.1', clusterNodes: masters.map((m) => ({ host: '127.0.0.1', port: m.port })), sentinels: [], sentinelMaster: 'mymaster', keyPrefix: 'mv:', commandTimeoutMs: 2000, listWindow: 10_000 });
    try {
      const names = Array.from({ length: 100 }, (_, i) => `key${i}`);
      const results = await backend.batch(names.map((key) => ({ kind: 'put', key, value: Buffer.from('v'), ttlMs: 600_000 })));
      assert.ok(results.every((r) => r.ok));
      const slots = new Set(names.map((name) => calculateSlot(`mv:${name}`)).filter((slot) => slow.owns(slot)));
      assert.ok(slots.size >= 10, `slots of the slow master: ${slots.size}`);
      const listing = (async () => {
        const seen: string[] = [];
        for await (const entry of backend.list({ prefix: '', startAfter: '', limit: 0, keysOnly: true })) seen.push(entry.key);
        return seen;
      })();
      // While the slow master is being scanned, its slots of our keys move to a master done already.
      for (const slot of slots) await moveSlot(slot, slow, other, masters);
      assert.deepEqual(await listing, [...names].sort());
    } finally {
      await backend.close();
    }
  });
});
