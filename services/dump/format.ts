import { isUtf8 } from 'node:buffer';
import type { Entry, WatchEvent } from '../generated/kv';
import { WatchEvent_Kind } from '../generated/kv';
import { shortHash } from '../shared/log';

/** lines: "<key> <value>" (grep, awk); json: JSON Lines (jq); table: aligned columns for a person. */
export type Form = 'lines' | 'json' | 'table';

export interface FormatOptions {
  form: Form;
  keysOnly: boolean;
  /** Print a short hash of each key instead of the key (session ids are secrets). */
  redact: boolean;
  /** Terminal width, for the table. */
  columns: number;
  now?: () => number;
}

/** Turns entries and change events into text; a page at a time so output is written in chunks. */
export interface Formatter {
  page(entries: readonly Entry[]): string;
  event(event: WatchEvent): string;
  /** Text after the listing (the table's footer). */
  end(count: number): string;
}

export function createFormatter(options: FormatOptions): Formatter {
  switch (options.form) {
    case 'lines':
      return new LineFormatter(options);
    case 'json':
      return new JsonFormatter(options);
    case 'table':
      return new TableFormatter(options);
  }
}

const KIND_NAMES: Record<number, string> = {
  [WatchEvent_Kind.PUT]: 'put',
  [WatchEvent_Kind.DELETE]: 'delete',
  [WatchEvent_Kind.EXPIRE]: 'expire',
};

export function kindName(kind: WatchEvent_Kind): string {
  return KIND_NAMES[kind] ?? 'unknown';
}

function keyOf(key: string, redact: boolean): string {
  return redact ? shortHash(key) : key;
}

/**
 * Characters that are not plain printable text: C0 controls (tab and line breaks too), DEL, C1
 * controls (U+0080-U+009F, which include a one-byte CSI), the Unicode line and paragraph
 * separators, and the bidirectional controls (U+061C, U+200E-U+200F, U+202A-U+202E,
 * U+2066-U+2069). Printed raw they could end a line early, drive the terminal, or reorder how the
 * rest of the line is shown ("Trojan Source").
 */
const UNSAFE_VALUE = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]/;
/** A key also may not hold a space (it ends the key in "<key> <value>") or a backslash. */
const UNSAFE_KEY = /[\u0000-\u0020\u007f-\u009f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\\]/;
/** What JSON.stringify leaves raw but a terminal or a line reader does not take as text. */
const RAW_IN_JSON = /[\u007f-\u009f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]/;
const RAW_IN_JSON_ALL = new RegExp(RAW_IN_JSON.source, 'g');
const QUOTE = 0x22;

/**
 * The JSON string for text, with every character outside plain printable text as a \u escape.
 * Every key and value of a --json dump goes through here: the common case is one test.
 */
