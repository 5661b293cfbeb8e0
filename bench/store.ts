/**
 * Object store suite. Floors measured in the same run: a plain memcpy of the same size into
 * memory that is already faulted in. That baseline stays glibc's memcpy (one thread, ordinary
 * stores), while a put of 100 MB copies with non-temporal stores on several threads (BulkCopy in
 * native/common): put / memcpy may exceed 1, and compares the store with what a naive copy gets.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { ObjectStore, newObjectId } from '../lib/index.js';
import { median, nowNs, elapsedSeconds, timeRuns, round, type Results, type Suite } from './harness.js';

const MB = 1e6;
const GiB = 2 ** 30;

function measureMemcpy(size: number, runs: number): number {
  const source = Buffer.alloc(size, 7);
  const destination = Buffer.alloc(size, 1);
  destination.set(source);
  return size / median(timeRuns(runs, () => destination.set(source))) / 1e9;
}

function measurePut(store: ObjectStore, size: number, runs: number): number {
  const source = Buffer.alloc(size, 7);
  // Warm-up: the first put faults fresh pages in; later puts reuse the freed block.
  for (let i = 0; i < 2; i++) {
    const id = newObjectId();
    store.put(id, source);
    store.delete(id);
  }
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    const id = newObjectId();
    const start = nowNs();
    store.put(id, source);
    times.push(elapsedSeconds(start));
    store.delete(id);
  }
  return size / median(times) / 1e9;
}

/** Another process attaches and gets a sealed 1 GiB object repeatedly: a zero-copy pin. */
async function measureRemoteGet(store: ObjectStore): Promise<number> {
  const id = newObjectId();
  // Contents do not matter to a zero-copy get: seal without writing, so nothing is touched.
  store.create(id, GiB);
  store.seal(id);
  const reader = fileURLToPath(new URL('./store-reader.ts', import.meta.url));
  const output = await new Promise<string>((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', reader, store.name, id, '200'], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let text = '';
    child.stdout.on('data', (chunk) => (text += chunk));
    child.on('error', reject);
    child.on('exit', (code) => (code === 0 ? resolve(text) : reject(new Error(`store reader exited with ${code}`))));
  });
  store.delete(id);
  return (JSON.parse(output) as { medianUs: number }).medianUs;
}

function measureSmall(store: ObjectStore, count: number): { puts: number; gets: number } {
  const payload = new Uint8Array(64).fill(3);
  const ids = Array.from({ length: count }, () => newObjectId());
  // Warm-up round on the same ids.
  for (const id of ids) store.put(id, payload);
  for (const id of ids) store.delete(id);
  let start = nowNs();
  for (const id of ids) store.put(id, payload);
  const puts = count / elapsedSeconds(start);
  start = nowNs();
  for (const id of ids) store.getIfSealed(id)!.release();
  const gets = count / elapsedSeconds(start);
  for (const id of ids) store.delete(id);
  return { puts, gets };
}

/** One stats() call: running counts read under the lock (once a scan of every entry). */
function measureStats(store: ObjectStore, runs: number): number {
  store.stats();
  return median(timeRuns(runs, () => store.stats())) * 1e6;
}

export const storeSuite: Suite = {
  name: 'store',
  ratios: [
    ['put / memcpy (100 MB)', 'put_100MB_GBps', 'memcpy_100MB_GBps', '>= 0.70'],
  ],
  async run(): Promise<Results> {
    const store = ObjectStore.create({ capacity: GiB + 512 * 2 ** 20, spillDirectory: false });
    try {
      const size = 100 * MB;
      const memcpy = measureMemcpy(size, 15);
      const put = measurePut(store, size, 15);
      const small = measureSmall(store, 50_000);
      const getUs = await measureRemoteGet(store);
      const statsUs = measureStats(store, 200);
      return {
        put_100MB_GBps: { value: round(put), unit: 'GB/s' },
        memcpy_100MB_GBps: { value: round(memcpy), unit: 'GB/s' },
        get_1GB_us: { value: round(getUs, 1), unit: 'us' },
        small_put_per_s: { value: Math.round(small.puts), unit: 'ops/s' },
        small_get_per_s: { value: Math.round(small.gets), unit: 'ops/s' },
        stats_us: { value: round(statsUs, 1), unit: 'us' },
      };
    } finally {
      store.close();
    }
  },
};
