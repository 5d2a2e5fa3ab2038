import { performance } from 'node:perf_hooks';
import { type ClientDuplexStream, type ServiceError, status } from '@grpc/grpc-js';
import type { BatchRequest, BatchResponse, Entry, Op, OpResult, SessionStoreClient } from '../generated/kv';
import {
  authMetadata,
  checkArguments,
  createRawClient,
  fromServiceError,
  listEntries,
  neverSent,
  type PutOptions,
  type StoreCall,
  type StoreClient,
  StoreClientError,
  type StoreClientOptions,
  toClientError,
} from './store-client';

export interface PipeClientOptions extends StoreClientOptions {
  /** Most operations in one batch message (the store's STORE_MAX_BATCH_OPS must allow it). */
  maxBatchOps?: number;
  /**
   * About the most key and value bytes in one batch message (one larger operation goes alone,
   * through the unary Batch RPC, so a value over the store's limit fails that call alone); the
   * store's STORE_MAX_MESSAGE_BYTES must allow it. Default just under 64 KiB, the least the store
   * accepts: a batch over the store's limit would end the stream, and every call in flight on it.
   */
  maxBatchBytes?: number;
  /** Operations waiting to be sent beyond this are refused at once (the store is not keeping up). */
  maxQueuedOps?: number;
  /** Told each time the stream ends other than by close(), with why (for metrics); the next call opens a new one. */
  onBreak?: (reason: PipeBreak) => void;
}

/**
 * Why a Pipe stream ended: it broke with batches possibly run (`broken`), no connection could be
 * opened for it (`unopened`), the store refused it for its token before reading a batch
 * (`refused`), or the store ended it because it is stopping (`ended`).
 */
export type PipeBreak = 'broken' | 'unopened' | 'refused' | 'ended';

interface PendingOp {
  op: Op;
  /** performance.now() past which the caller has given up: the deadline runs from the call, queued or not. */
  deadline: number;
  resolve: (result: OpResult) => void;
  reject: (err: StoreClientError) => void;
}

interface InFlight {
  ops: PendingOp[];
  timer: NodeJS.Timeout;
}

/**
 * A StoreClient that coalesces the operations issued in one turn of the event loop into one
 * BatchRequest, sent over one long-lived bidirectional `Pipe` stream (like ioredis'
 * auto-pipelining). Each operation keeps its own result, error and deadline.
 *
 * - Flushed on setImmediate: requests parsed in separate I/O callbacks of one loop turn share a batch.
 * - Backpressure: while the stream does not drain, operations queue (bounded by maxQueuedOps).
 * - Deadlines: each operation's runs from its call. One queued past it fails without being sent;
 *   one sent carries the time it has left as timeout_ms, with the clock reading it was computed at
 *   (client_clock_ms, so the store also counts time the batch waited to be read), and fails past
 *   it as unavailable (outcome unknown). One timer per batch in flight, and one for the queue while
 *   the stream does not drain.
 * - Reconnect: a broken stream fails its in-flight operations as unavailable, outcome unknown
 *   (never silently retried, since a write may have landed), and the next flush opens a new
 *   stream on the same channel. A stream the store ended (status OK: it is stopping) fails those
 *   it left unanswered as unavailable, not run: the store answers every batch it runs before it ends.
 * - Fallback: a store without Pipe (UNIMPLEMENTED) is used through the unary Batch RPC instead.
 */
export function createPipeClient(options: PipeClientOptions): StoreClient {
  // The channel takes answers of any size (see CHANNEL_OPTIONS): one over a limit would fail the
  // stream, and with it every operation in flight on it.
  const transport = new PipeTransport(createRawClient(options), options);
  const run = (call: StoreCall, op: Op) => transport.enqueue(call, op);
  return {
    async get(key, opts = {}) {
      checkArguments('get', key, opts);
      const result = await run('get', { op: { $case: 'get', value: { key, refreshTtlMs: opts.refreshTtlMs ?? 0 } }, timeoutMs: options.deadlineMs, requestId: opts.requestId ?? '' });
      const get = result.result?.$case === 'get' ? result.result.value : undefined;
      return get?.found && get.entry ? get.entry : null;
    },
    async put(key: string, value: Buffer, opts: PutOptions): Promise<Entry> {
      checkArguments('put', key, opts, value);
      const result = await run('put', {
        op: { $case: 'put', value: { key, value, ttlMs: opts.ttlMs, expectedVersion: opts.expectedVersion } },
        timeoutMs: options.deadlineMs,
        requestId: opts.requestId ?? '',
      });
      if (result.result?.$case !== 'put' || !result.result.value.entry) throw toClientError(status.INTERNAL, 'malformed put result');
      return result.result.value.entry;
    },
    async delete(key, opts = {}) {
      checkArguments('delete', key, opts);
      const result = await run('delete', { op: { $case: 'delete', value: { key, expectedVersion: opts.expectedVersion } }, timeoutMs: options.deadlineMs, requestId: opts.requestId ?? '' });
      return result.result?.$case === 'delete' ? result.result.value.deleted : false;
    },
    list(opts = {}) {
      return listEntries(transport.client, transport.metadata, opts);
    },
    close() {
      transport.close();
    },
  };
}

