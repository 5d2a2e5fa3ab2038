import path from 'node:path';
import { z } from 'zod';
import { envs, parseEnv, readEnv } from '../shared/env';

const MINUTE = 60_000;
const DAY = 24 * 60 * MINUTE;

/** Every setting of the SessionStore service, read once from the environment (and .env). */
export function loadStoreConfig(raw = readEnv()) {
  const env = parseEnv(
    {
      PORT: envs.port(5100),
      STORE_HOST: z.string().default('127.0.0.1'),
      STORE_BACKEND: envs.oneOf(['sqlite'] as const, 'sqlite'),
      STORE_DATA_DIR: z.string().default('var'),
      STORE_SYNCHRONOUS: envs.oneOf(['FULL', 'NORMAL'] as const, 'FULL'),
      STORE_TOKEN: envs.optionalString(),
      STORE_MAX_KEY_BYTES: envs.int(256, 1, 4096, ' bytes'),
      STORE_MAX_VALUE_BYTES: envs.int(64 * 1024, 1, 4 * 1024 * 1024, ' bytes'),
      STORE_DEFAULT_TTL_MS: envs.int(30 * MINUTE, 1, 365 * DAY, ' ms'),
      STORE_MAX_TTL_MS: envs.int(30 * DAY, 1, 365 * DAY, ' ms'),
      STORE_MAX_BATCH_OPS: envs.int(1000, 1, 100_000),
      STORE_SWEEP_INTERVAL_MS: envs.int(1000, 0, 3_600_000, ' ms'),
      STORE_SWEEP_BATCH: envs.int(500, 1, 100_000),
      STORE_GRACE_MS: envs.int(5000, 0, 600_000, ' ms'),
      LOG_LEVEL: envs.logLevel(),
    },
    raw,
  );
  return Object.freeze({
    port: env.PORT,
    host: env.STORE_HOST,
    backend: env.STORE_BACKEND,
    token: env.STORE_TOKEN,
    graceMs: env.STORE_GRACE_MS,
    logLevel: env.LOG_LEVEL,
    sqlite: Object.freeze({
      dataDir: path.resolve(env.STORE_DATA_DIR),
      synchronous: env.STORE_SYNCHRONOUS,
      sweepIntervalMs: env.STORE_SWEEP_INTERVAL_MS,
      sweepBatch: env.STORE_SWEEP_BATCH,
      maxOpsPerCommit: 2000,
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
