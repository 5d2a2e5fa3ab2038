import { readFileSync } from 'node:fs';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { checkCa } from '../client/reloading-ca';
import { resolveEndpoint, type StoreEndpoint } from '../client/store-client';
import { ConfigError, envs } from '../shared/env';
import { reasonOf } from '../shared/polled-files';
import { loadDumpConfig } from './config';
import type { Form } from './format';

/** A mistake in the command line or the environment (exit code 2). */
export class UsageError extends Error {
  override name = 'UsageError';
}

/** What to dump and how, fully checked. */
export interface DumpSettings {
  /** gRPC target, host:port. */
  target: string;
  token?: string;
  tls: boolean;
  tlsCa?: Buffer;
  /** Which of --tls-ca and STORE_TLS_CA gave tlsCa, so that errors name the one the user set. */
  tlsCaFrom?: string;
  connectTimeoutMs: number;
  prefix: string;
  limit: number;
  keysOnly: boolean;
  count: boolean;
  redact: boolean;
  watch: boolean;
  form: Form;
  progress: boolean;
}

/** Where the output goes decides its default form: a table for a person, lines for a pipe. */
export interface Terminal {
  stdoutIsTTY: boolean;
  /** stdout is a regular file: nothing else shows it, so progress on the terminal mixes with nothing. */
  stdoutIsFile: boolean;
  stderrIsTTY: boolean;
}

export const EXIT = { ok: 0, storeError: 1, usage: 2 } as const;

const HELP_AFTER = `
Output:
  On a terminal: an aligned table (ID, VALUE, VERSION, EXPIRES IN).
  Piped or redirected: one entry per line, "<key> <value>", so grep, awk and cut work; --json
  gives JSON Lines for jq. A key or value that is not plain printable text (a control character
  such as a tab, newline or escape, a Unicode bidi control, or a leading double quote; for a key
  also a space or a backslash, or the key put, delete or expire) is printed as a JSON string, in
  every form but --json, so an entry is one line and never passes for a change of --watch.
  --watch then prints one line per change: "put <key> <value>", "delete <key>", "expire <key>"
  (with --json: {"event":"put","key":...}). Changes made while the listing runs are printed after it.
  A long dump to a file shows its progress on stderr when stderr is a terminal.

Environment (and a .env in the current directory): STORE_ADDRESS, STORE_TOKEN, STORE_TLS_CA.

Exit codes:
  0  done (or --watch stopped with Ctrl-C)
  1  store error: unreachable, refused, unauthenticated, failed mid-stream; or output it cannot write
  2  usage error: bad option, argument or environment value

Examples:
  dump localhost:5100
  dump --prefix 4QPh --limit 10
  dump --json | jq -r 'select(.value | fromjson | .count1 > 10) | .key'
  dump --redact --watch`;

function wholeNumber(min: number, max: number) {
  return (value: string): number => {
    const n = Number(value);
    if (!/^\d+$/.test(value.trim()) || !Number.isSafeInteger(n) || n < min || n > max) {
      throw new InvalidArgumentError(`expected a whole number from ${min} to ${max}`);
    }
    return n;
  };
}

function buildProgram(defaults: { address: string; tlsCa?: string }, version: string): Command {
  return new Command()
    .name('dump')
    .description('Print the entries of a SessionStore, and optionally follow its changes.')
    .version(version, '-V, --version', 'print the version and exit')
    .helpOption('-h, --help', 'print this help and exit')
    .argument('[address]', 'store address: host:port, http://host:port or https://host:port (TLS)', defaults.address)
    .option('--prefix <prefix>', 'only keys starting with this prefix', '')
    .option('--limit <n>', 'at most n entries (0 = all)', wholeNumber(0, 0xffff_ffff), 0)
    .option('--keys-only', 'keys without values')
    .addOption(new Option('--count', 'print only the number of entries').conflicts('watch'))
    .option('--json', 'JSON Lines: key, value (valueBase64 when not UTF-8), version, expiresAt, createdAt')
    .option('--table', 'an aligned table even when not on a terminal')
    .option('--no-table', 'one line per entry even on a terminal')
    .option('--redact', 'print a short hash of each key instead of the key (the value stays)')
    .option('--watch', 'after the entries, print changes (put, delete, expire) until Ctrl-C')
    .option('--progress', 'progress on stderr even when stdout is no file or stderr no terminal')
    .option('--no-progress', 'no progress on stderr')
    // No commander default here: it would print the token in --help.
    .option('--token <token>', 'bearer token: 16+ printable ASCII characters, no spaces (default: STORE_TOKEN)')
    .option('--tls', 'connect with TLS, trusting the default roots (as https:// does)')
    .option('--tls-ca <file>', 'connect with TLS, trusting the CA certificate in this PEM file (default: STORE_TLS_CA)', defaults.tlsCa)
    .option('--connect-timeout <ms>', 'how long the store gets to accept the connection', wholeNumber(1, 3_600_000), 5000)
    .addHelpText('after', HELP_AFTER)
    .exitOverride()
    .configureOutput({
      // Commander's errors, as one line in the same form as every other error of dump.
      outputError: (message, write) => write(`dump: ${message.replace(/^error: /, '').replace(/\s*\n\s*(?=\S)/g, ' ').trimEnd()} (see dump --help)\n`),
    });
}

