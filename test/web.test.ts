import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { connect } from 'node:net';
import path from 'node:path';
import { CookieJarClient } from './helpers/browser';
import { parsePrometheus } from './helpers/prometheus';
import { freeBasePort } from './helpers/ports';
import { type Proc, startStore, startWeb, TEST_KEY, tempDir, waitForLine } from './helpers/procs';

describe('counter site (real web + real store processes)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let web: Proc;
  let base: string;

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir);
    web = await startWeb(store.port, tmp.dir, { STORE_DEADLINE_MS: '500' });
    base = `http://127.0.0.1:${web.port}`;
  });
  after(async () => {
    await web?.stop();
    await store?.stop();
    tmp?.remove();
  });

  it('first visit starts a session at 0/0 and sets only an HttpOnly, SameSite=Lax id cookie', async () => {
    const res = await fetch(base + '/', { redirect: 'manual' });
    const html = await res.text();
    assert.equal(res.status, 200);
    assert.match(html, /Counter 1: 0\b/);
    assert.match(html, /Counter 2: 0\b/);
    const cookies = res.headers.getSetCookie();
    assert.equal(cookies.length, 1);
    assert.match(cookies[0], /^sid=[A-Za-z0-9_-]{24}\.[A-Za-z0-9_-]{22}; path=\/; samesite=lax; httponly$/i);
  });

  it('refresh adds 1 to counter 1; increment adds 1 to counter 2 and the redirect adds 1 to counter 1; reset starts a new id at 0/0', async () => {
    const jar = new CookieJarClient(base);
    assert.deepEqual(pick(await jar.page()), [0, 0]);
    assert.deepEqual(pick(await jar.page()), [1, 0]);
    const { csrf } = await jar.page();
    const firstId = jar.cookies.get('sid');
    const redirect = await jar.post('/increment', { _csrf: csrf }, false);
    assert.equal(redirect.status, 303);
    assert.equal(redirect.headers.get('location'), '/');
    assert.deepEqual(pick(await jar.page()), [3, 1]);
    const after = await jar.page();
    const reset = await jar.post('/reset', { _csrf: after.csrf }, false);
    assert.equal(reset.status, 303);
    assert.equal(jar.cookies.has('sid'), false, 'reset clears the cookie');
    assert.deepEqual(pick(await jar.page()), [0, 0]);
    assert.notEqual(jar.cookies.get('sid'), firstId);
  });

  it('a request with an expectation the site does not know (Expect: other than 100-continue) is answered as usual, with its security headers, not a bare 417', async () => {
    const answer = await exchange(web.port, 'GET /healthz HTTP/1.1\r\nHost: localhost\r\nExpect: something-else\r\nConnection: close\r\n\r\n');
    const [head] = answer.split('\r\n\r\n', 1);
    assert.match(head, /^HTTP\/1\.1 200 OK\r\n/);
    assert.match(head, /\r\ncontent-security-policy: default-src 'none'/i);
    assert.match(head, /\r\nx-request-id: /i);
  });

  it("an HTTP/1.1 request without a Host header gets the site's 400 page with its security headers and a request log line, not Node's bare 400", async () => {
    const answer = await exchange(web.port, 'GET / HTTP/1.1\r\nX-Request-Id: no-host-header\r\nConnection: close\r\n\r\n');
    const [head, body] = answer.split('\r\n\r\n', 2);
    assert.match(head, /^HTTP\/1\.1 400 Bad Request\r\n/);
    assert.match(head, /\r\ncontent-security-policy: default-src 'none'/i);
    assert.match(head, /\r\ncache-control: no-store/i);
    assert.match(body, /<h1>Bad request<\/h1>/);
    await waitForLine(web, (line) => line.includes('"requestId":"no-host-header"') && line.includes('"status":400'));
    assert.equal((await fetch(`${base}/`)).status, 200, 'with a Host header the same request is answered');
  });

  it("requests Node's HTTP parser refuses get Node's statuses (400, 431) with the site's error page and security headers, are counted in web_http_refused_total by code, and close the connection; a client hanging up is not counted", async () => {
    const bad = refusalPage(await exchange(web.port, 'NOT A REQUEST\r\n\r\n'));
    assert.equal(bad.status, 'HTTP/1.1 400 Bad Request');
    assert.match(bad.body, /<title>Bad request · Session counters<\/title>/);
    const tooLarge = refusalPage(await exchange(web.port, `GET / HTTP/1.1\r\nHost: x\r\nCookie: ${'a=b; '.repeat(4_000)}\r\n\r\n`));
    assert.equal(tooLarge.status, 'HTTP/1.1 431 Request Header Fields Too Large');
    assert.match(tooLarge.body, /<h1>Request headers too large<\/h1>/);
    assert.match(tooLarge.body, /Clear this site&#39;s cookies/);
    // On a kept-alive connection, after a request answered in full: the refusal is answered too.
    const keptAlive = await new Promise<string>((resolve) => {
      const socket = connect(web.port, '127.0.0.1');
      let answer = '';
      socket.on('data', (d: Buffer) => {
        const first = answer === '';
        answer += d.toString();
        if (first) socket.write(`GET / HTTP/1.1\r\nHost: x\r\nCookie: ${'a=b; '.repeat(4_000)}\r\n\r\n`);
      });
      socket.on('error', () => undefined);
      socket.on('close', () => resolve(answer));
      socket.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n');
    });
    assert.match(keptAlive, /^HTTP\/1\.1 200 OK\r\n[\s\S]*HTTP\/1\.1 431 Request Header Fields Too Large\r\n[\s\S]*<h1>Request headers too large<\/h1>/);
    const hangUp = connect(web.port, '127.0.0.1');
    hangUp.on('error', () => undefined);
    await new Promise((r) => hangUp.once('connect', r));
    hangUp.resetAndDestroy(); // ECONNRESET on the server's side
    const metrics = parsePrometheus(await (await fetch(`${base}/metrics`)).text());
    const refused = [...metrics].filter(([name]) => name.startsWith('web_http_refused_total'));
    assert.deepEqual(refused.map(([name]) => name).sort(), ['web_http_refused_total{code="HPE_HEADER_OVERFLOW"}', 'web_http_refused_total{code="HPE_INVALID_METHOD"}']);
    assert.equal(refused.find(([name]) => name.includes('HPE_HEADER_OVERFLOW'))?.[1], 2);
    assert.equal((await fetch(`${base}/`)).status, 200, 'the site serves on');
  });

  it("a CONNECT gets the site's 501 page with its security headers, is counted in web_http_refused_total, and closes the connection (Node alone drops it without a word)", async () => {
    const answer = refusalPage(await exchange(web.port, 'CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n'));
    assert.equal(answer.status, 'HTTP/1.1 501 Not Implemented');
    assert.match(answer.body, /<h1>Not supported<\/h1>/);
    const metrics = parsePrometheus(await (await fetch(`${base}/metrics`)).text());
    assert.equal(metrics.get('web_http_refused_total{code="CONNECT"}'), 1);
    assert.equal((await fetch(`${base}/`)).status, 200, 'the site serves on');
  });

  it('bytes the parser refuses right after a whole form (pipelined garbage) do not replace its answer with a 400 page saying nothing changed: the form is answered, then the connection closes', async () => {
    const jar = new CookieJarClient(base);
    const { csrf } = await jar.page();
    const form = `_csrf=${csrf}`;
    const post = `POST /increment HTTP/1.1\r\nHost: x\r\nCookie: sid=${jar.cookies.get('sid')}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: ${form.length}\r\n\r\n${form}`;
    for (const delayMs of [0, 2, 5]) {
      const answer = await new Promise<string>((resolve) => {
        const socket = connect(web.port, '127.0.0.1');
        let received = '';
        socket.on('data', (d: Buffer) => (received += d.toString()));
        socket.on('error', () => undefined);
        socket.on('close', () => resolve(received));
        socket.write(post);
        setTimeout(() => socket.write('NOT A REQUEST\r\n\r\n'), delayMs);
      });
      assert.match(answer, /^HTTP\/1\.1 303 See Other\r\n/, `garbage ${delayMs} ms after the form: the form's own answer`);
    }
    assert.deepEqual(pick(await jar.page()), [1, 3], 'each form answered 303 was counted');
  });

  it('two cookie jars have separate counters', async () => {
    const a = new CookieJarClient(base);
    const b = new CookieJarClient(base);
    await a.page();
    await a.page();
    await a.page();
    assert.deepEqual(pick(await b.page()), [0, 0]);
    assert.deepEqual(pick(await a.page()), [3, 0]);
  });

  it('favicon, HEAD, static assets and unknown paths never change a counter', async () => {
    const jar = new CookieJarClient(base);
    await jar.page();
    assert.equal((await jar.get('/favicon.ico')).status, 204);
    assert.equal((await jar.request('/', { method: 'HEAD' })).status, 200);
    assert.equal((await jar.get('/static/style.css')).status, 200);
    const missing = await jar.get('/no/such/page');
    assert.equal(missing.status, 404);
    assert.match(await missing.text(), /Page not found/);
    assert.deepEqual(pick(await jar.page()), [1, 0]);
  });

  it('200 concurrent increments on one session count exactly 200', async () => {
    const jar = new CookieJarClient(base);
    const { csrf } = await jar.page();
    const results = await Promise.all(Array.from({ length: 200 }, () => jar.post('/increment', { _csrf: csrf }, false)));
    assert.deepEqual([...new Set(results.map((r) => r.status))], [303]);
    assert.deepEqual(pick(await jar.page()), [1, 200]);
  });

  it('a POST without or with a wrong form token is 403 and changes nothing', async () => {
    const jar = new CookieJarClient(base);
    await jar.page();
    assert.equal((await jar.post('/increment', {}, false)).status, 403);
    assert.equal((await jar.post('/increment', { _csrf: 'A'.repeat(22) }, false)).status, 403);
    assert.deepEqual(pick(await jar.page()), [1, 0]);
  });

  describe('garbage cookies start a fresh session, never a 5xx', () => {
    const garbage: Array<[string, string]> = [
      ['random bytes', [...randomBytes(64)].map((b) => String.fromCharCode(0x21 + (b % 94))).join('').replace(/[;,\\"]/g, 'x')],
      ['8 KB value', 'a'.repeat(8 * 1024)],
      ['wrong alphabet', '!!!!!!!!!!!!!!!!!!!!!!!!.@@@@@@@@@@@@@@@@@@@@@@'],
      ['well-formed id the server never issued', `${randomBytes(18).toString('base64url')}.${randomBytes(16).toString('base64url')}`],
    ];
    for (const [name, value] of garbage) {
      it(name, async () => {
        const res = await fetch(base + '/', { headers: { cookie: `sid=${value}` } });
        assert.equal(res.status, 200);
        assert.match(await res.text(), /Counter 1: 0\b/);
        const cookie = res.headers.getSetCookie()[0] ?? '';
        assert.ok(cookie.startsWith('sid=') && !cookie.includes(value.slice(0, 24)), 'a fresh id, never the client one');
      });
    }
  });

  it('store stopped: 503 with Retry-After within the deadline; store back: pages work again', async function () {
    const jar = new CookieJarClient(base);
    await jar.page();
    const port = store.port;
    await store.stop();
    const started = Date.now();
    const down = await jar.get('/');
    assert.equal(down.status, 503);
    assert.equal(down.headers.get('retry-after'), '1');
    assert.match(await down.text(), /session store is not available right now/);
    assert.ok(Date.now() - started < 1500, 'answered within the deadline');
    store = await startStore(tmp.dir, {}, port);
    let status = 0;
    for (let i = 0; i < 50 && status !== 200; i += 1) {
      status = (await jar.get('/')).status;
      if (status !== 200) await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(status, 200);
    const page = await jar.page();
    assert.ok(page.count1 >= 2, 'the session survived the outage');
    // The stopping store ended the web's pipe, and pages while it was down found no connection.
    const metrics = parsePrometheus(await (await fetch(base + '/metrics')).text());
    assert.ok((metrics.get('web_store_pipe_breaks_total{reason="ended"}') ?? 0) >= 1, 'the pipe the store ended is counted');
    assert.ok((metrics.get('web_store_pipe_breaks_total{reason="unopened"}') ?? 0) >= 1, 'the pipes that could not be opened are counted');
  });
});

describe('slow clients: WEB_HEADERS_TIMEOUT_MS and WEB_REQUEST_TIMEOUT_MS (real processes)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let web: Proc;

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir);
    web = await startWeb(store.port, tmp.dir, { WEB_HEADERS_TIMEOUT_MS: '1000', WEB_REQUEST_TIMEOUT_MS: '2000' });
  });
  after(async () => {
    await web?.stop();
    await store?.stop();
    tmp?.remove();
  });

  it("a silent connection, headers or a form body not received in time get a 408 with the site's page within 1.5 times the limit, are counted, and change nothing", async () => {
    const base = `http://127.0.0.1:${web.port}`;
    const jar = new CookieJarClient(base);
    const { csrf } = await jar.page();
    const cookie = `sid=${jar.cookies.get('sid')}`;
    const timed = async (bytes: string) => {
      const started = Date.now();
      const answer = await exchange(web.port, bytes);
      return { ...refusalPage(answer), ms: Date.now() - started };
    };
    const [silent, headers, body] = await Promise.all([
      // A connection that never sends a byte (a browser's unused preconnect).
      timed(''),
      timed(`GET / HTTP/1.1\r\nHost: x\r\nCookie: ${cookie}\r\n`),
      // A valid form token, but the body stops short of its Content-Length: the increment is not done.
      timed(
        `POST /increment HTTP/1.1\r\nHost: x\r\nCookie: ${cookie}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n_csrf=${csrf}`,
      ),
    ]);
    for (const [answer, limitMs] of [
      [silent, 1000],
      [headers, 1000],
      [body, 2000],
    ] as const) {
      assert.equal(answer.status, 'HTTP/1.1 408 Request Timeout');
      assert.match(answer.body, /<h1>Request timed out<\/h1>/);
      assert.ok(answer.ms >= limitMs - 50 && answer.ms <= 1.5 * limitMs + 500, `answered after ${answer.ms} ms, limit ${limitMs} ms`);
    }
    assert.deepEqual(pick(await jar.page()), [1, 0], 'neither request changed the counters');
    const metrics = parsePrometheus(await (await fetch(`${base}/metrics`)).text());
    assert.equal(metrics.get('web_http_refused_total{code="ERR_HTTP_REQUEST_TIMEOUT"}'), 3);
    // The form request had reached the app: its line says it was not answered (499), not a 400 it never sent.
    const line = await waitForLine(web, (l) => l.includes('"msg":"request"') && l.includes('"method":"POST"'));
    assert.match(line, /"status":499/);
    assert.ok(!web.lines.some((l) => /"level":(40|50)/.test(l)), 'no warning or error logged for any of them');
  });
});

