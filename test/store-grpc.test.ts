import assert from 'node:assert/strict';
import http2 from 'node:http2';
import { Metadata, type ServiceError, status } from '@grpc/grpc-js';
import { createRawClient, createStoreClient, type StoreClient } from '../services/client/store-client';
import { BatchRequest, BatchResponse, GetRequest, type Op, PutRequest, WatchRequest } from '../services/generated/kv';
import { callRaw, frame, http2Call, rawStoreClient, reflectionClient } from './helpers/raw-grpc';
import { type Proc, startStore, tempDir, waitForLine } from './helpers/procs';

interface ReflectionResponse {
  list_services_response?: { service: Array<{ name: string }> };
  file_descriptor_response?: { file_descriptor_proto: Buffer[] };
  error_response?: { error_code: number; error_message: string };
}

describe('store gRPC manners: reflection, deadlines, message size, request logs (real store process)', function () {
  this.timeout(30_000);
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let client: StoreClient;
  let address: string;

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir, { STORE_MAX_VALUE_BYTES: '65536', STORE_MAX_MESSAGE_BYTES: '100000', LOG_LEVEL: 'debug' });
    address = `127.0.0.1:${store.port}`;
    client = createStoreClient({ address, deadlineMs: 3000 });
  });
  after(async () => {
    client?.close();
    await store?.stop();
    tmp?.remove();
  });

  it('server reflection lists sessions.kv.v1.SessionStore and grpc.health.v1.Health and describes SessionStore', async () => {
    const reflection = reflectionClient(address);
    try {
      const stream = reflection.ServerReflectionInfo();
      const responses: ReflectionResponse[] = [];
      const done = new Promise<void>((resolve, reject) => {
        stream.on('data', (r: ReflectionResponse) => {
          responses.push(r);
          if (responses.length === 2) stream.end();
        });
        stream.on('end', resolve);
        stream.on('error', reject);
      });
      stream.write({ list_services: '' });
      stream.write({ file_containing_symbol: 'sessions.kv.v1.SessionStore' });
      await done;
      const names = responses[0].list_services_response!.service.map((s) => s.name);
      assert.ok(names.includes('sessions.kv.v1.SessionStore'), names.join(', '));
      assert.ok(names.includes('grpc.health.v1.Health'), names.join(', '));
      const files = Buffer.concat(responses[1].file_descriptor_response!.file_descriptor_proto).toString('latin1');
      for (const word of ['SessionStore', 'Pipe', 'Watch', 'PutRequest']) assert.ok(files.includes(word), `descriptor mentions ${word}`);
    } finally {
      reflection.close();
    }
  });

  it('a call whose deadline has already passed when it arrives is skipped: DEADLINE_EXCEEDED and nothing written', async () => {
    const put = PutRequest.encode({ key: 'late', value: Buffer.from('x'), ttlMs: 60_000, expectedVersion: undefined }).finish();
    // grpc-timeout 1n: one nanosecond, gone before the server looks at the call.
    const outcome = await http2Call(store.port, 'Put', frame(Buffer.from(put)), { 'grpc-timeout': '1n' });
    assert.equal(outcome.code, status.DEADLINE_EXCEEDED);
    assert.equal(await client.get('late'), null, 'the Put was not executed');
    // The same call with time to spare is executed.
    const ok = await http2Call(store.port, 'Put', frame(Buffer.from(put)), { 'grpc-timeout': '5S' });
    assert.equal(ok.code, status.OK);
    assert.ok(await client.get('late'));
  });

  it('a request over STORE_MAX_MESSAGE_BYTES is RESOURCE_EXHAUSTED before it is decoded; a full-size value still fits', async () => {
    const raw = rawStoreClient(address);
    try {
      const huge = PutRequest.encode({ key: 'big', value: Buffer.alloc(150_000), ttlMs: 0, expectedVersion: undefined }).finish();
      const refused = await callRaw(raw, 'Put', [Buffer.from(huge)]);
      assert.equal(refused.code, status.RESOURCE_EXHAUSTED, refused.details);
      const full = PutRequest.encode({ key: 'big', value: Buffer.alloc(65_536), ttlMs: 0, expectedVersion: undefined }).finish();
      assert.equal((await callRaw(raw, 'Put', [Buffer.from(full)])).code, status.OK);
      const over = PutRequest.encode({ key: 'big', value: Buffer.alloc(65_537), ttlMs: 0, expectedVersion: undefined }).finish();
      const tooBig = await callRaw(raw, 'Put', [Buffer.from(over)]);
      assert.equal(tooBig.code, status.RESOURCE_EXHAUSTED);
      assert.match(tooBig.details, /STORE_MAX_VALUE_BYTES/);
    } finally {
      raw.close();
    }
  });

  it("grpc-js's own error lines (a client's illegal metadata, no token needed) are JSON log lines, cut short and at most 10 per 10 s", async () => {
    const before = store.lines.length;
    const session = http2.connect(`http://127.0.0.1:${store.port}`);
    try {
      // A valid Get: a refused one would use up the refusal log lines later tests look for.
      const get = frame(Buffer.from(GetRequest.encode({ key: 'metadata-probe', refreshTtlMs: 0 }).finish()));
      for (let i = 0; i < 30; i += 1) await http2Call(session, 'Get', get, { 'x!evil': 'x'.repeat(4000) });
    } finally {
      session.close();
    }
    const line = await waitForLine(store, (l) => l.includes('Failed to add metadata entry'));
    await new Promise((r) => setTimeout(r, 200));
    const lines = store.lines.slice(before).filter((l) => l.includes('Failed to add metadata entry'));
    for (const l of lines) assert.doesNotThrow(() => JSON.parse(l), `a JSON line, not free text: ${l.slice(0, 100)}`);
    assert.ok(lines.length <= 10, `${lines.length} lines for 30 calls`);
    assert.ok(line.length < 1000, `a line of ${line.length} characters`);
  });

  it('a string field that is not UTF-8 is INVALID_ARGUMENT and writes nothing (replaced by U+FFFD, "a\\xff" and "a\\xfe" were one key)', async () => {
    const raw = rawStoreClient(address);
    // PutRequest{key: <bytes>, value: <text>}, written by hand: no encoder takes a string that is not UTF-8.
    const put = (key: Buffer, value: string) => Buffer.concat([Buffer.from([0x0a, key.length]), key, Buffer.from([0x12, value.length]), Buffer.from(value)]);
    try {
      for (const bad of [Buffer.from([0x75, 0xff]), Buffer.from([0x75, 0xfe]), Buffer.from([0x75, 0xed, 0xa0, 0x80])]) {
        const outcome = await callRaw(raw, 'Put', [put(bad, 'x')]);
        assert.equal(outcome.code, status.INVALID_ARGUMENT, outcome.details);
        assert.match(outcome.details, /not valid UTF-8/);
      }
      const batch = Buffer.concat([Buffer.from([0x12, 9, 0x12, 7]), put(Buffer.from([0x75, 0xff]), 'x')]);
      assert.equal((await callRaw(raw, 'Batch', [batch])).code, status.INVALID_ARGUMENT);
      assert.equal(await client.get('u\ufffd'), null, 'nothing was written under U+FFFD');
      // U+FFFD itself, sent as UTF-8, is an ordinary character of a key.
      assert.equal((await callRaw(raw, 'Put', [put(Buffer.from('u\ufffd'), 'real')])).code, status.OK);
      assert.equal((await client.get('u\ufffd'))?.value.toString(), 'real');
    } finally {
      raw.close();
    }
  });

  it('a Pipe stream failed for an undecodable message runs nothing sent after it', async () => {
    const raw = rawStoreClient(address);
    const put = (id: number, key: string) =>
      Buffer.from(BatchRequest.encode({ id, ops: [{ op: { $case: 'put', value: { key, value: Buffer.from('v'), ttlMs: 60_000 } }, timeoutMs: 0, requestId: '' }] }).finish());
    try {
      const outcome = await callRaw(raw, 'Pipe', [put(1, 'undecodable-before'), Buffer.from([0xff, 0xff, 0xff]), put(2, 'undecodable-after')]);
      assert.equal(outcome.code, status.INVALID_ARGUMENT, outcome.details);
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(await client.get('undecodable-after'), null, 'a batch sent after the failure was applied');
    } finally {
      raw.close();
    }
  });

  it('a Watch client that stops reading is cut off with RESOURCE_EXHAUSTED once 10,000 events wait for it', async () => {
    const typed = createRawClient({ address, deadlineMs: 10_000 });
    try {
      const watch = typed.watch({ prefix: 'slow:' });
      let received = 0;
      watch.on('data', () => {
        if (received++ === 0) watch.pause(); // read nothing more until all the writes are done
      });
      watch.on('error', () => undefined);
      const ended = new Promise<{ code: number; details: string }>((resolve) => watch.on('status', resolve));
      await new Promise((r) => setTimeout(r, 100));
      const value = Buffer.alloc(16, 1);
      for (let round = 0; round < 12; round += 1) {
        const request = {
          id: round,
          ops: Array.from({ length: 1000 }, (_, i) => ({
            op: { $case: 'put' as const, value: { key: `slow:${round}:${i}`, value, ttlMs: 60_000, expectedVersion: undefined } },
            timeoutMs: 0,
            requestId: '',
          })),
        };
        await new Promise((resolve, reject) => typed.batch(request, (err, res) => (err ? reject(err) : resolve(res))));
      }
      watch.resume();
      const outcome = await ended;
      assert.equal(outcome.code, status.RESOURCE_EXHAUSTED, outcome.details);
      assert.match(outcome.details, /fell behind by more than 10000 events/);
      assert.ok(received >= 10_000 && received < 12_000, `${received} events before the cut`);
    } finally {
      typed.close();
    }
  });

  it('each RPC is logged once with method, code, duration and the x-request-id (per op for Batch and Pipe)', async () => {
    const raw = rawStoreClient(address);
    try {
      const metadata = new Metadata();
      metadata.set('x-request-id', 'req-unary-1');
      await callRaw(raw, 'Get', [Buffer.from(GetRequest.encode({ key: 'logged', refreshTtlMs: 0 }).finish())], metadata);
      await callRaw(raw, 'Get', [Buffer.from(GetRequest.encode({ key: '', refreshTtlMs: 0 }).finish())], metadata);
      const batch = Buffer.from(
        BatchRequest.encode({
          id: 9,
          ops: [
            { op: { $case: 'get', value: { key: 'a', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: 'req-op-A' },
            { op: { $case: 'get', value: { key: 'b', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: 'req-op-B' },
          ],
        }).finish(),
      );
      assert.equal((await callRaw(raw, 'Batch', [batch])).code, status.OK);
      assert.equal((await callRaw(raw, 'Pipe', [batch, batch])).code, status.OK);
    } finally {
      raw.close();
    }
    const rpcs = () => store.lines.filter((l) => l.includes('"msg":"rpc"')).map((l) => JSON.parse(l) as Record<string, unknown>);
    const deadline = Date.now() + 5000;
    // Log lines are written asynchronously: the two batches' lines may come in separate writes.
    // (Earlier tests on this store log Pipe lines of their own: wait for this test's two.)
    while (rpcs().filter((r) => r.method === 'Pipe' && r.ops === 2).length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    const lines = rpcs();
    assert.equal(lines.filter((r) => r.requestId === 'req-unary-1' && r.code === 'OK').length, 1, 'one line per call');
    const ok = lines.find((r) => r.requestId === 'req-unary-1' && r.code === 'OK');
    assert.ok(ok && ok.method === 'Get' && typeof ok.ms === 'number' && ok.level === 20, 'OK calls log at debug');
    const bad = lines.find((r) => r.requestId === 'req-unary-1' && r.code === 'INVALID_ARGUMENT');
    assert.ok(bad && bad.level === 30, 'refused calls log at info');
    const batchLine = lines.find((r) => r.method === 'Batch' && r.ops === 2);
    assert.deepEqual([batchLine?.code, batchLine?.ops, batchLine?.requestIds], ['OK', 2, ['req-op-A', 'req-op-B']]);
    const pipeLines = lines.filter((r) => r.method === 'Pipe' && r.ops === 2);
    assert.equal(pipeLines.length, 2, 'one line per batch on the stream');
    assert.deepEqual(pipeLines[0].requestIds, ['req-op-A', 'req-op-B']);
  });

  it('a Watch that fails says why in its log line (error), as other calls do', async () => {
    const raw = rawStoreClient(address);
    try {
      const metadata = new Metadata();
      metadata.set('x-request-id', 'req-watch-refused');
      const request = Buffer.from(WatchRequest.encode({ prefix: 'p'.repeat(300) }).finish());
      assert.equal((await callRaw(raw, 'Watch', [request], metadata)).code, status.RESOURCE_EXHAUSTED);
    } finally {
      raw.close();
    }
    const line = JSON.parse(await waitForLine(store, (l) => l.includes('"msg":"rpc"') && l.includes('"requestId":"req-watch-refused"'))) as Record<string, unknown>;
    assert.deepEqual([line.method, line.code], ['Watch', 'RESOURCE_EXHAUSTED']);
    assert.match(String(line.error), /prefix/, 'the refusal is named');
  });

  it("a batch's log line lists at most 20 of its operations' request ids, and counts the others", async () => {
    const raw = rawStoreClient(address);
    const ops: Op[] = Array.from({ length: 1500 }, (_, i) => ({ op: { $case: 'get', value: { key: 'k', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: `many-ids-${i}` }));
    try {
      const outcome = await callRaw(raw, 'Batch', [Buffer.from(BatchRequest.encode({ id: 3, ops }).finish())]);
      assert.equal(outcome.code, status.RESOURCE_EXHAUSTED, outcome.details);
    } finally {
      raw.close();
    }
    const line = JSON.parse(await waitForLine(store, (l) => l.includes('"many-ids-0"'))) as Record<string, unknown>;
    assert.deepEqual(line.requestIds, ops.slice(0, 20).map((op) => op.requestId));
    assert.equal(line.moreRequestIds, 1480);
  });

  it("an op's timeout_ms counts the time its batch waited while the Pipe stream was paused for backpressure", async () => {
    await client.put('paused-big', Buffer.alloc(60_000), { ttlMs: 60_000 });
    const batch = (id: number, op: Op) => frame(Buffer.from(BatchRequest.encode({ id, ops: [op] }).finish()));
    const get: Op = { op: { $case: 'get', value: { key: 'paused-big', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: '' };
    const late: Op = { op: { $case: 'put', value: { key: 'paused-late', value: Buffer.from('x'), ttlMs: 60_000 } }, timeoutMs: 300, requestId: 'req-paused-late' };
    // Plain HTTP/2 with a small window and no reading: the store's answers back up and it pauses the stream.
    const session = http2.connect(`http://${address}`, { settings: { initialWindowSize: 1024 } });
    const stream = session.request({ ':method': 'POST', ':path': '/sessions.kv.v1.SessionStore/Pipe', 'content-type': 'application/grpc', te: 'trailers' });
    stream.on('error', () => undefined);
    stream.pause();
    try {
      for (let id = 1; id <= 60; id += 1) stream.write(batch(id, get));
      await new Promise((r) => setTimeout(r, 500));
      stream.write(batch(100, late));
      await new Promise((r) => setTimeout(r, 1000));
      stream.resume();
      stream.on('data', () => undefined);
      const answered = () => store.lines.some((l) => l.includes('req-paused-late'));
      for (let i = 0; i < 100 && !answered(); i += 1) await new Promise((r) => setTimeout(r, 50));
      assert.ok(answered(), 'the store reached the batch');
      assert.equal(await client.get('paused-late'), null, 'the op ran about 1 s past its timeout_ms');
    } finally {
      stream.close();
      session.close();
    }
  });

  it('a Pipe client that does not read its answers: the store stops reading its batches once about 16 MiB of answers wait (not only after 16 answers of any size), and goes on once it reads', async () => {
    // A store whose answers may hold 12 MB (this suite's store caps them at 100 kB).
    const bigTmp = tempDir();
    const big = await startStore(bigTmp.dir, { STORE_MAX_MESSAGE_BYTES: String(16 * 1024 * 1024), LOG_LEVEL: 'debug' });
    const bigClient = createStoreClient({ address: `127.0.0.1:${big.port}`, deadlineMs: 3000 });
    await bigClient.put('unsent-big', Buffer.alloc(60_000), { ttlMs: 60_000 });
    bigClient.close();
    // 200 Gets of a 60 kB value: an answer of 12 MB for a request of a few kB.
    const gets = (id: number): Op[] => Array.from({ length: 200 }, () => ({ op: { $case: 'get', value: { key: 'unsent-big', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: `unsent-${id}` }));
    const answered = (id: number, withinMs = 1000) =>
      waitForLine(big, (l) => l.includes(`"requestId":"unsent-${id}"`), withinMs).then(() => true, () => false);
    const session = http2.connect(`http://127.0.0.1:${big.port}`, { settings: { initialWindowSize: 1024 } });
    const stream = session.request({ ':method': 'POST', ':path': '/sessions.kv.v1.SessionStore/Pipe', 'content-type': 'application/grpc', te: 'trailers' });
    stream.on('error', () => undefined);
    stream.pause();
    try {
      // One batch at a time, each once the previous one was answered, until the store stops reading.
      let id = 0;
      do {
        id += 1;
        stream.write(frame(Buffer.from(BatchRequest.encode({ id, ops: gets(id) }).finish())));
      } while (id < 20 && (await answered(id)));
      assert.ok(id <= 3, `the store answered ${id - 1} batches (${(id - 1) * 12} MB) that the client did not read`);
      // Reading through a 1 KiB window takes one window update per KiB: open it wide first, or the
      // answers waiting (tens of MB) take longer to read than the wait below on a busy machine.
      session.settings({ initialWindowSize: 2 ** 24 });
      session.setLocalWindowSize(2 ** 28);
      stream.resume();
      stream.on('data', () => undefined);
      assert.ok(await answered(id, 15_000), 'the batch it had not read is answered once the client reads');
    } finally {
      stream.close();
      session.close();
      await big.stop();
      bigTmp.remove();
    }
  });

  it("a Batch answer holds at most STORE_MAX_MESSAGE_BYTES of entries: the Gets past it are RESOURCE_EXHAUSTED on their own; writes and misses keep their answers", async () => {
    await client.put('answer-big', Buffer.alloc(60_000, 1), { ttlMs: 0 });
    const typed = createRawClient({ address, deadlineMs: 3000 });
    try {
      const get = (key: string): Op => ({ op: { $case: 'get', value: { key, refreshTtlMs: 0 } }, timeoutMs: 0, requestId: '' });
      const request: BatchRequest = {
        id: 1,
        ops: [
          get('answer-big'),
          get('answer-big'),
          { op: { $case: 'put', value: { key: 'answer-small', value: Buffer.from('x'), ttlMs: 0 } }, timeoutMs: 0, requestId: '' },
          get('answer-missing'),
          get('answer-big'),
        ],
      };
      // 9 bytes a Get asks for, 60 KB it answers: three would make 180 KB against a 100 KB limit.
      const response = await new Promise<BatchResponse>((resolve, reject) =>
        typed.batch(request, (err: ServiceError | null, res?: BatchResponse) => (err ? reject(err) : resolve(res!))),
      );
      assert.deepEqual(
        response.results.map((r) => r.code),
        [status.OK, status.RESOURCE_EXHAUSTED, status.OK, status.OK, status.RESOURCE_EXHAUSTED],
      );
      assert.match(response.results[1].message, /STORE_MAX_MESSAGE_BYTES/);
      assert.equal((await client.get('answer-small'))?.value.toString(), 'x', 'the write in the batch ran');
    } finally {
      typed.close();
    }
  });

  it('a Batch answer fits a client whose receive limit is STORE_MAX_MESSAGE_BYTES: the cap counts each result\'s framing and the entries of Puts too', async () => {
    await client.put('f', Buffer.alloc(1000, 1), { ttlMs: 60_000 });
    // The store's answers fit grpc-js' default receive limit when it is the store's message limit.
    const limited = createRawClient({ address, deadlineMs: 3000 }, { 'grpc.max_receive_message_length': 100_000 });
    try {
      const ops: Op[] = [{ op: { $case: 'put', value: { key: 'f-put', value: Buffer.alloc(1000, 2), ttlMs: 60_000 } }, timeoutMs: 0, requestId: '' }];
      // 98 entries of 1,001 bytes of key and value: 98 KB, under the limit without their framing.
      for (let i = 0; i < 98; i += 1) ops.push({ op: { $case: 'get', value: { key: 'f', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: '' });
      const response = await new Promise<BatchResponse>((resolve, reject) =>
        limited.batch({ id: 1, ops }, (err: ServiceError | null, res?: BatchResponse) => (err ? reject(err) : resolve(res!))),
      );
      const codes = response.results.map((r) => r.code);
      assert.equal(codes[0], status.OK, 'the put');
      const served = codes.slice(1).filter((c) => c === status.OK).length;
      assert.ok(served >= 80 && served < 98, `${served} of 98 Gets answered`);
      assert.ok(codes.slice(1 + served).every((c) => c === status.RESOURCE_EXHAUSTED), 'the Gets past the cap, and only those, are refused');
    } finally {
      limited.close();
    }
  });

  it('a Pipe answer fits a client whose receive limit is STORE_MAX_MESSAGE_BYTES, as a Batch answer does: the Gets past the cap are RESOURCE_EXHAUSTED, the stream goes on', async () => {
    await client.put('f', Buffer.alloc(1000, 1), { ttlMs: 60_000 });
    const limited = createRawClient({ address, deadlineMs: 3000 }, { 'grpc.max_receive_message_length': 100_000 });
    const stream = limited.pipe();
    try {
      const ops: Op[] = [{ op: { $case: 'put', value: { key: 'f-pipe-put', value: Buffer.alloc(1000, 2), ttlMs: 60_000 } }, timeoutMs: 0, requestId: '' }];
      for (let i = 0; i < 98; i += 1) ops.push({ op: { $case: 'get', value: { key: 'f', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: '' });
      const answers: BatchResponse[] = [];
      const done = new Promise<void>((resolve, reject) => {
        stream.on('data', (res: BatchResponse) => answers.push(res) === 2 && resolve());
        stream.on('error', reject);
      });
      stream.write({ id: 1, ops });
      // A batch after it on the same stream is answered too: one large answer does not end the stream.
      stream.write({ id: 2, ops: [{ op: { $case: 'get', value: { key: 'f-pipe-put', refreshTtlMs: 0 } }, timeoutMs: 0, requestId: '' }] });
      await done;
      const codes = answers.find((a) => a.id === 1)!.results.map((r) => r.code);
      assert.equal(codes[0], status.OK, 'the put');
      const served = codes.slice(1).filter((c) => c === status.OK).length;
      assert.ok(served >= 80 && served < 98, `${served} of 98 Gets answered`);
      assert.ok(codes.slice(1 + served).every((c) => c === status.RESOURCE_EXHAUSTED), 'the Gets past the cap, and only those, are refused');
      assert.equal(answers.find((a) => a.id === 2)!.results[0].code, status.OK);
    } finally {
      stream.end();
      limited.close();
    }
  });

  it('List and ListPages do not send an entry that expired while it waited for a slow reader', async () => {
    const typed = createRawClient({ address, deadlineMs: 10_000 });
    try {
      for (const method of ['list', 'listPages'] as const) {
        const writes: Array<Promise<unknown>> = [];
        // 8 MB before them: far more than the transport buffers, so the store is still sending when they expire.
        for (let i = 0; i < 400; i += 1) writes.push(client.put(`${method}-a-${String(i).padStart(3, '0')}`, Buffer.alloc(20_000, 0x61), { ttlMs: 60_000 }));
        for (let i = 0; i < 50; i += 1) writes.push(client.put(`${method}-b-${String(i).padStart(2, '0')}`, Buffer.from('b'), { ttlMs: 1000 }));
        await Promise.all(writes);
        // The entries are read from the backend at once, and sent as the reader takes them.
        const call = typed[method]({ prefix: `${method}-`, limit: 0, startAfter: '', keysOnly: false });
        const received: Array<{ key: string; expiresAtMs: number; at: number }> = [];
        await new Promise<void>((resolve, reject) => {
          call.on('data', (message: { key?: string; expiresAtMs?: number; entries?: Array<{ key: string; expiresAtMs: number }> }) => {
            const at = Date.now();
            for (const e of message.entries ?? [message as { key: string; expiresAtMs: number }]) received.push({ key: e.key, expiresAtMs: e.expiresAtMs, at });
            if (received.length === 1 || (message.entries && received.length === message.entries.length)) {
              call.pause();
              setTimeout(() => call.resume(), 1500);
            }
          });
          call.on('end', resolve);
          call.on('error', reject);
        });
        const expired = received.filter((e) => e.expiresAtMs <= e.at);
        assert.deepEqual(expired.map((e) => e.key), [], `${method}: entries received after they expired`);
        assert.equal(received.filter((e) => e.key.startsWith(`${method}-a-`)).length, 400, method);
      }
    } finally {
      typed.close();
    }
  });

  it('List and ListPages with a limit still send that many live entries when some expired while they waited for a slow reader', async () => {
    const typed = createRawClient({ address, deadlineMs: 10_000 });
    try {
      for (const method of ['list', 'listPages'] as const) {
        const writes: Array<Promise<unknown>> = [];
        // As above: 8 MB first, so that the short-lived entries expire while the store still sends.
        for (let i = 0; i < 400; i += 1) writes.push(client.put(`${method}-limit-a-${String(i).padStart(3, '0')}`, Buffer.alloc(20_000, 0x61), { ttlMs: 60_000 }));
        for (let i = 0; i < 50; i += 1) writes.push(client.put(`${method}-limit-b-${String(i).padStart(2, '0')}`, Buffer.from('b'), { ttlMs: 1000 }));
        for (let i = 0; i < 10; i += 1) writes.push(client.put(`${method}-limit-c-${String(i).padStart(2, '0')}`, Buffer.from('c'), { ttlMs: 60_000 }));
        await Promise.all(writes);
        // 410 live entries once the b's have expired: a limit of 405 is 405 of them.
        const call = typed[method]({ prefix: `${method}-limit-`, limit: 405, startAfter: '', keysOnly: false });
        const received: string[] = [];
        await new Promise<void>((resolve, reject) => {
          call.on('data', (message: { key?: string; entries?: Array<{ key: string }> }) => {
            for (const e of message.entries ?? [message as { key: string }]) received.push(e.key);
            if (received.length === 1 || (message.entries && received.length === message.entries.length)) {
              call.pause();
              setTimeout(() => call.resume(), 1500);
            }
          });
          call.on('end', resolve);
          call.on('error', reject);
        });
        assert.equal(received.filter((key) => key.includes('-limit-b-')).length, 0, `${method}: expired entries sent`);
        assert.equal(received.length, 405, `${method}: ${received.length} entries for a limit of 405, ending with ${received.at(-1)}`);
        assert.deepEqual(received.slice(400), [0, 1, 2, 3, 4].map((i) => `${method}-limit-c-0${i}`));
      }
    } finally {
      typed.close();
    }
  });

  it('a negative timeout_ms is INVALID_ARGUMENT for that op alone', async () => {
    const typed = createRawClient({ address, deadlineMs: 3000 });
    try {
      const request: BatchRequest = {
        id: 1,
        ops: [
          { op: { $case: 'put', value: { key: 'negative-timeout', value: Buffer.from('x'), ttlMs: 60_000 } }, timeoutMs: -1, requestId: '' },
          { op: { $case: 'get', value: { key: 'negative-timeout', refreshTtlMs: 0 } }, timeoutMs: 1000, requestId: '' },
        ],
      };
      const response = await new Promise<BatchResponse>((resolve, reject) =>
        typed.batch(request, (err: ServiceError | null, res?: BatchResponse) => (err ? reject(err) : resolve(res!))),
      );
      assert.deepEqual(
        response.results.map((r) => r.code),
        [status.INVALID_ARGUMENT, status.OK],
      );
      assert.match(response.results[0].message, /timeout_ms/);
      assert.equal(await client.get('negative-timeout'), null);
    } finally {
      typed.close();
    }
  });

  it('a Pipe batch whose client_clock_ms is negative, NaN or infinite is INVALID_ARGUMENT for every op and writes nothing', async () => {
    const typed = createRawClient({ address, deadlineMs: 3000 });
    const stream = typed.pipe();
    try {
      const answers: BatchResponse[] = [];
      const bad = [-1, NaN, Infinity];
      const done = new Promise<void>((resolve, reject) => {
        stream.on('data', (res: BatchResponse) => answers.push(res) === bad.length && resolve());
        stream.on('error', reject);
      });
      bad.forEach((clientClockMs, i) =>
        stream.write({
          id: i + 1,
          ops: [{ op: { $case: 'put', value: { key: `bad-clock-${i}`, value: Buffer.from('x'), ttlMs: 60_000 } }, timeoutMs: 1000, requestId: '' }],
          clientClockMs,
        }),
      );
      await done;
      for (const res of answers) {
        assert.equal(res.results[0].code, status.INVALID_ARGUMENT);
        assert.match(res.results[0].message, /client_clock_ms/);
      }
      for (let i = 0; i < bad.length; i += 1) assert.equal(await client.get(`bad-clock-${i}`), null);
    } finally {
      stream.end();
      typed.close();
    }
  });
});
