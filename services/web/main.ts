import { createPipeClient } from '../client/pipe-client';
import { createStoreClient } from '../client/store-client';
import { ConfigError } from '../shared/env';
import { createLogger } from '../shared/log';
import { createApp } from './app';
import { loadWebConfig } from './config';
import { WebMetrics } from './metrics';
import { createStoreReadiness } from './readiness';

/** Entry point: config → store client, readiness, metrics → app → listen; SIGTERM/SIGINT → close and exit. */
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
  const server = app.listen(config.port, config.host, () => {
    const address = server.address();
    const port = typeof address === 'object' && address ? address.port : config.port;
    logger.info({ host: config.host, port, store: config.store.address }, 'listening');
  });
  server.on('error', (err) => {
    process.stderr.write(`web: cannot listen on ${config.host}:${config.port}: ${err.message}\n`);
    process.exit(1);
  });
  server.keepAliveTimeout = 65_000;
  const stop = (signal: string) => {
    logger.info({ signal }, 'stopping');
    server.close(() => {
      store.close();
      readiness.close();
      process.exit(0);
    });
    server.closeIdleConnections();
    setTimeout(() => process.exit(0), 5000).unref();
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
