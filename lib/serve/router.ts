/**
 * A caller's router for one deployment (one per deployment in each process that calls it):
 * picks a replica for each request by the power of two choices (two replicas at random, the one
 * with fewer of this caller's requests on it), never putting more than `maxOngoingRequests` of
 * them on one replica. While every replica is full (or none is up yet) requests wait here in
 * arrival order, up to `maxQueuedRequests`, past which they fail at once with BackPressureError.
 *
 * A request for a multiplexed model (see multiplex.ts) goes to a replica that holds the model
 * where one has room (two of those at random, the less loaded). Where every holder is full, it
 * waits for one up to `multiplexedModelWaitMs` (as Ray Serve does): a holder frees up in about
 * a request's time, while a replica without the model would first load it, and evict another.
 * Past that, or where no replica holds it, it goes to the replica with room that holds fewest
 * models, which then counts as holding it: a burst for a new model lands on one replica, which
 * loads it once. What replicas hold comes from their reports (`setModels`), plus what this
 * router sent since. Requests waiting for a model's holders do not hold up others behind them.
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
  /** The models it holds, by its last report, and those this router sent it since (with when). */
  models: Map<string, number>;
  /** The node it runs on, where known. */
  nodeId?: string;
}

/** How long a model sent to a replica counts as held there without the replica reporting it. */
const SENT_MODEL_MS = 5_000;

interface Waiting {
  modelId: string;
  preferLocal: boolean;
  /** When it arrived (ms): a request for a model spills off its holders `multiplexedModelWaitMs` after. */
  since: number;
  resolve(replica: RoutedReplica): void;
  reject(error: unknown): void;
  done: boolean;
}

export interface RouterHooks {
  /** Requests wait and no replica is up: asks for one (a deployment scaled to zero). */
  demand?(): void;
  /** A request found its replica dead. */
  replicaDied?(actorId: string): void;
  /** The node this router's process runs on (for requests that prefer replicas there). */
  localNode?(): string | undefined;
}

/** A deployment's limits, as its router applies them. */
export interface RouterLimits {
  maxOngoingRequests: number;
  maxQueuedRequests: number;
  /** How long a request for a model waits for a replica holding it (all full) before going to another. */
  multiplexedModelWaitMs: number;
}

export class Router {
  readonly deployment: string;
  #maxOngoing: number;
  #maxQueued: number;
  #modelWaitMs: number;
  readonly #hooks: RouterHooks;
  #replicas: RoutedReplica[] = [];
  readonly #waiting = new Deque<Waiting>();
  #waitingCount = 0;
  #closed: DeploymentError | undefined;
  /** Wakes the queue when the first waiting request's model wait runs out; and when. */
  #spillTimer: NodeJS.Timeout | undefined;
  #spillAt = Infinity;

