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

  it('finds the master through REDIS_SENTINELS; after a failover it answers UNAVAILABLE meanwhile, then writes to the new master and keeps replicated data', async () => {
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
    // Replication is asynchronous: wait until the replica has the write, as WAIT would.
    assert.equal(await redisCommand(sentinel!.master.port, 'WAIT', '1', '5000'), '1');

    await sentinel!.failover();
    const kinds = new Set<string>();
    const deadline = Date.now() + 20_000;
    let after: StoredEntry | undefined;
    while (!after) {
      assert.ok(Date.now() < deadline, `no write succeeded after the failover: ${[...kinds]}`);
      const [result] = await backend.batch([{ kind: 'put', key: 'k', value: Buffer.from('v2'), ttlMs: 60_000, expectedVersion: before.version }]);
      if (result.ok) after = result.value as StoredEntry;
      else {
        kinds.add(result.error.kind);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    assert.deepEqual([...kinds].filter((k) => k !== 'unavailable'), [], 'only UNAVAILABLE while failing over');
    assert.ok(after.version > before.version);
    assert.equal(await sentinel!.currentMaster(), `127.0.0.1:${sentinel!.replica.port}`);
    assert.match(await redisCommand(sentinel!.replica.port, 'INFO', 'replication'), /role:master/);
    await backend.ping();
  });
});
