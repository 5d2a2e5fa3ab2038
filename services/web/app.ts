import path from 'node:path';
import bodyParser from '@koa/bodyparser';
import Koa from 'koa';
import helmet from 'koa-helmet';
import serve from 'koa-static';
import nunjucks from 'nunjucks';
import { StoreClientError } from '../client/store-client';
import { projectRoot } from '../shared/env';
import { type Logger, shortHash } from '../shared/log';
import { createRoutes } from './routes';
import { type SessionBackend, SessionConflictError, sessionMiddleware, type SessionOptions } from './session';

export interface AppDeps {
  store: SessionBackend;
  session: Omit<SessionOptions, 'store' | 'onForgedCookie'>;
  logger: Logger;
  /** Trust X-Forwarded-* (app.proxy) when running behind a reverse proxy. */
  trustProxy?: boolean;
}

const webDir = path.join(projectRoot, 'services', 'web');

/** Builds the counter site as a Koa app that does not listen (tests drive app.callback()). */
export function createApp(deps: AppDeps): Koa {
  const app = new Koa({ proxy: deps.trustProxy ?? false });
  const views = nunjucks.configure(path.join(webDir, 'views'), { autoescape: true, throwOnUndefined: false });
  const render = (ctx: Koa.Context, template: string, data: object) => {
    ctx.type = 'html';
    ctx.body = views.render(template, data);
  };

  app.use(requestLog(deps.logger));
  app.use(errorPages(deps.logger, render));
  app.use(
    helmet({
      contentSecurityPolicy: {
        useDefaults: false,
        directives: {
          defaultSrc: ["'none'"],
          styleSrc: ["'self'"],
          imgSrc: ["'self'"],
          formAction: ["'self'"],
          frameAncestors: ["'none'"],
          baseUri: ["'none'"],
        },
      },
      referrerPolicy: { policy: 'same-origin' },
      strictTransportSecurity: false,
    }),
  );
  // Static files only under /static/: koa-static would otherwise stat the disk on every request.
  const assets = serve(path.join(webDir, 'public'), { maxage: 3_600_000, index: false });
  app.use((ctx, next) => (ctx.path.startsWith('/static/') ? assets(ctx, next) : next()));
  app.use(
    sessionMiddleware({
      ...deps.session,
      store: deps.store,
      onForgedCookie: rateLimited(10, 10_000, (ctx, suppressed) =>
        deps.logger.warn(
          { cookieHash: shortHash(ctx.get('cookie')), remote: ctx.ip, suppressed },
          'suspicious session cookie: signature does not verify',
        ),
      ),
    }),
  );
  app.use(bodyParser({ enableTypes: ['form'], formLimit: '8kb', encoding: 'utf-8', onError: rejectUnreadableBody }));
  const router = createRoutes(render);
  app.use(router.routes());
  app.use(router.allowedMethods());
  return app;
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
  503: {
    title: 'Counters unavailable',
    happened: 'The session store cannot be reached right now, so your counters could not be read or saved. Nothing was lost.',
    todo: 'Wait a moment, then go back to the counters.',
  },
};

const FALLBACK_PAGE = {
  title: 'Something went wrong',
  happened: 'The page could not be shown because of an error on the server.',
  todo: 'Please try again in a moment.',
};

/**
 * A body that cannot be read (corrupt compression, cut short) is the client's mistake: 400, or the
 * 4xx the parser chose (413 too large, 415 unknown encoding). Without this, a zlib error is a 500.
 */
function rejectUnreadableBody(err: Error, ctx: Koa.Context): never {
  const status = (err as { status?: unknown }).status;
  const clientStatus = typeof status === 'number' && status >= 400 && status < 500 ? status : 400;
  ctx.throw(clientStatus, 'the request body could not be read');
}

/** The one place where an error becomes an HTTP response. Store failures are 503, never 500. */
function errorPages(logger: Logger, render: Render): Koa.Middleware {
  return async (ctx, next) => {
    try {
      await next();
      if (ctx.status === 404 && !ctx.body) throw Object.assign(new Error('not found'), { status: 404, expose: true });
    } catch (err) {
      let status = 500;
      if (err instanceof StoreClientError) {
        // A refused token is the operator's to fix (logged below), but to the visitor it is a store they cannot reach.
        status = err.kind === 'unavailable' || err.kind === 'unauthenticated' ? 503 : 500;
        if (err.kind === 'unauthenticated') logger.error({ reason: err.message }, 'the store refused STORE_TOKEN');
      } else if (err instanceof SessionConflictError) {
        status = 503;
      } else if (typeof (err as { status?: unknown }).status === 'number') {
        status = (err as { status: number }).status;
      }
      if (status === 503) ctx.set('Retry-After', '1');
      if (status >= 500 && status !== 503) logger.error({ err }, 'request failed');
      else if (status === 503) logger.warn({ reason: (err as Error).message }, 'store unavailable');
      const page = PAGES[status] ?? FALLBACK_PAGE;
      ctx.status = status;
      ctx.set('Cache-Control', 'no-store');
      render(ctx, 'error.njk', { status, ...page });
    }
  };
}

/** One line per request: method, path, status, duration. Never the cookie. */
function requestLog(logger: Logger): Koa.Middleware {
  return async (ctx, next) => {
    const start = process.hrtime.bigint();
    try {
      await next();
    } finally {
      if (logger.isLevelEnabled('debug')) {
        const ms = Number(process.hrtime.bigint() - start) / 1e6;
        logger.debug({ method: ctx.method, path: ctx.path, status: ctx.status, ms }, 'request');
      }
    }
  };
}

/** Calls fn at most `max` times per window; the next call after a window reports how many were dropped. */
function rateLimited(max: number, windowMs: number, fn: (ctx: Koa.Context, suppressed: number) => void) {
  let windowStart = 0;
  let used = 0;
  let suppressed = 0;
  return (ctx: Koa.Context) => {
    const now = Date.now();
    if (now - windowStart >= windowMs) {
      windowStart = now;
      used = 0;
    }
    if (used >= max) {
      suppressed += 1;
      return;
    }
    used += 1;
    fn(ctx, suppressed);
    suppressed = 0;
  };
}
