import { z } from 'zod';
import { envs, parseEnv, readEnv } from '../shared/env';

/** The environment settings bin/dump reads (the same variables the web uses to reach the store). */
export function loadDumpConfig(raw = readEnv()) {
  const env = parseEnv(
    {
      STORE_ADDRESS: z.string().default('localhost:5100'),
      STORE_TOKEN: envs.optionalString(),
      STORE_TLS_CA: envs.optionalString(),
    },
    raw,
  );
  return Object.freeze({ address: env.STORE_ADDRESS, token: env.STORE_TOKEN, tlsCa: env.STORE_TLS_CA });
}

export type DumpConfig = ReturnType<typeof loadDumpConfig>;
