/** examples/work-queue.ts runs as the README says: every item handled once, counted by the metrics, traced. */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

describe('the work queue example', () => {
  it('drains 120 items through a bounded queue, with stats, metrics and a trace', () => {
    const directory = mkdtempSync(join(tmpdir(), 'trellis-work-queue-'));
    try {
      const trace = join(directory, 'trace.json');
      const run = spawnSync(process.execPath, ['--import', 'tsx', 'examples/work-queue.ts', trace], { encoding: 'utf8', timeout: 120_000 });
      expect(run.status, run.stderr).toBe(0);
      expect(run.stdout).toMatch(/while draining a: \d+, b: \d+/);
      const handled = /handled \[ (\d+), (\d+) \] total (\d+)/.exec(run.stdout);
      expect(handled, run.stdout).not.toBeNull();
      expect(Number(handled![3])).toBe(120);
      // The metrics say what the workers said.
      const counted = (worker: string) => Number(new RegExp(`example_items_handled_total\\{worker="${worker}"\\} (\\d+)`).exec(run.stdout)?.[1]);
      expect([counted('a'), counted('b')]).toEqual([Number(handled![1]), Number(handled![2])]);
      const spans = (JSON.parse(readFileSync(trace, 'utf8')) as Array<{ ph: string; name: string }>).filter((event) => event.ph === 'X');
      expect(spans.filter((span) => span.name === 'QueueActor.get')).toHaveLength(122);
      expect(spans.filter((span) => span.name === 'Worker.drain')).toHaveLength(2);
    } finally {
      rmSync(directory, { recursive: true, force: true });
    }
  });
});
