import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import {
  createProgressReporter,
  formatBar,
  formatDuration,
  formatOperatorLine,
  formatSummary,
  operatorFraction,
} from '../../lib/data/progress.js';
import type { JobProgress, OperatorProgress, ProgressReporter } from '../../lib/data/progress-types.js';

const MEGABYTE = 1024 * 1024;

function operator(overrides: Partial<OperatorProgress> = {}): OperatorProgress {
  return {
    name: 'Read->Map(tokenize)',
    rowsDone: 400,
    rowsTotal: 1000,
    blocksDone: 80,
    blocksTotal: 200,
    activeTasks: 3,
    queuedTasks: 10,
    storeBytes: 12.5 * MEGABYTE,
    done: false,
    ...overrides,
  };
}

function job(overrides: Partial<JobProgress> = {}): JobProgress {
  return {
    job: 'Dataset.write',
    elapsedMs: 12_000,
    operators: [operator(), operator({ name: 'Write', rowsDone: 100, rowsTotal: undefined, blocksDone: 20, blocksTotal: undefined, storeBytes: 0 })],
    storeBytes: 12.5 * MEGABYTE,
    budgetBytes: 512 * MEGABYTE,
    rowsOut: 400,
    warnings: [],
    ...overrides,
  };
}

/** Collects what a reporter writes; enough of a stream for reporters and cli-progress. */
class FakeStream {
  readonly chunks: string[] = [];
  columns = 120;
  rows = 40;
  constructor(readonly isTTY: boolean) {}
  write(chunk: string | Uint8Array, encodingOrCallback?: unknown, callback?: unknown): boolean {
    this.chunks.push(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString());
    const done = typeof encodingOrCallback === 'function' ? encodingOrCallback : callback;
    if (typeof done === 'function') (done as () => void)();
    return true;
  }
  cursorTo(): boolean {
    return true;
  }
  moveCursor(): boolean {
    return true;
  }
  clearLine(): boolean {
    return true;
  }
  clearScreenDown(): boolean {
    return true;
  }
  getWindowSize(): [number, number] {
    return [this.columns, this.rows];
  }
  get text(): string {
    return this.chunks.join('');
  }
  asWriteStream(): NodeJS.WriteStream {
    return this as unknown as NodeJS.WriteStream;
  }
}

/** The text a terminal would show for these lines, with the control sequences taken out. */
function visible(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/\x1B\[[0-9;?]*[A-Za-z]/g, '');
}

describe('formatOperatorLine', () => {
  it("shows the counters an actor pool's class reports, with a rate over the job's time when given", () => {
    const line = formatOperatorLine(operator({ name: 'MapBatches(LLMEngine)', metrics: { generatedTokens: 1200, meanBatch: 12.3456 } }), 10_000);
    expect(line).toMatch(/generatedTokens 1200 \(120\/s\), meanBatch 12\.3 \(1\.2\/s\)/);
    expect(formatOperatorLine(operator({ metrics: { generatedTokens: 5 } }))).toMatch(/generatedTokens 5$/);
  });

  it('shows rows and blocks against their totals, tasks and store use', () => {
    expect(formatOperatorLine(operator())).toBe('Read->Map(tokenize): 400/1000 rows, 80/200 blocks, 3 active, 10 queued, store 12.5 MB');
  });

  it('shows counts alone when totals are unknown', () => {
    const line = formatOperatorLine(operator({ rowsTotal: undefined, blocksTotal: undefined, storeBytes: 0 }));
    expect(line).toBe('Read->Map(tokenize): 400 rows, 80 blocks, 3 active, 10 queued, store 0.0 MB');
  });

  it('shows an actor pool as running/pending of [min, max]', () => {
    const line = formatOperatorLine(operator({ name: 'MapBatches(Embed)', actors: { running: 2, pending: 1, min: 1, max: 4 } }));
    expect(line).toContain('MapBatches(Embed): ');
    expect(line).toContain('3 active, 10 queued, actors 2 running/1 pending of [1, 4], store 12.5 MB');
  });

  it('says why an operator is backpressured, last', () => {
    const line = formatOperatorLine(operator({ backpressure: 'memory budget' }));
    expect(line).toBe('Read->Map(tokenize): 400/1000 rows, 80/200 blocks, 3 active, 10 queued, store 12.5 MB, backpressured: memory budget');
  });

  it('marks a finished operator done, without task counts, actors or backpressure', () => {
    const line = formatOperatorLine(
      operator({
        rowsDone: 1000,
        blocksDone: 200,
        activeTasks: 0,
        queuedTasks: 0,
        actors: { running: 0, pending: 0, min: 1, max: 4 },
        backpressure: 'output queue full',
        storeBytes: 2 * MEGABYTE,
        done: true,
      }),
    );
    expect(line).toBe('Read->Map(tokenize): 1000/1000 rows, 200/200 blocks, done, store 2.0 MB');
  });
});

