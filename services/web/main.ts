import { createServer, type ServerResponse } from 'node:http';
import { createPipeClient } from '../client/pipe-client';
import { createStoreClient } from '../client/store-client';
import { ConfigError } from '../shared/env';
import { createLogger } from '../shared/log';
import { createApp } from './app';
import { loadWebConfig } from './config';
import { WebMetrics } from './metrics';
import { createStoreReadiness } from './readiness';

/** Entry point: config → store client, readiness, metrics → app → listen; SIGTERM/SIGINT → finish the responses in flight and exit. */
function main(): void {
  const config = loadWebConfig();
  const logger = createLogger('web', config.logLevel);
  // The pipe batches every store call of one event-loop turn into one message; unary is the plain baseline.
  const store = config.store.transport === 'pipe' ? createPipeClient(config.store) : createStoreClient(config.store);
  // Same address and TLS as the store client (a plaintext check of a TLS store never succeeds);
  // no token: grpc.health.v1 answers without one.
  const readiness = createStoreReadiness({ address: config.store.address, tlsCa: config.store.tlsCa, timeoutMs: config.store.deadlineMs });
  const metrics = new WebMetrics();
  const app = createApp({ store, session: config.session, logger, trustProxy: config.trustProxy, metrics, readiness });
  // Responses not yet finished, so a graceful stop knows what it waits for and can tell each one
  // to close its connection.
  const inFlight = new Set<ServerResponse>();
  let stopping = false;
  const handle = app.callback();
  const server = createServer((req, res) => {
    inFlight.add(res);
    res.once('close', () => {
      inFlight.delete(res);
      // A response that began with keep-alive before the stop leaves its connection idle: close it
      // now, or server.close() would wait for the client to hang up.
      if (stopping) server.closeIdleConnections();
    });
    // A request read on a kept-alive connection after the stop is still answered, but its
    // connection is closed after it, so the client does not send another one to a process that exits.
    if (stopping) res.shouldKeepAlive = false;
    void handle(req, res);
  });
  server.listen(config.port, config.host, () => {
    const address = server.address();
    const port = typeof address === 'object' && address ? address.port : config.port;
    logger.info({ host: config.host, port, store: config.store.address }, 'listening');
  });
  server.on('error', (err) => {
    process.stderr.write(`web: cannot listen on ${config.host}:${config.port}: ${err.message}\n`);
    process.exit(1);
  });
  server.keepAliveTimeout = 65_000;
  // A page makes a store read and a write, each up to STORE_DEADLINE_MS: a response in flight at
  // the stop normally ends well within this; only a stuck one is cut off.
  const graceMs = 2 * config.store.deadlineMs + 5000;
  const stop = (signal: string) => {
    logger.info({ signal, inFlight: inFlight.size }, 'stopping');
    stopping = true;
    // Responses whose headers are not out yet say Connection: close and close their connection
    // when done; idle connections are closed now. Then the server's close callback runs as soon
    // as the last response is done.
    for (const res of inFlight) if (!res.headersSent) res.shouldKeepAlive = false;
    server.close(() => {
      store.close();
      readiness.close();
      process.exit(0);
    });
    server.closeIdleConnections();
    setTimeout(() => {
      logger.error({ graceMs, inFlight: inFlight.size }, 'stopping: responses still in flight after the grace period, exiting without them');
      process.exit(1);
    }, graceMs).unref();
  };
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));
}

try {
  main();
} catch (err) {
  const message = err instanceof ConfigError ? err.message : `cannot start: ${(err as Error).message}`;
  process.stderr.write(`web: ${message}\n`);
  process.exit(1);
}
