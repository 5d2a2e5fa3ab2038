import type { Context, Middleware } from 'koa';
import type { StoreClient } from '../client/store-client';
import { StoreClientError } from '../client/store-client';
import { shortHash } from '../shared/log';
import { type IdProof, IdSigner, newSessionId } from './signed-id';

/**
 * What the middleware needs from a store: the three calls of the koa-session store contract, with
 * versions for compare-and-set. The SessionStore client fits as is; tests wrap it to count calls.
 */
export type SessionBackend = Pick<StoreClient, 'get' | 'put' | 'delete'>;

/**
 * Lifecycle events, for metrics: a session written for the first time, moved to a new id, deleted,
 * or found ended: the request carried a valid id whose session is gone (idle or absolute timeout,
 * or deleted meanwhile), so a returning visitor lost it. At most one 'expired' per request.
 */
export type SessionEvent = 'created' | 'regenerated' | 'destroyed' | 'expired';

/** Options of {@link sessionMiddleware}. Checked when the middleware is created; a bad one throws a TypeError saying what to fix. */
export interface SessionOptions {
  /** Where session data lives (required): get / put / delete with versions, e.g. the SessionStore client. */
  store: SessionBackend;
  /** HMAC keys, newest first (required): the first signs, all verify, so keys rotate without logging anyone out. Each at least 32 characters. */
  keys: readonly string[];
  /** Cookie name (default "sid"); served as `__Host-<name>` when the cookie is Secure. 1-64 of A-Z a-z 0-9 _ -. */
  cookieName?: string;
  /** Idle timeout in ms: a session unused this long is gone (default 30 minutes). */
  idleTtlMs?: number;
  /** Absolute lifetime in ms, counted from creation, that no use extends (default 24 hours). At least idleTtlMs. */
  absoluteTtlMs?: number;
  /** Reads also slide the idle timeout (default true). Writes always do. */
  rolling?: boolean;
  /**
   * The cookie gets an expiry, the session's absolute end (absoluteTtlMs from when its id is
   * issued), so it outlives a browser restart: "remember me". Default false: a browser-session
   * cookie, gone when the browser closes. Either way the store decides when the session ends.
   */
  persistent?: boolean;
  /**
   * When the cookie gets `Secure` and the `__Host-` prefix: 'auto' (default) when the request is
   * HTTPS (ctx.secure, which honours X-Forwarded-Proto when app.proxy is set), 'always', or 'never'.
   */
  secure?: 'auto' | 'always' | 'never';
  /** How many times update() re-reads and re-applies on a version conflict before a SessionConflictError (default 30: other processes writing the same session can win several rounds). */
  maxUpdateTries?: number;
  /** After regenerate(), how long in ms the old id still leads to the new session (default 10 s). */
  regenerateGraceMs?: number;
  /**
   * How long in ms a request waits for its turn while earlier requests of this process use the
   * same session (default 5 s). Past it, the request gives up with a SessionBusyError (a 503 page)
   * and changes nothing: against a slow store, each turn can take a whole deadline, and a browser's
   * queued requests would otherwise wait for all of them.
   */
  maxQueueWaitMs?: number;
  /**
   * How many sessions this process remembers the last written version of (default 10,000; 0 = none).
   * The next update of a remembered session writes with compare-and-set straight away, without
   * reading first: one store round trip instead of two. Another process's write makes the version
   * mismatch and the update re-reads, so this saves a read and risks nothing. The same number of
   * signed ids is remembered, so a returning browser's cookie is checked without an HMAC.
   */
  recentSessions?: number;
  /** The request's id, passed to the store with every call for its logs (default: none). */
  requestId?: (ctx: Context) => string | undefined;
  /** Called for a cookie whose MAC does not verify (forged or tampered), before and instead of any store call. Gets a hash, never the value. */
  onForgedCookie?: (ctx: Context, info: { cookieHash: string }) => void;
  /** Called on session lifecycle events (for metrics). */
  onEvent?: (event: SessionEvent, ctx: Context) => void;
}

/** Thrown by update() and regenerate() when the session kept changing under them for every try. */
export class SessionConflictError extends Error {
  override name = 'SessionConflictError';
  readonly status = 503;
  readonly expose = true;
}

/** Thrown instead of running a session call that waited longer than maxQueueWaitMs for its turn; nothing was done. */
export class SessionBusyError extends Error {
  override name = 'SessionBusyError';
  readonly status = 503;
  readonly expose = true;
  constructor(waitedMs: number) {
    super(`the session was busy with earlier requests for ${waitedMs} ms; please retry`);
  }
}

/** A queued session call whose client closed the request before its turn (status 499, as nginx logs it); nothing was done. */
export class ClientClosedError extends Error {
  override name = 'ClientClosedError';
  readonly status = 499;
  readonly expose = true;
  constructor() {
    super('the client closed the request before its turn');
  }
}

/** Data must be a JSON object; the store holds it as UTF-8 JSON. */
export type SessionData = Record<string, unknown>;

interface Loaded {
  id: string;
  version: number;
  createdAtMs: number;
  data: SessionData;
  /** The stored bytes: an update that produces the same bytes writes nothing. */
  raw: Buffer;
  /** The idle timeout was already slid by this request (or, for a handed-on entry, by the write that made it). */
  refreshed: boolean;
  /**
   * Taken from what an earlier request in this process wrote (the previous update in the
   * session's queue, or one remembered from an earlier queue), not read by this request: another
   * process may have written since. A write catches that with compare-and-set; writing nothing
   * would not, so an update whose result equals it reads the store first.
   */
  handedOn?: boolean;
}

