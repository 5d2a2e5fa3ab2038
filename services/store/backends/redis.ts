import { randomUUID } from 'node:crypto';
import { connect } from 'node:net';
import calculateSlot from 'cluster-key-slot';
import { Cluster, Redis, type RedisOptions, ReplyError, type SentinelConnectionOptions, SentinelConnector } from 'ioredis';
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
  type WatchOptions,
} from './backend';
import { coversEverySlot, movedSlots, parseSlotSnapshot, type SlotSnapshot } from './cluster-slots';
import { KeyWindow } from './key-window';
import { KeySample, rangePattern } from './scan-range';
import { OP, READ_MANY } from './redis-scripts';
import { escapeGlob, KeyspaceWatch } from './redis-watch';

export interface HostPort {
  host: string;
  port: number;
}

export interface RedisBackendOptions {
  /**
   * redis:// or rediss:// (TLS) URL. Single mode: the server. Every mode: the user, password, TLS
   * and database (a cluster has only database 0) taken from it.
   */
  url: string;
  /** Cluster mode when non-empty: seed nodes; the others are discovered. */
  clusterNodes: readonly HostPort[];
  /** Sentinel mode when non-empty: the Sentinels that know `sentinelMaster`. */
  sentinels: readonly HostPort[];
  sentinelMaster: string;
  /** The Sentinels' own user and password (their requirepass, or an ACL user), not the master's of `url`. */
  sentinelUsername?: string;
  sentinelPassword?: string;
  /** Reach the Sentinels over TLS (their tls-port), whatever `url` says of the master. */
  sentinelTls?: boolean;
  /**
   * Prepended to every key in Redis, so the store can share a Redis with other data. Not empty, and
   * no other data set's prefix may start with it (or it with theirs): List and the count would
   * take the other's keys for entries.
   */
  keyPrefix: string;
  /** No Redis command waits longer than this; a call past it fails as unavailable. */
  commandTimeoutMs: number;
  /** Keys held in memory per SCAN pass of a List (see list()). */
  listWindow: number;
  log?: { info(detail: object, message: string): void; warn(detail: object, message: string): void };
}

/** A reply of the pipeline or of a single command: [error, result]. */
type Reply = [Error | null, unknown];

interface ScriptCommands {
  sessionOpBuffer(key: string, op: 'r', refreshTtlMs: number, withValue: '0' | '1'): Promise<Buffer[] | null>;
  sessionOpBuffer(key: string, op: 'w', value: Buffer, ttlMs: number, expected: string): Promise<Buffer[]>;
  sessionOpBuffer(key: string, op: 'd', expected: string): Promise<Buffer[]>;
  /** numberOfKeys, the keys, then '1' to return the values (see READ_MANY). */
  sessionReadManyBuffer(numberOfKeys: number, ...keysThenWithValue: string[]): Promise<Array<Buffer | Buffer[] | null>>;
}

type Client = Redis | Cluster;

/**
 * Reply errors that mean "Redis cannot serve this now" (failover, loading, resharding, memory, a
 * long script, a failed snapshot that makes Redis refuse writes: MISCONF): retrying later is safe.
 */
const TRANSIENT = /^(LOADING|READONLY|MASTERDOWN|CLUSTERDOWN|TRYAGAIN|MOVED|ASK|BUSY|NOREPLICAS|OOM|NOSCRIPT|UNBLOCKED|MISCONF)\b/;
/** Decodes keys, failing on bytes that are not UTF-8 (and keeping a leading BOM as a character). */
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
/** ioredis' error when every Sentinel refused the store's credentials for them (none sent, or wrong ones). */
const SENTINEL_AUTH = /^All sentinels are unreachable\b.*Last error: (NOAUTH|WRONGPASS)\b/;
/** A key under our prefix holds another type: something other than the store wrote it. */
const FOREIGN = /^WRONGTYPE\b/;
const SCAN_COUNT = 1000;
const READ_PAGE = 500;
/** Keys per READ_MANY call: about a millisecond of Redis' time, as long as a SCAN call of SCAN_COUNT. */
const READ_MANY_KEYS = 128;
/**
 * How the value of the Redis key named exactly REDIS_KEY_PREFIX starts, which the store writes
 * when it connects: it marks a data set (never an entry: store keys are not empty), so that a
 * store whose prefix starts with another store's prefix can tell, and say so. A random part
 * follows, new each time the marker is created, so that every store instance can tell that it
 * was removed (FLUSHALL) even after another instance created it again (see checkDataSet).
 */
const DATA_SET_MARKER = 'sessions store data set';
/** Passes of a cluster listing that are scanned again because a master was missing from the slot map. */
const SCAN_ATTEMPTS = 5;

/**
 * The backend for Redis: one server, a Sentinel-managed master, or a Redis Cluster (ioredis).
 *
 * - One Redis key per entry (a hash, see redis-scripts.ts) with the key's own expiry; get, put
 *   and delete are Lua scripts on one key each, so versions and compare-and-set are atomic on the
 *   server and work in a cluster.
 * - batch() sends its operations as one pipeline (in a cluster: one pipeline per master, built
 *   from the slot map); operations on one key keep their order.
 * - list() turns SCAN (unordered, may repeat keys) into an ordered, duplicate-free stream with
 *   bounded memory: each pass scans every master and keeps the `listWindow` smallest keys after
 *   the resume point, then reads and yields them; the next pass starts after the last of them.
 *   A listing of N keys costs about N / listWindow passes over the keyspace, but only the first
 *   sends every key to the store: it samples them, and each later pass asks Redis (MATCH) for
 *   the keys of its range alone (see scan-range.ts).
 * - Failing fast: no offline queue, no resending after a reconnect, every command bounded by
 *   commandTimeoutMs, and a connection that answers nothing for that long is dropped; any
 *   connection or failover error is StoreError('unavailable').
 */
