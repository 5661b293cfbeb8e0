/**
 * Messages to and from a broker (broker.ts): the long-lived service of a shared cluster. Hosts
 * register what they offer (host-agent.ts); drivers ask for bundles of it (broker-client.ts) and
 * are lent slices of hosts, each slice a node agent session that joins the driver's own cluster
 * as a node. Frames as protocol.ts writes them; every connection shows the cluster's token first.
 */
import type { JobInfo, JobSubmission, UploadedWorkingDirectory } from './jobs.js';

/**
 * A host's first message. `sessions` are those it still serves: after its connection to the
 * broker dropped, or the broker restarted.
 */
export interface HostHelloMessage {
  t: 'host-hello';
  token: string;
  protocol: number;
  hostId: string;
  hostname: string;
  /** CPU, memory and custom resources; GPUs as `gpus`, each by its device index on the host. */
  resources: Record<string, number>;
  gpus: number[];
  /** The store memory its sessions share (absent: each session's store takes the default). */
  objectStoreMemory?: number;
  sessions: { sessionId: string; nodeId: string; resources: Record<string, number>; gpus: number[] }[];
}

/** A driver's first message: what it asks for, and where the lent hosts reach it. */
export interface DriverHelloMessage {
  t: 'driver-hello';
  token: string;
  protocol: number;
  name: string;
  /** Each kept whole on one host; several may share a host (one session each round). */
  bundles: Record<string, number>[];
  /** 'all': lent all at once or nothing (gang); 'any': whatever fits now, the rest as it frees. */
  wait: 'all' | 'any';
  /** Where hosts connect: a host the broker fills from this connection's address when absent. */
  listen: { host?: string; port: number; token: string };
  /**
   * Its rank (an integer, default 0): a job of higher priority that does not fit takes slices
   * from jobs of lower priority (preemption); equal priorities never preempt each other.
   */
  priority?: number;
  /** A driver coming back to a broker that restarted: the lent nodes it holds, and their bundles. */
  resume?: {
    nodes: { nodeId: string; hostId: string; bundles: number[]; resources: Record<string, number> }[];
    /** How long ago it first asked (its place in the queue, kept across the restart), in ms. */
    waitedMs?: number;
    /** Bundles it gave back while idle: not lent until it asks again. */
    released?: number[];
    /** Bundles it no longer wants at all. */
    withdrawn?: number[];
    /** Bundles its pools borrowed (request-more's elastic). */
    elastic?: number[];
    /** Nodes it was giving back when taken back (preempt): to be ended, whoever runs them. */
    takenBack?: string[];
  };
}

export interface StatusRequestMessage {
  t: 'status-request';
  token: string;
  protocol: number;
}

/** A one-shot request about jobs (jobs.ts): the token says whose jobs it may see and stop. */
export type JobRequestMessage = { t: 'job-request'; token: string; protocol: number } & (
  | { action: 'submit'; submission: JobSubmission; workingDir?: UploadedWorkingDirectory }
  | { action: 'list' }
  | { action: 'status'; jobId: string }
  | { action: 'logs'; jobId: string; offset?: number }
  | { action: 'stop'; jobId: string }
);

/** A host's session ended: its workers are dead and its store is gone (`error`: it never began). */
export interface SessionEndedMessage {
  t: 'session-ended';
  sessionId: string;
  error?: string;
}

/** From a driver: a lent node left its cluster (its host or connection went): ask for its bundles again. */
export interface NodeLeftMessage {
  t: 'node-left';
  nodeId: string;
}

/** From a driver: a lent node joined its cluster (from then on, only the driver says it is lost). */
export interface NodeJoinedMessage {
  t: 'node-joined';
  nodeId: string;
}

/**
 * From a driver: it gives a lent node back (idle); its bundles are not asked for until
 * request-again. For a node being preempted: nothing of the job is left on it, end it now.
 */
export interface ReleaseNodeMessage {
  t: 'release-node';
  nodeId: string;
  /** Its bundles are not wanted again (a pool's extra asks, see withdraw). */
  withdraw?: boolean;
}

/**
 * From a driver: bundles it asked for and no longer wants (an actor pool that asked for room to
 * grow and finished first): not lent, and not counted as asked.
 */
export interface WithdrawMessage {
  t: 'withdraw';
  bundles: number[];
}

/** From a driver: bundles it gave back are wanted again (work waits for resources). */
export interface RequestAgainMessage {
  t: 'request-again';
  bundles: number[];
}

