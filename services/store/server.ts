import { timingSafeEqual, createHash } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import {
  Server,
  type ServerOptions,
  type ServerUnaryCall,
  type ServerWritableStream,
  type ServerDuplexStream,
  type sendUnaryData,
  Metadata,
  ServerInterceptingCall,
  type ServerInterceptor,
  type ServiceError,
  status,
} from '@grpc/grpc-js';
import { BinaryReader } from '@bufbuild/protobuf/wire';
import {
  type BatchRequest,
  type BatchResponse,
  type DeleteResponse,
  type Entry,
  type EntryPage,
  type GetResponse,
  type ListRequest,
  type Op,
  type OpResult,
  type PutResponse,
  SessionStoreService,
  type WatchEvent,
  WatchEvent_Kind,
  type WatchRequest,
} from '../generated/kv';
import type { Logger } from '../shared/log';
import { type Backend, type BackendOp, type BackendResult, type StoredEntry, StoreError } from './backends/backend';
import { checkBatchSize, checkClientClock, checkDelete, checkGet, checkList, checkOp, checkPrefix, checkPut, type Limits } from './checks';
import { toServiceError, toStatus } from './errors';
import { createLatenessMeter, type LatenessMeter } from './lateness';
import type { RpcMethod, RpcObserver } from './telemetry';

export interface StoreServiceOptions {
  backend: Backend;
  limits: Limits;
  /** When set, every call needs `authorization: Bearer <token>`. */
  token?: string;
  logger: Logger;
  /** Told about every finished call, for logs and metrics. */
  observe?: RpcObserver;
  /**
   * Aborted when the store begins to stop: Watch streams end, Pipe streams answer what they
   * carry (later batches get UNAVAILABLE) and end, so that a graceful stop is not held up by them.
   */
  stopping?: AbortSignal;
  /**
   * Bytes of entries a Batch or Pipe answer carries at most (default 4 MiB; the store passes
   * STORE_MAX_MESSAGE_BYTES): the Gets past it fail on their own with RESOURCE_EXHAUSTED.
   */
  maxAnswerBytes?: number;
}

/** Marks a request whose bytes did not decode, so the handler answers INVALID_ARGUMENT (not INTERNAL). */
const UNDECODABLE = Symbol('undecodable');
interface Undecodable {
  [UNDECODABLE]: string;
}

/**
 * When a request was decoded (performance.now()): a Pipe message may then wait in grpc-js'
 * buffers while the stream is paused for backpressure, and an op's timeout_ms counts that wait.
 */
const RECEIVED_AT = Symbol('receivedAt');
interface Stamped {
  [RECEIVED_AT]?: number;
}

/**
 * The gRPC adapter. Every handler does the same steps: authenticate, check the request, call the
 * backend, map the error (errors.ts), fill the response. It holds no state of its own.
 */
export function createStoreServer(options: StoreServiceOptions, serverOptions: ServerOptions = {}): Server {
  // Without a token there is nothing to refuse early, and no call pays for an interceptor.
  const interceptors = options.token ? [...(serverOptions.interceptors ?? []), authenticateFirst(options.token, options.observe)] : serverOptions.interceptors;
  const server = new Server({ ...serverOptions, interceptors });
  addStoreService(server, options);
  return server;
}

/**
 * Refuses a SessionStore call without the token from its metadata, before its request is read:
 * grpc-js decodes a request before the handler sees it, and a 4 MiB Batch of tiny operations
 * decodes into some 100 MB of objects, so a client without the token could spend the store's
 * memory and CPU (and fill its log with the batch's request ids). Health and reflection need no
 * token. The handlers check the token again (addStoreService may be used without this).
 */
function authenticateFirst(token: string, observer: RpcObserver | undefined): ServerInterceptor {
  const authorize = createAuthorizer(token);
  const observe: RpcObserver = observer ?? (() => undefined);
  return (descriptor, call) => {
    const method = STORE_METHODS.get(descriptor.path);
    if (!method) return new ServerInterceptingCall(call);
    return new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata, pass) => {
            const startedAt = performance.now();
            try {
              authorize(metadata);
            } catch (err) {
              const error = toServiceError(err);
              call.sendStatus({ code: error.code!, details: error.details!, metadata: error.metadata! });
              observe(method, error.code!, startedAt, metadata, undefined, undefined, error.details);
              return;
            }
            pass(metadata);
          },
        }),
    });
  };
}

