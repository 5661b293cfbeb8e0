/**
 * The platform team's job: read reviews from a custom source, classify them with a model that each
 * actor loads once, and write the predictions as JSONL through a custom sink.
 *
 *   npm run demo            (node --import tsx examples/batch-inference.ts [outputDir])
 *
 * 1,000 rows arrive in blocks of 5 (200 read tasks); batches of 64 go through an autoscaling pool
 * of classifier actors (one GPU each where a GPU is present, one CPU otherwise); each write task
 * writes one JSONL file. Progress is drawn while it runs; rows per second are printed at the end.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  Count, Datasink, Datasource, Mean, ReadTask, cuda, init, readDatasource, readJsonl, remote, shutdown, type Block, type WriteContext,
} from '../lib/index.js';
import { ReviewClassifier, reviewText } from './model/review-classifier.js';

// ---------------------------------------------------------------------------------------------
// The source: reviews by id, as a custom Datasource. Each read task runs readReviews in a worker.

export const readReviews = remote(import.meta, function* readReviews(firstId: number, count: number) {
  for (let id = firstId; id < firstId + count; id++) yield { id, text: reviewText(id) };
});

export class ReviewSource extends Datasource {
  constructor(
    readonly rows: number,
    readonly rowsPerTask: number,
  ) {
    super();
  }
  override get name(): string {
    return 'Reviews';
  }
  getReadTasks(): ReadTask[] {
    const tasks: ReadTask[] = [];
    for (let first = 0; first < this.rows; first += this.rowsPerTask) {
      const count = Math.min(this.rowsPerTask, this.rows - first);
      tasks.push(new ReadTask(readReviews, [first, count], { rows: count }));
    }
    return tasks;
  }
}

// ---------------------------------------------------------------------------------------------
// The model: loaded once per actor, in its constructor; `call` classifies one batch.

export class Classifier {
  readonly #model: ReviewClassifier;
  constructor(seed: number) {
    this.#model = new ReviewClassifier(seed);
  }
  call(batch: { id: ArrayLike<number>; text: string[] }) {
    const predictions = this.#model.predict(batch.text);
    return {
      id: Array.from(batch.id),
      text: batch.text,
      label: predictions.map((prediction) => prediction.label),
      score: predictions.map((prediction) => Math.round(prediction.score * 1000) / 1000),
    };
  }
}
remote(import.meta, Classifier);

// ---------------------------------------------------------------------------------------------
// The sink: one JSONL file per write task, written under a temporary name and renamed, so a retried
// task never leaves half a file; onWriteComplete records a manifest. With a checkpoint the rename
// waits for commit(), after the checkpoint has recorded the rows: a stopped job resumed later
// writes each row exactly once.

type Written = { file: string; rows: number; staged?: string };

export class PredictionsSink extends Datasink<Written> {
  constructor(readonly directory: string) {
    super();
  }
  override onWriteStart(): void {
    mkdirSync(this.directory, { recursive: true });
  }
  write(blocks: Block[], context: WriteContext): Written {
    const file = join(this.directory, `predictions-${context.writeId}-${String(context.taskIndex).padStart(4, '0')}.jsonl`);
    const lines: string[] = [];
    for (const block of blocks) for (const row of block) lines.push(JSON.stringify(row!.toJSON()));
    const temp = join(this.directory, `.${context.writeId}-${context.taskIndex}-${context.attempt}.tmp`);
    writeFileSync(temp, `${lines.join('\n')}\n`);
    if (context.staged) return { file, rows: lines.length, staged: temp };
    renameSync(temp, file);
    return { file, rows: lines.length };
  }
  override commit(written: Written): Written {
    renameSync(written.staged!, written.file);
    return { file: written.file, rows: written.rows };
  }
  override recover(written: Written): Written | null {
    if (written.staged && existsSync(written.staged)) renameSync(written.staged, written.file);
    return existsSync(written.file) ? { file: written.file, rows: written.rows } : null;
  }
  override onWriteComplete(results: Written[]): void {
    // Temp files of writes a stopped run staged but never recorded (their rows were written again).
    for (const name of readdirSync(this.directory)) if (name.startsWith('.') && name.endsWith('.tmp')) rmSync(join(this.directory, name));
    writeFileSync(join(this.directory, '_manifest.json'), JSON.stringify(results, null, 2));
  }
  override onWriteFailed(error: Error): void {
    writeFileSync(join(this.directory, '_failed.txt'), `${error.message}\n`);
  }
}
remote(import.meta, PredictionsSink);

export async function main(outputDirectory = join(tmpdir(), 'trellis-batch-inference')): Promise<void> {
  // A run stopped midway (Ctrl-C, a crash) left its checkpoint: this run resumes it. Else afresh.
  const checkpoint = join(outputDirectory, '.checkpoint');
  if (!existsSync(checkpoint)) rmSync(outputDirectory, { recursive: true, force: true });
  const gpus = cuda.available ? cuda.deviceCount() : 0;
  await init(gpus > 0 ? { numGpus: gpus } : {});
  try {
    const started = performance.now();
    const dataset = readDatasource(new ReviewSource(1_000, 5)).mapBatches(Classifier, {
      batchSize: 64,
      constructorArgs: [7],
      // A GPU each where there are GPUs (the classifier itself computes on the CPU); else a CPU.
      ...(gpus > 0 ? { numGpus: 1, numCpus: 0, concurrency: [1, gpus] as [number, number] } : { numCpus: 1, concurrency: [1, 2] as [number, number] }),
    });
    await dataset.explain();
    const results = await dataset.write(new PredictionsSink(outputDirectory), { checkpoint: { idColumn: 'id', path: checkpoint } });
    const seconds = (performance.now() - started) / 1000;
    const resumed = dataset.stats()?.checkpoint?.resumedRows ?? 0;
    if (resumed > 0) console.log(`\nresumed a stopped run: ${resumed} rows it had written were skipped`);
    const rows = results.reduce((sum, result) => sum + result.rows, 0) - resumed;
    const files = readdirSync(outputDirectory).filter((name) => name.endsWith('.jsonl'));
    const sample = readFileSync(join(outputDirectory, files[0]), 'utf8').split('\n')[0];
    console.log(`\n${rows} rows classified in ${seconds.toFixed(2)} s: ${Math.round(rows / seconds)} rows/s`);
    console.log(`${files.length} files in ${outputDirectory}; first row: ${sample}`);
    console.log(dataset.stats()!.summary);
    // Read back what was written and summarize it: a streaming aggregation, one row per label.
    const labels = await readJsonl(files.map((name) => join(outputDirectory, name)))
      .groupBy('label')
      .aggregate(Count(), Mean('score'))
      .takeAll({ progress: false });
    for (const row of labels) console.log(`  ${row.label}: ${row['count()']} rows, mean score ${(row['mean(score)'] as number).toFixed(3)}`);
  } finally {
    await shutdown();
  }
}

if (import.meta.url === `file://${process.argv[1]}`) await main(process.argv[2]);
