import { createServer, type Server as HttpServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';
import { status } from '@grpc/grpc-js';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import { listenVariables } from '../shared/env';
import type { Backend, BackendOp, BackendResult } from './backends/backend';

/** The RPCs of the SessionStore, as they appear in logs and metric labels. */
export type RpcMethod = 'Get' | 'Put' | 'Delete' | 'List' | 'ListPages' | 'Batch' | 'Pipe' | 'Watch';

// From 100 µs: a SQLite Get is well under a millisecond, and its spread is what an operator watches.
const LATENCY_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];

/** Largest share of the time spent counting live entries for scrapes. */
const COUNT_DUTY = 0.01;
/** Counts quicker than this are never reused. */
const CHEAP_COUNT_MS = 100;

/**
 * A count that runs at most `duty` of the time once it is slow: after a count that took d ms (d at
 * least 100), the next one starts no sooner than d / duty ms after that one started. Once a count
 * is slow, callers never wait for the next one: they get the last value at once, and a due recount
 * runs in the background; if it fails, the next call rejects with its error (and starts another).
 * Only the first count, and counts after a quick one, are awaited. Calls that arrive while an
 * awaited count runs share it. On SQLite a count takes milliseconds, so every scrape gets a fresh
 * one; on Redis a count is a SCAN of the whole keyspace, and a large keyspace is counted less often
 * (instead of each scrape of each store instance loading Redis with it) and never holds a scrape
 * past its timeout once the first count is in.
 */
export function throttledCount(count: () => Promise<number>, duty = COUNT_DUTY, now = () => performance.now()): () => Promise<number> {
  let last: { value: number; startedAt: number; tookMs: number } | undefined;
  let running: Promise<number> | undefined;
  let failure: { error: unknown } | undefined;
  const start = (): Promise<number> => {
    const startedAt = now();
    const counting = count().then((value) => {
      last = { value, startedAt, tookMs: now() - startedAt };
      return value;
    });
    running = counting;
    const done = () => {
      running = undefined;
    };
    counting.then(done, done);
    return counting;
  };
  return () => {
    if (!last || last.tookMs < CHEAP_COUNT_MS) return running ?? start();
    const reported = failure;
    failure = undefined;
    if (!running && now() - last.startedAt >= last.tookMs / duty) {
      start().catch((error: unknown) => {
        failure = { error };
      });
    }
    return reported ? Promise.reject(reported.error) : Promise.resolve(last.value);
  };
}

/**
 * The store's Prometheus metrics, in a registry of their own:
 * - store_rpc_handled_total{method,code} and store_rpc_duration_seconds{method,code}: one per
 *   call; a Pipe stream counts each batch it carries as one call;
 * - store_backend_duration_seconds{op}: backend batches (op = get, put or delete for a single
 *   operation, batch for several);
 * - store_batch_ops: operations per Batch call or Pipe batch;
 * - store_batch_op_failures_total{method,code}: operations that failed inside a Batch call or Pipe
 *   batch that ran (the batch itself counts as OK in store_rpc_handled_total);
 * - store_live_entries: unexpired entries, counted when scraped (throttled: see throttledCount);
 * - store_live_entries_count_failures_total: scrapes whose count failed;
 * - store_expired_swept_total: expired entries removed (by the sweeper, or by a write that reached them first);
 * - the default process metrics of prom-client (CPU, memory, event-loop lag, handles).
 */
export class StoreMetrics {
  readonly registry = new Registry();
  private readonly handled: Counter<'method' | 'code'>;
  private readonly duration: Histogram<'method' | 'code'>;
  private readonly backendDuration: Histogram<'op'>;
  private readonly batchOps: Histogram;
  private readonly opFailures: Counter<'method' | 'code'>;
  private readonly unwatch: () => void;
  private certificateExpiry: Gauge | undefined;
  /** Label children by method and code, so that recording a call allocates nothing. */
  private readonly children = new Map<RpcMethod, Array<{ handled: Counter.Internal; duration: Histogram.Internal<'method' | 'code'> }>>();

