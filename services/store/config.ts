import path from 'node:path';
import { z } from 'zod';
import { ConfigError, envs, isLoopback, makeDataDir, parseEnv, readEnv, readPemFile } from '../shared/env';
import { DEFAULT_MAX_KEYS, MAX_KEYDIR_KEYS } from './backends/sqlite-keydir';
import { checkPair } from './tls-certificate';

const MINUTE = 60_000;
const DAY = 24 * 60 * MINUTE;
const MIB = 1024 * 1024;
/** Bytes of a message around one entry's key and value (see the STORE_MAX_MESSAGE_BYTES check). */
const ENTRY_FRAMING_BYTES = 256;

/** host:port,host:port,... (IPv6 hosts in brackets) → [{host, port}]; unset → []. */
const hostPorts = () =>
  z
    .string()
    .regex(/^(\[[^\]]+\]|[^\s,:[\]]+):\d{1,5}(,(\[[^\]]+\]|[^\s,:[\]]+):\d{1,5})*$/, { message: 'expected host:port,host:port,...' })
    .optional()
    .transform((list) =>
      (list ? list.split(',') : []).map((item) => {
        const colon = item.lastIndexOf(':');
        return { host: item.slice(0, colon).replace(/^\[(.*)\]$/, '$1'), port: Number(item.slice(colon + 1)) };
      }),
    )
    .refine((list) => list.every(({ port }) => port >= 1 && port <= 65535), { message: 'expected host:port,host:port,... with ports 1-65535' });

/**
 * A REDIS_URL the backend can use: one that parses (a port 1-65535) and names a database by its
 * number, or none. ioredis would send any other path to SELECT: a failed SELECT leaves the
 * connection on database 0 and serves from there, and SELECT NaN crashed the store. The backend
 * reads no query (ioredis' own ?db=2 form): one would be ignored, the data kept in database 0.
 */
function isRedisUrl(url: string): boolean {
  try {
    const parsed = new URL(url);
    return /^\/?\d*$/.test(parsed.pathname) && parsed.port !== '0' && !parsed.search && !parsed.hash;
  } catch {
    return false;
  }
}

