/** Baseline: the same Koa + nunjucks page with no session and no store (the ceiling for a page). */
import path from 'node:path';
import Koa from 'koa';
import nunjucks from 'nunjucks';

const views = nunjucks.configure(path.resolve(__dirname, '../../../services/web/views'), { autoescape: true });
let visits = 0;
const app = new Koa();
app.use((ctx) => {
  visits += 1;
  ctx.set('Cache-Control', 'no-store');
  ctx.type = 'html';
  ctx.body = views.render('index.njk', { count1: visits, count2: 0, csrf: '' });
});
const server = app.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
  const address = server.address();
  process.stdout.write(JSON.stringify({ msg: 'listening', port: typeof address === 'object' && address ? address.port : 0 }) + '\n');
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
