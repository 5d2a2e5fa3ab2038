import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createServer } from 'node:net';
import path from 'node:path';
import { createStoreClient } from '../services/client/store-client';
import { type Proc, root, startStore, tempDir } from './helpers/procs';

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

export function runDump(args: string[], env: Record<string, string> = {}): Promise<Run> {
  return new Promise((resolve) => {
    execFile(path.join(root, 'bin', 'dump'), args, { cwd: root, env: { PATH: process.env.PATH ?? '', ...env }, timeout: 20_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

/** A loopback port with nothing listening on it. */
export async function deadPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as { port: number };
  await new Promise((r) => server.close(r));
  return port;
}

describe('bin/dump (child process against a real store)', function () {
  let tmp: ReturnType<typeof tempDir>;
  let store: Proc;
  let address: string;

  before(async () => {
    tmp = tempDir();
    store = await startStore(tmp.dir);
    address = `127.0.0.1:${store.port}`;
    const client = createStoreClient({ address, deadlineMs: 2000 });
    await client.put('sess-b', Buffer.from('{"count1":3,"count2":1}'), { ttlMs: 60_000 });
    await client.put('sess-a', Buffer.from('{"count1":0,"count2":0}'), { ttlMs: 60_000 });
    client.close();
  });
  after(async () => {
    await store?.stop();
    tmp?.remove();
  });

  it('prints every entry, one "<key> <value>" per line, in key order', async () => {
    const run = await runDump([address]);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout, 'sess-a {"count1":0,"count2":0}\nsess-b {"count1":3,"count2":1}\n');
  });

  it('accepts http://host:port', async () => {
    const run = await runDump([`http://${address}`]);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout.split('\n').filter(Boolean).length, 2);
  });

  it('--json prints JSON Lines with key, value, version and expiry', async () => {
    const run = await runDump([address, '--json']);
    const lines = run.stdout.trim().split('\n').map((l) => JSON.parse(l));
    assert.equal(lines.length, 2);
    assert.equal(lines[1].key, 'sess-b');
    assert.deepEqual(JSON.parse(lines[1].value), { count1: 3, count2: 1 });
    assert.ok(lines[1].version > 0);
    assert.ok(Date.parse(lines[1].expiresAt) > Date.now());
  });

  it('an unreachable store: one clear line naming the address, exit 1', async () => {
    const port = await deadPort();
    const run = await runDump([`127.0.0.1:${port}`]);
    assert.equal(run.code, 1);
    assert.equal(run.stderr.trim().split('\n').length, 1);
    assert.match(run.stderr, new RegExp(`cannot dump the store at 127\\.0\\.0\\.1:${port}`));
  });

  it('usage errors exit 2', async () => {
    assert.equal((await runDump(['--no-such-option'])).code, 2);
    assert.equal((await runDump(['not an address'])).code, 2);
  });
});
