/**
 * Batch inference through an HTTP endpoint, as Ray's HttpRequestProcessorConfig: each row's
 * payload is sent as a JSON request (to an OpenAI-compatible server, a hosted model's API, a
 * trellis `serve` application) and its answer becomes a column. The requests wait on the network,
 * not on a CPU, so a few actors each keep many requests in flight; what a demanding job needs on
 * top of `map(..., { rowsInFlight })` is here: a rate the whole processor keeps to (`qps`), retries
 * of what a service means as "later" (429, 503, a reset connection) with backoff that honours
 * Retry-After, a time limit per attempt, and rows that fail alone when asked.
 */
import { HttpRequestError, InvalidArgumentError } from '../errors.js';
import { remote } from '../core/registry.js';
import type { Dataset } from '../data/dataset.js';
import type { Row } from '../data/block.js';
import { REQUEST_PROCESSOR_OPTIONS, RequestEngine, checkNumberOption, requestProcessor, resolveRequestOptions, type AttemptOutcome, type RequestEngineOptions, type RequestProcessorOptions } from './request-engine.js';

/** Statuses a service answers for "not now": retried (as the OpenAI clients and Ray's processor do). */
const RETRIED_STATUSES = [408, 409, 425, 429, 500, 502, 503, 504];
/** Characters of a failed answer's body an error quotes. */
const QUOTED_BODY = 300;
const PROCESSOR = 'buildHttpRequestProcessor()';

export interface HttpRequestProcessorOptions extends RequestProcessorOptions {
  /** The endpoint every row's request goes to (http or https). */
  url: string;
  /** 'POST' (default), 'PUT' or 'PATCH': the payload is the request's JSON body. */
  method?: 'POST' | 'PUT' | 'PATCH';
  /** Headers of every request (an API key's Authorization, say); content-type is JSON unless given. */
  headers?: Record<string, string>;
  /** The column each row's answer goes to (default 'httpResponse'): parsed JSON where the answer is JSON, else its text; its status goes to `httpStatus`. */
  responseColumn?: string;
  /** Statuses that are retried (default 408, 409, 425, 429, 500, 502, 503, 504); any other non-2xx fails at once. */
  retryStatuses?: number[];
  /** How long one attempt may take, answer's body included (ms, default 60 s). */
  timeoutMs?: number;
}

interface HttpEngineOptions extends RequestEngineOptions {
  url: string;
  method: 'POST' | 'PUT' | 'PATCH';
  headers: Record<string, string>;
  retryStatuses: number[];
  timeoutMs: number;
}

/** The pool's class: each row's payload as a JSON request to the endpoint. */
export class HttpRequestEngine extends RequestEngine {
  declare protected readonly engineOptions: HttpEngineOptions;

  constructor(options: HttpEngineOptions) {
    super(options);
  }

  protected override payloadError(message: string): HttpRequestError {
    return new HttpRequestError('ERR_HTTP_PAYLOAD', message, { url: this.engineOptions.url, attempts: 0 });
  }

  protected override statusColumn(status: number | null): Row {
    return { httpStatus: status };
  }

  protected override async attempt(payload: unknown, index: number, attempt: number): Promise<AttemptOutcome> {
    const { url, method, headers, retryStatuses, timeoutMs } = this.engineOptions;
    const attempts = attempt + 1;
    const nth = attempt > 0 ? ` (attempt ${attempts})` : '';
    let body: string;
    try {
      body = JSON.stringify(payload);
    } catch (error) {
      return { error: new HttpRequestError('ERR_HTTP_PAYLOAD', `batch row ${index}'s payload is not JSON: ${(error as Error).message}`, { url, attempts: 0 }), retry: false };
    }
    try {
      const answer = await fetch(url, { method, headers, body, signal: AbortSignal.timeout(timeoutMs) });
      const text = await answer.text();
      const hold = spentLimitHoldMs(answer.headers);
      const held = hold === undefined ? {} : { holdMs: hold };
      if (answer.ok) {
        if (!/\bjson\b/i.test(answer.headers.get('content-type') ?? '')) return { response: text, status: answer.status, ...held };
        try {
          return { response: text.length === 0 ? null : JSON.parse(text), status: answer.status, ...held };
        } catch (error) {
          return { error: new HttpRequestError('ERR_HTTP_RESPONSE', `batch row ${index}: ${url} answered ${answer.status} with JSON that does not parse (${(error as Error).message}): ${quote(text)}`, { url, status: answer.status, attempts }), retry: false, ...held };
        }
      }
      const retryAfterMs = parseDuration(answer.headers.get('retry-after-ms'), 'ms') ?? parseRetryAfter(answer.headers.get('retry-after'));
      return {
        error: new HttpRequestError('ERR_HTTP_STATUS', `batch row ${index}: ${url} answered ${answer.status} ${answer.statusText}${nth}: ${quote(text)}`, { url, status: answer.status, attempts }),
        retry: retryStatuses.includes(answer.status),
        ...(retryAfterMs === undefined ? {} : { retryAfterMs }),
        slowDown: answer.status === 429 || answer.status === 503,
        ...held,
      };
    } catch (error) {
      if ((error as Error).name === 'TimeoutError') {
        return { error: new HttpRequestError('ERR_HTTP_TIMEOUT', `batch row ${index}: ${url} did not answer within ${timeoutMs} ms${nth}`, { url, attempts }), retry: true };
      }
      const cause = (error as { cause?: { code?: string; message?: string } }).cause;
      return { error: new HttpRequestError('ERR_HTTP_NETWORK', `batch row ${index}: the request to ${url} failed${nth}: ${cause?.code ?? cause?.message ?? (error as Error).message}`, { url, attempts, cause: error }), retry: true };
    }
  }
}

