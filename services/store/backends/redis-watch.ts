import type Redis from 'ioredis';
import type { ChangeEvent, ChangeKind, StoredEntry } from './backend';

/**
 * watch() for the Redis backend, over keyspace notifications. Redis publishes them on the node
 * that changed the key only, so there is one subscriber connection per master (one for a single
 * server or a Sentinel-managed master); the backend calls sync() when the cluster's masters change.
 *
 * Each subscriber, whenever it (re)connects, first makes sure the node publishes the events we
 * need (CONFIG SET notify-keyspace-events: K = keyspace channel, g = del, h = hset, x = expired,
 * e = evicted; flags already set are kept), then subscribes to one pattern per watched prefix.
 * Where CONFIG is not allowed (managed Redis), the operator must set these flags.
 *
 * A write is the script's "hset"; a refresh only moves the expiry ("expire", ignored). The event
 * does not carry the value, so a put event reads the entry back: value and version are those of
 * the entry at that moment (0 and empty when it is already gone). Events of one key arrive in
 * order; events are delivered in arrival order. Notifications are fire-and-forget in Redis: a
 * watcher misses what happens while its connection to a master is down.
 */

const REQUIRED_FLAGS = ['K', 'g', 'h', 'x', 'e'];
/** Put events beyond this many unanswered read-backs are delivered without value and version. */
const MAX_PENDING_READS = 1000;
const EMPTY = Buffer.alloc(0);
const KINDS: Record<string, ChangeKind | undefined> = { hset: 'put', del: 'delete', expired: 'expire', evicted: 'expire' };

export interface WatchDeps {
  /** The keyspace prefix of the backend (REDIS_KEY_PREFIX). */
  keyPrefix: string;
  /** The logical database (always 0 in a cluster). */
  db: number;
  /** The masters now: host:port in a cluster, [null] for the single or Sentinel-managed master. */
  masters(): Array<MasterNode | null>;
  /** A new subscriber connection to a master of masters(). */
  connect(node: MasterNode | null): Redis;
  /** Reads a live entry (without refreshing it), for the value and version of a put event. */
  read(key: string): Promise<StoredEntry | null>;
  warn(detail: object, message: string): void;
  /** How long writes wait for a new watch subscription to be confirmed (see settled()). */
  settleMs: number;
}

type Listener = (event: ChangeEvent) => void;
type MasterNode = { host: string; port: number };

interface Subscriber {
  connection: Redis;
  /** Set once the node's notification flags were checked on this connection (before it subscribes). */
  configured: boolean;
  /** Patterns sent to the node; `acked` those it confirmed. */
  subscribed: Set<string>;
  acked: Set<string>;
}

export class KeyspaceWatch {
  private readonly subscribers = new Map<string, Subscriber>();
  private readonly listeners = new Map<string, Set<Listener>>();
  private readonly channelPrefix: Buffer;
  private delivery: Promise<void> = Promise.resolve();
  private pendingReads = 0;
  private warnedConfig = false;
  private waiters: Array<() => void> = [];
  private settleUntil = 0;

  constructor(private readonly deps: WatchDeps) {
    this.channelPrefix = Buffer.from(`__keyspace@${deps.db}__:${deps.keyPrefix}`);
  }

  /** Starts delivering events of keys with the prefix to onEvent; returns the unsubscribe function. */
  add(prefix: string, onEvent: Listener): () => void {
    const pattern = `__keyspace@${this.deps.db}__:${escapeGlob(this.deps.keyPrefix + prefix)}*`;
    let set = this.listeners.get(pattern);
    if (!set) {
      set = new Set();
      this.listeners.set(pattern, set);
    }
    set.add(onEvent);
    this.settleUntil = Date.now() + this.deps.settleMs;
    this.sync();
    return () => {
      set.delete(onEvent);
      if (set.size === 0 && this.listeners.get(pattern) === set) this.listeners.delete(pattern);
      this.sync();
    };
  }

  /**
   * Makes the subscribers match the masters and the watched patterns (call it when the masters
   * change). Connections are open only while something is watched.
   */
  sync(): void {
    const nodes = this.listeners.size === 0 ? [] : this.deps.masters();
    const wanted = new Map(nodes.map((n) => [n ? `${n.host}:${n.port}` : '', n] as const));
    for (const [id, sub] of this.subscribers) {
      if (!wanted.has(id)) {
        this.subscribers.delete(id);
        sub.connection.disconnect();
      }
    }
    for (const [id, node] of wanted) {
      if (!this.subscribers.has(id)) this.subscribers.set(id, this.open(node));
    }
    for (const sub of this.subscribers.values()) void this.resubscribe(sub);
  }

  close(): void {
    this.listeners.clear();
    this.sync();
    this.release();
  }

