/**
 * memorySummary(): the objects the driver knows with their references and the processes pinning
 * them, each node's store, and objects only pins keep (a view of a deleted object).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NotInitializedError, get, init, memorySummary, put, shutdown, state, type MemorySummary } from '../../lib/index.js';
import { RemoteKeeper } from './fixtures/actors.js';
import { bigArray } from './fixtures/tasks.js';
import { rejection } from './helpers.js';

/** The first summary for which `condition` holds. */
async function summaryWhen(condition: (summary: MemorySummary) => boolean, what: string): Promise<MemorySummary> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const summary = await memorySummary();
    if (condition(summary)) return summary;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe('memorySummary', () => {
  it('is for the driver after init', async () => {
    expect(await rejection(memorySummary())).toBeInstanceOf(NotInitializedError);
  });

  describe('in a cluster', () => {
    beforeAll(async () => {
      await init({ numCpus: 2, objectStoreMemory: 64 << 20 });
    });
    afterAll(async () => {
      await shutdown();
    });

    it('lists objects largest first with where they are, their references, what made them and who pins them', async () => {
      using big = put(new Float64Array(128 * 1024).fill(1));
      using small = put({ note: 'inline' });
      using made = bigArray.remote(64 * 1024);
      await get(made);
      const keeper = RemoteKeeper.remote();
      expect(await get(keeper.keepValue.remote(big))).toBe(1);
      const actorId = state().actors[0].actorId;
      // The driver reads `made` zero-copy: its view pins the object while it is held.
      const view = await get(made);

      const summary = await memorySummary();
      const byId = new Map(summary.objects.map((object) => [object.objectId, object]));
      expect(summary.objects.map((object) => object.size)).toEqual([...summary.objects.map((object) => object.size)].sort((a, b) => b - a));
      expect(byId.get(big.id)).toMatchObject({ state: 'ready', where: 'store', nodes: ['node-0'], references: 1, pinnedBy: [{ nodeId: 'node-0', holder: 'worker', actorId, pins: 1 }] });
      expect(byId.get(big.id)!.size).toBeGreaterThanOrEqual(1 << 20);
      expect(byId.get(big.id)!.madeBy).toBeUndefined();
      expect(byId.get(small.id)).toMatchObject({ state: 'ready', where: 'inline', nodes: [], pinnedBy: [] });
      expect(byId.get(made.id)).toMatchObject({ state: 'ready', where: 'store', madeBy: 'bigArray', pinnedBy: [{ holder: 'driver', pid: process.pid }] });
      expect(summary.nodes).toEqual([expect.objectContaining({ nodeId: 'node-0', capacity: state().nodes[0].store.capacity, pinnedObjects: 2, unreferencedPinnedBytes: 0 })]);
      expect(summary.nodes[0].bytesInUse).toBeGreaterThanOrEqual((1 << 20) + (1 << 19));
      expect(summary.unreferencedPins).toEqual([]);
      expect(view.length).toBe(64 * 1024);
    });

    it('names objects that only a view keeps once their last ref is gone, and who holds the view', async () => {
      const keeper = RemoteKeeper.remote();
      const actorId = (await get(keeper.ownActorId.remote())) as string;
      let id: string;
      {
        using big = put(new Float64Array(256 * 1024).fill(2));
        id = big.id;
        await get(keeper.keepValue.remote(big));
      }
      // The ref is gone, so the object is deleted; the actor's array still pins its bytes.
      let summary = await summaryWhen((next) => next.unreferencedPins.some((pin) => pin.objectId === id), 'the deleted object to be listed');
      expect(summary.objects.find((object) => object.objectId === id)).toBeUndefined();
      const pinned = summary.unreferencedPins.find((pin) => pin.objectId === id)!;
      expect(pinned).toMatchObject({ nodeId: 'node-0', state: 'sealed', deleted: true, pinnedBy: [{ holder: 'worker', actorId, pins: 1 }] });
      // The array's bytes and the few of its metadata (the kind of value stored).
      expect(pinned.size - 256 * 1024 * 8).toBeLessThan(64);
      expect(summary.nodes[0].unreferencedPinnedBytes).toBeGreaterThanOrEqual(pinned.size);
      // Dropped by the actor, the bytes go once its worker collects.
      await get(keeper.dropValues.remote());
      summary = await summaryWhen((next) => !next.unreferencedPins.some((pin) => pin.objectId === id), 'the actor to let go of the array');
      expect(summary.nodes[0].unreferencedPinnedBytes).toBeLessThan(pinned.size);
    });
  });
});
