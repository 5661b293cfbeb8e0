/**
 * A work queue with observability: producer tasks fill a bounded Queue, worker actors drain it
 * (a `stats()` call in its own concurrency group answers while they work), application metrics
 * count what they did, and the run is written as a trace for Perfetto.
 * Run: node --import tsx examples/work-queue.ts [trace.json]   (default: the temp directory)
 */
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Counter, Histogram, Queue, get, init, listTasks, metricsText, remote, shutdown, timeline } from '../lib/index.js';

const handled = new Counter('example_items_handled_total', { description: 'Items the workers handled.', tagKeys: ['worker'] });
const itemSeconds = new Histogram('example_item_seconds', { description: 'Time spent on one item.', boundaries: [0.001, 0.005, 0.02] });

/** Puts `count` items on the queue, waiting for room while it is full. */
export const produce = remote(import.meta, async function produce(queue: Queue<number>, first: number, count: number) {
  for (let item = first; item < first + count; item++) await queue.put(item);
  return count;
});

export class Worker {
  #handled = 0;
  constructor(readonly name: string) {
    handled.setDefaultTags({ worker: name });
  }

  /** Takes items until it gets `stop` (-1), "working" a few milliseconds on each. */
  async drain(queue: Queue<number>) {
    for (;;) {
      const item = await queue.get();
      if (item < 0) return this.#handled;
      const started = performance.now();
      await new Promise((resolve) => setTimeout(resolve, 2 + (item % 3)));
      this.#handled++;
      handled.inc();
      itemSeconds.observe((performance.now() - started) / 1000);
    }
  }

  /** Answers while drain() runs: it is in a concurrency group of its own. */
  stats() {
    return { worker: this.name, handled: this.#handled };
  }
}
export const RemoteWorker = remote(import.meta, Worker, { concurrencyGroups: { control: 1 }, methods: { stats: { concurrencyGroup: 'control' } } });

async function main() {
  const tracePath = process.argv[2] ?? join(tmpdir(), 'trellis-work-queue-trace.json');
  await init({ numCpus: 4 });
  try {
    await using queue = new Queue<number>({ maxSize: 16 });
    const workers = ['a', 'b'].map((name) => RemoteWorker.remote(name));
    const draining = workers.map((worker) => worker.drain.remote(queue));
    const produced = [produce.remote(queue, 0, 60), produce.remote(queue, 1000, 60)];
    await get(produced);
    // Mid-run: stats() does not wait behind drain(), which runs until it is told to stop.
    const stats = await get(workers.map((worker) => worker.stats.remote()));
    console.log('while draining', stats.map((each) => `${each.worker}: ${each.handled}`).join(', '));
    // One stop per worker, each waiting for room (the queue may still be nearly full).
    for (let stop = 0; stop < workers.length; stop++) await queue.put(-1);
    const counts = await get(draining);
    console.log('handled', counts, 'total', counts.reduce((sum, count) => sum + count, 0)); // total 120
    const total = metricsText().split('\n').filter((line) => line.startsWith('example_items_handled_total{')).sort();
    console.log('metrics', total.join('; '));
    const tasks = listTasks();
    console.log('calls', tasks.length, 'finished', tasks.filter((task) => task.state === 'finished').length);
    const events = timeline(tracePath);
    console.log('trace', tracePath, events.filter((event) => event.ph === 'X').length, 'spans');
  } finally {
    await shutdown();
  }
}

if (import.meta.url === `file://${process.argv[1]}`) await main();
