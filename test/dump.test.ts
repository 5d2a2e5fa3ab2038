import assert from 'node:assert/strict';
import { type ChildProcess, execFile, execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer } from 'node:net';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { credentials, Server, ServerCredentials, type ServerWritableStream } from '@grpc/grpc-js';
import { createPipeClient } from '../services/client/pipe-client';
import { createStoreClient, type StoreClient } from '../services/client/store-client';
import { decodeEntryPage } from '../services/dump/entry-page';
import { type Entry, EntryPage, type ListRequest, SessionStoreClient, SessionStoreService } from '../services/generated/kv';
import { SqliteBackend } from '../services/store/backends/sqlite';
import { shortHash } from '../services/shared/log';
import { type Proc, root, startStore, tempDir, waitForLine } from './helpers/procs';
import { type RedisServer, requireRedis, startRedisServer } from './helpers/redis';
import { selfSigned } from './helpers/tls';

const dumpBin = path.join(root, 'bin', 'dump');

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Runs bin/dump with stdout and stderr piped, in an empty directory (no .env), with only PATH set. */
export function runDump(args: string[], env: Record<string, string>, cwd: string): Promise<Run> {
  const started = Date.now();
  return new Promise((resolve) => {
    execFile(dumpBin, args, { cwd, env: { PATH: process.env.PATH ?? '', ...env }, timeout: 20_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr, ms: Date.now() - started }),
    );
  });
}

/** A loopback port with nothing listening on it. */
export async function deadPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as { port: number };
  await new Promise((r) => server.close(r));
  return port;
}

function lines(text: string): string[] {
  return text.split('\n').filter(Boolean);
}

/** Any character that must never reach the output raw (a line break between entries aside). */
const RAW_CONTROL = /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u2028\u2029]/;
/** Unicode bidirectional controls: raw, they reorder how the rest of a terminal line is shown. */
const RAW_BIDI = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/;

/** The key and value of a "<key> <value>" line as printed: a key that starts with a double quote is a JSON string. */
function fields(line: string): [string, string] {
  const key = /^"(?:[^"\\]|\\.)*"/.exec(line)?.[0] ?? line.slice(0, line.indexOf(' '));
  return [key, line.slice(key.length + 1)];
}

/** Reads one "<key> <value>" line back: a field that starts with a double quote is a JSON string. */
function parseLine(line: string): [string, string] {
  return fields(line).map((field) => (field.startsWith('"') ? JSON.parse(field) : field)) as [string, string];
}