export class RedisBackend implements Backend {
  readonly name = 'redis';
  private readonly client: Client;
  private readonly cluster: Cluster | undefined;
  private readonly watcher: KeyspaceWatch;
  private readonly prefixBytes: number;
  private readonly auth: RedisOptions;
  /**
   * Calls waiting for the first connection (see ready()). Not a race against a promise of the
   * first 'ready': each race left a reaction on that promise, kept until Redis is first reached,
   * so a store that never reaches it (down since the start, a wrong password) grew by each call
   * (~0.3 KB: 64 MB after 200,000 calls). A waiter leaves this set when it times out.
   */
  private readonly firstWaiters = new Set<() => void>();
  private everReady = false;
  private connected = false;
  /**
   * The data set's marker as this store last set or read it; undefined until then. Kept across
   * reconnections: a FLUSHALL of a big data set holds Redis past the command timeout, so the
   * connection is dropped, and the marker found (or set) after it must still be told from this one.
   */
  private marker: string | undefined;
  private checkingDataSet = false;
  /** The eviction warning was given (see checkEviction). */
  private evictionReported = false;
  /** Why the last connection attempt failed (a wrong password, a refused connection), until ready. */
  private lastError: string | undefined;
  /**
   * Why Redis refused to SELECT the database of REDIS_URL on the current connection (a number
   * past its `databases`). ioredis then goes on, on database 0: the store must not serve from there.
   */
  private wrongDatabase: string | undefined;
  /**
   * Why this Redis cannot run the store's scripts: before 7.0 it has no PEXPIRETIME, and every Get
   * of an existing session would fail as INTERNAL (a 500 page) while health said SERVING.
   */
  private tooOld: string | undefined;
  /** The reasons logged since the connection was last ready. */
  private readonly reported = new Set<string>();
  private closed = false;
  /** First connections to cluster nodes in progress (see mastersConnected). */
  private readonly connecting = new WeakMap<Redis, Promise<void>>();

  constructor(private readonly options: RedisBackendOptions) {
    if (options.clusterNodes.length > 0 && options.sentinels.length > 0) {
      throw new Error('choose either cluster nodes or sentinels, not both');
    }
    if (options.keyPrefix === '') throw new Error('keyPrefix must not be empty: it would match every key in the database');
    this.prefixBytes = Buffer.byteLength(options.keyPrefix);
    const url = new URL(options.url);
    const db = Number(url.pathname.slice(1) || '0');
    const auth: RedisOptions = (this.auth = {
      username: decodeURIComponent(url.username) || undefined,
      password: decodeURIComponent(url.password) || undefined,
      tls: url.protocol === 'rediss:' ? {} : undefined,
    });
    const failFast: RedisOptions = {
      ...auth,
      commandTimeout: options.commandTimeoutMs,
      // A Redis that stops answering (frozen, or its host gone without a reset) would otherwise
      // keep the connection: every later command would be written to it, held in memory until it
      // answers, and applied when it thaws, long after we answered UNAVAILABLE. Drop it instead.
      socketTimeout: options.commandTimeoutMs,
      connectTimeout: Math.max(options.commandTimeoutMs, 1000),
      maxRetriesPerRequest: 0,
      autoResendUnfulfilledCommands: false,
    };
    const reconnect = (attempt: number) => Math.min(50 * attempt, 1000);

    if (options.clusterNodes.length > 0) {
      this.cluster = new Cluster([...options.clusterNodes], {
        redisOptions: failFast,
        enableOfflineQueue: false,
        clusterRetryStrategy: reconnect,
        slotsRefreshTimeout: Math.max(options.commandTimeoutMs, 1000),
        // ioredis would send a command again when its connection closed before the reply (or when
        // the cluster was down): Redis may have applied it already, so a compare-and-set Put would
        // then find its own write and be answered ABORTED. Fail instead, as in the other modes.
        retryDelayOnFailover: 0,
        retryDelayOnClusterDown: 0,
        scaleReads: 'master',
      });
      this.client = this.cluster;
      this.cluster.on('node error', () => undefined);
    } else {
      const where: RedisOptions =
        options.sentinels.length > 0
          ? // ioredis reaches the master a Sentinel names in plaintext unless told otherwise, whatever `tls` says.
            {
              sentinels: [...options.sentinels],
              name: options.sentinelMaster,
              sentinelUsername: options.sentinelUsername,
              sentinelPassword: options.sentinelPassword,
              sentinelTLS: options.sentinelTls ? {} : undefined,
              // A Sentinel that accepts the connection and never answers (frozen, overloaded) would
              // hold ioredis on it for good: it asks the next one only once a Sentinel fails.
              sentinelCommandTimeout: options.commandTimeoutMs,
              failoverDetector: true,
              enableTLSForSentinelMode: auth.tls !== undefined,
              Connector: sentinelConnector((message) => this.failed(message)),
            }
          : // URL keeps an IPv6 address in its brackets, which ioredis would look up as a host name.
            { host: url.hostname.replace(/^\[(.*)\]$/, '$1') || '127.0.0.1', port: Number(url.port || 6379) };
      this.client = new Redis({
        ...failFast,
        ...where,
        db,
        enableOfflineQueue: false,
        retryStrategy: reconnect,
        // A master demoted by a failover answers READONLY: reconnect (via the Sentinels) to the new one.
        // A single server answering READONLY is a replica and stays one: reconnecting to it again
        // would loop (each connection's first write, the data set's marker, is refused) and hide why.
        reconnectOnError: (err) => options.sentinels.length > 0 && err.message.startsWith('READONLY'),
      });
    }
    this.client.defineCommand('sessionOp', { numberOfKeys: 1, lua: OP });
    this.client.defineCommand('sessionReadMany', { lua: READ_MANY });

    this.client.on('connect', () => {
      this.wrongDatabase = undefined;
      this.tooOld = undefined;
    });
    this.client.on('error', (err: Error) => {
      if ((err as { command?: { name?: string } }).command?.name === 'select') this.wrongDatabase = err.message;
      this.failed(err.message);
    });
    this.client.on('ready', () => {
      this.everReady = true;
      for (const done of [...this.firstWaiters]) done();
      this.lastError = undefined;
      this.reported.clear();
      // Calls now fail, naming the database (see ready()); nothing is written to database 0.
      if (this.wrongDatabase) {
        options.log?.warn({ mode: this.mode, err: this.wrongDatabase }, 'redis refuses the database REDIS_URL names: every call fails until it is fixed');
        return;
      }
      if (!this.connected) options.log?.info({ mode: this.mode }, 'redis ready');
      this.connected = true;
      this.syncWatch();
      void this.markDataSet();
      void this.checkEviction();
      void this.checkVersion();
    });
    this.client.on('close', () => {
      if (this.connected && !this.closed) options.log?.warn({ mode: this.mode }, 'redis connection lost; reconnecting');
      this.connected = false;
    });
    this.cluster?.on('refresh', () => this.syncWatch());

    this.watcher = new KeyspaceWatch({
      keyPrefix: options.keyPrefix,
      db: this.cluster ? 0 : db,
      masters: () => (this.cluster ? this.cluster.nodes('master').map((n) => ({ host: n.options.host!, port: n.options.port! })) : [null]),
      connect: (node) => {
        const subscriberOptions: RedisOptions = { autoResubscribe: false, maxRetriesPerRequest: null, retryStrategy: reconnect, enableOfflineQueue: true };
        if (node) return new Redis({ ...auth, ...subscriberOptions, host: node.host, port: node.port });
        return (this.client as Redis).duplicate(subscriberOptions);
      },
      config: (node, ...args) => {
        if (!node) return (this.client as Redis).config(...(args as ['GET', string]));
        const connection = this.cluster!.nodes('master').find((n) => addressOf(n) === `${node.host}:${node.port}`);
        if (!connection) return Promise.reject(new Error(`no connection to ${node.host}:${node.port}`));
        return connection.config(...(args as ['GET', string]));
      },
      read: async (key) => {
        const [reply] = await this.run([{ kind: 'get', key, refreshTtlMs: 0 }]);
        return reply[0] ? null : this.toEntry(key, reply[1], true);
      },
      warn: (detail, message) => options.log?.warn(detail, message),
      settleMs: options.commandTimeoutMs,
    });
  }

