import type { ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';

/** True when nothing listens on the loopback port. */
export function isFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/**
 * A base port P with every P + offset free (foreman gives its n-th process P + 100·n). Drawn below
 * Linux's ephemeral range (32768+), so an outgoing connection cannot take one meanwhile.
 */
export async function freeBasePort(offsets: readonly number[]): Promise<number> {
  const span = Math.max(...offsets);
  for (let attempt = 0; attempt < 50; attempt += 1) {
    const base = 10_000 + Math.floor(Math.random() * (22_000 - span));
    const free = await Promise.all(offsets.map((offset) => isFree(base + offset)));
    if (free.every(Boolean)) return base;
  }
  throw new Error('no free set of ports found');
}

/**
 * Stops a foreman (nf or Ruby's) left running by a test that failed halfway the way a user would,
 * with the signal it passes on to its processes: a SIGKILL alone would orphan the web and store it
 * started, which then keep their ports. SIGKILL only if it has not exited after graceMs.
 */
export async function stopForeman(child: ChildProcess | undefined, signal: NodeJS.Signals, graceMs = 15_000): Promise<void> {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  child.kill(signal);
  let timer: NodeJS.Timeout | undefined;
  const stopped = await Promise.race([exited(child).then(() => true), new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), graceMs)))]);
  clearTimeout(timer);
  if (!stopped) {
    child.kill('SIGKILL');
    await exited(child);
  }
}

/** Resolves with the exit code once the child has exited (at once if it already has). */
export function exited(child: ChildProcess): Promise<number | null> {
  return child.exitCode !== null ? Promise.resolve(child.exitCode) : new Promise((r) => child.once('exit', (code) => r(code)));
}
