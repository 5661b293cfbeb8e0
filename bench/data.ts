/**
 * Data suite. pipeline_rows_per_s: the example's classifier through mapBatches on 2 CPU actors,
 * start to finish (actor start-up included); single_process_rows_per_s: the same model over the
 * same batches in one plain loop, in this run (each the median of five alternating rounds, each
 * round's pair printed to stderr);
 * block_overhead_ms: wall time per block of an identity map, with task_roundtrip_ms, one trivial
 * task per block through the core runtime, as its floor (both in steady state: the median of five
 * runs after five warm-up runs);
 * sort_rows_per_s and groupby_rows_per_s: 1 Mi rows (a float64 key, an int32 group, a payload)
 * sorted by the key, and counted and summed by the group, on the cluster; their baselines
 * sort_single_process_rows_per_s and groupby_single_process_rows_per_s run the same kernels over
 * the same blocks in this process, without the runtime (medians of three rounds, after one warm-up);
 * groupby_approx_quantile_rows_per_s against groupby_quantile_rows_per_s: the median of the key per
 * group on the cluster, by ApproximateQuantile's sketch (a few hundred values per group and
 * partial) against exact Quantile (every value carried through the partials);
 * checkpointed_write_rows_per_s against plain_write_rows_per_s: 256 Ki rows in 64 read tasks
 * written as Arrow files with a checkpoint (each task's ids recorded, data and record synced to
 * disk, then the rename) and without; resume_skip_rows_per_s against read_pass_rows_per_s: a
 * resumed run of that job that finds every row written (the reads and the filter run, nothing is
 * written) against the same reads through an identity map (medians of three rounds);
 * checkpoint_ms_per_write: what a checkpoint adds to one write task (its ids recorded, data and
 * record synced, a rename), from the two write rates; checkpoint_lookup_ns_per_row: the resume
 * filter's test of 1 Mi int64 ids against 512 Ki written ones (a binary search over the sorted
 * stored block), against set_lookup_ns_per_row, a JavaScript Set of the same ids;
 * jsonl_gzip_read_rows_per_s against jsonl_read_rows_per_s: 256 Ki review rows in 8 JSONL files,
 * gzip-compressed and plain, read and counted on the cluster; gunzip_rows_per_s, the physical
 * floor of the compressed read: the same files decompressed by zlib in this process, one core;
 * jsonl_gzip_write_rows_per_s against jsonl_write_rows_per_s: those rows written by 8 tasks,
 * compressed and plain (medians of three rounds);
 * parquet_filter_pushdown_rows_per_s against parquet_filter_full_read_rows_per_s: 1 Mi rows (an
 * id, a score, a review's text) in 8 Parquet files of 16 Ki-row groups, a sixteenth of them kept
 * by an id range: the filter pushed into the read (groups outside the range never read) against
 * the same filter as a stage after reading every row; both in dataset rows per second (medians of
 * three rounds);
 * streaming_split_rows_per_s against driver_iter_rows_per_s: the example's reviews (16 Ki rows in
 * 16 blocks) scored by the example's classifier in batches of 64, by two tasks each iterating its
 * share of a streamingSplit(2), against the driver iterating iterBatches and scoring alone: the
 * consumers work in parallel, and the rows never pass the driver (medians of three rounds, each
 * with its own run of the plan).
 */
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { tableFromArrays } from 'apache-arrow';
import { ApproximateQuantile, Count, Quantile, Sum, fromArrow, type DataIterator, fromItems, get, init, range, readJsonl, readParquet, remote, rowsToBlock, shutdown, type Block, type Dataset, type RowFilter } from '../lib/index.js';
import { finalizeAggregate, mergePartials, partialAggregate } from '../lib/data/aggregate.js';
import { concatBlocks } from '../lib/data/block.js';
import { WrittenIds, storedIdSet } from '../lib/data/written-ids.js';
import { sortBlock } from '../lib/data/exchange.js';
import { Classifier } from '../examples/batch-inference.js';
import { ReviewClassifier, reviewText } from '../examples/model/review-classifier.js';
import { identity } from '../test/data/fixtures/udfs.js';
import { elapsedSeconds, median, nowNs, round, type Results, type Suite } from './harness.js';

export const passBlock = remote(import.meta, function passBlock(block: Block) {
  return block.numRows;
});

