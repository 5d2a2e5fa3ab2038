import { setMaxListeners } from 'node:events';
import type { Server } from '@grpc/grpc-js';
import { ConfigError, listenVariables } from '../shared/env';
import { createLogger, type Logger, logProcessWarnings } from '../shared/log';
import { onStopSignals } from '../shared/signals';
import { SqliteBackend, type SqliteOptions } from './backends/sqlite';
import { loadStoreConfig } from './config';
import { StoreHealth } from './health';
import { serveMetrics, StoreMetrics } from './metrics';
import { addReflection } from './reflection';
import { createStoreServer } from './server';
import { createRpcObserver } from './telemetry';
import { ReloadingCertificate } from './tls-certificate';
import { bindServer, storeCredentials, storeServerOptions } from './transport';

/**
 * Entry point: config → backend → server → listen. The first SIGTERM/SIGINT stops gracefully
 * (NOT_SERVING, no new calls, in-flight calls get STORE_GRACE_MS, database closed, exit 0); a
 * second one stops at once (exit 1).
 */
async function main(): Promise<void> {
  const config = loadStoreConfig();
  // The database holds every session: the files the store creates are its user's alone (SQLite
  // makes them 0644 under the usual umask), so another user of the machine cannot read past
  // STORE_TOKEN. Set after the config made the data directory (0700), so that its missing parents,
  // which other files and users may share, get the usual mode.
  process.umask(0o077);
  const logger = createLogger('store', config.logLevel);
  logProcessWarnings(logger);
  for (const warning of config.warnings) logger.warn(warning);
  // ioredis is loaded only when used: a SQLite store starts without it.
  const backend =
    config.backend === 'redis'
      ? new (await import('./backends/redis.js')).RedisBackend({ ...config.redis, log: logger })
      : openSqlite(config.sqlite, logger);
  const metrics = new StoreMetrics(backend);
  const stopping = new AbortController();
  // Every open Watch and Pipe stream listens for the stop (one Pipe per web process, one Watch per
  // bin/dump --watch): more than Node's default 10 is normal, not a leak, and must not log a warning.
  setMaxListeners(0, stopping.signal);
  const server = createStoreServer(
    {
      backend: metrics.instrument(backend),
      limits: config.limits,
      token: config.token,
      logger,
      observe: createRpcObserver(logger, metrics),
      stopping: stopping.signal,
      maxAnswerBytes: config.maxMessageBytes,
    },
    storeServerOptions(config.maxMessageBytes),
  );
  const health = new StoreHealth(backend);
  health.addToServer(server);
  addReflection(server);
  await health.start();

  // STORE_HOST may be an IPv6 address, bare (::1) or as in host:port ([::1]): Node listens on the
  // bare one, gRPC binds host:port, which needs the brackets.
  const host = config.host.replace(/^\[(.*)\]$/, '$1');
  const metricsServer = await serveMetrics(metrics.registry, host, config.metricsPort);
  logger.info({ host: config.host, port: metricsServer.port, path: '/metrics' }, 'metrics listening');
  const certificate = config.tls
    ? new ReloadingCertificate({ cert: config.tls.certFile, key: config.tls.keyFile }, config.tls, {
        intervalMs: config.tls.reloadMs,
        logger,
        onLoaded: (info) => metrics.observeCertificate(info.notAfter),
      })
    : undefined;
  const port = await bind(server, `${host.includes(':') ? `[${host}]` : host}:${config.port}`, certificate, logger);

  let exitCode = 0;
  let force: NodeJS.Timeout | undefined;
  let finished = false;
  /** Closes the database and exits; runs once, whichever way the stop ends. */
  const finish = () => {
    if (finished) return;
    finished = true;
    clearTimeout(force);
    metrics.close();
    metricsServer.server.close();
    void backend.close().then(() => {
      logger.info({ exitCode }, 'stopped');
      process.exit(exitCode);
    });
  };
  const stop = (signal: string) => {
    logger.info({ signal, graceMs: config.graceMs }, 'stopping: NOT_SERVING, no new calls, finishing the calls in flight');
    health.stop();
    stopping.abort();
    force = setTimeout(() => {
      logger.warn({ graceMs: config.graceMs }, 'grace period over: cancelling the calls still in flight');
      server.forceShutdown();
      finish();
    }, config.graceMs);
    server.tryShutdown(finish);
  };
  onStopSignals(stop, (signal) => {
    logger.warn({ signal }, 'second signal: stopping now, cancelling calls in flight');
    exitCode = 1;
    server.forceShutdown();
    finish();
  });
  // Only now: whoever reads this line may signal at once, and before the handlers above a signal
  // would kill the process outright.
  logger.info(
    {
      host: config.host,
      port,
      backend: backend.name,
      // The effective settings: where the data is and how it is kept (SQLite: the directory, durability and
      // sweeper; Redis: the topology and prefix, never the URL, which may hold a password), and the limits.
      ...(config.backend === 'redis'
        ? {
            redis: config.redis.clusterNodes.length > 0 ? 'cluster' : config.redis.sentinels.length > 0 ? 'sentinel' : 'single',
            keyPrefix: config.redis.keyPrefix,
            commandTimeoutMs: config.redis.commandTimeoutMs,
          }
        : {
            dataDir: config.sqlite.dataDir,
            synchronous: config.sqlite.synchronous,
            maxEntries: config.sqlite.maxEntries,
            sweepIntervalMs: config.sqlite.sweepIntervalMs,
            sweepBatch: config.sqlite.sweepBatch,
          }),
      tls: Boolean(config.tls),
      auth: Boolean(config.token),
      limits: config.limits,
      maxMessageBytes: config.maxMessageBytes,
      graceMs: config.graceMs,
    },
    'listening',
  );
}

/**
 * Opens the SQLite backend, which rebuilds its index from the log before the port opens (2-3 s
 * per million log rows): the line says how long a start takes, and a large log shows why.
 */
function openSqlite(options: SqliteOptions, logger: Logger): SqliteBackend {
  const backend = new SqliteBackend(options);
  logger.info({ dataDir: options.dataDir, ...backend.rebuilt }, 'index rebuilt from the log');
  return backend;
}

function bind(server: Server, address: string, certificate: ReloadingCertificate | undefined, logger: Logger): Promise<number> {
  return bindServer(server, address, storeCredentials(certificate), logger).catch((err: NodeJS.ErrnoException) => {
    throw new Error(`cannot listen on ${address} (${listenVariables(err.code, 'PORT', 'STORE_HOST')}): ${err.message}`);
  });
}

main().catch((err) => {
  const message = err instanceof ConfigError ? err.message : `cannot start: ${(err as Error).message}`;
  process.stderr.write(`store: ${message}\n`);
  process.exit(1);
});
