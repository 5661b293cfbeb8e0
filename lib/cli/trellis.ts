#!/usr/bin/env node
/**
 * The trellis command. `trellis node --head HOST:PORT` runs a node agent: this host joins the
 * cluster of the driver listening there (init's `listen`), and joins the next driver's when that
 * one ends. A shared cluster: `trellis broker` runs its broker, `trellis node --broker HOST:PORT`
 * registers a host with it (drivers join with init's `cluster`), `trellis status` shows it.
 */
import { parseArgs } from 'node:util';
import { NodeAgent } from '../core/node-agent.js';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { Broker, type BrokerOptions } from '../core/broker.js';
import { brokerStatus, jobLogs, jobStatus, listJobs, stopJob, submitJob } from '../core/broker-client.js';
import type { JobInfo } from '../core/jobs.js';
import { HostAgent } from '../core/host-agent.js';
import { brokerMetrics, formatMetrics, serveMetricsText } from '../core/metrics.js';
import type { StatusMessage } from '../core/broker-protocol.js';
import { TrellisError } from '../errors.js';

const usage = `usage: trellis node --head HOST:PORT [options]
       trellis node --broker HOST:PORT [options]
       trellis broker [--port N] [--host HOST] [--token TOKEN] [--backfill-window MS] [--max-share F]
                      [--users FILE] [--preempt-grace MS] [--metrics-port N] [--metrics-host HOST]
                      [--jobs-dir DIR]
       trellis status --broker HOST:PORT [--token TOKEN] [--json]
       trellis job submit --broker HOST:PORT [--token T] [--working-dir DIR [--exclude PATTERN]...
                          [--include-dependencies] | --cwd DIR] [--name NAME] [--env K=V]...
                          [--follow] -- COMMAND [ARGS...]
       trellis job list|status|logs|stop --broker HOST:PORT [--token T] [JOB] [--follow] [--json]
       trellis model pull URL [--cache-dir DIR]

node --head: joins this host to the cluster of the driver listening at HOST:PORT (init({ listen })).
node --broker: offers this host to a shared cluster's broker, which lends slices of it to the
  drivers that join the cluster (init({ cluster: { address } })), several at once.
broker: runs a shared cluster's broker (port 7390 by default). --max-share 0.5: no job holds
  more than half of any resource of the cluster. --users FILE: a JSON object of users by name,
  each { "token": "...", "quota": { "GPU": 4 }, "maxPriority": 10 }; drivers then show their
  user's token, a user's jobs together hold at most its quota, and ask for a priority up to its
  maxPriority (default 0). A job of higher priority (init's cluster.priority) that does not fit
  takes slices back from jobs of lower priority, which have --preempt-grace MS (default 30000) to
  finish what runs there. --metrics-port N serves the cluster's metrics (hosts, jobs, their
  slices) at http://127.0.0.1:N/metrics for Prometheus (--metrics-host to open it wider).
status: what a broker's hosts offer and have free, and which jobs hold or wait for what.
model pull: copies a checkpoint on object storage (s3://bucket/models/NAME) into this host's
  model cache (--cache-dir, else TRELLIS_MODEL_CACHE, else ~/.cache/trellis/models), as a
  replica's first load would, and prints the local path: warm a host before a job starts.
  Credentials and endpoint as the data layer takes them (AWS_* variables, the credentials file,
  the host's role).
job submit: the broker runs COMMAND (a driver script) on its host, with TRELLIS_BROKER and the
  token set, in --working-dir (a directory here, sent along; the driver sends it on to the hosts
  its workers run on, leaving out node_modules/, .git/, --exclude and .trellisignore lines, and
  using each host's installed packages unless --include-dependencies) or --cwd (a directory
  there), so init({ cluster: { resources } }) joins this cluster
  as the token's user; prints the job's id (--follow: prints its output until it ends and exits
  with its exit code). job logs JOB [--follow], job status JOB, job stop JOB, job list: the
  token's jobs (a user's own; the cluster token's, all). --jobs-dir (broker): where jobs' records
  and output are kept (default: trellis-broker-PORT/jobs in the temp directory).

node options:
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
  --once                     serve one driver, then exit (with --head)
  --code-cache DIR           where drivers' working directories are unpacked
                             (default: TRELLIS_CODE_CACHE, else trellis-code in the temp directory)
  --gpus LIST                the GPUs to offer, by device index, e.g. 0,1 (with --broker)
  --join-timeout MS          how long a lent slice may take to reach its driver (with --broker;
                             default 20000)
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

function formatResources(resources: Record<string, number>): string {
  return Object.entries(resources).filter(([, amount]) => amount > 0).map(([name, amount]) => `${name} ${amount}`).join(', ') || '-';
}

function printStatus(status: StatusMessage): void {
  const lines = [`${status.hosts.length} host(s)`];
  for (const host of [...status.hosts].sort((a, b) => a.hostId.localeCompare(b.hostId))) {
    lines.push(`  ${host.hostId} (${host.hostname}): ${formatResources(host.free)} free of ${formatResources(host.total)}; ${host.sessions} session(s)`);
  }
  lines.push(`${status.drivers.length} job(s)`);
  for (const driver of status.drivers) {
    const waiting = driver.granted < driver.bundles ? `, waiting ${(driver.waitingMs / 1000).toFixed(1)} s` : '';
    const priority = driver.priority !== 0 ? `, priority ${driver.priority}` : '';
    const preempting = `${driver.borrowed > 0 ? `; ${driver.borrowed} borrowed by its pools` : ''}${driver.preempting > 0 ? `; ${driver.preempting} node(s) being taken back` : ''}`;
    lines.push(`  ${driver.jobId} ${driver.name}${driver.user !== undefined ? ` (user ${driver.user})` : ''} at ${driver.address}: ${driver.granted} of ${driver.bundles} bundle(s) lent (${driver.wait}${priority})${waiting}${driver.nodes.length ? `; nodes ${driver.nodes.join(', ')}` : ''}${preempting}`);
  }
  process.stdout.write(`${lines.join('\n')}\n`);
}

async function runBroker(rest: string[]): Promise<number> {
  const { values } = parseArgs({ args: rest, options: { port: { type: 'string' }, host: { type: 'string' }, token: { type: 'string' }, 'backfill-window': { type: 'string' }, 'max-share': { type: 'string' }, users: { type: 'string' }, 'preempt-grace': { type: 'string' }, 'metrics-port': { type: 'string' }, 'metrics-host': { type: 'string' }, 'jobs-dir': { type: 'string' } } });
  let users: BrokerOptions['users'];
  if (values.users !== undefined) {
    try {
      users = JSON.parse(readFileSync(values.users, 'utf8')) as BrokerOptions['users'];
    } catch (error) {
      throw new TrellisError('ERR_INVALID_ARGUMENT', `--users names a JSON file of users by name: ${(error as Error).message}`);
    }
  }
  const broker = await Broker.start({
    port: count('port', values.port),
    host: values.host,
    token: values.token,
    backfillWindowMs: count('backfill-window', values['backfill-window']),
    maxShare: count('max-share', values['max-share']),
    preemptGraceMs: count('preempt-grace', values['preempt-grace']),
    users,
    ...(values['jobs-dir'] ? { jobsDirectory: values['jobs-dir'] } : {}),
    log: (line) => process.stderr.write(`trellis broker: ${line}\n`),
  });
  process.stderr.write(`trellis broker: listening on ${broker.host}:${broker.port}\n`);
  const metricsPort = count('metrics-port', values['metrics-port']);
  const metrics = metricsPort === undefined ? undefined : await serveMetricsText(() => formatMetrics(brokerMetrics(broker.status())), { port: metricsPort, host: values['metrics-host'] });
  if (metrics) process.stderr.write(`trellis broker: metrics at ${metrics.url}\n`);
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  await metrics?.close();
  await broker.close();
  return 0;
}

async function runStatus(rest: string[]): Promise<number> {
  const { values } = parseArgs({ args: rest, options: { broker: { type: 'string' }, token: { type: 'string' }, json: { type: 'boolean' } } });
  if (!values.broker) {
    process.stderr.write(usage);
    return 2;
  }
  const status = await brokerStatus(values.broker, { token: values.token });
  if (values.json) process.stdout.write(`${JSON.stringify({ hosts: status.hosts, drivers: status.drivers, maxShare: status.maxShare, preemptGraceMs: status.preemptGraceMs })}\n`);
  else printStatus(status);
  return 0;
}

function describeJob(job: JobInfo): string {
  const ended = job.state === 'running' ? '' : job.exitCode !== undefined && job.exitCode !== null ? ` (exit code ${job.exitCode})` : job.signal ? ` (${job.signal})` : '';
  return `${job.jobId}  ${job.state}${ended}  ${job.name}${job.user ? `  user ${job.user}` : ''}  submitted ${job.submittedAt}${job.reason ? `  ${job.reason}` : ''}`;
}

/** Prints a job's output from `offset` until it ends; returns the job as it ended. */
async function followLogs(broker: string, jobId: string, token: string | undefined): Promise<JobInfo> {
  let offset = 0;
  for (;;) {
    const piece = await jobLogs(broker, jobId, offset, { token });
    if (piece.text) process.stdout.write(piece.text);
    offset = piece.next;
    if (piece.ended) return jobStatus(broker, jobId, { token });
    if (!piece.text) await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

async function runJob(rest: string[]): Promise<number> {
  const separator = rest.indexOf('--');
  const own = separator >= 0 ? rest.slice(0, separator) : rest;
  const command = separator >= 0 ? rest.slice(separator + 1) : [];
  const { values, positionals } = parseArgs({
    args: own,
    allowPositionals: true,
    options: {
      broker: { type: 'string' }, token: { type: 'string' }, cwd: { type: 'string' }, name: { type: 'string' },
      env: { type: 'string', multiple: true }, follow: { type: 'boolean' }, json: { type: 'boolean' },
      'working-dir': { type: 'string' }, exclude: { type: 'string', multiple: true }, 'include-dependencies': { type: 'boolean' },
    },
  });
  const [action, jobId] = positionals;
  const broker = values.broker ?? process.env.TRELLIS_BROKER;
  if (!broker || !action || (action !== 'list' && action !== 'submit' && !jobId)) {
    process.stderr.write(usage);
    return 2;
  }
  const options = { token: values.token };
  const print = (value: unknown, text: string) => process.stdout.write(`${values.json ? JSON.stringify(value) : text}\n`);
  switch (action) {
    case 'submit': {
      if (command.length === 0) throw new TrellisError('ERR_INVALID_ARGUMENT', 'job submit runs the command after --, e.g. trellis job submit --broker HOST:PORT -- node job.js');
      const env: Record<string, string> = {};
      for (const pair of values.env ?? []) {
        const at = pair.indexOf('=');
        if (at <= 0) throw new TrellisError('ERR_INVALID_ARGUMENT', `--env takes NAME=VALUE, got '${pair}'`);
        env[pair.slice(0, at)] = pair.slice(at + 1);
      }
      const workingDir = values['working-dir'];
      if (workingDir !== undefined && values.cwd !== undefined) throw new TrellisError('ERR_INVALID_ARGUMENT', 'job submit takes --working-dir (sent along) or --cwd (a directory on the broker\'s host), not both');
      if (workingDir === undefined && (values.exclude || values['include-dependencies'])) throw new TrellisError('ERR_INVALID_ARGUMENT', '--exclude and --include-dependencies describe a --working-dir');
      const where = workingDir !== undefined
        ? { runtimeEnv: { workingDir: resolve(workingDir), ...(values.exclude ? { excludes: values.exclude } : {}), ...(values['include-dependencies'] ? { includeDependencies: true } : {}) } }
        : { cwd: resolve(values.cwd ?? process.cwd()) };
      const job = await submitJob(broker, { entrypoint: command, ...where, env, ...(values.name ? { name: values.name } : {}) }, options);
      if (job.workingDir) {
        const sent = job.workingDir;
        process.stderr.write(`trellis job: sent ${sent.files} file(s), ${(sent.bytes / 2 ** 20).toFixed(1)} MiB, as package ${sent.code}${sent.dependencies ? ` with dependencies ${sent.dependencies}` : ''}\n`);
      }
      if (!values.follow) {
        print(job, job.jobId);
        return 0;
      }
      process.stderr.write(`trellis job: ${job.jobId} submitted\n`);
      const ended = await followLogs(broker, job.jobId, values.token);
      process.stderr.write(`trellis job: ${describeJob(ended)}\n`);
      return ended.state === 'succeeded' ? 0 : typeof ended.exitCode === 'number' && ended.exitCode > 0 ? ended.exitCode : 1;
    }
    case 'list': {
      const jobs = await listJobs(broker, options);
      print(jobs, jobs.length === 0 ? 'no jobs' : jobs.map(describeJob).join('\n'));
      return 0;
    }
    case 'status': {
      const job = await jobStatus(broker, jobId, options);
      print(job, describeJob(job));
      return 0;
    }
    case 'stop': {
      const job = await stopJob(broker, jobId, options);
      print(job, describeJob(job));
      return 0;
    }
    case 'logs': {
      if (values.follow) {
        await followLogs(broker, jobId, values.token);
        return 0;
      }
      let offset = 0;
      for (;;) {
        const piece = await jobLogs(broker, jobId, offset, options);
        process.stdout.write(piece.text);
        if (!piece.text || piece.next === offset) return 0;
        offset = piece.next;
      }
    }
    default:
      process.stderr.write(usage);
      return 2;
  }
}

async function runModel(argv: string[]): Promise<number> {
  const [action, ...rest] = argv;
  const { values, positionals } = parseArgs({ args: rest, allowPositionals: true, options: { 'cache-dir': { type: 'string' } } });
  if (action !== 'pull' || positionals.length !== 1) {
    process.stderr.write(usage);
    return 2;
  }
  const { localCheckpoint } = await import('../llm/model-source.js');
  const started = Date.now();
  const path = await localCheckpoint(positionals[0], values['cache-dir'] ? { cacheDirectory: resolve(values['cache-dir']) } : {});
  process.stderr.write(`trellis model: ${positionals[0]} is at ${path} (${((Date.now() - started) / 1000).toFixed(1)} s)\n`);
  process.stdout.write(`${path}\n`);
  return 0;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === 'broker') return runBroker(rest);
  if (command === 'model') return runModel(rest);
  if (command === 'status') return runStatus(rest);
  if (command === 'job') return runJob(rest);
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
      broker: { type: 'string' },
      gpus: { type: 'string' },
      'join-timeout': { type: 'string' },
      'code-cache': { type: 'string' },
      help: { type: 'boolean' },
    },
  });
  if (values.help || (!values.head) === (!values.broker)) {
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
  let gpuDevices: number[] | undefined;
  if (values.gpus !== undefined) {
    gpuDevices = values.gpus === '' ? [] : values.gpus.split(',').map((index) => Number(index));
    if (!gpuDevices.every((index) => Number.isInteger(index) && index >= 0)) {
      throw new TrellisError('ERR_INVALID_ARGUMENT', `--gpus takes device indices separated by commas, e.g. 0,1, got '${values.gpus}'`);
    }
  }
  if (values.broker) {
    const host = new HostAgent({
      broker: values.broker,
      token: values.token,
      id: values.id,
      numCpus: count('num-cpus', values['num-cpus']) ?? cpus().length,
      numGpus: gpuDevices?.length ?? count('num-gpus', values['num-gpus']) ?? (await defaultGpus()),
      gpuDevices,
      memory: count('memory', values.memory),
      resources,
      objectStoreMemory: count('object-store-memory', values['object-store-memory']),
      advertiseHost: values['advertise-host'],
      joinTimeoutMs: count('join-timeout', values['join-timeout']),
      codeCache: values['code-cache'],
      log: (line) => process.stderr.write(`trellis node: ${line}\n`),
    });
    const stop = () => void host.close();
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
    await host.done;
    return 0;
  }
  const agent = new NodeAgent({
    head: values.head!,
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
    codeCache: values['code-cache'],
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
