import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, writeFileSync } from 'node:fs';
import { Agent, type IncomingMessage, request } from 'node:http';
import { connect, createServer } from 'node:net';
import path from 'node:path';
import { CookieJarClient } from './helpers/browser';
import { type Proc, root, startStore, startWeb, tempDir, waitForLine, webStartFailure } from './helpers/procs';
import { idOf, waitFor } from './helpers/web-app';

const FAST_STORE = { STORE_SYNCHRONOUS: 'NORMAL' };
const KEY_A = 'A'.repeat(40);
const KEY_B = 'B'.repeat(40);

describe('counter site under load and failure (real web + real store processes)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let web: Proc;
  let base: string;

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir, FAST_STORE);
    web = await startWeb(store.port, tmp.dir);
    base = `http://127.0.0.1:${web.port}`;
  });
  after(async () => {
    await web?.stop();
    await store?.stop();
    tmp?.remove();
  });

  /** n cookie jars that all hold the same session, like n tabs or browsers sharing it. */
  async function sharedSession(n: number): Promise<{ jars: CookieJarClient[]; csrf: string }> {
    const first = new CookieJarClient(base);
    const { csrf } = await first.page();
    const jars = [first];
    for (let i = 1; i < n; i += 1) {
      const jar = new CookieJarClient(base);
      jar.cookies.set('sid', first.cookies.get('sid')!);
      jars.push(jar);
    }
    return { jars, csrf };
  }

  it('zero lost updates: 8 clients × 250 concurrent increments on one session: each one answered 303 is counted, and each refused as busy is not', async function () {
    this.timeout(120_000);
    const { jars, csrf } = await sharedSession(8);
    const results = await Promise.all(
      jars.flatMap((jar) =>
        Array.from({ length: 250 }, () => jar.post('/increment', { _csrf: csrf }, false).then(async (r) => (await r.text(), `${r.status} ${r.headers.get('retry-after') ?? ''}`))),
      ),
    );
    // 2000 increments of one session run one after another; those still waiting for their turn
    // after maxQueueWaitMs (2 s here) are refused, as a slow machine may.
    const done = results.filter((r) => r === '303 ').length;
    const busy = results.filter((r) => r === '503 1').length;
    assert.equal(done + busy, 2000, [...new Set(results)].join(', '));
    assert.ok(done >= 100, `${done} done`);
    const page = await jars[0].page();
    assert.equal(page.count2, done);
    assert.equal(page.count1, 1, 'no redirect was followed, so counter 1 only saw the two page views');
  });

  it('two cookie jars on one session, each sending POSTs and page views in parallel: both counters are exact', async function () {
    this.timeout(60_000);
    const { jars, csrf } = await sharedSession(2);
    const work = jars.flatMap((jar) => [
      ...Array.from({ length: 100 }, () => jar.post('/increment', { _csrf: csrf }, false).then((r) => r.status)),
      ...Array.from({ length: 50 }, () => jar.get('/').then(async (r) => (await r.text(), r.status))),
    ]);
    const statuses = await Promise.all(work);
    assert.deepEqual([...new Set(statuses)].sort(), [200, 303]);
    const page = await jars[1].page();
    assert.equal(page.count2, 200, '2 × 100 increments');
    assert.equal(page.count1, 100 + 1, '2 × 50 views and this one (the first view started the session at 0)');
  });

  it('store frozen (SIGSTOP, as a hung or overloaded store): 503 with Retry-After after the 1 s deadline, not later; /readyz 503; thawed, pages work again', async function () {
    this.timeout(60_000);
    const jar = new CookieJarClient(base);
    await jar.page();
    store.child.kill('SIGSTOP');
    try {
      const started = Date.now();
      const [page, ready] = await Promise.all([jar.get('/'), fetch(base + '/readyz')]);
      const took = Date.now() - started;
      assert.equal(page.status, 503);
      assert.equal(page.headers.get('retry-after'), '1');
      await page.text();
      assert.equal(ready.status, 503);
      await ready.text();
      assert.ok(took >= 900 && took < 2500, `answered at the deadline (${took} ms)`);
      assert.equal(web.child.exitCode, null, 'the web process is still running');
    } finally {
      store.child.kill('SIGCONT');
    }
    await waitFor('pages to work', async () => (await jar.get('/').then(async (r) => (await r.text(), r.status))) === 200);
    assert.ok((await jar.page()).count1 >= 1, 'the session is still there');
  });

  it('store stopped: pages and POSTs are 503 with Retry-After within the deadline and change nothing, /healthz stays 200, /readyz is 503; the process lives on and recovers by itself', async function () {
    this.timeout(60_000);
    const jar = new CookieJarClient(base);
    await jar.page();
    const { csrf } = await jar.page();
    const port = store.port;
    await store.stop();
    try {
      const started = Date.now();
      const down = await jar.get('/');
      assert.equal(down.status, 503);
      assert.equal(down.headers.get('retry-after'), '1');
      assert.equal(down.headers.get('cache-control'), 'no-store');
      await down.text();
      assert.ok(Date.now() - started < 1500, `answered within the deadline (${Date.now() - started} ms)`);
      const post = await jar.post('/increment', { _csrf: csrf }, false);
      assert.equal(post.status, 503);
      await post.text();
      assert.equal((await fetch(base + '/healthz')).status, 200);
      const ready = await fetch(base + '/readyz');
      assert.equal(ready.status, 503);
      assert.equal(((await ready.json()) as { store: string }).store, 'UNREACHABLE');
      const burst = await Promise.all(Array.from({ length: 50 }, () => jar.get('/').then(async (r) => (await r.text(), r.status))));
      assert.deepEqual([...new Set(burst)], [503], 'a burst during the outage: all 503, no 500');
      assert.equal(web.child.exitCode, null, 'the web process is still running');
    } finally {
      store = await startStore(tmp.dir, FAST_STORE, port);
    }
    await waitFor('/readyz to be 200', async () => (await fetch(base + '/readyz')).status === 200);
    await waitFor('pages to work', async () => (await jar.get('/').then(async (r) => (await r.text(), r.status))) === 200);
    const page = await jar.page();
    assert.equal(page.count2, 0, 'the POST during the outage changed nothing');
    assert.ok(page.count1 >= 3, 'the session survived the outage');
  });
});

