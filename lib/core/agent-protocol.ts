/**
 * Messages between a head (the driver's cluster) and a node agent (node-agent.ts), over one TCP
 * connection in the frames of protocol.ts. The agent runs workers and keeps a store segment on
 * its host; the head schedules onto it, and moves objects in and out of its store in chunks.
 */
import type { StoreStats } from '../store/object-store.js';

/**
 * The version of these messages (and of the worker protocol the agent's workers speak). A head
 * refuses an agent of another: every host runs the same trellis.
 */
export const AGENT_PROTOCOL = 2;

/** The agent's first message: who it is and what it offers. Refused unless `token` matches. */
export interface AgentHelloMessage {
  t: 'agent-hello';
  token: string;
  protocol: number;
  nodeId: string;
  hostname: string;
  /** Custom resources and CPU and memory; GPUs by count. */
  resources: Record<string, number>;
  numGpus: number;
  storeName: string;
  /** The store's figures at the start (agent-stats brings them up to date every second). */
  store: StoreStats;
  /** Whether a CUDA MPS control program is at hand (for a head that shares GPUs by MPS). */
  mps: boolean;
  /** Where other agents pull objects from this one (host as the agent advertises it). */
  transfer?: { host: string; port: number };
  pid: number;
}

/** A worker the agent started (its pid) or that ended. */
export interface WorkerSpawnedMessage {
  t: 'worker-spawned';
  workerId: string;
  pid: number;
}

export interface WorkerExitedMessage {
  t: 'worker-exited';
  workerId: string;
  code: number | null;
  signal: string | null;
}

export interface AgentReplyMessage {
  t: 'agent-reply';
  requestId: number;
  ok: boolean;
  value?: unknown;
  /** A read's bytes (sent raw: see FrameConnection.sendBulk). */
  bulk?: Uint8Array;
  error?: { name: string; message: string; code?: string; details?: Record<string, unknown> };
}

/** Sent every second: the head reports it in state(). */
export interface AgentStatsMessage {
  t: 'agent-stats';
  store: StoreStats;
}

/** An agent's first message to another agent's object server (see object-server.ts). */
export interface PeerHelloMessage {
  t: 'peer-hello';
  token: string;
}

/** Whole lines a worker wrote (forwarded unless the head turned logToDriver off). */
export interface WorkerOutputMessage {
  t: 'worker-output';
  workerId: string;
  pid: number;
  stream: 'stdout' | 'stderr';
  text: string;
}

export type AgentMessage = WorkerOutputMessage | PeerHelloMessage | AgentHelloMessage | WorkerSpawnedMessage | WorkerExitedMessage | AgentReplyMessage | AgentStatsMessage;

/** The head took the agent in (under `nodeId`) or refused it (`reason`; the agent then exits). */
export interface WelcomeMessage {
  t: 'welcome';
  nodeId: string;
  /** The head shares GPUs by MPS: the agent runs a daemon of its own, which its workers join. */
  gpuSharing?: 'mps';
}

export interface RefusedMessage {
  t: 'refused';
  reason: string;
  /** The reason may pass (the node's id still held by a connection closing): try again later. */
  retry?: boolean;
}

/** Sent every second, so that an agent can tell a head that hangs from one that is quiet. */
export interface HeadAliveMessage {
  t: 'head-alive';
}

export interface SpawnWorkerMessage {
  t: 'spawn-worker';
  workerId: string;
  putIds: Uint8Array;
  /** Whether the head's modules need a TypeScript loader in the worker. */
  typeScript: boolean;
  /** Send the worker's output to the head (else it goes to the agent's own stdout and stderr). */
  forwardOutput: boolean;
  environment: Record<string, string>;
  /** The driver's working directory: where the agent installed it, and the driver's URL of it. */
  workingDirectory?: { path: string; rootUrl: string };
}

export interface KillWorkerMessage {
  t: 'kill-worker';
  workerId: string;
}

export interface DeleteObjectsMessage {
  t: 'delete-objects';
  ids: string[];
}

export interface DeletePutsMessage {
  t: 'delete-puts';
  putIds: Uint8Array;
  from: number;
}

/**
 * Object movement, answered by agent-reply:
 * - read-open {id}: pins the object; answers {handle, size, metadata?}
 * - read {handle, offset, length}: answers the bytes (as the reply's `bulk`)
 * - read-close {handle}: unpins (no answer)
 * - write-begin {id, size, metadata?}: creates it; write {id, offset} with the bytes as `bulk`;
 *   write-seal {id};
 *   write-abort {id} (no answer)
 * - pull {id, host, port}: copies the object from the agent serving objects at host:port into
 *   this one's store; answers once it is sealed here
 * - pinned {}: the store's pinned objects and who pins them (ObjectStore.pinned)
 * - code-check, code-write, code-install: the driver's working directory (see node-agent.ts)
 */
export interface AgentRequestMessage {
  t: 'agent-request';
  requestId: number;
  op: 'read-open' | 'read' | 'read-close' | 'write-begin' | 'write' | 'write-seal' | 'write-abort' | 'pull' | 'pinned' | 'code-check' | 'code-write' | 'code-install';
  body: Record<string, unknown>;
  bulk?: Uint8Array;
}

export type HeadMessage = WelcomeMessage | RefusedMessage | HeadAliveMessage | SpawnWorkerMessage | KillWorkerMessage | DeleteObjectsMessage | DeletePutsMessage | AgentRequestMessage;
