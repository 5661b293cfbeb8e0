/**
 * An HTTP proxy on a node besides the driver's (Ray Serve's proxy_location 'EveryNode'): an actor
 * pinned to its node that listens on that node's host and serves the same routes as the driver's
 * proxy, read from the serve directory (so one restarted after its process died serves them
 * again), sending each request to its own node's replicas while they have room. Clients then
 * reach an application through any node, and requests stay off the network where a replica is
 * at hand.
 *
 * A route's `requestModelId` travels where it is data (`{ jsonField, except }`, as the OpenAI app's
 * is); a function stays in the driver, and these proxies then read a multiplexed model from the
 * serve_multiplexed_model_id header.
 */
import { getRuntimeContext } from '../core/api.js';
import type { ActorHandle } from '../core/registry.js';
import { remote } from '../core/registry.js';
import { get } from '../core/api.js';
import type { ServeDirectory } from './directory.js';
import { routerForHandle, type DeploymentHandleBase } from './handle.js';
import { HttpProxy, type HttpOptions } from './http-proxy.js';
import { modelIdReader } from './options.js';

/** Where a node's proxy listens. */
export interface NodeProxyAddress {
  nodeId: string;
  host: string;
  port: number;
  url: string;
}

export class NodeProxy {
  readonly #started: Promise<HttpProxy>;
  #closed = false;

  constructor(options: HttpOptions, directory: ActorHandle<ServeDirectory>) {
    this.#started = HttpProxy.start({ ...options, location: 'HeadOnly' }, true);
    // Unhandled here: address() reports a failed start to the driver.
    this.#started.then((proxy) => this.#follow(proxy, directory), () => undefined);
  }

  /** Where it listens, once it does (a port taken rejects, naming it). */
  async address(): Promise<NodeProxyAddress> {
    const proxy = await this.#started;
    return { nodeId: getRuntimeContext().nodeId, host: proxy.host, port: proxy.port, url: proxy.url };
  }

  /** Takes every change of the route table, for as long as it runs. */
  async #follow(proxy: HttpProxy, directory: ActorHandle<ServeDirectory>): Promise<void> {
    let version = -1;
    while (!this.#closed) {
      let table;
      try {
        table = await get(directory.watchRoutes.remote(version, 30_000));
      } catch {
        // The directory went with serving (shutdown): this actor goes too.
        return;
      }
      if (table.version === version) continue;
      version = table.version;
      const apps = new Set(table.routes.map((route) => route.app));
      for (const app of Object.values(proxy.routes())) if (!apps.has(app)) proxy.removeApp(app);
      for (const route of table.routes) {
        proxy.setRoute(route.prefix, route.app, routerForHandle(route.ingress as unknown as DeploymentHandleBase), route.streaming, modelIdReader(route.requestModelId));
      }
    }
  }

  async close(): Promise<void> {
    this.#closed = true;
    await (await this.#started).close();
  }
}

export const NodeProxyActor = remote(import.meta, NodeProxy);
