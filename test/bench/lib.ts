import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createConnection, createServer } from 'node:net';
import autocannon from 'autocannon';

/** A free loopback TCP port (probed by binding port 0). */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as { port: number };
  await new Promise((r) => server.close(r));
  return port;
}

export interface Stopper {
  stop(): Promise<void>;
}

/** Starts a throw-away redis-server (no persistence) and waits until it answers PING. */
export async function startRedisServer(): Promise<Stopper & { port: number; version: string }> {
  const port = await freePort();
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let output = '';
  child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  const deadline = Date.now() + 10_000;
  while (!(await ping(port))) {
    if (Date.now() > deadline || child.exitCode !== null) throw new Error(`redis-server did not start: ${output}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  const version = (/v=(\S+)/.exec(output)?.[1] ?? /Redis version=(\S+)/.exec(output)?.[1] ?? 'unknown').replace(/,$/, '');
  return {
    port,
    version,
    stop: async () => {
      child.kill('SIGTERM');
      await new Promise((r) => child.once('exit', r));
    },
  };
}

function ping(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = createConnection({ port, host: '127.0.0.1' });
    socket.once('error', () => resolve(false));
    socket.once('connect', () => socket.write('PING\r\n'));
    socket.once('data', (d) => {
      resolve(d.toString().startsWith('+PONG'));
      socket.destroy();
    });
  });
}

export interface Measure {
  rate: number;
  p50: number;
  p99: number;
  errors: number;
  /** CPU time (user + system) the page-serving process spent per request, in µs; NaN when not measured. */
  cpuUs?: number;
  /**
   * CPU time the whole machine spent per request, in µs: every process (servers, store, load
   * generator) and the kernel; NaN when not measured.
   */
  machineUs?: number;
}

/**
 * CPU time (user + system) a process has used so far, in µs, from /proc (Linux); NaN elsewhere.
 * CPU per request is steadier than requests/s on a shared machine, and says what the server costs.
 */
export function processCpuUs(pid: number | undefined): number {
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return ((Number(fields[11]) + Number(fields[12])) * 1e6) / CLOCK_TICKS;
  } catch {
    return NaN;
  }
}

/**
 * CPU time all cores have spent busy so far (every process and the kernel; not idle, I/O wait or
 * time stolen by a hypervisor), in µs, from /proc/stat (Linux); NaN elsewhere.
 */
export function machineBusyUs(): number {
  try {
    const [user, nice, system, , , irq, softirq] = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0].trim().split(/\s+/).slice(1).map(Number);
    return ((user + nice + system + irq + softirq) * 1e6) / CLOCK_TICKS;
  } catch {
    return NaN;
  }
}

/** USER_HZ: the unit of /proc/stat and /proc/<pid>/stat times; 100 on every Linux this runs on. */
const CLOCK_TICKS = 100;

/**
 * Loads GET / with autocannon: `connections` connections, each its own cookie jar (one session
 * per connection), for durationS seconds. Returns requests/s and latency percentiles (ms).
 */
export async function measurePage(url: string, connections: number, durationS: number): Promise<Measure> {
  const result = await autocannon({
    url,
    connections,
    duration: durationS,
    // Each connection is one browser: it keeps the cookie its first response set. (autocannon's
    // per-request context is reset after every request of a one-request sequence, so the cookie
    // is kept on the connection's client instead.)
    setupClient: (raw: autocannon.Client) => {
      // The 'headers' event carries the parser's raw [name, value, ...] list (the typings say otherwise).
      const client = raw as unknown as { on(event: 'headers', cb: (info: { headers: string[] }) => void): void; setHeaders(h: Record<string, string>): void };
      client.on('headers', (info) => {
        for (let i = 0; i < info.headers.length; i += 2) {
          if (info.headers[i].toLowerCase() === 'set-cookie') client.setHeaders({ cookie: info.headers[i + 1].split(';')[0] });
        }
      });
    },
  } as autocannon.Options);
  return {
    rate: result.requests.average,
    p50: result.latency.p50,
    p99: result.latency.p99,
    errors: result.errors + result.timeouts + result.non2xx,
  };
}

/**
 * Runs `op` with `inFlight` concurrent loops for durationMs; returns ops/s and per-op latency
 * percentiles (ms). Each loop gets its own index (e.g. to pick its own key).
 */
export async function measureOps(op: (loop: number, i: number) => Promise<unknown>, inFlight: number, durationMs: number): Promise<Measure> {
  const latencies: number[] = [];
  let errors = 0;
  let count = 0;
  const end = Date.now() + durationMs;
  await Promise.all(
    Array.from({ length: inFlight }, async (_, loop) => {
      for (let i = 0; Date.now() < end; i += 1) {
        const t = process.hrtime.bigint();
        try {
          await op(loop, i);
        } catch {
          errors += 1;
        }
        count += 1;
        if ((count & 7) === 0) latencies.push(Number(process.hrtime.bigint() - t) / 1e6);
      }
    }),
  );
  latencies.sort((a, b) => a - b);
  const at = (q: number) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))] ?? NaN;
  return { rate: count / (durationMs / 1000), p50: at(0.5), p99: at(0.99), errors };
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

export function medianMeasure(runs: Measure[]): Measure {
  return {
    rate: median(runs.map((r) => r.rate)),
    p50: median(runs.map((r) => r.p50)),
    p99: median(runs.map((r) => r.p99)),
    errors: runs.reduce((a, r) => a + r.errors, 0),
    cpuUs: median(runs.map((r) => r.cpuUs ?? NaN)),
    machineUs: median(runs.map((r) => r.machineUs ?? NaN)),
  };
}

/** A horizontal bar chart as a small standalone SVG. */
export function barChart(title: string, unit: string, bars: Array<{ label: string; value: number; highlight?: boolean }>): string {
  const width = 760;
  const labelWidth = 300;
  const barHeight = 26;
  const top = 40;
  const max = Math.max(...bars.map((b) => b.value), 1);
  const rows = bars
    .map((b, i) => {
      const y = top + i * (barHeight + 10);
      const w = Math.max(2, ((width - labelWidth - 90) * b.value) / max);
      const fill = b.highlight ? '#1d4ed8' : '#94a3b8';
      return [
        `<text x="${labelWidth - 10}" y="${y + 18}" text-anchor="end">${escapeXml(b.label)}</text>`,
        `<rect x="${labelWidth}" y="${y}" width="${w.toFixed(1)}" height="${barHeight}" rx="4" fill="${fill}"/>`,
        `<text x="${labelWidth + w + 8}" y="${y + 18}">${Math.round(b.value).toLocaleString('en-US')} ${unit}</text>`,
      ].join('');
    })
    .join('\n');
  const height = top + bars.length * (barHeight + 10) + 10;
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="system-ui, sans-serif" font-size="14" fill="#1a1f2b">
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="16" y="24" font-size="16" font-weight="700">${escapeXml(title)}</text>
${rows}
</svg>
`;
}

function escapeXml(s: string): string {
  return s.replace(/[<>&"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', '"': '&quot;' })[c]!);
}