/** Each SessionStore path ('/sessions.kv.v1.SessionStore/Get') and its method's name. */
const STORE_METHODS = new Map<string, RpcMethod>(
  Object.values(SessionStoreService).map((method) => [method.path, method.path.slice(method.path.lastIndexOf('/') + 1) as RpcMethod]),
);

export function addStoreService(server: Server, options: StoreServiceOptions): void {
  const { backend, limits, logger, stopping, maxAnswerBytes = 4 * 1024 * 1024 } = options;
  const observe: RpcObserver = options.observe ?? (() => undefined);
  const authorize = createAuthorizer(options.token);

  /** Pre-call checks shared by every handler; throws a StoreError. */
  const admit = (metadata: Metadata, request: unknown, deadline?: number): void => {
    authorize(metadata);
    if (request !== null && typeof request === 'object' && UNDECODABLE in request) {
      throw new StoreError('invalid', `request could not be decoded: ${(request as Undecodable)[UNDECODABLE]}`);
    }
    if (deadline !== undefined && deadline <= Date.now()) throw new StoreError('deadline', 'deadline passed before the call was served');
  };

  const runOne = async (op: BackendOp): Promise<BackendResult> => (await backend.batch([op]))[0];

  function unary<Req, Res>(method: RpcMethod, handle: (req: Req) => Promise<Res>) {
    return (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>) => {
      const startedAt = performance.now();
      const gaveUp = watchGivingUp(call);
      let promise: Promise<Res>;
      try {
        admit(call.metadata, call.request, deadlineOf(call));
        promise = handle(call.request);
      } catch (err) {
        promise = Promise.reject(err);
      }
      // A call the client gave up on is recorded with the code the client got, though the backend's
      // work (a write) may have been done: the answer reached no one.
      promise.then(
        (res) => {
          callback(null, res);
          observe(method, gaveUp() ?? status.OK, startedAt, call.metadata, opsOf(call.request), resultsOf(res));
        },
        (err) => {
          logUnexpected(logger, err, call.getPath());
          const error = toServiceError(err);
          callback(error);
          observe(method, gaveUp() ?? error.code!, startedAt, call.metadata, opsOf(call.request), undefined, error.details);
        },
      );
    };
  }

  /**
   * A listing on a server stream, for List and ListPages: check, read the backend's entries in key
   * order, hand each to the sink (which decides how they are written and may ask to wait for the
   * stream to drain), end; cancellation, errors and metrics in one place.
   */
  function streamListing<Res>(
    call: ServerWritableStream<ListRequest, Res>,
    method: RpcMethod,
    sink: { add(entry: StoredEntry): Promise<void> | undefined; finish(): void },
  ): void {
    const startedAt = performance.now();
    const gaveUp = watchGivingUp(call);
    // A cancelled call also stops a listing that has found nothing to yield for a while.
    const cancelled = new AbortController();
    call.once('cancelled', () => cancelled.abort());
    void (async () => {
      try {
        admit(call.metadata, call.request, deadlineOf(call));
        const options = { ...checkList(call.request, limits), signal: cancelled.signal };
        let { limit, startAfter } = options;
        for (;;) {
          let read = 0;
          let skipped = 0;
          for await (const entry of backend.list({ ...options, limit, startAfter })) {
            if (call.cancelled) break;
            read += 1;
            startAfter = entry.key;
            // Backends read a page of entries at once, and a slow reader takes them later: one that
            // expired meanwhile is not sent (List never sends an entry expired when it is sent).
            if (entry.expiresAtMs <= Date.now()) {
              skipped += 1;
              continue;
            }
            const drained = sink.add(entry);
            if (drained) await drained;
          }
          // The backend counted the entries left out against the limit: list on after the last key
          // read for as many, so that a limit ends the listing only with that many entries sent.
          if (call.cancelled || limit === 0 || skipped === 0 || read < limit) break;
          limit = skipped;
        }
        if (call.cancelled) {
          observe(method, gaveUp() ?? status.CANCELLED, startedAt, call.metadata);
          return;
        }
        sink.finish();
        call.end();
        observe(method, status.OK, startedAt, call.metadata);
      } catch (err) {
        logUnexpected(logger, err, call.getPath());
        const error = toServiceError(err);
        if (!call.cancelled) failStream(call, error);
        observe(method, call.cancelled ? (gaveUp() ?? status.CANCELLED) : error.code!, startedAt, call.metadata, undefined, undefined, error.details);
      }
    })();
  }

  /**
   * An op's timeout_ms counts from when its batch was decoded (RECEIVED_AT), not from when it is
   * run; on a Pipe stream (lateness given) less the time the batch waited before it was read.
   */
  const runBatch = async (request: BatchRequest, lateness?: LatenessMeter): Promise<BatchResponse> => {
    checkBatchSize(request.ops.length, limits);
    const clientClockMs = checkClientClock(request.clientClockMs);
    const results: OpResult[] = new Array(request.ops.length);
    const ops: BackendOp[] = [];
    const slots: number[] = [];
    // Nothing waits between here and backend.batch, so this is the time the backend gets the ops.
    const now = performance.now();
    const receivedAt = (request as Stamped)[RECEIVED_AT] ?? now;
    const since = lateness && clientClockMs !== undefined ? receivedAt - lateness(receivedAt, clientClockMs) : receivedAt;
    request.ops.forEach((op, i) => {
      try {
        const checked = checkOp(op, limits);
        if (op.timeoutMs > 0 && since + op.timeoutMs <= now) throw new StoreError('deadline', 'deadline passed before the operation was served');
        ops.push(checked);
        slots.push(i);
      } catch (err) {
        results[i] = failed(err);
      }
    });
    if (ops.length > 0) {
      const answers = await backend.batch(ops);
      answers.forEach((answer, j) => {
        results[slots[j]] = answer.ok ? succeeded(ops[j], answer.value) : failed(answer.error);
      });
    }
    return { id: request.id, results };
  };

  server.addService(withSafeDecoding(SessionStoreService), {
    get: unary('Get', async (req: Parameters<typeof checkGet>[0]): Promise<GetResponse> => {
      const answer = await runOne(checkGet(req, limits));
      if (!answer.ok) throw answer.error;
      return toGetResponse(answer.value as StoredEntry | null);
    }),
    put: unary('Put', async (req: Parameters<typeof checkPut>[0]): Promise<PutResponse> => {
      const answer = await runOne(checkPut(req, limits));
      if (!answer.ok) throw answer.error;
      return { entry: toEntry(answer.value as StoredEntry) };
    }),
    delete: unary('Delete', async (req: Parameters<typeof checkDelete>[0]): Promise<DeleteResponse> => {
      const answer = await runOne(checkDelete(req, limits));
      if (!answer.ok) throw answer.error;
      return { deleted: answer.value as boolean };
    }),
    batch: unary('Batch', async (request: BatchRequest) => capAnswer(await runBatch(request), maxAnswerBytes)),

    list: (call: ServerWritableStream<ListRequest, Entry>) => {
      streamListing(call, 'List', {
        add: (entry) => (call.write(toEntry(entry)) ? undefined : waitForDrain(call)),
        finish: () => undefined,
      });
    },

    // List with many entries per message: grpc-js pays per message, so one message per entry
    // caps a big listing at a few tens of thousands of entries/s; pages lift that cap.
    listPages: (call: ServerWritableStream<ListRequest, EntryPage>) => {
      let entries: Entry[] = [];
      let bytes = 0;
      streamListing(call, 'ListPages', {
        add: (entry) => {
          const size = entry.key.length + entry.value.length;
          let written = true;
          // An entry that would take the page past PAGE_BYTES starts the next one: a page holds at
          // most PAGE_BYTES of keys and values, or one larger entry alone.
          if (entries.length > 0 && bytes + size > PAGE_BYTES) {
            written = call.write({ entries });
            entries = [];
            bytes = 0;
          }
          entries.push(toEntry(entry));
          bytes += size;
          if (entries.length >= PAGE_ENTRIES || bytes >= PAGE_BYTES) {
            written = call.write({ entries }) && written;
            entries = [];
            bytes = 0;
          }
          return written ? undefined : waitForDrain(call);
        },
        finish: () => {
          if (entries.length > 0) call.write({ entries });
        },
      });
    },

    pipe: (call: ServerDuplexStream<BatchRequest, BatchResponse>) => {
      try {
        admit(call.metadata, null);
      } catch (err) {
        const error = toServiceError(err);
        failStream(call, error);
        observe('Pipe', error.code!, performance.now(), call.metadata, undefined, undefined, error.details);
        return;
      }
      const gaveUp = watchGivingUp(call);
      const lateness = createLatenessMeter();
      let inFlight = 0;
      let ended = false;
      let closed = false;
      // Backpressure: stop reading new batches while the client has not read our answers. The
      // stream's own measure counts answers (16), whatever their size: 16 answers of 1000 Gets of
      // 64 KiB values are 1 GiB held for a client that does not read. So bytes count too.
      let unsentBytes = 0;
      const behind = () => call.writableNeedDrain || unsentBytes >= MAX_UNSENT_BYTES;
      const catchUp = () => {
        if (call.isPaused() && !behind()) call.resume();
      };
      call.on('drain', catchUp);
      const finish = () => {
        if (ended && inFlight === 0 && !closed && !call.cancelled) {
          closed = true;
          call.end();
        }
      };
      const onStop = () => {
        ended = true;
        finish();
      };
      stopping?.addEventListener('abort', onStop, { once: true });
      call.once('close', () => stopping?.removeEventListener('abort', onStop));
      // A pipe opened once the stop began (an aborted signal fires no more 'abort') ends at once.
      if (stopping?.aborted) onStop();
      call.on('data', (request: BatchRequest | Undecodable) => {
        const startedAt = performance.now();
        if (closed) return;
        if (UNDECODABLE in request) {
          // The client is told the stream failed, so nothing it sent after this may run:
          // grpc-js still delivers later messages, and closed makes this handler ignore them.
          closed = true;
          const error = toServiceError(new StoreError('invalid', `request could not be decoded: ${request[UNDECODABLE]}`));
          failStream(call, error);
          observe('Pipe', error.code!, startedAt, call.metadata, undefined, undefined, error.details);
          return;
        }
        inFlight += 1;
        const answer = stopping?.aborted
          ? Promise.reject(new StoreError('unavailable', 'the store is stopping; retry on a new connection'))
          : runBatch(request, lateness).then((response) => capAnswer(response, maxAnswerBytes));
        answer
          .then(
            (response): [BatchResponse, status] => [response, status.OK],
            (err): [BatchResponse, status] => [{ id: request.id, results: request.ops.map(() => failed(err)) }, toStatus(err).code],
          )
          .then(([response, code]) => {
            inFlight -= 1;
            // The operations' own codes only when the batch ran: a batch refused as a whole is counted by its code.
            // An answer the client hung up before is counted as the client's CANCELLED, as for a unary call.
            observe('Pipe', gaveUp() ?? code, startedAt, call.metadata, request.ops, code === status.OK ? response.results : undefined, response.results[0]?.message);
            if (call.cancelled || closed) return;
            const size = answerBytes(response);
            unsentBytes += size;
            call.write(response, () => {
              unsentBytes -= size;
              catchUp();
            });
            if (behind()) call.pause();
            finish();
          });
      });
      call.on('end', () => {
        ended = true;
        finish();
      });
      call.on('error', () => undefined);
    },

    watch: (call: ServerWritableStream<WatchRequest, WatchEvent>) => {
      const startedAt = performance.now();
      const gaveUp = watchGivingUp(call);
      let unsubscribe = (): void => undefined;
      let done = false;
      const finish = (code: status, details?: string) => {
        if (done) return;
        done = true;
        unsubscribe();
        stopping?.removeEventListener('abort', onStop);
        observe('Watch', code, startedAt, call.metadata, undefined, undefined, details);
      };
      const onStop = () => {
        call.end();
        finish(status.OK);
      };
      try {
        admit(call.metadata, call.request);
        const prefix = checkPrefix(call.request.prefix, limits);
        let unsentBytes = 0;
        unsubscribe = backend.watch(prefix, (event) => {
          // A watcher that stops reading must not make the store buffer changes for ever: past
          // the limit it gets no more events, then RESOURCE_EXHAUSTED after those already queued.
          if (call.writableLength >= MAX_UNSENT_EVENTS || unsentBytes >= MAX_UNSENT_BYTES) {
            const error = toServiceError(new StoreError('too_large', `the watcher fell behind by more than ${MAX_UNSENT_EVENTS} events or ${MAX_UNSENT_BYTES} bytes`));
            finish(error.code!, error.details);
            failStream(call, error);
            return;
          }
          const size = event.key.length + event.value.length;
          unsentBytes += size;
          call.write(
            { kind: KINDS[event.kind], key: event.key, version: event.version, value: event.value, expiresAtMs: event.expiresAtMs },
            () => (unsentBytes -= size),
          );
        }, {
          // The backend cannot promise every change any more (its change feed broke): end the call
          // with that error (UNAVAILABLE), after the events already queued, so the client lists and
          // watches again instead of silently missing changes.
          onError: (err) => {
            if (done) return;
            const error = toServiceError(err);
            finish(error.code!, error.details);
            failStream(call, error);
          },
        });
        // Headers now, so the client knows the feed is established (and a later UNAVAILABLE is the feed's, not the connection's).
        call.sendMetadata(new Metadata());
        call.on('cancelled', () => finish(gaveUp() ?? status.CANCELLED));
        call.on('close', () => finish(call.cancelled ? (gaveUp() ?? status.CANCELLED) : status.OK));
        stopping?.addEventListener('abort', onStop, { once: true });
        if (stopping?.aborted) onStop();
      } catch (err) {
        const error = toServiceError(err);
        failStream(call, error);
        finish(error.code!, error.details);
      }
    },
  });
}

