import { EventEmitter } from 'node:events';
import { closeSync, mkdirSync, openSync, statfsSync, unlinkSync } from 'node:fs';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import Database from 'better-sqlite3';
import {
  type Backend,
  type BackendOp,
  type BackendResult,
  type ChangeEvent,
  type ListOptions,
  type StoredEntry,
  EMPTY_VALUE,
  StoreError,
  versionConflict,
  nextVersion,
  versionsAbove,
} from './backend';
import type { CheckpointerSettings } from './sqlite-checkpointer';
import { DEFAULT_MAX_KEYS, KeyDir, type KeyState, MAX_KEYDIR_KEYS } from './sqlite-keydir';

export interface SqliteOptions {
  /** Directory holding sessions.db (created if missing). */
  dataDir: string;
  /** FULL survives power loss; NORMAL survives a process crash (WAL either way). */
  synchronous: 'FULL' | 'NORMAL';
  /** How often the expiry sweeper runs. */
  sweepIntervalMs: number;
  /** Most expired keys removed per sweeper step (bounds the event-loop pause). */
  sweepBatch: number;
  /** Most operations committed in one transaction; more wait for the next turn of the loop. */
  maxOpsPerCommit: number;
  /**
   * Where WAL checkpoints run. 'worker' (default): a worker thread with its own connection, off
   * the request path. 'inline': SQLite's automatic checkpoint inside the commit that crosses
   * 1000 pages (stalls that request; kept for comparison and as the fallback).
   */
  checkpoint?: 'worker' | 'inline';
  /** How often the checkpoint worker runs (default 100 ms). */
  checkpointIntervalMs?: number;
  /**
   * Most keys held (live, or expired and not swept yet; default 10 million). A put that would
   * create one more first removes expired keys the sweeper has not reached, and is refused as
   * unavailable if none are left; updates and deletes still work. This bounds the
   * index's memory (~110 bytes a key).
   */
  maxEntries?: number;
}

/** The oldest rows of the log, as compaction reads them: seq, key. */
type HeadRow = [number, string, number];

interface Pending {
  ops: readonly BackendOp[];
  resolve: (results: BackendResult[]) => void;
}

const SCHEMA_VERSION = 2;
/**
 * Keys per List query: each page is a fresh indexed seek (no read transaction held between pages),
 * so bigger pages cost fewer seeks; 1000 keys take a few ms of synchronous work.
 */
const LIST_PAGE = 1000;
/** Compaction starts once the log holds more superseded rows than this and than live keys. */
const MIN_GARBAGE = 10_000;
/** Log rows compaction reads per queued write (it must reclaim rows faster than writes add them). */
const COMPACT_PER_WRITE = 4;
/** Fewest log rows compaction reads at once: each query has a fixed cost worth spreading. */
const COMPACT_MIN_ROWS = 256;
/**
 * Bytes of live values compaction copies per commit: at least this, else COMPACT_PER_WRITE times
 * what the commit's puts write. Rows alone did not bound it: with big sessions at the old end of the
 * log, one Batch of a put and 999 gets (9 KB) copied 4,000 values of 64 KB, 256 MB, in one
 * transaction: the event loop was held for seconds and the WAL grew to 264 MB.
 */
const COMPACT_MIN_BYTES = 1024 * 1024;
/** Log rows the rebuild at start-up reads per query (seqs start at 1: the first page is seq > 0). */
const LOAD_PAGE = 10_000;
/** Slots the sweeper looks at per step (a few ms at most). */
const SWEEP_SCAN = 65_536;
/** Keys the index moves per sweeper step when it gives memory back (a Map update each: a few ms). */
const PACK_MOVES = 4096;

/**
 * The embedded default backend: one SQLite file in WAL mode. Every operation goes through one
 * queue that is committed on setImmediate, many operations per transaction (group commit), so a
 * synchronous=FULL fsync is paid once per turn of the event loop, not once per write.
 *
 * Layout: writes are appended to a log table (a put, a refreshed expiry or a delete's tombstone
 * is a new row at the end), and an in-memory index (KeyDir) knows each key's latest row. An
 * update in place would dirty the B-tree page where the key happens to sit: with a million keys
 * every write dirtied its own pages (and the expiry index's), and throughput fell to ~0.6x that
 * with a thousand. Appends dirty the same last pages whatever the number of keys. Superseded rows
 * are reclaimed from the oldest end of the log (live ones copied to the end, then the oldest rows
 * deleted as one range); the index is rebuilt from the log at start-up (2-3 s per million rows here).
 * A `keys` table (written only when a key is created or removed) gives List its key order.
 */
