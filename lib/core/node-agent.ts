/**
 * A node agent: the daemon that makes a host (or one more process on this host) a node of a
 * head's cluster. It connects to the head over TCP, offers its resources, keeps the node's store
 * segment, starts and kills workers on the head's word (they connect to the head themselves), and
 * serves the head's reads and writes of its objects. When the head goes (its driver ended), the
 * agent kills that session's workers, drops its store and connects again for the next driver.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { hostname } from 'node:os';
import type { AddressInfo, Server, Socket } from 'node:net';
import { dial, serve } from './tls.js';
import { ObjectStore } from '../store/object-store.js';
import { ClusterError, CodePackageError, InvalidArgumentError } from '../errors.js';
import { FrameConnection } from './connection.js';
import { AGENT_PROTOCOL } from './agent-protocol.js';
import type { AgentMessage, AgentReplyMessage, AgentRequestMessage, HeadMessage, PeerHelloMessage, SpawnWorkerMessage } from './agent-protocol.js';
import { ObjectServer, PeerClient, replyError } from './object-server.js';
import { tokensMatch } from './node-listener.js';
import { MultiProcessService, findControlProgram } from '../gpu/mps.js';
import { storeTarget, transferObject } from './object-transfer.js';
import { deleteUnreportedPuts, nodeResources, type NodeOptions } from './node.js';
import { workerCommand } from './worker-loader.js';
import { CodeCache } from './code-package.js';

export interface NodeAgentOptions extends NodeOptions {
  /** The head's address, host:port (init's `listen`). */
  head: string;
  /** The cluster's token (init's `listen.token`). Default: TRELLIS_CLUSTER_TOKEN. */
  token?: string;
  /** Serve one driver, then stop (default: serve the next one too, for ever). */
  once?: boolean;
  /** Between tries to reach the head, in milliseconds (default 500). */
  retryMs?: number;
  /** Where the agent says what it does (default: nothing). */
  log?: (line: string) => void;
  /**
   * The port other agents pull objects from (default 0: any free one; null: none, so objects
   * between this agent and others go through the head).
   */
  transferPort?: number | null;
  /** The host other agents reach this one at (default: its address on the head's connection). */
  advertiseHost?: string;
  /**
   * A head not heard from for this long (ms) counts as gone: its session ends as if its
   * connection had closed (default 30,000; heads send word every second).
   */
  headTimeoutMs?: number;
  /**
   * The host's GPUs this agent offers, by device index (a broker's slice of the host): the node's
   * GPU i is device gpuDevices[i], and its workers see no other device. Sets numGpus.
   */
  gpuDevices?: number[];
  /**
   * Stop, failing `done` with ClusterError ERR_HEAD_UNREACHABLE, where no head welcomed this
   * agent within this long of its start, in ms (default: keep trying).
   */
  connectTimeoutMs?: number;
  /**
   * Where drivers' working directories are unpacked (runtimeEnv: see code-package.ts), shared by
   * every session of this host. Default: TRELLIS_CODE_CACHE, else trellis-code in the temp directory.
   */
  codeCache?: string;
}

/** The most bytes of one package a head may send (its packer's limit is lower). */
const MAX_PACKAGE_BYTES = 2 ** 31 - 1;

/** The local address of the head's connection, as peers would reach it (IPv4 unmapped). */
function advertisedHost(socket: Socket): string {
  const address = socket.localAddress ?? '127.0.0.1';
  return address.startsWith('::ffff:') ? address.slice(7) : address;
}

/** Parses host:port (an IPv6 host in brackets). */
export function parseAddress(address: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(address.trim());
  const port = match ? Number(match[3]) : NaN;
  if (!match || !(port > 0 && port < 65536)) throw new InvalidArgumentError(`a head address is host:port, got '${address}'`, 'ERR_INVALID_ADDRESS');
  return { host: match[1] ?? match[2], port };
}

