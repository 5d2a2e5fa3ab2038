import { type Client, makeGenericClientConstructor, Metadata, type ServiceDefinition, type ServiceError, status } from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';
import { CHANNEL_OPTIONS, type StoreClientOptions, storeChannel } from '../client/store-client';
import { SessionStoreService } from '../generated/kv';

/** The store's answer to a grpc.health.v1 Check: its serving status, or UNREACHABLE when no answer came in time. */
export type StoreHealthStatus = 'SERVING' | 'NOT_SERVING' | 'UNKNOWN' | 'SERVICE_UNKNOWN' | 'UNREACHABLE';

export interface ReadinessCheck {
  /** Asks the store once (parallel callers share one call). */
  check(): Promise<StoreHealthStatus>;
  close(): void;
}

/** "sessions.kv.v1.SessionStore", taken from the generated service so it cannot drift from the proto. */
const STORE_SERVICE = SessionStoreService.get.path.split('/')[1];

interface HealthClient extends Client {
  check(
    request: { service: string },
    metadata: Metadata,
    options: { deadline: number },
    callback: (err: ServiceError | null, response?: { status: StoreHealthStatus }) => void,
  ): void;
}

const HealthClientConstructor = makeGenericClientConstructor(healthService as unknown as ServiceDefinition, 'Health') as unknown as new (
  ...args: ConstructorParameters<typeof Client>
) => HealthClient;

/**
 * Readiness of the web service = the store answers grpc.health.v1 Check with SERVING for the
 * SessionStore service within timeoutMs. It never touches a session.
 */
export function createStoreReadiness(options: Pick<StoreClientOptions, 'address' | 'tlsCa'> & { timeoutMs: number }): ReadinessCheck {
  const { target, credentials } = storeChannel(options);
  const client = new HealthClientConstructor(target, credentials, CHANNEL_OPTIONS);
  const metadata = new Metadata();
  let inFlight: Promise<StoreHealthStatus> | undefined;
  const ask = () =>
    new Promise<StoreHealthStatus>((resolve) => {
      client.check({ service: STORE_SERVICE }, metadata, { deadline: Date.now() + options.timeoutMs }, (err, res) => {
        if (err) resolve(err.code === status.NOT_FOUND ? 'SERVICE_UNKNOWN' : 'UNREACHABLE');
        else resolve(res?.status ?? 'UNKNOWN');
      });
    });
  return {
    check() {
      inFlight ??= ask().finally(() => {
        inFlight = undefined;
      });
      return inFlight;
    },
    close() {
      client.close();
    },
  };
}
