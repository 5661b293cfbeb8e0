/**
 * The serving API (as Ray Serve's `serve` module), for the driver: run applications, reach their
 * deployments by handle or over HTTP, read their status, delete them. Everything here lives as
 * long as the driver's cluster: trellis's shutdown() stops it too.
 */
import { DeploymentError, InvalidArgumentError, NotInitializedError } from '../errors.js';
import { events, get, getRuntimeContext, isInitialized, kill, onShutdown, state } from '../core/api.js';
import { registerMetricsCollector } from '../core/metrics.js';
import type { ActorHandle } from '../core/registry.js';
import { ServeController, type DeploymentStatus } from './controller.js';
import { deploymentsOf, type Application } from './deployment.js';
import { ServeDirectoryActor, type ServeDirectory } from './directory.js';
import { deploymentKey, makeHandle, setLocalRouters, type DeploymentHandle } from './handle.js';
import { checkRoutePrefix, HttpProxy, type HttpOptions } from './http-proxy.js';
import { NodeProxyActor, type NodeProxy, type NodeProxyAddress } from './node-proxy.js';
import { modelIdReader, type RequestModelId } from './options.js';
import { deploymentFamilies } from './serve-metrics.js';

export interface StartOptions {
  /** The HTTP proxy's options; `false` runs no proxy (handles only). Default: 127.0.0.1:8000. */
  http?: HttpOptions | false;
}

export interface RunOptions {
  /** The application's name (default 'default'); running a name again replaces that application. */
  name?: string;
  /** Where HTTP requests reach its ingress's `fetch(request)` (default '/'); null: no HTTP route. */
  routePrefix?: string | null;
}

export type ApplicationStatusName = 'DEPLOYING' | 'RUNNING' | 'UNHEALTHY' | 'DEPLOY_FAILED' | 'DELETING';

export interface ApplicationStatus {
  status: ApplicationStatusName;
  routePrefix: string | null;
  ingress: string;
  deployments: Record<string, DeploymentStatus>;
}

export interface ServeStatus {
  /** Where the driver's HTTP proxy listens, if it runs. */
  proxy: { host: string; port: number; url: string } | null;
  /** Every proxy by node, the driver's first: with `http.location: 'EveryNode'`, one on each node. */
  proxies: NodeProxyAddress[];
  applications: Record<string, ApplicationStatus>;
}

interface AppRecord {
  name: string;
  routePrefix: string | null;
  ingress: string;
  deploying: boolean;
  /** Its ingress's handle and whether its fetch streams, for the proxies on other nodes. */
  ingressHandle?: DeploymentHandle<unknown>;
  streaming?: boolean;
  requestModelId?: RequestModelId;
}

/** A proxy on a node besides the driver's, and where it listens once it does. */
interface NodeProxyRecord {
  actor: ActorHandle<NodeProxy>;
  address: NodeProxyAddress | undefined;
}

interface ServeInstance {
  controller: ServeController;
  directory: ActorHandle<ServeDirectory>;
  proxy: HttpProxy | undefined;
  proxyOptions: HttpOptions | false;
  /** With http.location 'EveryNode': the other nodes' proxies, by node. */
  nodeProxies: Map<string, NodeProxyRecord>;
  apps: Map<string, AppRecord>;
  stopMetrics: () => void;
  /** Stops starting proxies on nodes that join. */
  stopFollowingNodes: () => void;
  closed: boolean;
}

let instance: ServeInstance | undefined;
let starting: Promise<ServeInstance> | undefined;

function checkDriver(where: string): void {
  if (!isInitialized()) throw new NotInitializedError(`serve.${where}() is for the driver, after init()`);
}

/**
 * Starts serving: the controller and, unless `http: false`, the HTTP proxy. run() starts it with
 * the defaults when it was not started; call start() first for other options.
 */
