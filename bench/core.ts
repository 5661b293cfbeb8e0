/**
 * Core suite: Ray's microbenchmark shapes on the embedded cluster, and piscina running the same
 * trivial task with one thread per core in the same run (the baseline).
 */
import { spawn } from 'node:child_process';
import { cpus } from 'node:os';
import { fileURLToPath } from 'node:url';
import { Piscina } from 'piscina';
import { ActorPool, Queue, get, init, put, shutdown } from '../lib/index.js';
import { actorClient, noop, RemoteSink, taskClient } from './core-tasks.js';
import { elapsedSeconds, median, medianRate, nowNs, round, type Results, type Suite } from './harness.js';

/** Rounds measured per rate, after one warm-up round. */
const ROUNDS = 5;

/** The median rate of ROUNDS rounds of `body` (see medianRate). */
function rate(count: number, body: () => Promise<void>): Promise<number> {
  return medianRate(count, body, ROUNDS);
}

async function piscinaRate(count: number): Promise<number> {
  const pool = new Piscina({
    filename: fileURLToPath(new URL('./piscina-task.mjs', import.meta.url)),
    minThreads: cpus().length,
    maxThreads: cpus().length,
  });
  try {
    return await rate(count, async () => {
      await Promise.all(Array.from({ length: count }, () => pool.run(null)));
    });
  } finally {
    await pool.destroy();
  }
}

