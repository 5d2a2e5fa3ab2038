import assert from 'node:assert/strict';
import { status } from '@grpc/grpc-js';
import Router from '@koa/router';
import Koa from 'koa';
import { shortHash } from '../services/shared/log';
import { StoreClientError } from '../services/client/store-client';
import { createApp } from '../services/web/app';
import { WebMetrics } from '../services/web/metrics';
import { type SessionBackend, type SessionOptions, sessionMiddleware } from '../services/web/session';
import { IdSigner } from '../services/web/signed-id';
import { CookieJarClient, parsePage } from './helpers/browser';
import { parsePrometheus } from './helpers/prometheus';
import { type Proc, startStore, startWeb, TEST_KEY, tempDir } from './helpers/procs';
import { countingStore, idOf, memoryLogger, serveApp, startStoreWithClient } from './helpers/web-app';

/** A real store process for the enclosing describe block, and closers for what its tests serve (run after them, newest first). */
function realStore() {
  let started: Awaited<ReturnType<typeof startStoreWithClient>> | undefined;
  const closers: Array<() => Promise<void>> = [];
  before(async () => {
    started = await startStoreWithClient();
  });
  after(async () => {
    for (const close of closers.reverse()) await close();
    await started?.stop();
  });
  return {
    get client() {
      return started!.client;
    },
    closers,
  };
}

const OTHER_KEY = 'another-key-that-this-site-never-had-0123456789';
const BASE64URL = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';

