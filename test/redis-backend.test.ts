import { RedisBackend, type RedisBackendOptions } from '../services/store/backends/redis';
import { describeBackendContract } from './backend-contract';
import { type RedisClusterProcs, type RedisServer, redisCommand, requireRedis, startRedisCluster, startRedisServer } from './helpers/redis';

let run = 0;

/** Options for a backend on its own key prefix; the Redis behind it is emptied after each test. */
function backendOptions(overrides: Partial<RedisBackendOptions>): RedisBackendOptions {
  run += 1;
  return {
    url: 'redis://127.0.0.1:6379',
    clusterNodes: [],
    sentinels: [],
    sentinelMaster: 'mymaster',
    keyPrefix: `contract${run}:`,
    commandTimeoutMs: 2000,
    listWindow: 300,
    ...overrides,
  };
}

async function flush(ports: number[]): Promise<void> {
  await Promise.all(ports.map((port) => redisCommand(port, 'FLUSHALL')));
}

describe('Redis backend on a single redis-server', function () {
  let server: RedisServer | undefined;
  before(async function () {
    requireRedis(this);
    server = await startRedisServer();
  });
  after(async () => server?.stop());

  describeBackendContract('redis (single server)', async () => {
    const backend = new RedisBackend(backendOptions({ url: server!.url }));
    return {
      backend,
      close: async () => {
        await backend.close();
        await flush([server!.port]);
      },
    };
  });
});

describe('Redis backend on a 3-master Redis Cluster', function () {
  let cluster: RedisClusterProcs | undefined;
  before(async function () {
    requireRedis(this);
    cluster = await startRedisCluster(3);
  });
  after(async () => cluster?.stop());

  describeBackendContract('redis cluster (3 masters)', async () => {
    const seeds = cluster!.masters.map((m) => ({ host: '127.0.0.1', port: m.port }));
    const backend = new RedisBackend(backendOptions({ clusterNodes: seeds }));
    return {
      backend,
      close: async () => {
        await backend.close();
        await flush(cluster!.masters.map((m) => m.port));
      },
    };
  });
});
