import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { CookieJarClient } from './helpers/browser';
import { NO_ENV_FILE, type Proc, root, startStore, startWeb, tempDir } from './helpers/procs';
import { type RedisClusterProcs, requireRedis, startRedisCluster } from './helpers/redis';

const TOKEN = 'scale-test-token-0123456789';

/** The session id inside a `sid=<id>.<mac>` cookie value. */
const idOf = (jar: CookieJarClient) => jar.cookies.get('sid')!.split('.')[0];

function dump(storePort: number, ...args: string[]): Promise<string> {
  return new Promise((resolve, reject) =>
    execFile(path.join(root, 'bin', 'dump'), [`127.0.0.1:${storePort}`, ...args], { env: { PATH: process.env.PATH ?? '', STORE_TOKEN: TOKEN, ...NO_ENV_FILE }, timeout: 20_000 }, (err, stdout, stderr) =>
      err ? reject(new Error(`bin/dump failed: ${stderr}`)) : resolve(stdout),
    ),
  );
}

describe('at scale: 2 web and 2 store instances over one 3-master Redis Cluster (real processes)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let cluster: RedisClusterProcs | undefined;
  const stores: Proc[] = [];
  const webs: Proc[] = [];
  let bases: [string, string];
  const sessions = new Set<string>();

  before(async function () {
    requireRedis(this);
    tmp = tempDir();
    cluster = await startRedisCluster(3);
    const storeEnv = { STORE_BACKEND: 'redis', REDIS_CLUSTER_NODES: cluster.seeds, STORE_TOKEN: TOKEN };
    stores.push(...(await Promise.all([startStore(tmp.dir, storeEnv), startStore(tmp.dir, storeEnv)])));
    // Each web talks to its own store; both share SESSION_KEYS (startWeb sets the same key).
    webs.push(...(await Promise.all(stores.map((s) => startWeb(s.port, tmp.dir, { STORE_TOKEN: TOKEN, STORE_DEADLINE_MS: '3000' })))));
    bases = [`http://127.0.0.1:${webs[0].port}`, `http://127.0.0.1:${webs[1].port}`];
  });
  after(async () => {
    await Promise.all(webs.map((w) => w.stop()));
    await Promise.all(stores.map((s) => s.stop()));
    await cluster?.stop();
    tmp?.remove();
  });

  it('a cookie jar alternating between the two web instances sees its counters continue', async () => {
    const jar = new CookieJarClient(bases[0]);
    const on = (i: number) => {
      jar.base = bases[i % 2];
      return jar;
    };
    assert.deepEqual(pick(await on(0).page()), [0, 0]);
    assert.deepEqual(pick(await on(1).page()), [1, 0]);
    const { csrf } = await on(0).page();
    assert.equal((await on(1).post('/increment', { _csrf: csrf }, false)).status, 303);
    assert.deepEqual(pick(await on(0).page()), [3, 1]);
    assert.deepEqual(pick(await on(1).page()), [4, 1]);
    sessions.add(idOf(jar));
  });

  it('8 clients sharing ONE session send 100 concurrent increments each, alternating between the web instances: exactly 800 (compare-and-set across store instances; an increment refused with 503 is sent again)', async () => {
    const first = new CookieJarClient(bases[0]);
    const { csrf } = await first.page();
    const sid = first.cookies.get('sid')!;
    sessions.add(idOf(first));
    // Per client, one jar per web instance, all carrying the same session cookie.
    const clients = Array.from({ length: 8 }, () =>
      bases.map((base) => {
        const jar = new CookieJarClient(base);
        jar.cookies.set('sid', sid);
        return jar;
      }),
    );
    const increments = clients.flatMap((jars, c) => Array.from({ length: 100 }, (_, i) => jars[(c + i) % 2]));
    // A web instance gives up with 503 after a bounded number of compare-and-set conflicts (the
    // other instance kept winning); that increment wrote nothing, so the client sends it again,
    // as a browser would after Retry-After. A lost or doubled increment shows in the total.
    let pending = increments;
    let refused = 0;
    for (let round = 0; round < 5 && pending.length > 0; round += 1) {
      const results = await Promise.all(pending.map((jar) => jar.post('/increment', { _csrf: csrf }, false)));
      const statuses = new Set(results.map((r) => r.status));
      assert.ok([...statuses].every((s) => s === 303 || s === 503), `statuses: ${[...statuses]}`);
      pending = pending.filter((_, i) => results[i].status === 503);
      refused += pending.length;
    }
    assert.equal(pending.length, 0, 'every increment was accepted in the end');
    const page = await clients[0][1].page();
    assert.equal(page.count2, 800, `${refused} increments were refused once and sent again`);
  });

  it('bin/dump against either store lists every session exactly once', async () => {
    // More sessions, created through both web instances.
    for (let i = 0; i < 40; i += 1) {
      const jar = new CookieJarClient(bases[i % 2]);
      await jar.page();
      sessions.add(idOf(jar));
    }
    const expected = [...sessions].sort();
    for (const store of stores) {
      const keys = (await dump(store.port, '--keys-only')).split('\n').filter(Boolean);
      assert.deepEqual(keys, expected, `store on port ${store.port}`);
    }
  });

  it('a Redis master killed: pages answer 503 with Retry-After, never 500, and /readyz reports the store NOT_SERVING; the master back: pages answer 200 on both webs for sessions on every master, /readyz ready', async () => {
    const victim = cluster!.masters[0];
    await victim.stop('SIGKILL');
    const statuses = new Set<number>();
    const deadline = Date.now() + 15_000;
    while (!statuses.has(503)) {
      assert.ok(Date.now() < deadline, `no 503 while a master was down: ${[...statuses]}`);
      const res = await new CookieJarClient(bases[statuses.size % 2]).get('/');
      statuses.add(res.status);
      if (res.status === 503) assert.equal(res.headers.get('retry-after'), '1');
      await res.arrayBuffer();
    }
    assert.ok(!statuses.has(500), `statuses: ${[...statuses]}`);
    await readyz(bases[1], 503, 'NOT_SERVING');

    await victim.start();
    // 20 fresh sessions in a row answered 200 on each web: their random slots cover every master.
    for (const base of bases) {
      const back = Date.now() + 20_000;
      for (let inARow = 0; inARow < 20; ) {
        const res = await new CookieJarClient(base).get('/');
        await res.arrayBuffer();
        assert.notEqual(res.status, 500);
        inARow = res.status === 200 ? inARow + 1 : 0;
        assert.ok(inARow > 0 || Date.now() < back, `${base} still answers ${res.status}`);
        if (inARow === 0) await new Promise((r) => setTimeout(r, 100));
      }
    }
    await readyz(bases[0], 200, 'SERVING');
  });
});

/** Polls the web's /readyz until it answers `status` with the store's health `store`. */
async function readyz(base: string, status: number, store: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  let last = '';
  for (;;) {
    const res = await fetch(`${base}/readyz`);
    last = `${res.status} ${await res.text()}`;
    if (res.status === status && last.includes(`"store":"${store}"`)) return;
    assert.ok(Date.now() < deadline, `/readyz stayed ${last}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function pick(page: { count1: number; count2: number }): [number, number] {
  return [page.count1, page.count2];
}
