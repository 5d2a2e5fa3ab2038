/**
 * The SQLite backend's in-memory index: for every key with a row in the log, where its latest row
 * is (seq) and what a write needs to know without reading it (version, expiry, creation time).
 * A key's four numbers sit side by side in a Float64Array chunk of SLOTS_PER_CHUNK slots (one
 * cache line per lookup, nothing for the garbage collector to trace), and the key-to-slot maps are
 * split into SHARDS Maps by a hash of the key: so a million keys cost about 110 bytes each (the key
 * string and one Map entry, ~80 bytes measured, and four doubles), and growing never copies more
 * than one small Map or allocates more than one chunk. One Map and four arrays of all the slots
 * stalled every call when they doubled past a million keys (a Map's rehash alone: 165 ms at
 * 1,048,576 keys, 282 ms at 2,097,152, more on a busy machine).
 * The Maps are keyed by that 32-bit hash, not by the key: a Map of strings compares the key with
 * every key in its hash chain, each a string somewhere else in the heap, and those cache misses
 * were a fifth of the rebuild at start-up (a million new keys: 1.0 s of CPU, by hash 0.6 s). The
 * key in the slot found confirms it; the few keys whose hash another key holds already (about 120
 * in a million random ones) go in a Map by the key itself.
 */
/** Most keys an index may be asked to hold. */
export const MAX_KEYDIR_KEYS = 16_000_000;
/** Keys the SQLite store holds unless told otherwise: about 1.1 GB of index. */
export const DEFAULT_MAX_KEYS = 10_000_000;

const CHUNK_BITS = 10;
/** Slots per chunk (32 KiB of numbers): the index grows and shrinks by whole chunks. */
const SLOTS_PER_CHUNK = 1 << CHUNK_BITS;
const CHUNK_MASK = SLOTS_PER_CHUNK - 1;
/** Numbers per slot: seq, version, expiry, creation time. */
const FIELDS = 4;
const SEQ = 0;
const VERSION = 1;
const EXPIRES = 2;
const CREATED = 3;
/** Key-to-slot Maps: at 10 million keys each holds about 40,000, so its rehash is short. */
const SHARDS = 256;

export interface KeyState {
  seq: number;
  version: number;
  expiresAtMs: number;
  createdAtMs: number;
}

export class KeyDir {
  /** Key hash (keyHash) to slot, split by the hash's low bits. */
  private readonly shards = Array.from({ length: SHARDS }, () => new Map<number, number>());
  /** By hash, key to slot of the keys whose hash the shards hold for another key (only while they do). */
  private readonly collided = new Map<number, Map<string, number>>();
  private count = 0;
  /** Numbers of slot s: numbers[s >> CHUNK_BITS][(s & CHUNK_MASK) * FIELDS + field]. */
  private numbers: Float64Array[] = [];
  /** The key in slot s: keys[s >> CHUNK_BITS][s & CHUNK_MASK]. */
  private keys: Array<Array<string | undefined>> = [];
  private freeSlots: number[] = [];
  /**
   * Free slots pack() took off the list because its cut drops them. Keys added between two steps
   * may call the cut off or move it up: these then go back on the list before the index grows.
   */
  private cutSlots: number[] = [];
  private used = 0;

  constructor() {
    this.addChunk();
  }

  /** Keys in the index (live or expired but not swept yet). */
  get size(): number {
    return this.count;
  }

  slot(key: string): number | undefined {
    const hash = keyHash(key);
    const s = this.shards[hash & (SHARDS - 1)].get(hash);
    return s === undefined || this.keyAt(s) === key ? s : this.collided.get(hash)?.get(key);
  }

  seqOf(slot: number): number {
    return this.numbers[slot >> CHUNK_BITS][(slot & CHUNK_MASK) * FIELDS + SEQ];
  }

  versionOf(slot: number): number {
    return this.numbers[slot >> CHUNK_BITS][(slot & CHUNK_MASK) * FIELDS + VERSION];
  }

  expiresOf(slot: number): number {
    return this.numbers[slot >> CHUNK_BITS][(slot & CHUNK_MASK) * FIELDS + EXPIRES];
  }

  createdOf(slot: number): number {
    return this.numbers[slot >> CHUNK_BITS][(slot & CHUNK_MASK) * FIELDS + CREATED];
  }

