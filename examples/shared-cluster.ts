/**
 * A shared cluster, on one host: a broker, two hosts that register with it (each a
 * `trellis node --broker` process, as they would be on other machines, 2 CPUs each), and four
 * users' batch jobs, each its own driver process. Two jobs ask for 2 CPUs each and run side by
 * side; the third asks for 3 at once and waits until they end; the fourth, of priority 5, takes
 * 2 CPUs back from one of the first two, which goes on once it is done. Each job embeds texts
 * through an actor pool on the slices it was lent.
 * Run: node --import tsx examples/shared-cluster.ts
 *
 * On real hosts: `npx trellis broker` once, `npx trellis node --broker BROKER_HOST:7390` on each
 * host, TRELLIS_CLUSTER_TOKEN set everywhere, and each driver calls
 * init({ cluster: { address: 'BROKER_HOST:7390', resources: { CPU: 2 } } }).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { Broker, brokerStatus, fromItems, init, shutdown, state, type BrokerStatus } from '../lib/index.js';
// The model stand-in of the several-hosts example: letter counts, and the node it ran on.
import { Embedder } from './several-hosts.js';


const self = fileURLToPath(import.meta.url);

/**
 * One user's job: a driver that joins the cluster, embeds its texts and leaves. It starts when
 * the demo says 'go' (its process already up, so jobs arrive when the story needs them), and
 * leaves when the demo closes its input: until then it holds its slices, as a driver holds its
 * cluster until its script ends.
 */
async function job(name: string, address: string, cpus: number, priority: number): Promise<void> {
  const input = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  while ((await input.next()).value !== 'go');
  const asked = Date.now();
  await init({ cluster: { address, resources: { CPU: cpus }, name, priority } });
  const waited = Date.now() - asked;
  const texts = Array.from({ length: 6000 }, (_, i) => ({ text: `${name} document ${i}: ${'the quick brown fox '.repeat(1 + (i % 5))}` }));
  const rows = await fromItems(texts, { parallelism: 12 }).mapBatches(Embedder, { concurrency: cpus, batchSize: 250 }).takeAll();
  const perNode = new Map<string, number>();
  for (const row of rows) perNode.set(row.node as string, (perNode.get(row.node as string) ?? 0) + 1);
  while (!(await input.next()).done);
  const preempted = state().broker!.preempted;
  const notes = [priority > 0 ? `priority ${priority}` : '', preempted > 0 ? `taken back ${preempted} time(s) for a job of higher priority` : ''].filter(Boolean).join('; ');
  console.log(`${name}: lent ${cpus} CPUs after ${(waited / 1000).toFixed(1)} s; embedded ${rows.length} texts on ${[...perNode].map(([node, count]) => `${node} (${count})`).join(', ')}${notes ? ` (${notes})` : ''}`);
  await shutdown();
}

function describe(status: BrokerStatus): string {
  const hosts = [...status.hosts].sort((a, b) => a.hostId.localeCompare(b.hostId)).map((host) => `${host.hostId} ${host.free.CPU ?? 0}/${host.total.CPU ?? 0} CPUs free`).join(', ');
  const jobs = [...status.drivers].sort((a, b) => a.name.localeCompare(b.name)).map((driver) => `${driver.name} ${driver.granted}/${driver.bundles} lent`).join(', ');
  return `hosts: ${hosts}; jobs: ${jobs || 'none'}`;
}

async function main(): Promise<void> {
  const token = randomBytes(16).toString('hex');
  process.env.TRELLIS_CLUSTER_TOKEN = token;
  const broker = await Broker.start({ host: '127.0.0.1', port: 0 });
  const address = `127.0.0.1:${broker.port}`;
  const cli = fileURLToPath(new URL('../lib/cli/trellis.ts', import.meta.url));
  const processes: ChildProcess[] = [];
  const start = (args: string[]) => {
    // With this process's Node.js flags: the TypeScript loader it was started with.
    const child = spawn(process.execPath, [...process.execArgv, ...args], { stdio: ['pipe', 'pipe', 'inherit'] });
    createInterface({ input: child.stdout! }).on('line', (line) => console.log(line));
    processes.push(child);
    return { child, exited: new Promise<number | null>((resolve) => child.once('exit', resolve)) };
  };
  const run = (args: string[]) => start(args).exited;
  try {
    for (const host of ['host-a', 'host-b']) void run([cli, 'node', '--broker', address, '--id', host, '--num-cpus', '2', '--object-store-memory', String(256 * 2 ** 20)]);
    while ((await brokerStatus(address)).hosts.length < 2) await new Promise((resolve) => setTimeout(resolve, 50));
    console.log(describe(await brokerStatus(address)));
    const jobs = [['alice', '2', '0'], ['bob', '2', '0'], ['carol', '3', '0'], ['dave', '2', '5']].map(([name, cpus, priority]) => start([self, 'job', name, address, cpus, priority]));
    const [alice, bob, carol, dave] = jobs;
    const until = async (holds: (status: BrokerStatus) => boolean) => {
      while (!holds(await brokerStatus(address))) {
        const gone = jobs.findIndex((one) => one.child.exitCode !== null);
        if (gone >= 0) throw new Error(`a job's process exited early (code ${jobs[gone].child.exitCode})`);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    };
    const granted = (name: string) => (status: BrokerStatus) => status.drivers.some((driver) => driver.name === name && driver.granted > 0);
    alice.child.stdin!.write('go\n');
    bob.child.stdin!.write('go\n');
    await until((status) => granted('alice')(status) && granted('bob')(status));
    // A gang of 3 CPUs: the cluster's 4 are held, so it waits.
    carol.child.stdin!.write('go\n');
    await until((status) => status.drivers.some((driver) => driver.name === 'carol'));
    console.log(describe(await brokerStatus(address)));
    // An urgent job: the cluster is full, so it takes a slice back from a job of lower priority.
    dave.child.stdin!.write('go\n');
    await until(granted('dave'));
    console.log(describe(await brokerStatus(address)));
    // The jobs may leave once done.
    for (const one of jobs) one.child.stdin!.end();
    const codes = await Promise.all(jobs.map((one) => one.exited));
    console.log(describe(await brokerStatus(address)));
    if (codes.some((code) => code !== 0)) process.exitCode = 1;
  } finally {
    for (const child of processes) if (child.exitCode === null) child.kill('SIGTERM');
    await broker.close();
  }
}

if (process.argv[1] === self) {
  if (process.argv[2] === 'job') await job(process.argv[3], process.argv[4], Number(process.argv[5]), Number(process.argv[6] ?? 0));
  else await main();
}