/**
 * After regenerate(), the old id's entry holds `moved:<new id>:<until epoch ms>` instead of data:
 * one compare-and-set both stops writers of the old id and points readers to the new one. Data is
 * always a JSON object, so it never starts like this. The deadline is in the value because a
 * reader's TTL refresh may extend the entry itself.
 */
const FORWARD_PREFIX = 'moved:';
/** Regenerations in a row that a request carrying an old id follows through the store. */
const MAX_HOPS = 4;
/** The same, for regenerations this process knows of (no store call per hop). */
const MAX_LOCAL_HOPS = 64;

/**
 * The per-request session handle (`ctx.session`). Nothing is verified or read until a method is
 * called, so requests that never use the session cost neither an HMAC nor a store call.
 */
export class Session<T extends object = SessionData> {
  private cookieRead = false;
  /** The verified id the request carried (undefined: none, or forged). */
  private cookieId: string | undefined;
  /** The id this request now stands for: the cookie's, a followed regeneration, or a new one. */
  private currentId: string | undefined;
  /** A new id handed to the browser in this request and not yet written. */
  private issued = false;
  /** The id this response's Set-Cookie carries, if any. */
  private sentId: string | undefined;
  /** destroy() cleared the cookie: the browser holds no id after this response unless one is sent. */
  private cleared = false;
  private proof: IdProof | undefined;
  /** 'expired' was reported for this request. */
  private endedReported = false;
  private loaded: Loaded | null | undefined; // undefined = not read yet; null = no session
  private requestIdCache: string | undefined | null = null;
  /** Set while this request holds the session's lock. */
  private handoff: Handoff | undefined;
  /** The last change this request started (update, regenerate, destroy), while it runs. */
  private turn: Promise<unknown> | undefined;

  constructor(
    private readonly ctx: Context,
    private readonly cfg: ResolvedOptions,
  ) {}

  /**
   * The session id the browser holds after this response, if any (never log it: see shortHash).
   * A request that reached a regenerated session through its old id gets the old id, as its token
   * (csrfToken), never the new one.
   */
  get id(): string | undefined {
    this.readCookie();
    return this.sentId ?? (this.cleared ? undefined : this.cookieId);
  }

  /** True when the request carried a valid signed id (no store call). */
  get hasCookie(): boolean {
    this.readCookie();
    return this.cookieId !== undefined;
  }

  /** The session data, or null when there is no live session. One store call, cached for the request. */
  async get<U extends object = T>(): Promise<U | null> {
    if (this.loaded === undefined) this.loaded = await this.load(this.cfg.rolling);
    return (this.loaded?.data as U | undefined) ?? null;
  }

  /**
   * Atomically replaces the data with fn(current) and returns it. Written with compare-and-set on
   * the version; on a conflict it re-reads and re-applies fn, up to maxUpdateTries times, then
   * throws SessionConflictError (a 503 page). fn may run more than once, so it must only compute.
   * fn receives null when there is no live session: what it returns starts a new one under a fresh
   * id (an id sent by the browser is never adopted). Returning data equal to the current data
   * writes nothing (it only slides the idle timeout when `rolling`).
   *
   * Updates of one session within this process run one after another, so parallel requests of one
   * browser do not fight; compare-and-set still guards against other processes.
   */
  async update<U extends object = T>(fn: (current: U | null) => U): Promise<U> {
    return this.inTurn(() => this.locked(() => this.tryUpdate(fn)));
  }

  /**
   * Moves the data to a new id and deletes the old one: call it when privileges change (login), so
   * an id known before is worthless after. The new id starts a new absolute lifetime, as a new
   * login would. For regenerateGraceMs the old id still leads to the new session, so parallel
   * requests still carrying it are served the session, never an empty one (but never told the new
   * id: see load()); their own regenerate() changes nothing.
   */
  async regenerate(): Promise<void> {
    return this.inTurn(() => this.locked(() => this.renew()));
  }

  /**
   * Deletes the session from the store and clears the cookie. The delete is a compare-and-set on
   * the version read, under this process's lock: if the session was regenerated meanwhile (a login
   * racing a logout), the old id holds a forward by then, and the delete reads again and follows
   * it, so the session it moved to is deleted too rather than left alive.
   */
  async destroy(): Promise<void> {
    return this.inTurn(async () => {
      await this.locked(() => this.remove());
      this.loaded = null;
      this.currentId = undefined;
      this.issued = false;
      this.sentId = undefined;
      this.cleared = true;
      this.markPrivate();
      this.setCookie('', { maxAge: 0, expires: new Date(0) });
    });
  }

  /**
   * The form token bound to the session id the browser holds after this response (issues an id,
   * without a store write, if there is none). Call it after get() or update(), which may move the
   * request to a new id.
   */
  csrfToken(): string {
    this.readCookie();
    if (!this.currentId) this.useId(newSessionId(), false);
    // The id sent in this response, else the one the request carried. A request that reached a
    // regenerated session through its old id stands for the new id but is never told it, nor a
    // token for it: whoever planted the old id would get a token the logged-in browser accepts.
    return this.proofFor(this.sentId ?? this.cookieId!).csrf;
  }