describe('formatSummary', () => {
  it('shows elapsed time, rows out, rate and store use of the budget', () => {
    expect(formatSummary(job())).toBe('Dataset.write: 12.0s elapsed, 400 rows out, 33.3 rows/s, store 12.5/512.0 MB');
  });

  it('does not divide by a zero elapsed time, and leaves out a missing budget', () => {
    expect(formatSummary(job({ elapsedMs: 0, rowsOut: 0, storeBytes: 0, budgetBytes: 0 }))).toBe(
      'Dataset.write: 0.0s elapsed, 0 rows out, 0.0 rows/s, store 0.0 MB',
    );
  });

  it('rounds large rates and writes long durations in minutes and hours', () => {
    expect(formatSummary(job({ elapsedMs: 125_000, rowsOut: 250_000 }))).toContain('2m05s elapsed, 250000 rows out, 2000 rows/s');
    expect(formatDuration(3_725_000)).toBe('1h02m');
  });
});

describe('bars', () => {
  it('fills by rows, else by blocks, and not at all when nothing tells', () => {
    expect(operatorFraction(operator())).toBeCloseTo(0.4);
    expect(operatorFraction(operator({ rowsTotal: undefined }))).toBeCloseTo(0.4);
    expect(operatorFraction(operator({ rowsTotal: undefined, blocksDone: 50, blocksTotal: 100 }))).toBeCloseTo(0.5);
    expect(operatorFraction(operator({ rowsTotal: undefined, blocksTotal: undefined }))).toBeUndefined();
    expect(operatorFraction(operator({ rowsTotal: undefined, blocksTotal: undefined, done: true }))).toBe(1);
    expect(operatorFraction(operator({ rowsDone: 5, rowsTotal: 0 }))).toBe(0);
  });

  it('draws a fraction as filled cells and an unknown one as a moving block', () => {
    expect(formatBar(0.5, 10)).toBe('█████░░░░░');
    expect(formatBar(2, 4)).toBe('████');
    expect(formatBar(undefined, 6, 0)).toBe('███░░░');
    expect(formatBar(undefined, 6, 2)).toBe('░░███░');
    expect(formatBar(undefined, 6, 3)).toBe('░░░███');
    expect(formatBar(undefined, 6, 4)).toBe('░░███░');
    for (let tick = 0; tick < 20; tick++) expect(formatBar(undefined, 6, tick)).toHaveLength(6);
  });
});

