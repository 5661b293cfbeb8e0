/**
 * A worker's requests to its driver (get, wait, actor lookups), answered by reply messages. The
 * driver owns every object, so once its connection is gone nothing pending can be answered:
 * everything pending, and anything asked afterwards, fails with OwnerDiedError.
 */
import { OwnerDiedError, type RemoteErrorInfo } from '../errors.js';
import type { RequestMessage } from './protocol.js';

interface Pending {
  op: string;
  body: unknown;
  resolve: (value: any) => void;
  reject: (error: Error) => void;
}

export class DriverRequests {
  readonly #send: (message: RequestMessage) => void;
  readonly #pending = new Map<number, Pending>();
  #next = 1;
  #ownerGone = false;

  constructor(send: (message: RequestMessage) => void) {
    this.#send = send;
  }

  /** Requests in flight. */
  get size(): number {
    return this.#pending.size;
  }

  request(op: string, body: unknown): Promise<any> {
    if (this.#ownerGone) return Promise.reject(ownerDied(op, body));
    const requestId = this.#next++;
    return new Promise((resolve, reject) => {
      this.#pending.set(requestId, { op, body, resolve, reject });
      this.#send({ t: 'request', requestId, op, body });
    });
  }

  /** One-way: no reply comes, and none is waited for. */
  notify(op: string, body: unknown): void {
    if (!this.#ownerGone) this.#send({ t: 'request', requestId: 0, op, body });
  }

  settle(requestId: number, ok: boolean, value: unknown, error?: RemoteErrorInfo): void {
    const pending = this.#pending.get(requestId);
    if (!pending) return;
    this.#pending.delete(requestId);
    if (ok) pending.resolve(value);
    else pending.reject(Object.assign(new Error(error?.message), { name: error?.name, code: error?.code }));
  }

  /** The driver's connection closed: fail what waits on it, now and from here on. */
  ownerDied(): void {
    this.#ownerGone = true;
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const { op, body, reject } of pending) reject(ownerDied(op, body));
  }
}

function ownerDied(op: string, body: unknown): OwnerDiedError {
  const ids = (body as { ids?: unknown } | null)?.ids;
  const objectIds = Array.isArray(ids) ? ids.filter((id): id is string => typeof id === 'string') : [];
  const what = objectIds.length > 0 ? `${op} of ${objectIds.join(', ')}` : op;
  return new OwnerDiedError(
    `the driver, which owns every object, is gone (its connection closed): this worker's ${what} cannot complete`,
    objectIds,
  );
}
