/**
 * How much of a client's drift between its monotonic clock and the store's the baseline follows:
 * it may rise by this many ms per ms of the store's clock between batches. Clocks of two hosts
 * without time sync drift apart by up to about 0.1 ms/s; a baseline that never rose would, after
 * hours, find every batch of a client with the slower clock late. A freeze of a few seconds moves
 * it by a few ms.
 */
const DRIFT_ALLOWANCE = 0.001;

/** A batch's lateness in ms, from when the store read it and the client's clock when it was written. */
export type LatenessMeter = (readAt: number, clientClockMs: number) => number;

/**
 * Measures, for the batches of one Pipe stream, how late each was read compared with the fastest
 * one: time it waited in socket buffers while the store was frozen or its event loop was blocked.
 *
 * The difference (store clock when read − client clock when written) of two monotonic clocks is
 * a constant plus the batch's time in transit, so the smallest difference seen is the baseline and
 * a batch's lateness is its difference minus the baseline: never negative (the baseline is
 * updated first), never more than the time it really spent on the way. The first batch only sets
 * the baseline.
 *
 * Call it with each batch in the order the stream read them.
 */
export function createLatenessMeter(): LatenessMeter {
  let baseline = Infinity;
  let baselineAt = 0;
  return (readAt, clientClockMs) => {
    const difference = readAt - clientClockMs;
    baseline = Math.min(baseline + (readAt - baselineAt) * DRIFT_ALLOWANCE, difference);
    baselineAt = readAt;
    return difference - baseline;
  };
}