interface ParsedOptions {
  prefix: string;
  limit: number;
  keysOnly?: boolean;
  count?: boolean;
  json?: boolean;
  table?: boolean;
  redact?: boolean;
  watch?: boolean;
  progress?: boolean;
  token?: string;
  tls?: boolean;
  tlsCa?: string;
  connectTimeout: number;
}

/**
 * Parses argv into settings. Returns an exit code instead when commander already answered
 * (--help, --version: 0) or reported a usage error (2); throws UsageError for other usage errors.
 */
export function parseArgs(argv: string[], terminal: Terminal, version: string): DumpSettings | number {
  // A bad environment value is refused after parsing, so that --help and --version still answer.
  let config = loadDumpConfig({});
  let configError: ConfigError | undefined;
  try {
    config = loadDumpConfig();
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    configError = err;
  }
  const program = buildProgram(config, version);
  try {
    program.parse(argv, { from: 'user' });
    // Checked here, not with .conflicts('table'): commander's conflicts go by the option's value name,
    // so it would also refuse --no-table, which means the line form just as --json does.
    const parsed = program.opts<ParsedOptions>();
    if (parsed.json && parsed.table === true) {
      program.error("error: option '--json' cannot be used with option '--table'", { code: 'commander.conflictingOption', exitCode: EXIT.usage });
    }
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? EXIT.ok : EXIT.usage;
    throw err;
  }
  if (configError) throw new UsageError(configError.message);
  const [address] = program.processedArgs as [string];
  const opts = program.opts<ParsedOptions>();
  // The address and CA defaults come from STORE_ADDRESS and STORE_TLS_CA: errors name the one the
  // user actually gave. (Without STORE_ADDRESS the default, localhost:5100, cannot be wrong.)
  const addressFrom = program.args.length === 0 ? 'STORE_ADDRESS: ' : '';
  const caFrom = program.getOptionValueSource('tlsCa') === 'default' ? 'STORE_TLS_CA' : '--tls-ca';
  const tlsAskedBy = opts.tls ? '--tls' : opts.tlsCa ? caFrom : undefined;
  let endpoint: StoreEndpoint;
  try {
    endpoint = resolveEndpoint(address, tlsAskedBy);
  } catch (err) {
    throw new UsageError(`${addressFrom}${(err as Error).message}`);
  }
  const tlsCa = opts.tlsCa ? readCa(opts.tlsCa, caFrom) : undefined;
  const form: Form = opts.json ? 'json' : (opts.table ?? terminal.stdoutIsTTY) ? 'table' : 'lines';
  return {
    target: endpoint.target,
    token: opts.token === undefined ? config.token : checkToken(opts.token),
    tls: endpoint.tls,
    tlsCa,
    tlsCaFrom: tlsCa ? caFrom : undefined,
    connectTimeoutMs: opts.connectTimeout,
    prefix: opts.prefix,
    limit: opts.limit,
    keysOnly: Boolean(opts.keysOnly),
    count: Boolean(opts.count),
    redact: Boolean(opts.redact),
    watch: Boolean(opts.watch),
    form,
    // Progress is for a long dump to a file watched from a terminal: never mixed into a table, nor into
    // what the reader of a pipe writes to the same terminal (`dump | grep`).
    progress: opts.progress ?? (terminal.stderrIsTTY && terminal.stdoutIsFile),
  };
}

/**
 * --token follows STORE_TOKEN's rule (checked in loadDumpConfig), so that gRPC never gets a value it
 * cannot carry and fails with the token in its message. The value is never shown: a near miss is
 * still the secret.
 */
function checkToken(token: string): string {
  const checked = envs.token().safeParse(token);
  if (!checked.success) throw new UsageError(`--token=(hidden): ${checked.error.issues[0].message}`);
  return token;
}

function readCa(file: string, from: string): Buffer {
  let pem: Buffer;
  try {
    pem = readFileSync(file);
  } catch (err) {
    throw new UsageError(`${from}: cannot read the TLS CA file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  // As the web checks STORE_TLS_CA at start: a key or a cut-short file would otherwise fail the
  // handshake, and the error would blame the store's certificate.
  try {
    checkCa(pem);
  } catch (err) {
    throw new UsageError(`${from}: not a usable TLS CA file ${file}: ${reasonOf(err)}`);
  }
  return pem;
}
