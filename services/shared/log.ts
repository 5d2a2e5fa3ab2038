import { createHash } from 'node:crypto';
import pino, { type Logger } from 'pino';

export type { Logger };

/**
 * One JSON line per event on stdout; human-readable when stdout is a terminal. Tests and process
 * supervisors read the JSON form.
 */
export function createLogger(name: string, level: string): Logger {
  const pretty = process.stdout.isTTY === true;
  return pino({
    name,
    level,
    base: { service: name },
    ...(pretty ? { transport: { target: 'pino-pretty', options: { translateTime: 'SYS:HH:MM:ss.l' } } } : {}),
  });
}

/** A short, stable, non-reversible label for a secret such as a session id: never log the id itself. */
export function shortHash(secret: string): string {
  return createHash('sha256').update(secret).digest('base64url').slice(0, 10);
}
