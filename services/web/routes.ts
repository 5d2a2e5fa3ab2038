import Router from '@koa/router';
import type Koa from 'koa';

type Render = (ctx: Koa.Context, template: string, data: object) => void;

interface Counters {
  [key: string]: unknown;
  count1: number;
  count2: number;
}

const count = (value: unknown): number => (Number.isSafeInteger(value) ? (value as number) : 0);

/**
 * Only POSTs that carry this session's form token get through; others are 403 and change nothing.
 * One without a session cookie is marked `cookieMissing`: its page asks for cookies, since a fresh
 * form would fail the same way in a browser that blocks them.
 */
const requireCsrf: Koa.Middleware = async (ctx, next) => {
  const body = ctx.request.body as Record<string, unknown> | undefined;
  if (!ctx.session.verifyCsrf(body?._csrf)) {
    if (!ctx.session.hasCookie) ctx.throw(403, 'a form without a session cookie', { cookieMissing: true });
    ctx.throw(403, 'missing or wrong form token');
  }
  await next();
};

/**
 * A reset that carries no session cookie has nothing to delete: most often the second click of a
 * double-click, sent after the first one's answer cleared the cookie. It gets the fresh counters it
 * asked for, not a 403; it changes nothing, so it needs no form token.
 */
const resetOnlyWithSession: Koa.Middleware = async (ctx, next) => {
  if (ctx.session.hasCookie) return next();
  ctx.status = 303;
  ctx.redirect('/');
};

/** The counter site: GET / counts a visit; the two forms increment counter 2 or start over. */
export function createRoutes(render: Render): Router {
  const router = new Router();

  router.get('/', async (ctx) => {
    ctx.set('Cache-Control', 'no-store');
    if (ctx.method === 'HEAD') {
      // A HEAD never counts: it answers like the page without touching the session.
      ctx.type = 'html';
      ctx.status = 200;
      return;
    }
    const counters = await ctx.session.update<Counters>((current) =>
      current ? { ...current, count1: count(current.count1) + 1, count2: count(current.count2) } : { count1: 0, count2: 0 },
    );
    render(ctx, 'index.njk', { count1: counters.count1, count2: counters.count2, csrf: ctx.session.csrfToken() });
  });

  router.post('/increment', requireCsrf, async (ctx) => {
    await ctx.session.update<Counters>((current) => ({
      ...current,
      count1: count(current?.count1),
      count2: count(current?.count2) + 1,
    }));
    ctx.status = 303;
    ctx.redirect('/');
  });

  router.post('/reset', resetOnlyWithSession, requireCsrf, async (ctx) => {
    await ctx.session.destroy();
    ctx.status = 303;
    ctx.redirect('/');
  });

  router.get('/favicon.ico', (ctx) => {
    ctx.status = 204;
    ctx.set('Cache-Control', 'public, max-age=86400');
  });

  return router;
}