describe('a full store (STORE_MAX_ENTRIES reached)', function () {
  this.timeout(30_000);
  it('a new browser gets the 503 page with Retry-After, nothing is written for it, and browsers that have a session keep counting', async () => {
    const tmp = tempDir();
    const store = await startStore(tmp.dir, { ...FAST_STORE, STORE_MAX_ENTRIES: '2' });
    const web = await startWeb(store.port, tmp.dir);
    try {
      const base = `http://127.0.0.1:${web.port}`;
      const [a, b, c] = [new CookieJarClient(base), new CookieJarClient(base), new CookieJarClient(base)];
      await a.page();
      await b.page();
      const refused = await c.get('/');
      assert.equal(refused.status, 503);
      assert.equal(refused.headers.get('retry-after'), '1');
      assert.match(await refused.text(), /Counters unavailable[\s\S]*not available right now \(down, busy or full\)/, 'the words fit a full store too');
      assert.equal((await a.page()).count1, 1, 'a session the store holds still counts');
      const { csrf } = await b.page();
      // Not followed: the redirect to / would start b's next session in the room the reset made.
      assert.equal((await b.post('/reset', { _csrf: csrf }, false)).status, 303, 'a reset deletes a session: that makes room');
      assert.equal((await c.page()).count1, 0, 'the new browser now gets its session');
      await waitForLine(web, (line) => line.includes('the store is full'));
    } finally {
      await web.stop();
      await store.stop();
      tmp.remove();
    }
  });
});