class PipeTransport {
  readonly metadata;
  private queue: PendingOp[] = [];
  private scheduled = false;
  private stream: ClientDuplexStream<BatchRequest, BatchResponse> | undefined;
  private readonly inFlight = new Map<number, InFlight>();
  private nextId = 1;
  private draining = false;
  /** Set while operations wait for the stream to drain: fires at the first one's deadline. */
  private queueTimer: NodeJS.Timeout | undefined;
  private useUnaryBatch = false;
  private closed = false;
  private readonly maxBatchOps: number;
  private readonly maxBatchBytes: number;
  private readonly maxQueuedOps: number;
  private readonly flushNow = () => this.flush();
  private readonly sweepNow = () => this.sweepQueue();

  constructor(
    readonly client: SessionStoreClient,
    private readonly options: PipeClientOptions,
  ) {
    this.metadata = authMetadata(options.token);
    this.maxBatchOps = options.maxBatchOps ?? 500;
    this.maxBatchBytes = options.maxBatchBytes ?? DEFAULT_MAX_BATCH_BYTES;
    this.maxQueuedOps = options.maxQueuedOps ?? 20_000;
  }

  /** Queues op for the next batch; its error names `call` (the transport's errors are shared by the operations of a batch). */
  enqueue(call: StoreCall, op: Op): Promise<OpResult> {
    if (this.closed) return Promise.reject(toClientError(status.UNAVAILABLE, 'the store client is closed', { call }));
    if (this.queue.length >= this.maxQueuedOps) {
      return Promise.reject(toClientError(status.UNAVAILABLE, `the store is not keeping up: ${this.queue.length} operations queued`, { call }));
    }
    return new Promise<OpResult>((resolve, reject) => {
      this.queue.push({ op, deadline: performance.now() + this.options.deadlineMs, resolve, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(this.flushNow);
      }
    }).then(
      (result) => {
        if (result.code !== status.OK) throw toClientError(result.code, result.message, { call, outcomeUnknown: result.outcomeUnknown });
        return result;
      },
      (err: unknown) => {
        throw err instanceof StoreClientError ? err.forCall(call) : err;
      },
    );
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.queueTimer);
    // Batches in flight were sent: the store may apply them although nobody will read the answer.
    this.failAll(toClientError(status.UNAVAILABLE, 'the store client was closed before the store answered; the outcome of the operation is unknown', { outcomeUnknown: true }));
    for (const pending of this.queue.splice(0)) pending.reject(toClientError(status.UNAVAILABLE, 'the store client is closed'));
    this.stream?.end();
    this.client.close();
  }

  private flush(): void {
    this.scheduled = false;
    const now = performance.now();
    while (this.queue.length > 0 && !this.draining) {
      // Operations whose deadline passed while queued are not sent: their callers have given up.
      const { queue } = this;
      const ops: PendingOp[] = [];
      let bytes = 0;
      let i = 0;
      for (; i < queue.length && ops.length < this.maxBatchOps; i += 1) {
        if (queue[i].deadline <= now) {
          queue[i].reject(this.timedOut(false));
          continue;
        }
        // Values up to the store's limit add up: cap the message, not only the count.
        bytes += estimatedBytes(queue[i].op);
        if (bytes > this.maxBatchBytes && ops.length > 0) break;
        ops.push(queue[i]);
      }
      this.queue = i === queue.length ? [] : queue.slice(i);
      if (ops.length > 0) this.send(ops, now);
    }
    if (this.draining) this.armQueueTimer();
  }

