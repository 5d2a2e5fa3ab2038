import assert from 'node:assert/strict';
import { runOne, type StoredEntry } from '../services/store/backends/backend';
import { RedisBackend } from '../services/store/backends/redis';
import { redisCommand, type RedisSentinelProcs, requireRedis, startRedisSentinel } from './helpers/redis';

describe('Redis backend through Sentinel (master, replica, Sentinel: real redis-server processes)', function () {
  let sentinel: RedisSentinelProcs | undefined;
  let backend: RedisBackend | undefined;

  before(async function () {
    requireRedis(this);
    sentinel = await startRedisSentinel();
  });
  after(async () => {
    await backend?.close();
    await sentinel?.stop();
  });

  it('finds the master through REDIS_SENTINELS; after a failover it fails only with UNAVAILABLE meanwhile, then writes to the new master', async () => {
    backend = new RedisBackend({
      url: 'redis://',
      clusterNodes: [],
      sentinels: [{ host: '127.0.0.1', port: sentinel!.sentinelPort }],
      sentinelMaster: 'mymaster',
      keyPrefix: 'sentinel:',
      commandTimeoutMs: 1000,
      listWindow: 100,
    });
    const before = (await runOne(backend, { kind: 'put', key: 'k', value: Buffer.from('v1'), ttlMs: 60_000 })) as StoredEntry;
    // Replication is asynchronous: wait until the replica has the write.
    for (const end = Date.now() + 5000; (await redisCommand(sentinel!.replica.port, 'HGET', 'sentinel:k', 'ver')) !== String(before.version); ) {
      assert.ok(Date.now() < end, 'the write never reached the replica');
      await new Promise((r) => setTimeout(r, 20));
    }

    await sentinel!.failover();
    // Until the client follows Sentinel, writes may still reach the old master: write until one
    // lands on the new one. Meanwhile failures must be UNAVAILABLE, nothing else.
    const kinds = new Set<string>();
    const deadline = Date.now() + 20_000;
    for (let attempt = 1; ; attempt += 1) {
      assert.ok(Date.now() < deadline, `no write reached the new master: ${[...kinds]}`);
      const value = `v2-${attempt}`;
      const [result] = await backend.batch([{ kind: 'put', key: 'k', value: Buffer.from(value), ttlMs: 60_000 }]);
      if (!result.ok) kinds.add(result.error.kind);
      else if ((await redisCommand(sentinel!.replica.port, 'HGET', 'sentinel:k', 'v')) === value) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.deepEqual([...kinds].filter((k) => k !== 'unavailable'), []);
    const read = (await runOne(backend, { kind: 'get', key: 'k', refreshTtlMs: 0 })) as StoredEntry;
    assert.ok(read.version > before.version);
    await backend.ping();
  });
});
