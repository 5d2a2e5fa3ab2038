import { experimental, type Server, type ServerOptions, ServerCredentials, setLogger } from '@grpc/grpc-js';
import { type Logger, rateLimited } from '../shared/log';

/**
 * Connection settings of the store's gRPC server, chosen on purpose (grpc-js ignores options it
 * does not know, so only options it honours are listed):
 *
 * - keepalive 60 s / 20 s: the server pings every connection each minute and drops one that does
 *   not answer within 20 s, so a client whose host died stops holding streams (and Watch
 *   subscriptions) within about 80 s. Clients may ping as they like (grpc-js has no ping policing;
 *   our client pings every 10 s only while calls are active).
 * - 1000 concurrent streams per connection: far above what the web needs (it multiplexes
 *   everything over one Pipe stream), low enough that one client cannot pin unbounded memory.
 * - idle connections closed after 10 minutes without a call.
 * - no maximum connection age: the web keeps one long-lived Pipe stream, and cutting it would
 *   fail the operations in flight on it; balance load by restarting clients instead.
 * - max receive message: STORE_MAX_MESSAGE_BYTES; a larger request is refused with
 *   RESOURCE_EXHAUSTED before it is decoded.
 */
export function storeServerOptions(maxMessageBytes: number): ServerOptions {
  return {
    'grpc.keepalive_time_ms': 60_000,
    'grpc.keepalive_timeout_ms': 20_000,
    'grpc.max_concurrent_streams': 1000,
    'grpc.max_connection_idle_ms': 10 * 60_000,
    'grpc.max_receive_message_length': maxMessageBytes,
  };
}

/** TLS with the certificate the provider holds (and renews) when one is configured, plaintext otherwise. */
export function storeCredentials(certificate: experimental.CertificateProvider | undefined): ServerCredentials {
  if (!certificate) return ServerCredentials.createInsecure();
  // grpc-js declares the parameters in the other order than it uses them: the first is the identity.
  return experimental.createCertificateProviderServerCredentials(certificate, null, false);
}

/** What grpc-js logs when no address could be bound, just before it reports that error to bindAsync. */
const BIND_FAILED_LINE = /^No address added out of total \d+ resolved$/;

/** Characters of a grpc-js error line logged at most: it may quote a client's metadata whole. */
const MAX_GRPC_LINE = 300;

/**
 * Binds the server to host:port and resolves with the port. A failure rejects with the system's
 * reason alone ("listen EADDRINUSE: address already in use 127.0.0.1:5100") and its code, for the
 * caller to report in one line. grpc-js's own log line for the same failure is dropped. Its other
 * error lines are log lines (warn), cut short and at most 10 per 10 s: any client, without the
 * token, makes grpc-js write one per call ("Failed to add metadata entry ...", quoting a header
 * value of kilobytes). Its info and debug lines (GRPC_VERBOSITY, GRPC_TRACE) go to stderr as its
 * default logger writes them.
 */
export function bindServer(server: Server, address: string, credentials: ServerCredentials, logger: Logger): Promise<number> {
  const warn = rateLimited(10, 10_000, (message: string, _: undefined, suppressed: number) =>
    logger.warn({ grpc: message.slice(0, MAX_GRPC_LINE), ...(suppressed > 0 && { suppressed }) }, 'grpc-js reports an error'),
  );
  setLogger({
    error: (message?: unknown) => {
      if (!BIND_FAILED_LINE.test(String(message))) warn(String(message), undefined);
    },
    info: (message?: unknown, ...rest: unknown[]) => console.error(`I ${String(message)}`, ...rest),
    debug: (message?: unknown, ...rest: unknown[]) => console.error(`D ${String(message)}`, ...rest),
  });
  return new Promise((resolve, reject) =>
    server.bindAsync(address, credentials, (err, port) => {
      if (!err) return resolve(port);
      // "No address added out of total 1 resolved errors: [listen EADDRINUSE: address already in use ...]"
      const reason = /errors: \[(.*)\]$/s.exec(err.message)?.[1] || err.message;
      reject(Object.assign(new Error(reason), { code: /\b(E[A-Z_]{3,})\b/.exec(reason)?.[1] }));
    }),
  );
}
