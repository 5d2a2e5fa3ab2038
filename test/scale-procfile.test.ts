import assert from 'node:assert/strict';
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import path from 'node:path';
import { CookieJarClient } from './helpers/browser';
import { NO_ENV_FILE, root, tempDir } from './helpers/procs';
import { requireRedis } from './helpers/redis';
import { requireProgram } from './helpers/system';
import { exited, freeBasePort, isFree, stopForeman } from './helpers/ports';

/** Ports of Procfile.redis from foreman's base: five lines, 100 apart, and the two stores' metrics. */
const OFFSETS = [0, 100, 200, 300, 400, 201, 301];

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

// bin/start runs nf and hands it any stop signal as SIGINT; Ruby's foreman forwards SIGTERM itself.
for (const [name, command, args, program, pkg, signal] of [
  ['bin/start -j Procfile.redis', path.join(root, 'bin', 'start'), ['-j', 'Procfile.redis'], 'node', 'nodejs', 'SIGTERM'],
  ["Ruby's foreman start -f Procfile.redis", 'foreman', ['start', '-f', 'Procfile.redis'], 'foreman', 'ruby-foreman', 'SIGTERM'],
] as const) {
  describe(`Procfile.redis under foreman (${name})`, function () {
    let tmp: ReturnType<typeof tempDir>;
    let child: ChildProcess | undefined;
    let output = '';

    before(function () {
      requireRedis(this);
      requireProgram(this, program, pkg);
      tmp = tempDir();
    });
    after(async () => {
      await stopForeman(child, signal);
      tmp?.remove();
    });

    /** Starts foreman as the README says (no SESSION_KEYS: the webs share the key generated in the data directory) and waits for both webs to serve the page. */
    async function startForeman(base: number, jar: CookieJarClient): Promise<void> {
      output = '';
      child = spawn(command, [...args, '-p', String(base), '-e', NO_ENV_FILE.DOTENV_CONFIG_PATH], {
        cwd: root,
        env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? tmp.dir, STORE_DATA_DIR: tmp.dir, WEB_DATA_DIR: tmp.dir, ...NO_ENV_FILE },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
      child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
      for (const web of [base, base + 100]) await waitForHealthz(new CookieJarClient(`http://127.0.0.1:${web}`), () => output);
      // The stores may still be connecting to redis-server: the first page can be a 503.
      const probe = new CookieJarClient(jar.base);
      const end = Date.now() + 15_000;
      for (const web of [base, base + 100]) {
        probe.base = `http://127.0.0.1:${web}`;
        while ((await probe.get('/healthz')).status !== 200 || (await probe.get('/readyz')).status !== 200) {
          if (Date.now() > end) throw new Error(`${probe.base} never became ready:\n${output}`);
          await new Promise((r) => setTimeout(r, 100));
        }
      }
    }

    async function stop(base: number): Promise<void> {
      child!.kill(signal);
      await exited(child!);
      for (const offset of OFFSETS) assert.equal(await isFree(base + offset), true, `port ${base + offset} released`);
    }

    it('runs two webs, two stores and redis-server on the documented ports; a cookie jar alternating between the webs keeps its counters, also after a restart of everything; the signal stops all five', async () => {
      const base = await freeBasePort(OFFSETS);
      const webs = [`http://127.0.0.1:${base}`, `http://127.0.0.1:${base + 100}`];
      const jar = new CookieJarClient(webs[0]);
      await startForeman(base, jar);
      const counts: number[] = [];
      for (let i = 0; i < 4; i += 1) {
        jar.base = webs[i % 2];
        counts.push((await jar.page()).count1);
      }
      assert.deepEqual(counts, [0, 1, 2, 3]);
      const dump = await new Promise<string>((resolve, reject) =>
        execFile(path.join(root, 'bin', 'dump'), [`localhost:${base + 200}`], { env: { PATH: process.env.PATH ?? '', ...NO_ENV_FILE } }, (err, stdout) => (err ? reject(err) : resolve(stdout))),
      );
      assert.match(dump, /^[A-Za-z0-9_-]{24} \{"count1":3,"count2":0\}$/m, 'bin/dump against store1');
      for (const offset of [201, 301]) {
        const metrics = await fetch(`http://127.0.0.1:${base + offset}/metrics`);
        assert.match(await metrics.text(), /^store_live_entries 1$/m, `store metrics on base+${offset}`);
      }
      await stop(base);

      // The sessions are in redis-server's append-only file: a new run continues them.
      await startForeman(base, jar);
      for (let i = 0; i < 2; i += 1) {
        jar.base = webs[i % 2];
        counts.push((await jar.page()).count1);
      }
      assert.deepEqual(counts, [0, 1, 2, 3, 4, 5]);
      await stop(base);
    });
  });
}
