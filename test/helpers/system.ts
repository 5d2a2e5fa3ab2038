/**
 * Suites that need a system program skip with one line naming the Debian package when it is
 * missing, and fail instead when CI is set (CI installs everything, so a skip would hide a gap).
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

export function hasProgram(program: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${program}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Call from a `before` hook: skips the suite (or throws under CI) when `program` is missing. */
export function requireProgram(ctx: Mocha.Context, program: string, debianPackage: string): void {
  if (hasProgram(program)) return;
  const message = `${program} not found: install the Debian package ${debianPackage} (apt-get install -y ${debianPackage})`;
  if (process.env.CI) throw new Error(`${message}; CI must run every suite`);
  process.stdout.write(`  skipped: ${message}\n`);
  ctx.skip();
}

/** A small tmpfs mounted on a new temp directory, so a test can fill a disk or make it read-only. */
export interface Tmpfs {
  dir: string;
  /** Unmounts and removes the directory; safe to call more than once. */
  remove(): void;
}

/**
 * Call from a `before` hook: mounts a tmpfs of sizeMiB, or skips the suite with one line when this
 * process may not mount. Not being root fails instead under CI (CI runs as root, so that is a gap);
 * a root that may still not mount (a container without CAP_SYS_ADMIN) skips there too, since no
 * package can give that right.
 */
export function mountTmpfs(ctx: Mocha.Context, sizeMiB: number): Tmpfs {
  const dir = mkdtempSync(path.join(tmpdir(), 'sessions-tmpfs-'));
  try {
    if (process.getuid?.() !== 0) throw new Error('mount needs root');
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m`, 'tmpfs', dir], { stdio: 'pipe' });
  } catch (err) {
    rmdirSync(dir);
    const message = `cannot mount a tmpfs (${(err as Error).message.split('\n')[0]})`;
    if (process.env.CI && process.getuid?.() !== 0) throw new Error(`${message}; CI runs as root and must run every suite`);
    process.stdout.write(`  skipped: ${message}\n`);
    ctx.skip();
  }
  let mounted = true;
  return {
    dir,
    remove: () => {
      if (!mounted) return;
      execFileSync('umount', [dir], { stdio: 'pipe' });
      mounted = false;
      rmdirSync(dir);
    },
  };
}
