/**
 * Where a listening driver takes node agents and their workers: a TCP server, the connections it
 * accepted (closed with it), and the cluster's token, which every connection must show first.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { AddressInfo, Server, Socket } from 'node:net';
import { serve } from './tls.js';
import { InvalidArgumentError } from '../errors.js';

/** Where node agents join a driver: init's `listen`. */
export interface ListenOptions {
  /** The interface to listen on (default '0.0.0.0': every one). */
  host?: string;
  /** The TCP port (default 7380; 0 picks a free one, which state().listening tells). */
  port?: number;
  /**
   * The secret agents and their workers must present (default: TRELLIS_CLUSTER_TOKEN). Required:
   * whoever can join the cluster runs code in it.
   */
  token?: string;
  /**
   * An agent not heard from for this long (ms) counts as lost, as if its connection closed
   * (default 30,000). Agents report every second; a host that hangs or drops off the network
   * may leave its connection open for minutes.
   */
  nodeTimeoutMs?: number;
}

function digest(token: string): Buffer {
  return createHash('sha256').update(token).digest();
}

/** Whether `given` is `token`, compared in constant time. */
export function tokensMatch(given: unknown, token: string): boolean {
  return typeof given === 'string' && timingSafeEqual(digest(given), digest(token));
}

export class NodeListener {
  readonly #server: Server;
  readonly #sockets = new Set<Socket>();
  readonly #token: string;
  readonly host: string;
  readonly port: number;
  readonly nodeTimeoutMs: number;

  private constructor(server: Server, token: string, host: string, port: number, nodeTimeoutMs: number) {
    this.#server = server;
    this.#token = token;
    this.host = host;
    this.port = port;
    this.nodeTimeoutMs = nodeTimeoutMs;
  }

  /** Listens as `options` say; each connection goes to `accept` (which checks the token). */
  static async start(options: ListenOptions, accept: (socket: Socket) => void): Promise<NodeListener> {
    const token = options.token ?? process.env.TRELLIS_CLUSTER_TOKEN;
    if (!token) throw new InvalidArgumentError('listen needs a token (listen.token or TRELLIS_CLUSTER_TOKEN): whoever joins the cluster runs code in it', 'ERR_NO_TOKEN');
    const host = options.host ?? '0.0.0.0';
    const port = options.port ?? 7380;
    const nodeTimeoutMs = options.nodeTimeoutMs ?? 30_000;
    if (!(nodeTimeoutMs >= 2000)) throw new InvalidArgumentError(`listen.nodeTimeoutMs must be at least 2000 (agents report every second), got ${String(nodeTimeoutMs)}`);
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new InvalidArgumentError(`listen.port must be an integer from 0 to 65535, got ${String(port)}`);
    let onSocket: (socket: Socket) => void = (socket) => socket.destroy();
    const server = serve((socket) => onSocket(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (error: NodeJS.ErrnoException) =>
        reject(new InvalidArgumentError(`cannot listen on ${host}:${port} for nodes: ${error.message}`, error.code === 'EADDRINUSE' ? 'ERR_ADDRESS_IN_USE' : 'ERR_LISTEN')));
      server.listen(port, host, () => resolve());
    });
    const listener = new NodeListener(server, token, host, (server.address() as AddressInfo).port, nodeTimeoutMs);
    onSocket = (socket) => {
      listener.#sockets.add(socket);
      socket.once('close', () => listener.#sockets.delete(socket));
      accept(socket);
    };
    return listener;
  }

  tokenValid(token: unknown): boolean {
    return tokensMatch(token, this.#token);
  }

  /** Stops listening and closes every connection it accepted. */
  async close(): Promise<void> {
    for (const socket of this.#sockets) socket.destroy();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}