/** A streaming split's consumer: scores its share's reviews in batches, returning how many. */
export const scoreShare = remote(import.meta, async function scoreShare(iterator: DataIterator, batchSize: number) {
  const model = new ReviewClassifier(7);
  let scored = 0;
  for await (const batch of iterator.iterBatches({ batchSize })) {
    scored += model.predict((batch as { text: string[] }).text).length;
  }
  return scored;
});

const ROWS = 16_384;
const BATCH = 64;
const OVERHEAD_BLOCKS = 400;
const PIPELINE_ROUNDS = 5;
const EXCHANGE_ROWS = 1 << 20;
const EXCHANGE_BLOCKS = 16;
const CHECKPOINT_ROWS = 1 << 18;
const CHECKPOINT_TASKS = 64;
const TEXT_ROWS = 1 << 18;
const TEXT_FILES = 8;
const PARQUET_ROWS = 1 << 20;
const PARQUET_FILES = 8;
const PARQUET_GROUP_ROWS = 1 << 14;

/** The sort and groupBy input: EXCHANGE_BLOCKS blocks of a random key, a group of 64 and a payload. */
function exchangeBlocks(): Block[] {
  let state = 12345;
  const blocks: Block[] = [];
  const perBlock = EXCHANGE_ROWS / EXCHANGE_BLOCKS;
  for (let block = 0; block < EXCHANGE_BLOCKS; block++) {
    const key = new Float64Array(perBlock);
    const group = new Int32Array(perBlock);
    const payload = new Int32Array(perBlock);
    for (let row = 0; row < perBlock; row++) {
      state = (Math.imul(state, 1103515245) + 12345) >>> 0;
      key[row] = state / 2 ** 32;
      group[row] = state & 63;
      payload[row] = block * perBlock + row;
    }
    blocks.push(tableFromArrays({ key, group, payload }));
  }
  return blocks;
}

