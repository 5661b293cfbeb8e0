/**
 * The serve controller (as Ray Serve's), in the driver: for each deployment it keeps the wanted
 * number of replicas running, starting them (with growing pauses after failures; a deployment
 * whose replicas never start fails its serve.run()), checking their health, replacing those that
 * die or fail a check, draining those it removes, and choosing how many there should be from
 * their load where the deployment autoscales. Every change to a deployment's running replicas
 * goes to the driver's router for it and to the directory, for routers in other processes.
 */
import { DeploymentError } from '../errors.js';
import { get, isInitialized, kill } from '../core/api.js';
import type { ActorHandle } from '../core/registry.js';
import { currentRuntime } from '../core/runtime-context.js';
import { replaceApplications, type Application } from './deployment.js';
import type { ServeDirectory } from './directory.js';
import { deploymentKey, makeHandle, type DeploymentHandle, type HandleTarget } from './handle.js';
import type { DeploymentConfig } from './options.js';
import { ServeReplicaActor, type ServeReplica } from './replica.js';
import { Router } from './router.js';

export type DeploymentStatusName = 'UPDATING' | 'HEALTHY' | 'UNHEALTHY' | 'UPSCALING' | 'DOWNSCALING' | 'DEPLOY_FAILED' | 'DELETING';

export interface DeploymentStatus {
  status: DeploymentStatusName;
  /** Why it is not healthy, or what it did last. */
  message: string;
  targetReplicas: number;
  replicas: { starting: number; running: number; stopping: number };
  /** Requests on its replicas at their last report (autoscaling deployments), and waiting in the driver. */
  ongoingRequests: number;
  queuedRequests: number;
}

/** Kills a replica's actor; after trellis's shutdown there is nothing left to kill. */
function end(handle: ActorHandle<ServeReplica>): void {
  if (isInitialized()) kill(handle);
}

/** How many replica starts in a row may fail, before any replica ran, until the deployment fails. */
const START_ATTEMPTS = 3;
/** How often the controller looks over its deployments. */
const CONTROL_INTERVAL_MS = 50;
/** How often a deployment of fixed size reads which models its replicas hold. */
const MODELS_POLL_MS = 1_000;
/** After its removal reaches the routers, a replica must look idle this long to be stopped early. */
const DRAIN_QUIET_MS = 200;

interface ReplicaRecord {
  actorId: string;
  /** The deployment's version it was started at: an update replaces older ones. */
  version: number;
  handle: ActorHandle<ServeReplica>;
  state: 'starting' | 'running' | 'stopping';
  nextHealthCheckAt: number;
  checking: boolean;
  ongoing: number;
  /** The node it runs on, as it said once started. */
  nodeId?: string;
  stopWatching?: () => void;
}

interface Waiter {
  resolve(): void;
  reject(error: unknown): void;
}

export class DeploymentRecord {
  readonly app: string;
  readonly key: string;
  config: DeploymentConfig;
  target: HandleTarget;
  readonly router: Router;
  #application: Application;
  #args: unknown[] = [];
  #version = 0;
  /** The version whose replicas were found to have no model loaders, if this one's were. */
  #versionWithoutModels: number | undefined;
  readonly replicas = new Map<string, ReplicaRecord>();
  wanted: number;
  status: DeploymentStatusName = 'UPDATING';
  message = '';
  #failures = 0;
  #nextStartAt = 0;
  #everRan = false;
  #waiters: Waiter[] = [];
  #samples: Array<{ at: number; load: number }> = [];
  #lastLoad = 0;
  #nextLoadAt = 0;
  #loading = false;
  /** The models by replica last sent to the directory (for routers in other processes), as JSON. */
  #publishedModels = '{}';
  #upSince: number | undefined;
  #downSince: number | undefined;
  #deleting = false;
  /** userConfig being handed to the running replicas by an update. */
  #reconfiguring: Promise<void> | undefined;