  /**
   * Why the connection failed: calls that fail meanwhile say it. ioredis retries without end: it is
   * logged once per reason until the next 'ready', not once per attempt (its Sentinel errors name
   * the growing delay before the next one: "Retrying from scratch after 20ms.").
   */
  private failed(error: string): void {
    // ioredis words it as if the Sentinels were down, and a wrong REDIS_URL password reads the same (from the master): say whose.
    const message = SENTINEL_AUTH.test(error) ? `the Sentinels refuse REDIS_SENTINEL_USERNAME / REDIS_SENTINEL_PASSWORD: ${error}` : error;
    this.lastError = message;
    const reason = message.replace(/ after \d+ms\./, '.');
    if (this.reported.has(reason) || this.closed) return;
    this.reported.add(reason);
    this.options.log?.warn({ mode: this.mode, err: message }, 'redis connection failed; retrying');
  }

  /** 'single', 'sentinel' or 'cluster'. */
  get mode(): 'single' | 'sentinel' | 'cluster' {
    if (this.cluster) return 'cluster';
    return this.options.sentinels.length > 0 ? 'sentinel' : 'single';
  }

  async batch(ops: readonly BackendOp[]): Promise<BackendResult[]> {
    try {
      await this.ready();
      // A write sent after watch() returned must reach the new watcher: wait for its subscription.
      await this.watcher.settled();
    } catch (err) {
      // Nothing was sent: whatever the error, no operation can have been applied.
      const failure = toStoreError(err);
      const error = failure.outcomeUnknown ? new StoreError(failure.kind, failure.message) : failure;
      return ops.map(() => ({ ok: false, error }));
    }
    const replies = await this.run(ops);
    // Every failure is the operation's own: the others may have been applied (never reject).
    return replies.map(([err, reply], i): BackendResult => {
      if (err) return { ok: false, error: toStoreError(err) };
      try {
        return this.toResult(ops[i], reply);
      } catch (error) {
        return { ok: false, error: toStoreError(error) };
      }
    });
  }

  async *list(options: ListOptions): AsyncIterable<StoredEntry> {
    await this.ready();
    const prefix = this.options.keyPrefix + options.prefix;
    const prefixRendered = Buffer.from(prefix);
    let after = Buffer.from(this.options.keyPrefix + options.startAfter).toString('latin1');
    let remaining = options.limit > 0 ? options.limit : Infinity;
    // Every key below this one has been listed (a pass that ended at its ceiling).
    let covered = after;
    // The first pass's sample, when it did not hold every key: the later passes' ceilings.
    let sample: KeySample | undefined;
    while (remaining > 0) {
      // Keys as latin1 renderings of their bytes: string order is then byte order, as in SQLite.
      const capacity = Math.min(this.options.listWindow, remaining);
      const window = new KeyWindow(capacity);
      const floor = after;
      const ceiling = sample?.ceilingAfter(floor > covered ? floor : covered, capacity);
      const sampling = sample ? undefined : new KeySample();
      await this.scan(
        prefix,
        (key) => {
          const rendered = key.toString('latin1');
          if (rendered <= floor) return;
          window.offer(rendered);
          sampling?.offer(rendered);
        },
        options.signal,
        true,
        rangePattern(prefixRendered, Buffer.from(floor, 'latin1'), ceiling === undefined ? undefined : Buffer.from(ceiling, 'latin1')),
      );
      if (options.signal?.aborted) return;
      const full = window.full;
      // The next pass resumes after the last key scanned, as bytes: a key that does not survive
      // decoding (below) must not move the resume point backwards, or the same window repeats.
      const last = window.largest;
      // Keys at or past the ceiling came with the pattern's approximation of the range: keys the
      // pattern did not match may lie between them, so they wait for a later pass.
      const complete = ceiling === undefined || (full && last !== undefined && last < ceiling);
      // A page at a time (sorting and decoding a whole window at once held the event loop).
      for await (const sorted of window.drainPages(READ_PAGE)) {
        const rendered = complete ? sorted : sorted.filter((bytes) => bytes < ceiling!);
        const page: string[] = [];
        for (const bytes of rendered) {
          after = bytes;
          const key = this.decodeKey(Buffer.from(bytes, 'latin1'));
          // '' is the data set's marker (see DATA_SET_MARKER), not an entry.
          if (key !== null && key !== '') page.push(key);
        }
        for await (const entry of this.readEntries(page, options.keysOnly)) {
          yield entry;
          remaining -= 1;
          if (remaining <= 0) return;
        }
        if (rendered.length < sorted.length) break;
      }
      if (complete) {
        if (!full || last === undefined) return;
        after = last;
      } else {
        covered = ceiling!;
      }
      if (!sample && sampling) sample = sampling;
    }
  }

  /** The entries of a page of keys, read in one go; keys deleted or expired since the scan are left out. */
  private async *readEntries(page: readonly string[], keysOnly: boolean): AsyncIterable<StoredEntry> {
    if (page.length === 0) return;
    const replies = await this.readPage(page, !keysOnly);
    for (let j = 0; j < page.length; j += 1) {
      const [err, reply] = replies[j];
      let entry: StoredEntry | null;
      try {
        if (err) throw toStoreError(err);
        entry = this.toEntry(page[j], reply, !keysOnly);
      } catch (error) {
        // A key that something else wrote under our prefix is not an entry of the store: the
        // listing skips it (and says so in the log) rather than fail for good until it is removed.
        const failure = toStoreError(error);
        if (failure.kind !== 'failed_precondition') throw failure;
        if (await this.isDataSetMarker(this.redisKey(page[j]))) {
          this.options.log?.warn(
            { prefix: this.options.keyPrefix, other: this.redisKey(page[j]) },
            `another store keeps its sessions under REDIS_KEY_PREFIX="${this.redisKey(page[j])}", which starts with this store's prefix: this store lists, counts and watches them as its own. Give each data set a prefix that does not start with another's`,
          );
          continue;
        }
        this.options.log?.warn({ key: page[j], err: failure.message }, 'list skips a key under REDIS_KEY_PREFIX that the store did not write');
        continue;
      }
      if (entry) yield entry;
    }
  }

