/**
 * What an HTTP request and its response are on their way between the proxy (in the driver) and
 * an ingress replica: plain data on the wire, and in the replica the `HttpRequest` its `fetch()`
 * takes and the values it may answer with (see `responseParts`).
 */

/** An HTTP request as it travels to a replica. */
export interface RequestData {
  method: string;
  /** The path and query as the client sent them ('/api/items?id=3'). */
  url: string;
  /** The path without the query ('/api/items'). */
  path: string;
  /** The path below the application's route prefix ('/items' under '/api'; '/' at the prefix itself). */
  routePath: string;
  /** The query's parameters; a name given twice keeps its last value (read `url` for all). */
  query: Record<string, string>;
  /** Header names in lower case; a header given twice is joined by ', '. */
  headers: Record<string, string>;
  body: Uint8Array;
}

/** A response's status and headers, sent before its body. */
export interface ResponseHead {
  status: number;
  headers: Record<string, string>;
}

/** One item of a replica's answer to an HTTP request: the head first (once), then body chunks. */
export interface ResponsePart {
  head?: ResponseHead;
  chunk?: Uint8Array | string;
  /** The whole answer is in this part (its length can be sent ahead). */
  end?: boolean;
}

const decoder = new TextDecoder();

/** The request an ingress deployment's `fetch(request)` is given. */
export class HttpRequest implements RequestData {
  readonly method: string;
  readonly url: string;
  readonly path: string;
  readonly routePath: string;
  readonly query: Record<string, string>;
  readonly headers: Record<string, string>;
  readonly body: Uint8Array;

  constructor(data: RequestData) {
    this.method = data.method;
    this.url = data.url;
    this.path = data.path;
    this.routePath = data.routePath;
    this.query = data.query;
    this.headers = data.headers;
    this.body = data.body;
  }

  /** The body as UTF-8 text. */
  text(): string {
    return decoder.decode(this.body);
  }

  /** The body parsed as JSON; a body that is not JSON throws HttpError 400. */
  json<T = unknown>(): T {
    try {
      return JSON.parse(this.text()) as T;
    } catch (error) {
      throw new HttpError(400, `the request's body is not JSON: ${(error as Error).message}`);
    }
  }
}

/**
 * A response with its own status or headers. `body`: a string (text/plain), bytes
 * (application/octet-stream), or any other value (sent as JSON); the headers given win.
 */
export class HttpResponse {
  readonly status: number;
  readonly headers: Record<string, string>;
  readonly body: unknown;

  constructor(body?: unknown, init: { status?: number; headers?: Record<string, string> } = {}) {
    this.status = init.status ?? 200;
    this.headers = init.headers ?? {};
    this.body = body;
  }
}

/** Thrown by `fetch()`: answers with this status and `{ error, message }` as JSON (a 500 otherwise). */
export class HttpError extends Error {
  readonly status: number;
  constructor(status: number, message: string) {
    super(message);
    this.name = 'HttpError';
    this.status = status;
  }
}

function lowerCased(headers: Record<string, string>): Record<string, string> {
  const result: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers)) result[name.toLowerCase()] = String(value);
  return result;
}

/** A value's bytes or text and the content type it goes by. */
function encodeBody(value: unknown): { chunk: Uint8Array | string | undefined; type: string | undefined } {
  if (value === undefined) return { chunk: undefined, type: undefined };
  if (typeof value === 'string') return { chunk: value, type: 'text/plain; charset=utf-8' };
  if (value instanceof Uint8Array) return { chunk: value, type: 'application/octet-stream' };
  if (ArrayBuffer.isView(value)) return { chunk: new Uint8Array(value.buffer, value.byteOffset, value.byteLength), type: 'application/octet-stream' };
  return { chunk: JSON.stringify(value), type: 'application/json' };
}

/** The head and body that answer with `value`, one part (a value's whole answer). */
export function responseOf(value: unknown): ResponsePart {
  if (value instanceof HttpResponse) {
    const { chunk, type } = encodeBody(value.body);
    const headers = lowerCased(value.headers);
    if (type && !headers['content-type']) headers['content-type'] = type;
    return { head: { status: value.status, headers }, chunk, end: true };
  }
  if (value === undefined) return { head: { status: 204, headers: {} }, end: true };
  const { chunk, type } = encodeBody(value);
  return { head: { status: 200, headers: { 'content-type': type! } }, chunk, end: true };
}

/** The answer to a `fetch()` that threw. */
export function errorResponse(error: unknown): ResponsePart {
  const status = error instanceof HttpError && error.status >= 400 && error.status <= 599 ? error.status : 500;
  const name = error instanceof Error ? error.name : 'Error';
  const message = error instanceof Error ? error.message : String(error);
  return { head: { status, headers: { 'content-type': 'application/json' } }, chunk: JSON.stringify({ error: name, message }), end: true };
}

/** One streamed item as body bytes: text and bytes as they are, anything else a line of JSON. */
export function streamChunk(item: unknown): Uint8Array | string {
  if (typeof item === 'string' || item instanceof Uint8Array) return item;
  if (ArrayBuffer.isView(item)) return new Uint8Array(item.buffer, item.byteOffset, item.byteLength);
  return `${JSON.stringify(item)}\n`;
}

/** Whether `value` is a stream of items to answer with, rather than one value. */
export function isItemStream(value: unknown): value is AsyncIterable<unknown> | Iterable<unknown> {
  if (typeof value !== 'object' || value === null || value instanceof Uint8Array || Array.isArray(value)) return false;
  return typeof (value as AsyncIterable<unknown>)[Symbol.asyncIterator] === 'function' || (typeof (value as Iterable<unknown>)[Symbol.iterator] === 'function' && typeof (value as Iterator<unknown>).next === 'function');
}
