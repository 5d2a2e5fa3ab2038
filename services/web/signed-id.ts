import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';

const ID_BYTES = 18; // 144 bits from the CSPRNG, 24 URL-safe characters
const MAC_BYTES = 16;
/** Characters of a session id (the key of its entry in the store). */
export const ID_LENGTH = 24;
const MAC_LENGTH = 22; // 16 bytes in base64url
const ID_PATTERN = /^[A-Za-z0-9_-]{24}$/;
const MAC_PATTERN = /^[A-Za-z0-9_-]{22}$/;

/** A new random session id: 144 bits from the CSPRNG, base64url. */
export function newSessionId(): string {
  return randomBytes(ID_BYTES).toString('base64url');
}

/** True for strings shaped like an id from newSessionId() (no MAC check). */
export function isSessionIdShape(value: string): boolean {
  return ID_PATTERN.test(value);
}

/**
 * Constant-time equality of two base64url strings of the same length. Strings, not decoded bytes:
 * a decoder ignores the spare low bits of the last digit, which would let a changed MAC pass.
 */
function sameText(a: string, b: string): boolean {
  return a.length === b.length && timingSafeEqual(Buffer.from(a, 'latin1'), Buffer.from(b, 'latin1'));
}

/**
 * A copy of a string cut from a longer one. V8 represents a slice or a regex capture of 13 or more
 * characters as a view of its parent, so an id cut from a request's Cookie header would keep the
 * whole header (up to 16 KB) in memory for as long as the id is remembered.
 */
function detached(text: string): string {
  return Buffer.from(text, 'latin1').toString('latin1');
}

/**
 * What one HMAC of an id under the signing key gives: the cookie MAC (first half) and the form
 * token (second half). The halves of an HMAC-SHA256 output are independent, so a token seen in a
 * page says nothing about the cookie's MAC, and one HMAC per request serves both.
 */
export interface IdProof {
  readonly id: string;
  /** `<id>.<mac>`: the cookie value. */
  readonly cookie: string;
  /** The CSRF token bound to this id, for forms. */
  readonly csrf: string;
}

/** Proofs kept by default: enough for every browser active in the last minutes of a busy process. */
const RECENT_PROOFS = 10_000;

/**
 * Signs and verifies session ids with HMAC-SHA256 under rotatable keys: the first key signs, every
 * key verifies. Comparisons are constant-time.
 *
 * The proofs of the last `recentProofs` ids signed or verified under the signing key are kept, so a
 * returning browser's cookie is checked with one constant-time compare instead of an HMAC (which
 * was a tenth of the web's CPU per page). Only cookies that verified are kept; a forged one always
 * pays the HMAC and never enters.
 */
export class IdSigner {
  private readonly keys: Buffer[];
  private readonly recent = new Map<string, IdProof>();

  /** Throws a TypeError saying what to fix when keys are missing or short. */
  constructor(
    keys: readonly string[],
    private readonly recentProofs = RECENT_PROOFS,
  ) {
    if (typeof keys === 'string') {
      throw new TypeError('session option keys must be an array of keys (newest first), e.g. [key] or SESSION_KEYS split at commas, not one string');
    }
    if (!Array.isArray(keys) || keys.length === 0) {
      throw new TypeError('session option keys: give at least one secret key (newest first), e.g. from SESSION_KEYS');
    }
    keys.forEach((key, i) => {
      if (typeof key !== 'string' || key.length < 32) {
        throw new TypeError(`session option keys[${i}]: every key must be a string of at least 32 characters`);
      }
    });
    this.keys = keys.map((k) => Buffer.from(k, 'utf8'));
  }

  /** Cookie value and form token for an id, under the signing (first) key. */
  prove(id: string): IdProof {
    const known = this.recent.get(id);
    if (known) return known;
    const digest = this.digest(this.keys[0], id);
    return this.keep({
      id,
      cookie: `${id}.${digest.subarray(0, MAC_BYTES).toString('base64url')}`,
      csrf: digest.subarray(MAC_BYTES).toString('base64url'),
    });
  }

  /**
   * The id inside a cookie value when its MAC verifies under any key, else undefined (a copy that
   * keeps no reference to the cookie string). Under the
   * signing key (the usual case) the proof comes with it, so the form token needs no second HMAC.
   */
  verify(cookie: string | undefined): { id: string; proof?: IdProof } | undefined {
    if (!cookie || cookie.length !== ID_LENGTH + 1 + MAC_LENGTH || cookie[ID_LENGTH] !== '.') return undefined;
    const id = cookie.slice(0, ID_LENGTH);
    const mac = cookie.slice(ID_LENGTH + 1);
    if (!ID_PATTERN.test(id) || !MAC_PATTERN.test(mac)) return undefined;
    // A kept proof settles the usual case; a different MAC may still verify under an older key.
    const known = this.recent.get(id);
    if (known && sameText(cookie, known.cookie)) return { id: known.id, proof: known };
    for (let i = 0; i < this.keys.length; i += 1) {
      const digest = this.digest(this.keys[i], id);
      if (sameText(mac, digest.subarray(0, MAC_BYTES).toString('base64url'))) {
        // The id outlives the request (kept proofs, the lock queue's memory), the Cookie header must not.
        const ownId = detached(id);
        if (i > 0) return { id: ownId };
        return { id: ownId, proof: this.keep({ id: ownId, cookie: detached(cookie), csrf: digest.subarray(MAC_BYTES).toString('base64url') }) };
      }
    }
    return undefined;
  }

  /** Constant-time check of a form token for an id, under any key (tokens survive a key rotation). */
  verifyCsrf(id: string, token: unknown, known?: IdProof): boolean {
    if (typeof token !== 'string' || !MAC_PATTERN.test(token)) return false;
    if (known?.id === id && sameText(token, known.csrf)) return true;
    let ok = false;
    for (const key of this.keys) {
      ok = sameText(token, this.digest(key, id).subarray(MAC_BYTES).toString('base64url')) || ok;
    }
    return ok;
  }

  /** Keeps a signing-key proof; past the bound, the oldest kept goes (it costs one HMAC when it returns). */
  private keep(proof: IdProof): IdProof {
    if (this.recentProofs === 0) return proof;
    this.recent.set(proof.id, proof);
    if (this.recent.size > this.recentProofs) this.recent.delete(this.recent.keys().next().value!);
    return proof;
  }

  private digest(key: Buffer, id: string): Buffer {
    return createHmac('sha256', key).update('session-id\0').update(id).digest();
  }
}