  /**
   * The store's key of a Redis key, or null (and a warning) for a key that is not valid UTF-8:
   * the store never writes one (keys are protobuf strings), but anything else writing under the
   * prefix can, and such a key cannot be named in a reply.
   */
  private decodeKey(redisKey: Buffer): string | null {
    try {
      return UTF8.decode(redisKey.subarray(this.prefixBytes));
    } catch {
      this.options.log?.warn({ key: redisKey.toString('base64') }, 'list skips a key under REDIS_KEY_PREFIX that is not valid UTF-8 (shown in base64)');
      return null;
    }
  }

  watch(prefix: string, onEvent: (event: ChangeEvent) => void, options: WatchOptions = {}): () => void {
    const expireOnly = options.kinds !== undefined && options.kinds.every((kind) => kind === 'expire');
    return this.watcher.add(prefix, onEvent, expireOnly, options.onError);
  }

  async ping(): Promise<void> {
    try {
      await this.ready();
      void this.watcher.recheck();
      void this.checkDataSet();
      if (!this.cluster) {
        await (this.client as Redis).ping();
        return;
      }
      if (this.cluster.status !== 'ready') throw new StoreError('unavailable', `redis cluster: ${this.cluster.status}`);
      // Every master that owns slots in a slot map read now (which also tells the watch about a
      // promoted replica within a health interval). One that cannot be reached fails only its own
      // sessions' calls (UNAVAILABLE): reporting NOT_SERVING for it would take every web out of
      // rotation, the sessions on the other masters too. The cluster says when it refuses every
      // command (cluster_state:fail), and then the store is NOT_SERVING: most masters say so. One
      // alone saying it is only that master's view (for its first 2 s back after a restart, it
      // refuses its own slots' commands while the others serve theirs).
      const { connected } = await this.slotOwners(this.cluster);
      const answers = (await Promise.allSettled(connected.map((node) => node.cluster('INFO'))))
        .filter((outcome) => outcome.status === 'fulfilled')
        .map((outcome) => String(outcome.value));
      if (answers.length === 0) throw new StoreError('unavailable', 'redis cluster: no master that owns slots answers');
      const failing = answers.filter((info) => !/cluster_state:ok/.test(info)).length;
      if (failing * 2 > answers.length) throw new StoreError('unavailable', 'redis cluster: cluster_state is not ok');
    } catch (err) {
      const error = toStoreError(err);
      throw error.kind === 'unavailable' ? error : new StoreError('unavailable', error.message);
    }
  }

  /** Live entries with the key prefix: one SCAN pass over every master (SCAN skips expired keys). */
  async countLive(): Promise<number> {
    if (this.closed) return 0;
    let count = 0;
    await this.scan(this.options.keyPrefix, (key) => key.length > this.prefixBytes && (count += 1), undefined, false);
    return count;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.watcher.close();
    try {
      await this.client.quit();
    } catch {
      this.client.disconnect();
      return;
    }
    // QUIT ends only the connection to the master. ioredis also subscribes on each Sentinel to hear
    // of failovers and ends those connections only on disconnect(): they would stay open, then
    // retry every minute once that Sentinel is gone, printing "[ioredis] Unhandled error event".
    if (this.mode === 'sentinel') this.client.disconnect();
  }

  /**
   * Writes the data set's marker and warns when a shorter prefix of ours marks another store's
   * data set: that store takes every key under its prefix, ours included, for its own (List,
   * Watch, the live count, and a Put or Delete of a key that spells ours). Best effort: a Redis
   * that refuses writes now is marked at the next connection.
   */
  private async markDataSet(): Promise<void> {
    const prefix = this.options.keyPrefix;
    try {
      const found = await this.claimMarker();
      // Another marker than before this connection (the health check may have seen it first).
      const removed = this.marker !== undefined && found !== this.marker;
      this.marker = found;
      if (removed) this.reportDataSetRemoved();
      const characters = [...prefix];
      const shorter = characters.slice(1).map((_, i) => characters.slice(0, i + 1).join(''));
      for (const other of shorter) {
        if (!(await this.isDataSetMarker(other))) continue;
        this.options.log?.warn(
          { prefix, other },
          `REDIS_KEY_PREFIX="${prefix}" starts with "${other}", the prefix of another store's data set in this Redis: that store lists, counts and watches this store's sessions as its own. Give each data set a prefix that does not start with another's (or delete the key "${other}" if that data set is gone)`,
        );
      }
    } catch {
      // Redis refusing or gone: nothing to say until it is back.
    }
  }

  /**
   * Warns (once) when Redis may evict keys: with `maxmemory` set and a policy other than
   * noeviction, a full Redis deletes sessions before their TTL, silently (no error for anyone, and
   * no expire event for Watch). With noeviction it refuses the writes instead: UNAVAILABLE, the
   * web's 503 page, nothing lost. Best effort: CONFIG may be disabled (managed Redis).
   */
  private async checkEviction(): Promise<void> {
    if (this.evictionReported) return;
    const nodes: Redis[] = this.cluster ? this.cluster.nodes('master') : [this.client as Redis];
    for (const node of nodes) {
      try {
        const [, policy] = (await node.config('GET', 'maxmemory-policy')) as string[];
        const [, maxmemory] = (await node.config('GET', 'maxmemory')) as string[];
        if (Number(maxmemory) > 0 && policy !== 'noeviction' && !this.evictionReported) {
          this.evictionReported = true;
          this.options.log?.warn(
            { maxmemoryPolicy: policy, maxmemory: Number(maxmemory), node: addressOf(node) },
            `Redis evicts keys when it reaches maxmemory (maxmemory-policy ${policy}): sessions would vanish before their TTL without an error. Set maxmemory-policy noeviction, so that a full Redis refuses writes (503) instead`,
          );
        }
      } catch {
        // CONFIG refused or Redis gone: nothing to say.
      }
    }
  }

