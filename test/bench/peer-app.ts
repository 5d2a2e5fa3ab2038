/**
 * The peer we measure against: the same counter page built the way an Express team would,
 * with express 5 + express-session + connect-redis + node-redis against a local redis-server.
 * Same template, same counter semantics (first visit 0/0, each GET / adds 1 to counter 1).
 */
import path from 'node:path';
import { RedisStore } from 'connect-redis';
import express from 'express';
import session from 'express-session';
import nunjucks from 'nunjucks';
import { createClient } from 'redis';

declare module 'express-session' {
  interface SessionData {
    count1: number;
    count2: number;
  }
}

async function main(): Promise<void> {
  const redis = createClient({ url: process.env.REDIS_URL });
  await redis.connect();
  const views = nunjucks.configure(path.resolve(__dirname, '../../../services/web/views'), { autoescape: true });
  const app = express();
  app.disable('x-powered-by');
  app.use(
    session({
      store: new RedisStore({ client: redis, prefix: 'sess:', ttl: 1800 }),
      secret: 'peer-secret-0123456789-0123456789-0123456789',
      resave: false,
      saveUninitialized: false,
      cookie: { httpOnly: true, sameSite: 'lax', path: '/' },
    }),
  );
  app.get('/', (req, res) => {
    if (req.session.count1 === undefined) {
      req.session.count1 = 0;
      req.session.count2 = 0;
    } else {
      req.session.count1 += 1;
    }
    res.set('Cache-Control', 'no-store');
    res.type('html').send(views.render('index.njk', { count1: req.session.count1, count2: req.session.count2, csrf: '' }));
  });
  const server = app.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
    const address = server.address();
    process.stdout.write(JSON.stringify({ msg: 'listening', port: typeof address === 'object' && address ? address.port : 0 }) + '\n');
  });
  process.on('SIGTERM', () => server.close(() => void redis.quit().then(() => process.exit(0))));
}

void main();