  /** Constant-time check of a form token against the id the request carried; false without a valid cookie. */
  verifyCsrf(token: unknown): boolean {
    this.readCookie();
    const id = this.cookieId;
    return id !== undefined && this.cfg.signer.verifyCsrf(id, token, this.proof);
  }

  private readCookie(): void {
    if (this.cookieRead) return;
    this.cookieRead = true;
    // A browser sends every cookie of the name that matches (another path's first, then a parent
    // domain's): a stale or foreign one before ours must not hide the session, so the first that
    // verifies counts. That gives whoever can set such a cookie nothing more: a longer path already
    // puts theirs first.
    let forged: string | undefined;
    for (const raw of cookieValues(this.ctx.get('cookie'), this.cookieName())) {
      const verified = this.cfg.signer.verify(raw);
      if (verified) {
        this.cookieId = verified.id;
        this.currentId = verified.id;
        this.proof = verified.proof;
        return;
      }
      forged ??= raw;
    }
    if (forged !== undefined) this.cfg.onForgedCookie(this.ctx, { cookieHash: shortHash(forged) });
  }

  /**
   * Runs the request's own changes one after another, as the lock does for requests: a request
   * with no session yet has no id to lock, and changes started at once would each start a session
   * of their own, the browser keeping only the last.
   */
  private inTurn<R>(fn: () => Promise<R>): Promise<R> {
    const result = this.turn ? this.turn.then(fn) : fn();
    const turn: Promise<unknown> = result.then(
      () => this.endTurn(turn),
      () => this.endTurn(turn),
    );
    this.turn = turn;
    return result;
  }

  private endTurn(turn: Promise<unknown>): void {
    if (this.turn === turn) this.turn = undefined;
  }

  /** Runs fn under this process's lock for the session, re-locking if a regeneration moved it meanwhile. */
  private async locked<R>(fn: () => Promise<R>): Promise<R> {
    this.readCookie();
    for (let hop = 0; ; hop += 1) {
      const key = this.issued ? undefined : this.cfg.moves.resolve(this.currentId);
      if (key === undefined || hop > MAX_LOCAL_HOPS) return fn();
      const outcome = await this.cfg.locks.run(key, async (handoff) => {
        // A request whose client went away while it waited (a reload, a closed tab) gives up its
        // turn: when the store is slow, each turn can take a whole deadline, and the requests
        // still waiting behind it would wait for every abandoned one.
        if (this.ctx.req.socket?.destroyed) throw new ClientClosedError();
        if (this.cfg.moves.resolve(this.currentId) !== key) return undefined;
        this.handoff = handoff;
        try {
          return { value: await fn() };
        } finally {
          this.handoff = undefined;
        }
      });
      if (outcome) return outcome.value;
    }
  }

  /**
   * The entry the previous update in this process's queue for the session wrote: the next one
   * tries compare-and-set on it without reading first. If another process wrote meanwhile, the
   * version no longer matches and the update re-reads; an update that would write nothing reads
   * first (see Loaded.handedOn).
   */
  private fromHandoff(): Loaded | undefined {
    const last = this.handoff?.last;
    if (!last || last.id !== this.cfg.moves.resolve(this.currentId) || last.createdAtMs + this.cfg.absoluteTtlMs <= Date.now()) return undefined;
    const data = parseData(last.raw);
    if (!data) return undefined;
    this.markPrivate();
    return { id: last.id, version: last.version, createdAtMs: last.createdAtMs, raw: last.raw, data, refreshed: last.remembered !== true, handedOn: true };
  }

  /** What an update starts from: what this request already read, else what the previous queued update wrote, else a fresh read. */
  private async startingPoint(firstTry: boolean): Promise<Loaded | null> {
    if (firstTry) {
      if (this.loaded !== undefined) return this.loaded;
      const handedOver = this.fromHandoff();
      if (handedOver) return handedOver;
    }
    return this.load(false);
  }

  private remember(loaded: Loaded | null): void {
    if (this.handoff) this.handoff.last = loaded ? { id: loaded.id, version: loaded.version, createdAtMs: loaded.createdAtMs, raw: loaded.raw } : undefined;
  }