describe('createProgressReporter', () => {
  const savedInterval = process.env.TRELLIS_PROGRESS_INTERVAL_MS;

  beforeEach(() => {
    delete process.env.TRELLIS_PROGRESS_INTERVAL_MS;
  });

  afterEach(() => {
    vi.useRealTimers();
    if (savedInterval === undefined) delete process.env.TRELLIS_PROGRESS_INTERVAL_MS;
    else process.env.TRELLIS_PROGRESS_INTERVAL_MS = savedInterval;
  });

  it('returns a reporter object the user gives as is', () => {
    const custom: ProgressReporter = { update: () => {}, finish: () => {} };
    expect(createProgressReporter(custom, new FakeStream(false).asWriteStream())).toBe(custom);
  });

  it('refuses options it does not know', () => {
    expect(() => createProgressReporter('yes' as unknown as boolean, new FakeStream(false).asWriteStream())).toThrow(/progress takes/);
    expect(() => createProgressReporter({} as ProgressReporter, new FakeStream(false).asWriteStream())).toThrow(/update/);
    expect(() => createProgressReporter({ update: () => {}, finish: () => {}, updateIntervalMs: 1 }, new FakeStream(false).asWriteStream())).toThrow(/updateIntervalMs/);
    expect(createProgressReporter({ update: () => {}, finish: () => {}, updateIntervalMs: 50 }, new FakeStream(false).asWriteStream()).updateIntervalMs).toBe(50);
    expect(() => createProgressReporter(true, new FakeStream(false).asWriteStream(), { intervalMs: -1 })).toThrow(/intervalMs/);
  });

  it('writes nothing when disabled, on a terminal or not, even on failure', () => {
    for (const isTTY of [false, true]) {
      const stream = new FakeStream(isTTY);
      const reporter = createProgressReporter(false, stream.asWriteStream(), { intervalMs: 0 });
      reporter.update(job());
      reporter.finish(job(), new Error('boom'));
      expect(stream.chunks).toEqual([]);
    }
  });

  describe('plain lines', () => {
    it('writes a summary and one line per operator on each update when the interval is 0', () => {
      const stream = new FakeStream(false);
      const reporter = createProgressReporter('auto', stream.asWriteStream(), { intervalMs: 0 });
      reporter.update(job());
      expect(stream.text).toBe(
        '[data] Dataset.write: 12.0s elapsed, 400 rows out, 33.3 rows/s, store 12.5/512.0 MB\n' +
          '[data] Read->Map(tokenize): 400/1000 rows, 80/200 blocks, 3 active, 10 queued, store 12.5 MB\n' +
          '[data] Write: 100 rows, 20 blocks, 3 active, 10 queued, store 0.0 MB\n',
      );
      reporter.update(job({ rowsOut: 500 }));
      expect(stream.chunks).toHaveLength(2);
      expect(stream.chunks[1]).toContain('500 rows out');
    });

    it('writes at most one block per interval, the latest state, and flushes a pending one by timer', () => {
      vi.useFakeTimers();
      const stream = new FakeStream(false);
      const reporter = createProgressReporter(undefined, stream.asWriteStream(), { intervalMs: 1000 });
      reporter.update(job({ rowsOut: 1 }));
      reporter.update(job({ rowsOut: 2 }));
      expect(stream.chunks).toEqual([]);
      vi.advanceTimersByTime(1000);
      expect(stream.chunks).toHaveLength(1);
      expect(stream.chunks[0]).toContain(' 2 rows out');
      reporter.update(job({ rowsOut: 3 }));
      vi.advanceTimersByTime(999);
      expect(stream.chunks).toHaveLength(1);
      vi.advanceTimersByTime(1);
      expect(stream.chunks).toHaveLength(2);
      expect(stream.chunks[1]).toContain(' 3 rows out');
      // Nothing new: the timer has nothing to write.
      vi.advanceTimersByTime(5000);
      expect(stream.chunks).toHaveLength(2);
      expect(vi.getTimerCount()).toBe(0);
    });

    it("writes each of the job's warnings once, before the lines of the state that first had it", () => {
      const stream = new FakeStream(false);
      const reporter = createProgressReporter('auto', stream.asWriteStream(), { intervalMs: 0 });
      reporter.update(job({ warnings: ['an actor died; block 3 is retried'] }));
      reporter.update(job({ warnings: ['an actor died; block 3 is retried', 'an actor retires from a node being taken back'] }));
      reporter.finish(job({ warnings: ['an actor died; block 3 is retried', 'an actor retires from a node being taken back'] }));
      const warnings = stream.text.split('\n').filter((line) => line.includes('warning: '));
      expect(warnings).toEqual(['[data] warning: an actor died; block 3 is retried', '[data] warning: an actor retires from a node being taken back']);
      expect(stream.chunks[1].startsWith('[data] warning: an actor retires')).toBe(true);
    });

    it('takes its interval from the environment when not given', () => {
      vi.useFakeTimers();
      process.env.TRELLIS_PROGRESS_INTERVAL_MS = '200';
      const stream = new FakeStream(false);
      const reporter = createProgressReporter(true, stream.asWriteStream());
      reporter.update(job());
      vi.advanceTimersByTime(199);
      expect(stream.chunks).toEqual([]);
      vi.advanceTimersByTime(1);
      expect(stream.chunks).toHaveLength(1);
    });

    it('always writes the final lines on finish, and nothing after', () => {
      vi.useFakeTimers();
      const stream = new FakeStream(false);
      const reporter = createProgressReporter('auto', stream.asWriteStream(), { intervalMs: 60_000 });
      reporter.update(job());
      const final = job({ rowsOut: 1000, operators: [operator({ rowsDone: 1000, blocksDone: 200, activeTasks: 0, queuedTasks: 0, done: true })] });
      reporter.finish(final);
      expect(stream.text).toBe(
        '[data] Dataset.write: 12.0s elapsed, 1000 rows out, 83.3 rows/s, store 12.5/512.0 MB\n' +
          '[data] Read->Map(tokenize): 1000/1000 rows, 200/200 blocks, done, store 12.5 MB\n',
      );
      expect(vi.getTimerCount()).toBe(0);
      reporter.update(job());
      reporter.finish(final);
      vi.advanceTimersByTime(120_000);
      expect(stream.chunks).toHaveLength(1);
    });

    it('adds an error line when the job failed', () => {
      const stream = new FakeStream(false);
      const reporter = createProgressReporter('auto', stream.asWriteStream(), { intervalMs: 60_000 });
      reporter.finish(job(), new Error('worker 3 died'));
      const lines = stream.text.trimEnd().split('\n');
      expect(lines).toHaveLength(4);
      expect(lines[3]).toBe('[data] Dataset.write failed: worker 3 died');
    });
  });

  describe('terminal', () => {
    it('draws a summary and a bar per operator, adds operators that appear later, and stops cleanly', () => {
      vi.useFakeTimers();
      const exitListeners = process.listenerCount('exit');
      const interruptListeners = process.listenerCount('SIGINT');
      const stream = new FakeStream(true);
      const reporter = createProgressReporter('auto', stream.asWriteStream());
      reporter.update(job({ operators: [operator()] }));
      // The cursor comes back however the process ends, Ctrl-C included.
      expect(process.listenerCount('SIGINT')).toBe(interruptListeners + 1);
      vi.advanceTimersByTime(250);
      const firstFrames = visible(stream.text);
      expect(firstFrames).toContain('Dataset.write: 12.0s elapsed');
      expect(firstFrames).toContain('Read->Map(tokenize) ');
      expect(firstFrames).toContain('400/1000 rows, 80/200 blocks, 3 active, 10 queued, store 12.5 MB');
      expect(firstFrames).not.toContain('Write');
      expect(stream.text).toContain('\x1B[?25l');

      reporter.update(job({ operators: [operator(), operator({ name: 'Write', rowsTotal: undefined, blocksTotal: undefined })] }));
      vi.advanceTimersByTime(250);
      expect(visible(stream.text)).toContain('Write');

      const final = job({
        rowsOut: 1000,
        operators: [operator({ rowsDone: 1000, blocksDone: 200, done: true }), operator({ name: 'Write', rowsDone: 1000, done: true })],
      });
      reporter.finish(final, new Error('sink closed'));
      const text = stream.text;
      expect(visible(text)).toContain('1000/1000 rows, 200/200 blocks, done');
      expect(text.lastIndexOf('\x1B[?25h')).toBeGreaterThan(text.lastIndexOf('\x1B[?25l'));
      expect(text.endsWith('Dataset.write failed: sink closed\n')).toBe(true);
      // No redraw timer left, no exit hook left, and later calls draw nothing.
      expect(vi.getTimerCount()).toBe(0);
      expect(process.listenerCount('exit')).toBe(exitListeners);
      expect(process.listenerCount('SIGINT')).toBe(interruptListeners);
      const written = stream.chunks.length;
      reporter.update(job());
      reporter.finish(final);
      vi.advanceTimersByTime(1000);
      expect(stream.chunks).toHaveLength(written);
    });

    it("prints each of the job's warnings once above the bars", () => {
      vi.useFakeTimers();
      const stream = new FakeStream(true);
      const reporter = createProgressReporter('auto', stream.asWriteStream());
      reporter.update(job({ warnings: ['an actor died; block 3 is retried'] }));
      vi.advanceTimersByTime(250);
      reporter.update(job({ warnings: ['an actor died; block 3 is retried'] }));
      vi.advanceTimersByTime(250);
      reporter.finish(job({ warnings: ['an actor died; block 3 is retried'] }));
      expect(visible(stream.text).split('warning: an actor died; block 3 is retried')).toHaveLength(2);
    });

    it('keeps every drawn line within the terminal width', () => {
      vi.useFakeTimers();
      const stream = new FakeStream(true);
      stream.columns = 60;
      const reporter = createProgressReporter(true, stream.asWriteStream());
      reporter.update(job({ operators: [operator({ name: 'A'.repeat(80), actors: { running: 2, pending: 1, min: 1, max: 4 } })] }));
      reporter.finish(job());
      for (const line of visible(stream.text).split('\n')) expect(line.length).toBeLessThan(60);
    });

    it('draws plain lines on a terminal that cannot move the cursor', () => {
      const savedTerm = process.env.TERM;
      process.env.TERM = 'dumb';
      try {
        const stream = new FakeStream(true);
        const reporter = createProgressReporter('auto', stream.asWriteStream(), { intervalMs: 0 });
        reporter.update(job());
        expect(stream.text.startsWith('[data] Dataset.write: ')).toBe(true);
        reporter.finish(job());
      } finally {
        if (savedTerm === undefined) delete process.env.TERM;
        else process.env.TERM = savedTerm;
      }
    });
  });
});