describe('a web whose settings its store refuses is not ready, and says which setting (real processes)', function () {
  const TOKEN = 'store-token-0123456789';
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  const webs: Proc[] = [];

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir, { STORE_TOKEN: TOKEN, STORE_MAX_TTL_MS: '600000' });
  });
  after(async () => {
    for (const web of webs) await web.stop();
    await store?.stop();
    tmp?.remove();
  });

  async function readyz(web: Proc): Promise<{ status: number; body: { status: string; store: string; problem?: string } }> {
    const res = await fetch(`http://127.0.0.1:${web.port}/readyz`);
    return { status: res.status, body: await res.json() };
  }

  it('a web started before its store logs "not ready" and then, without any request, "ready" once the store is up', async () => {
    const port = await freeBasePort([0]);
    const web = await startWeb(port, tmp.dir, { STORE_DEADLINE_MS: '300' });
    webs.push(web);
    await waitForLine(web, (l) => l.includes('not ready: the store does not serve'));
    const late = await startStore(path.join(tmp.dir, 'late'), {}, port);
    try {
      await waitForLine(web, (l) => l.includes('ready: the store serves again'), 10_000);
      assert.equal((await fetch(`http://127.0.0.1:${web.port}/`)).status, 200);
    } finally {
      await late.stop();
    }
  });

  it('a wrong STORE_TOKEN: /readyz 503 naming STORE_TOKEN, logged at start without a request; pages 503', async () => {
    const web = await startWeb(store.port, tmp.dir, { STORE_TOKEN: 'another-token-0123456789' });
    webs.push(web);
    const logged = await waitForLine(web, (l) => l.includes('not ready: the store refuses'));
    assert.match(logged, /"level":50/);
    assert.match(logged, /STORE_TOKEN/);
    assert.doesNotMatch(logged, /another-token|store-token-0123/, 'no token in the log');
    const { status, body } = await readyz(web);
    assert.equal(status, 503);
    assert.equal(body.store, 'SERVING');
    assert.match(body.problem ?? '', /^the store refuses this web's STORE_TOKEN/);
    assert.equal((await fetch(`http://127.0.0.1:${web.port}/`)).status, 503);
  });

  it('a store that comes back still refusing this web\'s STORE_TOKEN: the log says not ready again, never "ready"', async () => {
    const port = await freeBasePort([0]);
    let refusing = await startStore(path.join(tmp.dir, 'refusing'), { STORE_TOKEN: TOKEN }, port);
    try {
      const web = await startWeb(port, tmp.dir, { STORE_TOKEN: 'another-token-0123456789', STORE_DEADLINE_MS: '300' });
      webs.push(web);
      await waitForLine(web, (l) => l.includes('not ready: the store refuses'));
      await refusing.stop();
      assert.equal((await readyz(web)).body.store, 'UNREACHABLE');
      // Counted before the restart: the web's own re-check may report the store back before the test asks.
      const seen = web.lines.length;
      refusing = await startStore(path.join(tmp.dir, 'refusing'), { STORE_TOKEN: TOKEN }, port);
      let answer = await readyz(web);
      for (let i = 0; i < 50 && answer.body.store !== 'SERVING'; i += 1) {
        await new Promise((r) => setTimeout(r, 100));
        answer = await readyz(web);
      }
      assert.equal(answer.status, 503);
      assert.match(answer.body.problem ?? '', /STORE_TOKEN/);
      // Log lines are written asynchronously: the answer may come before its line.
      const reported = () => web.lines.slice(seen).some((l) => l.includes('not ready: the store refuses') && l.includes('STORE_TOKEN'));
      for (let i = 0; i < 100 && !reported(); i += 1) await new Promise((r) => setTimeout(r, 20));
      assert.ok(reported(), 'the problem is logged again');
      const since = web.lines.slice(seen);
      assert.ok(!since.some((l) => l.includes('"msg":"ready')), `no "ready" line while still not ready: ${since.join('\n')}`);
    } finally {
      await refusing.stop();
    }
  });

  it('SESSION_IDLE_TTL_MS above STORE_MAX_TTL_MS of the store: /readyz 503 naming both; within it: ready, and the probe wrote nothing', async () => {
    const tooLong = await startWeb(store.port, tmp.dir, { STORE_TOKEN: TOKEN });
    webs.push(tooLong);
    const { status, body } = await readyz(tooLong);
    assert.equal(status, 503);
    assert.match(body.problem ?? '', /SESSION_IDLE_TTL_MS=1800000.*STORE_MAX_TTL_MS/);
    const fits = await startWeb(store.port, tmp.dir, { STORE_TOKEN: TOKEN, SESSION_IDLE_TTL_MS: '600000', SESSION_ABSOLUTE_TTL_MS: '600000' });
    webs.push(fits);
    assert.deepEqual(await readyz(fits), { status: 200, body: { status: 'ready', store: 'SERVING' } });
    const jar = new CookieJarClient(`http://127.0.0.1:${fits.port}`);
    assert.deepEqual(pick(await jar.page()), [0, 0]);
    assert.deepEqual(pick(await jar.page()), [1, 0]);
  });

  it('a store whose STORE_MAX_KEY_BYTES is below a session id\'s length: /readyz 503 naming it', async () => {
    const narrow = await startStore(path.join(tmp.dir, 'narrow'), { STORE_MAX_KEY_BYTES: '20' });
    try {
      const web = await startWeb(narrow.port, tmp.dir);
      webs.push(web);
      const { status, body } = await readyz(web);
      assert.equal(status, 503);
      assert.equal(body.store, 'SERVING');
      assert.match(body.problem ?? '', /ids of 24 characters.*STORE_MAX_KEY_BYTES/);
    } finally {
      await narrow.stop();
    }
  });

  it('the listening lines state the settings in effect (transport, deadline, TLS, token set, session timeouts; the store\'s limits), never a token or key', async () => {
    const web = await startWeb(store.port, tmp.dir, {
      STORE_TOKEN: TOKEN,
      STORE_TRANSPORT: 'unary',
      STORE_DEADLINE_MS: '700',
      SESSION_IDLE_TTL_MS: '600000',
      SESSION_ABSOLUTE_TTL_MS: '600000',
      SESSION_COOKIE_NAME: 'visit',
      SESSION_PERSISTENT: 'true',
      TRUST_PROXY: 'true',
    });
    webs.push(web);
    const line = (proc: Proc) => JSON.parse(proc.lines.find((l) => l.includes('"msg":"listening"'))!) as Record<string, unknown>;
    assert.deepEqual(line(web), {
      ...line(web),
      store: `127.0.0.1:${store.port}`,
      transport: 'unary',
      deadlineMs: 700,
      tls: false,
      auth: true,
      trustProxy: true,
      headersTimeoutMs: 60_000,
      requestTimeoutMs: 300_000,
      session: { cookieName: 'visit', idleTtlMs: 600000, absoluteTtlMs: 600000, rolling: true, persistent: true, secure: 'auto', keys: 1 },
    });
    const stored = line(store);
    assert.equal(stored.auth, true);
    assert.equal(stored.graceMs, 5000);
    assert.equal(stored.sweepIntervalMs, 1000);
    assert.deepEqual(stored.limits, { maxKeyBytes: 256, maxValueBytes: 65536, defaultTtlMs: 600000, maxTtlMs: 600000, maxBatchOps: 1000 });
    for (const proc of [web, store]) assert.doesNotMatch(proc.lines.join('\n'), new RegExp(`${TOKEN}|${TEST_KEY}`), 'no token or key in the log');
  });
});

