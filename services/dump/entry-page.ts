import type { Entry } from '../generated/kv';

/**
 * Decodes an EntryPage message (proto/kv.proto) straight from its bytes. It reads what the
 * generated decoder reads, but turns 64-bit varints into numbers directly (the generated code goes
 * through BigInt) and leaves each value as a view into the message instead of a copy: together
 * that was most of the CPU of a plain dump. Unknown fields are skipped, as protobuf requires.
 */
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

const TWO_POW_63 = 2 ** 63;
const TWO_POW_64 = 2 ** 64;

class Reader {
  pos = 0;
  constructor(private readonly buf: Buffer) {}

  /** An unsigned varint as a number (exact below 2^53, like the generated code's number mode). */
  varint(): number {
    const buf = this.buf;
    let byte = buf[this.pos++];
    if (byte < 0x80) return byte;
    let value = byte & 0x7f;
    let scale = 0x80;
    for (let i = 1; i < 10; i++) {
      if (this.pos >= buf.length) throw new Error('malformed EntryPage: truncated varint');
      byte = buf[this.pos++];
      value += (byte & 0x7f) * scale;
      if (byte < 0x80) return value;
      scale *= 0x80;
    }
    throw new Error('malformed EntryPage: varint longer than 10 bytes');
  }

  /** A signed 64-bit varint (two's complement) as a number. */
  int64(): number {
    const value = this.varint();
    return value >= TWO_POW_63 ? value - TWO_POW_64 : value;
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
