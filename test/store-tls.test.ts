import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { copyFileSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { ReloadingCa } from '../services/client/reloading-ca';
import { createStoreClient, type StoreClient, StoreClientError } from '../services/client/store-client';
import { loadStoreConfig } from '../services/store/config';
import { loadWebConfig } from '../services/web/config';
import { CookieJarClient } from './helpers/browser';
import { parsePrometheus } from './helpers/prometheus';
import { type Proc, startStore, startWeb, tempDir, waitForLine, webStartFailure } from './helpers/procs';
import { selfSigned } from './helpers/tls';
import { memoryLogger } from './helpers/web-app';

describe('store over TLS (self-signed certificate made by the test, real processes)', function () {
  this.timeout(30_000);
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let pki: { cert: string; key: string };
  let stranger: { cert: string; key: string };
  let address: string;

  before(async () => {
    tmp = tempDir();
    pki = await selfSigned(tmp.dir, 'store');
    stranger = await selfSigned(tmp.dir, 'stranger');
    store = await startStore(tmp.dir, { STORE_TLS_CERT: pki.cert, STORE_TLS_KEY: pki.key });
    // A host name, not an IP: TLS servername (SNI) must not be an IP address (RFC 6066).
    address = `localhost:${store.port}`;
  });
  after(async () => {
    await store?.stop();
    tmp?.remove();
  });

  const use = async (client: StoreClient, run: (c: StoreClient) => Promise<void>) => {
    try {
      await run(client);
    } finally {
      client.close();
    }
  };
  const readPem = (file: string) => readFileSync(file);

  it('the store says it serves TLS, and a client trusting its CA reads and writes', async () => {
    assert.ok(store.lines.some((l) => l.includes('"msg":"listening"') && l.includes('"tls":true')));
    await use(createStoreClient({ address, deadlineMs: 3000, tlsCa: readPem(pki.cert) }), async (client) => {
      await client.put('tls', Buffer.from('secret'), { ttlMs: 60_000 });
      assert.equal((await client.get('tls'))?.value.toString(), 'secret');
    });
  });

  it('a STORE_TLS_CERT whose PEM says TRUSTED CERTIFICATE or X509 CERTIFICATE (labels OpenSSL reads) is served, not refused as holding none', async () => {
    const pem = readFileSync(pki.cert, 'latin1');
    for (const label of ['TRUSTED CERTIFICATE', 'X509 CERTIFICATE']) {
      const cert = path.join(tmp.dir, `${label.replace(' ', '-')}.pem`);
      writeFileSync(cert, pem.replace(/(BEGIN|END) CERTIFICATE/g, `$1 ${label}`));
      const relabelled = await startStore(tmp.dir, { STORE_DATA_DIR: path.join(tmp.dir, label.replace(' ', '-')), STORE_TLS_CERT: cert, STORE_TLS_KEY: pki.key });
      try {
        await use(createStoreClient({ address: `localhost:${relabelled.port}`, deadlineMs: 3000, tlsCa: readPem(pki.cert) }), async (client) => {
          await client.put('tls', Buffer.from(label), { ttlMs: 60_000 });
          assert.equal((await client.get('tls'))?.value.toString(), label);
        });
      } finally {
        await relabelled.stop();
      }
    }
  });

  it('a plaintext client cannot talk to it (UNAVAILABLE)', async () => {
    await use(createStoreClient({ address, deadlineMs: 1500 }), async (client) => {
      await assert.rejects(client.get('tls'), (err: StoreClientError) => err.kind === 'unavailable');
    });
  });

  it('a client trusting another CA refuses the certificate (UNAVAILABLE)', async () => {
    await use(createStoreClient({ address, deadlineMs: 1500, tlsCa: readPem(stranger.cert) }), async (client) => {
      await assert.rejects(client.get('tls'), (err: StoreClientError) => err.kind === 'unavailable');
    });
  });

  describe('the web service with STORE_TLS_CA', () => {
    let web: Proc | undefined;
    afterEach(async () => {
      await web?.stop();
      web = undefined;
    });

    it('serves the counter page through the TLS store', async () => {
      web = await startWeb(store.port, tmp.dir, { STORE_TLS_CA: pki.cert, STORE_ADDRESS: address });
      const res = await fetch(`http://127.0.0.1:${web.port}/`);
      assert.equal(res.status, 200);
      assert.match(await res.text(), /Counter 1: 0\b/);
    });

    it('at an IP address (127.0.0.1) too; its log stays JSON lines (no Node warning text on stderr)', async () => {
      web = await startWeb(store.port, tmp.dir, { STORE_TLS_CA: pki.cert, STORE_ADDRESS: `127.0.0.1:${store.port}`, LOG_LEVEL: 'debug' });
      const res = await fetch(`http://127.0.0.1:${web.port}/`);
      assert.equal(res.status, 200);
      await new Promise((r) => setTimeout(r, 200)); // Node writes its warnings on a later tick
      assert.deepEqual(web.lines.filter((line) => !line.startsWith('{')), []);
    });

    it('/readyz is ready: the readiness check uses TLS too', async () => {
      web = await startWeb(store.port, tmp.dir, { STORE_TLS_CA: pki.cert, STORE_ADDRESS: address });
      const res = await fetch(`http://127.0.0.1:${web.port}/readyz`);
      assert.equal(res.status, 200);
      assert.deepEqual(await res.json(), { status: 'ready', store: 'SERVING' });
    });

    it('trusting another CA, the web is not ready and its log says why (the certificate), not only UNREACHABLE', async () => {
      web = await startWeb(store.port, tmp.dir, { STORE_TLS_CA: stranger.cert, STORE_ADDRESS: address });
      const line = await waitForLine(web, (l) => l.includes('not ready: the store does not serve'));
      const entry = JSON.parse(line) as { store: string; reason?: string };
      assert.equal(entry.store, 'UNREACHABLE');
      assert.match(entry.reason ?? '', /certificate/);
    });

    it('without it the page is a 503, not a 500', async () => {
      web = await startWeb(store.port, tmp.dir, { STORE_DEADLINE_MS: '500' });
      const res = await fetch(`http://127.0.0.1:${web.port}/`);
      assert.equal(res.status, 503);
    });
  });

  describe('the web service with an https:// STORE_ADDRESS', () => {
    let web: Proc | undefined;
    let plain: Proc | undefined;
    afterEach(async () => {
      await web?.stop();
      web = undefined;
    });
    after(async () => {
      await plain?.stop();
    });

    it('never talks plaintext: against a plaintext store the page is a 503 and /readyz is not ready', async () => {
      plain = await startStore(path.join(tmp.dir, 'plain'));
      web = await startWeb(plain.port, tmp.dir, { STORE_ADDRESS: `https://127.0.0.1:${plain.port}`, STORE_DEADLINE_MS: '500' });
      const page = await fetch(`http://127.0.0.1:${web.port}/`);
      assert.equal(page.status, 503);
      assert.doesNotMatch(await page.text(), /Counter 1/);
      const ready = await fetch(`http://127.0.0.1:${web.port}/readyz`);
      assert.equal(ready.status, 503);
      assert.deepEqual(await ready.json(), { status: 'not ready', store: 'UNREACHABLE' });
    });

    it('without STORE_TLS_CA trusts the default roots (here GRPC_DEFAULT_SSL_ROOTS_FILE_PATH): page and /readyz work', async () => {
      web = await startWeb(store.port, tmp.dir, { STORE_ADDRESS: `https://${address}`, GRPC_DEFAULT_SSL_ROOTS_FILE_PATH: pki.cert });
      const page = await fetch(`http://127.0.0.1:${web.port}/`);
      assert.equal(page.status, 200);
      assert.match(await page.text(), /Counter 1: 0\b/);
      const ready = await fetch(`http://127.0.0.1:${web.port}/readyz`);
      assert.equal(ready.status, 200);
      assert.deepEqual(await ready.json(), { status: 'ready', store: 'SERVING' });
    });

    it('without STORE_TLS_CA and without the CA among the default roots: the page is a 503', async () => {
      web = await startWeb(store.port, tmp.dir, { STORE_ADDRESS: `https://${address}`, STORE_DEADLINE_MS: '500' });
      const page = await fetch(`http://127.0.0.1:${web.port}/`);
      assert.equal(page.status, 503);
    });

    it('http:// with STORE_TLS_CA contradicts itself: the web stops at start, naming both variables', async () => {
      const failure = await webStartFailure(store.port, tmp.dir, { STORE_ADDRESS: `http://${address}`, STORE_TLS_CA: pki.cert });
      assert.ok(failure, 'the web did not start');
      assert.match(failure, /exited with 1 before listening/);
      assert.match(failure, /^web: invalid configuration: STORE_ADDRESS="http:\/\/localhost:\d+": .*STORE_TLS_CA/m);
    });

    it('a STORE_TLS_CA that holds no usable certificate (a key, a cut-short file) and a STORE_TLS_RELOAD_MS below 100 stop the web at start, naming the variable (configuration only)', () => {
      const load = (env: Record<string, string>) => () => loadWebConfig({ SESSION_KEYS: 'k'.repeat(32), STORE_ADDRESS: address, ...env });
      assert.throws(load({ STORE_TLS_CA: pki.key }), /^ConfigError: invalid configuration: STORE_TLS_CA="[^"]+": not a usable CA certificate \(no certificate in the file\)$/);
      const cut = path.join(tmp.dir, 'cut-ca.pem');
      writeFileSync(cut, readFileSync(pki.cert, 'latin1').replace(/^(-----BEGIN CERTIFICATE-----\n.{10}).*?(\n-----END CERTIFICATE-----)/s, '$1$2'));
      assert.throws(load({ STORE_TLS_CA: cut }), /^ConfigError: invalid configuration: STORE_TLS_CA="[^"]+": not a usable CA certificate \(.+\)$/);
      const bundle = path.join(tmp.dir, 'cut-bundle.pem');
      writeFileSync(bundle, readFileSync(pki.cert, 'latin1') + readFileSync(stranger.cert, 'latin1').slice(0, 300));
      assert.throws(load({ STORE_TLS_CA: bundle }), /not a usable CA certificate \(a certificate in the file is cut short \(2 begun, 1 whole\)\)$/);
      assert.throws(load({ STORE_TLS_CA: pki.cert, STORE_TLS_RELOAD_MS: '50' }), /STORE_TLS_RELOAD_MS="50": expected 0 \(never\) or at least 100 ms/);
      assert.equal(load({ STORE_TLS_CA: pki.cert, STORE_TLS_RELOAD_MS: '0' })().store.tlsReloadMs, 0);
    });

    it('a plaintext store address on another machine is a warning at start; TLS or loopback is not (configuration only, nothing connects)', () => {
      const warnings = (env: Record<string, string>) => loadWebConfig({ SESSION_KEYS: 'k'.repeat(32), ...env }).warnings;
      for (const remote of ['10.0.0.5:5100', 'http://store.internal:5100', '[fd00::5]:5100']) {
        assert.match(warnings({ STORE_ADDRESS: remote }).join(), /is another machine and the connection is plaintext: STORE_TOKEN and session data cross the network unencrypted/, remote);
      }
      for (const fine of ['https://10.0.0.5:5100', '127.0.0.1:5100', 'localhost:5100', '[::1]:5100']) assert.deepEqual(warnings({ STORE_ADDRESS: fine }), [], fine);
      assert.deepEqual(warnings({ STORE_ADDRESS: '10.0.0.5:5100', STORE_TLS_CA: pki.cert }), []);
      // The store's side of the same: serving plaintext on an address other machines reach.
      const storeWarnings = (env: Record<string, string>) => loadStoreConfig({ STORE_TOKEN: 't'.repeat(32), STORE_DATA_DIR: tmp.dir, ...env }).warnings;
      assert.match(storeWarnings({ STORE_HOST: '0.0.0.0' }).join(), /serves plaintext: tokens and session data cross the network unencrypted; set STORE_TLS_CERT and STORE_TLS_KEY/);
      assert.deepEqual(storeWarnings({ STORE_HOST: '0.0.0.0', STORE_TLS_CERT: pki.cert, STORE_TLS_KEY: pki.key }), []);
      assert.deepEqual(storeWarnings({ STORE_HOST: '127.0.0.1' }), []);
    });
  });

  describe('a renewed certificate is served without a restart (STORE_TLS_RELOAD_MS=100)', () => {
    let renewing: Proc;
    let served: { cert: string; key: string };
    let renewed: { cert: string; key: string };
    let other: { cert: string; key: string };
    let renewingAddress: string;
    const opened: StoreClient[] = [];
    const client = (ca: string, deadlineMs = 3000) => {
      const c = createStoreClient({ address: renewingAddress, deadlineMs, tlsCa: readPem(ca) });
      opened.push(c);
      return c;
    };
    /** Writes a file the way renewal tools do: in full beside it, then renamed over it. */
    const replace = (target: string, from: string) => {
      copyFileSync(from, `${target}.new`);
      renameSync(`${target}.new`, target);
    };
    const expiryMetric = async () => {
      const { port } = JSON.parse(await waitForLine(renewing, (l) => l.includes('"metrics listening"'))) as { port: number };
      const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      return Number(/^store_tls_certificate_expiry_timestamp_seconds (\S+)$/m.exec(text)?.[1]);
    };
    const notAfter = (cert: string) => new Date(new X509Certificate(readFileSync(cert)).validTo).getTime() / 1000;
    /** Waits for a line logged after the first `from` lines (earlier ones may match too). */
    const logged = (from: number, matches: (line: string) => boolean) => waitForLine(renewing, (l) => matches(l) && renewing.lines.indexOf(l) >= from);

    before(async () => {
      const dir = path.join(tmp.dir, 'renewal');
      mkdirSync(dir);
      // Different lifetimes, so that each has its own expiry for the metric to show.
      served = await selfSigned(dir, 'served', undefined, 30);
      renewed = await selfSigned(dir, 'renewed', undefined, 90);
      other = await selfSigned(dir, 'other', undefined, 120);
      // The originals of the served files, kept for the clients to trust.
      copyFileSync(served.cert, path.join(dir, 'first-cert.pem'));
      renewing = await startStore(path.join(dir, 'data'), { STORE_TLS_CERT: served.cert, STORE_TLS_KEY: served.key, STORE_TLS_RELOAD_MS: '100' });
      renewingAddress = `localhost:${renewing.port}`;
    });
    after(async () => {
      for (const c of opened) c.close();
      await renewing?.stop();
    });

    it('new connections get the renewed certificate; a connection made before goes on; the expiry metric follows', async () => {
      const first = path.join(path.dirname(served.cert), 'first-cert.pem');
      const before = client(first);
      await before.put('renewal', Buffer.from('kept'), { ttlMs: 60_000 });
      assert.equal(await expiryMetric(), notAfter(first));

      const from = renewing.lines.length;
      replace(served.key, renewed.key);
      replace(served.cert, renewed.cert);
      await logged(from, (l) => l.includes('TLS certificate reloaded'));

      assert.equal((await client(renewed.cert).get('renewal'))?.value.toString(), 'kept');
      await assert.rejects(client(first, 1500).get('renewal'), (err: StoreClientError) => err.kind === 'unavailable');
      assert.equal((await before.get('renewal'))?.value.toString(), 'kept', 'the connection made before the renewal was cut');
      assert.equal(await expiryMetric(), notAfter(renewed.cert));
    });

    it('a certificate without its key is never served: the previous one stays, with a warning, until the key follows', async () => {
      let from = renewing.lines.length;
      replace(served.cert, other.cert); // the key is still the renewed one's
      const warning = await logged(from, (l) => l.includes('do not hold a usable pair'));
      assert.match(warning, /"reason":"[^"]*key values mismatch"/);
      assert.equal((await client(renewed.cert).get('renewal'))?.value.toString(), 'kept');
      assert.equal(await expiryMetric(), notAfter(renewed.cert));

      assert.equal(renewing.lines.slice(from).filter((l) => l.includes('do not hold a usable pair')).length, 1, 'a failure that lasts is warned about once');
      from = renewing.lines.length;
      replace(served.key, other.key);
      await logged(from, (l) => l.includes('TLS certificate reloaded') && l.includes(new Date(notAfter(other.cert) * 1000).toISOString()));
      assert.equal((await client(other.cert).get('renewal'))?.value.toString(), 'kept');
      assert.deepEqual(renewing.lines.filter((l) => !l.startsWith('{')), [], 'grpc-js logged a failed secure context');
    });

    it('a file gone mid-rotation is warned about, naming its variable; the certificate in use stays until both are back', async () => {
      let from = renewing.lines.length;
      rmSync(served.key);
      const warning = await logged(from, (l) => l.includes('do not hold a usable pair'));
      assert.match(warning, /"reason":"STORE_TLS_KEY: ENOENT"/);
      assert.equal((await client(other.cert).get('renewal'))?.value.toString(), 'kept');
      from = renewing.lines.length;
      replace(served.cert, renewed.cert);
      replace(served.key, renewed.key);
      await logged(from, (l) => l.includes('TLS certificate reloaded') && l.includes(new Date(notAfter(renewed.cert) * 1000).toISOString()));
      assert.equal((await client(renewed.cert).get('renewal'))?.value.toString(), 'kept');
    });
  });
  describe("the web trusts a renewed self-signed certificate without a restart (the README's set-up: STORE_TLS_CA is the store's own certificate file)", () => {
    const procs: Proc[] = [];
    after(async () => {
      for (const p of procs.reverse()) await p.stop();
    });

    it('the stream made before the renewal goes on; a new connection after the store restarts trusts the renewed certificate; a broken file is warned about and changes nothing', async () => {
      const dir = path.join(tmp.dir, 'web-renewal');
      mkdirSync(dir);
      const first = await selfSigned(dir, 'first');
      const renewed = await selfSigned(dir, 'renewed');
      const files = { cert: path.join(dir, 'store-cert.pem'), key: path.join(dir, 'store-key.pem') };
      const replace = (target: string, from: string) => {
        copyFileSync(from, `${target}.new`);
        renameSync(`${target}.new`, target);
      };
      replace(files.cert, first.cert);
      replace(files.key, first.key);
      const storeEnv = { STORE_TLS_CERT: files.cert, STORE_TLS_KEY: files.key, STORE_TLS_RELOAD_MS: '100' };
      let renewing = await startStore(path.join(dir, 'data'), storeEnv);
      procs.push(renewing);
      const web = await startWeb(renewing.port, dir, {
        STORE_ADDRESS: `localhost:${renewing.port}`,
        STORE_TLS_CA: files.cert,
        STORE_TLS_RELOAD_MS: '100',
        STORE_DEADLINE_MS: '1000',
      });
      procs.push(web);
      const jar = new CookieJarClient(`http://127.0.0.1:${web.port}`);
      const pipeBreaks = async () => {
        const text = await (await fetch(`http://127.0.0.1:${web.port}/metrics`)).text();
        return [...parsePrometheus(text)].filter(([name]) => name.startsWith('web_store_pipe_breaks_total')).reduce((sum, [, value]) => sum + value, 0);
      };
      const counts = async () => {
        const page = await jar.page();
        return [page.status, page.count1, page.count2];
      };
      assert.deepEqual(await counts(), [200, 0, 0]);

      // A half-written file: the web keeps trusting what it has, and says so once.
      let from = web.lines.length;
      writeFileSync(`${files.cert}.new`, readFileSync(first.cert).subarray(0, 200));
      renameSync(`${files.cert}.new`, files.cert);
      const warning = await waitForLine(web, (l) => l.includes('STORE_TLS_CA does not hold usable certificates') && web.lines.indexOf(l) >= from);
      assert.match(warning, /"reason":"no certificate in the file"/);
      replace(files.cert, first.cert);
      assert.deepEqual(await counts(), [200, 1, 0]);

      from = web.lines.length;
      const storeFrom = renewing.lines.length;
      replace(files.key, renewed.key);
      replace(files.cert, renewed.cert);
      await waitForLine(renewing, (l) => l.includes('TLS certificate reloaded') && renewing.lines.indexOf(l) >= storeFrom);
      await waitForLine(web, (l) => l.includes('STORE_TLS_CA reloaded') && web.lines.indexOf(l) >= from);
      assert.deepEqual(await counts(), [200, 2, 0]);
      assert.equal(await pipeBreaks(), 0, 'the stream made before the renewal goes on');

      // A new connection: the store restarts on the same port, serving the renewed certificate.
      await renewing.stop();
      procs.splice(procs.indexOf(renewing), 1);
      renewing = await startStore(path.join(dir, 'data'), storeEnv, renewing.port);
      procs.unshift(renewing);
      const deadline = Date.now() + 10_000;
      // A 503 whose write was sent may have been applied (a deadline passed on a loaded machine).
      let unknown = 0;
      let page = await jar.page();
      while (page.status !== 200 && Date.now() < deadline) {
        if (/not known whether your last change was saved/.test(page.html)) unknown += 1;
        await new Promise((r) => setTimeout(r, 200));
        page = await jar.page();
      }
      assert.equal(page.status, 200, 'the web trusts the renewed certificate on a new connection');
      assert.ok(page.count1 >= 3 && page.count1 <= 3 + unknown && page.count2 === 0, `the counters were kept: ${page.count1}/${page.count2}`);
    });
  });

  it("a client channel idle long enough for grpc-js to drop its CA listener trusts a file renewed meanwhile from its next connection: polling starts again with a look at once, not one interval later", async () => {
    const dir = path.join(tmp.dir, 'idle-ca');
    mkdirSync(dir);
    const file = path.join(dir, 'ca.pem');
    copyFileSync(pki.cert, file);
    const { logger } = memoryLogger();
    const provider = new ReloadingCa('STORE_TLS_CA', file, readFileSync(file), { intervalMs: 60_000, logger });
    const updates: string[] = [];
    const listener = (update: { caCertificate: Buffer } | null) => void updates.push(update?.caCertificate.toString() ?? 'none');
    provider.addCaCertificateListener(listener);
    await new Promise((r) => setTimeout(r, 100));
    provider.removeCaCertificateListener(listener); // the channel went idle: polling stops
    copyFileSync(stranger.cert, `${file}.new`);
    renameSync(`${file}.new`, file);
    provider.addCaCertificateListener(listener); // its next call
    await new Promise((r) => setTimeout(r, 300));
    provider.removeCaCertificateListener(listener);
    assert.equal(updates.at(-1), readFileSync(stranger.cert, 'latin1'), 'the renewed file, well within the 60 s interval');
  });
});