  state(key: string): KeyState | undefined {
    const s = this.slot(key);
    return s === undefined ? undefined : this.stateAt(s);
  }

  stateAt(slot: number): KeyState {
    const chunk = this.numbers[slot >> CHUNK_BITS];
    const at = (slot & CHUNK_MASK) * FIELDS;
    return { seq: chunk[at + SEQ], version: chunk[at + VERSION], expiresAtMs: chunk[at + EXPIRES], createdAtMs: chunk[at + CREATED] };
  }

  /**
   * Sets a key's state (in its slot if it has one, else in a new one) and returns the slot; `slot`
   * saves the lookup when the caller has just made it.
   */
  set(key: string, seq: number, version: number, expiresAtMs: number, createdAtMs: number, slot?: number): number {
    let s = slot;
    if (s === undefined) {
      // slot(key) inlined: its hash and shard also serve the insert (this is the rebuild's loop).
      const hash = keyHash(key);
      const shard = this.shards[hash & (SHARDS - 1)];
      const held = shard.get(hash);
      if (held === undefined) {
        s = this.add(key);
        shard.set(hash, s);
      } else if (this.keyAt(held) === key) s = held;
      else {
        let others = this.collided.get(hash);
        s = others?.get(key);
        if (s === undefined) {
          s = this.add(key);
          if (!others) this.collided.set(hash, (others = new Map()));
          others.set(key, s);
        }
      }
    }
    const chunk = this.numbers[s >> CHUNK_BITS];
    const at = (s & CHUNK_MASK) * FIELDS;
    chunk[at + SEQ] = seq;
    chunk[at + VERSION] = version;
    chunk[at + EXPIRES] = expiresAtMs;
    chunk[at + CREATED] = createdAtMs;
    return s;
  }