  /**
   * Resolves once every master confirmed every watched pattern, so that a write sent after watch()
   * returned is seen by the watcher. Waits at most `settleMs` after the last watch() call: a node
   * that never confirms does not hold writes back for longer.
   */
  async settled(): Promise<void> {
    const wait = this.settleUntil - Date.now();
    if (wait <= 0 || this.isSettled()) return;
    await new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.waiters = this.waiters.filter((w) => w !== done);
        resolve();
      };
      const timer = setTimeout(done, wait);
      this.waiters.push(done);
    });
  }

  private isSettled(): boolean {
    for (const sub of this.subscribers.values()) {
      for (const pattern of this.listeners.keys()) if (!sub.acked.has(pattern)) return false;
    }
    return true;
  }

  private release(): void {
    if (this.waiters.length > 0 && this.isSettled()) [...this.waiters].forEach((done) => done());
  }

  private open(node: MasterNode | null): Subscriber {
    const connection = this.deps.connect(node);
    const sub: Subscriber = { connection, configured: false, subscribed: new Set(), acked: new Set() };
    connection.on('error', () => undefined);
    connection.on('close', () => {
      sub.configured = false;
      sub.subscribed.clear();
      sub.acked.clear();
    });
    connection.on('ready', async () => {
      await this.configure(sub);
      sub.configured = true;
      await this.resubscribe(sub);
    });
    connection.on('pmessageBuffer', (pattern: Buffer, channel: Buffer, message: Buffer) =>
      this.onMessage(pattern.toString(), channel, message.toString()),
    );
    return sub;
  }

  /** Adds the notification flags we need to the node's configuration (before subscribing). */
  private async configure(sub: Subscriber): Promise<void> {
    try {
      const [, current = ''] = (await sub.connection.config('GET', 'notify-keyspace-events')) as string[];
      const flags = new Set(current.split(''));
      const has = (flag: string) => flags.has(flag) || (flag !== 'K' && flag !== 'E' && flags.has('A'));
      const missing = REQUIRED_FLAGS.filter((flag) => !has(flag));
      if (missing.length > 0) await sub.connection.config('SET', 'notify-keyspace-events', current + missing.join(''));
    } catch (err) {
      if (!this.warnedConfig) {
        this.warnedConfig = true;
        this.deps.warn(
          { err: (err as Error).message },
          `cannot set notify-keyspace-events; set it to include ${REQUIRED_FLAGS.join('')} on every master for Watch`,
        );
      }
    }
  }

  private async resubscribe(sub: Subscriber): Promise<void> {
    if (!sub.configured || sub.connection.status !== 'ready') return;
    const add = [...this.listeners.keys()].filter((p) => !sub.subscribed.has(p));
    const remove = [...sub.subscribed].filter((p) => !this.listeners.has(p));
    add.forEach((p) => sub.subscribed.add(p));
    remove.forEach((p) => {
      sub.subscribed.delete(p);
      sub.acked.delete(p);
    });
    try {
      if (add.length > 0) await sub.connection.psubscribe(...add);
      add.forEach((p) => sub.subscribed.has(p) && sub.acked.add(p));
      if (remove.length > 0) await sub.connection.punsubscribe(...remove);
    } catch {
      add.forEach((p) => sub.subscribed.delete(p));
    }
    this.release();
  }

  private onMessage(pattern: string, channel: Buffer, event: string): void {
    const listeners = this.listeners.get(pattern);
    const kind = KINDS[event];
    if (!listeners || !kind || !channel.subarray(0, this.channelPrefix.length).equals(this.channelPrefix)) return;
    const key = channel.subarray(this.channelPrefix.length).toString('utf8');
    const base: ChangeEvent = { kind, key, version: 0, value: EMPTY, expiresAtMs: 0 };
    let ready: Promise<ChangeEvent> = Promise.resolve(base);
    if (kind === 'put' && this.pendingReads < MAX_PENDING_READS) {
      this.pendingReads += 1;
      ready = this.deps
        .read(key)
        .then((entry) => (entry ? { ...base, version: entry.version, value: entry.value, expiresAtMs: entry.expiresAtMs } : base))
        .catch(() => base)
        .finally(() => (this.pendingReads -= 1));
    }
    // Read-backs run in parallel; events are delivered in the order they arrived.
    this.delivery = this.delivery.then(async () => {
      const event = await ready;
      for (const listener of listeners) {
        try {
          listener(event);
        } catch (err) {
          this.deps.warn({ err: (err as Error).message }, 'a watch listener threw');
        }
      }
    });
  }
}

/** Escapes Redis glob characters so a prefix matches only itself. */
export function escapeGlob(text: string): string {
  return text.replace(/[\\*?[\]]/g, '\\$&');
}
