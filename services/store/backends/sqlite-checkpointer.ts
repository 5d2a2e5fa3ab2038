import { parentPort, workerData } from 'node:worker_threads';
import Database from 'better-sqlite3';

/** What the backend passes to the checkpoint worker. */
export interface CheckpointerSettings {
  file: string;
  synchronous: 'FULL' | 'NORMAL';
  intervalMs: number;
  /** WAL frames (pages) past which the writer is asked to finish the checkpoint (see below). */
  catchUpFrames: number;
}

interface CheckpointResult {
  busy: number;
  log: number;
  checkpointed: number;
}

/**
 * Runs in a worker thread with its own connection, so that copying the WAL into the database
 * (and the fsyncs that go with it) stays off the request path. Every intervalMs:
 * - a PASSIVE checkpoint copies what it can without ever blocking a writer;
 * - under steady writes a PASSIVE checkpoint never quite catches up (writers append while it
 *   copies), and SQLite starts the WAL over only once it is copied completely, so the WAL would
 *   grow without bound. Past catchUpFrames the worker posts 'catch-up': the writer then runs a
 *   PASSIVE checkpoint between two of its transactions, which has only the frames written since
 *   the worker's pass left to copy, and its next write starts the WAL over. (A RESTART from here
 *   instead would have to win the write lock against a busy writer and can wait for seconds.)
 * - when nothing was written since the last tick and everything is copied, TRUNCATE empties the
 *   WAL file (it waits for writers, but there are none).
 */
function run(settings: CheckpointerSettings): void {
  const db = new Database(settings.file, { fileMustExist: true });
  // The checkpoint's syncs follow the store's durability setting. TRUNCATE waits for the writer's
  // current transaction (PASSIVE never waits); give up after a while and retry on the next tick.
  db.pragma(`synchronous = ${settings.synchronous}`);
  db.pragma('busy_timeout = 100');
  db.pragma(`mmap_size = ${1024 * 1024 * 1024}`);
  let lastLog = -1;
  const tick = () => {
    try {
      const [result] = db.pragma('wal_checkpoint(PASSIVE)') as CheckpointResult[];
      if (result.log >= settings.catchUpFrames) parentPort!.postMessage('catch-up');
      const idle = result.busy === 0 && result.log > 0 && result.log === result.checkpointed && result.log === lastLog;
      if (idle) db.pragma('wal_checkpoint(TRUNCATE)');
      lastLog = idle ? 0 : result.log;
    } catch {
      // SQLITE_BUSY and the like: the next tick tries again.
    }
  };
  const timer = setInterval(tick, settings.intervalMs);
  parentPort!.on('message', (message: unknown) => {
    if (message !== 'close') return;
    clearInterval(timer);
    db.close();
    parentPort!.close();
  });
}

if (parentPort) run(workerData as CheckpointerSettings);