  /** Fails the queued operations whose deadline has passed while the stream does not drain. */
  private sweepQueue(): void {
    this.queueTimer = undefined;
    const now = performance.now();
    // Deadlines grow along the queue (one deadlineMs, queued in order), so the expired ones lead it.
    let i = 0;
    let err: StoreClientError | undefined;
    while (i < this.queue.length && this.queue[i].deadline <= now + 1) this.queue[i++].reject((err ??= this.timedOut(false)));
    if (i > 0) this.queue = this.queue.slice(i);
    if (this.draining) this.armQueueTimer();
  }

  private armQueueTimer(): void {
    if (this.queueTimer || this.queue.length === 0) return;
    this.queueTimer = setTimeout(this.sweepNow, Math.max(0, this.queue[0].deadline - performance.now()));
  }

  private stopQueueTimer(): void {
    clearTimeout(this.queueTimer);
    this.queueTimer = undefined;
  }

  private send(ops: PendingOp[], now: number): void {
    const id = this.nextId++;
    let first = Infinity;
    let last = 0;
    for (const pending of ops) {
      // The store skips an operation once the time its caller has left runs out.
      pending.op.timeoutMs = Math.max(1, Math.ceil(pending.deadline - now));
      first = Math.min(first, pending.deadline);
      last = Math.max(last, pending.deadline);
    }
    // clientClockMs and timeoutMs from the same instant: the store measures how late it read the batch.
    const request: BatchRequest = { id, ops: ops.map((p) => p.op), clientClockMs: now };
    const timer = setTimeout(() => this.expire(id), first - now);
    this.inFlight.set(id, { ops, timer });
    // One operation over the batch cap may be over the store's message limit too, and a message
    // over it ends the stream with every operation in flight on it: it goes in a call of its own.
    if (this.useUnaryBatch || (ops.length === 1 && estimatedBytes(ops[0].op) > this.maxBatchBytes)) {
      this.client.batch(request, this.metadata, { deadline: Date.now() + (last - now) }, (err, response) => {
        if (err) this.fail(id, fromServiceError(err));
        else this.answer(response!);
      });
      return;
    }
    const stream = this.openStream();
    // Gets read again on their own (answer()) are sent while the stream may be draining already:
    // one drain listener is enough (one each piled up, past Node's warning at 10).
    if (!stream.write(request) && !this.draining) {
      this.draining = true;
      stream.once('drain', () => {
        this.draining = false;
        this.stopQueueTimer();
        this.flush();
      });
    }
  }

  private openStream(): ClientDuplexStream<BatchRequest, BatchResponse> {
    if (this.stream) return this.stream;
    const stream = this.client.pipe(this.metadata);
    this.stream = stream;
    /** `notRun`: the store says it ran none of the batches still unanswered (never sent, or ended the pipe without reading them). */
    const broken = (err: StoreClientError, notRun?: 'unsent' | 'unread') => {
      if (this.stream !== stream) return;
      this.stream = undefined;
      this.draining = false;
      this.stopQueueTimer();
      if (err.code === status.UNIMPLEMENTED && !this.useUnaryBatch) {
        // A store without Pipe: nothing was executed, so resend everything through Batch.
        this.useUnaryBatch = true;
        const resend = [...this.inFlight.values()].flatMap((f) => {
          clearTimeout(f.timer);
          return f.ops;
        });
        this.inFlight.clear();
        this.queue = resend.concat(this.queue);
        this.flush();
        return;
      }
      const refused = err.code === status.UNAUTHENTICATED;
      if (!this.closed) this.options.onBreak?.(notRun === 'unread' ? 'ended' : notRun === 'unsent' ? 'unopened' : refused ? 'refused' : 'broken');
      // The stream's status is about the stream, not about an operation: batches in flight on it
      // may have run before it broke, so their outcome is unknown (an operation's own code comes
      // only from its OpResult). Except UNAUTHENTICATED: the store refuses such a stream before it
      // reads a batch, and the caller must learn that the token is wrong. And except a stream
      // grpc-js never opened (no connection to the store): nothing on it reached the store; and a
      // pipe the store ended itself (see 'end' below).
      this.failAll(
        refused || notRun === 'unread'
          ? err
          : notRun === 'unsent'
            ? toClientError(status.UNAVAILABLE, `no pipe to the store could be opened (${status[err.code] ?? err.code}: ${err.message}); the operation was not sent`)
            : toClientError(status.UNAVAILABLE, `the pipe to the store broke (${status[err.code] ?? err.code}: ${err.message}); the outcome of the operation is unknown`, {
                outcomeUnknown: true,
              }),
      );
      if (this.queue.length > 0 && !this.scheduled) {
        this.scheduled = true;
        setImmediate(this.flushNow);
      }
    };
    stream.on('data', (response: BatchResponse) => this.answer(response));
    stream.on('error', (err: ServiceError) => broken(fromServiceError(err), neverSent(err) ? 'unsent' : undefined));
    // An end without an error is the store's status OK: a stopping store ends a pipe only once it
    // has answered every batch it read, and runs none it reads after (see Pipe in kv.proto). A
    // broken connection is an error, never an end, so the batches unanswered now were not run.
    stream.on('end', () => broken(toClientError(status.UNAVAILABLE, 'the store closed the pipe (it is stopping) without running the operation'), 'unread'));
    return stream;
  }