function pick(page: { count1: number; count2: number }): [number, number] {
  return [page.count1, page.count2];
}

/** Writes bytes on a new connection and resolves with everything the server sent until it closed. */
function exchange(port: number, bytes: string): Promise<string> {
  return new Promise<string>((resolve) => {
    const socket = connect(port, '127.0.0.1');
    let answer = '';
    socket.on('data', (d: Buffer) => (answer += d.toString()));
    socket.on('error', () => undefined);
    socket.on('close', () => resolve(answer));
    socket.write(bytes);
  });
}

/** Checks a refusal is the site's whole error page with its security headers, closing the connection. */
function refusalPage(answer: string): { status: string; body: string } {
  const [head, body] = answer.split('\r\n\r\n', 2) as [string, string | undefined];
  const headers = new Map(head.split('\r\n').slice(1).map((line) => [line.slice(0, line.indexOf(':')).toLowerCase(), line.slice(line.indexOf(':') + 2)]));
  assert.equal(Number(headers.get('content-length')), Buffer.byteLength(body ?? ''), 'the whole page, as long as it says');
  assert.equal(headers.get('content-type'), 'text/html; charset=utf-8');
  assert.equal(headers.get('connection'), 'close');
  assert.equal(headers.get('cache-control'), 'no-store');
  assert.match(headers.get('content-security-policy') ?? '', /default-src 'none'/);
  assert.equal(headers.get('x-frame-options'), 'DENY');
  assert.match(body ?? '', /Back to the counters/);
  return { status: head.split('\r\n')[0], body: body ?? '' };
}

