import { createServer, type IncomingMessage, type Server, type ServerResponse, STATUS_CODES } from 'node:http';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type Koa from 'koa';
import type { Logger } from '../shared/log';

export interface WebServer {
  server: Server;
  /**
   * Graceful stop: no new connections; a connection's last response in flight goes out with
   * Connection: close when it has not started yet (those pipelined before it are answered too);
   * connections without a response in flight (idle, or not yet through a request's headers) are
   * closed at once and busy ones after their last response; `done` runs when the last response is
   * finished. After graceMs the rest are given up: an error line and exit code 1.
   */
  stop(signal: string, done: () => void): void;
}

/**
 * The status for a request Node's HTTP server refuses before the app has answered it (most never
 * reach the app; a 408 may come while the app still waits for a slow body), by the error's code;
 * anything else is a 400. The same statuses Node gives when no one listens.
 */
const REFUSAL_STATUS: Record<string, number> = {
  HPE_HEADER_OVERFLOW: 431,
  HPE_CHUNK_EXTENSIONS_OVERFLOW: 413,
  ERR_HTTP_REQUEST_TIMEOUT: 408,
};

export interface WebServerOptions {
  /** Told the error's code of each request Node refuses before the app has answered it, for metrics. */
  onRefused?: (code: string) => void;
  /**
   * The whole HTTP response (status line, headers, body; closing the connection) for each refusal
   * status: 400, 408, 413, 431. A status missing here gets Node's bare answer.
   */
  refusals?: ReadonlyMap<number, string>;
  /**
   * How long a client may take to send a request's headers, and the whole request, before a 408
   * closes its connection (Node's defaults: 60 s and 300 s). Node looks for such clients every
   * half headers time, at most every 30 s as it does by default, so a 408 comes within 1.5 times the limit.
   */
  timeouts?: { headersMs: number; requestMs: number };
}

/** A connection that ended under the client, not a request the parser refused. */
const HANG_UPS = new Set(['ECONNRESET', 'EPIPE']);

/**
 * An HTTP server for the app that knows its responses in flight, so that a stop can finish them,
 * and answers requests Node's parser refuses (malformed, headers too large, too slow) with the
 * site's own page.
 */
