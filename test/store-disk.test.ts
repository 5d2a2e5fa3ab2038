import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync, statfsSync, unlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { createPipeClient } from '../services/client/pipe-client';
import { type StoreClient, StoreClientError } from '../services/client/store-client';
import { type Proc, startStore, tempDir, waitForLine } from './helpers/procs';
import { mountTmpfs, requireProgram, type Tmpfs } from './helpers/system';

const TTL = { ttlMs: 3_600_000 };
const VALUE = Buffer.alloc(2000, 'v');

describe('SQLite store on a disk that fills up (real store process on a 4 MiB tmpfs)', function () {
  this.timeout(60_000);
  let disk: Tmpfs | undefined;
  let store: Proc | undefined;
  let client: StoreClient | undefined;

  beforeEach(async function () {
    disk = mountTmpfs(this, 4);
    store = await startStore(disk.dir, { STORE_SYNCHRONOUS: 'FULL' });
    client = createPipeClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 5000 });
  });
  afterEach(async () => {
    client?.close();
    await store?.stop('SIGKILL');
    disk?.remove();
  });

  /** Fills what is left of the disk with a file of its own (dd stops with "no space left"). */
  const fill = () => {
    try {
      execFileSync('dd', ['if=/dev/zero', `of=${path.join(disk!.dir, 'filler')}`, 'bs=64k'], { stdio: 'ignore' });
    } catch {
      // the disk is full
    }
  };

  it('Gets that share a commit with Puts the full disk refuses still answer; the Puts answer UNAVAILABLE', async () => {
    const versions = new Map<string, number>();
    for (let i = 0; i < 100; i += 1) versions.set(`k${i}`, (await client!.put(`k${i}`, VALUE, TTL)).version);
    fill();
    // Until the write-ahead log has no room left either.
    for (let i = 0; i < 500; i += 1) await client!.put(`w${i}`, VALUE, TTL).catch(() => undefined);

    const refused: string[] = [];
    const gets = await Promise.all(
      [...versions].map(async ([key], i) => {
        // Issued in the same turn: the pipe client sends them together, the store commits them together.
        const put = client!.put(`new${i}`, VALUE, TTL).then(
          () => assert.fail('a put succeeded on a full disk'),
          (err: StoreClientError) => refused.push(`${err.code} ${err.message}`),
        );
        const entry = await client!.get(key);
        await put;
        return [key, entry?.version] as const;
      }),
    );
    assert.equal(new Set(refused).size, 1, refused.join('\n'));
    assert.match(refused[0], /^14 sqlite: database or disk is full \(the disk of the data directory, STORE_DATA_DIR, is full: \d+ KiB free\)$/);
    // The store's own log says why, not only its callers'.
    await waitForLine(store!, (line) => line.includes('"failed":{"UNAVAILABLE"') && line.includes('"error":"sqlite: database or disk is full (the disk of the data directory, STORE_DATA_DIR, is full'));
    for (const [key, version] of gets) assert.equal(version, versions.get(key), key);

    unlinkSync(path.join(disk!.dir, 'filler'));
    const after = await client!.put('after', VALUE, TTL);
    assert.equal((await client!.get('after'))?.version, after.version);
    // Telling the full disk apart touched no file SQLite holds open: the directory is still locked.
    const second = await startStore(disk!.dir).then(
      async (other) => {
        await other.stop('SIGKILL');
        return 'a second store started';
      },
      (err: Error) => err.message,
    );
    assert.match(second, /in use by another store process/);
  });
});

