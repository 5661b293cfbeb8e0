/**
 * A host of a shared cluster (`trellis node --broker HOST:PORT`): it registers what the host
 * offers with the broker, and for each slice the broker lends a driver it runs a node agent
 * session (node-agent.ts) that joins that driver's cluster with the slice's resources and GPUs,
 * its own workers and its own store segment. Sessions of several drivers run side by side; each
 * ends with its driver, and the host tells the broker once its workers are dead and its store is
 * gone, so that no slice is lent twice.
 */
import { hostname } from 'node:os';
import { dial } from './tls.js';
import { ClusterError, InvalidArgumentError } from '../errors.js';
import { AGENT_PROTOCOL } from './agent-protocol.js';
import type { BrokerInbound, BrokerOutbound, OpenSessionMessage } from './broker-protocol.js';
import { FrameConnection } from './connection.js';
import { NodeAgent, parseAddress } from './node-agent.js';
import { nodeResources, type NodeOptions } from './node.js';

export interface HostAgentOptions extends NodeOptions {
  /** The broker, host:port (`trellis broker`). */
  broker: string;
  /** The cluster's token (default: TRELLIS_CLUSTER_TOKEN). */
  token?: string;
  /** The host's GPUs to offer, by device index (default: 0 .. numGpus - 1). */
  gpuDevices?: number[];
  /** The host other agents reach this one's sessions at (default: their address on the driver's connection). */
  advertiseHost?: string;
  /** Between tries to reach the broker, in ms (default 500). */
  retryMs?: number;
  /** How long a session may take to join its driver before it is given up (default 20,000 ms). */
  joinTimeoutMs?: number;
  /** Where drivers' working directories are unpacked (default: TRELLIS_CODE_CACHE, else trellis-code in the temp directory). */
  codeCache?: string;
  /** Where the host says what it does (default: nothing). */
  log?: (line: string) => void;
}

interface Session {
  agent: NodeAgent;
  resources: Record<string, number>;
  gpus: number[];
}

export class HostAgent {
  readonly options: HostAgentOptions;
  readonly hostId: string;
  readonly token: string;
  readonly gpuDevices: number[];
  readonly #broker: { host: string; port: number };
  readonly #sessions = new Map<string, Session>();
  #connection: FrameConnection<BrokerOutbound, BrokerInbound> | undefined;
  #stopped = false;
  #retryTimer: NodeJS.Timeout | undefined;
  #wake: (() => void) | undefined;
  /** Ends the wait on the current connection (one closed from this side hears no close of its own). */
  #disconnected: (() => void) | undefined;
  /** Resolves when the host stops (closed, or refused by the broker). */
  readonly done: Promise<void>;

  constructor(options: HostAgentOptions) {
    this.options = options;
    this.#broker = parseAddress(options.broker);
    const token = options.token ?? process.env.TRELLIS_CLUSTER_TOKEN;
    if (!token) throw new InvalidArgumentError('a host needs the cluster token (token option or TRELLIS_CLUSTER_TOKEN)', 'ERR_NO_TOKEN');
    this.token = token;
    this.hostId = options.id ?? hostname();
    if (options.gpuDevices && !options.gpuDevices.every((device) => Number.isInteger(device) && device >= 0)) {
      throw new InvalidArgumentError(`gpuDevices lists device indices (whole numbers >= 0), got ${JSON.stringify(options.gpuDevices)}`);
    }
    this.gpuDevices = options.gpuDevices ?? Array.from({ length: options.numGpus ?? 0 }, (_, index) => index);
    this.done = this.#run();
  }

  /** The sessions running now, by the node id each has in its driver's cluster. */
  get sessions(): string[] {
    return [...this.#sessions.values()].map((session) => session.agent.nodeId);
  }

  async #run(): Promise<void> {
    let waiting = false;
    while (!this.#stopped) {
      const connected = await this.#serveOnce();
      if (connected) {
        waiting = false;
        this.options.log?.(`lost the broker at ${this.options.broker}; sessions running go on`);
      } else if (!waiting) {
        this.options.log?.(`waiting for the broker at ${this.options.broker}`);
        waiting = true;
      }
      await this.#pause(this.options.retryMs ?? 500);
    }
  }

