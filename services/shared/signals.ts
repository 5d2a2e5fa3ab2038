/** A stop signal this soon after the first is part of the same request to stop. */
const SAME_REQUEST_MS = 1000;

/**
 * Calls `stop` on the first SIGTERM or SIGINT, and `now` on one that comes SAME_REQUEST_MS or more
 * after it (someone insisting). A Ctrl-C on `npm start` reaches each process twice at once: from
 * the terminal, which signals the whole foreground process group, and from foreman, which forwards
 * it. Taken as two requests, the first Ctrl-C would skip the graceful stop.
 */
export function onStopSignals(stop: (signal: NodeJS.Signals) => void, now: (signal: NodeJS.Signals) => void): void {
  let firstAt: number | undefined;
  const handle = (signal: NodeJS.Signals) => {
    if (firstAt === undefined) {
      firstAt = Date.now();
      stop(signal);
    } else if (Date.now() - firstAt >= SAME_REQUEST_MS) {
      now(signal);
    }
  };
  process.on('SIGTERM', handle);
  process.on('SIGINT', handle);
}
