/**
 * Where routers outside the driver learn each deployment's replicas (as Ray Serve's long-poll
 * host): an actor the controller publishes every change to. A router in a worker asks with the
 * version it knows and is answered when that changes (or after a while, to ask again), so
 * replicas added, replaced or removed reach every caller within one answer; so do the models
 * each replica holds (multiplexing), as the controller reads them. Callers with no replica to
 * send to say so here, which is how a deployment scaled to zero hears of demand.
 */
import type { ActorHandle } from '../core/registry.js';
import { remote } from '../core/registry.js';
import type { DeploymentHandle } from './handle.js';
import type { ServeReplica } from './replica.js';

/** An HTTP route as the proxies on other nodes take it: the prefix, its application, and a handle to the ingress. */
export interface ProxyRoute {
  prefix: string;
  app: string;
  ingress: DeploymentHandle<unknown>;
  /** The ingress's fetch is a generator method: its answers stream. */
  streaming: boolean;
  /** Its deployment's requestModelId where that is data ({ jsonField, except }). */
  requestModelId?: { jsonField: string; except?: string[] };
}

/** The routes every proxy serves, and their version. */
export interface RouteTable {
  version: number;
  routes: ProxyRoute[];
}

export interface ReplicaSet {
  version: number;
  replicas: ActorHandle<ServeReplica>[];
  /** The application was deleted: no replica will come. */
  deleted: boolean;
  /** The multiplexed models each replica held at its last report, by actor id. */
  models: Record<string, string[]>;
  /** The node each replica runs on, by actor id (for routers that prefer their own node's). */
  nodes: Record<string, string>;
}

interface Entry extends ReplicaSet {
  watchers: Set<() => void>;
}

export class ServeDirectory {
  readonly #entries = new Map<string, Entry>();
  readonly #demand = new Map<string, number>();
  #routes: RouteTable = { version: 0, routes: [] };
  #routeWatchers = new Set<() => void>();

  /** The HTTP routes, for the proxies on other nodes (the driver's proxy has them first-hand). */
  publishRoutes(routes: ProxyRoute[]): void {
    this.#routes = { version: this.#routes.version + 1, routes };
    for (const wake of this.#routeWatchers) wake();
    this.#routeWatchers.clear();
  }

  /** The routes once their version is not `known`, or after `timeoutMs` as they are. */
  async watchRoutes(known: number, timeoutMs: number): Promise<RouteTable> {
    if (this.#routes.version === known) {
      await new Promise<void>((resolve) => {
        const wake = () => {
          clearTimeout(timer);
          resolve();
        };
        const timer = setTimeout(() => {
          this.#routeWatchers.delete(wake);
          resolve();
        }, timeoutMs);
        this.#routeWatchers.add(wake);
      });
    }
    return this.#routes;
  }

  #entry(key: string): Entry {
    let entry = this.#entries.get(key);
    if (!entry) this.#entries.set(key, (entry = { version: 0, replicas: [], deleted: false, models: {}, nodes: {}, watchers: new Set() }));
    return entry;
  }

  publish(key: string, replicas: ActorHandle<ServeReplica>[], deleted: boolean, nodes: Record<string, string> = {}): void {
    const entry = this.#entry(key);
    entry.version++;
    entry.replicas = replicas;
    entry.deleted = deleted;
    entry.nodes = nodes;
    this.#wake(entry);
  }

  /** The models `key`'s replicas hold (the controller sends them when they change). */
  publishModels(key: string, models: Record<string, string[]>): void {
    const entry = this.#entry(key);
    entry.version++;
    entry.models = models;
    this.#wake(entry);
  }

  #wake(entry: Entry): void {
    for (const wake of entry.watchers) wake();
    entry.watchers.clear();
  }

  /** The replica set once its version is not `known`, or after `timeoutMs` as it is. */
  async watch(key: string, known: number, timeoutMs: number): Promise<ReplicaSet> {
    const entry = this.#entry(key);
    if (entry.version === known) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          entry.watchers.delete(wake);
          resolve();
        }, timeoutMs);
        const wake = () => {
          clearTimeout(timer);
          resolve();
        };
        entry.watchers.add(wake);
      });
    }
    return { version: entry.version, replicas: entry.replicas, deleted: entry.deleted, models: entry.models, nodes: entry.nodes };
  }

  /** A caller holds requests for `key` with no replica to send them to. */
  demand(key: string): void {
    this.#demand.set(key, Date.now());
  }

  /** When each deployment last heard of demand (ms since the epoch, this host's clock). */
  demands(): Record<string, number> {
    return Object.fromEntries(this.#demand);
  }
}

export const ServeDirectoryActor = remote(import.meta, ServeDirectory);
