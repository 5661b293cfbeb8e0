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
import type { FunctionDescriptor } from '../core/protocol.js';
import type { Dataset } from '../data/dataset.js';
import type { Row } from '../data/block.js';
import { loadUdf, resolveUdf, type RowFunction } from '../data/udf.js';
import { RequestPacer, RequestSlots, retryDelayMs } from './request-pacing.js';

/** Statuses a service answers for "not now": retried (as the OpenAI clients and Ray's processor do). */
const RETRIED_STATUSES = [408, 409, 425, 429, 500, 502, 503, 504];
/** Characters of a failed answer's body an error quotes. */
const QUOTED_BODY = 300;

export interface HttpRequestProcessorOptions {
  /** The endpoint every row's request goes to (http or https). */
  url: string;
  /** 'POST' (default), 'PUT' or 'PATCH': the payload is the request's JSON body. */
  method?: 'POST' | 'PUT' | 'PATCH';
  /** Headers of every request (an API key's Authorization, say); content-type is JSON unless given. */
  headers?: Record<string, string>;
  /** The column holding each row's payload, sent as JSON (default 'payload'); `preprocess` usually makes it. A row whose payload is null or missing fails (ERR_HTTP_PAYLOAD). */
  payloadColumn?: string;
  /** The column each row's answer goes to (default 'httpResponse'): parsed JSON where the answer is JSON, else its text. */
  responseColumn?: string;
  /** Each row before its request (a registered function, as for `map`): builds the payload. */
  preprocess?: RowFunction;
  /**
   * Each row after its answer (a registered function): reads what it needs out of the response.
   * It runs in the actor, on the row as the answer left it, before the rows become a block: answers
   * of different shapes (a field a number here, a string there) need only agree once postprocessed.
   */
  postprocess?: RowFunction;
  /** Actors sending the requests (default 1). */
  concurrency?: number;
  /** Requests one actor keeps in flight at once, over all its batches (default 32). */
  maxConcurrentRequests?: number;
  /**
   * Requests per second the whole processor sends at most (each of `concurrency` actors paces its
   * share), first attempts and retries together. Unset: as fast as the requests in flight allow.
   */
  qps?: number;
  /** Attempts after the first for an answer of `retryStatuses`, a failed connection or a timeout (default 3). */
  maxRetries?: number;
  /** The first retry's wait (ms, default 500), doubled each attempt, jittered; a Retry-After answer header wins. */
  retryBaseDelayMs?: number;
  /** The longest wait before a retry (ms, default 60 s), Retry-After included. */
  maxRetryDelayMs?: number;
  /** Statuses that are retried (default 408, 409, 425, 429, 500, 502, 503, 504); any other non-2xx fails at once. */
  retryStatuses?: number[];
  /** How long one attempt may take, answer's body included (ms, default 60 s). */
  timeoutMs?: number;
  /**
   * 'fail' (default): a row whose request fails for good fails the job, naming the row, the status
   * and the answer. 'record': the row is kept with its response null and the failure in an `error`
   * column (null on rows that succeeded).
   */
  rowErrors?: 'fail' | 'record';
  /** Rows per batch handed to an actor (default 64). */
  batchSize?: number;
  /** CPUs each actor holds (default 0: it waits on the network; give it some where answers are large to parse). */
  numCpus?: number;
}

type EngineOptions = Required<Omit<HttpRequestProcessorOptions, 'preprocess' | 'postprocess' | 'concurrency' | 'batchSize' | 'numCpus' | 'qps' | 'headers'>> & {
  headers: Record<string, string>;
  /** The registered postprocess function, run on each row before its batch returns. */
  postprocess: FunctionDescriptor | null;
  /** This actor's share of the processor's qps (requests per second), or 0 for no limit. */
  actorQps: number;
};

/** What a request came to: the answer, or the failure after its retries. */
type Outcome = { status: number; response: unknown } | { error: HttpRequestError };

/** The pool's class: sends its batches' requests, paced and bounded across batches. */
export class HttpRequestEngine {
  readonly ready: Promise<void>;
  readonly #options: EngineOptions;
  #postprocess: ((row: Row) => Row | Promise<Row>) | undefined;
  readonly #slots: RequestSlots;
  readonly #pacer: RequestPacer;
  readonly #counters = { requests: 0, retries: 0, throttled: 0, failedRows: 0 };

