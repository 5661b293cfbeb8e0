/**
 * Proves that users' installs compile and download nothing: packs the package, installs the
 * tarball into an empty project with --ignore-scripts, and runs a two-process object-store program
 * that can only work if the addon loads from prebuilds/.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const work = mkdtempSync(join(tmpdir(), 'trellis-pack-'));
const run = (command: string, args: string[], cwd: string) =>
  execFileSync(command, args, { cwd, stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8' });

try {
  // Build the prebuild and dist first: lifecycle output would otherwise mix with pack's JSON.
  execFileSync('npm', ['run', 'prebuild'], { cwd: root, stdio: 'inherit' });
  execFileSync('npm', ['run', 'build'], { cwd: root, stdio: 'inherit' });
  const packed = JSON.parse(run('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', work], root)) as Array<{
    filename: string;
    files: Array<{ path: string }>;
  }>;
  const tarball = join(work, packed[0].filename);
  const files = packed[0].files.map((file) => file.path);
  const prebuilt = files.filter((file) => file.startsWith('prebuilds/') && file.endsWith('.node'));
  if (prebuilt.length === 0) throw new Error('the tarball holds no prebuilt addon under prebuilds/');
  console.log(`packed ${packed[0].filename}: ${files.length} files, prebuilds: ${prebuilt.join(', ')}`);

  const project = join(work, 'consumer');
  run('mkdir', ['-p', project], work);
  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'consumer', version: '1.0.0', type: 'module' }));
  run('npm', ['install', '--ignore-scripts', '--no-audit', '--no-fund', tarball], project);
  const installed = join(project, 'node_modules', 'trellis');
  if (existsSync(join(installed, 'build'))) throw new Error('the installed package has a build/ folder: something compiled');
  console.log(`installed; package holds: ${readdirSync(installed).join(', ')}`);

  writeFileSync(
    join(project, 'main.mjs'),
    `import { ObjectStore, newObjectId } from 'trellis';
import { execFileSync } from 'node:child_process';
const store = ObjectStore.create({ capacity: 16 << 20 });
const id = newObjectId();
store.put(id, new Float64Array([1.5, 2.5, 3.5]));
const child = \`import { ObjectStore } from 'trellis';
const store = ObjectStore.attach(process.argv[1]);
const view = await store.get(process.argv[2]);
const values = new Float64Array(view.data.buffer, view.data.byteOffset, 3);
console.log(values.reduce((a, b) => a + b));
store.close();\`;
const sum = execFileSync(process.execPath, ['--input-type=module', '-e', child, store.name, id], { encoding: 'utf8' }).trim();
store.close();
if (sum !== '7.5') throw new Error('child read ' + sum);
console.log('example ran: a second process read the object zero-copy, sum ' + sum);
`,
  );
  console.log(run(process.execPath, ['main.mjs'], project).trim());

  // Tasks and actors too: workers start from the installed dist/ and import this module.
  writeFileSync(
    join(project, 'tasks.mjs'),
    `import { init, shutdown, get, remote } from 'trellis';
export const square = remote(import.meta, function square(x) { return x * x; });
class Counter { n = 0; add(k) { return (this.n += k); } }
export const RemoteCounter = remote(import.meta, Counter);
if (import.meta.url === 'file://' + process.argv[1]) {
  await init({ numCpus: 2 });
  const squares = await get([1, 2, 3].map((x) => square.remote(x)));
  const counter = RemoteCounter.remote();
  counter.add.remote(2);
  const total = await get(counter.add.remote(3));
  await shutdown();
  if (squares.join() !== '1,4,9' || total !== 5) throw new Error('tasks gave ' + squares + ' and ' + total);
  console.log('tasks and an actor ran in workers started from the installed package');
}
`,
  );
  console.log(run(process.execPath, ['tasks.mjs'], project).trim());
  // The package's command: a node agent started by its bin joins a driver, whose task runs there.
  writeFileSync(
    join(project, 'agent.mjs'),
    `import { spawn } from 'node:child_process';
import { init, shutdown, get, state, waitForNodes } from 'trellis';
import { square } from './tasks.mjs';
await init({ numCpus: 0, listen: { host: '127.0.0.1', port: 0, token: 'pack-check' } });
const agent = spawn('node_modules/.bin/trellis', ['node', '--head', '127.0.0.1:' + state().listening.port, '--id', 'packed-agent', '--num-cpus', '1', '--once'], {
  env: { ...process.env, TRELLIS_CLUSTER_TOKEN: 'pack-check' }, stdio: ['ignore', 'ignore', 'inherit'],
});
try {
  await waitForNodes(2, { timeout: 60000 });
  const value = await get(square.remote(7));
  if (value !== 49) throw new Error('the agent gave ' + value);
  console.log("a node agent started by the package's trellis command ran a task");
} finally {
  await shutdown();
  agent.kill();
}
`,
  );
  console.log(run(process.execPath, ['agent.mjs'], project).trim());
  // A shared cluster from the package's command: its broker, a host registered with it, and a
  // driver that joins with init's cluster and runs a task on the slice it is lent.
  writeFileSync(
    join(project, 'cluster.mjs'),
    `import { spawn } from 'node:child_process';
import { init, shutdown, get, brokerStatus } from 'trellis';
import { square } from './tasks.mjs';
const env = { ...process.env, TRELLIS_CLUSTER_TOKEN: 'pack-check' };
const broker = spawn('node_modules/.bin/trellis', ['broker', '--host', '127.0.0.1', '--port', '0'], { env, stdio: ['ignore', 'ignore', 'pipe'] });
const address = await new Promise((resolve, reject) => {
  let text = '';
  broker.stderr.on('data', (chunk) => {
    text += chunk;
    const found = /listening on ([\\d.]+:\\d+)/.exec(text);
    if (found) resolve(found[1]);
  });
  broker.once('exit', () => reject(new Error('the broker exited: ' + text)));
});
const host = spawn('node_modules/.bin/trellis', ['node', '--broker', address, '--id', 'packed-host', '--num-cpus', '1'], { env, stdio: ['ignore', 'ignore', 'inherit'] });
try {
  while ((await brokerStatus(address, { token: 'pack-check' })).hosts.length === 0) await new Promise((resolve) => setTimeout(resolve, 50));
  await init({ cluster: { address, token: 'pack-check', resources: { CPU: 1 } } });
  const value = await get(square.remote(8));
  if (value !== 64) throw new Error('the lent node gave ' + value);
  console.log("a driver joined a shared cluster run by the package's trellis command, and its task ran on a lent node");
} finally {
  await shutdown();
  host.kill();
  broker.kill();
}
`,
  );
  console.log(run(process.execPath, ['cluster.mjs'], project).trim());
  console.log('pack check passed');
} finally {
  rmSync(work, { recursive: true, force: true });
}