/**
 * Change events (and their bytes) a Watch stream may have queued for a slow client before it is
 * cut off; a Pipe stream stops reading new batches once its unsent answers hold that many bytes.
 */
const MAX_UNSENT_EVENTS = 10_000;
const MAX_UNSENT_BYTES = 16 * 1024 * 1024;

/** About the protobuf framing of one OpResult with an entry (tags, lengths, code, version, times): under 64 bytes. */
const RESULT_FRAMING_BYTES = 64;
/** A ListPages message holds at most this many entries or about this many key and value bytes. */
const PAGE_ENTRIES = 512;
const PAGE_BYTES = 64 * 1024;

const KINDS = { put: WatchEvent_Kind.PUT, delete: WatchEvent_Kind.DELETE, expire: WatchEvent_Kind.EXPIRE } as const;

function toEntry(entry: StoredEntry): Entry {
  return entry;
}

function toGetResponse(entry: StoredEntry | null): GetResponse {
  return entry ? { found: true, entry } : { found: false, entry: undefined };
}

function succeeded(op: BackendOp, value: unknown): OpResult {
  switch (op.kind) {
    case 'get':
      return { code: status.OK, message: '', result: { $case: 'get', value: toGetResponse(value as StoredEntry | null) }, outcomeUnknown: false };
    case 'put':
      return { code: status.OK, message: '', result: { $case: 'put', value: { entry: value as StoredEntry } }, outcomeUnknown: false };
    case 'delete':
      return { code: status.OK, message: '', result: { $case: 'delete', value: { deleted: value as boolean } }, outcomeUnknown: false };
  }
}