  constructor(app: string, application: Application, directory: ActorHandle<ServeDirectory>, onDeath: (record: DeploymentRecord, actorId: string) => void) {
    const { config } = application.deployment;
    this.app = app;
    this.#application = application;
    this.config = config;
    this.key = deploymentKey(app, config.name);
    this.wanted = config.numReplicas;
    this.target = {
      app,
      deployment: config.name,
      methods: application.deployment.methods,
      maxOngoingRequests: config.maxOngoingRequests,
      maxQueuedRequests: config.maxQueuedRequests,
      multiplexedModelWaitMs: config.multiplexedModelWaitMs,
      directory,
    };
    this.router = new Router(config.name, config, {
      replicaDied: (actorId) => onDeath(this, actorId),
      localNode: () => currentRuntime().context().nodeId,
    });
  }

  get deleting(): boolean {
    return this.#deleting;
  }

  /** The constructor's arguments, each bound deployment in them a handle to it. */
  bindArguments(handles: Map<Application, DeploymentHandle<unknown>>): void {
    this.#args = this.#application.args.map((arg) => replaceApplications(arg, (app) => handles.get(app)));
  }

  /**
   * A new version of the deployment (serve.run of its application again). Where only its sizing,
   * limits or userConfig changed, the running replicas stay (reconfigured with the new
   * userConfig); otherwise new replicas start and, once they run, the old ones drain and stop.
   */
  update(application: Application, handles: Map<Application, DeploymentHandle<unknown>>): void {
    const before = { descriptor: this.#application.deployment.descriptor, args: this.#args, config: this.config };
    this.#application = application;
    this.bindArguments(handles);
    const config = application.deployment.config;
    const sameCode = sameValue(before.descriptor, application.deployment.descriptor)
      && sameValue(before.args, this.#args)
      && sameValue(before.config.actorOptions, config.actorOptions)
      && before.config.maxOngoingRequests === config.maxOngoingRequests;
    this.config = config;
    this.target = { ...this.target, methods: application.deployment.methods, maxOngoingRequests: config.maxOngoingRequests, maxQueuedRequests: config.maxQueuedRequests, multiplexedModelWaitMs: config.multiplexedModelWaitMs };
    this.router.configure(config);
    if (!config.autoscaling) this.wanted = config.numReplicas;
    else this.wanted = Math.min(config.autoscaling.maxReplicas, Math.max(config.autoscaling.minReplicas, this.wanted));
    this.#failures = 0;
    this.#everRan = false;
    this.status = 'UPDATING';
    this.message = sameCode ? 'reconfiguring' : 'replacing replicas with the new version';
    if (!sameCode) {
      this.#version++;
      return;
    }
    if (!sameValue(before.config.userConfig, config.userConfig) && config.userConfig !== undefined) {
      // serve.run() returns once every running replica has taken the new config.
      const replicas = this.running();
      this.#reconfiguring = Promise.all(replicas.map((replica) => get(replica.handle.reconfigure.remote(config.userConfig)).catch((error: unknown) => {
        throw new DeploymentError(config.name, `replica ${replica.actorId} refused the new userConfig: ${error instanceof Error ? error.message : String(error)}`);
      }))).then(() => undefined);
      this.#reconfiguring.catch(() => undefined);
    }
  }

  running(): ReplicaRecord[] {
    return [...this.replicas.values()].filter((replica) => replica.state === 'running');
  }

  /** Resolves once the deployment is healthy; rejects if it fails to deploy. */
  whenHealthy(): Promise<void> {
    const reconfiguring = this.#reconfiguring;
    this.#reconfiguring = undefined;
    if (this.status === 'DEPLOY_FAILED') return Promise.reject(new DeploymentError(this.config.name, this.message));
    const healthy = this.status === 'HEALTHY' ? Promise.resolve() : new Promise<void>((resolve, reject) => this.#waiters.push({ resolve, reject }));
    return reconfiguring ? Promise.all([healthy, reconfiguring]).then(() => undefined) : healthy;
  }

  #settleWaiters(error?: DeploymentError): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const waiter of waiters) {
      if (error) waiter.reject(error);
      else waiter.resolve();
    }
  }

  /** One look over the deployment: starts, stops, health checks, load and status. */
  step(controller: ServeController, now: number): void {
    if (this.status === 'DEPLOY_FAILED') return;
    const live = [...this.replicas.values()].filter((replica) => replica.state !== 'stopping');
    const current = live.filter((replica) => replica.version === this.#version);
    const outdated = live.filter((replica) => replica.version !== this.#version);
    if (!this.#deleting) {
      if (this.config.autoscaling) this.#autoscale(now);
      else this.#pollModels(now);
      if (current.length < this.wanted && now >= this.#nextStartAt) {
        for (let count = current.length; count < this.wanted; count++) this.#start(controller);
      } else if (current.length > this.wanted) {
        const extra = current.sort((a, b) => (a.state === b.state ? a.ongoing - b.ongoing : a.state === 'starting' ? -1 : 1)).slice(0, current.length - this.wanted);
        for (const replica of extra) controller.stopReplica(this, replica, 'scaled down');
      }
      // The old version goes once the new one serves in its place.
      if (outdated.length > 0 && current.filter((replica) => replica.state === 'running').length >= this.wanted) {
        for (const replica of outdated) controller.stopReplica(this, replica, 'replaced by a new version');
      }
      for (const replica of this.running()) {
        if (!replica.checking && now >= replica.nextHealthCheckAt) this.#checkHealth(controller, replica);
      }
    }
    const running = current.filter((replica) => replica.state === 'running').length;
    if (this.#deleting) this.status = 'DELETING';
    else if (running === this.wanted && current.length === this.wanted && outdated.length === 0) {
      if (this.status !== 'HEALTHY') {
        // The message stays: what happened last (a replica replaced, a scale) is still worth reading.
        this.status = 'HEALTHY';
        this.#settleWaiters();
      }
    } else if (this.status === 'HEALTHY') {
      this.status = running > this.wanted ? 'DOWNSCALING' : 'UNHEALTHY';
    }
  }

  #start(controller: ServeController): void {
    const { config } = this;
    const handle = ServeReplicaActor.options({ ...config.actorOptions, maxConcurrency: 100_000 }).remote(
      config.name,
      this.#application.deployment.descriptor,
      this.#args,
      config.maxOngoingRequests,
      config.userConfig,
    ) as ActorHandle<ServeReplica>;
    const replica: ReplicaRecord = { actorId: handle.actorId, version: this.#version, handle, state: 'starting', nextHealthCheckAt: 0, checking: false, ongoing: 0 };
    this.replicas.set(replica.actorId, replica);
    get(handle.init.remote()).then(
      (started) => {
        if (replica.state !== 'starting' || !isInitialized()) return;
        replica.state = 'running';
        replica.nodeId = started.nodeId;
        replica.nextHealthCheckAt = Date.now() + config.healthCheckPeriodMs;
        this.#failures = 0;
        this.#everRan = true;
        replica.stopWatching = currentRuntime().watchActors([replica.actorId], (_actorId, cause) => {
          if (replica.state === 'running') controller.replicaLost(this, replica, `replica ${replica.actorId} died: ${cause}`);
        });
        controller.publish(this);
      },
      (error: unknown) => {
        if (replica.state !== 'starting') return;
        this.replicas.delete(replica.actorId);
        end(handle);
        this.#failures++;
        const reason = error instanceof Error ? error.message : String(error);
        this.message = `a replica failed to start (${this.#failures} in a row): ${reason}`;
        if (!this.#everRan && this.#failures >= START_ATTEMPTS) {
          this.status = 'DEPLOY_FAILED';
          this.message = `deployment ${config.name} failed to start ${START_ATTEMPTS} replicas in a row; the last: ${reason}`;
          this.#settleWaiters(new DeploymentError(config.name, this.message));
          controller.failed(this);
          return;
        }
        if (this.status === 'HEALTHY') this.status = 'UNHEALTHY';
        this.#nextStartAt = Date.now() + Math.min(30_000, 250 * 2 ** (this.#failures - 1));
      },
    );
  }

  #checkHealth(controller: ServeController, replica: ReplicaRecord): void {
    replica.checking = true;
    get(replica.handle.checkHealth.remote(), { timeout: this.config.healthCheckTimeoutMs }).then(
      () => {
        replica.checking = false;
        replica.nextHealthCheckAt = Date.now() + this.config.healthCheckPeriodMs;
      },
      (error: unknown) => {
        replica.checking = false;
        if (replica.state !== 'running') return;
        controller.replicaLost(this, replica, `replica ${replica.actorId} failed its health check: ${error instanceof Error ? error.message : String(error)}`);
      },
    );
  }

  /**
   * A deployment of fixed size reads its replicas' load only for the models they hold (see
   * multiplex.ts), which its router routes by, and only while its replicas have model loaders:
   * the first reads tell; a new version's replicas are asked again. An autoscaling one reads them
   * with its load.
   */
  #pollModels(now: number): void {
    if (this.#loading || now < this.#nextLoadAt || this.#versionWithoutModels === this.#version) return;
    const replicas = this.running().filter((replica) => replica.version === this.#version);
    if (replicas.length === 0) return;
    this.#loading = true;
    this.#nextLoadAt = now + MODELS_POLL_MS;
    const version = this.#version;
    const models: Record<string, string[]> = {};
    void Promise.all(replicas.map((replica) => get(replica.handle.load.remote(), { timeout: MODELS_POLL_MS * 5 }).then(
      (load) => {
        this.#modelsReported(replica, load.models, models);
        return load.multiplexed;
      },
      () => true,
    ))).then((multiplexed) => {
      this.#loading = false;
      this.#publishModels(models);
      // None of this version's replicas has a loader: no need to ask them again.
      if (version === this.#version && !multiplexed.some(Boolean)) this.#versionWithoutModels = version;
    });
  }

  /** A replica's report of its models: to the driver's router now, and into `models` for the directory. */
  #modelsReported(replica: ReplicaRecord, modelIds: string[], models: Record<string, string[]>): void {
    this.router.setModels(replica.actorId, modelIds);
    if (modelIds.length > 0) models[replica.actorId] = [...modelIds].sort();
  }

  /** Sends what the replicas hold to routers in other processes, when it changed since last sent. */
  #publishModels(models: Record<string, string[]>): void {
    const json = JSON.stringify(Object.fromEntries(Object.entries(models).sort(([a], [b]) => (a < b ? -1 : 1))));
    if (json === this.#publishedModels || !isInitialized()) return;
    this.#publishedModels = json;
    void this.target.directory.publishModels.remote(this.key, models);
  }

  /** Polls the replicas' load at the metrics interval and moves `wanted` as the policy says. */
  #autoscale(now: number): void {
    const policy = this.config.autoscaling!;
    if (!this.#loading && now >= this.#nextLoadAt) {
      this.#loading = true;
      this.#nextLoadAt = now + policy.metricsIntervalMs;
      const replicas = this.running();
      const models: Record<string, string[]> = {};
      void Promise.all(replicas.map((replica) => get(replica.handle.load.remote(), { timeout: Math.max(1_000, policy.metricsIntervalMs * 5) }).then(
        (load) => {
          this.#modelsReported(replica, load.models, models);
          return (replica.ongoing = load.ongoing);
        },
        () => replica.ongoing,
      ))).then((loads) => {
        this.#loading = false;
        this.#publishModels(models);
        const load = loads.reduce((sum, value) => sum + value, 0) + this.router.queued;
        this.#lastLoad = load;
        const at = Date.now();
        this.#samples.push({ at, load });
        while (this.#samples.length > 1 && this.#samples[0].at < at - policy.lookBackPeriodMs) this.#samples.shift();
      });
    }
    // From zero, demand starts a replica at once: a request is waiting for it.
    if (this.wanted === 0) {
      if (this.router.queued > 0) this.#scaleTo(Math.max(1, policy.minReplicas), 'requests arrived');
      return;
    }
    if (this.#samples.length === 0) return;
    const average = this.#samples.reduce((sum, sample) => sum + sample.load, 0) / this.#samples.length;
    const ideal = average / policy.targetOngoingRequests;
    const factor = ideal > this.wanted ? policy.upscalingFactor : policy.downscalingFactor;
    let desired = Math.ceil(this.wanted + (ideal - this.wanted) * factor - 1e-9);
    desired = Math.min(policy.maxReplicas, Math.max(policy.minReplicas, desired));
    if (desired > this.wanted) {
      this.#downSince = undefined;
      this.#upSince ??= now;
      if (now - this.#upSince >= policy.upscaleDelayMs) this.#scaleTo(desired, `load ${average.toFixed(1)} over ${this.wanted} replica(s)`);
    } else if (desired < this.wanted) {
      this.#upSince = undefined;
      this.#downSince ??= now;
      if (now - this.#downSince >= policy.downscaleDelayMs) this.#scaleTo(desired, `load ${average.toFixed(1)} over ${this.wanted} replica(s)`);
    } else {
      this.#upSince = undefined;
      this.#downSince = undefined;
    }
  }

  /** A caller elsewhere waits for a replica of this deployment, which has none (see ServeDirectory.demand). */
  demanded(): void {
    if (this.config.autoscaling && this.wanted === 0) this.#scaleTo(Math.max(1, this.config.autoscaling.minReplicas), 'requests arrived');
  }

  #scaleTo(count: number, why: string): void {
    const before = this.wanted;
    this.wanted = count;
    this.#upSince = undefined;
    this.#downSince = undefined;
    this.#samples = [];
    this.status = count > before ? 'UPSCALING' : 'DOWNSCALING';
    this.message = `scaling from ${before} to ${count} replica(s): ${why}`;
  }

  startDeleting(): void {
    this.#deleting = true;
    this.status = 'DELETING';
    this.#settleWaiters(new DeploymentError(this.config.name, `application ${this.app} was deleted while deploying`));
  }

  describe(): DeploymentStatus {
    const counts = { starting: 0, running: 0, stopping: 0 };
    for (const replica of this.replicas.values()) counts[replica.state]++;
    return {
      status: this.status,
      message: this.message,
      targetReplicas: this.wanted,
      replicas: counts,
      ongoingRequests: this.#lastLoad,
      queuedRequests: this.router.queued,
    };
  }
}

/** Whether two values (plain data, handles by their text) are the same. */
function sameValue(a: unknown, b: unknown): boolean {
  const text = (value: unknown) => {
    try {
      return JSON.stringify(value, (_key, item) => (typeof item === 'object' && item !== null && !Array.isArray(item) && Object.getPrototypeOf(item) !== Object.prototype ? String(item) : typeof item === 'bigint' ? `${item}n` : item));
    } catch {
      return undefined;
    }
  };
  const left = text(a);
  return left !== undefined && left === text(b);
}

export class ServeController {
  readonly directory: ActorHandle<ServeDirectory>;
  readonly #deployments = new Map<string, DeploymentRecord>();
  readonly #timer: NodeJS.Timeout;
  #demandCheckAt = 0;
  #stopping = new Set<Promise<void>>();

  constructor(directory: ActorHandle<ServeDirectory>) {
    this.directory = directory;
    this.#timer = setInterval(() => this.#step(), CONTROL_INTERVAL_MS);
    this.#timer.unref();
  }

  routerFor(key: string): Router | undefined {
    const record = this.#deployments.get(key);
    return record && !record.deleting ? record.router : undefined;
  }

  deployment(key: string): DeploymentRecord | undefined {
    return this.#deployments.get(key);
  }

  deploymentsOf(app: string): DeploymentRecord[] {
    return [...this.#deployments.values()].filter((record) => record.app === app);
  }

  /**
   * Deploys `applications` (dependencies first) as `app`, and waits until all are healthy. An
   * application deployed again updates its deployments of the same names in place (handles to
   * them stay good) and deletes those it no longer has.
   */
  async deploy(app: string, applications: Application[]): Promise<Map<Application, DeploymentHandle<unknown>>> {
    const handles = new Map<Application, DeploymentHandle<unknown>>();
    const records: DeploymentRecord[] = [];
    const previous = new Set(this.deploymentsOf(app));
    for (const application of applications) {
      const key = deploymentKey(app, application.deployment.name);
      let record = this.#deployments.get(key);
      if (record && !record.deleting) {
        previous.delete(record);
        record.update(application, handles);
      } else {
        record = new DeploymentRecord(app, application, this.directory, (owner, actorId) => {
          const replica = owner.replicas.get(actorId);
          if (replica?.state === 'running') this.replicaLost(owner, replica, `replica ${actorId} died while serving a request`);
        });
        record.bindArguments(handles);
        this.#deployments.set(record.key, record);
      }
      handles.set(application, makeHandle(record.target));
      records.push(record);
    }
    this.#step();
    await Promise.all(records.map((record) => record.whenHealthy()));
    await this.#deleteRecords([...previous], app);
    return handles;
  }

  #step(): void {
    const now = Date.now();
    for (const record of this.#deployments.values()) record.step(this, now);
    this.#checkDemand(now);
  }

  /** Deployments at zero replicas hear of callers in other processes through the directory. */
  #checkDemand(now: number): void {
    if (now < this.#demandCheckAt) return;
    const idle = [...this.#deployments.values()].filter((record) => record.config.autoscaling && record.wanted === 0 && !record.deleting);
    if (idle.length === 0) return;
    this.#demandCheckAt = now + 250;
    get(this.directory.demands.remote()).then((demands) => {
      for (const record of idle) {
        if ((demands[record.key] ?? 0) > now - 5_000) record.demanded();
      }
    }, () => undefined);
  }

  /** Sends a deployment's running replicas to its routers (the driver's, and others' by the directory). */
  publish(record: DeploymentRecord): void {
    if (!isInitialized()) return;
    const running = record.running();
    const handles = running.map((replica) => replica.handle);
    const nodes = Object.fromEntries(running.flatMap((replica) => (replica.nodeId ? [[replica.actorId, replica.nodeId]] : [])));
    record.router.setReplicas(handles, {}, nodes);
    void this.directory.publish.remote(record.key, handles, record.deleting, nodes);
  }

  replicaLost(record: DeploymentRecord, replica: ReplicaRecord, why: string): void {
    record.message = why;
    this.stopReplica(record, replica, why, true);
    if (record.status === 'HEALTHY') record.status = 'UNHEALTHY';
  }

  /**
   * Takes a replica out of its routers, lets it finish its requests (up to the deployment's
   * gracefulShutdownTimeoutMs; at once when `now`), and kills it.
   */
  stopReplica(record: DeploymentRecord, replica: ReplicaRecord, _why: string, now = false): void {
    if (replica.state === 'stopping') return;
    const wasRunning = replica.state === 'running';
    replica.state = 'stopping';
    replica.stopWatching?.();
    if (wasRunning) this.publish(record);
    const stopped = (now || !wasRunning ? Promise.resolve() : this.#drain(record, replica)).then(() => {
      end(replica.handle);
      record.replicas.delete(replica.actorId);
    });
    this.#stopping.add(stopped);
    void stopped.finally(() => this.#stopping.delete(stopped));
  }

  async #drain(record: DeploymentRecord, replica: ReplicaRecord): Promise<void> {
    const deadline = Date.now() + record.config.gracefulShutdownTimeoutMs;
    let quietSince: number | undefined;
    while (Date.now() < deadline) {
      if (!isInitialized()) return;
      const ongoing = await get(replica.handle.load.remote(), { timeout: Math.max(10, deadline - Date.now()) }).then((load) => load.ongoing, () => -1);
      if (ongoing < 0) return;
      const now = Date.now();
      if (ongoing === 0) {
        quietSince ??= now;
        if (now - quietSince >= DRAIN_QUIET_MS) return;
      } else quietSince = undefined;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  /** A deployment that could not start: what is starting stops; an older version still running stays. */
  failed(record: DeploymentRecord): void {
    for (const replica of [...record.replicas.values()]) {
      if (replica.state === 'starting') this.stopReplica(record, replica, 'deploy failed', true);
    }
  }

  /** Removes `app`'s deployments, letting their replicas finish what they run. */
  async deleteApp(app: string): Promise<void> {
    await this.#deleteRecords(this.deploymentsOf(app), app);
  }

  async #deleteRecords(records: DeploymentRecord[], app: string): Promise<void> {
    for (const record of records) {
      record.startDeleting();
      record.router.close(new DeploymentError(record.config.name, `deployment ${record.config.name} of application ${app} was deleted`));
      void this.directory.publish.remote(record.key, [], true);
      for (const replica of [...record.replicas.values()]) this.stopReplica(record, replica, 'deleted');
    }
    while (records.some((record) => record.replicas.size > 0)) await Promise.all([...this.#stopping]);
    for (const record of records) {
      if (this.#deployments.get(record.key) === record) this.#deployments.delete(record.key);
    }
  }

  close(): void {
    clearInterval(this.#timer);
  }
}
