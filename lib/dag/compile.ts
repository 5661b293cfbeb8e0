/**
 * Compiling a graph: validate it, order it, split each node into read, compute and write
 * operations per actor, compute a static schedule in which every blocking communication is matched
 * on all its ranks at the same step, allocate one channel per edge, and start one exec loop per
 * actor.
 */
import { InvalidArgumentError, SerializationError } from '../errors.js';
import { get, state } from '../core/api.js';
import { currentRuntime } from '../core/runtime-context.js';
import { hostIdentity } from '../core/host.js';
import { pack } from '../core/serialization.js';
import { createChannel } from './channel.js';
import { CompiledGraph, type GraphLayout } from './compiled-graph.js';
import {
  ClassMethodNode,
  CollectiveNode,
  DAGNode,
  InputAttributeNode,
  InputNode,
  MultiOutputNode,
  type CompileOptions,
} from './nodes.js';
import type { ActorPlan, ArgSpec, Operation } from './plan.js';
import { newObjectId } from '../store/object-id.js';

type ComputeNode = ClassMethodNode | CollectiveNode;

export class GraphValidationError extends InvalidArgumentError {
  constructor(message: string) {
    super(message, 'ERR_INVALID_GRAPH');
  }
}

/** Every node reachable from `root`, failing on cycles. */
function collect(root: DAGNode): DAGNode[] {
  const order: DAGNode[] = [];
  const color = new Map<DAGNode, 'visiting' | 'done'>();
  const visit = (node: DAGNode, path: DAGNode[]) => {
    if (!(node instanceof DAGNode)) throw new GraphValidationError('a graph holds something that is not a node');
    const mark = color.get(node);
    if (mark === 'done') return;
    if (mark === 'visiting') {
      const cycle = [...path.slice(path.indexOf(node)), node].map(describe).join(' -> ');
      throw new GraphValidationError(`the graph has a cycle: ${cycle}`);
    }
    color.set(node, 'visiting');
    for (const input of node.inputs()) visit(input, [...path, node]);
    color.set(node, 'done');
    order.push(node);
  };
  visit(root, []);
  return order;
}

export function describe(node: DAGNode): string {
  if (node instanceof ClassMethodNode) return `${node.className}.${node.method}#${node.id}`;
  if (node instanceof CollectiveNode) return `${node.kind}#${node.id}`;
  if (node instanceof InputAttributeNode) return node.index !== undefined ? `input[${node.index}]` : `input.${node.key}`;
  if (node instanceof InputNode) return 'input';
  return `node#${node.id}`;
}

/**
 * Asks each actor whether it can use CUDA (IPC edges), and checks that all run on this host:
 * channels are shared memory, so a graph's actors share the machine that compiles it.
 */
async function probeActors(actorIds: string[], names: Map<string, string>): Promise<Set<string>> {
  if (actorIds.length === 0) return new Set();
  const runtime = currentRuntime();
  const answers = (await get(actorIds.map((actorId) => runtime.submitActorTask(actorId, '__trellis_dag_probe', [])))) as Array<{ cuda: boolean; host: string }>;
  const here = hostIdentity();
  answers.forEach((answer, index) => {
    if (answer.host !== here) {
      throw new GraphValidationError(
        `actor ${names.get(actorIds[index]) ?? actorIds[index]} runs on ${answer.host}, not on ${here} where the graph is compiled: ` +
          "a compiled graph's channels are shared memory, so its actors must share the compiling host (place them there, e.g. by node affinity)",
      );
    }
  });
  return new Set(actorIds.filter((_, index) => answers[index].cuda));
}