  private async tryUpdate<U extends object>(fn: (current: U | null) => U): Promise<U> {
    let reread = false;
    for (let attempt = 0; attempt < this.cfg.maxUpdateTries; attempt += 1) {
      if (attempt > 0) await backoff(attempt);
      // What this request read or wrote before this update took the lock (a get() first): another
      // request may have written since, as for a handed-on entry.
      const readBefore = attempt === 0 && this.loaded !== undefined;
      const current = await this.startingPoint(attempt === 0);
      const next = fn((current?.data as U | undefined) ?? null);
      // Checked as JSON too: a Date, or an object whose toJSON gives no object, would be stored as
      // data no read accepts, and the session would end at the browser's next request. A promise
      // (an async fn) would be stored as {}, every field of the session gone.
      const json = next !== null && typeof next === 'object' && !Array.isArray(next) && !isThenable(next) ? JSON.stringify(next) : undefined;
      if (!json?.startsWith('{')) {
        throw new TypeError('session update function must return a plain object (the new session data), synchronously: an async function gives a promise');
      }
      const value = Buffer.from(json);
      try {
        if (current) {
          if ((current.handedOn || readBefore) && value.equals(current.raw)) {
            // Nothing to write, so no compare-and-set would catch a stale starting point: read for
            // real. A read, not a conflict: it uses up no try (once; what it reads is fresh).
            this.loaded = undefined;
            this.remember(null);
            if (!reread) {
              reread = true;
              attempt -= 1;
            }
            continue;
          }
          if (value.equals(current.raw)) {
            await this.slide(current);
            return next;
          }
          const entry = await this.cfg.store.put(current.id, value, {
            ttlMs: this.ttlFor(current.createdAtMs),
            expectedVersion: current.version,
            ...this.callOptions(),
          });
          this.loaded = { ...current, version: entry.version, data: next as SessionData, raw: value, refreshed: true };
          this.remember(this.loaded);
        } else {
          const id = this.issued ? this.currentId! : newSessionId();
          const entry = await this.cfg.store.put(id, value, { ttlMs: this.cfg.idleTtlMs, expectedVersion: 0, ...this.callOptions() });
          this.useId(id, true);
          this.loaded = { id, version: entry.version, createdAtMs: entry.createdAtMs, data: next as SessionData, raw: value, refreshed: true };
          this.remember(this.loaded);
          this.cfg.locks.prime(id, { id, version: entry.version, createdAtMs: entry.createdAtMs, raw: value });
          this.cfg.onEvent('created', this.ctx);
        }
        return next;
      } catch (err) {
        // A failed write may still have been applied (a deadline, a lost connection): what the
        // queue remembers is no longer known to be the stored entry.
        this.loaded = undefined;
        this.remember(null);
        if (!isConflict(err)) throw err;
        // Started from memory, not from a read: the conflict may only say that another process
        // wrote before this request came. Reading again uses up no try (once), as above.
        if (current?.handedOn && !reread) {
          reread = true;
          attempt -= 1;
        }
      }
    }
    throw new SessionConflictError('the session changed too often while it was being updated; please retry');
  }

  private async remove(): Promise<void> {
    for (let attempt = 0; attempt < this.cfg.maxUpdateTries; attempt += 1) {
      if (attempt > 0) await backoff(attempt);
      const current = attempt === 0 && this.loaded !== undefined ? this.loaded : await this.load(false);
      if (!current) return;
      this.cfg.locks.forget(current.id);
      this.remember(null);
      try {
        if (await this.cfg.store.delete(current.id, { expectedVersion: current.version, ...this.callOptions() })) this.cfg.onEvent('destroyed', this.ctx);
        return;
      } catch (err) {
        if (!isConflict(err)) throw err;
      }
    }
    throw new SessionConflictError('the session changed too often while it was being deleted; please retry');
  }

  private async renew(): Promise<void> {
    let current = this.loaded !== undefined ? this.loaded : await this.load(false);
    const newId = newSessionId();
    if (!current) {
      this.useId(newId, false);
      return;
    }
    // Reached through an id a regeneration replaced: the session already has an id this request was
    // never told. Moving it again would send this request a live id of it (whoever planted the old
    // id would get the logged-in session) and end the one the browser that regenerated holds.
    if (current.id !== (this.sentId ?? this.cookieId)) return;
    let newVersion = 0;
    for (let attempt = 0; attempt < this.cfg.maxUpdateTries; attempt += 1) {
      if (attempt > 0) await backoff(attempt);
      // Copy first, then forward: a failure in between leaves the old session as it was.
      const copied = await this.cfg.store
        .put(newId, current.raw, { ttlMs: this.cfg.idleTtlMs, expectedVersion: newVersion, ...this.callOptions() })
        .catch(conflictAsSessionError);
      newVersion = copied.version;
      const untilMs = Date.now() + this.cfg.regenerateGraceMs;
      const from = current;
      const moved = () => {
        // Until the deadline the forward holds, not a whole grace window from now.
        this.cfg.moves.remember(from.id, newId, untilMs - Date.now());
        this.loaded = { ...from, id: newId, version: newVersion, createdAtMs: copied.createdAtMs, refreshed: true };
        this.remember(null);
        this.useId(newId, true);
        this.cfg.onEvent('regenerated', this.ctx);
      };
      try {
        await this.cfg.store.put(current.id, Buffer.from(`${FORWARD_PREFIX}${newId}:${untilMs}`), {
          ttlMs: this.cfg.regenerateGraceMs,
          expectedVersion: current.version,
          ...this.callOptions(),
        });
        return moved();
      } catch (err) {
        if (!isConflict(err)) {
          // The forward may have been written all the same (a deadline, a lost connection). If it
          // was, the browser must get the new id now: requests with the old one are never told it.
          const found = await this.cfg.store.get(current.id, this.callOptions()).catch(() => undefined);
          if (found && parseForward(found.value)?.forward === newId) return moved();
          // Surely not written: the store answered, or the call never reached it.
          const notWritten = err instanceof StoreClientError && !err.outcomeUnknown;
          if (found === undefined && !notWritten) {
            // Unknown (the read failed too): keep the copy, and send the browser its id all the
            // same. Were the forward written, a browser left with the old id would be served the
            // copy only until the grace window ends, then lose the session with every update it
            // made meanwhile. Were it not, the old id keeps the session as it was and the browser
            // goes on with a copy of it. Either way it loses nothing, and the call still fails.
            this.loaded = undefined;
            this.useId(newId, true);
            throw err;
          }
          // Not written: drop the copy (left to expire when the read failed too: the store is out of reach).
          if (found !== undefined) await this.cfg.store.delete(newId, this.callOptions()).catch(() => undefined);
          throw err;
        }
      }
      // Another process wrote the old id after we read it: read it again and copy again.
      const reread = await this.readId(current.id, false);
      // Destroyed or expired meanwhile (below the loop), or renewed by someone else (here): either
      // way our copy must not survive.
      if (!isLoaded(reread)) {
        if (reread === 'missing' || reread === 'gone') break;
        await this.cfg.store.delete(newId, this.callOptions());
        // Renewed by another process (a second login at once): as when this process sees the
        // forward first, this request changes nothing, is sent no id, and reads through the forward.
        this.cfg.moves.remember(current.id, reread.forward, reread.untilMs - Date.now());
        this.loaded = undefined;
        return;
      }
      current = reread;
    }
    await this.cfg.store.delete(newId, this.callOptions());
    throw new SessionConflictError('the session changed too often while it was being renewed; please retry');
  }