describe('session middleware (createApp over a real store process)', function () {
  const store = realStore();
  const { closers } = store;

  /** The counter site over the real store, with a call-counting wrapper and in-memory logs. */
  async function site(session: Partial<SessionOptions> = {}, options: { trustProxy?: boolean } = {}) {
    const counted = countingStore(store.client);
    const logs = memoryLogger('info');
    const metrics = new WebMetrics({ defaultMetrics: false });
    const app = createApp({ store: counted, session: { keys: [TEST_KEY], ...session }, logger: logs.logger, metrics, ...options });
    const served = await serveApp(app);
    closers.push(served.close);
    return { base: served.base, counted, logs, metrics };
  }

  describe('forged and tampered cookies', () => {
    it('are rejected before any store call: a fresh session is issued, the forged id never reaches the store, and a POST with one makes no store call at all', async () => {
      const { base, counted } = await site();
      const jar = new CookieJarClient(base);
      const { csrf } = await jar.page();
      const genuine = jar.cookies.get('sid')!;
      const id = idOf(genuine);
      const mac = genuine.slice(25);
      const forged: Array<[string, string]> = [
        ['MAC of the real id under a key the site does not have', new IdSigner([OTHER_KEY]).prove(id).cookie],
        ['last MAC digit changed in its spare bits', genuine.slice(0, -1) + BASE64URL[BASE64URL.indexOf(genuine.at(-1)!) ^ 1]],
        ['one character of the id changed, MAC kept', `${id.slice(0, 5)}${id[5] === 'x' ? 'y' : 'x'}${id.slice(6)}.${mac}`],
        ['MAC truncated', genuine.slice(0, -2)],
      ];
      for (const [what, value] of forged) {
        counted.calls.length = 0;
        const res = await fetch(base + '/', { headers: { cookie: `sid=${value}` } });
        assert.equal(res.status, 200, what);
        assert.match(await res.text(), /Counter 1: 0\b/, `${what}: a fresh session`);
        const issued = idOf(/^sid=([^;]+)/.exec(res.headers.getSetCookie()[0] ?? '')?.[1]);
        assert.notEqual(issued, idOf(value), `${what}: a new id, not the presented one`);
        const presented = idOf(value);
        assert.deepEqual(
          counted.calls.filter((c) => c.key.includes(presented)),
          [],
          `${what}: the store never saw the presented id`,
        );

        counted.calls.length = 0;
        const post = await fetch(base + '/increment', {
          method: 'POST',
          headers: { cookie: `sid=${value}`, 'content-type': 'application/x-www-form-urlencoded' },
          body: new URLSearchParams({ _csrf: csrf }).toString(),
          redirect: 'manual',
        });
        assert.equal(post.status, 403, `${what}: POST refused`);
        assert.equal(counted.calls.length, 0, `${what}: the POST made no store call`);
      }
      const after = await jar.page();
      assert.deepEqual([after.count1, after.count2], [1, 0], 'the genuine session was untouched');
    });

    it('are logged as suspicious with a hash of the value and the remote address, never the value, at most 10 lines per 10 s however many arrive', async () => {
      const { base, logs, metrics } = await site();
      const value = new IdSigner([OTHER_KEY]).prove('AAAAAAAAAAAAAAAAAAAAAAAA').cookie;
      for (let i = 0; i < 40; i += 1) {
        const res = await fetch(base + '/increment', { method: 'POST', headers: { cookie: `sid=${value}` } });
        assert.equal(res.status, 403);
      }
      const warnings = logs.entries().filter((e) => e.msg === 'suspicious session cookie: signature does not verify');
      assert.equal(warnings.length, 10, 'rate-limited to 10 lines');
      for (const w of warnings) {
        assert.equal(w.cookieHash, shortHash(value));
        assert.match(String(w.remote), /127\.0\.0\.1/);
        assert.equal(w.level, 40, 'warn level');
      }
      assert.ok(!logs.lines.some((l) => l.includes(value) || l.includes(value.slice(0, 24))), 'the raw value is in no log line');
      assert.match(await metrics.registry.metrics(), /^web_forged_cookies_total 40$/m, 'every one is counted in the metrics');
    });

    it('behind a trusted proxy, the logged address is the one the proxy added to X-Forwarded-For, not one the client wrote before it', async () => {
      const { base, logs } = await site({}, { trustProxy: true });
      const value = new IdSigner([OTHER_KEY]).prove('AAAAAAAAAAAAAAAAAAAAAAAA').cookie;
      // What a proxy that appends (nginx's $proxy_add_x_forwarded_for) passes on when the client sent its own header.
      const res = await fetch(base + '/', { headers: { cookie: `sid=${value}`, 'x-forwarded-for': '203.0.113.9, 198.51.100.7' } });
      assert.equal(res.status, 200);
      await res.text();
      const warning = logs.entries().find((e) => e.msg === 'suspicious session cookie: signature does not verify');
      assert.equal(warning?.remote, '198.51.100.7');
    });
  });

  describe('several cookies of the session\'s name', () => {
    it('a stale, forged or retired-key cookie sent before the valid one (another path or a parent domain) does not hide the session: the page counts on, no new session is made, and POSTs with its form token work', async () => {
      const { base, counted } = await site();
      const jar = new CookieJarClient(base);
      await jar.page();
      const genuine = jar.cookies.get('sid')!;
      const others: Array<[string, string]> = [
        ['a cookie signed with a retired key', new IdSigner([OTHER_KEY]).prove('AAAAAAAAAAAAAAAAAAAAAAAA').cookie],
        ['a garbage value', 'garbage'],
        ['an empty value', ''],
      ];
      let expected = 1;
      for (const [i, [what, other]] of others.entries()) {
        const cookie = `sid=${other}; sid=${genuine}`;
        const res = await fetch(base + '/', { headers: { cookie } });
        const page = parsePage(res.status, await res.text());
        assert.deepEqual(res.headers.getSetCookie(), [], `${what}: no new cookie`);
        assert.deepEqual([page.status, page.count1, page.count2], [200, expected, i], `${what}: the session counts on`);
        const post = await fetch(base + '/increment', {
          method: 'POST',
          headers: { cookie, 'content-type': 'application/x-www-form-urlencoded' },
          body: new URLSearchParams({ _csrf: page.csrf }).toString(),
          redirect: 'manual',
        });
        assert.equal(post.status, 303, `${what}: the form is accepted`);
        expected += 1;
      }
      assert.deepEqual(
        [...new Set(counted.calls.map((c) => c.key))],
        [idOf(genuine)],
        'no other session was created or read',
      );
      const after = await jar.page();
      assert.deepEqual([after.count1, after.count2], [expected, others.length]);
    });
  });

  describe('parallel requests of one session', () => {
    it('50 page views at once on one session in one process: exact count, and no store read at all (each update hands its write to the next; the first starts from the remembered version)', async () => {
      const { base, counted } = await site();
      const jar = new CookieJarClient(base);
      await jar.page();
      counted.calls.length = 0;
      const statuses = await Promise.all(Array.from({ length: 50 }, () => jar.get('/').then(async (r) => (await r.text(), r.status))));
      assert.deepEqual([...new Set(statuses)], [200]);
      assert.equal(counted.calls.filter((c) => c.method === 'put').length, 50, 'one write per view');
      assert.equal(counted.calls.filter((c) => c.method === 'get').length, 0, 'no read for the whole queue');
      assert.equal((await jar.page()).count1, 51);
    });
  });

  describe('remembered versions (one round trip per update)', () => {
    it('a process updates a session it wrote before with one compare-and-set and no read; a write by another process is caught and re-read, so counts stay exact', async () => {
      const a = await site();
      const b = await site();
      const jarA = new CookieJarClient(a.base);
      await jarA.page();
      a.counted.calls.length = 0;
      await jarA.page();
      await jarA.page();
      assert.deepEqual(a.counted.calls.map((c) => c.method), ['put', 'put'], 'no reads once the process remembers the version');
      const jarB = new CookieJarClient(b.base);
      jarB.cookies.set('sid', jarA.cookies.get('sid')!);
      assert.equal((await jarB.page()).count1, 3, 'the other process continues the count');
      a.counted.calls.length = 0;
      jarA.cookies.set('sid', jarB.cookies.get('sid')!);
      assert.equal((await jarA.page()).count1, 4, 'the stale memory is caught by compare-and-set');
      assert.deepEqual(a.counted.calls.map((c) => c.method), ['put', 'get', 'put'], 'conflict, read, write');
    });

    it('recentSessions: 0 reads before every update', async () => {
      const { base, counted } = await site({ recentSessions: 0 });
      const jar = new CookieJarClient(base);
      await jar.page();
      counted.calls.length = 0;
      await jar.page();
      assert.deepEqual(counted.calls.map((c) => c.method), ['get', 'put']);
    });
  });

  describe('CSRF', () => {
    it('a POST with no token, a wrong token or another session\'s token gets the 403 page, writes nothing to the store and changes no counter', async () => {
      const { base, counted } = await site();
      const a = new CookieJarClient(base);
      const b = new CookieJarClient(base);
      await a.page();
      const { csrf: tokenOfB } = await b.page();
      counted.calls.length = 0;
      const attempts: Array<[string, string, Record<string, string>]> = [
        ['no token', '/increment', {}],
        ['an empty token', '/increment', { _csrf: '' }],
        ['a wrong token', '/increment', { _csrf: 'A'.repeat(22) }],
        ["the other session's token", '/increment', { _csrf: tokenOfB }],
        ["the other session's token on reset", '/reset', { _csrf: tokenOfB }],
      ];
      for (const [what, path, form] of attempts) {
        const res = await a.post(path, form, false);
        assert.equal(res.status, 403, what);
        assert.match(res.headers.get('content-type') ?? '', /text\/html/, `${what}: an HTML page`);
        assert.equal(res.headers.get('cache-control'), 'no-store');
        await res.text();
      }
      assert.deepEqual(
        counted.calls.filter((c) => c.method !== 'get'),
        [],
        'no put or delete reached the store',
      );
      const page = await a.page();
      assert.deepEqual([page.count1, page.count2], [1, 0], 'the counters are as before');
      const ok = await a.post('/increment', { _csrf: page.csrf }, false);
      assert.equal(ok.status, 303, 'the right token still works (the test can tell the difference)');
    });
  });

  describe('lifetime', () => {
    /** How many sessions /metrics counts as found ended since this call. */
    const endedSessions = async (base: string) => {
      const read = async () => parsePrometheus(await (await fetch(base + '/metrics')).text()).get('web_sessions_total{event="expired"}') ?? 0;
      const before = await read();
      return async () => (await read()) - before;
    };
    it('the absolute lifetime ends a session however often it is used; replaying its cookie afterwards starts a new empty one', async () => {
      const absoluteTtlMs = 1500;
      const { base } = await site({ idleTtlMs: 1000, absoluteTtlMs });
      const jar = new CookieJarClient(base);
      const ended = await endedSessions(base);
      const started = Date.now();
      await jar.page();
      const original = jar.cookies.get('sid')!;
      let visits = 1;
      let last = { count1: 0, count2: 0 };
      while (jar.cookies.get('sid') === original && Date.now() - started < 10_000) {
        await new Promise((resolve) => setTimeout(resolve, 100));
        last = await jar.page();
        visits += 1;
      }
      const endedAfter = Date.now() - started;
      assert.notEqual(jar.cookies.get('sid'), original, 'a new id was issued');
      assert.deepEqual([last.count1, last.count2], [0, 0], 'the new session starts empty');
      assert.ok(visits >= 8, `the session was in use all along (${visits} visits, idle timeout never reached)`);
      assert.ok(endedAfter >= absoluteTtlMs - 100, `not before the absolute lifetime (${endedAfter} ms)`);
      assert.equal(await ended(), 1, 'web_sessions_total{event="expired"} counted the visit that found its session ended');

      const replay = await fetch(base + '/', { headers: { cookie: `sid=${original}` } });
      assert.match(await replay.text(), /Counter 1: 0\b/, 'the replayed cookie does not revive the data');
      const reissued = /^sid=([^;]+)/.exec(replay.headers.getSetCookie()[0] ?? '')?.[1];
      assert.ok(reissued && idOf(reissued) !== idOf(original), 'and gets a new id');
      assert.equal(await store.client.get(idOf(original)), null, 'the expired entry is gone from the store');
    });

    it('an idle timeout ends an unused session with a new id at 0/0, while use keeps sliding it', async () => {
      const { base } = await site({ idleTtlMs: 700, absoluteTtlMs: 60_000 });
      const jar = new CookieJarClient(base);
      const ended = await endedSessions(base);
      await jar.page();
      const original = jar.cookies.get('sid');
      for (let i = 0; i < 5; i += 1) {
        await new Promise((resolve) => setTimeout(resolve, 250));
        await jar.page();
      }
      assert.equal(jar.cookies.get('sid'), original, 'used every 250 ms for 1.25 s (> idle timeout): same session');
      await new Promise((resolve) => setTimeout(resolve, 1200));
      const after = await jar.page();
      assert.notEqual(jar.cookies.get('sid'), original, 'idle past the timeout: a new id');
      assert.deepEqual([after.count1, after.count2], [0, 0]);
      assert.equal(await ended(), 1, 'web_sessions_total{event="expired"}: once, for the visit after the timeout');
    });
  });

  describe('cookie attributes', () => {
    const setCookie = async (base: string, headers: Record<string, string> = {}) => {
      const res = await fetch(base + '/', { headers });
      await res.text();
      return res.headers.getSetCookie()[0] ?? '';
    };
    const attrs = (cookie: string) =>
      cookie
        .split(';')
        .slice(1)
        .map((a) => a.trim().toLowerCase())
        .sort();

    it('over plain HTTP: name sid, HttpOnly, SameSite=Lax, Path=/, no Secure, no Domain, no expiry (a browser-session cookie)', async () => {
      const { base } = await site();
      const cookie = await setCookie(base);
      assert.match(cookie, /^sid=[A-Za-z0-9_-]{24}\.[A-Za-z0-9_-]{22};/);
      assert.deepEqual(attrs(cookie), ['httponly', 'path=/', 'samesite=lax']);
    });

    it('persistent: the cookie expires with the session\'s absolute lifetime, set once when the id is issued; a reset issues the next with its own', async () => {
      const DAY = 24 * 3_600_000;
      const { base } = await site({ persistent: true, idleTtlMs: DAY, absoluteTtlMs: 7 * DAY });
      const before = Date.now();
      const first = await fetch(base + '/');
      const page = await first.text();
      const cookie = first.headers.getSetCookie()[0] ?? '';
      const expires = Date.parse(/; expires=([^;]+)/.exec(cookie)?.[1] ?? '');
      // Expires has whole seconds.
      assert.ok(expires >= before + 7 * DAY - 1000 && expires <= Date.now() + 7 * DAY, cookie);
      assert.deepEqual(attrs(cookie).map((a) => a.replace(/=.*/, '')), ['expires', 'httponly', 'path', 'samesite']);

      const pair = cookie.split(';')[0];
      const again = await fetch(base + '/', { headers: { cookie: pair } });
      assert.match(await again.text(), /Counter 1: 1\b/);
      assert.deepEqual(again.headers.getSetCookie(), [], 'no use extends the absolute lifetime, so the cookie is not sent again');

      const csrf = /name="_csrf" value="([^"]+)"/.exec(page)![1];
      const reset = await fetch(base + '/reset', {
        method: 'POST',
        headers: { cookie: pair, 'content-type': 'application/x-www-form-urlencoded' },
        body: `_csrf=${encodeURIComponent(csrf)}`,
        redirect: 'manual',
      });
      assert.equal(reset.status, 303);
      assert.match(reset.headers.getSetCookie()[0] ?? '', /^sid=; path=\/; expires=Thu, 01 Jan 1970 00:00:00 GMT/);
      const next = await fetch(base + '/');
      await next.text();
      assert.match(next.headers.getSetCookie()[0] ?? '', /; expires=/);
    });

    it('behind a trusted proxy with X-Forwarded-Proto: https: name __Host-sid with Secure, and the next request with it is recognised', async () => {
      const { base } = await site({}, { trustProxy: true });
      const cookie = await setCookie(base, { 'x-forwarded-proto': 'https' });
      assert.match(cookie, /^__Host-sid=[A-Za-z0-9_-]{24}\.[A-Za-z0-9_-]{22};/);
      assert.deepEqual(attrs(cookie), ['httponly', 'path=/', 'samesite=lax', 'secure']);
      const pair = cookie.split(';')[0];
      const again = await fetch(base + '/', { headers: { cookie: pair, 'x-forwarded-proto': 'https' } });
      assert.match(await again.text(), /Counter 1: 1\b/);
      assert.equal(await setCookie(base).then((c) => c.startsWith('sid=')), true, 'the same app over plain HTTP still uses sid');
    });

    it('without trustProxy, X-Forwarded-Proto is ignored: no Secure cookie because a client says so', async () => {
      const { base } = await site({}, { trustProxy: false });
      const cookie = await setCookie(base, { 'x-forwarded-proto': 'https' });
      assert.deepEqual(attrs(cookie), ['httponly', 'path=/', 'samesite=lax']);
      assert.match(cookie, /^sid=/);
    });

    it("secure: 'always' makes a __Host- Secure cookie even over HTTP; 'never' makes a plain one even behind HTTPS", async () => {
      const always = await site({ secure: 'always' });
      const a = await setCookie(always.base);
      assert.match(a, /^__Host-sid=/);
      assert.ok(attrs(a).includes('secure'));
      const never = await site({ secure: 'never' }, { trustProxy: true });
      const n = await setCookie(never.base, { 'x-forwarded-proto': 'https' });
      assert.match(n, /^sid=/);
      assert.ok(!attrs(n).includes('secure'));
    });
  });
});

