import { ServerCredentials } from '@grpc/grpc-js';
import { ConfigError } from '../shared/env';
import { createLogger } from '../shared/log';
import { SqliteBackend } from './backends/sqlite';
import { loadStoreConfig } from './config';
import { StoreHealth } from './health';
import { createStoreServer } from './server';

/** Entry point: config → backend → server → listen; SIGTERM/SIGINT → graceful stop. */
async function main(): Promise<void> {
  const config = loadStoreConfig();
  const logger = createLogger('store', config.logLevel);
  const backend = new SqliteBackend(config.sqlite);
  const server = createStoreServer({ backend, limits: config.limits, token: config.token, logger });
  const health = new StoreHealth(backend);
  health.implementation.addToServer(server);
  await health.start();
  const address = `${config.host}:${config.port}`;
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync(address, ServerCredentials.createInsecure(), (err, bound) => (err ? reject(err) : resolve(bound))),
  );
  logger.info({ host: config.host, port, backend: backend.name, dataDir: config.sqlite.dataDir }, 'listening');

  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) {
      logger.warn({ signal }, 'second signal: forcing stop');
      server.forceShutdown();
      process.exit(1);
    }
    stopping = true;
    health.stop();
    logger.info({ signal, graceMs: config.graceMs }, 'stopping');
    const force = setTimeout(() => server.forceShutdown(), config.graceMs).unref();
    server.tryShutdown(() => {
      clearTimeout(force);
      void backend.close().then(() => {
        logger.info('stopped');
        process.exit(0);
      });
    });
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

main().catch((err) => {
  const message = err instanceof ConfigError ? err.message : `cannot start: ${(err as Error).message}`;
  process.stderr.write(`store: ${message}\n`);
  process.exit(1);
});
