import assert from 'node:assert/strict';
import { once } from 'node:events';
import { type IncomingHttpHeaders, request } from 'node:http';
import { connect } from 'node:net';
import { gzipSync } from 'node:zlib';
import { Server, ServerCredentials, ServerInterceptingCall, type ServerInterceptor } from '@grpc/grpc-js';
import pino from 'pino';
import { createPipeClient } from '../services/client/pipe-client';
import { createStoreClient, type StoreClient } from '../services/client/store-client';
import { SqliteBackend } from '../services/store/backends/sqlite';
import { loadStoreConfig } from '../services/store/config';
import { StoreHealth } from '../services/store/health';
import { createStoreServer } from '../services/store/server';
import { createApp } from '../services/web/app';
import { WebMetrics } from '../services/web/metrics';
import { createStoreReadiness, type ReadinessCheck } from '../services/web/readiness';
import { CookieJarClient } from './helpers/browser';
import { startStore, TEST_KEY, tempDir } from './helpers/procs';
import { countingStore, memoryLogger, serveApp, startStoreWithClient, waitFor } from './helpers/web-app';
import { parsePrometheus } from './helpers/prometheus';

describe('web over HTTP (createApp over a real store process)', function () {
  let store: Awaited<ReturnType<typeof startStoreWithClient>>;
  let readiness: ReadinessCheck;
  const closers: Array<() => Promise<void>> = [];

  before(async () => {
    store = await startStoreWithClient();
    readiness = createStoreReadiness({ address: store.address, timeoutMs: 500 });
  });
  after(async () => {
    for (const close of closers.reverse()) await close();
    readiness?.close();
    await store?.stop();
  });

  async function site(options: { trustProxy?: boolean; hstsMaxAgeS?: number } = {}) {
    const counted = countingStore(store.client);
    const logs = memoryLogger('info');
    const metrics = new WebMetrics();
    const app = createApp({ store: counted, session: { keys: [TEST_KEY] }, logger: logs.logger, metrics, readiness, ...options });
    const served = await serveApp(app);
    closers.push(served.close);
    return { base: served.base, counted, logs, metrics };
  }

  describe('security headers', () => {
    it('pages carry a CSP with no inline script and frame-ancestors none (X-Frame-Options DENY), nosniff, a Referrer-Policy, a Permissions-Policy denying powerful features, and Cache-Control: no-store', async () => {
      const { base } = await site();
      const jar = new CookieJarClient(base);
      const home = await jar.get('/');
      const html = await home.text();
      const csp = home.headers.get('content-security-policy') ?? '';
      assert.match(csp, /default-src 'none'/);
      assert.match(csp, /frame-ancestors 'none'/);
      assert.equal(home.headers.get('x-frame-options'), 'DENY', 'the same answer for browsers that read only X-Frame-Options');
      assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
      assert.doesNotMatch(csp, /script-src/, 'no script source at all: default-src none applies');
      assert.doesNotMatch(html, /<script(?![^>]*\bsrc=)/i, 'no inline script in the page');
      assert.equal(home.headers.get('x-content-type-options'), 'nosniff');
      assert.ok(home.headers.get('referrer-policy'), 'Referrer-Policy is set');
      assert.match(home.headers.get('permissions-policy') ?? '', /(^|, )camera=\(\)(, |$)/, 'no powerful browser feature for this origin or its frames');
      assert.match(home.headers.get('permissions-policy') ?? '', /(^|, )geolocation=\(\)(, |$)/);
      assert.equal(home.headers.get('cache-control'), 'no-store');
      const csrf = /name="_csrf" value="([^"]+)"/.exec(html)?.[1] ?? '';
      const redirect = await jar.post('/increment', { _csrf: csrf }, false);
      assert.equal(redirect.status, 303);
      assert.equal(redirect.headers.get('cache-control'), 'no-store', 'a response that wrote the session');
      const missing = await jar.get('/nowhere');
      assert.equal(missing.status, 404);
      assert.equal(missing.headers.get('cache-control'), 'no-store', 'error pages');
      assert.match(missing.headers.get('content-security-policy') ?? '', /frame-ancestors 'none'/, 'error pages too');
    });

    it('Strict-Transport-Security (one year, no includeSubDomains) only on HTTPS requests: never over plain HTTP, nor because a client says X-Forwarded-Proto without a trusted proxy; HSTS max-age 0 sends none', async () => {
      const https = { 'x-forwarded-proto': 'https' };
      const hsts = async (base: string, path: string, headers: Record<string, string> = {}) => (await fetch(base + path, { headers })).headers.get('strict-transport-security');
      const proxied = await site({ trustProxy: true });
      assert.equal(await hsts(proxied.base, '/', https), 'max-age=31536000');
      assert.equal(await hsts(proxied.base, '/nowhere', https), 'max-age=31536000', 'error pages too');
      assert.equal(await hsts(proxied.base, '/static/style.css', https), 'max-age=31536000', 'static files too');
      assert.equal(await hsts(proxied.base, '/'), null, 'plain HTTP');
      const direct = await site();
      assert.equal(await hsts(direct.base, '/', https), null, 'X-Forwarded-Proto from a client that is not a trusted proxy');
      const off = await site({ trustProxy: true, hstsMaxAgeS: 0 });
      assert.equal(await hsts(off.base, '/', https), null, 'max-age 0: none sent');
      const twoYears = await site({ trustProxy: true, hstsMaxAgeS: 63_072_000 });
      assert.equal(await hsts(twoYears.base, '/', https), 'max-age=63072000');
    });
  });

  describe('methods and paths the site does not serve', () => {
    /** node:http sends the method and path as given (fetch refuses TRACE and resolves %2e%2e). */
    const raw = (base: string, method: string, path: string) =>
      new Promise<{ status: number; headers: IncomingHttpHeaders; body: string }>((resolve, reject) => {
        const { hostname, port } = new URL(base);
        request({ host: hostname, port, method, path }, (res) => {
          let body = '';
          res.setEncoding('utf8').on('data', (chunk: string) => (body += chunk));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
        })
          .on('error', reject)
          .end();
      });

    it('405 and 501 are error pages with Allow and Cache-Control: no-store, static files included; OPTIONS and HEAD still work; a path out of /static/ is a 404 page', async () => {
      const { base, logs } = await site();
      const cases: Array<[string, string, number, string]> = [
        ['PUT', '/', 405, 'Method not allowed'],
        ['DELETE', '/healthz', 405, 'Method not allowed'],
        ['PUT', '/static/style.css', 405, 'Method not allowed'],
        ['POST', '/static/missing.css', 405, 'Method not allowed'],
        ['PROPFIND', '/', 501, 'Not supported'],
        ['TRACE', '/', 501, 'Not supported'],
        ['GET', '/static/%2e%2e/%2e%2e/app.ts', 404, 'Page not found'],
        ['GET', '/static/..%2f..%2fapp.ts', 404, 'Page not found'],
      ];
      for (const [method, path, status, title] of cases) {
        const what = `${method} ${path}`;
        const res = await raw(base, method, path);
        assert.equal(res.status, status, what);
        assert.match(res.headers['content-type'] ?? '', /text\/html/, what);
        assert.match(res.body, new RegExp(`<h1>${title}</h1>`), what);
        assert.equal(res.headers['cache-control'], 'no-store', what);
        if (status !== 404) assert.equal(res.headers.allow, 'HEAD, GET', what);
      }
      const options = await raw(base, 'OPTIONS', '/');
      assert.deepEqual([options.status, options.headers.allow, options.body], [200, 'HEAD, GET', '']);
      const staticOptions = await raw(base, 'OPTIONS', '/static/style.css');
      assert.deepEqual([staticOptions.status, staticOptions.headers.allow, staticOptions.body], [200, 'HEAD, GET', '']);
      const head = await raw(base, 'HEAD', '/');
      assert.equal(head.status, 200);
      assert.equal((await raw(base, 'GET', '/static/style.css')).status, 200);
      assert.equal(logs.entries().filter((e) => (e.level as number) >= 50).length, 0, 'nothing was logged as an error');
    });
  });

  describe('form bodies', () => {
    it('an oversized, mis-encoded or undecodable form body gets a 400 or 413 page, never a 500, and changes nothing', async () => {
      const { base, logs } = await site();
      const jar = new CookieJarClient(base);
      const { csrf } = await jar.page();
      const form = 'application/x-www-form-urlencoded';
      const cases: Array<[string, number, Record<string, string>, BodyInit]> = [
        ['a 9 KB form', 413, { 'content-type': form }, `_csrf=${csrf}&pad=${'x'.repeat(9 * 1024)}`],
        ['gzip that is not gzip', 400, { 'content-type': form, 'content-encoding': 'gzip' }, 'not gzip at all'],
        ['an unknown content encoding', 400, { 'content-type': form, 'content-encoding': 'zstd-but-not-really' }, `_csrf=${csrf}`],
        ['gzip that inflates past the limit', 413, { 'content-type': form, 'content-encoding': 'gzip' }, gzipSync(`_csrf=${csrf}&pad=${'x'.repeat(64 * 1024)}`)],
        ['broken percent-encoding', 403, { 'content-type': form }, '_csrf=%E0%A4%A&x=%'],
        ['a token given as an array', 403, { 'content-type': form }, `_csrf[]=${csrf}`],
      ];
      for (const [what, status, headers, body] of cases) {
        const res = await jar.request('/increment', { method: 'POST', headers, body });
        assert.equal(res.status, status, what);
        assert.match(res.headers.get('content-type') ?? '', /text\/html/, `${what}: an HTML page`);
        await res.text();
      }
      const after = await jar.page();
      assert.deepEqual([after.count1, after.count2], [1, 0], 'no counter changed');
      assert.equal(logs.entries().filter((e) => e.level === 50).length, 0, 'nothing was logged as an error');
    });

    it('a body refused part-way (a chunked form past the limit, gzip that breaks off) does not stall its kept-alive connection: the next request on it is answered', async () => {
      const { base } = await site();
      const { port } = new URL(base);
      const head = 'POST /increment HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n';
      const chunked = `a=${'x'.repeat(2_000_000)}`;
      const broken = Buffer.concat([gzipSync('a=b'), Buffer.alloc(2_000_000, 'x')]);
      const cases: Array<[string, number, Buffer]> = [
        ['a 2 MB chunked form', 413, Buffer.from(`${head}Transfer-Encoding: chunked\r\n\r\n${chunked.length.toString(16)}\r\n${chunked}\r\n0\r\n\r\n`)],
        ['gzip followed by 2 MB that is not', 400, Buffer.concat([Buffer.from(`${head}Content-Encoding: gzip\r\nContent-Length: ${broken.length}\r\n\r\n`), broken])],
      ];
      for (const [what, status, request] of cases) {
        const answer = await pipelined(Number(port), [request, Buffer.from('GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n')], 5000);
        const statuses = answer.match(/^HTTP\/1\.1 \d{3}/gm) ?? [];
        assert.deepEqual(statuses, [`HTTP/1.1 ${status}`, 'HTTP/1.1 200'], `${what}: its page, then the next request's answer`);
        assert.match(answer, /\{"status":"ok"\}$/, what);
      }
    });
  });

  describe('request ids and the request log', () => {
    it('echoes a sane X-Request-Id, replaces a missing or unsafe one, and logs one line per request with id, method, route, status and duration', async () => {
      const { base, logs } = await site();
      const given = await fetch(base + '/', { headers: { 'x-request-id': 'edge-7f3a:42' } });
      await given.text();
      assert.equal(given.headers.get('x-request-id'), 'edge-7f3a:42');
      const none = await fetch(base + '/static/style.css');
      await none.text();
      assert.match(none.headers.get('x-request-id') ?? '', /^[0-9a-f-]{36}$/);
      const unsafe = await fetch(base + '/nowhere', { headers: { 'x-request-id': 'a b\tc'.repeat(10) } });
      await unsafe.text();
      assert.match(unsafe.headers.get('x-request-id') ?? '', /^[0-9a-f-]{36}$/, 'an unsafe id is not echoed');

      const lines = logs.entries().filter((e) => e.msg === 'request');
      assert.equal(lines.length, 3, 'one line per request');
      assert.deepEqual(
        lines.map((l) => [l.requestId === given.headers.get('x-request-id') || l.requestId === none.headers.get('x-request-id') || l.requestId === unsafe.headers.get('x-request-id'), l.method, l.route, l.status]),
        [
          [true, 'GET', '/', 200],
          [true, 'GET', '/static/*', 200],
          [true, 'GET', 'unmatched', 404],
        ],
      );
      for (const line of lines) assert.equal(typeof line.ms, 'number');
    });

    it("a method a route does not take is logged and counted under that route (405, OPTIONS), not as unmatched", async () => {
      const { base, logs, metrics } = await site();
      // The operations' paths too (logged at debug, as probes).
      assert.equal((await fetch(base + '/healthz', { method: 'POST' })).status, 405);
      assert.equal((await fetch(base + '/metrics', { method: 'OPTIONS' })).status, 200);
      const counted = parsePrometheus(await metrics.registry.metrics());
      assert.equal(counted.get('web_http_requests_total{method="POST",route="/healthz",status="405"}'), 1);
      assert.equal(counted.get('web_http_requests_total{method="OPTIONS",route="/metrics",status="200"}'), 1);
      assert.equal((await fetch(base + '/increment', { method: 'DELETE' })).status, 405);
      assert.equal((await fetch(base + '/', { method: 'OPTIONS' })).status, 200);
      assert.equal((await fetch(base + '/reset')).status, 405);
      assert.equal((await fetch(base + '/static/style.css', { method: 'POST' })).status, 405);
      assert.equal((await fetch(base + '/static/style.css', { method: 'OPTIONS' })).status, 200);
      assert.deepEqual(
        logs.entries().filter((e) => e.msg === 'request').map((l) => [l.method, l.route, l.status]),
        [
          ['DELETE', '/increment', 405],
          ['OPTIONS', '/', 200],
          ['GET', '/reset', 405],
          ['POST', '/static/*', 405],
          ['OPTIONS', '/static/*', 200],
        ],
      );
    });
  });

  describe('the error log', () => {
    it('clients that cut their request short are logged at debug, never as errors; other failures after the response started are errors, at most 10 per 10 s', async () => {
      const logs = memoryLogger('debug');
      const app = createApp({ store: store.client, session: { keys: [TEST_KEY] }, logger: logs.logger, readiness });
      const served = await serveApp(app);
      closers.push(served.close);
      const { port } = new URL(served.base);
      for (let i = 0; i < 30; i += 1) {
        // Announces 100 bytes of form, sends 3, then closes: the HTTP parser fails the request.
        const socket = connect(Number(port), '127.0.0.1');
        socket.on('error', () => undefined).resume();
        socket.end('POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\na=b');
        await once(socket, 'close');
      }
      await waitFor('30 request lines', async () => logs.entries().filter((e) => e.msg === 'request').length === 30, 5000);
      assert.deepEqual(logs.entries().filter((e) => (e.level as number) >= 50), [], 'no error line');
      const abortLines = logs.entries().filter((e) => e.msg === 'client went away before the response was complete');
      assert.equal(abortLines.length, 30);
      assert.ok(abortLines.every((e) => e.level === 20 && /^HPE_/.test(String(e.code))), 'at debug level, with the parser error code');

      for (let i = 0; i < 25; i += 1) app.emit('error', Object.assign(new Error('read failed'), { code: 'EIO' }));
      const failures = logs.entries().filter((e) => e.msg === 'response failed');
      assert.equal(failures.length, 10);
      assert.ok(failures.every((e) => e.level === 50));
    });

    it('a store that refuses the token: every page is the 503 page, and the error saying so is logged at most 10 times per 10 s', async () => {
      const secured = await startStoreWithClient({ STORE_TOKEN: 'store-token-0123456789-abcdefghij' });
      const logs = memoryLogger('info');
      // The store's own client sends no token: the store refuses every call.
      const served = await serveApp(createApp({ store: secured.client, session: { keys: [TEST_KEY] }, logger: logs.logger, readiness }));
      try {
        for (let i = 0; i < 30; i += 1) {
          const res = await fetch(served.base + '/');
          assert.equal(res.status, 503);
          assert.equal(res.headers.get('retry-after'), '1');
          await res.text();
        }
        const refused = logs.entries().filter((e) => e.msg === 'the store refused STORE_TOKEN');
        assert.equal(refused.length, 10);
        assert.ok(refused.every((e) => e.level === 50 && typeof e.requestId === 'string'), 'errors, each with its request id');
      } finally {
        await served.close();
        await secured.stop();
      }
    });
    it('a store that refuses the session TTL: every page fails the same way, and the error is logged at most 10 times per 10 s, not once per page', async () => {
      const narrow = await startStoreWithClient({ STORE_MAX_TTL_MS: '600000' });
      const logs = memoryLogger('info');
      // The default idle TTL (30 min) is above the store's maximum: the store refuses every write.
      const served = await serveApp(createApp({ store: narrow.client, session: { keys: [TEST_KEY] }, logger: logs.logger, readiness }));
      try {
        for (let i = 0; i < 30; i += 1) {
          const res = await fetch(served.base + '/');
          assert.equal(res.status, 500);
          await res.text();
        }
        const failed = logs.entries().filter((e) => e.msg === 'request failed');
        assert.equal(failed.length, 10);
        assert.ok(failed.every((e) => e.level === 50 && typeof e.requestId === 'string'), 'errors, each with its request id');
        assert.equal(logs.entries().filter((e) => e.msg === 'request').length, 30, 'still one request line per page');
      } finally {
        await served.close();
        await narrow.stop();
      }
    });
  });

  describe('metrics and operations endpoints', () => {
    it('GET /metrics is Prometheus text whose request, store-call and session counters move when pages are served', async () => {
      const { base } = await site();
      const scrape = async () => {
        const res = await fetch(base + '/metrics');
        assert.equal(res.status, 200);
        assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
        return parsePrometheus(await res.text());
      };
      const before = await scrape();
      const jar = new CookieJarClient(base);
      await jar.page();
      await jar.page();
      const after = await scrape();
      const delta = (name: string) => (after.get(name) ?? 0) - (before.get(name) ?? 0);
      assert.equal(delta('web_http_requests_total{method="GET",route="/",status="200"}'), 2);
      assert.equal(delta('web_http_request_duration_seconds_count{method="GET",route="/",status="200"}'), 2);
      assert.equal(delta('web_http_requests_total{method="GET",route="/metrics",status="200"}'), 1, 'the first scrape itself');
      assert.equal(delta('web_store_call_duration_seconds_count{method="put",outcome="ok"}'), 2);
      assert.equal(delta('web_store_call_duration_seconds_count{method="get",outcome="ok"}'), 0, 'no reads: a new session, then the version this process remembers');
      assert.equal(delta('web_sessions_total{event="created"}'), 1);
      assert.ok(after.has('process_cpu_user_seconds_total'), 'default process metrics');
      assert.ok(after.has('nodejs_eventloop_lag_seconds'), 'default Node.js metrics');
    });

    it('/healthz, /readyz and /metrics never touch a session: no store call, no cookie, no forged-cookie warning, even with a cookie', async () => {
      const { base, counted, logs } = await site();
      const jar = new CookieJarClient(base);
      await jar.page();
      counted.calls.length = 0;
      for (const cookie of [`sid=${jar.cookies.get('sid')}`, 'sid=forged.value']) {
        for (const path of ['/healthz', '/readyz', '/metrics']) {
          const res = await fetch(base + path, { headers: { cookie } });
          assert.equal(res.status, 200, path);
          assert.deepEqual(res.headers.getSetCookie(), [], `${path}: no cookie`);
          await res.text();
        }
      }
      assert.deepEqual(counted.calls, [], 'no store call');
      assert.equal(logs.entries().filter((e) => String(e.msg).startsWith('suspicious')).length, 0);
    });

    it('/readyz is 200 while the store serves, 503 within its timeout once the store stops, and 200 again by itself after a restart, each change logged once; /healthz stays 200', async () => {
      const own = await startStoreWithClient();
      const logs = memoryLogger('info');
      const check = createStoreReadiness({ address: own.address, timeoutMs: 500, logger: logs.logger });
      const metrics = new WebMetrics({ defaultMetrics: false });
      const app = createApp({ store: own.client, session: { keys: [TEST_KEY] }, logger: logs.logger, metrics, readiness: check });
      const served = await serveApp(app);
      try {
        const ready = await fetch(served.base + '/readyz');
        assert.equal(ready.status, 200);
        assert.deepEqual(await ready.json(), { status: 'ready', store: 'SERVING' });
        const port = own.proc.port;
        await own.proc.stop();
        const started = Date.now();
        const down = await fetch(served.base + '/readyz');
        assert.equal(down.status, 503);
        assert.deepEqual(await down.json(), { status: 'not ready', store: 'UNREACHABLE' });
        assert.ok(Date.now() - started < 1500, 'answered within the timeout');
        assert.equal((await fetch(served.base + '/healthz')).status, 200, 'alive while not ready');
        const page = await fetch(served.base + '/');
        assert.equal(page.status, 503);
        assert.match(parsePrometheus(await metrics.registry.metrics()).get('web_store_call_errors_total{method="put",kind="unavailable"}')?.toString() ?? '', /^[1-9]/);
        const again = await startStore(own.dir, { STORE_SYNCHRONOUS: 'NORMAL' }, port);
        try {
          await waitFor('/readyz to be 200 again', async () => (await fetch(served.base + '/readyz')).status === 200);
          // Each change logged once, however often /readyz was asked.
          assert.deepEqual(
            logs.entries().filter((e) => String(e.msg).startsWith('not ready') || String(e.msg).startsWith('ready')).map((e) => [e.msg, e.store]),
            [
              ['not ready: the store does not serve', 'UNREACHABLE'],
              ['ready: the store serves again', 'SERVING'],
            ],
          );
        } finally {
          await again.stop();
        }
      } finally {
        await served.close();
        check.close();
        await own.stop();
      }
    });
  });
});