/** Rows per second of `run` over EXCHANGE_ROWS rows: the median of three rounds after one warm-up. */
async function exchangeRate(run: () => Promise<unknown> | unknown): Promise<number> {
  await run();
  const rates: number[] = [];
  for (let round = 0; round < 3; round++) {
    const start = nowNs();
    await run();
    rates.push(EXCHANGE_ROWS / elapsedSeconds(start));
  }
  return median(rates);
}

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
    ['sort (2 CPUs) / single process', 'sort_rows_per_s', 'sort_single_process_rows_per_s', '(report)'],
    ['groupBy (2 CPUs) / single process', 'groupby_rows_per_s', 'groupby_single_process_rows_per_s', '(report)'],
    ['median per group: approximate sketch / exact', 'groupby_approx_quantile_rows_per_s', 'groupby_quantile_rows_per_s', '(report)'],
    ['write: checkpointed / plain (4 Ki-row writes)', 'checkpointed_write_rows_per_s', 'plain_write_rows_per_s', '(report)'],
    ['resume skipping every row / read pass', 'resume_skip_rows_per_s', 'read_pass_rows_per_s', '(report)'],
    ['written-id lookup: sorted ids in the store / a JS Set', 'checkpoint_lookup_ns_per_row', 'set_lookup_ns_per_row', '(report)'],
    ['JSONL read: gzip / plain', 'jsonl_gzip_read_rows_per_s', 'jsonl_read_rows_per_s', '(report)'],
    ['JSONL gzip read / gunzip alone (one core)', 'jsonl_gzip_read_rows_per_s', 'gunzip_rows_per_s', '(floor)'],
    ['JSONL write: gzip / plain', 'jsonl_gzip_write_rows_per_s', 'jsonl_write_rows_per_s', '(report)'],
    ['Parquet, 1/16 of the rows by a filter: pushed into the read / read whole, then filtered', 'parquet_filter_pushdown_rows_per_s', 'parquet_filter_full_read_rows_per_s', '(report)'],
    ['streamingSplit(2) to two scoring tasks / the driver iterating and scoring alone', 'streaming_split_rows_per_s', 'driver_iter_rows_per_s', '(report)'],
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

      // Sort and groupBy: the cluster's exchange and streaming aggregation against the same
      // kernels in this process.
      const input = exchangeBlocks();
      const stored = fromArrow(input);
      const plan = { keys: ['group'], aggregations: [Count(), Sum('payload')] };
      const sortRate = await exchangeRate(async () => {
        let rows = 0;
        for await (const batch of stored.sort('key').iterBatches({ batchSize: null, batchFormat: 'arrow', progress: false })) rows += (batch as Block).numRows;
        if (rows !== EXCHANGE_ROWS) throw new Error(`sort returned ${rows} rows of ${EXCHANGE_ROWS}`);
      });
      const sortSingle = await exchangeRate(() => sortBlock(concatBlocks(input), [{ column: 'key', descending: false }]));
      const groupRate = await exchangeRate(async () => {
        const groups = await stored.groupBy('group').aggregate(Count(), Sum('payload')).count({ progress: false });
        if (groups !== 64) throw new Error(`groupBy made ${groups} groups of 64`);
      });
      const groupSingle = await exchangeRate(() => finalizeAggregate(mergePartials(input.map((block) => partialAggregate(block, plan)), plan), plan));
      const quantileRate = (aggregation: typeof Quantile) => exchangeRate(async () => {
        const groups = await stored.groupBy('group').aggregate(aggregation('key', { alias: 'median' })).count({ progress: false });
        if (groups !== 64) throw new Error(`groupBy made ${groups} groups of 64`);
      });
      const exactQuantile = await quantileRate(Quantile);
      const approximateQuantile = await quantileRate(ApproximateQuantile);

      // A streaming split to two scoring tasks, against the driver scoring alone what it iterates.
      const splitRates: number[] = [];
      const driverRates: number[] = [];
      for (let round = 0; round < 3; round++) {
        let start = nowNs();
        const shares = await get(fromItems(rows, { parallelism: 16 }).streamingSplit(2, { progress: false }).map((iterator) => scoreShare.options({ numCpus: 0 }).remote(iterator, BATCH)));
        if (shares[0] + shares[1] !== ROWS) throw new Error(`the split's consumers scored ${shares.join(' + ')} rows of ${ROWS}`);
        splitRates.push(ROWS / elapsedSeconds(start));
        start = nowNs();
        let scored = 0;
        for await (const batch of fromItems(rows, { parallelism: 16 }).iterBatches({ batchSize: BATCH, progress: false })) scored += model.predict((batch as { text: string[] }).text).length;
        if (scored !== ROWS) throw new Error(`the driver scored ${scored} rows of ${ROWS}`);
        driverRates.push(ROWS / elapsedSeconds(start));
      }
      console.error(`split rounds (2 consumers / the driver alone, rows/s): ${splitRates.map((value, index) => `${Math.round(value)} / ${Math.round(driverRates[index])}`).join('; ')}`);

      // Checkpointed writes: what recording costs a write, and what a resume's filter costs a read.
      const root = mkdtempSync(join(tmpdir(), 'trellis-bench-checkpoint-'));
      let directory = 0;
      const source = () => range(CHECKPOINT_ROWS, { parallelism: CHECKPOINT_TASKS });
      const writeRate = async (checkpointed: boolean, keep = false): Promise<{ rate: number; out: string }> => {
        const out = join(root, String(directory++));
        const start = nowNs();
        await source().writeArrow(out, { progress: false, ...(checkpointed ? { checkpoint: { idColumn: 'id', deleteOnSuccess: !keep } } : {}) });
        return { rate: CHECKPOINT_ROWS / elapsedSeconds(start), out };
      };
      const plainWrites: number[] = [];
      const checkpointedWrites: number[] = [];
      const resumes: number[] = [];
      const readPasses: number[] = [];
      try {
        await writeRate(true);
        for (let round = 0; round < 3; round++) {
          plainWrites.push((await writeRate(false)).rate);
          const { rate, out } = await writeRate(true, true);
          checkpointedWrites.push(rate);
          let start = nowNs();
          const resumed = source();
          await resumed.writeArrow(out, { progress: false, checkpoint: { idColumn: 'id' } });
          resumes.push(CHECKPOINT_ROWS / elapsedSeconds(start));
          if (resumed.stats()?.checkpoint?.resumedRows !== CHECKPOINT_ROWS) throw new Error(`the resumed run skipped ${resumed.stats()?.checkpoint?.resumedRows} rows of ${CHECKPOINT_ROWS}`);
          start = nowNs();
          const read = await source().mapBatches(identity, { batchSize: null, batchFormat: 'arrow' }).count({ progress: false });
          if (read !== CHECKPOINT_ROWS) throw new Error(`the read pass gave ${read} rows of ${CHECKPOINT_ROWS}`);
          readPasses.push(CHECKPOINT_ROWS / elapsedSeconds(start));
        }
      } finally {
        rmSync(root, { recursive: true, force: true });
      }
      // The filter's lookup alone, in this process: against a plain Set of the written ids.
      const writtenIds = BigInt64Array.from({ length: 1 << 19 }, (_, index) => BigInt(index * 2));
      const probeIds = BigInt64Array.from({ length: 1 << 20 }, (_, index) => BigInt(index));
      const sorted = WrittenIds.fromBlock(storedIdSet({ kind: 'bigint', values: writtenIds }));
      const hashed = new Set(writtenIds);
      const lookupNs = (test: () => number): number => {
        const times: number[] = [];
        for (let round = 0; round < 5; round++) {
          const start = nowNs();
          if (test() !== 1 << 19) throw new Error('the lookup found the wrong ids');
          times.push((elapsedSeconds(start) * 1e9) / probeIds.length);
        }
        return median(times);
      };
      const sortedNs = lookupNs(() => sorted.written({ kind: 'bigint', values: probeIds }, 'bench').reduce((sum, hit) => sum + hit, 0));
      const setNs = lookupNs(() => {
        let hits = 0;
        for (let index = 0; index < probeIds.length; index++) if (hashed.has(probeIds[index])) hits++;
        return hits;
      });
      // Compressed text: what gzip costs a JSONL read and write, and decompression's own rate.
      const textRoot = mkdtempSync(join(tmpdir(), 'trellis-bench-text-'));
      const textReads: Record<'plain' | 'gzip', number[]> = { plain: [], gzip: [] };
      const textWrites: Record<'plain' | 'gzip', number[]> = { plain: [], gzip: [] };
      const gunzips: number[] = [];
      try {
        const reviews = Array.from({ length: TEXT_ROWS }, (_, id) => ({ id, text: reviewText(id), stars: (id % 5) + 1 }));
        for (let round = 0; round < 3; round++) {
          for (const kind of ['plain', 'gzip'] as const) {
            const out = join(textRoot, `${kind}-${round}`);
            const start = nowNs();
            await fromItems(reviews, { parallelism: TEXT_FILES }).writeJsonl(out, { progress: false, ...(kind === 'gzip' ? { compression: 'gzip' } : {}) });
            textWrites[kind].push(TEXT_ROWS / elapsedSeconds(start));
          }
          for (const kind of ['plain', 'gzip'] as const) {
            const start = nowNs();
            const count = await readJsonl(join(textRoot, `${kind}-${round}`)).count({ progress: false });
            if (count !== TEXT_ROWS) throw new Error(`the ${kind} JSONL read gave ${count} rows of ${TEXT_ROWS}`);
            textReads[kind].push(TEXT_ROWS / elapsedSeconds(start));
          }
          const directory = join(textRoot, `gzip-${round}`);
          const files = readdirSync(directory).filter((name) => name.endsWith('.gz')).map((name) => readFileSync(join(directory, name)));
          const start = nowNs();
          for (const file of files) gunzipSync(file);
          gunzips.push(TEXT_ROWS / elapsedSeconds(start));
        }
      } finally {
        rmSync(textRoot, { recursive: true, force: true });
      }
      // Parquet filters: a sixteenth of the rows by id, pushed into the read (row groups outside
      // it are never read) against the same filter run after reading every row.
      const parquetRoot = mkdtempSync(join(tmpdir(), 'trellis-bench-parquet-'));
      const pushedReads: number[] = [];
      const wholeReads: number[] = [];
      try {
        const perFile = PARQUET_ROWS / PARQUET_FILES;
        const parts = Array.from({ length: PARQUET_FILES }, (_, file) =>
          tableFromArrays({
            id: Int32Array.from({ length: perFile }, (_, row) => file * perFile + row),
            score: Float64Array.from({ length: perFile }, (_, row) => ((file * perFile + row) * 7919) % 1000 / 1000),
            text: Array.from({ length: perFile }, (_, row) => reviewText(file * perFile + row)),
          }),
        );
        await fromArrow(parts).writeParquet(parquetRoot, { rowGroupRows: PARQUET_GROUP_ROWS, progress: false });
        const low = PARQUET_ROWS / 2;
        const filter: RowFilter = [['id', '>=', low], ['id', '<', low + PARQUET_ROWS / 16]];
        const timedCount = async (dataset: Dataset): Promise<number> => {
          const start = nowNs();
          const count = await dataset.count({ progress: false });
          if (count !== PARQUET_ROWS / 16) throw new Error(`the Parquet filter kept ${count} rows of ${PARQUET_ROWS / 16}`);
          return PARQUET_ROWS / elapsedSeconds(start);
        };
        for (let round = 0; round < 3; round++) {
          pushedReads.push(await timedCount(readParquet(parquetRoot).filter(filter)));
          // A limit first (of more rows than there are): the filter then runs as a stage over
          // everything read. Learned: selectColumns no longer did, since filters pass through
          // column-only stages into the read, and this baseline had silently become the pushdown.
          wholeReads.push(await timedCount(readParquet(parquetRoot).limit(Number.MAX_SAFE_INTEGER).filter(filter)));
        }
      } finally {
        rmSync(parquetRoot, { recursive: true, force: true });
      }
      console.error(`parquet rounds (filter pushed down / read whole, dataset rows/s): ${pushedReads.map((value, index) => `${Math.round(value)} / ${Math.round(wholeReads[index])}`).join('; ')}`);

      console.error(`text rounds (read plain / gzip, write plain / gzip rows/s): ${textReads.plain.map((value, index) => `${Math.round(value)} / ${Math.round(textReads.gzip[index])}, ${Math.round(textWrites.plain[index])} / ${Math.round(textWrites.gzip[index])}`).join('; ')}`);

      console.error(`checkpoint rounds (plain / checkpointed write, resume / read pass rows/s): ${plainWrites.map((value, index) => `${Math.round(value)} / ${Math.round(checkpointedWrites[index])}, ${Math.round(resumes[index])} / ${Math.round(readPasses[index])}`).join('; ')}`);

      return {
        sort_rows_per_s: { value: round(sortRate, 0), unit: 'rows/s' },
        sort_single_process_rows_per_s: { value: round(sortSingle, 0), unit: 'rows/s' },
        groupby_rows_per_s: { value: round(groupRate, 0), unit: 'rows/s' },
        groupby_single_process_rows_per_s: { value: round(groupSingle, 0), unit: 'rows/s' },
        groupby_quantile_rows_per_s: { value: round(exactQuantile, 0), unit: 'rows/s' },
        groupby_approx_quantile_rows_per_s: { value: round(approximateQuantile, 0), unit: 'rows/s' },
        plain_write_rows_per_s: { value: round(median(plainWrites), 0), unit: 'rows/s' },
        checkpointed_write_rows_per_s: { value: round(median(checkpointedWrites), 0), unit: 'rows/s' },
        read_pass_rows_per_s: { value: round(median(readPasses), 0), unit: 'rows/s' },
        resume_skip_rows_per_s: { value: round(median(resumes), 0), unit: 'rows/s' },
        checkpoint_ms_per_write: { value: round(((CHECKPOINT_ROWS / median(checkpointedWrites) - CHECKPOINT_ROWS / median(plainWrites)) * 1000) / CHECKPOINT_TASKS, 3), unit: 'ms' },
        checkpoint_lookup_ns_per_row: { value: round(sortedNs, 1), unit: 'ns' },
        set_lookup_ns_per_row: { value: round(setNs, 1), unit: 'ns' },
        jsonl_read_rows_per_s: { value: round(median(textReads.plain), 0), unit: 'rows/s' },
        jsonl_gzip_read_rows_per_s: { value: round(median(textReads.gzip), 0), unit: 'rows/s' },
        gunzip_rows_per_s: { value: round(median(gunzips), 0), unit: 'rows/s' },
        jsonl_write_rows_per_s: { value: round(median(textWrites.plain), 0), unit: 'rows/s' },
        jsonl_gzip_write_rows_per_s: { value: round(median(textWrites.gzip), 0), unit: 'rows/s' },
        parquet_filter_pushdown_rows_per_s: { value: round(median(pushedReads), 0), unit: 'rows/s' },
        parquet_filter_full_read_rows_per_s: { value: round(median(wholeReads), 0), unit: 'rows/s' },
        streaming_split_rows_per_s: { value: round(median(splitRates), 0), unit: 'rows/s' },
        driver_iter_rows_per_s: { value: round(median(driverRates), 0), unit: 'rows/s' },
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
