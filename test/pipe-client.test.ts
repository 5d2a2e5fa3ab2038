import assert from 'node:assert/strict';
import { connect, createServer, type Socket } from 'node:net';
import { Metadata, Server, ServerCredentials, type ServerDuplexStream, type ServerUnaryCall, type sendUnaryData, type ServiceError, status } from '@grpc/grpc-js';
import { createPipeClient } from '../services/client/pipe-client';
import { createRawClient, createStoreClient, type StoreClient, StoreClientError } from '../services/client/store-client';
import { type BatchRequest, type BatchResponse, SessionStoreService } from '../services/generated/kv';
import { freeBasePort } from './helpers/ports';
import { type Proc, startStore, tempDir } from './helpers/procs';

const isKind = (kind: string) => (err: unknown) => err instanceof StoreClientError && err.kind === kind;

/** The StoreClientError a call fails with (the test fails if it succeeds). */
const failure = (call: Promise<unknown>): Promise<StoreClientError> =>
  call.then(
    () => assert.fail('the call succeeded'),
    (err: unknown) => {
      assert.ok(err instanceof StoreClientError, String(err));
      return err;
    },
  );

describe('pipe client: batched store calls over one stream (real store process)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let client: StoreClient;
  /** For the tests that move 6 MB: writing that took up to 900 ms on a busy machine, close to `client`'s deadline. */
  let bulk: StoreClient;

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir);
    client = createPipeClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 1000 });
    bulk = createPipeClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 10_000 });
  });
  after(async () => {
    client?.close();
    bulk?.close();
    await store?.stop('SIGKILL');
    tmp?.remove();
  });

  it('a connection that goes silent without closing (a NAT that forgot it) is given up within about 15 s, and calls go through on a new one', async function () {
    this.timeout(40_000);
    // A proxy that can stop passing bytes on the connections it holds, while it takes new ones.
    const links: Array<{ silent: boolean; sockets: Socket[] }> = [];
    const proxy = createServer((downstream) => {
      const upstream = connect(store.port, '127.0.0.1');
      const link = { silent: false, sockets: [downstream, upstream] };
      links.push(link);
      downstream.on('data', (d: Buffer) => link.silent || upstream.write(d));
      upstream.on('data', (d: Buffer) => link.silent || downstream.write(d));
      for (const socket of link.sockets) {
        socket.on('error', () => undefined);
        socket.on('close', () => link.sockets.forEach((s) => s.destroy()));
      }
    });
    await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
    const { port } = proxy.address() as { port: number };
    const silenced = createPipeClient({ address: `127.0.0.1:${port}`, deadlineMs: 500 });
    try {
      await silenced.put('silent-link', Buffer.from('1'), { ttlMs: 60_000 });
      for (const link of links) link.silent = true;
      const started = Date.now();
      for (;;) {
        const answer = await silenced.get('silent-link').then(
          (entry) => entry,
          (err: unknown) => (isKind('unavailable')(err) ? undefined : assert.fail(String(err))),
        );
        if (answer) break;
        assert.ok(Date.now() - started < 25_000, 'still no answer after 25 s');
        await new Promise((r) => setTimeout(r, 200));
      }
      const tookMs = Date.now() - started;
      assert.ok(tookMs < 20_000, `answered again after ${tookMs} ms`);
      assert.ok(links.length >= 2, 'on a new connection');
    } finally {
      silenced.close();
      proxy.close();
      for (const link of links) link.sockets.forEach((s) => s.destroy());
    }
  });

  it("calls issued together fit the store's smallest message limit (STORE_MAX_MESSAGE_BYTES): no batch of them ends the stream", async () => {
    // The least the store accepts with the default limits: one key and value of the largest size, and framing.
    const own = tempDir();
    const small = await startStore(own.dir, { STORE_MAX_MESSAGE_BYTES: String(65_536 + 256 + 256) });
    const pipe = createPipeClient({ address: `127.0.0.1:${small.port}`, deadlineMs: 5000 });
    try {
      // Ten 10 KB sessions written by ten requests at once: 100 KB in one batch ended the stream.
      const writes = Array.from({ length: 10 }, (_, i) => pipe.put(`small-limit-${i}`, Buffer.alloc(10_000, 'x'), { ttlMs: 60_000, requestId: `request-${i}` }));
      const results = await Promise.allSettled(writes);
      const failed = results.filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
      assert.equal(failed.length, 0, failed[0]?.reason?.message);
      assert.equal((await pipe.get('small-limit-9'))?.value.length, 10_000);
    } finally {
      pipe.close();
      await small.stop();
      own.remove();
    }
  });

  it('every STORE_MAX_MESSAGE_BYTES the store accepts carries a put of the largest key and value, with a request id, through the pipe', async () => {
    for (const framing of [64, 256]) {
      const own = tempDir();
      const limit = String(65_536 + 256 + framing);
      const started = await startStore(own.dir, { STORE_MAX_MESSAGE_BYTES: limit }).catch((err: Error) => err);
      if (started instanceof Error) {
        assert.match(started.message, new RegExp(`STORE_MAX_MESSAGE_BYTES=${limit} must leave room for one entry`));
        own.remove();
        continue;
      }
      const pipe = createPipeClient({ address: `127.0.0.1:${started.port}`, deadlineMs: 5000 });
      try {
        const written = await pipe.put('k'.repeat(256), Buffer.alloc(65_536, 'y'), { ttlMs: 60_000, requestId: 'r'.repeat(128) });
        assert.equal((await pipe.get('k'.repeat(256)))?.version, written.version, limit);
      } finally {
        pipe.close();
        await started.stop();
        own.remove();
      }
    }
  });

  it('operations issued together keep their own results and errors', async () => {
    const first = await client.put('p1', Buffer.from('a'), { ttlMs: 60_000 });
    const results = await Promise.allSettled([
      client.get('p1'),
      client.put('p1', Buffer.from('b'), { ttlMs: 60_000, expectedVersion: first.version + 1000 }),
      client.get(''),
      client.put('p2', Buffer.from('c'), { ttlMs: 60_000 }),
      client.delete('missing'),
      client.get('missing'),
    ]);
    assert.equal(results[0].status === 'fulfilled' && results[0].value?.value.toString(), 'a');
    assert.ok(results[1].status === 'rejected' && isKind('conflict')(results[1].reason));
    assert.ok(results[2].status === 'rejected' && isKind('invalid')(results[2].reason));
    assert.equal(results[3].status, 'fulfilled');
    assert.deepEqual(results[4], { status: 'fulfilled', value: false });
    assert.deepEqual(results[5], { status: 'fulfilled', value: null });
  });

  it('thousands of concurrent operations all complete exactly once', async () => {
    // A roomy deadline: this is about exactly-once delivery, not speed.
    const roomy = createPipeClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 10_000 });
    try {
      const keys = Array.from({ length: 3000 }, (_, i) => `many-${i}`);
      await Promise.all(keys.map((k) => roomy.put(k, Buffer.from(k), { ttlMs: 60_000 })));
      const values = await Promise.all(keys.map((k) => roomy.get(k)));
      assert.deepEqual(values.map((e) => e?.value.toString()), keys);
    } finally {
      roomy.close();
    }
  });

  it('values up to the store limit issued together fit: batches are capped by bytes, and a batch of Gets may answer over 4 MiB (read again one by one, behind one drain listener)', async () => {
    const value = Buffer.alloc(60 * 1024, 'v'); // under STORE_MAX_VALUE_BYTES (64 KiB); 100 of them are over 4 MiB
    const keys = Array.from({ length: 100 }, (_, i) => `large-${i}`);
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(`${w.name}: ${w.message}`);
    process.on('warning', onWarning);
    try {
      const puts = await Promise.allSettled(keys.map((k) => bulk.put(k, value, { ttlMs: 60_000 })));
      const failedPuts = puts.filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
      assert.equal(failedPuts.length, 0, `${failedPuts.length} puts failed, e.g. ${failedPuts[0]?.reason?.message}`);
      const gets = await Promise.allSettled(keys.map((k) => bulk.get(k)));
      const failedGets = gets.filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
      assert.equal(failedGets.length, 0, `${failedGets.length} gets failed, e.g. ${failedGets[0]?.reason?.message}`);
      assert.ok(gets.every((r) => r.status === 'fulfilled' && r.value?.value.length === value.length));
      await new Promise((r) => setImmediate(r)); // warnings are emitted on the next tick
      assert.deepEqual(warnings.filter((w) => w.startsWith('MaxListenersExceededWarning')), []);
    } finally {
      process.off('warning', onWarning);
    }
  });

  it('a frozen store fails the calls within the deadline, and they work again once it resumes', async () => {
    store.child.kill('SIGSTOP');
    const started = Date.now();
    try {
      await assert.rejects(client.get('p1'), isKind('unavailable'));
      assert.ok(Date.now() - started < 2500, `failed after ${Date.now() - started} ms`);
    } finally {
      store.child.kill('SIGCONT');
    }
    assert.equal((await client.get('p1'))?.value.toString(), 'a');
  });

  it('a frozen store fails every call within its deadline, also those queued behind a full stream, and sends none of those', async () => {
    const frozen = createPipeClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 500 });
    const value = Buffer.alloc(60_000, 'v');
    const late: number[] = [];
    const settled: Promise<unknown>[] = [];
    const errors: StoreClientError[] = [];
    await frozen.get('p1');
    store.child.kill('SIGSTOP');
    try {
      // A few MB fill the stream's window and the socket buffers; the later puts queue until it drains.
      for (let i = 0; i < 100; i += 1) {
        const started = Date.now();
        const done = () => {
          if (Date.now() - started > 500 + 250) late.push(Date.now() - started);
        };
        settled.push(
          frozen.put(`frozen-${i}`, value, { ttlMs: 60_000 }).then(done, (err: StoreClientError) => {
            errors[i] = err;
            done();
          }),
        );
        await new Promise((r) => setTimeout(r, 5));
      }
      const pending = await Promise.race([Promise.all(settled).then(() => 0), new Promise<string>((r) => setTimeout(() => r('some calls'), 1000))]);
      assert.equal(pending, 0, 'calls still pending 1 s after the last one');
      assert.deepEqual(late, [], 'calls settled this many ms after they were made, past their 500 ms deadline');
      // The first put went out and was not answered: it may yet be applied. The last never left the queue.
      assert.deepEqual([errors[0]?.outcomeUnknown, errors[0]?.call], [true, 'put'], errors[0]?.message);
      assert.deepEqual([errors[99]?.outcomeUnknown, errors[99]?.call], [false, 'put'], errors[99]?.message);
    } finally {
      store.child.kill('SIGCONT');
      frozen.close();
    }
    // The last puts waited in the queue past their deadline: never sent, so never applied.
    assert.equal(await client.get('frozen-99'), null);
  });

  it('a put sent to a frozen store whose deadline passes before the store resumes is not applied when it reads it late', async () => {
    const late = createPipeClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 500 });
    try {
      // The first batches of the stream set the store's baseline for how fast a batch arrives.
      await late.put('late-put', Buffer.from('before'), { ttlMs: 60_000 });
      await late.get('late-put');
      store.child.kill('SIGSTOP');
      try {
        const started = Date.now();
        await assert.rejects(late.put('late-put', Buffer.from('after'), { ttlMs: 60_000 }), isKind('unavailable'));
        assert.ok(Date.now() - started < 1000, `failed after ${Date.now() - started} ms`);
        // Resume well past the deadline: the store then reads a batch whose caller gave up.
        await new Promise((r) => setTimeout(r, 100));
      } finally {
        store.child.kill('SIGCONT');
      }
      // The same stream: the store reads this batch after the late one.
      assert.equal((await late.get('late-put'))?.value.toString(), 'before', 'the put answered DEADLINE_EXCEEDED was applied');
    } finally {
      late.close();
    }
  });

  it('a restarted store: in-flight calls fail as unavailable, later calls reconnect by themselves', async () => {
    const port = store.port;
    await store.stop('SIGKILL');
    await assert.rejects(client.get('p1'), isKind('unavailable'));
    store = await startStore(tmp.dir, {}, port);
    assert.equal(await readOnceBack(client, 'p1'), 'a');
  });

  it('each end of a stream other than close() is reported with why: broken, unopened while the store is down; none while it works or at close', async () => {
    const reasons: string[] = [];
    const watched = createPipeClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 1000, onBreak: (reason) => reasons.push(reason) });
    try {
      for (let i = 0; i < 3; i += 1) await watched.put('reported', Buffer.from(String(i)), { ttlMs: 60_000 });
      assert.deepEqual(reasons, [], 'one stream for calls in a row');
      const port = store.port;
      await store.stop('SIGKILL');
      await assert.rejects(watched.get('reported'), isKind('unavailable'));
      await assert.rejects(watched.get('reported'), isKind('unavailable'));
      // The killed store's stream broke (with a call in flight or none); the calls after it found no connection.
      assert.equal(reasons[0], 'broken');
      assert.ok(reasons.length >= 2 && reasons.slice(1).every((r) => r === 'unopened'), reasons.join());
      store = await startStore(tmp.dir, {}, port);
      assert.equal(await readOnceBack(watched, 'reported'), '2');
    } finally {
      const before = reasons.length;
      watched.close();
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(reasons.length, before, 'close() is no break');
    }
  });

  it('a stream the store refuses for a wrong token is reported as refused, not broken; its calls fail as unauthenticated and not applied', async () => {
    const tokenTmp = tempDir();
    const guarded = await startStore(tokenTmp.dir, { STORE_TOKEN: 'store-token-0123456789' });
    const reasons: string[] = [];
    const wrong = createPipeClient({ address: `127.0.0.1:${guarded.port}`, deadlineMs: 2000, token: 'wrong-token-0123456789', onBreak: (reason) => reasons.push(reason) });
    try {
      const errors = await Promise.all([failure(wrong.put('refused', Buffer.from('x'), { ttlMs: 60_000 })), failure(wrong.get('refused'))]);
      for (const err of errors) {
        assert.equal(err.kind, 'unauthenticated', err.message);
        assert.equal(err.outcomeUnknown, false);
      }
      assert.deepEqual(reasons, ['refused']);
    } finally {
      wrong.close();
      await guarded.stop();
      tokenTmp.remove();
    }
  });

  it('a stream that breaks with any status fails its in-flight operations as unavailable, outcome unknown', async () => {
    const fake = new Server();
    fake.addService(SessionStoreService, {
      // A store that ends the stream with INVALID_ARGUMENT once it has read a batch (which it may have run).
      pipe: (call: ServerDuplexStream<BatchRequest, BatchResponse>) => {
        call.on('error', () => undefined);
        call.once('data', () => call.emit('error', { code: status.INVALID_ARGUMENT, details: 'request could not be decoded', metadata: new Metadata() }));
      },
    });
    const port = await new Promise<number>((resolve, reject) =>
      fake.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    const broken = createPipeClient({ address: `127.0.0.1:${port}`, deadlineMs: 2000 });
    try {
      const err = await broken.put('maybe-written', Buffer.from('x'), { ttlMs: 60_000 }).then(
        () => assert.fail('the put succeeded'),
        (e: StoreClientError) => e,
      );
      assert.equal(err.kind, 'unavailable', err.message);
      assert.match(err.message, /outcome .*unknown/);
      assert.match(err.message, /INVALID_ARGUMENT/);
      assert.equal(err.outcomeUnknown, true);
      assert.equal(err.call, 'put');
    } finally {
      broken.close();
      fake.forceShutdown();
    }
  });

  it('a pipe the store ends with status OK (it is stopping) fails the operations it left unanswered as unavailable and not applied; the next call opens a new pipe', async () => {
    let pipes = 0;
    const fake = new Server();
    fake.addService(SessionStoreService, {
      // A stopping store that has answered everything it ran: a batch read after that is not run, and the pipe ends.
      pipe: (call: ServerDuplexStream<BatchRequest, BatchResponse>) => {
        pipes += 1;
        call.on('error', () => undefined);
        call.once('data', () => call.end());
      },
    });
    const port = await new Promise<number>((resolve, reject) =>
      fake.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    const ended = createPipeClient({ address: `127.0.0.1:${port}`, deadlineMs: 5000 });
    try {
      for (const attempt of [1, 2]) {
        const err = await failure(ended.put('not-written', Buffer.from('x'), { ttlMs: 60_000 }));
        assert.equal(err.kind, 'unavailable', err.message);
        assert.equal(err.outcomeUnknown, false, err.message);
        assert.equal(err.call, 'put');
        assert.match(err.message, /closed the pipe .*without running the operation/);
        assert.equal(pipes, attempt, 'each call went out on a pipe of its own');
      }
    } finally {
      ended.close();
      fake.forceShutdown();
    }
  });

  /** A server with the store's unary Batch only (no Pipe), passing each batch on; `batches` counts their operations. */
  async function batchOnlyProxy(deadlineMs: number) {
    const upstream = createRawClient({ address: `127.0.0.1:${store.port}`, deadlineMs });
    const batches: number[] = [];
    const proxy = new Server({ 'grpc.max_send_message_length': -1 });
    proxy.addService(SessionStoreService, {
      batch: (call: ServerUnaryCall<BatchRequest, BatchResponse>, callback: sendUnaryData<BatchResponse>) => {
        batches.push(call.request.ops.length);
        upstream.batch(call.request, (err: ServiceError | null, res?: BatchResponse) => callback(err, res));
      },
    });
    const port = await new Promise<number>((resolve, reject) =>
      proxy.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    const client = createPipeClient({ address: `127.0.0.1:${port}`, deadlineMs });
    return {
      client,
      batches,
      close() {
        client.close();
        upstream.close();
        proxy.forceShutdown();
      },
    };
  }

  it('falls back to the unary Batch RPC when the store has no Pipe, coalescing one turn into one batch', async () => {
    const { client: viaProxy, batches, close } = await batchOnlyProxy(1000);
    try {
      const values = await Promise.all(Array.from({ length: 40 }, () => viaProxy.get('p1')));
      assert.ok(values.every((e) => e?.value.toString() === 'a'));
      assert.equal(batches.reduce((a, b) => a + b, 0), 40);
      assert.ok(batches.length <= 2, `40 calls of one turn took ${batches.length} batches`);
    } finally {
      close();
    }
  });

  it('through the unary Batch fallback, Gets whose answers pass the store\'s message cap are read again on their own', async () => {
    // A unary Batch answer holds at most STORE_MAX_MESSAGE_BYTES (4 MiB) of entries; a Pipe answer has no cap.
    const { client: viaProxy, batches, close } = await batchOnlyProxy(5000);
    try {
      const value = Buffer.alloc(60 * 1024, 'v'); // 100 of them are over 4 MiB
      const keys = Array.from({ length: 100 }, (_, i) => `capped-${i}`);
      await Promise.all(keys.map((k) => bulk.put(k, value, { ttlMs: 60_000 })));
      batches.length = 0;
      const gets = await Promise.allSettled(keys.map((k) => viaProxy.get(k)));
      const failed = gets.filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
      assert.equal(failed.length, 0, `${failed.length} gets failed, e.g. ${failed[0]?.reason?.message}`);
      assert.ok(gets.every((r) => r.status === 'fulfilled' && r.value?.value.equals(value)));
      assert.ok(batches.length > 1 && batches.slice(1).every((n) => n === 1), `batches of ${batches.join(', ')} operations: one, then the capped Gets one by one`);
    } finally {
      close();
    }
  });

  it('refuses at once when more operations are queued than allowed', async () => {
    const small = createPipeClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 1000, maxQueuedOps: 10 });
    try {
      const results = await Promise.allSettled(Array.from({ length: 20 }, () => small.get('p1')));
      assert.equal(results.filter((r) => r.status === 'fulfilled').length, 10);
      assert.ok(results.filter((r) => r.status === 'rejected').every((r) => isKind('unavailable')((r as PromiseRejectedResult).reason)));
    } finally {
      small.close();
    }
  });
});