export class SqliteBackend implements Backend {
  readonly name = 'sqlite';
  private readonly db: Database.Database;
  private readonly events = new EventEmitter();
  private queue: Pending[] = [];
  private flushScheduled = false;
  private closed = false;
  private sweeper: NodeJS.Timeout | undefined;
  private checkpointer: Worker | undefined;
  private catchUp = false;
  private readonly keydir = new KeyDir();
  private readonly maxEntries: number;
  /** Rows in the log (compaction's trigger; counting them would read the whole table). */
  private logRows = 0;
  /** A sweeper pass is under way (it goes on in later turns until it has looked at every key). */
  private sweeping = false;
  /** Where the sweeper goes on in the KeyDir's slots. */
  private sweepFrom = 0;
  /** Where a put that finds the store full goes on looking for expired keys (see makeRoom). */
  private roomFrom = 0;
  /** Slots makeRoom may still look at in the current transaction. */
  private roomScan = 0;
  /** Held while the store is open: see lockDataDir. */
  private readonly dirLock: Database.Database;
  /** What the rebuild of the index at start-up read, and how long it took (the port stays closed meanwhile). */
  readonly rebuilt: Rebuilt;
  private readonly stmt: {
    append: Database.Statement<[string, Buffer | null, number, number, number]>;
    value: Database.Statement<[number], Buffer | null>;
    values: Database.Statement<[string], [number, Buffer | null]>;
    head: Database.Statement<[number], HeadRow>;
    dropHead: Database.Statement<[number]>;
    keepDroppedVersion: Database.Statement<[number]>;
    addKey: Database.Statement<[string]>;
    removeKey: Database.Statement<[string]>;
    listKeys: Database.Statement<[string, string, number], string>;
  };

  constructor(private readonly options: SqliteOptions) {
    this.maxEntries = Math.min(options.maxEntries ?? DEFAULT_MAX_KEYS, MAX_KEYDIR_KEYS);
    mkdirSync(options.dataDir, { recursive: true });
    this.dirLock = lockDataDir(options.dataDir);
    const file = path.join(options.dataDir, 'sessions.db');
    try {
      this.db = new Database(file);
    } catch (err) {
      this.dirLock.close();
      throw naming(file, err);
    }
    try {
      requireWalResetFix(this.db.prepare<[], string>('SELECT sqlite_version()').pluck().get()!);
      // Before anything is changed in it (journal_mode = WAL is written into the file).
      requireStoreDatabase(this.db, file);
      this.db.pragma('journal_mode = WAL');
      this.db.pragma(`synchronous = ${options.synchronous}`);
      this.db.pragma('busy_timeout = 5000');
      // SQLite's default page cache is 2 MiB: with a million sessions nearly every lookup missed it.
      // 64 MiB keeps the B-tree's inner pages (and many leaves) in memory; the OS caches the rest.
      this.db.pragma('cache_size = -65536');
      // Reads of pages outside that cache come from the OS page cache through a memory map instead
      // of a read() each: with a million sessions most Gets need such a page (measured: the 1M ÷ 1k
      // Get/Put ratio went from ~0.6 to ~0.7-0.8). This reserves address space, not memory.
      this.db.pragma(`mmap_size = ${1024 * 1024 * 1024}`);
      // Bounds the WAL file left on disk after SQLite restarts writing it from the beginning.
      this.db.pragma(`journal_size_limit = ${64 * 1024 * 1024}`);
      migrate(this.db);
      this.stmt = {
        append: this.db.prepare('INSERT INTO log (key, value, version, expires_at, created_at) VALUES (?, ?, ?, ?, ?)'),
        value: this.db.prepare<[number], Buffer | null>('SELECT value FROM log WHERE seq = ?').pluck(),
        // The values of a page of List: one query for up to LIST_PAGE rows (seqs as a JSON array).
        values: this.db
          .prepare('SELECT seq, value FROM log WHERE seq IN (SELECT value FROM json_each(?))')
          .raw(true) as Database.Statement<[string], [number, Buffer | null]>,
        head: this.db
          // The oldest rows: compaction deletes from the front, so this is one seek to the first leaf.
          .prepare('SELECT seq, key, version FROM log ORDER BY seq LIMIT ?')
          .raw(true) as Database.Statement<[number], HeadRow>,
        dropHead: this.db.prepare('DELETE FROM log WHERE seq <= ?'),
        keepDroppedVersion: this.db.prepare(
          "INSERT INTO meta (name, value) VALUES ('dropped_version', ?) ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
        ),
        addKey: this.db.prepare('INSERT OR IGNORE INTO keys (key) VALUES (?)'),
        removeKey: this.db.prepare('DELETE FROM keys WHERE key = ?'),
        listKeys: this.db
          .prepare<[string, string, number], string>('SELECT key FROM keys WHERE key > ? AND key >= ? ORDER BY key LIMIT ?')
          .pluck(),
      };
      this.rebuilt = this.load();
    } catch (err) {
      // A database this store cannot use (a newer schema, a damaged file) is not left open.
      this.db.close();
      this.dirLock.close();
      throw naming(file, err);
    }
    if ((options.checkpoint ?? 'worker') === 'worker') this.startCheckpointer();
    this.events.setMaxListeners(0);
    if (options.sweepIntervalMs > 0) {
      // A pass that takes longer than the interval (many keys expired at once, or after downtime)
      // is not joined by another: passes running side by side would each take a step per turn.
      this.sweeper = setInterval(() => {
        if (!this.sweeping) this.sweep();
      }, options.sweepIntervalMs);
      this.sweeper.unref();
    }
  }

