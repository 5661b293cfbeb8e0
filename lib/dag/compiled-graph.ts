/**
 * A compiled graph in the driver: writes each execution's input to the input channel, reads the
 * outputs in order (buffering them for out-of-order gets), and tears everything down — channels,
 * exec loops, communicators — without ever hanging, also when an actor dies mid-graph.
 */
import { ActorDiedError, ChannelError, GetTimeoutError, InvalidArgumentError, TaskError, TrellisError, type RemoteErrorInfo } from '../errors.js';
import { get, kill } from '../core/api.js';
import { currentRuntime } from '../core/runtime-context.js';
import { makeActorHandle, type ActorHandle } from '../core/registry.js';
import { CollectiveGroup, createCollectiveGroup } from '../gpu/collective.js';
import { native } from '../native.js';
import { ChannelReader, ChannelWriter, destroyChannel, encodeMessage, eventLoopTurn, starving, type Message } from './channel.js';
import type { CompileOptions } from './nodes.js';
import type { ActorPlan } from './plan.js';

export interface GraphLayout {
  graphId: string;
  channels: string[];
  inputChannel: string;
  outputs: Array<{ channel: string; reader: number; label: string }>;
  plans: ActorPlan[];
  groups: Array<{ name: string; actorIds: string[] }>;
  /** The root was a MultiOutputNode: results are arrays. */
  multiOutput: boolean;
  steps?: Map<number, number>;
  labels?: Map<number, string>;
  actorNames?: Map<string, string>;
}

/** Bounds every wait of a teardown, so that it always ends. */
const TEARDOWN_STEP_MS = 5_000;

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout;
  return Promise.race([promise, new Promise<undefined>((resolve) => (timer = setTimeout(() => resolve(undefined), ms)))]).finally(() => clearTimeout(timer));
}

/** The result of one execution: await it, or get() it with a timeout. */
export class CompiledRef<T = unknown> implements PromiseLike<T> {
  readonly sequence: number;
  readonly #graph: CompiledGraph;
  #promise: Promise<T> | undefined;

  /** @internal */
  constructor(graph: CompiledGraph, sequence: number) {
    this.#graph = graph;
    this.sequence = sequence;
  }

  get(options: { timeout?: number } = {}): Promise<T> {
    return this.#graph.result(this.sequence, options.timeout) as Promise<T>;
  }

  then<A = T, B = never>(onResolved?: ((value: T) => A | PromiseLike<A>) | null, onRejected?: ((reason: unknown) => B | PromiseLike<B>) | null): Promise<A | B> {
    this.#promise ??= this.get();
    return this.#promise.then(onResolved, onRejected);
  }
}

type Settled = { ok: true; value: unknown } | { ok: false; error: Error };

export class CompiledGraph {
  readonly graphId: string;
  readonly #layout: GraphLayout;
  readonly #options: CompileOptions;
  readonly #input: ChannelWriter;
  readonly #outputs: ChannelReader[];
  readonly #groups: CollectiveGroup[];
  readonly #results = new Map<number, Settled>();
  readonly #actorIds: string[];
  #submitted = 0;
  #readSequence = 0;
  #reading: Promise<void> | undefined;
  /** This execution's outputs read so far (all of them, or some before a get timed out). */
  #partial: Message[] = [];
  /**
   * Inputs that found the input ring full, in submission order; the first #batch of them are being
   * written by the channel's thread (#writing).
   */
  readonly #queued: Array<{ sequence: number; bytes: Uint8Array }> = [];
  #batch = 0;
  #writing: Promise<void> | undefined;
  /** Executions whose input could not be written: no output will come for them. */
  readonly #unsubmitted = new Set<number>();
  #broken: Error | undefined;
  #tornDown = false;
  readonly #stopWatching: () => void;

  /** Handles to its actors: a graph keeps them alive until teardown, as a handle would. */
  #actorHandles: unknown[];