  constructor(deployment: string, limits: RouterLimits, hooks: RouterHooks = {}) {
    this.deployment = deployment;
    this.#maxOngoing = limits.maxOngoingRequests;
    this.#maxQueued = limits.maxQueuedRequests;
    this.#modelWaitMs = limits.multiplexedModelWaitMs;
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
  configure(limits: RouterLimits): void {
    this.#maxOngoing = limits.maxOngoingRequests;
    this.#maxQueued = limits.maxQueuedRequests;
    this.#modelWaitMs = limits.multiplexedModelWaitMs;
    this.#pump();
  }

  /**
   * The replicas to send to now, and (from the directory) the models some of them reported;
   * this router's counts on those it knew are kept.
   */
  setReplicas(handles: readonly ActorHandle<ServeReplica>[], models: Record<string, readonly string[]> = {}, nodes: Record<string, string> = {}): void {
    const known = new Map(this.#replicas.map((replica) => [replica.actorId, replica]));
    this.#replicas = handles.map((handle) => known.get(handle.actorId) ?? { actorId: handle.actorId, handle, ongoing: 0, models: new Map() });
    for (const replica of this.#replicas) if (nodes[replica.actorId]) replica.nodeId = nodes[replica.actorId];
    for (const [actorId, modelIds] of Object.entries(models)) this.#report(actorId, modelIds);
    this.#pump();
  }

  /** What replica `actorId` reported holding: those, and what this router sent it lately. */
  setModels(actorId: string, modelIds: readonly string[]): void {
    this.#report(actorId, modelIds);
    this.#pump();
  }

  #report(actorId: string, modelIds: readonly string[]): void {
    const replica = this.#replicas.find((candidate) => candidate.actorId === actorId);
    if (!replica) return;
    const since = Date.now() - SENT_MODEL_MS;
    for (const [modelId, sent] of replica.models) if (sent < since) replica.models.delete(modelId);
    for (const modelId of modelIds) replica.models.set(modelId, 0);
  }

  /** The models each replica holds, as this router believes (for status and tests). */
  modelsByReplica(): Map<string, string[]> {
    return new Map(this.#replicas.map((replica) => [replica.actorId, [...replica.models.keys()]]));
  }

  /** No replica will come: waiting requests, and later ones, fail with `error`. */
  close(error: DeploymentError): void {
    this.#closed = error;
    this.#replicas = [];
    this.#armSpill(Infinity);
    for (let waiting = this.#waiting.shift(); waiting; waiting = this.#waiting.shift()) this.#settle(waiting)?.reject(error);
  }

  /**
   * A replica with room for one more request, counted on it until `release()`. Waits while all are
   * full; `signal` gives up waiting (TaskCancelledError). `preferLocal`: a replica on this
   * process's node where one has room, before the others.
   */
  acquire(signal?: AbortSignal, modelId = '', preferLocal = false): Promise<RoutedReplica> {
    if (this.#closed) return Promise.reject(this.#closed);
    const chosen = this.tryAcquire(modelId, preferLocal);
    if (chosen) return Promise.resolve(chosen);
    if (this.#waitingCount >= this.#maxQueued) {
      return Promise.reject(new BackPressureError(this.deployment, `deployment ${this.deployment} is at capacity: ${this.#replicas.length} replica(s) each running ${this.#maxOngoing} request(s), and ${this.#waitingCount} waiting (maxQueuedRequests)`));
    }
    return new Promise<RoutedReplica>((resolve, reject) => {
      const waiting: Waiting = { modelId, preferLocal, since: Date.now(), resolve, reject, done: false };
      this.#waiting.push(waiting);
      this.#waitingCount++;
      if (signal) {
        const abort = () => this.#settle(waiting)?.reject(new TaskCancelledError(`a request to ${this.deployment} was cancelled while it waited for a replica`));
        if (signal.aborted) abort();
        else signal.addEventListener('abort', abort, { once: true });
      }
      if (this.#replicas.length === 0) this.#hooks.demand?.();
      // Those ahead may be waiting for their models' holders only, with room elsewhere for this one.
      this.#pump();
    });
  }

  /** A replica with room now, counted on it until `release()`; undefined where none has room or some wait. */
  tryAcquire(modelId = '', preferLocal = false): RoutedReplica | undefined {
    if (this.#closed || this.#waitingCount > 0) return undefined;
    return this.#take(modelId, preferLocal, Date.now(), Date.now());
  }

  /**
   * The replica for a request that arrived at `since` (counted on it), or undefined where none has
   * room, or only replicas without its model do and its wait for the holders has not run out.
   */
  #take(modelId: string, preferLocal: boolean, since: number, now: number): RoutedReplica | undefined {
    const chosen = modelId ? this.#chooseForModel(modelId, now - since >= this.#modelWaitMs, preferLocal) : this.#choose(this.#nearest(this.#replicas, preferLocal));
    if (!chosen) return undefined;
    chosen.ongoing++;
    if (modelId && !chosen.models.has(modelId)) chosen.models.set(modelId, now);
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

  /** Where `preferLocal` asks it: those of `replicas` on this process's node that have room, if any do; else all of them. */
  #nearest(replicas: readonly RoutedReplica[], preferLocal: boolean): readonly RoutedReplica[] {
    if (!preferLocal) return replicas;
    const node = this.#hooks.localNode?.();
    const local = node === undefined ? [] : replicas.filter((replica) => replica.nodeId === node && replica.ongoing < this.#maxOngoing);
    return local.length > 0 ? local : replicas;
  }

  #chooseForModel(modelId: string, mayLoad: boolean, preferLocal: boolean): RoutedReplica | undefined {
    const holding = this.#replicas.filter((replica) => replica.models.has(modelId));
    if (holding.length) {
      const chosen = this.#choose(this.#nearest(holding, preferLocal));
      if (chosen || !mayLoad) return chosen;
    }
    // None holds it, or none holding it had room in time: the replica with room that holds fewest models loads it.
    let found: RoutedReplica | undefined;
    for (const replica of this.#nearest(this.#replicas, preferLocal)) {
      if (replica.ongoing >= this.#maxOngoing) continue;
      if (!found || replica.models.size < found.models.size || (replica.models.size === found.models.size && replica.ongoing < found.ongoing)) found = replica;
    }
    return found;
  }

  #choose(replicas: readonly RoutedReplica[]): RoutedReplica | undefined {
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

  /**
   * Places waiting requests in arrival order. One that cannot go yet (its model's holders are
   * full, and its wait has not run out) keeps its place without holding up those behind it; one
   * that finds no replica with room at all ends the pass, as nothing after it would find one.
   */
  #pump(): void {
    while (this.#waiting.peek()?.done) this.#waiting.shift();
    if (this.#waitingCount === 0) return this.#armSpill(Infinity);
    const now = Date.now();
    let nextSpill = Infinity;
    for (const waiting of this.#waiting) {
      if (waiting.done) continue;
      const chosen = this.#take(waiting.modelId, waiting.preferLocal, waiting.since, now);
      if (chosen) {
        this.#settle(waiting)!.resolve(chosen);
        continue;
      }
      if (!waiting.modelId || !this.#replicas.some((replica) => replica.ongoing < this.#maxOngoing)) break;
      nextSpill = Math.min(nextSpill, waiting.since + this.#modelWaitMs);
    }
    // Settled entries at the head are dropped now; those further in, as they surface.
    while (this.#waiting.peek()?.done) this.#waiting.shift();
    this.#armSpill(nextSpill);
  }

  /** Runs the queue again at `at` (ms since the epoch), when a waiting request may spill; Infinity: never. */
  #armSpill(at: number): void {
    if (at === this.#spillAt) return;
    if (this.#spillTimer) clearTimeout(this.#spillTimer);
    this.#spillTimer = undefined;
    this.#spillAt = at;
    if (at === Infinity) return;
    this.#spillTimer = setTimeout(() => {
      this.#spillTimer = undefined;
      this.#spillAt = Infinity;
      this.#pump();
    }, Math.max(0, at - Date.now()));
    this.#spillTimer.unref();
  }
}