/** Every setting of the SessionStore service, read once from the environment (and .env). */
export function loadStoreConfig(raw = readEnv()) {
  const env = parseEnv(
    {
      PORT: envs.port(5100),
      STORE_HOST: z.string().default('127.0.0.1'),
      STORE_BACKEND: envs.oneOf(['sqlite', 'redis'] as const, 'sqlite'),
      STORE_DATA_DIR: z.string().default('var'),
      STORE_SYNCHRONOUS: envs.oneOf(['FULL', 'NORMAL'] as const, 'FULL'),
      STORE_TOKEN: envs.token(),
      STORE_TLS_CERT: envs.optionalString(),
      STORE_TLS_KEY: envs.optionalString(),
      STORE_TLS_RELOAD_MS: envs.tlsReloadMs(),
      STORE_MAX_KEY_BYTES: envs.int(256, 1, 4096, ' bytes'),
      STORE_MAX_VALUE_BYTES: envs.int(64 * 1024, 1, 4 * MIB, ' bytes'),
      STORE_MAX_MESSAGE_BYTES: envs.int(4 * MIB, 64 * 1024, 64 * MIB, ' bytes'),
      STORE_DEFAULT_TTL_MS: envs.int(30 * MINUTE, 1, 365 * DAY, ' ms'),
      STORE_MAX_TTL_MS: envs.int(30 * DAY, 1, 365 * DAY, ' ms'),
      STORE_MAX_BATCH_OPS: envs.int(1000, 1, 100_000),
      STORE_SWEEP_INTERVAL_MS: envs.int(1000, 0, 3_600_000, ' ms'),
      STORE_SWEEP_BATCH: envs.int(200, 1, 100_000),
      STORE_MAX_ENTRIES: envs.int(DEFAULT_MAX_KEYS, 1, MAX_KEYDIR_KEYS, ' keys'),
      STORE_GRACE_MS: envs.int(5000, 0, 600_000, ' ms'),
      // Next to the store's own port: 9100, the usual choice, is node_exporter's on most monitored hosts.
      STORE_METRICS_PORT: envs.port(5101),
      REDIS_URL: z
        .string()
        .regex(/^rediss?:\/\//, { message: 'expected redis://[user:password@]host:port[/db] or rediss://...' })
        .refine(isRedisUrl, { message: 'expected redis://[user:password@]host:port[/db] with a port 1-65535, db a database number and nothing after it' })
        .default('redis://127.0.0.1:6379'),
      REDIS_CLUSTER_NODES: hostPorts(),
      REDIS_SENTINELS: hostPorts(),
      REDIS_SENTINEL_MASTER: z.string().default('mymaster'),
      REDIS_SENTINEL_USERNAME: envs.optionalString(),
      REDIS_SENTINEL_PASSWORD: envs.optionalString(),
      REDIS_SENTINEL_TLS: envs.bool(false),
      REDIS_KEY_PREFIX: z.string().regex(/^[^{}]*$/, { message: 'expected no { or } (a hash tag would put every session in one cluster slot)' }).default('sessions:'),
      REDIS_COMMAND_TIMEOUT_MS: envs.int(500, 10, 60_000, ' ms'),
      REDIS_LIST_WINDOW: envs.int(100_000, 1, 1_000_000, ' keys'),
      LOG_LEVEL: envs.logLevel(),
    },
    raw,
  );
  if (!env.STORE_TOKEN && !isLoopback(env.STORE_HOST)) {
    throw new ConfigError(
      `invalid configuration: STORE_HOST=${JSON.stringify(env.STORE_HOST)} is reachable from other machines but STORE_TOKEN is not set, ` +
        'so anyone who can reach the port could read and change every session. Set STORE_TOKEN (and give the same token to the web service), ' +
        'or bind a loopback address such as STORE_HOST=127.0.0.1',
    );
  }
  // One entry as clients send it: a Put in a Batch or Pipe message, with a request id of up to 128
  // characters (the web's longest) and every number field at its widest, takes under 256 bytes of framing.
  if (env.STORE_MAX_MESSAGE_BYTES < env.STORE_MAX_VALUE_BYTES + env.STORE_MAX_KEY_BYTES + ENTRY_FRAMING_BYTES) {
    throw new ConfigError(
      `invalid configuration: STORE_MAX_MESSAGE_BYTES=${env.STORE_MAX_MESSAGE_BYTES} must leave room for one entry ` +
        `(STORE_MAX_VALUE_BYTES + STORE_MAX_KEY_BYTES + ${ENTRY_FRAMING_BYTES} = ${env.STORE_MAX_VALUE_BYTES + env.STORE_MAX_KEY_BYTES + ENTRY_FRAMING_BYTES})`,
    );
  }
  // Set together, they contradict each other: say so rather than quietly use another TTL. Left
  // unset, the default TTL follows a STORE_MAX_TTL_MS below it (set alone, the maximum needs no partner).
  if (raw.STORE_DEFAULT_TTL_MS && env.STORE_DEFAULT_TTL_MS > env.STORE_MAX_TTL_MS) {
    throw new ConfigError(
      `invalid configuration: STORE_DEFAULT_TTL_MS=${env.STORE_DEFAULT_TTL_MS} is above STORE_MAX_TTL_MS=${env.STORE_MAX_TTL_MS}: ` +
        'a Put with ttl_ms 0 would get a TTL the store refuses; lower it or raise STORE_MAX_TTL_MS',
    );
  }
  if (Boolean(env.STORE_TLS_CERT) !== Boolean(env.STORE_TLS_KEY)) {
    throw new ConfigError('invalid configuration: STORE_TLS_CERT and STORE_TLS_KEY must be set together (PEM file paths), or neither');
  }
  const tls = env.STORE_TLS_CERT && env.STORE_TLS_KEY ? readTls(env.STORE_TLS_CERT, env.STORE_TLS_KEY, env.STORE_TLS_RELOAD_MS) : undefined;
  // An empty variable usually means "the default"; here it more likely means "no prefix", which
  // would make the store treat every key of the Redis database as its own (List, the session
  // count, deletes), so it is refused rather than silently replaced.
  if (raw.REDIS_KEY_PREFIX === '') {
    throw new ConfigError(
      'invalid configuration: REDIS_KEY_PREFIX="": expected a non-empty prefix (an empty one matches every key in the Redis database, ' +
        'so the store would list, count and delete data that is not its own); leave it unset for the default "sessions:"',
    );
  }
  // Else the second listener fails and its message blames PORT, which nothing else holds.
  if (env.STORE_METRICS_PORT !== 0 && env.STORE_METRICS_PORT === env.PORT) {
    throw new ConfigError(`invalid configuration: STORE_METRICS_PORT=${env.STORE_METRICS_PORT} is PORT too: the metrics need a port of their own`);
  }
  if (env.REDIS_CLUSTER_NODES.length > 0 && env.REDIS_SENTINELS.length > 0) {
    throw new ConfigError('invalid configuration: REDIS_CLUSTER_NODES and REDIS_SENTINELS: set one of them, not both');
  }
  // Redis authenticates a user only with a password: the name alone would be dropped without a word.
  if (env.REDIS_SENTINEL_USERNAME && !env.REDIS_SENTINEL_PASSWORD) {
    throw new ConfigError('invalid configuration: REDIS_SENTINEL_USERNAME is set but REDIS_SENTINEL_PASSWORD is not: a Sentinel user needs its password');
  }
  if (env.REDIS_CLUSTER_NODES.length > 0 && !/^rediss?:\/\/[^/]*\/?0?$/.test(env.REDIS_URL)) {
    throw new ConfigError('invalid configuration: REDIS_URL: a Redis Cluster has only database 0');
  }
  // Made here rather than first by the SQLite backend, so that a path it cannot use names STORE_DATA_DIR;
  // for the store's user alone, as the files in it (its missing parents with the usual mode).
  const dataDir = env.STORE_BACKEND === 'sqlite' ? makeDataDir('STORE_DATA_DIR', env.STORE_DATA_DIR, 0o700) : path.resolve(env.STORE_DATA_DIR);
  return Object.freeze({
    // Allowed, since the network itself may be encrypted (a VPN, a service mesh), but worth saying at start.
    warnings: Object.freeze(
      !tls && !isLoopback(env.STORE_HOST)
        ? [
            `STORE_HOST=${JSON.stringify(env.STORE_HOST)} is reachable from other machines and the store serves plaintext: tokens and session data ` +
              'cross the network unencrypted; set STORE_TLS_CERT and STORE_TLS_KEY unless the network itself is encrypted',
          ]
        : [],
    ),
    port: env.PORT,
    host: env.STORE_HOST,
    backend: env.STORE_BACKEND,
    token: env.STORE_TOKEN,
    tls,
    graceMs: env.STORE_GRACE_MS,
    metricsPort: env.STORE_METRICS_PORT,
    maxMessageBytes: env.STORE_MAX_MESSAGE_BYTES,
    logLevel: env.LOG_LEVEL,
    sqlite: Object.freeze({
      dataDir,
      synchronous: env.STORE_SYNCHRONOUS,
      sweepIntervalMs: env.STORE_SWEEP_INTERVAL_MS,
      sweepBatch: env.STORE_SWEEP_BATCH,
      maxOpsPerCommit: 2000,
      maxEntries: env.STORE_MAX_ENTRIES,
    }),
    redis: Object.freeze({
      url: env.REDIS_URL,
      clusterNodes: env.REDIS_CLUSTER_NODES,
      sentinels: env.REDIS_SENTINELS,
      sentinelMaster: env.REDIS_SENTINEL_MASTER,
      sentinelUsername: env.REDIS_SENTINEL_USERNAME,
      sentinelPassword: env.REDIS_SENTINEL_PASSWORD,
      sentinelTls: env.REDIS_SENTINEL_TLS,
      keyPrefix: env.REDIS_KEY_PREFIX,
      commandTimeoutMs: env.REDIS_COMMAND_TIMEOUT_MS,
      listWindow: env.REDIS_LIST_WINDOW,
    }),
    limits: Object.freeze({
      maxKeyBytes: env.STORE_MAX_KEY_BYTES,
      maxValueBytes: env.STORE_MAX_VALUE_BYTES,
      defaultTtlMs: Math.min(env.STORE_DEFAULT_TTL_MS, env.STORE_MAX_TTL_MS),
      maxTtlMs: env.STORE_MAX_TTL_MS,
      maxBatchOps: env.STORE_MAX_BATCH_OPS,
    }),
  });
}

export type StoreConfig = ReturnType<typeof loadStoreConfig>;

/**
 * The certificate and key the store starts with, checked as a pair (a key of another certificate
 * would otherwise surface only at listen, as a bare OpenSSL error), with where they came from:
 * they are read again from there when the files change (every reloadMs; 0 never).
 */
function readTls(certFile: string, keyFile: string, reloadMs: number) {
  const pair = { cert: readPemFile('STORE_TLS_CERT', certFile), key: readPemFile('STORE_TLS_KEY', keyFile) };
  try {
    checkPair(pair);
  } catch (err) {
    throw new ConfigError(`invalid configuration: STORE_TLS_CERT and STORE_TLS_KEY are not a usable certificate and key: ${(err as Error).message}`);
  }
  return Object.freeze({ ...pair, certFile, keyFile, reloadMs });
}
