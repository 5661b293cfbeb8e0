/**
 * Progress displays of a running dataset job: bars per operator on a terminal, periodic plain
 * lines where output goes to a file or a log collector, or nothing. The executor calls update()
 * often, so reporters only remember the snapshot there and draw on their own schedule.
 */
import cliProgress from 'cli-progress';
import { InvalidArgumentError } from '../errors.js';
import { onProcessExit } from '../process-exit.js';
import type { JobProgress, OperatorProgress, ProgressReporter } from './progress-types.js';

export type { JobProgress, OperatorProgress, ProgressReporter } from './progress-types.js';

export type ProgressOption = boolean | 'auto' | ProgressReporter | undefined;

export interface ProgressReporterOptions {
  /** Plain-line reporter only: the least time between two blocks of lines. */
  intervalMs?: number;
}

const DEFAULT_INTERVAL_MS = 5000;
const INTERVAL_ENVIRONMENT_VARIABLE = 'TRELLIS_PROGRESS_INTERVAL_MS';
/** Every line written outside a terminal carries it, so progress can be grepped out of mixed logs. */
const LINE_PREFIX = '[data] ';
/** Terminal redraws per second: smooth enough to read, cheap enough to not compete with the job. */
const TERMINAL_FRAMES_PER_SECOND = 10;
/** Longer operator names are cut on a terminal so that the bars of all operators stay aligned. */
const MAXIMUM_NAME_WIDTH = 40;
const SHOW_CURSOR = '\x1B[?25h';

// Binary megabytes, as memory budgets are usually given in powers of two.
const BYTES_PER_MEGABYTE = 1024 * 1024;

export function createProgressReporter(
  option: ProgressOption,
  stream: NodeJS.WriteStream = process.stderr,
  options: ProgressReporterOptions = {},
): ProgressReporter {
  if (option === false) return new DisabledProgressReporter();
  if (typeof option === 'object' && option !== null) {
    if (typeof option.update !== 'function' || typeof option.finish !== 'function') {
      throw new InvalidArgumentError('progress: a reporter object needs update(progress) and finish(progress, error?) methods');
    }
    const interval = option.updateIntervalMs;
    if (interval !== undefined && (typeof interval !== 'number' || !Number.isFinite(interval) || interval < 5)) {
      throw new InvalidArgumentError(`progress: a reporter's updateIntervalMs must be a number of milliseconds of at least 5, got ${String(interval)}`);
    }
    return option;
  }
  if (option !== true && option !== 'auto' && option !== undefined) {
    throw new InvalidArgumentError(`progress takes true, false, 'auto' or a reporter object, got ${String(option)}`);
  }
  // A dumb terminal cannot move the cursor, so bars would pile up as garbage lines.
  if (stream.isTTY === true && process.env.TERM !== 'dumb') return new TerminalProgressReporter(stream);
  return new PlainLineProgressReporter(stream, resolveIntervalMs(options.intervalMs));
}

function resolveIntervalMs(intervalMs: number | undefined): number {
  if (intervalMs !== undefined) {
    if (!Number.isFinite(intervalMs) || intervalMs < 0) {
      throw new InvalidArgumentError(`progress intervalMs must be a finite number >= 0, got ${intervalMs}`);
    }
    return intervalMs;
  }
  const fromEnvironment = process.env[INTERVAL_ENVIRONMENT_VARIABLE];
  if (fromEnvironment !== undefined && fromEnvironment.trim() !== '') {
    const parsed = Number(fromEnvironment);
    // A typo in the environment must not fail a job over a cosmetic setting.
    if (Number.isFinite(parsed) && parsed >= 0) return parsed;
  }
  return DEFAULT_INTERVAL_MS;
}

// ---------------------------------------------------------------------------------------------
// Formatting

export function formatMegabytes(bytes: number): string {
  return (bytes / BYTES_PER_MEGABYTE).toFixed(1);
}

