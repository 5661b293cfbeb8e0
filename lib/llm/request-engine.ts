/**
 * What the batch processors that send each row to a service share (the HTTP processor, the
 * deployment processor): a pool's class that keeps many requests in flight across its batches,
 * paces their starts, retries what the service means as "later" with backoff, records or raises
 * what fails for good, and runs the user's postprocess before the rows become a block. A
 * transport says only how one attempt goes (RequestEngine.attempt).
 */
import { InvalidArgumentError, TrellisError } from '../errors.js';
import type { FunctionDescriptor } from '../core/protocol.js';
import type { Dataset } from '../data/dataset.js';
import type { Row } from '../data/block.js';
import { loadUdf, resolveUdf, type RowFunction } from '../data/udf.js';
import { checkRowResult } from '../data/stages.js';
import { RequestPacer, RequestSlots, retryDelayMs } from './request-pacing.js';

/** The options every request processor takes, besides its transport's. */
export interface RequestProcessorOptions {
  /** The column holding each row's payload (default 'payload'); `preprocess` usually makes it. A row whose payload is null or missing fails (ERR_HTTP_PAYLOAD, or ERR_REQUEST_PAYLOAD by handle). */
  payloadColumn?: string;
  /** Each row before its request (a registered function, as for `map`): builds the payload. */
  preprocess?: RowFunction;
  /**
   * Each row after its answer (a registered function): reads what it needs out of the response.
   * It runs in the actor, on the row as the answer left it, before the rows become a block:
   * answers of different shapes (a field a number here, a string there) need only agree once
   * postprocessed.
   */
  postprocess?: RowFunction;
  /** Actors sending the requests (default 1). */
  concurrency?: number;
  /** Requests one actor keeps in flight at once, over all its batches (default 32). */
  maxConcurrentRequests?: number;
  /**
   * Requests per second the whole processor starts at most (each of `concurrency` actors paces its
   * share), first attempts and retries together. Unset: as fast as the requests in flight allow.
   */
  qps?: number;
  /** Attempts after the first for what the service means as "later" (default 3). */
  maxRetries?: number;
  /** The first retry's wait (ms, default 500), doubled each attempt, jittered; a wait the service names wins. */
  retryBaseDelayMs?: number;
  /** The longest wait before a retry (ms, default 60 s). */
  maxRetryDelayMs?: number;
  /**
   * 'fail' (default): a row whose request fails for good fails the job, naming the row and the
   * failure. 'record': the row is kept with its response null and the failure in an `error` column
   * (null on rows that succeeded).
   */
  rowErrors?: 'fail' | 'record';
  /** Rows per batch handed to an actor (default 64). */
  batchSize?: number;
  /** CPUs each actor holds (default 0: it waits on the service; give it some where answers are large to parse). */
  numCpus?: number;
}

/** How a request engine runs, as the driver resolved it; a transport's own options ride along. */
export interface RequestEngineOptions {
  payloadColumn: string;
  responseColumn: string;
  maxConcurrentRequests: number;
  /** This actor's share of the processor's qps (requests per second), or 0 for no limit. */
  actorQps: number;
  maxRetries: number;
  retryBaseDelayMs: number;
  maxRetryDelayMs: number;
  rowErrors: 'fail' | 'record';
  /** The registered postprocess function, run on each row before its batch returns. */
  postprocess: FunctionDescriptor | null;
}

/**
 * How one attempt went: an answer (with the status a transport reports beside it, if any), or a
 * failure that is retried (after `retryAfterMs` where the service named a wait; `slowDown` when
 * the service said it is overwhelmed, which holds back the actor's every start) or final.
 */
export type AttemptOutcome = (
  | { response: unknown; status?: number }
  | { error: TrellisError & { status?: number }; retry: boolean; retryAfterMs?: number; slowDown?: boolean }
) & {
  /** The service's word that no request should start for this long (its rate limit spent): the actor's every start waits. */
  holdMs?: number;
};

/** A pool's class that sends each row's payload by `attempt`, as the processor's options say. */
export abstract class RequestEngine {
  readonly ready: Promise<void>;
  protected readonly engineOptions: RequestEngineOptions;
  #postprocess: ((row: Row) => Row | Promise<Row>) | undefined;
  readonly #slots: RequestSlots;
  readonly #pacer: RequestPacer;
  readonly #counters = { requests: 0, retries: 0, throttled: 0, failedRows: 0 };

