import type { Context, Middleware } from 'koa';
import type { Entry, StoreClient } from '../client/store-client';
import { StoreClientError } from '../client/store-client';
import { IdSigner, newSessionId } from './signed-id';

/** What the middleware needs from a store: the three calls of the koa-session store contract, with versions. */
export type SessionBackend = Pick<StoreClient, 'get' | 'put' | 'delete'>;

export interface SessionOptions {
  store: SessionBackend;
  /** HMAC keys, newest first: the first signs, all verify (rotation). Each at least 32 characters. */
  keys: readonly string[];
  /** Cookie name (default "sid"); served as `__Host-<name>` when the cookie is Secure. */
  cookieName?: string;
  /** Idle timeout: a session unused this long is gone (default 30 minutes). */
  idleTtlMs?: number;
  /** Absolute lifetime from creation that no use extends (default 24 hours). */
  absoluteTtlMs?: number;
  /** Reads also refresh the idle timeout (sliding expiry; default true). Writes always do. */
  rolling?: boolean;
  /** 'auto' (default): Secure and `__Host-` when the request is HTTPS (ctx.secure, honours app.proxy). */
  secure?: 'auto' | 'always' | 'never';
  /** How many times update() re-reads and re-applies on a version conflict (default 10). */
  maxUpdateTries?: number;
  /** After regenerate(), how long the old id still leads to the new session (default 10 s). */
  regenerateGraceMs?: number;
  /** Called for cookies whose MAC does not verify (forged or tampered). Receives no raw id. */
  onForgedCookie?: (ctx: Context) => void;
}

/** Thrown by update() when the session kept changing under it for every try. */
export class SessionConflictError extends Error {
  override name = 'SessionConflictError';
  readonly status = 503;
  readonly expose = true;
}

/** Data must be a JSON object; the store holds it as UTF-8 JSON. */
export type SessionData = Record<string, unknown>;

interface Loaded {
  id: string;
  version: number;
  createdAtMs: number;
  data: SessionData;
}

const MOVED_PREFIX = 'moved:';

/** The per-request session handle: nothing touches the store until a method is called. */
export class Session<T extends SessionData = SessionData> {
  private loaded: Loaded | null | undefined; // undefined = not read yet; null = no session
  private issuedId: string | undefined;

  constructor(
    private readonly ctx: Context,
    private readonly cfg: ResolvedOptions,
    private cookieId: string | undefined,
  ) {}

  /** The current session id, if the request has one (never log it: see shortHash). */
  get id(): string | undefined {
    return this.loaded?.id ?? this.issuedId ?? this.cookieId;
  }

  /** True when the request carried a valid signed id (no store call). */
  get hasCookie(): boolean {
    return this.cookieId !== undefined;
  }

  /** The session data, or null when there is no live session. One store call, cached for the request. */
  async get(): Promise<T | null> {
    if (this.loaded === undefined) this.loaded = await this.read(this.cfg.rolling);
    return (this.loaded?.data as T | undefined) ?? null;
  }

  /**
   * Atomically replaces the data with fn(current): written with compare-and-set on the version;
   * on a conflict it re-reads and re-applies fn, up to maxUpdateTries times. fn receives null for
   * a new session (which gets a fresh id; a client's id is never adopted).
   */
  async update<U extends SessionData = T>(fn: (current: U | null) => U): Promise<U> {
    const id = this.loaded?.id ?? this.cookieId;
    return id ? this.cfg.locks.run(id, () => this.tryUpdate(fn)) : this.tryUpdate(fn);
  }

  private async tryUpdate<U extends SessionData>(fn: (current: U | null) => U): Promise<U> {
    for (let attempt = 0; attempt < this.cfg.maxUpdateTries; attempt += 1) {
      if (attempt > 0) await backoff(attempt);
      const current = attempt === 0 && this.loaded !== undefined ? this.loaded : await this.read(false);
      const next = fn((current?.data as U | undefined) ?? null);
      const value = Buffer.from(JSON.stringify(next));
      try {
        if (current) {
          const entry = await this.cfg.store.put(current.id, value, {
            ttlMs: this.ttlFor(current.createdAtMs),
            expectedVersion: current.version,
          });
          this.loaded = { id: current.id, version: entry.version, createdAtMs: current.createdAtMs, data: next };
        } else {
          const id = this.issuedId ?? newSessionId();
          const entry = await this.cfg.store.put(id, value, { ttlMs: this.cfg.idleTtlMs, expectedVersion: 0 });
          this.loaded = { id, version: entry.version, createdAtMs: entry.createdAtMs, data: next };
          this.setCookie(id);
        }
        return next;
      } catch (err) {
        if (!(err instanceof StoreClientError && err.kind === 'conflict')) throw err;
        this.loaded = undefined;
      }
    }
    throw new SessionConflictError('the session changed too often while it was being updated; please retry');
  }

