import Router from '@koa/router';
import type { WebMetrics } from './metrics';
import type { ReadinessCheck } from './readiness';

/** Paths for supervisors and scrapers; they never touch a session. */
export const OPERATION_PATHS: ReadonlySet<string> = new Set(['/healthz', '/readyz', '/metrics']);

/**
 * GET /healthz: the process is alive and serving HTTP. GET /readyz: the store answers SERVING and
 * accepts this web's calls, so pages can work (503 otherwise). GET /metrics: Prometheus text.
 */
export function createOperationRoutes(deps: { metrics: WebMetrics; readiness?: ReadinessCheck }): Router {
  const router = new Router();

  router.get('/healthz', (ctx) => {
    ctx.set('Cache-Control', 'no-store');
    ctx.body = { status: 'ok' };
  });

  const { readiness } = deps;
  if (readiness) {
    router.get('/readyz', async (ctx) => {
      const { store, problem } = await readiness.check();
      const ready = store === 'SERVING' && !problem;
      ctx.set('Cache-Control', 'no-store');
      ctx.status = ready ? 200 : 503;
      ctx.body = { status: ready ? 'ready' : 'not ready', store, ...(problem && { problem }) };
    });
  }

  router.get('/metrics', async (ctx) => {
    const { contentType, body } = await deps.metrics.render();
    ctx.set('Cache-Control', 'no-store');
    ctx.type = contentType;
    ctx.body = body;
  });

  return router;
}