  remove(key: string): void {
    const hash = keyHash(key);
    const shard = this.shards[hash & (SHARDS - 1)];
    let s = shard.get(hash);
    if (s === undefined) return;
    const others = this.collided.get(hash);
    if (this.keyAt(s) === key) {
      if (others) {
        // Another key of this hash takes the shard's entry.
        const [other, slot] = others.entries().next().value as [string, number];
        shard.set(hash, slot);
        others.delete(other);
      } else shard.delete(hash);
    } else {
      s = others?.get(key);
      if (s === undefined) return;
      others!.delete(key);
    }
    if (others?.size === 0) this.collided.delete(hash);
    this.count -= 1;
    this.keys[s >> CHUNK_BITS][s & CHUNK_MASK] = undefined;
    this.numbers[s >> CHUNK_BITS][(s & CHUNK_MASK) * FIELDS + EXPIRES] = 0; // a free slot is never live (countLive, expired)
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
    for (let c = 0; c * SLOTS_PER_CHUNK < this.used; c += 1) {
      const chunk = this.numbers[c];
      const end = Math.min(SLOTS_PER_CHUNK, this.used - c * SLOTS_PER_CHUNK) * FIELDS;
      for (let at = EXPIRES; at < end; at += FIELDS) if (chunk[at] > nowMs) n += 1;
    }
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
      if (this.expiresOf(s) > nowMs) continue;
      const key = this.keys[s >> CHUNK_BITS][s & CHUNK_MASK];
      if (key !== undefined) keys.push(key);
    }
    return { keys, next: s >= this.used ? 0 : s };
  }

  /** Slots there is room for (they grow a chunk at a time, and shrink only through pack()). */
  get capacity(): number {
    return this.numbers.length * SLOTS_PER_CHUNK;
  }

  /**
   * Gives memory back, a step at a time, once at most a quarter of the slots hold a key (after
   * many keys expired or were deleted at once): else the chunks, and the scans of countLive and
   * expired, keep the size of the most keys ever held. Each step moves up to `moves` keys from the
   * top slots into free ones below (a Map update each: renumbering half a million keys at once
   * held the event loop for 0.3-0.5 s), and once no key is left above, the chunks above are
   * dropped. Slots change, so no caller may hold a slot number across a step. True while work is left.
   */
  pack(moves: number): boolean {
    const target = this.packTarget();
    if (target >= this.capacity) return false;
    let work = 0;
    while (this.used > target && work < moves) {
      const from = this.used - 1;
      const key = this.keys[from >> CHUNK_BITS][from & CHUNK_MASK];
      if (key !== undefined) {
        // A free slot below the target: there are at least target - size of them (target >= 2 size).
        // Free slots above it go with the cut.
        let to = this.freeSlots.pop();
        while (to !== undefined && to >= target) {
          this.cutSlots.push(to);
          to = this.freeSlots.pop();
          work += 1;
        }
        if (to === undefined) return false; // cannot happen (see above); the chunks just stay as they are
        this.numbers[to >> CHUNK_BITS].set(this.numbers[from >> CHUNK_BITS].subarray((from & CHUNK_MASK) * FIELDS, ((from & CHUNK_MASK) + 1) * FIELDS), (to & CHUNK_MASK) * FIELDS);
        this.keys[to >> CHUNK_BITS][to & CHUNK_MASK] = key;
        const hash = keyHash(key);
        const shard = this.shards[hash & (SHARDS - 1)];
        if (shard.get(hash) === from) shard.set(hash, to);
        else this.collided.get(hash)!.set(key, to);
      }
      this.keys[from >> CHUNK_BITS][from & CHUNK_MASK] = undefined;
      this.numbers[from >> CHUNK_BITS][(from & CHUNK_MASK) * FIELDS + EXPIRES] = 0;
      this.used -= 1;
      work += 1;
    }
    if (this.used > target) return true;
    this.numbers.length = target / SLOTS_PER_CHUNK;
    this.keys.length = target / SLOTS_PER_CHUNK;
    this.freeSlots = this.freeSlots.filter((slot) => slot < this.used);
    this.returnCutSlots();
    return false;
  }

  /** The capacity the chunks are cut to: room for twice the keys held, and at least one chunk. */
  private packTarget(): number {
    if (this.numbers.length <= 1 || this.count * 4 > this.capacity) return this.capacity;
    return Math.max(1, Math.ceil((this.count * 2) / SLOTS_PER_CHUNK)) * SLOTS_PER_CHUNK;
  }

  clear(): void {
    for (const shard of this.shards) shard.clear();
    this.collided.clear();
    this.count = 0;
    this.numbers = [];
    this.keys = [];
    this.freeSlots = [];
    this.cutSlots = [];
    this.used = 0;
    this.addChunk();
  }

  private keyAt(slot: number): string | undefined {
    return this.keys[slot >> CHUNK_BITS][slot & CHUNK_MASK];
  }

  /** Puts a new key in a free slot (its numbers are the caller's to set) and returns the slot. */
  private add(key: string): number {
    const s = this.takeFreeSlot() ?? this.grow();
    this.keys[s >> CHUNK_BITS][s & CHUNK_MASK] = key;
    this.count += 1;
    return s;
  }

  /** A free slot below `used` (pack leaves the free slots it cut off in the list). */
  private takeFreeSlot(): number | undefined {
    let s = this.freeSlots.pop();
    while (s !== undefined && s >= this.used) s = this.freeSlots.pop();
    return s;
  }

  private grow(): number {
    if (this.cutSlots.length > 0) {
      this.returnCutSlots();
      const s = this.takeFreeSlot();
      if (s !== undefined) return s;
    }
    if (this.used === this.capacity) this.addChunk();
    return this.used++;
  }

  /** Puts the free slots set aside for a cut that was not made back on the list (those below `used`). */
  private returnCutSlots(): void {
    for (const slot of this.cutSlots) if (slot < this.used) this.freeSlots.push(slot);
    this.cutSlots = [];
  }

  private addChunk(): void {
    this.numbers.push(new Float64Array(SLOTS_PER_CHUNK * FIELDS));
    this.keys.push(new Array<string | undefined>(SLOTS_PER_CHUNK).fill(undefined));
  }
}

/**
 * A key's hash in the index: FNV-1a over its UTF-16 code units, a signed 32-bit integer (a small
 * integer to V8, held in the Map's own table). Its low bits pick the shard.
 */
export function keyHash(key: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < key.length; i += 1) h = Math.imul(h ^ key.charCodeAt(i), 0x01000193);
  return h ^ (h >>> 16);
}
