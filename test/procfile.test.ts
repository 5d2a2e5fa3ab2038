import assert from 'node:assert/strict';
import { type ChildProcess, execFile, execFileSync, spawn } from 'node:child_process';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import dotenv from 'dotenv';
import { CookieJarClient } from './helpers/browser';
import { NO_ENV_FILE, root, TEST_KEY, tempDir } from './helpers/procs';
import { requireProgram } from './helpers/system';
import { exited, freeBasePort, isFree, stopForeman } from './helpers/ports';

async function waitForPage(jar: CookieJarClient, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    try {
      // Up means the page works: the web and the store both (they start independently).
      if ((await jar.get('/healthz')).status === 200 && (await fetch(jar.base + '/')).status === 200) return;
    } catch {
      // not listening yet
    }
    if (Date.now() > end) throw new Error('the web service did not come up under foreman');
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Starts a foreman on the Procfile with its base port, data in dir and no .env, and waits until
 * the page works. output() is everything it printed so far.
 */
async function startForeman(command: string, args: readonly string[], base: number, dir: string, options: { detached?: boolean } = {}) {
  let output = '';
  const child = spawn(command, [...args, '-p', String(base), '-e', NO_ENV_FILE.DOTENV_CONFIG_PATH], {
    cwd: root,
    detached: options.detached ?? false,
    env: {
      PATH: process.env.PATH ?? '',
      HOME: process.env.HOME ?? dir,
      STORE_DATA_DIR: dir,
      WEB_DATA_DIR: dir,
      SESSION_KEYS: TEST_KEY,
      ...NO_ENV_FILE,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
  const jar = new CookieJarClient(`http://127.0.0.1:${base}`);
  const result = { child, jar, output: () => output };
  await waitForPage(jar).catch((err: Error) => {
    child.kill('SIGKILL');
    throw new Error(`${err.message}\n${output}`);
  });
  return result;
}

/** The lines of .env.example that set a variable to its default, uncommented. */
async function exampleDefaults(): Promise<string[]> {
  return (await readFile(path.join(root, '.env.example'), 'utf8'))
    .split('\n')
    .filter((line) => /^# [A-Z_]+=/.test(line))
    .map((line) => line.slice(2));
}

// nf forwards only SIGINT (Ctrl-C) to its processes; Ruby's foreman forwards SIGTERM too.
for (const [name, command, args, program, pkg, signal] of [
  ['foreman (npm, nf start)', path.join(root, 'node_modules', '.bin', 'nf'), ['start'], 'node', 'nodejs', 'SIGINT'],
  ["foreman (Ruby's foreman start)", 'foreman', ['start'], 'foreman', 'ruby-foreman', 'SIGTERM'],
] as const) {
  describe(`Procfile under ${name}`, function () {
    let tmp: ReturnType<typeof tempDir>;
    let child: ChildProcess | undefined;

    before(function () {
      requireProgram(this, program, pkg);
      tmp = tempDir();
    });
    after(async () => {
      await stopForeman(child, signal);
      tmp?.remove();
    });

    it(`starts the web on the base port, the store on base+100 (metrics base+101) and the web finds the store; the page counts and bin/dump sees the session; ${signal} stops both`, async () => {
      // No STORE_ADDRESS or STORE_METRICS_PORT: the Procfile derives them from the base port.
      const base = await freeBasePort([0, 100, 101]);
      const started = await startForeman(command, args, base, tmp.dir);
      child = started.child;
      const { jar } = started;
      assert.equal((await jar.page()).count1, 0);
      assert.equal((await jar.page()).count1, 1);
      const dump = await new Promise<string>((resolve, reject) =>
        execFile(path.join(root, 'bin', 'dump'), [`localhost:${base + 100}`], { env: { PATH: process.env.PATH ?? '', ...NO_ENV_FILE } }, (err, stdout) =>
          err ? reject(err) : resolve(stdout),
        ),
      );
      assert.match(dump, /^[A-Za-z0-9_-]{24} \{"count1":1,"count2":0\}$/m);
      const metrics = await fetch(`http://127.0.0.1:${base + 101}/metrics`);
      assert.match(await metrics.text(), /^# HELP store_rpc_handled_total /m, 'the store metrics next to the store port');
      child.kill(signal);
      await exited(child);
      assert.equal(await isFree(base), true, 'web port released');
      assert.equal(await isFree(base + 100), true, 'store port released');
    });
  });
}

// What `npm start` runs: nf under bin/start, which turns every stop signal into one SIGINT for nf.
describe('npm start (bin/start around nf start)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let child: ChildProcess | undefined;

  before(() => {
    tmp = tempDir();
  });
  afterEach(async () => {
    if (child?.pid !== undefined && child.exitCode === null && child.signalCode === null) {
      try {
        process.kill(-child.pid, 'SIGKILL');
      } catch {
        // gone
      }
      await exited(child);
    }
    child = undefined;
  });
  after(() => tmp?.remove());

  it('package.json\'s start script runs bin/start in place of its shell, so npm\'s signals reach it', async () => {
    const pkg = JSON.parse(await readFile(path.join(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> };
    assert.match(pkg.scripts.start, /&& exec bin\/start$/);
  });

  it('a service that cannot start ends npm start with a failure (nf itself would exit 0)', async () => {
    const base = await freeBasePort([0, 100, 101]);
    let output = '';
    child = spawn(path.join(root, 'bin', 'start'), ['-p', String(base), '-e', NO_ENV_FILE.DOTENV_CONFIG_PATH], {
      cwd: root,
      detached: true,
      env: { PATH: process.env.PATH ?? '', HOME: tmp.dir, STORE_DATA_DIR: tmp.dir, WEB_DATA_DIR: tmp.dir, STORE_MAX_TTL_MS: 'soon', ...NO_ENV_FILE },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
    assert.equal(await exited(child), 1, output);
    assert.match(output, /STORE_MAX_TTL_MS/, 'the store says why');
    assert.equal(await isFree(base), true, 'the web was stopped too');
  });

  it('when npm dies without passing a signal on (a SIGHUP of its own, a SIGKILL), it stops both services and frees their ports', async () => {
    const base = await freeBasePort([0, 100, 101]);
    // A shell stands for npm (and sets what npm sets for its scripts): it starts bin/start and is then killed outright.
    const script = `npm_lifecycle_event=start "${path.join(root, 'bin', 'start')}" "$@" & wait`;
    const started = await startForeman('sh', ['-c', script, 'sh'], base, path.join(tmp.dir, 'orphaned'), { detached: true });
    child = started.child;
    assert.equal((await started.jar.page()).count1, 0);
    child.kill('SIGKILL');
    await exited(child);
    const end = Date.now() + 15_000;
    while (!(await isFree(base)) || !(await isFree(base + 100))) {
      if (Date.now() > end) assert.fail(`the services are still running\n${started.output()}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.match(started.output(), /"msg":"stopping: NOT_SERVING/, 'the store stopped gracefully');
  });

  it('started directly (not by npm), it outlives the shell that started it (nohup bin/start &), and still stops on SIGTERM', async () => {
    const base = await freeBasePort([0, 100, 101]);
    const script = `"${path.join(root, 'bin', 'start')}" "$@" & echo "bin/start pid $!"; wait`;
    const started = await startForeman('sh', ['-c', script, 'sh'], base, path.join(tmp.dir, 'direct'), { detached: true });
    child = started.child;
    const pid = Number(/^bin\/start pid (\d+)$/m.exec(started.output())?.[1]);
    assert.ok(pid > 0, started.output());
    child.kill('SIGKILL');
    await exited(child);
    await new Promise((r) => setTimeout(r, 1500)); // three of the lost-parent checks it would make under npm
    try {
      assert.equal((await started.jar.page()).count1, 0, 'the site is still up');
    } finally {
      process.kill(pid, 'SIGTERM');
      const end = Date.now() + 15_000;
      while (!(await isFree(base)) || !(await isFree(base + 100))) {
        if (Date.now() > end) assert.fail(`SIGTERM did not stop the services\n${started.output()}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  });

  it('nf itself killed (kill -9): bin/start stops both services gracefully, frees their ports and exits 1', async () => {
    const base = await freeBasePort([0, 100, 101]);
    const started = await startForeman(path.join(root, 'bin', 'start'), [], base, path.join(tmp.dir, 'nf-killed'), { detached: true });
    child = started.child;
    assert.equal((await started.jar.page()).count1, 0);
    const nfPid = Number(execFileSync('pgrep', ['-P', String(child.pid)]).toString().trim().split('\n')[0]);
    assert.ok(nfPid > 0);
    process.kill(nfPid, 'SIGKILL');
    assert.equal(await exited(child), 1);
    const end = Date.now() + 15_000;
    while (!(await isFree(base)) || !(await isFree(base + 100))) {
      if (Date.now() > end) assert.fail(`the services are still running\n${started.output()}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  });

  it('.env.example with every default uncommented is the default set-up: one PORT, with STORE_ADDRESS and STORE_METRICS_PORT where npm start puts the store', async () => {
    const lines = await exampleDefaults();
    const names = lines.map((line) => line.slice(0, line.indexOf('=')));
    assert.deepEqual(names.filter((name, i) => names.indexOf(name) !== i), [], 'each variable once: both services read the one .env');
    const env = dotenv.parse(lines.join('\n'));
    assert.equal(env.STORE_ADDRESS, `127.0.0.1:${Number(env.PORT) + 100}`, 'the web reaches the store foreman starts at PORT + 100');
    assert.equal(env.STORE_METRICS_PORT, String(Number(env.PORT) + 101));
  });

  it('.env.example\'s defaults uncommented mean the same to Ruby\'s foreman as to dotenv (npm start, the services): it takes the rest of a line as the value', async function () {
    requireProgram(this, 'foreman', 'ruby-foreman');
    const file = path.join(tmp.dir, 'example.env');
    writeFileSync(file, `${(await exampleDefaults()).join('\n')}\n`);
    const printEnv = [process.execPath, '-e', 'process.stdout.write(JSON.stringify(process.env))'];
    const seen = JSON.parse(execFileSync('foreman', ['run', '-e', file, ...printEnv], { cwd: root, env: { PATH: process.env.PATH ?? '', HOME: tmp.dir } }).toString()) as Record<string, string>;
    const expected = dotenv.parse(await readFile(file));
    assert.deepEqual(Object.fromEntries(Object.keys(expected).map((name) => [name, seen[name]])), expected);
  });

  it('the caller\'s variables win over .env, as for the services run alone (nf would put .env over them)', async () => {
    const base = await freeBasePort([0, 100, 101]);
    const other = base + 50; // what .env says: the web must not listen there
    // A directory of its own with the Procfile and the build, so its .env is the one in the working directory.
    const dir = path.join(tmp.dir, 'dotenv');
    mkdirSync(dir, { recursive: true });
    symlinkSync(path.join(root, 'Procfile'), path.join(dir, 'Procfile'));
    symlinkSync(path.join(root, 'dist'), path.join(dir, 'dist'));
    writeFileSync(path.join(dir, '.env'), `PORT=${other}\nSTORE_DEADLINE_MS=700\n`);
    let output = '';
    child = spawn(path.join(root, 'bin', 'start'), [], {
      cwd: dir,
      detached: true,
      env: { PATH: process.env.PATH ?? '', HOME: dir, STORE_DATA_DIR: dir, WEB_DATA_DIR: dir, SESSION_KEYS: TEST_KEY, PORT: String(base) },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
    await waitForPage(new CookieJarClient(`http://127.0.0.1:${base}`)).catch((err: Error) => assert.fail(`${err.message}\n${output}`));
    assert.match(output, /"deadlineMs":700/, 'the rest of .env still applies');
    await stopForeman(child, 'SIGTERM');
  });

  // 'group SIGINT' is Ctrl-C in a terminal: every process of the foreground group gets it.
  for (const how of ['SIGTERM', 'SIGHUP', 'group SIGINT'] as const) {
    it(`${how} to it stops both services gracefully, once each, and frees their ports`, async () => {
      const base = await freeBasePort([0, 100, 101]);
      // detached: the launcher leads a process group, as npm does in a terminal.
      const started = await startForeman(path.join(root, 'bin', 'start'), [], base, path.join(tmp.dir, how), { detached: true });
      child = started.child;
      const { jar } = started;
      assert.equal((await jar.page()).count1, 0);
      if (how === 'group SIGINT') process.kill(-child.pid!, 'SIGINT');
      else child.kill(how);
      const code = await exited(child);
      const output = started.output();
      assert.equal(await isFree(base), true, `web port released\n${output}`);
      assert.equal(await isFree(base + 100), true, 'store port released');
      assert.match(output, /"msg":"stopping: NOT_SERVING/, 'the store stopped gracefully');
      assert.doesNotMatch(output, /second signal/, 'one stop signal per service');
      assert.equal(code, 0, output);
    });
  }
});