export async function start(options: StartOptions = {}): Promise<ServeStatus> {
  checkDriver('start');
  if (instance || starting) {
    const running = await (starting ?? Promise.resolve(instance!));
    if (options.http !== undefined && !running.proxy && options.http !== false) {
      running.proxy = await HttpProxy.start(options.http);
      running.proxyOptions = options.http;
    }
    return status();
  }
  starting = (async () => {
    const directory = ServeDirectoryActor.options({ numCpus: 0, maxConcurrency: 100_000 }).remote() as ActorHandle<ServeDirectory>;
    const proxyOptions = options.http ?? {};
    let proxy: HttpProxy | undefined;
    try {
      proxy = proxyOptions === false ? undefined : await HttpProxy.start(proxyOptions);
    } catch (error) {
      kill(directory);
      throw error;
    }
    const controller = new ServeController(directory);
    setLocalRouters((key) => controller.routerFor(key));
    const started: ServeInstance = { controller, directory, proxy, proxyOptions, nodeProxies: new Map(), apps: new Map(), stopMetrics: () => undefined, stopFollowingNodes: () => undefined, closed: false };
    if (proxyOptions !== false && proxyOptions.location === 'EveryNode') {
      try {
        await startNodeProxies(started, proxyOptions);
      } catch (error) {
        for (const record of started.nodeProxies.values()) kill(record.actor);
        await proxy?.close();
        kill(directory);
        controller.close();
        setLocalRouters(undefined);
        throw error;
      }
    }
    started.stopMetrics = registerMetricsCollector(() => [
      ...(instance === started ? deploymentFamilies(status().applications) : []),
    ]);
    onShutdown(() => closeInstance(started));
    return started;
  })();
  try {
    instance = await starting;
  } finally {
    starting = undefined;
  }
  return status();
}

/**
 * A proxy on every node besides the driver's, and on each node that joins later; a node's proxy
 * goes with its node. One that cannot listen fails start() (naming its node), or for a node that
 * joins later is reported and left out.
 */
async function startNodeProxies(serving: ServeInstance, options: HttpOptions): Promise<void> {
  const here = getRuntimeContext().nodeId;
  const startOn = (nodeId: string): NodeProxyRecord => {
    const actor = NodeProxyActor.options({ numCpus: 0, maxRestarts: -1, maxConcurrency: 16, schedulingStrategy: { type: 'node', nodeId } }).remote(options, serving.directory) as ActorHandle<NodeProxy>;
    const record: NodeProxyRecord = { actor, address: undefined };
    serving.nodeProxies.set(nodeId, record);
    return record;
  };
  const listening = async (nodeId: string, record: NodeProxyRecord): Promise<void> => {
    try {
      record.address = await get(record.actor.address.remote());
    } catch (error) {
      throw new DeploymentError('http', `the HTTP proxy on node ${nodeId} could not start: ${(error as Error).message}`, 'ERR_HTTP_LISTEN');
    }
  };
  const cluster = events();
  const added = ({ nodeId }: { nodeId: string }) => {
    if (serving.closed || serving.nodeProxies.has(nodeId) || nodeId === here) return;
    const record = startOn(nodeId);
    listening(nodeId, record).catch((error: Error) => {
      serving.nodeProxies.delete(nodeId);
      kill(record.actor);
      process.stderr.write(`trellis serve: ${error.message}\n`);
    });
  };
  const removed = ({ nodeId }: { nodeId: string }) => void serving.nodeProxies.delete(nodeId);
  cluster.on('node-added', added);
  cluster.on('node-removed', removed);
  serving.stopFollowingNodes = () => {
    cluster.off('node-added', added);
    cluster.off('node-removed', removed);
  };
  const others = state().nodes.map((node) => node.nodeId).filter((nodeId) => nodeId !== here);
  await Promise.all(others.map((nodeId) => listening(nodeId, startOn(nodeId))));
  publishRoutes(serving);
}

