import { Command, CommanderError, InvalidArgumentError } from 'commander';
import { authMetadata, createRawClient, type Entry, listEntries, normalizeAddress, StoreClientError } from '../client/store-client';
import { readEnv } from '../shared/env';

const CONNECT_TIMEOUT_MS = 5000;

interface Options {
  json?: boolean;
  prefix: string;
  limit: number;
  keysOnly?: boolean;
  count?: boolean;
  token?: string;
}

function positiveInt(value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 0) throw new InvalidArgumentError('expected a non-negative integer');
  return n;
}

/** Writes a line, waiting for stdout to drain so a dump of any size runs in constant memory. */
async function writeLine(line: string): Promise<void> {
  if (!process.stdout.write(line + '\n')) await new Promise((resolve) => process.stdout.once('drain', resolve));
}

function formatLine(entry: Entry, options: Options): string {
  if (options.json) {
    return JSON.stringify({
      key: entry.key,
      value: options.keysOnly ? undefined : entry.value.toString('utf8'),
      version: entry.version,
      expiresAt: new Date(entry.expiresAtMs).toISOString(),
      createdAt: new Date(entry.createdAtMs).toISOString(),
    });
  }
  return options.keysOnly ? entry.key : `${entry.key} ${entry.value.toString('utf8')}`;
}

async function dump(address: string, options: Options): Promise<void> {
  const target = normalizeAddress(address);
  const client = createRawClient({ address: target, deadlineMs: CONNECT_TIMEOUT_MS });
  try {
    await new Promise<void>((resolve, reject) =>
      client.waitForReady(Date.now() + CONNECT_TIMEOUT_MS, (err) =>
        err ? reject(new StoreClientError('unavailable', 14, `no answer within ${CONNECT_TIMEOUT_MS} ms (is the store running?)`)) : resolve(),
      ),
    );
    let n = 0;
    const entries = listEntries(client, authMetadata(options.token), {
      prefix: options.prefix,
      limit: options.limit,
      keysOnly: options.keysOnly || options.count,
    });
    for await (const entry of entries) {
      n += 1;
      if (!options.count) await writeLine(formatLine(entry, options));
    }
    if (options.count) await writeLine(String(n));
  } catch (err) {
    const cause = err instanceof StoreClientError ? err.message : (err as Error).message;
    throw new Error(`cannot dump the store at ${target}: ${cause}`);
  } finally {
    client.close();
  }
}

/** bin/dump: prints every entry of a SessionStore. Exit codes: 0 ok, 1 store error, 2 usage. */
export async function run(argv: string[]): Promise<number> {
  const env = readEnv();
  const program = new Command()
    .name('dump')
    .description('Print every entry of a SessionStore, one per line: "<key> <value>"')
    .version(require('../../../package.json').version)
    .argument('[address]', 'store address: host:port or http://host:port', 'localhost:5100')
    .option('--json', 'JSON Lines: key, value, version, expiresAt, createdAt')
    .option('--prefix <prefix>', 'only keys starting with this prefix', '')
    .option('--limit <n>', 'at most n entries (0 = all)', positiveInt, 0)
    .option('--keys-only', 'print keys only')
    .option('--count', 'print only the number of entries')
    .option('--token <token>', 'bearer token (default: STORE_TOKEN from the environment or .env)', env.STORE_TOKEN)
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  try {
    program.parse(argv, { from: 'user' });
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2;
    throw err;
  }
  const [address] = program.processedArgs as [string];
  try {
    normalizeAddress(address);
  } catch (err) {
    process.stderr.write(`dump: ${(err as Error).message}\n`);
    return 2;
  }
  try {
    await dump(address, program.opts<Options>());
    return 0;
  } catch (err) {
    process.stderr.write(`dump: ${(err as Error).message}\n`);
    return 1;
  }
}

if (require.main === module) {
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(0); // `bin/dump | head` is fine
  });
  run(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
