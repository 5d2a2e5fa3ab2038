import { createPipeClient } from '../client/pipe-client';
import { ReloadingCa } from '../client/reloading-ca';
import { createStoreClient, resolveEndpoint } from '../client/store-client';
import { ConfigError, listenVariables } from '../shared/env';
import { createLogger, logProcessWarnings } from '../shared/log';
import { onStopSignals } from '../shared/signals';
import { createApp, refusalResponses } from './app';
import { createWebServer } from './http-server';
import { loadWebConfig } from './config';
import { WebMetrics } from './metrics';
import { createStoreReadiness } from './readiness';

/** Entry point: config → store client, readiness, metrics → app → listen; SIGTERM/SIGINT → finish the responses in flight and exit. */
function main(): void {
  const config = loadWebConfig();
  const logger = createLogger('web', config.logLevel);
  logProcessWarnings(logger);
  for (const warning of config.warnings) logger.warn(warning);
  const metrics = new WebMetrics();
  // One CA provider for both channels to the store (calls and readiness): a renewed STORE_TLS_CA
  // is trusted by new connections without a restart.
  const tlsCa =
    config.store.tlsCa && new ReloadingCa('STORE_TLS_CA', config.store.tlsCa.file, config.store.tlsCa.pem, { intervalMs: config.store.tlsReloadMs, logger });
  const storeOptions = { address: config.store.address, token: config.store.token, deadlineMs: config.store.deadlineMs, tlsCa };
  // The pipe batches every store call of one event-loop turn into one message; unary is the plain baseline.
  const store =
    config.store.transport === 'pipe'
      ? createPipeClient({ ...storeOptions, onBreak: (reason) => metrics.observePipeBreak(reason) })
      : createStoreClient(storeOptions);
  // Same address and TLS as the store client (a plaintext check of a TLS store never succeeds);
  // no token: grpc.health.v1 answers without one.
  // The probe asks through the store client itself whether the store accepts its token and TTL.
  const readiness = createStoreReadiness({
    address: config.store.address,
    tlsCa,
    timeoutMs: config.store.deadlineMs,
    probe: { store, ttlMs: config.session.idleTtlMs },
    logger,
  });
  const app = createApp({ store, session: config.session, logger, trustProxy: config.trustProxy, hstsMaxAgeS: config.hstsMaxAgeS, metrics, readiness });
  // A page waits up to two STORE_DEADLINE_MS for its session (maxQueueWaitMs), then makes a store
  // read and a write, each up to one: a response in flight at the stop normally ends well within
  // this; only a stuck one is cut off.
  const { server, stop } = createWebServer(app, logger, config.session.maxQueueWaitMs + 2 * config.store.deadlineMs + 5000, {
    onRefused: (code) => metrics.observeRefused(code),
    refusals: refusalResponses(),
    timeouts: { headersMs: config.headersTimeoutMs, requestMs: config.requestTimeoutMs },
  });
  server.listen(config.port, config.host, () => {
    const address = server.address();
    const port = typeof address === 'object' && address ? address.port : config.port;
    // The effective settings, so the log says what this process runs with; never a token or key.
    logger.info(
      {
        host: config.host,
        port,
        store: config.store.address,
        transport: config.store.transport,
        deadlineMs: config.store.deadlineMs,
        tls: resolveEndpoint(config.store.address, config.store.tlsCa ? 'STORE_TLS_CA' : undefined).tls,
        auth: Boolean(config.store.token),
        trustProxy: config.trustProxy,
        hstsMaxAgeS: config.hstsMaxAgeS,
        headersTimeoutMs: config.headersTimeoutMs,
        requestTimeoutMs: config.requestTimeoutMs,
        session: {
          cookieName: config.session.cookieName,
          idleTtlMs: config.session.idleTtlMs,
          absoluteTtlMs: config.session.absoluteTtlMs,
          rolling: config.session.rolling,
          persistent: config.session.persistent,
          secure: config.session.secure,
          keys: config.session.keys.length,
        },
      },
      'listening',
    );
    // A store that refuses this web's settings is logged now, not at the first /readyz. One not
    // ready yet (started alongside, so still starting) is asked again until it is, after 1 s, then
    // 2 s, 4 s, ... at most 30 s apart (a misconfiguration is not retried every second): the log
    // then says when it became ready, without anyone asking /readyz.
    const untilReady = (delayMs: number) =>
      void readiness.check().then((answer) => {
        if (answer.store === 'SERVING' && !answer.problem) return;
        startupRecheck = setTimeout(() => untilReady(Math.min(2 * delayMs, 30_000)), delayMs).unref();
      });
    untilReady(1000);
  });
  server.on('error', (err: NodeJS.ErrnoException) => {
    process.stderr.write(`web: cannot listen on ${config.host}:${config.port} (${listenVariables(err.code, 'PORT', 'WEB_HOST')}): ${err.message}\n`);
    process.exit(1);
  });
  server.keepAliveTimeout = 65_000;
  let startupRecheck: NodeJS.Timeout | undefined;
  const finish = (signal: string) =>
    stop(signal, () => {
      clearTimeout(startupRecheck);
      store.close();
      readiness.close();
      process.exit(0);
    });
  onStopSignals(finish, (signal) => {
    logger.warn({ signal }, 'second signal: exiting now, without the responses in flight');
    process.exit(1);
  });
}

try {
  main();
} catch (err) {
  const message = err instanceof ConfigError ? err.message : `cannot start: ${(err as Error).message}`;
  process.stderr.write(`web: ${message}\n`);
  process.exit(1);
}