  /** One connection to the broker, till it closes; false where it could not be made. */
  #serveOnce(): Promise<boolean> {
    return new Promise((resolve, reject) => {
      this.#disconnected = () => resolve(true);
      const { socket, ready } = dial(this.#broker.host, this.#broker.port);
      socket.once('error', () => {
        socket.destroy();
        resolve(false);
      });
      socket.once(ready, () => {
        socket.removeAllListeners('error');
        socket.on('error', () => undefined);
        socket.setKeepAlive(true, 5000);
        const connection = new FrameConnection<BrokerOutbound, BrokerInbound>(
          socket,
          (message) => {
            if (message.t === 'broker-refused') {
              // A host id in use may be this host's own registration not yet seen to close.
              if (message.code === 'ERR_DUPLICATE_HOST' || message.code === 'ERR_BROKER_CLOSING') {
                this.options.log?.(`the broker refused this host for now (${message.reason}); trying again`);
                return;
              }
              this.#stopped = true;
              reject(new ClusterError(message.code, `the broker at ${this.options.broker} refused host ${this.hostId}: ${message.reason}`));
              return;
            }
            this.#onMessage(message);
          },
          () => {
            if (this.#connection === connection) this.#connection = undefined;
            resolve(true);
          },
        );
        this.#connection = connection;
        // Heard every 2 s, so a broker can tell this host from a hung one.
        const alive = setInterval(() => connection.send({ t: 'alive' }), 2000);
        alive.unref();
        socket.once('close', () => clearInterval(alive));
        const offered = nodeResources(this.options);
        connection.send({
          t: 'host-hello',
          token: this.token,
          protocol: AGENT_PROTOCOL,
          hostId: this.hostId,
          hostname: hostname(),
          resources: offered as Record<string, number>,
          gpus: this.gpuDevices,
          ...(this.options.objectStoreMemory !== undefined ? { objectStoreMemory: this.options.objectStoreMemory } : {}),
          sessions: [...this.#sessions].map(([sessionId, session]) => ({ sessionId, nodeId: session.agent.nodeId, resources: session.resources, gpus: session.gpus })),
        });
      });
    });
  }

  #onMessage(message: BrokerOutbound): void {
    switch (message.t) {
      case 'broker-welcome':
        this.options.log?.(`registered with the broker at ${this.options.broker} as ${message.id}`);
        return;
      case 'open-session':
        return this.#open(message);
      case 'close-session':
        void this.#sessions.get(message.sessionId)?.agent.close();
        return;
      default:
        return;
    }
  }

  #open(message: OpenSessionMessage): void {
    if (this.#stopped) return this.#ended(message.sessionId, 'the host is stopping');
    const gpus = message.gpus.filter((gpu) => this.gpuDevices.includes(gpu));
    const { CPU = 0, memory = 0, ...custom } = message.resources;
    const driver = message.driver.host.includes(':') ? `[${message.driver.host}]:${message.driver.port}` : `${message.driver.host}:${message.driver.port}`;
    let agent: NodeAgent;
    try {
      agent = new NodeAgent({
        head: driver,
        token: message.driver.token,
        id: message.nodeId,
        numCpus: CPU,
        memory,
        resources: custom,
        gpuDevices: gpus,
        objectStoreMemory: message.objectStoreMemory,
        once: true,
        transferPort: 0,
        advertiseHost: this.options.advertiseHost,
        connectTimeoutMs: this.options.joinTimeoutMs ?? 20_000,
        ...(this.options.codeCache !== undefined ? { codeCache: this.options.codeCache } : {}),
        log: this.options.log && ((line) => this.options.log!(`[${message.nodeId}] ${line}`)),
      });
    } catch (error) {
      return this.#ended(message.sessionId, (error as Error).message);
    }
    this.#sessions.set(message.sessionId, { agent, resources: message.resources, gpus });
    // The broker hears of the end only once the session has let go of everything (its peer port too).
    agent.done.then(
      () => undefined,
      (error: Error) => error.message,
    ).then(async (error) => {
      await agent.close();
      this.#ended(message.sessionId, error);
    });
  }

  #ended(sessionId: string, error?: string): void {
    this.#sessions.delete(sessionId);
    this.#connection?.send({ t: 'session-ended', sessionId, ...(error !== undefined ? { error } : {}) });
  }

  #pause(ms: number): Promise<void> {
    if (this.#stopped) return Promise.resolve();
    return new Promise((resolve) => {
      this.#wake = resolve;
      this.#retryTimer = setTimeout(resolve, ms);
    });
  }

  /** Stops: every session's workers are killed and its store removed; the broker hears of each. */
  async close(): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    this.#wake?.();
    await Promise.all([...this.#sessions.values()].map((session) => session.agent.close()));
    this.#connection?.flush();
    this.#connection?.close();
    this.#connection = undefined;
    this.#disconnected?.();
    await this.done.catch(() => undefined);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
