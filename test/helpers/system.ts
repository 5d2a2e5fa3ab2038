/**
 * Suites that need a system program skip with one line naming the Debian package when it is
 * missing, and fail instead when CI is set (CI installs everything, so a skip would hide a gap).
 */
import { execFileSync } from 'node:child_process';

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
