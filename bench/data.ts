/**
 * Data suite. pipeline_rows_per_s: the example's classifier through mapBatches on 2 CPU actors,
 * start to finish (actor start-up included); single_process_rows_per_s: the same model over the
 * same batches in one plain loop, in this run (each the median of five alternating rounds, each
 * round's pair printed to stderr);
 * block_overhead_ms: wall time per block of an identity map, with task_roundtrip_ms, one trivial
 * task per block through the core runtime, as its floor (both in steady state: the median of five
 * runs after five warm-up runs).
 */
import { fromArrow, get, init, remote, rowsToBlock, shutdown, type Block } from '../lib/index.js';
import { Classifier } from '../examples/batch-inference.js';
import { ReviewClassifier, reviewText } from '../examples/model/review-classifier.js';
import { identity } from '../test/data/fixtures/udfs.js';
import { elapsedSeconds, median, nowNs, round, type Results, type Suite } from './harness.js';

export const passBlock = remote(import.meta, function passBlock(block: Block) {
  return block.numRows;
});

const ROWS = 16_384;
const BATCH = 64;
const OVERHEAD_BLOCKS = 400;
const PIPELINE_ROUNDS = 5;

/** Milliseconds per block of `run` (over OVERHEAD_BLOCKS blocks): the median of 5 runs after 5 warm-up runs. */
async function steadyMs(run: () => Promise<void>): Promise<number> {
  for (let round = 0; round < 5; round++) await run();
  const times: number[] = [];
  for (let round = 0; round < 5; round++) {
    const start = nowNs();
    await run();
    times.push((elapsedSeconds(start) * 1000) / OVERHEAD_BLOCKS);
  }
  return median(times);
}

export const dataSuite: Suite = {
  name: 'data',
  ratios: [
    ['pipeline (2 actors) / single process', 'pipeline_rows_per_s', 'single_process_rows_per_s', '>= 1.6'],
    ['block overhead / task round trip', 'block_overhead_ms', 'task_roundtrip_ms', '(floor)'],
  ],
  async run(): Promise<Results> {
    const rows = Array.from({ length: ROWS }, (_, id) => ({ id, text: reviewText(id) }));

    // Rounds alternate the two, each pipeline on a fresh cluster (so its actors take prestarted
    // workers, as a job's would); medians, since either figure swings by a third between runs on
    // this VM.
    const model = new ReviewClassifier(7);
    model.predict(rows.slice(0, BATCH).map((row) => row.text));
    const blocks: Block[] = [];
    for (let first = 0; first < ROWS; first += 1024) blocks.push(rowsToBlock(rows.slice(first, first + 1024)));
    const singles: number[] = [];
    const pipelines: number[] = [];
    for (let round = 0; round < PIPELINE_ROUNDS; round++) {
      // The same model over the same batches, in one process.
      let start = nowNs();
      for (let first = 0; first < ROWS; first += BATCH) model.predict(rows.slice(first, first + BATCH).map((row) => row.text));
      singles.push(ROWS / elapsedSeconds(start));

      await init({ numCpus: 2 });
      try {
        start = nowNs();
        const classified = await fromArrow(blocks)
          .mapBatches(Classifier, { batchSize: BATCH, constructorArgs: [7], concurrency: 2, numCpus: 1 })
          .count({ progress: false });
        pipelines.push(classified / elapsedSeconds(start));
      } finally {
        await shutdown();
      }
    }
    const single = median(singles);
    const pipeline = median(pipelines);
    // stderr, so that --json stays one object: how far the rounds spread on this machine.
    console.error(`data rounds (pipeline / single rows/s): ${pipelines.map((value, index) => `${Math.round(value)} / ${Math.round(singles[index])}`).join(', ')}`);

    await init({ numCpus: 2 });
    try {
      // Per-block costs in steady state: fresh workers first warm their JIT over a few runs, so
      // the median of later runs counts.
      const small = Array.from({ length: OVERHEAD_BLOCKS }, (_, index) => rowsToBlock([{ id: index, value: index * 0.5 }]));
      const tiny = fromArrow(small);
      const blockOverhead = await steadyMs(async () => {
        const mapped = await tiny.mapBatches(identity, { batchSize: null, batchFormat: 'arrow' }).count({ progress: false });
        if (mapped !== OVERHEAD_BLOCKS) throw new Error(`identity map returned ${mapped} rows of ${OVERHEAD_BLOCKS}`);
      });

      const refs = (await tiny.materialize({ progress: false })).logicalPlan[0];
      const inputRefs = refs.op === 'input' ? refs.blocks.map((block) => block.ref) : [];
      const roundTrip = await steadyMs(async () => {
        await get(inputRefs.map((ref) => passBlock.remote(ref as never)));
      });

      return {
        pipeline_rows_per_s: { value: round(pipeline, 0), unit: 'rows/s' },
        single_process_rows_per_s: { value: round(single, 0), unit: 'rows/s' },
        block_overhead_ms: { value: round(blockOverhead, 3), unit: 'ms' },
        task_roundtrip_ms: { value: round(roundTrip, 3), unit: 'ms' },
      };
    } finally {
      await shutdown();
    }
  },
};
