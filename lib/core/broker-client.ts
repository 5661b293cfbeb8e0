/**
 * A driver's side of a shared cluster (init's `cluster`): it asks the broker for bundles, and the
 * hosts the broker lends join this driver's cluster as nodes (node agent sessions dialing the
 * driver's listener with a token made for this driver alone). init returns once what it waits
 * for has joined; nodes lent later join as they come.
 */
import { dial } from './tls.js';
import { basename } from 'node:path';
import { ClusterError, InvalidArgumentError } from '../errors.js';
import { AGENT_PROTOCOL } from './agent-protocol.js';
import type { BrokerInbound, BrokerOutbound, DriverHelloMessage, GrantedMessage, JobReplyMessage, JobRequestMessage, StatusMessage } from './broker-protocol.js';
import type { JobInfo, JobSubmission } from './jobs.js';
import { checkRuntimeEnvironment, packWorkingDirectory } from './code-package.js';
import { FrameConnection } from './connection.js';
import { parseAddress } from './node-agent.js';
import type { Resources } from './resources.js';

/** Where a driver joins a shared cluster, and what it asks of it (init's `cluster`). */
export interface ClusterOptions {
  /** The broker, host:port (`trellis broker`; default: TRELLIS_BROKER, which a submitted job has). */
  address?: string;
  /** The cluster's token (default: TRELLIS_CLUSTER_TOKEN). */
  token?: string;
  /** Bundles of resources, each lent whole on one host (GPUs whole devices). */
  bundles?: Resources[];
  /**
   * Resources in total, lent in whole units wherever they fit: `{ CPU: 8, GPU: 2 }` is eight
   * bundles of one CPU and two of one GPU. Give `bundles` where parts must share a host.
   */
  resources?: Resources;
  /**
   * 'all' (the default): init waits until every bundle is lent at once, and the broker lends
   * none of them before all fit. 'any': init returns once one bundle's node joined; the rest join
   * as other jobs free them.
   */
  wait?: 'all' | 'any';
  /** The job's name in the broker's status (default: the main script's file name). */
  name?: string;
  /** The address lent hosts reach this driver at (default: its address as the broker sees it). */
  advertiseHost?: string;
  /** The interface this driver listens on for lent hosts (default '0.0.0.0'). */
  listenHost?: string;
  /** How long init waits for what it asked, in ms (default: as long as it takes). */
  timeoutMs?: number;
  /**
   * Gives a lent node back to the broker once nothing of this job has been on it (no task, actor,
   * placement group bundle or object) for this long, in ms, so other jobs may have it; its bundles
   * are asked for again when work waits for resources. Default: keep every node to the end.
   */
  idleReleaseMs?: number;
  /**
   * The job's rank (an integer, default 0). Where it does not fit, the broker takes slices back
   * from jobs of lower priority: theirs have the broker's grace (`trellis broker
   * --preempt-grace`) to finish what runs there, take no new work meanwhile, and are asked for
   * again. A job of lower priority loses its nodes as a lost host's: its tasks retry elsewhere and
   * its objects are made again. A broker with users caps each user's priority (maxPriority).
   */
  priority?: number;
  /**
   * Whether the data layer's actor pools ask the broker for room to grow past what init asked
   * (default true): a pool with queued work and no room asks for a bundle per actor it may still
   * add (its `concurrency` maximum), and the nodes lent go back once nothing is on them for a
   * second; what is still asked when the pool ends is withdrawn.
   */
  autoscale?: boolean;
}

/** An actor pool's ask for one more bundle (see BrokerClient.ask). */
export interface ElasticAsk {
  /** Whether its node joined (the room is there) or it was withdrawn: nothing more to wait for. */
  readonly settled: boolean;
  /** Why the broker refused it: no host could ever hold it. */
  readonly failed: string | undefined;
  /** Not wanted any more: withdrawn if not lent yet; a lent node goes back once idle. */
  withdraw(): void;
}

/** How long a node lent for a pool's ask stays once nothing is on it. */
const ELASTIC_IDLE_MS = 1000;

const MAX_UNITS = 4096;