/** One head's session: its connection, store and workers. */
class Session {
  readonly connection: FrameConnection<HeadMessage, AgentMessage>;
  readonly store: ObjectStore;
  readonly workers = new Map<string, ChildProcess>();
  /** Serves the head's reads and writes of this store. */
  readonly #objects: ObjectServer;
  /** Connections of other agents pulling from this store, and agents this one pulls from. */
  readonly #peers = new Set<{ close(): void }>();
  readonly #pullFrom = new Map<string, PeerClient>();
  readonly #statsTimer: NodeJS.Timeout;
  /** Resolves when the head is gone and everything of this session is released. */
  readonly ended: Promise<{ refused?: string; retry?: boolean; welcomed: boolean }>;
  #end!: (result: { refused?: string; retry?: boolean; welcomed: boolean }) => void;
  #refused: string | undefined;
  #retry = false;
  #welcomed = false;
  #closing = false;
  #sharing: Promise<void> | undefined;
  #multiProcessService: MultiProcessService | undefined;
  #heard: () => void;
  #welcomeTimer: NodeJS.Timeout | undefined;
  /** Packages of the head's working directory on their way here, by id. */
  readonly #uploads = new Map<string, { bytes: Buffer; filled: number }>();

  constructor(readonly agent: NodeAgent, readonly socket: Socket, readonly headUrl: string) {
    this.ended = new Promise((resolve) => (this.#end = resolve));
    this.store = ObjectStore.create({ capacity: agent.options.objectStoreMemory });
    this.connection = new FrameConnection<HeadMessage, AgentMessage>(
      socket,
      (message) => this.#onMessage(message),
      () => void this.#close(),
    );
    this.#objects = new ObjectServer(this.store, agent.nodeId, this.connection);
    // The head's writes land straight in the objects they fill.
    this.connection.bulkSink = (message, bulkLength) => this.#objects.sinkFor(message, bulkLength);
    let lastHeard = Date.now();
    this.#heard = () => (lastHeard = Date.now());
    // A head that takes the connection and never welcomes this agent (hung) is given up on too.
    const limit = agent.options.connectTimeoutMs;
    if (limit !== undefined) {
      this.#welcomeTimer = setTimeout(() => {
        if (this.#welcomed) return;
        agent.options.log?.(`the head at ${headUrl.slice('tcp://'.length)} did not welcome this node within ${limit} ms`);
        this.close();
      }, limit);
      this.#welcomeTimer.unref();
    }
    this.#statsTimer = setInterval(() => {
      if (!this.#welcomed) return;
      if (Date.now() - lastHeard > (agent.options.headTimeoutMs ?? 30_000)) {
        agent.options.log?.(`the head was not heard from for ${Date.now() - lastHeard} ms`);
        return this.close();
      }
      this.connection.send({ t: 'agent-stats', store: this.store.stats() });
    }, 1000).unref();
  }

  hello(): void {
    const options = this.agent.options;
    this.connection.send({
      t: 'agent-hello',
      token: this.agent.token,
      protocol: AGENT_PROTOCOL,
      nodeId: this.agent.nodeId,
      hostname: hostname(),
      resources: nodeResources(options) as Record<string, number>,
      numGpus: this.agent.numGpus,
      storeName: this.store.name,
      store: this.store.stats(),
      mps: findControlProgram() !== undefined,
      ...(this.agent.transferPort ? { transfer: { host: this.agent.options.advertiseHost ?? advertisedHost(this.socket), port: this.agent.transferPort } } : {}),
      pid: process.pid,
    });
  }

