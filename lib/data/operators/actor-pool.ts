/** A class stage on an autoscaling pool of actors. */
import { askForRoom, get, kill, state } from '../../core/api.js';
import type { ElasticAsk } from '../../core/broker-client.js';
import { ObjectRef } from '../../core/object-ref.js';
import { actorHandleInfo, type ActorHandle } from '../../core/registry.js';
import { currentRuntime, hasRuntime } from '../../core/runtime-context.js';
import { ActorDiedError, DataError, TaskError } from '../../errors.js';
import { Deque } from '../../core/deque.js';
import type { Block } from '../block.js';
import { slicesOf, type PhysicalOperatorSpec, type ActorPoolOptions } from '../plan.js';
import type { OperatorProgress } from '../progress-types.js';
import { RemoteDataPoolActor, rerunPoolBatch, type DataPoolActor, type TaskResult } from '../worker-tasks.js';
import type { Recompute } from '../../core/options.js';
import { Operator, askedBundle, dispose, resourcesOf, taskOptionsOf, taskTargets, type Unit } from './operator.js';

interface PoolActor {
  handle: ActorHandle<DataPoolActor>;
  state: 'starting' | 'ready' | 'stopping';
  inflight: number;
  idleSince: number;
  /** When it was added, and whether it has a node yet (unknown where the runtime cannot tell). */
  added: number;
  placed?: boolean;
}

/** How long an actor may wait for a node before the pool asks a shared cluster for room for it. */
const UNPLACED_ASK_MS = 1000;

/** A class stage on an autoscaling pool of actors, each built once (its model loaded once). */
export class ActorMapOperator extends Operator {
  declare readonly spec: Extract<PhysicalOperatorSpec, { kind: 'actor-map' }>;
  readonly #actors = new Set<PoolActor>();
  readonly #retry = new Deque<Unit>();
  /** Each live actor's latest counters (its class's metrics()), and the sum of those of actors gone. */
  readonly #metrics = new Map<PoolActor, Record<string, number>>();
  readonly #retiredMetrics: Record<string, number> = {};
  #lastScaleCheck = 0;
  #resourcesFree = true;
  /** Room asked of a shared cluster's broker to grow into, not here yet. */
  readonly #asks = new Set<ElasticAsk>();
  /** Those of them its minimum needs: refused, the pool cannot start. */
  readonly #minimumAsks = new WeakSet<ElasticAsk>();
  #starvedWarned = false;

  get pool(): ActorPoolOptions {
    return this.spec.pool;
  }
  get className(): string {
    return this.spec.classStage.udf.descriptor.name;
  }

  override async start(): Promise<void> {
    // A pool whose minimum the cluster cannot hold would wait for its actors forever.
    const fit = this.executor.actorsThatFit(this.spec.compute);
    // On a shared cluster the pool asks for the room its minimum lacks, and starts as it comes.
    if (fit < this.pool.min && !this.#askForRoom(fit, this.pool.min - fit)) {
      const need = Object.entries(resourcesOf(this.spec.compute)).filter(([, amount]) => amount > 0).map(([name, amount]) => `${name} ${amount}`).join(', ');
      throw new DataError(
        'ERR_DATA_ACTOR_START',
        `actor pool ${this.name}: ${this.pool.min} ${this.className} actor(s) of ${need} each cannot start: the cluster holds ${fit} at most`,
        { operator: this.name },
      );
    }
    // The pool's minimum starts before the first batch arrives, so models load while data is read.
    for (let i = 0; i < this.#minimumNow(); i++) this.#addActor();
  }

  /**
   * The CPUs the operators feeding this pool need for one task while they have work left: a read,
   * a function map, an exchange. 0 once they are done.
   */
  #feedCpus(): number {
    let need = 0;
    const visit = (operator: Operator): void => {
      for (const upstream of operator.upstreams) {
        if (!upstream.done()) {
          const kind = upstream.spec.kind;
          if (kind === 'read' || kind === 'task-map') need = Math.max(need, upstream.spec.compute.numCpus ?? 1);
          else if (kind === 'exchange' || kind === 'aggregate' || kind === 'repartition' || kind === 'zip') need = Math.max(need, 1);
        }
        visit(upstream);
      }
    };
    visit(this);
    return need;
  }

