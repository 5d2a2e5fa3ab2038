import { Counter, collectDefaultMetrics, Histogram, Registry } from 'prom-client';
import type { PipeBreak } from '../client/pipe-client';
import { StoreClientError } from '../client/store-client';
import type { SessionBackend, SessionEvent } from './session';

const HTTP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];
const STORE_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5];

/** The web service's Prometheus metrics, in a registry of their own (so several apps can live in one process). */
export class WebMetrics {
  readonly registry = new Registry();

  private readonly requests = new Counter({
    name: 'web_http_requests_total',
    help: 'HTTP requests answered, by method, route and status.',
    labelNames: ['method', 'route', 'status'] as const,
    registers: [this.registry],
  });

  private readonly requestSeconds = new Histogram({
    name: 'web_http_request_duration_seconds',
    help: 'Time from receiving a request to its response being ready, by method, route and status.',
    labelNames: ['method', 'route', 'status'] as const,
    buckets: HTTP_BUCKETS,
    registers: [this.registry],
  });

  private readonly storeSeconds = new Histogram({
    name: 'web_store_call_duration_seconds',
    help: 'Latency of calls to the SessionStore, by method (get, put, delete) and outcome (ok, conflict, unavailable, ...).',
    labelNames: ['method', 'outcome'] as const,
    buckets: STORE_BUCKETS,
    registers: [this.registry],
  });

  private readonly storeErrors = new Counter({
    name: 'web_store_call_errors_total',
    help: 'Failed calls to the SessionStore, by method and kind (conflict, unavailable, invalid, unauthenticated, other).',
    labelNames: ['method', 'kind'] as const,
    registers: [this.registry],
  });

  private readonly sessions = new Counter({
    name: 'web_sessions_total',
    help: 'Session lifecycle events: created, regenerated, destroyed (by the site), expired (a visit whose valid cookie found its session ended: idle or absolute timeout, or deleted meanwhile).',
    labelNames: ['event'] as const,
    registers: [this.registry],
  });

  private readonly pipeBreaks = new Counter({
    name: 'web_store_pipe_breaks_total',
    help: 'Pipe streams to the store that ended, by reason: broken (the outcome of the calls in flight is unknown), unopened (no connection), refused (the store refused STORE_TOKEN; nothing on it ran), ended (the store was stopping); the next call opens a new one.',
    labelNames: ['reason'] as const,
    registers: [this.registry],
  });

  private readonly refused = new Counter({
    name: 'web_http_refused_total',
    help: "Requests Node's HTTP server refused before the app answered them (400, 408, 413 or 431; 501 for a CONNECT, code CONNECT), by the error's code; most never reached the app, but a form whose body was still arriving at its 408 is also in web_http_requests_total, as 499.",
    labelNames: ['code'] as const,
    registers: [this.registry],
  });

  private readonly forged = new Counter({
    name: 'web_forged_cookies_total',
    help: 'Session cookies whose signature did not verify (forged or tampered).',
    registers: [this.registry],
  });

  constructor(options: { defaultMetrics?: boolean } = {}) {
    if (options.defaultMetrics ?? true) collectDefaultMetrics({ register: this.registry });
  }

  /** Label children per method/route/status, so a request costs no label hashing (the set is small and bounded). */
  private readonly requestSeries = new Map<string, { count: { inc(): void }; seconds: { observe(value: number): void } }>();

  observeRequest(method: string, route: string, status: number, seconds: number): void {
    const key = `${method} ${route} ${status}`;
    let series = this.requestSeries.get(key);
    if (!series) {
      const labels = { method, route, status: String(status) };
      series = { count: this.requests.labels(labels), seconds: this.requestSeconds.labels(labels) };
      this.requestSeries.set(key, series);
    }
    series.count.inc();
    series.seconds.observe(seconds);
  }

  observeSessionEvent(event: SessionEvent): void {
    this.sessions.inc({ event });
  }

  observePipeBreak(reason: PipeBreak): void {
    this.pipeBreaks.inc({ reason });
  }

  observeRefused(code: string): void {
    this.refused.inc({ code });
  }

  observeForgedCookie(): void {
    this.forged.inc();
  }

  /** The store with every call timed and every failure counted, by method. */
  instrumentStore(store: SessionBackend): SessionBackend {
    const timed = (method: string) => {
      // The successful series is looked up once, not per call (label hashing on every call shows in profiles).
      const okSeconds = this.storeSeconds.labels({ method, outcome: 'ok' });
      return <R>(call: () => Promise<R>): Promise<R> => {
        const start = process.hrtime.bigint();
        return call().then(
          (result) => {
            okSeconds.observe(Number(process.hrtime.bigint() - start) / 1e9);
            return result;
          },
          (err: unknown) => {
            const kind = err instanceof StoreClientError ? err.kind : 'other';
            this.storeSeconds.observe({ method, outcome: kind }, Number(process.hrtime.bigint() - start) / 1e9);
            this.storeErrors.inc({ method, kind });
            throw err;
          },
        );
      };
    };
    const get = timed('get');
    const put = timed('put');
    const del = timed('delete');
    return {
      get: (key, options) => get(() => store.get(key, options)),
      put: (key, value, options) => put(() => store.put(key, value, options)),
      delete: (key, options) => del(() => store.delete(key, options)),
    };
  }

  /** The Prometheus text exposition of every metric. */
  async render(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }
}