  /**
   * Asks for PEXPIRETIME (Redis 7.0) once per connection: a Redis without it fails every call,
   * UNAVAILABLE and health NOT_SERVING, naming the cause, until the store reaches one that has it.
   */
  private async checkVersion(): Promise<void> {
    try {
      await this.client.call('PEXPIRETIME', this.options.keyPrefix);
    } catch (err) {
      if (!/^ERR unknown command/i.test((err as Error).message)) return;
      this.tooOld = `Redis 7.0 or newer is needed (it has no PEXPIRETIME: ${(err as Error).message})`;
      this.options.log?.warn({ mode: this.mode, err: (err as Error).message }, 'redis is older than 7.0 (no PEXPIRETIME): every call fails until it is upgraded');
    }
  }

  /**
   * Redis announces no event per key for FLUSHALL or FLUSHDB: every session is gone and Watch
   * says nothing. The marker goes with them, so the health check looks for it: when it is gone, or
   * is another (an instance sharing the data set created it again first), it is created again,
   * a warning says so and the watchers are ended, as they are when changes were missed.
   */
  private async checkDataSet(): Promise<void> {
    const marked = this.marker;
    if (marked === undefined || this.checkingDataSet) return;
    this.checkingDataSet = true;
    try {
      const prefix = this.options.keyPrefix;
      const current = await this.client.get(prefix);
      if (current === marked || this.marker !== marked) return;
      this.marker = current ?? (await this.claimMarker());
      this.reportDataSetRemoved();
    } catch {
      // Redis refusing or gone: the next check looks again.
    } finally {
      this.checkingDataSet = false;
    }
  }

  /**
   * The data set's marker: a new one (with a random part) unless one is there already, set before
   * by this or another instance (NX), so that a new one means the old one was removed.
   */
  private async claimMarker(): Promise<string> {
    const created = `${DATA_SET_MARKER} ${randomUUID()}`;
    return (await this.client.set(this.options.keyPrefix, created, 'NX', 'GET')) ?? created;
  }

  private reportDataSetRemoved(): void {
    const prefix = this.options.keyPrefix;
    this.options.log?.warn(
      { prefix },
      `the data set's marker (the key "${prefix}") was removed: the keys under REDIS_KEY_PREFIX were deleted without an event for Watch (FLUSHALL, FLUSHDB) or the key alone was; marked again, and every Watch call ended`,
    );
    this.watcher.interrupt('did not report that keys were removed (FLUSHALL or FLUSHDB)');
  }

  private async isDataSetMarker(redisKey: string): Promise<boolean> {
    return (await this.client.get(redisKey).catch(() => null))?.startsWith(DATA_SET_MARKER) === true;
  }

