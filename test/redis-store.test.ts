import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { Metadata, type ServiceError, status } from '@grpc/grpc-js';
import { createPipeClient } from '../services/client/pipe-client';
import { createRawClient, createStoreClient, type StoreClient, type StoreClientError } from '../services/client/store-client';
import type { WatchEvent } from '../services/generated/kv';
import { checkHealth, waitForHealth } from './helpers/health';
import { parsePrometheus } from './helpers/prometheus';
import { NO_ENV_FILE, type Proc, root, startStore, tempDir, waitForLine } from './helpers/procs';
import { freePort, type RedisServer, redisCommand, requireRedis, startRedisServer } from './helpers/redis';

const isUnavailable = (err: StoreClientError) => err.code === status.UNAVAILABLE;

describe('SessionStore on Redis (real store process, real redis-server): outage, recovery and settings', function () {
  let tmp: ReturnType<typeof tempDir>;
  let redis: RedisServer | undefined;
  let store: Proc | undefined;
  let client: StoreClient | undefined;

  before(function () {
    requireRedis(this);
    tmp = tempDir();
  });
  afterEach(async () => {
    client?.close();
    await store?.stop();
    await redis?.stop();
    client = undefined;
    store = undefined;
    redis = undefined;
  });
  after(() => tmp?.remove());

  const storeEnv = (url: string) => ({ STORE_BACKEND: 'redis', REDIS_URL: url, REDIS_COMMAND_TIMEOUT_MS: '500' });

  it('Redis stopped: Get, Put and List answer UNAVAILABLE (never INTERNAL) within the timeout and health goes NOT_SERVING; Redis back: SERVING and calls work', async () => {
    redis = await startRedisServer();
    store = await startStore(tmp.dir, storeEnv(redis.url));
    client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    await client.put('before', Buffer.from('x'), { ttlMs: 60_000 });
    assert.equal(await checkHealth(store.port), 'SERVING');

    await redis.stop('SIGKILL');
    const started = Date.now();
    await assert.rejects(client.get('before'), isUnavailable);
    await assert.rejects(client.put('during', Buffer.from('x'), { ttlMs: 60_000 }), isUnavailable);
    await assert.rejects(
      (async () => {
        for await (const entry of client!.list()) void entry;
      })(),
      isUnavailable,
    );
    assert.ok(Date.now() - started < 2000, `answered in ${Date.now() - started} ms`);
    await waitForHealth(store.port, 'NOT_SERVING', 5000);

    await redis.start();
    await waitForHealth(store.port, 'SERVING', 10_000);
    const written = await client.put('after', Buffer.from('y'), { ttlMs: 60_000 });
    assert.equal((await client.get('after'))?.version, written.version);
  });

  it('Redis hanging (SIGSTOP): calls answer UNAVAILABLE after REDIS_COMMAND_TIMEOUT_MS instead of waiting, health goes NOT_SERVING; thawed: SERVING', async () => {
    redis = await startRedisServer();
    store = await startStore(tmp.dir, storeEnv(redis.url));
    client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    await client.put('k', Buffer.from('x'), { ttlMs: 60_000 });

    redis.pause();
    const started = Date.now();
    await assert.rejects(client.get('k'), isUnavailable);
    const elapsed = Date.now() - started;
    assert.ok(elapsed >= 400 && elapsed < 2500, `answered in ${elapsed} ms`);
    await waitForHealth(store.port, 'NOT_SERVING', 5000);

    redis.resume();
    await waitForHealth(store.port, 'SERVING', 10_000);
    assert.equal((await client.get('k'))?.value.toString(), 'x');
  });

  it('a write that reached a frozen Redis and got no reply says its outcome is unknown (unary and pipe); one refused before it was sent does not', async () => {
    redis = await startRedisServer();
    store = await startStore(tmp.dir, storeEnv(redis.url));
    client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    const pipe = createPipeClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    try {
      await Promise.all([client.put('k', Buffer.from('x'), { ttlMs: 60_000 }), pipe.put('p', Buffer.from('x'), { ttlMs: 60_000 })]);
      redis.pause();
      const failure = (call: Promise<unknown>) =>
        call.then(
          () => assert.fail('the call succeeded'),
          (err: StoreClientError) => err,
        );
      // Sent on the connection to the frozen Redis: the store cannot know whether Redis ran them.
      const [unary, piped] = await Promise.all([
        failure(client.put('k', Buffer.from('y'), { ttlMs: 60_000 })),
        failure(pipe.put('p', Buffer.from('y'), { ttlMs: 60_000 })),
      ]);
      for (const err of [unary, piped]) {
        assert.equal(err.code, status.UNAVAILABLE, err.message);
        assert.equal(err.outcomeUnknown, true, err.message);
        assert.equal(err.call, 'put');
      }
      // The store has given up that connection: a later write is refused unsent.
      const later = await failure(client.put('k', Buffer.from('z'), { ttlMs: 60_000 }));
      assert.equal(later.code, status.UNAVAILABLE, later.message);
      assert.equal(later.outcomeUnknown, false, later.message);
      await waitForHealth(store.port, 'NOT_SERVING', 5000);
      redis.resume();
      await waitForHealth(store.port, 'SERVING', 10_000);
      // Redis ran the two writes when it thawed (their connection was gone, not their commands).
      assert.equal((await client.get('k'))?.value.toString(), 'y');
    } finally {
      pipe.close();
    }
  });

  it('a call the client gave up on while Redis was frozen (Put, Get, List, Watch) is logged and counted as DEADLINE_EXCEEDED or CANCELLED, not OK; the write it carried is still applied', async () => {
    redis = await startRedisServer();
    // Redis answers once it thaws, long before the store would give up on it.
    store = await startStore(tmp.dir, { ...storeEnv(redis.url), REDIS_COMMAND_TIMEOUT_MS: '10000', LOG_LEVEL: 'debug' });
    client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    const hasty = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 300 });
    const raw = createRawClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 10_000 });
    try {
      await client.put('warm', Buffer.from('x'), { ttlMs: 60_000 });
      redis.pause();
      await assert.rejects(hasty.put('late', Buffer.from('x'), { ttlMs: 60_000, requestId: 'req-late' }), (err: StoreClientError) => err.code === status.DEADLINE_EXCEEDED && err.outcomeUnknown);
      const metadata = new Metadata();
      metadata.set('x-request-id', 'req-gone');
      const gone = await new Promise<ServiceError | null>((resolve) => {
        const call = raw.get({ key: 'late', refreshTtlMs: 0 }, metadata, { deadline: Date.now() + 10_000 }, (err) => resolve(err));
        setTimeout(() => call.cancel(), 100);
      });
      assert.equal(gone?.code, status.CANCELLED);
      metadata.set('x-request-id', 'req-list');
      const list = raw.list({ prefix: '', limit: 0, startAfter: '', keysOnly: false }, metadata, { deadline: Date.now() + 300 });
      const listed = await new Promise<ServiceError>((resolve) => list.on('error', resolve));
      assert.equal(listed.code, status.DEADLINE_EXCEEDED);
      metadata.set('x-request-id', 'req-watch');
      const watch = raw.watch({ prefix: '' }, metadata, { deadline: Date.now() + 300 });
      watch.on('data', () => undefined);
      assert.equal((await new Promise<ServiceError>((resolve) => watch.on('error', resolve))).code, status.DEADLINE_EXCEEDED);
      // The List's end and Redis' answer reach the store on different connections: the end first.
      await new Promise((r) => setTimeout(r, 200));
      redis.resume();
      const rpc = async (requestId: string) =>
        JSON.parse(await waitForLine(store!, (l) => l.includes('"msg":"rpc"') && l.includes(`"requestId":"${requestId}"`))) as Record<string, unknown>;
      assert.deepEqual(
        [(await rpc('req-late')).code, (await rpc('req-gone')).code, (await rpc('req-list')).code, (await rpc('req-watch')).code],
        ['DEADLINE_EXCEEDED', 'CANCELLED', 'DEADLINE_EXCEEDED', 'DEADLINE_EXCEEDED'],
      );
      const line = store.lines.map((l) => JSON.parse(l) as { msg: string; port: number }).find((l) => l.msg === 'metrics listening');
      const samples = parsePrometheus(await (await fetch(`http://127.0.0.1:${line!.port}/metrics`)).text());
      assert.equal(samples.get('store_rpc_handled_total{method="Put",code="DEADLINE_EXCEEDED"}'), 1);
      assert.equal(samples.get('store_rpc_handled_total{method="Get",code="CANCELLED"}'), 1);
      assert.equal(samples.get('store_rpc_handled_total{method="Put",code="OK"}'), 1, 'only the put before the freeze');
      assert.equal(samples.get('store_rpc_handled_total{method="Get",code="OK"}'), undefined);
      // Redis ran the write when it thawed, as its caller was told it might (outcomeUnknown).
      assert.equal((await client.get('late'))?.value.toString(), 'x');
    } finally {
      hasty.close();
      raw.close();
    }
  });

  it('a Pipe batch whose stream the client cancelled before the answer (Redis frozen) is logged and counted as CANCELLED, not OK; its write is still applied', async () => {
    redis = await startRedisServer();
    store = await startStore(tmp.dir, { ...storeEnv(redis.url), REDIS_COMMAND_TIMEOUT_MS: '10000', LOG_LEVEL: 'debug' });
    client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    const raw = createRawClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    try {
      const pipe = raw.pipe(new Metadata());
      const failed = new Promise<ServiceError>((resolve) => pipe.on('error', resolve));
      redis.pause();
      pipe.write({ id: 1, ops: [{ op: { $case: 'put', value: { key: 'cancelled', value: Buffer.from('x'), ttlMs: 60_000, expectedVersion: undefined } }, timeoutMs: 0, requestId: 'req-cancelled' }] });
      // The batch reaches the store and waits on Redis; then the client goes (as a web process that dies).
      setTimeout(() => pipe.cancel(), 200);
      assert.equal((await failed).code, status.CANCELLED);
      // The cancel and Redis' answer reach the store on different connections: the cancel first.
      await new Promise((r) => setTimeout(r, 200));
      redis.resume();
      const line = JSON.parse(await waitForLine(store, (l) => l.includes('"requestId":"req-cancelled"'))) as Record<string, unknown>;
      assert.equal(line.code, 'CANCELLED');
      const metrics = store.lines.map((l) => JSON.parse(l) as { msg: string; port: number }).find((l) => l.msg === 'metrics listening');
      const samples = parsePrometheus(await (await fetch(`http://127.0.0.1:${metrics!.port}/metrics`)).text());
      assert.equal(samples.get('store_rpc_handled_total{method="Pipe",code="CANCELLED"}'), 1);
      assert.equal(samples.get('store_rpc_handled_total{method="Pipe",code="OK"}'), undefined);
      assert.equal((await client.get('cancelled'))?.value.toString(), 'x');
    } finally {
      raw.close();
    }
  });

  it('the store losing its change feed while Redis stays up (CLIENT KILL TYPE pubsub) ends Watch with UNAVAILABLE, and bin/dump --watch with exit 1', async () => {
    redis = await startRedisServer();
    store = await startStore(tmp.dir, storeEnv(redis.url));
    client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    const raw = createRawClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    const dump = spawn(path.join(root, 'bin', 'dump'), [`127.0.0.1:${store.port}`, '--watch', '--table'], {
      env: { PATH: process.env.PATH ?? '', ...NO_ENV_FILE },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let dumpOut = '';
    let dumpErr = '';
    dump.stdout!.on('data', (d: Buffer) => (dumpOut += d.toString()));
    dump.stderr!.on('data', (d: Buffer) => (dumpErr += d.toString()));
    const dumpExit = new Promise<number | null>((resolve) => dump.once('exit', (code) => resolve(code)));
    try {
      const watch = raw.watch({ prefix: '' });
      const events: string[] = [];
      watch.on('data', (e: WatchEvent) => events.push(e.key));
      watch.on('error', () => undefined);
      const watchStatus = new Promise<number>((resolve) => watch.on('status', (s: { code: number }) => resolve(s.code)));
      const deadline = Date.now() + 5000;
      while (!(events.includes('before') && /put +before/.test(dumpOut))) {
        assert.ok(Date.now() < deadline, `the first put was not seen: ${events} / ${dumpOut}`);
        await client.put('before', Buffer.from('x'), { ttlMs: 60_000 });
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.notEqual(await redisCommand(redis.port, 'CLIENT', 'KILL', 'TYPE', 'pubsub'), '0');
      await client.put('during', Buffer.from('x'), { ttlMs: 60_000 });
      assert.equal(await watchStatus, status.UNAVAILABLE);
      assert.equal(await dumpExit, 1);
      assert.match(dumpErr.trim(), /^dump: cannot dump the store at [^\n]*: the change feed broke: [^\n]*changes may have been missed[^\n]*; run it again$/);
      assert.equal(dumpErr.match(/may have been missed/g)?.length, 1, dumpErr);
      raw.close();
    } finally {
      if (dump.exitCode === null) dump.kill('SIGKILL');
    }
  });

  for (const [name, env, variable] of [
    ['REDIS_CLUSTER_NODES not host:port', { REDIS_CLUSTER_NODES: '127.0.0.1' }, /REDIS_CLUSTER_NODES="127.0.0.1": expected host:port/],
    ['cluster and Sentinel together', { REDIS_CLUSTER_NODES: '127.0.0.1:7001', REDIS_SENTINELS: '127.0.0.1:26379' }, /REDIS_CLUSTER_NODES and REDIS_SENTINELS/],
    ['a hash tag in REDIS_KEY_PREFIX', { REDIS_KEY_PREFIX: '{s}:' }, /REDIS_KEY_PREFIX=.*expected no \{ or \}/],
    ['REDIS_URL not redis://, its value (maybe a password) not shown', { REDIS_URL: 'http://user:s3cret@host' }, /^(?!.*s3cret).*REDIS_URL=\(hidden\): expected redis:\/\//s],
    ['REDIS_URL with a database that is no number (SELECT NaN crashed the store)', { REDIS_URL: 'redis://user:s3cret@127.0.0.1:1/abc' }, /^(?!.*s3cret).*REDIS_URL=\(hidden\): expected .*db a database number/s],
    ['REDIS_URL with a fractional database (a failed SELECT left the store on database 0)', { REDIS_URL: 'redis://127.0.0.1:1/1.5' }, /REDIS_URL=\(hidden\): expected .*db a database number/],
    ['REDIS_URL with a port above 65535', { REDIS_URL: 'redis://127.0.0.1:99999' }, /REDIS_URL=\(hidden\): expected .*port 1-65535/],
    ['REDIS_URL with port 0', { REDIS_URL: 'redis://127.0.0.1:0' }, /REDIS_URL=\(hidden\): expected .*port 1-65535/],
    ['REDIS_URL with a query the backend would ignore (?db=2 kept the data in database 0)', { REDIS_URL: 'redis://127.0.0.1:1?db=2' }, /REDIS_URL=\(hidden\): expected .*nothing after it/],
    ['REDIS_SENTINELS with a port above 65535', { REDIS_SENTINELS: '127.0.0.1:99999' }, /REDIS_SENTINELS="127.0.0.1:99999": expected .*ports 1-65535/],
    ['STORE_BACKEND unknown', { STORE_BACKEND: 'memcached' }, /STORE_BACKEND="memcached": expected one of sqlite, redis/],
    ['an empty REDIS_KEY_PREFIX (it would match every key)', { REDIS_KEY_PREFIX: '' }, /REDIS_KEY_PREFIX="": expected a non-empty prefix/],
  ] as const) {
    it(`a bad setting stops the store with a message naming the variable: ${name}`, async () => {
      await assert.rejects(startStore(tmp.dir, { STORE_BACKEND: 'redis', ...env }), (err: Error) => variable.test(err.message));
    });
  }

  it('REDIS_URL naming a database Redis does not have: calls answer UNAVAILABLE naming it and health is NOT_SERVING, instead of serving from database 0', async () => {
    redis = await startRedisServer(); // 16 databases
    store = await startStore(tmp.dir, storeEnv(`${redis.url}/99`));
    client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    await assert.rejects(client.put('k', Buffer.from('v'), { ttlMs: 60_000 }), (err: StoreClientError) => isUnavailable(err) && /database REDIS_URL names/.test(err.message));
    assert.equal(await checkHealth(store.port), 'NOT_SERVING');
    assert.equal(await redisCommand(redis.port, 'DBSIZE'), '0');
  });

  it('a store started while Redis is down answers UNAVAILABLE and is NOT_SERVING, then SERVING once Redis is up', async () => {
    const port = await freePort();
    store = await startStore(tmp.dir, storeEnv(`redis://127.0.0.1:${port}`));
    client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    assert.equal(await checkHealth(store.port), 'NOT_SERVING');
    await assert.rejects(client.get('k'), isUnavailable);

    redis = await startRedisServer({ port });
    await waitForHealth(store.port, 'SERVING', 10_000);
    await client.put('k', Buffer.from('v'), { ttlMs: 60_000 });
    assert.equal((await client.get('k'))?.value.toString(), 'v');
  });
});