/** About the bytes of a batch's answer: the keys and values of its entries. */
function answerBytes(response: BatchResponse): number {
  let bytes = 0;
  for (const { result } of response.results) {
    const entry = result?.$case === 'get' || result?.$case === 'put' ? result.value.entry : undefined;
    if (entry) bytes += entry.key.length + entry.value.length;
  }
  return bytes;
}

/**
 * Fails, each with RESOURCE_EXHAUSTED, the Gets of a Batch or Pipe answer past maxBytes of entries.
 * A Batch of 1000 Gets of one 64 KiB value is a 9 KB request and would be a 64 MB answer: held
 * until the client reads it, and larger than most clients accept (grpc's default is 4 MiB; on a
 * Pipe stream, one answer over the client's limit ends the stream and every batch in flight on it).
 * Writes keep their answers: they ran.
 */
function capAnswer(response: BatchResponse, maxBytes: number): BatchResponse {
  let bytes = 0;
  response.results.forEach(({ result, message }, i) => {
    bytes += RESULT_FRAMING_BYTES + Buffer.byteLength(message);
    const entry = result?.$case === 'get' || result?.$case === 'put' ? result.value.entry : undefined;
    if (!entry) return;
    const size = Buffer.byteLength(entry.key) + entry.value.length;
    // Only a Get's entry is left out: a Put's answer is how its caller learns the write happened
    // (and a batch's Puts fit, as its request did).
    if (result!.$case === 'get' && bytes + size > maxBytes) {
      response.results[i] = failed(
        new StoreError('too_large', `the batch's answer would hold over ${maxBytes} bytes of entries (STORE_MAX_MESSAGE_BYTES): read this key in another batch`),
      );
      return;
    }
    bytes += size;
  });
  return response;
}