/** The bundles `options` ask for; InvalidArgumentError naming what is wrong. */
export function requestedBundles(options: ClusterOptions): Resources[] {
  if (typeof options !== 'object' || options === null) throw new InvalidArgumentError('cluster takes { address, bundles or resources }');
  if (typeof options.address !== 'string') throw new InvalidArgumentError('cluster.address is the broker\'s host:port (or TRELLIS_BROKER names it)');
  parseAddress(options.address);
  if (options.wait !== undefined && options.wait !== 'all' && options.wait !== 'any') {
    throw new InvalidArgumentError(`cluster.wait is 'all' or 'any', got ${String(options.wait)}`);
  }
  if (options.timeoutMs !== undefined && !(options.timeoutMs > 0)) throw new InvalidArgumentError(`cluster.timeoutMs must be a number of ms > 0, got ${String(options.timeoutMs)}`);
  if (options.autoscale !== undefined && typeof options.autoscale !== 'boolean') throw new InvalidArgumentError(`cluster.autoscale is true or false, got ${String(options.autoscale)}`);
  if (options.priority !== undefined && !Number.isSafeInteger(options.priority)) throw new InvalidArgumentError(`cluster.priority is an integer, got ${String(options.priority)}`);
  if (options.idleReleaseMs !== undefined && !(options.idleReleaseMs >= 0)) throw new InvalidArgumentError(`cluster.idleReleaseMs must be a number of ms >= 0, got ${String(options.idleReleaseMs)}`);
  if ((options.bundles === undefined) === (options.resources === undefined)) {
    throw new InvalidArgumentError('cluster takes either bundles (each kept on one host) or resources (a total lent in whole units)');
  }
  const checkAmounts = (what: string, resources: unknown) => {
    if (typeof resources !== 'object' || resources === null || Array.isArray(resources)) throw new InvalidArgumentError(`${what} is an object of resource amounts`);
    for (const [name, amount] of Object.entries(resources)) {
      if (typeof amount !== 'number' || !Number.isFinite(amount) || amount < 0) throw new InvalidArgumentError(`${what}.${name} must be a number >= 0, got ${String(amount)}`);
    }
  };
  if (options.bundles !== undefined) {
    if (!Array.isArray(options.bundles) || options.bundles.length === 0) throw new InvalidArgumentError('cluster.bundles is a non-empty array of resource objects');
    options.bundles.forEach((bundle, index) => {
      checkAmounts(`cluster.bundles[${index}]`, bundle);
      if (!Number.isInteger(bundle.GPU ?? 0)) throw new InvalidArgumentError(`cluster.bundles[${index}].GPU must be whole devices, got ${bundle.GPU}`);
      if (!Object.values(bundle).some((amount) => amount > 0)) throw new InvalidArgumentError(`cluster.bundles[${index}] asks for nothing`);
    });
    return options.bundles.map((bundle) => ({ ...bundle }));
  }
  checkAmounts('cluster.resources', options.resources);
  const bundles: Resources[] = [];
  for (const [name, amount] of Object.entries(options.resources!)) {
    if (!Number.isInteger(amount)) throw new InvalidArgumentError(`cluster.resources.${name} is lent in whole units, got ${amount}: ask for fractions in bundles`);
    if (amount > MAX_UNITS) throw new InvalidArgumentError(`cluster.resources.${name} asks for ${amount} units, more than ${MAX_UNITS}: ask for large amounts (memory, say) in bundles`);
    for (let i = 0; i < amount; i++) bundles.push({ [name]: 1 });
  }
  if (bundles.length === 0) throw new InvalidArgumentError('cluster.resources asks for nothing');
  return bundles;
}

type Connection = FrameConnection<BrokerOutbound, BrokerInbound>;

/** Opens a connection to a broker; fails with ERR_BROKER_UNREACHABLE. */
export function connectBroker(address: string, onMessage: (message: BrokerOutbound) => void, onClose: () => void): Promise<Connection> {
  const { host, port } = parseAddress(address);
  return new Promise((resolve, reject) => {
    const { socket, ready } = dial(host, port);
    socket.once(ready, () => {
      socket.removeAllListeners('error');
      socket.setKeepAlive(true, 5000);
      resolve(new FrameConnection<BrokerOutbound, BrokerInbound>(socket, onMessage, onClose));
    });
    socket.once('error', (error) => {
      socket.destroy();
      reject(new ClusterError('ERR_BROKER_UNREACHABLE', `cannot reach the broker at ${address}: ${error.message}`));
    });
  });
}

