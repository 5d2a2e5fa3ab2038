/**
 * Keeps the `capacity` smallest distinct strings offered to it (a max-heap plus a set), so an
 * unordered stream that may repeat items (Redis SCAN) yields its next `capacity` items in order
 * with bounded memory. Strings compare by UTF-16 code unit; callers that need byte order offer
 * latin1 renderings of the bytes.
 */
/** Items drainPages sorts in one go: a few ms. */
const SORT_SLICE = 8192;

const byCodeUnit = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

export class KeyWindow {
  private readonly heap: string[] = [];
  private readonly members = new Set<string>();

  constructor(readonly capacity: number) {
    if (!(capacity >= 1)) throw new RangeError('KeyWindow capacity must be at least 1');
  }

  get size(): number {
    return this.heap.length;
  }

  /** True once it holds `capacity` items: larger ones offered from now on are dropped. */
  get full(): boolean {
    return this.heap.length >= this.capacity;
  }

  offer(item: string): void {
    if (this.members.has(item)) return;
    if (this.heap.length < this.capacity) {
      this.members.add(item);
      this.heap.push(item);
      this.siftUp(this.heap.length - 1);
      return;
    }
    if (item >= this.heap[0]) return;
    this.members.delete(this.heap[0]);
    this.members.add(item);
    this.heap[0] = item;
    this.siftDown(0);
  }

  /** The largest item held (the last in order), or undefined when empty. */
  get largest(): string | undefined {
    return this.heap[0];
  }

  /**
   * The items in ascending order, `pageSize` at a time; empties the window. Sorted a slice at a
   * time, a turn of the event loop between slices, then merged a page at a time: sorting a window
   * of 100,000 keys at once held the event loop (every other call of the store) for 0.2-0.3 s.
   */
  async *drainPages(pageSize: number): AsyncGenerator<string[]> {
    const items = this.heap.splice(0);
    this.members.clear();
    const runs: string[][] = [];
    for (let i = 0; i < items.length; i += SORT_SLICE) {
      if (i > 0) await new Promise((resolve) => setImmediate(resolve));
      runs.push(items.slice(i, i + SORT_SLICE).sort(byCodeUnit));
    }
    const next = runs.map(() => 0);
    for (let left = items.length; left > 0; ) {
      const page: string[] = [];
      for (; page.length < pageSize && left > 0; left -= 1) {
        let smallest = -1;
        for (let r = 0; r < runs.length; r += 1) {
          if (next[r] < runs[r].length && (smallest < 0 || runs[r][next[r]] < runs[smallest][next[smallest]])) smallest = r;
        }
        page.push(runs[smallest][next[smallest]++]);
      }
      yield page;
    }
  }

  /** The items in ascending order; empties the window. */
  drain(): string[] {
    const items = this.heap.splice(0).sort(byCodeUnit);
    this.members.clear();
    return items;
  }

  private siftUp(i: number): void {
    const heap = this.heap;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (heap[parent] >= heap[i]) return;
      [heap[parent], heap[i]] = [heap[i], heap[parent]];
      i = parent;
    }
  }

  private siftDown(i: number): void {
    const heap = this.heap;
    for (;;) {
      const left = 2 * i + 1;
      const right = left + 1;
      let largest = i;
      if (left < heap.length && heap[left] > heap[largest]) largest = left;
      if (right < heap.length && heap[right] > heap[largest]) largest = right;
      if (largest === i) return;
      [heap[largest], heap[i]] = [heap[i], heap[largest]];
      i = largest;
    }
  }
}