  /** Resolves when commands can be sent; at start-up it waits (bounded) for the first connection. */
  private async ready(): Promise<void> {
    if (this.closed) throw new StoreError('unavailable', 'the store is closing');
    if (this.client.status !== 'ready' && !this.everReady) {
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          this.firstWaiters.delete(done);
          resolve();
        };
        const timer = setTimeout(done, this.options.commandTimeoutMs);
        this.firstWaiters.add(done);
      });
    }
    if (this.wrongDatabase) throw new StoreError('unavailable', `redis: cannot use the database REDIS_URL names (${this.wrongDatabase})`);
    if (this.tooOld) throw new StoreError('unavailable', `redis: ${this.tooOld}`);
    if ((this.client.status as string) === 'ready') {
      if (this.cluster) await this.mastersConnected();
      return;
    }
    const reason = this.lastError ? `: ${this.lastError}` : '';
    throw new StoreError('unavailable', `redis is not connected (${this.client.status})${reason}`);
  }

  /**
   * ioredis opens a cluster node's connection at the first command for it and, without an offline
   * queue, refuses every other command for that node until it is up, unsent, as "Connection is
   * closed.": concurrent first calls after the cluster is ready (or after a new master appears)
   * would fail. Waits, at most commandTimeoutMs, for every master's connection being made.
   */
  private async mastersConnected(): Promise<void> {
    const opening = this.cluster!.nodes('master').filter((node) => ['wait', 'connecting', 'connect'].includes(node.status));
    if (opening.length === 0) return;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => (timer = setTimeout(resolve, this.options.commandTimeoutMs)));
    await Promise.race([Promise.all(opening.map((node) => this.connectionOf(node))), timeout]);
    clearTimeout(timer);
  }

  /**
   * Reads the cluster's slot map again (ioredis then holds a connection, maybe not open yet, to
   * each master it names) and waits for the connections being opened, at most commandTimeoutMs in
   * all. Never fails: the caller checks the connections it needs afterwards.
   */
  private async reopenMasters(): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => (timer = setTimeout(resolve, this.options.commandTimeoutMs)));
    const reopened = new Promise<void>((resolve) => this.cluster!.refreshSlotsCache(() => resolve())).then(() => this.mastersConnected());
    await Promise.race([reopened, timeout]);
    clearTimeout(timer);
  }

  private connectionOf(node: Redis): Promise<void> {
    let pending = this.connecting.get(node);
    if (!pending) {
      pending = new Promise<void>((resolve) => {
        const done = () => {
          for (const event of ['ready', 'close', 'end']) node.off(event, done);
          this.connecting.delete(node);
          resolve();
        };
        for (const event of ['ready', 'close', 'end']) node.on(event, done);
        if (node.status === 'wait') node.connect().catch(() => undefined);
      });
      this.connecting.set(node, pending);
    }
    return pending;
  }

  private redisKey(key: string): string {
    return this.options.keyPrefix + key;
  }

  /**
   * Reads the entries of a listing's page without refreshing them: [error, reply] for each key,
   * as run() answers gets. On a single server by script calls of READ_MANY_KEYS keys each (one
   * command per key costs the store more than the entry itself); in a cluster as gets, since the
   * keys of a page in key order seldom share a slot.
   */
  private async readPage(keys: readonly string[], withValue: boolean): Promise<Reply[]> {
    if (this.cluster) return this.run(keys.map((key) => ({ kind: 'get', key, refreshTtlMs: 0 })), withValue);
    const calls: Array<Promise<Reply[]>> = [];
    for (let i = 0; i < keys.length; i += READ_MANY_KEYS) calls.push(this.readMany(keys.slice(i, i + READ_MANY_KEYS), withValue));
    return (await Promise.all(calls)).flat();
  }

  private async readMany(keys: readonly string[], withValue: boolean): Promise<Reply[]> {
    try {
      const scripts = this.client as unknown as ScriptCommands;
      const replies = await scripts.sessionReadManyBuffer(keys.length, ...keys.map((key) => this.redisKey(key)), withValue ? '1' : '0');
      if (replies.length !== keys.length) throw new Error('redis: the read answered a wrong number of entries');
      // A key's own error (a key of another type) comes as its text, as the script caught it.
      return replies.map((reply): Reply => (Buffer.isBuffer(reply) ? [new ReplyError(reply.toString()) as Error, null] : [null, reply]));
    } catch (err) {
      return keys.map((): Reply => [err as Error, null]);
    }
  }

  /** Runs the operations and answers [error, reply] for each, in order. */
  private async run(ops: readonly BackendOp[], withValue = true): Promise<Reply[]> {
    if (!this.cluster) return this.pipeline(this.client, ops, withValue);
    const cluster = this.cluster;
    const slots = ops.map((op) => calculateSlot(this.redisKey(op.key)));
    // A master that owns some operation's slot and has no ready connection: its connection was
    // lost, it may be back at its address, or its slots may have moved. Read the slot map again
    // and connect to its masters (ioredis would do the same after sending the commands elsewhere
    // and being redirected). Only when such a master accepts connections again: one that is down
    // would be put back in ioredis' pool by each re-read and dropped at the next command, and each
    // re-read ('refresh') would show the Watch a master it does not watch, ending every Watch (see
    // slotOwners()).
    const owners = new Set(slots.flatMap((slot) => cluster.slots[slot]?.[0] ?? []));
    const unready = [...owners].filter((owner) => unreadyMaster(cluster, owner) !== undefined);
    if (unready.length > 0 && (await anyAccepts(unready, this.options.commandTimeoutMs))) await this.reopenMasters();
    // One pipeline per master. Operations on one key share a slot, hence a pipeline, in order.
    const groups = new Map<string, number[]>();
    slots.forEach((slot, i) => {
      const group = cluster.slots[slot]?.join(',') ?? `slot ${slot}`;
      const members = groups.get(group);
      if (members) members.push(i);
      else groups.set(group, [i]);
    });
    const replies: Reply[] = new Array(ops.length);
    await Promise.all(
      [...groups.values()].map(async (members) => {
        // ioredis refuses, unsent, a command for a master whose connection is not ready, in the
        // words it uses for one whose reply was lost ("Connection is closed.", see NOT_SENT):
        // refuse those here, unsent and saying so. A group's operations share their slot's owner.
        const owner = cluster.slots[slots[members[0]]]?.[0];
        const down = unreadyMaster(cluster, owner);
        const answers: Reply[] =
          down === undefined
            ? await this.pipeline(cluster, members.map((i) => ops[i]), withValue)
            : members.map((): Reply => [new StoreError('unavailable', `redis cluster: the master ${owner} that owns the key's slot cannot be reached (${down}); the call was not sent`), null]);
        members.forEach((i, j) => (replies[i] = answers[j]));
      }),
    );
    // A slot that moved since the slot map was read sent MOVED/ASK and ran nothing, and while slots
    // move ioredis may refuse a whole pipeline before sending it (its own slot groups, updated one
    // slot per MOVED, disagree with its slot map): run those operations again one by one, in order,
    // through the cluster's routing, which follows redirects.
    for (let i = 0; i < ops.length; i += 1) {
      if (!isRedirect(replies[i][0]) && !isRegroup(replies[i][0])) continue;
      replies[i] = await this.single(ops[i], withValue).then(
        (reply): Reply => [null, reply],
        (err: Error): Reply => [err, null],
      );
    }
    return replies;
  }

  private async pipeline(client: Client, ops: readonly BackendOp[], withValue: boolean): Promise<Reply[]> {
    const pipeline = client.pipeline();
    const scripts = pipeline as unknown as ScriptCommands;
    for (const op of ops) void this.send(scripts, op, withValue);
    try {
      const replies = (await pipeline.exec()) as Reply[] | null;
      if (replies && replies.length === ops.length) return replies;
      throw new Error('redis: the pipeline answered no replies');
    } catch (err) {
      return ops.map((): Reply => [err as Error, null]);
    }
  }

  private single(op: BackendOp, withValue: boolean): Promise<unknown> {
    return this.send(this.client as unknown as ScriptCommands, op, withValue);
  }

  private send(target: ScriptCommands, op: BackendOp, withValue: boolean): Promise<unknown> {
    const key = this.redisKey(op.key);
    switch (op.kind) {
      case 'get':
        return target.sessionOpBuffer(key, 'r', op.refreshTtlMs, withValue ? '1' : '0');
      case 'put':
        return target.sessionOpBuffer(key, 'w', op.value, op.ttlMs, op.expectedVersion === undefined ? '' : String(op.expectedVersion));
      case 'delete':
        return target.sessionOpBuffer(key, 'd', op.expectedVersion === undefined ? '' : String(op.expectedVersion));
    }
  }

  private toResult(op: BackendOp, reply: unknown): BackendResult {
    switch (op.kind) {
      case 'get':
        return { ok: true, value: this.toEntry(op.key, reply, true) };
      case 'put': {
        const [status, version, expiresAt, createdAt] = (reply as Buffer[]).map(String);
        if (status === 'conflict') return versionConflict(op.expectedVersion!, Number(version));
        const entry: StoredEntry = {
          key: op.key,
          value: op.value,
          version: Number(version),
          expiresAtMs: Number(expiresAt),
          createdAtMs: Number(createdAt),
        };
        return { ok: true, value: entry };
      }
      case 'delete': {
        const [status, version] = (reply as Buffer[]).map(String);
        if (status === 'conflict') return versionConflict(op.expectedVersion!, Number(version));
        return { ok: true, value: version !== '0' };
      }
    }
  }

  private toEntry(key: string, reply: unknown, withValue: boolean): StoredEntry | null {
    if (!reply) return null;
    const [value, version, expiresAt, createdAt] = reply as Buffer[];
    const entry = {
      key,
      value: withValue ? value : EMPTY_VALUE,
      version: Number(version?.toString()),
      expiresAtMs: Number(expiresAt?.toString()),
      createdAtMs: Number(createdAt?.toString()),
    };
    // A hash that something else wrote under our prefix may lack our fields or hold other text.
    if (!Buffer.isBuffer(value) || ![entry.version, entry.expiresAtMs, entry.createdAtMs].every(Number.isFinite)) {
      throw new StoreError('failed_precondition', 'redis: the key holds a hash the store did not write');
    }
    return entry;
  }

  /**
   * Calls onKey for every key starting with `prefix` on every master (a key may come twice), until
   * aborted; with `pattern` (a MATCH that only some of those keys fit, see rangePattern), for the
   * keys that fit it (and the keys of moved slots, below, with the prefix). In a cluster, slots
   * may move while the masters are scanned: a key MIGRATEd from a master not scanned yet to one
   * already scanned would be missed. So with `complete` (List) the
   * masters' own view of their slots is read before and after the scan, and the keys of every slot
   * that moved or was being moved meanwhile are read again from the nodes involved, source before
   * target. A scan during which a master outside the slot map held slots is done again, a few
   * times, then fails as unavailable rather than list entries short. The masters are those of the
   * slot map checked at each pass (see clusterMasters).
   */
  private async scan(prefix: string, onKey: (key: Buffer) => void, signal?: AbortSignal, complete = true, pattern?: Buffer): Promise<void> {
    try {
      if (!this.cluster || !complete) {
        await this.scanNodes(this.cluster ? await this.clusterMasters(this.cluster) : [this.client as Redis], prefix, onKey, signal, pattern);
        return;
      }
      for (let attempt = 1; ; attempt += 1) {
        const masters = await this.clusterMasters(this.cluster);
        const before = await this.slotSnapshot(masters);
        if (coversEverySlot(before)) {
          await this.scanNodes(masters, prefix, onKey, signal, pattern);
          if (signal?.aborted) return;
          const after = await this.slotSnapshot(masters);
          if (coversEverySlot(after)) {
            await this.rescanMovedSlots(before, after, Buffer.from(prefix), onKey);
            return;
          }
        }
        if (attempt >= SCAN_ATTEMPTS) {
          throw new StoreError('unavailable', 'redis cluster: masters the store does not know yet hold slots (a resharding or failover is under way), so the listing could miss entries; run it again');
        }
        // The masters seen did not cover every slot: have ioredis read the slot map again, even if
        // the master clusterMasters asks still agrees with its old one.
        await new Promise<void>((resolve) => this.cluster!.refreshSlotsCache(() => resolve()));
        await new Promise((resolve) => setTimeout(resolve, 100 * attempt));
      }
    } catch (err) {
      throw toStoreError(err);
    }
  }

  /**
   * The masters that own the slots, by a slot map read now. ioredis updates its map only when a
   * command is redirected (MOVED), so after a failover in a quiet moment its nodes lack the
   * promoted replica, and while a master is down they lack that master: a scan of them would miss
   * its keys and say nothing. A master that owns slots and cannot be reached fails the caller
   * (unavailable) instead. The refresh also tells the watch about new masters ('refresh').
   */
  private async clusterMasters(cluster: Cluster): Promise<Redis[]> {
    const { connected, missing } = await this.slotOwners(cluster);
    if (missing.length > 0) throw new StoreError('unavailable', `redis cluster: the master ${missing[0]} is not connected`);
    return connected;
  }

  /** The masters that own slots in a slot map read now: those the store holds a connection to, and the others' addresses. */
  private async slotOwners(cluster: Cluster): Promise<{ connected: Redis[]; missing: string[] }> {
    // ioredis reads the slot map over a new connection each time (a second apart for health): read
    // it over a connection held, and have ioredis refresh its own only when they differ.
    // ioredis also drops its connection to a master that went away and opens one again only for a
    // command redirected to it: a master restarted at its address, the slot map unchanged, would
    // stay out of List until a session of its slots is used. Refresh then too: ioredis connects
    // to every owner of slots in the map it reads.
    const owners = () => new Set(cluster.slots.flatMap((slot) => (slot?.[0] ? [slot[0]] : [])));
    const pooled = () => new Map(cluster.nodes('master').map((node) => [addressOf(node), node]));
    const before = pooled();
    // Only for an owner that accepts connections again: one that is down would be put back in
    // ioredis' pool by each refresh and dropped at the next command, and each refresh ('refresh')
    // would show the Watch a master it does not watch, ending every Watch once a second.
    const unpooled = [...owners()].filter((owner) => !before.has(owner));
    if (!(await slotMapCurrent(cluster)) || (unpooled.length > 0 && (await anyAccepts(unpooled, this.options.commandTimeoutMs)))) {
      await new Promise<void>((resolve, reject) => cluster.refreshSlotsCache((err) => (err ? reject(err) : resolve())));
    }
    const nodes = pooled();
    const connected: Redis[] = [];
    const missing: string[] = [];
    for (const owner of owners()) {
      const node = nodes.get(owner);
      if (node) connected.push(node);
      else missing.push(owner);
    }
    return { connected, missing };
  }

  private async scanNodes(nodes: readonly Redis[], prefix: string, onKey: (key: Buffer) => void, signal?: AbortSignal, narrowed?: Buffer): Promise<void> {
    const pattern = narrowed ?? `${escapeGlob(prefix)}*`;
    await Promise.all(
      nodes.map(async (node) => {
        let cursor = '0';
        do {
          if (this.closed) throw new StoreError('unavailable', 'the store is closing');
          if (signal?.aborted) return;
          const [next, keys] = (await node.callBuffer('SCAN', cursor, 'MATCH', pattern, 'COUNT', String(SCAN_COUNT))) as [Buffer, Buffer[]];
          cursor = next.toString();
          for (const key of keys) onKey(key);
        } while (cursor !== '0');
      }),
    );
  }

  private async slotSnapshot(masters: readonly Redis[]): Promise<SlotSnapshot> {
    return parseSlotSnapshot(await Promise.all(masters.map(async (node) => String(await node.cluster('NODES')))));
  }

  /** Reads the keys of every slot that moved between the snapshots from its nodes, in order. */
  private async rescanMovedSlots(before: SlotSnapshot, after: SlotSnapshot, prefix: Buffer, onKey: (key: Buffer) => void): Promise<void> {
    const moved = movedSlots(before, after);
    if (moved.size === 0) return;
    const known = new Map(this.cluster!.nodes('all').map((node) => [addressOf(node), node]));
    const extra = new Map<string, Redis>();
    const connectionOf = (id: string): Redis => {
      const address = after.addresses.get(id) ?? before.addresses.get(id);
      if (!address) throw new StoreError('unavailable', `redis cluster: node ${id} of a moving slot has no known address`);
      const name = `${address.host}:${address.port}`;
      let node = known.get(name) ?? extra.get(name);
      if (!node) {
        node = new Redis({ ...this.auth, host: address.host, port: address.port, commandTimeout: this.options.commandTimeoutMs, maxRetriesPerRequest: 0, enableOfflineQueue: true, retryStrategy: () => null });
        node.on('error', () => undefined);
        extra.set(name, node);
      }
      return node;
    };
    try {
      await Promise.all(
        [...moved].map(async ([slot, ids]) => {
          for (const id of ids) {
            const keys = (await connectionOf(id).callBuffer('CLUSTER', 'GETKEYSINSLOT', String(slot), '1000000000')) as Buffer[];
            for (const key of keys) if (key.subarray(0, prefix.length).equals(prefix)) onKey(key);
          }
        }),
      );
    } finally {
      for (const node of extra.values()) node.disconnect();
    }
  }

  private syncWatch(): void {
    if (!this.closed) this.watcher.sync();
  }
}