/** A driver's standing with its shared cluster's broker (state().broker). */
export interface BrokerInfo {
  address: string;
  jobId: string;
  /** Whether the connection to the broker is up (the driver reconnects after a broker restart). */
  connected: boolean;
  /** Bundles asked for, lent, and lent nodes that joined this cluster. */
  bundles: number;
  lent: number;
  joined: number;
  /** Bundles given back while idle (idleReleaseMs), asked for again when work waits. */
  released: number;
  priority: number;
  /** Lent nodes taken back for jobs of higher priority, so far. */
  preempted: number;
}

/** What the driver's cluster does for the client: the nodes it has, and where to warn. */
export interface JoiningCluster {
  readonly nodes: readonly { id: string }[];
  readonly events: import('node:events').EventEmitter;
  /** Resources that may still join: a task that fits one of them waits instead of failing as infeasible. */
  promise(bundles: Resources[]): void;
  /** Whether anything of the cluster is on the node (see Cluster.nodeBusy). */
  nodeBusy(nodeId: string): boolean;
  /** Whether work waits for resources. */
  waitingForResources(): boolean;
  /** Takes an idle node out of scheduling; false where something is on it. */
  drain(nodeId: string): boolean;
  /** Takes a node out of scheduling, busy or not: what runs there finishes, nothing new starts. */
  cordon(nodeId: string): void;
  /** Moves objects only a cordoned node holds to the driver's store (see Cluster.evacuate). */
  evacuate(nodeId: string): void;
}

