/** What the streaming executor reports of a running job, for progress displays and stats. */

export interface OperatorProgress {
  /** The physical operator, with fused stages joined by '->', e.g. 'ReadNumbers->Map(tokenize)'. */
  name: string;
  rowsDone: number;
  /** Known when the source gave row counts and no operator changes them unpredictably. */
  rowsTotal?: number;
  blocksDone: number;
  blocksTotal?: number;
  activeTasks: number;
  queuedTasks: number;
  /** Actor pools only. */
  actors?: { running: number; pending: number; min: number; max: number };
  /** Bytes of this operator's outputs held in the object store, not yet consumed downstream. */
  storeBytes: number;
  /** Why the operator may not start more work now, e.g. 'memory budget' or 'output queue full'. */
  backpressure?: string;
  /** Operators that run in phases (sort, shuffle, groupBy, join, zip): the current one, e.g. 'sampling keys'. */
  phase?: string;
  /**
   * Actor pools whose class reports counters (a `metrics()` method, e.g. an LLM engine's
   * generated tokens): each counter summed over the pool's actors, those gone included.
   */
  metrics?: Record<string, number>;
  /**
   * Its finished tasks (or actor calls): how many, the time each took from launch to result
   * (queueing for a worker included), and from the first launch to the last result.
   */
  taskTime?: { tasks: number; totalMs: number; meanMs: number; maxMs: number; spanMs: number };
  done: boolean;
}

export interface JobProgress {
  /** e.g. 'Dataset.write' */
  job: string;
  elapsedMs: number;
  operators: OperatorProgress[];
  /** Bytes of the job's blocks in the store now, and the budget they are held under. */
  storeBytes: number;
  budgetBytes: number;
  rowsOut: number;
  /** A write job: rows its sink has written (its rows go there, not out to a consumer). */
  rowsWritten?: number;
  /**
   * What the job warned of so far, oldest first (an actor died and its batch is retried, a block
   * skipped under maxErroredBlocks, an actor retiring from a node taken back): the reporters
   * show each once.
   */
  warnings: readonly string[];
}

/** Draws progress: a terminal display, periodic plain lines, or nothing. */
export interface ProgressReporter {
  /**
   * How often update() is wanted (ms; default: four times a second, or more often with a short
   * stall timeout). At least 5: the executor schedules and autoscales on the same tick.
   */
  readonly updateIntervalMs?: number;
  update(progress: JobProgress): void;
  /** The last state; draws a final line and releases the terminal. */
  finish(progress: JobProgress, error?: Error): void;
}