  private answer(response: BatchResponse): void {
    const flight = this.inFlight.get(response.id);
    if (!flight) return; // already timed out
    this.inFlight.delete(response.id);
    clearTimeout(flight.timer);
    const { ops } = flight;
    let again: PendingOp[] | undefined;
    for (let i = 0; i < ops.length; i += 1) {
      const result = response.results[i];
      if (!result) ops[i].reject(toClientError(status.INTERNAL, 'the store answered fewer results than operations'));
      else if (result.code === status.RESOURCE_EXHAUSTED && ops.length > 1 && ops[i].op.op?.$case === 'get') (again ??= []).push(ops[i]);
      else ops[i].resolve(result);
    }
    // A Batch or Pipe answer holds at most STORE_MAX_MESSAGE_BYTES of entries: the Gets past it
    // fail with RESOURCE_EXHAUSTED, "read this key in another batch".
    // Each is sent again in a batch of its own (a Get's TTL refresh running twice only slides it).
    if (again) {
      const now = performance.now();
      for (const pending of again) {
        if (pending.deadline <= now) pending.reject(this.timedOut(true));
        else this.send([pending], now);
      }
    }
  }

  /** Fails the operations of a batch whose deadline has passed; the batch waits on for the others. */
  private expire(id: number): void {
    const flight = this.inFlight.get(id);
    if (!flight) return;
    const now = performance.now();
    let next = Infinity;
    let err: StoreClientError | undefined;
    for (const pending of flight.ops) {
      // Rejecting one twice, or resolving it after, does nothing: a promise settles once.
      if (pending.deadline <= now + 1) pending.reject((err ??= this.timedOut(true)));
      else next = Math.min(next, pending.deadline);
    }
    if (next === Infinity) this.inFlight.delete(id);
    else flight.timer = setTimeout(() => this.expire(id), next - now);
  }

  /** A deadline passed: before the operation was sent (the store never saw it), or after (it may have run). */
  private timedOut(sent: boolean): StoreClientError {
    return sent
      ? toClientError(status.DEADLINE_EXCEEDED, `no answer from the store within ${this.options.deadlineMs} ms; the outcome of the operation is unknown`, { outcomeUnknown: true })
      : toClientError(status.DEADLINE_EXCEEDED, `not sent: the ${this.options.deadlineMs} ms deadline passed while the operation waited to be sent to the store`);
  }

  private fail(id: number, err: StoreClientError): void {
    const flight = this.inFlight.get(id);
    if (!flight) return;
    this.inFlight.delete(id);
    clearTimeout(flight.timer);
    for (const pending of flight.ops) pending.reject(err);
  }

  private failAll(err: StoreClientError): void {
    for (const id of [...this.inFlight.keys()]) this.fail(id, err);
  }
}

/**
 * The default batch cap: a batch message holds at most STORE_MAX_MESSAGE_BYTES' least (64 KiB),
 * less room for the BatchRequest's own fields (id, client_clock_ms: under 64 bytes).
 */
const DEFAULT_MAX_BATCH_BYTES = 64 * 1024 - 64;

/** About the bytes an operation adds to a BatchRequest: its key, value and request id (UTF-8), plus framing. */
function estimatedBytes(op: Op): number {
  const inner = op.op;
  if (!inner) return 64;
  return 64 + Buffer.byteLength(inner.value.key) + Buffer.byteLength(op.requestId) + (inner.$case === 'put' ? inner.value.value.length : 0);
}
