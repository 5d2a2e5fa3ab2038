import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { createStoreClient, type StoreClient } from '../services/client/store-client';
import { checkHealth, waitForHealth } from './helpers/health';
import { NO_ENV_FILE, type Proc, root, startStore, tempDir } from './helpers/procs';
import { type RedisClusterProcs, type RedisServer, redisCommand, requireRedis, startRedisCluster, useDefaultNodeTimeout } from './helpers/redis';

/** Runs bin/dump --keys-only against the store: its exit code and the keys it printed. */
function dumpKeys(storePort: number): Promise<{ code: number; keys: string[]; stderr: string }> {
  return new Promise((resolve) =>
    execFile(
      path.join(root, 'bin', 'dump'),
      [`127.0.0.1:${storePort}`, '--keys-only'],
      { env: { PATH: process.env.PATH ?? '', ...NO_ENV_FILE }, timeout: 20_000 },
      (err, stdout, stderr) =>
        resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, keys: stdout.split('\n').filter(Boolean).sort(), stderr }),
    ),
  );
}

/**
 * A 3-master cluster that marks a lost master failed only after 15 s (useDefaultNodeTimeout), with
 * a store process on it serving: started and stopped by the calling describe's hooks.
 */
function storeOnSlowFailoverCluster(): { cluster(): RedisClusterProcs; store(): Proc } {
  let tmp: ReturnType<typeof tempDir> | undefined;
  let cluster: RedisClusterProcs | undefined;
  let store: Proc | undefined;
  before(async function () {
    requireRedis(this);
    tmp = tempDir();
    cluster = await startRedisCluster(3);
    await useDefaultNodeTimeout(cluster);
    store = await startStore(tmp.dir, { STORE_BACKEND: 'redis', REDIS_CLUSTER_NODES: cluster.seeds });
    await waitForHealth(store.port, 'SERVING');
  });
  after(async () => {
    await store?.stop();
    await cluster?.stop();
    tmp?.remove();
  });
  return { cluster: () => cluster!, store: () => store! };
}

/** The replica that replicates `master`. */
async function replicaOf(cluster: RedisClusterProcs, master: RedisServer): Promise<RedisServer> {
  for (const replica of cluster.replicas) {
    if (new RegExp(`master_port:${master.port}\\b`).test(await redisCommand(replica.port, 'INFO', 'replication'))) return replica;
  }
  throw new Error(`no replica of port ${master.port}`);
}

