import type { DeleteRequest, GetRequest, ListRequest, Op, PutRequest } from '../generated/kv';
import { type BackendOp, type ListOptions, StoreError } from './backends/backend';

/** Limits applied to every request before any storage call. */
export interface Limits {
  maxKeyBytes: number;
  maxValueBytes: number;
  defaultTtlMs: number;
  maxTtlMs: number;
  maxBatchOps: number;
}

function invalid(message: string): never {
  throw new StoreError('invalid', message);
}

export function checkKey(key: string, field: string, limits: Limits): string {
  if (typeof key !== 'string' || key.length === 0) invalid(`${field} must not be empty`);
  const bytes = Buffer.byteLength(key, 'utf8');
  if (bytes > limits.maxKeyBytes) {
    throw new StoreError('too_large', `${field} is ${bytes} bytes, over the limit of ${limits.maxKeyBytes} bytes (STORE_MAX_KEY_BYTES)`);
  }
  return key;
}

function checkOptionalKey(key: string, field: string, limits: Limits): string {
  return key === '' ? '' : checkKey(key, field, limits);
}

function checkVersion(version: number | undefined, field: string): number | undefined {
  if (version === undefined) return undefined;
  if (!Number.isSafeInteger(version) || version < 0) invalid(`${field} must be a non-negative integer`);
  return version;
}

/** 0 means the default; negative or above the maximum TTL is refused. */
export function checkTtl(ttlMs: number, field: string, limits: Limits): number {
  if (!Number.isSafeInteger(ttlMs) || ttlMs < 0) invalid(`${field} must be a non-negative number of milliseconds`);
  if (ttlMs > limits.maxTtlMs) invalid(`${field} ${ttlMs} is above the maximum TTL of ${limits.maxTtlMs} ms (STORE_MAX_TTL_MS)`);
  return ttlMs === 0 ? limits.defaultTtlMs : ttlMs;
}

function checkRefresh(ttlMs: number, limits: Limits): number {
  if (!Number.isSafeInteger(ttlMs) || ttlMs < 0) invalid('refresh_ttl_ms must be a non-negative number of milliseconds');
  if (ttlMs > limits.maxTtlMs) invalid(`refresh_ttl_ms ${ttlMs} is above the maximum TTL of ${limits.maxTtlMs} ms (STORE_MAX_TTL_MS)`);
  return ttlMs;
}

export function checkGet(req: GetRequest, limits: Limits): BackendOp {
  return { kind: 'get', key: checkKey(req.key, 'key', limits), refreshTtlMs: checkRefresh(req.refreshTtlMs, limits) };
}

export function checkPut(req: PutRequest, limits: Limits): BackendOp {
  const key = checkKey(req.key, 'key', limits);
  const value = req.value ?? Buffer.alloc(0);
  if (value.length > limits.maxValueBytes) {
    throw new StoreError('too_large', `value is ${value.length} bytes, over the limit of ${limits.maxValueBytes} bytes (STORE_MAX_VALUE_BYTES)`);
  }
  return {
    kind: 'put',
    key,
    value,
    ttlMs: checkTtl(req.ttlMs, 'ttl_ms', limits),
    expectedVersion: checkVersion(req.expectedVersion, 'expected_version'),
  };
}

export function checkDelete(req: DeleteRequest, limits: Limits): BackendOp {
  return { kind: 'delete', key: checkKey(req.key, 'key', limits), expectedVersion: checkVersion(req.expectedVersion, 'expected_version') };
}

export function checkOp(op: Op, limits: Limits): BackendOp {
  // 0 means no limit; a negative timeout is a mistake, not "no limit".
  if (!Number.isSafeInteger(op.timeoutMs) || op.timeoutMs < 0) invalid('timeout_ms must be a non-negative number of milliseconds');
  switch (op.op?.$case) {
    case 'get':
      return checkGet(op.op.value, limits);
    case 'put':
      return checkPut(op.op.value, limits);
    case 'delete':
      return checkDelete(op.op.value, limits);
    default:
      return invalid('op must set one of get, put or delete');
  }
}

/** A batch's client_clock_ms: unset (undefined) is allowed; set, it must be a finite, non-negative number. */
export function checkClientClock(clientClockMs: number | undefined): number | undefined {
  if (clientClockMs === undefined) return undefined;
  if (!Number.isFinite(clientClockMs) || clientClockMs < 0) invalid('client_clock_ms must be a finite, non-negative number of milliseconds');
  return clientClockMs;
}

export function checkBatchSize(count: number, limits: Limits): void {
  if (count > limits.maxBatchOps) {
    throw new StoreError('too_large', `batch has ${count} operations, over the limit of ${limits.maxBatchOps} (STORE_MAX_BATCH_OPS)`);
  }
}

export function checkList(req: ListRequest, limits: Limits): ListOptions {
  return {
    prefix: checkOptionalKey(req.prefix, 'prefix', limits),
    startAfter: checkOptionalKey(req.startAfter, 'start_after', limits),
    limit: req.limit,
    keysOnly: req.keysOnly,
  };
}

export function checkPrefix(prefix: string, limits: Limits): string {
  return checkOptionalKey(prefix, 'prefix', limits);
}