  batch(ops: readonly BackendOp[]): Promise<BackendResult[]> {
    if (this.closed) return Promise.resolve(ops.map(() => unavailable('the store is closing')));
    return new Promise((resolve) => {
      this.queue.push({ ops, resolve });
      this.scheduleFlush();
    });
  }

  async *list(options: ListOptions): AsyncIterable<StoredEntry> {
    let after = options.startAfter;
    let remaining = options.limit > 0 ? options.limit : Infinity;
    while (remaining > 0) {
      if (this.closed) throw new StoreError('unavailable', 'the store is closing');
      // Whole pages: the key table may still hold expired keys the sweeper has not reached.
      const keys = this.stmt.listKeys.all(after, options.prefix, LIST_PAGE);
      // A page is read at once (as one query was before): the entries are those of this moment.
      let yielded = false;
      for (const entry of this.readPage(keys, options.prefix, options.keysOnly)) {
        yield entry;
        yielded = true;
        remaining -= 1;
        if (remaining <= 0) return;
      }
      if (keys.length < LIST_PAGE || !keys[keys.length - 1].startsWith(options.prefix)) return;
      after = keys[keys.length - 1];
      // A page of keys that all expired (the sweeper has not reached them yet, e.g. just after a
      // restart) yields nothing, and without this the next page would be read in the same turn:
      // a run of a million such keys held the event loop for 0.7 s.
      if (!yielded) {
        await new Promise((resolve) => setImmediate(resolve));
        // A caller that gave up meanwhile (a cancelled List) is not read a page it never takes.
        if (options.signal?.aborted) return;
      }
    }
  }

  watch(prefix: string, onEvent: (event: ChangeEvent) => void): () => void {
    const listener = (event: ChangeEvent) => {
      if (event.key.startsWith(prefix)) onEvent(event);
    };
    this.events.on('change', listener);
    return () => this.events.off('change', listener);
  }

  async ping(): Promise<void> {
    if (this.closed) throw new StoreError('unavailable', 'the store is closing');
    try {
      this.db.prepare('SELECT 1').get();
    } catch (err) {
      throw new StoreError('unavailable', this.failure(err));
    }
  }

  /** Counted in the in-memory index (a million keys: a few ms). */
  async countLive(): Promise<number> {
    return this.closed ? 0 : this.keydir.countLive(Date.now());
  }

  async close(): Promise<void> {
    if (this.closed) return;
    if (this.sweeper) clearInterval(this.sweeper);
    this.flush(Infinity);
    this.closed = true;
    await this.stopCheckpointer();
    // The last connection to close checkpoints everything and removes the WAL.
    this.db.close();
    this.dirLock.close();
    this.keydir.clear();
  }

  /** Turns SQLite's automatic checkpoints off and runs them in a worker thread instead. */
  private startCheckpointer(): void {
    const settings: CheckpointerSettings = {
      file: this.db.name,
      synchronous: this.options.synchronous,
      intervalMs: this.options.checkpointIntervalMs ?? 100,
      catchUpFrames: 4096,
    };
    const worker = new Worker(path.join(__dirname, `sqlite-checkpointer${path.extname(__filename)}`), { workerData: settings });
    this.db.pragma('wal_autocheckpoint = 0');
    this.checkpointer = worker;
    worker.unref();
    worker.on('message', (message: 'catch-up') => {
      if (message === 'catch-up') this.catchUp = true;
    });
    const fallBack = () => {
      if (this.checkpointer === worker) {
        // Without the worker the WAL would grow for ever: go back to checkpoints on commit.
        this.checkpointer = undefined;
        if (!this.closed) this.db.pragma('wal_autocheckpoint = 1000');
      }
    };
    worker.once('error', fallBack);
    worker.once('exit', fallBack);
  }

  /** Copies the few frames the worker's last pass left, so that the next write starts the WAL over. */
  private finishCheckpoint(): void {
    this.catchUp = false;
    try {
      this.db.pragma('wal_checkpoint(PASSIVE)');
    } catch {
      // The worker is checkpointing right now; it will ask again.
    }
  }