  /** Reads the session the request stands for, following regenerations (known to this process, then forwards in the store). */
  private async load(refresh: boolean): Promise<Loaded | null> {
    this.readCookie();
    if (this.issued) return null;
    let id = this.cfg.moves.resolve(this.currentId);
    for (let hop = 0; id !== undefined && hop <= MAX_HOPS; hop += 1) {
      const found = await this.readId(id, refresh);
      if (isLoaded(found)) {
        // A regenerated session is served to a request still carrying its old id, but the new id
        // is not sent back: only the response of the request that regenerated carries it. Whoever
        // else knew the old id (planted before a login: session fixation) never learns the new one.
        this.currentId = found.id;
        return found;
      }
      if (found === 'missing' || found === 'gone') {
        this.reportEnded();
        return null;
      }
      this.cfg.moves.remember(id, found.forward, found.untilMs - Date.now());
      id = found.forward;
    }
    // Forwards still to follow: the session exists, this request did not reach it. No session here
    // would hand out an empty one, and make destroy() delete nothing yet clear the cookie. The
    // moves followed are known now, so a retry goes further.
    if (id !== undefined) throw new SessionConflictError('the session was regenerated too often in a row; please retry');
    return null;
  }

  /**
   * One entry: its data; a forward to the id it was regenerated into; 'missing' (no entry, e.g.
   * idle-expired or destroyed); or 'gone' (past its absolute lifetime, a stale forward, unreadable).
   */
  private async readId(id: string, refresh: boolean): Promise<Loaded | Forward | 'missing' | 'gone'> {
    const entry = await this.cfg.store.get(id, { refreshTtlMs: refresh ? this.cfg.idleTtlMs : 0, ...this.callOptions() });
    if (!entry) return 'missing';
    const forward = parseForward(entry.value);
    if (forward) return forward.untilMs > Date.now() ? forward : 'gone';
    if (entry.createdAtMs + this.cfg.absoluteTtlMs <= Date.now()) {
      await this.cfg.store.delete(id, { expectedVersion: entry.version, ...this.callOptions() }).catch(ignoreConflict);
      return 'gone';
    }
    const data = parseData(entry.value);
    if (!data) return 'gone';
    // The read slid the idle timeout before the creation time was known; near the end of the
    // absolute lifetime that went past it: bring it back (one more call, only then).
    if (refresh && entry.expiresAtMs > entry.createdAtMs + this.cfg.absoluteTtlMs) {
      await this.cfg.store.get(id, { refreshTtlMs: this.ttlFor(entry.createdAtMs), ...this.callOptions() });
    }
    this.markPrivate();
    return { id, version: entry.version, createdAtMs: entry.createdAtMs, data, raw: entry.value, refreshed: refresh };
  }

  /** Reports, once per request, that the valid id the request carried led to no live session. */
  private reportEnded(): void {
    if (this.cookieId === undefined || this.endedReported) return;
    this.endedReported = true;
    this.cfg.onEvent('expired', this.ctx);
  }

  /** Slides the idle timeout of unchanged data without a write (the version stays, so no one conflicts). */
  private async slide(current: Loaded): Promise<void> {
    if (!this.cfg.rolling || current.refreshed) return;
    await this.cfg.store.get(current.id, { refreshTtlMs: this.ttlFor(current.createdAtMs), ...this.callOptions() });
    current.refreshed = true;
  }

  /** Idle TTL, but never past the absolute lifetime. */
  private ttlFor(createdAtMs: number): number {
    const left = createdAtMs + this.cfg.absoluteTtlMs - Date.now();
    return Math.max(1, Math.min(this.cfg.idleTtlMs, left));
  }

  /** Makes `id` the request's session id and sends it to the browser; `stored`: it has an entry in the store. */
  private useId(id: string, stored: boolean): void {
    this.currentId = id;
    this.issued = !stored;
    if (id === this.cookieId || id === this.sentId) return;
    this.sentId = id;
    this.markPrivate();
    // A persistent cookie ends with the session's absolute lifetime, which starts now for a new id.
    this.setCookie(this.proofFor(id).cookie, this.cfg.persistent ? { maxAge: this.cfg.absoluteTtlMs } : undefined);
  }

  /** Sets the session cookie (Secure when secure(), which the cookies library must be told of on a plain-HTTP hop). */
  private setCookie(value: string, extra?: { maxAge: number; expires?: Date }): void {
    if (this.secure()) this.ctx.cookies.secure = true;
    this.ctx.cookies.set(this.cookieName(), value, { ...this.cookieAttributes(), ...extra });
  }

