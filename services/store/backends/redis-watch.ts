import type Redis from 'ioredis';
import { type ChangeEvent, type ChangeKind, EMPTY_VALUE, type StoredEntry, StoreError } from './backend';

/**
 * watch() for the Redis backend, over keyspace notifications. Redis publishes them on the node
 * that changed the key only, so there is one subscriber connection per master (one for a single
 * server or a Sentinel-managed master); the backend calls sync() when the cluster's masters change.
 *
 * Each subscriber, whenever it (re)connects, first makes sure the node publishes the events we
 * need (CONFIG SET notify-keyspace-events: K/E = keyspace/keyevent channels, g = del, h = hset,
 * x = expired, e = evicted; flags already set are kept), then subscribes. Where CONFIG is not
 * allowed (managed Redis), the operator must set these flags.
 *
 * A watcher of every kind subscribes to one keyspace pattern per prefix; a write is the script's
 * "hset" (a refresh only moves the expiry: "expire", ignored). That event does not carry the
 * value, so a put event reads the entry back: value and version are those of the entry at that
 * moment (0 and empty when it is already gone). A "del" is a Delete, but also what a cluster
 * node publishes when a resharding MIGRATEs the key to another node, where it lives on: so a
 * delete event is checked by a read too, and dropped when the entry is live (moved, or already
 * created again, whose put event follows). A watcher of expiries only (metrics) subscribes to
 * the "expired" and "evicted" keyevent channels instead: no message per write, no read-back.
 *
 * Events of one key arrive in order; events are delivered in arrival order. Notifications are
 * fire-and-forget in Redis: a watcher misses what happens while its connection to a master is down
 * (Redis down, or only that connection: CLIENT KILL, client-output-buffer-limit pubsub). So when a
 * subscriber connection closes, every listener that gave onError is ended with an 'unavailable'
 * error (after the events received before), since it may miss changes from then on; listeners
 * without onError (the expiry counter of the metrics) stay and are subscribed again on reconnect.
 */

const REQUIRED_FLAGS = ['K', 'E', 'g', 'h', 'x', 'e'];

/** How log lines and errors name a master. */
function nodeName(node: MasterNode | null): string {
  return node ? `redis ${node.host}:${node.port}` : 'redis';
}

/** The error that ends a watcher when the feed from a master may have missed changes. */
function missedChanges(node: MasterNode | null, what: string): StoreError {
  return new StoreError('unavailable', `the change feed from ${nodeName(node)} ${what}, so changes may have been missed; list again and watch again`);
}

/** The flags of REQUIRED_FLAGS a notify-keyspace-events value lacks (A stands for g, h, x, e and more). */
function missingFlags(current: string): string[] {
  const flags = new Set(current.split(''));
  return REQUIRED_FLAGS.filter((flag) => !flags.has(flag) && (flag === 'K' || flag === 'E' || !flags.has('A')));
}
/** Put events beyond this many unanswered read-backs are delivered without value and version. */
const MAX_PENDING_READS = 1000;
const KINDS: Record<string, ChangeKind | undefined> = { hset: 'put', del: 'delete', expired: 'expire', evicted: 'expire' };

type MasterNode = { host: string; port: number };

export interface WatchDeps {
  /** The keyspace prefix of the backend (REDIS_KEY_PREFIX). */
  keyPrefix: string;
  /** The logical database (always 0 in a cluster). */
  db: number;
  /** The masters now: host:port in a cluster, [null] for the single or Sentinel-managed master. */
  masters(): Array<MasterNode | null>;
  /** A new subscriber connection to a master of masters(). */
  connect(node: MasterNode | null): Redis;
  /** A CONFIG command on a master of masters(), through the backend's own connection to it. */
  config(node: MasterNode | null, ...args: string[]): Promise<unknown>;
  /** Reads a live entry (without refreshing it), for the value and version of a put event. */
  read(key: string): Promise<StoredEntry | null>;
  warn(detail: object, message: string): void;
  /** How long writes wait for a new watch subscription to be confirmed (see settled()). */
  settleMs: number;
}

interface Listener {
  prefix: string;
  onEvent: (event: ChangeEvent) => void;
  onError?: (error: StoreError) => void;
  /** Removes the listener from its subscriptions. */
  remove(): void;
}

/** A Redis pattern (keyspace, per prefix) or channel (keyevent, expiries) and who listens to it. */
interface Subscription {
  type: 'pattern' | 'channel';
  listeners: Set<Listener>;
}

