/**
 * A caller's router for one deployment (one per deployment in each process that calls it):
 * picks a replica for each request by the power of two choices (two replicas at random, the one
 * with fewer of this caller's requests on it), never putting more than `maxOngoingRequests` of
 * them on one replica. While every replica is full (or none is up yet) requests wait here in
 * arrival order, up to `maxQueuedRequests`, past which they fail at once with BackPressureError.
 */
import { BackPressureError, DeploymentError, TaskCancelledError } from '../errors.js';
import { Deque } from '../core/deque.js';
import type { ActorHandle } from '../core/registry.js';
import type { ServeReplica } from './replica.js';

export interface RoutedReplica {
  readonly actorId: string;
  readonly handle: ActorHandle<ServeReplica>;
  /** This router's requests on the replica now. */
  ongoing: number;
}

interface Waiting {
  resolve(replica: RoutedReplica): void;
  reject(error: unknown): void;
  done: boolean;
}

export interface RouterHooks {
  /** Requests wait and no replica is up: asks for one (a deployment scaled to zero). */
  demand?(): void;
  /** A request found its replica dead. */
  replicaDied?(actorId: string): void;
}

export class Router {
  readonly deployment: string;
  #maxOngoing: number;
  #maxQueued: number;
  readonly #hooks: RouterHooks;
  #replicas: RoutedReplica[] = [];
  readonly #waiting = new Deque<Waiting>();
  #waitingCount = 0;
  #closed: DeploymentError | undefined;

  constructor(deployment: string, maxOngoing: number, maxQueued: number, hooks: RouterHooks = {}) {
    this.deployment = deployment;
    this.#maxOngoing = maxOngoing;
    this.#maxQueued = maxQueued;
    this.#hooks = hooks;
  }

  /** Requests waiting here for a replica. */
  get queued(): number {
    return this.#waitingCount;
  }

  get replicaCount(): number {
    return this.#replicas.length;
  }

  /** New limits (a deployment updated in place). */
  configure(maxOngoing: number, maxQueued: number): void {
    this.#maxOngoing = maxOngoing;
    this.#maxQueued = maxQueued;
    this.#pump();
  }

  /** The replicas to send to now; this router's counts on those it knew are kept. */
  setReplicas(handles: readonly ActorHandle<ServeReplica>[]): void {
    const known = new Map(this.#replicas.map((replica) => [replica.actorId, replica]));
    this.#replicas = handles.map((handle) => known.get(handle.actorId) ?? { actorId: handle.actorId, handle, ongoing: 0 });
    this.#pump();
  }

  /** No replica will come: waiting requests, and later ones, fail with `error`. */
  close(error: DeploymentError): void {
    this.#closed = error;
    this.#replicas = [];
    for (let waiting = this.#waiting.shift(); waiting; waiting = this.#waiting.shift()) this.#settle(waiting)?.reject(error);
  }

  /**
   * A replica with room for one more request, counted on it until `release()`. Waits while all are
   * full; `signal` gives up waiting (TaskCancelledError).
   */
  acquire(signal?: AbortSignal): Promise<RoutedReplica> {
    if (this.#closed) return Promise.reject(this.#closed);
    const chosen = this.tryAcquire();
    if (chosen) return Promise.resolve(chosen);
    if (this.#waitingCount >= this.#maxQueued) {
      return Promise.reject(new BackPressureError(this.deployment, `deployment ${this.deployment} is at capacity: ${this.#replicas.length} replica(s) each running ${this.#maxOngoing} request(s), and ${this.#waitingCount} waiting (maxQueuedRequests)`));
    }
    return new Promise<RoutedReplica>((resolve, reject) => {
      const waiting: Waiting = { resolve, reject, done: false };
      this.#waiting.push(waiting);
      this.#waitingCount++;
      if (signal) {
        const abort = () => this.#settle(waiting)?.reject(new TaskCancelledError(`a request to ${this.deployment} was cancelled while it waited for a replica`));
        if (signal.aborted) abort();
        else signal.addEventListener('abort', abort, { once: true });
      }
      if (this.#replicas.length === 0) this.#hooks.demand?.();
    });
  }

  /** A replica with room now, counted on it until `release()`; undefined where none has room or some wait. */
  tryAcquire(): RoutedReplica | undefined {
    if (this.#closed || this.#waitingCount > 0) return undefined;
    const chosen = this.#choose();
    if (chosen) chosen.ongoing++;
    return chosen;
  }

  release(replica: RoutedReplica): void {
    replica.ongoing--;
    this.#pump();
  }

  /** A request found `actorId` dead: no more are sent to it (the controller replaces it). */
  replicaDied(actorId: string): void {
    const before = this.#replicas.length;
    this.#replicas = this.#replicas.filter((replica) => replica.actorId !== actorId);
    if (this.#replicas.length !== before) this.#hooks.replicaDied?.(actorId);
  }

  /** Takes `waiting` off the count once: it is settled by the caller of this. */
  #settle(waiting: Waiting): Waiting | undefined {
    if (waiting.done) return undefined;
    waiting.done = true;
    this.#waitingCount--;
    return waiting;
  }

  #choose(): RoutedReplica | undefined {
    const replicas = this.#replicas;
    const count = replicas.length;
    if (count === 0) return undefined;
    if (count === 1) return replicas[0].ongoing < this.#maxOngoing ? replicas[0] : undefined;
    const first = Math.floor(Math.random() * count);
    let second = Math.floor(Math.random() * (count - 1));
    if (second >= first) second++;
    const a = replicas[first];
    const b = replicas[second];
    const best = a.ongoing <= b.ongoing ? a : b;
    if (best.ongoing < this.#maxOngoing) return best;
    // Both sampled replicas are full: any other with room will do, least loaded first.
    let found: RoutedReplica | undefined;
    for (const replica of replicas) {
      if (replica.ongoing < this.#maxOngoing && (!found || replica.ongoing < found.ongoing)) found = replica;
    }
    return found;
  }

  #pump(): void {
    while (this.#waitingCount > 0) {
      const head = this.#waiting.peek();
      if (head?.done) {
        this.#waiting.shift();
        continue;
      }
      const chosen = this.#choose();
      if (!chosen || !head) return;
      this.#waiting.shift();
      chosen.ongoing++;
      this.#settle(head)!.resolve(chosen);
    }
    // Settled entries left behind at the head are dropped as they surface.
    while (this.#waiting.peek()?.done) this.#waiting.shift();
  }
}
