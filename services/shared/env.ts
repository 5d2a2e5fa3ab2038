import { accessSync, constants, existsSync, mkdirSync, readFileSync, rmdirSync } from 'node:fs';
import path from 'node:path';
import dotenv from 'dotenv';
import { z } from 'zod';

/** Raised when an environment variable is missing or malformed; the message names the variable. */
export class ConfigError extends Error {
  override name = 'ConfigError';
}

/** The repository root (this file is compiled to dist/services/shared/env.js). */
export const projectRoot = path.resolve(__dirname, '..', '..', '..');

/**
 * Reads the environment once: process.env wins over `.env` in the working directory (the file
 * foreman loads too), so a variable set by the caller is never overridden. DOTENV_CONFIG_PATH
 * (dotenv's own name for it) names another file instead; `/dev/null` reads none.
 */
export function readEnv(env: NodeJS.ProcessEnv = process.env): Record<string, string | undefined> {
  const named = env.DOTENV_CONFIG_PATH;
  const file = path.resolve(named || '.env');
  if (named && !existsSync(file)) throw new ConfigError(`invalid configuration: DOTENV_CONFIG_PATH=${named}: no such file`);
  if (!existsSync(file)) return { ...env };
  let contents: Buffer;
  try {
    contents = readFileSync(file);
  } catch (err) {
    // A directory or a file this user may not read: say which, as for any other bad setting.
    const what = named ? `DOTENV_CONFIG_PATH=${named}` : file;
    throw new ConfigError(`invalid configuration: ${what}: cannot read the file (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
  return { ...dotenv.parse(contents), ...env };
}

/**
 * Variables whose values never appear in an error message: those whose last word names a secret
 * (STORE_TOKEN, SESSION_KEYS, a future ..._PASSWORD) or a URL (REDIS_URL may carry a password).
 * Only the last word counts: REDIS_KEY_PREFIX and STORE_MAX_KEY_BYTES hold no secret, and hiding
 * them would hide the mistake the message is about.
 */
const SECRET_NAME = /_(TOKEN|KEYS?|SECRET|PASSWORD|URL)$/i;

/**
 * Validates raw variables against a zod object schema whose keys are variable names and returns a
 * frozen typed result, or throws one ConfigError listing every bad variable with the expected form.
 */
export function parseEnv<S extends z.ZodRawShape>(
  shape: S,
  raw: Record<string, string | undefined>,
): Readonly<z.infer<z.ZodObject<S>>> {
  const input: Record<string, string | undefined> = {};
  for (const key of Object.keys(shape)) {
    const value = raw[key];
    input[key] = value === undefined || value === '' ? undefined : value;
  }
  const result = z.object(shape).safeParse(input);
  if (!result.success) {
    const lines = result.error.issues.map((issue) => {
      const name = String(issue.path[0]);
      const shown = SECRET_NAME.test(name) ? '(hidden)' : JSON.stringify(raw[name] ?? '');
      return `${name}=${shown}: ${issue.message}`;
    });
    // A value can break several checks that share one message (20 digits: not a safe integer, and above the maximum).
    throw new ConfigError(`invalid configuration: ${[...new Set(lines)].join('; ')}`);
  }
  return Object.freeze(result.data) as Readonly<z.infer<z.ZodObject<S>>>;
}

/**
 * A whole number written in decimal, checked against [min, max]. Spaces around it are forgiven,
 * anything else is refused: Number() would read "" or " " as 0 (for PORT, "any free port"; for
 * STORE_SWEEP_INTERVAL_MS, "never sweep"), and "0x10" or "1e3" as numbers nobody wrote.
 */
const wholeNumber = (message: string, min: number, max: number, fallback: number) =>
  z
    .string()
    .trim()
    .regex(/^-?\d+$/, { message })
    .transform(Number)
    .pipe(z.number().int({ message }).min(min, { message }).max(max, { message }))
    .default(fallback);

/** Common variable forms, each with a message that states the expected form. */
export const envs = {
  port: (fallback: number) => wholeNumber('expected a TCP port number 0-65535', 0, 65535, fallback),
  int: (fallback: number, min: number, max: number, unit = '') => wholeNumber(`expected an integer ${min}-${max}${unit}`, min, max, fallback),
  bool: (fallback: boolean) =>
    z
      .enum(['true', 'false', '1', '0', 'yes', 'no'], { message: 'expected true or false' })
      .default(fallback ? 'true' : 'false')
      .transform((v) => v === 'true' || v === '1' || v === 'yes'),
  oneOf: <T extends readonly [string, ...string[]]>(values: T, fallback: T[number]) =>
    z.enum(values, { message: `expected one of ${values.join(', ')}` }).default(fallback),
  logLevel: () =>
    z
      .enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], {
        message: 'expected one of fatal, error, warn, info, debug, trace, silent',
      })
      .default('info'),
  optionalString: () => z.string().optional(),
  /**
   * STORE_TLS_RELOAD_MS, the same rule for the store (its certificate) and the web (its CA): 0 never,
   * else at least 100 ms. Each look is a stat() per file; more often than every 100 ms is a typo
   * (seconds for ms), not a need.
   */
  tlsReloadMs: () =>
    wholeNumber('expected an integer 0-86400000 ms', 0, 24 * 60 * 60_000, 60_000).refine((ms) => ms === 0 || ms >= 100, {
      message: 'expected 0 (never) or at least 100 ms',
    }),
  /** STORE_TOKEN, the same rule for the store and its clients: a bearer token gRPC metadata can carry, long enough to guess at. */
  token: () =>
    z
      .string()
      .regex(/^[\x21-\x7e]{16,}$/, { message: 'expected at least 16 printable ASCII characters without spaces' })
      .optional(),
};

/**
 * Reads a PEM file whose path is in a variable (TLS certificates, keys, CAs); a missing,
 * unreadable or non-PEM file is a ConfigError naming the variable.
 */
export function readPemFile(variable: string, file: string): Buffer {
  // The PEM itself pasted in place of its path: never echoed, as it may be a private key.
  if (file.includes('-----BEGIN ')) throw new ConfigError(`invalid configuration: ${variable}: expected the path of a PEM file, not its contents`);
  let pem: Buffer;
  try {
    pem = readFileSync(file);
  } catch (err) {
    throw new ConfigError(
      `invalid configuration: ${variable}=${JSON.stringify(file)}: cannot read the file (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`,
    );
  }
  if (!pem.includes('-----BEGIN ')) throw new ConfigError(`invalid configuration: ${variable}=${JSON.stringify(file)}: expected a PEM file`);
  return pem;
}

/**
 * Creates the directory a variable names (a data directory) unless it exists, and checks that this
 * process can write in it, so that a path under a file (ENOTDIR) or a directory it may not write
 * (EACCES, EROFS) is a ConfigError naming the variable, not a bare system error at first use.
 * `mode` applies to the directory itself only: missing parents get the usual mode, since other
 * files and users may share them. Returns the absolute path.
 */
export function makeDataDir(variable: string, value: string, mode?: number): string {
  const dir = path.resolve(value);
  try {
    if (mode !== undefined && !existsSync(path.dirname(dir))) mkdirSync(path.dirname(dir), { recursive: true });
    mkdirSync(dir, { recursive: true, mode });
  } catch (err) {
    throw new ConfigError(`invalid configuration: ${variable}=${JSON.stringify(value)}: cannot create the directory: ${mkdirFailure(dir, err).message}`);
  }
  try {
    accessSync(dir, constants.W_OK | constants.X_OK);
  } catch (err) {
    throw new ConfigError(`invalid configuration: ${variable}=${JSON.stringify(value)}: cannot write in the directory: ${(err as Error).message}`);
  }
  return dir;
}

/**
 * Why a recursive mkdir failed. Node's says ENOENT whenever a directory it had to create could not
 * be (on a read-only file system, say), as if a parent were missing: a plain mkdir of the first
 * missing one gives the real reason.
 */
function mkdirFailure(dir: string, err: unknown): Error {
  if ((err as NodeJS.ErrnoException).code !== 'ENOENT') return err as Error;
  let missing = dir;
  while (!existsSync(path.dirname(missing)) && path.dirname(missing) !== missing) missing = path.dirname(missing);
  try {
    mkdirSync(missing);
    rmdirSync(missing);
  } catch (cause) {
    return cause as Error;
  }
  return err as Error;
}

/** Addresses only this machine can reach: 127.0.0.0/8, ::1 and localhost (a host name, or [v6] as in host:port). */
export function isLoopback(host: string): boolean {
  const bare = host.replace(/^\[(.*)\]$/, '$1').toLowerCase();
  return bare === 'localhost' || bare === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(bare);
}

/**
 * The variables to name when a service cannot listen on host:port: the port's when the port is
 * taken or privileged, the host's when it is not an address of this machine or does not resolve,
 * both otherwise.
 */
export function listenVariables(code: string | undefined, portVariable: string, hostVariable: string): string {
  if (code === 'EADDRINUSE' || code === 'EACCES') return portVariable;
  if (code === 'EADDRNOTAVAIL' || code === 'ENOTFOUND' || code === 'EAI_AGAIN') return hostVariable;
  return `${portVariable} / ${hostVariable}`;
}
