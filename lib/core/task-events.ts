/**
 * What the driver remembers of tasks and actor calls for listTasks() and timeline() (as Ray's
 * state API and `ray.timeline()`): every call not yet ended, and the last ones that ended (10,000
 * by default: init's `keepEndedTasks`), each with its attempts — where each ran, when, and how it
 * ended. Run times come from the workers (from a call's start there to its result, not its wait in
 * the worker's queue); the timeline is in Chrome's trace event format, for Perfetto or
 * chrome://tracing.
 */
import { writeFileSync } from 'node:fs';
import { InvalidArgumentError } from '../errors.js';

export type TaskState = 'waiting' | 'queued' | 'running' | 'finished' | 'failed' | 'cancelled';
const TASK_STATES: readonly TaskState[] = ['waiting', 'queued', 'running', 'finished', 'failed', 'cancelled'];

/** One run of a call on a worker. */
export interface TaskAttempt {
  /** 1 for the first run, 2 for the first retry, ... */
  attempt: number;
  nodeId: string;
  workerId: string;
  pid: number;
  /** When it began on its worker (ms since the epoch); for one still running, when it was sent there. */
  startedAt: number;
  /** Absent while it runs. */
  endedAt?: number;
  /** 'worker-died': its process died under it (the call is retried or fails). */
  outcome?: 'finished' | 'failed' | 'worker-died';
}

/** A task or actor call, as listTasks() reports it. */
export interface TaskInfo {
  taskId: string;
  /** The function, or `Class.method`. */
  name: string;
  kind: 'task' | 'actor-call';
  actorId?: string;
  /**
   * waiting: for its arguments; queued: for resources or a worker (or, for an actor call, its
   * actor); running: sent to its worker; then finished, failed or cancelled.
   */
  state: TaskState;
  /** When it was submitted (ms since the epoch). */
  submittedAt: number;
  endedAt?: number;
  attempts: TaskAttempt[];
  /** Why it failed or was cancelled. */
  error?: { name: string; message: string };
  /** Run again to make a lost result (lineage reconstruction). */
  recomputes?: boolean;
}

export interface ListTasksOptions {
  /** Only calls in these states. */
  state?: TaskState | readonly TaskState[];
  /** Only calls of this function or `Class.method`. */
  name?: string;
  /** Only this actor's calls. */
  actorId?: string;
  /** At most this many: the most recently submitted. */
  limit?: number;
}

/** The last `capacity` calls that ended, oldest first. */
export class EndedTasks {
  readonly #capacity: number;
  readonly #ring: TaskInfo[] = [];
  #next = 0;

  constructor(capacity: number) {
    this.#capacity = capacity;
  }

  /** Whether it keeps any (with none, callers need not describe what ended). */
  get keeps(): boolean {
    return this.#capacity > 0;
  }

  add(info: TaskInfo): void {
    if (this.#capacity === 0) return;
    if (this.#ring.length < this.#capacity) this.#ring.push(info);
    else {
      this.#ring[this.#next] = info;
      this.#next = (this.#next + 1) % this.#capacity;
    }
  }

  list(): TaskInfo[] {
    return this.#ring.length < this.#capacity ? [...this.#ring] : [...this.#ring.slice(this.#next), ...this.#ring.slice(0, this.#next)];
  }
}

/** Checks listTasks()'s options, naming what is wrong; returns a test for each call. */
export function taskFilter(options: ListTasksOptions): { accepts: (info: TaskInfo) => boolean; limit: number } {
  if (options === null || typeof options !== 'object') throw new InvalidArgumentError('listTasks: options must be an object');
  const states = options.state === undefined ? undefined : new Set(typeof options.state === 'string' ? [options.state] : options.state);
  for (const state of states ?? []) {
    if (!TASK_STATES.includes(state)) throw new InvalidArgumentError(`listTasks: state ${JSON.stringify(state)} is not one of ${TASK_STATES.join(', ')}`);
  }
  const limit = options.limit ?? Infinity;
  if (limit !== Infinity && (!Number.isInteger(limit) || limit < 0)) throw new InvalidArgumentError(`listTasks: limit must be a whole number of 0 or more, got ${String(options.limit)}`);
  if (options.name !== undefined && typeof options.name !== 'string') throw new InvalidArgumentError('listTasks: name must be a string');
  if (options.actorId !== undefined && typeof options.actorId !== 'string') throw new InvalidArgumentError('listTasks: actorId must be a string');
  return {
    accepts: (info) => (!states || states.has(info.state)) && (options.name === undefined || info.name === options.name) && (options.actorId === undefined || info.actorId === options.actorId),
    limit,
  };
}

/** One event of Chrome's trace event format (the fields trellis writes). */
export interface TraceEvent {
  name: string;
  ph: 'X' | 'M';
  pid: number;
  tid?: number;
  /** Microseconds since the epoch. */
  ts?: number;
  /** Microseconds. */
  dur?: number;
  cat?: string;
  args?: Record<string, unknown>;
}

/**
 * The attempts of `tasks` as a trace: one process per node, one thread per worker (its OS pid),
 * one span per attempt, named by its function or `Class.method`. An attempt still running ends at
 * `now`.
 */
export function traceEvents(tasks: readonly TaskInfo[], now: number): TraceEvent[] {
  const nodes = new Map<string, number>();
  const threads = new Map<string, { pid: number; tid: number; name: string }>();
  const spans: TraceEvent[] = [];
  for (const task of tasks) {
    for (const attempt of task.attempts) {
      let pid = nodes.get(attempt.nodeId);
      if (pid === undefined) nodes.set(attempt.nodeId, (pid = nodes.size + 1));
      const threadKey = `${attempt.nodeId}\u0000${attempt.workerId}`;
      if (!threads.has(threadKey)) threads.set(threadKey, { pid, tid: attempt.pid, name: `${task.actorId ? `actor ${task.actorId}` : 'worker'} ${attempt.workerId} (pid ${attempt.pid})` });
      const end = attempt.endedAt ?? now;
      spans.push({
        name: task.name,
        cat: task.kind,
        ph: 'X',
        pid,
        tid: attempt.pid,
        ts: Math.round(attempt.startedAt * 1000),
        dur: Math.max(0, Math.round((end - attempt.startedAt) * 1000)),
        args: {
          taskId: task.taskId,
          attempt: attempt.attempt,
          outcome: attempt.outcome ?? 'running',
          ...(task.actorId ? { actorId: task.actorId } : {}),
          ...(attempt.outcome === 'failed' && task.error ? { error: `${task.error.name}: ${task.error.message}` } : {}),
        },
      });
    }
  }
  const metadata: TraceEvent[] = [];
  for (const [nodeId, pid] of nodes) metadata.push({ name: 'process_name', ph: 'M', pid, args: { name: `node ${nodeId}` } });
  for (const { pid, tid, name } of threads.values()) metadata.push({ name: 'thread_name', ph: 'M', pid, tid, args: { name } });
  spans.sort((a, b) => a.ts! - b.ts!);
  return [...metadata, ...spans];
}

/** Writes a trace where Perfetto or chrome://tracing can open it. */
export function writeTrace(path: string, events: readonly TraceEvent[]): void {
  if (typeof path !== 'string' || path.length === 0) throw new InvalidArgumentError('timeline: path must be a file name');
  writeFileSync(path, JSON.stringify(events));
}