/** From a host or driver every 2 s: a broker drops one silent past its peerTimeoutMs (a hung process). */
export interface AliveMessage {
  t: 'alive';
}

/** From a driver: more bundles, lent as they fit (requestResources). */
export interface RequestMoreMessage {
  t: 'request-more';
  bundles: Record<string, number>[];
  /**
   * Room an actor pool borrows to grow (elastic): lent in sessions of their own, and taken back
   * for another job's own request of the same priority, not only for higher ones.
   */
  elastic?: boolean;
}

export type BrokerInbound =
  | AliveMessage
  | RequestMoreMessage
  | HostHelloMessage
  | DriverHelloMessage
  | StatusRequestMessage
  | JobRequestMessage
  | SessionEndedMessage
  | NodeLeftMessage
  | NodeJoinedMessage
  | ReleaseNodeMessage
  | WithdrawMessage
  | RequestAgainMessage;

export interface BrokerWelcomeMessage {
  t: 'broker-welcome';
  /** The driver's job id, or the host's id, as the broker knows it. */
  id: string;
}

export interface BrokerRefusedMessage {
  t: 'broker-refused';
  reason: string;
  code: string;
}

/** To a host: run a node agent session for a driver, with this slice of the host. */
export interface OpenSessionMessage {
  t: 'open-session';
  sessionId: string;
  nodeId: string;
  driver: { host: string; port: number; token: string };
  resources: Record<string, number>;
  gpus: number[];
  /** The bytes of the host's object store memory this session's store may hold (absent: default). */
  objectStoreMemory?: number;
}

export interface CloseSessionMessage {
  t: 'close-session';
  sessionId: string;
}

/** To a driver: bundles lent, as nodes that are joining its cluster. */
export interface GrantedMessage {
  t: 'granted';
  nodes: { nodeId: string; hostId: string; hostname: string; resources: Record<string, number>; bundles: number[] }[];
}

/** To a driver: a lent node that will not come (its host could not reach the driver), or went. */
export interface SessionLostMessage {
  t: 'session-lost';
  nodeId: string;
  reason: string;
  /** Whether its bundles are asked for again (the host left: another may take them). */
  requeued: boolean;
}

/**
 * To a driver: a lent node is taken back for a job of higher priority. Its bundles are asked for
 * again at once; its host ends the session when the driver gives it back (release-node, once
 * nothing of the job is on it) or after `graceMs`, whichever comes first.
 */
export interface PreemptMessage {
  t: 'preempt';
  nodeId: string;
  graceMs: number;
  reason: string;
}

/** To a driver: bundles no registered host can ever hold. */
export interface UnsatisfiableMessage {
  t: 'unsatisfiable';
  reason: string;
  /** Bundles asked after init that the broker dropped for it (none: the request as a whole). */
  bundles?: number[];
}

export interface HostStatus {
  hostId: string;
  hostname: string;
  total: Record<string, number>;
  free: Record<string, number>;
  sessions: number;
}

export interface DriverStatus {
  jobId: string;
  name: string;
  /** The user whose token it showed (brokers with users). */
  user?: string;
  address: string;
  wait: 'all' | 'any';
  priority: number;
  bundles: number;
  granted: number;
  /** Its nodes being taken back for jobs of higher priority (in their grace). */
  preempting: number;
  /** Bundles lent to it that its actor pools borrowed to grow (elastic), of those lent. */
  borrowed: number;
  /** Bundles it gave back while idle, not wanted now. */
  released: number;
  /** Milliseconds since it asked. */
  waitingMs: number;
  nodes: string[];
}

export interface StatusMessage {
  t: 'status';
  hosts: HostStatus[];
  drivers: DriverStatus[];
  /** The most of any resource one job may hold, as a fraction of the cluster's total. */
  maxShare: number;
  /** How long a preempted node has to be given back before its host ends it. */
  preemptGraceMs: number;
  /** Since the broker started: slices lent to jobs, and slices taken back for jobs of higher priority. */
  totals?: { lent: number; preempted: number };
}

/** The answer to a job request: a job, the jobs, or a piece of a job's log. */
export interface JobReplyMessage {
  t: 'job-reply';
  job?: JobInfo;
  jobs?: JobInfo[];
  logs?: { text: string; next: number; ended: boolean };
}

export type BrokerOutbound =
  | BrokerWelcomeMessage
  | BrokerRefusedMessage
  | OpenSessionMessage
  | CloseSessionMessage
  | GrantedMessage
  | SessionLostMessage
  | UnsatisfiableMessage
  | PreemptMessage
  | StatusMessage
  | JobReplyMessage;