function failed(err: unknown): OpResult {
  const mapped = toStatus(err);
  return { code: mapped.code, message: mapped.details, result: undefined, outcomeUnknown: mapped.outcomeUnknown };
}

/**
 * Ends a stream with an error status. (destroy() would drop the status: grpc-js sends it only
 * from the 'error' event, which sets the status and ends the stream.)
 */
function failStream(call: NodeJS.EventEmitter, error: Partial<ServiceError>): void {
  call.emit('error', error);
}

function opsOf(request: unknown): readonly Op[] | undefined {
  return (request as Partial<BatchRequest>).ops;
}

function resultsOf(response: unknown): readonly OpResult[] | undefined {
  return (response as Partial<BatchResponse> | undefined)?.results;
}

function deadlineOf(call: { getDeadline(): Date | number }): number | undefined {
  const deadline = call.getDeadline();
  const ms = deadline instanceof Date ? deadline.getTime() : deadline;
  return Number.isFinite(ms) ? ms : undefined;
}

/**
 * Notes when the client gives up on a call; the returned function says how it ended then (the
 * code the client got), or undefined while it has not: DEADLINE_EXCEEDED once its deadline had
 * passed, else CANCELLED. The store learns a deadline when it reads the call, a little later than
 * the client set it, so the client's own timer may cancel the call up to DEADLINE_LEEWAY_MS early.
 */
