import { HealthImplementation, type ServingStatus } from 'grpc-health-check';
import type { Backend } from './backends/backend';

export const SERVICE_NAME = 'sessions.kv.v1.SessionStore';

/**
 * grpc.health.v1 state for the whole server ('') and the SessionStore service. It follows the
 * backend: a periodic ping sets SERVING or NOT_SERVING; shutdown sets NOT_SERVING for good.
 */
export class StoreHealth {
  readonly implementation = new HealthImplementation({ '': 'NOT_SERVING', [SERVICE_NAME]: 'NOT_SERVING' });
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(
    private readonly backend: Backend,
    private readonly intervalMs = 1000,
  ) {}

  /** Checks the backend now and then every intervalMs. */
  async start(): Promise<void> {
    await this.check();
    this.timer = setInterval(() => void this.check(), this.intervalMs);
    this.timer.unref();
  }

  /** NOT_SERVING from now on (graceful shutdown). */
  stop(): void {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.set('NOT_SERVING');
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
