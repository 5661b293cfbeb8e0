/**
 * The driver's metrics in the Prometheus text format: what the cluster holds (nodes' resources,
 * stores, workers, tasks, actors, objects) and what each layer adds through a collector (the data
 * layer: its running jobs, operator by operator, with the counters a model class reports). A
 * platform team scrapes `serveMetrics()`'s endpoint into its dashboards and alerts, or takes
 * `metricsText()` to an exporter of its own. The application's own metrics (Counter, Gauge and
 * Histogram, from any process: user-metrics.ts) come last, under the names it gave them.
 */
import { createServer, type Server } from 'node:http';
import { InvalidArgumentError } from '../errors.js';
import { events, isInitialized, state, taskDurations } from './api.js';
import { userMetricFamilies } from './user-metrics.js';
import { TASK_DURATION_BUCKETS } from './cluster.js';
import type { StatusMessage } from './broker-protocol.js';

export type MetricType = 'gauge' | 'counter' | 'histogram';

/** One metric and its samples, each with its labels (a histogram's with their suffix: _bucket, _sum, _count). */
export interface MetricFamily {
  name: string;
  help: string;
  type: MetricType;
  samples: Array<{ labels?: Record<string, string>; value: number; suffix?: string }>;
}

/** A source of metrics beyond the core's: called at each scrape. */
export type MetricsCollector = () => MetricFamily[];

const collectors = new Set<MetricsCollector>();

/** Adds a layer's metrics to every scrape (the data layer registers its jobs'). */
export function registerMetricsCollector(collector: MetricsCollector): () => void {
  collectors.add(collector);
  return () => collectors.delete(collector);
}

function family(name: string, type: MetricType, help: string, samples: MetricFamily['samples'] = []): MetricFamily {
  return { name, type, help, samples };
}

/** The core's metrics, from the cluster's state. */
function coreMetrics(): MetricFamily[] {
  const cluster = state();
  const total = family('trellis_node_resource_total', 'gauge', 'Resources a node has, by name (CPU, GPU, memory, custom).');
  const available = family('trellis_node_resource_available', 'gauge', 'Resources of a node not held by a task, actor or placement group.');
  const capacity = family('trellis_store_capacity_bytes', 'gauge', "Bytes a node's object store holds at most.");
  const used = family('trellis_store_used_bytes', 'gauge', "Bytes of objects in a node's store.");
  const objects = family('trellis_store_objects', 'gauge', "Objects in a node's store.");
  const spilled = family('trellis_store_spilled_bytes', 'gauge', "Bytes of a node's objects spilled to disk now.");
  const spilledTotal = family('trellis_store_spilled_bytes_total', 'counter', 'Bytes a node has spilled to disk since it started.');
  const restoredTotal = family('trellis_store_restored_bytes_total', 'counter', 'Bytes a node has read back from disk since it started.');
  for (const node of cluster.nodes) {
    const labels = { node: node.nodeId };
    for (const [resource, amount] of Object.entries(node.resources.total)) total.samples.push({ labels: { ...labels, resource }, value: amount });
    for (const [resource, amount] of Object.entries(node.resources.available)) available.samples.push({ labels: { ...labels, resource }, value: amount });
    capacity.samples.push({ labels, value: node.store.capacity });
    used.samples.push({ labels, value: node.store.bytesInUse });
    objects.samples.push({ labels, value: node.store.objectCount });
    spilled.samples.push({ labels, value: node.store.spilledBytes });
    spilledTotal.samples.push({ labels, value: node.store.totalSpilledBytes });
    restoredTotal.samples.push({ labels, value: node.store.totalRestoredBytes });
  }
  const workers = family('trellis_workers', 'gauge', 'Worker processes by node and state.');
  const workerCounts = new Map<string, { node: string; state: string; count: number }>();
  for (const worker of cluster.workers) {
    const key = `${worker.nodeId}\u0000${worker.state}`;
    const entry = workerCounts.get(key) ?? { node: worker.nodeId, state: worker.state, count: 0 };
    entry.count++;
    workerCounts.set(key, entry);
  }
  for (const { node, state: workerState, count } of workerCounts.values()) workers.samples.push({ labels: { node, state: workerState }, value: count });
  const tasks = family('trellis_tasks', 'gauge', 'Tasks and actor calls not yet done, by state.');
  for (const [taskState, count] of Object.entries(cluster.tasks)) tasks.samples.push({ labels: { state: taskState }, value: count });
  const actors = family('trellis_actors', 'gauge', 'Actors by state.');
  const actorCounts = new Map<string, number>();
  for (const actor of cluster.actors) actorCounts.set(actor.state, (actorCounts.get(actor.state) ?? 0) + 1);
  for (const [actorState, count] of actorCounts) actors.samples.push({ labels: { state: actorState }, value: count });
  const groups = family('trellis_placement_groups', 'gauge', 'Placement groups by state.');
  const groupCounts = new Map<string, number>();
  for (const group of cluster.placementGroups) groupCounts.set(group.state, (groupCounts.get(group.state) ?? 0) + 1);
  for (const [groupState, count] of groupCounts) groups.samples.push({ labels: { state: groupState }, value: count });
  const families = [
    total, available, capacity, used, objects, spilled, spilledTotal, restoredTotal, workers, tasks, actors, groups,
    family('trellis_objects', 'gauge', 'Objects the driver tracks (owned refs and what they borrow).', [{ value: cluster.objects.count }]),
    family('trellis_tasks_finished_total', 'counter', 'Tasks and actor calls that returned a value.', [{ value: cluster.counters.tasksFinished }]),
    family('trellis_tasks_failed_total', 'counter', 'Tasks and actor calls that ended with an error (after their retries).', [{ value: cluster.counters.tasksFailed }]),
    family('trellis_tasks_retried_total', 'counter', 'Times a task or call ran again after its worker or actor died or it threw a retryable error.', [{ value: cluster.counters.tasksRetried }]),
  ];
  families.push(durationHistogram());
  const broker = cluster.broker;
  if (broker) {
    families.push(
      family('trellis_broker_connected', 'gauge', 'Whether the connection to the shared cluster\'s broker is up.', [{ value: broker.connected ? 1 : 0 }]),
      family('trellis_broker_priority', 'gauge', "This job's priority on the shared cluster.", [{ value: broker.priority }]),
      family('trellis_broker_bundles', 'gauge', 'Bundles this job asked the broker for, by where they are.', [
        { labels: { state: 'asked' }, value: broker.bundles },
        { labels: { state: 'lent' }, value: broker.lent },
        { labels: { state: 'joined' }, value: broker.joined },
        { labels: { state: 'released' }, value: broker.released },
      ]),
      family('trellis_broker_preempted_total', 'counter', "Lent nodes taken back from this job for jobs of higher priority.", [{ value: broker.preempted }]),
    );
  }
  return families;
}