  private proofFor(id: string): IdProof {
    if (this.proof?.id !== id) this.proof = this.cfg.signer.prove(id);
    return this.proof;
  }

  private callOptions(): { requestId?: string } {
    if (this.requestIdCache === null) this.requestIdCache = this.cfg.requestId(this.ctx);
    return this.requestIdCache === undefined ? {} : { requestId: this.requestIdCache };
  }

  /** Responses that carry session data or a session cookie must never be cached. */
  private markPrivate(): void {
    this.ctx.set('Cache-Control', 'no-store');
  }

  private secure(): boolean {
    return this.cfg.secure === 'always' || (this.cfg.secure === 'auto' && this.ctx.secure);
  }

  private cookieName(): string {
    return this.secure() ? `__Host-${this.cfg.cookieName}` : this.cfg.cookieName;
  }

  private cookieAttributes() {
    return { httpOnly: true, sameSite: 'lax' as const, path: '/', secure: this.secure(), overwrite: true, signed: false };
  }
}

/** The cookieName rule: 1-64 of A-Z a-z 0-9 _ -, not starting with "__" (the __Host- prefix is added for Secure cookies). */
export const COOKIE_NAME = /^(?!__)[A-Za-z0-9_-]{1,64}$/;

/** Cookies of the session's name looked at per request: a browser sends one per path and domain, never many. */
const MAX_SAME_NAME_COOKIES = 8;

/** The non-empty values of the cookies called `name` in a Cookie header, in order, at most MAX_SAME_NAME_COOKIES (quotes removed, as the cookies library does). */
function* cookieValues(header: string, name: string): Generator<string> {
  if (!header.includes(name)) return;
  let seen = 0;
  for (const pair of header.split(';')) {
    const eq = pair.indexOf('=');
    if (eq < 0 || pair.slice(0, eq).trim() !== name) continue;
    if ((seen += 1) > MAX_SAME_NAME_COOKIES) return;
    let value = pair.slice(eq + 1).trim();
    if (value.length >= 2 && value.startsWith('"') && value.endsWith('"')) value = value.slice(1, -1);
    if (value !== '') yield value;
  }
}

/** Jittered exponential backoff between compare-and-set retries (other processes writing the same session). */
function backoff(attempt: number): Promise<void> {
  const ms = Math.random() * Math.min(100, 2 ** attempt);
  return new Promise((resolve) => setTimeout(resolve, ms));
}

const SETTLED: Promise<unknown> = Promise.resolve();

/** What queued updates of one session hand to each other: the last entry written. */
export interface Handoff {
  last?: { id: string; version: number; createdAtMs: number; raw: Buffer; remembered?: boolean };
}

/**
 * Runs tasks of one key one after another within this process; tasks of a queue share its Handoff.
 * When a queue empties, its last entry is remembered (up to `recentMax` keys, least recently
 * used out first) and handed to the key's next queue.
 */
export class KeyedLock {
  private readonly queues = new Map<string, { tail: Promise<unknown>; handoff: Handoff }>();
  private readonly recent = new Map<string, NonNullable<Handoff['last']>>();

  /** recentMax: keys whose last entry is remembered; maxWaitMs: how long a task waits behind others of its key (0: no limit). */
  constructor(
    private readonly recentMax = 0,
    private readonly maxWaitMs = 0,
  ) {}

  /** Remembers the entry a new session was created with (creation runs outside any queue). */
  prime(key: string, last: NonNullable<Handoff['last']>): void {
    if (this.recentMax === 0 || this.queues.has(key)) return;
    this.recent.delete(key);
    this.recent.set(key, last);
    if (this.recent.size > this.recentMax) this.recent.delete(this.recent.keys().next().value!);
  }

  /** Drops what is remembered of a key (its session was destroyed). */
  forget(key: string): void {
    this.recent.delete(key);
    const queue = this.queues.get(key);
    if (queue) queue.handoff.last = undefined;
  }

  run<R>(key: string, fn: (handoff: Handoff) => Promise<R>): Promise<R> {
    let queue = this.queues.get(key);
    let result: Promise<R>;
    let turnDone: Promise<unknown> | undefined;
    if (!queue) {
      // Nothing queued for this key (the usual case): start at once, without a hop through a promise.
      const remembered = this.recent.get(key);
      // Built field by field: in a CPU profile of the page the object spread here was among the hottest lines.
      const last = remembered && { id: remembered.id, version: remembered.version, createdAtMs: remembered.createdAtMs, raw: remembered.raw, remembered: true };
      queue = { tail: SETTLED, handoff: { last } };
      this.queues.set(key, queue);
      try {
        result = fn(queue.handoff);
      } catch (err) {
        // A task that throws before it returns a promise still has to release the queue.
        result = Promise.reject(err);
      }
    } else {
      const q = queue;
      const waited = this.waitFor(q.tail, () => fn(q.handoff));
      result = waited.result;
      // The queue goes on from this task's turn: one that gave up still lets the tasks behind it
      // wait for the ones before it.
      turnDone = waited.turn;
    }
    const q = queue;
    const settled = (): undefined => {
      if (q.tail !== tail) return undefined;
      this.queues.delete(key);
      this.recent.delete(key);
      const last = q.handoff.last;
      if (last && last.id === key) this.prime(key, { id: last.id, version: last.version, createdAtMs: last.createdAtMs, raw: last.raw });
      return undefined;
    };
    const tail: Promise<unknown> = (turnDone ?? result).then(settled, settled);
    q.tail = tail;
    return result;
  }

