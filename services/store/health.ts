import type { Server, ServerWritableStream, UntypedServiceImplementation } from '@grpc/grpc-js';
import { HealthImplementation, type ServingStatus } from 'grpc-health-check';
import type { Backend } from './backends/backend';

export const SERVICE_NAME = 'sessions.kv.v1.SessionStore';

/** The services the store reports a status for: the server as a whole ('') and the SessionStore. */
const SERVICES: ReadonlySet<unknown> = new Set(['', SERVICE_NAME]);

/**
 * grpc.health.v1 state for the whole server ('') and the SessionStore service. It follows the
 * backend: a periodic ping sets SERVING or NOT_SERVING; stop() sets NOT_SERVING for good and
 * ends the Watch streams (after they have been told), so they do not hold up a graceful stop.
 */
export class StoreHealth {
  readonly implementation = new HealthImplementation({ '': 'NOT_SERVING', [SERVICE_NAME]: 'NOT_SERVING' });
  private readonly watchers = new Set<ServerWritableStream<unknown, unknown>>();
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(
    private readonly backend: Backend,
    private readonly intervalMs = 1000,
  ) {}

  /** Adds grpc.health.v1.Health to the server, keeping track of open Watch streams. */
  addToServer(server: Server): void {
    const tracking = {
      addService: (service: Parameters<Server['addService']>[0], handlers: UntypedServiceImplementation) => {
        const watch = handlers.watch as (call: ServerWritableStream<unknown, unknown>) => void;
        server.addService(service, {
          ...handlers,
          watch: (call: ServerWritableStream<unknown, unknown>) => {
            this.watchers.add(call);
            call.on('cancelled', () => this.watchers.delete(call));
            // The library keeps a set of watchers for each service name it is asked about and
            // never drops an emptied one: Watch calls naming ever new services (anyone may call,
            // no token needed; a name can be megabytes) would grow the store's memory for good.
            // Only the SERVICES ever have a status, so any other name is answered here as the
            // library answers it (SERVICE_UNKNOWN, and the call stays open until cancelled or the
            // stop) and never reaches the library.
            if (SERVICES.has((call.request as { service?: unknown }).service)) watch(call);
            else call.write({ status: 'SERVICE_UNKNOWN' });
            if (this.stopped) this.endWatchers();
          },
        });
      },
    };
    this.implementation.addToServer(tracking as unknown as Server);
  }

  /** Checks the backend now and then every intervalMs. */
  async start(): Promise<void> {
    await this.check();
    this.timer = setInterval(() => void this.check(), this.intervalMs);
    this.timer.unref();
  }

  /** NOT_SERVING from now on (graceful shutdown); open Watch streams get it and end. */
  stop(): void {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.set('NOT_SERVING');
    this.endWatchers();
  }

  private endWatchers(): void {
    for (const call of this.watchers) call.end();
    this.watchers.clear();
  }

  private async check(): Promise<void> {
    let status: ServingStatus = 'SERVING';
    try {
      await this.backend.ping();
    } catch {
      status = 'NOT_SERVING';
    }
    if (!this.stopped) this.set(status);
  }

  private set(status: ServingStatus): void {
    this.implementation.setStatus('', status);
    this.implementation.setStatus(SERVICE_NAME, status);
  }
}