export const coreSuite: Suite = {
  name: 'core',
  ratios: [
    ['tasks async / piscina', 'single_client_tasks_async', 'piscina_tasks_async', '>= 0.6'],
    ['worker start / bare Node.js process', 'worker_start_ms', 'node_process_start_ms', ''],
    ['init / bare Node.js process', 'init_ms', 'node_process_start_ms', ''],
    ['streamed items / async actor calls', '1_1_actor_streamed_items', '1_1_actor_calls_async', '>= 1'],
    ['ActorPool.map, one call per actor at a time / all calls sent at once', 'actor_pool_map_calls', '1_n_actor_calls_async', ''],
    ['ActorPool.map, 16 calls per actor at a time / all calls sent at once', 'actor_pool_map_calls_16', '1_n_actor_calls_async', ''],
    ['Queue put + get pairs, awaited / sync actor calls', 'queue_items_sync', '1_1_actor_calls_sync', ''],
    ['Queue items in batches of 1,000 / async actor calls', 'queue_items_batched', '1_1_actor_calls_async', ''],
  ],
  async run(): Promise<Results> {
    const results: Results = {};
    const perSecond = (name: string, value: number) => (results[name] = { value: Math.round(value), unit: 'per_s' });
    // The floor of a worker's start: a Node.js process that loads nothing, started and exited.
    const bareStarts: number[] = [];
    for (let attempt = 0; attempt < ROUNDS; attempt++) {
      const start = nowNs();
      await new Promise((resolve) => spawn(process.execPath, ['-e', ''], { stdio: 'ignore' }).once('exit', resolve));
      bareStarts.push(elapsedSeconds(start) * 1000);
    }
    results.node_process_start_ms = { value: round(median(bareStarts), 1), unit: 'ms' };
    const initStart = nowNs();
    await init({ numCpus: cpus().length });
    // Until init returns: its prestarted workers have loaded the library and said hello.
    results.init_ms = { value: round(elapsedSeconds(initStart) * 1000, 1), unit: 'ms' };
    try {
      // A task in a runtime environment no worker has: one is started for it (the task's own
      // module loaded and the task run included). Each round a new environment.
      const workerStarts: number[] = [];
      for (let attempt = 0; attempt <= ROUNDS; attempt++) {
        const start = nowNs();
        await get(noop.options({ runtimeEnv: { env: { BENCH_ROUND: String(attempt) } } }).remote());
        // The first round warms the file cache and the transform cache of the task's module.
        if (attempt > 0) workerStarts.push(elapsedSeconds(start) * 1000);
      }
      results.worker_start_ms = { value: round(median(workerStarts), 1), unit: 'ms' };
      perSecond('single_client_tasks_sync', await rate(2_000, async () => {
        for (let i = 0; i < 2_000; i++) await get(noop.remote());
      }));
      perSecond('single_client_tasks_async', await rate(20_000, async () => {
        await get(Array.from({ length: 20_000 }, () => noop.remote()));
      }));
      perSecond('multi_client_tasks_async', await rate(20_000, async () => {
        await get(Array.from({ length: 4 }, () => taskClient.remote(5_000)));
      }));
      const sink = RemoteSink.remote();
      perSecond('1_1_actor_calls_sync', await rate(2_000, async () => {
        for (let i = 0; i < 2_000; i++) await get(sink.ping.remote());
      }));
      perSecond('1_1_actor_calls_async', await rate(20_000, async () => {
        await get(Array.from({ length: 20_000 }, () => sink.ping.remote()));
      }));
      // The same values as the calls above, yielded by one streaming call and read one by one.
      perSecond('1_1_actor_streamed_items', await rate(20_000, async () => {
        for await (const value of sink.pings.remote(20_000).values()) if (value < 0) throw new Error('unreachable');
      }));
      const concurrent = RemoteSink.options({ maxConcurrency: 16 }).remote();
      perSecond('1_1_actor_calls_concurrent', await rate(20_000, async () => {
        await get(Array.from({ length: 20_000 }, () => concurrent.pingAsync.remote()));
      }));
      const sinks = Array.from({ length: 4 }, () => RemoteSink.remote());
      perSecond('1_n_actor_calls_async', await rate(20_000, async () => {
        await get(Array.from({ length: 20_000 }, (_, i) => sinks[i % sinks.length].ping.remote()));
      }));
      // The same actors through an ActorPool: one call in flight per actor, the next sent as one
      // settles (against all 20,000 sent at once above).
      const pool = new ActorPool(sinks);
      perSecond('actor_pool_map_calls', await rate(5_000, async () => {
        for await (const value of pool.map((sink) => sink.ping.remote(), Array.from({ length: 5_000 }))) if (value === undefined) throw new Error('unreachable');
      }));
      pool.close();
      const deep = new ActorPool(sinks, { callsPerActor: 16 });
      perSecond('actor_pool_map_calls_16', await rate(20_000, async () => {
        for await (const value of deep.map((sink) => sink.ping.remote(), Array.from({ length: 20_000 }))) if (value === undefined) throw new Error('unreachable');
      }));
      deep.close();
      // Items through a Queue (its actor in between): one put and one get awaited in turn, then
      // in batches of 1,000 (putNowaitBatch / getNowaitBatch).
      const queue = new Queue<number>();
      perSecond('queue_items_sync', await rate(1_000, async () => {
        for (let i = 0; i < 1_000; i++) {
          await queue.put(i);
          if ((await queue.get()) !== i) throw new Error('queue out of order');
        }
      }));
      const batch = Array.from({ length: 1_000 }, (_, i) => i);
      perSecond('queue_items_batched', await rate(20_000, async () => {
        for (let round = 0; round < 20; round++) {
          await queue.putNowaitBatch(batch);
          if ((await queue.getNowaitBatch(1_000)).length !== 1_000) throw new Error('queue lost items');
        }
      }));
      queue.shutdown();
      perSecond('n_n_actor_calls_async', await rate(20_000, async () => {
        await get(Array.from({ length: 4 }, () => actorClient.remote(5_000)));
      }));
      perSecond('single_client_put_calls', await rate(20_000, async () => {
        for (let i = 0; i < 20_000; i++) put(i);
      }));
      const stored = put(42);
      perSecond('single_client_get_calls', await rate(20_000, async () => {
        for (let i = 0; i < 20_000; i++) await get(stored);
      }));
      const block = new Uint8Array(100 * 2 ** 20).fill(1);
      results.single_client_put_gigabytes = {
        value: round((await rate(10, async () => {
          // Handles let go at once (as Python's refcounting would), so store space is reused.
          for (let i = 0; i < 10; i++) {
            using ref = put(block);
          }
        })) * block.byteLength / 1e9),
        unit: 'GB/s',
      };
    } finally {
      await shutdown();
    }
    perSecond('piscina_tasks_async', await piscinaRate(20_000));
    return results;
  },
};