function watchGivingUp(call: NodeJS.EventEmitter & { getDeadline(): Date | number }): () => status | undefined {
  let code: status | undefined;
  call.once('cancelled', () => {
    const deadline = deadlineOf(call);
    code = deadline !== undefined && Date.now() >= deadline - DEADLINE_LEEWAY_MS ? status.DEADLINE_EXCEEDED : status.CANCELLED;
  });
  return () => code;
}
const DEADLINE_LEEWAY_MS = 100;

/**
 * Ends a streaming call with the error's status. Not call.destroy(err): grpc-js then never sends
 * the status and the client waits forever; an 'error' event is what makes it send the status.
 */
function waitForDrain(call: ServerWritableStream<unknown, unknown>): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      call.off('drain', done);
      call.off('cancelled', done);
      resolve();
    };
    call.once('drain', done);
    call.once('cancelled', done);
  });
}

/** Constant-time bearer token check; a no-op when no token is configured. */
function createAuthorizer(token: string | undefined): (metadata: Metadata) => void {
  if (!token) return () => undefined;
  const expected = createHash('sha256').update(token).digest();
  return (metadata) => {
    const header = metadata.get('authorization')[0];
    // The scheme's name is case-insensitive (RFC 9110, 11.1): "bearer x" is "Bearer x".
    const presented = typeof header === 'string' && /^bearer /i.test(header) ? header.slice(7) : '';
    const digest = createHash('sha256').update(presented).digest();
    if (!timingSafeEqual(digest, expected) || presented.length === 0) {
      throw new StoreError('unauthenticated', 'missing or wrong bearer token in the authorization metadata');
    }
  };
}

function logUnexpected(logger: Logger, err: unknown, path: string): void {
  if (!(err instanceof StoreError)) logger.error({ err, path }, 'unexpected error in handler');
}

/**
 * Decodes the text of string fields, refusing bytes that are not UTF-8 (proto3 strings must be).
 * The decoder's default replaces them with U+FFFD, so that "a\xff" and "a\xfe" were one key.
 */
function strictUtf8(bytes: Uint8Array): string {
  try {
    return STRICT_UTF8.decode(bytes);
  } catch {
    throw new Error('a string field is not valid UTF-8');
  }
}
const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/**
 * Wraps each request decoder so undecodable bytes (also a string field that is not UTF-8) reach
 * the handler as a marker, not as INTERNAL, and stamps each decoded batch (Batch, Pipe) with
 * RECEIVED_AT.
 */
function withSafeDecoding<T extends Record<string, { requestDeserialize: (b: Buffer) => unknown }>>(definition: T): T {
  const wrapped: Record<string, unknown> = {};
  for (const [name, method] of Object.entries(definition)) {
    // Only batches carry per-op timeouts: the other requests need no stamp.
    const stamped = name === 'batch' || name === 'pipe';
    wrapped[name] = {
      ...method,
      requestDeserialize: (bytes: Buffer) => {
        try {
          // The generated deserializer hands its argument to Message.decode, which takes a reader too.
          const request = method.requestDeserialize(new BinaryReader(bytes, strictUtf8) as unknown as Buffer) as Stamped;
          if (stamped) request[RECEIVED_AT] = performance.now();
          return request;
        } catch (err) {
          return { [UNDECODABLE]: (err as Error).message } satisfies Undecodable;
        }
      },
    };
  }
  return wrapped as T;
}