export function quoted(text: string): string {
  const json = JSON.stringify(text);
  return RAW_IN_JSON.test(json) ? json.replace(RAW_IN_JSON_ALL, (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0')) : json;
}

/**
 * A value as text on one line: as it is when it is plain printable text, else (a control
 * character, a line break, or a leading double quote) as a JSON string. So every entry is one line,
 * and a printed value that starts with a double quote is always a JSON string to decode.
 */
export function valueText(text: string): string {
  return text.charCodeAt(0) === QUOTE || UNSAFE_VALUE.test(text) ? quoted(text) : text;
}

/** Keys that, printed bare, would start an entry's line the way a --watch change's line starts. */
const EVENT_WORDS = new Set(Object.values(KIND_NAMES));

/**
 * A key the same way, quoted also when it is empty, holds a space or a backslash, or is the name
 * of a change ("put"): so a listed entry cannot pass for a change in --watch's lines.
 */
export function keyText(key: string): string {
  return key.length === 0 || key.charCodeAt(0) === QUOTE || UNSAFE_KEY.test(key) || EVENT_WORDS.has(key) ? quoted(key) : key;
}

class LineFormatter implements Formatter {
  constructor(private readonly options: FormatOptions) {}

  page(entries: readonly Entry[]): string {
    const { keysOnly, redact } = this.options;
    let out = '';
    for (const entry of entries) {
      const key = keyText(redact ? shortHash(entry.key) : entry.key);
      out += keysOnly ? key + '\n' : key + ' ' + valueText(entry.value.toString('utf8')) + '\n';
    }
    return out;
  }

  event(event: WatchEvent): string {
    const head = kindName(event.kind) + ' ' + keyText(keyOf(event.key, this.options.redact));
    return event.kind === WatchEvent_Kind.PUT && !this.options.keysOnly ? head + ' ' + valueText(event.value.toString('utf8')) + '\n' : head + '\n';
  }

  end(): string {
    return '';
  }
}

/** The value as a JSON member: "value" when it is UTF-8 text, else "valueBase64". */
function jsonValue(value: Buffer): string {
  return isUtf8(value) ? ',"value":' + quoted(value.toString('utf8')) : ',"valueBase64":"' + value.toString('base64') + '"';
}

const DAY_MS = 86_400_000;
const YEAR_10000_MS = 253_402_300_800_000;
const TWO_DIGITS = Array.from({ length: 60 }, (_, i) => String(i).padStart(2, '0'));
const THREE_DIGITS = Array.from({ length: 1000 }, (_, i) => String(i).padStart(3, '0'));
const dayPrefixes = new Map<number, string>();

/**
 * A quoted ISO 8601 time, or null for 0. The same text as Date#toISOString at a fraction of its
 * cost (it was a quarter of a --json dump's CPU): the date part is computed once per day.
 */
export function isoTime(ms: number): string {
  if (!(ms > 0)) return 'null';
  if (ms >= YEAR_10000_MS || !Number.isInteger(ms)) return '"' + new Date(ms).toISOString() + '"';
  const day = Math.floor(ms / DAY_MS);
  let prefix = dayPrefixes.get(day);
  if (prefix === undefined) {
    if (dayPrefixes.size > 1000) dayPrefixes.clear();
    prefix = new Date(day * DAY_MS).toISOString().slice(0, 11);
    dayPrefixes.set(day, prefix);
  }
  const inDay = ms - day * DAY_MS;
  const seconds = Math.floor(inDay / 1000);
  return (
    '"' +
    prefix +
    TWO_DIGITS[Math.floor(seconds / 3600)] +
    ':' +
    TWO_DIGITS[Math.floor(seconds / 60) % 60] +
    ':' +
    TWO_DIGITS[seconds % 60] +
    '.' +
    THREE_DIGITS[inDay % 1000] +
    'Z"'
  );
}

class JsonFormatter implements Formatter {
  constructor(private readonly options: FormatOptions) {}

  // Built by hand: JSON.stringify of an object per entry costs more than the rest of dump.
  page(entries: readonly Entry[]): string {
    const { keysOnly, redact } = this.options;
    let out = '';
    for (const entry of entries) {
      out +=
        '{"key":' +
        quoted(keyOf(entry.key, redact)) +
        (keysOnly ? '' : jsonValue(entry.value)) +
        ',"version":' +
        entry.version +
        ',"expiresAt":' +
        isoTime(entry.expiresAtMs) +
        ',"createdAt":' +
        isoTime(entry.createdAtMs) +
        '}\n';
    }
    return out;
  }

  event(event: WatchEvent): string {
    const put = event.kind === WatchEvent_Kind.PUT;
    return (
      '{"event":"' +
      kindName(event.kind) +
      '","key":' +
      quoted(keyOf(event.key, this.options.redact)) +
      (put && !this.options.keysOnly ? jsonValue(event.value) : '') +
      ',"version":' +
      event.version +
      (put ? ',"expiresAt":' + isoTime(event.expiresAtMs) : '') +
      '}\n'
    );
  }

  end(): string {
    return '';
  }
}

/** "29m 59s", "3h 05m", "2d 4h": the two largest units, like a person would say it. */
export function formatDuration(ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, '0')}s`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h}h ${String(m % 60).padStart(2, '0')}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

const GAP = '  ';
const MAX_ID_WIDTH = 48;
const MIN_VALUE_WIDTH = 12;

/** Text of which every character takes one column: the common case, measured by its length. */
const NARROW_TEXT = /^[\u0020-\u007e\u00a0-\u02ff]*$/;
/**
 * Characters that take no column of their own: combining marks, format characters (zero-width
 * space and joiners, the byte order mark, word joiner, tags), Hangul vowel and final jamo (they
 * join the syllable before them), variation selectors.
 */
const ZERO_WIDTH = /^[\p{Mn}\p{Me}\p{Cf}\u1160-\u11ff\ud7b0-\ud7ff\ufe00-\ufe0f\u{e0100}-\u{e01ef}]$/u;
/**
 * Characters a terminal shows two columns wide (as glibc's wcwidth counts them): East Asian Wide
 * and Fullwidth (Hangul Jamo, CJK and its angle brackets, Yijing hexagrams, kana and its
 * supplements, Tangut, Khitan, Nushu, Hangul syllables, fullwidth forms, enclosed ideographs) and
 * emoji shown as emoji, but for regional indicator letters, one column each (a flag is two).
 */
const DOUBLE_WIDTH =
  /^(?:[\u1100-\u115f\u2329\u232a\u2e80-\u303e\u3041-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff\ua000-\ua4cf\ua960-\ua97f\uac00-\ud7a3\uf900-\ufaff\ufe10-\ufe19\ufe30-\ufe6f\uff00-\uff60\uffe0-\uffe6\u{16fe0}-\u{16fff}\u{17000}-\u{18cff}\u{18d00}-\u{18d7f}\u{1aff0}-\u{1b2ff}\u{1f200}-\u{1f2ff}\u{20000}-\u{2fffd}\u{30000}-\u{3fffd}]|(?![\u{1f1e6}-\u{1f1ff}])\p{Emoji_Presentation})$/u;

function charWidth(char: string): number {
  return ZERO_WIDTH.test(char) ? 0 : DOUBLE_WIDTH.test(char) ? 2 : 1;
}

/** The columns text takes on a terminal, so that cells with CJK or emoji line up with the others. */
export function displayWidth(text: string): number {
  if (NARROW_TEXT.test(text)) return text.length;
  let width = 0;
  for (const char of text) width += charWidth(char);
  return width;
}

/** Cuts text to width columns, marking the cut with an ellipsis. */
function fit(text: string, width: number): string {
  if (displayWidth(text) <= width) return text;
  let cut = '';
  let used = 0;
  for (const char of text) {
    const w = charWidth(char);
    if (used + w > width - 1) break;
    cut += char;
    used += w;
  }
  return cut + '…';
}

/** Pads text on the right with spaces to width columns. */
function pad(text: string, width: number): string {
  return text + ' '.repeat(Math.max(0, width - displayWidth(text)));
}

/**
 * Aligned columns: ID, VALUE, VERSION, EXPIRES IN. Widths come from the first page, so a listing of
 * any size streams (a later, longer cell is cut to the column); the value column takes the room the
 * terminal has left.
 */
class TableFormatter implements Formatter {
  private widths: { id: number; value: number; version: number; expires: number } | undefined;
  private readonly now: () => number;

  constructor(private readonly options: FormatOptions) {
    this.now = options.now ?? Date.now;
  }

  page(entries: readonly Entry[]): string {
    if (entries.length === 0) return '';
    const now = this.now();
    const rows = entries.map((e) => this.cells(e.key, e.value, e.version, e.expiresAtMs - now));
    let out = '';
    if (!this.widths) {
      this.widths = this.measure(rows);
      out += this.row({ id: 'ID', value: 'VALUE', version: 'VERSION', expires: 'EXPIRES IN' });
    }
    for (const row of rows) out += this.row(row);
    return out;
  }

  event(event: WatchEvent): string {
    const time = new Date(this.now()).toTimeString().slice(0, 8);
    const kind = kindName(event.kind).padEnd(6);
    const cells = this.cells(event.key, event.value, event.version, event.expiresAtMs - this.now());
    const put = event.kind === WatchEvent_Kind.PUT;
    const detail = put ? `${cells.value}${GAP}v${cells.version}${GAP}expires in ${cells.expires}` : `v${cells.version}`;
    return fit(`${time} ${kind} ${cells.id}${GAP}${detail}`, Math.max(this.options.columns, 40)) + '\n';
  }

  end(count: number): string {
    return `(${count.toLocaleString('en')} ${count === 1 ? 'entry' : 'entries'})\n`;
  }

  private cells(key: string, value: Buffer, version: number, expiresInMs: number) {
    return {
      id: keyText(keyOf(key, this.options.redact)),
      value: this.options.keysOnly ? '' : valueText(value.toString('utf8')),
      version: String(version),
      expires: formatDuration(expiresInMs),
    };
  }

  private measure(rows: Array<ReturnType<TableFormatter['cells']>>) {
    const widest = (pick: (r: (typeof rows)[number]) => string, title: string) => Math.max(title.length, ...rows.map((r) => displayWidth(pick(r))));
    const id = Math.min(widest((r) => r.id, 'ID'), MAX_ID_WIDTH);
    const version = widest((r) => r.version, 'VERSION');
    const expires = Math.max(widest((r) => r.expires, 'EXPIRES IN'), '23h 59m'.length);
    const room = this.options.columns - id - version - expires - 3 * GAP.length;
    const value = this.options.keysOnly ? 0 : Math.max(MIN_VALUE_WIDTH, Math.min(room, widest((r) => r.value, 'VALUE')));
    return { id, value, version, expires };
  }

  private row(cells: { id: string; value: string; version: string; expires: string }): string {
    const w = this.widths!;
    const id = pad(fit(cells.id, w.id), w.id);
    const value = this.options.keysOnly ? '' : pad(fit(cells.value, w.value), w.value) + GAP;
    return `${id}${GAP}${value}${cells.version.padStart(w.version)}${GAP}${cells.expires.padStart(w.expires)}\n`;
  }
}