describe('the 503 page says whether a change may have been saved (createApp over a real store process)', function () {
  const UNKNOWN = /it is not known whether your last change was saved/;
  const NOT_REACHED = /is not available right now \(down, busy or full\), so your counters could not be read or saved\. Nothing was lost\./;
  const transports: Array<[string, (address: string) => StoreClient]> = [
    ['unary', (address) => createStoreClient({ address, deadlineMs: 700 })],
    ['pipe', (address) => createPipeClient({ address, deadlineMs: 700 })],
  ];

  for (const [name, connect] of transports) {
    it(`${name} client: an increment sent to a frozen store (SIGSTOP) that does not answer in time gets the "not known whether saved" 503 page`, async () => {
      const own = await startStoreWithClient();
      const client = connect(own.address);
      const served = await serveApp(createApp({ store: client, session: { keys: [TEST_KEY] }, logger: memoryLogger('info').logger }));
      try {
        const jar = new CookieJarClient(served.base);
        const { csrf, status } = await jar.page();
        assert.equal(status, 200);
        own.proc.child.kill('SIGSTOP');
        try {
          // The web remembers the session's version: the increment is one compare-and-set put, sent and never answered.
          const res = await jar.post('/increment', { _csrf: csrf }, false);
          const html = await res.text();
          assert.equal(res.status, 503);
          assert.equal(res.headers.get('retry-after'), '1');
          assert.match(html, /<h1>Counters unavailable<\/h1>/);
          assert.match(html, UNKNOWN);
          assert.match(html, /see where they stand before trying again/);
          assert.doesNotMatch(html, /Nothing was lost/);
        } finally {
          own.proc.child.kill('SIGCONT');
        }
      } finally {
        client.close();
        await served.close();
        await own.stop();
      }
    });

    it(`${name} client: an increment while the store is down (connection refused) gets the "nothing was lost" 503 page`, async () => {
      const own = await startStoreWithClient();
      const client = connect(own.address);
      const served = await serveApp(createApp({ store: client, session: { keys: [TEST_KEY] }, logger: memoryLogger('info').logger }));
      try {
        const jar = new CookieJarClient(served.base);
        const { csrf } = await jar.page();
        await own.proc.stop('SIGKILL');
        const res = await jar.post('/increment', { _csrf: csrf }, false);
        const html = await res.text();
        assert.equal(res.status, 503);
        assert.match(html, /<h1>Counters unavailable<\/h1>/);
        assert.match(html, NOT_REACHED);
        assert.doesNotMatch(html, UNKNOWN);
      } finally {
        client.close();
        await served.close();
        await own.stop();
      }
    });
  }
});

