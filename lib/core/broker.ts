/**
 * The broker of a shared cluster: a long-lived service that hosts register with
 * (`trellis node --broker`) and that drivers ask for resources (`init({ cluster })`). It lends
 * each driver slices of hosts, in bundles that stay whole on one host; a slice is a node agent
 * session on its host that joins the driver's cluster as a node, with its own workers and store,
 * and ends with the driver. The driver stays the owner of everything it runs: the broker only
 * decides who gets which part of which host, so a driver that dies frees its slices and nothing
 * else notices.
 *
 * Lending: drivers that want everything at once ('all') are served first, in the order they
 * asked, each only if all its bundles fit together (no driver holds half a gang while waiting for
 * the rest). Then drivers that take what fits ('any'), and bundles lent before whose host left,
 * one bundle at a time to whoever holds the smallest share of what it asked. A request that has
 * waited past `backfillWindowMs` stops later ones from jumping it, so a large job is not starved
 * by a stream of small ones.
 */
import type { AddressInfo, Server, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { JobManager } from './jobs.js';
import { serve } from './tls.js';
import { InvalidArgumentError } from '../errors.js';
import { AGENT_PROTOCOL } from './agent-protocol.js';
import type {
  BrokerInbound,
  BrokerOutbound,
  DriverHelloMessage,
  DriverStatus,
  HostHelloMessage,
  HostStatus,
  StatusMessage,
  JobReplyMessage,
  JobRequestMessage,
} from './broker-protocol.js';
import { FrameConnection } from './connection.js';
import { tokensMatch } from './node-listener.js';
import { toFixed } from './resources.js';

export interface BrokerOptions {
  /** The interface to listen on (default '0.0.0.0'). */
  host?: string;
  /** The TCP port (default 7390; 0 picks a free one, which `port` tells). */
  port?: number;
  /** The secret hosts and drivers must show (default: TRELLIS_CLUSTER_TOKEN). Required. */
  token?: string;
  /** How long a request may be jumped by later ones that fit where it does not (default 60,000 ms). */
  backfillWindowMs?: number;
  /**
   * The most of the cluster's total of any resource one job may hold at once, as a fraction
   * (default 1): with 0.5, no job holds more than half the cluster's GPUs, whatever it asks.
   */
  maxShare?: number;
  /**
   * Users, by name: each driver then shows its user's token (not the cluster's, which stays for
   * hosts), and a user's jobs together hold at most its `quota` of each resource named there.
   */
  users?: Record<string, { token: string; quota?: Record<string, number>; maxPriority?: number }>;
  /**
   * How long a job whose node is taken back for a job of higher priority has to give it back
   * before its host ends it (default 30,000 ms): time for work running there to finish.
   */
  preemptGraceMs?: number;
  /**
   * How long a host whose connection dropped has to register again before its sessions that had
   * not joined their drivers yet are lent elsewhere (default 10,000 ms). Sessions that joined
   * stay their driver's until the driver says it lost them.
   */
  hostGraceMs?: number;
  /**
   * A host or driver not heard from for this long (ms) is dropped as if its connection had
   * closed (default 30,000; they report every 2 s): a hung process may hold its connection open.
   */
  peerTimeoutMs?: number;
  /**
   * Where submitted jobs keep their records and output (default: trellis-broker-<port>/jobs in
   * the system's temp directory). Finished jobs are listed again by a broker started on it.
   */
  jobsDirectory?: string;
  /** Where the broker says what it does (default: nothing). */
  log?: (line: string) => void;
}

const SCALE = 10_000;
const MIN_SESSION_STORE = 64 * 1024 * 1024;

type Connection = FrameConnection<BrokerInbound, BrokerOutbound>;

interface HostRecord {
  id: string;
  hostname: string;
  connection: Connection;
  /** CPU, memory and custom resources in fixed point; GPUs apart, by device index. */
  total: Map<string, number>;
  free: Map<string, number>;
  gpus: number[];
  gpusFree: number[];
  objectStoreMemory: number | undefined;
  sessions: Map<string, SessionRecord>;
}

interface SessionRecord {
  id: string;
  nodeId: string;
  host: HostRecord;
  /** Undefined for a session a host still ran when it registered again (its driver unknown here). */
  driver: DriverRecord | undefined;
  resources: Map<string, number>;
  gpus: number[];
  bundles: number[];
  /** Whether its node joined the driver's cluster (the driver said so). */
  joined: boolean;
  /** When it was lent (the most recently lent is preempted first: it has done the least). */
  lentAt: number;
  /** Being taken back for a job of higher priority: ended at `deadline` if not given back before. */
  preempting?: { deadline: number; closing: boolean };
  /** Its bundles are all borrowed by the driver's pools (elastic): reclaimable at equal priority. */
  elastic: boolean;
  /** When its host's connection dropped (orphans only). */
  orphanedAt?: number;
}

interface Bundle {
  resources: Map<string, number>;
  gpus: number;
}

interface DriverRecord {
  jobId: string;
  name: string;
  /** The user whose token it showed (brokers with users). */
  user: string | undefined;
  connection: Connection;
  address: { host: string; port: number; token: string };
  wait: 'all' | 'any';
  /** Higher preempts lower (see DriverHelloMessage.priority). */
  priority: number;
  /** How many of its nodes were taken back for jobs of higher priority. */
  preempted: number;
  bundles: Bundle[];
  /** Indices of the bundles not lent now, and wanted. */
  pending: Set<number>;
  /** Indices of bundles it gave back while idle: not lent, not wanted until it asks again. */
  released: Set<number>;
  /** Indices of bundles it no longer wants at all (withdrawn): as if never asked. */
  withdrawn: Set<number>;
  /** Indices of bundles its pools borrowed to grow (request-more's elastic). */
  elastic: Set<number>;
  sessions: Set<SessionRecord>;
  /** Whether it was ever lent anything (a gang's later bundles are replacements, taken as they fit). */
  started: boolean;
  /** Hosts where it lost a node: used again only where nothing else fits (the host may be going down). */
  avoid: Set<string>;
  /**
   * Nodes it held under an earlier broker whose hosts have not registered here yet, with their
   * bundles: not lent to anyone else meanwhile.
   */
  claims: Map<string, number[]>;
  /** Nodes an earlier broker took back from it whose hosts have not registered here yet: ended when they do. */
  takenBack: Set<string>;
  arrived: number;
}

/** What is free on each host while a round is planned: taken for real only when the round commits. */
class Ledger {
  readonly #free = new Map<HostRecord, { resources: Map<string, number>; gpus: number }>();

  of(host: HostRecord): { resources: Map<string, number>; gpus: number } {
    let entry = this.#free.get(host);
    if (!entry) this.#free.set(host, (entry = { resources: new Map(host.free), gpus: host.gpusFree.length }));
    return entry;
  }

  fits(host: HostRecord, bundle: Bundle): boolean {
    const free = this.of(host);
    if (free.gpus < bundle.gpus) return false;
    for (const [name, amount] of bundle.resources) if ((free.resources.get(name) ?? 0) < amount) return false;
    return true;
  }

  /** Another ledger that starts from this one's figures (a plan that may be thrown away). */
  copy(): Ledger {
    const copy = new Ledger();
    for (const [host, free] of this.#free) copy.#free.set(host, { resources: new Map(free.resources), gpus: free.gpus });
    return copy;
  }

  take(host: HostRecord, bundle: Bundle): void {
    const free = this.of(host);
    free.gpus -= bundle.gpus;
    for (const [name, amount] of bundle.resources) free.resources.set(name, (free.resources.get(name) ?? 0) - amount);
  }

  /** Counts a session's slice as free (it is being taken back). */
  give(session: SessionRecord): void {
    const free = this.of(session.host);
    free.gpus += session.gpus.length;
    for (const [name, amount] of session.resources) free.resources.set(name, (free.resources.get(name) ?? 0) + amount);
  }

  /** Takes a trial's figures as its own (the trial's plan is kept). */
  adopt(trial: Ledger): void {
    this.#free.clear();
    for (const [host, free] of trial.#free) this.#free.set(host, free);
  }
}

/** Whether costs `a` come before `b`, compared element by element. */
function comesFirst(a: number[], b: number[]): boolean {
  for (let index = 0; index < a.length; index++) if (a[index] !== b[index]) return a[index] < b[index];
  return false;
}

function fromFixed(resources: Map<string, number>): Record<string, number> {
  const plain: Record<string, number> = {};
  for (const [name, amount] of resources) plain[name] = amount / SCALE;
  return plain;
}

function describe(resources: Map<string, number>, gpus: number): string {
  const parts = [...resources].filter(([, amount]) => amount > 0).map(([name, amount]) => `${name}: ${amount / SCALE}`);
  if (gpus > 0) parts.push(`GPU: ${gpus}`);
  return `{ ${parts.join(', ')} }`;
}

function isResourceRecord(value: unknown): value is Record<string, number> {
  return typeof value === 'object' && value !== null && !Array.isArray(value) &&
    Object.values(value).every((amount) => typeof amount === 'number' && Number.isFinite(amount) && amount >= 0);
}

/** A driver's bundles as the broker counts them; a reason where one is malformed. */
function readBundles(bundles: unknown): Bundle[] | string {
  if (!Array.isArray(bundles) || bundles.length === 0) return 'a driver asks for a non-empty list of bundles';
  const read: Bundle[] = [];
  for (const [index, bundle] of bundles.entries()) {
    if (!isResourceRecord(bundle)) return `bundle ${index} is not an object of resource amounts >= 0`;
    const { GPU: gpus = 0, ...rest } = bundle;
    if (!Number.isInteger(gpus)) return `bundle ${index} asks for ${gpus} GPUs: a lent GPU is a whole device`;
    const resources = toFixed(rest);
    if (resources.size === 0 && gpus === 0) return `bundle ${index} asks for nothing`;
    read.push({ resources, gpus });
  }
  return read;
}

/** Users as BrokerOptions gives them: InvalidArgumentError naming what is wrong. */
function checkUsers(users: BrokerOptions['users'], clusterToken: string): void {
  if (users === undefined) return;
  if (typeof users !== 'object' || users === null || Array.isArray(users)) throw new InvalidArgumentError('users is an object of { token, quota? } by user name');
  const tokens = new Set<string>([clusterToken]);
  for (const [name, user] of Object.entries(users)) {
    if (typeof user?.token !== 'string' || user.token.length < 8) throw new InvalidArgumentError(`user ${name} needs a token of 8 characters or more`);
    if (tokens.has(user.token)) throw new InvalidArgumentError(`user ${name}'s token is the cluster's or another user's: each user needs a token of its own`);
    tokens.add(user.token);
    if (user.quota !== undefined && !isResourceRecord(user.quota)) throw new InvalidArgumentError(`user ${name}'s quota is an object of resource amounts >= 0`);
    if (user.quota?.GPU !== undefined && !Number.isInteger(user.quota.GPU)) throw new InvalidArgumentError(`user ${name}'s quota of GPUs is a whole number, got ${user.quota.GPU}`);
    if (user.maxPriority !== undefined && !Number.isSafeInteger(user.maxPriority)) throw new InvalidArgumentError(`user ${name}'s maxPriority is an integer, got ${String(user.maxPriority)}`);
  }
}

export class Broker {
  readonly #server: Server;
  readonly #token: string;
  readonly #options: BrokerOptions;
  readonly #sockets = new Set<Socket>();
  readonly #hosts = new Map<string, HostRecord>();
  /** Totals since the broker started, for its metrics: slices lent and slices taken back. */
  readonly #totals = { lent: 0, preempted: 0 };
  readonly #drivers = new Map<string, DriverRecord>();
  /**
   * Sessions of hosts whose connection to the broker dropped, by id: the host may still run them
   * (a network blip, a broker restart) and say so when it registers again. Their drivers decide
   * whether they are lost (node-left), since the driver is connected to them, not the broker.
   */
  readonly #orphans = new Map<string, SessionRecord>();
  #nextJob = 1;
  #nextSession = 1;
  /** Told apart from an earlier broker's: hosts keep running sessions across a broker restart. */
  readonly #epoch = Date.now().toString(36).slice(-4);
  #closed = false;
  readonly #sweepTimer: NodeJS.Timeout;
  /** Hosts and drivers, with when each was last heard from. */
  readonly #peers = new Set<{ lastHeard: number; drop: () => void }>();
  readonly host: string;
  readonly port: number;
  /** The jobs users submitted: drivers this broker runs on its own host. */
  readonly jobs: JobManager;

  private constructor(server: Server, token: string, options: BrokerOptions) {
    this.#server = server;
    this.#token = token;
    this.#options = options;
    const address = server.address() as AddressInfo;
    this.host = address.address;
    this.port = address.port;
    // Jobs run on this host: they reach the broker on loopback unless it listens on one interface only.
    const reach = this.host === '0.0.0.0' || this.host === '::' ? '127.0.0.1' : this.host.includes(':') ? `[${this.host}]` : this.host;
    this.jobs = new JobManager(options.jobsDirectory ?? join(tmpdir(), `trellis-broker-${this.port}`, 'jobs'), {
      address: () => `${reach}:${this.port}`,
      log: (line) => this.#log(line),
    });
    const period = Math.min(1000, options.hostGraceMs ?? 10_000, options.peerTimeoutMs ?? 30_000, options.preemptGraceMs ?? 30_000);
    this.#sweepTimer = setInterval(() => this.#sweepOrphans(), Math.max(10, period)).unref();
  }

  /**
   * Orphans past the grace that never joined their driver: their bundles are lent elsewhere.
   * Preempted sessions past theirs: their hosts end them.
   */
  #sweepOrphans(): void {
    const silence = this.#options.peerTimeoutMs ?? 30_000;
    for (const peer of [...this.#peers]) if (Date.now() - peer.lastHeard > silence) peer.drop();
    for (const host of this.#hosts.values()) {
      for (const session of host.sessions.values()) {
        if (session.preempting && Date.now() >= session.preempting.deadline) this.#endPreempted(session, 'its grace ran out');
      }
    }
    const grace = this.#options.hostGraceMs ?? 10_000;
    let freed = false;
    for (const session of [...this.#orphans.values()]) {
      if (Date.now() - session.orphanedAt! < grace) continue;
      this.#orphans.delete(session.id);
      const driver = session.driver;
      if (session.joined || !driver || !driver.sessions.delete(session)) continue;
      session.driver = undefined;
      driver.avoid.add(session.host.id);
      for (const index of session.bundles) driver.pending.add(index);
      driver.connection.send({ t: 'session-lost', nodeId: session.nodeId, reason: `host ${session.host.id} left the cluster before the node joined`, requeued: true });
      freed = true;
    }
    if (freed) this.#allocate();
  }

  /** Listens as `options` say. Fails with ERR_NO_TOKEN without a token, ERR_ADDRESS_IN_USE where taken. */
  static async start(options: BrokerOptions = {}): Promise<Broker> {
    const token = options.token ?? process.env.TRELLIS_CLUSTER_TOKEN;
    if (!token) throw new InvalidArgumentError('a broker needs a token (token option or TRELLIS_CLUSTER_TOKEN): whoever joins the cluster runs code in it', 'ERR_NO_TOKEN');
    const host = options.host ?? '0.0.0.0';
    const port = options.port ?? 7390;
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new InvalidArgumentError(`the broker's port must be an integer from 0 to 65535, got ${String(port)}`);
    const window = options.backfillWindowMs ?? 60_000;
    if (!(window >= 0)) throw new InvalidArgumentError(`backfillWindowMs must be a number of ms >= 0, got ${String(window)}`);
    const grace = options.preemptGraceMs ?? 30_000;
    if (!(grace >= 0)) throw new InvalidArgumentError(`preemptGraceMs must be a number of ms >= 0, got ${String(grace)}`);
    const share = options.maxShare ?? 1;
    if (!(share > 0 && share <= 1)) throw new InvalidArgumentError(`maxShare is a fraction of the cluster, above 0 and at most 1, got ${String(share)}`);
    checkUsers(options.users, token);
    let onSocket: (socket: Socket) => void = (socket) => socket.destroy();
    const server = serve((socket) => onSocket(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (error: NodeJS.ErrnoException) =>
        reject(new InvalidArgumentError(`the broker cannot listen on ${host}:${port}: ${error.message}`, error.code === 'EADDRINUSE' ? 'ERR_ADDRESS_IN_USE' : 'ERR_LISTEN')));
      server.listen(port, host, () => resolve());
    });
    const broker = new Broker(server, token, options);
    onSocket = (socket) => broker.#accept(socket);
    return broker;
  }

  #accept(socket: Socket): void {
    this.#sockets.add(socket);
    socket.setKeepAlive(true, 5000);
    let role: { close(): void } | undefined;
    let onMessage: ((message: BrokerInbound) => void) | undefined;
    const peer = { lastHeard: Date.now(), drop: () => undefined as void };
    const connection: Connection = new FrameConnection<BrokerInbound, BrokerOutbound>(
      socket,
      (message) => {
        peer.lastHeard = Date.now();
        if (message.t === 'alive') return;
        if (onMessage) return onMessage(message);
        const refuse = (code: string, reason: string) => {
          connection.send({ t: 'broker-refused', code, reason });
          connection.flush();
          setTimeout(() => connection.close(), 100).unref();
        };
        const token = 'token' in message ? message.token : undefined;
        const user = this.#userOf(token);
        const refusal = this.#tokenRefusal(message.t, tokensMatch(token, this.#token), user);
        if (refusal) return refuse('ERR_WRONG_TOKEN', refusal);
        if (!('protocol' in message) || message.protocol !== AGENT_PROTOCOL) {
          return refuse('ERR_PROTOCOL', `it speaks cluster protocol ${String((message as { protocol?: unknown }).protocol)}, this broker ${AGENT_PROTOCOL}: run the same trellis version everywhere`);
        }
        if (this.#closed) return refuse('ERR_BROKER_CLOSING', 'the broker is shutting down');
        switch (message.t) {
          case 'status-request':
            connection.send(this.status());
            connection.flush();
            setTimeout(() => connection.close(), 100).unref();
            return;
          case 'job-request':
            this.#jobRequest(message, user).then(
              (reply) => {
                connection.send(reply);
                connection.flush();
                setTimeout(() => connection.close(), 100).unref();
              },
              (error: Error & { code?: string }) => refuse(error.code ?? 'ERR_JOB', error.message),
            );
            return;
          case 'host-hello': {
            const host = this.#addHost(message, connection, refuse);
            if (!host) return;
            onMessage = (next) => this.#onHostMessage(host, next);
            role = { close: () => this.#removeHost(host) };
            this.#watch(peer, `host ${host.id}`, connection, () => this.#removeHost(host));
            return;
          }
          case 'driver-hello': {
            const driver = this.#addDriver(message, connection, socket, refuse, user);
            if (!driver) return;
            onMessage = (next) => {
              if (next.t === 'node-left') this.#nodeLeft(driver, next.nodeId);
              else if (next.t === 'release-node') this.#release(driver, next.nodeId, next.withdraw === true);
              else if (next.t === 'withdraw') this.#withdraw(driver, next.bundles);
              else if (next.t === 'request-again') this.#requestAgain(driver, next.bundles);
              else if (next.t === 'request-more') this.#requestMore(driver, next.bundles, next.elastic === true);
              else if (next.t === 'node-joined') for (const session of driver.sessions) if (session.nodeId === next.nodeId) session.joined = true;
            };
            role = { close: () => this.#removeDriver(driver) };
            this.#watch(peer, `${driver.name} (${driver.jobId})`, connection, () => this.#removeDriver(driver));
            return;
          }
          default:
            return refuse('ERR_PROTOCOL', `a connection begins with a hello, not '${String((message as { t: unknown }).t)}'`);
        }
      },
      () => {
        this.#sockets.delete(socket);
        this.#peers.delete(peer);
        role?.close();
      },
    );
  }

  /** Drops a host or driver that falls silent, as if its connection had closed. */
  #watch(peer: { lastHeard: number; drop: () => void }, who: string, connection: Connection, remove: () => void): void {
    peer.drop = () => {
      this.#log(`${who} was not heard from for ${Date.now() - peer.lastHeard} ms: dropped`);
      this.#peers.delete(peer);
      // A connection closed from this side hears no close of its own.
      connection.close();
      remove();
    };
    this.#peers.add(peer);
  }

  // -------------------------------------------------------------------------------------------
  // Hosts

  #addHost(hello: HostHelloMessage, connection: Connection, refuse: (code: string, reason: string) => void): HostRecord | undefined {
    if (typeof hello.hostId !== 'string' || hello.hostId === '') return void refuse('ERR_INVALID_ARGUMENT', 'a host names itself');
    if (!isResourceRecord(hello.resources)) return void refuse('ERR_INVALID_ARGUMENT', `host ${hello.hostId} offers resources that are not amounts >= 0`);
    if (!Array.isArray(hello.gpus) || !hello.gpus.every((gpu) => Number.isInteger(gpu) && gpu >= 0)) {
      return void refuse('ERR_INVALID_ARGUMENT', `host ${hello.hostId} lists its GPUs as something other than device indices`);
    }
    if (this.#hosts.has(hello.hostId)) return void refuse('ERR_DUPLICATE_HOST', `a host with id ${hello.hostId} is already registered`);
    const { GPU: _gpus, ...offered } = hello.resources;
    const total = toFixed(offered);
    const host: HostRecord = {
      id: hello.hostId,
      hostname: String(hello.hostname),
      connection,
      total,
      free: new Map(total),
      gpus: [...hello.gpus],
      gpusFree: [...hello.gpus],
      objectStoreMemory: typeof hello.objectStoreMemory === 'number' ? hello.objectStoreMemory : undefined,
      sessions: new Map(),
    };
    const ending: string[] = [];
    // Sessions it still serves: their slices stay taken, and those the broker knew keep their driver.
    for (const running of Array.isArray(hello.sessions) ? hello.sessions : []) {
      const resources = toFixed(isResourceRecord(running.resources) ? running.resources : {});
      const gpus = (running.gpus ?? []).filter((gpu) => host.gpusFree.includes(gpu));
      const known = this.#orphans.get(running.sessionId);
      this.#orphans.delete(running.sessionId);
      const session: SessionRecord = known && known.host.id === host.id
        ? { ...known, host, resources, gpus }
        : { id: running.sessionId, nodeId: String(running.nodeId ?? running.sessionId), host, driver: undefined, resources, gpus, bundles: [], joined: true, lentAt: 0, elastic: false };
      delete session.orphanedAt;
      if (session.driver?.sessions.delete(known!)) session.driver.sessions.add(session);
      else session.driver = this.#claim(session);
      this.#take(host, resources, gpus);
      host.sessions.set(session.id, session);
      // Taken back under an earlier broker, its grace interrupted: it ends now (after the welcome).
      if (!session.driver && [...this.#drivers.values()].some((driver) => driver.takenBack.delete(session.nodeId))) ending.push(session.id);
    }
    this.#hosts.set(host.id, host);
    for (const driver of this.#drivers.values()) driver.avoid.delete(host.id);
    connection.send({ t: 'broker-welcome', id: host.id });
    for (const sessionId of ending) connection.send({ t: 'close-session', sessionId });
    this.#log(`host ${host.id} (${host.hostname}) offers ${describe(total, host.gpus.length)}`);
    this.#allocate();
    return host;
  }

  /** The driver that says it holds `session`'s node (it came back to this broker first), if any. */
  #claim(session: SessionRecord): DriverRecord | undefined {
    for (const driver of this.#drivers.values()) {
      const claim = driver.claims.get(session.nodeId);
      if (!claim) continue;
      driver.claims.delete(session.nodeId);
      session.bundles = claim;
      session.elastic = claim.length > 0 && claim.every((index) => driver.elastic.has(index));
      driver.sessions.add(session);
      return driver;
    }
    return undefined;
  }

  #onHostMessage(host: HostRecord, message: BrokerInbound): void {
    if (message.t !== 'session-ended') return;
    const session = host.sessions.get(message.sessionId);
    if (!session) return;
    host.sessions.delete(session.id);
    this.#give(host, session.resources, session.gpus);
    const driver = session.driver;
    if (driver && this.#drivers.get(driver.jobId) === driver && driver.sessions.delete(session) && !session.preempting) {
      // A session that never began (the host could not reach the driver) is not asked for again:
      // the next try would fail the same way. One that ended under a live driver is.
      const requeued = message.error === undefined;
      if (requeued) for (const index of session.bundles) driver.pending.add(index);
      const reason = message.error ?? 'its session on the host ended';
      driver.connection.send({ t: 'session-lost', nodeId: session.nodeId, reason, requeued });
    }
    this.#log(`host ${host.id} ended session ${session.nodeId}${message.error ? `: ${message.error}` : ''}`);
    this.#allocate();
  }

  /**
   * A host's connection to the broker closed. Its sessions may live on (their connections are to
   * their drivers): they wait as orphans for the host to come back, while their drivers say
   * whether they lost them (node-left). What is asked but fits no host left is refused.
   */
  #removeHost(host: HostRecord): void {
    if (this.#hosts.get(host.id) !== host) return;
    this.#hosts.delete(host.id);
    this.#log(`host ${host.id} left`);
    const now = Date.now();
    for (const session of host.sessions.values()) {
      if (!session.driver) continue;
      session.orphanedAt = now;
      this.#orphans.set(session.id, session);
    }
    host.sessions.clear();
    for (const driver of this.#drivers.values()) this.#refuseUnsatisfiable(driver);
    this.#allocate();
  }

  /** A driver gives an idle node back: its host ends the session, and its bundles wait unwanted. */
  #release(driver: DriverRecord, nodeId: string, withdraw: boolean): void {
    const session = [...driver.sessions].find((candidate) => candidate.nodeId === nodeId);
    if (!session) return;
    // A preempted node given back before its grace ran out: its bundles are wanted still.
    if (session.preempting) return this.#endPreempted(session, 'its job gave it back');
    driver.sessions.delete(session);
    session.driver = undefined;
    this.#orphans.delete(session.id);
    for (const index of session.bundles) (withdraw ? driver.withdrawn : driver.released).add(index);
    this.#log(`${driver.name} (${driver.jobId}) gave back node ${nodeId}`);
    // The slice is lent again once its host says the session ended.
    if (session.host.sessions.get(session.id) === session && this.#hosts.get(session.host.id) === session.host) {
      session.host.connection.send({ t: 'close-session', sessionId: session.id });
    }
  }

  /** A driver asks for more bundles after init: lent as they fit, as a driver that takes what fits. */
  #requestMore(driver: DriverRecord, bundles: unknown, elastic: boolean): void {
    const read = readBundles(bundles);
    if (typeof read === 'string') return void driver.connection.send({ t: 'unsatisfiable', reason: read });
    const first = driver.bundles.length;
    driver.bundles.push(...read);
    driver.started = true;
    for (let index = first; index < driver.bundles.length; index++) {
      if (elastic) driver.elastic.add(index);
      // One no host could ever hold is dropped at once, saying which: it would wait forever.
      const reason = this.#holdsNowhere(index, driver.bundles[index]);
      if (reason) {
        driver.withdrawn.add(index);
        driver.connection.send({ t: 'unsatisfiable', reason, bundles: [index] });
      } else {
        driver.pending.add(index);
      }
    }
    this.#allocate();
  }

  /** Why no registered host could ever hold `bundle` (undefined where one could, or none is registered). */
  #holdsNowhere(index: number, bundle: Bundle): string | undefined {
    if (this.#hosts.size === 0) return undefined;
    const holds = [...this.#hosts.values()].some((host) =>
      host.gpus.length >= bundle.gpus && [...bundle.resources].every(([name, amount]) => (host.total.get(name) ?? 0) >= amount));
    if (holds) return undefined;
    const largest = [...this.#hosts.values()].map((host) => `${host.id} ${describe(host.total, host.gpus.length)}`).join(', ');
    return `bundle ${index} ${describe(bundle.resources, bundle.gpus)} fits no host of the cluster (${largest})`;
  }

  /** A driver no longer wants bundles it asked for (and holds none of them now). */
  #withdraw(driver: DriverRecord, bundles: unknown): void {
    if (!Array.isArray(bundles)) return;
    for (const index of bundles) {
      if (!Number.isInteger(index) || index < 0 || index >= driver.bundles.length) continue;
      if (driver.pending.delete(index) || driver.released.delete(index)) driver.withdrawn.add(index);
    }
    this.#allocate();
  }

  /** A driver wants bundles it gave back again. */
  #requestAgain(driver: DriverRecord, bundles: unknown): void {
    if (!Array.isArray(bundles)) return;
    for (const index of bundles) {
      if (!driver.released.delete(index)) continue;
      driver.pending.add(index);
    }
    this.#allocate();
  }

  /** A driver lost a lent node: its bundles are asked for again (the slice frees when its host says). */
  #nodeLeft(driver: DriverRecord, nodeId: string): void {
    const claim = driver.claims.get(nodeId);
    if (claim) {
      driver.claims.delete(nodeId);
      for (const index of claim) driver.pending.add(index);
      return this.#allocate();
    }
    const session = [...driver.sessions].find((candidate) => candidate.nodeId === nodeId);
    if (!session) return;
    driver.sessions.delete(session);
    session.driver = undefined;
    this.#orphans.delete(session.id);
    if (!session.preempting) driver.avoid.add(session.host.id);
    for (const index of session.bundles) driver.pending.add(index);
    this.#log(`${driver.name} (${driver.jobId}) lost node ${nodeId}; its bundles are asked for again`);
    // Still running on a host that did not notice: ask it to end, so the slice comes back.
    if (session.host.sessions.get(session.id) === session && this.#hosts.get(session.host.id) === session.host) {
      session.host.connection.send({ t: 'close-session', sessionId: session.id });
    }
    this.#allocate();
  }

  #take(host: HostRecord, resources: Map<string, number>, gpus: number[]): void {
    for (const [name, amount] of resources) host.free.set(name, (host.free.get(name) ?? 0) - amount);
    host.gpusFree = host.gpusFree.filter((gpu) => !gpus.includes(gpu));
  }

  #give(host: HostRecord, resources: Map<string, number>, gpus: number[]): void {
    for (const [name, amount] of resources) host.free.set(name, Math.min(host.total.get(name) ?? 0, (host.free.get(name) ?? 0) + amount));
    for (const gpu of gpus) if (host.gpus.includes(gpu) && !host.gpusFree.includes(gpu)) host.gpusFree.push(gpu);
    host.gpusFree.sort((a, b) => a - b);
  }

  // -------------------------------------------------------------------------------------------
  // Drivers

  /**
   * Why a connection's first message is refused for its token, if it is: hosts show the
   * cluster's; drivers the cluster's, or their user's where the broker has users; status either.
   */
  #tokenRefusal(kind: BrokerInbound['t'], isCluster: boolean, user: string | undefined): string | undefined {
    if (kind === 'status-request' || kind === 'job-request') return isCluster || user ? undefined : 'wrong token';
    if (kind !== 'driver-hello') return isCluster ? undefined : 'wrong token';
    if (this.#options.users === undefined) return isCluster ? undefined : 'wrong token';
    if (user) return undefined;
    return isCluster ? "this broker admits drivers by their user's token, not the cluster's" : 'wrong token';
  }

  /** The user whose token this is, if the broker has users. */
  #userOf(token: unknown): string | undefined {
    for (const [name, user] of Object.entries(this.#options.users ?? {})) if (tokensMatch(token, user.token)) return name;
    return undefined;
  }

  #addDriver(hello: DriverHelloMessage, connection: Connection, socket: Socket, refuse: (code: string, reason: string) => void, user: string | undefined): DriverRecord | undefined {
    const bundles = readBundles(hello.bundles);
    if (typeof bundles === 'string') return void refuse('ERR_INVALID_ARGUMENT', bundles);
    if (hello.wait !== 'all' && hello.wait !== 'any') return void refuse('ERR_INVALID_ARGUMENT', `wait is 'all' or 'any', got ${String(hello.wait)}`);
    const listen = hello.listen;
    if (!listen || !Number.isInteger(listen.port) || listen.port <= 0 || listen.port > 65535 || typeof listen.token !== 'string') {
      return void refuse('ERR_INVALID_ARGUMENT', 'a driver says where hosts reach it (a port and a token)');
    }
    const priority = hello.priority ?? 0;
    if (!Number.isSafeInteger(priority)) return void refuse('ERR_INVALID_ARGUMENT', `priority is an integer, got ${String(hello.priority)}`);
    const maxPriority = user === undefined ? undefined : this.#options.users?.[user]?.maxPriority ?? 0;
    if (maxPriority !== undefined && priority > maxPriority) {
      return void refuse('ERR_PRIORITY', `user ${user} may ask for priority ${maxPriority} at most, not ${priority}`);
    }
    const seen = socket.remoteAddress ?? '127.0.0.1';
    const host = typeof listen.host === 'string' && listen.host !== '' ? listen.host : seen.startsWith('::ffff:') ? seen.slice(7) : seen;
    const jobId = `job-${this.#nextJob++}-${this.#epoch}`;
    const driver: DriverRecord = {
      jobId,
      name: typeof hello.name === 'string' && hello.name !== '' ? hello.name : jobId,
      user,
      connection,
      address: { host, port: listen.port, token: listen.token },
      wait: hello.wait,
      priority,
      preempted: 0,
      bundles,
      pending: new Set(bundles.keys()),
      released: new Set(),
      withdrawn: new Set(),
      elastic: new Set(),
      sessions: new Set(),
      started: false,
      avoid: new Set(),
      claims: new Map(),
      takenBack: new Set(),
      arrived: Date.now(),
    };
    this.#drivers.set(jobId, driver);
    if (hello.resume) {
      // Its place in the queue is kept: it asked before those that came to this broker first.
      const waited = hello.resume.waitedMs;
      if (typeof waited === 'number' && waited > 0 && Number.isFinite(waited)) driver.arrived = Date.now() - waited;
      for (const index of Array.isArray(hello.resume.released) ? hello.resume.released : []) {
        if (driver.pending.delete(index)) driver.released.add(index);
      }
      for (const index of Array.isArray(hello.resume.withdrawn) ? hello.resume.withdrawn : []) {
        if (driver.pending.delete(index)) driver.withdrawn.add(index);
      }
      for (const index of Array.isArray(hello.resume.elastic) ? hello.resume.elastic : []) {
        if (Number.isInteger(index) && index >= 0 && index < bundles.length) driver.elastic.add(index);
      }
      this.#resume(driver, hello.resume.nodes);
      this.#endTakenBack(driver, hello.resume.takenBack);
    }
    connection.send({ t: 'broker-welcome', id: jobId });
    this.#log(`${driver.name} (${jobId}, ${host}:${listen.port}) asks for ${bundles.length} bundle(s), ${driver.wait === 'all' ? 'all at once' : 'as they fit'}${priority !== 0 ? `, priority ${priority}` : ''}`);
    if (this.#refuseUnsatisfiable(driver)) return driver;
    this.#allocate();
    return driver;
  }

  /**
   * A driver that held nodes under an earlier broker: sessions their hosts registered again are
   * its own once more; the others are claimed, their bundles held for it, until their hosts come
   * back or the driver says it lost them.
   */
  #resume(driver: DriverRecord, nodes: { nodeId: string; bundles: number[] }[]): void {
    // A gang that was still waiting is still a gang.
    if (Array.isArray(nodes) && nodes.length > 0) driver.started = true;
    for (const node of Array.isArray(nodes) ? nodes : []) {
      const bundles = (Array.isArray(node.bundles) ? node.bundles : []).filter((index) => driver.pending.has(index));
      for (const index of bundles) driver.pending.delete(index);
      const session = [...this.#hosts.values()].flatMap((host) => [...host.sessions.values()]).find((candidate) => candidate.nodeId === node.nodeId && !candidate.driver);
      if (session) {
        session.driver = driver;
        session.bundles = bundles;
        session.joined = true;
        session.elastic = bundles.length > 0 && bundles.every((index) => driver.elastic.has(index));
        driver.sessions.add(session);
      } else {
        driver.claims.set(String(node.nodeId), bundles);
      }
    }
    this.#log(`${driver.name} (${driver.jobId}) came back holding ${driver.sessions.size + driver.claims.size} node(s)`);
  }

  /**
   * Nodes a driver was giving back when an earlier broker stopped: those whose hosts registered
   * here already (unclaimed) end now; the others when their hosts do.
   */
  #endTakenBack(driver: DriverRecord, nodeIds: unknown): void {
    for (const nodeId of Array.isArray(nodeIds) ? nodeIds : []) {
      const session = [...this.#hosts.values()].flatMap((host) => [...host.sessions.values()]).find((candidate) => candidate.nodeId === nodeId && !candidate.driver);
      if (session) session.host.connection.send({ t: 'close-session', sessionId: session.id });
      else driver.takenBack.add(String(nodeId));
    }
  }

  /** Tells a driver whose waiting bundles no registered host could ever hold (with hosts there to ask). */
  #refuseUnsatisfiable(driver: DriverRecord): boolean {
    if (this.#hosts.size === 0) return false;
    if (driver.wait === 'all' && !driver.started) {
      // On its own, as if the user's other jobs held nothing (they end): what is over then never fits.
      const over = this.#overLimit(driver, [...driver.pending].map((index) => driver.bundles[index]), { alone: true });
      if (over) {
        driver.connection.send({ t: 'unsatisfiable', reason: `it asks for ${over}` });
        return true;
      }
    }
    for (const index of driver.pending) {
      const reason = this.#holdsNowhere(index, driver.bundles[index]);
      if (!reason) continue;
      driver.connection.send({ t: 'unsatisfiable', reason });
      return true;
    }
    return false;
  }

  #removeDriver(driver: DriverRecord): void {
    if (this.#drivers.get(driver.jobId) !== driver) return;
    this.#drivers.delete(driver.jobId);
    this.#log(`${driver.name} (${driver.jobId}) left; its ${driver.sessions.size} session(s) end`);
    // Its slices come back when each host says its session ended (its workers dead), not before.
    for (const session of driver.sessions) session.host.connection.send({ t: 'close-session', sessionId: session.id });
    for (const session of driver.sessions) this.#orphans.delete(session.id);
    driver.sessions.clear();
    this.#allocate();
  }

  // -------------------------------------------------------------------------------------------
  // Lending

  /** The cluster's total of each resource (GPUs counted as 'GPU'), in fixed point. */
  #clusterTotal(): Map<string, number> {
    const total = new Map<string, number>();
    for (const host of this.#hosts.values()) {
      for (const [name, amount] of host.total) total.set(name, (total.get(name) ?? 0) + amount);
      total.set('GPU', (total.get('GPU') ?? 0) + host.gpus.length * SCALE);
    }
    return total;
  }

  /**
   * Why the driver may not hold `more` on top of what it holds (undefined where it may): past
   * maxShare of the cluster's total of a resource, or past its user's quota with the user's other
   * jobs (what they hold, and what `rounds` plans for them now).
   */
  #overLimit(driver: DriverRecord, more: Bundle[], plan: { total?: Map<string, number>; rounds?: Map<DriverRecord, Map<HostRecord, number[]>>; alone?: boolean } = {}): string | undefined {
    const total = plan.total ?? this.#clusterTotal();
    const sum = (sessions: Iterable<SessionRecord>, bundles: Bundle[]) => {
      const held = new Map<string, number>();
      const add = (resources: Map<string, number>, gpus: number) => {
        for (const [name, amount] of resources) held.set(name, (held.get(name) ?? 0) + amount);
        if (gpus > 0) held.set('GPU', (held.get('GPU') ?? 0) + gpus * SCALE);
      };
      // A slice being taken back is not counted: its bundles are asked for again.
      for (const session of sessions) if (!session.preempting) add(session.resources, session.gpus.length);
      for (const bundle of bundles) add(bundle.resources, bundle.gpus);
      return held;
    };
    const share = this.#options.maxShare ?? 1;
    if (share < 1) {
      const before = sum(driver.sessions, []);
      for (const [name, amount] of sum(driver.sessions, more)) {
        if (amount <= (before.get(name) ?? 0)) continue;
        const cap = Math.floor((total.get(name) ?? 0) * share);
        if (amount > cap) return `${name}: ${amount / SCALE}, more than the ${cap / SCALE} a job may hold (maxShare ${share} of ${(total.get(name) ?? 0) / SCALE})`;
      }
    }
    const quota = driver.user === undefined ? undefined : this.#options.users?.[driver.user]?.quota;
    if (quota) {
      const jobs = plan.alone ? [driver] : [...this.#drivers.values()].filter((other) => other.user === driver.user);
      const sessions = jobs.flatMap((job) => [...job.sessions]);
      const planned = jobs.filter((job) => job !== driver).flatMap((job) => [...(plan.rounds?.get(job)?.values() ?? [])].flat().map((index) => job.bundles[index]));
      const before = sum(sessions, planned);
      const after = sum(sessions, [...planned, ...more]);
      for (const [name, limit] of Object.entries(quota)) {
        const amount = after.get(name) ?? 0;
        if (amount > Math.round(limit * SCALE) && amount > (before.get(name) ?? 0)) {
          return `${name}: ${amount / SCALE}${jobs.length > 1 ? ` with user ${driver.user}'s other jobs` : ''}, more than user ${driver.user}'s quota of ${limit}`;
        }
      }
    }
    return undefined;
  }

  /** A host for `bundle`: one the driver already uses in preference, then the tightest fit. */
  #hostFor(driver: DriverRecord, bundle: Bundle, ledger: Ledger, chosen: Map<HostRecord, number[]>): HostRecord | undefined {
    let best: HostRecord | undefined;
    let bestScore = Infinity;
    for (const host of this.#hosts.values()) {
      if (!ledger.fits(host, bundle)) continue;
      const used = chosen.has(host) || [...driver.sessions].some((session) => session.host === host && !session.preempting);
      // Packing keeps a driver's objects on few hosts; the tightest fit keeps large holes for large bundles.
      const free = ledger.of(host);
      const score = (driver.avoid.has(host.id) ? 1e15 : 0) + (used ? 0 : 1e12) + free.gpus * 1e9 + (free.resources.get('CPU') ?? 0);
      if (score < bestScore) {
        best = host;
        bestScore = score;
      }
    }
    return best;
  }

  #allocate(): void {
    if (this.#closed) return;
    const now = Date.now();
    // Higher priorities first; among equals, who asked first.
    const waiting = [...this.#drivers.values()].filter((driver) => driver.pending.size > 0).sort((a, b) => b.priority - a.priority || a.arrived - b.arrived);
    const window = this.#options.backfillWindowMs ?? 60_000;
    // What is free now, and what will be once the slices being taken back end: room a preempting
    // job plans in the second is reserved in the first, so nobody below it takes it meanwhile.
    const ledger = new Ledger();
    const future = new Ledger();
    for (const host of this.#hosts.values()) for (const session of host.sessions.values()) if (session.preempting) future.give(session);
    const rounds = new Map<DriverRecord, Map<HostRecord, number[]>>();
    /** Bundles that wait for room being taken back for them. */
    const reserved = new Map<DriverRecord, Set<number>>();
    const total = this.#clusterTotal();
    // A request past the backfill window is not jumped by those after it (of lower or equal priority).
    let blocked: DriverRecord | undefined;
    const isBlocked = (driver: DriverRecord) =>
      blocked !== undefined && (driver.priority < blocked.priority || (driver.priority === blocked.priority && driver.arrived > blocked.arrived));
    const commit = (driver: DriverRecord, host: HostRecord, index: number, chosen: Map<HostRecord, number[]>) => {
      ledger.take(host, driver.bundles[index]);
      future.take(host, driver.bundles[index]);
      chosen.set(host, [...(chosen.get(host) ?? []), index]);
    };
    // Gangs first, each all or nothing.
    for (const driver of waiting) {
      if (driver.wait !== 'all' || driver.started || isBlocked(driver)) continue;
      const indices = [...driver.pending];
      if (this.#overLimit(driver, indices.map((index) => driver.bundles[index]), { total, rounds })) continue;
      const trial = ledger.copy();
      const chosen = new Map<HostRecord, number[]>();
      let placed = true;
      for (const index of indices) {
        const host = this.#hostFor(driver, driver.bundles[index], trial, chosen);
        if (!host) {
          placed = false;
          break;
        }
        trial.take(host, driver.bundles[index]);
        chosen.set(host, [...(chosen.get(host) ?? []), index]);
      }
      if (placed) {
        const committed = new Map<HostRecord, number[]>();
        for (const [host, hostIndices] of chosen) for (const index of hostIndices) commit(driver, host, index, committed);
        rounds.set(driver, committed);
      } else if (this.#preemptFor(driver, indices, ledger, future)) {
        reserved.set(driver, new Set(indices));
      } else if (now - driver.arrived >= window && !blocked) {
        blocked = driver;
      }
    }
    // Then one bundle at a time: to the highest priority, and among equals to whoever holds the
    // smallest share of what it asked.
    const takers = new Set(waiting.filter((driver) => (driver.wait === 'any' || driver.started) && !isBlocked(driver)));
    while (takers.size > 0) {
      let driver: DriverRecord | undefined;
      let share = Infinity;
      for (const candidate of takers) {
        const planned = [...(rounds.get(candidate)?.values() ?? [])].reduce((sum, indices) => sum + indices.length, 0) + (reserved.get(candidate)?.size ?? 0);
        const asked = candidate.bundles.length - candidate.withdrawn.size;
        const held = (asked - candidate.pending.size - candidate.released.size + planned) / asked;
        if (!driver || candidate.priority > driver.priority || (candidate.priority === driver.priority && held < share)) {
          driver = candidate;
          share = held;
        }
      }
      const chosen = rounds.get(driver!) ?? new Map<HostRecord, number[]>();
      const waitsFor = reserved.get(driver!) ?? new Set<number>();
      const planned = new Set([...[...chosen.values()].flat(), ...waitsFor]);
      let placedOne = false;
      for (const index of driver!.pending) {
        if (planned.has(index)) continue;
        if (this.#overLimit(driver!, [...planned, index].map((one) => driver!.bundles[one]), { total, rounds })) continue;
        const host = this.#hostFor(driver!, driver!.bundles[index], ledger, chosen);
        if (host) {
          commit(driver!, host, index, chosen);
          rounds.set(driver!, chosen);
        } else if (this.#preemptFor(driver!, [index], ledger, future)) {
          waitsFor.add(index);
          reserved.set(driver!, waitsFor);
        } else {
          continue;
        }
        placedOne = true;
        break;
      }
      if (!placedOne || planned.size + 1 >= driver!.pending.size) takers.delete(driver!);
    }
    for (const [driver, chosen] of rounds) this.#lend(driver, chosen);
  }

  /**
   * Makes room for `indices` of `driver` by taking back slices of jobs of lower priority (the
   * lowest first, and the most recently lent among them), counting as free what is being taken
   * back already. Reserves the room in `ledger` (now) and `future` (once taken back); false, and
   * nothing taken, where even that would not fit.
   */
  #preemptFor(driver: DriverRecord, indices: number[], ledger: Ledger, future: Ledger): boolean {
    const trial = future.copy();
    const chosen = new Map<HostRecord, number[]>();
    const victims: SessionRecord[] = [];
    for (const index of indices) {
      const bundle = driver.bundles[index];
      let host = this.#hostFor(driver, bundle, trial, chosen);
      if (!host) {
        const pick = this.#victimsFor(driver, bundle, driver.elastic.has(index), trial, victims);
        if (!pick) return false;
        host = pick.host;
        for (const session of pick.sessions) {
          trial.give(session);
          victims.push(session);
        }
      }
      trial.take(host, bundle);
      chosen.set(host, [...(chosen.get(host) ?? []), index]);
    }
    future.adopt(trial);
    for (const [host, hostIndices] of chosen) for (const index of hostIndices) ledger.take(host, driver.bundles[index]);
    for (const session of victims) this.#preempt(session, driver);
    return true;
  }

  /**
   * The host where taking back the least lets `bundle` fit, and the slices taken: what other jobs'
   * pools borrowed first (for a job's own request, at its priority or below), then slices of
   * lower priority, the lowest first and the most recently lent among equals.
   */
  #victimsFor(driver: DriverRecord, bundle: Bundle, elastic: boolean, ledger: Ledger, taken: SessionRecord[]): { host: HostRecord; sessions: SessionRecord[] } | undefined {
    const reclaimable = (session: SessionRecord) =>
      !elastic && session.elastic && session.driver !== driver && session.driver!.priority <= driver.priority;
    let best: { host: HostRecord; sessions: SessionRecord[]; cost: number[] } | undefined;
    for (const host of this.#hosts.values()) {
      if (host.gpus.length < bundle.gpus || [...bundle.resources].some(([name, amount]) => (host.total.get(name) ?? 0) < amount)) continue;
      const candidates = [...host.sessions.values()]
        .filter((session) => session.driver && !session.preempting && !taken.includes(session) && (session.driver.priority < driver.priority || reclaimable(session)))
        .sort((a, b) => Number(reclaimable(b)) - Number(reclaimable(a)) || a.driver!.priority - b.driver!.priority || b.lentAt - a.lentAt);
      const trial = ledger.copy();
      const sessions: SessionRecord[] = [];
      for (const session of candidates) {
        if (trial.fits(host, bundle)) break;
        trial.give(session);
        sessions.push(session);
      }
      if (sessions.length === 0 || !trial.fits(host, bundle)) continue;
      // Fewer slices of jobs' own requests taken first, then lower priorities, then fewer slices.
      const own = sessions.filter((session) => !reclaimable(session));
      const cost = [own.length, own.length > 0 ? Math.max(...own.map((session) => session.driver!.priority)) : -Infinity, sessions.length];
      if (!best || comesFirst(cost, best.cost)) best = { host, sessions, cost };
    }
    return best;
  }

  /** Takes a slice back for `by`: its job hears it and has the grace to give it back. */
  #preempt(session: SessionRecord, by: DriverRecord): void {
    const victim = session.driver!;
    const graceMs = this.#options.preemptGraceMs ?? 30_000;
    session.preempting = { deadline: Date.now() + graceMs, closing: false };
    // Asked for again at once: the job takes them back as they fit, elsewhere or later. What its
    // pools borrowed is not: they ask anew if they still need room.
    for (const index of session.bundles) (victim.elastic.has(index) ? victim.withdrawn : victim.pending).add(index);
    victim.preempted++;
    this.#totals.preempted++;
    const reason = `${by.name} (${by.jobId}) of priority ${by.priority} needs it; ${victim.name} (${victim.jobId}) has priority ${victim.priority}`;
    victim.connection.send({ t: 'preempt', nodeId: session.nodeId, graceMs, reason });
    this.#log(`preempting node ${session.nodeId}: ${reason}`);
    if (graceMs === 0) this.#endPreempted(session, 'no grace');
  }

  /** Asks a preempted slice's host to end it (once); it is lent again when the host says it ended. */
  #endPreempted(session: SessionRecord, why: string): void {
    if (!session.preempting || session.preempting.closing) return;
    session.preempting.closing = true;
    this.#log(`ending preempted node ${session.nodeId}: ${why}`);
    if (session.host.sessions.get(session.id) === session && this.#hosts.get(session.host.id) === session.host) {
      session.host.connection.send({ t: 'close-session', sessionId: session.id });
    }
  }

  /** Opens one session per host for the bundles chosen there, and tells the driver. */
  #lend(driver: DriverRecord, chosen: Map<HostRecord, number[]>): void {
    const nodes: { nodeId: string; hostId: string; hostname: string; resources: Record<string, number>; bundles: number[] }[] = [];
    // What pools borrowed goes in sessions of its own, so it can be taken back alone.
    const sessions: [HostRecord, number[]][] = [];
    for (const [host, indices] of chosen) {
      const borrowed = indices.filter((index) => driver.elastic.has(index));
      const own = indices.filter((index) => !driver.elastic.has(index));
      if (own.length > 0) sessions.push([host, own]);
      if (borrowed.length > 0) sessions.push([host, borrowed]);
    }
    for (const [host, indices] of sessions) {
      const resources = new Map<string, number>();
      let gpuCount = 0;
      for (const index of indices) {
        driver.pending.delete(index);
        const bundle = driver.bundles[index];
        gpuCount += bundle.gpus;
        for (const [name, amount] of bundle.resources) resources.set(name, (resources.get(name) ?? 0) + amount);
      }
      const gpus = host.gpusFree.slice(0, gpuCount);
      this.#take(host, resources, gpus);
      const sessionId = `s${this.#nextSession++}-${this.#epoch}`;
      const session: SessionRecord = {
        id: sessionId, nodeId: `${host.id}/${sessionId}`, host, driver, resources, gpus, bundles: indices, joined: false, lentAt: Date.now(),
        elastic: indices.every((index) => driver.elastic.has(index)),
      };
      host.sessions.set(sessionId, session);
      driver.sessions.add(session);
      this.#totals.lent++;
      host.connection.send({
        t: 'open-session',
        sessionId,
        nodeId: session.nodeId,
        driver: driver.address,
        resources: fromFixed(resources),
        gpus,
        ...(host.objectStoreMemory !== undefined ? { objectStoreMemory: this.#storeShare(host, resources, gpus.length) } : {}),
      });
      const plain = fromFixed(resources);
      if (gpus.length > 0) plain.GPU = gpus.length;
      nodes.push({ nodeId: session.nodeId, hostId: host.id, hostname: host.hostname, resources: plain, bundles: indices });
      this.#log(`lent ${describe(resources, gpus.length)} of ${host.id} to ${driver.name} as node ${session.nodeId}`);
    }
    driver.started = true;
    driver.connection.send({ t: 'granted', nodes });
  }

  /** A session's part of its host's store memory: its largest share of any resource it holds. */
  #storeShare(host: HostRecord, resources: Map<string, number>, gpus: number): number {
    let share = host.gpus.length > 0 ? gpus / host.gpus.length : 0;
    for (const [name, amount] of resources) {
      const total = host.total.get(name) ?? 0;
      if (total > 0) share = Math.max(share, amount / total);
    }
    const memory = host.objectStoreMemory!;
    return Math.min(memory, Math.max(MIN_SESSION_STORE, Math.floor(memory * share)));
  }

  // -------------------------------------------------------------------------------------------

  /** Hosts with what they offer and have free, and drivers with what they asked for and hold. */
  status(): StatusMessage {
    const hosts: HostStatus[] = [...this.#hosts.values()].map((host) => ({
      hostId: host.id,
      hostname: host.hostname,
      total: { ...fromFixed(host.total), ...(host.gpus.length > 0 ? { GPU: host.gpus.length } : {}) },
      free: { ...fromFixed(host.free), ...(host.gpus.length > 0 ? { GPU: host.gpusFree.length } : {}) },
      sessions: host.sessions.size,
    }));
    const now = Date.now();
    const drivers: DriverStatus[] = [...this.#drivers.values()].map((driver) => ({
      jobId: driver.jobId,
      name: driver.name,
      ...(driver.user !== undefined ? { user: driver.user } : {}),
      address: `${driver.address.host}:${driver.address.port}`,
      wait: driver.wait,
      priority: driver.priority,
      bundles: driver.bundles.length - driver.withdrawn.size,
      granted: driver.bundles.length - driver.withdrawn.size - driver.pending.size - driver.released.size,
      preempting: [...driver.sessions].filter((session) => session.preempting).length,
      borrowed: [...driver.sessions].filter((session) => !session.preempting).reduce((sum, session) => sum + session.bundles.filter((index) => driver.elastic.has(index)).length, 0),
      released: driver.released.size,
      waitingMs: driver.pending.size > 0 ? now - driver.arrived : 0,
      nodes: [...[...driver.sessions].map((session) => session.nodeId), ...driver.claims.keys()],
    }));
    return { t: 'status', hosts, drivers, maxShare: this.#options.maxShare ?? 1, preemptGraceMs: this.#options.preemptGraceMs ?? 30_000, totals: { ...this.#totals } };
  }

  #log(line: string): void {
    this.#options.log?.(line);
  }

  /**
   * A job request: with users, a user's token submits as that user and sees only that user's
   * jobs; the cluster's token sees and stops every job but submits none (its driver could not
   * join a broker that admits drivers by their user's token).
   */
  async #jobRequest(message: JobRequestMessage, user: string | undefined): Promise<JobReplyMessage> {
    switch (message.action) {
      case 'submit':
        if (this.#options.users !== undefined && user === undefined) throw new InvalidArgumentError("this broker runs jobs as its users: submit with a user's token", 'ERR_WRONG_TOKEN');
        return { t: 'job-reply', job: await this.jobs.submit(message.submission, message.token, user, message.workingDir) };
      case 'list':
        return { t: 'job-reply', jobs: this.jobs.list(user) };
      case 'status':
        return { t: 'job-reply', job: this.jobs.get(message.jobId, user) };
      case 'logs':
        return { t: 'job-reply', logs: await this.jobs.logs(message.jobId, user, message.offset) };
      case 'stop':
        return { t: 'job-reply', job: this.jobs.stop(message.jobId, user, user ?? 'the cluster token') };
      default:
        throw new InvalidArgumentError(`a job request is submit, list, status, logs or stop, not ${JSON.stringify((message as { action?: unknown }).action)}`);
    }
  }

  /**
   * Stops its jobs, then listening, and closes every connection: hosts keep their sessions,
   * drivers their nodes.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.jobs.close();
    clearInterval(this.#sweepTimer);
    for (const socket of this.#sockets) socket.destroy();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
