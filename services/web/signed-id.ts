import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';

const ID_BYTES = 18; // 144 bits from the CSPRNG, 24 URL-safe characters
const MAC_BYTES = 16;
const ID_PATTERN = /^[A-Za-z0-9_-]{24}$/;
const MAC_PATTERN = /^[A-Za-z0-9_-]{22}$/;

/** A new random session id: 144 bits from the CSPRNG, base64url. */
export function newSessionId(): string {
  return randomBytes(ID_BYTES).toString('base64url');
}

/**
 * Signs and verifies session ids with HMAC-SHA256 under rotatable keys: the first key signs, every
 * key verifies. One HMAC per check with one key; comparison is constant-time.
 */
export class IdSigner {
  private readonly keys: Buffer[];

  constructor(keys: readonly string[]) {
    if (keys.length === 0) throw new Error('session keys: at least one key is required');
    for (const key of keys) {
      if (key.length < 32) throw new Error('session keys: every key must be at least 32 characters');
    }
    this.keys = keys.map((k) => Buffer.from(k, 'utf8'));
  }

  /** `<id>.<mac>`: the cookie value. */
  sign(id: string): string {
    return `${id}.${this.mac(this.keys[0], 'id', id).toString('base64url')}`;
  }

  /** The id inside a cookie value when its MAC verifies under any key; undefined otherwise. */
  verify(cookie: string | undefined): string | undefined {
    if (!cookie || cookie.length !== 47 || cookie[24] !== '.') return undefined;
    const id = cookie.slice(0, 24);
    const mac = cookie.slice(25);
    if (!ID_PATTERN.test(id) || !MAC_PATTERN.test(mac)) return undefined;
    const presented = Buffer.from(mac, 'base64url');
    for (const key of this.keys) {
      if (timingSafeEqual(presented, this.mac(key, 'id', id))) return id;
    }
    return undefined;
  }

  /** A token bound to one session id, for forms (CSRF). */
  token(purpose: string, id: string): string {
    return this.mac(this.keys[0], purpose, id).toString('base64url');
  }

  /** Constant-time check of a token made by token() under any key. */
  verifyToken(purpose: string, id: string, token: unknown): boolean {
    if (typeof token !== 'string' || !MAC_PATTERN.test(token)) return false;
    const presented = Buffer.from(token, 'base64url');
    let ok = false;
    for (const key of this.keys) ok = timingSafeEqual(presented, this.mac(key, purpose, id)) || ok;
    return ok;
  }

  private mac(key: Buffer, purpose: string, id: string): Buffer {
    return createHmac('sha256', key).update(purpose).update('\0').update(id).digest().subarray(0, MAC_BYTES);
  }
}
