/**
 * A node agent's node, as its head sees it: the scheduler places work on it as on a local node;
 * its workers are processes the agent starts on its host, which connect to the head over TCP;
 * its objects are in the agent's store, reached by requests over the agent's connection.
 */
import { EventEmitter } from 'node:events';
import { randomBytes } from 'node:crypto';
import { newObjectId } from '../store/object-id.js';
import type { ObjectStore, PinnedObjectInfo, StoreStats } from '../store/object-store.js';
import { NodeLostError } from '../errors.js';
import { AgentRequests } from './agent-requests.js';
import type { BulkPlace, FrameConnection } from './connection.js';
import type { AgentHelloMessage, AgentMessage, AgentRequestMessage, HeadMessage } from './agent-protocol.js';
import { Node, WorkerProcess, type WorkerChild } from './node.js';
import { driverRunsTypeScript } from './worker-loader.js';
import type { WorkerEnvironment } from './options.js';
import type { ObjectSource, ObjectTarget, ObjectWriter } from './object-transfer.js';
import { servedSource } from './object-server.js';
import type { CodeLayer, PackedWorkingDirectory } from './code-package.js';

/** Pieces a package is sent to an agent in (as objects' chunks). */
const CODE_CHUNK_BYTES = 4 << 20;

/** A worker process on an agent's host: killed through the agent, whose reports end it here. */
class RemoteChild extends EventEmitter implements WorkerChild {
  pid: number | undefined;
  #exited = false;

  constructor(private readonly node: RemoteNode, private readonly workerId: string) {
    super();
  }

