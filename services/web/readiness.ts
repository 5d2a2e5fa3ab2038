import { type Client, makeGenericClientConstructor, Metadata, type ServiceDefinition, type ServiceError, status } from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';
import type { Logger } from 'pino';
import { CHANNEL_OPTIONS, type StoreClient, StoreClientError, type StoreClientOptions, storeChannel } from '../client/store-client';
import { SessionStoreService } from '../generated/kv';
import { ID_LENGTH } from './signed-id';

/** The store's answer to a grpc.health.v1 Check: its serving status, or UNREACHABLE when no answer came in time. */
export type StoreHealthStatus = 'SERVING' | 'NOT_SERVING' | 'UNKNOWN' | 'SERVICE_UNKNOWN' | 'UNREACHABLE';

/**
 * What /readyz reports: the store's health, and when it serves, whether it accepts this web's calls
 * (`problem` names the setting it refuses: a wrong STORE_TOKEN, a session TTL above its maximum, a
 * key limit below a session id's length).
 */
export interface Readiness {
  store: StoreHealthStatus;
  problem?: string;
}

export interface ReadinessCheck {
  /** Asks the store once (parallel callers share one call). */
  check(): Promise<Readiness>;
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
 * A key that never exists: as long as a session id, so a store whose STORE_MAX_KEY_BYTES refuses
 * session ids refuses it too, and never one ('.' is no base64url character).
 */
const PROBE_KEY = 'readiness.probe.'.padEnd(ID_LENGTH, '0');

/**
 * How the web calls the store, for the readiness probe: a serving store can still refuse every
 * page's calls when the two are configured apart.
 */
export interface ReadinessProbe {
  /** The web's own store client (its token, TLS and transport). */
  store: Pick<StoreClient, 'get'>;
  /** The longest TTL the web asks for (SESSION_IDLE_TTL_MS). */
  ttlMs: number;
}

/**
 * The setting a serving store refuses in this web's calls, from one Get of a key that never exists
 * with the web's longest TTL as refresh (nothing is written). undefined: accepted, or the store
 * could not be asked (health says why). Not answered by `deadline`: `known`, the last answer (a
 * store that answered health late must not hold /readyz for a second STORE_DEADLINE_MS, the store
 * client's own, nor let a web it refuses into rotation because it is slow).
 */
async function refusedSetting(probe: ReadinessProbe, deadline: number, known: string | undefined): Promise<string | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<string | undefined>((resolve) => {
    timer = setTimeout(() => resolve(known), deadline - Date.now());
  });
  try {
    return await Promise.race([askedSetting(probe), late]);
  } finally {
    clearTimeout(timer);
  }
}

async function askedSetting(probe: ReadinessProbe): Promise<string | undefined> {
  try {
    await probe.store.get(PROBE_KEY, { refreshTtlMs: probe.ttlMs });
    return undefined;
  } catch (err) {
    if (!(err instanceof StoreClientError) || err.kind === 'unavailable') return undefined;
    if (err.kind === 'unauthenticated') return `the store refuses this web's STORE_TOKEN: ${err.message}`;
    if (err.kind === 'invalid') return `the store refuses this web's sessions (SESSION_IDLE_TTL_MS=${probe.ttlMs}, ids of ${ID_LENGTH} characters): ${err.message}`;
    return `the store refuses this web's calls: ${err.message}`;
  }
}

/**
 * Readiness of the web service = the store answers grpc.health.v1 Check with SERVING for the
 * SessionStore service within timeoutMs and, with a probe, accepts this web's token and TTL. It
 * never touches a session.
 */
export function createStoreReadiness(
  options: Pick<StoreClientOptions, 'address' | 'tlsCa'> & {
    timeoutMs: number;
    probe?: ReadinessProbe;
    /**
     * Told once each time the answer changes (the store stops serving or serves again, the probe's
     * problem appears or goes), so the log shows when and why this web was out of rotation.
     */
    logger?: Pick<Logger, 'error' | 'warn' | 'info'>;
  },
): ReadinessCheck {
  const { target, credentials } = storeChannel(options);
  const client = new HealthClientConstructor(target, credentials, CHANNEL_OPTIONS);
  const metadata = new Metadata();
  const { probe } = options;
  let inFlight: Promise<Readiness> | undefined;
  const { logger } = options;
  let reported: string | undefined;
  const report = (problem: string | undefined) => {
    if (problem === reported) return;
    if (problem) logger?.error({ problem }, 'not ready: the store refuses this web\'s calls');
    else logger?.info('ready: the store accepts this web\'s calls again');
    reported = problem;
  };
  // undefined until the first answer: a store that serves from the start is not news.
  let reportedStore: StoreHealthStatus | undefined;
  const reportStore = (store: StoreHealthStatus, problem?: string, reason?: string) => {
    if (store === reportedStore) return;
    // UNREACHABLE alone does not tell a refused connection from a certificate not trusted or a name
    // not resolved: with /readyz failing, the load balancer sends no page whose error would say.
    if (store !== 'SERVING') logger?.warn(reason ? { store, reason } : { store }, 'not ready: the store does not serve');
    // Back, but refusing this web's calls as before: not ready, and report() says why again.
    else if (problem) reported = undefined;
    else if (reportedStore !== undefined) logger?.info({ store }, 'ready: the store serves again');
    reportedStore = store;
  };
  /** The store's status, and why no answer came when it is UNREACHABLE (grpc-js's words). */
  const health = (deadline: number) =>
    new Promise<{ store: StoreHealthStatus; reason?: string }>((resolve) => {
      client.check({ service: STORE_SERVICE }, metadata, { deadline }, (err, res) => {
        if (!err) resolve({ store: res?.status ?? 'UNKNOWN' });
        else if (err.code === status.NOT_FOUND) resolve({ store: 'SERVICE_UNKNOWN' });
        else resolve({ store: 'UNREACHABLE', reason: `${status[err.code] ?? err.code}: ${err.details}` });
      });
    });
  const ask = async (): Promise<Readiness> => {
    // One timeout for the whole check, health and probe together.
    const deadline = Date.now() + options.timeoutMs;
    const { store, reason } = await health(deadline);
    if (store !== 'SERVING' || !probe) {
      reportStore(store, undefined, reason);
      return { store };
    }
    const problem = await refusedSetting(probe, deadline, reported);
    reportStore(store, problem);
    report(problem);
    return problem ? { store, problem } : { store };
  };
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
