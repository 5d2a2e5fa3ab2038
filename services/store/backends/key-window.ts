/**
 * Keeps the `capacity` smallest distinct strings offered to it (a max-heap plus a set), so an
 * unordered stream that may repeat items (Redis SCAN) yields its next `capacity` items in order
 * with bounded memory. Strings compare by UTF-16 code unit; callers that need byte order offer
 * latin1 renderings of the bytes.
 */
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

  /** The items in ascending order; empties the window. */
  drain(): string[] {
    const items = this.heap.splice(0).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
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