  private async stopCheckpointer(): Promise<void> {
    const worker = this.checkpointer;
    if (!worker) return;
    this.checkpointer = undefined;
    const exited = new Promise((resolve) => worker.once('exit', resolve));
    worker.postMessage('close');
    // A worker stuck in a long checkpoint is not worth a hung shutdown.
    const timer = setTimeout(() => void worker.terminate(), 2000);
    await exited;
    clearTimeout(timer);
  }

  /**
   * Removes up to sweepBatch expired keys (their rows go with compaction) and reports them;
   * continues on the next turn until it has looked at every key once.
   */
  sweep(): number {
    this.sweeping = false;
    if (this.closed) return 0;
    const { keys, next } = this.keydir.expired(Date.now(), this.sweepFrom, SWEEP_SCAN, this.options.sweepBatch);
    const expired = keys.map((key) => ({ key, state: this.keydir.state(key)! }));
    const logRows = this.logRows;
    if (expired.length > 0) {
      try {
        this.db.transaction(() => {
          // Tombstones, so that the keys stay gone after a restart even if the clock has stepped
          // back by then (their last rows would look live again).
          for (const { key, state } of expired) this.tombstone(key, state.version, state.createdAtMs);
        })();
      } catch {
        this.logRows = logRows;
        return 0; // the next sweep tries again from the same place
      }
      for (const { key } of expired) this.keydir.remove(key);
    }
    this.sweepFrom = next;
    // Nothing can have run between finding the keys and here: the transaction is synchronous.
    for (const { key, state } of expired) this.events.emit('change', expiredEvent(key, state.version));
    if (next !== 0) {
      this.sweeping = true;
      setImmediate(() => this.sweep());
    } else this.pack();
    return expired.length;
  }

