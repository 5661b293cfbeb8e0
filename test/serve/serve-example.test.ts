/** examples/serve-llm.ts runs as the README says: answers, a stream, a schema kept, and scaling up and down. */
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';

describe('the serving example', () => {
  it('serves an OpenAI-compatible chat model that scales with a burst of users', () => {
    const run = spawnSync(process.execPath, ['--import', 'tsx', 'examples/serve-llm.ts'], { encoding: 'utf8', timeout: 150_000 });
    expect(run.status, run.stderr).toBe(0);
    expect(run.stdout).toMatch(/serving tiny-chat at http:\/\/127\.0\.0\.1:\d+\/v1 \(OpenAI-compatible\)/);
    expect(run.stdout).toMatch(/chat: ".*" \(24 prompt \+ 16 generated tokens, length\)/);
    expect(Number(/streamed: (\d+) events/.exec(run.stdout)?.[1])).toBeGreaterThan(2);
    const json = /json: (.*)/.exec(run.stdout)?.[1];
    const weather = JSON.parse(json!) as { city: string; sunny: boolean };
    expect([typeof weather.city, typeof weather.sunny]).toEqual(['string', 'boolean']);
    expect([...weather.city].length).toBeLessThanOrEqual(10); // characters (code points), as JSON Schema counts them
    expect(run.stdout).toMatch(/burst: 64 chats, 10240 tokens in [\d.]+ s; scaled to 2 replicas/);
    expect(run.stdout).toMatch(/idle again: 1 replica\(s\)/);
  });
});
