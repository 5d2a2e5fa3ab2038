import { fstatSync } from 'node:fs';
import type { WatchEvent } from '../generated/kv';
import { type DumpSettings, EXIT, parseArgs, UsageError } from './cli';
import { createFormatter } from './format';
import { Output, Progress } from './output';
import { StoreSource, StoreUnreachableError } from './source';

const DEFAULT_COLUMNS = 120;
/**
 * After Ctrl-C or SIGTERM, how long output still queued for stdout may take to reach a reader
 * that is reading; one that stopped reading (a paused pager, a stuck pipe) is not waited for.
 */
const STOP_FLUSH_MS = 1000;
/**
 * Bytes of changes (keys and values, plus framing) held while the listing runs, past which the
 * feed pauses until the listing is printed: the store then holds the backlog (and ends the feed
 * if it grows too long) rather than this process's memory, when the listing waits for its reader.
 */
const MAX_EARLY_BYTES = 8 * 1024 * 1024;

/** The progress line on stderr, if any: an error line must not be appended to it. */
let progress: Progress | undefined;

/**
 * Lists the store to stdout, then (with --watch) follows its changes until SIGINT or SIGTERM.
 * Resolves when done; rejects with a StoreUnreachableError.
 */
async function dump(settings: DumpSettings): Promise<void> {
  const source = new StoreSource(settings);
  const out = new Output(process.stdout);
  const formatter = createFormatter({
    form: settings.form,
    keysOnly: settings.keysOnly,
    redact: settings.redact,
    columns: process.stdout.columns || Number(process.env.COLUMNS) || DEFAULT_COLUMNS,
  });
  progress = settings.progress ? new Progress(process.stderr) : undefined;
  let stopped = false;
  const stop = () => {
    stopped = true;
    source.close();
    // A write waiting for the reader would otherwise hold the process (and the exit) for as long as
    // the reader does not read. Unref'd: when the output drains, the process ends on its own first.
    setTimeout(() => process.exit(EXIT.ok), STOP_FLUSH_MS).unref();
  };
  try {
    // The feed starts before the listing so no change falls between the two; changes that arrive
    // while the listing runs wait in `early` and are printed after it.
    let early: WatchEvent[] | undefined = [];
    let earlyBytes = 0;
    let listed = (): void => undefined;
    const listingPrinted = new Promise<void>((resolve) => (listed = resolve));
    let feed: Promise<void> | undefined;
    if (settings.watch) {
      process.once('SIGINT', stop).once('SIGTERM', stop);
      feed = source.watch(settings.prefix, (event) => {
        if (early) {
          early.push(event);
          earlyBytes += 64 + event.key.length + event.value.length;
          return earlyBytes < MAX_EARLY_BYTES ? undefined : listingPrinted;
        }
        // A reader that falls behind pauses the feed, so the store (which ends a Watch that falls
        // too far behind) holds the backlog rather than this process's memory.
        return out.writeNow(formatter.event(event)) ? undefined : out.drained();
      });
      feed.catch(() => undefined); // observed below, after the listing
    }

    let count = 0;
    for await (const page of source.list({ prefix: settings.prefix, limit: settings.limit, keysOnly: settings.keysOnly || settings.count })) {
      count += page.length;
      if (!settings.count) await out.write(formatter.page(page));
      progress?.update(count);
    }
    progress?.finish(count);
    await out.write(settings.count ? `${count}\n` : formatter.end(count));

    if (feed) {
      if (settings.form === 'table') await out.write('watching for changes (Ctrl-C to stop)\n');
      for (const event of early!) out.writeNow(formatter.event(event));
      early = undefined;
      listed();
      await feed;
    }
  } catch (err) {
    // The error line that follows must not be appended to a half-drawn progress line.
    progress?.clear();
    if (!stopped) throw err;
  } finally {
    process.off('SIGINT', stop).off('SIGTERM', stop);
    source.close();
  }
}

function isFile(fd: number): boolean {
  try {
    return fstatSync(fd).isFile();
  } catch {
    return false;
  }
}

function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, ' ').trim();
}

/** bin/dump. Exit codes: 0 ok, 1 store error, 2 usage. Every error is one line on stderr. */
export async function run(argv: string[]): Promise<number> {
  const version = (require('../../../package.json') as { version: string }).version;
  let settings: DumpSettings;
  try {
    const terminal = { stdoutIsTTY: process.stdout.isTTY === true, stdoutIsFile: isFile(1), stderrIsTTY: process.stderr.isTTY === true };
    const parsed = parseArgs(argv, terminal, version);
    if (typeof parsed === 'number') return parsed;
    settings = parsed;
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`dump: ${oneLine(err.message)}\n`);
    return EXIT.usage;
  }
  try {
    await dump(settings);
    return EXIT.ok;
  } catch (err) {
    const reason = err instanceof StoreUnreachableError ? err.message : `unexpected error: ${(err as Error).message}`;
    process.stderr.write(`dump: cannot dump the store at ${settings.target}: ${oneLine(reason)}\n`);
    return EXIT.storeError;
  }
}

if (require.main === module) {
  // Node's warnings (e.g. TLS to an IP address) are not ours to print: stderr carries one error line.
  process.noDeprecation = true;
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    // `dump | head` closes the pipe early: that is a normal way to stop reading.
    if (err.code === 'EPIPE') process.exit(EXIT.ok);
    // Anything else (a full disk, a file system gone read-only) would leave a short dump behind: say so.
    progress?.clear();
    process.stderr.write(`dump: cannot write the output: ${oneLine(err.message)}\n`);
    process.exit(EXIT.storeError);
  });
  // stderr carries only progress and the error line: a reader of it that went away (a closed
  // terminal, a pipe whose reader exited) must not cut the dump on stdout short.
  process.stderr.on('error', () => undefined);
  run(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (err: Error) => {
      process.stderr.write(`dump: unexpected error: ${err.message}\n`);
      process.exitCode = EXIT.storeError;
    },
  );
}
