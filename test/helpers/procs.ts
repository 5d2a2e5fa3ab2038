import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';

export const root = path.resolve(__dirname, '..', '..', '..');

/**
 * Processes the tests started that are still running: killed when the test run exits. A test that
 * times out never reaches its `finally`, and mocha's --exit would leave what it started running.
 */
const running = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/** Has `child` killed when the test run exits, if it is still running then. */
export function stopAtExit(child: ChildProcess): ChildProcess {
  running.add(child);
  child.once('exit', () => running.delete(child));
  return child;
}

export interface Proc {
  child: ChildProcess;
  port: number;
  /** Every stdout/stderr line so far (JSON logs). */
  lines: string[];
  /** SIGTERM and wait for exit; resolves with the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/**
 * The environment every process a test starts gets: no .env is read, so a developer's own (say,
 * the README's TLS lines in the repository's .env) cannot change what the tests see.
 */
export const NO_ENV_FILE = { DOTENV_CONFIG_PATH: '/dev/null' } as const;

/** keep = false: drop a process's log lines once it listens (benchmarks: no parsing on the load generator). */
export const logCapture = { keep: true };

/** Starts `node <script>` and resolves once it logs "listening" with its port (no fixed sleeps). */
export function startProcess(script: string, env: Record<string, string>, timeoutMs = 15_000): Promise<Proc> {
  const child = stopAtExit(spawn(process.execPath, [path.join(root, script)], {
    cwd: root,
    env: { PATH: process.env.PATH ?? '', LOG_LEVEL: 'info', ...NO_ENV_FILE, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  }));
  const lines: string[] = [];
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const stop = async (signal: NodeJS.Signals = 'SIGTERM') => {
    if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    return exited;
  };
  createInterface({ input: child.stderr! }).on('line', (line) => lines.push(line));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${script} did not start within ${timeoutMs} ms:\n${lines.join('\n')}`));
    }, timeoutMs);
    const stdout = createInterface({ input: child.stdout! });
    stdout.on('line', (line) => {
      lines.push(line);
      try {
        const entry = JSON.parse(line) as { msg?: string; port?: number };
        if (entry.msg === 'listening' && typeof entry.port === 'number') {
          clearTimeout(timer);
          if (!logCapture.keep) {
            stdout.close();
            child.stdout!.resume();
          }
          resolve({ child, port: entry.port, lines, stop });
        }
      } catch {
        // not a JSON log line
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`${script} exited with ${code} before listening:\n${lines.join('\n')}`));
    });
  });
}

/**
 * Resolves once the process has logged a line that matches (log lines are written asynchronously,
 * so a line may arrive after the response it belongs to); rejects after timeoutMs.
 */
export async function waitForLine(proc: Proc, matches: (line: string) => boolean, timeoutMs = 5000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const line = proc.lines.find(matches);
    if (line !== undefined) return line;
    if (Date.now() > deadline) throw new Error(`no matching log line within ${timeoutMs} ms:\n${proc.lines.slice(-20).join('\n')}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A temp directory removed by the returned cleanup. */
export function tempDir(prefix = 'sessions-test-'): { dir: string; remove(): void } {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

export const TEST_KEY = 'test-key-0123456789-0123456789-0123456789';

export function startStore(dataDir: string, env: Record<string, string> = {}, port = 0): Promise<Proc> {
  return startProcess('dist/services/store/main.js', { PORT: String(port), STORE_DATA_DIR: dataDir, STORE_METRICS_PORT: '0', ...env });
}

export function startWeb(storePort: number, dataDir: string, env: Record<string, string> = {}): Promise<Proc> {
  return startProcess('dist/services/web/main.js', {
    PORT: '0',
    STORE_ADDRESS: `127.0.0.1:${storePort}`,
    WEB_DATA_DIR: dataDir,
    SESSION_KEYS: TEST_KEY,
    ...env,
  });
}

/** Starts the web expecting it to refuse: resolves with why it exited before listening (undefined if it started after all; it is then stopped). */
export function webStartFailure(storePort: number, dataDir: string, env: Record<string, string>): Promise<string | undefined> {
  return startWeb(storePort, dataDir, env).then(
    async (web) => {
      await web.stop();
      return undefined;
    },
    (err: Error) => err.message,
  );
}
