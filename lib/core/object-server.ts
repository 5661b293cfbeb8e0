/**
 * A node agent's store, served over a connection: the head's requests (reads and writes of its
 * objects), and other agents' reads when they pull an object straight from this one. One server
 * per connection, so that what a connection opened is released when it closes.
 */
import { dial } from './tls.js';
import type { ObjectBuilder, ObjectStore, ObjectView } from '../store/object-store.js';
import { NodeLostError } from '../errors.js';
import { FrameConnection, type BulkPlace } from './connection.js';
import type { AnyMessage } from './protocol.js';
import type { AgentReplyMessage, AgentRequestMessage, PeerHelloMessage } from './agent-protocol.js';
import { AgentRequests } from './agent-requests.js';
import { isPlaced, type ObjectReader, type ObjectSource } from './object-transfer.js';

/** Where a server's answers go (its connection). */
type Replies = { send(message: AgentReplyMessage): void; sendBulk(message: AgentReplyMessage, bulk: Uint8Array): void };

export class ObjectServer {
  readonly #reads = new Map<number, ObjectView>();
  readonly #writes = new Map<string, ObjectBuilder>();
  #nextRead = 1;

  constructor(readonly store: ObjectStore, readonly nodeId: string, readonly connection: Replies) {}

  /** Answers a store request (requestId 0: none wanted); false for an op that is not the store's. */
  handle(message: AgentRequestMessage): boolean {
    const { requestId, body } = message;
    const reply = (value: unknown) => this.connection.send({ t: 'agent-reply', requestId, ok: true, value });
    try {
      switch (message.op) {
        case 'read-open': {
          const view = this.store.getIfSealed(body.id as string);
          if (!view) throw Object.assign(new Error(`object ${String(body.id)} is not in the store of node ${this.nodeId}`), { code: 'ERR_OBJECT_NOT_FOUND' });
          const handle = this.#nextRead++;
          this.#reads.set(handle, view);
          reply({ handle, size: view.size, ...(view.metadata ? { metadata: view.metadata } : {}) });
          return true;
        }
        case 'read': {
          const view = this.#reads.get(body.handle as number);
          if (!view) throw new Error(`read handle ${String(body.handle)} is not open`);
          const offset = body.offset as number;
          // Raw from the pinned object: it stays pinned till read-close, after the reader has it.
          this.connection.sendBulk({ t: 'agent-reply', requestId, ok: true }, view.data.subarray(offset, offset + (body.length as number)));
          return true;
        }
        case 'read-close':
          this.#reads.get(body.handle as number)?.release();
          this.#reads.delete(body.handle as number);
          return true;
        case 'write-begin': {
          const id = body.id as string;
          this.#writes.set(id, this.store.create(id, body.size as number, { metadata: body.metadata as Uint8Array | undefined }));
          reply(null);
          return true;
        }
        case 'write': {
          const builder = this.#writes.get(body.id as string);
          if (!builder) throw new Error(`object ${String(body.id)} is not being written`);
          if (!message.bulk) throw new Error(`a write of object ${String(body.id)} came without its bytes`);
          if (!isPlaced(builder, message.bulk, body.offset as number)) builder.write(message.bulk, body.offset as number);
          reply(null);
          return true;
        }
        case 'write-seal': {
          const builder = this.#writes.get(body.id as string);
          if (!builder) throw new Error(`object ${String(body.id)} is not being written`);
          this.#writes.delete(body.id as string);
          builder.seal();
          reply(null);
          return true;
        }
        case 'write-abort':
          this.#writes.get(body.id as string)?.abort();
          this.#writes.delete(body.id as string);
          return true;
        case 'pinned':
          reply(this.store.pinned());
          return true;
        default:
          return false;
      }
    } catch (error) {
      replyError(this.connection, requestId, error);
      return true;
    }
  }