describe('request id reaches the store (in-process store server watching what arrives)', () => {
  let tmp: ReturnType<typeof tempDir>;
  let backend: SqliteBackend;
  let server: Server;
  let address: string;
  const metadataIds: Array<{ path: string; requestId: unknown }> = [];
  const batchedIds: Array<[string | undefined, string]> = [];

  before(async () => {
    tmp = tempDir();
    const capture: ServerInterceptor = (method, call) =>
      new ServerInterceptingCall(call, {
        start: (next) =>
          next({
            onReceiveMetadata: (metadata, pass) => {
              metadataIds.push({ path: method.path, requestId: metadata.get('x-request-id')[0] });
              pass(metadata);
            },
            onReceiveMessage: (message: { ops?: Array<{ op?: { $case: string }; requestId: string }> }, pass) => {
              for (const op of message.ops ?? []) batchedIds.push([op.op?.$case, op.requestId]);
              pass(message);
            },
          }),
      });
    const config = loadStoreConfig({ STORE_DATA_DIR: tmp.dir, STORE_SYNCHRONOUS: 'NORMAL' });
    backend = new SqliteBackend(config.sqlite);
    server = createStoreServer({ backend, limits: config.limits, logger: pino({ level: 'silent' }) }, { interceptors: [capture] });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, bound) => (err ? reject(err) : resolve(bound))),
    );
    address = `127.0.0.1:${port}`;
  });
  after(async () => {
    server?.forceShutdown();
    await backend?.close();
    tmp?.remove();
  });

  /** A new visit with one request id, then a second visit of that session with another. */
  async function twoVisits(store: StoreClient): Promise<void> {
    // recentSessions: 0, so the second page reads before it writes: both kinds of call are checked.
    const served = await serveApp(createApp({ store, session: { keys: [TEST_KEY], recentSessions: 0 }, logger: pino({ level: 'silent' }) }));
    try {
      const first = await fetch(served.base + '/', { headers: { 'x-request-id': 'trace-1' } });
      await first.text();
      const cookie = first.headers.getSetCookie()[0].split(';')[0];
      const second = await fetch(served.base + '/', { headers: { 'x-request-id': 'trace-2', cookie } });
      await second.text();
    } finally {
      await served.close();
      store.close();
    }
  }

  it('unary client: every store call made for a page carries that page\'s request id as x-request-id metadata', async () => {
    metadataIds.length = 0;
    await twoVisits(createStoreClient({ address, deadlineMs: 2000 }));
    assert.deepEqual(metadataIds, [
      { path: '/sessions.kv.v1.SessionStore/Put', requestId: 'trace-1' },
      { path: '/sessions.kv.v1.SessionStore/Get', requestId: 'trace-2' },
      { path: '/sessions.kv.v1.SessionStore/Put', requestId: 'trace-2' },
    ]);
  });

  it('pipe client: every operation made for a page carries that page\'s request id in Op.request_id', async () => {
    batchedIds.length = 0;
    await twoVisits(createPipeClient({ address, deadlineMs: 2000 }));
    assert.deepEqual(batchedIds, [
      ['put', 'trace-1'],
      ['get', 'trace-2'],
      ['put', 'trace-2'],
    ]);
  });
});

