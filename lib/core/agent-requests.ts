/**
 * Requests to a node agent's object server (from the head, or from another agent pulling), each
 * answered by an agent-reply. When the connection goes, everything pending fails, and so does
 * anything asked afterwards, with NodeLostError.
 */
import { NodeLostError, errorFromNative } from '../errors.js';
import type { AgentReplyMessage, AgentRequestMessage } from './agent-protocol.js';
import type { BulkPlace } from './connection.js';
import type { AnyMessage } from './protocol.js';

export class AgentRequests {
  readonly #pending = new Map<number, { resolve: (value: unknown) => void; reject: (error: Error) => void; place?: BulkPlace }>();
  #next = 1;
  #lost: NodeLostError | undefined;

  /** `send` writes a request (its `bulk` bytes raw); `nodeId` names the node in errors. */
  constructor(
    private readonly nodeId: string,
    private readonly send: (message: AgentRequestMessage, bulk?: Uint8Array) => void,
  ) {}

  get lost(): boolean {
    return this.#lost !== undefined;
  }

  /**
   * Asks; `bulk` bytes must stay unchanged until the answer. An answer with bytes of its own (a
   * read) may be read straight into `place` (see sinkFor): it then resolves with that memory.
   */
  request(op: AgentRequestMessage['op'], body: Record<string, unknown>, bulk?: Uint8Array, place?: BulkPlace): Promise<unknown> {
    if (this.#lost) return Promise.reject(this.#lost);
    const requestId = this.#next++;
    return new Promise((resolve, reject) => {
      this.#pending.set(requestId, { resolve, reject, place });
      this.send({ t: 'agent-request', requestId, op, body }, bulk);
    });
  }

  /** A request that wants no answer. */
  notify(op: AgentRequestMessage['op'], body: Record<string, unknown>): void {
    if (!this.#lost) this.send({ t: 'agent-request', requestId: 0, op, body });
  }

  /** Where an answer's bytes go, for its connection's bulkSink. */
  sinkFor(message: AnyMessage): BulkPlace | undefined {
    const reply = message as AgentReplyMessage;
    return reply.t === 'agent-reply' && reply.ok ? this.#pending.get(reply.requestId)?.place : undefined;
  }

  settle(reply: AgentReplyMessage): void {
    const pending = this.#pending.get(reply.requestId);
    if (!pending) return;
    this.#pending.delete(reply.requestId);
    if (reply.ok) pending.resolve(reply.bulk ?? reply.value);
    else pending.reject(agentError(this.nodeId, reply.error));
  }

  /** The connection is gone: `message` says how. */
  fail(message: string): void {
    if (this.#lost) return;
    this.#lost = new NodeLostError(this.nodeId, message);
    for (const pending of this.#pending.values()) pending.reject(this.#lost);
    this.#pending.clear();
  }
}

/**
 * An agent's error answer as the error it was there: a peer that went away is the loss of a
 * node; the store's errors keep their classes (a full store, an object too large), naming the node.
 */
function agentError(nodeId: string, error: AgentReplyMessage['error']): Error {
  const message = error?.message ?? `node ${nodeId} failed`;
  if (error?.code === 'ERR_NODE_LOST') return new NodeLostError(nodeId, message);
  if (error?.code?.startsWith('ERR_OBJECT') || error?.code === 'ERR_STORE_CLOSED') return errorFromNative(error.code, `node ${nodeId}: ${message}`, error.details ?? {});
  return Object.assign(new Error(message), { name: error?.name ?? 'Error', code: error?.code });
}
