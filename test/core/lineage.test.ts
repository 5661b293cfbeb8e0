/**
 * Lineage beyond task results: what a task puts is named from its return id, so rerunning the task
 * makes it again under the same ids; an actor call says how its output is made again with
 * `recompute`; arguments that can be made again are kept as records only, not as stored values.
 * Loss is simulated by deleting objects from the store behind the runtime's back.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidArgumentError, ObjectLostError, ObjectStore, events, free, get, init, put, shutdown, state, type ObjectRef } from '../../lib/index.js';
import { bigArray } from './fixtures/core.js';
import { RemoteMaker, makeLikeMaker, makeThroughMaker, putArrays, putAsFileSays, putScaled } from './fixtures/lineage.js';

describe('lineage of puts', () => {
  let store: ObjectStore;
  let directory: string;
  const reruns: Array<{ objectId: string; task: string }> = [];
  beforeAll(async () => {
    await init({ numCpus: 2 });
    store = ObjectStore.attach(state().nodes[0].storeName);
    directory = mkdtempSync(join(tmpdir(), 'trellis-lineage-'));
    events().on('reconstruct', (event: { objectId: string; task: string }) => reruns.push(event));
  });
  afterAll(async () => {
    store.close();
    await shutdown();
    rmSync(directory, { recursive: true, force: true });
  });

  const rerunsOf = (task: string) => reruns.filter((event) => event.task === task);
  async function until(condition: () => boolean, what: string): Promise<void> {
    const deadline = Date.now() + 10_000;
    while (!condition()) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }

  it("makes a task's lost puts again, under the same ids, with one rerun", async () => {
    const refs = (await get(putArrays.remote(3, 10))) as ObjectRef<Float64Array>[];
    store.delete(refs[0].id);
    store.delete(refs[2].id);
    const values = await get(refs);
    expect(values.map((value) => value[49_999])).toEqual([10, 11, 12]);
    expect(rerunsOf('putArrays')).toHaveLength(1);
    for (const ref of refs) expect(store.state(ref.id)).toBe('sealed');
  });

  it('keeps an argument that can be made again as a record only, and recomputes the chain', async () => {
    const source = bigArray.remote(50_000);
    const [scaled] = (await get(putScaled.remote(source, 2))) as ObjectRef<Float64Array>[];
    free(source);
    // Nothing holds the source's value; the put's lineage keeps how to make it.
    await until(() => store.state(source.id) === 'absent', 'the source to leave the store');
    store.delete(scaled.id);
    expect((await get(scaled))[49_999]).toBe(99_998);
    expect(reruns.map((event) => event.task)).toEqual(expect.arrayContaining(['putScaled', 'bigArray']));
  });

  it("keeps a put argument (which nothing could make again) stored while the task's result is held, not for its puts alone", async () => {
    const source = put(new Float64Array(50_000).fill(3));
    const result = putScaled.remote(source, 3);
    const [scaled] = (await get(result)) as ObjectRef<Float64Array>[];
    free(source);
    expect(store.state(source.id)).toBe('sealed');
    store.delete(scaled.id);
    expect((await get(scaled))[0]).toBe(9);
    // The result goes: the source is let go, and the put can no longer be made again.
    free(result);
    await until(() => store.state(source.id) === 'absent', 'the source to leave the store');
    store.delete(scaled.id);
    const error = await get(scaled).catch((caught: unknown) => caught as Error);
    expect(error).toBeInstanceOf(ObjectLostError);
    expect((error as Error).message).toContain('since freed');
  });

  it('fails a lost put that the rerun did not make again, saying so', async () => {
    const path = join(directory, 'count');
    writeFileSync(path, '2');
    const refs = (await get(putAsFileSays.remote(path))) as ObjectRef<Float64Array>[];
    writeFileSync(path, '1');
    store.delete(refs[1].id);
    const error = await get(refs[1]).catch((caught: unknown) => caught as Error);
    expect(error).toBeInstanceOf(ObjectLostError);
    expect((error as ObjectLostError).objectId).toBe(refs[1].id);
    expect((error as Error).message).toContain('did not put it this time');
    expect((await get(refs[0]))[0]).toBe(0);
  });

  it("makes an actor call's lost puts again with the task its recompute option names", async () => {
    const maker = RemoteMaker.remote();
    const [made] = (await get(maker.make.options({ recompute: { task: makeLikeMaker, args: [50_000, 4] } }).remote(50_000, 4))) as ObjectRef<Float64Array>[];
    store.delete(made.id);
    expect((await get(made))[49_999]).toBe(4);
    expect(rerunsOf('makeLikeMaker')).toHaveLength(1);
    // Without it, the loss is final, and the error says what was missing.
    const [plain] = (await get(maker.make.remote(50_000, 5))) as ObjectRef<Float64Array>[];
    store.delete(plain.id);
    const error = await get(plain).catch((caught: unknown) => caught as Error);
    expect(error).toBeInstanceOf(ObjectLostError);
    expect((error as Error).message).toContain('recompute');
  });

  it("reruns a lost call's output on a live peer of its actor, and as the task once none is left", async () => {
    const maker = RemoteMaker.remote();
    const peer = RemoteMaker.remote();
    const recompute = { task: makeLikeMaker, args: [50_000, 7], peers: () => [peer] };
    const [made] = (await get(maker.make.options({ recompute }).remote(50_000, 7))) as ObjectRef<Float64Array>[];
    store.delete(made.id);
    expect((await get(made))[0]).toBe(7);
    expect(await get(peer.callCount.remote())).toBe(1);
    expect(reruns.at(-1)!.task).toMatch(/make/);
    await peer[Symbol.asyncDispose]();
    store.delete(made.id);
    expect((await get(made))[0]).toBe(7);
    expect(reruns.at(-1)!.task).toBe('makeLikeMaker');
  });

  it('takes the recompute option from a call made inside a task', async () => {
    const [made] = (await get(makeThroughMaker.remote(6))) as ObjectRef<Float64Array>[];
    store.delete(made.id);
    expect((await get(made))[0]).toBe(6);
    expect(rerunsOf('makeLikeMaker')).toHaveLength(3);
  });

  it('refuses a recompute option that is not a remote function', () => {
    const maker = RemoteMaker.remote();
    expect(() => maker.make.options({ recompute: { task: (() => 1) as never, args: [] } }).remote(1, 1)).toThrow(InvalidArgumentError);
    expect(() => maker.make.options({ recompute: { task: makeLikeMaker, args: 'no' as never } }).remote(1, 1)).toThrow(/recompute.args must be an array/);
  });
});