/** A site built from the same middleware that also exposes regenerate(), to drive it under load. */
function renewApp(store: SessionBackend, options: Partial<SessionOptions> = {}): Koa {
  const app = new Koa();
  app.use(async (ctx, next) => {
    try {
      await next();
    } catch (err) {
      ctx.status = (err as { status?: number }).status ?? 500;
      ctx.body = { error: (err as Error).message };
    }
  });
  app.use(sessionMiddleware({ store, keys: [TEST_KEY], ...options }));
  const router = new Router();
  router.post('/inc', async (ctx) => {
    let sawEmpty = false;
    const next = await ctx.session.update((current: { n?: number } | null) => {
      sawEmpty = current === null;
      return { n: (current?.n ?? 0) + 1 };
    });
    ctx.body = { n: next.n, sawEmpty };
  });
  router.post('/renew', async (ctx) => {
    await ctx.session.regenerate();
    ctx.body = { renewed: true };
  });
  router.post('/login', async (ctx) => {
    await ctx.session.update((current: Record<string, unknown> | null) => ({ ...current, user: 'alice' }));
    await ctx.session.regenerate();
    ctx.body = { loggedIn: true };
  });
  router.post('/logout', async (ctx) => {
    await ctx.session.destroy();
    ctx.body = { loggedOut: true };
  });
  router.post('/logout-form', async (ctx) => {
    await ctx.session.destroy();
    const idAfterDestroy = ctx.session.id ?? null;
    ctx.body = { idAfterDestroy, csrf: ctx.session.csrfToken(), id: ctx.session.id };
  });
  router.post('/set', async (ctx) => {
    const mode = String(ctx.query.mode);
    ctx.body = await ctx.session.update((current: Record<string, unknown> | null) => ({ ...current, mode }));
  });
  router.post('/replace', async (ctx) => {
    const kind = String(ctx.query.kind);
    if (kind === 'async') {
      // A mistake the types catch, but not in JavaScript: the promise would be stored as {}.
      ctx.body = await ctx.session.update((async (current: Record<string, unknown> | null) => ({ ...current, more: 1 })) as unknown as () => Record<string, unknown>);
      return;
    }
    ctx.body = await ctx.session.update(() => (kind === 'date' ? new Date() : { toJSON: () => [kind] }) as unknown as Record<string, unknown>);
  });
  // Reads first (to check something, say), then updates.
  router.post('/check-then-set', async (ctx) => {
    await ctx.session.get();
    await new Promise((resolve) => setTimeout(resolve, Number(ctx.query.waitMs ?? 0)));
    const mode = String(ctx.query.mode);
    ctx.body = await ctx.session.update((current: Record<string, unknown> | null) => ({ ...current, mode }));
  });
  // Parts of one handler that each change the session, run at once (say, a visit tracker and a cart).
  router.post('/set-many', async (ctx) => {
    const names = String(ctx.query.names).split(',');
    await Promise.all(names.map((name) => ctx.session.update((current: Record<string, unknown> | null) => ({ ...current, [name]: true }))));
    ctx.body = (await ctx.session.get()) ?? {};
  });
  router.get('/state', async (ctx) => {
    ctx.body = (await ctx.session.get()) ?? {};
  });
  router.get('/form', async (ctx) => {
    const data = await ctx.session.get();
    ctx.body = { data, csrf: ctx.session.csrfToken(), id: ctx.session.id };
  });
  router.post('/checked', async (ctx) => {
    ctx.body = { accepted: ctx.session.verifyCsrf(ctx.query.token) };
  });
  app.use(router.routes());
  return app;
}