  constructor(options: EngineOptions) {
    this.#options = options;
    this.#slots = new RequestSlots(options.maxConcurrentRequests);
    this.#pacer = new RequestPacer(options.actorQps > 0 ? options.actorQps : Infinity);
    this.ready = (async () => {
      if (options.postprocess) this.#postprocess = (await loadUdf(options.postprocess)) as (row: Row) => Row | Promise<Row>;
    })();
  }

  /** Counters since the actor started, for the data layer's progress lines (summed over the pool). */
  metrics(): Record<string, number> {
    return { ...this.#counters };
  }

  async call(rows: Row[]): Promise<Row[]> {
    await this.ready;
    const { responseColumn, rowErrors } = this.#options;
    const record = rowErrors === 'record';
    const outcomes = await Promise.all(rows.map((row, index) => this.#send(row, index)));
    if (!record) {
      const failed = outcomes.find((outcome): outcome is { error: HttpRequestError } => 'error' in outcome);
      if (failed) throw failed.error;
    }
    const answered = rows.map((row, index): Row => {
      const outcome = outcomes[index];
      if ('error' in outcome) {
        return { ...row, [responseColumn]: null, httpStatus: outcome.error.status ?? null, error: `${outcome.error.code}: ${outcome.error.message}` };
      }
      return { ...row, [responseColumn]: outcome.response, httpStatus: outcome.status, ...(record ? { error: null } : {}) };
    });
    const postprocess = this.#postprocess;
    if (!postprocess) return answered;
    const out: Row[] = [];
    for (const row of answered) {
      const result = await postprocess(row);
      if (typeof result !== 'object' || result === null || Array.isArray(result)) {
        throw new InvalidArgumentError(`postprocess ${postprocess.name || '(anonymous)'} must return a row (a plain object), got ${Array.isArray(result) ? 'an array' : result === null ? 'null' : typeof result}`, 'ERR_DATA_TYPE');
      }
      out.push(result);
    }
    return out;
  }

  /** One row's request, retried as the options say; never throws. */
  async #send(row: Row, index: number): Promise<Outcome> {
    const { payloadColumn, url, method, headers, maxRetries, retryStatuses, timeoutMs, retryBaseDelayMs, maxRetryDelayMs } = this.#options;
    if (row[payloadColumn] === undefined || row[payloadColumn] === null) {
      this.#counters.failedRows++;
      return { error: new HttpRequestError('ERR_HTTP_PAYLOAD', `batch row ${index} has no '${payloadColumn}' column to send (make one in preprocess)`, { url, attempts: 0 }) };
    }
    let body: string;
    try {
      body = JSON.stringify(row[payloadColumn]);
    } catch (error) {
      this.#counters.failedRows++;
      return { error: new HttpRequestError('ERR_HTTP_PAYLOAD', `batch row ${index}'s '${payloadColumn}' is not JSON: ${(error as Error).message}`, { url, attempts: 0 }) };
    }
    for (let attempt = 0; ; attempt++) {
      let failure: HttpRequestError;
      let retryAfterMs: number | undefined;
      await this.#slots.acquire();
      try {
        await this.#pacer.next();
        this.#counters.requests++;
        const answer = await fetch(url, { method, headers, body, signal: AbortSignal.timeout(timeoutMs) });
        const text = await answer.text();
        if (answer.ok) {
          const json = /\bjson\b/i.test(answer.headers.get('content-type') ?? '');
          if (!json) return { status: answer.status, response: text };
          try {
            return { status: answer.status, response: text.length === 0 ? null : JSON.parse(text) };
          } catch (error) {
            this.#counters.failedRows++;
            return { error: new HttpRequestError('ERR_HTTP_RESPONSE', `batch row ${index}: ${url} answered ${answer.status} with JSON that does not parse (${(error as Error).message}): ${quote(text)}`, { url, status: answer.status, attempts: attempt + 1 }) };
          }
        }
        failure = new HttpRequestError('ERR_HTTP_STATUS', `batch row ${index}: ${url} answered ${answer.status} ${answer.statusText}${attempt > 0 ? ` (attempt ${attempt + 1})` : ''}: ${quote(text)}`, { url, status: answer.status, attempts: attempt + 1 });
        if (answer.status === 429) this.#counters.throttled++;
        if (!retryStatuses.includes(answer.status)) {
          this.#counters.failedRows++;
          return { error: failure };
        }
        retryAfterMs = parseRetryAfter(answer.headers.get('retry-after'));
      } catch (error) {
        const timedOut = (error as Error).name === 'TimeoutError';
        const cause = (error as { cause?: { code?: string; message?: string } }).cause;
        failure = timedOut
          ? new HttpRequestError('ERR_HTTP_TIMEOUT', `batch row ${index}: ${url} did not answer within ${timeoutMs} ms${attempt > 0 ? ` (attempt ${attempt + 1})` : ''}`, { url, attempts: attempt + 1 })
          : new HttpRequestError('ERR_HTTP_NETWORK', `batch row ${index}: the request to ${url} failed: ${cause?.code ?? cause?.message ?? (error as Error).message}`, { url, attempts: attempt + 1, cause: error });
      } finally {
        this.#slots.release();
      }
      if (attempt >= maxRetries) {
        this.#counters.failedRows++;
        return { error: failure };
      }
      this.#counters.retries++;
      const delay = retryDelayMs(attempt, retryBaseDelayMs, maxRetryDelayMs, retryAfterMs);
      // A service that says "later" means it for every request: the actor's pace waits with this one.
      if (failure.status === 429 || failure.status === 503) this.#pacer.holdFor(delay);
      await new Promise((resolve) => setTimeout(resolve, delay));
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

/** Retry-After as milliseconds: delta seconds or an HTTP date; undefined where absent or unreadable. */
export function parseRetryAfter(value: string | null, now = Date.now()): number | undefined {
  if (value === null) return undefined;
  const text = value.trim();
  if (/^\d+(\.\d+)?$/.test(text)) return Number(text) * 1000;
  const date = Date.parse(text);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

function checkPositive(value: unknown, name: string, integer: boolean, allowZero = false): void {
  if (value === undefined) return;
  const ok = typeof value === 'number' && Number.isFinite(value) && (allowZero ? value >= 0 : value > 0) && (!integer || Number.isInteger(value));
  if (!ok) throw new InvalidArgumentError(`buildHttpRequestProcessor(): ${name} must be a ${integer ? 'whole number' : 'number'} ${allowZero ? '>= 0' : '> 0'}, got ${JSON.stringify(value)}`, 'ERR_HTTP_PROCESSOR');
}

const KNOWN_OPTIONS = new Set([
  'url', 'method', 'headers', 'payloadColumn', 'responseColumn', 'preprocess', 'postprocess', 'concurrency', 'maxConcurrentRequests', 'qps',
  'maxRetries', 'retryBaseDelayMs', 'maxRetryDelayMs', 'retryStatuses', 'timeoutMs', 'rowErrors', 'batchSize', 'numCpus',
]);

/**
 * A function from a dataset to a dataset whose rows each gain the answer to their own request:
 * `responseColumn` (default 'httpResponse') and `httpStatus`, and with rowErrors 'record' `error`.
 */
export function buildHttpRequestProcessor(options: HttpRequestProcessorOptions): (dataset: Dataset) => Dataset {
  if (typeof options !== 'object' || options === null) throw new InvalidArgumentError('buildHttpRequestProcessor() needs options with a url', 'ERR_HTTP_PROCESSOR');
  const unknown = Object.keys(options).filter((name) => !KNOWN_OPTIONS.has(name));
  if (unknown.length > 0) throw new InvalidArgumentError(`buildHttpRequestProcessor(): unknown option${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')}`, 'ERR_HTTP_PROCESSOR');
  let url: URL;
  try {
    url = new URL(options.url);
  } catch {
    throw new InvalidArgumentError(`buildHttpRequestProcessor(): url must be an absolute http or https URL, got ${JSON.stringify(options.url)}`, 'ERR_HTTP_PROCESSOR');
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new InvalidArgumentError(`buildHttpRequestProcessor(): url must be http or https, got ${url.protocol}`, 'ERR_HTTP_PROCESSOR');
  const method = options.method ?? 'POST';
  if (method !== 'POST' && method !== 'PUT' && method !== 'PATCH') throw new InvalidArgumentError(`buildHttpRequestProcessor(): method must be 'POST', 'PUT' or 'PATCH' (the payload is the body), got ${JSON.stringify(method)}`, 'ERR_HTTP_PROCESSOR');
  if (options.headers !== undefined && (typeof options.headers !== 'object' || options.headers === null || Object.values(options.headers).some((value) => typeof value !== 'string'))) {
    throw new InvalidArgumentError('buildHttpRequestProcessor(): headers must map names to strings', 'ERR_HTTP_PROCESSOR');
  }
  for (const name of ['payloadColumn', 'responseColumn'] as const) {
    if (options[name] !== undefined && (typeof options[name] !== 'string' || options[name].length === 0)) throw new InvalidArgumentError(`buildHttpRequestProcessor(): ${name} must be a column name, got ${JSON.stringify(options[name])}`, 'ERR_HTTP_PROCESSOR');
  }
  checkPositive(options.concurrency, 'concurrency', true);
  checkPositive(options.maxConcurrentRequests, 'maxConcurrentRequests', true);
  checkPositive(options.qps, 'qps', false);
  checkPositive(options.maxRetries, 'maxRetries', true, true);
  checkPositive(options.retryBaseDelayMs, 'retryBaseDelayMs', false, true);
  checkPositive(options.maxRetryDelayMs, 'maxRetryDelayMs', false, true);
  checkPositive(options.timeoutMs, 'timeoutMs', false);
  checkPositive(options.batchSize, 'batchSize', true);
  checkPositive(options.numCpus, 'numCpus', false, true);
  if (options.retryStatuses !== undefined && (!Array.isArray(options.retryStatuses) || options.retryStatuses.some((status) => !Number.isInteger(status) || status < 400 || status > 599))) {
    throw new InvalidArgumentError(`buildHttpRequestProcessor(): retryStatuses must be a list of statuses from 400 to 599, got ${JSON.stringify(options.retryStatuses)}`, 'ERR_HTTP_PROCESSOR');
  }
  if (options.rowErrors !== undefined && options.rowErrors !== 'fail' && options.rowErrors !== 'record') throw new InvalidArgumentError(`buildHttpRequestProcessor(): rowErrors must be 'fail' or 'record', got ${JSON.stringify(options.rowErrors)}`, 'ERR_HTTP_PROCESSOR');
  const { preprocess, postprocess, concurrency = 1, batchSize = 64, numCpus = 0 } = options;
  let postprocessDescriptor: FunctionDescriptor | null = null;
  if (postprocess !== undefined) {
    const spec = resolveUdf(postprocess, 'buildHttpRequestProcessor() postprocess');
    if (spec.kind !== 'function') throw new InvalidArgumentError('buildHttpRequestProcessor(): postprocess must be a function (a row in, a row out), not a class', 'ERR_HTTP_PROCESSOR');
    postprocessDescriptor = spec.descriptor;
  }
  const maxConcurrentRequests = options.maxConcurrentRequests ?? 32;
  const hasContentType = Object.keys(options.headers ?? {}).some((name) => name.toLowerCase() === 'content-type');
  const engine: EngineOptions = {
    url: url.href,
    method,
    headers: { ...(hasContentType ? {} : { 'content-type': 'application/json' }), ...options.headers },
    payloadColumn: options.payloadColumn ?? 'payload',
    responseColumn: options.responseColumn ?? 'httpResponse',
    maxConcurrentRequests,
    actorQps: options.qps !== undefined ? options.qps / concurrency : 0,
    maxRetries: options.maxRetries ?? 3,
    retryBaseDelayMs: options.retryBaseDelayMs ?? 500,
    maxRetryDelayMs: options.maxRetryDelayMs ?? 60_000,
    retryStatuses: options.retryStatuses ?? RETRIED_STATUSES,
    timeoutMs: options.timeoutMs ?? 60_000,
    rowErrors: options.rowErrors ?? 'fail',
    postprocess: postprocessDescriptor,
  };
  // Enough batches at each actor to keep its requests in flight while one batch waits on its slowest row.
  const batchesPerActor = Math.max(2, Math.ceil((2 * maxConcurrentRequests) / batchSize));
  return (dataset: Dataset) => {
    const input = preprocess ? dataset.map(preprocess) : dataset;
    return input.mapBatches(HttpRequestEngine, {
      constructorArgs: [engine],
      batchSize,
      batchFormat: 'rows',
      concurrency,
      numCpus,
      maxConcurrency: batchesPerActor,
      maxTasksInFlightPerActor: batchesPerActor,
    });
  };
}
