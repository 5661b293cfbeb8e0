/** Child process of the store suite: attaches by name and times gets of one object. */
import { ObjectStore } from '../lib/index.js';
import { median, nowNs, elapsedSeconds } from './harness.js';

const [name, id, runsText] = process.argv.slice(2);
const store = ObjectStore.attach(name);
const times: number[] = [];
for (let i = 0; i < Number(runsText); i++) {
  const start = nowNs();
  const view = store.getIfSealed(id);
  times.push(elapsedSeconds(start) * 1e6);
  if (!view || view.size !== 2 ** 30) throw new Error('object missing or wrong size');
  view.release();
}
store.close();
process.stdout.write(JSON.stringify({ medianUs: median(times) }));