  /**
   * After many keys expired at once, the index gives their memory back, a bounded step per turn,
   * once a pass has ended and before the next begins (`sweeping` holds it off): packing moves keys
   * from the top slots into free ones below, so within a pass it would move keys not yet looked at
   * behind the scan, and the pass would miss them.
   */
  private pack(): void {
    this.sweeping = false;
    if (this.closed || !this.keydir.pack(PACK_MOVES)) return;
    this.sweeping = true;
    setImmediate(() => this.pack());
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      this.flush(this.options.maxOpsPerCommit);
      if (this.queue.length > 0) this.scheduleFlush();
    });
  }

  /** Commits queued batches (up to maxOps operations) in one transaction, then answers them. */
  private flush(maxOps: number): void {
    let taken = 0;
    let count = 0;
    while (taken < this.queue.length && (count === 0 || count + this.queue[taken].ops.length <= maxOps)) {
      count += this.queue[taken].ops.length;
      taken += 1;
    }
    if (taken === 0) return;
    if (this.catchUp) this.finishCheckpoint();
    const batches = this.queue.splice(0, taken);
    let written = 0;
    for (const b of batches) for (const op of b.ops) if (op.kind === 'put') written += op.value.length;
    if (!this.commit(batches, count * COMPACT_PER_WRITE, Math.max(COMPACT_MIN_BYTES, written * COMPACT_PER_WRITE))) return;
    // The group was rolled back (a full disk, say): each batch gets a transaction of its own, without
    // compaction (its copies need room too). If its writes still fail, its plain Gets are answered from
    // what is committed, as if they ran after the refused writes: reading needs no room, and before
    // this one write that could not be stored failed every Get that happened to share its turn.
    for (const b of batches) {
      const failure = this.commit([b], 0, 0);
      if (failure) b.resolve(b.ops.map((op) => (op.kind === 'get' && op.refreshTtlMs === 0 ? this.read(op.key) : failure)));
    }
  }

  /** A Get without refresh, outside any write transaction. */
  private read(key: string): BackendResult {
    try {
      return this.apply({ kind: 'get', key, refreshTtlMs: 0 }, Date.now(), [], { keys: [], logRows: this.logRows });
    } catch (err) {
      return unavailable(this.failure(err));
    }
  }

  /** A SQLite error as callers see it, with what the data directory says about its cause. */
  private failure(err: unknown): string {
    return `sqlite: ${(err as Error).message}${diskProblem(this.options.dataDir, err)}`;
  }

  /**
   * Runs these batches and compaction (up to compactRows rows read and about compactBytes of values
   * copied) in one transaction, then answers the batches and reports their changes. When it fails,
   * nothing is answered: the index is put back as the database still has it and the failure is returned.
   */
  private commit(batches: readonly Pending[], compactRows: number, compactBytes: number): BackendResult | undefined {
    const changes: ChangeEvent[] = [];
    const undo: Undo = { keys: [], logRows: this.logRows };
    let answers: BackendResult[][];
    try {
      answers = this.db.transaction(() => {
        const now = Date.now();
        this.roomScan = SWEEP_SCAN;
        const results = batches.map((b) => b.ops.map((op) => this.apply(op, now, changes, undo)));
        this.compact(compactRows, compactBytes, now, changes, undo);
        return results;
      }).immediate();
    } catch (err) {
      // Rolled back: the index goes back to what the database still says.
      for (let i = undo.keys.length - 1; i >= 0; i -= 1) this.keydir.restore(undo.keys[i][0], undo.keys[i][1]);
      this.logRows = undo.logRows;
      return unavailable(this.failure(err));
    }
    batches.forEach((b, i) => b.resolve(answers[i]));
    for (const change of changes) this.events.emit('change', change);
    return undefined;
  }

  private apply(op: BackendOp, now: number, changes: ChangeEvent[], undo: Undo): BackendResult {
    const dir = this.keydir;
    const slot = dir.slot(op.key);
    const live = slot !== undefined && dir.expiresOf(slot) > now;
    const liveVersion = live ? dir.versionOf(slot) : 0;
    switch (op.kind) {
      case 'get': {
        if (!live) return { ok: true, value: null };
        const value = this.stmt.value.get(dir.seqOf(slot)) ?? EMPTY_VALUE;
        const createdAtMs = dir.createdOf(slot);
        let expiresAtMs = dir.expiresOf(slot);
        if (op.refreshTtlMs > 0) {
          // A new row with the same value and version and the later expiry.
          expiresAtMs = now + op.refreshTtlMs;
          this.append(op.key, slot, value, liveVersion, expiresAtMs, createdAtMs, undo);
        }
        return { ok: true, value: { key: op.key, value, version: liveVersion, expiresAtMs, createdAtMs } };
      }
      case 'put': {
        if (op.expectedVersion !== undefined && liveVersion !== op.expectedVersion) {
          return versionConflict(op.expectedVersion, liveVersion);
        }
        if (slot === undefined && dir.size >= this.maxEntries && !this.makeRoom(now, changes, undo)) {
          return unavailable(
            `the store is full: it holds ${dir.size} keys, its limit (STORE_MAX_ENTRIES); new keys are refused until sessions expire or are deleted`,
          );
        }
        // A new key, or one that expired (a swept key's row is gone from List's key table).
        if (!live) this.stmt.addKey.run(op.key);
        if (slot !== undefined && !live) changes.push(expiredEvent(op.key, dir.versionOf(slot)));
        const entry: StoredEntry = {
          key: op.key,
          value: op.value,
          version: nextVersion(slot === undefined ? 0 : dir.versionOf(slot), now),
          expiresAtMs: now + op.ttlMs,
          createdAtMs: live ? dir.createdOf(slot) : now,
        };
        this.append(op.key, slot, op.value, entry.version, entry.expiresAtMs, entry.createdAtMs, undo);
        changes.push({ kind: 'put', key: entry.key, version: entry.version, value: entry.value, expiresAtMs: entry.expiresAtMs });
        return { ok: true, value: entry };
      }
      case 'delete': {
        if (op.expectedVersion !== undefined && liveVersion !== op.expectedVersion) {
          return versionConflict(op.expectedVersion, liveVersion);
        }
        if (slot === undefined) return { ok: true, value: false };
        const version = dir.versionOf(slot);
        // Without a tombstone the key's older rows would come back when the index is rebuilt.
        this.tombstone(op.key, version, dir.createdOf(slot));
        undo.keys.push([op.key, dir.stateAt(slot)]);
        dir.remove(op.key);
        // An expired key that the sweeper had not reached yet: it is reported as expired, not deleted.
        changes.push(live ? { kind: 'delete', key: op.key, version, value: EMPTY_VALUE, expiresAtMs: 0 } : expiredEvent(op.key, version));
        return { ok: true, value: live };
      }
    }
  }

  /**
   * For a put that finds the store full: removes expired keys the sweeper has not reached yet (up
   * to sweepBatch), as the sweeper would, inside the caller's transaction. Without it a full store
   * refused new sessions until the next sweeper pass, and for ever with STORE_SWEEP_INTERVAL_MS=0,
   * though most of what it held had expired. It looks at SWEEP_SCAN slots per transaction at most,
   * so a store full of live keys pays a bounded scan per commit. True when it made room.
   */
  private makeRoom(now: number, changes: ChangeEvent[], undo: Undo): boolean {
    const dir = this.keydir;
    let keys: string[] = [];
    // From where the last call stopped to the end of the slots, then once more from the start.
    for (let pass = 0; pass < 2 && keys.length === 0 && this.roomScan > 0; pass += 1) {
      const from = this.roomFrom < dir.capacity ? this.roomFrom : 0;
      const found = dir.expired(now, from, this.roomScan, this.options.sweepBatch);
      this.roomScan -= found.next === 0 ? dir.capacity - from : found.next - from;
      this.roomFrom = found.next;
      keys = found.keys;
      if (from === 0) break;
    }
    for (const key of keys) {
      const slot = dir.slot(key)!;
      this.tombstone(key, dir.versionOf(slot), dir.createdOf(slot));
      undo.keys.push([key, dir.stateAt(slot)]);
      changes.push(expiredEvent(key, dir.versionOf(slot)));
      dir.remove(key);
    }
    return keys.length > 0;
  }

  /** Appends a delete's row for the key and takes it out of List's key table (the caller updates the index). */
  private tombstone(key: string, version: number, createdAtMs: number): void {
    this.stmt.append.run(key, null, version, 0, createdAtMs);
    this.logRows += 1;
    this.stmt.removeKey.run(key);
  }

  /** Appends a row for the key and points the index at it. */
  private append(key: string, slot: number | undefined, value: Buffer, version: number, expiresAtMs: number, createdAtMs: number, undo: Undo): void {
    const seq = Number(this.stmt.append.run(key, value, version, expiresAtMs, createdAtMs).lastInsertRowid);
    this.logRows += 1;
    undo.keys.push([key, slot === undefined ? undefined : this.keydir.stateAt(slot)]);
    this.keydir.set(key, seq, version, expiresAtMs, createdAtMs, slot);
  }

  /** The live entries of these keys (those with the prefix), values read in one query. */
  private readPage(keys: readonly string[], prefix: string, keysOnly: boolean): StoredEntry[] {
    const dir = this.keydir;
    const now = Date.now();
    const entries: StoredEntry[] = [];
    const seqs: number[] = [];
    for (const key of keys) {
      if (!key.startsWith(prefix)) break;
      const slot = dir.slot(key);
      if (slot === undefined || dir.expiresOf(slot) <= now) continue;
      entries.push({ key, value: EMPTY_VALUE, version: dir.versionOf(slot), expiresAtMs: dir.expiresOf(slot), createdAtMs: dir.createdOf(slot) });
      seqs.push(dir.seqOf(slot));
    }
    if (keysOnly || entries.length === 0) return entries;
    const values = new Map(this.stmt.values.all(JSON.stringify(seqs)));
    for (let i = 0; i < entries.length; i += 1) entries[i].value = values.get(seqs[i]) ?? EMPTY_VALUE;
    return entries;
  }

  /**
   * Reclaims superseded rows from the oldest end of the log, reading at most `budget` rows and
   * stopping once it has copied `bytes` of values: each row still the latest of its key is copied
   * to the end, then the rows read are deleted as one range (all older rows of every key in it go
   * with them, so a rebuild never sees a stale one).
   * The highest version of the rows deleted is kept (meta.dropped_version): the range may hold the
   * last version a deleted or expired key had, and new versions must start above it (see load()).
   */
  private compact(budget: number, bytes: number, now: number, changes: ChangeEvent[], undo: Undo): void {
    const dir = this.keydir;
    while (budget > 0 && bytes > 0 && this.logRows - dir.size > Math.max(MIN_GARBAGE, dir.size)) {
      const rows = this.stmt.head.all(Math.min(Math.max(budget, COMPACT_MIN_ROWS), LIST_PAGE));
      if (rows.length === 0) return;
      let dropped = 0;
      let read = 0;
      for (const [seq, key, version] of rows) {
        if (bytes <= 0) break;
        read += 1;
        if (version > dropped) dropped = version;
        const slot = dir.slot(key);
        if (slot === undefined || dir.seqOf(slot) !== seq) continue; // superseded or deleted
        if (dir.expiresOf(slot) <= now) {
          this.stmt.removeKey.run(key);
          undo.keys.push([key, dir.stateAt(slot)]);
          changes.push(expiredEvent(key, dir.versionOf(slot)));
          dir.remove(key);
          continue;
        }
        const value = this.stmt.value.get(seq) ?? EMPTY_VALUE;
        bytes -= value.length;
        this.append(key, slot, value, dir.versionOf(slot), dir.expiresOf(slot), dir.createdOf(slot), undo);
      }
      const last = rows[read - 1][0];
      this.stmt.keepDroppedVersion.run(dropped);
      this.stmt.dropHead.run(last);
      this.logRows -= read;
      budget -= read;
    }
  }

  /** Rebuilds the index from the log: the latest row of each key wins, tombstones and expired rows remove it. */
  private load(): Rebuilt {
    const started = performance.now();
    this.keydir.clear();
    let rows = 0;
    let highest = 0;
    // A page of rows at a time (each a fresh seek): iterate() cost a call into SQLite and a result
    // object per row (a million rows: 2.2 s of CPU to read them that way, 1.5 s by pages). Each
    // column costs a conversion per row: a tombstone's expiry reads as null, not a column of its own.
    const page = this.db
      .prepare('SELECT seq, key, version, iif(value IS NULL, NULL, expires_at), created_at FROM log WHERE seq > ? ORDER BY seq LIMIT ?')
      .raw(true) as Database.Statement<[number, number], [number, string, number, number | null, number]>;
    for (let after = 0, read = LOAD_PAGE; read === LOAD_PAGE; ) {
      const found = page.all(after, LOAD_PAGE);
      for (const [seq, key, version, expiresAtMs, createdAtMs] of found) {
        if (version > highest) highest = version;
        if (expiresAtMs === null) this.keydir.remove(key);
        else this.keydir.set(key, seq, version, expiresAtMs, createdAtMs);
      }
      read = found.length;
      rows += read;
      if (read > 0) after = found[read - 1][0];
    }
    this.logRows = rows;
    // Versions come from the clock: after a restart with the clock stepped back, a key deleted
    // before it and created again would get a version it had before (a stale compare-and-set
    // would pass). New versions start above every one the log holds, tombstones included, and
    // every one compaction removed from it.
    const dropped = this.db.prepare<[], number>("SELECT value FROM meta WHERE name = 'dropped_version'").pluck().get() ?? 0;
    versionsAbove(Math.max(highest, dropped));
    // Keys that expired while the store was down stay in the index until the sweeper reports them
    // (Get, List and the live count already skip them): removed here, Watch would never hear of them.
    return { logRows: rows, keys: this.keydir.size, tookMs: Math.round(performance.now() - started) };
  }
}

