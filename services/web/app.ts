import { createHash, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { STATUS_CODES } from 'node:http';
import path from 'node:path';
import bodyParser from '@koa/bodyparser';
import type Router from '@koa/router';
import Koa from 'koa';
import serve from 'koa-static';
import nunjucks from 'nunjucks';
import { StoreClientError } from '../client/store-client';
import { projectRoot } from '../shared/env';
import { type Logger, rateLimited } from '../shared/log';
import { WebMetrics } from './metrics';
import { createOperationRoutes, OPERATION_PATHS } from './operations';
import type { ReadinessCheck } from './readiness';
import { createRoutes } from './routes';
import { HSTS_ONE_YEAR_S, type HeaderList, PERMISSIONS_POLICY, securityHeaderList, securityHeaders, strictTransportSecurity } from './security-headers';
import { type SessionBackend, SessionConflictError, sessionMiddleware, type SessionOptions } from './session';

export interface AppDeps {
  store: SessionBackend;
  /** Session settings; the app wires the store, request ids, logging and metrics itself. */
  session: Omit<SessionOptions, 'store' | 'onForgedCookie' | 'onEvent' | 'requestId'>;
  logger: Logger;
  /** Trust X-Forwarded-* (app.proxy) when running behind a reverse proxy. */
  trustProxy?: boolean;
  /**
   * Strict-Transport-Security max-age in seconds, sent on responses to HTTPS requests only (as
   * browsers heed it only there); 0 sends none. Default one year.
   */
  hstsMaxAgeS?: number;
  /** Where GET /metrics reads from; a fresh registry when absent. */
  metrics?: WebMetrics;
  /** What GET /readyz asks; without it /readyz is not served. */
  readiness?: ReadinessCheck;
}

const webDir = path.join(projectRoot, 'services', 'web');

/**
 * The site's security headers, with the given style and image sources: the files under /static/
 * for pages; the hash of the inlined stylesheet and the inlined icon for the pages of refused
 * requests.
 */
function siteHeaders({ styleSrc, imgSrc }: { styleSrc: string[]; imgSrc: string[] }): HeaderList {
  return securityHeaderList(
    {
      contentSecurityPolicy: {
        useDefaults: false,
        directives: {
          defaultSrc: ["'none'"],
          styleSrc,
          imgSrc,
          formAction: ["'self'"],
          frameAncestors: ["'none'"],
          baseUri: ["'none'"],
        },
      },
      referrerPolicy: { policy: 'same-origin' },
      // The header older browsers read instead of frame-ancestors: the same answer, never framed.
      xFrameOptions: { action: 'deny' },
      // Sent by strictTransportSecurity below, and only over HTTPS.
      strictTransportSecurity: false,
    },
    { 'Permissions-Policy': PERMISSIONS_POLICY },
  );
}

/** The security headers of every response the app gives, error pages included. */
const SECURITY_HEADERS = siteHeaders({ styleSrc: ["'self'"], imgSrc: ["'self'"] });

/** Largest form body accepted; larger ones get the 413 page. */
const FORM_LIMIT = '8kb';

/** Builds the counter site as a Koa app that does not listen (tests drive app.callback()). */
export function createApp(deps: AppDeps): Koa {
  // maxIpsCount 1: the address the proxy appended to X-Forwarded-For, not the first one, which the
  // client wrote itself (and could fill with anyone's address for the forged-cookie warning).
  const app = new Koa({ proxy: deps.trustProxy ?? false, maxIpsCount: 1 });
  const metrics = deps.metrics ?? new WebMetrics();
  const { logger } = deps;
  const views = createViews();
  const render = (ctx: Koa.Context, template: string, data: object) => {
    ctx.type = 'html';
    ctx.body = views.render(template, data);
  };
  // Errors after the response started (e.g. a broken static file stream) arrive here, not in errorPages.
  // A client that hangs up or cuts its request short lands here too: any client can do that at
  // will, so it is no error of ours and must not flood the error log with stack traces. Real
  // failures stay errors, rate-limited all the same.
  const errorResponseFailed = rateLimited(10, 10_000, (ctx: Koa.Context | undefined, err: unknown, suppressed: number) =>
    logger.error({ err, requestId: ctx?.state.requestId, suppressed }, 'response failed'),
  );
  app.on('error', (err: unknown, ctx?: Koa.Context) => {
    if ((err as { expose?: boolean }).expose === true) return;
    if (isClientAbort(err)) {
      const { code, message } = err as NodeJS.ErrnoException;
      logger.debug({ code, reason: message, requestId: ctx?.state.requestId }, 'client went away before the response was complete');
      return;
    }
    errorResponseFailed(ctx, err);
  });

  const router = createRoutes(render);
  app.use(observeRequests(logger, metrics, router));
  app.use(errorPages(logger, render));
  app.use(securityHeaders(SECURITY_HEADERS));
  const hsts = strictTransportSecurity(deps.hstsMaxAgeS ?? HSTS_ONE_YEAR_S);
  if (hsts) app.use(hsts);
  // Operations and static files are told apart by path here, once: pages pay no router pass for
  // them, and only /static/ reaches the file system (pages cost no stat() call).
  const operations = createOperationRoutes({ metrics, readiness: deps.readiness }).routes() as Koa.Middleware;
  const assets = serve(path.join(webDir, 'public'), { maxage: 3_600_000, index: false });
  app.use((ctx, next) => {
    // HTTP/1.1 requires a Host header (RFC 9112, 3.2); the server leaves refusing it to the app.
    if (ctx.req.headers.host === undefined && ctx.req.httpVersion === '1.1') ctx.throw(400, 'an HTTP/1.1 request needs a Host header');
    if (OPERATION_PATHS.has(ctx.path)) return operations(ctx, next);
    if (ctx.path.startsWith('/static/')) {
      if (ctx.method === 'GET' || ctx.method === 'HEAD') return assets(ctx, next).catch(notFoundOutsideStatic);
      // Files are only read: other methods get what the router gives a route's other methods.
      ctx.set('Allow', 'HEAD, GET');
      ctx.status = ctx.method === 'OPTIONS' ? 200 : 405;
      if (ctx.status === 200) ctx.body = '';
      return;
    }
    return next();
  });
  const warnForged = rateLimited(10, 10_000, (ctx: Koa.Context, info: { cookieHash: string }, suppressed: number) =>
    logger.warn({ cookieHash: info.cookieHash, remote: ctx.ip, requestId: ctx.state.requestId, suppressed }, 'suspicious session cookie: signature does not verify'),
  );
  app.use(
    sessionMiddleware({
      ...deps.session,
      store: metrics.instrumentStore(deps.store),
      requestId: (ctx) => ctx.state.requestId as string,
      onForgedCookie: (ctx, info) => {
        metrics.observeForgedCookie();
        warnForged(ctx, info);
      },
      onEvent: (event) => metrics.observeSessionEvent(event),
    }),
  );
  const parseForm = bodyParser({ enableTypes: ['form'], formLimit: FORM_LIMIT, encoding: 'utf-8', onError: rejectUnreadableBody });
  // Only the forms' POSTs carry a body; the page's GETs skip the parser altogether.
  app.use((ctx, next) => (ctx.method === 'POST' ? parseForm(ctx, next) : next()));
  app.use(router.routes());
  // Sets 405 (a method this path does not take) or 501 (a method no route takes) with the Allow
  // header, and no body: errorPages gives them their page. Not { throw: true }: the errors it
  // throws carry no Allow header, which a 405 must have.
  app.use(router.allowedMethods());
  return app;
}

function createViews(): nunjucks.Environment {
  return nunjucks.configure(path.join(webDir, 'views'), { autoescape: true, throwOnUndefined: false });
}

/**
 * The whole HTTP responses, by status, for requests Node's HTTP server refuses before the app has
 * answered them (400 malformed, 408 too slow, 413 chunk extensions too large, 431 headers too
 * large, which a browser meets when it holds too many cookies for the site; 501 a CONNECT): the site's error page
 * with its security headers, rendered once at start-up. The page needs no other request (its
 * stylesheet is inlined, allowed by its hash): with too many cookies, the stylesheet's request
 * would be refused as well. The connection is closed after each.
 */
export function refusalResponses(): Map<number, string> {
  const views = createViews();
  const css = readFileSync(path.join(webDir, 'public', 'static', 'style.css'), 'utf8');
  const icon = `data:image/svg+xml;base64,${readFileSync(path.join(webDir, 'public', 'static', 'favicon.svg')).toString('base64')}`;
  const headers = siteHeaders({ styleSrc: [`'sha256-${createHash('sha256').update(css).digest('base64')}'`], imgSrc: ['data:'] });
  const responses = new Map<number, string>();
  for (const status of [400, 408, 413, 431, 501]) {
    const page = REFUSAL_PAGES[status] ?? PAGES[status];
    const body = views.render('error.njk', { status, ...page, inline: { style: css, icon } });
    const head = [
      `HTTP/1.1 ${status} ${STATUS_CODES[status]}`,
      ...[
        ...headers,
        ['Content-Type', 'text/html; charset=utf-8'],
        ['Content-Length', String(Buffer.byteLength(body))],
        ['Cache-Control', 'no-store'],
        ['Connection', 'close'],
      ].map(([name, value]) => `${name}: ${value}`),
    ];
    responses.set(status, `${head.join('\r\n')}\r\n\r\n${body}`);
  }
  return responses;
}

/**
 * koa-static answers a path that climbs out of public/ (/static/%2e%2e/...) with 403, whose page
 * is the form-token one. To the visitor there is simply nothing at that address: 404.
 */
function notFoundOutsideStatic(err: unknown): never {
  if ((err as { status?: unknown }).status === 403) throw Object.assign(new Error('not found'), { status: 404, expose: true });
  throw err;
}

type Render = (ctx: Koa.Context, template: string, data: object) => void;

/** What each error page says: what happened, in plain words, and what the reader can do about it. */
const PAGES: Record<number, { title: string; happened: string; todo: string }> = {
  400: {
    title: 'Bad request',
    happened: 'The site could not read what your browser sent, so nothing was changed.',
    todo: 'Go back to the counters and press the button again.',
  },
  403: {
    title: 'Form not accepted',
    happened:
      'This form did not carry the security token of your current session: it may come from an old page, from before a reset, or from another site. Nothing was changed.',
    todo: 'Go back to the counters, which loads a fresh form, and press the button again.',
  },
  404: {
    title: 'Page not found',
    happened: 'There is nothing at this address.',
    todo: 'The counters are on the home page.',
  },
  405: {
    title: 'Method not allowed',
    happened: 'This address does not accept that kind of request, so nothing was changed.',
    todo: 'Use the buttons on the counters page.',
  },
  413: {
    title: 'Request too large',
    happened: 'The form your browser sent was larger than this site accepts, so nothing was changed.',
    todo: 'Go back to the counters and use the buttons there.',
  },
  501: {
    title: 'Not supported',
    happened: 'This site does not handle that kind of request, so nothing was changed.',
    todo: 'Use the buttons on the counters page.',
  },
  503: {
    title: 'Counters unavailable',
    happened: 'The session store is not available right now (down, busy or full), so your counters could not be read or saved. Nothing was lost.',
    todo: 'Wait a moment, then go back to the counters.',
  },
};

/** Pages for what only Node's HTTP server refuses, before the app has answered (nothing of the request is done). */
const REFUSAL_PAGES: Record<number, { title: string; happened: string; todo: string }> = {
  408: {
    title: 'Request timed out',
    happened: 'Your browser took too long to send its request, so the site stopped waiting. Nothing was changed.',
    todo: 'Go back to the counters and try again.',
  },
  413: {
    title: 'Request too large',
    happened: 'Your browser sent a request larger than this site accepts, so nothing was changed.',
    todo: 'Go back to the counters and use the buttons there.',
  },
  431: {
    title: 'Request headers too large',
    happened:
      'Your browser sent more request headers than this site accepts, most often because it holds too many or too large cookies for this site. Nothing was changed.',
    todo: "Clear this site's cookies in your browser, then go back to the counters.",
  },
};

/** The 403 page of a form that came without the session cookie: a fresh form cannot help until cookies are allowed. */
const NO_COOKIE_PAGE = {
  title: 'Form not accepted',
  happened:
    "Your browser sent this form without this site's session cookie: cookies for this site may be blocked or were cleared, or the form came from another site. Nothing was changed.",
  todo: 'The counters need a cookie: allow cookies for this site, then go back to the counters and press the button again.',
};

/**
 * The 503 page when a change was sent to the store and no answer came (a deadline passed, the
 * connection broke): the store may have applied it, so the page must not say nothing was saved.
 */
const UNKNOWN_WRITE_PAGE = {
  title: 'Counters unavailable',
  happened: 'The session store did not answer in time, so it is not known whether your last change was saved.',
  todo: 'Go back to the counters to see where they stand before trying again.',
};

const FALLBACK_PAGE = {
  title: 'Something went wrong',
  happened: 'The page could not be shown because of an error on the server.',
  todo: 'Please try again in a moment.',
};

/**
 * A body that cannot be read (corrupt compression, unknown encoding, cut short) is the client's
 * mistake: 413 when too large, else 400 (which has a page). Without this, a zlib error is a 500.
 * A body whose connection closed before it all arrived (the client left, or it was too slow and
 * Node answered 408) is a 499, as nginx logs it: no answer can reach anyone, and nothing was done.
 */
function rejectUnreadableBody(err: Error, ctx: Koa.Context): never {
  if (isClientAbort(err)) ctx.throw(499, 'the connection closed before the request body arrived');
  // The parser stopped reading mid-body (past the limit, or undecodable) and paused the request.
  // Drop the rest, as Node does with a body the app never read: else the connection, kept alive,
  // waits for it, and the next request on it hangs until WEB_REQUEST_TIMEOUT_MS, then gets a 408.
  ctx.req.unpipe();
  ctx.req.resume();
  ctx.throw((err as { status?: unknown }).status === 413 ? 413 : 400, 'the request body could not be read');
}

const BODILESS_ERRORS: ReadonlySet<number> = new Set([404, 405, 501]);

/** The one place where an error becomes an HTTP response. Store failures are 503, never 500. */
function errorPages(logger: Logger, render: Render): Koa.Middleware {
  const warnUnavailable = rateLimited(10, 10_000, (ctx: Koa.Context, reason: string, suppressed: number) =>
    logger.warn({ reason, requestId: ctx.state.requestId, suppressed }, 'store unavailable'),
  );
  // Every page fails the same way until the operator fixes the token: a few lines say so, not one per request.
  const errorRefusedToken = rateLimited(10, 10_000, (ctx: Koa.Context, reason: string, suppressed: number) =>
    logger.error({ reason, requestId: ctx.state.requestId, suppressed }, 'the store refused STORE_TOKEN'),
  );
  // Likewise when the store refuses every page's calls for another setting (a session TTL above its
  // STORE_MAX_TTL_MS): one error line with a stack per page view would flood the log.
  const errorFailed = rateLimited(10, 10_000, (ctx: Koa.Context, err: unknown, suppressed: number) =>
    logger.error({ err, requestId: ctx.state.requestId, suppressed }, 'request failed'),
  );
  return async (ctx, next) => {
    try {
      await next();
      // Answers decided without a body (no route: 404; the router's 405 and 501, which keep their
      // Allow header) get their page too.
      if (BODILESS_ERRORS.has(ctx.status) && !ctx.body) throw Object.assign(new Error(ctx.message), { status: ctx.status, expose: true });
    } catch (err) {
      let status = 500;
      if (err instanceof StoreClientError) {
        // A refused token is the operator's to fix (logged below), but to the visitor it is a store they cannot reach.
        status = err.kind === 'unavailable' || err.kind === 'unauthenticated' ? 503 : 500;
        if (err.kind === 'unauthenticated') errorRefusedToken(ctx, err.message);
      } else if (err instanceof SessionConflictError) {
        status = 503;
      } else if (typeof (err as { status?: unknown }).status === 'number') {
        status = (err as { status: number }).status;
      }
      if (status < 400 || status > 599) status = 500;
      if (status === 503) {
        ctx.set('Retry-After', '1');
        warnUnavailable(ctx, (err as Error).message);
      } else if (status >= 500 && (err as { expose?: unknown }).expose !== true) {
        // A 501 for a method nobody serves is the client's doing, not a failure to log.
        errorFailed(ctx, err);
      }
      const page =
        status === 503 && isUnknownWrite(err)
          ? UNKNOWN_WRITE_PAGE
          : status === 403 && (err as { cookieMissing?: unknown }).cookieMissing === true
            ? NO_COOKIE_PAGE
            : (PAGES[status] ?? FALLBACK_PAGE);
      ctx.status = status;
      ctx.set('Cache-Control', 'no-store');
      render(ctx, 'error.njk', { status, ...page });
    }
  };
}

/** A store write (put or delete) that was sent and never answered: it may have been applied. */
function isUnknownWrite(err: unknown): boolean {
  return err instanceof StoreClientError && err.outcomeUnknown && (err.call === 'put' || err.call === 'delete');
}

/** Request ids we accept from a client or proxy: short and printable, so they are safe in logs and metadata. */
const REQUEST_ID = /^[A-Za-z0-9._:/+=-]{1,128}$/;

/**
 * Outermost middleware: gives every request an id (the caller's X-Request-Id when sane, else a new
 * one), echoes it, and when the response is ready writes one log line and the request metrics.
 * Never logs the cookie.
 */
function observeRequests(logger: Logger, metrics: WebMetrics, router: Router): Koa.Middleware {
  return async (ctx, next) => {
    const start = process.hrtime.bigint();
    const offered = ctx.get('x-request-id');
    const requestId = REQUEST_ID.test(offered) ? offered : randomUUID();
    ctx.state.requestId = requestId;
    ctx.set('X-Request-Id', requestId);
    try {
      await next();
    } finally {
      const seconds = Number(process.hrtime.bigint() - start) / 1e9;
      const route = routeOf(ctx, router);
      metrics.observeRequest(ctx.method, route, ctx.status, seconds);
      // Probes and scrapes come every few seconds: they are logged only at debug level.
      const level = OPERATION_PATHS.has(route) ? 'debug' : 'info';
      if (logger.isLevelEnabled(level)) {
        logger[level](
          { requestId: requestId, method: ctx.method, route, path: ctx.path.slice(0, 200), status: ctx.status, ms: Math.round(seconds * 1e5) / 100 },
          'request',
        );
      }
    }
  };
}

/**
 * A bounded label for metrics: the router's pattern, /static/*, or "unmatched" (never the raw path).
 * A method a route does not take (405, OPTIONS) is labelled with that route: it was its address;
 * under /static/ only a missing file (404) is unmatched.
 */
function routeOf(ctx: Koa.Context, router: Router): string {
  const matched = (ctx as { _matchedRoute?: string | RegExp })._matchedRoute;
  if (typeof matched === 'string') return matched;
  // The operations' own router: a method its paths do not take (405, OPTIONS) is theirs too.
  if (OPERATION_PATHS.has(ctx.path) && ctx.status !== 404) return ctx.path;
  if (ctx.path.startsWith('/static/') && ctx.status !== 404) return '/static/*';
  const route = router.match(ctx.path, ctx.method).path.find((layer) => layer.methods.length > 0)?.path;
  return typeof route === 'string' ? route : 'unmatched';
}

/**
 * Errors that mean the client closed or reset the connection, or ended its request early (an HTTP
 * parser error such as HPE_INVALID_EOF_STATE when a body stops short of its Content-Length).
 */
function isClientAbort(err: unknown): boolean {
  const { code, message } = (err ?? {}) as { code?: unknown; message?: unknown };
  if (typeof code === 'string' && (code.startsWith('HPE_') || CLIENT_ABORT_CODES.has(code))) return true;
  return message === 'aborted';
}

const CLIENT_ABORT_CODES = new Set(['ECONNRESET', 'EPIPE', 'ECONNABORTED', 'ERR_STREAM_PREMATURE_CLOSE']);