/** A long-running bin/dump (for --watch) whose stdout lines are collected as they come. */
function startDump(args: string[], cwd: string) {
  const child: ChildProcess = spawn(dumpBin, args, { cwd, env: { PATH: process.env.PATH ?? '' }, stdio: ['ignore', 'pipe', 'pipe'] });
  const out: string[] = [];
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  createInterface({ input: child.stdout! }).on('line', (line) => out.push(line));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return {
    out,
    stderr: () => stderr,
    /** Resolves once a line matches; fails after timeoutMs with what was seen. */
    async waitFor(match: (line: string) => boolean, timeoutMs = 10_000): Promise<string> {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const found = out.find(match);
        if (found !== undefined) return found;
        if (Date.now() > deadline) throw new Error(`no matching line within ${timeoutMs} ms; got:\n${out.join('\n')}\n${stderr}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    },
    exited,
    stop(signal: NodeJS.Signals = 'SIGINT'): Promise<number | null> {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
}

/**
 * A store holding entries of 1 KB each: a listing of more than the pipe and both processes' buffers
 * hold waits for its reader.
 */
async function startBulkStore(dir: string, entries: number): Promise<Proc> {
  const backend = new SqliteBackend({ dataDir: dir, synchronous: 'NORMAL', sweepIntervalMs: 0, sweepBatch: 100, maxOpsPerCommit: 5000 });
  for (let i = 0; i < entries; i += 5000) {
    const ops = Array.from({ length: Math.min(5000, entries - i) }, (_, j) => ({ kind: 'put' as const, key: `bulk-${i + j}`, value: Buffer.alloc(1000, 'v'), ttlMs: 600_000 }));
    await backend.batch(ops);
  }
  await backend.close();
  return startStore(dir);
}

function hasProgram(name: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

describe('bin/dump (child process against a real store)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let address: string;
  let client: StoreClient;

  before(async () => {
    tmp = tempDir();
    // A fast sweeper so the --watch test sees an expiry within a second.
    store = await startStore(tmp.dir, { STORE_SWEEP_INTERVAL_MS: '50' });
    address = `127.0.0.1:${store.port}`;
    client = createStoreClient({ address, deadlineMs: 2000 });
    await client.put('sess-b', Buffer.from('{"count1":3,"count2":1}'), { ttlMs: 30 * 60_000 });
    await client.put('sess-a', Buffer.from('{"count1":0,"count2":0}'), { ttlMs: 30 * 60_000 });
    await client.put('other-1', Buffer.from('x'), { ttlMs: 30 * 60_000 });
    await client.put('other-2', Buffer.from('y'), { ttlMs: 30 * 60_000 });
    await client.put('other-3', Buffer.from('z'), { ttlMs: 30 * 60_000 });
  });
  after(async () => {
    client?.close();
    await store?.stop();
    tmp?.remove();
  });

  describe('output', () => {
    it('piped: prints every entry, one "<key> <value>" per line, in key order, nothing on stderr', async () => {
      const run = await runDump([address, '--prefix', 'sess-'], {}, tmp.dir);
      assert.equal(run.code, 0, run.stderr);
      assert.equal(run.stdout, 'sess-a {"count1":0,"count2":0}\nsess-b {"count1":3,"count2":1}\n');
      assert.equal(run.stderr, '', 'no progress or other noise on a piped stderr');
    });

    it('accepts http://host:port', async () => {
      const run = await runDump([`http://${address}`, '--prefix', 'sess-'], {}, tmp.dir);
      assert.equal(run.code, 0, run.stderr);
      assert.equal(lines(run.stdout).length, 2);
    });

    it('--json prints JSON Lines with key, value, version, expiresAt and createdAt', async () => {
      const run = await runDump([address, '--json', '--prefix', 'sess-'], {}, tmp.dir);
      assert.equal(run.code, 0, run.stderr);
      const rows = lines(run.stdout).map((l) => JSON.parse(l));
      assert.deepEqual(
        rows.map((r) => r.key),
        ['sess-a', 'sess-b'],
      );
      assert.deepEqual(JSON.parse(rows[1].value), { count1: 3, count2: 1 });
      assert.ok(Number.isSafeInteger(rows[1].version) && rows[1].version > 0);
      assert.ok(Date.parse(rows[1].expiresAt) > Date.now() + 25 * 60_000);
      assert.ok(Date.parse(rows[1].createdAt) <= Date.now());
      assert.match(rows[1].expiresAt, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    });

    it('--keys-only prints keys without values, also with --json', async () => {
      const plain = await runDump([address, '--keys-only', '--prefix', 'sess-'], {}, tmp.dir);
      assert.equal(plain.stdout, 'sess-a\nsess-b\n');
      const json = await runDump([address, '--keys-only', '--json', '--prefix', 'sess-'], {}, tmp.dir);
      const rows = lines(json.stdout).map((l) => JSON.parse(l));
      assert.equal(rows.length, 2);
      assert.ok(rows.every((r) => r.key && !('value' in r) && r.version > 0));
    });

    it('--prefix selects keys by prefix and --limit caps the count, in key order', async () => {
      const run = await runDump([address, '--prefix', 'other-', '--limit', '2', '--keys-only'], {}, tmp.dir);
      assert.equal(run.code, 0, run.stderr);
      assert.equal(run.stdout, 'other-1\nother-2\n');
      const all = await runDump([address, '--limit', '0', '--keys-only'], {}, tmp.dir);
      assert.ok(lines(all.stdout).length >= 5);
    });

    it('--count prints only the number of entries (with --prefix: of those)', async () => {
      const run = await runDump([address, '--count', '--prefix', 'other-'], {}, tmp.dir);
      assert.equal(run.code, 0, run.stderr);
      assert.equal(run.stdout, '3\n');
      const limited = await runDump([address, '--count', '--prefix', 'other-', '--limit', '1'], {}, tmp.dir);
      assert.equal(limited.stdout, '1\n');
    });

    it('--redact prints a short hash instead of each key and keeps the value', async () => {
      const run = await runDump([address, '--redact', '--prefix', 'sess-'], {}, tmp.dir);
      assert.equal(run.code, 0, run.stderr);
      assert.doesNotMatch(run.stdout, /sess-a|sess-b/);
      assert.equal(run.stdout, `${shortHash('sess-a')} {"count1":0,"count2":0}\n${shortHash('sess-b')} {"count1":3,"count2":1}\n`);
      const json = await runDump([address, '--redact', '--json', '--prefix', 'sess-'], {}, tmp.dir);
      assert.doesNotMatch(json.stdout, /sess-a|sess-b/);
      assert.equal(JSON.parse(lines(json.stdout)[0]).key, shortHash('sess-a'));
    });

    it('a value with a line break stays on one line, as a JSON string', async () => {
      await client.put('nl-1', Buffer.from('two\nlines'), { ttlMs: 60_000 });
      const run = await runDump([address, '--prefix', 'nl-'], {}, tmp.dir);
      assert.equal(run.stdout, 'nl-1 "two\\nlines"\n');
    });

    describe('keys and values that are not plain printable text', () => {
      // Key order is byte order, so the expected output follows this list.
      const odd: Array<[string, string]> = [
        ['esc-a\nforged-key forged-value', 'v'],
        ['esc-b\x1b]0;pwned\x07', 'title'],
        ['esc-c', 'tab\there\x1b[2Jclear'],
        ['esc-d', '"x\\ny"'],
        ['esc-e', 'x\ny'],
        ['esc-f', 'x\\ny'],
        ['esc-g with space', 'del\x7f c1\u009b31m'],
        ['esc-h\\n', 'plain'],
        ['esc-i\u009b2J', '{"json":"object","n":1}'],
      ];
      const printed = [
        '"esc-a\\nforged-key forged-value" v',
        '"esc-b\\u001b]0;pwned\\u0007" title',
        'esc-c "tab\\there\\u001b[2Jclear"',
        'esc-d "\\"x\\\\ny\\""',
        'esc-e "x\\ny"',
        'esc-f x\\ny',
        '"esc-g with space" "del\\u007f c1\\u009b31m"',
        '"esc-h\\\\n" plain',
        '"esc-i\\u009b2J" {"json":"object","n":1}',
      ];
      before(async () => {
        for (const [key, value] of odd) await client.put(key, Buffer.from(value), { ttlMs: 30 * 60_000 });
        await client.put('"q-1', Buffer.from('"quoted"'), { ttlMs: 30 * 60_000 });
      });

      it('lines: such a key or value is a JSON string, so each entry is one line and reads back exactly', async () => {
        const run = await runDump([address, '--prefix', 'esc-'], {}, tmp.dir);
        assert.equal(run.code, 0, run.stderr);
        assert.doesNotMatch(run.stdout, RAW_CONTROL);
        assert.deepEqual(lines(run.stdout), printed);
        assert.deepEqual(lines(run.stdout).map(parseLine), odd);
        // A literal backslash-n and a line break print differently, and a value that starts with a
        // double quote is quoted, so it cannot pass for a quoted line break.
        assert.notEqual(printed[3].slice(6), printed[4].slice(6));
        const quote = await runDump([address, '--prefix', '"q-'], {}, tmp.dir);
        assert.equal(quote.stdout, '"\\"q-1" "\\"quoted\\""\n');
        assert.deepEqual(parseLine(lines(quote.stdout)[0]), ['"q-1', '"quoted"']);
      });

      it('a key or value with a bidi control is a JSON string with it escaped, so it cannot reorder the line', async () => {
        const bidi: Array<[string, string]> = [
          ['bidi-a\u202e\u2066 admin\u2069\u2066', 'x\u2067y\u202a\u202b\u202c\u202d'],
          ['bidi-b', '\u200fhi\u2068'],
          ['bidi-c\u061c', '\u200eok'],
        ];
        for (const [key, value] of bidi) await client.put(key, Buffer.from(value), { ttlMs: 30 * 60_000 });
        const run = await runDump([address, '--prefix', 'bidi-'], {}, tmp.dir);
        assert.equal(run.code, 0, run.stderr);
        assert.doesNotMatch(run.stdout, RAW_BIDI);
        assert.deepEqual(lines(run.stdout), [
          '"bidi-a\\u202e\\u2066 admin\\u2069\\u2066" "x\\u2067y\\u202a\\u202b\\u202c\\u202d"',
          'bidi-b "\\u200fhi\\u2068"',
          '"bidi-c\\u061c" "\\u200eok"',
        ]);
        assert.deepEqual(lines(run.stdout).map(parseLine), bidi);
        for (const form of ['--table', '--keys-only']) {
          const other = await runDump([address, form, '--prefix', 'bidi-'], { COLUMNS: '200' }, tmp.dir);
          assert.equal(other.code, 0, other.stderr);
          assert.doesNotMatch(other.stdout, RAW_BIDI, form);
        }
      });

      it('--keys-only: the same quoting, one key per line', async () => {
        const run = await runDump([address, '--keys-only', '--prefix', 'esc-'], {}, tmp.dir);
        assert.equal(run.code, 0, run.stderr);
        assert.doesNotMatch(run.stdout, RAW_CONTROL);
        assert.deepEqual(lines(run.stdout), printed.map((l) => fields(l)[0]));
      });

      it('--json: such a key or value is a \\u escape in its JSON string, never raw, and parses back exactly', async () => {
        await client.put('jx-\u009b2J\u202e', Buffer.from('c1\u009b31m del\x7f bidi\u2066x\u2069 nel\u0085 ls\u2028 ps\u2029'), { ttlMs: 30 * 60_000 });
        const run = await runDump([address, '--json', '--prefix', 'jx-'], {}, tmp.dir);
        assert.equal(run.code, 0, run.stderr);
        assert.doesNotMatch(run.stdout, RAW_CONTROL);
        assert.doesNotMatch(run.stdout, RAW_BIDI);
        assert.equal(run.stdout.split('\n').length, 2, run.stdout);
        assert.match(run.stdout, /^\{"key":"jx-\\u009b2J\\u202e","value":"c1\\u009b31m del\\u007f bidi\\u2066x\\u2069 nel\\u0085 ls\\u2028 ps\\u2029",/);
        const entry = JSON.parse(run.stdout) as { key: string; value: string };
        assert.equal(entry.key, 'jx-\u009b2J\u202e');
        assert.equal(entry.value, 'c1\u009b31m del\x7f bidi\u2066x\u2069 nel\u0085 ls\u2028 ps\u2029');
        // The change feed's lines too.
        const watch = startDump([address, '--watch', '--json', '--prefix', 'jx-'], tmp.dir);
        try {
          await watch.waitFor((l) => l.startsWith('{"key"'));
          await client.put('jx-\u202ewatched', Buffer.from('\u009b2J'), { ttlMs: 60_000 });
          const event = await watch.waitFor((l) => l.startsWith('{"event"'));
          assert.doesNotMatch(event, RAW_CONTROL);
          assert.doesNotMatch(event, RAW_BIDI);
          assert.match(event, /^\{"event":"put","key":"jx-\\u202ewatched","value":"\\u009b2J",/);
        } finally {
          assert.equal(await watch.stop('SIGINT'), 0, watch.stderr());
        }
      });

      it('--json: a value that is not UTF-8 is valueBase64 in place of value, and reads back byte for byte', async () => {
        const binary = Buffer.from([0xff, 0xfe, 0x00, 0x1b, 0x5b, 0x32, 0x4a, 0xc3, 0x28]);
        await client.put('bin-1', binary, { ttlMs: 30 * 60_000 });
        const run = await runDump([address, '--json', '--prefix', 'bin-'], {}, tmp.dir);
        assert.equal(run.code, 0, run.stderr);
        const entry = JSON.parse(run.stdout) as { key: string; value?: string; valueBase64: string };
        assert.equal(entry.key, 'bin-1');
        assert.equal(entry.value, undefined);
        assert.deepEqual(Buffer.from(entry.valueBase64, 'base64'), binary);
        const help = await runDump(['--help'], {}, tmp.dir);
        assert.match(help.stdout, /valueBase64/);
      });

      it('--table: no control character reaches a cell; each entry is one row', async () => {
        const run = await runDump([address, '--table', '--prefix', 'esc-'], { COLUMNS: '200' }, tmp.dir);
        assert.equal(run.code, 0, run.stderr);
        assert.doesNotMatch(run.stdout, RAW_CONTROL);
        const [header, ...rows] = lines(run.stdout);
        assert.match(header, /^ID\s+VALUE\s+VERSION\s+EXPIRES IN$/);
        assert.equal(rows.length, odd.length + 1);
        assert.equal(rows[odd.length], `(${odd.length} entries)`);
        for (const [i, line] of printed.entries()) {
          const [key, value] = fields(line);
          assert.ok(rows[i].startsWith(key + ' '), `${rows[i]} starts with ${key}`);
          assert.ok(rows[i].slice(header.indexOf('VALUE')).startsWith(value + ' '), `${rows[i]} shows ${value} under VALUE`);
        }
      });

      it('--watch, lines and table: a changed key or value cannot forge a line or reach the terminal', async () => {
        await client.put('wx-0', Buffer.from('start'), { ttlMs: 60_000 });
        const plain = startDump([address, '--watch', '--prefix', 'wx-'], tmp.dir);
        const table = startDump([address, '--watch', '--table', '--prefix', 'wx-'], tmp.dir);
        try {
          await plain.waitFor((l) => l === 'wx-0 start');
          await table.waitFor((l) => l.startsWith('watching for changes'));
          const forged = 'wx-1\nput fake injected';
          await client.put(forged, Buffer.from('v\x1b[2J\x1b]0;pwned\x07'), { ttlMs: 60_000 });
          await client.delete(forged);
          await client.put('wx-2', Buffer.from('end'), { ttlMs: 60_000 });
          await plain.waitFor((l) => l === 'put wx-2 end');
          assert.deepEqual(plain.out, [
            'wx-0 start',
            'put "wx-1\\nput fake injected" "v\\u001b[2J\\u001b]0;pwned\\u0007"',
            'delete "wx-1\\nput fake injected"',
            'put wx-2 end',
          ]);
          await table.waitFor((l) => / put +wx-2 /.test(l));
          const events = table.out.slice(table.out.findIndex((l) => l.startsWith('watching for changes')) + 1);
          assert.equal(events.length, 3, events.join('\n'));
          assert.ok(events.every((l) => !RAW_CONTROL.test(l)));
          assert.match(events[0], / put +"wx-1\\nput fake injected" {2}"v\\u001b\[2J\\u001b\]0;pwned\\u0007" {2}v\d+/);
          assert.match(events[1], / delete "wx-1\\nput fake injected" {2}v\d+$/);
        } finally {
          assert.equal(await plain.stop('SIGINT'), 0, plain.stderr());
          assert.equal(await table.stop('SIGINT'), 0, table.stderr());
        }
      });

      it('--watch, lines: a listed key named like a change (put, delete, expire) is a JSON string, so its entry cannot pass for a change', async () => {
        const named: Array<[string, string]> = [
          ['delete', 'sess-a'],
          ['expire', 'sess-b'],
          ['put', 'sess-a {"count1":99,"count2":0}'],
        ];
        for (const [key, value] of named) await client.put(key, Buffer.from(value), { ttlMs: 60_000 });
        const watch = startDump([address, '--watch'], tmp.dir);
        try {
          await watch.waitFor((l) => l.startsWith('"put" '));
          await client.put('sess-a', Buffer.from('{"count1":1,"count2":0}'), { ttlMs: 30 * 60_000 });
          await watch.waitFor((l) => l.startsWith('put sess-a '));
          assert.deepEqual(
            watch.out.filter((l) => /^(put|delete|expire) /.test(l)),
            ['put sess-a {"count1":1,"count2":0}'],
          );
          assert.deepEqual(
            watch.out.filter((l) => l.startsWith('"put" ') || l.startsWith('"delete" ') || l.startsWith('"expire" ')).map(parseLine),
            named,
          );
        } finally {
          assert.equal(await watch.stop('SIGINT'), 0, watch.stderr());
          for (const [key] of named) await client.delete(key);
          await client.put('sess-a', Buffer.from('{"count1":0,"count2":0}'), { ttlMs: 30 * 60_000 });
        }
      });
    });

    it('--table prints aligned columns ID, VALUE, VERSION, EXPIRES IN with the time left', async () => {
      const run = await runDump([address, '--table', '--prefix', 'sess-'], { COLUMNS: '100' }, tmp.dir);
      assert.equal(run.code, 0, run.stderr);
      const [header, ...rows] = lines(run.stdout);
      assert.match(header, /^ID\s+VALUE\s+VERSION\s+EXPIRES IN$/);
      assert.equal(rows.length, 3);
      assert.equal(rows[2], '(2 entries)');
      assert.match(rows[0], /^sess-a\s+\{"count1":0,"count2":0\}\s+\d+\s+(2\dm \d\d|30m 00)s$/);
      // Aligned: every row ends where the header ends, and the value column starts at one place.
      assert.equal(rows[0].length, header.length);
      assert.equal(rows[1].length, header.length);
      assert.equal(rows[0].indexOf('{'), header.indexOf('VALUE'));
      assert.equal(rows[1].indexOf('{'), header.indexOf('VALUE'));
    });

    it('--table lines up keys and values with wide characters (CJK, emoji) and combining marks by the columns they take', async () => {
      // [text, the columns a terminal gives it], counted by hand.
      const rows: Array<[[string, number], [string, number]]> = [
        [['wide-a', 6], ['{"name":"山田"}', 15]],
        [['wide-e\u0301', 6], ['😀 ok', 5]],
        // Kana Supplement, a byte order mark; angle brackets wide as CJK, a flag of two one-column letters.
        [['wide-t\u{1b000}', 8], ['\ufeff{"n":1}', 7]],
        [['wide-z', 6], ['山田太郎山田太郎', 16]],
        [['wide-\u2329', 7], ['\u{1f1ef}\u{1f1f5} \u4dc0', 5]],
        [['wide-中文', 9], ['{"n":"x"}', 9]],
      ];
      for (const [[key], [value]] of rows) await client.put(key, Buffer.from(value), { ttlMs: 30 * 60_000 });
      const cell = ([text, width]: [string, number], columns: number) => text + ' '.repeat(columns - width);

      const run = await runDump([address, '--table', '--prefix', 'wide-'], { COLUMNS: '100' }, tmp.dir);
      assert.equal(run.code, 0, run.stderr);
      const [header, ...printed] = lines(run.stdout);
      assert.ok(header.startsWith(`ID${' '.repeat(7)}  VALUE${' '.repeat(11)}  `), header);
      for (const [i, [key, value]] of rows.entries()) {
        assert.ok(printed[i].startsWith(`${cell(key, 9)}  ${cell(value, 16)}  `), printed[i]);
        assert.match(printed[i].slice(`${cell(key, 9)}  ${cell(value, 16)}  `.length), /^\d{16} {2}\s*\d+m \d\ds$/);
      }

      // Narrow: values are cut to the 12 columns left for them, never a wide character past the edge.
      const narrow = await runDump([address, '--table', '--prefix', 'wide-'], { COLUMNS: '50' }, tmp.dir);
      assert.equal(narrow.code, 0, narrow.stderr);
      const cut = lines(narrow.stdout).slice(1);
      assert.ok(cut[0].startsWith(`${cell(rows[0][0], 9)}  {"name":"山…  `), cut[0]);
      assert.ok(cut[3].startsWith(`${cell(rows[3][0], 9)}  山田太郎山…   `), cut[3]);
      assert.ok(cut[5].startsWith(`${cell(rows[5][0], 9)}  ${cell(rows[5][1], 12)}  `), cut[5]);
    });

    it('on a terminal the table is the default, and a dump to a file shows progress on the terminal', async function () {
      if (!hasProgram('script')) {
        if (process.env.CI) throw new Error('script (Debian package bsdutils) is required in CI');
        this.skip();
      }
      // `script` runs the command on a pseudo-terminal and copies what it shows to our pipe.
      const onTerminal = execFileSync('script', ['-qec', `${dumpBin} ${address} --prefix sess-`, '/dev/null'], {
        cwd: tmp.dir,
        env: { PATH: process.env.PATH ?? '', COLUMNS: '100' },
        stdio: ['ignore', 'pipe', 'pipe'],
      }).toString();
      assert.match(onTerminal, /^ID\s+VALUE\s+VERSION\s+EXPIRES IN\r?$/m);
      assert.match(onTerminal, /^sess-a\s+\{"count1":0/m);

      const file = path.join(tmp.dir, 'dump.txt');
      const terminal = execFileSync('script', ['-qec', `${dumpBin} ${address} --prefix sess- > ${file}`, '/dev/null'], {
        cwd: tmp.dir,
        env: { PATH: process.env.PATH ?? '' },
        stdio: ['ignore', 'pipe', 'pipe'],
      }).toString();
      assert.match(terminal, /2 entries in \d+\.\d s \([\d,]+\/s\)/);
      assert.equal(readFileSync(file, 'utf8'), 'sess-a {"count1":0,"count2":0}\nsess-b {"count1":3,"count2":1}\n');
    });

    it('piped to a reader that writes to the same terminal (dump | grep): no progress in between its lines', async function () {
      if (!hasProgram('script')) {
        if (process.env.CI) throw new Error('script (Debian package bsdutils) is required in CI');
        this.skip();
      }
      const terminal = execFileSync('script', ['-qec', `${dumpBin} ${address} --prefix sess- | grep count`, '/dev/null'], {
        cwd: tmp.dir,
        env: { PATH: process.env.PATH ?? '' },
        stdio: ['ignore', 'pipe', 'pipe'],
      }).toString();
      assert.equal(terminal.replace(/\r/g, ''), 'sess-a {"count1":0,"count2":0}\nsess-b {"count1":3,"count2":1}\n');
    });

    it('--progress forces the progress summary on a piped stderr', async () => {
      const run = await runDump([address, '--prefix', 'sess-', '--progress'], {}, tmp.dir);
      assert.equal(run.code, 0);
      // A redraw may come first on a slow machine; the last line is the summary.
      assert.match(run.stderr, /(^|\x1b\[K)2 entries in \d+\.\d s \([\d,]+\/s\)\n$/);
    });
  });

  describe('--watch', () => {
    it('after the entries, prints a put, a delete and an expiry as they happen; Ctrl-C exits 0', async () => {
      await client.put('w-0', Buffer.from('{"n":0}'), { ttlMs: 60_000 });
      const plain = startDump([address, '--watch', '--prefix', 'w-'], tmp.dir);
      const json = startDump([address, '--watch', '--json', '--prefix', 'w-'], tmp.dir);
      try {
        // The listing comes first; the change feed was opened before it, so nothing after is missed.
        await plain.waitFor((l) => l === 'w-0 {"n":0}');
        await json.waitFor((l) => l.includes('"key":"w-0"'));

        await client.put('w-1', Buffer.from('{"n":1}'), { ttlMs: 60_000 });
        await client.delete('w-1');
        await client.put('w-2', Buffer.from('{"n":2}'), { ttlMs: 150 });
        await client.put('x-0', Buffer.from('outside the prefix'), { ttlMs: 60_000 });

        await plain.waitFor((l) => l === 'expire w-2');
        assert.deepEqual(plain.out, ['w-0 {"n":0}', 'put w-1 {"n":1}', 'delete w-1', 'put w-2 {"n":2}', 'expire w-2']);

        await json.waitFor((l) => l.includes('"event":"expire"'));
        const events = json.out.slice(1).map((l) => JSON.parse(l));
        assert.deepEqual(
          events.map((e) => [e.event, e.key]),
          [
            ['put', 'w-1'],
            ['delete', 'w-1'],
            ['put', 'w-2'],
            ['expire', 'w-2'],
          ],
        );
        assert.equal(JSON.parse(events[0].value).n, 1);
        assert.ok(events[0].version > 0 && events[1].version === events[0].version);
        assert.ok(Date.parse(events[2].expiresAt) > 0);
      } finally {
        assert.equal(await plain.stop('SIGINT'), 0, plain.stderr());
        assert.equal(await json.stop('SIGINT'), 0, json.stderr());
      }
      assert.equal(plain.stderr(), '');
      assert.equal(json.stderr(), '');
    });

    it('Ctrl-C or SIGTERM stops it, exit 0, also while its reader has stopped reading', async () => {
      const own = tempDir();
      const bulkStore = await startBulkStore(own.dir, 3000);
      const children: ChildProcess[] = [];
      try {
        for (const signal of ['SIGINT', 'SIGTERM'] as const) {
          const child = spawn(dumpBin, [`127.0.0.1:${bulkStore.port}`, '--watch'], { cwd: tmp.dir, env: { PATH: process.env.PATH ?? '' }, stdio: ['ignore', 'pipe', 'pipe'] });
          children.push(child);
          let stderr = '';
          child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
          const exited = once(child, 'exit') as Promise<[number | null, string | null]>;
          await once(child.stdout!, 'readable'); // listing; nothing more is read from here on
          child.kill(signal);
          const [code] = await Promise.race([exited, new Promise<[string]>((r) => setTimeout(() => r(['still running 15 s after the signal']), 15_000))]);
          assert.equal(code, 0, `${signal}: ${stderr}`);
          assert.equal(stderr, '', signal);
        }
      } finally {
        for (const child of children) child.kill('SIGKILL');
        await bulkStore.stop();
        own.remove();
      }
    });

    it('a reader that stops reading holds the feed, not dump\'s memory: the store ends it, and once read, dump says changes were missed, exit 1', async () => {
      const own = tempDir();
      const watched = await startStore(own.dir, { STORE_SYNCHRONOUS: 'NORMAL' });
      const writer = createStoreClient({ address: `127.0.0.1:${watched.port}`, deadlineMs: 10_000 });
      await writer.put('wb-listed', Buffer.from('x'), { ttlMs: 60_000 });
      const child = spawn(dumpBin, [`127.0.0.1:${watched.port}`, '--watch', '--prefix', 'wb-'], { cwd: tmp.dir, env: { PATH: process.env.PATH ?? '' }, stdio: ['ignore', 'pipe', 'pipe'] });
      try {
        let stderr = '';
        child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
        const exited = once(child, 'exit') as Promise<[number | null]>;
        // The listing's line: the feed is open (it starts before the listing).
        const [first] = (await once(child.stdout!, 'data')) as [Buffer];
        assert.equal(first.toString(), 'wb-listed x\n');
        child.stdout!.pause();
        // Nothing more is read from dump's stdout until the store has ended the feed: 60 KB events,
        // past the store's 16 MiB for a Watch client that stops reading (and dump's and the pipe's buffers).
        const value = Buffer.alloc(60_000, 'w');
        const cut = () => watched.lines.some((l) => /"method":"Watch","code":"RESOURCE_EXHAUSTED"/.test(l));
        for (let i = 0; i < 1000 && !cut(); i += 20) {
          await Promise.all(Array.from({ length: 20 }, (_, j) => writer.put(`wb-${(i + j) % 100}`, value, { ttlMs: 60_000 })));
        }
        await waitForLine(watched, (l) => /"method":"Watch","code":"RESOURCE_EXHAUSTED"/.test(l), 10_000);
        child.stdout!.resume();
        const [code] = await exited;
        assert.equal(code, 1, stderr);
        assert.equal(lines(stderr).length, 1, stderr);
        assert.match(stderr, /^dump: cannot dump the store at [\d.:]+: the change feed ended: the watcher fell behind .*, so changes were missed; run it again\n$/);
      } finally {
        child.kill('SIGKILL');
        writer.close();
        await watched.stop();
        own.remove();
      }
    });

    it('changes that come while the listing waits for its reader are held up to a bound, then left to the store: it ends the feed, and dump says so once read, exit 1', async () => {
      const own = tempDir();
      const bulkStore = await startBulkStore(own.dir, 3000); // a listing of 3 MB, more than the pipe holds
      const writer = createStoreClient({ address: `127.0.0.1:${bulkStore.port}`, deadlineMs: 10_000 });
      const child = spawn(dumpBin, [`127.0.0.1:${bulkStore.port}`, '--watch'], { cwd: tmp.dir, env: { PATH: process.env.PATH ?? '' }, stdio: ['ignore', 'pipe', 'pipe'] });
      try {
        let stderr = '';
        child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
        const exited = once(child, 'exit') as Promise<[number | null]>;
        await once(child.stdout!, 'readable'); // the listing started; nothing more is read from here on
        // 60 KB changes until the store ends the feed (past its 16 MiB for a client that stops
        // taking events): dump held them in memory, without end, before the bound.
        const value = Buffer.alloc(60_000, 'w');
        const cut = () => bulkStore.lines.some((l) => /"method":"Watch","code":"RESOURCE_EXHAUSTED"/.test(l));
        for (let i = 0; i < 1000 && !cut(); i += 20) {
          await Promise.all(Array.from({ length: 20 }, (_, j) => writer.put(`change-${(i + j) % 100}`, value, { ttlMs: 60_000 })));
        }
        await waitForLine(bulkStore, (l) => /"method":"Watch","code":"RESOURCE_EXHAUSTED"/.test(l), 10_000);
        const rssMb = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))?.[1]) / 1024;
        assert.ok(rssMb < 120, `dump holds ${rssMb.toFixed(0)} MB`);
        const listed: string[] = [];
        createInterface({ input: child.stdout! }).on('line', (line) => listed.push(line));
        const [code] = await exited;
        assert.equal(code, 1, stderr);
        assert.equal(listed.filter((l) => l.startsWith('bulk-')).length, 3000, 'the whole listing, then the changes held');
        assert.match(stderr, /^dump: cannot dump the store at [\d.:]+: the change feed ended: .*, so changes were missed; run it again\n$/);
      } finally {
        child.kill('SIGKILL');
        writer.close();
        await bulkStore.stop();
        own.remove();
      }
    });

    it('the store going away ends --watch with one line and exit 1', async () => {
      const own = tempDir();
      const shortLived = await startStore(own.dir, { STORE_GRACE_MS: '0' });
      const watcher = startDump([`127.0.0.1:${shortLived.port}`, '--watch', '--table'], tmp.dir);
      try {
        await watcher.waitFor((l) => l.startsWith('watching for changes'));
        await shortLived.stop();
        assert.equal(await watcher.exited, 1);
        assert.equal(lines(watcher.stderr()).length, 1, watcher.stderr());
        assert.match(watcher.stderr(), /^dump: cannot dump the store at 127\.0\.0\.1:\d+: .*run it again/);
      } finally {
        await watcher.stop('SIGKILL');
        await shortLived.stop();
        own.remove();
      }
    });
  });

  it('entries up to the largest value a store allows (4 MiB): the clients write and read them, and the listing holds them', async () => {
    const own = tempDir();
    const big = await startStore(own.dir, { STORE_MAX_VALUE_BYTES: String(4 * 1024 * 1024), STORE_MAX_MESSAGE_BYTES: String(8 * 1024 * 1024) });
    const address = `127.0.0.1:${big.port}`;
    const unary = createStoreClient({ address, deadlineMs: 10_000 });
    const pipe = createPipeClient({ address, deadlineMs: 10_000 });
    try {
      const value = Buffer.alloc(4 * 1024 * 1024, 'b');
      // A Put's answer holds the value: over grpc-js' default 4 MiB receive limit with its framing.
      await unary.put('big-1', value, { ttlMs: 60_000 });
      await pipe.put('big-2', value, { ttlMs: 60_000 });
      await unary.put('small', Buffer.alloc(10_000, 's'), { ttlMs: 60_000 });
      assert.equal((await unary.get('big-2'))?.value.length, value.length);
      assert.equal((await pipe.get('big-1'))?.value.length, value.length);
      // A page of the listing holds a value of any allowed size, but no more than one such.
      const run = await new Promise<Run>((resolve) =>
        execFile(dumpBin, [address, '--json'], { cwd: tmp.dir, env: { PATH: process.env.PATH ?? '' }, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) =>
          resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr, ms: 0 }),
        ),
      );
      assert.equal(run.code, 0, run.stderr);
      const listed = lines(run.stdout).map((l) => JSON.parse(l) as { key: string; value: string });
      assert.deepEqual(listed.map((e) => [e.key, e.value.length]), [['big-1', value.length], ['big-2', value.length], ['small', 10_000]]);
      // A client with grpc-js' default 4 MiB limit: a value just under it comes in a page of its own.
      await unary.put('c-0', Buffer.alloc(40_000, 'c'), { ttlMs: 60_000 });
      await unary.put('c-1', Buffer.alloc(4 * 1024 * 1024 - 32 * 1024, 'c'), { ttlMs: 60_000 });
      const plain = new SessionStoreClient(address, credentials.createInsecure());
      try {
        const pages: number[][] = [];
        const call = plain.listPages({ prefix: 'c-', limit: 0, startAfter: '', keysOnly: false });
        await new Promise<void>((resolve, reject) => {
          call.on('data', (page: EntryPage) => pages.push(page.entries.map((e) => e.value.length)));
          call.on('end', resolve);
          call.on('error', reject);
        });
        assert.deepEqual(pages, [[40_000], [4 * 1024 * 1024 - 32 * 1024]]);
      } finally {
        plain.close();
      }
    } finally {
      unary.close();
      pipe.close();
      await big.stop();
      own.remove();
    }
  });

  describe('exit codes and errors', () => {
    it('an unreachable store: one line naming the address, exit 1, without waiting for the connect timeout', async () => {
      const port = await deadPort();
      const run = await runDump([`127.0.0.1:${port}`, '--connect-timeout', '15000'], {}, tmp.dir);
      assert.equal(run.code, 1);
      assert.equal(lines(run.stderr).length, 1, run.stderr);
      assert.match(run.stderr, new RegExp(`^dump: cannot dump the store at 127\\.0\\.0\\.1:${port}: connection refused`));
      assert.ok(run.ms < 7000, `took ${run.ms} ms`);
    });

    it('an address where an HTTP/1 server answers (the web, not the store): one line saying so, no TLS hint, exit 1', async () => {
      const web = createHttpServer((_req, res) => res.end('a page'));
      await new Promise<void>((resolve) => web.listen(0, '127.0.0.1', resolve));
      try {
        const port = (web.address() as { port: number }).port;
        const run = await runDump([`127.0.0.1:${port}`, '--connect-timeout', '5000'], {}, tmp.dir);
        assert.equal(run.code, 1);
        assert.equal(
          run.stderr,
          `dump: cannot dump the store at 127.0.0.1:${port}: something answers there, but not a gRPC server (the web service, say): give the address of the store\n`,
        );
      } finally {
        web.close();
      }
    });

    it('output it cannot write (a full disk): one line saying so, exit 1', async function () {
      if (!existsSync('/dev/full')) this.skip(); // Linux's always-full device stands in for a full disk
      for (const args of [[address], [address, '--json'], [address, '--count']]) {
        const full = openSync('/dev/full', 'w');
        const child = spawn(dumpBin, args, { cwd: tmp.dir, env: { PATH: process.env.PATH ?? '' }, stdio: ['ignore', full, 'pipe'] });
        closeSync(full);
        let stderr = '';
        child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
        const [code] = (await once(child, 'close')) as [number | null];
        assert.equal(code, 1, `${args.join(' ')}: ${stderr}`);
        assert.equal(lines(stderr).length, 1, stderr);
        assert.match(stderr, /^dump: cannot write the output: ENOSPC: no space left on device/);
      }
    });

    it('the store dying mid-listing: one line saying the connection broke, no TLS hint, exit 1, never a short listing with exit 0', async () => {
      const own = tempDir();
      // 20 MB: more than the HTTP/2 window and the socket buffers, so the store is still sending when it dies.
      const bulkStore = await startBulkStore(own.dir, 20_000);
      const child = spawn(dumpBin, [`127.0.0.1:${bulkStore.port}`], { cwd: tmp.dir, env: { PATH: process.env.PATH ?? '' }, stdio: ['ignore', 'pipe', 'pipe'] });
      try {
        let stderr = '';
        child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
        const exited = once(child, 'exit') as Promise<[number | null]>;
        await once(child.stdout!, 'readable'); // listing, and held up by this reader from here on
        await bulkStore.stop('SIGKILL');
        let printed = 0;
        child.stdout!.on('data', (chunk: Buffer) => (printed += chunk.toString().split('\n').length - 1));
        const [code] = await exited;
        assert.equal(code, 1, stderr);
        assert.ok(printed < 20_000, `printed ${printed} entries`);
        assert.equal(lines(stderr).length, 1, stderr);
        assert.match(stderr, /^dump: cannot dump the store at 127\.0\.0\.1:\d+: the connection to the store broke: .* \(run it again\)\n$/);
        assert.doesNotMatch(stderr, /TLS|--tls/);
      } finally {
        child.kill('SIGKILL');
        await bulkStore.stop('SIGKILL');
        own.remove();
      }
    });

    it('--progress: an error starts a line of its own, never appended to a half-drawn progress line', async () => {
      const own = tempDir();
      const bulkStore = await startBulkStore(own.dir, 20_000);
      const child = spawn(dumpBin, [`127.0.0.1:${bulkStore.port}`, '--progress'], { cwd: tmp.dir, env: { PATH: process.env.PATH ?? '' }, stdio: ['ignore', 'pipe', 'pipe'] });
      try {
        let stderr = '';
        child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
        const exited = once(child, 'exit') as Promise<[number | null]>;
        // A slow reader (64 KB each 50 ms: 20 MB take 15 s), so the progress line is redrawn mid-listing.
        child.stdout!.on('data', () => {
          child.stdout!.pause();
          setTimeout(() => child.stdout!.resume(), 50);
        });
        const deadline = Date.now() + 20_000;
        while (!/\x1b\[K[\d,]+ entries {2}/.test(stderr) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
        assert.match(stderr, /\x1b\[K[\d,]+ entries {2}/, 'a progress line was drawn');
        await bulkStore.stop('SIGKILL');
        const [code] = await exited;
        assert.equal(code, 1, stderr);
        // What a terminal shows on the last line: the text after the last carriage return.
        const lastLine = stderr.trimEnd().split('\n').at(-1)!.split('\r').at(-1)!.replace(/^\x1b\[K/, '');
        assert.match(lastLine, /^dump: cannot dump the store at /, JSON.stringify(stderr.slice(-300)));
      } finally {
        child.kill('SIGKILL');
        await bulkStore.stop('SIGKILL');
        own.remove();
      }
    });

    it('--progress to a stderr whose reader has gone (a closed terminal, a pipe whose reader exited): the whole listing still reaches stdout, exit 0', async () => {
      const own = tempDir();
      const bulkStore = await startBulkStore(own.dir, 20_000);
      const child = spawn(dumpBin, [`127.0.0.1:${bulkStore.port}`, '--progress'], { cwd: tmp.dir, env: { PATH: process.env.PATH ?? '' }, stdio: ['ignore', 'pipe', 'pipe'] });
      try {
        child.stderr!.destroy();
        // Both listened for now: stdout may close before or after the exit.
        const exited = once(child, 'exit') as Promise<[number | null]>;
        const closed = once(child.stdout!, 'close');
        let printed = 0;
        // A slow reader (64 KB each 5 ms: 20 MB take about 2 s), so progress is drawn mid-listing.
        child.stdout!.on('data', (chunk: Buffer) => {
          printed += chunk.toString().split('\n').length - 1;
          child.stdout!.pause();
          setTimeout(() => child.stdout!.resume(), 5);
        });
        const [[code]] = await Promise.all([exited, closed]);
        assert.equal(code, 0);
        assert.equal(printed, 20_000);
      } finally {
        child.kill('SIGKILL');
        await bulkStore.stop('SIGKILL');
        own.remove();
      }
    });

    it('a store that accepts TCP but never answers: gives up after --connect-timeout, exit 1', async () => {
      const silent = createServer(() => undefined);
      await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
      const { port } = silent.address() as { port: number };
      try {
        const run = await runDump([`127.0.0.1:${port}`, '--connect-timeout', '300'], {}, tmp.dir);
        assert.equal(run.code, 1);
        assert.equal(lines(run.stderr).length, 1, run.stderr);
        assert.match(run.stderr, /no connection within 300 ms/);
      } finally {
        silent.close();
      }
    });

    it('--tls or https:// against a plaintext store: one line, exit 1 (never a plaintext fallback)', async () => {
      for (const args of [[address, '--tls'], [`https://${address}`]]) {
        const run = await runDump(args, {}, tmp.dir);
        assert.equal(run.code, 1, args.join(' '));
        assert.equal(run.stdout, '');
        assert.equal(lines(run.stderr).length, 1, run.stderr);
        assert.match(run.stderr, /TLS handshake failed: the store does not use TLS there/);
      }
    });

    it('http:// with --tls, --tls-ca or STORE_TLS_CA contradicts itself: a usage error naming both, exit 2', async () => {
      const ca = path.join(tmp.dir, 'any-ca.pem');
      writeFileSync(ca, '-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n');
      const cases: Array<[string[], Record<string, string>, string, string]> = [
        [[`http://${address}`, '--tls'], {}, '', '--tls'],
        [[`http://${address}`, '--tls-ca', ca], {}, '', '--tls-ca'],
        [[`http://${address}`], { STORE_TLS_CA: ca }, '', 'STORE_TLS_CA'],
        [[], { STORE_ADDRESS: `http://${address}`, STORE_TLS_CA: ca }, 'STORE_ADDRESS: ', 'STORE_TLS_CA'],
      ];
      for (const [args, env, from, setting] of cases) {
        const run = await runDump(args, env, tmp.dir);
        assert.equal(run.code, 2, `${args.join(' ')}: ${run.stderr}`);
        assert.equal(run.stdout, '');
        assert.equal(run.stderr, `dump: ${from}http:// means plaintext, but ${setting} asks for TLS (write https:// or host:port for TLS, or leave out ${setting})\n`);
      }
    });

    it('usage errors exit 2 with one line on stderr', async () => {
      const cases = [
        [address, '--no-such-option'],
        ['not an address'],
        ['127.0.0.1:99999'],
        ['127.0.0.1:0'],
        [address, '--limit', '-1'],
        [address, '--limit', 'many'],
        [address, '--count', '--watch'],
        [address, '--json', '--table'],
        [address, '--tls-ca', path.join(tmp.dir, 'missing.pem')],
        [address, '--connect-timeout', '0'],
      ];
      const runs = await Promise.all(cases.map((args) => runDump(args, {}, tmp.dir)));
      for (const [i, args] of cases.entries()) {
        const run = runs[i];
        assert.equal(run.code, 2, `${args.join(' ')}: ${run.stderr}`);
        assert.equal(lines(run.stderr).length, 1, `${args.join(' ')}: ${run.stderr}`);
        assert.match(run.stderr, /^dump: /);
        assert.equal(run.stdout, '');
      }
    });

    it('--connect-timeout out of range or not a number says the range it takes (1 to 3600000)', async () => {
      for (const value of ['0', 'soon', '3600001']) {
        const run = await runDump([address, '--connect-timeout', value], {}, tmp.dir);
        assert.equal(run.code, 2);
        assert.equal(run.stderr, `dump: option '--connect-timeout <ms>' argument '${value}' is invalid. expected a whole number from 1 to 3600000 (see dump --help)\n`);
      }
    });

    it('--json agrees with --no-table (both mean the line form); only --table conflicts with it', async () => {
      for (const args of [
        ['--json', '--no-table'],
        ['--no-table', '--json'],
        ['--json', '--table', '--no-table'],
      ]) {
        const run = await runDump([address, ...args, '--prefix', 'sess-'], {}, tmp.dir);
        assert.equal(run.code, 0, `${args.join(' ')}: ${run.stderr}`);
        assert.deepEqual(
          lines(run.stdout).map((l) => JSON.parse(l).key),
          ['sess-a', 'sess-b'],
        );
      }
      const both = await runDump([address, '--json', '--no-table', '--table'], {}, tmp.dir);
      assert.equal(both.code, 2);
      assert.equal(both.stderr, "dump: option '--json' cannot be used with option '--table' (see dump --help)\n");
      assert.equal(both.stdout, '');
    });

    it('a TLS CA file it cannot read is a usage error naming the file and where it came from: STORE_TLS_CA or --tls-ca', async () => {
      const missing = path.join(tmp.dir, 'nope.pem');
      const fromEnv = await runDump([address], { STORE_TLS_CA: missing }, tmp.dir);
      assert.equal(fromEnv.code, 2);
      assert.equal(fromEnv.stderr, `dump: STORE_TLS_CA: cannot read the TLS CA file ${missing}: ENOENT\n`);
      const fromOption = await runDump([address, '--tls-ca', missing], { STORE_TLS_CA: path.join(tmp.dir, 'other.pem') }, tmp.dir);
      assert.equal(fromOption.code, 2);
      assert.equal(fromOption.stderr, `dump: --tls-ca: cannot read the TLS CA file ${missing}: ENOENT\n`);
    });

    it('a TLS CA file that holds no whole certificate (a key, a cut-short copy) is a usage error naming it and where it came from, as for the web', async () => {
      const key = path.join(tmp.dir, 'key.pem');
      writeFileSync(key, '-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n');
      const fromEnv = await runDump([address], { STORE_TLS_CA: key }, tmp.dir);
      assert.equal(fromEnv.code, 2, fromEnv.stderr);
      assert.equal(fromEnv.stderr, `dump: STORE_TLS_CA: not a usable TLS CA file ${key}: no certificate in the file\n`);
      const cut = path.join(tmp.dir, 'cut.pem');
      writeFileSync(cut, '-----BEGIN CERTIFICATE-----\nMIIB\n');
      const fromOption = await runDump([address, '--tls-ca', cut], {}, tmp.dir);
      assert.equal(fromOption.code, 2, fromOption.stderr);
      assert.match(fromOption.stderr, /^dump: --tls-ca: not a usable TLS CA file .*cut\.pem: /);
    });

    it('a STORE_TOKEN or --token gRPC metadata cannot carry (a line break, a non-ASCII character, a space) or under 16 characters is a usage error naming its source, never showing the value', async () => {
      const port = await deadPort();
      const rule = 'expected at least 16 printable ASCII characters without spaces';
      const bad = ['tok3n-in-env-0123456789\n', 'tok3n-in-env-01234567\u00e9', 'tok3n in env 0123456789', 'tok3n-short'];
      for (const token of bad) {
        const what = JSON.stringify(token);
        const fromEnv = await runDump([`127.0.0.1:${port}`], { STORE_TOKEN: token }, tmp.dir);
        assert.equal(fromEnv.code, 2, what);
        assert.equal(fromEnv.stderr, `dump: invalid configuration: STORE_TOKEN=(hidden): ${rule}\n`, what);
        const fromOption = await runDump([`127.0.0.1:${port}`, '--token', token], {}, tmp.dir);
        assert.equal(fromOption.code, 2, what);
        assert.equal(fromOption.stderr, `dump: --token=(hidden): ${rule}\n`, what);
        for (const run of [fromEnv, fromOption]) assert.ok(!`${run.stdout}${run.stderr}`.includes('tok3n'), `${what}: the value is not printed`);
      }
      // A valid --token does not excuse a bad STORE_TOKEN: the environment is checked as a whole, as the web does.
      const both = await runDump([`127.0.0.1:${port}`, '--token', 'good-token-0123456789'], { STORE_TOKEN: 'tok3n-short' }, tmp.dir);
      assert.equal(both.code, 2);
      assert.match(both.stderr, /^dump: invalid configuration: STORE_TOKEN=\(hidden\)/);
    });

    it('a .env it cannot read (a directory) is a usage error naming the file, exit 2', async () => {
      const dir = tempDir();
      try {
        mkdirSync(path.join(dir.dir, '.env'));
        const run = await runDump([address], {}, dir.dir);
        assert.equal(run.code, 2, run.stderr);
        assert.equal(run.stderr, `dump: invalid configuration: ${path.join(dir.dir, '.env')}: cannot read the file (EISDIR)\n`);
      } finally {
        dir.remove();
      }
    });

    it('a bad address names STORE_ADDRESS when it came from there, and not when it is the argument', async () => {
      const expected = 'not a store address: "bad::" (expected host:port, e.g. localhost:5100)';
      const fromEnv = await runDump([], { STORE_ADDRESS: 'bad::' }, tmp.dir);
      assert.equal(fromEnv.code, 2);
      assert.equal(fromEnv.stderr, `dump: STORE_ADDRESS: ${expected}\n`);
      const fromArgument = await runDump(['bad::'], { STORE_ADDRESS: address }, tmp.dir);
      assert.equal(fromArgument.code, 2);
      assert.equal(fromArgument.stderr, `dump: ${expected}\n`);
    });

    it('--help and --version answer also when the environment holds a bad value (which a dump would refuse)', async () => {
      for (const args of [['--help'], ['--version']]) {
        const run = await runDump(args, { STORE_TOKEN: 'short' }, tmp.dir);
        assert.equal(run.code, 0, run.stderr);
        assert.equal(run.stderr, '');
      }
      const dump = await runDump([address], { STORE_TOKEN: 'short' }, tmp.dir);
      assert.equal(dump.code, 2);
      assert.match(dump.stderr, /^dump: invalid configuration: STORE_TOKEN=\(hidden\)/);
    });

    it('--help documents the options and exit codes, exit 0; --version prints the version, exit 0', async () => {
      const help = await runDump(['--help'], { STORE_TOKEN: 'secret-token-in-env' }, tmp.dir);
      assert.equal(help.code, 0);
      assert.ok(!help.stdout.includes('secret-token-in-env'), '--help never shows the token');
      for (const option of ['--prefix', '--limit', '--keys-only', '--count', '--json', '--redact', '--watch', '--token', '--tls-ca', '--table']) {
        assert.ok(help.stdout.includes(option), `--help mentions ${option}`);
      }
      assert.match(help.stdout, /Exit codes:\n\s+0 .*\n\s+1 .*store.*\n\s+2 .*usage/);
      const version = await runDump(['--version'], {}, tmp.dir);
      assert.equal(version.code, 0);
      assert.equal(version.stdout.trim(), JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')).version);
    });
  });

  describe('against a store that requires a token', () => {
    let secured: Proc;
    let dir: ReturnType<typeof tempDir>;
    before(async () => {
      dir = tempDir();
      secured = await startStore(dir.dir, { STORE_TOKEN: 'test-token-12345' });
    });
    after(async () => {
      await secured?.stop();
      dir?.remove();
    });

    it('without a token: one line saying unauthenticated and how to fix it, exit 1', async () => {
      const run = await runDump([`127.0.0.1:${secured.port}`], {}, tmp.dir);
      assert.equal(run.code, 1);
      assert.equal(lines(run.stderr).length, 1, run.stderr);
      assert.match(run.stderr, /unauthenticated: .*--token/);
    });

    it('with --token, STORE_TOKEN in the environment or in .env: exit 0', async () => {
      const target = `127.0.0.1:${secured.port}`;
      assert.equal((await runDump([target, '--token', 'test-token-12345'], {}, tmp.dir)).code, 0);
      assert.equal((await runDump([target], { STORE_TOKEN: 'test-token-12345' }, tmp.dir)).code, 0);
      const withEnvFile = tempDir();
      try {
        writeFileSync(path.join(withEnvFile.dir, '.env'), 'STORE_TOKEN=test-token-12345\n');
        assert.equal((await runDump([target], {}, withEnvFile.dir)).code, 0);
      } finally {
        withEnvFile.remove();
      }
      const wrong = await runDump([target, '--token', 'wrong-token-0123456789'], {}, tmp.dir);
      assert.equal(wrong.code, 1);
    });
  });
});

describe('bin/dump against a store serving TLS (self-signed certificate made by the test)', function () {
  let dir: ReturnType<typeof tempDir>;
  let store: Proc;
  let pki: { cert: string; key: string };
  let stranger: { cert: string; key: string };
  let address: string;

  before(async () => {
    dir = tempDir();
    pki = await selfSigned(dir.dir, 'store');
    stranger = await selfSigned(dir.dir, 'stranger');
    store = await startStore(dir.dir, { STORE_TLS_CERT: pki.cert, STORE_TLS_KEY: pki.key });
    address = `localhost:${store.port}`;
    const client = createStoreClient({ address, deadlineMs: 3000, tlsCa: readFileSync(pki.cert) });
    await client.put('tls-1', Buffer.from('over TLS'), { ttlMs: 60_000 });
    client.close();
  });
  after(async () => {
    await store?.stop();
    dir?.remove();
  });

  it('--tls-ca, STORE_TLS_CA or https:// with the CA: lists the entries, exit 0', async () => {
    const runs = await Promise.all([
      runDump([address, '--tls-ca', pki.cert], {}, dir.dir),
      runDump([address], { STORE_TLS_CA: pki.cert }, dir.dir),
      runDump([`https://${address}`], { STORE_TLS_CA: pki.cert }, dir.dir),
    ]);
    for (const run of runs) {
      assert.equal(run.code, 0, run.stderr);
      assert.equal(run.stdout, 'tls-1 over TLS\n');
      assert.equal(run.stderr, '');
    }
  });

  it('https:// without a CA trusts the default roots (here GRPC_DEFAULT_SSL_ROOTS_FILE_PATH): exit 0; without the CA among them: exit 1', async () => {
    const [trusted, untrusted] = await Promise.all([
      runDump([`https://${address}`], { GRPC_DEFAULT_SSL_ROOTS_FILE_PATH: pki.cert }, dir.dir),
      runDump([`https://${address}`], {}, dir.dir),
    ]);
    assert.equal(trusted.code, 0, trusted.stderr);
    assert.equal(trusted.stdout, 'tls-1 over TLS\n');
    assert.equal(untrusted.code, 1);
    assert.equal(lines(untrusted.stderr).length, 1, untrusted.stderr);
    assert.match(untrusted.stderr, /TLS handshake failed: self-signed certificate \(the default roots do not trust it: pass --tls-ca <file>/);
  });

  it('a CA that did not sign the certificate, or no TLS at all: one line naming where the CA came from, exit 1', async () => {
    const [wrongCa, wrongEnvCa, plaintext] = await Promise.all([
      runDump([address, '--tls-ca', stranger.cert], {}, dir.dir),
      runDump([address], { STORE_TLS_CA: stranger.cert }, dir.dir),
      runDump([address], {}, dir.dir),
    ]);
    for (const run of [wrongCa, wrongEnvCa, plaintext]) {
      assert.equal(run.code, 1);
      assert.equal(lines(run.stderr).length, 1, run.stderr);
      assert.match(run.stderr, /^dump: cannot dump the store at localhost:\d+: /);
    }
    assert.match(wrongCa.stderr, /TLS handshake failed: self-signed certificate \(does --tls-ca name the CA/);
    assert.match(wrongEnvCa.stderr, /TLS handshake failed: self-signed certificate \(does STORE_TLS_CA name the CA/);
    assert.match(plaintext.stderr, /if the store uses TLS, pass --tls-ca/);
  });

  it('a certificate that does not name the host connected to: one line saying so, not a CA hint, exit 1', async () => {
    const localhostOnly = await selfSigned(dir.dir, 'localhost-only', ['localhost']);
    const data = path.join(dir.dir, 'localhost-only');
    mkdirSync(data);
    const named = await startStore(data, { STORE_TLS_CERT: localhostOnly.cert, STORE_TLS_KEY: localhostOnly.key });
    try {
      const [byName, byAddress] = await Promise.all([
        runDump([`localhost:${named.port}`, '--tls-ca', localhostOnly.cert, '--count'], {}, dir.dir),
        runDump([`127.0.0.1:${named.port}`, '--tls-ca', localhostOnly.cert], {}, dir.dir),
      ]);
      assert.equal(byName.code, 0, byName.stderr);
      assert.equal(byAddress.code, 1);
      assert.equal(
        byAddress.stderr,
        `dump: cannot dump the store at 127.0.0.1:${named.port}: TLS handshake failed: the store certificate does not name 127.0.0.1 (connect by a host name it lists, or add 127.0.0.1 to its subjectAltName)\n`,
      );
    } finally {
      await named.stop();
    }
  });
});

describe('bin/dump against a store on Redis (real redis-server)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let redis: RedisServer | undefined;
  let store: Proc | undefined;

  before(function () {
    requireRedis(this);
    tmp = tempDir();
  });
  after(async () => {
    await store?.stop();
    await redis?.stop();
    tmp?.remove();
  });

  it('Redis down: one line with the store\'s own answer, not "connection refused (is the store running...)", exit 1', async () => {
    redis = await startRedisServer();
    store = await startStore(tmp.dir, { STORE_BACKEND: 'redis', REDIS_URL: redis.url, REDIS_COMMAND_TIMEOUT_MS: '500' });
    const address = `127.0.0.1:${store.port}`;
    const up = await runDump([address], {}, tmp.dir);
    assert.equal(up.code, 0, up.stderr);
    // Killed, Redis refuses the store's reconnections: ECONNREFUSED is in the store's answer.
    await redis.stop('SIGKILL');
    for (const args of [[address], [address, '--watch']]) {
      const run = await runDump(args, {}, tmp.dir);
      assert.equal(run.code, 1, run.stderr);
      assert.equal(lines(run.stderr).length, 1, run.stderr);
      assert.match(run.stderr, new RegExp(`^dump: cannot dump the store at ${address.replace(/\./g, '\\.')}: the store is running but cannot serve: redis `), run.stderr);
      assert.doesNotMatch(run.stderr, /is the store running|TLS|--tls/);
    }
  });
});

describe('bin/dump against a store without ListPages (older stores)', () => {
  let dir: ReturnType<typeof tempDir>;
  let backend: SqliteBackend;
  let server: Server;
  let port: number;

  before(async () => {
    dir = tempDir();
    backend = new SqliteBackend({ dataDir: dir.dir, synchronous: 'NORMAL', sweepIntervalMs: 0, sweepBatch: 100, maxOpsPerCommit: 1000 });
    const ops = Array.from({ length: 1100 }, (_, i) => ({ kind: 'put' as const, key: `k-${String(i).padStart(4, '0')}`, value: Buffer.from(`v${i}`), ttlMs: 60_000 }));
    await backend.batch(ops);
    // Only List is implemented; grpc-js answers every other method with UNIMPLEMENTED.
    server = new Server();
    server.addService(SessionStoreService, {
      list: (call: ServerWritableStream<ListRequest, Entry>) => {
        void (async () => {
          for await (const entry of backend.list({ prefix: call.request.prefix, startAfter: '', limit: call.request.limit, keysOnly: call.request.keysOnly })) {
            call.write(entry);
          }
          call.end();
        })();
      },
    } as never);
    port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
  });
  after(async () => {
    server?.forceShutdown();
    await backend?.close();
    dir?.remove();
  });

  it('falls back to List and prints every entry', async () => {
    const run = await runDump([`127.0.0.1:${port}`], {}, dir.dir);
    assert.equal(run.code, 0, run.stderr);
    const out = lines(run.stdout);
    assert.equal(out.length, 1100);
    assert.equal(out[0], 'k-0000 v0');
    assert.equal(out[1099], 'k-1099 v1099');
  });
});

describe('EntryPage decoder of bin/dump', () => {
  it('reads what the generated encoder writes: unicode keys, empty values, 53-bit versions, negative times', () => {
    const entries: Entry[] = [
      { key: 'é-ключ-🔑', value: Buffer.alloc(0), version: 0, expiresAtMs: -5, createdAtMs: -1_795_628_592_013 },
      { key: '', value: Buffer.alloc(300, 7), version: 2 ** 53 - 1, expiresAtMs: 2 ** 32, createdAtMs: 2 ** 31 },
    ];
    for (let i = 0; i < 500; i++) {
      entries.push({
        key: `k${i}`,
        value: Buffer.alloc(i % 200, i),
        version: Math.floor(Math.random() * 2 ** 53),
        expiresAtMs: Math.floor((Math.random() - 0.5) * 2 ** 52),
        createdAtMs: Math.floor(Math.random() * 2 ** 42),
      });
    }
    const bytes = Buffer.from(EntryPage.encode({ entries }).finish());
    assert.deepEqual(decodeEntryPage(bytes), EntryPage.decode(bytes).entries);
  });

  it('skips unknown fields of the page and of an entry', () => {
    const entry = Buffer.from(EntryPage.encode({ entries: [{ key: 'a', value: Buffer.from('b'), version: 3, expiresAtMs: 4, createdAtMs: 5 }] }).finish());
    // Inside the entry: field 9 (varint) and field 10 (bytes); after it, page field 2 (varint).
    const inner = Buffer.concat([entry.subarray(2), Buffer.from([0x48, 0x01, 0x52, 0x02, 0x68, 0x69])]);
    const page = Buffer.concat([Buffer.from([0x0a, inner.length]), inner, Buffer.from([0x10, 0x05])]);
    assert.deepEqual(decodeEntryPage(page), [{ key: 'a', value: Buffer.from('b'), version: 3, expiresAtMs: 4, createdAtMs: 5 }]);
  });

  it('refuses a truncated page instead of inventing entries', () => {
    const bytes = Buffer.from(EntryPage.encode({ entries: [{ key: 'abc', value: Buffer.from('v'), version: 1, expiresAtMs: 2, createdAtMs: 3 }] }).finish());
    assert.throws(() => decodeEntryPage(bytes.subarray(0, bytes.length - 3)), /malformed EntryPage/);
  });
});
