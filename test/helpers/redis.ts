import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { createConnection, createServer } from 'node:net';
import path from 'node:path';
import { stopAtExit, tempDir } from './procs';
import { requireProgram } from './system';

/**
 * Throw-away redis-server processes for tests and benchmarks: a single server or a Redis Cluster
 * of masters, on free loopback ports, in temp dirs, without persistence. Readiness is polled
 * (PING, CLUSTER INFO), never slept for.
 */

const HOST = '127.0.0.1';

/**
 * For a mocha `before` hook: skips the suite with one line naming the Debian package when
 * redis-server or redis-cli is missing, or fails it when CI is set (CI installs them).
 */
export function requireRedis(ctx: Mocha.Context): void {
  requireProgram(ctx, 'redis-server', 'redis-server');
  requireProgram(ctx, 'redis-cli', 'redis-tools');
}

/** A free loopback TCP port (probed by binding port 0). */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, HOST, resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/**
 * Sends one command and resolves with its reply as text: "+OK" → "OK", a bulk string → its
 * contents, an integer → its digits; an error reply rejects. Enough for PING and CLUSTER INFO.
 */
export function redisCommand(port: number, ...args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = createConnection({ port, host: HOST });
    let buffer = Buffer.alloc(0);
    const done = (err: Error | null, reply?: string) => {
      socket.destroy();
      if (err) reject(err);
      else resolve(reply!);
    };
    socket.setTimeout(2000, () => done(new Error(`redis on port ${port}: no reply`)));
    socket.once('error', (err) => done(err));
    socket.once('connect', () => {
      const parts = [`*${args.length}\r\n`, ...args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`)];
      socket.write(parts.join(''));
    });
    socket.on('data', (chunk) => {
      buffer = Buffer.concat([buffer, chunk]);
      const end = buffer.indexOf('\r\n');
      if (end < 0) return;
      const head = buffer.subarray(0, end).toString();
      if (head[0] === '-') return done(new Error(head.slice(1)));
      if (head[0] !== '$') return done(null, head.slice(1));
      const length = Number(head.slice(1));
      if (length < 0) return done(null, '');
      if (buffer.length >= end + 2 + length + 2) done(null, buffer.subarray(end + 2, end + 2 + length).toString());
    });
  });
}

async function until(what: string, check: () => Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`${what}: not reached within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

export interface RedisServer {
  port: number;
  /** redis://127.0.0.1:<port> */
  url: string;
  /** Every line the server printed so far. */
  output: string[];
  /** Stops it (SIGTERM, or SIGKILL for a crash) and waits for the exit; its data is gone. */
  stop(signal?: NodeJS.Signals): Promise<void>;
  /** Starts it again on the same port; resolves once it answers PING. */
  start(): Promise<void>;
  /** Freezes (SIGSTOP) or thaws (SIGCONT) the process: connections stay open, replies stop. */
  pause(): void;
  resume(): void;
}

interface ServerOptions {
  /** Port to listen on (default: a free one). */
  port?: number;
  /** Extra redis-server arguments, e.g. ['--cluster-enabled', 'yes']. */
  args?: string[];
  /** Directory for its files (default: a new temp dir removed on stop). */
  dir?: string;
  /** A configuration file to start from (a Sentinel needs one it can rewrite). */
  configFile?: string;
  /** The password the server asks for (its requirepass): readiness is then checked by AUTH, not PING. */
  password?: string;
}

/** Starts a redis-server on a free port (retrying when another process took the port first). */
export async function startRedisServer(options: ServerOptions = {}): Promise<RedisServer> {
  if (options.port) return launch(options.port, options);
  let lastError: Error | undefined;
  for (let attempt = 0; attempt < 5; attempt += 1) {
    try {
      return await launch(await freePort(), options);
    } catch (err) {
      lastError = err as Error;
    }
  }
  throw lastError;
}

async function launch(port: number, options: ServerOptions): Promise<RedisServer> {
  const tmp = options.dir ? undefined : tempDir('sessions-redis-');
  const dir = options.dir ?? tmp!.dir;
  const args = [
    ...(options.configFile ? [options.configFile] : []),
    '--port', String(port), '--bind', HOST, '--dir', dir, '--save', '', '--appendonly', 'no',
    '--loglevel', 'warning', '--logfile', '', ...(options.args ?? []),
  ];
  const output: string[] = [];
  let child: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();

  const start = async () => {
    mkdirSync(dir, { recursive: true });
    const proc = stopAtExit(spawn('redis-server', args, { stdio: ['ignore', 'pipe', 'pipe'] }));
    child = proc;
    exited = new Promise((resolve) => proc.once('exit', () => resolve()));
    proc.stdout!.on('data', (d: Buffer) => output.push(...d.toString().split('\n').filter(Boolean)));
    proc.stderr!.on('data', (d: Buffer) => output.push(...d.toString().split('\n').filter(Boolean)));
    try {
      await until(`redis-server on port ${port}`, async () => {
        if (proc.exitCode !== null) throw new Error(`redis-server exited: ${output.join('\n')}`);
        return options.password ? (await redisCommand(port, 'AUTH', options.password)) === 'OK' : (await redisCommand(port, 'PING')) === 'PONG';
      });
    } catch (err) {
      proc.kill('SIGKILL');
      await exited;
      throw new Error(`${(err as Error).message}\n${output.join('\n')}`);
    }
  };
  const stopChild = async (signal: NodeJS.Signals) => {
    child?.kill('SIGCONT');
    if (child && child.exitCode === null && child.signalCode === null) child.kill(signal);
    await exited;
  };

  try {
    await start();
  } catch (err) {
    tmp?.remove();
    throw err;
  }
  return {
    port,
    url: `redis://${HOST}:${port}`,
    output,
    start,
    pause: () => child?.kill('SIGSTOP'),
    resume: () => child?.kill('SIGCONT'),
    stop: async (signal: NodeJS.Signals = 'SIGTERM') => {
      await stopChild(signal);
      tmp?.remove();
    },
  };
}

export interface RedisClusterProcs {
  masters: RedisServer[];
  replicas: RedisServer[];
  /** Seed nodes as REDIS_CLUSTER_NODES expects them: 127.0.0.1:p1,127.0.0.1:p2,... */
  seeds: string;
  stop(): Promise<void>;
}

/**
 * Has every master of the cluster mark a lost node failed only after 15 s, Redis' default (the
 * test clusters start with 2 s): a master that is down stays, for a test's length, the owner of
 * its slots while the others still say cluster_state:ok.
 */
export async function useDefaultNodeTimeout(cluster: RedisClusterProcs): Promise<void> {
  for (const node of cluster.masters) await redisCommand(node.port, 'CONFIG', 'SET', 'cluster-node-timeout', '15000');
}

/**
 * Starts a Redis Cluster of `masters` masters, each with `replicasPerMaster` replicas
 * (`redis-server --cluster-enabled yes` on free ports, joined by `redis-cli --cluster create`) and
 * resolves once every node reports cluster_state:ok with all 16384 slots and every node known.
 * `masters` lists the first `masters` nodes, which `--cluster create` makes the masters; `replicas` the others.
 */
export async function startRedisCluster(masters = 3, replicasPerMaster = 0): Promise<RedisClusterProcs> {
  const tmp = tempDir('sessions-redis-cluster-');
  const nodes: RedisServer[] = [];
  const stop = async () => {
    await Promise.all(nodes.map((n) => n.stop()));
    tmp.remove();
  };
  try {
    const total = masters * (1 + replicasPerMaster);
    for (let i = 0; i < total; i += 1) {
      nodes.push(
        await startRedisServer({
          dir: path.join(tmp.dir, `node${i}`),
          args: [
            '--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf', '--cluster-node-timeout', '2000',
            '--cluster-port', String(await freePort()),
          ],
        }),
      );
    }
    const addresses = nodes.map((n) => `${HOST}:${n.port}`);
    await new Promise<void>((resolve, reject) =>
      execFile('redis-cli', ['--cluster', 'create', ...addresses, '--cluster-replicas', String(replicasPerMaster), '--cluster-yes'], { timeout: 30_000 }, (err, stdout, stderr) =>
        err ? reject(new Error(`redis-cli --cluster create failed: ${stderr || stdout}`)) : resolve(),
      ),
    );
    await until('cluster_state:ok on every node', async () => {
      for (const node of nodes) {
        const info = await redisCommand(node.port, 'CLUSTER', 'INFO');
        const ok = /cluster_state:ok/.test(info) && /cluster_slots_ok:16384/.test(info) && new RegExp(`cluster_known_nodes:${total}\\b`).test(info);
        if (!ok) return false;
      }
      return true;
    });
    if (replicasPerMaster > 0) {
      await until('every replica in sync', async () => {
        for (const node of nodes.slice(masters)) {
          if (!/master_link_status:up/.test(await redisCommand(node.port, 'INFO', 'replication'))) return false;
        }
        return true;
      });
    }
    return { masters: nodes.slice(0, masters), replicas: nodes.slice(masters), seeds: addresses.slice(0, masters).join(','), stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** Runs redis-cli with the arguments and resolves with its output (trimmed). */
export function redisCli(...args: string[]): Promise<string> {
  return new Promise((resolve, reject) =>
    execFile('redis-cli', args, { timeout: 10_000 }, (err, stdout, stderr) => (err ? reject(new Error(stderr || err.message)) : resolve(stdout.trim()))),
  );
}

export interface RedisSentinelProcs {
  master: RedisServer;
  replica: RedisServer;
  /** The Sentinel's port; it watches the master under the name `mymaster`. */
  sentinelPort: number;
  /** host:port of the master the Sentinel currently names. */
  currentMaster(): Promise<string>;
  /** Asks the Sentinel for a failover and resolves once it names the replica as master. */
  failover(): Promise<void>;
  stop(): Promise<void>;
}

/**
 * A master, one replica of it and one Sentinel (quorum 1) watching them as `mymaster`; with
 * `password`, the Sentinel asks for it (requirepass), and `config` adds lines to its configuration.
 */
export async function startRedisSentinel(options: { password?: string; config?: string[] } = {}): Promise<RedisSentinelProcs> {
  const tmp = tempDir('sessions-redis-sentinel-');
  const procs: RedisServer[] = [];
  const stop = async () => {
    await Promise.all(procs.map((p) => p.stop()));
    tmp.remove();
  };
  try {
    const master = await startRedisServer({ dir: path.join(tmp.dir, 'master') });
    procs.push(master);
    const replica = await startRedisServer({ dir: path.join(tmp.dir, 'replica'), args: ['--replicaof', HOST, String(master.port)] });
    procs.push(replica);
    await until('replica in sync', async () => /master_link_status:up/.test(await redisCommand(replica.port, 'INFO', 'replication')));
    const sentinelPort = await freePort();
    const conf = path.join(tmp.dir, 'sentinel.conf');
    writeFileSync(
      conf,
      [
        `port ${sentinelPort}`,
        `bind ${HOST}`,
        `dir ${tmp.dir}`,
        `sentinel monitor mymaster ${HOST} ${master.port} 1`,
        'sentinel down-after-milliseconds mymaster 1000',
        'sentinel failover-timeout mymaster 10000',
        ...(options.password ? [`requirepass ${options.password}`] : []),
        ...(options.config ?? []),
        '',
      ].join('\n'),
    );
    const sentinel = await startRedisServer({ port: sentinelPort, configFile: conf, args: ['--sentinel'], password: options.password });
    procs.push(sentinel);
    const cli = (...args: string[]) => redisCli('-p', String(sentinelPort), ...(options.password ? ['-a', options.password, '--no-auth-warning'] : []), ...args);
    const currentMaster = async () => (await cli('SENTINEL', 'get-master-addr-by-name', 'mymaster')).split('\n').join(':');
    // Sentinel promotes only a replica it has read INFO from (its link status comes from there).
    await until('sentinel has seen the replica in sync', async () => /master-link-status\nok\b/.test(await cli('SENTINEL', 'replicas', 'mymaster')));
    return {
      master,
      replica,
      sentinelPort,
      currentMaster,
      failover: async () => {
        const answer = await cli('SENTINEL', 'FAILOVER', 'mymaster');
        if (answer !== 'OK') throw new Error(`SENTINEL FAILOVER: ${answer}`);
        await until('the replica promoted', async () => (await currentMaster()) === `${HOST}:${replica.port}`, 20_000);
      },
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}