/** Sends the HTTP routes to the directory, where the other nodes' proxies read them. */
function publishRoutes(serving: ServeInstance): void {
  if (serving.proxyOptions === false || serving.proxyOptions.location !== 'EveryNode') return;
  const routes = [...serving.apps.values()]
    .filter((app) => app.routePrefix !== null && app.ingressHandle && !app.deploying)
    // A requestModelId that is data travels with its route; a function stays in the driver's proxy.
    .map((app) => ({ prefix: app.routePrefix!, app: app.name, ingress: app.ingressHandle!, streaming: app.streaming === true, ...(app.requestModelId && typeof app.requestModelId !== 'function' ? { requestModelId: app.requestModelId } : {}) }));
  void serving.directory.publishRoutes.remote(routes);
}

async function running(where: string): Promise<ServeInstance> {
  checkDriver(where);
  if (!instance) await start();
  return instance!;
}

/**
 * Deploys `app` (its ingress and every deployment bound into its arguments) and resolves, once
 * every deployment is healthy, to a handle to the ingress. A deployment whose replicas fail to
 * start rejects with DeploymentError naming why, and the application is removed. Running a name
 * that runs already updates it in place: deployments whose code, arguments or resources changed
 * get new replicas, and the old ones drain and stop once the new ones serve; where only sizing,
 * limits or userConfig changed, the replicas stay (reconfigured); handles to it stay good.
 */
export async function run<T>(app: Application<T>, options: RunOptions = {}): Promise<DeploymentHandle<T>> {
  const name = options.name ?? 'default';
  if (typeof name !== 'string' || !/^[A-Za-z0-9_.-]{1,128}$/.test(name)) {
    throw new InvalidArgumentError(`serve.run: name must be 1 to 128 letters, digits, '_', '.' or '-', got ${JSON.stringify(name)}`);
  }
  const routePrefix = options.routePrefix === undefined ? '/' : options.routePrefix === null ? null : checkRoutePrefix(options.routePrefix);
  const order = deploymentsOf(app);
  const ingress = app.deployment;
  if (routePrefix !== null && !ingress.methods.some((method) => method.replace(/^\*/, '') === 'fetch')) {
    throw new InvalidArgumentError(`serve.run: ${ingress.name} is the ingress of an HTTP route (${routePrefix}), so it needs a fetch(request) method; or run it with routePrefix: null`);
  }
  const serving = await running('run');
  const previous = serving.apps.get(name);
  if (previous?.deploying) throw new InvalidArgumentError(`serve.run: application ${name} is still deploying`);
  if (routePrefix !== null) {
    if (!serving.proxy) throw new InvalidArgumentError('serve.run: the application has an HTTP route, but serving was started with http: false (give routePrefix: null)');
    const owner = serving.proxy.routes()[routePrefix];
    if (owner !== undefined && owner !== name) throw new InvalidArgumentError(`serve.run: route prefix ${routePrefix} is already application ${owner}'s`);
  }
  const record: AppRecord = { name, routePrefix, ingress: ingress.name, deploying: true };
  serving.apps.set(name, record);
  let handles;
  try {
    handles = await serving.controller.deploy(name, order);
  } catch (error) {
    if (previous) {
      // The application as it was goes on; what failed to deploy is stopped by its deployment.
      serving.apps.set(name, previous);
    } else {
      serving.apps.delete(name);
      serving.proxy?.removeApp(name);
      await serving.controller.deleteApp(name);
    }
    throw error;
  }
  record.deploying = false;
  const ingressRecord = serving.controller.deployment(deploymentKey(name, ingress.name))!;
  record.ingressHandle = handles.get(app) as DeploymentHandle<unknown>;
  record.streaming = ingress.methods.includes('*fetch');
  record.requestModelId = ingressRecord.config.requestModelId;
  if (routePrefix !== null) serving.proxy!.setRoute(routePrefix, name, ingressRecord.router, record.streaming, modelIdReader(record.requestModelId));
  else serving.proxy?.removeApp(name);
  publishRoutes(serving);
  return handles.get(app) as DeploymentHandle<T>;
}