interface Subscriber {
  connection: Redis;
  node: MasterNode | null;
  /** Set once the node's notification flags were checked on this connection (before it subscribes). */
  configured: boolean;
  /** Names sent to the node (with their type); `acked` those it confirmed. */
  subscribed: Map<string, Subscription['type']>;
  acked: Set<string>;
  /** Set when we closed it ourselves (nothing watched any more, or the master left the cluster). */
  retired: boolean;
  /**
   * Counts the connection's closes: a 'ready' whose connection closed while it configured (its
   * CONFIG answered late, or never) leaves the next 'ready' to configure and subscribe.
   */
  closes: number;
}

export class KeyspaceWatch {
  private readonly subscribers = new Map<string, Subscriber>();
  private readonly subscriptions = new Map<string, Subscription>();
  private readonly keyspace: string;
  private readonly keyevent: string;
  private readonly keyPrefix: Buffer;
  private delivery: Promise<void> = Promise.resolve();
  private pendingReads = 0;
  private warnedConfig = false;
  private warnedRefused = false;
  private rechecking = false;
  /** The warning that the flags a recheck found missing cannot be set again was given. */
  private warnedRecheckSet = false;
  /** Writes waiting in settled(): a set, so that each one leaves in O(1) (see settled()). */
  private readonly waiters = new Set<() => void>();
  private settleUntil = 0;

  constructor(private readonly deps: WatchDeps) {
    this.keyspace = `__keyspace@${deps.db}__:`;
    this.keyevent = `__keyevent@${deps.db}__:`;
    this.keyPrefix = Buffer.from(deps.keyPrefix);
  }

  /**
   * Starts delivering changes of keys with the prefix to onEvent (only expiries when expireOnly);
   * returns the unsubscribe function.
   */
  add(prefix: string, onEvent: (event: ChangeEvent) => void, expireOnly = false, onError?: (error: StoreError) => void): () => void {
    const listener: Listener = { prefix, onEvent, onError, remove: () => undefined };
    const names = expireOnly
      ? [`${this.keyevent}expired`, `${this.keyevent}evicted`]
      : [`${this.keyspace}${escapeGlob(this.deps.keyPrefix + prefix)}*`];
    for (const name of names) {
      let subscription = this.subscriptions.get(name);
      if (!subscription) {
        subscription = { type: expireOnly ? 'channel' : 'pattern', listeners: new Set() };
        this.subscriptions.set(name, subscription);
      }
      subscription.listeners.add(listener);
    }
    this.settleUntil = Date.now() + this.deps.settleMs;
    this.sync();
    listener.remove = () => {
      for (const name of names) {
        const subscription = this.subscriptions.get(name);
        if (!subscription?.listeners.delete(listener)) continue;
        if (subscription.listeners.size === 0) this.subscriptions.delete(name);
      }
    };
    return () => {
      listener.remove();
      this.sync();
    };
  }

  /**
   * Makes the subscribers match the masters and the subscriptions (call it when the masters
   * change). Connections are open only while something is watched.
   */
  sync(): void {
    const nodes = this.subscriptions.size === 0 ? [] : this.deps.masters();
    const wanted = new Map(nodes.map((n) => [n ? `${n.host}:${n.port}` : '', n] as const));
    // A master we are not subscribed to while others are (a replica promoted by a failover, a node
    // given slots by a resharding) may have taken writes before we knew of it: the listeners
    // already there may have missed them, so they end, as when a subscriber connection closes.
    const joined = [...wanted].find(([id]) => !this.subscribers.has(id));
    if (joined && this.subscribers.size > 0 && this.fail(joined[1], 'was not watched when it became a master')) return;
    for (const [id, sub] of this.subscribers) {
      if (!wanted.has(id)) {
        this.subscribers.delete(id);
        sub.retired = true;
        sub.connection.disconnect();
      }
    }
    for (const [id, node] of wanted) {
      if (!this.subscribers.has(id)) this.subscribers.set(id, this.open(node));
    }
    for (const sub of this.subscribers.values()) void this.resubscribe(sub);
  }

  close(): void {
    this.subscriptions.clear();
    this.sync();
    this.release();
  }