  constructor(options: RequestEngineOptions) {
    this.engineOptions = options;
    this.#slots = new RequestSlots(options.maxConcurrentRequests);
    this.#pacer = new RequestPacer(options.actorQps > 0 ? options.actorQps : Infinity);
    this.ready = (async () => {
      await this.prepare();
      if (options.postprocess) this.#postprocess = (await loadUdf(options.postprocess)) as (row: Row) => Row | Promise<Row>;
    })();
  }

  /** Work before the first batch (a transport's own set-up). */
  protected async prepare(): Promise<void> {}

  /** One attempt at `payload` (batch row `index`, attempt `attempt` from 0); it must not throw. */
  protected abstract attempt(payload: unknown, index: number, attempt: number): Promise<AttemptOutcome>;

  /** A failure before any attempt: a row with nothing to send. */
  protected abstract payloadError(message: string): TrellisError;

  /** Counters since the actor started, for the data layer's progress lines (summed over the pool). */
  metrics(): Record<string, number> {
    return { ...this.#counters };
  }

  async call(rows: Row[]): Promise<Row[]> {
    await this.ready;
    const { responseColumn, rowErrors } = this.engineOptions;
    const record = rowErrors === 'record';
    // Every row's request settles before the batch answers: none is left running behind a failure.
    const outcomes = await Promise.all(rows.map((row, index) => this.#send(row, index)));
    if (!record) {
      const failed = outcomes.find((outcome): outcome is { error: TrellisError & { status?: number } } => 'error' in outcome);
      if (failed) throw failed.error;
    }
    const answered = rows.map((row, index): Row => {
      const outcome = outcomes[index];
      if ('error' in outcome) return { ...row, [responseColumn]: null, ...this.statusColumn(outcome.error.status ?? null), error: `${outcome.error.code}: ${outcome.error.message}` };
      return { ...row, [responseColumn]: outcome.response, ...this.statusColumn(outcome.status ?? null), ...(record ? { error: null } : {}) };
    });
    const postprocess = this.#postprocess;
    if (!postprocess) return answered;
    const out: Row[] = [];
    const name = `postprocess ${postprocess.name || '(anonymous)'}`;
    for (const row of answered) out.push(checkRowResult('map', name, await postprocess(row)) as Row);
    return out;
  }

  /** The column a transport reports each answer's status in (the HTTP status), or none. */
  protected statusColumn(_status: number | null): Row {
    return {};
  }

  /** One row's request, retried as the options say; never throws. */
  async #send(row: Row, index: number): Promise<{ response: unknown; status?: number } | { error: TrellisError & { status?: number } }> {
    const { payloadColumn, maxRetries, retryBaseDelayMs, maxRetryDelayMs } = this.engineOptions;
    const payload = row[payloadColumn];
    if (payload === undefined || payload === null) {
      this.#counters.failedRows++;
      return { error: this.payloadError(`batch row ${index} has no '${payloadColumn}' to send (make one in preprocess)`) };
    }
    for (let attempt = 0; ; attempt++) {
      await this.#slots.acquire();
      let outcome: AttemptOutcome;
      try {
        await this.#pacer.next();
        this.#counters.requests++;
        outcome = await this.attempt(payload, index, attempt);
        // Before the slot passes on: the request that takes it must wait too.
        if (outcome.holdMs !== undefined && outcome.holdMs > 0) this.#pacer.holdFor(outcome.holdMs);
      } finally {
        this.#slots.release();
      }
      if (!('error' in outcome)) return outcome;
      if (outcome.slowDown) this.#counters.throttled++;
      if (!outcome.retry || attempt >= maxRetries) {
        this.#counters.failedRows++;
        return { error: outcome.error };
      }
      this.#counters.retries++;
      const delay = retryDelayMs(attempt, retryBaseDelayMs, maxRetryDelayMs, outcome.retryAfterMs);
      // A service that says "slow down" means it for every request: the actor's pace waits with this one.
      if (outcome.slowDown) this.#pacer.holdFor(delay);
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
}

/** Checks a number option of `processor`: positive (or >= 0), whole where `integer`. */
export function checkNumberOption(processor: string, value: unknown, name: string, integer: boolean, allowZero = false, code = 'ERR_INVALID_ARGUMENT'): void {
  if (value === undefined) return;
  const ok = typeof value === 'number' && Number.isFinite(value) && (allowZero ? value >= 0 : value > 0) && (!integer || Number.isInteger(value));
  if (!ok) throw new InvalidArgumentError(`${processor}: ${name} must be a ${integer ? 'whole number' : 'number'} ${allowZero ? '>= 0' : '> 0'}, got ${JSON.stringify(value)}`, code);
}

/** The options RequestProcessorOptions names, for a processor's check of unknown ones. */
export const REQUEST_PROCESSOR_OPTIONS: readonly string[] = [
  'payloadColumn', 'preprocess', 'postprocess', 'concurrency', 'maxConcurrentRequests', 'qps', 'maxRetries', 'retryBaseDelayMs', 'maxRetryDelayMs', 'rowErrors', 'batchSize', 'numCpus',
];

/**
 * Checks the shared options and resolves them into an engine's (less the transport's own), for a
 * processor named `processor` whose answers go to `responseColumn` unless the options name one.
 */
export function resolveRequestOptions(processor: string, options: RequestProcessorOptions & { responseColumn?: string }, responseColumn: string, code: string): RequestEngineOptions {
  for (const name of ['payloadColumn', 'responseColumn'] as const) {
    if (options[name] !== undefined && (typeof options[name] !== 'string' || options[name].length === 0)) throw new InvalidArgumentError(`${processor}: ${name} must be a column name, got ${JSON.stringify(options[name])}`, code);
  }
  checkNumberOption(processor, options.concurrency, 'concurrency', true, false, code);
  checkNumberOption(processor, options.maxConcurrentRequests, 'maxConcurrentRequests', true, false, code);
  checkNumberOption(processor, options.qps, 'qps', false, false, code);
  checkNumberOption(processor, options.maxRetries, 'maxRetries', true, true, code);
  checkNumberOption(processor, options.retryBaseDelayMs, 'retryBaseDelayMs', false, true, code);
  checkNumberOption(processor, options.maxRetryDelayMs, 'maxRetryDelayMs', false, true, code);
  checkNumberOption(processor, options.batchSize, 'batchSize', true, false, code);
  checkNumberOption(processor, options.numCpus, 'numCpus', false, true, code);
  if (options.rowErrors !== undefined && options.rowErrors !== 'fail' && options.rowErrors !== 'record') throw new InvalidArgumentError(`${processor}: rowErrors must be 'fail' or 'record', got ${JSON.stringify(options.rowErrors)}`, code);
  let postprocess: FunctionDescriptor | null = null;
  if (options.postprocess !== undefined) {
    const spec = resolveUdf(options.postprocess, `${processor} postprocess`);
    if (spec.kind !== 'function') throw new InvalidArgumentError(`${processor}: postprocess must be a function (a row in, a row out), not a class`, code);
    postprocess = spec.descriptor;
  }
  return {
    payloadColumn: options.payloadColumn ?? 'payload',
    responseColumn: options.responseColumn ?? responseColumn,
    maxConcurrentRequests: options.maxConcurrentRequests ?? 32,
    actorQps: options.qps !== undefined ? options.qps / (options.concurrency ?? 1) : 0,
    maxRetries: options.maxRetries ?? 3,
    retryBaseDelayMs: options.retryBaseDelayMs ?? 500,
    maxRetryDelayMs: options.maxRetryDelayMs ?? 60_000,
    rowErrors: options.rowErrors ?? 'fail',
    postprocess,
  };
}

/** The processor: `preprocess` as a map, then the engine's actor pool. */
export function requestProcessor(engine: new (options: never) => RequestEngine, engineOptions: RequestEngineOptions, options: RequestProcessorOptions): (dataset: Dataset) => Dataset {
  const { preprocess, concurrency = 1, batchSize = 64, numCpus = 0 } = options;
  // Enough batches at each actor to keep its requests in flight while one batch waits on its slowest row.
  const batchesPerActor = Math.max(2, Math.ceil((2 * engineOptions.maxConcurrentRequests) / batchSize));
  return (dataset: Dataset) => {
    const input = preprocess ? dataset.map(preprocess) : dataset;
    return input.mapBatches(engine, {
      constructorArgs: [engineOptions],
      batchSize,
      batchFormat: 'rows',
      concurrency,
      numCpus,
      maxConcurrency: batchesPerActor,
      maxTasksInFlightPerActor: batchesPerActor,
    });
  };
}
