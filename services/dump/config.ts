import { z } from 'zod';
import { envs, parseEnv, readEnv } from '../shared/env';

/** The environment settings bin/dump reads (the same variables the web uses to reach the store). */
export function loadDumpConfig(raw = readEnv()) {
  const env = parseEnv(
    {
      STORE_ADDRESS: z.string().default('localhost:5100'),
      // The web's and the store's rule: a value gRPC metadata cannot carry would fail with the token in the message.
      STORE_TOKEN: envs.token(),
      STORE_TLS_CA: envs.optionalString(),
    },
    raw,
  );
  return Object.freeze({ address: env.STORE_ADDRESS, token: env.STORE_TOKEN, tlsCa: env.STORE_TLS_CA });
}

export type DumpConfig = ReturnType<typeof loadDumpConfig>;