describe('regenerate() under parallel requests (real store process)', function () {
  const store = realStore();
  const { closers } = store;

  const call = async (base: string, method: string, path: string, cookie: string) => {
    const res = await fetch(base + path, { method, headers: { cookie } });
    const body = (await res.json()) as { n?: number; sawEmpty?: boolean; error?: string };
    const set = /^sid=([^;]+)/.exec(res.headers.getSetCookie()[0] ?? '')?.[1];
    return { status: res.status, body, set };
  };

  it('200 increments racing 10 regenerations, all carrying the old id: none sees an empty session, none is lost, the old id keeps only a short-lived forward', async () => {
    // The last of the 210 waits for all the others: on a busy machine longer than the default 5 s queue wait, which would answer it 503.
    const served = await serveApp(renewApp(store.client, { maxQueueWaitMs: 60_000 }));
    closers.push(served.close);
    const first = await call(served.base, 'POST', '/inc', '');
    const cookie = `sid=${first.set}`;
    const results = await Promise.all(
      Array.from({ length: 210 }, (_, i) => call(served.base, 'POST', i % 21 === 10 ? '/renew' : '/inc', cookie)),
    );
    assert.deepEqual([...new Set(results.map((r) => r.status))], [200], JSON.stringify(results.find((r) => r.status !== 200)));
    const incs = results.filter((r) => r.body.n !== undefined);
    assert.equal(incs.length, 200);
    assert.equal(incs.filter((r) => r.body.sawEmpty).length, 0, 'no request saw an empty session');
    assert.deepEqual(
      incs.map((r) => r.body.n!).sort((x, y) => x - y),
      Array.from({ length: 200 }, (_, i) => i + 2),
      'every increment saw a distinct state: 2..201',
    );
    const newest = results.filter((r) => r.set).at(-1)!.set!;
    const state = await call(served.base, 'GET', '/state', `sid=${newest}`);
    assert.equal(state.body.n, 201);
    const old = await store.client.get(idOf(first.set));
    assert.ok(old === null || /^moved:/.test(old.value.toString()), 'the first id holds no data any more, at most a forward');
    assert.ok(old === null || old.expiresAtMs <= Date.now() + 10_000, 'which expires within the grace window');
  });

  it('after the grace window the old id is worthless: it leads to a new empty session while the new id keeps the data', async () => {
    const served = await serveApp(renewApp(store.client, { regenerateGraceMs: 300 }));
    closers.push(served.close);
    const first = await call(served.base, 'POST', '/inc', '');
    const renewed = await call(served.base, 'POST', '/renew', `sid=${first.set}`);
    assert.ok(renewed.set && idOf(renewed.set) !== idOf(first.set), 'a new id');
    const within = await call(served.base, 'POST', '/inc', `sid=${first.set}`);
    assert.deepEqual(within.body, { n: 2, sawEmpty: false }, 'within the grace window the old id leads to the session');
    await new Promise((resolve) => setTimeout(resolve, 400));
    const late = await call(served.base, 'POST', '/inc', `sid=${first.set}`);
    assert.deepEqual(late.body, { n: 1, sawEmpty: true }, 'after it, the old id is a stranger');
    assert.notEqual(idOf(late.set), idOf(renewed.set));
    const kept = await call(served.base, 'POST', '/inc', `sid=${renewed.set}`);
    assert.equal(kept.body.n, 3, 'the new id kept the data');
  });

  it('two app instances (separate locks, as two processes) share one session while one regenerates it: every acknowledged increment counts, none sees an empty session', async () => {
    const a = await serveApp(renewApp(store.client));
    const b = await serveApp(renewApp(store.client));
    closers.push(a.close, b.close);
    const first = await call(a.base, 'POST', '/inc', '');
    const cookie = `sid=${first.set}`;
    const results = await Promise.all(
      Array.from({ length: 84 }, (_, i) => {
        if (i % 21 === 10) return call(a.base, 'POST', '/renew', cookie);
        return call(i % 2 === 0 ? a.base : b.base, 'POST', '/inc', cookie);
      }),
    );
    const failed = results.filter((r) => r.status !== 200);
    for (const r of failed) assert.equal(r.status, 503, `only "please retry" failures: ${JSON.stringify(r.body)}`);
    const incs = results.filter((r) => r.status === 200 && r.body.n !== undefined);
    assert.ok(incs.length >= 70, `most increments succeed (${incs.length}/80)`);
    assert.equal(incs.filter((r) => r.body.sawEmpty).length, 0, 'no request saw an empty session');
    const seen = incs.map((r) => r.body.n!);
    assert.equal(new Set(seen).size, seen.length, 'every acknowledged increment saw a distinct state');
    const newest = results.filter((r) => r.set).at(-1)!.set!;
    const state = await call(b.base, 'GET', '/state', `sid=${newest}`);
    assert.equal(state.body.n, 1 + incs.length, 'the final count is exactly 1 + the acknowledged increments');
  });
});

