import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Writable } from 'node:stream';
import type Koa from 'koa';
import pino from 'pino';
import { createStoreClient, type StoreClient } from '../../services/client/store-client';
import type { Logger } from '../../services/shared/log';
import type { SessionBackend } from '../../services/web/session';
import { type Proc, startStore, tempDir } from './procs';

/** Serves a Koa app (built by createApp or from the session middleware) on 127.0.0.1 port 0. */
export async function serveApp(app: Koa): Promise<{ base: string; server: Server; close(): Promise<void> }> {
  const server = createServer(app.callback());
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  return {
    base: `http://127.0.0.1:${port}`,
    server,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

export interface StoreCall {
  method: 'get' | 'put' | 'delete';
  key: string;
  requestId?: string;
}

/** The real store client, with every call recorded (method, key, request id): for "made no store call" assertions. */
export function countingStore(inner: SessionBackend): SessionBackend & { calls: StoreCall[] } {
  const calls: StoreCall[] = [];
  return {
    calls,
    get: (key, options) => {
      calls.push({ method: 'get', key, requestId: options?.requestId });
      return inner.get(key, options);
    },
    put: (key, value, options) => {
      calls.push({ method: 'put', key, requestId: options.requestId });
      return inner.put(key, value, options);
    },
    delete: (key, options) => {
      calls.push({ method: 'delete', key, requestId: options?.requestId });
      return inner.delete(key, options);
    },
  };
}

/** A pino logger whose JSON lines are kept in memory. */
export function memoryLogger(level = 'debug'): { logger: Logger; lines: string[]; entries(): Array<Record<string, unknown>> } {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString('utf8').split('\n')) if (line) lines.push(line);
      done();
    },
  });
  const logger = pino({ level, base: { service: 'web' } }, sink);
  return { logger, lines, entries: () => lines.map((l) => JSON.parse(l) as Record<string, unknown>) };
}

/** A real store process on a temp directory, and a real client for it. */
export async function startStoreWithClient(
  env: Record<string, string> = {},
): Promise<{ proc: Proc; client: StoreClient; address: string; dir: string; stop(): Promise<void> }> {
  const tmp = tempDir();
  // NORMAL: durability is not what these tests are about, and fsync per commit would dominate their time.
  const proc = await startStore(tmp.dir, { STORE_SYNCHRONOUS: 'NORMAL', ...env });
  const address = `127.0.0.1:${proc.port}`;
  const client = createStoreClient({ address, deadlineMs: 2000 });
  return {
    proc,
    client,
    address,
    dir: tmp.dir,
    stop: async () => {
      client.close();
      await proc.stop();
      tmp.remove();
    },
  };
}

/** The `<id>` part of a signed cookie value `<id>.<mac>`. */
export function idOf(cookieValue: string | undefined): string {
  return (cookieValue ?? '').split('.')[0];
}

/** Polls until fn returns true or the time is up (for readiness flips; no fixed sleeps). */
export async function waitFor(what: string, fn: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await fn()) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
}
