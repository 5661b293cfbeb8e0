/**
 * The README's quick start: tasks, actors and objects on an embedded local cluster.
 * Run: node --import tsx examples/quickstart.ts
 */
import { get, init, put, remote, shutdown, wait } from '../lib/index.js';

// Remote functions and classes are registered at module top level: workers import this module
// and find them again by name.
export const square = remote(import.meta, function square(x: number) {
  return x * x;
});

export const total = remote(import.meta, function total(values: Float64Array) {
  return values.reduce((sum, value) => sum + value, 0);
});

export class Counter {
  count = 0;
  add(by: number) {
    this.count += by;
    return this.count;
  }
}
export const RemoteCounter = remote(import.meta, Counter);

async function main() {
  await init({ numCpus: 2 });
  try {
    // Tasks: refs come back at once; get() waits for the values.
    const squares = await get([1, 2, 3, 4].map((x) => square.remote(x)));
    console.log('squares', squares); // [1, 4, 9, 16]

    // Objects: large values go to shared memory once and are read zero-copy by workers.
    const big = put(Float64Array.from({ length: 1_000_000 }, () => 0.5));
    console.log('total', await get(total.remote(big))); // 500000

    // Actors: state in a worker process; calls through one handle run in order.
    const counter = RemoteCounter.remote();
    const calls = [1, 2, 3].map((by) => counter.add.remote(by));
    const [ready] = await wait(calls, { numReturns: 3 });
    console.log('counter', await get(ready[ready.length - 1])); // 6
  } finally {
    await shutdown();
  }
}

if (import.meta.url === `file://${process.argv[1]}`) await main();
