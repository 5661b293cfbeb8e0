/** examples/structured-extraction.ts runs as the README says, and every row it finishes is JSON of its user's schema. */
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';

describe('the structured extraction example', () => {
  it('extracts JSON for two users with their own schemas and adapters', () => {
    const run = spawnSync(process.execPath, ['--import', 'tsx', 'examples/structured-extraction.ts'], { encoding: 'utf8', timeout: 120_000 });
    expect(run.status, run.stderr).toBe(0);
    const summary = /(\d+) rows on \w+ ranks, (\d+) complete JSON documents of their user's schema/.exec(run.stdout);
    expect(summary, run.stdout).not.toBeNull();
    expect(Number(summary![1])).toBe(24);
    // Rows cut by maxNewTokens are not complete; with these schemas and 96 tokens, all finish.
    expect(Number(summary![2])).toBe(24);
    const review = /reviews #1 \(stop\): (.*)/.exec(run.stdout);
    const value = JSON.parse(review![1]) as { sentiment: string; stars: number };
    expect(['positive', 'negative', 'neutral']).toContain(value.sentiment);
    expect(value.stars >= 1 && value.stars <= 5).toBe(true);
  });
});