export function createWebServer(app: Koa, logger: Logger, graceMs: number, options: WebServerOptions = {}): WebServer {
  const { onRefused, refusals, timeouts } = options;
  const inFlight = new Set<ServerResponse>();
  const connections = new Set<Socket>();
  let stopping = false;
  /**
   * Once stopping: each busy connection's last response in flight, the one after which it closes.
   * Node answers a connection's pipelined requests in turn and closes it after the first response
   * that says Connection: close, so only the last may say it: the app has the others too (and may
   * have done them), and they must be answered.
   */
  const lastOn = new Map<Socket, ServerResponse>();
  /**
   * Responses queued behind a pipelined one on their connection: Node gives such a response the
   * connection only when the one before it finishes, and one whose connection closes first never
   * emits 'close', so it would stay in flight for ever (a client that pipelines and hangs up grew
   * the heap without end). The connection's 'close' ends them.
   */
  const queued = new WeakMap<Socket, Set<ServerResponse>>();
  const handle = app.callback();
  // One listener for every response (no closure per request: this is on every page's path).
  function closed(this: ServerResponse): void {
    inFlight.delete(this);
    const { socket } = this.req;
    queued.get(socket)?.delete(this);
    if (!stopping) return;
    // A last response that began with keep-alive before the stop leaves its connection idle: close
    // it now, or server.close() would wait for the client to hang up. Not one whose next response
    // is still to be written: it is answered first.
    if (lastOn.get(socket) === this) {
      lastOn.delete(socket);
      socket.destroy();
    }
  }
  function forget(this: Socket): void {
    connections.delete(this);
    for (const res of queued.get(this) ?? []) closed.call(res);
  }
  const limits = timeouts && {
    headersTimeout: timeouts.headersMs,
    requestTimeout: timeouts.requestMs,
    connectionsCheckingInterval: Math.min(30_000, Math.ceil(timeouts.headersMs / 2)),
  };
  const onRequest = (req: IncomingMessage, res: ServerResponse): void => {
    if (stopping && !closeAfter(req.socket, res)) return;
    inFlight.add(res);
    res.once('close', closed);
    if (!res.socket) {
      const waiting = queued.get(req.socket);
      if (waiting) waiting.add(res);
      else queued.set(req.socket, new Set([res]));
    }
    void handle(req, res);
  };
  /**
   * After the stop: makes res its connection's last response, which closes it (so the client sends
   * no more requests to a process that exits). False when it cannot be answered: the response
   * before it already said Connection: close, and Node closes the connection after that one; the
   * request is then left undone, as the client, told the connection closes, expects.
   */
  function closeAfter(socket: Socket, res: ServerResponse): boolean {
    const before = lastOn.get(socket);
    if (before?.headersSent && !before.shouldKeepAlive) return false;
    // Set to close by the stop (a request that asks to close ends the client's pipelining itself).
    if (before && !before.headersSent) before.shouldKeepAlive = true;
    if (!res.headersSent) res.shouldKeepAlive = false;
    lastOn.set(socket, res);
    return true;
  }
  // Node answers an HTTP/1.1 request without Host itself (requireHostHeader) with a bare 400 that
  // no one hears of: the app refuses it instead, with its page, its log line and its metrics.
  const server = createServer({ ...limits, requireHostHeader: false }, onRequest);
  // An Expect other than 100-continue: with no one listening Node answers a bare 417 itself (no
  // security headers, no log line, no metric). RFC 9110 lets a server ignore an expectation it does
  // not know: the site answers as usual.
  server.on('checkExpectation', onRequest);
  // Connections whose parser refused bytes that came after a request the app was answering.
  const refusedAfterRequest = new WeakSet<Duplex>();
  // Node answers these itself when no one listens, with a status line and no page, and tells no
  // one: counted, logged (at debug, since any client can send garbage) and answered with our page.
  server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
    const code = typeof err.code === 'string' ? err.code : 'unknown';
    if (!HANG_UPS.has(code)) {
      const current = (socket as Socket & { _httpMessage?: ServerResponse | null })._httpMessage;
      // Bytes after a whole request the app is still answering (pipelined garbage): the client must
      // get that request's answer, not a refusal page saying nothing was changed. The connection
      // closes after it; the refused bytes get no answer. The parser reports each later chunk too.
      if (current && !current.headersSent && current.req.complete) {
        current.shouldKeepAlive = false;
        if (!refusedAfterRequest.has(socket)) {
          refusedAfterRequest.add(socket);
          onRefused?.(code);
          logger.debug({ code, reason: err.message }, 'request refused by the HTTP parser');
        }
        return;
      }
      onRefused?.(code);
      logger.debug({ code, reason: err.message }, 'request refused by the HTTP parser');
      // As Node does: answer unless a response on this connection has begun (a refusal after a
      // kept-alive request is answered too; one in the middle of a response would corrupt it).
      if (socket.writable && !current?.headersSent) {
        const status = REFUSAL_STATUS[code] ?? 400;
        socket.write(refusals?.get(status) ?? `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nConnection: close\r\n\r\n`);
      }
    }
    socket.destroy();
  });
  // CONNECT (a proxy's method): with no one listening Node drops the connection without a word. The
  // site is no proxy: it answers 501 with its page, counted and logged as the refusals above.
  server.on('connect', (_req: IncomingMessage, socket: Duplex) => {
    onRefused?.('CONNECT');
    logger.debug({ code: 'CONNECT' }, 'request refused: CONNECT (this site is no proxy)');
    socket.on('error', () => socket.destroy());
    socket.end(refusals?.get(501) ?? `HTTP/1.1 501 ${STATUS_CODES[501]}\r\nConnection: close\r\n\r\n`);
  });
  server.on('connection', (socket: Socket) => {
    connections.add(socket);
    socket.once('close', forget);
  });
  return {
    server,
    stop(signal, done) {
      logger.info({ signal, inFlight: inFlight.size }, 'stopping');
      stopping = true;
      // In the order their requests came: a connection's last one is the one left marked.
      for (const res of inFlight) closeAfter(res.req.socket, res);
      server.close(done);
      // Node's closeIdleConnections() spares a connection that has not finished a request yet (a
      // browser's preconnect sends nothing for seconds; a slow client may be halfway through its
      // headers): either would hold the stop for the whole grace period. No request of theirs has
      // reached the app, so nothing of it was done: close every connection without a response.
      const busy = new Set<Socket | null>();
      for (const res of inFlight) busy.add(res.socket);
      for (const socket of connections) if (!busy.has(socket)) socket.destroy();
      setTimeout(() => {
        logger.error({ graceMs, inFlight: inFlight.size }, 'stopping: responses still in flight after the grace period, exiting without them');
        process.exit(1);
      }, graceMs).unref();
    },
  };
}