/** Finished tasks' and calls' run times on their workers, by function or Class.method. */
function durationHistogram(): MetricFamily {
  const histogram = family('trellis_task_duration_seconds', 'histogram', "How long finished tasks and actor calls ran on their worker, by function or Class.method ('(other)' past 500 names).");
  for (const [name, series] of taskDurations()) {
    let cumulative = 0;
    TASK_DURATION_BUCKETS.forEach((bound, index) => {
      cumulative += series.buckets[index];
      histogram.samples.push({ suffix: '_bucket', labels: { name, le: String(bound) }, value: cumulative });
    });
    histogram.samples.push({ suffix: '_bucket', labels: { name, le: '+Inf' }, value: series.count });
    histogram.samples.push({ suffix: '_sum', labels: { name }, value: series.sum });
    histogram.samples.push({ suffix: '_count', labels: { name }, value: series.count });
  }
  return histogram;
}

function escapeLabel(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

function formatValue(value: number): string {
  if (Number.isNaN(value)) return 'NaN';
  if (value === Infinity) return '+Inf';
  if (value === -Infinity) return '-Inf';
  return String(value);
}

/** Families in the text exposition format (version 0.0.4). */
export function formatMetrics(families: readonly MetricFamily[]): string {
  const lines: string[] = [];
  for (const metric of families) {
    lines.push(`# HELP ${metric.name} ${metric.help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}`);
    lines.push(`# TYPE ${metric.name} ${metric.type}`);
    for (const sample of metric.samples) {
      const labels = Object.entries(sample.labels ?? {});
      const text = labels.length ? `{${labels.map(([name, value]) => `${name}="${escapeLabel(value)}"`).join(',')}}` : '';
      lines.push(`${metric.name}${sample.suffix ?? ''}${text} ${formatValue(sample.value)}`);
    }
  }
  return `${lines.join('\n')}\n`;
}

/** Every metric of this driver now, as Prometheus reads them. */
export function metricsText(): string {
  if (!isInitialized()) throw new InvalidArgumentError('metricsText() reads the cluster: call init() first', 'ERR_NOT_INITIALIZED');
  const families = coreMetrics();
  for (const collect of collectors) families.push(...collect());
  const application = userMetricFamilies();
  for (const problem of application.problems) events().emit('warning', { kind: 'metrics', message: problem });
  families.push(...application.families);
  return formatMetrics(families);
}

/** An HTTP endpoint serving `GET /metrics`; closed by close() or when the driver shuts down. */
export class MetricsServer implements AsyncDisposable {
  readonly #server: Server;
  readonly host: string;
  readonly port: number;

  constructor(server: Server, host: string, port: number) {
    this.#server = server;
    this.host = host;
    this.port = port;
  }

  get url(): string {
    return `http://${this.host.includes(':') ? `[${this.host}]` : this.host}:${this.port}/metrics`;
  }

  async close(): Promise<void> {
    servers.delete(this);
    if (!this.#server.listening) return;
    this.#server.closeAllConnections();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

const servers = new Set<MetricsServer>();

/**
 * Serves this driver's metrics at `http://host:port/metrics` (port 0: any free one; host default
 * 127.0.0.1, the metrics name hosts and jobs: open it wider on purpose). Closed at shutdown().
 */
export async function serveMetrics(options: { port?: number; host?: string } = {}): Promise<MetricsServer> {
  if (!isInitialized()) throw new InvalidArgumentError('serveMetrics() serves the cluster: call init() first', 'ERR_NOT_INITIALIZED');
  const server = await serveMetricsText(metricsText, options);
  servers.add(server);
  return server;
}

/** An endpoint serving what `produce` says at each scrape (a broker's metrics, say). */
export async function serveMetricsText(produce: () => string, options: { port?: number; host?: string } = {}): Promise<MetricsServer> {
  const port = options.port ?? 0;
  const host = options.host ?? '127.0.0.1';
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new InvalidArgumentError(`metrics: port must be an integer from 0 to 65535, got ${String(options.port)}`);
  const server = createServer((request, response) => {
    const path = (request.url ?? '/').split('?')[0];
    if (request.method !== 'GET' || (path !== '/metrics' && path !== '/')) {
      response.writeHead(404, { 'content-type': 'text/plain' }).end('trellis serves GET /metrics\n');
      return;
    }
    let body: string;
    try {
      body = produce();
    } catch (error) {
      // Scraped between shutdown and close: nothing to report.
      response.writeHead(503, { 'content-type': 'text/plain' }).end(`${(error as Error).message}\n`);
      return;
    }
    response.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' }).end(body);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  }).catch((error: NodeJS.ErrnoException) => {
    throw new InvalidArgumentError(`metrics: cannot listen on ${host}:${port}: ${error.message}`, error.code === 'EADDRINUSE' ? 'ERR_ADDRESS_IN_USE' : 'ERR_INVALID_ARGUMENT');
  });
  // The endpoint alone never keeps a process alive: what it reports does.
  server.unref();
  const address = server.address();
  return new MetricsServer(server, host, typeof address === 'object' && address ? address.port : port);
}

/** A shared cluster's metrics, from its broker's status: hosts, and each job's slices. */
export function brokerMetrics(status: StatusMessage): MetricFamily[] {
  const total = family('trellis_broker_host_resource_total', 'gauge', 'Resources a host offers the shared cluster.');
  const free = family('trellis_broker_host_resource_free', 'gauge', "A host's resources not lent to a job.");
  const sessions = family('trellis_broker_host_sessions', 'gauge', 'Slices of a host lent to jobs now.');
  for (const host of status.hosts) {
    for (const [resource, amount] of Object.entries(host.total)) total.samples.push({ labels: { host: host.hostId, resource }, value: amount });
    for (const [resource, amount] of Object.entries(host.free)) free.samples.push({ labels: { host: host.hostId, resource }, value: amount });
    sessions.samples.push({ labels: { host: host.hostId }, value: host.sessions });
  }
  const bundles = family('trellis_broker_job_bundles', 'gauge', "A job's bundles: asked for, lent, borrowed by its pools, given back while idle, being taken back.");
  const priority = family('trellis_broker_job_priority', 'gauge', "A job's priority.");
  const waiting = family('trellis_broker_job_waiting_seconds', 'gauge', 'Seconds since a job that holds less than it asked for asked.');
  const users = new Map<string, { jobs: number; lent: number }>();
  let waitingJobs = 0;
  for (const driver of status.drivers) {
    const labels = { job: driver.jobId, name: driver.name, user: driver.user ?? '' };
    priority.samples.push({ labels, value: driver.priority });
    for (const [state, value] of [['asked', driver.bundles], ['lent', driver.granted], ['borrowed', driver.borrowed], ['released', driver.released], ['preempting', driver.preempting]] as const) {
      bundles.samples.push({ labels: { ...labels, state }, value });
    }
    const short = driver.granted < driver.bundles - driver.released;
    if (short) waitingJobs++;
    waiting.samples.push({ labels, value: short ? driver.waitingMs / 1000 : 0 });
    const user = users.get(driver.user ?? '') ?? { jobs: 0, lent: 0 };
    user.jobs++;
    user.lent += driver.granted;
    users.set(driver.user ?? '', user);
  }
  return [
    total, free, sessions,
    family('trellis_broker_jobs', 'gauge', 'Jobs joined to the shared cluster, and those waiting for slices.', [
      { labels: { state: 'joined' }, value: status.drivers.length },
      { labels: { state: 'waiting' }, value: waitingJobs },
    ]),
    family('trellis_broker_user_bundles_lent', 'gauge', "Bundles lent to a user's jobs.", [...users].map(([user, { lent }]) => ({ labels: { user }, value: lent }))),
    priority, bundles, waiting,
    family('trellis_broker_slices_lent_total', 'counter', 'Slices of hosts lent to jobs since the broker started.', status.totals ? [{ value: status.totals.lent }] : []),
    family('trellis_broker_preemptions_total', 'counter', 'Slices taken back for jobs of higher priority since the broker started.', status.totals ? [{ value: status.totals.preempted }] : []),
  ];
}

/** Closes every metrics endpoint (the driver is shutting down). */
export async function closeMetricsServers(): Promise<void> {
  await Promise.all([...servers].map((server) => server.close()));
}