describe('readiness of a slow store (in-process store server delaying what arrives)', () => {
  it('a store that answers health late and then holds the probe: /readyz answers within one timeout, not the health check\'s and then the store client\'s', async () => {
    const tmp = tempDir();
    const timers = new Set<NodeJS.Timeout>();
    // Health answered after 700 ms of the 1000 ms timeout; the probe's Get (through the pipe) after 5 s.
    const delays: Record<string, number> = { '/grpc.health.v1.Health/Check': 700, '/sessions.kv.v1.SessionStore/Pipe': 5000 };
    const slow: ServerInterceptor = (method, call) =>
      new ServerInterceptingCall(call, {
        start: (next) =>
          next({
            onReceiveMessage: (message, pass) => {
              const timer = setTimeout(() => pass(message), delays[method.path] ?? 0);
              timers.add(timer);
            },
          }),
      });
    const config = loadStoreConfig({ STORE_DATA_DIR: tmp.dir, STORE_SYNCHRONOUS: 'NORMAL' });
    const backend = new SqliteBackend(config.sqlite);
    const server = createStoreServer({ backend, limits: config.limits, logger: pino({ level: 'silent' }) }, { interceptors: [slow] });
    const health = new StoreHealth(backend);
    health.addToServer(server);
    await health.start();
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, bound) => (err ? reject(err) : resolve(bound))),
    );
    const store = createPipeClient({ address: `127.0.0.1:${port}`, deadlineMs: 1000 });
    const readiness = createStoreReadiness({ address: `127.0.0.1:${port}`, timeoutMs: 1000, probe: { store, ttlMs: 60_000 } });
    try {
      const started = Date.now();
      await readiness.check();
      const took = Date.now() - started;
      assert.ok(took < 1400, `answered after ${took} ms`);
    } finally {
      readiness.close();
      store.close();
      health.stop();
      for (const timer of timers) clearTimeout(timer);
      server.forceShutdown();
      await backend.close();
      tmp.remove();
    }
  });
});

