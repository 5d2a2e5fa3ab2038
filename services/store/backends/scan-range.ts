/**
 * Narrowing the SCAN passes of a Redis listing to the keys a pass is after. Every pass of a
 * listing walks the whole keyspace on the server (SCAN has no order), but with a MATCH pattern
 * that only the pass's range of keys fits, Redis filters the keys itself and sends the store a
 * few of them instead of all. Redis still walks (7.0: copies) every key, about a microsecond
 * each here; what goes is sending each key and the store rendering, comparing and dropping it.
 * Keys are latin1 renderings of their bytes (string order is byte order), as in KeyWindow.
 */

/** Sample size of a listing's first pass: enough to place a pass's end within a few per cent. */
const SAMPLE_SIZE = 4096;
/** The share of a window a narrowed pass aims to fill: estimates err, and a full window ends the pass early. */
const TARGET_FILL = 0.75;

/** Bytes a glob gives a meaning to outside a class: escaped there. */
const GLOB_SPECIAL = new Set([0x2a, 0x3f, 0x5b, 0x5c, 0x5d]); // * ? [ \ ]
/** Bytes a class gives a meaning to (range, end, escape, negation when first): escaped there. */
const CLASS_SPECIAL = new Set([0x2d, 0x5c, 0x5d, 0x5e]); // - \ ] ^

function literal(bytes: Buffer): number[] {
  const out: number[] = [];
  for (const byte of bytes) {
    if (GLOB_SPECIAL.has(byte)) out.push(0x5c);
    out.push(byte);
  }
  return out;
}

/**
 * A glob class of the bytes from low to high. Redis compares class bytes as C chars, signed on
 * most machines, so no range spans 0x7f and 0x80; special bytes are escaped one by one.
 */
function byteClass(low: number, high: number): number[] {
  const out = [0x5b];
  let start = -1;
  const close = (end: number) => {
    if (start >= 0) out.push(start, 0x2d, end);
    start = -1;
  };
  for (let byte = low; byte <= high; byte += 1) {
    if (CLASS_SPECIAL.has(byte)) {
      close(byte - 1);
      out.push(0x5c, byte);
      continue;
    }
    if (byte === 0x80) close(0x7f);
    if (start < 0) start = byte;
  }
  close(high);
  out.push(0x5d);
  return out;
}

/**
 * A MATCH pattern that fits every key under `prefix` greater than `floor` and, with a ceiling,
 * less than it (and some keys around them: the caller still compares). Keys strictly between
 * floor and ceiling share their first bytes; the first byte where they differ is matched by a
 * class from floor's byte to ceiling's.
 */
export function rangePattern(prefix: Buffer, floor: Buffer, ceiling?: Buffer): Buffer {
  const under = (bytes: Buffer) => bytes.length >= prefix.length && bytes.subarray(0, prefix.length).equals(prefix);
  const star = [0x2a];
  if (!under(floor) || (ceiling && !under(ceiling))) return Buffer.from([...literal(prefix), ...star]);
  let i = prefix.length;
  if (ceiling) while (i < floor.length && i < ceiling.length && floor[i] === ceiling[i]) i += 1;
  const low = i < floor.length ? floor[i] : 0;
  const high = ceiling && i < ceiling.length ? ceiling[i] : 0xff;
  const head = literal(floor.subarray(0, i));
  if (low === 0 && high === 0xff) return Buffer.from([...head, ...star]);
  return Buffer.from([...head, ...byteClass(low, high), ...star]);
}

/**
 * A uniform sample of a listing's keys, taken in its first pass (reservoir sampling), from which
 * the later passes pick their ceilings: each pass then matches about TARGET_FILL of a window's
 * keys, wherever the keys bunch up.
 */
export class KeySample {
  private readonly items: string[] = [];
  private seen = 0;
  private sorted = false;

  offer(key: string): void {
    this.seen += 1;
    if (this.items.length < SAMPLE_SIZE) {
      this.items.push(key);
      return;
    }
    const slot = Math.floor(Math.random() * this.seen);
    if (slot < SAMPLE_SIZE) this.items[slot] = key;
  }

  /**
   * The end (exclusive) of the next pass after `lowest` that holds about TARGET_FILL × capacity
   * keys by the sample, or undefined: to the end of the keyspace.
   */
  ceilingAfter(lowest: string, capacity: number): string | undefined {
    const items = this.items;
    if (!this.sorted) {
      items.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
      this.sorted = true;
    }
    if (items.length === 0) return undefined;
    const perItem = this.seen / items.length;
    const step = Math.max(1, Math.floor((TARGET_FILL * capacity) / perItem));
    let lo = 0;
    let hi = items.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (items[mid] > lowest) hi = mid;
      else lo = mid + 1;
    }
    return items[lo + step];
  }
}