  /** Where a write's bytes go: straight into the object being written (see BulkSink). */
  sinkFor(message: AnyMessage, bulkLength: number): BulkPlace | undefined {
    const request = message as AgentRequestMessage;
    if (request.t !== 'agent-request' || request.op !== 'write') return undefined;
    const builder = this.#writes.get(request.body.id as string);
    const offset = request.body.offset as number;
    if (!builder || !Number.isSafeInteger(offset) || offset < 0 || offset + bulkLength > builder.data.byteLength) return undefined;
    return { into: builder.data.subarray(offset, offset + bulkLength), valid: () => this.#writes.get(request.body.id as string) === builder };
  }

  /** Releases what its connection had open. */
  close(): void {
    for (const view of this.#reads.values()) view.release();
    this.#reads.clear();
    for (const builder of this.#writes.values()) {
      try {
        builder.abort();
      } catch {
        // Its store is closing.
      }
    }
    this.#writes.clear();
  }
}

export function replyError(connection: Replies, requestId: number, error: unknown): void {
  if (requestId === 0) return;
  const err = error as Error & { code?: string; requested?: number; capacity?: number; used?: number };
  // A full store's figures go along, for the error the head makes again.
  const details = err.requested !== undefined ? { requested: err.requested, capacity: err.capacity, used: err.used } : undefined;
  connection.send({ t: 'agent-reply', requestId, ok: false, error: { name: err.name, message: err.message, code: err.code, ...(details ? { details } : {}) } });
}

/**
 * A connection to another agent's object server, for pulling objects from its store. Requests
 * fail with NodeLostError (code ERR_NODE_LOST) once the connection is gone.
 */
export class PeerClient {
  readonly #connection: FrameConnection<AgentReplyMessage, AgentRequestMessage | PeerHelloMessage>;
  readonly #requests: AgentRequests;
  readonly ready: Promise<void>;

  constructor(readonly address: string, host: string, port: number, token: string) {
    const { socket, ready } = dial(host, port);
    this.ready = new Promise((resolve, reject) => {
      socket.once(ready, () => resolve());
      socket.once('error', (error) => reject(new NodeLostError(address, `cannot reach the node at ${address}: ${error.message}`)));
    });
    this.ready.catch(() => undefined);
    this.#connection = new FrameConnection<AgentReplyMessage, AgentRequestMessage | PeerHelloMessage>(
      socket,
      (message) => this.#requests.settle(message),
      () => this.#requests.fail(`the node at ${address} went away`),
    );
    this.#requests = new AgentRequests(address, (message) => this.#connection.send(message));
    this.#connection.bulkSink = (message) => this.#requests.sinkFor(message);
    this.#connection.send({ t: 'peer-hello', token });
  }

  get closed(): boolean {
    return this.#requests.lost;
  }

  request(op: AgentRequestMessage['op'], body: Record<string, unknown>, place?: BulkPlace): Promise<unknown> {
    return this.#requests.request(op, body, undefined, place);
  }

  notify(op: AgentRequestMessage['op'], body: Record<string, unknown>): void {
    this.#requests.notify(op, body);
  }

  /** Reads objects out of the peer's store. */
  readonly source: ObjectSource = servedSource(this);

  close(): void {
    this.#connection.close();
    this.#requests.fail(`the connection to the node at ${this.address} was closed`);
  }
}

/** Where objects are read through a connection's requests (an agent's, or a peer's). */
export interface ObjectRequests {
  /** Settles once requests can be sent (a connection being made). */
  readonly ready?: Promise<void>;
  /** `place`: where a read's bytes may go straight (see BulkSink). */
  request(op: AgentRequestMessage['op'], body: Record<string, unknown>, place?: BulkPlace): Promise<unknown>;
  notify(op: AgentRequestMessage['op'], body: Record<string, unknown>): void;
}

/** Reads an object served by an ObjectServer at the other end of `link`. */
export function servedSource(link: ObjectRequests): ObjectSource {
  return {
    open: async (id): Promise<ObjectReader> => {
      await link.ready;
      const opened = (await link.request('read-open', { id })) as { handle: number; size: number; metadata?: Uint8Array };
      return {
        size: opened.size,
        metadata: opened.metadata,
        read: async (offset, length, place) => (await link.request('read', { handle: opened.handle, offset, length }, place)) as Uint8Array,
        close: () => link.notify('read-close', { handle: opened.handle }),
      };
    },
  };
}