describe('session races and failures (real store process; some calls delayed or failed on the way)', function () {
  const store = realStore();
  const { closers } = store;

  const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
  /** The real client; `hooks` may delay a call or fail it after the store applied it (as a deadline or a lost connection would). */
  function hookedStore() {
    const hooks: { afterPut?: (value: Buffer) => Promise<void> | void; beforeDelete?: () => Promise<void> | void; beforeGet?: () => void } = {};
    const client: SessionBackend = {
      get: async (key, options) => {
        hooks.beforeGet?.();
        return store.client.get(key, options);
      },
      put: async (key, value, options) => {
        const entry = await store.client.put(key, value, options);
        await hooks.afterPut?.(value);
        return entry;
      },
      delete: async (key, options) => {
        await hooks.beforeDelete?.();
        return store.client.delete(key, options);
      },
    };
    return { client, hooks };
  }
  async function serve(client: SessionBackend, options: Partial<SessionOptions> = {}) {
    const served = await serveApp(renewApp(client, options));
    closers.push(served.close);
    return served.base;
  }
  const call = async (base: string, method: string, path: string, cookie = '') => {
    const res = await fetch(base + path, { method, headers: { cookie } });
    const body = (await res.json()) as Record<string, unknown>;
    const setCookies = res.headers.getSetCookie();
    const set = /^(?:__Host-)?sid=([^;]*)/.exec(setCookies[0] ?? '')?.[1];
    return { status: res.status, body, set, setCookies };
  };
  const stored = async (cookieValue: string) => (await store.client.get(idOf(cookieValue)))?.value.toString();

  it('an update that writes nothing is checked against the store: a later write by another process is not silently undone', async () => {
    const slow = hookedStore();
    const a = await serve(slow.client);
    const b = await serve(store.client); // a second process: its own locks and memory
    const first = await call(a, 'POST', '/set?mode=x');
    const cookie = `sid=${first.set}`;
    // A's write of mode=a reaches the store, but its answer takes 300 ms to come back.
    let delay = true;
    slow.hooks.afterPut = async (value) => {
      if (delay && value.toString().includes('"mode":"a"')) {
        delay = false;
        await sleep(300);
      }
    };
    const r1 = call(a, 'POST', '/set?mode=a', cookie);
    await sleep(50);
    await call(b, 'POST', '/set?mode=b', cookie); // done while r1's answer is on its way
    const r2 = await call(a, 'POST', '/set?mode=a', cookie); // sent after B's write: it must win
    await r1;
    assert.equal(r2.status, 200);
    assert.match((await stored(first.set!))!, /"mode":"a"/);
  });

  it('an update after a get() of the same request, that writes nothing, is checked against the store: a write since the get() is not silently undone', async () => {
    for (const processes of [1, 2]) {
      const a = await serve(store.client);
      const b = processes === 1 ? a : await serve(store.client);
      const first = await call(a, 'POST', '/set?mode=a');
      const cookie = `sid=${first.set}`;
      // r1 reads mode=a, and 300 ms later sets mode=a: after r2's write of mode=b was answered.
      const r1 = call(a, 'POST', '/check-then-set?mode=a&waitMs=300', cookie);
      await sleep(100);
      assert.equal((await call(b, 'POST', '/set?mode=b', cookie)).body.mode, 'b');
      assert.equal((await r1).body.mode, 'a');
      assert.match((await stored(first.set!))!, /"mode":"a"/, `${processes} process(es): the update answered last is the one stored`);
    }
  });

  it('with maxUpdateTries 1, an update that changes nothing still succeeds: reading the store again uses up no try', async () => {
    const base = await serve(store.client, { maxUpdateTries: 1 });
    const first = await call(base, 'POST', '/set?mode=a');
    const cookie = `sid=${first.set}`;
    const again = await call(base, 'POST', '/set?mode=a', cookie); // from what this process wrote last
    const checked = await call(base, 'POST', '/check-then-set?mode=a', cookie); // from the request's own get()
    assert.deepEqual([again.status, checked.status], [200, 200], JSON.stringify([again.body, checked.body]));
  });

  it('with maxUpdateTries 1, a browser whose requests alternate between two processes is never refused: a remembered version another process made stale is read again without using up the try', async () => {
    const a = await serve(store.client, { maxUpdateTries: 1 });
    const b = await serve(store.client, { maxUpdateTries: 1 });
    const first = await call(a, 'POST', '/inc');
    const cookie = `sid=${first.set}`;
    const answers = [];
    // One request at a time: nothing races, each process only remembers a version the other has since replaced.
    for (let i = 0; i < 6; i += 1) answers.push(await call(i % 2 === 0 ? b : a, 'POST', '/inc', cookie));
    assert.deepEqual(
      answers.map((r) => [r.status, r.body.n]),
      Array.from({ length: 6 }, (_, i) => [200, i + 2]),
    );
  });

  it('the process that regenerated lets the old id in until the deadline its forward holds, not a whole grace window after the write answered', async () => {
    const slow = hookedStore();
    const a = await serve(slow.client, { regenerateGraceMs: 300 });
    const b = await serve(store.client, { regenerateGraceMs: 300 });
    const planted = await call(a, 'POST', '/set?mode=secret');
    const oldCookie = `sid=${planted.set}`;
    let forward = '';
    slow.hooks.afterPut = async (value) => {
      if (!value.toString().startsWith('moved:')) return;
      forward = value.toString();
      await sleep(400); // applied; its answer takes longer than the grace window
    };
    const login = await call(a, 'POST', '/renew', oldCookie);
    slow.hooks.afterPut = undefined;
    assert.ok(login.set && idOf(login.set) !== idOf(planted.set));
    assert.ok(Number(/:(\d+)$/.exec(forward)?.[1]) <= Date.now(), 'the forward\'s deadline has passed');
    assert.deepEqual((await call(b, 'GET', '/state', oldCookie)).body, {}, 'another process');
    assert.deepEqual((await call(a, 'GET', '/state', oldCookie)).body, {}, 'the process that regenerated');
  });

  it('an id more regenerations old than a request follows gets a 503 to retry, never an empty session nor a logout that deletes nothing', async () => {
    const a = await serve(store.client);
    const b = await serve(store.client); // processes that have not seen the moves
    const c = await serve(store.client);
    const first = await call(a, 'POST', '/set?mode=secret');
    let cookie = `sid=${first.set}`;
    for (let i = 0; i < 5; i += 1) cookie = `sid=${(await call(a, 'POST', '/renew', cookie)).set}`;
    const read = await call(b, 'GET', '/state', `sid=${first.set}`);
    assert.ok(read.status === 503 || read.body.mode === 'secret', JSON.stringify(read.body));
    const logout = await call(c, 'POST', '/logout', `sid=${first.set}`);
    if (logout.status === 503) {
      assert.deepEqual(logout.setCookies, [], 'the cookie is kept for the retry');
      assert.equal(await stored(cookie.slice(4)), '{"mode":"secret"}');
      // The retry goes further: this process learned the moves it followed.
      assert.equal((await call(c, 'POST', '/logout', `sid=${first.set}`)).status, 200);
    }
    assert.equal(await stored(cookie.slice(4)), undefined, 'the logout through the old id ended the session');
  });

  it('a write that failed after the store applied it leaves nothing stale behind for the next update in the queue', async () => {
    const flaky = hookedStore();
    const a = await serve(flaky.client);
    const first = await call(a, 'POST', '/set?mode=x');
    const cookie = `sid=${first.set}`;
    flaky.hooks.afterPut = async (value) => {
      await sleep(50); // keeps the queue busy, so r1 and r2 wait behind r0
      if (value.toString().includes('"mode":"y"')) throw new StoreClientError('unavailable', status.DEADLINE_EXCEEDED, 'deadline exceeded');
    };
    const r0 = call(a, 'POST', '/set?mode=x2', cookie);
    await sleep(10);
    const r1 = call(a, 'POST', '/set?mode=y', cookie);
    await sleep(10);
    const r2 = call(a, 'POST', '/set?mode=x2', cookie);
    const results = await Promise.all([r0, r1, r2]);
    flaky.hooks.afterPut = undefined;
    assert.deepEqual(results.map((r) => r.status), [200, 500, 200]);
    assert.match((await stored(first.set!))!, /"mode":"x2"/, 'r2 answered last with success: its value is stored');
  });

  /**
   * Two processes on one session (within one process its lock would order the two requests): the
   * first's store holds the given step of its first call for 150 ms, while the other goes ahead.
   */
  async function twoProcessesOneHeld(step: 'afterPut' | 'beforeDelete') {
    const slow = hookedStore();
    const base = await serve(slow.client);
    const other = await serve(store.client);
    const first = await call(base, 'POST', '/set?mode=x');
    let held = false;
    slow.hooks[step] = async () => {
      if (held) return;
      held = true;
      await sleep(150);
    };
    return { base, other, first, cookie: `sid=${first.set}` };
  }

  it('a logout racing a login (update, then regenerate) in another process deletes the session wherever the login moved it', async () => {
    // The logout's delete is on its way while the login runs.
    const { base, other, cookie } = await twoProcessesOneHeld('beforeDelete');
    const logout = call(base, 'POST', '/logout', cookie);
    await sleep(20);
    const login = await call(other, 'POST', '/login', cookie);
    const out = await logout;
    assert.equal(out.status, 200);
    assert.equal(login.status, 200);
    const state = await call(base, 'GET', '/state', `sid=${login.set}`);
    assert.deepEqual(state.body, {}, 'the logged-in session is gone too');
    assert.equal(await stored(login.set!), undefined);
  });

  it('two logins at once in two processes (a double submit behind a round-robin balancer): one moves the session, the other changes nothing and is sent no id, as within one process (no 503)', async () => {
    // The copy is written; the other process moves the session before the forward.
    const { base, other, first, cookie } = await twoProcessesOneHeld('afterPut');
    const slowRenew = call(base, 'POST', '/renew', cookie);
    await sleep(20);
    const renew = await call(other, 'POST', '/renew', cookie);
    const late = await slowRenew;
    assert.equal(renew.status, 200);
    assert.ok(renew.set && idOf(renew.set) !== idOf(first.set), 'the first to write its forward moved the session');
    assert.equal(late.status, 200, JSON.stringify(late.body));
    assert.deepEqual(late.setCookies, [], 'the other changed nothing and was sent no id');
    assert.deepEqual((await call(base, 'GET', '/state', `sid=${renew.set}`)).body, { mode: 'x' }, 'the moved session keeps its data');
  });

  it("secure: 'always' behind a TLS proxy that forwards plain HTTP: logout clears the __Host- cookie (no 500)", async () => {
    const base = await serve(store.client, { secure: 'always' });
    const first = await call(base, 'POST', '/set?mode=x');
    assert.match(first.setCookies[0], /^__Host-sid=.*; secure/);
    const out = await call(base, 'POST', '/logout', `__Host-sid=${first.set}`);
    assert.equal(out.status, 200, JSON.stringify(out.body));
    assert.match(out.setCookies[0], /^__Host-sid=;.*expires=Thu, 01 Jan 1970/);
    assert.equal(await stored(first.set!), undefined);
  });

  it('a login whose forward write was applied but reported failed still hands the browser the new id; one that was not applied leaves the old session as it was', async () => {
    const flaky = hookedStore();
    const base = await serve(flaky.client);
    const first = await call(base, 'POST', '/set?mode=x');
    flaky.hooks.afterPut = (value) => {
      if (value.toString().startsWith('moved:')) throw new StoreClientError('unavailable', status.DEADLINE_EXCEEDED, 'deadline exceeded');
    };
    const login = await call(base, 'POST', '/login', `sid=${first.set}`);
    flaky.hooks.afterPut = undefined;
    assert.equal(login.status, 200, JSON.stringify(login.body));
    assert.ok(login.set && idOf(login.set) !== idOf(first.set), 'the new id');
    assert.match((await stored(login.set))!, /"user":"alice"/);

    const second = await call(base, 'POST', '/set?mode=y');
    const before = await store.client.get(idOf(second.set));
    let copy: string | undefined;
    const refusing: SessionBackend = {
      ...flaky.client,
      put: async (key, value, options) => {
        if (value.toString().startsWith('moved:')) throw new StoreClientError('unavailable', status.UNAVAILABLE, 'connection lost');
        if (key !== idOf(second.set)) copy = key;
        return flaky.client.put(key, value, options);
      },
    };
    const refused = await call(await serve(refusing), 'POST', '/renew', `sid=${second.set}`);
    assert.equal(refused.status, 500);
    assert.equal(refused.set, undefined);
    assert.deepEqual(await store.client.get(idOf(second.set)), before, 'the old session is as it was');
    assert.ok(copy, 'a copy was written');
    assert.equal(await store.client.get(copy), null, 'and deleted again');
  });

  it('a login whose forward write and the read checking it both failed still hands the browser the new id: updates it acknowledged meanwhile outlive the grace window', async () => {
    const flaky = hookedStore();
    const base = await serve(flaky.client, { regenerateGraceMs: 300 });
    const lost = () => new StoreClientError('unavailable', status.UNAVAILABLE, 'connection lost', { outcomeUnknown: true });
    // The forward reached the store but its answer did not come back, nor did the read that checks it.
    const first = await call(base, 'POST', '/inc');
    flaky.hooks.afterPut = (value) => {
      if (!value.toString().startsWith('moved:')) return;
      flaky.hooks.beforeGet = () => {
        flaky.hooks.beforeGet = undefined;
        throw lost();
      };
      throw lost();
    };
    const login = await call(base, 'POST', '/renew', `sid=${first.set}`);
    flaky.hooks.afterPut = undefined;
    assert.equal(login.status, 500, JSON.stringify(login.body));
    assert.ok(login.set && idOf(login.set) !== idOf(first.set), 'the new id, though the login failed');
    const cookie = `sid=${login.set}`;
    assert.deepEqual((await call(base, 'POST', '/inc', cookie)).body, { n: 2, sawEmpty: false });
    await sleep(400);
    assert.deepEqual((await call(base, 'POST', '/inc', cookie)).body, { n: 3, sawEmpty: false }, 'after the grace window the browser still has its session');
    assert.deepEqual((await call(base, 'GET', '/state', `sid=${first.set}`)).body, {}, 'and the old id leads nowhere');

    // The same failures, but the forward never reached the store: the old id keeps the session as
    // it was, and the browser goes on with the copy it was sent.
    const second = await call(base, 'POST', '/inc');
    flaky.client.put = async (key, value, options) => {
      if (!value.toString().startsWith('moved:')) return store.client.put(key, value, options);
      flaky.hooks.beforeGet = () => {
        flaky.hooks.beforeGet = undefined;
        throw lost();
      };
      throw lost();
    };
    const refused = await call(base, 'POST', '/renew', `sid=${second.set}`);
    assert.equal(refused.status, 500);
    assert.ok(refused.set && idOf(refused.set) !== idOf(second.set));
    await sleep(400);
    assert.deepEqual((await call(base, 'POST', '/inc', `sid=${refused.set}`)).body, { n: 2, sawEmpty: false });
    assert.deepEqual((await call(base, 'GET', '/state', `sid=${second.set}`)).body, { n: 1 });
  });

  it('update() refuses what serializes to no JSON object (a Date, a toJSON giving an array) or a promise (an async function) and writes nothing: the session keeps its data', async () => {
    const a = await serve(store.client);
    const first = await call(a, 'POST', '/inc');
    for (const kind of ['date', 'array', 'async']) {
      const out = await call(a, 'POST', `/replace?kind=${kind}`, `sid=${first.set}`);
      assert.equal(out.status, 500, kind);
      assert.match(String(out.body.error), /must return a plain object/, kind);
      assert.equal(out.setCookies.length, 0, kind);
    }
    assert.deepEqual((await call(a, 'GET', '/state', `sid=${first.set}`)).body, { n: 1 });
  });

  it('updates one request makes at once all count, also when the first of them starts the session: one session, one cookie, every change in it', async () => {
    const counted = countingStore(store.client);
    const base = await serve(counted);
    const names = ['a', 'b', 'c', 'd', 'e'];
    const fresh = await call(base, 'POST', `/set-many?names=${names.join(',')}`);
    assert.equal(fresh.setCookies.length, 1, fresh.setCookies.join(' | '));
    const expected = Object.fromEntries(names.map((name) => [name, true]));
    assert.deepEqual((await call(base, 'GET', '/state', `sid=${fresh.set}`)).body, expected, 'the session the browser holds has every change');
    const created = new Set(counted.calls.filter((c) => c.method === 'put').map((c) => c.key));
    assert.deepEqual([...created], [idOf(fresh.set)], 'no other session was written');
    const more = await call(base, 'POST', '/set-many?names=f,g,h', `sid=${fresh.set}`);
    assert.deepEqual(more.body, { ...expected, f: true, g: true, h: true });
  });

  it('after destroy(), ctx.session.id is no id until a later call of the request sends a new one: never the id just deleted', async () => {
    const a = await serve(store.client);
    const first = await call(a, 'POST', '/inc');
    const out = await call(a, 'POST', '/logout-form', `sid=${first.set}`);
    assert.equal(out.body.idAfterDestroy, null, 'the browser holds no id once the cookie is cleared');
    assert.equal(out.setCookies.length, 1, out.setCookies.join(' | '));
    assert.notEqual(idOf(out.set), idOf(first.set));
    assert.equal(out.body.id, idOf(out.set), 'the id csrfToken() issued is the one sent');
  });

  it('a request carrying the id a login replaced reaches the session within the grace window but is never told the new id (session fixation)', async () => {
    const base = await serve(store.client);
    const planted = await call(base, 'POST', '/set?mode=x'); // an id an attacker obtained and planted in the victim's browser
    const login = await call(base, 'POST', '/login', `sid=${planted.set}`);
    assert.ok(login.set && idOf(login.set) !== idOf(planted.set), 'the login got a new id');
    const attacker = await call(base, 'GET', '/state', `sid=${planted.set}`);
    assert.deepEqual(attacker.setCookies, [], 'no cookie, so not the new id');
    const again = await call(base, 'POST', '/set?mode=y', `sid=${planted.set}`);
    assert.deepEqual(again.setCookies, [], 'nor on an update through the old id');
    assert.match((await stored(login.set!))!, /"mode":"y"/, 'which reached the session (the grace window keeps parallel requests working)');
  });

  it('a request carrying the id a login replaced cannot regenerate the session again: it is sent no id, and after the grace window the logged-in browser still has the session (session fixation)', async () => {
    const base = await serve(store.client, { regenerateGraceMs: 300 });
    const planted = await call(base, 'POST', '/set?mode=x');
    const login = await call(base, 'POST', '/login', `sid=${planted.set}`);
    const attacker = await call(base, 'POST', '/renew', `sid=${planted.set}`);
    assert.equal(attacker.status, 200);
    assert.deepEqual(attacker.setCookies, [], 'no live id of the session for whoever holds the old one');
    await sleep(400);
    assert.deepEqual((await call(base, 'GET', '/state', `sid=${login.set}`)).body, { mode: 'x', user: 'alice' }, 'the logged-in browser keeps its session');
    assert.deepEqual((await call(base, 'GET', '/state', `sid=${planted.set}`)).body, {}, 'and the old id leads nowhere');
  });

  it('a request carrying the id a login replaced gets no form token nor ctx.session.id that the logged-in browser holds; its token works with its own cookie only', async () => {
    const base = await serve(store.client);
    const planted = await call(base, 'POST', '/set?mode=x');
    const login = await call(base, 'POST', '/login', `sid=${planted.set}`);
    const attacker = await call(base, 'GET', '/form', `sid=${planted.set}`);
    assert.deepEqual(attacker.body.data, { mode: 'x', user: 'alice' }, 'within the grace window the old id reaches the session');
    assert.equal(attacker.body.id, idOf(planted.set), 'ctx.session.id is the id the request carried, not the new one');
    const token = encodeURIComponent(String(attacker.body.csrf));
    const victim = await call(base, 'POST', `/checked?token=${token}`, `sid=${login.set}`);
    assert.deepEqual(victim.body, { accepted: false }, "the old id's page carries no token for the new id");
    const own = await call(base, 'POST', `/checked?token=${token}`, `sid=${planted.set}`);
    assert.deepEqual(own.body, { accepted: true }, 'the token is for the cookie the request carried');
    const fresh = await call(base, 'GET', '/form', `sid=${login.set}`);
    const accepted = await call(base, 'POST', `/checked?token=${encodeURIComponent(String(fresh.body.csrf))}`, `sid=${login.set}`);
    assert.deepEqual(accepted.body, { accepted: true }, "the new id's own page token is accepted");
  });

  it('requests whose client went away while they waited for the session give up their turn: the next one is not held up by them', async () => {
    const slow = hookedStore();
    const base = await serve(slow.client);
    const first = await call(base, 'POST', '/set?mode=x');
    const cookie = `sid=${first.set}`;
    slow.hooks.afterPut = async () => {
      await sleep(500); // every write runs into a 500 ms deadline, as against a frozen store
      throw new StoreClientError('unavailable', status.DEADLINE_EXCEEDED, 'deadline exceeded');
    };
    // Ten reloads, each abandoned by the browser after 100 ms.
    await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        fetch(`${base}/set?mode=r${i}`, { method: 'POST', headers: { cookie }, signal: AbortSignal.timeout(100) }).catch(() => undefined),
      ),
    );
    const started = Date.now();
    const last = await call(base, 'POST', '/set?mode=last', cookie);
    const waited = Date.now() - started;
    slow.hooks.afterPut = undefined;
    assert.equal(last.status, 500);
    assert.ok(waited < 1500, `answered after ${waited} ms: at most the one write under way and its own, not ten`);
  });

  it('requests still waiting for a busy session after maxQueueWaitMs get a 503 and change nothing, instead of waiting for every turn ahead', async () => {
    const slow = hookedStore();
    const base = await serve(slow.client, { maxQueueWaitMs: 400 });
    const first = await call(base, 'POST', '/set?mode=x');
    const cookie = `sid=${first.set}`;
    slow.hooks.afterPut = async () => {
      await sleep(300); // each write takes 300 ms, as against a store near its deadline
    };
    // Six requests of one browser queue on its session: without a bound the last waits 1.8 s.
    const started = Date.now();
    const answers = await Promise.all(
      Array.from({ length: 6 }, async (_, i) => {
        const res = await call(base, 'POST', `/set?mode=q${i}`, cookie);
        return { ...res, ms: Date.now() - started };
      }),
    );
    slow.hooks.afterPut = undefined;
    const served = answers.filter((a) => a.status === 200);
    const busy = answers.filter((a) => a.status === 503);
    assert.equal(served.length + busy.length, 6, JSON.stringify(answers.map((a) => a.status)));
    assert.ok(busy.length >= 2, `some gave up (${busy.length})`);
    assert.ok(served.length >= 1, 'the first ones were served');
    for (const a of answers) assert.ok(a.ms < 1200, `answered after ${a.ms} ms: at most the wait and one turn`);
    assert.match(String(busy[0].body.error), /busy/);
    const mode = JSON.parse((await stored(first.set!))!).mode as string;
    const servedModes = served.map((a) => `q${answers.indexOf(a)}`);
    assert.ok(servedModes.includes(mode), `the stored mode ${mode} is one a served request wrote, not one of a refused request`);
  });

  it('a rolling read near the end of the absolute lifetime does not slide the entry past it', async () => {
    const base = await serve(store.client, { idleTtlMs: 60_000, absoluteTtlMs: 60_500 });
    const first = await call(base, 'POST', '/set?mode=x');
    await sleep(1500); // now less than the idle timeout is left of the absolute lifetime
    await call(base, 'GET', '/state', `sid=${first.set}`);
    const entry = (await store.client.get(idOf(first.set)))!;
    // A few ms of slack: the web and the store read their clocks a call apart.
    const past = entry.expiresAtMs - (entry.createdAtMs + 60_500);
    assert.ok(past <= 50, `expires ${past} ms past the absolute end`);
  });
});

