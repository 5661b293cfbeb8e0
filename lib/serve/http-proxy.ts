/**
 * The HTTP proxy (as Ray Serve's): one server in the driver that hands each request to the
 * ingress deployment of the application whose route prefix is the longest to match its path,
 * through that deployment's router, and streams the answer back as the replica yields it. A
 * client that goes away stops the replica's answer at its next item; a full deployment answers
 * 503 at once rather than queue past its bound.
 */
import { once } from 'node:events';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { BackPressureError, DeploymentError, InvalidArgumentError, TaskCancelledError, TaskError } from '../errors.js';
import type { ObjectRef } from '../core/object-ref.js';
import type { ObjectRefGenerator } from '../core/object-ref-generator.js';
import { DeploymentResponse, DeploymentResponseGenerator } from './handle.js';
import { HttpError, HttpRequest, type RequestData, type ResponsePart } from './http-messages.js';
import { MODEL_ID_HEADER } from './multiplex.js';
import { HttpMetrics } from './serve-metrics.js';
import { getRuntimeContext } from '../core/api.js';
import type { Router } from './router.js';

export interface HttpOptions {
  /** Interface to listen on (default '127.0.0.1'; '0.0.0.0' for every one). */
  host?: string;
  /** Port (default 8000; 0 picks a free one: see serve.status().proxy). */
  port?: number;
  /** Largest request body taken (default 100 MiB); a larger one gets 413. */
  maxBodyBytes?: number;
  /** Longest a request may take before it is stopped and answered 504 (default: no limit). */
  requestTimeoutMs?: number;
  /**
   * Where proxies run (Ray Serve's proxy_location): 'HeadOnly' (the default), one in the driver;
   * 'EveryNode', one on every node of the cluster besides, each listening on `port` on its own
   * host (with port 0, each on a free one: see serve.status().proxies), sending requests to its
   * own node's replicas while they have room.
   */
  location?: 'HeadOnly' | 'EveryNode';
}

interface Route {
  prefix: string;
  app: string;
  router: Router;
  /** The ingress's fetch is a generator method: its answers stream, item by item. */
  streaming: boolean;
  /** Reads a request's multiplexed model (the deployment's requestModelId), else the header is read. */
  modelIdOf?: (request: HttpRequest) => string | undefined;
}

const EMPTY_BODY = new Uint8Array(0);

/** Whether `prefix` serves `path`: '/api' serves '/api' and '/api/x', not '/apix'. */
function matches(prefix: string, path: string): boolean {
  return prefix === '/' || path === prefix || path.startsWith(`${prefix}/`);
}

export function checkRoutePrefix(prefix: unknown): string {
  if (typeof prefix !== 'string' || !prefix.startsWith('/') || (prefix.length > 1 && prefix.endsWith('/')) || /[?#\s]/.test(prefix)) {
    throw new InvalidArgumentError(`routePrefix must be a path starting with '/' and not ending with one (or null for no HTTP route), got ${JSON.stringify(prefix)}`);
  }
  return prefix;
}

function sendJson(response: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  response.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), ...headers });
  response.end(text);
}

/** Waits until a response's buffered body has gone out, or its connection closed. */
async function drained(response: ServerResponse): Promise<void> {
  const done = new AbortController();
  const settle = (event: string) => once(response, event, { signal: done.signal }).catch(() => undefined);
  await Promise.race([settle('drain'), settle('close')]);
  done.abort();
}

export class HttpProxy {
  readonly host: string;
  readonly port: number;
  readonly #server: Server;
  readonly #maxBodyBytes: number;
  readonly #requestTimeoutMs: number | undefined;
  /** A proxy on a node besides the driver's: requests go to that node's replicas first. */
  readonly #preferLocal: boolean;
  #routes: Route[] = [];
  #closed: Promise<void> | undefined;
  readonly #metrics = new HttpMetrics(getRuntimeContext().nodeId);

  private constructor(server: Server, host: string, port: number, options: HttpOptions, preferLocal: boolean) {
    this.#server = server;
    this.host = host;
    this.port = port;
    this.#maxBodyBytes = options.maxBodyBytes ?? 100 * 1024 * 1024;
    this.#requestTimeoutMs = options.requestTimeoutMs;
    this.#preferLocal = preferLocal;
  }

