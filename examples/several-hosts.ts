/**
 * A cluster of several hosts, on one: the driver listens, two node agents join it (each a
 * `trellis node` process, as they would be on other machines), and a dataset's actor pool runs
 * on the agents while its blocks move between their stores and the driver's.
 * Run: node --import tsx examples/several-hosts.ts
 *
 * On real hosts, each runs `npx trellis node --head DRIVER_HOST:7380` with TRELLIS_CLUSTER_TOKEN
 * set, and the driver calls init({ listen: { port: 7380 } }).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { events, fromItems, getRuntimeContext, init, remote, shutdown, state, waitForNodes } from '../lib/index.js';

/** A stand-in for a model: embeds each text as character counts, and says where it ran. */
export class Embedder {
  readonly nodeId = getRuntimeContext().nodeId;
  call(batch: { text: string[] }) {
    const embedding = batch.text.map((text) => {
      const vector = new Float32Array(26);
      for (const char of text.toLowerCase()) if (char >= 'a' && char <= 'z') vector[char.charCodeAt(0) - 97]++;
      return Array.from(vector);
    });
    return { text: batch.text, embedding, node: batch.text.map(() => this.nodeId) };
  }
}
remote(import.meta, Embedder);

function startAgent(port: number, id: string, token: string): ChildProcess {
  const cli = fileURLToPath(new URL('../lib/cli/trellis.ts', import.meta.url));
  // With this process's Node.js flags: the TypeScript loader it was started with.
  return spawn(process.execPath, [...process.execArgv, cli, 'node', '--head', `127.0.0.1:${port}`, '--id', id, '--num-cpus', '1', '--resources', '{"worker-host": 1}', '--once'], {
    env: { ...process.env, TRELLIS_CLUSTER_TOKEN: token },
    stdio: ['ignore', 'inherit', 'inherit'],
  });
}

async function main() {
  const token = randomBytes(16).toString('hex');
  await init({ numCpus: 1, listen: { host: '127.0.0.1', port: 0, token } });
  const agents: ChildProcess[] = [];
  try {
    const port = state().listening!.port;
    agents.push(startAgent(port, 'host-a', token), startAgent(port, 'host-b', token));
    await waitForNodes(3, { timeout: 60_000 });
    console.log('nodes:', state().nodes.map((node) => `${node.nodeId}${node.hostname ? ` (agent on ${node.hostname})` : ' (driver)'}`).join(', '));

    let movedBytes = 0;
    events().on('object-transfer', ({ bytes }: { bytes: number }) => (movedBytes += bytes));
    const texts = Array.from({ length: 20_000 }, (_, i) => ({ text: `document ${i}: ${'the quick brown fox '.repeat(1 + (i % 5))}` }));
    const rows = await fromItems(texts, { parallelism: 16 })
      .mapBatches(Embedder, { concurrency: 2, resources: { 'worker-host': 1 }, batchSize: 500 })
      .takeAll();
    const perNode = new Map<string, number>();
    for (const row of rows) perNode.set(row.node as string, (perNode.get(row.node as string) ?? 0) + 1);
    console.log(`embedded ${rows.length} texts:`, Object.fromEntries(perNode));
    console.log(`moved between stores: ${(movedBytes / 2 ** 20).toFixed(1)} MiB`);
  } finally {
    await shutdown();
    for (const agent of agents) agent.kill();
  }
}

if (import.meta.url === `file://${process.argv[1]}`) await main();
