import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { status } from '@grpc/grpc-js';
import { createStoreClient, type StoreClientError } from '../services/client/store-client';
import { runOne, type StoredEntry } from '../services/store/backends/backend';
import { RedisBackend, type RedisBackendOptions } from '../services/store/backends/redis';
import { waitForHealth } from './helpers/health';
import { type Proc, startStore, tempDir } from './helpers/procs';
import { freePort, redisCommand, type RedisServer, type RedisSentinelProcs, requireRedis, startRedisSentinel, startRedisServer } from './helpers/redis';
import { selfSigned } from './helpers/tls';


/** A backend that finds `mymaster` through the Sentinels on `ports`, with the tests' usual options. */
function sentinelBackend(ports: number[], keyPrefix: string, overrides: Partial<RedisBackendOptions> = {}): RedisBackend {
  return new RedisBackend({
    url: 'redis://',
    clusterNodes: [],
    sentinels: ports.map((port) => ({ host: '127.0.0.1', port })),
    sentinelMaster: 'mymaster',
    keyPrefix,
    commandTimeoutMs: 1000,
    listWindow: 100,
    ...overrides,
  });
}

describe('Redis backend through Sentinel (master, replica, Sentinel: real redis-server processes)', function () {
  let sentinel: RedisSentinelProcs | undefined;
  let backend: RedisBackend | undefined;

  before(async function () {
    requireRedis(this);
    sentinel = await startRedisSentinel();
  });
  after(async () => {
    await backend?.close();
    await sentinel?.stop();
  });

  it('finds the master through REDIS_SENTINELS; after a failover it fails only with UNAVAILABLE meanwhile, then writes to the new master', async () => {
    backend = sentinelBackend([sentinel!.sentinelPort], 'sentinel:');
    const before = (await runOne(backend, { kind: 'put', key: 'k', value: Buffer.from('v1'), ttlMs: 60_000 })) as StoredEntry;
    // Replication is asynchronous: wait until the replica has the write.
    for (const end = Date.now() + 5000; (await redisCommand(sentinel!.replica.port, 'HGET', 'sentinel:k', 'ver')) !== String(before.version); ) {
      assert.ok(Date.now() < end, 'the write never reached the replica');
      await new Promise((r) => setTimeout(r, 20));
    }

    await sentinel!.failover();
    // Until the client follows Sentinel, writes may still reach the old master: write until one
    // lands on the new one. Meanwhile failures must be UNAVAILABLE, nothing else.
    const kinds = new Set<string>();
    const deadline = Date.now() + 20_000;
    for (let attempt = 1; ; attempt += 1) {
      assert.ok(Date.now() < deadline, `no write reached the new master: ${[...kinds]}`);
      const value = `v2-${attempt}`;
      const [result] = await backend.batch([{ kind: 'put', key: 'k', value: Buffer.from(value), ttlMs: 60_000 }]);
      if (!result.ok) kinds.add(result.error.kind);
      else if ((await redisCommand(sentinel!.replica.port, 'HGET', 'sentinel:k', 'v')) === value) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.deepEqual([...kinds].filter((k) => k !== 'unavailable'), []);
    const read = (await runOne(backend, { kind: 'get', key: 'k', refreshTtlMs: 0 })) as StoredEntry;
    assert.ok(read.version > before.version);
    await backend.ping();
  });

  it("closing the backend closes its connections to the Sentinels too, not only the master's", async () => {
    // ioredis subscribes on the Sentinel to hear of failovers; a connection left open retries
    // every minute once the Sentinel is gone, printing "[ioredis] Unhandled error event".
    const subscribers = async () => (await redisCommand(sentinel!.sentinelPort, 'CLIENT', 'LIST')).split('\n').filter((client) => / sub=[1-9]/.test(client)).length;
    const until = async (what: string, count: number) => {
      for (const end = Date.now() + 5000; (await subscribers()) !== count; ) {
        assert.ok(Date.now() < end, `${what}: ${await subscribers()} subscribers on the Sentinel, not ${count}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    };
    const others = await subscribers();
    const own = sentinelBackend([sentinel!.sentinelPort], 'sentinel-close:');
    try {
      await runOne(own, { kind: 'put', key: 'k', value: Buffer.from('v'), ttlMs: 60_000 });
      await until('while open', others + 1);
    } finally {
      await own.close();
    }
    await until('after close()', others);
  });

  it('a master name the Sentinels do not know is logged once, not once per retry', async () => {
    const tmp = tempDir();
    const store = await startStore(tmp.dir, { STORE_BACKEND: 'redis', REDIS_SENTINELS: `127.0.0.1:${sentinel!.sentinelPort}`, REDIS_SENTINEL_MASTER: 'nosuch' });
    try {
      await new Promise((resolve) => setTimeout(resolve, 3000));
      const warnings = store.lines.filter((line) => line.includes('redis connection failed'));
      assert.equal(warnings.length, 1, warnings.join('\n'));
      assert.match(warnings[0], /No such master with that name/);
    } finally {
      await store.stop();
      tmp.remove();
    }
  });

  it('a master demoted before the Sentinels notice: one warning names it, and calls fail saying why', async () => {
    const warnings: string[] = [];
    const own = sentinelBackend([sentinel!.sentinelPort], 'sentinel-demoted:', {
      log: { info: () => undefined, warn: (detail) => warnings.push((detail as { err?: string }).err ?? '') },
    });
    try {
      await runOne(own, { kind: 'put', key: 'k', value: Buffer.from('v'), ttlMs: 60_000 });
      // An operator swaps the roles by hand: the Sentinel goes on naming the old master for a while.
      const named = await sentinel!.currentMaster();
      const [demoted, promoted] = named.endsWith(`:${sentinel!.master.port}`) ? [sentinel!.master, sentinel!.replica] : [sentinel!.replica, sentinel!.master];
      await redisCommand(promoted.port, 'REPLICAOF', 'NO', 'ONE');
      await redisCommand(demoted.port, 'REPLICAOF', '127.0.0.1', String(promoted.port));
      const why = new RegExp(`the Sentinels name 127\\.0\\.0\\.1:${demoted.port} as the master, but it answers role:slave`);
      let message = '';
      for (const end = Date.now() + 5000; !why.test(message); ) {
        assert.ok(Date.now() < end, `calls do not say why they fail: ${message}`);
        const [result] = await own.batch([{ kind: 'put', key: 'k', value: Buffer.from('v2'), ttlMs: 60_000 }]);
        message = result.ok ? '' : result.error.message;
        await new Promise((r) => setTimeout(r, 100));
      }
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal(warnings.filter((w) => why.test(w)).length, 1, warnings.join('\n'));
    } finally {
      await own.close();
    }
  });
});

describe('Redis through two Sentinels, the first of them frozen (real processes)', function () {
  let sentinel: RedisSentinelProcs | undefined;
  let frozen: RedisServer | undefined;
  let tmp: ReturnType<typeof tempDir> | undefined;

  before(async function () {
    requireRedis(this);
    tmp = tempDir();
    sentinel = await startRedisSentinel();
    const port = await freePort();
    const conf = path.join(tmp.dir, 'frozen-sentinel.conf');
    writeFileSync(conf, [`port ${port}`, 'bind 127.0.0.1', `dir ${tmp.dir}`, `sentinel monitor mymaster 127.0.0.1 ${sentinel.master.port} 1`, ''].join('\n'));
    frozen = await startRedisServer({ port, configFile: conf, args: ['--sentinel'] });
  });
  after(async () => {
    await frozen?.stop();
    await sentinel?.stop();
    tmp?.remove();
  });

  it('a Sentinel that accepts connections but never answers is passed over: the store reaches the master through the next one', async () => {
    frozen!.pause();
    const own = sentinelBackend([frozen!.port, sentinel!.sentinelPort], 'sentinel-frozen:', { commandTimeoutMs: 500 });
    try {
      let message = '';
      for (const end = Date.now() + 5000; ; ) {
        assert.ok(Date.now() < end, `the store never reached the master: ${message}`);
        const [result] = await own.batch([{ kind: 'put', key: 'k', value: Buffer.from('v'), ttlMs: 60_000 }]);
        if (result.ok) break;
        message = result.error.message;
        await new Promise((r) => setTimeout(r, 100));
      }
    } finally {
      await own.close();
    }
  });
});

describe('Redis through Sentinels that ask for a password (requirepass, an ACL user: real processes)', function () {
  let sentinel: RedisSentinelProcs | undefined;
  let tmp: ReturnType<typeof tempDir> | undefined;
  let store: Proc | undefined;

  before(async function () {
    requireRedis(this);
    tmp = tempDir();
    sentinel = await startRedisSentinel({ password: 'sentinel-secret', config: ['user watcher on >watcher-secret ~* &* +@all'] });
  });
  afterEach(async () => {
    await store?.stop();
    store = undefined;
  });
  after(async () => {
    await sentinel?.stop();
    tmp?.remove();
  });

  it('the store finds the master through Sentinels that ask for REDIS_SENTINEL_PASSWORD, and serves calls', async () => {
    store = await startStore(tmp!.dir, { STORE_BACKEND: 'redis', REDIS_SENTINELS: `127.0.0.1:${sentinel!.sentinelPort}`, REDIS_SENTINEL_PASSWORD: 'sentinel-secret' });
    await waitForHealth(store.port, 'SERVING', 10_000);
    const client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    try {
      const written = await client.put('protected', Buffer.from('v'), { ttlMs: 60_000 });
      assert.equal((await client.get('protected'))?.version, written.version);
    } finally {
      client.close();
    }
  });

  it('an ACL user of the Sentinels (REDIS_SENTINEL_USERNAME with its password) reaches the master too', async () => {
    const own = sentinelBackend([sentinel!.sentinelPort], 'sentinel-acl:', { sentinelUsername: 'watcher', sentinelPassword: 'watcher-secret' });
    try {
      const written = (await runOne(own, { kind: 'put', key: 'k', value: Buffer.from('v'), ttlMs: 60_000 })) as StoredEntry;
      assert.equal(((await runOne(own, { kind: 'get', key: 'k', refreshTtlMs: 0 })) as StoredEntry).version, written.version);
    } finally {
      await own.close();
    }
  });

  it('a wrong REDIS_SENTINEL_PASSWORD: one warning says the Sentinels refuse it, and calls fail UNAVAILABLE saying so, within their deadline', async () => {
    store = await startStore(tmp!.dir, { STORE_BACKEND: 'redis', REDIS_SENTINELS: `127.0.0.1:${sentinel!.sentinelPort}`, REDIS_SENTINEL_PASSWORD: 'wrong-secret' });
    const why = /the Sentinels refuse REDIS_SENTINEL_USERNAME \/ REDIS_SENTINEL_PASSWORD: .*WRONGPASS/;
    const client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    try {
      const started = Date.now();
      await assert.rejects(client.put('refused', Buffer.from('v'), { ttlMs: 60_000 }), (err: StoreClientError) => {
        assert.equal(err.code, status.UNAVAILABLE, err.message);
        assert.match(err.message, why);
        return true;
      });
      assert.ok(Date.now() - started < 3000, `answered after ${Date.now() - started} ms`);
      await new Promise((resolve) => setTimeout(resolve, 1000));
      const warnings = store.lines.filter((line) => line.includes('redis connection failed'));
      assert.equal(warnings.length, 1, warnings.join('\n'));
      assert.match(warnings[0], why);
    } finally {
      client.close();
    }
  });
});

describe('Redis through Sentinel with rediss:// (a master that speaks only TLS, real processes)', function () {
  this.timeout(30_000);
  let tmp: ReturnType<typeof tempDir> | undefined;
  const servers: RedisServer[] = [];
  let store: Proc | undefined;

  before(function () {
    requireRedis(this);
    tmp = tempDir();
  });
  after(async () => {
    await store?.stop();
    await Promise.all(servers.map((server) => server.stop()));
    tmp?.remove();
  });

  it('the store reaches the master the Sentinel names over TLS, as REDIS_URL asks, not in plaintext', async () => {
    const pki = await selfSigned(tmp!.dir, 'redis');
    const tlsFiles = ['--tls-cert-file', pki.cert, '--tls-key-file', pki.key, '--tls-ca-cert-file', pki.cert];
    // The plain port is only for the helper's readiness PING; the Sentinel names the TLS port.
    const tlsPort = await freePort();
    servers.push(await startRedisServer({ dir: path.join(tmp!.dir, 'master'), args: ['--tls-port', String(tlsPort), ...tlsFiles, '--tls-auth-clients', 'no'] }));
    const sentinelPort = await freePort();
    const conf = path.join(tmp!.dir, 'sentinel.conf');
    writeFileSync(
      conf,
      [
        `port ${sentinelPort}`,
        'bind 127.0.0.1',
        `dir ${tmp!.dir}`,
        `tls-cert-file ${pki.cert}`,
        `tls-key-file ${pki.key}`,
        `tls-ca-cert-file ${pki.cert}`,
        'tls-replication yes',
        `sentinel monitor mymaster 127.0.0.1 ${tlsPort} 1`,
        '',
      ].join('\n'),
    );
    servers.push(await startRedisServer({ port: sentinelPort, configFile: conf, args: ['--sentinel'] }));

    store = await startStore(tmp!.dir, {
      STORE_BACKEND: 'redis',
      REDIS_URL: 'rediss://',
      REDIS_SENTINELS: `127.0.0.1:${sentinelPort}`,
      NODE_EXTRA_CA_CERTS: pki.cert,
    });
    await waitForHealth(store.port, 'SERVING', 10_000);
    const client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 3000 });
    try {
      const written = await client.put('over-tls', Buffer.from('v'), { ttlMs: 60_000 });
      assert.equal((await client.get('over-tls'))?.version, written.version);
    } finally {
      client.close();
    }
  });

  it('with REDIS_SENTINEL_TLS=true the store asks Sentinels that speak only TLS (their tls-port)', async () => {
    const pki = await selfSigned(tmp!.dir, 'sentinel');
    const master = await startRedisServer({ dir: path.join(tmp!.dir, 'plain-master') });
    servers.push(master);
    // The plain port is only for the helper's readiness PING; the store is given the TLS port.
    const [sentinelPort, sentinelTlsPort] = [await freePort(), await freePort()];
    const conf = path.join(tmp!.dir, 'tls-sentinel.conf');
    writeFileSync(
      conf,
      [
        `port ${sentinelPort}`,
        `tls-port ${sentinelTlsPort}`,
        'bind 127.0.0.1',
        `dir ${tmp!.dir}`,
        `tls-cert-file ${pki.cert}`,
        `tls-key-file ${pki.key}`,
        `tls-ca-cert-file ${pki.cert}`,
        'tls-auth-clients no',
        `sentinel monitor mymaster 127.0.0.1 ${master.port} 1`,
        '',
      ].join('\n'),
    );
    servers.push(await startRedisServer({ port: sentinelPort, configFile: conf, args: ['--sentinel'] }));

    const tlsStore = await startStore(tmp!.dir, {
      STORE_BACKEND: 'redis',
      REDIS_SENTINELS: `127.0.0.1:${sentinelTlsPort}`,
      REDIS_SENTINEL_TLS: 'true',
      NODE_EXTRA_CA_CERTS: pki.cert,
    });
    const client = createStoreClient({ address: `127.0.0.1:${tlsStore.port}`, deadlineMs: 3000 });
    try {
      await waitForHealth(tlsStore.port, 'SERVING', 10_000);
      const written = await client.put('sentinel-over-tls', Buffer.from('v'), { ttlMs: 60_000 });
      assert.equal((await client.get('sentinel-over-tls'))?.version, written.version);
    } finally {
      client.close();
      await tlsStore.stop();
    }
  });
});