  static async start(options: HttpOptions = {}, preferLocal = false): Promise<HttpProxy> {
    const host = options.host ?? '127.0.0.1';
    const port = options.port ?? 8000;
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new InvalidArgumentError(`http.port must be a port number from 0 to 65535, got ${String(options.port)}`);
    if (options.maxBodyBytes !== undefined && !(Number.isInteger(options.maxBodyBytes) && options.maxBodyBytes >= 0)) {
      throw new InvalidArgumentError(`http.maxBodyBytes must be a whole number of bytes, got ${String(options.maxBodyBytes)}`);
    }
    if (options.requestTimeoutMs !== undefined && !(typeof options.requestTimeoutMs === 'number' && options.requestTimeoutMs > 0)) {
      throw new InvalidArgumentError(`http.requestTimeoutMs must be a number of milliseconds above 0, got ${String(options.requestTimeoutMs)}`);
    }
    if (options.location !== undefined && options.location !== 'HeadOnly' && options.location !== 'EveryNode') {
      throw new InvalidArgumentError(`http.location must be 'HeadOnly' or 'EveryNode', got ${JSON.stringify(options.location)}`);
    }
    let proxy: HttpProxy | undefined;
    const server = createServer((request, response) => {
      void proxy!.#handle(request, response).catch((error) => {
        if (!response.headersSent) sendJson(response, 500, { error: 'InternalError', message: (error as Error).message });
        else response.destroy(error as Error);
      });
    });
    server.keepAliveTimeout = 30_000;
    server.listen(port, host);
    try {
      await once(server, 'listening');
    } catch (error) {
      throw new DeploymentError('http', `the HTTP proxy could not listen on ${host}:${port}: ${(error as Error).message}`, 'ERR_HTTP_LISTEN');
    }
    proxy = new HttpProxy(server, host, (server.address() as AddressInfo).port, options, preferLocal);
    return proxy;
  }

  get url(): string {
    const host = this.host.includes(':') ? `[${this.host}]` : this.host;
    return `http://${host === '0.0.0.0' ? '127.0.0.1' : host}:${this.port}`;
  }

  setRoute(prefix: string, app: string, router: Router, streaming: boolean, modelIdOf?: (request: HttpRequest) => string | undefined): void {
    const taken = this.#routes.find((route) => route.prefix === prefix && route.app !== app);
    if (taken) throw new InvalidArgumentError(`route prefix ${prefix} is already application ${taken.app}'s`);
    this.#routes = [...this.#routes.filter((route) => route.app !== app), { prefix, app, router, streaming, ...(modelIdOf ? { modelIdOf } : {}) }].sort((a, b) => b.prefix.length - a.prefix.length);
  }

  removeApp(app: string): void {
    this.#routes = this.#routes.filter((route) => route.app !== app);
  }

  routes(): Record<string, string> {
    return Object.fromEntries(this.#routes.map((route) => [route.prefix, route.app]));
  }

  /** Stops listening and ends every connection (once: later calls wait for the same). */
  close(): Promise<void> {
    if (!this.#closed) {
      this.#closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
      this.#server.closeAllConnections();
    }
    return this.#closed;
  }

  async #readBody(request: IncomingMessage): Promise<Uint8Array | undefined> {
    // No length and no chunks: no body (most GETs), and nothing to wait for.
    if (request.headers['content-length'] === undefined && request.headers['transfer-encoding'] === undefined) {
      request.resume();
      return EMPTY_BODY;
    }
    const declared = Number(request.headers['content-length'] ?? 0);
    if (declared > this.#maxBodyBytes) return undefined;
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const chunk of request as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > this.#maxBodyBytes) return undefined;
      chunks.push(chunk);
    }
    return chunks.length === 1 ? chunks[0] : Buffer.concat(chunks);
  }

  /** Answers with one part: a fetch that is not a generator method, by a plain call. */
  async #answer(route: Route, data: RequestData, modelId: string, response: ServerResponse): Promise<void> {
    const answer = new DeploymentResponse<ResponsePart>(route.router, (replica) => replica.handle.httpCall.remote(data, modelId) as ObjectRef<ResponsePart>, [], modelId, this.#preferLocal);
    let timedOut = false;
    const timer = this.#requestTimeoutMs === undefined ? undefined : setTimeout(() => {
      timedOut = true;
      answer.cancel();
    }, this.#requestTimeoutMs);
    response.on('close', () => {
      if (!response.writableFinished) answer.cancel();
    });
    try {
      const part = await answer;
      if (response.destroyed) return;
      const chunk = part.chunk ?? '';
      response.writeHead(part.head!.status, { ...part.head!.headers, 'content-length': Buffer.byteLength(chunk) });
      response.end(chunk);
    } catch (error) {
      if (!response.destroyed) this.#fail(response, error, timedOut);
    } finally {
      clearTimeout(timer);
    }
  }

  #fail(response: ServerResponse, error: unknown, timedOut: boolean): void {
    if (response.headersSent) {
      response.destroy(error as Error);
      return;
    }
    if (error instanceof BackPressureError) return sendJson(response, 503, { error: 'BackPressure', message: error.message }, { 'retry-after': '1' });
    if (error instanceof DeploymentError) return sendJson(response, 503, { error: 'Unavailable', message: error.message });
    if (error instanceof TaskCancelledError && timedOut) return sendJson(response, 504, { error: 'GatewayTimeout', message: `the request took longer than ${this.#requestTimeoutMs} ms (requestTimeoutMs)` });
    const message = error instanceof TaskError ? error.message : (error as Error).message;
    sendJson(response, (error as { code?: string }).code === 'ERR_ACTOR_DIED' ? 503 : 500, { error: (error as Error).name ?? 'Error', message });
  }

  async #handle(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const url = new URL(request.url ?? '/', 'http://proxy');
    const path = url.pathname;
    if (path === '/-/healthz') {
      response.writeHead(200, { 'content-type': 'text/plain' });
      response.end('success');
      return;
    }
    if (path === '/-/routes') return sendJson(response, 200, this.routes());
    const route = this.#routes.find((candidate) => matches(candidate.prefix, path));
    const started = process.hrtime.bigint();
    response.once('close', () => {
      const code = response.writableFinished ? response.statusCode : 499;
      this.#metrics.record(route?.app ?? '', code, Number(process.hrtime.bigint() - started) / 1e9);
    });
    if (!route) return sendJson(response, 404, { error: 'NotFound', message: `no application serves ${path} (routes: ${Object.keys(this.routes()).join(', ') || 'none'})` });
    const body = await this.#readBody(request);
    if (!body) {
      sendJson(response, 413, { error: 'PayloadTooLarge', message: `the request's body is larger than ${this.#maxBodyBytes} bytes (maxBodyBytes)` }, { connection: 'close' });
      request.destroy();
      return;
    }
    const headers: Record<string, string> = {};
    for (const [name, value] of Object.entries(request.headers)) {
      if (value !== undefined) headers[name] = Array.isArray(value) ? value.join(', ') : value;
    }
    const data: RequestData = {
      method: request.method ?? 'GET',
      url: request.url ?? '/',
      path,
      routePath: route.prefix === '/' ? path : path.slice(route.prefix.length) || '/',
      query: Object.fromEntries(url.searchParams),
      headers,
      body,
    };
    let modelId: string;
    try {
      modelId = route.modelIdOf ? (route.modelIdOf(new HttpRequest(data)) ?? '') : (headers[MODEL_ID_HEADER] ?? '');
      if (typeof modelId !== 'string') throw new TypeError(`requestModelId gave ${typeof modelId}, not a string`);
    } catch (error) {
      const status = error instanceof HttpError ? error.status : 400;
      return sendJson(response, status, { error: 'BadRequest', message: `the request's model could not be read: ${(error as Error).message}` });
    }
    if (!route.streaming) return this.#answer(route, data, modelId, response);
    const parts = new DeploymentResponseGenerator<ResponsePart>(route.router, (replica) => replica.handle.http.remote(data, modelId) as ObjectRefGenerator<ResponsePart>, [], modelId, this.#preferLocal);
    let timedOut = false;
    const timer = this.#requestTimeoutMs === undefined ? undefined : setTimeout(() => {
      timedOut = true;
      void parts.return();
    }, this.#requestTimeoutMs);
    // A client gone before its answer ended: stop the replica's work at its next item.
    response.on('close', () => {
      if (!response.writableFinished) void parts.return();
    });
    try {
      for await (const part of parts) {
        if (part.head && !response.headersSent) {
          if (part.end) {
            const chunk = part.chunk ?? '';
            response.writeHead(part.head.status, { ...part.head.headers, 'content-length': Buffer.byteLength(chunk) });
            response.end(chunk);
            return;
          }
          response.writeHead(part.head.status, part.head.headers);
        }
        if (part.chunk !== undefined && (part.chunk.length > 0) && !response.write(part.chunk)) {
          await drained(response);
        }
        if (response.destroyed) return;
      }
      if (timedOut && !response.headersSent) {
        sendJson(response, 504, { error: 'GatewayTimeout', message: `the request took longer than ${this.#requestTimeoutMs} ms (requestTimeoutMs)` });
        return;
      }
      if (!response.headersSent) response.writeHead(204);
      response.end();
    } catch (error) {
      this.#fail(response, error, timedOut);
    } finally {
      clearTimeout(timer);
    }
  }
}