  private constructor(layout: GraphLayout, options: CompileOptions, groups: CollectiveGroup[]) {
    this.graphId = layout.graphId;
    this.#actorHandles = layout.plans.map((plan) => makeActorHandle(plan.actorId, { module: '', name: layout.actorNames?.get(plan.actorId) ?? 'actor' }, []));
    this.#layout = layout;
    this.#options = options;
    this.#groups = groups;
    this.#input = new ChannelWriter(layout.inputChannel);
    this.#outputs = layout.outputs.map((output) => new ChannelReader(output.channel, output.reader));
    this.#actorIds = layout.plans.map((plan) => plan.actorId);
    this.#stopWatching = currentRuntime().watchActors(this.#actorIds, (actorId, cause) => {
      if (this.#tornDown) return;
      this.#break(new ActorDiedError(actorId, `an actor of compiled graph ${this.graphId} died: ${cause}`));
    });
  }

  /** @internal */
  static async start(layout: GraphLayout, options: CompileOptions): Promise<CompiledGraph> {
    const groups: CollectiveGroup[] = [];
    const runtime = currentRuntime();
    try {
      for (const group of layout.groups) {
        const handles = group.actorIds.map((actorId) => makeActorHandle(actorId, { module: '', name: layout.actorNames?.get(actorId) ?? 'actor' }, []));
        groups.push(await createCollectiveGroup(handles as ActorHandle<any>[], { backend: options.communicator ?? 'cpu', name: group.name }));
      }
      // Each actor opens its channel ends before any execution is written.
      await get(layout.plans.map((plan) => runtime.submitActorTask(plan.actorId, '__trellis_dag_start', [plan])));
    } catch (error) {
      for (const group of groups) await group.destroy().catch(() => {});
      for (const name of layout.channels) destroyChannel(name);
      throw error;
    }
    return new CompiledGraph(layout, options, groups);
  }

  /** Runs the graph on `args`; with maxInflight executions unread, the input waits for room. */
  execute<T = unknown>(...args: unknown[]): CompiledRef<T> {
    if (this.#broken) throw this.#broken;
    if (this.#tornDown) throw new TrellisError('ERR_GRAPH_TORN_DOWN', `compiled graph ${this.graphId} was torn down`);
    const sequence = this.#submitted++;
    const bytes = encodeMessage({ ok: true, value: args });
    if (this.#queued.length > 0 || !this.#input.tryWrite(bytes)) {
      // Backpressure: held here in order, written as readers make room.
      this.#queued.push({ sequence, bytes });
      this.#writeQueued();
    }
    return new CompiledRef<T>(this, sequence);
  }

  /**
   * Writes queued inputs: at once while there is room, the rest handed to the channel's thread as
   * one batch, which it writes in order as room comes (no JS turn per input, so the driver may wait
   * for results on this thread meanwhile). Inputs queued during a batch go in the next one.
   */
  #writeQueued(): void {
    if (this.#writing) return;
    while (this.#queued.length > 0 && this.#input.tryWrite(this.#queued[0].bytes)) this.#queued.shift();
    if (this.#queued.length === 0 || this.#tornDown) return;
    const batch = this.#queued.map((entry) => entry.bytes);
    const before = this.#input.written;
    this.#batch = batch.length;
    this.#writing = this.#input.writeAsync(batch, this.#options.submitTimeout ?? Infinity).then(
      () => {
        this.#queued.splice(0, this.#batch);
        this.#batch = 0;
        this.#writing = undefined;
        this.#writeQueued();
      },
      (error: Error) => {
        // The first input the thread could not write, and everything behind it, can no longer be
        // submitted in order.
        this.#queued.splice(0, Math.max(0, this.#input.written - before));
        this.#batch = 0;
        this.#writing = undefined;
        for (const { sequence } of this.#queued.splice(0)) {
          this.#unsubmitted.add(sequence);
          this.#results.set(sequence, { ok: false, error: this.#translate(error, 'submit') });
        }
      },
    );
  }

  /** @internal The settled result of execution `sequence`, reading outputs in order as needed. */
  result(sequence: number, timeout = this.#options.getTimeout ?? Infinity): Promise<unknown> {
    // The common case, the next execution in order with nothing else reading: its outputs usually
    // come within the readers' first (synchronous) wait, and the result costs no promise hop.
    if (sequence === this.#readSequence && !this.#reading && !this.#broken && !this.#results.has(sequence) && sequence < this.#submitted && !starving()) {
      let reading: Promise<void> | undefined;
      try {
        reading = this.#readNext(timeout);
      } catch (error) {
        return Promise.reject(error);
      }
      if (reading) this.#reading = reading.finally(() => (this.#reading = undefined));
      else return this.#settle(sequence) ?? this.#waitFor(sequence, timeout);
    }
    return this.#waitFor(sequence, timeout);
  }

  /** The promise of execution `sequence`'s settled result, once it is read; undefined until then. */
  #settle(sequence: number): Promise<unknown> | undefined {
    const settled = this.#results.get(sequence);
    if (!settled) return undefined;
    this.#results.delete(sequence);
    return settled.ok ? Promise.resolve(settled.value) : Promise.reject(settled.error);
  }

  async #waitFor(sequence: number, timeout: number): Promise<unknown> {
    const deadline = Date.now() + timeout;
    for (;;) {
      const settled = this.#settle(sequence);
      if (settled) return settled;
      if (sequence >= this.#submitted) throw new InvalidArgumentError(`execution ${sequence} was never submitted`);
      if (this.#broken) throw this.#broken;
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new GetTimeoutError(`execution ${sequence} of compiled graph ${this.graphId} did not finish within ${timeout} ms`);
      if (!this.#reading) {
        // Give the event loop a turn first when the reads before kept it from one.
        if (starving()) await eventLoopTurn();
        if (this.#results.has(sequence) || this.#reading) continue;
        const reading = this.#readNext(remaining);
        if (!reading) continue;
        this.#reading = reading.finally(() => (this.#reading = undefined));
      }
      await this.#reading.catch((error) => {
        if (error instanceof GetTimeoutError) throw error;
      });
    }
  }

  /**
   * Reads the next execution's outputs into #results: synchronously (undefined) when each comes
   * within its reader's first wait, else a promise of the end.
   */
  #readNext(timeout: number): Promise<void> | undefined {
    // Outputs read before a timeout stay here for the next try: they belong to this execution.
    const messages = this.#partial;
    // Block the JS thread only when no queued input waits for it (those of a batch do not).
    const blocking = this.#queued.length === this.#batch;
    try {
      while (messages.length < this.#outputs.length) {
        const read = this.#outputs[messages.length].read(timeout, blocking);
        if (read instanceof Promise) return this.#readRest(read, timeout);
        messages.push(read);
      }
    } catch (error) {
      this.#readFailed(error as Error, timeout);
      return undefined;
    }
    this.#store();
    return undefined;
  }

  async #readRest(pending: Promise<Message>, timeout: number): Promise<void> {
    const messages = this.#partial;
    try {
      messages.push(await pending);
      while (messages.length < this.#outputs.length) {
        const read = this.#outputs[messages.length].read(timeout, this.#queued.length === this.#batch);
        messages.push(read instanceof Promise ? await read : read);
      }
    } catch (error) {
      this.#readFailed(error as Error, timeout);
      return;
    }
    this.#store();
  }

  #readFailed(error: Error, timeout: number): void {
    if (error instanceof ChannelError && error.code === 'ERR_CHANNEL_TIMEOUT') {
      throw new GetTimeoutError(`compiled graph ${this.graphId} produced no result within ${timeout} ms`);
    }
    this.#break(this.#translate(error, 'get'));
  }

  #store(): void {
    const messages = this.#partial;
    this.#partial = [];
    while (this.#unsubmitted.delete(this.#readSequence)) this.#readSequence++;
    const sequence = this.#readSequence++;
    let failed: { ok: false; error: RemoteErrorInfo } | undefined;
    for (const message of messages) if (!message.ok) failed ??= message;
    if (failed) {
      this.#results.set(sequence, { ok: false, error: new TaskError(failed.error.code === 'ERR_DAG_NODE' ? failed.error.message : 'compiled graph node', failed.error) });
    } else if (this.#layout.multiOutput) {
      this.#results.set(sequence, { ok: true, value: messages.map((message) => (message as { value: unknown }).value) });
    } else {
      this.#results.set(sequence, { ok: true, value: (messages[0] as { value: unknown }).value });
    }
  }

  #translate(error: Error, what: string): Error {
    if (this.#broken) return this.#broken;
    if (error instanceof ChannelError && error.code === 'ERR_CHANNEL_CLOSED') {
      return new TrellisError('ERR_GRAPH_TORN_DOWN', `compiled graph ${this.graphId} was torn down during ${what}`);
    }
    return error;
  }

  /** An actor died: close every channel so that nobody waits on it, and fail what is pending. */
  #break(error: Error): void {
    if (this.#broken) return;
    this.#broken = error;
    this.#closeChannels();
    void this.teardown();
  }

  #closeChannels(): void {
    for (const name of this.#layout.channels) {
      try {
        const end = new native.NativeChannel(name, -1);
        end.close();
        end.release();
      } catch {
        // Already destroyed.
      }
    }
  }

  /**
   * Stops the graph: closes its channels (waking any reader or writer blocked on them), ends the
   * exec loops, destroys communicators and channels. The actors stay usable, unless killActors.
   */
  async teardown(options: { killActors?: boolean } = {}): Promise<void> {
    if (this.#tornDown) return;
    this.#tornDown = true;
    this.#stopWatching();
    this.#closeChannels();
    const runtime = currentRuntime();
    const stops = this.#actorIds.map((actorId) => get(runtime.submitActorTask(actorId, '__trellis_dag_stop', [this.graphId])).catch(() => {}));
    await withTimeout(Promise.all(stops), TEARDOWN_STEP_MS);
    for (const group of this.#groups) await withTimeout(group.destroy().catch(() => {}), TEARDOWN_STEP_MS);
    if (this.#writing) await withTimeout(this.#writing, TEARDOWN_STEP_MS);
    this.#input.release();
    for (const reader of this.#outputs) reader.release();
    for (const name of this.#layout.channels) destroyChannel(name);
    if (options.killActors) {
      for (const actorId of this.#actorIds) kill(makeActorHandle(actorId, { module: '', name: 'actor' }, []));
    }
    // From here the actors live only as long as handles elsewhere do.
    this.#actorHandles = [];
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.teardown();
  }

  /** The graph as Graphviz DOT and as text: actors, operations in schedule order, and channels. */
  visualize(): { dot: string; text: string } {
    const label = (id: number) => this.#layout.labels?.get(id) ?? `#${id}`;
    const lines: string[] = [`compiled graph ${this.graphId}`];
    const dot: string[] = ['digraph compiled {', '  rankdir=LR;', '  driver [shape=box, label="driver"];'];
    this.#layout.plans.forEach((plan, index) => {
      lines.push(`actor ${this.#layout.actorNames?.get(plan.actorId) ?? ''} (${plan.actorId}):`);
      dot.push(`  subgraph cluster_${index} {`, `    label="${this.#layout.actorNames?.get(plan.actorId) ?? 'actor'} ${plan.actorId}";`);
      plan.operations.forEach((operation, step) => {
        let text: string;
        switch (operation.op) {
          case 'read': text = `READ ${label(operation.node)} from ${operation.channel}[${operation.reader}]${operation.ipc ? ' (CUDA IPC)' : ''}`; break;
          case 'write': text = `WRITE ${label(operation.node)} to ${operation.channel}${operation.ipc ? ' (CUDA IPC)' : ''}`; break;
          case 'compute': text = `COMPUTE ${operation.label}`; break;
          case 'attr': text = `INPUT ${label(operation.node)}`; break;
          case 'collective': text = `${operation.kind.toUpperCase()} ${label(operation.node)} over ${operation.group}`; break;
          case 'exchange': text = `EXCHANGE ${[...operation.sends.map((s) => `send ${label(s.node)}->rank ${s.peer}`), ...operation.recvs.map((r) => `recv ${label(r.node)}<-rank ${r.peer}`)].join(', ')}`; break;
        }
        lines.push(`  ${String(step).padStart(2)}. ${text}`);
        dot.push(`    a${index}_${step} [label="${text.replace(/"/g, "'")}"];`);
        if (step > 0) dot.push(`    a${index}_${step - 1} -> a${index}_${step} [style=dotted];`);
      });
      dot.push('  }');
    });
    lines.push('channels:');
    lines.push(`  input: ${this.#layout.inputChannel}`);
    this.#layout.outputs.forEach((output) => lines.push(`  output ${output.label}: ${output.channel}[${output.reader}]`));
    for (const name of this.#layout.channels) dot.push(`  "${name}" [shape=cds];`);
    this.#layout.plans.forEach((plan, index) =>
      plan.operations.forEach((operation, step) => {
        if (operation.op === 'read') dot.push(`  "${operation.channel}" -> a${index}_${step};`);
        if (operation.op === 'write') dot.push(`  a${index}_${step} -> "${operation.channel}";`);
      }),
    );
    dot.push(`  driver -> "${this.#layout.inputChannel}";`);
    for (const output of this.#layout.outputs) dot.push(`  "${output.channel}" -> driver;`);
    dot.push('}');
    return { dot: dot.join('\n'), text: lines.join('\n') };
  }
}