export interface Rebuilt {
  logRows: number;
  /** Keys in the index, live or expired while the store was down. */
  keys: number;
  tookMs: number;
}

/** What a failed transaction must put back in memory: each key's state before it, in order. */
interface Undo {
  keys: Array<[string, KeyState | undefined]>;
  logRows: number;
}

/**
 * The event for a key found expired: by the sweeper, or by a put or delete that reached it first
 * (then before that write's own event, as Redis reports a key it expires on access).
 */
function expiredEvent(key: string, version: number): ChangeEvent {
  return { kind: 'expire', key, version, value: EMPTY_VALUE, expiresAtMs: 0 };
}

function unavailable(message: string): BackendResult {
  return { ok: false, error: new StoreError('unavailable', message) };
}

/**
 * SQLite's own errors ("file is not a database", "database disk image is malformed") do not say
 * which file: at start the operator needs to know.
 */
function naming(file: string, err: unknown): unknown {
  return err instanceof Database.SqliteError ? new Error(`cannot open ${file}: ${err.message}${diskProblem(path.dirname(file), err)}`) : err;
}

/** Below this much free space, a write SQLite could not make is put down to a full disk. */
const LOW_SPACE_BYTES = 1024 * 1024;

/**
 * What SQLite's words for a write the disk refused leave out: a read-only file system is "disk I/O
 * error" alone, and so is a full disk when the shared-memory index cannot grow. The data directory
 * tells them apart (a few system calls, only when a write failed). Empty for other errors.
 */
