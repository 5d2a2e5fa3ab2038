/**
 * The storage contract every backend implements. It knows nothing of gRPC: arguments arrive
 * already checked (key and value within limits, TTL resolved to a concrete positive duration),
 * and failures are StoreErrors that the gRPC adapter maps to status codes in one table.
 */

/** One stored entry. Times are epoch milliseconds. */
export interface StoredEntry {
  key: string;
  value: Buffer;
  version: number;
  expiresAtMs: number;
  createdAtMs: number;
}

export type BackendOp =
  | { kind: 'get'; key: string; refreshTtlMs: number }
  | { kind: 'put'; key: string; value: Buffer; ttlMs: number; expectedVersion?: number }
  | { kind: 'delete'; key: string; expectedVersion?: number };

/** The result of one operation: an entry (or null) for get, the written entry for put, a boolean for delete. */
export type BackendValue = StoredEntry | null | boolean;
export type BackendResult = { ok: true; value: BackendValue } | { ok: false; error: StoreError };

export interface ListOptions {
  prefix: string;
  /** Only keys strictly greater than this one ('' = from the start). */
  startAfter: string;
  /** 0 = no limit. */
  limit: number;
  keysOnly: boolean;
  /** When aborted (the caller went away), the listing may end early instead of reading on. */
  signal?: AbortSignal;
}

export type ChangeKind = 'put' | 'delete' | 'expire';
export interface ChangeEvent {
  kind: ChangeKind;
  key: string;
  version: number;
  value: Buffer;
  expiresAtMs: number;
}

export interface WatchOptions {
  /**
   * The kinds of change the subscriber wants (default: all). A backend may skip work for the
   * others (Redis: no per-write notifications for an expire-only watcher); events of other kinds
   * may still arrive.
   */
  kinds?: readonly ChangeKind[];
  /**
   * Called, at most once, when the backend can no longer deliver every change (e.g. its change
   * feed from the database broke): the subscription has then ended and gets no more events. The
   * subscriber should list again and watch again. Without it, the backend keeps the subscription
   * and it may silently miss changes.
   */
  onError?: (error: StoreError) => void;
}

export interface Backend {
  readonly name: string;
  /** Runs operations in order; writes of one call are committed together. Never rejects for a per-op failure. */
  batch(ops: readonly BackendOp[]): Promise<BackendResult[]>;
  /** Streams live entries in ascending key order, page by page (constant memory). */
  list(options: ListOptions): AsyncIterable<StoredEntry>;
  /** Subscribes to changes of keys with the prefix; returns the unsubscribe function. */
  watch(prefix: string, onEvent: (event: ChangeEvent) => void, options?: WatchOptions): () => void;
  /** Resolves when the backend can serve; rejects with a StoreError('unavailable') when it cannot. */
  ping(): Promise<void>;
  /** Number of live (unexpired) entries, for metrics. */
  countLive(): Promise<number>;
  close(): Promise<void>;
}

export type StoreErrorKind =
  | 'invalid'
  | 'too_large'
  | 'conflict'
  | 'unavailable'
  | 'deadline'
  | 'unauthenticated'
  /**
   * The stored data is not in a state the operation can work with, and retrying will not change
   * that until someone repairs it: e.g. a key under the Redis key prefix that something other
   * than the store wrote, of another type (WRONGTYPE).
   */
  | 'failed_precondition'
  /** The backend answered an error the store cannot classify (a bug or a misconfiguration, e.g. a Redis ACL). */
  | 'internal';

/** The one domain error of the store. `kind` decides the gRPC status (see ../errors.ts). */
export class StoreError extends Error {
  override name = 'StoreError';
  /**
   * True when the operation may have been applied although it failed: it reached the database and
   * no answer came back (a Redis command sent on a connection that then broke or timed out).
   */
  readonly outcomeUnknown: boolean;
  constructor(
    readonly kind: StoreErrorKind,
    message: string,
    options: { outcomeUnknown?: boolean } = {},
  ) {
    super(message);
    this.outcomeUnknown = options.outcomeUnknown ?? false;
  }
}

let lastIssued = 0;

/**
 * The next version of a key: above the previous one, above the clock (in microsecond-sized steps)
 * and above any version this process issued before, so versions grow for a key even across
 * delete and re-create.
 */
export function nextVersion(previous: number, nowMs: number): number {
  lastIssued = Math.max(previous + 1, nowMs * 1000, lastIssued + 1);
  return lastIssued;
}

/** Makes every later version of this process greater than `version` (one read back from storage). */
export function versionsAbove(version: number): void {
  lastIssued = Math.max(lastIssued, version);
}

/** An empty value: what deletes, expiries and key-only listings carry. */
export const EMPTY_VALUE = Buffer.alloc(0);

/** The result of a compare-and-set whose expected version (0 = must not exist) is not the current one (0 = none). */
export function versionConflict(expected: number, actual: number): BackendResult {
  const detail = actual === 0 ? 'the key does not exist' : `the current version is ${actual}`;
  const wanted = expected === 0 ? 'the key must not exist yet' : `expected version ${expected}`;
  return { ok: false, error: new StoreError('conflict', `version mismatch for this key: ${wanted}, but ${detail}`) };
}

/** Convenience wrappers for callers that run one operation. */
export async function runOne(backend: Backend, op: BackendOp): Promise<BackendValue> {
  const [result] = await backend.batch([op]);
  if (!result.ok) throw result.error;
  return result.value;
}
