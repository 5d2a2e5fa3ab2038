import {
  type ChannelCredentials,
  type ChannelOptions,
  credentials,
  experimental,
  Metadata,
  type ServiceError,
  status,
} from '@grpc/grpc-js';
import { type Entry, type ListRequest, SessionStoreClient } from '../generated/kv';

export type { Entry };

/** How to reach a SessionStore. */
export interface StoreClientOptions {
  /** host:port, http://host:port or https://host:port (see resolveEndpoint for which means TLS). */
  address: string;
  /** Bearer token sent with every call when set. */
  token?: string;
  /** Deadline of every call, in milliseconds. */
  deadlineMs: number;
  /**
   * TLS: the CA that signed the store's certificate, as PEM or as a provider that hands on a
   * renewed one (ReloadingCa); asks for TLS on a bare host:port.
   */
  tlsCa?: TrustedCa;
}

/** CA certificates as PEM, or a grpc-js certificate provider that hands them on (and renewed ones). */
export type TrustedCa = Buffer | experimental.CertificateProvider;

export type StoreErrorKind = 'conflict' | 'unavailable' | 'invalid' | 'unauthenticated' | 'other';

/** The store operation a call made: put and delete change data, get and list only read it (a get may move an expiry). */
export type StoreCall = 'get' | 'put' | 'delete' | 'list';

/** The one error type of the client: `kind` says what the caller can do about it. */
export class StoreClientError extends Error {
  override name = 'StoreClientError';
  /**
   * True when the request was sent and no answer came (a deadline passed after sending, the
   * connection or stream broke after sending, the call was cancelled): the store may have applied
   * it. False when the request never reached the store or the store answered it.
   */
  readonly outcomeUnknown: boolean;
  /** The operation that failed, when the client knows it. */
  readonly call: StoreCall | undefined;
  constructor(
    readonly kind: StoreErrorKind,
    readonly code: status,
    message: string,
    options: { outcomeUnknown?: boolean; call?: StoreCall } = {},
  ) {
    super(message);
    this.outcomeUnknown = options.outcomeUnknown ?? false;
    this.call = options.call;
  }

  /** This error as the failure of `call` (a new error when it named no call or another one). */
  forCall(call: StoreCall): StoreClientError {
    if (this.call === call) return this;
    return new StoreClientError(this.kind, this.code, this.message, { outcomeUnknown: this.outcomeUnknown, call });
  }
}

const KIND_BY_CODE: Partial<Record<status, StoreErrorKind>> = {
  [status.ABORTED]: 'conflict',
  [status.UNAVAILABLE]: 'unavailable',
  [status.DEADLINE_EXCEEDED]: 'unavailable',
  [status.CANCELLED]: 'unavailable',
  [status.INVALID_ARGUMENT]: 'invalid',
  [status.RESOURCE_EXHAUSTED]: 'invalid',
  [status.UNAUTHENTICATED]: 'unauthenticated',
};

export function toClientError(code: status, details: string, options: { outcomeUnknown?: boolean; call?: StoreCall } = {}): StoreClientError {
  return new StoreClientError(KIND_BY_CODE[code] ?? 'other', code, details || status[code], options);
}

export function fromServiceError(err: ServiceError, call?: StoreCall): StoreClientError {
  return toClientError(err.code ?? status.UNKNOWN, err.details ?? err.message, { outcomeUnknown: sentWithoutAnswer(err), call });
}

/**
 * grpc-js's own statuses for a call that never went out on a connection: no connection could be
 * made (pick-first or round-robin gave up), the channel was closed first, the store refused the
 * stream before reading it, or the deadline passed while the call still waited for a connection.
 */
const NOT_SENT = /No connection established|^Channel closed before call started|^Stream refused by server|Waiting for LB pick|waiting for name resolution|waiting for metadata filters/;

