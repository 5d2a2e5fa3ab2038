import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createPrivateKey } from 'node:crypto';
import { getEventListeners, setMaxListeners } from 'node:events';
import { readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import path from 'node:path';
import { Metadata, Server, ServerCredentials, type ServiceError, status } from '@grpc/grpc-js';
import pino from 'pino';
import { createRawClient } from '../services/client/store-client';
import type { BatchRequest, BatchResponse, Entry, SessionStoreClient, WatchEvent } from '../services/generated/kv';
import { loadStoreConfig } from '../services/store/config';
import { SqliteBackend } from '../services/store/backends/sqlite';
import { createStoreServer } from '../services/store/server';
import { SERVICE_NAME, StoreHealth } from '../services/store/health';
import { healthClient } from './helpers/raw-grpc';
import { NO_ENV_FILE, type Proc, root, startStore, tempDir } from './helpers/procs';
import { selfSigned } from './helpers/tls';

const exitOf = (proc: Proc) =>
  proc.child.exitCode !== null || proc.child.signalCode !== null
    ? Promise.resolve(proc.child.exitCode)
    : new Promise<number | null>((resolve) => proc.child.once('exit', (code) => resolve(code)));

const until = async (check: () => boolean, what: string, timeoutMs = 10_000) => {
  const end = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
};

const logged = (proc: Proc, msg: string) => proc.lines.some((line) => line.includes(`"msg":"${msg}`));

/** Fills the store with `count` entries of `size` bytes through Batch. */
async function fill(client: SessionStoreClient, count: number, size: number): Promise<void> {
  const value = Buffer.alloc(size, 'v');
  for (let i = 0; i < count; i += 500) {
    const request: BatchRequest = {
      id: i,
      ops: Array.from({ length: Math.min(500, count - i) }, (_, j) => ({
        op: { $case: 'put' as const, value: { key: `fill:${String(i + j).padStart(6, '0')}`, value, ttlMs: 600_000, expectedVersion: undefined } },
        timeoutMs: 0,
        requestId: '',
      })),
    };
    await new Promise<BatchResponse>((resolve, reject) => client.batch(request, (err, res) => (err ? reject(err) : resolve(res))));
  }
}

/** Starts the store's main.js with `env` and returns its exit code and stderr (it must not start). */
function runStore(env: Record<string, string>): { code: number | null; stderr: string } {
  const result = spawnSync(process.execPath, [path.join(root, 'dist/services/store/main.js')], {
    cwd: root,
    env: { PATH: process.env.PATH ?? '', STORE_METRICS_PORT: '0', PORT: '0', ...NO_ENV_FILE, ...env },
    encoding: 'utf8',
    timeout: 15_000,
  });
  return { code: result.status, stderr: result.stderr };
}

describe('store lifecycle: graceful stop, health, start-up checks (real store processes)', function () {
  this.timeout(30_000);
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc | undefined;
  const clients: Array<{ close(): void }> = [];

  beforeEach(() => {
    tmp = tempDir();
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    if (store) await store.stop('SIGKILL');
    store = undefined;
    tmp.remove();
  });

  const connect = async (env: Record<string, string> = {}) => {
    store = await startStore(tmp.dir, env);
    const address = `127.0.0.1:${store.port}`;
    const client = createRawClient({ address, deadlineMs: 10_000 });
    const health = healthClient(address);
    clients.push(client, health);
    return { client, health, proc: store };
  };

  it('health is SERVING for the server ("") and for sessions.kv.v1.SessionStore; an unknown service is NOT_FOUND', async () => {
    const { health } = await connect();
    const check = (service: string) =>
      new Promise<{ status?: string; code?: number }>((resolve) =>
        health.check({ service }, (err, res) => resolve(err ? { code: err.code } : { status: res.status })),
      );
    assert.deepEqual(await check(''), { status: 'SERVING' });
    assert.deepEqual(await check(SERVICE_NAME), { status: 'SERVING' });
    assert.deepEqual(await check('no.such.Service'), { code: status.NOT_FOUND });
  });

  it('health follows the backend: NOT_SERVING for "" and SessionStore once the database is unusable', async () => {
    const backend = new SqliteBackend({ dataDir: tmp.dir, synchronous: 'FULL', sweepIntervalMs: 0, sweepBatch: 200, maxOpsPerCommit: 2000 });
    const health = new StoreHealth(backend, 20);
    const server = new Server();
    health.addToServer(server);
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    const client = healthClient(`127.0.0.1:${port}`);
    const check = (service: string) =>
      new Promise<string>((resolve, reject) => client.check({ service }, (err, res) => (err ? reject(err) : resolve(res.status))));
    try {
      await health.start();
      assert.deepEqual([await check(''), await check(SERVICE_NAME)], ['SERVING', 'SERVING']);
      await backend.close();
      const end = Date.now() + 5000;
      while ((await check('')) === 'SERVING' && Date.now() < end) await new Promise((r) => setTimeout(r, 10));
      assert.deepEqual([await check(''), await check(SERVICE_NAME)], ['NOT_SERVING', 'NOT_SERVING']);
    } finally {
      health.stop();
      client.close();
      server.forceShutdown();
      await backend.close();
    }
  });

  it('health Watch calls naming other services get SERVICE_UNKNOWN and leave nothing behind once cancelled (no token is needed to make them)', async () => {
    const health = new StoreHealth({ ping: async () => undefined } as unknown as SqliteBackend, 20);
    const server = new Server();
    health.addToServer(server);
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    const client = healthClient(`127.0.0.1:${port}`);
    // grpc-health-check's own map of watchers by service name (private): it never drops a name.
    const names = () => (health.implementation as unknown as { watchers: Map<string, unknown> }).watchers.size;
    const watchOnce = (service: string) =>
      new Promise<string[]>((resolve) => {
        const statuses: string[] = [];
        const call = client.watch({ service });
        call.on('data', (res: { status: string }) => {
          statuses.push(res.status);
          call.cancel();
        });
        call.on('error', () => resolve(statuses));
      });
    try {
      await health.start();
      assert.deepEqual(await watchOnce(SERVICE_NAME), ['SERVING']);
      assert.deepEqual(await watchOnce(''), ['SERVING']);
      const known = names();
      for (let i = 0; i < 200; i += 1) assert.deepEqual(await watchOnce(`no.such.Service${i}.${'x'.repeat(1000)}`), ['SERVICE_UNKNOWN']);
      assert.equal(names(), known, 'no watcher set kept per service name asked for');
    } finally {
      health.stop();
      client.close();
      server.forceShutdown();
    }
  });

  it('SIGTERM during a List: health watchers see NOT_SERVING, the List in flight still delivers every entry, then exit 0', async () => {
    const { client, health, proc } = await connect({ STORE_GRACE_MS: '20000' });
    await fill(client, 3000, 1000);
    const statuses: string[] = [];
    const watch = health.watch({ service: SERVICE_NAME });
    watch.on('data', (m: { status: string }) => statuses.push(m.status));
    watch.on('error', () => undefined);
    await until(() => statuses.includes('SERVING'), 'SERVING');

    // Start a List and stop reading it: the store is now blocked on flow control, mid-call.
    const list = client.list({ prefix: 'fill:', limit: 0, startAfter: '', keysOnly: false });
    const keys: string[] = [];
    list.on('data', (e: Entry) => keys.push(e.key));
    const listStatus = new Promise<number>((resolve) => list.on('status', (s: { code: number }) => resolve(s.code)));
    list.on('error', () => undefined);
    await until(() => keys.length > 0, 'the first entry');
    list.pause();

    proc.child.kill('SIGTERM');
    await until(() => statuses.at(-1) === 'NOT_SERVING', 'NOT_SERVING on the health watch');
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(proc.child.exitCode, null, 'the store waits for the List in flight');

    list.resume();
    assert.equal(await listStatus, status.OK);
    assert.equal(keys.length, 3000, 'every entry arrived');
    assert.equal(await exitOf(proc), 0);
    assert.ok(logged(proc, 'stopping') && logged(proc, 'stopped'));
  });

  it('open Watch, Pipe and health Watch streams do not hold up a stop: exit 0 long before STORE_GRACE_MS', async () => {
    const { client, health, proc } = await connect({ STORE_GRACE_MS: '20000' });
    const watch = client.watch({ prefix: '' });
    const events: WatchEvent[] = [];
    watch.on('data', (e: WatchEvent) => events.push(e));
    watch.on('error', () => undefined);
    const watchStatus = new Promise<number>((resolve) => watch.on('status', (s: { code: number }) => resolve(s.code)));
    const pipe = client.pipe(new Metadata());
    const answers: BatchResponse[] = [];
    pipe.on('data', (r: BatchResponse) => answers.push(r));
    pipe.on('error', () => undefined);
    const healthWatch = health.watch({ service: '' });
    healthWatch.on('data', () => undefined);
    healthWatch.on('error', () => undefined);
    pipe.write({ id: 1, ops: [{ op: { $case: 'put', value: { key: 'p', value: Buffer.from('1'), ttlMs: 60_000, expectedVersion: undefined } }, timeoutMs: 0, requestId: '' }] });
    await until(() => answers.length === 1 && events.length === 1, 'the pipe answer and the watch event');

    const started = Date.now();
    proc.child.kill('SIGTERM');
    assert.equal(await exitOf(proc), 0);
    assert.ok(Date.now() - started < 5000, `stopped after ${Date.now() - started} ms`);
    assert.equal(await watchStatus, status.OK, 'the Watch stream was ended, not cut');
  });


  it('many Watch and Pipe streams open at once (a dozen webs, several bin/dump --watch) log no MaxListenersExceededWarning, and all still end at a stop', async () => {
    const { client, proc } = await connect();
    const statuses: Array<Promise<number>> = [];
    for (let i = 0; i < 15; i += 1) {
      const watch = client.watch({ prefix: '' });
      // The store sends a Watch's headers once it is subscribed.
      const subscribed = new Promise<void>((resolve) => watch.once('metadata', () => resolve()));
      watch.on('data', () => undefined);
      watch.on('error', () => undefined);
      statuses.push(new Promise((resolve) => watch.on('status', (s: { code: number }) => resolve(s.code))));
      await subscribed;
      const pipe = client.pipe(new Metadata());
      const answered = new Promise<void>((resolve) => pipe.once('data', () => resolve()));
      pipe.on('error', () => undefined);
      pipe.write({ id: 1, ops: [] });
      await answered;
    }
    proc.child.kill('SIGTERM');
    assert.equal(await exitOf(proc), 0);
    assert.deepEqual(await Promise.all(statuses), new Array(15).fill(status.OK));
    assert.deepEqual(proc.lines.filter((line) => line.includes('Warning')), []);
  });

  it('every Watch and Pipe stream stops listening for the stop when it ends, cancelled or ended by the client', async () => {
    const backend = new SqliteBackend({ dataDir: tmp.dir, synchronous: 'NORMAL', sweepIntervalMs: 0, sweepBatch: 200, maxOpsPerCommit: 2000 });
    const stopping = new AbortController();
    setMaxListeners(0, stopping.signal); // as main.ts does
    const server = createStoreServer({ backend, limits: loadStoreConfig({ STORE_DATA_DIR: tmp.dir }).limits, logger: pino({ level: 'silent' }), stopping: stopping.signal });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    const listening = () => getEventListeners(stopping.signal, 'abort').length;
    try {
      for (let round = 0; round < 2; round += 1) {
        const client = createRawClient({ address: `127.0.0.1:${port}`, deadlineMs: 10_000 });
        const streams: Array<{ cancel(): void; end?(): void }> = [];
        for (let i = 0; i < 10; i += 1) {
          const watch = client.watch({ prefix: '' });
          watch.on('data', () => undefined);
          watch.on('error', () => undefined);
          await new Promise((resolve) => watch.once('metadata', resolve));
          const pipe = client.pipe(new Metadata());
          pipe.on('error', () => undefined);
          const answered = new Promise((resolve) => pipe.once('data', resolve));
          pipe.write({ id: 1, ops: [] });
          await answered;
          streams.push(watch, pipe);
        }
        assert.equal(listening(), 20, 'one listener per open stream');
        // A Pipe the client ends is ended by the store in turn; a Watch only ever ends by a cancel.
        for (const stream of streams) (round === 1 && stream.end ? stream.end : stream.cancel).call(stream);
        await until(() => listening() === 0, 'every stream to remove its stop listener');
        client.close();
      }
    } finally {
      server.forceShutdown();
      await backend.close();
    }
  });
  it('a call still running when STORE_GRACE_MS runs out is cancelled, and the store still exits 0', async () => {
    const { client, proc } = await connect({ STORE_GRACE_MS: '300' });
    await fill(client, 2000, 4000); // 8 MB: more than any socket and HTTP/2 window hold
    const list = client.list({ prefix: '', limit: 0, startAfter: '', keysOnly: false });
    let first = false;
    list.on('data', () => {
      first = true;
      list.pause(); // never read again
    });
    list.on('error', () => undefined);
    await until(() => first, 'the first entry');
    const started = Date.now();
    proc.child.kill('SIGTERM');
    assert.equal(await exitOf(proc), 0);
    const took = Date.now() - started;
    assert.ok(took >= 250 && took < 5000, `stopped after ${took} ms`);
    assert.ok(logged(proc, 'grace period over'));
  });

  it('a second signal, a second or more after the first, stops at once with exit code 1', async () => {
    const { client, proc } = await connect({ STORE_GRACE_MS: '60000' });
    await fill(client, 2000, 4000); // 8 MB: more than any socket and HTTP/2 window hold
    const list = client.list({ prefix: '', limit: 0, startAfter: '', keysOnly: false });
    let first = false;
    list.on('data', () => {
      first = true;
      list.pause();
    });
    list.on('error', () => undefined);
    await until(() => first, 'the first entry');
    proc.child.kill('SIGTERM');
    await until(() => logged(proc, 'stopping'), 'the stopping log line');
    await new Promise((r) => setTimeout(r, 1100)); // sooner, it counts as the same request (see the next test)
    const started = Date.now();
    proc.child.kill('SIGINT');
    assert.equal(await exitOf(proc), 1, proc.lines.join('\n'));
    assert.ok(Date.now() - started < 5000);
  });

  it('two signals at once (a Ctrl-C under foreman reaches the store from the terminal and from foreman) are one graceful stop: exit 0', async () => {
    const { client, proc } = await connect({ STORE_GRACE_MS: '60000' });
    await fill(client, 2000, 4000);
    const list = client.list({ prefix: '', limit: 0, startAfter: '', keysOnly: false });
    let received = 0;
    list.on('data', () => {
      received += 1;
      if (received === 1) list.pause(); // a List in flight that the stop must let finish
    });
    list.on('error', () => undefined);
    await until(() => received > 0, 'the first entry');
    proc.child.kill('SIGINT');
    // The second one after the first was handled (two signals sent back to back may arrive as one).
    await until(() => logged(proc, 'stopping'), 'the stopping log line');
    proc.child.kill('SIGINT');
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(proc.child.exitCode, null, 'still finishing the List, not stopped at once');
    list.resume();
    assert.equal(await exitOf(proc), 0, proc.lines.join('\n'));
    assert.equal(received, 2000, 'the List in flight delivered every entry');
    assert.ok(!logged(proc, 'second signal'));
  });

  it('after a graceful stop the data is on disk: a new store on the same directory reads it', async () => {
    const { client, proc } = await connect();
    await fill(client, 100, 10);
    proc.child.kill('SIGTERM');
    assert.equal(await exitOf(proc), 0);
    const again = await connect();
    const value = await new Promise<Entry | undefined>((resolve, reject) =>
      again.client.get({ key: 'fill:000099', refreshTtlMs: 0 }, (err: ServiceError | null, res) => (err ? reject(err) : resolve(res.entry))),
    );
    assert.equal(value?.value.length, 10);
  });

  it('logs the rebuild of the index at start, before the port opens: the log rows read, the keys and how long it took', async () => {
    const backend = new SqliteBackend({ dataDir: tmp.dir, synchronous: 'NORMAL', sweepIntervalMs: 0, sweepBatch: 100, maxOpsPerCommit: 1000 });
    const put = (key: string) => ({ kind: 'put' as const, key, value: Buffer.from(key), ttlMs: 600_000 });
    await backend.batch([put('a'), put('b'), put('c')]);
    await backend.batch([put('a'), { kind: 'delete', key: 'b' }]);
    await backend.close();
    const { proc } = await connect();
    const lines = proc.lines.map((line) => JSON.parse(line) as { msg: string; dataDir?: string; logRows?: number; keys?: number; tookMs?: number });
    const rebuilt = lines.findIndex((line) => line.msg === 'index rebuilt from the log');
    assert.ok(rebuilt >= 0 && rebuilt < lines.findIndex((line) => line.msg === 'listening'), proc.lines.join('\n'));
    const { dataDir, logRows, keys, tookMs } = lines[rebuilt];
    assert.deepEqual({ dataDir, logRows, keys }, { dataDir: tmp.dir, logRows: 5, keys: 2 });
    assert.ok(Number.isInteger(tookMs) && tookMs! >= 0, `tookMs ${tookMs}`);
  });

  it('a second store on the same directory is refused at start, saying so; once the first is gone (even killed with SIGKILL) a new one starts', async () => {
    const { client, proc } = await connect();
    await fill(client, 10, 10);
    const second = runStore({ STORE_DATA_DIR: tmp.dir });
    assert.equal(second.code, 1);
    assert.match(second.stderr, /^store: cannot start: the data directory .* is in use by another store process \(it holds .*sessions\.lock\): run each store on a directory of its own$/m);
    // In one process too: a second backend on the directory is refused.
    assert.throws(() => new SqliteBackend({ dataDir: tmp.dir, synchronous: 'NORMAL', sweepIntervalMs: 0, sweepBatch: 1, maxOpsPerCommit: 1 }), /is in use by another store process/);
    proc.child.kill('SIGKILL');
    await exitOf(proc);
    const again = await connect();
    const value = await new Promise<Entry | undefined>((resolve, reject) =>
      again.client.get({ key: 'fill:000009', refreshTtlMs: 0 }, (err: ServiceError | null, res) => (err ? reject(err) : resolve(res.entry))),
    );
    assert.equal(value?.value.length, 10);
  });

  it('listens on an IPv6 loopback STORE_HOST, written ::1 or [::1]: health and metrics answer there', async function () {
    const probe = createServer();
    const ipv6 = await new Promise<boolean>((resolve) => probe.once('error', () => resolve(false)).listen(0, '::1', () => probe.close(() => resolve(true))));
    if (!ipv6) this.skip(); // a machine without IPv6 loopback
    for (const host of ['::1', '[::1]']) {
      const proc = await startStore(tmp.dir, { STORE_HOST: host });
      try {
        const health = healthClient(`[::1]:${proc.port}`);
        clients.push(health);
        const status = await new Promise<string>((resolve, reject) => health.check({ service: '' }, (err, res) => (err ? reject(err) : resolve(res.status))));
        assert.equal(status, 'SERVING', host);
        const { port } = JSON.parse(proc.lines.find((line) => line.includes('"msg":"metrics listening"'))!) as { port: number };
        assert.equal((await fetch(`http://[::1]:${port}/metrics`)).status, 200, host);
      } finally {
        await proc.stop();
      }
    }
  });

  describe('bad configuration stops the store with a message naming the variable (exit code != 0)', () => {
    const cases: Array<[string, Record<string, string>, RegExp]> = [
      ['PORT=abc', { PORT: 'abc' }, /PORT="abc": expected a TCP port number/],
      // Number(' ') is 0: these would have meant "any free port" and "never sweep".
      ['a PORT of blanks', { PORT: ' ' }, /PORT=" ": expected a TCP port number 0-65535/],
      ['a STORE_SWEEP_INTERVAL_MS of blanks', { STORE_SWEEP_INTERVAL_MS: '  ' }, /STORE_SWEEP_INTERVAL_MS="  ": expected an integer 0-3600000 ms/],
      ['STORE_GRACE_MS in exponent form', { STORE_GRACE_MS: '5e3' }, /STORE_GRACE_MS="5e3": expected an integer 0-600000 ms/],
      ['a STORE_MAX_TTL_MS of 20 digits, said once', { STORE_MAX_TTL_MS: '9'.repeat(20) }, /^store: invalid configuration: STORE_MAX_TTL_MS="9{20}": expected an integer 1-31536000000 ms\n$/],
      ['a STORE_DEFAULT_TTL_MS above STORE_MAX_TTL_MS', { STORE_DEFAULT_TTL_MS: '3600000', STORE_MAX_TTL_MS: '600000' }, /STORE_DEFAULT_TTL_MS=3600000 is above STORE_MAX_TTL_MS=600000/],
      ['STORE_SYNCHRONOUS=maybe', { STORE_SYNCHRONOUS: 'maybe' }, /STORE_SYNCHRONOUS="maybe": expected one of FULL, NORMAL/],
      ['STORE_METRICS_PORT=99999', { STORE_METRICS_PORT: '99999' }, /STORE_METRICS_PORT="99999"/],
      ['STORE_METRICS_PORT the same as PORT', { PORT: '5377', STORE_METRICS_PORT: '5377' }, /STORE_METRICS_PORT=5377 is PORT too/],
      ['STORE_MAX_ENTRIES past what one index holds', { STORE_MAX_ENTRIES: '20000000' }, /STORE_MAX_ENTRIES="20000000": expected an integer 1-16000000 keys/],
      ['STORE_MAX_MESSAGE_BYTES below one value', { STORE_MAX_MESSAGE_BYTES: '65536' }, /STORE_MAX_MESSAGE_BYTES=65536 must leave room for one entry/],
      ['STORE_TLS_RELOAD_MS of a few ms (seconds meant)', { STORE_TLS_RELOAD_MS: '60' }, /STORE_TLS_RELOAD_MS="60": expected 0 \(never\) or at least 100 ms/],
      ['STORE_TLS_CERT without STORE_TLS_KEY', { STORE_TLS_CERT: '/etc/hostname' }, /STORE_TLS_CERT and STORE_TLS_KEY must be set together/],
      ['STORE_TLS_CERT naming a missing file', { STORE_TLS_CERT: '/no/such/cert.pem', STORE_TLS_KEY: '/no/such/key.pem' }, /STORE_TLS_CERT="\/no\/such\/cert.pem": cannot read the file \(ENOENT\)/],
      ['STORE_TOKEN too short', { STORE_TOKEN: 'secret' }, /STORE_TOKEN=\(hidden\): expected at least 16 printable ASCII characters/],
      ['REDIS_SENTINEL_USERNAME without its password', { REDIS_SENTINEL_USERNAME: 'watcher' }, /REDIS_SENTINEL_USERNAME is set but REDIS_SENTINEL_PASSWORD is not/],
      ['REDIS_SENTINEL_TLS=maybe', { REDIS_SENTINEL_TLS: 'maybe' }, /REDIS_SENTINEL_TLS="maybe": expected true or false/],
      // Under a regular file: refused even to root, which may create a directory anywhere else.
      [
        'a STORE_DATA_DIR that cannot be created',
        { STORE_DATA_DIR: path.join(root, 'package.json', 'sub') },
        /^store: invalid configuration: STORE_DATA_DIR=".*package\.json\/sub": cannot create the directory: ENOTDIR/,
      ],
      // Settings whose names contain KEY but hold no secret: their values are shown like any other.
      ['REDIS_KEY_PREFIX with a hash tag (shown)', { REDIS_KEY_PREFIX: '{s}:' }, /REDIS_KEY_PREFIX="\{s\}:": expected no \{ or \}/],
      ['STORE_MAX_KEY_BYTES=0 (shown)', { STORE_MAX_KEY_BYTES: '0' }, /STORE_MAX_KEY_BYTES="0": expected an integer 1-4096 bytes/],
      ['DOTENV_CONFIG_PATH naming a missing file', { DOTENV_CONFIG_PATH: '/no/such/sessions.env' }, /^store: invalid configuration: DOTENV_CONFIG_PATH=\/no\/such\/sessions.env: no such file/],
      ['DOTENV_CONFIG_PATH naming a directory', { DOTENV_CONFIG_PATH: '/tmp' }, /^store: invalid configuration: DOTENV_CONFIG_PATH=\/tmp: cannot read the file \(EISDIR\)\n$/],
    ];
    for (const [name, env, message] of cases) {
      it(name, () => {
        const { code, stderr } = runStore({ STORE_DATA_DIR: tmp.dir, ...env });
        assert.notEqual(code, 0);
        assert.match(stderr, message);
        assert.doesNotMatch(stderr, /\n\s+at /, 'one clear line, no stack trace');
      });
    }
  });

  it('DOTENV_CONFIG_PATH names the file read in place of .env in the working directory', () => {
    const file = path.join(tmp.dir, 'other.env');
    writeFileSync(file, 'STORE_MAX_KEY_BYTES=0\n');
    const { code, stderr } = runStore({ STORE_DATA_DIR: tmp.dir, DOTENV_CONFIG_PATH: file });
    assert.notEqual(code, 0);
    assert.match(stderr, /STORE_MAX_KEY_BYTES="0": expected an integer 1-4096 bytes/);
  });

  it('a PEM pasted into STORE_TLS_KEY instead of a path stops the store without printing it', () => {
    const cert = path.join(tmp.dir, 'cert.pem');
    writeFileSync(cert, '-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n');
    const { code, stderr } = runStore({ STORE_DATA_DIR: tmp.dir, STORE_TLS_CERT: cert, STORE_TLS_KEY: '-----BEGIN PRIVATE KEY-----\nMIIEvQsecret\n-----END PRIVATE KEY-----' });
    assert.equal(code, 1);
    assert.equal(stderr, 'store: invalid configuration: STORE_TLS_KEY: expected the path of a PEM file, not its contents\n');
  });

  it('a key of another certificate stops the store at start, naming both variables (not PORT, as a listen failure would)', async () => {
    const one = await selfSigned(tmp.dir, 'one');
    const two = await selfSigned(tmp.dir, 'two');
    const { code, stderr } = runStore({ STORE_DATA_DIR: tmp.dir, STORE_TLS_CERT: one.cert, STORE_TLS_KEY: two.key });
    assert.equal(code, 1);
    assert.match(stderr, /^store: invalid configuration: STORE_TLS_CERT and STORE_TLS_KEY are not a usable certificate and key: .*key values mismatch\n$/);
  });

  it('swapped STORE_TLS_CERT and STORE_TLS_KEY, or one file in both, stop the store saying which holds what, not an OpenSSL code', async () => {
    const { cert, key } = await selfSigned(tmp.dir, 'swap');
    const prefix = 'store: invalid configuration: STORE_TLS_CERT and STORE_TLS_KEY are not a usable certificate and key: ';
    const swapped = runStore({ STORE_DATA_DIR: tmp.dir, STORE_TLS_CERT: key, STORE_TLS_KEY: cert });
    assert.equal(swapped.code, 1);
    assert.equal(swapped.stderr, `${prefix}STORE_TLS_CERT holds no certificate, but a private key (are the two files swapped?)\n`);
    const certTwice = runStore({ STORE_DATA_DIR: tmp.dir, STORE_TLS_CERT: cert, STORE_TLS_KEY: cert });
    assert.equal(certTwice.code, 1);
    assert.equal(certTwice.stderr, `${prefix}STORE_TLS_KEY holds no private key, but a certificate (are the two files swapped?)\n`);
  });

  it('an encrypted STORE_TLS_KEY (PKCS#8 or traditional PEM) stops the store saying so, not an OpenSSL code', async () => {
    const { cert, key } = await selfSigned(tmp.dir, 'locked');
    const plain = createPrivateKey(readFileSync(key));
    const prefix = 'store: invalid configuration: STORE_TLS_CERT and STORE_TLS_KEY are not a usable certificate and key: ';
    const encrypted = {
      pkcs8: plain.export({ type: 'pkcs8', format: 'pem', cipher: 'aes-256-cbc', passphrase: 'secret' }),
      sec1: plain.export({ type: 'sec1', format: 'pem', cipher: 'aes-128-cbc', passphrase: 'secret' }),
    };
    for (const [name, pem] of Object.entries(encrypted)) {
      const locked = path.join(tmp.dir, `locked-${name}.pem`);
      writeFileSync(locked, pem, { mode: 0o600 });
      const { code, stderr } = runStore({ STORE_DATA_DIR: tmp.dir, STORE_TLS_CERT: cert, STORE_TLS_KEY: locked });
      assert.equal(code, 1, name);
      assert.equal(stderr, `${prefix}STORE_TLS_KEY holds an encrypted private key, and the store takes no passphrase: give it the key unencrypted (openssl pkey -in <key> -out <new key>)\n`, name);
    }
  });

  it('a taken PORT stops the store with one line naming PORT (and no log line of grpc-js besides it)', async () => {
    const taken = createServer();
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
    const { port } = taken.address() as { port: number };
    try {
      const { code, stderr } = runStore({ STORE_DATA_DIR: tmp.dir, PORT: String(port) });
      assert.equal(code, 1);
      assert.equal(stderr, `store: cannot start: cannot listen on 127.0.0.1:${port} (PORT): listen EADDRINUSE: address already in use 127.0.0.1:${port}\n`);
    } finally {
      taken.close();
    }
  });

  it('refuses to start on a non-loopback STORE_HOST without STORE_TOKEN, saying why', () => {
    const { code, stderr } = runStore({ STORE_DATA_DIR: tmp.dir, STORE_HOST: '0.0.0.0' });
    assert.equal(code, 1);
    assert.match(stderr, /STORE_HOST="0.0.0.0" is reachable from other machines but STORE_TOKEN is not set/);
    assert.match(stderr, /Set STORE_TOKEN/);
  });

  it('STORE_MAX_TTL_MS set alone below the default TTL lowers the default TTL to it', () => {
    assert.equal(loadStoreConfig({ STORE_DATA_DIR: tmp.dir, STORE_MAX_TTL_MS: '600000' }).limits.defaultTtlMs, 600_000);
    assert.equal(loadStoreConfig({ STORE_DATA_DIR: tmp.dir, STORE_DEFAULT_TTL_MS: '60000', STORE_MAX_TTL_MS: '600000' }).limits.defaultTtlMs, 60_000);
  });

  it('loopback hosts need no token; any other host is accepted once a token is set (configuration only, nothing is bound)', () => {
    for (const host of ['127.0.0.1', '127.1.2.3', 'localhost', '::1', '[::1]']) {
      assert.equal(loadStoreConfig({ STORE_HOST: host, STORE_DATA_DIR: tmp.dir }).host, host);
    }
    for (const host of ['0.0.0.0', '::', '10.0.0.5', 'store.internal']) {
      assert.throws(() => loadStoreConfig({ STORE_HOST: host, STORE_DATA_DIR: tmp.dir }), /STORE_TOKEN is not set/);
      assert.equal(loadStoreConfig({ STORE_HOST: host, STORE_TOKEN: 't'.repeat(32), STORE_DATA_DIR: tmp.dir }).host, host);
    }
  });
});
