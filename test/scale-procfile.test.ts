import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import path from 'node:path';
import { CookieJarClient } from './helpers/browser';
import { NO_ENV_FILE, root, TEST_KEY, tempDir } from './helpers/procs';
import { requireRedis } from './helpers/redis';
import { exited, freeBasePort, isFree, stopForeman } from './helpers/ports';

/** Ports of Procfile.redis from foreman's base: five lines, 100 apart, and the two stores' metrics. */
const OFFSETS = [0, 100, 200, 300, 400, 4200, 4300];

async function waitForHealthz(jar: CookieJarClient, output: () => string, timeoutMs = 30_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    try {
      if ((await jar.get('/healthz')).status === 200) return;
    } catch {
      // not listening yet
    }
    if (Date.now() > end) throw new Error(`${jar.base} did not come up under foreman:\n${output()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('Procfile.redis under foreman (nf start -j Procfile.redis)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let child: ChildProcess | undefined;
  let output = '';

  before(function () {
    requireRedis(this);
    tmp = tempDir();
  });
  after(async () => {
    await stopForeman(child, 'SIGINT');
    tmp?.remove();
  });

  it('runs two webs, two stores and redis-server; a cookie jar alternating between the webs keeps its counters; SIGINT stops all five', async () => {
    const base = await freeBasePort(OFFSETS);
    child = spawn(path.join(root, 'node_modules', '.bin', 'nf'), ['-e', NO_ENV_FILE.DOTENV_CONFIG_PATH, 'start', '-j', 'Procfile.redis', '-p', String(base)], {
      cwd: root,
      env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? tmp.dir, STORE_DATA_DIR: tmp.dir, WEB_DATA_DIR: tmp.dir, SESSION_KEYS: TEST_KEY, ...NO_ENV_FILE },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
    const webs = [`http://127.0.0.1:${base}`, `http://127.0.0.1:${base + 100}`];
    const jar = new CookieJarClient(webs[0]);
    for (const web of webs) await waitForHealthz(new CookieJarClient(web), () => output);
    // The stores may still be connecting to redis-server: the first page can be a 503.
    const end = Date.now() + 15_000;
    while ((await jar.get('/healthz')).status !== 200 || (await jar.page()).status !== 200) {
      if (Date.now() > end) throw new Error(`the counter page never answered 200:\n${output}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    jar.cookies.clear();
    const counts: number[] = [];
    for (let i = 0; i < 4; i += 1) {
      jar.base = webs[i % 2];
      counts.push((await jar.page()).count1);
    }
    assert.deepEqual(counts, [0, 1, 2, 3]);

    child.kill('SIGINT');
    await exited(child);
    for (const offset of OFFSETS) assert.equal(await isFree(base + offset), true, `port ${base + offset} released`);
  });
});