  #onMessage(message: HeadMessage): void {
    this.#heard();
    switch (message.t) {
      case 'head-alive':
        return;
      case 'welcome':
        this.#welcomed = true;
        this.agent.options.log?.(`joined ${this.headUrl.slice('tcp://'.length)} as node ${message.nodeId}`);
        this.connection.send({ t: 'agent-stats', store: this.store.stats() });
        if (message.gpuSharing === 'mps') this.#startSharing();
        return;
      case 'refused':
        this.#refused = message.reason;
        this.#retry = message.retry === true;
        this.close();
        return;
      case 'spawn-worker':
        return this.#spawn(message);
      case 'kill-worker':
        this.workers.get(message.workerId)?.kill('SIGKILL');
        return;
      case 'delete-objects':
        for (const id of message.ids) {
          if (this.store.closed || this.store.state(id) === 'absent') continue;
          try {
            this.store.delete(id);
          } catch {
            // Deleted meanwhile.
          }
        }
        return;
      case 'delete-puts':
        deleteUnreportedPuts(this.store, message.putIds, message.from);
        return;
      case 'agent-request':
        return this.#onRequest(message);
    }
  }

  /** The head shares GPUs by MPS: this host's workers join a daemon of this session's. */
  #startSharing(): void {
    this.#sharing = MultiProcessService.start().then(
      (service) => {
        if (this.#closing) return void service.close();
        this.#multiProcessService = service;
      },
      (error: Error) => {
        // Without it the head's choice cannot hold here: leave, saying why.
        this.agent.options.log?.(`cannot share this host's GPUs by MPS: ${error.message}`);
        this.close();
      },
    );
  }

  #spawn(message: SpawnWorkerMessage): void {
    // Workers join the MPS daemon, once it is up (before they initialize CUDA).
    if (this.#sharing && !this.#multiProcessService) {
      void this.#sharing.then(() => {
        if (!this.#closing) this.#spawn(message);
      });
      return;
    }
    const code = message.workingDirectory;
    const command = workerCommand(message.typeScript);
    const child = spawn(process.execPath, command.args, {
      // In this host's copy of the driver's working directory, whose modules it imports as the driver's.
      ...(code ? { cwd: code.path } : {}),
      env: {
        ...process.env,
        ...command.env,
        ...message.environment,
        ...this.#multiProcessService?.environment,
        TRELLIS_SOCKET: this.headUrl,
        TRELLIS_WORKER_ID: message.workerId,
        TRELLIS_NODE_ID: this.agent.nodeId,
        TRELLIS_STORE: this.store.name,
        TRELLIS_PUT_IDS: Buffer.from(message.putIds).toString('hex'),
        TRELLIS_CLUSTER_TOKEN: this.agent.token,
        ...(code ? { TRELLIS_CODE_ROOT: code.rootUrl } : {}),
        ...(this.agent.options.gpuDevices ? { TRELLIS_GPU_DEVICES: this.agent.options.gpuDevices.join(','), CUDA_VISIBLE_DEVICES: this.agent.options.gpuDevices.join(',') } : {}),
      },
      stdio: ['ignore', message.forwardOutput ? 'pipe' : 'inherit', message.forwardOutput ? 'pipe' : 'inherit'],
    });
    this.workers.set(message.workerId, child);
    if (message.forwardOutput && child.pid !== undefined) {
      this.#forward(message.workerId, child.pid, 'stdout', child.stdout!);
      this.#forward(message.workerId, child.pid, 'stderr', child.stderr!);
    }
    const exited = (code: number | null, signal: string | null) => {
      if (!this.workers.delete(message.workerId)) return;
      if (!this.store.closed) this.store.reapDeadProcesses();
      this.connection.send({ t: 'worker-exited', workerId: message.workerId, code, signal });
    };
    child.once('exit', exited);
    // A start that fails (no such executable, no resources) never exits: report it as an exit.
    child.once('error', () => exited(null, null));
    if (child.pid !== undefined) this.connection.send({ t: 'worker-spawned', workerId: message.workerId, pid: child.pid });
  }

  /** Sends a worker's output to the head a whole line at a time (the rest when it ends). */
  #forward(workerId: string, pid: number, stream: 'stdout' | 'stderr', from: NodeJS.ReadableStream): void {
    let partial = '';
    from.setEncoding('utf8');
    from.on('data', (text: string) => {
      const end = text.lastIndexOf('\n');
      if (end < 0) {
        partial += text;
        return;
      }
      this.connection.send({ t: 'worker-output', workerId, pid, stream, text: partial + text.slice(0, end + 1) });
      partial = text.slice(end + 1);
    });
    from.on('end', () => {
      if (partial) this.connection.send({ t: 'worker-output', workerId, pid, stream, text: `${partial}\n` });
    });
  }

  #onRequest(message: AgentRequestMessage): void {
    if (this.#objects.handle(message)) return;
    if (message.op === 'code-check' || message.op === 'code-write' || message.op === 'code-install') {
      this.#onCode(message).then(
        (value) => this.connection.send({ t: 'agent-reply', requestId: message.requestId, ok: true, value }),
        (error) => replyError(this.connection, message.requestId, error),
      );
      return;
    }
    if (message.op === 'pull') {
      const { id, host, port } = message.body as { id: string; host: string; port: number };
      const address = `${host}:${port}`;
      let peer = this.#pullFrom.get(address);
      if (!peer || peer.closed) this.#pullFrom.set(address, (peer = new PeerClient(address, host, port, this.agent.token)));
      transferObject(peer.source, storeTarget(this.store), id).then(
        () => this.connection.send({ t: 'agent-reply', requestId: message.requestId, ok: true, value: null }),
        (error) => replyError(this.connection, message.requestId, error),
      );
    }
  }

  /**
   * The head's working directory (code-package.ts): code-check {code, dependencies?} answers
   * {path} where this host has it installed, else {missing: ids}; code-write {id, offset, size}
   * brings a piece of a missing package; code-install {code, dependencies?} unpacks what came
   * and answers {path}.
   */
  async #onCode(message: AgentRequestMessage): Promise<unknown> {
    const cache = this.agent.codeCache;
    const { code, dependencies } = message.body as { code?: string; dependencies?: string };
    switch (message.op) {
      case 'code-check': {
        const path = await cache.installed(code!, dependencies);
        if (path) return { path };
        const missing = dependencies && !(await cache.hasDependencies(dependencies)) ? [dependencies, code] : [code];
        return { missing };
      }
      case 'code-write': {
        const { id, offset, size } = message.body as { id: string; offset: number; size: number };
        const bulk = message.bulk ?? new Uint8Array(0);
        if (!Number.isSafeInteger(size) || size <= 0 || size > MAX_PACKAGE_BYTES) throw new CodePackageError('ERR_CODE_PACKAGE', `a package of ${size} bytes cannot be sent to a host`);
        let upload = this.#uploads.get(id);
        if (!upload || upload.bytes.length !== size) this.#uploads.set(id, (upload = { bytes: Buffer.allocUnsafe(size), filled: 0 }));
        if (!Number.isSafeInteger(offset) || offset < 0 || offset + bulk.byteLength > size) throw new CodePackageError('ERR_CODE_PACKAGE', `a piece of package ${id} at ${offset} lies outside its ${size} bytes`);
        upload.bytes.set(bulk, offset);
        upload.filled += bulk.byteLength;
        return null;
      }
      default: {
        const take = (id: string): Buffer => {
          const upload = this.#uploads.get(id);
          this.#uploads.delete(id);
          if (!upload || upload.filled !== upload.bytes.length) throw new CodePackageError('ERR_CODE_PACKAGE', `package ${id} has not fully arrived on this host`);
          return upload.bytes;
        };
        const path = await cache.ensure({ id: code!, bytes: () => take(code!) }, dependencies ? { id: dependencies, bytes: () => take(dependencies) } : undefined);
        this.agent.options.log?.(`installed the head's working directory at ${path}`);
        return { path };
      }
    }
  }

  /** Another agent's connection to pull from this store: served till it or this session ends. */
  servePeer(connection: FrameConnection<AgentRequestMessage, AgentReplyMessage>): { handle(message: AgentRequestMessage): void; close(): void } {
    const server = new ObjectServer(this.store, this.agent.nodeId, connection);
    const peer = {
      handle: (message: AgentRequestMessage) => {
        if (!this.#closing) server.handle(message);
      },
      close: () => {
        this.#peers.delete(peer);
        server.close();
        connection.close();
      },
    };
    this.#peers.add(peer);
    return peer;
  }

  async #close(): Promise<void> {
    if (this.#closing) return;
    this.#closing = true;
    clearInterval(this.#statsTimer);
    clearTimeout(this.#welcomeTimer);
    const exits = [...this.workers.values()].map((child) => new Promise<void>((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) return resolve();
      child.once('exit', () => resolve());
      child.kill('SIGKILL');
    }));
    await Promise.all(exits);
    this.workers.clear();
    this.#objects.close();
    this.#uploads.clear();
    for (const peer of [...this.#peers]) peer.close();
    for (const peer of this.#pullFrom.values()) peer.close();
    this.#pullFrom.clear();
    this.store.close();
    // After the workers, as the daemon waits for its clients.
    await this.#sharing;
    await this.#multiProcessService?.close();
    if (this.#welcomed) this.agent.options.log?.('the head left; its workers and objects are gone');
    this.#end({ refused: this.#refused, retry: this.#retry, welcomed: this.#welcomed });
  }

  /** Ends the session from this side (a connection closed here hears no close of its own). */
  close(): void {
    this.connection.close();
    void this.#close();
  }
}

export class NodeAgent {
  readonly options: NodeAgentOptions;
  readonly nodeId: string;
  readonly token: string;
  readonly numGpus: number;
  /** Drivers' working directories unpacked on this host. */
  readonly codeCache: CodeCache;
  readonly #head: { host: string; port: number };
  #session: Session | undefined;
  #stopped = false;
  #transferServer: Server | undefined;
  /** The port of this agent's object server, once it listens. */
  transferPort: number | undefined;
  #retryTimer: NodeJS.Timeout | undefined;
  #wakeRetry: (() => void) | undefined;
  /** Resolves when the agent stops: closed, refused by its head, or (with `once`) its driver ended. */
  readonly done: Promise<void>;

  constructor(options: NodeAgentOptions) {
    this.options = options;
    this.#head = parseAddress(options.head);
    const token = options.token ?? process.env.TRELLIS_CLUSTER_TOKEN;
    if (!token) throw new InvalidArgumentError('a node agent needs the cluster token (token option or TRELLIS_CLUSTER_TOKEN)', 'ERR_NO_TOKEN');
    this.token = token;
    this.nodeId = options.id ?? `${hostname()}-${process.pid}`;
    if (options.gpuDevices && !options.gpuDevices.every((device) => Number.isInteger(device) && device >= 0)) {
      throw new InvalidArgumentError(`gpuDevices lists device indices (whole numbers >= 0), got ${JSON.stringify(options.gpuDevices)}`);
    }
    this.numGpus = options.gpuDevices?.length ?? options.numGpus ?? 0;
    this.codeCache = new CodeCache(options.codeCache);
    this.done = this.#run();
  }

  /** Serves other agents' pulls from the current session's store (after their token). */
  async #listenForPeers(): Promise<void> {
    const port = this.options.transferPort;
    if (port === null) return;
    const server = serve((socket) => {
      let peer: { handle(message: AgentRequestMessage): void; close(): void } | undefined;
      const connection: FrameConnection<AgentRequestMessage | PeerHelloMessage, AgentReplyMessage> = new FrameConnection(
        socket,
        (message) => {
          if (peer) return message.t === 'agent-request' && peer.handle(message);
          const session = this.#session;
          if (message.t !== 'peer-hello' || !tokensMatch(message.token, this.token) || !session) return connection.close();
          peer = session.servePeer(connection as FrameConnection<AgentRequestMessage, AgentReplyMessage>);
        },
        () => peer?.close(),
      );
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port ?? 0, '0.0.0.0', () => resolve());
    });
    this.#transferServer = server;
    this.transferPort = (server.address() as AddressInfo).port;
  }

  async #run(): Promise<void> {
    await this.#listenForPeers();
    const headUrl = `tcp://${this.#head.host.includes(':') ? `[${this.#head.host}]` : this.#head.host}:${this.#head.port}`;
    let waiting = false;
    const started = Date.now();
    let welcomedOnce = false;
    const giveUp = () => {
      const limit = this.options.connectTimeoutMs;
      if (limit === undefined || welcomedOnce || Date.now() - started < limit) return;
      this.#stopped = true;
      throw new ClusterError('ERR_HEAD_UNREACHABLE', `node ${this.nodeId} could not join the head at ${this.options.head} within ${limit} ms`);
    };
    while (!this.#stopped) {
      const socket = await this.#connect();
      if (!socket) {
        giveUp();
        if (!waiting) this.options.log?.(`waiting for the head at ${this.options.head}`);
        waiting = true;
        await this.#pause(this.options.retryMs ?? 500);
        continue;
      }
      waiting = false;
      const session = new Session(this, socket, headUrl);
      this.#session = session;
      session.hello();
      const result = await session.ended;
      this.#session = undefined;
      welcomedOnce ||= result.welcomed;
      if (result.refused !== undefined && result.retry) {
        this.options.log?.(`the head refused node ${this.nodeId} for now (${result.refused}); trying again`);
      } else if (result.refused !== undefined) {
        this.#stopped = true;
        throw new InvalidArgumentError(`the head refused node ${this.nodeId}: ${result.refused}`, 'ERR_NODE_REFUSED');
      }
      if (this.options.once && result.welcomed) break;
      giveUp();
      await this.#pause(this.options.retryMs ?? 500);
    }
  }

  #connect(): Promise<Socket | undefined> {
    return new Promise((resolve) => {
      const { socket, ready } = dial(this.#head.host, this.#head.port);
      socket.once(ready, () => {
        socket.removeAllListeners('error');
        resolve(socket);
      });
      socket.once('error', () => {
        socket.destroy();
        resolve(undefined);
      });
    });
  }

  #pause(ms: number): Promise<void> {
    if (this.#stopped) return Promise.resolve();
    return new Promise((resolve) => {
      this.#wakeRetry = resolve;
      this.#retryTimer = setTimeout(resolve, ms);
    });
  }

  /** Stops: the current session's workers are killed and its store removed. */
  async close(): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    this.#wakeRetry?.();
    this.#session?.close();
    await this.done.catch(() => undefined);
    await new Promise<void>((resolve) => (this.#transferServer ? this.#transferServer.close(() => resolve()) : resolve()));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