  /**
   * Resolves once every master confirmed every subscription, so that a write sent after watch()
   * returned is seen by the watcher. Waits at most `settleMs` after the last watch() call: a node
   * that never confirms does not hold writes back for longer.
   */
  async settled(): Promise<void> {
    const wait = this.settleUntil - Date.now();
    if (wait <= 0 || this.isSettled()) return;
    await new Promise<void>((resolve) => {
      // Every batch that arrives meanwhile waits here, thousands in a burst of unary calls: with
      // a list that each one leaving filtered, releasing them took time quadratic in their number
      // (20,000 waiters let through at once held the event loop for 2.3 s).
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(done);
        resolve();
      };
      const timer = setTimeout(done, wait);
      this.waiters.add(done);
    });
  }

  private isSettled(): boolean {
    for (const sub of this.subscribers.values()) {
      for (const name of this.subscriptions.keys()) if (!sub.acked.has(name)) return false;
    }
    return true;
  }

  private release(): void {
    if (this.waiters.size > 0 && this.isSettled()) [...this.waiters].forEach((done) => done());
  }

  private open(node: MasterNode | null): Subscriber {
    const connection = this.deps.connect(node);
    const sub: Subscriber = { connection, node, configured: false, subscribed: new Map(), acked: new Set(), retired: false, closes: 0 };
    connection.on('error', () => undefined);
    connection.on('close', () => {
      sub.closes += 1;
      sub.configured = false;
      sub.subscribed.clear();
      sub.acked.clear();
      if (!sub.retired) this.fail(node);
    });
    connection.on('ready', async () => {
      const closes = sub.closes;
      await this.configure(sub, closes);
      if (sub.closes !== closes) return;
      sub.configured = true;
      await this.resubscribe(sub);
    });
    connection.on('pmessageBuffer', (pattern: Buffer, channel: Buffer, event: Buffer) => {
      const subscription = this.subscriptions.get(pattern.toString());
      const key = channel.subarray(Buffer.byteLength(this.keyspace));
      if (subscription) this.deliver(subscription, KINDS[event.toString()], key);
    });
    connection.on('messageBuffer', (channel: Buffer, key: Buffer) => {
      const name = channel.toString();
      const subscription = this.subscriptions.get(name);
      if (subscription) this.deliver(subscription, KINDS[name.slice(this.keyevent.length)], key);
    });
    return sub;
  }

  /**
   * Checks that the masters still publish what Watch needs: another client of the Redis may have
   * set notify-keyspace-events since (`CONFIG SET notify-keyspace-events Ex`, for its own use), and
   * then no event comes, without a word. Where flags went missing, they are added back, and the
   * watchers that can be told are ended (changes were missed meanwhile). Called with the health
   * check's ping; nothing to do without subscribers, or where CONFIG is not allowed.
   */
  async recheck(): Promise<void> {
    if (this.warnedConfig || this.rechecking) return;
    this.rechecking = true;
    try {
      for (const sub of this.subscribers.values()) await this.recheckOne(sub);
    } finally {
      this.rechecking = false;
    }
  }

  private async recheckOne(sub: Subscriber): Promise<void> {
    if (!sub.configured || sub.subscribed.size === 0) return;
    try {
      const [, current = ''] = (await this.deps.config(sub.node, 'GET', 'notify-keyspace-events')) as string[];
      const missing = missingFlags(current);
      if (missing.length === 0) return;
      // The watchers went silent whether or not the flags can be set again (a user allowed CONFIG
      // GET but not SET): they are ended either way.
      const setAgain = await this.deps.config(sub.node, 'SET', 'notify-keyspace-events', current + missing.join('')).then(
        () => true,
        () => false,
      );
      if (setAgain) {
        this.deps.warn({ was: current, added: missing.join('') }, `notify-keyspace-events was changed on ${nodeName(sub.node)}: set again for Watch`);
      } else if (!this.warnedRecheckSet) {
        this.warnedRecheckSet = true;
        this.deps.warn(
          { was: current, missing: missing.join('') },
          `notify-keyspace-events was changed on ${nodeName(sub.node)} and cannot be set again; set it to include ${REQUIRED_FLAGS.join('')} on every master for Watch`,
        );
      }
      this.fail(sub.node, 'stopped while notify-keyspace-events lacked its flags');
    } catch {
      // The master is not reachable now: the connection's own close reports that.
    }
  }

  /**
   * Ends every listener that can be told, as changes were missed: `what` the feed did (something
   * the backend noticed that Redis publishes no event for).
   */
  interrupt(what: string): void {
    this.fail(null, what);
  }

  /** Adds the notification flags we need to the node's configuration (before subscribing). */
  private async configure(sub: Subscriber, closes: number): Promise<void> {
    try {
      const [, current = ''] = (await sub.connection.config('GET', 'notify-keyspace-events')) as string[];
      const missing = missingFlags(current);
      if (missing.length > 0) await sub.connection.config('SET', 'notify-keyspace-events', current + missing.join(''));
    } catch (err) {
      // The connection closed meanwhile: its CONFIG failed for that, and the next 'ready' asks again.
      if (sub.closes !== closes) return;
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
    const add = [...this.subscriptions].filter(([name]) => !sub.subscribed.has(name)).map(([name, s]) => [name, s.type] as const);
    const remove = [...sub.subscribed].filter(([name]) => !this.subscriptions.has(name));
    add.forEach(([name, type]) => sub.subscribed.set(name, type));
    remove.forEach(([name]) => {
      sub.subscribed.delete(name);
      sub.acked.delete(name);
    });
    const names = (list: ReadonlyArray<readonly [string, Subscription['type']]>, type: Subscription['type']) =>
      list.filter(([, t]) => t === type).map(([name]) => name);
    try {
      const [patterns, channels] = [names(add, 'pattern'), names(add, 'channel')];
      if (patterns.length > 0) await sub.connection.psubscribe(...patterns);
      if (channels.length > 0) await sub.connection.subscribe(...channels);
      add.forEach(([name]) => sub.subscribed.has(name) && sub.acked.add(name));
      const [oldPatterns, oldChannels] = [names(remove, 'pattern'), names(remove, 'channel')];
      if (oldPatterns.length > 0) await sub.connection.punsubscribe(...oldPatterns);
      if (oldChannels.length > 0) await sub.connection.unsubscribe(...oldChannels);
    } catch (err) {
      add.forEach(([name]) => sub.subscribed.delete(name));
      // Redis answered no (an ACL user without these channels, as Redis 7 creates users): no event
      // would ever come, so the watchers end with Redis' reason and the log says what to grant.
      if ((err as Error).name === 'ReplyError') this.refused(sub.node, (err as Error).message);
    }
    this.release();
  }

  private refused(node: MasterNode | null, reason: string): void {
    if (!this.warnedRefused) {
      this.warnedRefused = true;
      this.deps.warn(
        { err: reason },
        `redis refuses to subscribe to keyspace notifications, so Watch and the count of expiries get no events; let the Redis user of REDIS_URL subscribe to __keyspace@*__ and __keyevent@*__ (ACL: &__key*)`,
      );
    }
    this.fail(node, '', new StoreError('internal', `${nodeName(node)} refuses to subscribe to keyspace notifications (${reason}), so Watch cannot work`));
  }

  /**
   * The connection to a master closed (or a master joined, see sync()): what happened there
   * meanwhile is never reported, so every listener that can be told ends (after the events that
   * arrived before) with `error`, by default one saying so. Answers whether any did.
   */
  private fail(node: MasterNode | null, what = 'broke', error = missedChanges(node, what)): boolean {
    const listeners = new Set<Listener>();
    for (const subscription of this.subscriptions.values()) {
      for (const listener of subscription.listeners) if (listener.onError) listeners.add(listener);
    }
    if (listeners.size === 0) return false;
    for (const listener of listeners) listener.remove();
    this.delivery = this.delivery.then(() => {
      for (const listener of listeners) {
        try {
          listener.onError!(error);
        } catch (err) {
          this.deps.warn({ err: (err as Error).message }, 'a watch listener threw');
        }
      }
    });
    this.sync();
    return true;
  }

  /** Turns one notification (a key with our prefix, as bytes) into events for the subscription's listeners. */
  private deliver(subscription: Subscription, kind: ChangeKind | undefined, redisKey: Buffer): void {
    if (!kind || !redisKey.subarray(0, this.keyPrefix.length).equals(this.keyPrefix)) return;
    const key = redisKey.subarray(this.keyPrefix.length).toString('utf8');
    const listeners = [...subscription.listeners].filter((l) => key.startsWith(l.prefix));
    if (listeners.length === 0) return;
    const base: ChangeEvent = { kind, key, version: 0, value: EMPTY_VALUE, expiresAtMs: 0 };
    let ready: Promise<ChangeEvent | null> = Promise.resolve(base);
    if ((kind === 'put' || kind === 'delete') && this.pendingReads < MAX_PENDING_READS) {
      this.pendingReads += 1;
      ready = this.deps
        .read(key)
        .then((entry) => {
          if (kind === 'delete') return entry ? null : base;
          return entry ? { ...base, version: entry.version, value: entry.value, expiresAtMs: entry.expiresAtMs } : base;
        })
        .catch(() => base)
        .finally(() => (this.pendingReads -= 1));
    }
    // Read-backs run in parallel; events are delivered in the order they arrived.
    this.delivery = this.delivery.then(async () => {
      const event = await ready;
      if (!event) return;
      for (const listener of listeners) {
        try {
          listener.onEvent(event);
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