/** The status of every application and deployment (as `serve status`). */
export function status(): ServeStatus {
  if (!instance) return { proxy: null, proxies: [], applications: {} };
  const applications: Record<string, ApplicationStatus> = {};
  for (const app of instance.apps.values()) {
    const deployments: Record<string, DeploymentStatus> = {};
    for (const record of instance.controller.deploymentsOf(app.name)) deployments[record.config.name] = record.describe();
    const states = Object.values(deployments).map((deployment) => deployment.status);
    const overall: ApplicationStatusName = states.includes('DEPLOY_FAILED')
      ? 'DEPLOY_FAILED'
      : states.includes('DELETING')
        ? 'DELETING'
        : app.deploying
          ? 'DEPLOYING'
          : states.includes('UNHEALTHY')
            ? 'UNHEALTHY'
            : 'RUNNING';
    applications[app.name] = { status: overall, routePrefix: app.routePrefix, ingress: app.ingress, deployments };
  }
  const proxy = instance.proxy ? { host: instance.proxy.host, port: instance.proxy.port, url: instance.proxy.url } : null;
  const proxies: NodeProxyAddress[] = proxy ? [{ nodeId: getRuntimeContext().nodeId, ...proxy }] : [];
  for (const record of instance.nodeProxies.values()) {
    if (record.address) proxies.push(record.address);
    // A proxy restarted after its process died may listen elsewhere (port 0): the next status() shows where.
    get(record.actor.address.remote()).then((address) => void (record.address = address), () => undefined);
  }
  return { proxy, proxies, applications };
}

/** A handle to a running deployment, by its name and its application's (default 'default'). */
export function getDeploymentHandle<T = any>(deploymentName: string, appName = 'default'): DeploymentHandle<T> {
  checkDriver('getDeploymentHandle');
  const found = instance?.controller.deployment(deploymentKey(appName, deploymentName));
  if (!found || found.deleting) {
    const apps = instance ? [...instance.apps.keys()].join(', ') : '';
    throw new DeploymentError(deploymentName, `no deployment ${deploymentName} in application ${appName} (applications: ${apps || 'none'})`, 'ERR_DEPLOYMENT_NOT_FOUND');
  }
  return makeHandle<T>(found.target);
}

/** A handle to an application's ingress deployment. */
export function getAppHandle<T = any>(appName = 'default'): DeploymentHandle<T> {
  checkDriver('getAppHandle');
  const app = instance?.apps.get(appName);
  if (!app) throw new DeploymentError(appName, `no application ${appName} (applications: ${instance ? [...instance.apps.keys()].join(', ') || 'none' : 'none'})`, 'ERR_DEPLOYMENT_NOT_FOUND');
  return getDeploymentHandle<T>(app.ingress, appName);
}

/** Removes an application: its route goes at once, its replicas finish their requests and stop. */
async function deleteApplication(appName: string): Promise<void> {
  checkDriver('delete');
  if (!instance) return;
  const app = instance.apps.get(appName);
  if (!app) return;
  instance.proxy?.removeApp(appName);
  instance.apps.delete(appName);
  publishRoutes(instance);
  await instance.controller.deleteApp(appName);
}
export { deleteApplication as delete };

async function closeInstance(closing: ServeInstance): Promise<void> {
  if (closing.closed) return;
  closing.closed = true;
  // A later instance (serve started again) keeps its routers.
  if (instance === closing) {
    instance = undefined;
    setLocalRouters(undefined);
  }
  closing.stopMetrics();
  closing.stopFollowingNodes();
  closing.controller.close();
  for (const record of closing.nodeProxies.values()) {
    try {
      kill(record.actor);
    } catch {
      // Gone with the cluster.
    }
  }
  closing.nodeProxies.clear();
  await closing.proxy?.close();
}

/** Deletes every application and stops the proxy (shutdown() of trellis does this too). */
export async function shutdown(): Promise<void> {
  const closing = instance;
  if (!closing) return;
  // No new requests while the applications drain.
  const proxyClosed = closing.proxy?.close();
  closing.stopFollowingNodes();
  for (const record of closing.nodeProxies.values()) kill(record.actor);
  closing.nodeProxies.clear();
  await Promise.all([...closing.apps.keys()].map((app) => closing.controller.deleteApp(app)));
  closing.apps.clear();
  kill(closing.directory);
  await proxyClosed;
  await closeInstance(closing);
}