  constructor(backend: Backend) {
    const registers = [this.registry];
    this.handled = new Counter({ name: 'store_rpc_handled_total', help: 'RPCs completed, by method and status code', labelNames: ['method', 'code'], registers });
    this.duration = new Histogram({
      name: 'store_rpc_duration_seconds',
      help: 'RPC latency, by method and status code',
      labelNames: ['method', 'code'],
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.backendDuration = new Histogram({
      name: 'store_backend_duration_seconds',
      help: 'Backend batch latency (op: get, put or delete for one operation, batch for several)',
      labelNames: ['op'],
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.batchOps = new Histogram({
      name: 'store_batch_ops',
      help: 'Operations per Batch call or Pipe batch',
      buckets: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000],
      registers,
    });
    this.opFailures = new Counter({
      name: 'store_batch_op_failures_total',
      help: 'Operations that failed inside a Batch call or Pipe batch that ran (the batch counts as OK in store_rpc_handled_total), by method and status code',
      labelNames: ['method', 'code'],
      registers,
    });
    const countLive = throttledCount(() => backend.countLive());
    // One count per scrape, which both metrics wait for: prom-client reads every metric of a scrape
    // at once, so a failure counted only in the gauge's collect would show at the next scrape.
    let scrape: Promise<void> | undefined;
    const collectLive = (): Promise<void> =>
      (scrape ??= (async () => {
        // A backend that is down must not take the other metrics with it: they matter most then.
        try {
          liveEntries.set(await countLive());
        } catch {
          countFailures.inc();
        } finally {
          scrape = undefined;
        }
      })());
    const countFailures = new Counter({
      name: 'store_live_entries_count_failures_total',
      help: 'Scrapes whose count of live entries failed (the backend was unreachable; for a slow count, the one that failed in the background since the last scrape); store_live_entries kept its last value',
      registers,
      collect: collectLive,
    });
    const liveEntries = new Gauge({
      name: 'store_live_entries',
      help: `Unexpired entries in the store (counted when scraped; a count that took over ${CHEAP_COUNT_MS} ms, e.g. a SCAN of a large Redis, is reused for ${1 / COUNT_DUTY} times as long and then redone in the background)`,
      registers,
      collect: collectLive,
    });
    const swept = new Counter({ name: 'store_expired_swept_total', help: 'Expired entries removed, by the sweeper or by a put or delete that reached them first', registers });
    this.unwatch = backend.watch(
      '',
      (event) => {
        if (event.kind === 'expire') swept.inc();
      },
      { kinds: ['expire'] },
    );
    collectDefaultMetrics({ register: this.registry });
  }

  /**
   * The expiry of the TLS certificate now served, as a Unix time: alert on it drawing near (the
   * store reloads a renewed certificate by itself). Absent when the store serves plaintext.
   */
  observeCertificate(notAfter: Date): void {
    this.certificateExpiry ??= new Gauge({
      name: 'store_tls_certificate_expiry_timestamp_seconds',
      help: 'When the TLS certificate the store serves stops being valid (notAfter), in seconds since the Unix epoch',
      registers: [this.registry],
    });
    this.certificateExpiry.set(notAfter.getTime() / 1000);
  }

  /** Records one finished call; `ops` is the operation count of a Batch call or Pipe batch. */
  recordRpc(method: RpcMethod, code: status, seconds: number, ops?: number): void {
    let byCode = this.children.get(method);
    if (!byCode) this.children.set(method, (byCode = []));
    let child = byCode[code];
    if (!child) {
      const name = status[code] ?? String(code);
      child = byCode[code] = { handled: this.handled.labels(method, name), duration: this.duration.labels(method, name) };
    }
    child.handled.inc();
    child.duration.observe(seconds);
    if (ops !== undefined) this.batchOps.observe(ops);
  }

  /** Records one operation of a batch that failed on its own (the batch is recorded by recordRpc). */
  recordOpFailure(method: RpcMethod, code: status): void {
    this.opFailures.inc({ method, code: status[code] ?? String(code) });
  }

  /** The backend with the latency of every batch recorded. */
  instrument(backend: Backend): Backend {
    const byOp = {
      get: this.backendDuration.labels('get'),
      put: this.backendDuration.labels('put'),
      delete: this.backendDuration.labels('delete'),
      batch: this.backendDuration.labels('batch'),
    };
    return {
      name: backend.name,
      batch: (ops: readonly BackendOp[]): Promise<BackendResult[]> => {
        const started = performance.now();
        const timer = byOp[ops.length === 1 ? ops[0].kind : 'batch'];
        // Failed batches too: a backend that times out is exactly when the histogram must not read low.
        return backend.batch(ops).finally(() => timer.observe((performance.now() - started) / 1000));
      },
      list: (options) => backend.list(options),
      watch: (prefix, onEvent, options) => backend.watch(prefix, onEvent, options),
      ping: () => backend.ping(),
      countLive: () => backend.countLive(),
      close: () => backend.close(),
    };
  }

  close(): void {
    this.unwatch();
  }
}

/** Serves GET /metrics in the Prometheus text format; resolves with the server and its port. */
export function serveMetrics(registry: Registry, host: string, port: number): Promise<{ server: HttpServer; port: number }> {
  const server = createServer((req, res) => {
    if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: the metrics are at /metrics\n');
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text),
      (err: Error) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`metrics failed: ${err.message}\n`),
    );
  });
  return new Promise((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) =>
      reject(new Error(`cannot serve metrics on ${host}:${port} (${listenVariables(err.code, 'STORE_METRICS_PORT', 'STORE_HOST')}): ${err.message}`)),
    );
    server.listen(port, host, () => resolve({ server, port: (server.address() as AddressInfo).port }));
  });
}
