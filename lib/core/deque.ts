/** A FIFO queue with O(1) push, shift and unshift: Array#shift is O(n), quadratic for deep queues. */
export class Deque<T> implements Iterable<T> {
  #items: Array<T | undefined> = [];
  #head = 0;

  get length(): number {
    return this.#items.length - this.#head;
  }

  push(item: T): void {
    this.#items.push(item);
  }

  peek(): T | undefined {
    return this.#items[this.#head];
  }

  shift(): T | undefined {
    if (this.length === 0) return undefined;
    const item = this.#items[this.#head];
    this.#items[this.#head++] = undefined;
    if (this.#head >= 1024 && this.#head * 2 >= this.#items.length) {
      this.#items = this.#items.slice(this.#head);
      this.#head = 0;
    }
    return item;
  }

  unshift(...items: T[]): void {
    if (this.#head >= items.length) {
      for (let i = items.length - 1; i >= 0; i--) this.#items[--this.#head] = items[i];
    } else {
      this.#items = [...items, ...this.#items.slice(this.#head)];
      this.#head = 0;
    }
  }

  clear(): void {
    this.#items = [];
    this.#head = 0;
  }

  *[Symbol.iterator](): Iterator<T> {
    for (let i = this.#head; i < this.#items.length; i++) yield this.#items[i] as T;
  }
}
