import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createCollectiveGroup, events, get, init, kill, ObjectLostError, ObjectRef, put, shutdown, state, Tensor, wait } from '../../lib/index.js';
import { RemoteStage } from './fixtures/collective.js';

async function until(check: () => Promise<boolean>): Promise<void> {
  for (let i = 0; i < 500 && !(await check()); i++) await new Promise((resolve) => setTimeout(resolve, 10));
}

describe('tensor transport with CPU tensors', () => {
  const routes: Array<{ objectId: string; route: string }> = [];
  beforeAll(async () => {
    await init({ numCpus: 2 });
    events().on('tensor-transport', (event) => routes.push(event));
  });
  afterAll(async () => {
    await shutdown();
  });

  it('hands a held tensor to a group member over the communicator, to others through the store', async () => {
    const [producer, member, outsider] = [RemoteStage.remote(), RemoteStage.remote(), RemoteStage.remote()];
    const group = await createCollectiveGroup([producer, member], { backend: 'cpu', name: 'pipeline' });
    const tensor = producer.produce.remote(500_000, 2);
    expect(await get(member.consume.remote(tensor))).toEqual([{ dtype: 'f32', numel: 500_000, sum: 1_000_000 }]);
    expect(routes.filter((event) => event.objectId === tensor.id).map((event) => event.route)).toEqual(['communicator']);
    // Nothing was stored for it so far.
    expect(await get(outsider.consume.remote(tensor))).toEqual([{ dtype: 'f32', numel: 500_000, sum: 1_000_000 }]);
    expect(routes.filter((event) => event.objectId === tensor.id).map((event) => event.route)).toEqual(['communicator', 'store']);
    // The driver reads it from the store too.
    const value = (await get(tensor)) as Tensor;
    expect(value.numel).toBe(500_000);
    await group.destroy();
  });

  it('lets an actor return shares of a buffer it keeps, and wait until readers are done before writing it again', async () => {
    const stage = RemoteStage.remote();
    const first = stage.step.remote(1);
    await wait([first]);
    // The next step waits for the first share to be freed, and a call on its result waits too.
    const second = stage.step.remote(2);
    const after = stage.consume.remote(second);
    const [ready] = await wait([second], { timeout: 300 });
    expect(ready).toEqual([]);
    // The first result's last ref goes: its share is freed (ahead of the calls waiting), and the
    // step goes on.
    first[Symbol.dispose]();
    expect(await get(after)).toEqual([{ dtype: 'f32', numel: 4, sum: 8 }]);
    expect(((await get(second)) as Tensor).toArray()).toEqual([2, 2, 2, 2]);
    // The buffer stayed the actor's: the runtime freed only the shares.
    expect(await get(stage.bufferSum.remote())).toBe(8);
    const third = stage.step.remote(3);
    second[Symbol.dispose]();
    expect(((await get(third)) as Tensor).toArray()).toEqual([3, 3, 3, 3]);
    kill(stage);
  });

  it('lets a step with a second call slot await a share that a group member reads over the communicator', async () => {
    const [stage, member] = [RemoteStage.options({ maxConcurrency: 2 }).remote(), RemoteStage.remote()];
    const group = await createCollectiveGroup([stage, member], { backend: 'cpu', name: 'stepper' });
    const first = stage.step.remote(1);
    await wait([first]);
    const second = stage.step.remote(2);
    // The send of the first result runs in the second slot while the step awaits its share.
    expect(await get(member.consume.remote(first))).toEqual([{ dtype: 'f32', numel: 4, sum: 4 }]);
    expect(routes.filter((event) => event.objectId === first.id).map((event) => event.route)).toEqual(['communicator']);
    first[Symbol.dispose]();
    expect(((await get(second)) as Tensor).toArray()).toEqual([2, 2, 2, 2]);
    await group.destroy();
    kill(stage);
    kill(member);
  });

  it('sends a held result to a group member even after a get() brought it into the store first', async () => {
    const [producer, member] = [RemoteStage.remote(), RemoteStage.remote()];
    const group = await createCollectiveGroup([producer, member], { backend: 'cpu', name: 'overtaken' });
    const gate = join(mkdtempSync(join(tmpdir(), 'trellis-gate-')), 'open');
    try {
      const tensor = producer.produce.remote(1000, 3);
      await wait([tensor]);
      const blocked = producer.waitFor.remote(gate);
      // The send waits behind the call in progress; the move into the store runs on arrival.
      const read = member.consume.remote(tensor);
      expect(((await get(tensor)) as Tensor).numel).toBe(1000);
      writeFileSync(gate, '');
      expect(await get(blocked)).toBe(true);
      expect(await get(read)).toEqual([{ dtype: 'f32', numel: 1000, sum: 3000 }]);
      expect(routes.filter((event) => event.objectId === tensor.id).map((event) => event.route)).toEqual(['communicator', 'store']);
    } finally {
      writeFileSync(gate, '');
      await group.destroy();
      kill(producer);
      kill(member);
      rmSync(dirname(gate), { recursive: true, force: true });
    }
  });

  it('keeps calls in order when many held tensors move between the same pair', async () => {
    const [producer, consumer] = [RemoteStage.remote(), RemoteStage.remote()];
    const group = await createCollectiveGroup([producer, consumer], { backend: 'cpu', name: 'ordered' });
    const tensors = Array.from({ length: 30 }, (_, i) => producer.produce.remote(100 + i, i));
    const sums = (await get(tensors.map((t) => consumer.consume.remote(t)))).map((result) => result[0]);
    sums.forEach((result, i) => expect(result).toEqual({ dtype: 'f32', numel: 100 + i, sum: (100 + i) * i }));
    await group.destroy();
  });

  it('moves a Tensor[] result and frees held tensors when the last ref goes', async () => {
    const [producer, consumer] = [RemoteStage.remote(), RemoteStage.remote()];
    const group = await createCollectiveGroup([producer, consumer], { backend: 'cpu', name: 'pairs' });
    {
      using pair = producer.producePair.remote(10);
      expect(await get(consumer.consume.remote(pair))).toEqual([
        { dtype: 'f32', numel: 10, sum: 10 },
        { dtype: 'i32', numel: 3, sum: 21 },
      ]);
    }
    const before = state().nodes[0].store.objectCount;
    expect(before).toBeGreaterThanOrEqual(0);
    await group.destroy();
  });

  it('holds tensors nested in a result (objects, arrays, Maps) and rebuilds the value around them', async () => {
    const [producer, member, outsider] = [RemoteStage.remote(), RemoteStage.remote(), RemoteStage.remote()];
    const group = await createCollectiveGroup([producer, member], { backend: 'cpu', name: 'named' });
    const expected = { hidden: ['f32', 1000, 2000], ids: [['i32', 6]], step: 7, label: 'batch-1', mask: ['u8', 2], refIsRef: true };
    {
      using nestedRef = put('kept alive by the result');
      using value = producer.produceNamed.remote(1000, [nestedRef]);
      // Over the communicator to a member, through the store to anyone else, and to the driver.
      expect(await get(member.describeNamed.remote(value))).toEqual(expected);
      expect(await get(outsider.describeNamed.remote(value))).toEqual(expected);
      expect(routes.filter((event) => event.objectId === value.id).map((event) => event.route)).toEqual(['communicator', 'store']);
      const local = (await get(value)) as { hidden: Tensor; extra: { step: number }; ref: unknown[] };
      expect(local.hidden.numel).toBe(1000);
      expect(local.extra.step).toBe(7);
      // The ref nested in the result is held with it: its object outlives the handle passed in.
      nestedRef[Symbol.dispose]();
      expect(await get(local.ref[0] as ObjectRef<string>)).toBe('kept alive by the result');
    }
    await group.destroy();
  });

  it('fails reads of a held result with ObjectLostError once the actor holding it is gone', async () => {
    const failure = (promise: Promise<unknown>) => promise.then(() => undefined, (error: Error) => error);
    for (const restarts of [false, true]) {
      const producer = RemoteStage.options({ maxRestarts: restarts ? 1 : 0 }).remote();
      const consumer = RemoteStage.remote();
      await createCollectiveGroup([producer, consumer], { backend: 'cpu', name: `lost-${restarts}` });
      const tensor = producer.produce.remote(100, 1);
      await wait([tensor]);
      // Killed for good, or its process killed and restarted: either way its memory is gone.
      kill(producer, { noRestart: !restarts });
      const cause = restarts ? /held by actor Stage \(tensor transport\) and is lost: actor Stage died \(pid \d+ killed by SIGKILL\) and restarts/ : /held by actor Stage \(tensor transport\) and is lost: actor Stage was killed/;
      await until(async () => (await failure(get(tensor))) instanceof ObjectLostError);
      const read = await failure(get(consumer.consume.remote(tensor)));
      expect(read).toBeInstanceOf(ObjectLostError);
      expect((read as Error).message).toMatch(cause);
      expect(await failure(get(tensor))).toBeInstanceOf(ObjectLostError);
      if (restarts) expect(await get(producer.produce.options({ tensorTransport: 'store' }).remote(3, 2))).toBeInstanceOf(Tensor);
      kill(producer);
      kill(consumer);
    }
  });

  it('hands an actor its own held result as it is, outside any group', async () => {
    const producer = RemoteStage.remote();
    using tensor = producer.produce.remote(1000, 3);
    expect(await get(producer.consume.remote(tensor))).toEqual([{ dtype: 'f32', numel: 1000, sum: 3000 }]);
    expect(routes.filter((event) => event.objectId === tensor.id).map((event) => event.route)).toEqual(['local']);
  });

  it('ships an explicit per-call transport choice', async () => {
    const [producer, consumer] = [RemoteStage.remote(), RemoteStage.remote()];
    const tensor = producer.produce.options({ tensorTransport: 'store' }).remote(1000, 3);
    expect(await get(consumer.consume.remote(tensor))).toEqual([{ dtype: 'f32', numel: 1000, sum: 3000 }]);
    expect(routes.some((event) => event.objectId === tensor.id)).toBe(false);
  });
});