describe('web process settings and logs', function () {
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir, FAST_STORE);
  });
  after(async () => {
    await store?.stop();
    tmp?.remove();
  });

  it('with LOG_LEVEL=debug, a whole flow (visits, increment, forged cookie, reset, 404, static) writes no raw session id in any log line', async () => {
    const web = await startWeb(store.port, tmp.dir, { LOG_LEVEL: 'debug' });
    const base = `http://127.0.0.1:${web.port}`;
    const ids = new Set<string>();
    const jar = new CookieJarClient(base);
    const remember = () => {
      const value = jar.cookies.get('sid');
      if (value) ids.add(idOf(value));
    };
    try {
      const { csrf } = await jar.page();
      remember();
      await jar.post('/increment', { _csrf: csrf });
      const again = await jar.page();
      await jar.get('/static/style.css');
      await jar.get('/nowhere');
      await fetch(base + '/', { headers: { cookie: `sid=${[...ids][0].slice(0, 23)}x.AAAAAAAAAAAAAAAAAAAAAA` } });
      await jar.post('/reset', { _csrf: again.csrf });
      await jar.page();
      remember();
      await fetch(base + '/metrics');
      const requestLines = web.lines.filter((l) => l.includes('"msg":"request"'));
      assert.ok(requestLines.length >= 9, `request lines were logged (${requestLines.length})`);
      await waitForLine(web, (l) => l.includes('suspicious session cookie')); // the forged cookie was logged
      assert.equal(ids.size, 2);
      for (const id of ids) {
        const leaking = web.lines.filter((l) => l.includes(id) || l.includes(id.slice(0, 16)));
        assert.deepEqual(leaking, [], 'no line contains a session id or a long part of one');
      }
    } finally {
      await web.stop();
    }
  });

  it('TRUST_PROXY=true: a request forwarded as HTTPS gets a __Host-sid cookie with Secure and Strict-Transport-Security; SESSION_SECURE=never and HSTS_MAX_AGE_S=0 turn those off', async () => {
    const proxied = await startWeb(store.port, tmp.dir, { TRUST_PROXY: 'true' });
    const never = await startWeb(store.port, tmp.dir, { TRUST_PROXY: 'true', SESSION_SECURE: 'never', HSTS_MAX_AGE_S: '0' });
    try {
      const res = await fetch(`http://127.0.0.1:${proxied.port}/`, { headers: { 'x-forwarded-proto': 'https' } });
      await res.text();
      const cookie = res.headers.getSetCookie()[0] ?? '';
      assert.match(cookie, /^__Host-sid=[A-Za-z0-9_-]{24}\.[A-Za-z0-9_-]{22}; path=\/; samesite=lax; secure; httponly$/);
      assert.equal(res.headers.get('strict-transport-security'), 'max-age=31536000');
      const plain = await fetch(`http://127.0.0.1:${never.port}/`, { headers: { 'x-forwarded-proto': 'https' } });
      await plain.text();
      assert.match(plain.headers.getSetCookie()[0] ?? '', /^sid=[^;]+; path=\/; samesite=lax; httponly$/);
      assert.equal(plain.headers.get('strict-transport-security'), null);
    } finally {
      await proxied.stop();
      await never.stop();
    }
  });

  /**
   * A POST /increment the web has in flight: sent with Expect: 100-continue, so the "100 Continue"
   * proves the web has the request, and the body goes only when `send` is called.
   */
  async function incrementInFlight(web: Proc, agent: Agent) {
    const jar = new CookieJarClient(`http://127.0.0.1:${web.port}`);
    const { csrf } = await jar.page();
    const body = new URLSearchParams({ _csrf: csrf }).toString();
    const post = request({
      host: '127.0.0.1',
      port: web.port,
      method: 'POST',
      path: '/increment',
      agent,
      headers: {
        cookie: `sid=${jar.cookies.get('sid')}`,
        'content-type': 'application/x-www-form-urlencoded',
        'content-length': String(Buffer.byteLength(body)),
        expect: '100-continue',
      },
    });
    post.on('error', () => undefined);
    const answered = once(post, 'response') as Promise<[IncomingMessage]>;
    // Awaited by send() alone: a test that lets the request die (the web stops first) never reads it.
    answered.catch(() => undefined);
    post.flushHeaders();
    await once(post, 'continue');
    return {
      async send(): Promise<IncomingMessage> {
        post.end(body);
        const [res] = await answered;
        res.resume();
        await once(res, 'end');
        return res;
      },
    };
  }

  for (const [what, signals] of [
    ['SIGTERM', ['SIGTERM']],
    // A Ctrl-C on `npm start` reaches the web twice at once: from the terminal and from foreman.
    ['two SIGINTs at once (a Ctrl-C under foreman)', ['SIGINT', 'SIGINT']],
  ] as const) {
    it(`${what}: a request in flight completes with Connection: close, and the process exits 0 as soon as it is done`, async () => {
      const web = await startWeb(store.port, tmp.dir);
      const agent = new Agent({ keepAlive: true, maxSockets: 1 });
      try {
        const post = await incrementInFlight(web, agent);
        const exited = web.stop(signals[0]);
        await waitForLine(web, (l) => l.includes('"msg":"stopping"'));
        // The second one after the first was handled (two signals sent back to back may arrive as one).
        for (const signal of signals.slice(1)) web.child.kill(signal);
        const res = await post.send();
        const done = Date.now();
        assert.equal(res.statusCode, 303, 'the increment was served');
        assert.equal(res.headers.connection, 'close', 'the client is told not to send another request on this connection');
        assert.equal(await exited, 0);
        const took = Date.now() - done;
        assert.ok(took < 1000, `exited ${took} ms after the last response`);
      } finally {
        agent.destroy();
        await web.stop();
      }
    });
  }

  it('SIGTERM: requests pipelined on one connection behind one in flight, before or after the signal, are all answered; only the last says Connection: close', async () => {
    const web = await startWeb(store.port, tmp.dir, { STORE_DEADLINE_MS: '5000' });
    const visitor = new CookieJarClient(`http://127.0.0.1:${web.port}`);
    const clicker = new CookieJarClient(`http://127.0.0.1:${web.port}`);
    await visitor.page();
    const { csrf } = await clicker.page();
    const body = new URLSearchParams({ _csrf: csrf }).toString();
    const socket = connect(web.port, '127.0.0.1');
    let answers = '';
    socket.on('data', (d: Buffer) => (answers += d.toString('latin1')));
    const closed = once(socket, 'close');
    // The store frozen: the first two requests wait for it in the web, the page before the increment.
    store.child.kill('SIGSTOP');
    try {
      await once(socket, 'connect');
      socket.write(
        `GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: sid=${visitor.cookies.get('sid')}\r\n\r\n` +
          `POST /increment HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: sid=${clicker.cookies.get('sid')}\r\n` +
          `Content-Type: application/x-www-form-urlencoded\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
      );
      await new Promise((r) => setTimeout(r, 300));
      const exited = web.stop('SIGTERM');
      assert.match(await waitForLine(web, (l) => l.includes('"msg":"stopping"')), /"inFlight":2/, 'both requests have reached the app');
      socket.write('GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
      await new Promise((r) => setTimeout(r, 200));
      store.child.kill('SIGCONT');
      await closed;
      // A response's status line follows the body before it on the same line (no newline after a body).
      assert.deepEqual(answers.match(/HTTP\/1\.1 \d+|^Connection: .*(?=\r$)/gim), [
        'HTTP/1.1 200',
        'Connection: keep-alive',
        'HTTP/1.1 303',
        'Connection: keep-alive',
        'HTTP/1.1 200',
        'Connection: close',
      ]);
      assert.equal(await exited, 0);
    } finally {
      store.child.kill('SIGCONT');
      socket.destroy();
      await web.stop();
    }
    const after = await startWeb(store.port, tmp.dir);
    try {
      const again = new CookieJarClient(`http://127.0.0.1:${after.port}`);
      again.cookies.set('sid', clicker.cookies.get('sid')!);
      assert.equal((await again.page()).count2, 1, 'the increment answered was done once');
    } finally {
      await after.stop();
    }
  });

  it('requests pipelined behind one in flight on a connection the client then closes are not kept in flight for ever: the stop counts none of them, exits 0', async () => {
    const web = await startWeb(store.port, tmp.dir);
    const socket = connect(web.port, '127.0.0.1');
    socket.on('error', () => undefined);
    // The store frozen: the page waits for it in the web, the three probes behind it on the connection.
    store.child.kill('SIGSTOP');
    try {
      await once(socket, 'connect');
      socket.write('GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n' + 'GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n'.repeat(3));
      await new Promise((r) => setTimeout(r, 300));
      socket.destroy();
      store.child.kill('SIGCONT');
      await new Promise((r) => setTimeout(r, 500));
      const exited = web.stop('SIGTERM');
      assert.match(await waitForLine(web, (l) => l.includes('"msg":"stopping"')), /"inFlight":0/, 'nothing of the closed connection is in flight');
      assert.equal(await exited, 0);
    } finally {
      store.child.kill('SIGCONT');
      socket.destroy();
      await web.stop();
    }
  });

  it('SIGTERM: connections that have sent no request yet (a browser preconnect) or only part of its headers do not hold up the stop: closed at once, exit 0', async () => {
    const web = await startWeb(store.port, tmp.dir);
    const sockets = [connect(web.port, '127.0.0.1'), connect(web.port, '127.0.0.1')];
    try {
      await Promise.all(sockets.map((s) => once(s, 'connect')));
      const closedAll = Promise.all(sockets.map((s) => once(s, 'close')));
      sockets[1].write('GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n');
      await new Promise((r) => setTimeout(r, 200)); // the partial head has reached the web's parser
      const started = Date.now();
      const code = await web.stop('SIGTERM');
      await closedAll;
      assert.equal(code, 0);
      const took = Date.now() - started;
      assert.ok(took < 3000, `exited ${took} ms after the signal`);
      assert.ok(!web.lines.some((l) => l.includes('after the grace period')), 'no error line about responses in flight');
    } finally {
      for (const s of sockets) s.destroy();
      await web.stop();
    }
  });

  it('a second signal a second or more after the first exits at once with code 1, without the request in flight', async () => {
    const web = await startWeb(store.port, tmp.dir);
    const agent = new Agent({ keepAlive: true, maxSockets: 1 });
    try {
      await incrementInFlight(web, agent); // its body never comes
      const exited = web.stop('SIGTERM');
      await waitForLine(web, (l) => l.includes('"msg":"stopping"'));
      await new Promise((r) => setTimeout(r, 1100));
      const started = Date.now();
      web.child.kill('SIGINT');
      assert.equal(await exited, 1);
      assert.ok(Date.now() - started < 1000, 'at once');
      await waitForLine(web, (l) => l.includes('second signal: exiting now'));
    } finally {
      agent.destroy();
      await web.stop();
    }
  });

  it('a generated session key file that is empty or not a file stops the web at start, naming it and the fix', async () => {
    for (const [what, make] of [
      ['empty', (file: string) => writeFileSync(file, '')],
      ['a directory', (file: string) => mkdirSync(file)],
    ] as const) {
      const dir = tempDir();
      try {
        make(path.join(dir.dir, 'session-key'));
        const failure = await webStartFailure(store.port, dir.dir, { SESSION_KEYS: '' });
        assert.ok(failure, `${what}: the web did not start`);
        assert.match(failure, /^web: invalid configuration: WEB_DATA_DIR: .*session-key/m, what);
        assert.doesNotMatch(failure, /\n\s+at /, 'one clear line, no stack trace');
      } finally {
        dir.remove();
      }
    }
  });

  it('webs starting together on a fresh WEB_DATA_DIR (Procfile.redis starts two) all read the one key generated there, never an empty file', async function () {
    this.timeout(60_000);
    // Four processes read the web's configuration in lockstep, each round on a fresh directory:
    // the moment one has created the key file, the others must find the key in it.
    const rounds = 150;
    const dir = tempDir();
    const at = Date.now() + 1500;
    const script = `
      const { loadWebConfig } = require(${JSON.stringify(path.join(root, 'dist/services/web/config.js'))});
      const keys = [];
      for (let r = 0; r < ${rounds}; r += 1) {
        while (Date.now() < ${at} + r * 20);
        try { keys.push(loadWebConfig({ WEB_DATA_DIR: ${JSON.stringify(dir.dir)} + '/' + r }).session.keys[0]); } catch (err) { keys.push(err.message); }
      }
      console.log(JSON.stringify(keys));`;
    try {
      const runs = await Promise.all(
        Array.from({ length: 4 }, () => new Promise<string[]>((resolve, reject) =>
          execFile(process.execPath, ['-e', script], { timeout: 50_000 }, (err, out) => (err ? reject(err) : resolve(JSON.parse(out) as string[]))),
        )),
      );
      for (let r = 0; r < rounds; r += 1) {
        const seen = new Set(runs.map((keys) => keys[r]));
        assert.equal(seen.size, 1, `round ${r}: ${[...seen].join(' | ')}`);
        assert.ok([...seen][0].length >= 32, `round ${r}: ${[...seen][0]}`);
      }
    } finally {
      dir.remove();
    }
  });

  it('SESSION_KEYS written with spaces after the comma and a trailing newline: a session signed with the old key still counts after a rotation', async () => {
    const before = await startWeb(store.port, tmp.dir, { SESSION_KEYS: KEY_A });
    const jar = new CookieJarClient(`http://127.0.0.1:${before.port}`);
    try {
      await jar.page();
      assert.equal((await jar.page()).count1, 1);
    } finally {
      await before.stop();
    }
    const after = await startWeb(store.port, tmp.dir, { SESSION_KEYS: `${KEY_B}, ${KEY_A}\n` });
    jar.base = `http://127.0.0.1:${after.port}`;
    try {
      assert.equal((await jar.page()).count1, 2, 'the same session, not a new one');
    } finally {
      await after.stop();
    }
    assert.ok(!after.lines.some((l) => l.includes('suspicious session cookie')), 'the cookie was not taken for a forged one');
  });

  const badValues: Array<[string, Record<string, string>, RegExp]> = [
    ['SESSION_SECURE=maybe', { SESSION_SECURE: 'maybe' }, /SESSION_SECURE="maybe": expected one of auto, always, never/],
    ['PORT=x', { PORT: 'x' }, /PORT="x": expected a TCP port number 0-65535/],
    ['SESSION_IDLE_TTL_MS=soon', { SESSION_IDLE_TTL_MS: 'soon' }, /SESSION_IDLE_TTL_MS="soon": expected an integer/],
    // Number(' ') is 0: a PORT of blanks would have listened on any free port.
    ['a PORT of blanks', { PORT: '  ' }, /PORT="  ": expected a TCP port number 0-65535/],
    ['STORE_DEADLINE_MS in hexadecimal', { STORE_DEADLINE_MS: '0x3e8' }, /STORE_DEADLINE_MS="0x3e8": expected an integer 10-60000 ms/],
    ['SESSION_COOKIE_NAME=__Host-sid', { SESSION_COOKIE_NAME: '__Host-sid' }, /SESSION_COOKIE_NAME="__Host-sid": expected 1-64 of A-Z a-z 0-9 _ -, not starting with "__"/],
    ['TRUST_PROXY=perhaps', { TRUST_PROXY: 'perhaps' }, /TRUST_PROXY="perhaps": expected true or false/],
    ['a negative HSTS_MAX_AGE_S', { HSTS_MAX_AGE_S: '-1' }, /HSTS_MAX_AGE_S="-1": expected an integer 0-63072000 s/],
    ['STORE_ADDRESS=nowhere', { STORE_ADDRESS: 'nowhere' }, /STORE_ADDRESS="nowhere": expected host:port/],
    ['a STORE_ADDRESS port above 65535', { STORE_ADDRESS: '127.0.0.1:99999' }, /STORE_ADDRESS="127.0.0.1:99999": expected host:port .*port 1-65535/],
    ['a short SESSION_KEYS (value not echoed)', { SESSION_KEYS: 'too-short-secret' }, /SESSION_KEYS=\(hidden\): expected comma-separated keys of at least 32 characters/],
    ['a SESSION_KEYS with an empty key between commas', { SESSION_KEYS: `${KEY_B}, ,${KEY_A}` }, /SESSION_KEYS=\(hidden\): expected comma-separated keys of at least 32 characters/],
    ['a SESSION_KEYS of blanks only', { SESSION_KEYS: ' '.repeat(40) }, /SESSION_KEYS=\(hidden\): expected comma-separated keys of at least 32 characters/],
    ['a STORE_TOKEN ending in a line break (value not echoed)', { STORE_TOKEN: 'store-token-0123456789\n' }, /STORE_TOKEN=\(hidden\): expected at least 16 printable ASCII characters/],
    ['a STORE_TOKEN with a non-ASCII character (value not echoed)', { STORE_TOKEN: 'store-token-0123456789-é' }, /STORE_TOKEN=\(hidden\): expected at least 16 printable ASCII characters/],
    ['an absolute lifetime below the idle timeout', { SESSION_IDLE_TTL_MS: '60000', SESSION_ABSOLUTE_TTL_MS: '1000' }, /SESSION_ABSOLUTE_TTL_MS must be at least SESSION_IDLE_TTL_MS/],
    ['WEB_HEADERS_TIMEOUT_MS below a second', { WEB_HEADERS_TIMEOUT_MS: '500' }, /WEB_HEADERS_TIMEOUT_MS="500": expected an integer 1000-600000 ms/],
    ['a request timeout below the headers timeout', { WEB_HEADERS_TIMEOUT_MS: '10000', WEB_REQUEST_TIMEOUT_MS: '5000' }, /WEB_REQUEST_TIMEOUT_MS \(the whole request\) must be at least WEB_HEADERS_TIMEOUT_MS/],
    // Without SESSION_KEYS the generated key is kept there; under a regular file even root cannot create it.
    [
      'a WEB_DATA_DIR that cannot be created',
      { SESSION_KEYS: '', WEB_DATA_DIR: path.join(root, 'package.json', 'sub') },
      /^web: invalid configuration: WEB_DATA_DIR=".*package\.json\/sub": cannot create the directory: ENOTDIR/m,
    ],
  ];
  it('a taken PORT stops the web with exit code 1 and a message naming PORT', async () => {
    const taken = createServer();
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
    const { port } = taken.address() as { port: number };
    try {
      await assert.rejects(startWeb(store.port, tmp.dir, { PORT: String(port) }), (err: Error) => {
        assert.match(err.message, /exited with 1 before listening/);
        assert.match(err.message, new RegExp(`^web: cannot listen on 127\\.0\\.0\\.1:${port} \\(PORT\\): listen EADDRINUSE`, 'm'));
        return true;
      });
    } finally {
      taken.close();
    }
  });

  for (const [what, env, message] of badValues) {
    it(`${what} stops the web at start with exit code 1 and a message naming the variable`, async () => {
      const failure = await webStartFailure(store.port, tmp.dir, env);
      assert.ok(failure, 'the web did not start');
      assert.match(failure, /exited with 1 before listening/);
      assert.match(failure, message);
      for (const secret of [env.SESSION_KEYS, env.STORE_TOKEN?.trim()]) if (secret) assert.ok(!failure.includes(secret), 'the secret is not printed');
    });
  }
});
