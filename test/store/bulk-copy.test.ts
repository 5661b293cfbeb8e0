/**
 * Large copies into the store (BulkCopy: memcpy below 1 MiB, non-temporal stores above, several
 * threads from 16 MiB) land every byte where it belongs, for any size and any source or
 * destination address, and never write past their object.
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { newObjectId } from '../../lib/index.js';
import { bytesFor } from './fixtures/content.js';
import { Fixture, MiB, cleanup, createStore, expectBytes, finish } from './helpers.js';

afterEach(cleanup);
afterAll(finish);

/** Sizes on and around each threshold, with ragged ends. */
const sizes = [
  0,
  1,
  63,
  65,
  MiB - 1,
  MiB,
  MiB + 1,
  MiB + 63,
  3 * MiB + 17,
  16 * MiB - 1,
  16 * MiB,
  16 * MiB + 1,
  16 * MiB + 4 * 64 + 3, // parts that do not divide evenly by the thread count
  37 * MiB + 29,
];

describe('bulk copies into the store', () => {
  it('put: every size, from sources at every offset within a line', async () => {
    const store = createStore({ capacity: 160 * MiB, spillDirectory: false });
    let seed = 0;
    for (const size of sizes) {
      // Offsets move the source off the 16- and 64-byte alignment the copy loop works in.
      for (const offset of [0, 1, 7, 16, 33, 63]) {
        const backing = bytesFor(++seed, size + offset + 5);
        const source = backing.subarray(offset, offset + size);
        const id = newObjectId();
        // A neighbour on either side: a copy that ran past its object would damage one of them.
        const before = newObjectId();
        const after = newObjectId();
        store.put(before, bytesFor(1000 + seed, 100));
        store.put(id, source);
        store.put(after, bytesFor(2000 + seed, 100));
        const view = store.getIfSealed(id)!;
        expect(view.size).toBe(size);
        expectBytes(view.data, source, `put of ${size} bytes from offset ${offset}`);
        view.release();
        for (const [neighbour, neighbourSeed] of [[before, 1000 + seed], [after, 2000 + seed]] as const) {
          const other = store.getIfSealed(neighbour)!;
          expectBytes(other.data, bytesFor(neighbourSeed, 100), `neighbour of a ${size}-byte put`);
          other.release();
          store.delete(neighbour);
        }
        store.delete(id);
      }
    }
    expect(store.stats()).toMatchObject({ objectCount: 0, bytesInUse: 0 });
  });

  it('write: pieces of odd lengths at odd destination offsets make up the object exactly', async () => {
    const store = createStore({ capacity: 160 * MiB, spillDirectory: false });
    for (const size of [3 * MiB + 17, 37 * MiB + 29]) {
      const whole = bytesFor(size, size);
      const id = newObjectId();
      const builder = store.create(id, size);
      // Cuts at odd places: the first pieces are small (memcpy), later ones cross the thresholds
      // (in the larger object, one piece is over 16 MiB).
      const cuts = [0, 5, 1_000_004, 1_000_004 + MiB + 3, Math.floor(size * 0.75) + 1, size];
      for (let i = 0; i + 1 < cuts.length; i++) {
        const [start, end] = [cuts[i], cuts[i + 1]];
        // Sources at odd offsets in their own buffers, as subarrays of JS buffers often are.
        const backing = new Uint8Array(end - start + 3);
        backing.set(whole.subarray(start, end), 3);
        builder.write(backing.subarray(3), start);
      }
      builder.seal();
      const view = store.getIfSealed(id)!;
      expectBytes(view.data, whole, `object of ${size} bytes written in pieces`);
      view.release();
      store.delete(id);
    }
  });

  it('a put from another process arrives whole', async () => {
    const store = createStore({ capacity: 96 * MiB, spillDirectory: false });
    const child = await Fixture.worker(store.name);
    const id = newObjectId();
    const size = 20 * MiB + 7;
    await child.request('put', { id, seed: 77, size });
    const view = store.getIfSealed(id)!;
    expectBytes(view.data, bytesFor(77, size), 'a 20 MiB put by another process');
    view.release();
  });
});