describe("stopping with stdout's reader gone (foreman killed, a closed terminal) (real processes)", function () {
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let web: Proc;

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir);
    web = await startWeb(store.port, tmp.dir);
  });
  after(async () => {
    await web?.stop('SIGKILL');
    await store?.stop();
    tmp?.remove();
  });

  it('a web whose log lines were waiting for a reader that then goes away still exits at a stop, not retrying the write for ever', async () => {
    // The reader stops reading (a foreman busy or stopped): request lines pile up in the pipe and in the logger.
    web.child.stdout!.pause();
    const url = `http://127.0.0.1:${web.port}/${'x'.repeat(4000)}`;
    for (let i = 0; i < 40; i++) await Promise.all(Array.from({ length: 20 }, async () => assert.equal((await fetch(url)).status, 404)));
    const code = new Promise<number | null>((resolve) => web.child.once('exit', resolve));
    web.child.kill('SIGTERM');
    // The web stops and waits to write the rest of its log; then its reader goes away.
    await new Promise((r) => setTimeout(r, 1000));
    web.child.stdout!.destroy();
    const exited = await Promise.race([code, new Promise<'running'>((r) => setTimeout(() => r('running'), 5000))]);
    assert.equal(exited, 0, 'the web exited 0 once it had no reader');
  });
});
