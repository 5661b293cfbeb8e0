import { readdirSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  ActorDiedError,
  GetTimeoutError,
  GraphValidationError,
  InputNode,
  MultiOutputNode,
  SerializationError,
  TaskError,
  collective,
  get,
  init,
  shutdown,
  state,
  type ActorHandle,
} from '../../lib/index.js';
import { RemoteStage, type Stage } from './fixtures/stages.js';
import { RemoteGraphOwner } from './fixtures/graph-owner.js';

const openDescriptors = () => readdirSync('/proc/self/fd').length;
const channelSegments = () => readdirSync('/dev/shm').filter((name) => name.startsWith(`trellis-${process.pid}-ch-`)).length;

describe('compiled graphs', () => {
  let stages: Array<ActorHandle<Stage>>;
  beforeAll(async () => {
    await init({ numCpus: 2 });
    stages = [1, 10, 100, 1000].map((offset) => RemoteStage.remote(offset));
    await get(stages.map((stage) => stage.pid.remote()));
  });
  afterAll(async () => {
    await shutdown();
  });

  it('runs a 4-stage pipeline with 4 executions in flight, results in order', async () => {
    const input = new InputNode();
    const [a, b, c, d] = stages;
    const graph = await d.add.bind(c.add.bind(b.add.bind(a.add.bind(input)))).compile({ maxInflight: 4 });
    try {
      for (let round = 0; round < 5; round++) {
        const refs = [0, 1, 2, 3].map((i) => graph.execute(round * 10 + i));
        // Read out of order: later results are buffered until asked for.
        expect(await refs[3].get()).toBe(round * 10 + 3 + 1111);
        expect(await Promise.all(refs.slice(0, 3).map((ref) => ref.get()))).toEqual([0, 1, 2].map((i) => round * 10 + i + 1111));
      }
    } finally {
      await graph.teardown();
    }
  });

  it('waits (backpressure) instead of failing when more than maxInflight executions are unread', async () => {
    const input = new InputNode();
    const graph = await stages[0].add.bind(input).compile({ maxInflight: 2 });
    try {
      const refs = Array.from({ length: 25 }, (_, i) => graph.execute(i));
      const values = await Promise.all(refs.map((ref) => ref.get()));
      expect(values).toEqual(Array.from({ length: 25 }, (_, i) => i + 1));
    } finally {
      await graph.teardown();
    }
  });

  it('with overlap, reads the next execution while the current one computes, results unchanged', async () => {
    const input = new InputNode();
    const [a, b] = stages;
    const graph = await b.add.bind(a.slow.bind(input, 2)).compile({ overlap: true, maxInflight: 4 });
    try {
      const refs = Array.from({ length: 12 }, (_, i) => graph.execute(i));
      expect(await Promise.all(refs.map((ref) => ref.get()))).toEqual(Array.from({ length: 12 }, (_, i) => i + 10));
    } finally {
      await graph.teardown();
    }
  });

  it('fails an execution that cannot be submitted within submitTimeout', async () => {
    const input = new InputNode();
    const graph = await stages[2].slow.bind(input, 400).compile({ maxInflight: 1, submitTimeout: 50 });
    try {
      // One computing, one in the input slot, one in the output slot: the rest wait for room.
      const refs = Array.from({ length: 6 }, (_, i) => graph.execute(i));
      const settled = await Promise.allSettled(refs.map((ref) => ref.get({ timeout: 10_000 })));
      const failed = settled.filter((result) => result.status === 'rejected') as PromiseRejectedResult[];
      expect(failed.length).toBeGreaterThan(0);
      expect(failed[0].reason.code).toBe('ERR_CHANNEL_TIMEOUT');
      expect(settled[0]).toEqual({ status: 'fulfilled', value: 0 });
      // What was submitted came back in order, and later executions get their own results.
      const submitted = settled.filter((result) => result.status === 'fulfilled').map((result) => (result as PromiseFulfilledResult<number>).value);
      expect(submitted).toEqual(submitted.map((_, i) => i));
      expect(await graph.execute(42).get({ timeout: 10_000 })).toBe(42);
      expect(await graph.execute(43).get({ timeout: 10_000 })).toBe(43);
    } finally {
      await graph.teardown();
    }
  });

  it('carries messages larger than a slot (the slot grows) and leaves no segment behind', async () => {
    const input = new InputNode();
    const [a, b] = stages;
    const graph = await b.sum.bind(a.tensor.bind(input, 1)).compile({ bufferBytes: 64 * 1024, maxInflight: 2 });
    try {
      for (const n of [1_000, 300_000, 1_000_000, 10, 600_000]) expect(await graph.execute(n)).toBe(n);
    } finally {
      await graph.teardown();
    }
    expect(readdirSync('/dev/shm').filter((name) => name.startsWith(`trellis-${process.pid}-ch-`))).toEqual([]);
  });

  it('scatters and gathers, with input attributes and constants', async () => {
    const input = new InputNode();
    const [a, b, c, d] = stages;
    const parts = [a.add.bind(input.at(0)), b.add.bind(input.at(1)), c.combine.bind(input.at(0), 7)];
    const graph = await new MultiOutputNode([d.combine.bind(parts[0], parts[1]), parts[2]]).compile();
    try {
      expect(await graph.execute(1, 2)).toEqual([2 * 1000 + 12, 1007]);
      const keyed = await a.echo.bind(new InputNode().get('name')).compile();
      try {
        expect(await keyed.execute({ name: 'by key' })).toBe('by key');
      } finally {
        await keyed.teardown();
      }
    } finally {
      await graph.teardown();
    }
  });

  it('delivers an exception to its execution as the original error, and keeps working', async () => {
    const input = new InputNode();
    const [a, b] = stages;
    const graph = await b.add.bind(a.fail.bind(input)).compile();
    try {
      const error = (await graph.execute(-5).get().catch((caught: unknown) => caught)) as TaskError & { cause: Error };
      expect(error).toBeInstanceOf(TaskError);
      expect(error.cause.name).toBe('RangeError');
      expect(error.cause.message).toMatch(/negative input -5/);
      expect(await graph.execute(5)).toBe(15);
    } finally {
      await graph.teardown();
    }
  });

  it('a result that cannot be sent fails its execution only', async () => {
    const graph = await stages[0].unsendable.bind(new InputNode()).compile();
    try {
      const error = (await graph.execute(-1).get().catch((caught: unknown) => caught)) as TaskError & { cause: Error };
      expect(error).toBeInstanceOf(TaskError);
      expect(error.cause.message).toMatch(/function cannot be sent/);
      expect(await graph.execute(3)).toBe(3);
    } finally {
      await graph.teardown();
    }
  });

  it('a graph kept busy leaves its actor and the driver free to answer calls, and tears down at once', async () => {
    const graph = await stages[0].add.bind(new InputNode()).compile({ maxInflight: 8 });
    let streaming = true;
    let executions = 0;
    // Results come back synchronously here, so without turns of the event loop the driver and
    // the actor would never read their sockets while this runs.
    const stream = (async () => {
      while (streaming) {
        const refs = Array.from({ length: 8 }, (_, i) => graph.execute(i));
        for (const ref of refs) await ref.get();
        executions += refs.length;
      }
    })();
    try {
      for (let i = 0; i < 5; i++) {
        const started = Date.now();
        expect(await get(stages[0].echo.remote(i))).toBe(i);
        expect(Date.now() - started).toBeLessThan(1000);
      }
    } finally {
      streaming = false;
      await stream;
    }
    expect(executions).toBeGreaterThan(0);
    const started = Date.now();
    await graph.teardown();
    expect(Date.now() - started).toBeLessThan(2000);
  });

  it('shares actors between graphs, which still answer ordinary calls', async () => {
    const input = new InputNode();
    const [a, b] = stages;
    const first = await b.add.bind(a.add.bind(input)).compile();
    const second = await a.add.bind(b.add.bind(input)).compile();
    try {
      const mixed = await Promise.all([first.execute(1), second.execute(2), get(a.echo.remote('ordinary')), first.execute(3)]);
      expect(mixed).toEqual([12, 13, 'ordinary', 14]);
    } finally {
      await first.teardown();
      await second.teardown();
    }
    // Torn down: the actors stay usable.
    expect(await get(b.add.remote(1))).toBe(11);
  });

  it('reduces half-precision tensors in a collective node, and leaves the input as it was', async () => {
    const input = new InputNode();
    const [a, b] = stages;
    const halves = [a, b].map((stage, rank) => stage.halfTensor.bind(input, rank + 0.5));
    const reduced = collective.allreduce.bind(halves);
    const graph = await new MultiOutputNode([a.values.bind(reduced[0]), b.values.bind(reduced[1]), a.values.bind(halves[0])]).compile();
    try {
      expect(await graph.execute(3)).toEqual([[2, 2, 2], [2, 2, 2], [0.5, 0.5, 0.5]]);
    } finally {
      await graph.teardown();
    }
  });

  it('runs collectives over several actors (the CPU communicator for CPU tensors)', async () => {
    const input = new InputNode();
    const [a, b, c] = stages;
    const tensors = [a, b, c].map((stage, rank) => stage.tensor.bind(input, rank + 1));
    const reduced = collective.allreduce.bind(tensors);
    const graph = await new MultiOutputNode(reduced.map((node, rank) => [a, b, c][rank].sum.bind(node))).compile();
    try {
      expect(await graph.execute(4)).toEqual([24, 24, 24]);
      expect(await graph.execute(1)).toEqual([6, 6, 6]);
    } finally {
      await graph.teardown();
    }
  });

  it('a graph that deadlocks in naive per-actor order runs under the computed schedule', async () => {
    // Two actors swap tensors larger than a communicator slot over 'nccl' edges. In bind order
    // each sends first, and a send that big waits for its receiver: both wait forever. The
    // computed schedule issues the swap as one group on both ranks.
    const build = () => {
      const input = new InputNode();
      const [a, b] = stages;
      const fromA = a.tensor.bind(input, 1).withTensorTransport('nccl');
      const fromB = b.tensor.bind(input, 2).withTensorTransport('nccl');
      return new MultiOutputNode([a.sum.bind(fromB), b.sum.bind(fromA)]);
    };
    const n = 2_000_000; // 8 MB of f32, over the 4 MiB staging slot
    const computed = await build().compile();
    try {
      expect(await computed.execute(n).get({ timeout: 60_000 })).toEqual([2 * n, n]);
    } finally {
      await computed.teardown();
    }
    const naive = await build().compile({ schedule: 'naive', getTimeout: 1_500 });
    const error: unknown = await naive.execute(n).get().catch((caught: unknown) => caught);
    expect(error).toBeInstanceOf(GetTimeoutError);
    await naive.teardown(); // must end even with both actors stuck mid-exchange
  });

  it('validates graphs with clear errors', async () => {
    const input = new InputNode();
    const [a, b] = stages;
    await expect(new MultiOutputNode([]).compile()).rejects.toBeInstanceOf(GraphValidationError);
    await expect(a.add.bind(5).compile()).rejects.toThrow(/never reads its InputNode/);
    await expect(a.add.bind(input, () => 1).compile()).rejects.toBeInstanceOf(SerializationError);
    await expect(new MultiOutputNode([a.add.bind(input), new MultiOutputNode([])]).compile()).rejects.toThrow(/root/);
    const cyclic = a.add.bind(input);
    const loop = b.add.bind(cyclic);
    (cyclic.args as unknown[]).push(loop);
    await expect(loop.compile()).rejects.toThrow(/cycle/);
    expect(() => collective.allreduce.bind([a.add.bind(input), a.add.bind(input)])).toThrow(/distinct actors/);
    expect(() => a.add.bind(input).withTensorTransport('carrier' as 'shm')).toThrow(/transport/);
  });

  it('10,000 executions leave store use, segments and file descriptors at their baseline', async () => {
    const input = new InputNode();
    const [a, b] = stages;
    const descriptors = openDescriptors();
    const objects = state().nodes[0].store.objectCount;
    const graph = await b.add.bind(a.add.bind(input)).compile({ maxInflight: 16 });
    let total = 0;
    for (let batch = 0; batch < 100; batch++) {
      const refs = Array.from({ length: 100 }, (_, i) => graph.execute(batch * 100 + i));
      for (const ref of refs) total += (await ref.get()) as number;
    }
    expect(total).toBe((9999 * 10000) / 2 + 11 * 10000);
    await graph.teardown();
    expect(readdirSync("/dev/shm").filter((name) => name.startsWith(`trellis-${process.pid}-ch-`))).toEqual([]);
    expect(state().nodes[0].store.objectCount).toBe(objects);
    expect(openDescriptors()).toBeLessThanOrEqual(descriptors + 2);
  });

  it('draws itself as DOT and as text', async () => {
    const input = new InputNode();
    const graph = await stages[1].add.bind(stages[0].add.bind(input)).compile();
    try {
      const { dot, text } = graph.visualize();
      expect(dot).toMatch(/^digraph compiled \{/);
      expect(text).toMatch(/READ input/);
      expect(text).toMatch(/COMPUTE Stage\.add/);
      expect(text).toMatch(/WRITE Stage\.add/);
    } finally {
      await graph.teardown();
    }
  });

  it('an actor killed mid-graph rejects pending and later executions with ActorDiedError', async () => {
    const victim = RemoteStage.remote(0);
    const other = RemoteStage.remote(5);
    const pid = await get(victim.pid.remote());
    const input = new InputNode();
    const graph = await other.add.bind(victim.slow.bind(input, 200)).compile({ getTimeout: 20_000 });
    const pending = [graph.execute(1), graph.execute(2)];
    process.kill(pid, 'SIGKILL');
    for (const ref of pending) await expect(ref.get()).rejects.toBeInstanceOf(ActorDiedError);
    expect(() => graph.execute(3)).toThrow(ActorDiedError);
    await graph.teardown();
    expect(await get(other.add.remote(1))).toBe(6);
  });

  it('runs a graph compiled inside an actor, which learns of its actors\' deaths', async () => {
    const owner = RemoteGraphOwner.remote();
    const [, second] = (await get(owner.build.remote())) as number[];
    expect(await get(owner.run.remote(5))).toBe(16);
    process.kill(second, 'SIGKILL');
    // Not a hang: the driver tells the owner's process that the actor died.
    expect(await get(owner.outcome.remote(7))).toMatchObject({ name: 'ActorDiedError', code: 'ERR_ACTOR_DIED' });
    expect(await get(owner.teardown.remote())).toBe(true);
  });
});