/**
 * True when a master the store is connected to reports the same owner for every slot as ioredis'
 * slot map (CLUSTER SLOTS over that master's own connection); false when they differ or it cannot
 * be asked.
 */
async function slotMapCurrent(cluster: Cluster): Promise<boolean> {
  const node = cluster.nodes('master').find((candidate) => candidate.status === 'ready');
  if (!node) return false;
  try {
    const ranges = (await node.cluster('SLOTS')) as unknown as [number, number, [string, number, ...unknown[]], ...unknown[]][];
    let covered = 0;
    for (const [start, end, [host, port]] of ranges) {
      const owner = `${host}:${port}`;
      for (let slot = start; slot <= end; slot += 1) if (cluster.slots[slot]?.[0] !== owner) return false;
      covered += end - start + 1;
    }
    return covered === cluster.slots.filter((owners) => owners?.[0] !== undefined).length;
  } catch {
    return false;
  }
}

/** The 'host:port' by which the slot map names a node. */
function addressOf(node: Redis): string {
  return `${node.options.host}:${node.options.port}`;
}

/**
 * Why commands for the master `owner` ('host:port', from the slot map) cannot be written now: the
 * state of its connection when it is not ready, or that ioredis holds none. Undefined when it is
 * ready, or when the slot has no known owner (ioredis then routes the command and follows redirects).
 */
