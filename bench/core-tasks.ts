/** Remote functions and actors for the core suite (registered at module top level). */
import { get, remote } from '../lib/index.js';

export const noop = remote(import.meta, function noop() {
  return 0;
});

export class Sink {
  calls = 0;
  ping() {
    return ++this.calls;
  }
  async pingAsync() {
    return ++this.calls;
  }
  /** A streaming call: `count` items, each what a ping would return. */
  *pings(count: number) {
    for (let i = 0; i < count; i++) yield ++this.calls;
  }
}
export const RemoteSink = remote(import.meta, Sink);

/** A client inside the cluster: submits `count` tasks and waits for them all. */
export const taskClient = remote(import.meta, async function taskClient(count: number) {
  await get(Array.from({ length: count }, () => noop.remote()));
  return count;
});

/** A client inside the cluster calling its own actor. */
export const actorClient = remote(import.meta, async function actorClient(count: number) {
  const sink = RemoteSink.remote();
  await get(Array.from({ length: count }, () => sink.ping.remote()));
  return count;
});

/** Reads an argument's length (the argument had to reach this worker's node first). */
export const byteLength = remote(import.meta, function byteLength(bytes: Uint8Array) {
  return bytes.byteLength;
});

/** A stored result of `size` bytes, made where the task runs. */
export const makeBytes = remote(import.meta, function makeBytes(size: number) {
  return new Uint8Array(size).fill(7);
});

/** A stand-in for a model in the nodes suite's dataset job: some arithmetic per row. */
export class RowScorer {
  call(batch: { id: ArrayLike<number> }) {
    const ids = batch.id;
    const score = new Float64Array(ids.length);
    for (let i = 0; i < ids.length; i++) {
      let x = ids[i];
      for (let k = 0; k < 300; k++) x = (x * 1.000001 + 1) % 1e9;
      score[i] = x;
    }
    return { id: Array.from(ids), score };
  }
}
remote(import.meta, RowScorer);
