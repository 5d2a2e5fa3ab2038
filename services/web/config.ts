import { randomBytes } from 'node:crypto';
import { existsSync, linkSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { checkCa } from '../client/reloading-ca';
import { parseAddress, resolveEndpoint, type StoreEndpoint } from '../client/store-client';
import { HSTS_ONE_YEAR_S } from './security-headers';
import { COOKIE_NAME } from './session';
import { ConfigError, envs, isLoopback, makeDataDir, parseEnv, readEnv, readPemFile } from '../shared/env';
import { reasonOf } from '../shared/polled-files';

const MINUTE = 60_000;

/** Every setting of the web service, read once from the environment (and .env). */
export function loadWebConfig(raw = readEnv()) {
  const env = parseEnv(
    {
      PORT: envs.port(5000),
      WEB_HOST: z.string().default('127.0.0.1'),
      WEB_DATA_DIR: z.string().default('var'),
      STORE_ADDRESS: z
        .string()
        .refine(isStoreAddress, { message: 'expected host:port or http(s)://host:port with a port 1-65535, e.g. 127.0.0.1:5100' })
        .default('127.0.0.1:5100'),
      // Checked here: a value gRPC metadata cannot carry would otherwise stop the web with the token in the message.
      STORE_TOKEN: envs.token(),
      STORE_TLS_CA: envs.optionalString(),
      STORE_TLS_RELOAD_MS: envs.tlsReloadMs(),
      STORE_DEADLINE_MS: envs.int(1000, 10, 60_000, ' ms'),
      STORE_TRANSPORT: envs.oneOf(['pipe', 'unary'] as const, 'pipe'),
      // Spaces after the commas and a trailing newline are how people write lists; kept, they would
      // make a different key (every cookie signed with it would then look forged).
      SESSION_KEYS: z
        .string()
        .transform((value) => value.split(',').map((key) => key.trim()))
        .refine((keys) => keys.every((key) => key.length >= 32), {
          message: 'expected comma-separated keys of at least 32 characters, newest first',
        })
        .optional(),
      // The session middleware's own rule: "__" is left for the __Host- prefix it adds over HTTPS.
      SESSION_COOKIE_NAME: z
        .string()
        .regex(COOKIE_NAME, { message: 'expected 1-64 of A-Z a-z 0-9 _ -, not starting with "__" (__Host- is added over HTTPS)' })
        .default('sid'),
      SESSION_IDLE_TTL_MS: envs.int(30 * MINUTE, 1000, 30 * 24 * 60 * MINUTE, ' ms'),
      SESSION_ABSOLUTE_TTL_MS: envs.int(24 * 60 * MINUTE, 1000, 365 * 24 * 60 * MINUTE, ' ms'),
      SESSION_SECURE: envs.oneOf(['auto', 'always', 'never'] as const, 'auto'),
      SESSION_ROLLING: envs.bool(true),
      SESSION_PERSISTENT: envs.bool(false),
      TRUST_PROXY: envs.bool(false),
      // One year, as helmet sends it; 0 sends none (a proxy in front that sets its own, say).
      HSTS_MAX_AGE_S: envs.int(HSTS_ONE_YEAR_S, 0, 2 * HSTS_ONE_YEAR_S, ' s'),
      // Node's own limits by default: a client gets this long for a request's headers, and for the
      // whole request (headers and body), before a 408 closes its connection.
      WEB_HEADERS_TIMEOUT_MS: envs.int(60_000, 1000, 600_000, ' ms'),
      WEB_REQUEST_TIMEOUT_MS: envs.int(300_000, 1000, 3_600_000, ' ms'),
      LOG_LEVEL: envs.logLevel(),
    },
    raw,
  );
  if (env.SESSION_ABSOLUTE_TTL_MS < env.SESSION_IDLE_TTL_MS) {
    throw new ConfigError('invalid configuration: SESSION_ABSOLUTE_TTL_MS must be at least SESSION_IDLE_TTL_MS');
  }
  if (env.WEB_REQUEST_TIMEOUT_MS < env.WEB_HEADERS_TIMEOUT_MS) {
    throw new ConfigError('invalid configuration: WEB_REQUEST_TIMEOUT_MS (the whole request) must be at least WEB_HEADERS_TIMEOUT_MS (its headers)');
  }
  let endpoint: StoreEndpoint;
  try {
    endpoint = resolveEndpoint(env.STORE_ADDRESS, env.STORE_TLS_CA ? 'STORE_TLS_CA' : undefined);
  } catch (err) {
    throw new ConfigError(`invalid configuration: STORE_ADDRESS=${JSON.stringify(env.STORE_ADDRESS)}: ${(err as Error).message}`);
  }
  const storeHost = endpoint.target.slice(0, endpoint.target.lastIndexOf(':'));
  return Object.freeze({
    // Allowed, since the network itself may be encrypted (a VPN, a service mesh), but worth saying at start.
    warnings: Object.freeze(
      !endpoint.tls && !isLoopback(storeHost)
        ? [
            `STORE_ADDRESS=${JSON.stringify(env.STORE_ADDRESS)} is another machine and the connection is plaintext: STORE_TOKEN and session data ` +
              'cross the network unencrypted; use https:// or STORE_TLS_CA unless the network itself is encrypted',
          ]
        : [],
    ),
    port: env.PORT,
    host: env.WEB_HOST,
    trustProxy: env.TRUST_PROXY,
    hstsMaxAgeS: env.HSTS_MAX_AGE_S,
    headersTimeoutMs: env.WEB_HEADERS_TIMEOUT_MS,
    requestTimeoutMs: env.WEB_REQUEST_TIMEOUT_MS,
    logLevel: env.LOG_LEVEL,
    store: Object.freeze({
      address: env.STORE_ADDRESS,
      token: env.STORE_TOKEN,
      deadlineMs: env.STORE_DEADLINE_MS,
      transport: env.STORE_TRANSPORT,
      // TLS to the store: the PEM of the CA that signed its certificate, looked at again every
      // tlsReloadMs. Unset, an https:// address still means TLS (with the default roots) and a bare
      // host:port means plaintext.
      tlsCa: env.STORE_TLS_CA ? { file: env.STORE_TLS_CA, pem: readCa(env.STORE_TLS_CA) } : undefined,
      tlsReloadMs: env.STORE_TLS_RELOAD_MS,
    }),
    session: Object.freeze({
      keys: env.SESSION_KEYS ?? [localKey(env.WEB_DATA_DIR)],
      cookieName: env.SESSION_COOKIE_NAME,
      idleTtlMs: env.SESSION_IDLE_TTL_MS,
      absoluteTtlMs: env.SESSION_ABSOLUTE_TTL_MS,
      secure: env.SESSION_SECURE,
      rolling: env.SESSION_ROLLING,
      persistent: env.SESSION_PERSISTENT,
      // A request queued behind others of its browser gives up (503) after two store deadlines:
      // with the store slow, a turn can take one or two.
      maxQueueWaitMs: 2 * env.STORE_DEADLINE_MS,
    }),
  });
}

export type WebConfig = ReturnType<typeof loadWebConfig>;

/** STORE_TLS_CA's certificates, which must all parse: a broken bundle stops the web at start, not at its first call. */
function readCa(file: string): Buffer {
  const pem = readPemFile('STORE_TLS_CA', file);
  try {
    checkCa(pem);
  } catch (err) {
    throw new ConfigError(`invalid configuration: STORE_TLS_CA=${JSON.stringify(file)}: not a usable CA certificate (${reasonOf(err)})`);
  }
  return pem;
}

function isStoreAddress(value: string): boolean {
  try {
    parseAddress(value);
    return true;
  } catch {
    return false;
  }
}

/** What link() fails with where a file system has no hard links. */
const NO_LINKS = new Set(['EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'ENOSYS']);

/**
 * Without SESSION_KEYS, a key generated once and kept in the data directory (mode 0600), so a
 * laptop set-up needs no configuration and sessions survive restarts. Production sets SESSION_KEYS.
 */
function localKey(dataDir: string): string {
  const file = path.join(dataDir, 'session-key');
  if (!existsSync(file)) {
    // Only to write the key: a directory that already holds one may be read-only. For this user
    // alone, as the store makes it: by default both services share var/, and whichever starts
    // first creates it (a mode given later changes nothing).
    makeDataDir('WEB_DATA_DIR', dataDir, 0o700);
    // Written whole under a name of its own, then linked in place: a web starting at the same
    // moment (Procfile.redis starts two) finds no file or the whole key, never an empty one.
    const draft = `${file}.${randomBytes(6).toString('hex')}`;
    try {
      const key = randomBytes(32).toString('base64url');
      writeFileSync(draft, key, { mode: 0o600, flag: 'wx' });
      try {
        linkSync(draft, file);
      } catch (err) {
        // A file system without hard links: written in place, as the one instance it then serves.
        if (!NO_LINKS.has((err as NodeJS.ErrnoException).code ?? '')) throw err;
        writeFileSync(file, key, { mode: 0o600, flag: 'wx' });
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err; // another instance made it first
    } finally {
      rmSync(draft, { force: true });
    }
  }
  let key: string;
  try {
    key = readFileSync(file, 'utf8').trim();
  } catch (err) {
    throw new ConfigError(`invalid configuration: WEB_DATA_DIR: cannot read the generated session key ${file}: ${(err as Error).message}`);
  }
  // Never a key of ours (an empty or cut-short file, say after a full disk): say which file, since
  // the fix is to delete it (a new key is made; existing sessions end) or to set SESSION_KEYS.
  if (key.length < 32) {
    throw new ConfigError(`invalid configuration: WEB_DATA_DIR: ${file} does not hold a session key (32 characters or more): delete it to have one generated, or set SESSION_KEYS`);
  }
  return key;
}