/**
 * Whether a failed call may have been applied by the store: its request went out and no answer
 * came, or the store answered that its backend may have applied it. Only DEADLINE_EXCEEDED,
 * UNAVAILABLE and CANCELLED can mean that; any other status is the store's answer, or a refusal
 * before sending. An answer from the store carries its response headers (content-type) in the
 * error's metadata, a status grpc-js made up itself carries none:
 * - the store's own UNAVAILABLE (stopping, full, backend down) and DEADLINE_EXCEEDED (the call was
 *   skipped because its deadline had passed when the store reached it) say it did nothing, unless
 *   the store adds `outcome-unknown: 1` (a Redis command sent and never answered); and except
 *   grpc-js's server-side timer ("Deadline exceeded"), which answers while the handler may run;
 * - made up by grpc-js: unknown unless its details say the call never went out (NOT_SENT); an
 *   unrecognised message counts as unknown, the side that claims nothing false;
 * - CANCELLED: we or the store cancelled a call that had started.
 */
function sentWithoutAnswer(err: ServiceError): boolean {
  const { code } = err;
  if (code !== status.DEADLINE_EXCEEDED && code !== status.UNAVAILABLE && code !== status.CANCELLED) return false;
  if (code === status.CANCELLED) return true;
  if (answeredByStore(err)) {
    return (code === status.DEADLINE_EXCEEDED && err.details === 'Deadline exceeded') || err.metadata.get(OUTCOME_UNKNOWN_KEY).length > 0;
  }
  return !neverSent(err);
}

/** Trailing metadata with which the store says that a failed call may have been applied (OpResult.outcome_unknown in batches). */
const OUTCOME_UNKNOWN_KEY = 'outcome-unknown';

function answeredByStore(err: ServiceError): boolean {
  return (err.metadata?.get('content-type').length ?? 0) > 0;
}

/** Whether grpc-js failed the call before it went out on a connection (see NOT_SENT). */
export function neverSent(err: ServiceError): boolean {
  return !answeredByStore(err) && NOT_SENT.test(err.details ?? err.message ?? '');
}

/**
 * Refuses, as INVALID_ARGUMENT before anything is sent, the arguments of a get, put or delete that
 * a request message cannot carry (a key that is no string, a value that is no Buffer, a TTL that
 * is no whole number, a negative expected version, a request id that is no string): grpc-js would
 * fail to encode the message, and on a pipe that fails the whole stream, with every other caller's
 * operations in flight on it.
 */
export function checkArguments(
  call: StoreCall,
  key: unknown,
  fields: { ttlMs?: unknown; refreshTtlMs?: unknown; expectedVersion?: unknown; requestId?: unknown },
  value?: unknown,
): void {
  let problem: string | undefined;
  if (typeof key !== 'string') problem = `the key must be a string, not ${typeof key}`;
  else if (call === 'put' && !(value instanceof Uint8Array)) problem = 'the value must be a Buffer';
  else if (call === 'put' && !Number.isSafeInteger(fields.ttlMs)) problem = `ttlMs must be a whole number of milliseconds, not ${String(fields.ttlMs)}`;
  else if (fields.refreshTtlMs !== undefined && !Number.isSafeInteger(fields.refreshTtlMs)) problem = `refreshTtlMs must be a whole number of milliseconds, not ${String(fields.refreshTtlMs)}`;
  else if (fields.expectedVersion !== undefined && !(Number.isSafeInteger(fields.expectedVersion) && (fields.expectedVersion as number) >= 0)) {
    problem = `expectedVersion must be a version (a whole number, at least 0), not ${String(fields.expectedVersion)}`;
  } else if (fields.requestId !== undefined && typeof fields.requestId !== 'string') problem = `requestId must be a string, not ${typeof fields.requestId}`;
  if (problem !== undefined) throw toClientError(status.INVALID_ARGUMENT, `${call}: ${problem}; nothing was sent`, { call });
}

/** Per-call options every operation accepts. */
export interface CallOptions {
  /** The caller's request id: sent as `x-request-id` metadata (unary) or Op.request_id (batched), for the store's logs. */
  requestId?: string;
}

export interface PutOptions extends CallOptions {
  ttlMs: number;
  /** Write only if the current version is this one (0 = only if the key does not exist). */
  expectedVersion?: number;
}

export interface ListOptions {
  prefix?: string;
  limit?: number;
  startAfter?: string;
  keysOnly?: boolean;
}

