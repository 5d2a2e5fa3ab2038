import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import ts from 'typescript';
import { CookieJarClient } from './helpers/browser';
import { exited, freeBasePort } from './helpers/ports';
import { type Proc, root, startStore, startWeb, TEST_KEY, tempDir } from './helpers/procs';

const HEADING = '## Using the session middleware in your own Koa app';

/** The first ```ts block after the heading, as a reader would copy it. */
function readmeExample(): string {
  const readme = readFileSync(path.join(root, 'README.md'), 'utf8');
  const section = readme.indexOf(`\n${HEADING}\n`);
  assert.notEqual(section, -1, `README.md has no "${HEADING}" section`);
  const block = /\n```ts\n([\s\S]*?)\n```\n/.exec(readme.slice(section));
  assert.ok(block, `no \`\`\`ts block under "${HEADING}"`);
  return block[1];
}

/**
 * The example as CommonJS, its `./services/...` imports (relative to the repository root, where the
 * README says to save it) pointed at the built files, so the test runs what the README shows.
 */
function compileExample(dir: string): string {
  const { outputText } = ts.transpileModule(readmeExample(), {
    compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022, esModuleInterop: true },
  });
  const services = path.join(root, 'dist', 'services');
  const js = outputText.replace(/require\((["'])\.\/services\//g, (_, quote: string) => `require(${quote}${services}/`);
  assert.notEqual(js, outputText, 'the example imports nothing from ./services/');
  const file = path.join(dir, 'my-app.js');
  writeFileSync(file, js);
  return file;
}

interface Example {
  child: ChildProcess;
  output: string[];
}

/** Runs the compiled example; resolves once it says it listens, or rejects with its output if it exits first. */
function runExample(file: string, env: Record<string, string>): Promise<Example> {
  // NODE_PATH: the file is outside the repository, and its own imports (koa, @koa/router) are bare names.
  const child = spawn(process.execPath, [file], {
    env: { PATH: process.env.PATH ?? '', NODE_PATH: path.join(root, 'node_modules'), ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const output: string[] = [];
  createInterface({ input: child.stderr! }).on('line', (line) => output.push(line));
  return new Promise((resolve, reject) => {
    createInterface({ input: child.stdout! }).on('line', (line) => {
      output.push(line);
      if (line.startsWith('listening on ')) resolve({ child, output });
    });
    void exited(child).then((code) => reject(new Error(`the example exited with ${code}:\n${output.join('\n')}`)));
  });
}

describe('the Koa example in README.md runs as written (against a real store)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let file: string;
  let app: Example | undefined;

  before(async () => {
    tmp = tempDir();
    file = compileExample(tmp.dir);
    store = await startStore(tmp.dir);
  });
  after(async () => {
    if (app && app.child.exitCode === null) {
      app.child.kill();
      await exited(app.child);
    }
    await store?.stop();
    tmp?.remove();
  });

  it('without SESSION_KEYS it stops at once with an error naming the variable', async () => {
    const child = spawn(process.execPath, [file], { env: { PATH: process.env.PATH ?? '', NODE_PATH: path.join(root, 'node_modules') } });
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    assert.equal(await exited(child), 1);
    assert.match(stderr, /Error: set SESSION_KEYS/);
  });

  it('next to the counter site that npm start serves, one browser keeps a session in each: cookies belong to the host, not the port', async () => {
    const port = await freeBasePort([0]);
    const example = await runExample(file, { PORT: String(port), STORE_ADDRESS: `127.0.0.1:${store.port}`, SESSION_KEYS: TEST_KEY });
    const site = await startWeb(store.port, tmp.dir, { SESSION_KEYS: `${TEST_KEY}-site` });
    try {
      const browser = new CookieJarClient(`http://127.0.0.1:${port}`);
      const at = async (base: string, form?: Record<string, string>) => {
        browser.base = base;
        return (await (form ? browser.post('/add', form) : browser.get('/'))).text();
      };
      const exampleBase = browser.base;
      const siteBase = `http://127.0.0.1:${site.port}`;
      await at(exampleBase, {});
      assert.match(await at(siteBase), /Counter 1: 0\b/);
      assert.match(await at(exampleBase), /^items: 1; /, 'a visit to the counter site lost the cart');
      assert.match(await at(siteBase), /Counter 1: 1\b/, 'a visit to the example lost the counters');
      assert.ok(!site.lines.some((line) => line.includes('suspicious session cookie')), "the counter site took the example's cookie for a forged one");
    } finally {
      example.child.kill();
      await exited(example.child);
      await site.stop();
    }
  });

  it('listens on PORT; GET / shows 0 items, POST /add redirects (303) and GET / shows 1; with the store stopped, 503', async () => {
    const port = await freeBasePort([0]);
    app = await runExample(file, { PORT: String(port), STORE_ADDRESS: `127.0.0.1:${store.port}`, SESSION_KEYS: TEST_KEY });
    assert.deepEqual(app.output, [`listening on http://localhost:${port}`]);
    const jar = new CookieJarClient(`http://127.0.0.1:${port}`);

    const first = await jar.get('/');
    assert.equal(first.status, 200);
    assert.match(await first.text(), /^items: 0; token: \S+$/);
    const added = await jar.post('/add', {}, false);
    assert.equal(added.status, 303);
    assert.equal(added.headers.get('location'), '/');
    assert.ok(jar.cookies.has('cart_sid'), 'the first update sets the session cookie');
    assert.match(await (await jar.get('/')).text(), /^items: 1; /);

    await store.stop();
    const down = await jar.get('/');
    assert.equal(down.status, 503);
    assert.equal(down.headers.get('retry-after'), '1');
  });
});
