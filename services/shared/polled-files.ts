import { readFile, stat } from 'node:fs/promises';
import type { Logger } from './log';

/** A file named by a setting: the variable is what errors name. */
export interface NamedFile {
  variable: string;
  path: string;
}

export interface PolledFilesOptions<T> {
  /** How often the files are looked at; 0 never. */
  intervalMs: number;
  logger: Logger;
  /** Throws when the files' new contents are not usable (the reason is logged); else what use() gets. */
  check(contents: Buffer[]): T;
  /** Puts new, checked contents in use. */
  use(contents: Buffer[], checked: T): void;
  /** The warning logged, with the reason, when the files do not hold usable contents. */
  unusable: string;
  /** Runs at every look, before the files are looked at. */
  onLook?(): void;
}

/**
 * Files that a long-running process reads again when they change, so that renewed certificates
 * (cert-manager, certbot, a rotated Kubernetes secret) are used without a restart. Every
 * intervalMs each file is stat()ed; only when one changed (inode, size, modification or change
 * time: renamed files and swapped symlinks count) are they read and checked together.
 *
 * Contents that do not pass check() (a key that does not match its certificate, a file half
 * written or unreadable) are never put in use: what is in use stays, and a warning says why, once
 * however long it lasts. A failed look leaves the recorded identity as it was, so the files are
 * looked at again next time: fixing them may change none of it (chmod changes only ctime, a
 * directory's permissions nothing of the file).
 */
export class PolledFiles<T> {
  private timer: NodeJS.Timeout | undefined;
  /** The files' identity when they last gave usable contents, so unchanged files are not read again. */
  private seen: string | undefined;
  /** Why the last look failed, so a failure that lasts is warned about once, not at every look. */
  private failure: string | undefined;
  private looking = false;

  constructor(
    private readonly files: readonly NamedFile[],
    private current: Buffer[],
    private readonly options: PolledFilesOptions<T>,
  ) {}

  /**
   * Starts looking every intervalMs (the timer keeps no process alive), with a first look at once:
   * when polling starts again after a pause, the files may have changed meanwhile. Resolves when
   * that look is done; at once when already started or intervalMs is 0.
   */
  start(): Promise<void> {
    if (this.timer || this.options.intervalMs <= 0) return Promise.resolve();
    this.timer = setInterval(() => void this.look(), this.options.intervalMs).unref();
    return this.look();
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Reads the files again if they changed since they last gave usable contents (the first look reads them once). */
  async look(): Promise<void> {
    if (this.looking) return;
    this.looking = true;
    try {
      this.options.onLook?.();
      let seen: string;
      let next: Buffer[];
      let checked: T;
      try {
        seen = (await Promise.all(this.files.map((file) => fingerprint(file)))).join('/');
        if (seen === this.seen) return;
        next = await Promise.all(this.files.map((file) => naming(file.variable, readFile(file.path))));
        if (next.every((content, i) => content.equals(this.current[i]))) {
          this.seen = seen;
          this.failure = undefined;
          return;
        }
        checked = this.options.check(next);
      } catch (err) {
        const reason = reasonOf(err);
        if (reason !== this.failure) {
          this.options.logger.warn({ reason, ...Object.fromEntries(this.files.map((file) => [file.variable, file.path])) }, this.options.unusable);
        }
        this.failure = reason;
        return;
      }
      this.seen = seen;
      this.failure = undefined;
      this.current = next;
      this.options.use(next, checked);
    } catch (err) {
      const variables = this.files.map((file) => file.variable).join(' and ');
      this.options.logger.error({ err }, `looking at ${variables} again failed: what is in use stays`);
    } finally {
      this.looking = false;
    }
  }
}

/** inode, size, modification and change time of a file. */
async function fingerprint(file: NamedFile): Promise<string> {
  const s = await naming(file.variable, stat(file.path));
  return `${s.ino}:${s.size}:${s.mtimeMs}:${s.ctimeMs}`;
}

/** The same work, failing with the variable that names the file and the reason ("STORE_TLS_KEY: EACCES"). */
function naming<T>(variable: string, work: Promise<T>): Promise<T> {
  return work.catch((err: unknown) => {
    throw new Error(`${variable}: ${reasonOf(err)}`);
  });
}

/** A system error's code (ENOENT, EACCES); OpenSSL's own words otherwise ("x509 certificate routines::key values mismatch"). */
export function reasonOf(err: unknown): string {
  const { syscall, code, message } = err as NodeJS.ErrnoException;
  return (syscall && code) || message.replace(/^error:[0-9A-F]+:/, '');
}