  /**
   * Runs fn once `before` settles. `result` rejects with SessionBusyError if that takes longer
   * than maxWaitMs, and fn is then never run; `turn` settles when fn has (or at once after
   * `before`, for a task that gave up).
   */
  private waitFor<R>(before: Promise<unknown>, fn: () => Promise<R>): { turn: Promise<R | undefined>; result: Promise<R> } {
    if (this.maxWaitMs === 0) {
      const turn = before.then(fn, fn);
      return { turn, result: turn };
    }
    let gaveUp = false;
    let timer: NodeJS.Timeout | undefined;
    const start = () => {
      clearTimeout(timer);
      return gaveUp ? undefined : fn();
    };
    const turn = before.then(start, start);
    const timedOut = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        gaveUp = true;
        reject(new SessionBusyError(this.maxWaitMs));
      }, this.maxWaitMs);
    });
    return { turn, result: Promise.race([turn as Promise<R>, timedOut]) };
  }
}

/**
 * Regenerations this process made or followed, kept for their grace window: a request carrying an
 * old id goes straight to the new one (and its lock) without asking the store.
 */
export class RecentMoves {
  private readonly moves = new Map<string, { to: string; untilMs: number }>();

  remember(from: string, to: string, forMs: number): void {
    const now = Date.now();
    // Moves are kept in the order they were made and share one grace window, so the expired ones
    // are at the front: dropping them costs only what expired (a scan of every move on each
    // login would cost O(n) per regenerate once logins come faster than 1000 per window).
    for (const [key, move] of this.moves) {
      if (move.untilMs > now) break;
      this.moves.delete(key);
    }
    this.moves.delete(from);
    this.moves.set(from, { to, untilMs: now + forMs });
  }

  /** Moves held, expired ones included until the next remember() (or a resolve() of that very id) drops them. */
  get size(): number {
    return this.moves.size;
  }

  /** The newest id an id was moved to (itself when it was not moved). */
  resolve(id: string | undefined): string | undefined {
    if (this.moves.size === 0 || id === undefined) return id;
    const now = Date.now();
    for (let hop = 0; hop < MAX_LOCAL_HOPS; hop += 1) {
      const move = this.moves.get(id);
      if (!move) break;
      if (move.untilMs <= now) {
        this.moves.delete(id);
        break;
      }
      id = move.to;
    }
    return id;
  }
}

/** The longest lifetime browsers give a cookie (RFC 6265bis: 400 days). */
const MAX_COOKIE_LIFETIME_MS = 400 * 24 * 3_600_000;

function isThenable(value: object): boolean {
  return typeof (value as { then?: unknown }).then === 'function';
}

function isConflict(err: unknown): boolean {
  return err instanceof StoreClientError && err.kind === 'conflict';
}

function conflictAsSessionError(err: unknown): never {
  if (isConflict(err)) throw new SessionConflictError('the session changed while it was being renewed; please retry');
  throw err;
}

function ignoreConflict(err: unknown): false {
  if (!isConflict(err)) throw err;
  return false;
}

interface Forward {
  forward: string;
  untilMs: number;
}

function isLoaded(found: Loaded | Forward | 'missing' | 'gone'): found is Loaded {
  return typeof found === 'object' && 'data' in found;
}

function parseForward(value: Buffer): Forward | null {
  if (value.length === 0 || value[0] !== FORWARD_PREFIX.charCodeAt(0)) return null;
  const match = /^moved:([A-Za-z0-9_-]{24}):(\d{1,15})$/.exec(value.toString('utf8'));
  return match ? { forward: match[1], untilMs: Number(match[2]) } : null;
}

function parseData(value: Buffer): SessionData | null {
  try {
    const data: unknown = JSON.parse(value.toString('utf8'));
    return data !== null && typeof data === 'object' && !Array.isArray(data) ? (data as SessionData) : null;
  } catch {
    return null;
  }
}

interface ResolvedOptions {
  store: SessionBackend;
  signer: IdSigner;
  cookieName: string;
  idleTtlMs: number;
  absoluteTtlMs: number;
  rolling: boolean;
  persistent: boolean;
  secure: 'auto' | 'always' | 'never';
  maxUpdateTries: number;
  regenerateGraceMs: number;
  requestId: (ctx: Context) => string | undefined;
  onForgedCookie: (ctx: Context, info: { cookieHash: string }) => void;
  onEvent: (event: SessionEvent, ctx: Context) => void;
  locks: KeyedLock;
  moves: RecentMoves;
}

/** The longest delay setTimeout keeps (2^31 - 1 ms). */
const MAX_TIMER_MS = 2_147_483_647;

const KNOWN_OPTIONS = new Set<string>([
  'store',
  'keys',
  'cookieName',
  'idleTtlMs',
  'absoluteTtlMs',
  'rolling',
  'persistent',
  'secure',
  'maxUpdateTries',
  'regenerateGraceMs',
  'maxQueueWaitMs',
  'recentSessions',
  'requestId',
  'onForgedCookie',
  'onEvent',
]);