function diskProblem(dir: string, err: unknown): string {
  const code = (err as { code?: unknown }).code;
  if (typeof code !== 'string' || !/^SQLITE_(FULL|IOERR|READONLY|CANTOPEN)/.test(code)) return '';
  try {
    // A file created for writing, not just access(W_OK): ext4 turned read-only by an error still
    // passes that. Never a file SQLite holds open (sessions.lock, sessions.db*): closing any
    // descriptor of a file drops every POSIX lock the process holds on it, the directory lock too.
    const probe = path.join(dir, 'sessions.probe');
    closeSync(openSync(probe, 'w'));
    unlinkSync(probe);
  } catch (cause) {
    if ((cause as NodeJS.ErrnoException).code === 'EROFS') return ' (the data directory, STORE_DATA_DIR, is on a read-only file system)';
  }
  try {
    const disk = statfsSync(dir);
    const free = disk.bavail * disk.bsize;
    if (free < LOW_SPACE_BYTES) return ` (the disk of the data directory, STORE_DATA_DIR, is full: ${Math.floor(free / 1024)} KiB free)`;
  } catch {
    // nothing more to say
  }
  return '';
}

/**
 * Takes an exclusive lock on <dir>/sessions.lock and holds it as long as the returned connection is
 * open. Two stores on one directory would each keep an index of the keys in memory that the other's
 * writes never reach: versions would repeat and compare-and-set would pass on stale data. SQLite's
 * lock (EXCLUSIVE locking mode) is an OS file lock, so the OS drops it when the process ends, even
 * on a crash or kill -9: nothing stale is left to clean up by hand.
 */
