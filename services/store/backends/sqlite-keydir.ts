/**
 * The SQLite backend's in-memory index: for every key with a row in the log, where its latest row
 * is (seq) and what a write needs to know without reading it (version, expiry, creation time).
 * Fields live in typed arrays indexed by a slot number, so a million keys cost about 110 bytes each
 * (the key string and one Map entry, ~80 bytes measured, and four doubles) and give the garbage collector nothing to trace.
 * A JavaScript Map holds at most 2^24 (16.7 million) entries: past that, use the Redis backend.
 */
/** Most keys an index may be asked to hold (below the Map's 2^24). */
export const MAX_KEYDIR_KEYS = 16_000_000;
/** Keys the SQLite store holds unless told otherwise: about 1.1 GB of index. */
export const DEFAULT_MAX_KEYS = 10_000_000;
/** Slots of an empty index. */
const MIN_CAPACITY = 1024;

export interface KeyState {
  seq: number;
  version: number;
  expiresAtMs: number;
  createdAtMs: number;
}

export class KeyDir {
  private readonly slots = new Map<string, number>();
  private keys: Array<string | undefined> = [];
  private freeSlots: number[] = [];
  private used = 0;
  seq: Float64Array<ArrayBuffer> = new Float64Array(MIN_CAPACITY);
  version: Float64Array<ArrayBuffer> = new Float64Array(MIN_CAPACITY);
  expires: Float64Array<ArrayBuffer> = new Float64Array(MIN_CAPACITY);
  created: Float64Array<ArrayBuffer> = new Float64Array(MIN_CAPACITY);

  /** Keys in the index (live or expired but not swept yet). */
  get size(): number {
    return this.slots.size;
  }

  slot(key: string): number | undefined {
    return this.slots.get(key);
  }

  state(key: string): KeyState | undefined {
    const s = this.slots.get(key);
    return s === undefined ? undefined : this.stateAt(s);
  }

  stateAt(slot: number): KeyState {
    return { seq: this.seq[slot], version: this.version[slot], expiresAtMs: this.expires[slot], createdAtMs: this.created[slot] };
  }

  /** Sets a key's state (in its slot if it has one, else in a new one) and returns the slot. */
  set(key: string, seq: number, version: number, expiresAtMs: number, createdAtMs: number, slot = this.slots.get(key)): number {
    let s = slot;
    if (s === undefined) {
      s = this.takeFreeSlot() ?? this.grow();
      this.slots.set(key, s);
      this.keys[s] = key;
    }
    this.seq[s] = seq;
    this.version[s] = version;
    this.expires[s] = expiresAtMs;
    this.created[s] = createdAtMs;
    return s;
  }

  remove(key: string): void {
    const s = this.slots.get(key);
    if (s === undefined) return;
    this.slots.delete(key);
    this.keys[s] = undefined;
    this.expires[s] = 0; // a free slot is never live (countLive, expired)
    this.freeSlots.push(s);
  }

  /** Puts a key back as it was (undefined: absent), to undo the changes of a failed transaction. */
  restore(key: string, state: KeyState | undefined): void {
    if (state) this.set(key, state.seq, state.version, state.expiresAtMs, state.createdAtMs);
    else this.remove(key);
  }

  /** Live keys: those whose expiry is after nowMs. */
  countLive(nowMs: number): number {
    let n = 0;
    const expires = this.expires;
    for (let s = 0; s < this.used; s += 1) if (expires[s] > nowMs) n += 1;
    return n;
  }

  /**
   * Up to `max` keys expired at nowMs, looking at slots from `from` on, at most `scan` of them;
   * `next` is where to go on (0 once the end was reached).
   */
  expired(nowMs: number, from: number, scan: number, max: number): { keys: string[]; next: number } {
    const keys: string[] = [];
    const end = Math.min(this.used, from + scan);
    let s = from;
    for (; s < end && keys.length < max; s += 1) {
      if (this.expires[s] > nowMs) continue;
      const key = this.keys[s];
      if (key !== undefined) keys.push(key);
    }
    return { keys, next: s >= this.used ? 0 : s };
  }

  /** Slots the arrays have room for (they grow by doubling, and shrink only through pack()). */
  get capacity(): number {
    return this.seq.length;
  }

  /**
   * Gives memory back, a step at a time, once at most a quarter of the slots hold a key (after
   * many keys expired or were deleted at once): else the arrays, and the scans of countLive and
   * expired, keep the size of the most keys ever held. Each step moves up to `moves` keys from the
   * top slots into free ones below (a Map update each: renumbering half a million keys at once
   * held the event loop for 0.3-0.5 s), and once no key is left above, the arrays are cut down.
   * Slots change, so no caller may hold a slot number across a step. True while work is left.
   */
  pack(moves: number): boolean {
    const target = this.packTarget();
    if (target >= this.seq.length) return false;
    let work = 0;
    while (this.used > target && work < moves) {
      const from = this.used - 1;
      const key = this.keys[from];
      if (key !== undefined) {
        // A free slot below the target: there are at least target - size of them (target >= 2 size).
        // Free slots above it go with the cut.
        let to = this.freeSlots.pop();
        while (to !== undefined && to >= target) {
          to = this.freeSlots.pop();
          work += 1;
        }
        if (to === undefined) return false; // cannot happen (see above); the arrays just stay as they are
        this.seq[to] = this.seq[from];
        this.version[to] = this.version[from];
        this.expires[to] = this.expires[from];
        this.created[to] = this.created[from];
        this.keys[to] = key;
        this.slots.set(key, to);
      }
      this.keys[from] = undefined;
      this.expires[from] = 0;
      this.used -= 1;
      work += 1;
    }
    if (this.used > target) return true;
    this.seq = this.seq.slice(0, target);
    this.version = this.version.slice(0, target);
    this.expires = this.expires.slice(0, target);
    this.created = this.created.slice(0, target);
    this.keys.length = this.used;
    this.freeSlots = this.freeSlots.filter((slot) => slot < this.used);
    return false;
  }

  /** The capacity the arrays are cut to: room for twice the keys held, and at least MIN_CAPACITY. */
  private packTarget(): number {
    if (this.seq.length <= MIN_CAPACITY || this.slots.size * 4 > this.seq.length) return this.seq.length;
    let size = MIN_CAPACITY;
    while (size < this.slots.size * 2) size *= 2;
    return size;
  }

  clear(): void {
    this.slots.clear();
    this.keys = [];
    this.freeSlots = [];
    this.used = 0;
  }

  /** A free slot below `used` (pack leaves the free slots it cut off in the list). */
  private takeFreeSlot(): number | undefined {
    let s = this.freeSlots.pop();
    while (s !== undefined && s >= this.used) s = this.freeSlots.pop();
    return s;
  }

  private grow(): number {
    if (this.used === this.seq.length) {
      const size = this.seq.length * 2;
      this.seq = enlarge(this.seq, size);
      this.version = enlarge(this.version, size);
      this.expires = enlarge(this.expires, size);
      this.created = enlarge(this.created, size);
    }
    return this.used++;
  }
}

function enlarge(from: Float64Array<ArrayBuffer>, size: number): Float64Array<ArrayBuffer> {
  const to = new Float64Array(size);
  to.set(from);
  return to;
}
