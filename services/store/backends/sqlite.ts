import { EventEmitter } from 'node:events';
import { mkdirSync } from 'node:fs';
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
} from './backend';
import type { CheckpointerSettings, CountAnswer, CountRequest } from './sqlite-checkpointer';

export interface SqliteOptions {
  /** Directory holding sessions.db (created if missing). */
  dataDir: string;
  /** FULL survives power loss; NORMAL survives a process crash (WAL either way). */
  synchronous: 'FULL' | 'NORMAL';
  /** How often the expiry sweeper runs. */
  sweepIntervalMs: number;
  /** Most expired rows deleted per sweeper step (bounds the event-loop pause). */
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
}

interface Row {
  value: Buffer;
  version: number;
  expires_at: number;
  created_at: number;
}

interface Pending {
  ops: readonly BackendOp[];
  resolve: (results: BackendResult[]) => void;
}

const SCHEMA_VERSION = 1;
/**
 * Rows per List query: each page is a fresh indexed seek (no read transaction held between pages),
 * so bigger pages cost fewer seeks; 1000 rows take a few ms of synchronous work.
 */
const LIST_PAGE = 1000;

/**
 * The embedded default backend: one SQLite file in WAL mode. Every operation goes through one
 * queue that is committed on setImmediate, many operations per transaction (group commit), so a
 * synchronous=FULL fsync is paid once per turn of the event loop, not once per write.
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
  /** countLive() calls the worker is answering. */
  private readonly counts = new Map<number, (n: number) => void>();
  private nextCountId = 1;
  private readonly stmt: {
    get: Database.Statement<[string], Row>;
    upsert: Database.Statement<[string, Buffer, number, number, number]>;
    refresh: Database.Statement<[number, string]>;
    remove: Database.Statement<[string]>;
    list: Database.Statement<[string, string, number, number], ListRow>;
    listKeys: Database.Statement<[string, string, number, number], ListRow>;
    sweep: Database.Statement<[number, number], { key: string; version: number }>;
    countLive: Database.Statement<[number], { n: number }>;
  };

  constructor(private readonly options: SqliteOptions) {
    mkdirSync(options.dataDir, { recursive: true });
    this.db = new Database(path.join(options.dataDir, 'sessions.db'));
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
    if ((options.checkpoint ?? 'worker') === 'worker') this.startCheckpointer();
    this.stmt = {
      get: this.db.prepare('SELECT value, version, expires_at, created_at FROM entries WHERE key = ?'),
      upsert: this.db.prepare(
        `INSERT INTO entries (key, value, version, expires_at, created_at) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = excluded.version,
           expires_at = excluded.expires_at, created_at = excluded.created_at`,
      ),
      refresh: this.db.prepare('UPDATE entries SET expires_at = ? WHERE key = ?'),
      remove: this.db.prepare('DELETE FROM entries WHERE key = ?'),
      // Raw rows (arrays, not objects): a third cheaper to read, which matters for big listings.
      list: this.db
        .prepare(
          `SELECT key, value, version, expires_at, created_at FROM entries
           WHERE key > ? AND key >= ? AND expires_at > ? ORDER BY key LIMIT ?`,
        )
        .raw(true) as Database.Statement<[string, string, number, number], ListRow>,
      listKeys: this.db
        .prepare(
          `SELECT key, NULL AS value, version, expires_at, created_at FROM entries
           WHERE key > ? AND key >= ? AND expires_at > ? ORDER BY key LIMIT ?`,
        )
        .raw(true) as Database.Statement<[string, string, number, number], ListRow>,
      sweep: this.db.prepare(
        `DELETE FROM entries WHERE key IN
           (SELECT key FROM entries WHERE expires_at <= ? LIMIT ?) RETURNING key, version`,
      ),
      countLive: this.db.prepare('SELECT count(*) AS n FROM entries WHERE expires_at > ?'),
    };
    this.events.setMaxListeners(0);
    if (options.sweepIntervalMs > 0) {
      this.sweeper = setInterval(() => this.sweep(), options.sweepIntervalMs);
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
    const stmt = options.keysOnly ? this.stmt.listKeys : this.stmt.list;
    while (remaining > 0) {
      if (this.closed) throw new StoreError('unavailable', 'the store is closing');
      const rows = stmt.all(after, options.prefix, Date.now(), Math.min(LIST_PAGE, remaining));
      for (const [key, value, version, expiresAtMs, createdAtMs] of rows) {
        if (!key.startsWith(options.prefix)) return;
        yield { key, value: value ?? EMPTY_VALUE, version, expiresAtMs, createdAtMs };
        remaining -= 1;
      }
      if (rows.length < LIST_PAGE || remaining <= 0) return;
      after = rows[rows.length - 1][0];
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
      throw new StoreError('unavailable', `sqlite: ${(err as Error).message}`);
    }
  }

  /** Counted by the worker thread when there is one (off the request path), else here. */
  async countLive(): Promise<number> {
    if (this.closed) return 0;
    const worker = this.checkpointer;
    if (!worker) return this.countHere();
    return new Promise((resolve) => {
      const request: CountRequest = { type: 'count', id: this.nextCountId++, nowMs: Date.now() };
      this.counts.set(request.id, resolve);
      worker.postMessage(request);
    });
  }

  private countHere(): number {
    return this.closed ? 0 : this.stmt.countLive.get(Date.now())!.n;
  }

  /** Answers the counts a stopped or failed worker left unanswered. */
  private answerPendingCounts(): void {
    for (const [id, resolve] of this.counts) {
      this.counts.delete(id);
      resolve(this.countHere());
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    if (this.sweeper) clearInterval(this.sweeper);
    this.flush(Infinity);
    this.closed = true;
    await this.stopCheckpointer();
    // The last connection to close checkpoints everything and removes the WAL.
    this.db.close();
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
    worker.on('message', (message: 'catch-up' | CountAnswer) => {
      if (message === 'catch-up') {
        this.catchUp = true;
        return;
      }
      const resolve = this.counts.get(message.id);
      if (!resolve) return;
      this.counts.delete(message.id);
      resolve(message.n ?? this.countHere());
    });
    const fallBack = () => {
      if (this.checkpointer === worker) {
        // Without the worker the WAL would grow for ever: go back to checkpoints on commit.
        this.checkpointer = undefined;
        if (!this.closed) this.db.pragma('wal_autocheckpoint = 1000');
      }
      this.answerPendingCounts();
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

  /** Deletes up to sweepBatch expired rows; continues on the next turn while there are more. */
  sweep(): number {
    if (this.closed) return 0;
    const swept = this.db.transaction(() => this.stmt.sweep.all(Date.now(), this.options.sweepBatch))();
    for (const row of swept) {
      this.events.emit('change', { kind: 'expire', key: row.key, version: row.version, value: EMPTY_VALUE, expiresAtMs: 0 });
    }
    if (swept.length === this.options.sweepBatch) setImmediate(() => this.sweep());
    return swept.length;
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
    const changes: ChangeEvent[] = [];
    let answers: BackendResult[][];
    try {
      answers = this.db.transaction(() => {
        const now = Date.now();
        return batches.map((b) => b.ops.map((op) => this.apply(op, now, changes)));
      }).immediate();
    } catch (err) {
      const failure = unavailable(`sqlite: ${(err as Error).message}`);
      for (const b of batches) b.resolve(b.ops.map(() => failure));
      return;
    }
    batches.forEach((b, i) => b.resolve(answers[i]));
    for (const change of changes) this.events.emit('change', change);
  }

  private apply(op: BackendOp, now: number, changes: ChangeEvent[]): BackendResult {
    const row = this.stmt.get.get(op.key);
    const live = row !== undefined && row.expires_at > now ? row : undefined;
    switch (op.kind) {
      case 'get': {
        if (!live) return { ok: true, value: null };
        if (op.refreshTtlMs > 0) {
          live.expires_at = now + op.refreshTtlMs;
          this.stmt.refresh.run(live.expires_at, op.key);
        }
        return { ok: true, value: toEntry({ key: op.key, ...live }) };
      }
      case 'put': {
        if (op.expectedVersion !== undefined && (live?.version ?? 0) !== op.expectedVersion) {
          return versionConflict(op.expectedVersion, live?.version ?? 0);
        }
        const entry: StoredEntry = {
          key: op.key,
          value: op.value,
          version: nextVersion(row?.version ?? 0, now),
          expiresAtMs: now + op.ttlMs,
          createdAtMs: live?.created_at ?? now,
        };
        this.stmt.upsert.run(entry.key, entry.value, entry.version, entry.expiresAtMs, entry.createdAtMs);
        changes.push({ kind: 'put', key: entry.key, version: entry.version, value: entry.value, expiresAtMs: entry.expiresAtMs });
        return { ok: true, value: entry };
      }
      case 'delete': {
        if (op.expectedVersion !== undefined && (live?.version ?? 0) !== op.expectedVersion) {
          return versionConflict(op.expectedVersion, live?.version ?? 0);
        }
        if (row) this.stmt.remove.run(op.key);
        if (!live) return { ok: true, value: false };
        changes.push({ kind: 'delete', key: op.key, version: live.version, value: EMPTY_VALUE, expiresAtMs: 0 });
        return { ok: true, value: true };
      }
    }
  }
}

/** A List row in raw mode: key, value (null for keys only), version, expires_at, created_at. */
type ListRow = [string, Buffer | null, number, number, number];

interface StoredEntryRow {
  key: string;
  value: Buffer | null;
  version: number;
  expires_at: number;
  created_at: number;
}


function toEntry(row: StoredEntryRow): StoredEntry {
  return {
    key: row.key,
    value: row.value ?? EMPTY_VALUE,
    version: row.version,
    expiresAtMs: row.expires_at,
    createdAtMs: row.created_at,
  };
}

function unavailable(message: string): BackendResult {
  return { ok: false, error: new StoreError('unavailable', message) };
}

/** Creates or upgrades the schema; user_version records what is there. */
function migrate(db: Database.Database): void {
  const current = db.pragma('user_version', { simple: true }) as number;
  if (current > SCHEMA_VERSION) {
    throw new Error(`sessions.db has schema version ${current}, newer than this store (${SCHEMA_VERSION})`);
  }
  if (current < 1) {
    db.exec(`
      CREATE TABLE IF NOT EXISTS entries (
        key TEXT PRIMARY KEY NOT NULL,
        value BLOB NOT NULL,
        version INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL
      ) WITHOUT ROWID;
      CREATE INDEX IF NOT EXISTS entries_expires_at ON entries (expires_at);
      PRAGMA user_version = 1;
    `);
  }
}