  /**
   * Actors the pool may hold now. Actors that took every CPU while their feed still had work would
   * starve it: the read could never run, and the actors would wait for input forever. The pool
   * leaves its feed the CPUs of one task, below its minimum if it must (said once), and takes
   * them once the feed is done.
   */
  #actorCap(): number {
    const actorCpus = this.spec.compute.numCpus ?? 1;
    const feed = actorCpus > 0 ? this.#feedCpus() : 0;
    if (feed === 0) return Infinity;
    return Math.max(1, Math.floor((this.executor.totalCpus - feed) / actorCpus + 1e-9));
  }

  #minimumNow(): number {
    const cap = this.#actorCap();
    if (cap >= this.pool.min) return this.pool.min;
    if (!this.#starvedWarned) {
      this.#starvedWarned = true;
      this.executor.warn(
        `actor pool ${this.name}: ${this.pool.min} actors would hold every CPU and starve the tasks that feed them; it runs ${cap} until they are done`,
      );
    }
    return cap;
  }

  #addActor(): void {
    const compute = this.spec.compute;
    const handle = RemoteDataPoolActor.options({
      numCpus: compute.numCpus ?? 1,
      numGpus: compute.numGpus,
      memory: compute.memory,
      resources: compute.resources,
      maxConcurrency: this.pool.maxConcurrency,
      ...(compute.runtimeEnv ? { runtimeEnv: compute.runtimeEnv } : {}),
    }).remote();
    const actor: PoolActor = { handle, state: 'starting', inflight: 0, idleSince: Date.now(), added: Date.now() };
    this.#actors.add(actor);
    const startRef = handle.start.remote(this.spec.classStage, this.spec.following);
    const started = get(startRef).finally(() => startRef[Symbol.dispose]());
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      // The constructor's time counts from when the actor is placed (seen within 100 ms): one
      // waiting for resources (a node lent again after a preemption, say) is not a constructor
      // that hangs. Where the runtime cannot tell, from now.
      const limit = this.pool.startTimeoutMs;
      const created = Date.now();
      let placedAt: number | undefined;
      const check = () => {
        const placed = this.#placed(actor);
        actor.placed = placed;
        if (placedAt === undefined && placed !== false) placedAt = placed === undefined ? created : Date.now();
        const left = placedAt === undefined ? Math.min(100, limit) : placedAt + limit - Date.now();
        if (left <= 0) {
          reject(new DataError('ERR_DATA_ACTOR_START', `actor pool ${this.name}: ${this.className}'s constructor did not finish within ${limit} ms`, { operator: this.name }));
          return;
        }
        timer = setTimeout(check, placedAt === undefined ? left : Math.max(left, 1));
        timer.unref();
      };
      check();
    });
    Promise.race([started, timeout]).then(
      () => {
        clearTimeout(timer);
        if (actor.state !== 'starting') return;
        actor.state = 'ready';
        actor.idleSince = Date.now();
        this.executor.touch();
        this.executor.schedule();
      },
      (error: unknown) => {
        clearTimeout(timer);
        if (actor.state === 'stopping' || this.executor.failed) return;
        // An actor no node can hold because the broker refused the room asked for it: say that.
        this.#checkAsks();
        if (this.executor.failed) return;
        this.#removeActor(actor);
        if (error instanceof ActorDiedError && this.#actors.size > 0) return; // lost before it started; the pool refills
        const cause = error instanceof TaskError ? (error.cause as Error) : (error as Error);
        const message =
          error instanceof DataError ? error.message : `actor pool ${this.name}: ${this.className}'s constructor failed: ${cause?.name ?? 'Error'}: ${cause?.message ?? String(error)}`;
        this.executor.fail(new DataError('ERR_DATA_ACTOR_START', message, { operator: this.name, cause: error }));
      },
    );
  }

  /**
   * Takes an actor out of the pool and stops it. An idle, ready actor is asked to drain first: the
   * release of what its last call stored may still be on its way, and a process killed before it
   * arrives would leave those blocks counted for good. Busy or unstarted actors are killed at once.
   */
  #removeActor(actor: PoolActor, killIt = true): void {
    if (!this.#actors.delete(actor)) return;
    const last = this.#metrics.get(actor);
    if (last) for (const [name, value] of Object.entries(last)) this.#retiredMetrics[name] = (this.#retiredMetrics[name] ?? 0) + value;
    this.#metrics.delete(actor);
    const wasIdle = actor.state === 'ready' && actor.inflight === 0;
    actor.state = 'stopping';
    if (!killIt) return;
    const stop = () => {
      try {
        kill(actor.handle);
      } catch {
        // The cluster may be shutting down.
      }
    };
    if (!wasIdle) return stop();
    let drained: ObjectRef<boolean>;
    try {
      drained = actor.handle.drain.remote() as ObjectRef<boolean>;
    } catch {
      return stop();
    }
    const guard = setTimeout(stop, 5_000);
    guard.unref();
    get(drained)
      .catch(() => undefined)
      .then(() => {
        clearTimeout(guard);
        drained[Symbol.dispose]();
        stop();
      });
  }

  /** Whether the actor has a node yet (undefined where the runtime cannot tell). */
  #placed(actor: PoolActor): boolean | undefined {
    // After shutdown() nothing is placed any more; the job fails at its executor's next tick.
    if (!hasRuntime()) return undefined;
    const runtime = currentRuntime();
    if (!runtime.actorNode) return undefined;
    return runtime.actorNode(actorHandleInfo(actor.handle)!.actorId) !== undefined;
  }

  /** Whether the actor's node is being taken out of scheduling: it gets no new batches. */
  #leaving(actor: PoolActor): boolean {
    if (!hasRuntime()) return false;
    const runtime = currentRuntime();
    if (!runtime.actorNode || !runtime.nodeDraining) return false;
    const node = runtime.actorNode(actorHandleInfo(actor.handle)!.actorId);
    return node !== undefined && runtime.nodeDraining(node);
  }

  counts(): { running: number; pending: number } {
    let running = 0;
    let pending = 0;
    for (const actor of this.#actors) {
      if (actor.state === 'ready') running++;
      else if (actor.state === 'starting') pending++;
    }
    return { running, pending };
  }

  override get queuedUnits(): number {
    return this.inputs.length + this.#retry.length;
  }

  /** A unit waiting for its retry is work still to do, even with the input queue empty. */
  override done(): boolean {
    return (this.#retry.length === 0 || this.truncated) && super.done();
  }

  hasWork(): boolean {
    if (this.truncated) return false;
    return this.#retry.length > 0 || this.hasUnitOf(this.spec.bundleRows);
  }

  #freeActor(): PoolActor | undefined {
    let best: PoolActor | undefined;
    for (const actor of this.#actors) {
      if (actor.state !== 'ready' || actor.inflight >= this.pool.maxTasksInFlightPerActor || this.#leaving(actor)) continue;
      if (!best || actor.inflight < best.inflight) best = actor;
    }
    return best;
  }

  /**
   * Locality: of the actors free to take `unit`, the one on the node whose store holds most of its
   * bytes (the fewest in flight among those), so that a block made on a host is mapped there
   * rather than copied to another. Undefined where every block is in no store, or on no free
   * actor's node.
   */
  #actorNear(unit: Unit): PoolActor | undefined {
    const runtime = currentRuntime();
    if (!runtime.objectNodes || !runtime.actorNode || this.#actors.size < 2) return undefined;
    const locations = runtime.objectNodes(unit.blocks.map((block) => block.ref.id));
    const bytesOn = new Map<string, number>();
    unit.blocks.forEach((block, index) => {
      for (const node of locations[index]) bytesOn.set(node, (bytesOn.get(node) ?? 0) + (block.meta.bytes ?? 0) + 1);
    });
    if (bytesOn.size === 0) return undefined;
    let best: PoolActor | undefined;
    let bestBytes = 0;
    for (const actor of this.#actors) {
      if (actor.state !== 'ready' || actor.inflight >= this.pool.maxTasksInFlightPerActor || this.#leaving(actor)) continue;
      const node = runtime.actorNode(actorHandleInfo(actor.handle)!.actorId);
      const bytes = node === undefined ? 0 : (bytesOn.get(node) ?? 0);
      if (bytes > bestBytes || (bytes === bestBytes && bytes > 0 && actor.inflight < best!.inflight)) {
        best = actor;
        bestBytes = bytes;
      }
    }
    return best;
  }

  capacity(): number {
    return this.#freeActor() ? this.active + 1 : this.active;
  }

  override nextUnitBytes(): number {
    return this.#retry.peek()?.bytes ?? super.nextUnitBytes();
  }

  /** Every call the pool could hold at its largest: its tail is cut for that many. */
  protected override concurrentUnits(): number {
    const actors = Number.isFinite(this.pool.max) ? this.pool.max : Math.max(this.pool.min, this.#actors.size, 1);
    return actors * this.pool.maxTasksInFlightPerActor;
  }

  launch(): void {
    const unit = this.#retry.length > 0 ? this.#retry.shift()! : this.nextMapUnit();
    const actor = this.#actorNear(unit) ?? this.#freeActor()!;
    actor.inflight++;
    this.began(unit);
    const targets = taskTargets(this.executor);
    const write = this.fusedWrite(unit);
    const slices = slicesOf(unit.blocks);
    const blocks = unit.blocks.map((block) => block.ref) as unknown as Block[];
    const ref = (write === null ? actor.handle.process.options({ recompute: this.#rerun(targets, slices, blocks) }) : actor.handle.process).remote(
      targets,
      write,
      slices,
      ...blocks,
    ) as ObjectRef<TaskResult>;
    get(ref).then(
      (result) => {
        ref[Symbol.dispose]();
        if (result.metrics && this.#actors.has(actor)) this.#metrics.set(actor, result.metrics);
        this.#callEnded(actor);
        const outputs = result.blocks.map((block) => ({ ref: block.ref, meta: { rows: block.rows, bytes: block.bytes } }));
        if (this.executor.failed) {
          dispose(outputs);
          return this.dropUnit(unit);
        }
        if (result.error) {
          dispose(outputs);
          return this.onStageError(unit, result.error);
        }
        if (result.written) this.recordWrite(unit, result.written);
        this.finished(unit, outputs);
      },
      (error: unknown) => {
        ref[Symbol.dispose]();
        this.#callEnded(actor);
        if (this.executor.failed) return this.dropUnit(unit);
        if (error instanceof ActorDiedError && unit.attempts < this.executor.options.maxRetries) {
          // The batch goes to another actor; the pool refills to its minimum.
          this.#removeActor(actor, false);
          unit.attempts++;
          this.unlaunched(unit);
          this.#retry.push(unit);
          this.executor.warn(`actor pool ${this.name}: an actor died; block ${unit.seq} is retried (attempt ${unit.attempts + 1})`);
          this.executor.schedule();
          return;
        }
        this.onInfrastructureError(unit, error);
      },
    );
  }

  /**
   * How a batch's blocks are made again if they are lost with their node after the call: the call
   * again on another of the pool's actors while there are some, else a task that builds the pool's
   * class and runs the batch. Not for a fused write (a rerun would write again). The actor names
   * the blocks it stores from the call (see DataPoolActor.process), so calls may interleave.
   */
  #rerun(targets: ReturnType<typeof taskTargets>, slices: ReturnType<typeof slicesOf>, blocks: Block[]): Recompute {
    return {
      task: rerunPoolBatch,
      args: [this.spec.classStage, this.spec.following, targets, slices, ...blocks],
      // Three retries after a worker's death, as any task has by default.
      options: taskOptionsOf(this.spec.compute, `${this.className} (rerun)`, 3),
      // While the pool lives its actors hold what the task would need: the call reruns on one
      // (one still starting takes it after its constructor, as it takes the pool's own calls).
      peers: () => [...this.#actors].filter((actor) => actor.state !== 'stopping').map((actor) => actor.handle),
    };
  }

  #callEnded(actor: PoolActor): void {
    actor.inflight--;
    if (actor.inflight === 0) actor.idleSince = Date.now();
  }

  /**
   * Grows on queued work the actors cannot take; shrinks actors idle past the timeout. Actors on a
   * node being taken back retire once their calls end, so the node is free to go before its
   * grace runs out; the pool refills elsewhere (or when resources come back).
   */
  override autoscale(): void {
    if (this.executor.failed) return;
    this.#checkAsks();
    if (this.executor.failed) return;
    for (const actor of [...this.#actors]) {
      if (actor.state === 'stopping' || (actor.state === 'ready' && actor.inflight > 0) || !this.#leaving(actor)) continue;
      this.executor.warn(`actor pool ${this.name}: a ${this.className} actor retires from a node being taken back`);
      this.#removeActor(actor);
    }
    const { running, pending } = this.counts();
    const total = running + pending;
    const now = Date.now();
    if (this.done()) {
      for (const actor of [...this.#actors]) this.#removeActor(actor);
      this.#withdrawAsks();
      return;
    }
    const minimum = this.#minimumNow();
    if (total < minimum) {
      for (let i = total; i < minimum; i++) this.#addActor();
      return;
    }
    // An actor added on resources that looked free can find them taken meanwhile (by tasks): on a
    // shared cluster it would wait for a node for good, the pool adding nothing while it does, so
    // one left unplaced for a while asks for room as a queued actor would.
    const unplaced = [...this.#actors].filter((actor) => actor.state === 'starting' && actor.placed === false && now - actor.added >= UNPLACED_ASK_MS).length;
    if (unplaced > 0) this.#askForRoom(total - unplaced, unplaced, false);
    const waiting = this.hasWork() && !this.#freeActor();
    if (waiting && pending === 0 && total < Math.min(this.pool.max, this.#actorCap())) {
      // Resources are read at most every 200 ms: state() walks the whole cluster (and the store).
      if (now - this.#lastScaleCheck > 200) {
        this.#lastScaleCheck = now;
        this.#resourcesFree = this.executor.resourcesFree(this.spec.compute);
      }
      if (this.#resourcesFree) {
        this.#resourcesFree = false;
        this.#addActor();
      } else {
        this.#askForRoom(total);
      }
      return;
    }
    if (!this.hasWork() && total > minimum) {
      for (const actor of this.#actors) {
        if (this.counts().running + this.counts().pending <= minimum) break;
        if (actor.state === 'ready' && actor.inflight === 0 && now - actor.idleSince >= this.pool.idleTimeoutMs) this.#removeActor(actor);
      }
    }
  }

  /**
   * On a shared cluster, asks the broker for a bundle per actor the pool may still add and its
   * queued work could use, less the asks not here yet (see ClusterOptions.autoscale).
   */
  #askForRoom(total: number, needed?: number, fatal = true): boolean {
    for (const ask of [...this.#asks]) if (ask.settled) this.#asks.delete(ask);
    const usable = needed ?? Math.ceil(this.queuedUnits / this.pool.maxTasksInFlightPerActor);
    const wanted = Math.min(this.pool.max - total, usable) - this.#asks.size;
    if (wanted <= 0) return true;
    // Actors of a fraction of a GPU share the whole device lent.
    const bundle = askedBundle(this.spec.compute);
    for (let i = 0; i < wanted; i++) {
      const ask = askForRoom(bundle);
      if (!ask) return false;
      this.#asks.add(ask);
      if (needed !== undefined && fatal) this.#minimumAsks.add(ask);
    }
    return true;
  }

  /**
   * An ask the broker refused (no host could ever hold one actor): fatal where the pool's minimum
   * needed it (its actors would wait forever), a warning otherwise (it cannot grow).
   */
  #checkAsks(): void {
    for (const ask of this.#asks) {
      if (ask.failed === undefined) continue;
      this.#asks.delete(ask);
      const message = `actor pool ${this.name}: the cluster cannot hold another ${this.className} actor: ${ask.failed}`;
      if (this.#minimumAsks.has(ask)) {
        this.executor.fail(new DataError('ERR_DATA_ACTOR_START', message, { operator: this.name }));
        return;
      }
      this.executor.warn(message);
    }
  }

  #withdrawAsks(): void {
    for (const ask of this.#asks) ask.withdraw();
    this.#asks.clear();
  }

  override truncate(): void {
    super.truncate();
    for (const unit of this.#retry) dispose(unit.blocks);
    this.#retry.clear();
  }

  override progress(): OperatorProgress {
    const { running, pending } = this.counts();
    const metrics = this.#summedMetrics();
    return { ...super.progress(), actors: { running, pending, min: this.pool.min, max: this.pool.max }, ...(metrics ? { metrics } : {}) };
  }

  #summedMetrics(): Record<string, number> | undefined {
    if (this.#metrics.size === 0 && Object.keys(this.#retiredMetrics).length === 0) return undefined;
    const sums: Record<string, number> = { ...this.#retiredMetrics };
    for (const metrics of this.#metrics.values()) for (const [name, value] of Object.entries(metrics)) sums[name] = (sums[name] ?? 0) + value;
    return sums;
  }

  override async shutdown(): Promise<void> {
    this.#withdrawAsks();
    for (const actor of [...this.#actors]) this.#removeActor(actor);
    for (const unit of this.#retry) dispose(unit.blocks);
    this.#retry.clear();
  }
}
