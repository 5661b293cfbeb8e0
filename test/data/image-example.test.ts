/** examples/image-batch-inference.ts runs as the README says: every photograph labeled by its colour, a thumbnail each. */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

describe('the image batch inference example', () => {
  it('labels 400 photographs, 100 of each colour, and writes a thumbnail per photograph', () => {
    const directory = mkdtempSync(join(tmpdir(), 'trellis-image-example-'));
    try {
      const run = spawnSync(process.execPath, ['--import', 'tsx', 'examples/image-batch-inference.ts', directory], { encoding: 'utf8', timeout: 180_000 });
      expect(run.status, run.stderr).toBe(0);
      expect(run.stdout).toMatch(/labeled 400 images in/);
      for (const color of ['blue', 'green', 'red', 'yellow']) expect(run.stdout).toMatch(new RegExp(`${color}\\s+100 images`));
      expect(readdirSync(join(directory, 'thumbnails')).filter((name) => name.endsWith('.jpg'))).toHaveLength(400);
    } finally {
      rmSync(directory, { recursive: true, force: true });
    }
  });
});