function lockDataDir(dir: string): Database.Database {
  const file = path.join(dir, 'sessions.lock');
  const lock = new Database(file, { timeout: 0 });
  try {
    lock.pragma('locking_mode = EXCLUSIVE');
    lock.exec('BEGIN EXCLUSIVE; COMMIT');
    return lock;
  } catch (err) {
    lock.close();
    if ((err as { code?: string }).code === 'SQLITE_BUSY') {
      throw new Error(`the data directory ${dir} is in use by another store process (it holds ${file}): run each store on a directory of its own`);
    }
    throw naming(file, err);
  }
}

/** The first SQLite release without the WAL-reset bug (sqlite.org/wal.html#walresetbug). */
export const MIN_SQLITE_VERSION = '3.51.3';

/**
 * Refuses a SQLite older than MIN_SQLITE_VERSION. Before it, a checkpoint on one connection racing
 * a commit on another, just after the WAL was copied completely, could corrupt the database: the
 * store does exactly that by design (the checkpoint worker's connection and the writer's). The
 * SQLite bundled with the pinned better-sqlite3 is newer; this stops a build against an older one.
 */
export function requireWalResetFix(version: string): void {
  const have = version.split('.').map(Number);
  const need = MIN_SQLITE_VERSION.split('.').map(Number);
  for (let i = 0; i < need.length; i += 1) {
    if ((have[i] ?? 0) !== need[i]) {
      if ((have[i] ?? 0) > need[i]) return;
      throw new Error(`SQLite ${version} has the WAL-reset bug, which can corrupt a database written and checkpointed from two connections as this store does; it needs SQLite ${MIN_SQLITE_VERSION} or later (update better-sqlite3)`);
    }
  }
}

/**
 * Refuses, before anything is changed in it, a database this store cannot use: one of a newer
 * schema, or another program's (put in STORE_DATA_DIR by mistake): tables but no schema version of
 * this store, or a schema version without this store's tables. The store would have added its
 * tables to it and started empty, or failed on a missing table.
 */
function requireStoreDatabase(db: Database.Database, file: string): void {
  const version = db.pragma('user_version', { simple: true }) as number;
  if (version > SCHEMA_VERSION) throw new Error(`sessions.db has schema version ${version}, newer than this store (${SCHEMA_VERSION})`);
  // meta alone: what a first start that failed before its migration committed could leave.
  const tables = db.prepare<[], string>("SELECT name FROM sqlite_schema WHERE type = 'table' AND name != 'meta' ORDER BY name").pluck().all();
  const needed = version === 0 ? [] : version === 1 ? ['entries'] : ['keys', 'log'];
  if (version === 0 ? tables.length === 0 : needed.every((table) => tables.includes(table))) return;
  const holds = tables.length > 0 ? tables.slice(0, 5).join(', ') : 'none';
  throw new Error(
    version === 0
      ? `${file} is not a database of this store: it has no schema version of this store and holds other tables (${holds}); give the store a directory of its own (STORE_DATA_DIR)`
      : `${file} is not a database of this store: its schema version is ${version} but it lacks this store's tables (${needed.join(', ')}; it holds ${holds}); give the store a directory of its own (STORE_DATA_DIR)`,
  );
}

/** Creates or upgrades the schema; user_version records what is there. */
function migrate(db: Database.Database): void {
  const current = db.pragma('user_version', { simple: true }) as number;
  // Added within version 2, for every database: a store of an earlier build ignores the table, so
  // rolling back still opens the database (its compactions then keep no record, as before).
  const createMeta = 'CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL) WITHOUT ROWID';
  if (current === SCHEMA_VERSION) {
    db.exec(createMeta);
    return;
  }
  // Everything in one transaction: a first start that fails (a full disk) leaves no table behind.
  db.transaction(() => {
    db.exec(createMeta);
    db.exec(`
      CREATE TABLE IF NOT EXISTS log (
        seq INTEGER PRIMARY KEY,
        key TEXT NOT NULL,
        value BLOB,
        version INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL
      );
      CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID;
    `);
    if (current === 1) {
      // Version 1 kept one row per key, updated in place: its live rows become the log.
      const now = Date.now();
      db.prepare(
        `INSERT INTO log (key, value, version, expires_at, created_at)
         SELECT key, value, version, expires_at, created_at FROM entries WHERE expires_at > ? ORDER BY key`,
      ).run(now);
      db.prepare('INSERT INTO keys (key) SELECT key FROM entries WHERE expires_at > ?').run(now);
      db.exec('DROP TABLE entries');
    }
    db.pragma(`user_version = ${SCHEMA_VERSION}`);
  })();
}
