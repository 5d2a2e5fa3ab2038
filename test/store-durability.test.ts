import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { createStoreClient, type StoreClient } from '../services/client/store-client';
import { SqliteBackend } from '../services/store/backends/sqlite';
import { root, startStore, tempDir } from './helpers/procs';

interface Expected {
  /** The last put of this key that was answered OK. */
  acked?: { value: string; version: number };
  /** A put sent but not answered when the store died: it may or may not have landed. */
  unanswered?: string;
}

describe('store durability (real store process, SIGKILL mid-load)', function () {
  this.timeout(60_000);

  for (const synchronous of ['FULL', 'NORMAL'] as const) {
    it(`STORE_SYNCHRONOUS=${synchronous}: every Put answered OK before kill -9 is there after a restart with its value and version, and the database passes integrity_check`, async () => {
      const tmp = tempDir();
      const env = { STORE_SYNCHRONOUS: synchronous };
      let store = await startStore(tmp.dir, env);
      let client: StoreClient | undefined = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 5000 });
      try {
        const expected = new Map<string, Expected>();
        let acked = 0;
        let killed = false;
        const writers = 32;
        const keysPerWriter = 40;
        // Each writer overwrites its own keys in turn, so a key has at most one put in flight.
        const writer = async (w: number) => {
          for (let i = 0; !killed; i += 1) {
            const key = `d:${w}:${i % keysPerWriter}`;
            const value = `${w}:${i}:${'x'.repeat(i % 200)}`;
            const slot = expected.get(key) ?? {};
            expected.set(key, slot);
            slot.unanswered = value;
            try {
              const entry = await client!.put(key, Buffer.from(value), { ttlMs: 3_600_000 });
              slot.acked = { value, version: entry.version };
              slot.unanswered = undefined;
              acked += 1;
            } catch {
              return; // the store died under this call: its outcome is unknown
            }
          }
        };
        const load = Promise.all(Array.from({ length: writers }, (_, w) => writer(w)));
        // 12,000 puts of 1,280 keys: past 10,000 superseded rows, so compaction runs (copying live
        // rows to the end of the log and deleting the oldest) when the store is killed.
        while (acked < 12_000) await new Promise((r) => setTimeout(r, 5));
        store.child.kill('SIGKILL');
        killed = true;
        await store.stop();
        await load;
        client.close();
        client = undefined;

        const db = new Database(path.join(tmp.dir, 'sessions.db'));
        assert.equal(db.pragma('integrity_check', { simple: true }), 'ok');
        const rows = (db.prepare('SELECT count(*) AS n FROM log').get() as { n: number }).n;
        db.close();
        assert.ok(rows < acked, `compaction ran before the kill (${rows} log rows for ${acked} puts)`);

        store = await startStore(tmp.dir, env);
        client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 5000 });
        const stored = new Map<string, { value: string; version: number }>();
        for await (const entry of client.list({ prefix: 'd:' })) stored.set(entry.key, { value: entry.value.toString(), version: entry.version });

        let lost = 0;
        let checked = 0;
        for (const [key, slot] of expected) {
          const found = stored.get(key);
          if (!slot.acked) {
            if (found) assert.equal(found.value, slot.unanswered, `${key}: only the unanswered put could have written it`);
            continue;
          }
          checked += 1;
          if (!found) {
            lost += 1;
            continue;
          }
          const isAcked = found.value === slot.acked.value && found.version === slot.acked.version;
          const isLater = found.value === slot.unanswered && found.version > slot.acked.version;
          if (!isAcked && !isLater) lost += 1;
        }
        assert.ok(acked >= 12_000 && checked > 0);
        assert.equal(lost, 0, `${lost} of ${checked} acknowledged keys lost or rolled back (${acked} puts acknowledged)`);

        // Versions keep growing across the crash.
        const [key, slot] = [...expected].find(([, s]) => s.acked)!;
        const before = stored.get(key)!.version;
        const after = await client.put(key, Buffer.from('after restart'), { ttlMs: 60_000 });
        assert.ok(after.version > before && after.version > slot.acked!.version);
      } finally {
        client?.close();
        await store.stop();
        tmp.remove();
      }
    });
  }

  it("the README's backup command finishes while the store takes steady writes, and the copy is whole and for the store's user alone", async () => {
    const readme = readFileSync(path.join(root, 'README.md'), 'utf8');
    const command = /^node -e "(.*require\('better-sqlite3'\)\('var\/sessions\.db'.*)"$/m.exec(readme)?.[1];
    assert.ok(command, 'the backup command is in the README');
    const tmp = tempDir();
    const store = await startStore(tmp.dir, { STORE_SYNCHRONOUS: 'NORMAL' });
    const client = createStoreClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 5000 });
    let writing = true;
    try {
      const value = Buffer.alloc(2000, 'v');
      // 10 MB: a copy of 100 pages a step takes 25 steps, and a write between two restarts it.
      for (let i = 0; i < 5000; i += 100) await Promise.all(Array.from({ length: 100 }, (_, j) => client.put(`k${i + j}`, value, { ttlMs: 600_000 })));
      let puts = 0;
      const load = (async () => {
        while (writing) await client.put(`k${puts++ % 5000}`, value, { ttlMs: 600_000 });
      })();
      const backup = path.join(tmp.dir, 'sessions-backup.db');
      const started = Date.now();
      const code = await new Promise<number | null>((resolve) => {
        const child = spawn(process.execPath, ['-e', command.replaceAll('var/', `${tmp.dir}/`)], { cwd: root, stdio: 'inherit' });
        const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
        child.once('exit', (exitCode) => {
          clearTimeout(timer);
          resolve(exitCode);
        });
      });
      writing = false;
      await load;
      assert.equal(code, 0, `the backup did not finish within ${Date.now() - started} ms, during ${puts} writes`);
      assert.equal((statSync(backup).mode & 0o777).toString(8), '600', 'the copy of every session is readable by its user alone');
      const copy = new Database(backup, { readonly: true });
      try {
        assert.equal(copy.pragma('integrity_check', { simple: true }), 'ok');
        assert.equal(copy.prepare('SELECT count(*) FROM keys').pluck().get(), 5000);
      } finally {
        copy.close();
      }
    } finally {
      writing = false;
      client.close();
      await store.stop();
      tmp.remove();
    }
  });

  it('checkpoints run off the request path: the worker copies the WAL into the database and empties it once writes stop', async () => {
    const tmp = tempDir();
    const backend = new SqliteBackend({ dataDir: tmp.dir, synchronous: 'FULL', sweepIntervalMs: 0, sweepBatch: 200, maxOpsPerCommit: 2000, checkpointIntervalMs: 20 });
    try {
      const value = Buffer.alloc(1000, 1);
      for (let round = 0; round < 5; round += 1) {
        await backend.batch(Array.from({ length: 500 }, (_, i) => ({ kind: 'put' as const, key: `w:${round}:${i}`, value, ttlMs: 60_000 })));
      }
      const wal = path.join(tmp.dir, 'sessions.db-wal');
      assert.ok(existsSync(wal) && statSync(wal).size > 0, 'writes went to the WAL');
      // SQLite's own checkpoint (on commit) never truncates the WAL; only the worker's TRUNCATE does.
      const deadline = Date.now() + 10_000;
      while (statSync(wal).size > 0) {
        assert.ok(Date.now() < deadline, `the WAL is still ${statSync(wal).size} bytes`);
        await new Promise((r) => setTimeout(r, 20));
      }
      const db = new Database(path.join(tmp.dir, 'sessions.db'), { readonly: true });
      assert.equal((db.prepare('SELECT count(*) AS n FROM log').get() as { n: number }).n, 2500);
      db.close();
    } finally {
      await backend.close();
      tmp.remove();
    }
  });
  it('countLive counts live entries only, with the checkpoint worker or without, two counts at once agree, and it is 0 once closed', async () => {
    const tmp = tempDir();
    const options = { dataDir: tmp.dir, synchronous: 'NORMAL' as const, sweepIntervalMs: 0, sweepBatch: 200, maxOpsPerCommit: 100_000 };
    const backend = new SqliteBackend(options);
    try {
      const value = Buffer.from('{}');
      await backend.batch(Array.from({ length: 50_000 }, (_, i) => ({ kind: 'put' as const, key: `c:${i}`, value, ttlMs: 60_000 })));
      await backend.batch(Array.from({ length: 100 }, (_, i) => ({ kind: 'put' as const, key: `d:${i}`, value, ttlMs: 1 })));
      await new Promise((r) => setTimeout(r, 20));
      assert.deepEqual(await Promise.all([backend.countLive(), backend.countLive()]), [50_000, 50_000]);
    } finally {
      await backend.close();
    }
    assert.equal(await backend.countLive(), 0);
    // The same directory opened again (one store at a time holds it), checkpoints inline this time.
    const inline = new SqliteBackend({ ...options, checkpoint: 'inline' });
    try {
      assert.equal(await inline.countLive(), 50_000);
    } finally {
      await inline.close();
    }
    tmp.remove();
  });
});