describe('SQLite store starting on a full or read-only disk (real store process on a 4 MiB tmpfs)', function () {
  this.timeout(60_000);
  let disk: Tmpfs | undefined;

  beforeEach(function () {
    disk = mountTmpfs(this, 4);
  });
  afterEach(() => disk?.remove());

  const startFailure = (dataDir: string) =>
    startStore(dataDir).then(
      async (store) => {
        await store.stop('SIGKILL');
        return 'it started';
      },
      (err: Error) => err.message,
    );

  it('a full disk stops the start with a message naming the lock file, STORE_DATA_DIR and the full disk; freed, the next start works', async () => {
    const dataDir = path.join(disk!.dir, 'data');
    try {
      execFileSync('dd', ['if=/dev/zero', `of=${path.join(disk!.dir, 'filler')}`, 'bs=64k'], { stdio: 'ignore' });
    } catch {
      // the disk is full
    }
    const message = await startFailure(dataDir);
    assert.match(message, /exited with 1 before listening/);
    assert.match(message, new RegExp(`store: cannot start: cannot open ${dataDir}/sessions\\.lock: database or disk is full \\(the disk of the data directory, STORE_DATA_DIR, is full: 0 KiB free\\)`));

    unlinkSync(path.join(disk!.dir, 'filler'));
    const store = await startStore(dataDir);
    const client = createPipeClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 5000 });
    try {
      const entry = await client.put('k', VALUE, TTL);
      assert.equal((await client.get('k'))?.version, entry.version);
    } finally {
      client.close();
      await store.stop();
    }
  });

  it('whatever a first start on a nearly full disk leaves behind does not stop the next start once there is room', async () => {
    const refused: string[] = [];
    for (let leftKiB = 0; leftKiB <= 96; leftKiB += 4) {
      const dataDir = path.join(disk!.dir, `d${leftKiB}`);
      mkdirSync(dataDir);
      const filler = path.join(disk!.dir, 'filler');
      const space = statfsSync(disk!.dir);
      execFileSync('fallocate', ['-l', String(space.bavail * space.bsize - leftKiB * 1024), filler]);
      await startFailure(dataDir);
      unlinkSync(filler);
      const next = await startFailure(dataDir);
      if (next !== 'it started') refused.push(`${leftKiB} KiB left at first: ${next.split('\n').find((l) => l.startsWith('store:')) ?? next}`);
      rmSync(dataDir, { recursive: true, force: true });
    }
    assert.deepEqual(refused, []);
  });

  it('a data directory to create on a read-only file system is refused as read-only, not as a missing parent', async () => {
    execFileSync('mount', ['-o', 'remount,ro', disk!.dir]);
    const message = await startFailure(path.join(disk!.dir, 'data'));
    assert.match(message, /cannot create the directory: EROFS: read-only file system/);
    assert.match(message, /STORE_DATA_DIR=/);
  });
});

describe('SQLite store on a file system that turns read-only (real store process on a 16 MiB ext4 image)', function () {
  this.timeout(60_000);
  let image: { dir: string; remove(): void } | undefined;
  let mountPoint: string | undefined;
  let store: Proc | undefined;

  before(function () {
    requireProgram(this, 'mkfs.ext4', 'e2fsprogs');
    image = tempDir('sessions-ext4-');
    const file = path.join(image.dir, 'disk.img');
    execFileSync('truncate', ['-s', '16M', file]);
    execFileSync('mkfs.ext4', ['-q', '-F', file]);
    mountPoint = path.join(image.dir, 'mnt');
    mkdirSync(mountPoint);
    try {
      if (process.getuid?.() !== 0) throw new Error('mount needs root');
      execFileSync('mount', ['-o', 'loop,errors=remount-ro', file, mountPoint], { stdio: 'pipe' });
    } catch (err) {
      mountPoint = undefined;
      const message = `cannot mount an ext4 image (${(err as Error).message.split('\n')[0]})`;
      if (process.env.CI && process.getuid?.() !== 0) throw new Error(`${message}; CI runs as root and must run every suite`);
      process.stdout.write(`  skipped: ${message}\n`);
      this.skip();
    }
  });
  after(async () => {
    await store?.stop('SIGKILL');
    if (mountPoint) execFileSync('umount', [mountPoint], { stdio: 'pipe' });
    image?.remove();
  });

  it('writes answer UNAVAILABLE naming the read-only file system; acknowledged ones still read', async function () {
    const device = path.basename(execFileSync('findmnt', ['-n', '-o', 'SOURCE', mountPoint!]).toString().trim());
    const trigger = `/sys/fs/ext4/${device}/trigger_fs_error`;
    if (!existsSync(trigger)) {
      process.stdout.write(`  skipped: this kernel has no ${trigger} to turn ext4 read-only\n`);
      this.skip();
    }
    store = await startStore(path.join(mountPoint!, 'data'));
    const client = createPipeClient({ address: `127.0.0.1:${store.port}`, deadlineMs: 5000 });
    try {
      const before = await client.put('k', VALUE, TTL);
      try {
        writeFileSync(trigger, '1'); // ext4_error: with errors=remount-ro, the file system turns read-only
      } catch (err) {
        // A container may mount sysfs read-only.
        process.stdout.write(`  skipped: cannot write ${trigger} (${(err as Error).message})\n`);
        this.skip();
      }
      await assert.rejects(client.put('k2', VALUE, TTL), (err: StoreClientError) => {
        assert.equal(`${err.code} ${err.message}`, '14 sqlite: disk I/O error (the data directory, STORE_DATA_DIR, is on a read-only file system)');
        return true;
      });
      assert.equal((await client.get('k'))?.version, before.version);
    } finally {
      client.close();
    }
  });
});