/** Checks every option and fills defaults; throws a TypeError that names the option and what to fix. */
export function resolveSessionOptions(options: SessionOptions): ResolvedOptions {
  if (options === null || typeof options !== 'object') throw new TypeError('session options: pass an object with at least store and keys');
  for (const name of Object.keys(options)) {
    if (!KNOWN_OPTIONS.has(name)) throw new TypeError(`session option ${name} is not known; the options are: ${[...KNOWN_OPTIONS].join(', ')}`);
  }
  const store = options.store as Partial<SessionBackend> | undefined;
  if (!store || typeof store.get !== 'function' || typeof store.put !== 'function' || typeof store.delete !== 'function') {
    throw new TypeError('session option store is required: an object with get, put and delete (e.g. the SessionStore client)');
  }
  const positive = (name: string, value: unknown, fallback: number): number => {
    if (value === undefined) return fallback;
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value <= 0) {
      throw new TypeError(`session option ${name} must be a positive integer${name.endsWith('Ms') ? ' of milliseconds' : ''} (got ${shown(value)})`);
    }
    return value;
  };
  const nonNegative = (name: string, value: unknown, fallback: number): number => {
    if (value === undefined) return fallback;
    if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
      throw new TypeError(`session option ${name} must be a non-negative integer (got ${shown(value)})`);
    }
    return value;
  };
  const callback = <F>(name: string, value: F | undefined, fallback: F): F => {
    if (value === undefined) return fallback;
    if (typeof value !== 'function') throw new TypeError(`session option ${name} must be a function`);
    return value;
  };
  const cookieName = options.cookieName ?? 'sid';
  if (typeof cookieName !== 'string' || !COOKIE_NAME.test(cookieName)) {
    throw new TypeError('session option cookieName must be 1-64 of A-Z a-z 0-9 _ - and not start with "__" (the __Host- prefix is added for Secure cookies)');
  }
  const secure = options.secure ?? 'auto';
  if (!['auto', 'always', 'never'].includes(secure)) {
    throw new TypeError(`session option secure must be 'auto', 'always' or 'never' (got ${shown(secure)})`);
  }
  const rolling = options.rolling ?? true;
  if (typeof rolling !== 'boolean') throw new TypeError('session option rolling must be true or false');
  const persistent = options.persistent ?? false;
  if (typeof persistent !== 'boolean') throw new TypeError('session option persistent must be true or false');
  const idleTtlMs = positive('idleTtlMs', options.idleTtlMs, 30 * 60_000);
  const absoluteTtlMs = positive('absoluteTtlMs', options.absoluteTtlMs, 24 * 3_600_000);
  if (absoluteTtlMs < idleTtlMs) {
    throw new TypeError(`session option absoluteTtlMs (${absoluteTtlMs}) must be at least idleTtlMs (${idleTtlMs})`);
  }
  // The cookie's expiry is the absolute end: past what browsers keep it is cut short by them, and
  // far past it no date at all ("expires=Invalid Date": a browser-session cookie after all).
  if (persistent && absoluteTtlMs > MAX_COOKIE_LIFETIME_MS) {
    throw new TypeError(
      `session option absoluteTtlMs must be at most ${MAX_COOKIE_LIFETIME_MS} (400 days, the longest cookie lifetime browsers keep) with persistent: true (got ${absoluteTtlMs})`,
    );
  }
  const recentSessions = nonNegative('recentSessions', options.recentSessions, 10_000);
  const maxQueueWaitMs = positive('maxQueueWaitMs', options.maxQueueWaitMs, 5000);
  // A longer timer fires at once (Node.js sets it to 1 ms): every queued call would give up.
  if (maxQueueWaitMs > MAX_TIMER_MS) {
    throw new TypeError(`session option maxQueueWaitMs must be at most ${MAX_TIMER_MS} (about 24.8 days, the longest timer Node.js keeps; got ${maxQueueWaitMs})`);
  }
  return {
    store: options.store,
    signer: new IdSigner(options.keys, recentSessions),
    cookieName,
    idleTtlMs,
    absoluteTtlMs,
    rolling,
    persistent,
    secure,
    maxUpdateTries: positive('maxUpdateTries', options.maxUpdateTries, 30),
    regenerateGraceMs: positive('regenerateGraceMs', options.regenerateGraceMs, 10_000),
    requestId: callback('requestId', options.requestId, () => undefined),
    onForgedCookie: callback('onForgedCookie', options.onForgedCookie, () => undefined),
    onEvent: callback('onEvent', options.onEvent, () => undefined),
    locks: new KeyedLock(recentSessions, maxQueueWaitMs),
    moves: new RecentMoves(),
  };
}

declare module 'koa' {
  interface DefaultContext {
    session: Session;
  }
}

/**
 * Server-side sessions for Koa: the browser holds only a signed random id; data lives in the
 * store. Lazy (no HMAC and no store call unless the handler asks), compare-and-set writes,
 * rotatable keys, idle and absolute expiry. Options are checked here, once.
 *
 * @example
 * app.use(sessionMiddleware({ store: createStoreClient({ address: 'localhost:5100', deadlineMs: 1000 }), keys: [process.env.SESSION_KEY!] }));
 * router.post('/like', async (ctx) => { await ctx.session.update((s) => ({ ...s, likes: Number(s?.likes ?? 0) + 1 })); });
 */
export function sessionMiddleware(options: SessionOptions): Middleware {
  const cfg = resolveSessionOptions(options);
  return async (ctx, next) => {
    ctx.session = new Session(ctx, cfg);
    await next();
  };
}

/** An option's value in an error: a string in quotes, so '1000' is not taken for the number 1000. */
function shown(value: unknown): string {
  return typeof value === 'string' ? JSON.stringify(value) : String(value);
}