/** The typed SessionStore client shared by the web service and bin/dump. */
export interface StoreClient {
  get(key: string, options?: { refreshTtlMs?: number } & CallOptions): Promise<Entry | null>;
  put(key: string, value: Buffer, options: PutOptions): Promise<Entry>;
  delete(key: string, options?: { expectedVersion?: number } & CallOptions): Promise<boolean>;
  list(options?: ListOptions): AsyncIterable<Entry>;
  close(): void;
}

/** A store address taken apart: the gRPC target (host:port) and the scheme written before it, if any. */
export interface StoreAddress {
  target: string;
  scheme?: 'http' | 'https';
}

/** Accepts host:port, http://host:port and https://host:port with a port 1-65535. */
export function parseAddress(address: string): StoreAddress {
  const trimmed = address.trim();
  const match = /^(?:(https?):\/\/)?([^/\s]+?)\/?$/i.exec(trimmed);
  const port = match && /^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d+)$/.exec(match[2])?.[1];
  if (!match || !port) {
    throw new Error(`not a store address: "${address}" (expected host:port, e.g. localhost:5100)`);
  }
  // Checked here, not left to gRPC: it would take the address and fail every call instead.
  if (Number(port) < 1 || Number(port) > 65535) {
    throw new Error(`not a store address: "${address}" (the port must be 1-65535)`);
  }
  const scheme = match[1]?.toLowerCase() as StoreAddress['scheme'];
  return scheme ? { target: match[2], scheme } : { target: match[2] };
}

/** Where to connect and whether the channel uses TLS. */
export interface StoreEndpoint {
  target: string;
  tls: boolean;
}

/**
 * The one place that decides TLS: https:// means TLS, http:// plaintext, and a bare host:port TLS
 * only when tlsAskedBy names the setting that asks for it (a CA, or dump's --tls). https:// must
 * never fall back to plaintext: the bearer token would cross the network in the clear. http:// with
 * a TLS setting contradicts itself and throws rather than guess which one was meant.
 */
export function resolveEndpoint(address: string, tlsAskedBy?: string): StoreEndpoint {
  const { target, scheme } = parseAddress(address);
  if (scheme === 'http' && tlsAskedBy) {
    throw new Error(`http:// means plaintext, but ${tlsAskedBy} asks for TLS (write https:// or host:port for TLS, or leave out ${tlsAskedBy})`);
  }
  return { target, tls: scheme === 'https' || (scheme === undefined && Boolean(tlsAskedBy)) };
}

/** Channel settings: reconnect quickly after an outage so the site recovers by itself. */
export const CHANNEL_OPTIONS: ChannelOptions = {
  'grpc.initial_reconnect_backoff_ms': 100,
  'grpc.max_reconnect_backoff_ms': 1000,
  // A connection that goes silent without closing (a NAT or firewall that forgot it, a host gone
  // without a reset) fails every call on it until a keepalive ping goes unanswered, and calls
  // timing out do not end it: with a ping every 10 s (while calls are active) and 5 s to answer,
  // the client gives it up and connects anew within about 15 s (it was 40 s at 30 s and 10 s).
  'grpc.keepalive_time_ms': 10_000,
  'grpc.keepalive_timeout_ms': 5_000,
  'grpc.keepalive_permit_without_calls': 0,
  // No receive limit: the store is trusted and bounds its answers itself. grpc-js' default of 4 MiB
  // would fail answers the store may rightly give: a Put's or Get's answer holds the value, which
  // STORE_MAX_VALUE_BYTES allows up to 4 MiB, plus its key and framing; a Pipe answer holds up to
  // a batch of values; a ListPages page may hold one value of any allowed size.
  'grpc.max_receive_message_length': -1,
};

/**
 * A TLS channel trusts tlsCa when given (PEM, or a provider that hands on a renewed CA: see
 * ReloadingCa), else grpc-js's default roots: the PEM file named by
 * GRPC_DEFAULT_SSL_ROOTS_FILE_PATH when that is set, otherwise Node's built-in CA list (plus
 * NODE_EXTRA_CA_CERTS).
 */