describe('readiness of a store that refuses the web\'s TTL and turns slow', () => {
  it('a probe the store answers too late keeps the web not ready: no "accepts this web\'s calls again", no 200', async () => {
    const tmp = tempDir();
    const timers = new Set<NodeJS.Timeout>();
    // Nothing delayed at first; then health after 600 ms and the probe's Get (through the pipe) after 600 ms more.
    const delays: Record<string, number> = {};
    const slow: ServerInterceptor = (method, call) =>
      new ServerInterceptingCall(call, {
        start: (next) =>
          next({
            onReceiveMessage: (message, pass) => {
              const timer = setTimeout(() => pass(message), delays[method.path] ?? 0);
              timers.add(timer);
            },
          }),
      });
    // The store's longest TTL is one hour: it refuses this web's sessions of a day.
    const config = loadStoreConfig({ STORE_DATA_DIR: tmp.dir, STORE_SYNCHRONOUS: 'NORMAL', STORE_MAX_TTL_MS: '3600000' });
    const backend = new SqliteBackend(config.sqlite);
    const server = createStoreServer({ backend, limits: config.limits, logger: pino({ level: 'silent' }) }, { interceptors: [slow] });
    const health = new StoreHealth(backend);
    health.addToServer(server);
    await health.start();
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, bound) => (err ? reject(err) : resolve(bound))),
    );
    const logs = memoryLogger('info');
    const store = createPipeClient({ address: `127.0.0.1:${port}`, deadlineMs: 1000 });
    const readiness = createStoreReadiness({ address: `127.0.0.1:${port}`, timeoutMs: 1000, probe: { store, ttlMs: 86_400_000 }, logger: logs.logger });
    try {
      const first = await readiness.check();
      assert.match(first.problem ?? '', /refuses this web's sessions/);
      Object.assign(delays, { '/grpc.health.v1.Health/Check': 600, '/sessions.kv.v1.SessionStore/Pipe': 600 });
      const slowed = await readiness.check();
      assert.match(slowed.problem ?? '', /refuses this web's sessions/, 'still not ready');
      assert.ok(!logs.lines.some((l) => l.includes('accepts this web')), logs.lines.join('\n'));
    } finally {
      readiness.close();
      store.close();
      health.stop();
      for (const timer of timers) clearTimeout(timer);
      server.forceShutdown();
      await backend.close();
      tmp.remove();
    }
  });
});

/** Writes requests back to back on one connection; resolves with all it got when it closes, or after timeoutMs. */
function pipelined(port: number, requests: Buffer[], timeoutMs: number): Promise<string> {
  return new Promise<string>((resolve) => {
    const socket = connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    const done = () => {
      clearTimeout(timer);
      socket.destroy();
      resolve(Buffer.concat(chunks).toString('latin1'));
    };
    const timer = setTimeout(done, timeoutMs);
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    socket.on('error', () => undefined);
    socket.on('close', done);
    for (const request of requests) socket.write(request);
  });
}