  /** Deletes the session from the store and clears the cookie. */
  async destroy(): Promise<void> {
    const id = this.loaded?.id ?? this.cookieId;
    if (id) await this.cfg.store.delete(id);
    this.loaded = null;
    this.cookieId = undefined;
    this.issuedId = undefined;
    this.ctx.cookies.set(this.cookieName(), '', { ...this.cookieAttributes(), maxAge: 0, expires: new Date(0) });
  }

  /**
   * Moves the data to a new id (e.g. after login) and deletes the old one. The old id leads to the
   * new session for regenerateGraceMs, so parallel requests still carrying it never see an empty one.
   */
  async regenerate(): Promise<void> {
    const id = this.loaded?.id ?? this.cookieId;
    return id ? this.cfg.locks.run(id, () => this.renew()) : this.renew();
  }

  private async renew(): Promise<void> {
    const newId = newSessionId();
    let current = this.loaded ?? (await this.read(false));
    if (!current) {
      this.issuedId = newId;
      this.setCookie(newId);
      return;
    }
    let newVersion = 0;
    for (let attempt = 0; attempt < this.cfg.maxUpdateTries; attempt += 1) {
      const copied = await this.cfg.store.put(newId, Buffer.from(JSON.stringify(current.data)), {
        ttlMs: this.cfg.idleTtlMs,
        expectedVersion: newVersion,
      });
      newVersion = copied.version;
      await this.cfg.store.put(MOVED_PREFIX + current.id, Buffer.from(newId), { ttlMs: this.cfg.regenerateGraceMs });
      try {
        await this.cfg.store.delete(current.id, { expectedVersion: current.version });
        this.loaded = { id: newId, version: newVersion, createdAtMs: copied.createdAtMs, data: current.data };
        this.setCookie(newId);
        return;
      } catch (err) {
        if (!(err instanceof StoreClientError && err.kind === 'conflict')) throw err;
        // A parallel request wrote to the old id after we copied it: copy again.
        const reread = await this.readId(current.id, false);
        if (!reread) break;
        current = reread;
      }
    }
    throw new SessionConflictError('the session changed too often while it was being renewed; please retry');
  }

  /** A token for forms, bound to this session (issues an id, without a store write, if there is none). */
  csrfToken(): string {
    return this.cfg.signer.token('csrf', this.ensureId());
  }

  /** Constant-time check of a form token against the id the request carried. */
  verifyCsrf(token: unknown): boolean {
    const id = this.cookieId;
    return id !== undefined && this.cfg.signer.verifyToken('csrf', id, token);
  }

  private ensureId(): string {
    const existing = this.id;
    if (existing) return existing;
    this.issuedId = newSessionId();
    this.setCookie(this.issuedId);
    return this.issuedId;
  }

  private async read(refresh: boolean): Promise<Loaded | null> {
    const id = this.loaded?.id ?? this.cookieId;
    if (!id) return null;
    const found = await this.readId(id, refresh);
    if (found) return found;
    // The id may have been renewed by a parallel request: follow it within the grace window.
    const moved = await this.cfg.store.get(MOVED_PREFIX + id);
    const newId = moved?.value.toString('utf8');
    if (!newId || !/^[A-Za-z0-9_-]{24}$/.test(newId)) return null;
    const renewed = await this.readId(newId, refresh);
    if (renewed) this.setCookie(newId);
    return renewed;
  }

  private async readId(id: string, refresh: boolean): Promise<Loaded | null> {
    const entry = await this.cfg.store.get(id, { refreshTtlMs: refresh ? this.cfg.idleTtlMs : 0 });
    if (!entry) return null;
    if (entry.createdAtMs + this.cfg.absoluteTtlMs <= Date.now()) {
      await this.cfg.store.delete(id, { expectedVersion: entry.version }).catch(ignoreConflict);
      return null;
    }
    const data = parseData(entry);
    return data ? { id, version: entry.version, createdAtMs: entry.createdAtMs, data } : null;
  }

