import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, statSync } from 'node:fs';
import http2 from 'node:http2';
import path from 'node:path';
import { Metadata, status } from '@grpc/grpc-js';
import { authMetadata, createRawClient, createStoreClient } from '../services/client/store-client';
import { BatchRequest, DeleteRequest, GetRequest, ListRequest, type Op, PutRequest, type WatchEvent, WatchRequest } from '../services/generated/kv';
import { callRaw, METHODS, type MethodName, rawStoreClient } from './helpers/raw-grpc';
import { parsePrometheus } from './helpers/prometheus';
import { type Proc, startStore, startWeb, tempDir, waitForLine } from './helpers/procs';

const TOKEN = 'store-token-0123456789-abcdefghij';

/** One valid request per method, as protobuf bytes. */
const REQUESTS: Record<MethodName, Buffer[]> = {
  Get: [Buffer.from(GetRequest.encode({ key: 'auth', refreshTtlMs: 0 }).finish())],
  Put: [Buffer.from(PutRequest.encode({ key: 'auth', value: Buffer.from('v'), ttlMs: 60_000, expectedVersion: undefined }).finish())],
  Delete: [Buffer.from(DeleteRequest.encode({ key: 'auth-other', expectedVersion: undefined }).finish())],
  Batch: [Buffer.from(BatchRequest.encode({ id: 1, ops: [{ op: { $case: 'get', value: { key: 'auth', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: '' }] }).finish())],
  List: [Buffer.from(ListRequest.encode({ prefix: '', limit: 0, startAfter: '', keysOnly: false }).finish())],
  ListPages: [Buffer.from(ListRequest.encode({ prefix: '', limit: 0, startAfter: '', keysOnly: false }).finish())],
  Watch: [Buffer.from(WatchRequest.encode({ prefix: '' }).finish())],
  Pipe: [Buffer.from(BatchRequest.encode({ id: 1, ops: [{ op: { $case: 'get', value: { key: 'auth', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: '' }] }).finish())],
};

function bearer(value: string | undefined): Metadata {
  const metadata = new Metadata();
  if (value !== undefined) metadata.set('authorization', value);
  return metadata;
}

describe('store authentication with STORE_TOKEN (real store and web processes)', function () {
  this.timeout(30_000);
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let raw: ReturnType<typeof rawStoreClient>;

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir, { STORE_TOKEN: TOKEN });
    raw = rawStoreClient(`127.0.0.1:${store.port}`);
  });
  after(async () => {
    raw?.close();
    await store?.stop();
    tmp?.remove();
  });

  const refused: Array<[string, string | undefined]> = [
    ['no authorization metadata', undefined],
    ['a wrong token', `Bearer ${TOKEN.replace(/.$/, 'X')}`],
    ['the right token without "Bearer "', TOKEN],
    ['an empty bearer token', 'Bearer '],
  ];
  for (const method of Object.keys(METHODS) as MethodName[]) {
    for (const [what, header] of refused) {
      it(`${method} with ${what} is UNAUTHENTICATED`, async () => {
        const outcome = await callRaw(raw, method, REQUESTS[method], bearer(header), { streamMs: 2000 });
        assert.equal(outcome.code, status.UNAUTHENTICATED, outcome.details);
        assert.equal(outcome.messages, 0, 'nothing was answered');
      });
    }
  }

  // A request is decoded before its handler runs: a 4 MiB Batch of tiny operations became some
  // 100 MB of objects (and a log line listing its request ids) for a client without the token.
  it('a call without the token is refused from its metadata, before its request is read: a message still being sent gets UNAUTHENTICATED', async () => {
    const session = http2.connect(`http://127.0.0.1:${store.port}`);
    session.on('error', () => undefined);
    try {
      for (const method of Object.keys(METHODS) as MethodName[]) {
        const code = await new Promise<string | undefined>((resolve) => {
          const stream = session.request({
            ':method': 'POST',
            ':path': `/sessions.kv.v1.SessionStore/${method}`,
            'content-type': 'application/grpc',
            te: 'trailers',
            authorization: 'Bearer wrong-token-0123456789',
          });
          const timer = setTimeout(() => stream.close(http2.constants.NGHTTP2_CANCEL), 2000);
          const take = (headers: http2.IncomingHttpHeaders) => {
            if (headers['grpc-status'] === undefined) return;
            clearTimeout(timer);
            resolve(String(headers['grpc-status']));
          };
          stream.on('response', take);
          stream.on('trailers', take);
          stream.on('data', () => undefined);
          stream.on('error', () => undefined);
          stream.on('close', () => resolve(undefined));
          // The start of a message that announces 1 MiB and never comes.
          const header = Buffer.alloc(5);
          header.writeUInt32BE(1024 * 1024, 1);
          stream.write(Buffer.concat([header, Buffer.alloc(100)]));
        });
        assert.equal(code, String(status.UNAUTHENTICATED), `${method} answered ${code ?? 'nothing within 2 s'}`);
      }
    } finally {
      session.close();
    }
  });

  it("a Batch without the token is logged in one short line, without its operations' request ids", async () => {
    const ops: Op[] = Array.from({ length: 5000 }, (_, i) => ({ op: { $case: 'get', value: { key: 'k', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: `unauthenticated-${i}-${'x'.repeat(100)}` }));
    const request = Buffer.from(BatchRequest.encode({ id: 7, ops }).finish());
    const metadata = bearer(undefined);
    metadata.set('x-request-id', 'batch-without-token');
    const outcome = await callRaw(raw, 'Batch', [request], metadata);
    assert.equal(outcome.code, status.UNAUTHENTICATED);
    const line = await waitForLine(store, (l) => l.includes('batch-without-token'));
    assert.ok(!line.includes('unauthenticated-'), `${line.length} bytes: ${line.slice(0, 200)}`);
    assert.ok(line.length < 1024, `${line.length} bytes`);
  });

  it('a client calling again and again without the token gets at most 10 log lines per 10 s for each method, not one per call', async () => {
    const calls = Array.from({ length: 40 }, (_, i) => {
      const metadata = bearer(undefined);
      metadata.set('x-request-id', `flood-${i}`);
      return callRaw(raw, 'Delete', REQUESTS.Delete, metadata);
    });
    assert.deepEqual(new Set((await Promise.all(calls)).map((c) => c.code)), new Set([status.UNAUTHENTICATED]));
    await waitForLine(store, (l) => l.includes('"requestId":"flood-'));
    await new Promise((r) => setTimeout(r, 200)); // the rest of the lines, had they been written
    const logged = store.lines.filter((l) => l.includes('"requestId":"flood-')).length;
    assert.ok(logged >= 1 && logged <= 10, `${logged} lines for 40 refused calls`);
  });

  it('every unary RPC, List, ListPages and Pipe with the right token succeed', async () => {
    for (const method of ['Put', 'Get', 'Delete', 'Batch', 'List', 'ListPages', 'Pipe'] as const) {
      const outcome = await callRaw(raw, method, REQUESTS[method], bearer(`Bearer ${TOKEN}`), { streamMs: 2000 });
      assert.equal(outcome.code, status.OK, `${method}: ${outcome.details}`);
      assert.ok(outcome.messages >= 1, `${method} answered`);
    }
  });

  it('the scheme name is case-insensitive: "bearer <token>" and "BEARER <token>" are accepted', async () => {
    for (const scheme of ['bearer', 'BEARER']) {
      const outcome = await callRaw(raw, 'Get', REQUESTS.Get, bearer(`${scheme} ${TOKEN}`));
      assert.equal(outcome.code, status.OK, `${scheme}: ${outcome.details}`);
    }
  });

  it("the data files are the store's user's alone: other users of the machine cannot read past the token", async () => {
    const writer = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 5000, token: TOKEN });
    try {
      await writer.put('secret-session', Buffer.from('{"user":"alice"}'), { ttlMs: 60_000 });
    } finally {
      writer.close();
    }
    const files = readdirSync(tmp.dir).filter((name) => name.startsWith('sessions.'));
    assert.ok(files.includes('sessions.db'), files.join(', '));
    for (const name of files) {
      const mode = statSync(path.join(tmp.dir, name)).mode & 0o777;
      assert.equal(mode & 0o077, 0, `${name} is mode ${mode.toString(8)}`);
    }
  });

  it('a STORE_DATA_DIR the store creates is its user\'s alone, but its missing parents, which others may share, get the usual mode', async () => {
    const parents = tempDir();
    try {
      const dataDir = path.join(parents.dir, 'app', 'var', 'store');
      const other = await startStore(dataDir, { STORE_TOKEN: TOKEN });
      await other.stop();
      // What this process's umask gives a directory, as mkdir -p would.
      mkdirSync(path.join(parents.dir, 'usual'));
      const usual = statSync(path.join(parents.dir, 'usual')).mode & 0o777;
      assert.equal(statSync(dataDir).mode & 0o777, 0o700);
      for (const parent of ['app', 'app/var']) assert.equal((statSync(path.join(parents.dir, parent)).mode & 0o777).toString(8), usual.toString(8), parent);
    } finally {
      parents.remove();
    }
  });

  it("npm start's var/, shared by the two services, is their user's alone also when the web creates it first (it holds the generated session key)", async () => {
    const parents = tempDir();
    try {
      const dataDir = path.join(parents.dir, 'var');
      const web = await startWeb(store.port, dataDir, { SESSION_KEYS: '' });
      await web.stop();
      const other = await startStore(dataDir, { STORE_TOKEN: TOKEN });
      await other.stop();
      assert.equal((statSync(dataDir).mode & 0o777).toString(8), '700');
    } finally {
      parents.remove();
    }
  });

  it('Watch with the right token streams changes', async () => {
    const client = createRawClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 5000, token: TOKEN });
    const writer = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 5000, token: TOKEN });
    try {
      const watch = client.watch({ prefix: 'w-auth' }, authMetadata(TOKEN));
      watch.on('error', () => undefined);
      const event = new Promise<WatchEvent>((resolve) => watch.once('data', resolve));
      await new Promise((r) => setTimeout(r, 100));
      await writer.put('w-auth', Buffer.from('x'), { ttlMs: 60_000 });
      assert.equal((await event).key, 'w-auth');
      watch.cancel();
    } finally {
      client.close();
      writer.close();
    }
  });

  describe('the web service sends STORE_TOKEN', () => {
    let web: Proc | undefined;
    afterEach(async () => {
      await web?.stop();
      web = undefined;
    });

    it('with the right token the counter page works', async () => {
      web = await startWeb(store.port, tmp.dir, { STORE_TOKEN: TOKEN });
      const res = await fetch(`http://127.0.0.1:${web.port}/`);
      assert.equal(res.status, 200);
      assert.match(await res.text(), /Counter 1: 0\b/);
    });

    for (const [name, env] of [
      ['with a wrong token', { STORE_TOKEN: 'a-wrong-token-0123456789' }],
      ['without a token', {}],
    ] as const) {
      it(`${name} the page is the 503 "store unavailable" page, never a 500`, async () => {
        web = await startWeb(store.port, tmp.dir, env);
        const res = await fetch(`http://127.0.0.1:${web.port}/`);
        assert.equal(res.status, 503);
        assert.match(await res.text(), /session store is not available right now/);
        await waitForLine(web, (l) => l.includes('the store refused STORE_TOKEN')); // the operator is told why
        // The store refused the pipe before reading a batch: nothing on it ran, so it did not break.
        const metrics = parsePrometheus(await (await fetch(`http://127.0.0.1:${web.port}/metrics`)).text());
        assert.ok((metrics.get('web_store_pipe_breaks_total{reason="refused"}') ?? 0) >= 1, 'the refused pipe is counted as refused');
        assert.equal(metrics.get('web_store_pipe_breaks_total{reason="broken"}') ?? 0, 0);
      });
    }
  });
});
