/**
 * The deployment processor (buildDeploymentProcessor): a dataset's rows as calls to a serving
 * deployment's method, by handle: answered in order; a deployment at capacity (BackPressureError)
 * and a replica that dies mid-call retried; a method that throws, or a call past its time limit,
 * failing the job or recorded; refusals.
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildDeploymentProcessor, fromItems, init, serve, shutdown, type DeploymentHandle } from '../../lib/index.js';
import { ScorerActor, readScore, toScoreRequest, type Scorer } from './fixtures/scoring-deployment.js';
import { RecordingReporter } from '../data/helpers.js';

let markers = '';

beforeAll(async () => {
  markers = mkdtempSync(join(tmpdir(), 'trellis-deployment-processor-'));
  await init({ numCpus: 2, prestartWorkers: 0 });
  await serve.start({ http: false });
});

afterAll(async () => {
  await shutdown();
  rmSync(markers, { recursive: true, force: true });
});

describe('buildDeploymentProcessor', () => {
  it("answers every row in order through the deployment's replicas, retrying calls refused at capacity and a replica's death", async () => {
    // One call at a time per replica and none queued: most of the processor's calls are refused at first.
    const scorer: DeploymentHandle<Scorer> = await serve.run(
      serve.deployment(ScorerActor, { numReplicas: 2, maxOngoingRequests: 1, maxQueuedRequests: 0, actorOptions: { numCpus: 0 } }).bind(markers),
      { name: 'scoring', routePrefix: null },
    );
    const rows = Array.from({ length: 40 }, (_, id) => ({ id, behaviour: id === 7 ? 'die-once' : 'busy' }));
    const processor = buildDeploymentProcessor({ handle: scorer, method: 'score', preprocess: toScoreRequest, postprocess: readScore, maxConcurrentRequests: 6, batchSize: 8, maxRetries: 200, retryBaseDelayMs: 2, maxRetryDelayMs: 20 });
    const reporter = new RecordingReporter();
    const out = await processor(fromItems(rows)).takeAll({ progress: reporter });
    expect(out.map((row) => [row.id, row.score])).toEqual(rows.map((row) => [row.id, row.id * 10]));
    expect(out[0]).not.toHaveProperty('payload');
    // A replica died on row 7's first call, and the deployment turned calls away at capacity.
    expect(existsSync(join(markers, 'died-on-7'))).toBe(true);
    const metrics = reporter.finished!.progress.operators.at(-1)!.metrics!;
    expect(metrics.throttled).toBeGreaterThan(0);
    expect(metrics.retries).toBeGreaterThan(metrics.throttled);
    expect(metrics.requests).toBe(40 + metrics.retries);
    expect(metrics.failedRows).toBe(0);
    await serve.delete('scoring');
  });

  it('records what fails for good (a method that throws, a call past its time limit) beside the rows that succeed, or fails the job naming the row', async () => {
    const scorer: DeploymentHandle<Scorer> = await serve.run(serve.deployment(ScorerActor, { actorOptions: { numCpus: 0 } }).bind(markers), { name: 'failing', routePrefix: null });
    const rows = [{ id: 0, behaviour: 'score' }, { id: 1, behaviour: 'throw' }, { id: 2, behaviour: 'slow' }, { id: 3, behaviour: 'score' }];
    const recorded = await buildDeploymentProcessor({ handle: scorer, method: 'score', preprocess: toScoreRequest, rowErrors: 'record', timeoutMs: 300, maxRetries: 0 })(fromItems(rows)).takeAll();
    expect(recorded.map((row) => [row.id, (row.response as { score: number } | null)?.score ?? null])).toEqual([[0, 0], [1, null], [2, null], [3, 30]]);
    expect(recorded[0].error).toBeNull();
    expect(recorded[1].error).toMatch(/^ERR_TASK_FAILED: batch row 1: Scorer\.score failed: .*row 1 cannot be scored/);
    expect(recorded[2].error).toMatch(/^ERR_DEPLOYMENT_TIMEOUT: batch row 2: Scorer\.score did not answer within 300 ms/);
    await expect(buildDeploymentProcessor({ handle: scorer, method: 'score', preprocess: toScoreRequest })(fromItems(rows.slice(0, 2))).takeAll()).rejects.toThrow(/row 1 cannot be scored/);
    await serve.delete('failing');
  });

  it('names what is wrong with its options', async () => {
    const scorer: DeploymentHandle<Scorer> = await serve.run(serve.deployment(ScorerActor, { actorOptions: { numCpus: 0 } }).bind(markers), { name: 'refusals', routePrefix: null });
    expect(() => buildDeploymentProcessor({ handle: {} as never, method: 'score' })).toThrow(/handle must be a deployment handle/);
    expect(() => buildDeploymentProcessor({ handle: scorer, method: 'rate' })).toThrow(/deployment Scorer has no method "rate" \(it has: score, tokens\)/);
    expect(() => buildDeploymentProcessor({ handle: scorer, method: 'tokens' })).toThrow(/Scorer\.tokens streams its answer/);
    expect(() => buildDeploymentProcessor({ handle: scorer, method: 'score', concurrency: 0 })).toThrow(/concurrency must be a whole number > 0, got 0/);
    expect(() => buildDeploymentProcessor({ handle: scorer, method: 'score', url: 'http://x' } as never)).toThrow(/unknown option url/);
    await serve.delete('refusals');
  });
});