export const RemoteHttpRequestEngine = remote(import.meta, HttpRequestEngine);

/** The start of a failed answer's body, for an error message. */
function quote(text: string): string {
  const trimmed = text.trim();
  if (trimmed.length === 0) return '(empty body)';
  return JSON.stringify(trimmed.length > QUOTED_BODY ? `${trimmed.slice(0, QUOTED_BODY)}…` : trimmed);
}

/**
 * How long a service that says its request budget is spent wants no request (OpenAI's and most
 * hosted APIs' headers: x-ratelimit-remaining-requests 0, and x-ratelimit-reset-requests the time
 * until it refills, as '1s', '6m0s' or '250ms'); undefined where the budget is not spent.
 */
export function spentLimitHoldMs(headers: Headers): number | undefined {
  if (headers.get('x-ratelimit-remaining-requests')?.trim() !== '0') return undefined;
  return parseDuration(headers.get('x-ratelimit-reset-requests'), 's') ?? 1000;
}

/** A duration: Go's form ('1h2m3.5s', '250ms') or a bare number in `unit`; undefined where unreadable. */
export function parseDuration(value: string | null, unit: 's' | 'ms'): number | undefined {
  if (value === null) return undefined;
  const text = value.trim();
  if (/^\d+(\.\d+)?$/.test(text)) return Number(text) * (unit === 's' ? 1000 : 1);
  const parts = [...text.matchAll(/(\d+(?:\.\d+)?)(ms|h|m|s)/g)];
  if (parts.length === 0 || parts.map((part) => part[0]).join('') !== text) return undefined;
  const scale: Record<string, number> = { h: 3_600_000, m: 60_000, s: 1000, ms: 1 };
  return parts.reduce((sum, [, amount, suffix]) => sum + Number(amount) * scale[suffix], 0);
}

/** Retry-After as milliseconds: delta seconds or an HTTP date; undefined where absent or unreadable. */
export function parseRetryAfter(value: string | null, now = Date.now()): number | undefined {
  if (value === null) return undefined;
  const text = value.trim();
  if (/^\d+(\.\d+)?$/.test(text)) return Number(text) * 1000;
  const date = Date.parse(text);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

const KNOWN_OPTIONS = new Set([...REQUEST_PROCESSOR_OPTIONS, 'url', 'method', 'headers', 'responseColumn', 'retryStatuses', 'timeoutMs']);

/**
 * A function from a dataset to a dataset whose rows each gain the answer to their own request:
 * `responseColumn` (default 'httpResponse') and `httpStatus`, and with rowErrors 'record' `error`.
 */
export function buildHttpRequestProcessor(options: HttpRequestProcessorOptions): (dataset: Dataset) => Dataset {
  if (typeof options !== 'object' || options === null) throw new InvalidArgumentError(`${PROCESSOR} needs options with a url`, 'ERR_HTTP_PROCESSOR');
  const unknown = Object.keys(options).filter((name) => !KNOWN_OPTIONS.has(name));
  if (unknown.length > 0) throw new InvalidArgumentError(`${PROCESSOR}: unknown option${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')}`, 'ERR_HTTP_PROCESSOR');
  let url: URL;
  try {
    url = new URL(options.url);
  } catch {
    throw new InvalidArgumentError(`${PROCESSOR}: url must be an absolute http or https URL, got ${JSON.stringify(options.url)}`, 'ERR_HTTP_PROCESSOR');
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new InvalidArgumentError(`${PROCESSOR}: url must be http or https, got ${url.protocol}`, 'ERR_HTTP_PROCESSOR');
  const method = options.method ?? 'POST';
  if (method !== 'POST' && method !== 'PUT' && method !== 'PATCH') throw new InvalidArgumentError(`${PROCESSOR}: method must be 'POST', 'PUT' or 'PATCH' (the payload is the body), got ${JSON.stringify(method)}`, 'ERR_HTTP_PROCESSOR');
  if (options.headers !== undefined && (typeof options.headers !== 'object' || options.headers === null || Object.values(options.headers).some((value) => typeof value !== 'string'))) {
    throw new InvalidArgumentError(`${PROCESSOR}: headers must map names to strings`, 'ERR_HTTP_PROCESSOR');
  }
  checkNumberOption(PROCESSOR, options.timeoutMs, 'timeoutMs', false, false, 'ERR_HTTP_PROCESSOR');
  if (options.retryStatuses !== undefined && (!Array.isArray(options.retryStatuses) || options.retryStatuses.some((status) => !Number.isInteger(status) || status < 400 || status > 599))) {
    throw new InvalidArgumentError(`${PROCESSOR}: retryStatuses must be a list of statuses from 400 to 599, got ${JSON.stringify(options.retryStatuses)}`, 'ERR_HTTP_PROCESSOR');
  }
  const hasContentType = Object.keys(options.headers ?? {}).some((name) => name.toLowerCase() === 'content-type');
  const engine: HttpEngineOptions = {
    ...resolveRequestOptions(PROCESSOR, options, 'httpResponse', 'ERR_HTTP_PROCESSOR'),
    url: url.href,
    method,
    headers: { ...(hasContentType ? {} : { 'content-type': 'application/json' }), ...options.headers },
    retryStatuses: options.retryStatuses ?? RETRIED_STATUSES,
    timeoutMs: options.timeoutMs ?? 60_000,
  };
  return requestProcessor(HttpRequestEngine, engine, options);
}
