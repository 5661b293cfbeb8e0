/**
 * Compiled-graph suite: each shape run through ordinary actor calls and compiled, one execution at
 * a time (median microseconds) and pipelined (executions per second), with the floor measured in
 * the same run: a raw futex ping-pong between two processes (bench/native/futex_pingpong.cc).
 */
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { InputNode, MultiOutputNode, get, init, shutdown, type CompiledGraph, type DAGNode } from '../lib/index.js';
import { RemoteStage } from '../test/dag/fixtures/stages.js';
import { median, nowNs, elapsedSeconds, round, type Results, type Suite } from './harness.js';

/**
 * The floor: a futex round trip between two processes. Unpinned, as the graph's processes run, the
 * scheduler puts the pair on one CPU (~7 us here) or on two (~15 us) from run to run: the median of
 * three runs, with both pinned cases beside it for reference.
 */
function futexFloor(mode: 'any' | 'same' | 'cross' = 'any'): number {
  const directory = fileURLToPath(new URL('./native', import.meta.url));
  execFileSync('make', ['-s', '-C', directory, 'out/futex_pingpong'], { stdio: 'inherit' });
  return Number(execFileSync(`${directory}/out/futex_pingpong`, ['20000', mode], { encoding: 'utf8' }).trim());
}

/**
 * Calls `run` for at least `ms` (and `calls` times) before anything is timed. A fixed count was too
 * short: the first thousand or so calls after the actors start run while V8 still compiles the
 * hot paths on the same two cores and the scheduler has not yet settled where the processes run
 * (the dynamic round trip fell from ~300 us to ~70 us over the first two seconds).
 */
async function warmUp(run: () => Promise<unknown>, ms = 1000, calls = 200): Promise<void> {
  const start = Date.now();
  for (let i = 0; i < calls || Date.now() - start < ms; i++) await run();
}

async function sequentialUs(count: number, run: () => Promise<unknown>): Promise<number> {
  await warmUp(run);
  const times: number[] = [];
  for (let i = 0; i < count; i++) {
    const start = nowNs();
    await run();
    times.push(elapsedSeconds(start) * 1e6);
  }
  return median(times);
}

async function pipelinedPerSecond(graph: CompiledGraph, count: number): Promise<number> {
  const start = nowNs();
  const refs = Array.from({ length: count }, (_, i) => graph.execute(i));
  for (const ref of refs) await ref.get();
  return count / elapsedSeconds(start);
}

export const dagSuite: Suite = {
  name: 'dag',
  ratios: [
    ['compiled single actor / futex ping-pong', 'compiled_single_actor_us', 'futex_pingpong_us', '<= 3'],
    ['dynamic / compiled, single actor', 'dynamic_single_actor_us', 'compiled_single_actor_us', '>= 10'],
  ],
  async run(): Promise<Results> {
    const results: Results = {};
    results.futex_pingpong_us = { value: round(median([futexFloor(), futexFloor(), futexFloor()]), 2), unit: 'us' };
    results.futex_pingpong_same_cpu_us = { value: round(futexFloor('same'), 2), unit: 'us' };
    results.futex_pingpong_cross_cpu_us = { value: round(futexFloor('cross'), 2), unit: 'us' };
    await init({ numCpus: 2 });
    try {
      const stages = [1, 2, 3, 4, 5].map((offset) => RemoteStage.remote(offset));
      await get(stages.map((stage) => stage.pid.remote()));
      const [a, b, c, d] = stages;
      const shapes: Record<string, { dynamic: (x: number) => Promise<unknown>; graph: (input: InputNode) => DAGNode }> = {
        single_actor: {
          dynamic: (x) => get(a.add.remote(x)),
          graph: (input) => a.add.bind(input),
        },
        chain_4: {
          dynamic: (x) => get(d.add.remote(c.add.remote(b.add.remote(a.add.remote(x))))),
          graph: (input) => d.add.bind(c.add.bind(b.add.bind(a.add.bind(input)))),
        },
        scatter_gather_4: {
          dynamic: (x) => get([a, b, c, d].map((stage) => stage.add.remote(x))),
          graph: (input) => new MultiOutputNode([a, b, c, d].map((stage) => stage.add.bind(input))),
        },
      };
      for (const [shape, { dynamic, graph }] of Object.entries(shapes)) {
        results[`dynamic_${shape}_us`] = { value: round(await sequentialUs(2000, () => dynamic(1)), 1), unit: 'us' };
        const compiled = await graph(new InputNode()).compile({ maxInflight: 16 });
        try {
          results[`compiled_${shape}_us`] = { value: round(await sequentialUs(2000, () => compiled.execute(1).get()), 1), unit: 'us' };
          await warmUp(() => pipelinedPerSecond(compiled, 1000), 500, 2);
          results[`compiled_${shape}_per_s`] = { value: Math.round(await pipelinedPerSecond(compiled, 10_000)), unit: 'per_s' };
        } finally {
          await compiled.teardown();
        }
      }
    } finally {
      await shutdown();
    }
    return results;
  },
};
