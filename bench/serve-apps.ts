/** Deployments and actors for the serve suite (registered at module top level). */
import { remote, type HttpRequest } from '../lib/index.js';

/** Answers every request with a small JSON body, and every call with a number. */
export class Hello {
  count = 0;
  fetch(_request: HttpRequest): unknown {
    return { hello: 'world', count: ++this.count };
  }

  ping(): number {
    return ++this.count;
  }
}
export const HelloActor = remote(import.meta, Hello);
