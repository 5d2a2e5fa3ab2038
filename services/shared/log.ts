import { createHash } from 'node:crypto';
import { writeSync } from 'node:fs';
import pino, { type Logger } from 'pino';

export type { Logger };

/**
 * One JSON line per event on stdout; human-readable when stdout is a terminal. Tests and process
 * supervisors read the JSON form.
 *
 * JSON lines are written asynchronously: a line goes out at once when stdout is free, and lines
 * logged while a write is still in flight go out together in the next write(2), instead of one
 * system call per request line (measured: ~7% of the web's CPU per page under load). pino
 * registers a synchronous flush of what is pending on process exit; a SIGKILL skips it and can
 * lose the last few milliseconds of lines.
 */
export function createLogger(name: string, level: string): Logger {
  const options = { name, level, base: { service: name } };
  if (process.stdout.isTTY === true) {
    return pino({ ...options, transport: { target: 'pino-pretty', options: { translateTime: 'SYS:HH:MM:ss.l' } } });
  }
  const destination = pino.destination({ dest: 1, sync: false });
  destination.flushSync = flushSyncUnlessGone;
  return pino(options, destination);
}

/** What sonic-boom 4 (pino.destination) holds of the lines not written yet. */
interface Pending {
  fd: number;
  _writing: boolean;
  _writingBuf: string | Buffer;
  _bufs: (string | Buffer)[];
}

/**
 * pino writes the lines still held at exit with sonic-boom's flushSync, which retries a failed
 * write every 100 ms until it succeeds, whatever the error (sonic-boom 4). When whoever read stdout is
 * gone (foreman killed, a closed terminal) while lines waited for it, every write fails with EPIPE:
 * the exiting process never ended, an orphan retrying ten times a second. Here a write that fails
 * for any other reason ends the flush: those lines have no reader. A reader that is only slow
 * (EAGAIN) is still waited for, but, as with sonic-boom's own flush, not for the chunk whose
 * write was in flight when the process began to exit: that chunk is lost.
 */
function flushSyncUnlessGone(this: Pending): void {
  // A write in flight (_writing) is the event loop's, which runs no more: as sonic-boom, skip it.
  let data = Buffer.concat([...(this._writing ? [] : [this._writingBuf]), ...this._bufs].map((piece) => Buffer.from(piece)));
  this._writingBuf = '';
  this._bufs = [];
  while (data.length > 0) {
    try {
      data = data.subarray(writeSync(this.fd, data));
    } catch (err) {
      const { code } = err as NodeJS.ErrnoException;
      if (code !== 'EAGAIN' && code !== 'EBUSY') return;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 100);
    }
  }
}

/** A short, stable, non-reversible label for a secret such as a session id: never log the id itself. */
export function shortHash(secret: string): string {
  return createHash('sha256').update(secret).digest('base64url').slice(0, 10);
}

/**
 * Calls fn at most `max` times per window of `windowMs`: for log lines that a misbehaving client or
 * an outage could otherwise repeat once per request. The next call let through after a window
 * reports how many were dropped (`suppressed`).
 */
export function rateLimited<C, A>(max: number, windowMs: number, fn: (ctx: C, arg: A, suppressed: number) => void): (ctx: C, arg: A) => void {
  let windowStart = 0;
  let used = 0;
  let suppressed = 0;
  return (ctx: C, arg: A) => {
    const now = Date.now();
    if (now - windowStart >= windowMs) {
      windowStart = now;
      used = 0;
    }
    if (used >= max) {
      suppressed += 1;
      return;
    }
    used += 1;
    fn(ctx, arg, suppressed);
    suppressed = 0;
  };
}

/**
 * Node's process warnings (deprecations, MaxListenersExceededWarning, ...) as log lines instead of
 * free text on stderr, which log collectors reading JSON lines would garble. DEP0123 comes from
 * grpc-js passing an IP address as the TLS server name (a store reached over TLS at 127.0.0.1):
 * nothing an operator can change, so it is logged at debug.
 */
export function logProcessWarnings(logger: Logger): void {
  process.removeAllListeners('warning');
  process.on('warning', (warning: Error & { code?: string }) => {
    logger[warning.code === 'DEP0123' ? 'debug' : 'warn']({ warning: warning.name, code: warning.code }, warning.message);
  });
}
