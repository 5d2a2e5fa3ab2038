import type { Entry } from '../generated/kv';

/**
 * Decodes an EntryPage message (proto/kv.proto) straight from its bytes; tests check it against
 * the generated decoder. A big dump is bound by per-entry CPU, and the generated decoder is slow
 * exactly there: it routes every 64-bit field through BigInt and copies every value. Here 64-bit
 * varints are 32-bit arithmetic and values are views into the message. Unknown fields are
 * skipped, as protobuf requires.
 */
/** Decodes a page. Each value is a view into bytes: copy it to keep it past the page. */
export function decodeEntryPage(bytes: Buffer): Entry[] {
  const reader = new Reader(bytes);
  const entries: Entry[] = [];
  while (reader.pos < bytes.length) {
    const tag = reader.varint();
    if (tag === 0x0a) {
      const length = reader.varint();
      entries.push(decodeEntry(reader, reader.pos + length));
    } else {
      reader.skip(tag & 7);
    }
  }
  return entries;
}

const EMPTY = Buffer.alloc(0);

function decodeEntry(reader: Reader, end: number): Entry {
  const entry: Entry = { key: '', value: EMPTY, version: 0, expiresAtMs: 0, createdAtMs: 0 };
  while (reader.pos < end) {
    const tag = reader.varint();
    switch (tag) {
      case 0x0a:
        entry.key = reader.string();
        break;
      case 0x12:
        entry.value = reader.bytes();
        break;
      case 0x18:
        entry.version = reader.varint();
        break;
      case 0x20:
        entry.expiresAtMs = reader.int64();
        break;
      case 0x28:
        entry.createdAtMs = reader.int64();
        break;
      default:
        reader.skip(tag & 7);
    }
  }
  if (reader.pos !== end) throw new Error('malformed EntryPage: an entry overruns its length');
  return entry;
}

class Reader {
  pos = 0;
  constructor(private readonly buf: Buffer) {}

  /** An unsigned varint as a number (exact below 2^53, like the generated code's number mode). */
  varint(): number {
    const byte = this.buf[this.pos];
    if (byte < 0x80) {
      this.pos += 1;
      return byte;
    }
    return this.varint64(false);
  }

  /** A signed 64-bit varint (two's complement) as a number. */
  int64(): number {
    return this.varint64(true);
  }

  /** Reads the varint as two 32-bit halves, so negative int64s (10 bytes) decode exactly. */
  private varint64(signed: boolean): number {
    let lo = 0;
    let hi = 0;
    let byte = 0;
    for (let shift = 0; shift < 28; shift += 7) {
      byte = this.next();
      lo |= (byte & 0x7f) << shift;
      if (byte < 0x80) return lo >>> 0;
    }
    byte = this.next();
    lo |= (byte & 0x0f) << 28;
    hi = (byte & 0x7f) >> 4;
    for (let shift = 3; byte >= 0x80; shift += 7) {
      if (shift > 31) throw new Error('malformed EntryPage: varint longer than 10 bytes');
      byte = this.next();
      hi |= (byte & 0x7f) << shift;
    }
    return (signed ? hi | 0 : hi >>> 0) * 0x1_0000_0000 + (lo >>> 0);
  }

  private next(): number {
    if (this.pos >= this.buf.length) throw new Error('malformed EntryPage: truncated varint');
    return this.buf[this.pos++];
  }

  private span(): [number, number] {
    const length = this.varint();
    const start = this.pos;
    this.pos += length;
    if (this.pos > this.buf.length) throw new Error('malformed EntryPage: a field overruns the message');
    return [start, this.pos];
  }

  string(): string {
    const [start, end] = this.span();
    return this.buf.toString('utf8', start, end);
  }

  bytes(): Buffer {
    const [start, end] = this.span();
    return this.buf.subarray(start, end);
  }

  skip(wireType: number): void {
    switch (wireType) {
      case 0:
        this.varint();
        return;
      case 1:
        this.pos += 8;
        return;
      case 2:
        this.span();
        return;
      case 5:
        this.pos += 4;
        return;
      default:
        throw new Error(`malformed EntryPage: wire type ${wireType}`);
    }
  }
}
