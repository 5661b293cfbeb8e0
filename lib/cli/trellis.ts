#!/usr/bin/env node
/**
 * The trellis command. `trellis node --head HOST:PORT` runs a node agent: this host joins the
 * cluster of the driver listening there (init's `listen`), and joins the next driver's when that
 * one ends.
 */
import { parseArgs } from 'node:util';
import { NodeAgent } from '../core/node-agent.js';
import { TrellisError } from '../errors.js';

const usage = `usage: trellis node --head HOST:PORT [options]

Joins this host to the cluster of the driver listening at HOST:PORT (init({ listen })).
  --token TOKEN              the cluster's token (default: TRELLIS_CLUSTER_TOKEN)
  --id NAME                  the node's id (default: hostname-pid)
  --num-cpus N               CPUs to offer (default: this host's count)
  --num-gpus N               GPUs to offer (default: the CUDA devices here, else 0)
  --memory BYTES             the memory resource to offer (default 0)
  --resources JSON           custom resources, e.g. '{"ssd": 1}'
  --object-store-memory BYTES  the store segment's capacity
  --transfer-port N          where other agents pull objects from (default: any free port)
  --advertise-host HOST      the address other agents reach this one at
                             (default: its address on the driver's connection)
  --once                     serve one driver, then exit
`;

function count(name: string, text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (!Number.isFinite(value) || value < 0) throw new TrellisError('ERR_INVALID_ARGUMENT', `--${name} takes a number >= 0, got '${text}'`);
  return value;
}

async function defaultGpus(): Promise<number> {
  try {
    const { cuda } = await import('../gpu/cuda.js');
    return cuda.available ? cuda.deviceCount() : 0;
  } catch {
    return 0;
  }
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command !== 'node') {
    process.stderr.write(usage);
    return command === undefined || command === '--help' || command === 'help' ? 0 : 2;
  }
  const { values } = parseArgs({
    args: rest,
    options: {
      head: { type: 'string' },
      token: { type: 'string' },
      id: { type: 'string' },
      'num-cpus': { type: 'string' },
      'num-gpus': { type: 'string' },
      memory: { type: 'string' },
      resources: { type: 'string' },
      'object-store-memory': { type: 'string' },
      'transfer-port': { type: 'string' },
      'advertise-host': { type: 'string' },
      once: { type: 'boolean' },
      help: { type: 'boolean' },
    },
  });
  if (values.help || !values.head) {
    process.stderr.write(usage);
    return values.help ? 0 : 2;
  }
  let resources: Record<string, number> | undefined;
  if (values.resources !== undefined) {
    try {
      resources = JSON.parse(values.resources) as Record<string, number>;
    } catch {
      throw new TrellisError('ERR_INVALID_ARGUMENT', `--resources takes a JSON object of numbers, got '${values.resources}'`);
    }
    if (typeof resources !== 'object' || resources === null || Object.values(resources).some((value) => typeof value !== 'number' || !(value >= 0))) {
      throw new TrellisError('ERR_INVALID_ARGUMENT', `--resources takes a JSON object of numbers >= 0, got '${values.resources}'`);
    }
  }
  const { cpus } = await import('node:os');
  const agent = new NodeAgent({
    head: values.head,
    token: values.token,
    id: values.id,
    numCpus: count('num-cpus', values['num-cpus']) ?? cpus().length,
    numGpus: count('num-gpus', values['num-gpus']) ?? (await defaultGpus()),
    memory: count('memory', values.memory),
    resources,
    objectStoreMemory: count('object-store-memory', values['object-store-memory']),
    once: values.once,
    transferPort: count('transfer-port', values['transfer-port']),
    advertiseHost: values['advertise-host'],
    log: (line) => process.stderr.write(`trellis node: ${line}\n`),
  });
  const stop = () => void agent.close();
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  await agent.done;
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error: Error) => {
    process.stderr.write(`trellis: ${error.message}\n`);
    process.exit(1);
  },
);
