/**
 * The nodes of a static actor graph: an InputNode, actor method calls bound to their arguments,
 * collective operations over several actors' outputs, and a MultiOutputNode. Built once, then
 * compiled (see compile.ts) onto pre-allocated channels.
 */
import { InvalidArgumentError } from '../errors.js';
import type { ReduceOp } from '../gpu/communicator.js';

let nextNodeId = 0;

/** How a tensor-carrying edge moves: through the channel ('shm'), by CUDA IPC, or over a communicator. */
export type EdgeTransport = 'auto' | 'shm' | 'ipc' | 'nccl';

export interface CompileOptions {
  /** Executions that may be in flight before execute() waits (the channels' slots). Default 10. */
  maxInflight?: number;
  /** Initial bytes per channel slot; larger messages grow the slot. Default 1 MiB. */
  bufferBytes?: number;
  /** Milliseconds execute() may wait for room before its ref fails. Default: forever. */
  submitTimeout?: number;
  /** Milliseconds a ref's get waits for its result. Default: forever. */
  getTimeout?: number;
  /** Start reading the next execution's inputs while the current one computes. Default false. */
  overlap?: boolean;
  /** 'computed' (default): the static deadlock-free schedule; 'naive': each actor's bind order. */
  schedule?: 'computed' | 'naive';
  /** Communicators for collectives and 'nccl' edges: 'cpu' (default) or 'nccl' for CUDA tensors. */
  communicator?: 'cpu' | 'nccl';
}

export abstract class DAGNode {
  readonly id = nextNodeId++;
  transport: EdgeTransport = 'shm';

  /** How this node's output travels to its readers when it is a tensor. */
  withTensorTransport(transport: EdgeTransport): this {
    if (!['auto', 'shm', 'ipc', 'nccl'].includes(transport)) {
      throw new InvalidArgumentError(`tensor transport must be 'auto', 'shm', 'ipc' or 'nccl', got '${transport}'`);
    }
    this.transport = transport;
    return this;
  }

  /** The nodes this one reads. */
  abstract inputs(): DAGNode[];

  /** Compiles the graph whose output is this node. */
  async compile(options: CompileOptions = {}): Promise<import('./compiled-graph.js').CompiledGraph> {
    const { compileGraph } = await import('./compile.js');
    return compileGraph(this, options);
  }
}

/** The arguments of execute(): the first one itself, or one of them by position or key. */
export class InputNode extends DAGNode {
  inputs(): DAGNode[] {
    return [];
  }

  /** execute()'s argument at `index`. */
  at(index: number): InputAttributeNode {
    if (!Number.isInteger(index) || index < 0) throw new InvalidArgumentError(`input index must be a non-negative integer, got ${index}`);
    return new InputAttributeNode(this, { index });
  }

  /** Property `key` of execute()'s first argument. */
  get(key: string): InputAttributeNode {
    return new InputAttributeNode(this, { key });
  }
}

export class InputAttributeNode extends DAGNode {
  readonly input: InputNode;
  readonly index?: number;
  readonly key?: string;

  constructor(input: InputNode, attribute: { index?: number; key?: string }) {
    super();
    this.input = input;
    this.index = attribute.index;
    this.key = attribute.key;
  }

  inputs(): DAGNode[] {
    return [this.input];
  }
}

/** A call of `method` on an actor, with nodes or constants as arguments. */
export class ClassMethodNode extends DAGNode {
  readonly actorId: string;
  readonly className: string;
  readonly method: string;
  readonly args: unknown[];

  /** Keeps the actor alive while the node (and a graph compiled from it) lives. */
  readonly #lifetime: unknown;

  constructor(actorId: string, className: string, method: string, args: unknown[], lifetime?: unknown) {
    super();
    this.#lifetime = lifetime;
    this.actorId = actorId;
    this.className = className;
    this.method = method;
    this.args = args;
  }

  inputs(): DAGNode[] {
    return this.args.filter((arg): arg is DAGNode => arg instanceof DAGNode);
  }
}

export type CollectiveKind = 'allreduce' | 'allgather' | 'reducescatter';

/** One rank's result of a collective over several actors' tensors; computed on that rank's actor. */
export class CollectiveNode extends DAGNode {
  readonly kind: CollectiveKind;
  readonly source: ClassMethodNode;
  readonly members: ClassMethodNode[];
  readonly op: ReduceOp;
  readonly groupKey: number;

  constructor(kind: CollectiveKind, source: ClassMethodNode, members: ClassMethodNode[], op: ReduceOp, groupKey: number) {
    super();
    this.kind = kind;
    this.source = source;
    this.members = members;
    this.op = op;
    this.groupKey = groupKey;
  }

  get actorId(): string {
    return this.source.actorId;
  }

  inputs(): DAGNode[] {
    return [this.source];
  }
}

export class MultiOutputNode extends DAGNode {
  readonly outputs: DAGNode[];

  constructor(outputs: DAGNode[]) {
    super();
    if (!Array.isArray(outputs)) throw new InvalidArgumentError('MultiOutputNode takes an array of nodes');
    this.outputs = outputs;
  }

  inputs(): DAGNode[] {
    return this.outputs;
  }
}

function bindCollective(kind: CollectiveKind) {
  return {
    /** One output node per input, each computed on its input's actor. */
    bind(nodes: DAGNode[], options: { op?: ReduceOp } = {}): CollectiveNode[] {
      if (!Array.isArray(nodes) || nodes.length === 0) throw new InvalidArgumentError(`${kind} needs at least one node`);
      const members = nodes.map((node, index) => {
        if (!(node instanceof ClassMethodNode)) throw new InvalidArgumentError(`${kind} input ${index} is not an actor method node`);
        return node;
      });
      if (new Set(members.map((node) => node.actorId)).size !== members.length) {
        throw new InvalidArgumentError(`${kind} needs its inputs on distinct actors (one rank each)`);
      }
      const groupKey = nextNodeId++;
      return members.map((member) => new CollectiveNode(kind, member, members, options.op ?? 'sum', groupKey));
    },
  };
}

/** Collective nodes: the CPU communicator for CPU tensors, NCCL for CUDA tensors. */
export const collective = {
  allreduce: bindCollective('allreduce'),
  allgather: bindCollective('allgather'),
  reducescatter: bindCollective('reducescatter'),
};