export function channelCredentials(tls: boolean, tlsCa?: TrustedCa): ChannelCredentials {
  if (!tls) return credentials.createInsecure();
  if (tlsCa === undefined || Buffer.isBuffer(tlsCa)) return credentials.createSsl(tlsCa ?? null);
  return experimental.createCertificateProviderChannelCredentials(tlsCa, null);
}

/** Target and credentials of a channel to the store; a CA asks for TLS as STORE_TLS_CA does. */
export function storeChannel(options: Pick<StoreClientOptions, 'address' | 'tlsCa'>): { target: string; credentials: ChannelCredentials } {
  const { target, tls } = resolveEndpoint(options.address, options.tlsCa ? 'tlsCa' : undefined);
  return { target, credentials: channelCredentials(tls, options.tlsCa) };
}

/** The raw generated client, for callers that need a streaming RPC of their own; `channel` adds to CHANNEL_OPTIONS. */
export function createRawClient(options: StoreClientOptions, channel: ChannelOptions = {}): SessionStoreClient {
  const store = storeChannel(options);
  return new SessionStoreClient(store.target, store.credentials, { ...CHANNEL_OPTIONS, ...channel });
}

export function authMetadata(token: string | undefined): Metadata {
  const metadata = new Metadata();
  if (token) metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

/** The shared metadata, plus `x-request-id` when the call carries one. */
export function withRequestId(metadata: Metadata, requestId: string | undefined): Metadata {
  if (!requestId) return metadata;
  const copy = metadata.clone();
  copy.set('x-request-id', requestId);
  return copy;
}

/** One unary call per operation: simple and exact; see pipe-client.ts for the batching client. */
export function createStoreClient(options: StoreClientOptions): StoreClient {
  const client = createRawClient(options);
  const metadata = authMetadata(options.token);
  const callOptions = () => ({ deadline: Date.now() + options.deadlineMs });
  const call = <Res>(name: StoreCall, invoke: (cb: (err: ServiceError | null, res?: Res) => void) => void): Promise<Res> =>
    new Promise((resolve, reject) => invoke((err, res) => (err ? reject(fromServiceError(err, name)) : resolve(res as Res))));

  return {
    async get(key, opts = {}) {
      checkArguments('get', key, opts);
      const res = await call<{ found: boolean; entry?: Entry }>('get', (cb) =>
        client.get({ key, refreshTtlMs: opts.refreshTtlMs ?? 0 }, withRequestId(metadata, opts.requestId), callOptions(), cb),
      );
      return res.found && res.entry ? res.entry : null;
    },
    async put(key, value, opts) {
      checkArguments('put', key, opts, value);
      const res = await call<{ entry?: Entry }>('put', (cb) =>
        client.put(
          { key, value, ttlMs: opts.ttlMs, expectedVersion: opts.expectedVersion },
          withRequestId(metadata, opts.requestId),
          callOptions(),
          cb,
        ),
      );
      return res.entry!;
    },
    async delete(key, opts = {}) {
      checkArguments('delete', key, opts);
      const res = await call<{ deleted: boolean }>('delete', (cb) =>
        client.delete({ key, expectedVersion: opts.expectedVersion }, withRequestId(metadata, opts.requestId), callOptions(), cb),
      );
      return res.deleted;
    },
    list(opts = {}) {
      return listEntries(client, metadata, opts);
    },
    close() {
      client.close();
    },
  };
}

/** Streams List results; a failure surfaces as a StoreClientError from the iterator. */
export async function* listEntries(
  client: SessionStoreClient,
  metadata: Metadata,
  opts: ListOptions,
  callOptions: { deadline?: number } = {},
): AsyncIterable<Entry> {
  const request: ListRequest = {
    prefix: opts.prefix ?? '',
    limit: opts.limit ?? 0,
    startAfter: opts.startAfter ?? '',
    keysOnly: opts.keysOnly ?? false,
  };
  const stream = client.list(request, metadata, callOptions);
  try {
    for await (const entry of stream as AsyncIterable<Entry>) yield entry;
  } catch (err) {
    throw fromServiceError(err as ServiceError, 'list');
  } finally {
    stream.cancel();
  }
}