describe('Redis Cluster with replicas: a master fails over (real redis-server processes, a real store, bin/dump)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let cluster: RedisClusterProcs | undefined;
  let store: Proc | undefined;
  let client: StoreClient | undefined;

  before(async function () {
    requireRedis(this);
    tmp = tempDir();
    cluster = await startRedisCluster(3, 1);
    store = await startStore(tmp.dir, { STORE_BACKEND: 'redis', REDIS_CLUSTER_NODES: cluster.seeds });
    client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 5000 });
  });
  after(async () => {
    client?.close();
    await store?.stop();
    await cluster?.stop();
    tmp?.remove();
  });

  it('health checks (one a second) open no new Redis connection while the slot map has not changed', async () => {
    const nodes = [...cluster!.masters, ...cluster!.replicas];
    const received = async () => {
      let total = 0;
      for (const node of nodes) total += Number(/total_connections_received:(\d+)/.exec(await redisCommand(node.port, 'INFO', 'stats'))?.[1]);
      return total;
    };
    await waitForHealth(store!.port, 'SERVING');
    const before = await received();
    await new Promise((r) => setTimeout(r, 3500));
    // Each INFO above comes over a connection of its own: that many are ours, the rest the store's.
    const opened = (await received()) - before - nodes.length;
    assert.equal(opened, 0, `${opened} connections opened by the store in 3.5 s`);
  });

  it('bin/dump lists every session or fails while a master is down and after its replica took over, even when no write reached its slots since: never a listing with its keys left out', async () => {
    const expected = Array.from({ length: 60 }, (_, i) => `sess-${String(i).padStart(2, '0')}`);
    for (const key of expected) await client!.put(key, Buffer.from('{"count1":1}'), { ttlMs: 600_000 });
    const victim = cluster!.masters[0];
    const heir = await replicaOf(cluster!, victim);
    const held = await redisCommand(victim.port, 'DBSIZE');
    assert.ok(Number(held) > 0, 'the master to be killed holds none of the sessions');
    for (const end = Date.now() + 5000; (await redisCommand(heir.port, 'DBSIZE')) !== held; ) {
      assert.ok(Date.now() < end, 'the replica never caught up');
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.deepEqual((await dumpKeys(store!.port)).keys, expected);

    await victim.stop('SIGKILL');
    // No write from here on: the store learns of the failover only by asking the cluster.
    const failures: string[] = [];
    const deadline = Date.now() + 20_000;
    for (;;) {
      const promoted = /role:master/.test(await redisCommand(heir.port, 'INFO', 'replication'));
      const run = await dumpKeys(store!.port);
      if (run.code === 0) assert.deepEqual(run.keys, expected, `bin/dump exited 0 with ${run.keys.length} of ${expected.length} keys`);
      else failures.push(run.stderr.trim());
      if (promoted && run.code === 0) break;
      assert.ok(Date.now() < deadline, `bin/dump never listed every session after the failover: ${failures.at(-1)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.ok(failures.every((f) => /cannot serve|redis/.test(f)), failures.join('\n'));
    await waitForHealth(store!.port, 'SERVING');
  });
});

describe('Redis Cluster: a master down before the cluster notices (real redis-server processes, a real store)', function () {
  // The cluster marks a node failed after cluster-node-timeout (Redis' default is 15 s): until
  // then every other node still reports cluster_state:ok.
  const site = storeOnSlowFailoverCluster();

  it('a master that owns slots down while the others say cluster_state:ok: the store stays SERVING and serves the other masters\' sessions, List fails UNAVAILABLE; once the cluster says cluster_state:fail, NOT_SERVING; SERVING again once it is back', async () => {
    const client = createStoreClient({ address: `127.0.0.1:${site.store().port}`, deadlineMs: 3000 });
    try {
      const keys = Array.from({ length: 30 }, (_, i) => `sess-${i}`);
      for (const key of keys) await client.put(key, Buffer.from('{"count1":1}'), { ttlMs: 600_000 });
      const [victim, ...others] = site.cluster().masters;
      await victim.stop('SIGKILL');
      // Readiness is not completeness: every web would leave rotation for one master's sessions.
      const outcomes: string[] = [];
      for (const end = Date.now() + 3000; Date.now() < end; ) {
        outcomes.push(await checkHealth(site.store().port));
        await new Promise((r) => setTimeout(r, 250));
      }
      assert.ok(outcomes.every((o) => o === 'SERVING'), outcomes.join(' '));
      assert.match(await redisCommand(others[0].port, 'CLUSTER', 'INFO'), /cluster_state:ok/);
      const reads = await Promise.allSettled(keys.map((key) => client.get(key)));
      const served = reads.filter((r) => r.status === 'fulfilled' && r.value !== null).length;
      assert.ok(served >= 10 && served < keys.length, `${served} of ${keys.length} sessions served`);
      const listing = await dumpKeys(site.store().port);
      assert.equal(listing.code, 1, `bin/dump exited 0 with ${listing.keys.length} keys`);
      // The cluster declares the node failed after cluster-node-timeout: no replica, so it refuses every command.
      for (const node of others) await redisCommand(node.port, 'CONFIG', 'SET', 'cluster-node-timeout', '1000');
      await waitForHealth(site.store().port, 'NOT_SERVING', 10_000);
      await victim.start();
      await waitForHealth(site.store().port, 'SERVING', 20_000);
    } finally {
      client.close();
    }
  });
});

describe('Redis Cluster: a master restarted in place, no failover (real redis-server processes, a real store, bin/dump)', function () {
  // Redis' default: a master back within cluster-node-timeout is never marked failed.
  const site = storeOnSlowFailoverCluster();

  it('bin/dump lists every session again once the master is back, with no write to its slots meanwhile', async () => {
    const client = createStoreClient({ address: `127.0.0.1:${site.store().port}`, deadlineMs: 3000 });
    const expected = Array.from({ length: 30 }, (_, i) => `sess-${String(i).padStart(2, '0')}`);
    try {
      for (const key of expected) await client.put(key, Buffer.from('{"count1":1}'), { ttlMs: 600_000 });
    } finally {
      client.close();
    }
    const [victim] = site.cluster().masters;
    // Its sessions survive the restart (the test servers keep no snapshot of their own).
    await redisCommand(victim.port, 'SAVE');
    await victim.stop();
    await victim.start();
    for (const end = Date.now() + 10_000; !/cluster_state:ok/.test(await redisCommand(victim.port, 'CLUSTER', 'INFO')); ) {
      assert.ok(Date.now() < end, 'the restarted master never said cluster_state:ok');
      await new Promise((r) => setTimeout(r, 50));
    }
    let run = await dumpKeys(site.store().port);
    for (const end = Date.now() + 5000; run.code !== 0 && Date.now() < end; run = await dumpKeys(site.store().port)) {
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.equal(run.code, 0, `bin/dump still fails: ${run.stderr.trim()}`);
    assert.deepEqual(run.keys, expected);
  });

  it('health stays SERVING while the restarted master alone says cluster_state:fail (its first seconds back), the others ok', async () => {
    const [victim, other] = site.cluster().masters;
    await waitForHealth(site.store().port, 'SERVING');
    await victim.stop();
    await victim.start();
    const outcomes: string[] = [];
    const views: string[] = [];
    for (const end = Date.now() + 3000; Date.now() < end; ) {
      views.push(/cluster_state:(\w+)/.exec(await redisCommand(victim.port, 'CLUSTER', 'INFO'))![1]);
      outcomes.push(await checkHealth(site.store().port));
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.ok(views.includes('fail'), `the restarted master said: ${views.join(' ')}`);
    assert.match(await redisCommand(other.port, 'CLUSTER', 'INFO'), /cluster_state:ok/);
    assert.ok(outcomes.every((o) => o === 'SERVING'), outcomes.join(' '));
  });
});