describe('outcomeUnknown: a failed call the store may have applied, on both clients (real store process)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let address: string;
  const clients: Array<[string, StoreClient]> = [];

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir, { STORE_SYNCHRONOUS: 'NORMAL' });
    address = `127.0.0.1:${store.port}`;
    clients.push(['unary', createStoreClient({ address, deadlineMs: 500 })], ['pipe', createPipeClient({ address, deadlineMs: 500 })]);
  });
  after(async () => {
    for (const [, client] of clients) client.close();
    await store?.stop('SIGKILL');
    tmp?.remove();
  });

  it('a put, delete or get sent to a frozen store and not answered within the deadline: outcomeUnknown, naming the call', async () => {
    for (const [, client] of clients) await client.put('frozen', Buffer.from('a'), { ttlMs: 60_000 });
    store.child.kill('SIGSTOP');
    try {
      for (const [name, client] of clients) {
        const errors = await Promise.all([
          failure(client.put('frozen', Buffer.from('b'), { ttlMs: 60_000 })),
          failure(client.delete('frozen')),
          failure(client.get('frozen')),
        ]);
        assert.deepEqual(
          errors.map((e) => [e.kind, e.outcomeUnknown, e.call]),
          [
            ['unavailable', true, 'put'],
            ['unavailable', true, 'delete'],
            ['unavailable', true, 'get'],
          ],
          `${name}: ${errors.map((e) => e.message).join(' | ')}`,
        );
      }
    } finally {
      store.child.kill('SIGCONT');
    }
  });

  it('pipe: closing the client with a write in flight fails it with outcomeUnknown; one refused by a closed client or a full queue was never sent', async () => {
    const pipe = createPipeClient({ address, deadlineMs: 5000, maxQueuedOps: 1 });
    await pipe.get('warm-up');
    store.child.kill('SIGSTOP');
    try {
      const inFlight = failure(pipe.put('closing', Buffer.from('x'), { ttlMs: 60_000 }));
      await new Promise((r) => setImmediate(r)); // flushed: the batch is on the stream
      const queued = pipe.put('queued', Buffer.from('x'), { ttlMs: 60_000 });
      const full = await failure(pipe.put('full', Buffer.from('x'), { ttlMs: 60_000 }));
      pipe.close();
      const closed = await failure(pipe.put('after-close', Buffer.from('x'), { ttlMs: 60_000 }));
      const sent = await inFlight;
      const waiting = await failure(queued);
      assert.deepEqual([sent.outcomeUnknown, sent.call], [true, 'put'], sent.message);
      for (const err of [full, closed, waiting]) assert.deepEqual([err.kind, err.outcomeUnknown, err.call], ['unavailable', false, 'put'], err.message);
    } finally {
      store.child.kill('SIGCONT');
      pipe.close();
    }
  });

  it('answered by the store (conflict, invalid argument): not outcomeUnknown', async () => {
    for (const [name, client] of clients) {
      const first = await client.put(`answered-${name}`, Buffer.from('a'), { ttlMs: 60_000 });
      const conflict = await failure(client.put(`answered-${name}`, Buffer.from('b'), { ttlMs: 60_000, expectedVersion: first.version + 1 }));
      const invalid = await failure(client.put('', Buffer.from('b'), { ttlMs: 60_000 }));
      assert.deepEqual([conflict.kind, conflict.outcomeUnknown, conflict.call], ['conflict', false, 'put'], name);
      assert.deepEqual([invalid.kind, invalid.outcomeUnknown, invalid.call], ['invalid', false, 'put'], name);
    }
  });

  it('arguments a request cannot carry are refused alone as invalid and never sent; calls issued with them go through', async () => {
    const bad: Array<[string, (client: StoreClient) => Promise<unknown>, RegExp]> = [
      ['put', (c) => c.put('bad-ttl', Buffer.from('x'), { ttlMs: 1.5 }), /ttlMs must be a whole number/],
      ['put', (c) => c.put('bad-version', Buffer.from('x'), { ttlMs: 60_000, expectedVersion: -1 }), /expectedVersion must be a version/],
      ['put', (c) => c.put('bad-value', 'x' as unknown as Buffer, { ttlMs: 60_000 }), /value must be a Buffer/],
      ['get', (c) => c.get('bad-refresh', { refreshTtlMs: Number.NaN }), /refreshTtlMs must be a whole number/],
      ['delete', (c) => c.delete(42 as unknown as string), /key must be a string/],
      ['get', (c) => c.get('bad-request-id', { requestId: 7 as unknown as string }), /requestId must be a string/],
    ];
    for (const [name, client] of clients) {
      // Calls of one turn share a batch on the pipe: before the check, one bad argument failed the
      // whole stream, and every other call in flight on it with "outcome unknown".
      const earlier = client.put(`good-earlier-${name}`, Buffer.from('a'), { ttlMs: 60_000 });
      await new Promise((resolve) => setImmediate(resolve));
      const good = client.put(`good-${name}`, Buffer.from('b'), { ttlMs: 60_000 });
      const refused = await Promise.all(bad.map(([, call]) => failure(call(client))));
      await Promise.all([earlier, good]);
      bad.forEach(([call, , message], i) => {
        assert.deepEqual([refused[i].kind, refused[i].outcomeUnknown, refused[i].call], ['invalid', false, call], `${name}: ${refused[i].message}`);
        assert.match(refused[i].message, message, name);
      });
      assert.equal((await client.get(`good-${name}`))?.value.toString(), 'b', name);
      for (const key of ['bad-ttl', 'bad-version', 'bad-value']) assert.equal(await client.get(key), null, `${name}: ${key} was not written`);
    }
  });

  it("a put over the store's message limit (STORE_MAX_MESSAGE_BYTES) fails alone, answered as invalid; the calls in flight beside it go through", async () => {
    // Clients of their own with a roomy deadline: 5 MB on a busy machine can take longer than 500 ms.
    const roomy: Array<[string, StoreClient]> = [
      ['unary', createStoreClient({ address, deadlineMs: 10_000 })],
      ['pipe', createPipeClient({ address, deadlineMs: 10_000 })],
    ];
    try {
      for (const [name, client] of roomy) await sizeLimitFailsAlone(name, client);
    } finally {
      for (const [, client] of roomy) client.close();
    }
  });

  async function sizeLimitFailsAlone(name: string, client: StoreClient): Promise<void> {
    // A session that grew past every limit: on the pipe, its message used to end the stream, and
    // with it every other browser's call in flight on it, all as "outcome unknown".
    const huge = Buffer.alloc(5 * 1024 * 1024, 'x');
    const earlier = client.put(`beside-earlier-${name}`, Buffer.from('a'), { ttlMs: 60_000 }).then(
      () => undefined,
      (err: Error) => err,
    );
    await new Promise((resolve) => setImmediate(resolve));
    const results = await Promise.allSettled([
      client.put(`huge-${name}`, huge, { ttlMs: 60_000 }),
      client.put(`beside-${name}`, Buffer.from('b'), { ttlMs: 60_000 }),
      client.get(`beside-earlier-${name}`),
    ]);
    const refused = results[0].status === 'rejected' ? (results[0].reason as StoreClientError) : assert.fail(`${name}: the huge put succeeded`);
    assert.deepEqual([refused.kind, refused.outcomeUnknown, refused.call], ['invalid', false, 'put'], `${name}: ${refused.message}`);
    assert.match(refused.message, /larger than max/, name);
    const failed = results.slice(1).filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
    assert.equal(failed.length, 0, `${name}: ${failed[0]?.reason?.message}`);
    assert.equal(await earlier, undefined, name);
    assert.equal((await client.get(`beside-${name}`))?.value.toString(), 'b', name);
    assert.equal(await client.get(`huge-${name}`), null, name);
  }

  it('nothing listening at the address (connection refused): unavailable, not outcomeUnknown', async () => {
    const port = await freeBasePort([0]);
    for (const connect of [createStoreClient, createPipeClient]) {
      const client = connect({ address: `127.0.0.1:${port}`, deadlineMs: 2000 });
      try {
        const err = await failure(client.put('refused', Buffer.from('x'), { ttlMs: 60_000 }));
        assert.deepEqual([err.kind, err.outcomeUnknown], ['unavailable', false], err.message);
      } finally {
        client.close();
      }
    }
  });

  it("unary: the store's own UNAVAILABLE and DEADLINE_EXCEEDED (it skipped the call) are answers, not outcomeUnknown; a dropped connection is", async () => {
    const answers: Array<Partial<ServiceError>> = [
      { code: status.UNAVAILABLE, details: 'the store is stopping; retry on a new connection' },
      { code: status.DEADLINE_EXCEEDED, details: 'deadline passed before the call was served' },
    ];
    const fake = new Server();
    fake.addService(SessionStoreService, {
      put: (_call: ServerUnaryCall<unknown, unknown>, callback: sendUnaryData<unknown>) => callback(answers.shift() ?? null),
      // Never answers: the test drops the connection under it.
      delete: () => undefined,
    });
    const port = await new Promise<number>((resolve, reject) =>
      fake.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    const unary = createStoreClient({ address: `127.0.0.1:${port}`, deadlineMs: 5000 });
    try {
      for (const code of [status.UNAVAILABLE, status.DEADLINE_EXCEEDED]) {
        const err = await failure(unary.put('answered', Buffer.from('x'), { ttlMs: 60_000 }));
        assert.deepEqual([err.code, err.outcomeUnknown], [code, false], err.message);
      }
      const pending = failure(unary.delete('dropped'));
      await new Promise((r) => setTimeout(r, 100));
      fake.forceShutdown();
      const dropped = await pending;
      assert.deepEqual([dropped.kind, dropped.outcomeUnknown, dropped.call], ['unavailable', true, 'delete'], dropped.message);
    } finally {
      unary.close();
      fake.forceShutdown();
    }
  });
});

/** The key's value once the client reaches the store again (a read every 100 ms, up to 50), or undefined. */
async function readOnceBack(client: Pick<StoreClient, 'get'>, key: string): Promise<string | undefined> {
  for (let i = 0; i < 50; i += 1) {
    const value = await client.get(key).then(
      (e) => e?.value.toString(),
      () => new Promise<undefined>((r) => setTimeout(() => r(undefined), 100)),
    );
    if (value !== undefined) return value;
  }
  return undefined;
}