describe('a frozen store (real web and store processes)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let web: Proc;

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir, { STORE_SYNCHRONOUS: 'NORMAL' });
    web = await startWeb(store.port, tmp.dir, { STORE_DEADLINE_MS: '500' });
  });
  after(async () => {
    store?.child.kill('SIGCONT');
    await web?.stop();
    await store?.stop();
    tmp?.remove();
  });

  it('increments answered 503 while the store was frozen are not applied when it resumes: the counter equals the 303 answers', async () => {
    const jar = new CookieJarClient(`http://127.0.0.1:${web.port}`);
    // The first request also connects the web to the store, which can take longer than the 500 ms
    // deadline on a busy machine: its 503 page has no form token, and every increment would be a 403.
    let first = await jar.page();
    for (let i = 0; first.status !== 200 && i < 10; i += 1) first = await jar.page();
    assert.equal(first.status, 200, 'the session exists before the store is frozen');
    const { csrf } = first;
    const statuses: number[] = [];
    const increment = async () => {
      const res = await jar.post('/increment', { _csrf: csrf }, false);
      await res.arrayBuffer();
      statuses.push(res.status);
    };
    for (let i = 0; i < 10; i += 1) await increment();
    // Frozen and resumed between two requests, with none in flight: a write the store applied just
    // before its deadline but answered after it (outcome unknown, inherent) cannot happen here.
    store.child.kill('SIGSTOP');
    const frozenAt = Date.now();
    try {
      while (Date.now() - frozenAt < 1500) await increment();
      // Well past the deadline of the last request: its write waits in the socket buffers.
      await new Promise((r) => setTimeout(r, 100));
    } finally {
      store.child.kill('SIGCONT');
    }
    for (let i = 0; i < 10; i += 1) await increment();
    const page = await jar.page();
    assert.deepEqual([...new Set(statuses)].sort(), [303, 503], `only 303 and 503 answers: ${statuses.join(' ')}`);
    assert.equal(page.count2, statuses.filter((s) => s === 303).length, `answers: ${statuses.join(' ')}`);
  });
});

describe("an app's own types for its session data (real store process)", () => {
  const store = realStore();

  it('an interface types get<T>() and update<T>() without casts (this file compiles), and the data round-trips as JSON', async () => {
    interface Cart {
      items: number;
      owner?: string;
    }
    const app = new Koa();
    app.use(sessionMiddleware({ store: store.client, keys: [TEST_KEY] }));
    app.use(async (ctx) => {
      const before = await ctx.session.get<Cart>();
      const cart = await ctx.session.update<Cart>((c) => ({ ...c, items: (c?.items ?? 0) + 1, owner: 'ann' }));
      const items: number = cart.items;
      ctx.body = { before: before?.items ?? null, items };
    });
    const served = await serveApp(app);
    store.closers.push(served.close);
    const jar = new CookieJarClient(served.base);
    assert.deepEqual(await (await jar.get('/')).json(), { before: null, items: 1 });
    assert.deepEqual(await (await jar.get('/')).json(), { before: 1, items: 2 });
  });
});
