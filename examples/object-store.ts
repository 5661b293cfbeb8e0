/**
 * The object store on its own: the driver puts an Arrow table and a Float64Array into shared
 * memory, two other processes read them zero-copy and report sums, and the store shows its use.
 * Run: npm run demo
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { tableFromArrays, tableFromIPC, tableToIPC } from 'apache-arrow';
import { ObjectStore, newObjectId } from '../lib/index.js';

async function reader(storeName: string, tableId: string, arrayId: string): Promise<void> {
  using store = ObjectStore.attach(storeName);
  using tableView = await store.get(tableId, { timeout: 10_000 });
  using arrayView = await store.get(arrayId, { timeout: 10_000 });
  const table = tableFromIPC(tableView.data);
  const scores = table.getChild('score')!.toArray() as Float64Array;
  const values = new Float64Array(arrayView.data.buffer, arrayView.data.byteOffset, arrayView.size / 8);
  const sharesMemory = scores.buffer === tableView.data.buffer;
  console.log(
    `  reader ${process.pid}: ${table.numRows} rows, score sum ${scores.reduce((a, b) => a + b, 0)}, ` +
      `array sum ${values.reduce((a, b) => a + b, 0)}, zero-copy: ${sharesMemory}`,
  );
}

async function main(): Promise<void> {
  await using store = ObjectStore.create({ capacity: 256 << 20 });
  const rows = 100_000;
  const table = tableFromArrays({
    id: Int32Array.from({ length: rows }, (_, i) => i),
    score: Float64Array.from({ length: rows }, (_, i) => i % 10),
  });
  const tableId = newObjectId();
  store.put(tableId, tableToIPC(table));
  const arrayId = newObjectId();
  const builder = store.create(arrayId, 8 * 1_000_000);
  new Float64Array(builder.data.buffer, builder.data.byteOffset, 1_000_000).fill(0.5);
  builder.seal();

  console.log(`store ${store.name}: ${store.stats().objectCount} objects, ${store.stats().bytesInUse} bytes in use`);
  const self = fileURLToPath(import.meta.url);
  await Promise.all(
    [0, 1].map(
      () =>
        new Promise<void>((resolve, reject) => {
          const child = spawn(process.execPath, ['--import', 'tsx', self, store.name, tableId, arrayId], { stdio: 'inherit' });
          child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`reader exited with ${code}`))));
        }),
    ),
  );
  store.delete(tableId);
  store.delete(arrayId);
  console.log(`after delete: ${store.stats().objectCount} objects, ${store.stats().bytesInUse} bytes in use`);
}

const [storeName, tableId, arrayId] = process.argv.slice(2);
if (storeName) await reader(storeName, tableId, arrayId);
else await main();
