/**
 * HandleReleaser: one release per handle, by disposal or by collection, paired per handle rather
 * than per object id.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { describe, expect, it } from 'vitest';
import { HandleReleaser, ObjectRef, setRefTracker } from '../../lib/core/object-ref.js';
import { newObjectId } from '../../lib/store/object-id.js';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

const tick = () => new Promise((resolve) => setTimeout(resolve, 5));

/**
 * Collects until `done` holds; finalizers run in a later task than the collection. A WeakRef
 * that `done` dereferences keeps its target until the task ends: collect only in a later one.
 */
async function collectUntil(done: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    gc();
    await tick();
    if (done()) return;
    await tick();
  }
  throw new Error(`garbage collection never got to ${what}`);
}

/** A few more rounds, for finalizers that would run late. */
async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) {
    gc();
    await tick();
  }
}

function releaser(): { released: string[]; handles: HandleReleaser; make: (id: string) => ObjectRef<unknown> } {
  setRefTracker(undefined);
  const released: string[] = [];
  const handles = new HandleReleaser((id) => released.push(id));
  return {
    released,
    handles,
    make: (id) => {
      const ref = new ObjectRef(id);
      handles.track(ref);
      return ref;
    },
  };
}

describe('HandleReleaser', () => {
  it('a disposed handle still reachable does not stand in for another collected handle to the same object', async () => {
    const { released, handles, make } = releaser();
    const id = newObjectId();
    const kept = make(id);
    const dropped = new WeakRef(make(id));
    handles.disposed(kept);
    expect(released).toEqual([id]);
    await collectUntil(() => released.length === 2, "the undisposed handle's release");
    expect(dropped.deref()).toBeUndefined();
    expect(released).toEqual([id, id]);
    // Disposing again, or the kept handle living on, releases nothing more.
    handles.disposed(kept);
    await settle();
    expect(released).toEqual([id, id]);
    expect(kept.id).toBe(id);
  });

  it('a handle disposed and then collected is released once', async () => {
    const { released, handles, make } = releaser();
    const id = newObjectId();
    const sentinel = newObjectId();
    const disposed = (() => {
      const ref = make(id);
      handles.disposed(ref);
      return new WeakRef(ref);
    })();
    expect(released).toEqual([id]);
    (() => make(sentinel))();
    await collectUntil(() => disposed.deref() === undefined && released.includes(sentinel), 'both handles');
    await settle();
    expect(released.filter((value) => value === id)).toHaveLength(1);
    expect(released.filter((value) => value === sentinel)).toHaveLength(1);
  });

  it('every handle to one object releases once, whichever way it goes', async () => {
    const { released, handles, make } = releaser();
    const id = newObjectId();
    const kept = Array.from({ length: 4 }, () => make(id));
    (() => {
      for (let i = 0; i < 6; i++) make(id);
    })();
    handles.disposed(kept[0]);
    handles.disposed(kept[1]);
    handles.disposed(kept[1]);
    await collectUntil(() => released.length === 8, 'the six dropped handles');
    await settle();
    expect(released).toHaveLength(8);
    // The two kept and never disposed still hold.
    handles.disposed(kept[2]);
    handles.disposed(kept[3]);
    expect(released).toHaveLength(10);
  });
});