export function formatDuration(milliseconds: number): string {
  const totalSeconds = Math.max(0, milliseconds) / 1000;
  if (totalSeconds < 60) return `${totalSeconds.toFixed(1)}s`;
  const wholeSeconds = Math.floor(totalSeconds);
  const hours = Math.floor(wholeSeconds / 3600);
  const minutes = Math.floor((wholeSeconds % 3600) / 60);
  const seconds = wholeSeconds % 60;
  if (hours > 0) return `${hours}h${String(minutes).padStart(2, '0')}m`;
  return `${minutes}m${String(seconds).padStart(2, '0')}s`;
}

function formatRate(rowsPerSecond: number): string {
  // Decimals only help while the rate is small enough for them to matter.
  return rowsPerSecond >= 100 ? String(Math.round(rowsPerSecond)) : rowsPerSecond.toFixed(1);
}

function formatCount(done: number, total: number | undefined, unit: string): string {
  return total === undefined ? `${done} ${unit}` : `${done}/${total} ${unit}`;
}

/**
 * Everything of an operator's line after its name; with `elapsedMs` (the job's), counters an
 * actor pool's class reports get a rate beside them.
 */
export function formatOperatorDetails(operator: OperatorProgress, elapsedMs?: number): string {
  const parts = [formatCount(operator.rowsDone, operator.rowsTotal, 'rows'), formatCount(operator.blocksDone, operator.blocksTotal, 'blocks')];
  if (operator.done) {
    parts.push('done');
  } else {
    if (operator.phase) parts.push(operator.phase);
    parts.push(`${operator.activeTasks} active`, `${operator.queuedTasks} queued`);
    if (operator.actors) {
      const { running, pending, min, max } = operator.actors;
      parts.push(`actors ${running} running/${pending} pending of [${min}, ${max}]`);
    }
  }
  parts.push(`store ${formatMegabytes(operator.storeBytes)} MB`);
  for (const [name, value] of Object.entries(operator.metrics ?? {})) {
    const seconds = (elapsedMs ?? 0) / 1000;
    parts.push(seconds > 0 ? `${name} ${formatMetric(value)} (${formatRate(value / seconds)}/s)` : `${name} ${formatMetric(value)}`);
  }
  // A finished operator starts nothing more, so a stale reason would only mislead.
  if (!operator.done && operator.backpressure) parts.push(`backpressured: ${operator.backpressure}`);
  return parts.join(', ');
}

/** e.g. `Read->Map(tokenize): 400/1000 rows, 80/200 blocks, 3 active, 10 queued, store 12.5 MB` */
export function formatOperatorLine(operator: OperatorProgress, elapsedMs?: number): string {
  return `${operator.name}: ${formatOperatorDetails(operator, elapsedMs)}`;
}

/** Whole counts as they are, others to three significant digits. */
function formatMetric(value: number): string {
  return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(3)));
}

/** e.g. `Dataset.write: 12.0s elapsed, 400 rows out, 33.3 rows/s, store 12.5/512.0 MB` */
export function formatSummary(progress: JobProgress): string {
  const seconds = progress.elapsedMs / 1000;
  const rows = progress.rowsWritten ?? progress.rowsOut;
  const rate = seconds > 0 ? rows / seconds : 0;
  const store =
    progress.budgetBytes > 0
      ? `store ${formatMegabytes(progress.storeBytes)}/${formatMegabytes(progress.budgetBytes)} MB`
      : `store ${formatMegabytes(progress.storeBytes)} MB`;
  return `${progress.job}: ${formatDuration(progress.elapsedMs)} elapsed, ${rows} rows ${progress.rowsWritten === undefined ? 'out' : 'written'}, ${formatRate(rate)} rows/s, ${store}`;
}

export function formatFailure(progress: JobProgress, error: Error): string {
  return `${progress.job} failed: ${error.message}`;
}

/**
 * How far an operator is, from 0 to 1, or undefined when nothing tells: rows when their total is
 * known, else blocks.
 */
export function operatorFraction(operator: OperatorProgress): number | undefined {
  if (operator.done) return 1;
  const fraction = (done: number, total: number): number => (total > 0 ? Math.min(1, Math.max(0, done / total)) : 0);
  if (operator.rowsTotal !== undefined) return fraction(operator.rowsDone, operator.rowsTotal);
  if (operator.blocksTotal !== undefined) return fraction(operator.blocksDone, operator.blocksTotal);
  return undefined;
}

