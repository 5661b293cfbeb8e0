/**
 * Per-task and per-actor runtime environments: workers started with a task's or actor's own
 * variables, shared by tasks of the same, inherited by what they submit, kept apart from the
 * driver's workers; and a dataset stage's runtimeEnv.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidArgumentError, fromItems, get, init, shutdown, state, type ClusterSession } from '../../lib/index.js';
import { EnvironmentReader, StageTagger, afterTagger, badNested, environmentOf, nestedEnvironment, tagStage } from './fixtures/environments.js';
import { rejection } from './helpers.js';

describe('runtime environments of tasks and actors', () => {
  let session: ClusterSession;
  beforeAll(async () => {
    session = await init({ numCpus: 2, runtimeEnv: { env: { SHARED: 'driver', STAGE: 'driver' } } });
  });
  afterAll(async () => {
    await shutdown();
  });

  it("runs a task in workers with its variables over the driver's, shared by tasks of the same variables only", async () => {
    const plain = await get(environmentOf.remote());
    expect(plain).toMatchObject({ stage: 'driver', shared: 'driver', model: null });
    const prepare = environmentOf.options({ runtimeEnv: { env: { STAGE: 'prepare', MODEL_NAME: 'tiny' } } });
    const first = await get(prepare.remote());
    expect(first).toMatchObject({ stage: 'prepare', model: 'tiny', shared: 'driver' });
    expect(first.pid).not.toBe(plain.pid);
    // The same variables, in another order and another options object: the same worker.
    const again = await get(environmentOf.options({ runtimeEnv: { env: { MODEL_NAME: 'tiny', STAGE: 'prepare' } } }).remote());
    expect(again.pid).toBe(first.pid);
    // The driver's tasks keep to the driver's workers.
    const plainAgain = await get(environmentOf.remote());
    expect(plainAgain).toMatchObject({ stage: 'driver', model: null });
    expect(plainAgain.pid).not.toBe(first.pid);
    // An empty environment is the driver's.
    expect((await get(environmentOf.options({ runtimeEnv: { env: {} } }).remote())).stage).toBe('driver');
  });

  it('gives what a task submits its environment, unless it names its own', async () => {
    const inherited = await get(nestedEnvironment.options({ runtimeEnv: { env: { STAGE: 'outer' } } }).remote());
    expect(inherited.outer.stage).toBe('outer');
    expect(inherited.inner.stage).toBe('outer');
    const own = await get(nestedEnvironment.options({ runtimeEnv: { env: { STAGE: 'outer' } } }).remote({ STAGE: 'inner' }));
    expect(own.inner.stage).toBe('inner');
    expect(own.inner.pid).not.toBe(own.outer.pid);
    const refused = await get(badNested.remote());
    expect(refused).toMatchObject({ name: 'InvalidArgumentError', code: 'ERR_RUNTIME_ENV' });
    expect(refused!.message).toContain("'NOT A NAME' is not an environment variable's name");
  });

  it('starts an actor in a process with its variables, again after a restart, and its tasks inherit them', async () => {
    const reader = EnvironmentReader.options({ runtimeEnv: { env: { MODEL_NAME: 'big' } }, maxRestarts: 1 }).remote();
    const first = await get(reader.read.remote());
    expect(first.atStart).toMatchObject({ model: 'big', stage: 'driver' });
    expect((await get(reader.child.remote())).model).toBe('big');
    process.kill(first.now.pid, 'SIGKILL');
    let after: typeof first | undefined;
    while (!after) {
      try {
        after = await get(reader.read.remote());
      } catch {
        // The call that met the dead process: the restarted one answers the next.
      }
    }
    expect(after.now.pid).not.toBe(first.now.pid);
    expect(after.atStart.model).toBe('big');
    const plain = EnvironmentReader.remote();
    expect((await get(plain.read.remote())).atStart.model).toBeNull();
  });

  it('refuses a bad runtimeEnv with ERR_RUNTIME_ENV, naming what is wrong, before anything runs', () => {
    const bad = (runtimeEnv: unknown) => {
      try {
        environmentOf.options({ runtimeEnv: runtimeEnv as never }).remote();
      } catch (error) {
        expect(error).toBeInstanceOf(InvalidArgumentError);
        expect((error as InvalidArgumentError).code).toBe('ERR_RUNTIME_ENV');
        return (error as Error).message;
      }
      throw new Error('accepted');
    };
    expect(bad({ env: { 'A-B': '1' } })).toBe("task environmentOf runtimeEnv.env: 'A-B' is not an environment variable's name");
    expect(bad({ env: { PORT: 8080 } })).toBe('task environmentOf runtimeEnv.env.PORT is a string, got number');
    expect(bad({ env: { TRELLIS_STORE: 'x' } })).toMatch(/TRELLIS_STORE: variables named TRELLIS_\* are trellis's own/);
    expect(bad({ workingDir: '.' })).toMatch(/takes env only: 'workingDir' describe the driver's working directory, given to init\(\{ runtimeEnv \}\)/);
    expect(bad({ pip: ['x'] })).toMatch(/has no option 'pip' \(it takes env\)/);
    expect(bad('X=1')).toMatch(/runtimeEnv is \{ env \}/);
    expect(() => EnvironmentReader.options({ runtimeEnv: { env: { 'X Y': '1' } } }).remote()).toThrow(/actor Reader runtimeEnv.env: 'X Y'/);
    expect(() => fromItems([{ id: 1 }]).mapBatches(tagStage, { runtimeEnv: { env: { A: 1 as never } } })).toThrow(/mapBatches\(\): runtimeEnv.env.A is a string/);
    // Nothing was submitted.
    expect(state().tasks.waiting ?? 0).toBe(0);
  });

  it("runs a dataset's stages with their runtimeEnv: tasks and an actor pool, fused only with stages of the same", async () => {
    const items = Array.from({ length: 40 }, (_, id) => ({ id }));
    const rows = await fromItems(items, { parallelism: 4 })
      .mapBatches(tagStage, { runtimeEnv: { env: { STAGE: 'tasks' } } })
      .mapBatches(StageTagger, { concurrency: 1, runtimeEnv: { env: { STAGE: 'actors', MODEL_NAME: 'm' } } })
      .mapBatches(afterTagger)
      .takeAll();
    expect(rows).toHaveLength(40);
    for (const row of rows) {
      expect(row).toMatchObject({ stage: 'actors', model: 'm', afterStage: 'driver' });
    }
    // The same variables fuse: the function runs in the pool's actor.
    const fused = await fromItems(items, { parallelism: 2 })
      .mapBatches(StageTagger, { concurrency: 1, runtimeEnv: { env: { STAGE: 'actors', MODEL_NAME: 'm' } } })
      .mapBatches(afterTagger, { runtimeEnv: { env: { MODEL_NAME: 'm', STAGE: 'actors' } } })
      .takeAll();
    expect(new Set(fused.map((row) => row.afterStage))).toEqual(new Set(['actors']));
    void session;
  });
});
