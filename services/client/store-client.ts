import {
  type ChannelCredentials,
  type ChannelOptions,
  credentials,
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
  /** TLS: PEM of the CA that signed the store's certificate; asks for TLS on a bare host:port. */
  tlsCa?: Buffer;
}

export type StoreErrorKind = 'conflict' | 'unavailable' | 'invalid' | 'unauthenticated' | 'other';

/** The one error type of the client: `kind` says what the caller can do about it. */
export class StoreClientError extends Error {
  override name = 'StoreClientError';
  constructor(
    readonly kind: StoreErrorKind,
    readonly code: status,
    message: string,
  ) {
    super(message);
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

export function toClientError(code: status, details: string): StoreClientError {
  return new StoreClientError(KIND_BY_CODE[code] ?? 'other', code, details || status[code]);
}

export function fromServiceError(err: ServiceError): StoreClientError {
  return toClientError(err.code ?? status.UNKNOWN, err.details ?? err.message);
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
  'grpc.keepalive_time_ms': 30_000,
  'grpc.keepalive_timeout_ms': 10_000,
  'grpc.keepalive_permit_without_calls': 0,
};

/**
 * A TLS channel trusts tlsCa when given, else grpc-js's default roots: the PEM file named by
 * GRPC_DEFAULT_SSL_ROOTS_FILE_PATH when that is set, otherwise Node's built-in CA list (plus
 * NODE_EXTRA_CA_CERTS).
 */
export function channelCredentials(tls: boolean, tlsCa?: Buffer): ChannelCredentials {
  return tls ? credentials.createSsl(tlsCa ?? null) : credentials.createInsecure();
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
  const call = <Res>(invoke: (cb: (err: ServiceError | null, res?: Res) => void) => void): Promise<Res> =>
    new Promise((resolve, reject) => invoke((err, res) => (err ? reject(fromServiceError(err)) : resolve(res as Res))));

  return {
    async get(key, opts = {}) {
      const res = await call<{ found: boolean; entry?: Entry }>((cb) =>
        client.get({ key, refreshTtlMs: opts.refreshTtlMs ?? 0 }, withRequestId(metadata, opts.requestId), callOptions(), cb),
      );
      return res.found && res.entry ? res.entry : null;
    },
    async put(key, value, opts) {
      const res = await call<{ entry?: Entry }>((cb) =>
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
      const res = await call<{ deleted: boolean }>((cb) =>
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
    throw fromServiceError(err as ServiceError);
  } finally {
    stream.cancel();
  }
}