const FILLED = '\u2588';
const EMPTY = '\u2591';
const INDETERMINATE_BLOCK_WIDTH = 3;

/**
 * A bar of `width` characters. Without a fraction, a short block bounces across the bar, moved by
 * `tick`, so that a running operator of unknown size still visibly lives.
 */
export function formatBar(fraction: number | undefined, width: number, tick = 0): string {
  if (fraction !== undefined) {
    const filled = Math.round(Math.min(1, Math.max(0, fraction)) * width);
    return FILLED.repeat(filled) + EMPTY.repeat(width - filled);
  }
  const block = Math.min(INDETERMINATE_BLOCK_WIDTH, width);
  const travel = width - block;
  if (travel === 0) return FILLED.repeat(block);
  const phase = Math.abs(Math.trunc(tick)) % (2 * travel);
  const position = phase <= travel ? phase : 2 * travel - phase;
  return EMPTY.repeat(position) + FILLED.repeat(block) + EMPTY.repeat(travel - position);
}

function fitName(name: string, width: number): string {
  if (name.length > width) return `${name.slice(0, Math.max(0, width - 1))}\u2026`;
  return name.padEnd(width);
}

// ---------------------------------------------------------------------------------------------
// Reporters

class DisabledProgressReporter implements ProgressReporter {
  update(): void {}
  finish(): void {}
}

/** Writes a block of lines at most every intervalMs, and always the final state. */
class PlainLineProgressReporter implements ProgressReporter {
  private pending: JobProgress | undefined;
  // Counting from creation keeps short jobs to a single final block instead of an all-zero one too.
  private lastWriteAt = Date.now();
  private timer: NodeJS.Timeout | undefined;
  private finished = false;
  /** Warnings of the job already written. */
  private warned = 0;

  constructor(
    private readonly stream: NodeJS.WritableStream,
    private readonly intervalMs: number,
  ) {}

  update(progress: JobProgress): void {
    if (this.finished) return;
    this.pending = progress;
    const now = Date.now();
    const dueAt = this.lastWriteAt + this.intervalMs;
    if (now >= dueAt) {
      this.flush(now);
      return;
    }
    // A timer rather than waiting for the next update: a stalled job still shows its last state.
    if (this.timer === undefined) {
      this.timer = setTimeout(() => {
        this.timer = undefined;
        this.flush(Date.now());
      }, dueAt - now);
      this.timer.unref();
    }
  }

  finish(progress: JobProgress, error?: Error): void {
    if (this.finished) return;
    this.finished = true;
    if (this.timer !== undefined) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    this.pending = undefined;
    let text = this.block(progress);
    if (error) text += `${LINE_PREFIX}${formatFailure(progress, error)}\n`;
    this.stream.write(text);
  }

  private flush(now: number): void {
    if (this.pending === undefined) return;
    const progress = this.pending;
    this.pending = undefined;
    this.lastWriteAt = now;
    this.stream.write(this.block(progress));
  }

  private block(progress: JobProgress): string {
    // One write per block, so that lines of one snapshot stay together among other processes' logs.
    let text = '';
    for (; this.warned < progress.warnings.length; this.warned++) text += `${LINE_PREFIX}warning: ${progress.warnings[this.warned]}\n`;
    text += `${LINE_PREFIX}${formatSummary(progress)}\n`;
    for (const operator of progress.operators) text += `${LINE_PREFIX}${formatOperatorLine(operator, progress.elapsedMs)}\n`;
    return text;
  }
}

/**
 * A cli-progress MultiBar: a summary line, then one line per operator in the executor's order.
 * Each line is formatted from the latest snapshot when MultiBar redraws (at most
 * TERMINAL_FRAMES_PER_SECOND times a second), so update() only stores the snapshot.
 */
class TerminalProgressReporter implements ProgressReporter {
  private readonly multiBar: cliProgress.MultiBar;
  /** The summary's bar first, then operators' bars by index. */
  private readonly bars: cliProgress.SingleBar[] = [];
  private latest: JobProgress | undefined;
  private nameWidthOf: JobProgress | undefined;
  private nameWidth = 0;
  private finished = false;
  /** Warnings of the job already printed. */
  private warned = 0;
  private readonly restoreCursorAtExit = (): void => {
    // A process that exits mid-job, or is interrupted (Ctrl-C), must not leave the user's shell
    // without a cursor.
    this.stream.write(`${SHOW_CURSOR}\n`);
  };
  private forgetCursorRestore: (() => void) | undefined;