export async function compileGraph(root: DAGNode, options: CompileOptions): Promise<CompiledGraph> {
  const maxInflight = options.maxInflight ?? 10;
  const bufferBytes = options.bufferBytes ?? 1 << 20;
  if (!Number.isInteger(maxInflight) || maxInflight < 1 || maxInflight > 1024) {
    throw new InvalidArgumentError(`maxInflight must be an integer from 1 to 1024, got ${maxInflight}`);
  }
  const outputs = root instanceof MultiOutputNode ? root.outputs : [root];
  if (outputs.length === 0) throw new GraphValidationError('the graph has no outputs: MultiOutputNode([]) computes nothing');
  for (const output of outputs) {
    if (output instanceof MultiOutputNode) throw new GraphValidationError('a MultiOutputNode can only be the root of a graph');
    if (output instanceof InputNode || output instanceof InputAttributeNode) {
      throw new GraphValidationError('an output must be an actor method or collective node, not the input itself');
    }
  }
  const nodes = collect(root).filter((node) => !(node instanceof MultiOutputNode));
  const inputs = nodes.filter((node): node is InputNode => node instanceof InputNode);
  if (inputs.length === 0) throw new GraphValidationError('the graph never reads its InputNode: bind at least one method to the input');
  if (inputs.length > 1) throw new GraphValidationError(`a graph has one InputNode; this one has ${inputs.length}`);
  const input = inputs[0];

  const computes = nodes.filter((node): node is ComputeNode => node instanceof ClassMethodNode || node instanceof CollectiveNode);
  // The driver sees every actor's state; a worker compiling a graph learns of a dead actor when
  // the graph's start call to it fails instead.
  if (currentRuntime().context().isDriver) {
    const live = new Set(state().actors.filter((actor) => actor.state !== 'dead').map((actor) => actor.actorId));
    for (const node of computes) {
      if (!live.has(node.actorId)) throw new GraphValidationError(`node ${describe(node)} has no live actor (actor ${node.actorId})`);
    }
  }
  for (const node of nodes) {
    if (node instanceof ClassMethodNode) {
      node.args.forEach((arg, index) => {
        if (arg instanceof DAGNode) return;
        try {
          pack(arg);
        } catch (error) {
          throw new SerializationError(`argument ${index} of ${describe(node)} cannot be sent: ${(error as Error).message}`);
        }
      });
    }
  }

  // Steps: a node runs one step after the latest of its inputs; a collective's ranks share one step
  // (after the latest of all their inputs). Settled by iterating to a fixed point: steps only grow.
  const step = new Map<DAGNode, number>();
  const stepOf = (node: DAGNode): number => step.get(node) ?? 0;
  for (let changed = true; changed; ) {
    changed = false;
    for (const node of nodes) {
      let next = 0;
      if (node instanceof ClassMethodNode) next = 1 + Math.max(0, ...node.inputs().map(stepOf));
      else if (node instanceof CollectiveNode) next = 1 + Math.max(...node.members.map(stepOf));
      if (next !== stepOf(node)) {
        step.set(node, next);
        changed = true;
      }
    }
  }
  const collectiveGroups = new Map<number, CollectiveNode[]>();
  for (const node of computes) {
    if (!(node instanceof CollectiveNode)) continue;
    const members = collectiveGroups.get(node.groupKey) ?? [];
    members.push(node);
    collectiveGroups.set(node.groupKey, members);
  }
  for (const [key, members] of collectiveGroups) {
    if (members.length !== members[0].members.length) {
      throw new GraphValidationError(`collective #${key} is used by only ${members.length} of its ${members[0].members.length} ranks: every rank's output must be part of the graph`);
    }
  }

  const actorOf = (node: DAGNode): string | undefined => (node instanceof ClassMethodNode || node instanceof CollectiveNode ? node.actorId : undefined);
  const actors = [...new Set(computes.map((node) => node.actorId))];

  // Consumers of each value: actors (by transport) and the driver.
  const consumers = new Map<DAGNode, { shm: Set<string>; exchange: Set<string>; driver: boolean }>();
  const use = (node: DAGNode) => {
    let entry = consumers.get(node);
    if (!entry) consumers.set(node, (entry = { shm: new Set(), exchange: new Set(), driver: false }));
    return entry;
  };
  for (const node of computes) {
    const sources = node instanceof CollectiveNode ? [node.source] : node.inputs();
    for (const source of sources) {
      const from = source instanceof InputAttributeNode ? source.input : source;
      const producer = actorOf(from);
      if (producer === node.actorId) continue;
      // 'auto' and 'ipc' edges travel through the channel too: CPU tensors as bytes, CUDA tensors
      // as IPC handles where the channel allows (see ipcNodes below).
      if (from !== input && from.transport === 'nccl') use(from).exchange.add(node.actorId);
      else use(from).shm.add(node.actorId);
    }
  }
  for (const output of outputs) use(output).driver = true;

  if (!consumers.get(input)?.shm.size) throw new GraphValidationError('the graph never reads its InputNode');

  // CUDA IPC: a value on an 'ipc' edge, or an 'auto' one whose actors all have CUDA, read only by
  // actors (the driver reads through shared memory), carries CUDA tensors as IPC handles.
  const ipcCandidates = [...consumers].filter(([node, entry]) => node !== input && (node.transport === 'ipc' || node.transport === 'auto') && !entry.driver && entry.shm.size > 0);
  const autoActors = new Set<string>();
  for (const [node, entry] of ipcCandidates) {
    if (node.transport !== 'auto') continue;
    autoActors.add(actorOf(node)!);
    for (const actor of entry.shm) autoActors.add(actor);
  }
  const probed = await probeActors(actors, new Map(computes.map((node) => [node.actorId, describe(node)])));
  const withCuda = new Set([...autoActors].filter((actor) => probed.has(actor)));
  const ipcNodes = new Set(
    ipcCandidates.filter(([node, entry]) => node.transport === 'ipc' || [actorOf(node)!, ...entry.shm].every((actor) => withCuda.has(actor))).map(([node]) => node),
  );

  // Channels: one per value read through shared memory, one reader per consuming actor (+ driver).
  const channelOf = new Map<DAGNode, { name: string; readers: Map<string, number> }>();
  const layout: GraphLayout = { graphId: `graph-${newObjectId().slice(0, 10)}`, channels: [], inputChannel: '', outputs: [], plans: [], groups: [], multiOutput: root instanceof MultiOutputNode };
  for (const [node, entry] of consumers) {
    const readers = [...entry.shm];
    if (entry.driver) readers.push('driver');
    if (readers.length === 0) continue;
    const name = createChannel(maxInflight, readers.length, bufferBytes);
    layout.channels.push(name);
    channelOf.set(node, { name, readers: new Map(readers.map((reader, index) => [reader, index])) });
  }
  layout.inputChannel = channelOf.get(input)!.name;
  layout.outputs = outputs.map((output) => {
    const channel = channelOf.get(output)!;
    return { channel: channel.name, reader: channel.readers.get('driver')!, label: describe(output) };
  });

  // Communicators: one group per collective, and one for tensor exchanges between actors.
  const exchangeActors = new Set<string>();
  for (const [node, entry] of consumers) {
    if (entry.exchange.size === 0) continue;
    exchangeActors.add(actorOf(node)!);
    for (const actor of entry.exchange) exchangeActors.add(actor);
  }
  const groupNames = new Map<number, string>();
  for (const [key, members] of collectiveGroups) {
    const name = `${layout.graphId}-c${key}`;
    groupNames.set(key, name);
    layout.groups.push({ name, actorIds: members.map((member) => member.actorId) });
  }
  const exchangeGroup = `${layout.graphId}-x`;
  const exchangeRanks = [...exchangeActors];
  if (exchangeRanks.length > 0) layout.groups.push({ name: exchangeGroup, actorIds: exchangeRanks });

  // Each actor's operations.
  const naive = options.schedule === 'naive';
  for (const actorId of actors) {
    const mine = computes.filter((node) => node.actorId === actorId);
    const ops: Array<{ step: number; phase: number; order: number; op: Operation }> = [];
    const readDone = new Set<DAGNode>();
    const add = (stepNumber: number, phase: number, order: number, op: Operation) => ops.push({ step: stepNumber, phase, order, op });
    for (const node of mine) {
      const at = naive ? node.id : stepOf(node);
      const order = node.id;
      const sources = node instanceof CollectiveNode ? [node.source] : node.inputs();
      for (const source of sources) {
        const from = source instanceof InputAttributeNode ? source.input : source;
        if (actorOf(from) === actorId || readDone.has(from)) continue;
        readDone.add(from);
        const channel = channelOf.get(from);
        if (channel?.readers.has(actorId)) {
          add(at, 0, order, { op: 'read', channel: channel.name, reader: channel.readers.get(actorId)!, node: from.id, ...(ipcNodes.has(from) ? { ipc: true } : {}) });
        } else {
          // Received over the exchange group: at the producer's step (computed), or just before use (naive).
          const peer = exchangeRanks.indexOf(actorOf(from)!);
          add(naive ? at : stepOf(from), naive ? 0 : 4, from.id, { op: 'exchange', group: exchangeGroup, sends: [], recvs: [{ node: from.id, peer }] });
        }
      }
      for (const source of sources) {
        if (source instanceof InputAttributeNode) add(at, 1, source.id, { op: 'attr', node: source.id, input: input.id, index: source.index, key: source.key });
      }
      if (node instanceof ClassMethodNode) {
        const args: ArgSpec[] = node.args.map((arg) => {
          if (arg === input) return { input: true };
          if (arg instanceof DAGNode) return { node: arg.id };
          return { constant: pack(arg) };
        });
        add(at, 2, order, { op: 'compute', node: node.id, method: node.method, args, label: describe(node) });
      } else {
        add(at, 2, order, { op: 'collective', node: node.id, kind: node.kind, source: node.source.id, group: groupNames.get(node.groupKey)!, reduce: node.op });
      }
      const channel = channelOf.get(node);
      if (channel) add(at, 3, order, { op: 'write', channel: channel.name, node: node.id, ...(ipcNodes.has(node) ? { ipc: true } : {}) });
      for (const consumer of consumers.get(node)?.exchange ?? []) {
        add(at, naive ? 3 : 4, order, { op: 'exchange', group: exchangeGroup, sends: [{ node: node.id, peer: exchangeRanks.indexOf(consumer) }], recvs: [] });
      }
    }
    ops.sort((a, b) => a.step - b.step || a.phase - b.phase || a.order - b.order);
    // The computed schedule issues all transfers of one step together, so sends meet receives.
    const operations: Operation[] = [];
    let previousStep = -1;
    for (const entry of ops) {
      const previous = operations[operations.length - 1];
      if (!naive && entry.op.op === 'exchange' && previous?.op === 'exchange' && entry.step === previousStep) {
        previous.sends.push(...entry.op.sends);
        previous.recvs.push(...entry.op.recvs);
      } else {
        operations.push(entry.op);
      }
      previousStep = entry.step;
    }
    const plan: ActorPlan = { graphId: layout.graphId, actorId, operations, inputNode: input.id, overlap: options.overlap ?? false, writeTimeout: options.submitTimeout ?? Infinity };
    layout.plans.push(plan);
  }
  layout.steps = new Map(computes.map((node) => [node.id, stepOf(node)]));
  layout.labels = new Map(nodes.map((node) => [node.id, describe(node)]));
  layout.actorNames = new Map(computes.map((node) => [node.actorId, node instanceof ClassMethodNode ? node.className : node.source.className]));
  return CompiledGraph.start(layout, options);
}
