import { status, type ServiceError, Metadata } from '@grpc/grpc-js';
import { StoreError, type StoreErrorKind } from './backends/backend';

/** The one table from domain error to gRPC status. Anything else is INTERNAL with no detail. */
const CODES: Record<StoreErrorKind, status> = {
  invalid: status.INVALID_ARGUMENT,
  too_large: status.RESOURCE_EXHAUSTED,
  conflict: status.ABORTED,
  unavailable: status.UNAVAILABLE,
  deadline: status.DEADLINE_EXCEEDED,
  unauthenticated: status.UNAUTHENTICATED,
  failed_precondition: status.FAILED_PRECONDITION,
  internal: status.INTERNAL,
};

export interface MappedStatus {
  code: status;
  details: string;
  /** The operation may have been applied (see StoreError.outcomeUnknown). */
  outcomeUnknown: boolean;
}

/** Trailing metadata of a unary call that failed with an unknown outcome (OpResult.outcome_unknown in batches). */
export const OUTCOME_UNKNOWN_KEY = 'outcome-unknown';

/** Maps any thrown value to a status; unexpected errors never leak their message to the client. */
export function toStatus(err: unknown): MappedStatus {
  if (err instanceof StoreError) return { code: CODES[err.kind], details: err.message, outcomeUnknown: err.outcomeUnknown };
  return { code: status.INTERNAL, details: 'internal error', outcomeUnknown: false };
}

export function toServiceError(err: unknown): Partial<ServiceError> {
  const mapped = toStatus(err);
  const metadata = new Metadata();
  if (mapped.outcomeUnknown) metadata.set(OUTCOME_UNKNOWN_KEY, '1');
  return { code: mapped.code, details: mapped.details, metadata };
}