function unreadyMaster(cluster: Cluster, owner: string | undefined): string | undefined {
  if (owner === undefined) return undefined;
  const node = cluster.nodes('all').find((candidate) => addressOf(candidate) === owner);
  if (!node) return 'no open connection';
  return node.status === 'ready' ? undefined : `connection ${node.status}`;
}

/** True when any of these host:port addresses accepts a TCP connection within timeoutMs. */
async function anyAccepts(addresses: readonly string[], timeoutMs: number): Promise<boolean> {
  const accepts = (address: string) =>
    new Promise<boolean>((resolve) => {
      const at = address.lastIndexOf(':');
      const socket = connect({ host: address.slice(0, at).replace(/^\[(.*)\]$/, '$1'), port: Number(address.slice(at + 1)) });
      const done = (ok: boolean) => {
        socket.destroy();
        resolve(ok);
      };
      socket.setTimeout(timeoutMs, () => done(false));
      socket.once('connect', () => done(true));
      socket.once('error', () => done(false));
    });
  return (await Promise.all(addresses.map(accepts))).some(Boolean);
}

/**
 * ioredis' Sentinel connector, saying why it drops a connection to the master the Sentinels name
 * when that server answers INFO as a replica (demoted, and the Sentinels have not switched yet):
 * ioredis drops it and asks them again without a word, and every call fails meanwhile.
 */
function sentinelConnector(failed: (message: string) => void): NonNullable<RedisOptions['Connector']> {
  return class extends SentinelConnector {
    constructor(options: unknown) {
      super(options as SentinelConnectionOptions);
    }

    check(info: { role?: string }): boolean {
      const matches = super.check(info);
      if (!matches) {
        failed(`the Sentinels name ${this.stream.remoteAddress}:${this.stream.remotePort} as the master, but it answers role:${info.role}: waiting for them to name the new one`);
      }
      return matches;
    }
  };
}

function isRedirect(err: Error | null): boolean {
  return err !== null && /^(MOVED|ASK) /.test(err.message);
}

/** ioredis refused a cluster pipeline, unsent, because its slot groups disagree while slots move. */
function isRegroup(err: Error | null): boolean {
  return err !== null && /^All keys in the pipeline should belong to the same slots allocation group/.test(err.message);
}

/**
 * ioredis' refusals of a command it never wrote to a connection (no connection is ready, and the
 * offline queue is off). Every other failure that is not a reply from Redis came after the command
 * was written: its connection broke or timed out before the reply, and Redis may have run it.
 */
const NOT_SENT = /^Stream isn't writeable|^Cluster isn't ready|enableOfflineQueue options is false|^All keys in the pipeline should belong/;

/**
 * Connection, timeout and failover errors, and replies that say Redis cannot serve now, become
 * StoreError('unavailable'); one for a command that was sent and never answered says its outcome
 * is unknown (see NOT_SENT). Any other reply error is the failure of that one operation, never
 * an exception: 'failed_precondition' (FAILED_PRECONDITION) for a key of another type under our
 * prefix, since only removing that foreign key helps, not retrying; 'internal' (INTERNAL) for
 * anything else (a wrong script, an ACL that denies a command), a fault of the deployment that
 * the caller can do nothing about.
 */
function toStoreError(err: unknown): StoreError {
  if (err instanceof StoreError) return err;
  const error = err as Error;
  if (error?.name === 'ReplyError' && !TRANSIENT.test(error.message)) {
    if (FOREIGN.test(error.message)) {
      return new StoreError('failed_precondition', `redis: the key holds data of another type that the store did not write (${error.message})`);
    }
    return new StoreError('internal', `redis: ${error.message}`);
  }
  if (error?.name === 'ReplyError') return new StoreError('unavailable', `redis: ${error.message}`);
  const message = error?.message ?? String(err);
  const plain = PLAIN_WORDS.find(([terse]) => terse.test(message))?.[1];
  return new StoreError('unavailable', plain ? `redis: ${plain} (${message})` : `redis: ${message}`, { outcomeUnknown: !NOT_SENT.test(message) });
}

/** ioredis' terse messages for a command that got no answer, said so that an operator reading the log knows what happened. */
const PLAIN_WORDS: ReadonlyArray<[RegExp, string]> = [
  [/^Connection is closed\.$/, 'the connection to Redis closed before an answer came'],
  // What ioredis gives the commands in flight on a connection it drops (maxRetriesPerRequest is 0: none is resent).
  [/^Reached the max retries per request limit/, 'the connection to Redis was lost before an answer came'],
  [/^Command timed out$/, 'Redis gave no answer within REDIS_COMMAND_TIMEOUT_MS'],
];