  /** Idle TTL, but never past the absolute lifetime. */
  private ttlFor(createdAtMs: number): number {
    const left = createdAtMs + this.cfg.absoluteTtlMs - Date.now();
    return Math.max(1, Math.min(this.cfg.idleTtlMs, left));
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

  private setCookie(id: string): void {
    if (this.secure()) this.ctx.cookies.secure = true;
    this.ctx.cookies.set(this.cookieName(), this.cfg.signer.sign(id), this.cookieAttributes());
  }
}

/** Jittered exponential backoff between compare-and-set retries (other processes writing the same session). */
function backoff(attempt: number): Promise<void> {
  const ms = Math.random() * Math.min(100, 2 ** attempt);
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Runs updates of one session id one after another within this process, so parallel requests of
 * one browser do not fight over compare-and-set; CAS still guards against other processes.
 */
export class KeyedLock {
  private readonly tails = new Map<string, Promise<unknown>>();

  run<R>(key: string, fn: () => Promise<R>): Promise<R> {
    const previous = this.tails.get(key) ?? Promise.resolve();
    const result = previous.then(fn, fn);
    const tail = result.then(
      () => undefined,
      () => undefined,
    );
    this.tails.set(key, tail);
    void tail.then(() => {
      if (this.tails.get(key) === tail) this.tails.delete(key);
    });
    return result;
  }
}

function ignoreConflict(err: unknown): void {
  if (!(err instanceof StoreClientError && err.kind === 'conflict')) throw err;
}

function parseData(entry: Entry): SessionData | null {
  try {
    const data: unknown = JSON.parse(entry.value.toString('utf8'));
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
  secure: 'auto' | 'always' | 'never';
  maxUpdateTries: number;
  regenerateGraceMs: number;
  onForgedCookie: (ctx: Context) => void;
  locks: KeyedLock;
}

function resolveOptions(options: SessionOptions): ResolvedOptions {
  const positive = (name: string, value: number) => {
    if (!Number.isSafeInteger(value) || value <= 0) throw new TypeError(`session option ${name} must be a positive integer (got ${value})`);
    return value;
  };
  if (!options || typeof options.store?.get !== 'function') throw new TypeError('session option store is required (get/put/delete)');
  const cookieName = options.cookieName ?? 'sid';
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(cookieName)) throw new TypeError('session option cookieName must be 1-64 of A-Z a-z 0-9 _ -');
  const secure = options.secure ?? 'auto';
  if (!['auto', 'always', 'never'].includes(secure)) throw new TypeError("session option secure must be 'auto', 'always' or 'never'");
  const resolved: ResolvedOptions = {
    store: options.store,
    signer: new IdSigner(options.keys ?? []),
    cookieName,
    idleTtlMs: positive('idleTtlMs', options.idleTtlMs ?? 30 * 60_000),
    absoluteTtlMs: positive('absoluteTtlMs', options.absoluteTtlMs ?? 24 * 3_600_000),
    rolling: options.rolling ?? true,
    secure,
    maxUpdateTries: positive('maxUpdateTries', options.maxUpdateTries ?? 10),
    regenerateGraceMs: positive('regenerateGraceMs', options.regenerateGraceMs ?? 10_000),
    onForgedCookie: options.onForgedCookie ?? (() => undefined),
    locks: new KeyedLock(),
  };
  if (resolved.absoluteTtlMs < resolved.idleTtlMs) throw new TypeError('session option absoluteTtlMs must be at least idleTtlMs');
  return resolved;
}

declare module 'koa' {
  interface DefaultContext {
    session: Session;
  }
}

/**
 * Server-side sessions for Koa: the browser holds only a signed random id; data lives in the
 * store. Lazy (no store call unless the handler asks), compare-and-set writes, rotatable keys.
 */
export function sessionMiddleware(options: SessionOptions): Middleware {
  const cfg = resolveOptions(options);
  return async (ctx, next) => {
    const secure = cfg.secure === 'always' || (cfg.secure === 'auto' && ctx.secure);
    const raw = ctx.cookies.get(secure ? `__Host-${cfg.cookieName}` : cfg.cookieName);
    const id = cfg.signer.verify(raw);
    if (raw !== undefined && raw !== '' && id === undefined) cfg.onForgedCookie(ctx);
    ctx.session = new Session(ctx, cfg, id);
    await next();
  };
}
