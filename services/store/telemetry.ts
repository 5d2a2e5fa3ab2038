import { performance } from 'node:perf_hooks';
import { type Metadata, status } from '@grpc/grpc-js';
import type { Op, OpResult } from '../generated/kv';
import { type Logger, rateLimited } from '../shared/log';
import type { RpcMethod, StoreMetrics } from './metrics';

export type { RpcMethod };

/**
 * Called once per finished call (once per batch on a Pipe stream). `startedAt` is a
 * performance.now() reading; `metadata` carries the call's x-request-id; `ops` are the
 * operations of a Batch call or Pipe batch, which carry their own request ids; `results` are their
 * answers when the batch ran (each operation succeeds or fails on its own inside an OK batch);
 * `details` is the message of a call that failed as a whole. `code` is the one the client got: a call
 * it cancelled or whose deadline passed is CANCELLED or DEADLINE_EXCEEDED, whatever the backend did.
 */
export type RpcObserver = (
  method: RpcMethod,
  code: status,
  startedAt: number,
  metadata: Metadata,
  ops?: readonly Op[],
  results?: readonly OpResult[],
  details?: string,
) => void;

/**
 * One log line and one metrics sample per call. Successful calls (and the routine ABORTED of a
 * compare-and-set and CANCELLED of a client that hung up) log at debug, since at info they would
 * be one line per page view; refused calls log at info, UNAUTHENTICATED and UNAVAILABLE at warn,
 * INTERNAL and UNKNOWN at error. A batch (Batch call, Pipe batch) is one call whose operations
 * fail on their own: its line has the level of its worst operation and counts the failed ones by
 * code (`failed`), and they are counted in store_batch_op_failures_total, so a Redis outage or a
 * full store shows in the log and the metrics whether the client batches or not. A failure's line
 * says why (`error`: the call's message, or a batch's first failed operation's), so a full or
 * read-only disk is named in the store's own log, not only in its callers'. Nothing is
 * formatted when the level is off. Lines at info and above are limited to 10 per 10 s for each
 * method and code; metrics count every call.
 */
export function createRpcObserver(logger: Logger, metrics: StoreMetrics): RpcObserver {
  // Lines at info and above, per method and code: a client with a wrong token or bad requests, or
  // a Redis outage, would otherwise log one line per call, hundreds a second.
  const limited = new Map<string, (line: Record<string, unknown>, level: 'info' | 'warn' | 'error') => void>();
  const write = (key: string, line: Record<string, unknown>, level: 'info' | 'warn' | 'error') => {
    let emit = limited.get(key);
    if (!emit) {
      if (limited.size >= 256) limited.clear(); // batches' mixes of failed codes: keep the map small
      emit = rateLimited(LOGGED_PER_WINDOW, LOG_WINDOW_MS, (l: Record<string, unknown>, lvl: 'info' | 'warn' | 'error', suppressed: number) =>
        logger[lvl](suppressed > 0 ? { ...l, suppressed } : l, 'rpc'),
      );
      limited.set(key, emit);
    }
    emit(line, level);
  };
  return (method, code, startedAt, metadata, ops, results, details) => {
    const ms = performance.now() - startedAt;
    metrics.recordRpc(method, code, ms / 1000, ops?.length);
    let level = levelOf(code);
    let failed: Record<string, number> | undefined;
    let error = code === status.OK ? undefined : details;
    if (results) {
      for (const result of results) {
        if (result.code === status.OK) continue;
        error ??= result.message;
        metrics.recordOpFailure(method, result.code);
        const name = status[result.code] ?? String(result.code);
        failed ??= {};
        failed[name] = (failed[name] ?? 0) + 1;
        const opLevel = levelOf(result.code);
        if (SEVERITY[opLevel] > SEVERITY[level]) level = opLevel;
      }
    }
    if (!logger.isLevelEnabled(level)) return;
    const line: Record<string, unknown> = { method, code: status[code] ?? code, ms: Math.round(ms * 100) / 100 };
    if (failed) line.failed = failed;
    if (error) line.error = error.slice(0, MAX_LOGGED_ERROR);
    const requestId = requestIdOf(metadata);
    if (requestId) line.requestId = requestId;
    if (ops) {
      line.ops = ops.length;
      const ids = [...new Set(ops.map((op) => op.requestId.slice(0, 128)).filter(Boolean))];
      if (ids.length === 1) line.requestId = ids[0];
      else if (ids.length > 1) line.requestIds = ids.slice(0, MAX_LOGGED_IDS);
      if (ids.length > MAX_LOGGED_IDS) line.moreRequestIds = ids.length - MAX_LOGGED_IDS;
    }
    if (level === 'debug') logger.debug(line, 'rpc');
    else write(`${method} ${String(line.code)}${failed ? ` ${Object.keys(failed).sort().join(',')}` : ''}`, line, level);
  };
}

/** Lines at info and above that one method and code may log per window; the next one after it counts the dropped ones in `suppressed`. */
const LOGGED_PER_WINDOW = 10;
const LOG_WINDOW_MS = 10_000;

/**
 * Request ids a batch's line lists at most: a batch of 1000 operations with ids of their own (or a
 * 4 MiB one refused for having too many) would otherwise be a line of up to megabytes.
 */
const MAX_LOGGED_IDS = 20;

/** Characters of a failure's message a line holds at most (a decoding error can quote much). */
const MAX_LOGGED_ERROR = 300;

const SEVERITY = { debug: 0, info: 1, warn: 2, error: 3 } as const;

function levelOf(code: status): 'debug' | 'info' | 'warn' | 'error' {
  switch (code) {
    case status.OK:
    case status.ABORTED:
    case status.CANCELLED:
      return 'debug';
    case status.UNAUTHENTICATED:
    case status.UNAVAILABLE:
      return 'warn';
    case status.INTERNAL:
    case status.UNKNOWN:
      return 'error';
    default:
      return 'info';
  }
}

/** The x-request-id metadata of a call, if any (bounded, so a client cannot flood the logs). */
function requestIdOf(metadata: Metadata): string | undefined {
  const value = metadata.get('x-request-id')[0];
  return typeof value === 'string' && value.length > 0 ? value.slice(0, 128) : undefined;
}