  kill(): boolean {
    if (this.#exited) return false;
    this.node.send({ t: 'kill-worker', workerId: this.workerId });
    return true;
  }

  exited(code: number | null = null, signal: NodeJS.Signals | null = null): void {
    if (this.#exited) return;
    this.#exited = true;
    this.emit('exit', code, signal);
  }
}

export class RemoteNode extends Node {
  readonly hostname: string;
  readonly agentPid: number;
  readonly storeName: string;
  /** Where other agents pull objects from this one's store (none: through the head). */
  readonly transfer: { host: string; port: number } | undefined;
  readonly #connection: FrameConnection<AgentMessage, HeadMessage>;
  readonly #children = new Map<string, RemoteChild>();
  readonly #requests: AgentRequests;
  #stats: StoreStats;
  #closed = false;
  /** Deletes batched per tick: freeing many objects sends one message. */
  #deletes: string[] = [];
  /** The driver's working directory as installed on the agent's host. */
  #workingDirectory: { path: string; rootUrl: string } | undefined;

  constructor(
    hello: AgentHelloMessage,
    connection: FrameConnection<AgentMessage, HeadMessage>,
    workerEnvironment: Record<string, string>,
    /** Where its workers' output goes (undefined: it stays on the agent's host). */
    private readonly output?: (line: { nodeId: string; pid: number; stream: 'stdout' | 'stderr'; text: string }) => void,
  ) {
    super(hello.nodeId, hello.resources, hello.numGpus, workerEnvironment);
    this.hostname = hello.hostname;
    this.agentPid = hello.pid;
    this.storeName = hello.storeName;
    this.transfer = hello.transfer;
    this.#stats = hello.store;
    this.#connection = connection;
    this.#requests = new AgentRequests(this.id, (message, bulk) => (bulk ? connection.sendBulk(message, bulk) : connection.send(message)));
    // Read answers land straight in the store object they are copied into.
    connection.bulkSink = (message) => this.#requests.sinkFor(message);
  }

  get localStore(): ObjectStore | undefined {
    return undefined;
  }

  get closed(): boolean {
    return this.#closed || this.#connection.closed;
  }

  send(message: HeadMessage): void {
    this.#connection.send(message);
  }

  /** When the agent was last heard from (it reports its store every second). */
  lastHeard = Date.now();

  /** A message from the agent (after its hello). */
  onMessage(message: AgentMessage): void {
    this.lastHeard = Date.now();
    switch (message.t) {
      case 'worker-spawned': {
        const child = this.#children.get(message.workerId);
        if (child) child.pid = message.pid;
        return;
      }
      case 'worker-exited':
        this.#children.get(message.workerId)?.exited(message.code, message.signal as NodeJS.Signals | null);
        this.#children.delete(message.workerId);
        return;
      case 'agent-reply':
        return this.#requests.settle(message);
      case 'agent-stats':
        this.#stats = message.store;
        return;
      case 'worker-output':
        this.output?.({ nodeId: this.id, pid: message.pid, stream: message.stream, text: message.text });
        return;
    }
  }

  /** The agent's connection closed: every worker there is gone, and every request fails. */
  onClosed(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#requests.fail(this.#leftMessage());
    for (const child of this.#children.values()) child.exited();
    this.#children.clear();
  }

  /** Asks the agent; `bulk` bytes go raw and must stay unchanged until the answer. */
  request(op: AgentRequestMessage['op'], body: Record<string, unknown>, bulk?: Uint8Array, place?: BulkPlace): Promise<unknown> {
    if (this.closed) return Promise.reject(new NodeLostError(this.id, this.#leftMessage()));
    return this.#requests.request(op, body, bulk, place);
  }

  #leftMessage(): string {
    return `node ${this.id} (${this.hostname}) left the cluster`;
  }

  /**
   * Has the agent install the driver's working directory, sending only the packages its host
   * does not have already; its workers then start there. Answers the path on the agent's host.
   */
  async installWorkingDirectory(packed: PackedWorkingDirectory): Promise<string> {
    const layers = { code: packed.code.id, ...(packed.dependencies ? { dependencies: packed.dependencies.id } : {}) };
    const check = (await this.request('code-check', layers)) as { path?: string; missing?: string[] };
    let path = check.path;
    if (!path) {
      for (const id of check.missing ?? []) {
        const layer = [packed.code, packed.dependencies].find((candidate) => candidate?.id === id) as CodeLayer;
        await this.#sendPackage(layer);
      }
      path = ((await this.request('code-install', layers)) as { path: string }).path;
    }
    this.#workingDirectory = { path, rootUrl: packed.rootUrl };
    return path;
  }

  /** A package in pieces, four in flight. */
  async #sendPackage(layer: CodeLayer): Promise<void> {
    const size = layer.bytes.byteLength;
    const offsets: number[] = [];
    for (let offset = 0; offset < size; offset += CODE_CHUNK_BYTES) offsets.push(offset);
    const next = async (): Promise<void> => {
      for (let offset = offsets.shift(); offset !== undefined; offset = offsets.shift()) {
        await this.request('code-write', { id: layer.id, offset, size }, layer.bytes.subarray(offset, Math.min(size, offset + CODE_CHUNK_BYTES)));
      }
    };
    await Promise.all([next(), next(), next(), next()]);
  }

  spawnWorker(_address: string, environment: WorkerEnvironment): WorkerProcess {
    const id = `worker-${newObjectId().slice(0, 12)}`;
    const putIds = randomBytes(20);
    const child = new RemoteChild(this, id);
    this.#children.set(id, child);
    const worker = new WorkerProcess(this, id, child, undefined, putIds, environment);
    this.workers.set(worker.id, worker);
    if (this.closed) queueMicrotask(() => child.exited());
    else this.send({ t: 'spawn-worker', workerId: id, putIds, typeScript: driverRunsTypeScript(), forwardOutput: this.output !== undefined, environment: { ...this.workerEnvironment, ...environment.env }, ...(this.#workingDirectory ? { workingDirectory: this.#workingDirectory } : {}) });
    return worker;
  }

  /** The head knows where objects are (it records every copy); a lost node loses them all. */
  holdsObject(): boolean {
    return !this.closed;
  }

  deleteObject(id: string): void {
    if (this.closed) return;
    if (this.#deletes.length === 0) {
      queueMicrotask(() => {
        const ids = this.#deletes;
        this.#deletes = [];
        this.send({ t: 'delete-objects', ids });
      });
    }
    this.#deletes.push(id);
  }

  deleteUnreportedPuts(putIds: Uint8Array, from: number): void {
    if (!this.closed) this.send({ t: 'delete-puts', putIds, from });
  }

  reapDeadProcesses(): void {
    // The agent reaps its store when one of its workers exits.
  }

  storeStats(): StoreStats {
    return this.#stats;
  }

  pinnedObjects(): Promise<PinnedObjectInfo[]> {
    return this.request('pinned', {}) as Promise<PinnedObjectInfo[]>;
  }

  close(): void {
    if (!this.#closed) for (const child of this.#children.values()) child.kill();
    this.#connection.close();
    this.onClosed();
  }

  /** Has the agent copy `id` from `source`'s store into its own, straight between the two. */
  pull(id: string, source: RemoteNode): Promise<void> {
    const { host, port } = source.transfer!;
    return this.request('pull', { id, host, port }).then(() => undefined);
  }

  /** Sends a request that wants no answer. */
  notify(op: AgentRequestMessage['op'], body: Record<string, unknown>): void {
    if (!this.closed) this.#requests.notify(op, body);
  }

  /** Reads objects out of the agent's store. */
  readonly source: ObjectSource = servedSource({
    request: (op, body, place) => this.request(op, body, undefined, place),
    notify: (op, body) => this.notify(op, body),
  });

  /** Writes objects into the agent's store. */
  readonly target: ObjectTarget = {
    create: async (id, size, metadata): Promise<ObjectWriter> => {
      await this.request('write-begin', { id, size, ...(metadata ? { metadata } : {}) });
      return {
        write: async (offset, bytes) => {
          await this.request('write', { id, offset }, bytes);
        },
        seal: async () => {
          await this.request('write-seal', { id });
        },
        abort: () => this.notify('write-abort', { id }),
      };
    },
  };
}
