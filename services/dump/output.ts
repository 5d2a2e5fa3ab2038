import { once } from 'node:events';

/**
 * Writes text to a stream, waiting for 'drain' when the stream's buffer is full, so a dump of any
 * size runs in constant memory however slow the reader (a pager, a pipe, a slow disk) is.
 */
export class Output {
  constructor(private readonly stream: NodeJS.WritableStream) {}

  async write(text: string): Promise<void> {
    if (text.length > 0 && !this.stream.write(text)) await once(this.stream, 'drain');
  }

  /**
   * Writes without waiting: for small texts (change events) whose order matters more than pacing.
   * False when the stream's buffer is full: the caller should take no more until drained().
   */
  writeNow(text: string): boolean {
    return text.length === 0 || this.stream.write(text);
  }

  /** Resolves once the stream has room again, after writeNow returned false. */
  async drained(): Promise<void> {
    await once(this.stream, 'drain');
  }
}

const REDRAW_MS = 250;

/** "1,234,567 entries  123,456/s" redrawn in place on a terminal's stderr while a listing runs. */
export class Progress {
  private readonly started = Date.now();
  private lastDrawn = this.started;
  private drawn = false;

  constructor(private readonly stream: NodeJS.WriteStream) {}

  update(count: number): void {
    const now = Date.now();
    if (now - this.lastDrawn < REDRAW_MS) return;
    this.lastDrawn = now;
    this.drawn = true;
    this.stream.write(`\r\x1b[K${count.toLocaleString('en')} entries  ${this.rate(count, now).toLocaleString('en')}/s`);
  }

  /** Erases the progress line, if one is drawn, so that what is written next starts a line of its own. */
  clear(): void {
    if (this.drawn) this.stream.write('\r\x1b[K');
    this.drawn = false;
  }

  /** Replaces the progress line with a summary. */
  finish(count: number): void {
    const now = Date.now();
    const seconds = ((now - this.started) / 1000).toFixed(1);
    const clear = this.drawn ? '\r\x1b[K' : '';
    this.drawn = false;
    this.stream.write(`${clear}${count.toLocaleString('en')} entries in ${seconds} s (${this.rate(count, now).toLocaleString('en')}/s)\n`);
  }

  private rate(count: number, now: number): number {
    return Math.round((count * 1000) / Math.max(1, now - this.started));
  }
}
