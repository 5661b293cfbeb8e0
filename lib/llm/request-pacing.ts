/**
 * What keeps a client of a service within what the service takes: a bound on requests in flight,
 * a steady pace of request starts, and the wait before a retry.
 */

/** At most `limit` holders at once; the others wait in arrival order. */
export class RequestSlots {
  readonly #limit: number;
  #held = 0;
  readonly #waiting: Array<() => void> = [];

  constructor(limit: number) {
    this.#limit = limit;
  }

  acquire(): Promise<void> {
    if (this.#held < this.#limit) {
      this.#held++;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.#waiting.push(resolve));
  }

  release(): void {
    const next = this.#waiting.shift();
    // The slot passes straight to the next waiter: a newcomer cannot take it in between.
    if (next) next();
    else this.#held--;
  }
}

/**
 * Starts at most `perSecond` requests a second (Infinity: no pace), evenly spaced (a bucket of one:
 * no burst), so that in any window of t seconds at most 1 + t·perSecond start. A service that
 * answers "slow down" holds every later start back (holdFor), those already waiting their turn
 * included, not just the request it refused.
 */
export class RequestPacer {
  readonly #intervalMs: number;
  /** When the next request may start by the pace (ms, Date.now's clock). */
  #nextStart = 0;
  /** No request starts before this (ms), whatever the pace. */
  #heldUntil = 0;

  constructor(perSecond = Infinity) {
    this.#intervalMs = 1000 / perSecond;
  }

  /** Resolves when this request may start; turns are handed out in call order. */
  async next(): Promise<void> {
    for (;;) {
      const now = Date.now();
      if (this.#intervalMs === 0 && now >= this.#heldUntil) return;
      const start = Math.max(now, this.#nextStart, this.#heldUntil);
      this.#nextStart = start + this.#intervalMs;
      if (start > now) await new Promise((resolve) => setTimeout(resolve, start - now));
      // A hold that came while this one waited its turn applies to it too.
      if (Date.now() >= this.#heldUntil) return;
    }
  }

  /** No start before `delayMs` from now. */
  holdFor(delayMs: number): void {
    this.#heldUntil = Math.max(this.#heldUntil, Date.now() + delayMs);
  }
}

/**
 * The wait before retry `attempt` (0 for the first retry): the service's Retry-After where it gave
 * one, else base·2^attempt with "equal jitter" (half fixed, half random, so that clients refused
 * together do not come back together); never above `maxMs`.
 */
export function retryDelayMs(attempt: number, baseMs: number, maxMs: number, retryAfterMs?: number, random = Math.random): number {
  if (retryAfterMs !== undefined) return Math.min(maxMs, retryAfterMs);
  const exponential = Math.min(maxMs, baseMs * 2 ** attempt);
  return exponential / 2 + random() * (exponential / 2);
}