export class BrokerClient {
  #connection: Connection;
  /** The hello this driver says again to a broker that restarted (with the nodes it holds). */
  readonly #hello: DriverHelloMessage;
  #reconnectTimer: NodeJS.Timeout | undefined;
  readonly #cluster: JoiningCluster;
  readonly #bundles: Resources[];
  readonly #wait: 'all' | 'any';
  readonly #address: string;
  /** Nodes lent and not yet joined, by id. */
  readonly #coming = new Map<string, GrantedMessage['nodes'][number]>();
  /** Every node lent, joined or not, by id. */
  readonly #lent = new Map<string, GrantedMessage['nodes'][number]>();
  readonly #joined = new Set<string>();
  readonly #pending: Set<number>;
  #jobId = '';
  #ready!: () => void;
  #fail!: (error: Error) => void;
  #started = false;
  #closed = false;
  /** Whether the connection to the broker is up (it drops when the broker restarts). */
  #connected = true;
  /** Bundles given back while idle, and since when each idle lent node has been idle. */
  readonly #released = new Set<number>();
  readonly #idleSince = new Map<string, number>();
  #idleTimer: NodeJS.Timeout | undefined;
  readonly #aliveTimer: NodeJS.Timeout;
  /** When this driver first asked (its place in a broker's queue). */
  readonly #asked = Date.now();
  /** init failed (a refusal, an unsatisfiable request, a timeout): nothing to come back for. */
  #failed = false;
  /** Nodes being taken back, each watched until nothing of this job is on it. */
  readonly #preempting = new Map<string, NodeJS.Timeout>();
  /** Bundles asked for by actor pools (elastic): withdrawn, not asked again, when not wanted. */
  readonly #elastic = new Map<number, { settled: boolean; failed?: string }>();
  readonly #withdrawn = new Set<number>();
  #autoscale = true;
  readonly #takenBack = new Set<string>();
  #preempted = 0;
  readonly #onNodeAdded = (event: { nodeId: string }) => {
    // A node taken back before it joined joins out of scheduling, until its host ends it.
    if (this.#takenBack.has(event.nodeId)) return this.#cluster.cordon(event.nodeId);
    this.#nodeJoined(event.nodeId);
  };
  readonly #onNodeRemoved = (event: { nodeId: string }) => {
    this.#takenBack.delete(event.nodeId);
    this.#nodeLeft(event.nodeId);
  };
  /** Settles when init may return. */
  readonly ready: Promise<void>;

  private constructor(connection: Connection, cluster: JoiningCluster, hello: DriverHelloMessage, address: string) {
    const bundles = hello.bundles;
    const wait = hello.wait;
    this.#hello = hello;
    this.#connection = connection;
    this.#cluster = cluster;
    this.#bundles = bundles;
    this.#wait = wait;
    this.#address = address;
    this.#pending = new Set(bundles.keys());
    this.ready = new Promise((resolve, reject) => {
      this.#ready = resolve;
      this.#fail = reject;
    });
    this.ready.catch(() => undefined);
    // Heard every 2 s, so the broker can tell this driver from a hung one.
    this.#aliveTimer = setInterval(() => {
      if (this.#connected && !this.#closed) this.#connection.send({ t: 'alive' });
    }, 2000);
    this.#aliveTimer.unref();
    cluster.events.on('node-added', this.#onNodeAdded);
    cluster.events.on('node-removed', this.#onNodeRemoved);
    this.#promise();
  }

  /** Asks the broker at `options.address` for what `options` say; lent hosts dial `listen`. */
  static async join(options: ClusterOptions, bundles: Resources[], cluster: JoiningCluster, listen: { port: number; token: string }): Promise<BrokerClient> {
    const token = options.token ?? process.env.TRELLIS_CLUSTER_TOKEN;
    if (!token) throw new InvalidArgumentError('joining a cluster needs its token (cluster.token or TRELLIS_CLUSTER_TOKEN)', 'ERR_NO_TOKEN');
    const address = options.address;
    if (typeof address !== 'string') throw new InvalidArgumentError('cluster.address is the broker\'s host:port (or TRELLIS_BROKER names it)');
    let client: BrokerClient | undefined;
    const early: BrokerOutbound[] = [];
    let closedEarly = false;
    const connection = await connectBroker(
      address,
      (message) => (client ? client.#onMessage(message) : early.push(message)),
      () => (client ? client.#onClose() : (closedEarly = true)),
    );
    const hello: DriverHelloMessage = {
      t: 'driver-hello',
      token,
      protocol: AGENT_PROTOCOL,
      name: options.name ?? (process.argv[1] ? basename(process.argv[1]) : 'driver'),
      bundles,
      wait: options.wait ?? 'all',
      ...(options.priority !== undefined ? { priority: options.priority } : {}),
      listen: { ...(options.advertiseHost ? { host: options.advertiseHost } : {}), port: listen.port, token: listen.token },
    };
    client = new BrokerClient(connection, cluster, hello, address);
    for (const message of early) client.#onMessage(message);
    if (closedEarly) client.#onClose();
    connection.send(hello);
    const timeoutMs = options.timeoutMs;
    const timer = timeoutMs === undefined ? undefined : setTimeout(() => {
      const granted = client!.#bundles.length - client!.#pending.size;
      client!.#failInit(new ClusterError('ERR_CLUSTER_TIMEOUT',
        `the broker at ${options.address} lent ${granted} of ${bundles.length} bundle(s) and ${client!.#joined.size} node(s) joined within ${timeoutMs} ms (wait: '${client!.#wait}'); trellis status --broker ${options.address} shows who holds the rest`));
    }, timeoutMs);
    try {
      await client.ready;
    } catch (error) {
      client.close();
      throw error;
    } finally {
      clearTimeout(timer);
    }
    client.#started = true;
    client.#autoscale = options.autoscale ?? true;
    client.#watchIdle(options.idleReleaseMs);
    return client;
  }

  /**
   * Asks for more bundles (validated as init's): lent as they fit, joining as nodes. The broker's
   * refusal, where no host could hold one, comes as a 'warning' event of kind 'cluster'.
   */
  requestMore(bundles: Resources[], elastic = false): void {
    const checked = requestedBundles({ address: this.#address, bundles });
    const first = this.#bundles.length;
    this.#bundles.push(...checked);
    for (let index = first; index < this.#bundles.length; index++) this.#pending.add(index);
    // Said again in full to a broker that restarts.
    this.#hello.bundles = this.#bundles;
    this.#promise();
    if (this.#connected && !this.#closed) this.#connection.send({ t: 'request-more', bundles: checked, ...(elastic ? { elastic } : {}) });
  }

  /**
   * An actor pool's ask for one more bundle, lent as it fits; undefined where this driver does
   * not autoscale (cluster.autoscale false).
   */
  ask(bundle: Resources): ElasticAsk | undefined {
    if (!this.#autoscale || this.#closed) return undefined;
    const index = this.#bundles.length;
    const state: { settled: boolean; failed?: string } = { settled: false };
    this.#elastic.set(index, state);
    this.requestMore([bundle], true);
    return {
      get settled() {
        return state.settled;
      },
      get failed() {
        return state.failed;
      },
      withdraw: () => {
        state.settled = true;
        if (!this.#pending.delete(index)) return;
        this.#withdrawn.add(index);
        this.#promise();
        if (this.#connected && !this.#closed) this.#connection.send({ t: 'withdraw', bundles: [index] });
      },
    };
  }

  /** Bundles asked for, lent, and the lent nodes that joined. */
  describe(): BrokerInfo {
    const asked = this.#bundles.length - this.#withdrawn.size;
    return {
      address: this.#address,
      jobId: this.#jobId,
      connected: this.#connected,
      bundles: asked,
      lent: asked - this.#pending.size - this.#released.size,
      joined: this.#joined.size,
      released: this.#released.size,
      priority: this.#hello.priority ?? 0,
      preempted: this.#preempted,
    };
  }

  #onMessage(message: BrokerOutbound): void {
    switch (message.t) {
      case 'broker-welcome':
        this.#jobId = message.id;
        return;
      case 'broker-refused':
        return this.#problem(new ClusterError(message.code, `the broker at ${this.#address} refused this driver: ${message.reason}`));
      case 'unsatisfiable':
        for (const index of message.bundles ?? []) {
          this.#pending.delete(index);
          this.#withdrawn.add(index);
          const ask = this.#elastic.get(index);
          if (ask) {
            ask.settled = true;
            ask.failed = message.reason;
          }
        }
        if (message.bundles) this.#promise();
        return this.#problem(new ClusterError('ERR_CLUSTER_UNSATISFIABLE', `the broker at ${this.#address} cannot lend what this driver asks: ${message.reason}`));
      case 'granted':
        for (const node of message.nodes) {
          for (const index of node.bundles) this.#pending.delete(index);
          this.#lent.set(node.nodeId, node);
          if (this.#cluster.nodes.some((known) => known.id === node.nodeId)) {
            this.#joined.add(node.nodeId);
            this.#settleAsks(node.bundles);
            this.#connection.send({ t: 'node-joined', nodeId: node.nodeId });
          } else {
            this.#coming.set(node.nodeId, node);
          }
        }
        this.#promise();
        return this.#check();
      case 'preempt':
        return this.#onPreempt(message.nodeId, message.graceMs, message.reason);
      case 'session-lost': {
        this.#forget(message.nodeId, message.requeued);
        const error = new ClusterError('ERR_SESSION_FAILED', `lent node ${message.nodeId} ${message.requeued ? 'left' : 'did not join'}: ${message.reason}`);
        if (!this.#started && !message.requeued) return this.#failInit(error);
        this.#cluster.events.emit('warning', { kind: 'cluster-node-lost', message: error.message });
        return;
      }
      default:
        return;
    }
  }

  /**
   * Gives back lent nodes nothing has been on for `idleMs` (idleReleaseMs, if given), and nodes
   * lent for actor pools' asks after ELASTIC_IDLE_MS; asks again for what was given back idle once
   * work waits for resources (what pools asked for is withdrawn instead: they ask anew).
   */
  #watchIdle(idleMs: number | undefined): void {
    const period = Math.max(50, Math.min(250, (idleMs ?? ELASTIC_IDLE_MS) / 4));
    this.#idleTimer = setInterval(() => {
      if (this.#closed || !this.#connected) return;
      const now = Date.now();
      // Nothing goes back while work waits: it may be about to run there.
      if (this.#cluster.waitingForResources()) this.#idleSince.clear();
      for (const nodeId of [...this.#joined]) {
        if (this.#cluster.waitingForResources()) break;
        const node = this.#lent.get(nodeId)!;
        const elastic = node.bundles.every((index) => this.#elastic.has(index));
        const limit = elastic ? ELASTIC_IDLE_MS : idleMs;
        if (limit === undefined) continue;
        if (this.#cluster.nodeBusy(nodeId)) {
          this.#idleSince.delete(nodeId);
          continue;
        }
        const since = this.#idleSince.get(nodeId) ?? now;
        this.#idleSince.set(nodeId, since);
        if (now - since < limit || !this.#cluster.drain(nodeId)) continue;
        this.#lent.delete(nodeId);
        this.#joined.delete(nodeId);
        this.#idleSince.delete(nodeId);
        for (const index of node.bundles) (elastic ? this.#withdrawn : this.#released).add(index);
        this.#promise();
        this.#connection.send({ t: 'release-node', nodeId, ...(elastic ? { withdraw: true } : {}) });
        this.#cluster.events.emit('cluster-node-released', { nodeId, idleMs: now - since });
      }
      if (this.#released.size > 0 && this.#cluster.waitingForResources()) {
        const bundles = [...this.#released];
        this.#released.clear();
        for (const index of bundles) this.#pending.add(index);
        this.#connection.send({ t: 'request-again', bundles });
      }
    }, period);
    this.#idleTimer.unref();
  }

  /**
   * A lent node is taken back for a job of higher priority: nothing new is placed on it, and it is
   * given back as soon as nothing of this job is on it (the broker ends it at the grace's end
   * anyway). Its bundles are wanted still: they wait, as a lost node's do.
   */
  #onPreempt(nodeId: string, graceMs: number, reason: string): void {
    const node = this.#lent.get(nodeId);
    if (!node) return;
    this.#lent.delete(nodeId);
    this.#coming.delete(nodeId);
    this.#joined.delete(nodeId);
    this.#idleSince.delete(nodeId);
    // What pools asked for is not asked again (they ask anew if they still need room).
    const elastic = node.bundles.filter((index) => this.#elastic.has(index));
    for (const index of node.bundles) (this.#elastic.has(index) ? this.#withdrawn : this.#pending).add(index);
    for (const index of elastic) this.#elastic.get(index)!.settled = true;
    if (elastic.length > 0 && this.#connected) this.#connection.send({ t: 'withdraw', bundles: elastic });
    this.#preempted++;
    this.#takenBack.add(nodeId);
    this.#promise();
    this.#cluster.cordon(nodeId);
    this.#cluster.events.emit('cluster-node-preempted', { nodeId, graceMs, reason });
    this.#cluster.events.emit('warning', { kind: 'cluster-node-preempted', message: `lent node ${nodeId} is taken back within ${graceMs} ms: ${reason}` });
    const check = () => {
      if (this.#closed) return;
      this.#cluster.evacuate(nodeId);
      if (this.#cluster.nodes.some((known) => known.id === nodeId) && this.#cluster.nodeBusy(nodeId)) {
        this.#preempting.set(nodeId, setTimeout(check, 50).unref());
        return;
      }
      this.#preempting.delete(nodeId);
      if (this.#connected) this.#connection.send({ t: 'release-node', nodeId });
    };
    check();
  }

  /** A lent node left this cluster: the broker hears of it and asks for its bundles again. */
  #nodeLeft(nodeId: string): void {
    if (!this.#lent.has(nodeId)) return;
    this.#forget(nodeId, true);
    if (!this.#closed && this.#connected) this.#connection.send({ t: 'node-left', nodeId });
  }

  /** Drops a lent node (once, whichever side noticed first); its bundles wait again where `requeued`. */
  #forget(nodeId: string, requeued: boolean): void {
    const node = this.#lent.get(nodeId);
    this.#lent.delete(nodeId);
    this.#coming.delete(nodeId);
    this.#joined.delete(nodeId);
    if (node && requeued) for (const index of node.bundles) this.#pending.add(index);
    this.#promise();
  }

  #nodeJoined(nodeId: string): void {
    const node = this.#coming.get(nodeId);
    if (!node || !this.#coming.delete(nodeId)) return;
    this.#joined.add(nodeId);
    this.#settleAsks(node.bundles);
    if (!this.#closed && this.#connected) this.#connection.send({ t: 'node-joined', nodeId });
    this.#promise();
    this.#check();
  }

  /** Pools' asks among `bundles` have their room: their nodes joined. */
  #settleAsks(bundles: number[]): void {
    for (const index of bundles) {
      const ask = this.#elastic.get(index);
      if (ask) ask.settled = true;
    }
  }

  #check(): void {
    if (this.#started) return;
    const done = this.#wait === 'all' ? this.#pending.size === 0 && this.#coming.size === 0 : this.#joined.size > 0;
    if (done) this.#ready();
  }

  /** Tells the cluster what may still join: bundles not lent yet, and lent nodes on their way. */
  #promise(): void {
    const coming = [...this.#coming.values()].map((node) => node.resources);
    // Bundles given back come again when work waits: they count too.
    const pending = [...this.#pending, ...this.#released].map((index) => this.#bundles[index]);
    this.#cluster.promise([...coming, ...pending]);
  }

  #problem(error: ClusterError): void {
    if (!this.#started) return this.#failInit(error);
    this.#cluster.events.emit('warning', { kind: 'cluster', message: error.message });
  }

  #failInit(error: Error): void {
    this.#failed = true;
    this.#fail(error);
  }

  #onClose(): void {
    if (this.#closed) return;
    // After a refusal init has failed already; any other close is a broker going away, which may come back.
    if (this.#failed) {
      this.#closed = true;
      this.#cluster.promise([]);
      return;
    }
    // The nodes lent so far stay (they are connected to this driver, not to the broker). A
    // broker that restarts learns them again from this driver and from their hosts.
    this.#connected = false;
    if (this.#started) this.#cluster.events.emit('warning', { kind: 'cluster', message: `the connection to the broker at ${this.#address} closed: the nodes lent so far stay; reconnecting` });
    this.#reconnect();
  }

  /** Tries the broker again every second until it answers (or this driver leaves). */
  #reconnect(): void {
    if (this.#closed) return;
    let connection: Connection | undefined;
    this.#reconnectTimer = setTimeout(() => {
      connectBroker(this.#address, (message) => this.#onMessage(message), () => {
        if (this.#connection === connection) this.#onClose();
      }).then(
        (opened) => {
          if (this.#closed) return opened.close();
          connection = opened;
          this.#connection = opened;
          this.#connected = true;
          const held = [...this.#lent.values()].map((node) => ({ nodeId: node.nodeId, hostId: node.hostId, bundles: node.bundles, resources: node.resources }));
          opened.send({ ...this.#hello, resume: { nodes: held, waitedMs: Date.now() - this.#asked, released: [...this.#released], withdrawn: [...this.#withdrawn], elastic: [...this.#elastic.keys()], takenBack: [...this.#takenBack] } });
          if (this.#started) this.#cluster.events.emit('warning', { kind: 'cluster', message: `reconnected to the broker at ${this.#address}, holding ${held.length} lent node(s)` });
        },
        () => this.#reconnect(),
      );
    }, 1000);
    this.#reconnectTimer.unref();
  }

  /** Leaves the broker: it ends this driver's sessions (the driver's own shutdown ends them too). */
  close(): void {
    this.#closed = true;
    clearTimeout(this.#reconnectTimer);
    clearInterval(this.#idleTimer);
    clearInterval(this.#aliveTimer);
    for (const timer of this.#preempting.values()) clearTimeout(timer);
    this.#cluster.events.off('node-added', this.#onNodeAdded);
    this.#cluster.events.off('node-removed', this.#onNodeRemoved);
    this.#connection.close();
  }
}

/** Asks the broker at `address` what it lends and to whom. */
export async function brokerStatus(address: string, options: { token?: string; timeoutMs?: number } = {}): Promise<StatusMessage> {
  return askBroker(address, options, (token) => ({ t: 'status-request', token, protocol: AGENT_PROTOCOL }), (message) => (message.t === 'status' ? message : undefined));
}

/** Options of the job calls: the broker's token (the cluster's, or a user's) and how long to wait for an answer. */
export interface JobCallOptions {
  /** A user's token submits, sees and stops that user's jobs; the cluster's sees and stops all (default: TRELLIS_CLUSTER_TOKEN). */
  token?: string;
  timeoutMs?: number;
}

type JobAction = DistributiveOmit<JobRequestMessage, 't' | 'token' | 'protocol'>;
type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

function askJobs(address: string, options: JobCallOptions, action: JobAction): Promise<JobReplyMessage> {
  return askBroker(address, options, (token) => ({ t: 'job-request', token, protocol: AGENT_PROTOCOL, ...action }) as JobRequestMessage, (message) => (message.t === 'job-reply' ? message : undefined));
}

/**
 * Runs a job on the shared cluster: the broker starts `entrypoint` (a driver script, e.g.
 * ['node', 'batch.js']) on its host, with TRELLIS_BROKER and TRELLIS_CLUSTER_TOKEN set so that
 * `init({ cluster: { resources } })` joins this cluster as the submitting user. Returns at once.
 */
export async function submitJob(address: string, submission: JobSubmission, options: JobCallOptions = {}): Promise<JobInfo> {
  const runtimeEnv = submission?.runtimeEnv;
  if (runtimeEnv?.workingDir === undefined) return (await askJobs(address, options, { action: 'submit', submission })).job!;
  // The working directory is on this host: it goes with the submission, as packages.
  const packed = await packWorkingDirectory(checkRuntimeEnvironment(runtimeEnv));
  const { workingDir: _local, ...rest } = runtimeEnv;
  const workingDir = {
    code: { id: packed.code.id, bytes: packed.code.bytes, files: packed.code.files, size: packed.code.size },
    ...(packed.dependencies ? { dependencies: { id: packed.dependencies.id, bytes: packed.dependencies.bytes, files: packed.dependencies.files, size: packed.dependencies.size } } : {}),
  };
  // Sending takes longer the more there is (at 1 MB/s at worst), on top of the usual wait.
  const bytes = packed.code.bytes.byteLength + (packed.dependencies?.bytes.byteLength ?? 0);
  const timeoutMs = (options.timeoutMs ?? 10_000) + Math.ceil(bytes / 1000);
  return (await askJobs(address, { ...options, timeoutMs }, { action: 'submit', submission: { ...submission, runtimeEnv: rest }, workingDir })).job!;
}

/** The jobs the token may see, oldest first. */
export async function listJobs(address: string, options: JobCallOptions = {}): Promise<JobInfo[]> {
  return (await askJobs(address, options, { action: 'list' })).jobs!;
}

/** One job's state; ClusterError ERR_JOB_NOT_FOUND for a job the token may not see. */
export async function jobStatus(address: string, jobId: string, options: JobCallOptions = {}): Promise<JobInfo> {
  return (await askJobs(address, options, { action: 'status', jobId })).job!;
}

/** Up to 1 MiB of a job's output from byte `offset`: the text, where the next read starts, and whether the job ended and all its output was read. */
export async function jobLogs(address: string, jobId: string, offset = 0, options: JobCallOptions = {}): Promise<{ text: string; next: number; ended: boolean }> {
  return (await askJobs(address, options, { action: 'logs', jobId, offset })).logs!;
}

/** Stops a running job (SIGTERM to its processes, SIGKILL 10 s later); its driver's slices go back to the cluster. */
export async function stopJob(address: string, jobId: string, options: JobCallOptions = {}): Promise<JobInfo> {
  return (await askJobs(address, options, { action: 'stop', jobId })).job!;
}

/** One request on a connection of its own, and the answer `pick` takes (a refusal is a ClusterError with its code). */
function askBroker<T>(address: string, options: { token?: string; timeoutMs?: number }, request: (token: string) => BrokerInbound, pick: (message: BrokerOutbound) => T | undefined): Promise<T> {
  const token = options.token ?? process.env.TRELLIS_CLUSTER_TOKEN;
  if (!token) throw new InvalidArgumentError('asking a broker needs the cluster token (token option or TRELLIS_CLUSTER_TOKEN)', 'ERR_NO_TOKEN');
  const timeoutMs = options.timeoutMs ?? 10_000;
  return new Promise((resolve, reject) => {
    let settled = false;
    const timer = setTimeout(() => finish(new ClusterError('ERR_BROKER_TIMEOUT', `the broker at ${address} did not answer within ${timeoutMs} ms`)), timeoutMs);
    const finish = (result: { value: T } | Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      connection?.close();
      if (result instanceof Error) reject(result);
      else resolve(result.value);
    };
    let connection: FrameConnection<BrokerOutbound, BrokerInbound> | undefined;
    connectBroker(address, (message) => {
      if (message.t === 'broker-refused') return finish(new ClusterError(message.code, `the broker at ${address} refused: ${message.reason}`));
      const value = pick(message);
      if (value !== undefined) finish({ value });
    }, () => finish(new ClusterError('ERR_BROKER_UNREACHABLE', `the broker at ${address} closed the connection`))).then(
      (opened) => {
        connection = opened;
        if (settled) return opened.close();
        opened.send(request(token));
      },
      (error: Error) => finish(error),
    );
  });
}