  constructor(private readonly stream: NodeJS.WriteStream) {
    this.multiBar = new cliProgress.MultiBar({
      stream,
      fps: TERMINAL_FRAMES_PER_SECOND,
      hideCursor: true,
      // Lines are cut to the terminal width rather than relying on switching autowrap off, which a
      // crash would leave off.
      linewrap: true,
      clearOnComplete: false,
      stopOnComplete: false,
      // cli-progress would install SIGINT/SIGTERM listeners, and a listener stops Ctrl-C from
      // ending the process.
      gracefulExit: false,
    });
    // MultiBar keeps rescheduling its redraw timer; unreferenced, it never holds the process open.
    const unreferenceTimer = (): void => {
      (this.multiBar as unknown as { timer?: NodeJS.Timeout | null }).timer?.unref?.();
    };
    this.multiBar.on('start', unreferenceTimer);
    this.multiBar.on('update-post', unreferenceTimer);
  }

  update(progress: JobProgress): void {
    if (this.finished) return;
    this.latest = progress;
    this.ensureBars(progress.operators.length);
    this.logWarnings(progress);
  }

  /** New warnings, printed above the bars (MultiBar redraws them below). */
  private logWarnings(progress: JobProgress): void {
    for (; this.warned < progress.warnings.length; this.warned++) this.multiBar.log(`warning: ${progress.warnings[this.warned]}\n`);
  }

  finish(progress: JobProgress, error?: Error): void {
    if (this.finished) return;
    this.latest = progress;
    this.ensureBars(progress.operators.length);
    this.logWarnings(progress);
    this.finished = true;
    // Draws every line a last time from the final snapshot, shows the cursor and moves below the bars.
    this.multiBar.stop();
    this.forgetCursorRestore?.();
    if (error) this.stream.write(`${formatFailure(progress, error)}\n`);
  }

  private ensureBars(operatorCount: number): void {
    if (this.bars.length === 0) {
      this.bars.push(this.createBar((maxWidth) => (this.latest ? formatSummary(this.latest) : '').slice(0, maxWidth)));
      this.forgetCursorRestore = onProcessExit(this.restoreCursorAtExit);
    }
    while (this.bars.length - 1 < operatorCount) {
      const index = this.bars.length - 1;
      this.bars.push(this.createBar((maxWidth) => this.formatOperatorRow(index, maxWidth)));
    }
  }

  private createBar(render: (maxWidth: number) => string): cliProgress.SingleBar {
    // The bar's own value and total stay unused: every row is rendered from the latest snapshot.
    return this.multiBar.create(1, 0, undefined, {
      // One column is left free: writing the last column makes some terminals wrap early.
      format: (_options, parameters) => render(Math.max(1, parameters.maxWidth - 1)),
    });
  }

  private formatOperatorRow(index: number, maxWidth: number): string {
    const progress = this.latest;
    const operator = progress?.operators[index];
    if (!progress || !operator) return '';
    const nameWidth = this.nameWidthFor(progress);
    const barWidth = maxWidth >= 160 ? 30 : maxWidth >= 100 ? 20 : 10;
    const tick = Math.floor(Date.now() / (1000 / TERMINAL_FRAMES_PER_SECOND));
    const bar = formatBar(operatorFraction(operator), barWidth, tick);
    return `${fitName(operator.name, nameWidth)} ${bar} ${formatOperatorDetails(operator, progress.elapsedMs)}`.slice(0, maxWidth);
  }

  /** Computed once per snapshot, not once per row. */
  private nameWidthFor(progress: JobProgress): number {
    if (this.nameWidthOf !== progress) {
      this.nameWidthOf = progress;
      let widest = 0;
      for (const operator of progress.operators) widest = Math.max(widest, operator.name.length);
      this.nameWidth = Math.min(widest, MAXIMUM_NAME_WIDTH);
    }
    return this.nameWidth;
  }
}
