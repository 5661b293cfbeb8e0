/**
 * Serving's Prometheus metrics, added to every scrape of the driver (metricsText, serveMetrics):
 * every proxy's requests by application, status code and node with their latency, and each
 * deployment's replicas, target, load and queue as the controller sees them.
 */
import type { MetricFamily } from '../core/metrics.js';
import { Counter, Histogram, libraryMetric } from '../core/user-metrics.js';
import type { DeploymentStatus } from './controller.js';

/** Latency buckets (seconds): from a cached answer to a long generation. */
const BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

/**
 * A proxy's requests, recorded as application metrics are: a proxy on another node (an actor)
 * reports them to the driver as any process does, so the driver's scrape sums every proxy's, each
 * series with its node.
 */
export class HttpMetrics {
  readonly #node: string;
  readonly #requests = libraryMetric(() => new Counter('trellis_serve_http_requests_total', {
    description: 'HTTP requests the proxies answered, by application, status code (499: the client left first) and node.',
    tagKeys: ['application', 'code', 'node'],
  }));
  readonly #latency = libraryMetric(() => new Histogram('trellis_serve_http_request_duration_seconds', {
    description: 'Time from a request reaching a proxy to its answer ending, by application and node.',
    boundaries: BUCKETS,
    tagKeys: ['application', 'node'],
  }));

  constructor(node: string) {
    this.#node = node;
  }

  /** One request answered (or abandoned: code 499) after `seconds`. */
  record(application: string, code: number, seconds: number): void {
    this.#requests.inc(1, { application, code: String(code), node: this.#node });
    this.#latency.observe(seconds, { application, node: this.#node });
  }
}

/** The deployments' gauges, from serve.status(). */
export function deploymentFamilies(applications: Record<string, { deployments: Record<string, DeploymentStatus> }>): MetricFamily[] {
  const replicas: MetricFamily = { name: 'trellis_serve_deployment_replicas', type: 'gauge', help: "A deployment's replicas by state (starting, running, stopping).", samples: [] };
  const target: MetricFamily = { name: 'trellis_serve_deployment_target_replicas', type: 'gauge', help: 'The replicas a deployment is meant to have (autoscaling moves it).', samples: [] };
  const healthy: MetricFamily = { name: 'trellis_serve_deployment_healthy', type: 'gauge', help: '1 while a deployment is HEALTHY, else 0.', samples: [] };
  const ongoing: MetricFamily = { name: 'trellis_serve_deployment_ongoing_requests', type: 'gauge', help: "Requests on an autoscaling deployment's replicas and in the driver's router, at the last poll.", samples: [] };
  const queued: MetricFamily = { name: 'trellis_serve_deployment_queued_requests', type: 'gauge', help: "Requests waiting in the driver's router for a replica with room.", samples: [] };
  for (const [application, app] of Object.entries(applications)) {
    for (const [deployment, status] of Object.entries(app.deployments)) {
      const labels = { application, deployment };
      for (const state of ['starting', 'running', 'stopping'] as const) replicas.samples.push({ labels: { ...labels, state }, value: status.replicas[state] });
      target.samples.push({ labels, value: status.targetReplicas });
      healthy.samples.push({ labels, value: status.status === 'HEALTHY' ? 1 : 0 });
      ongoing.samples.push({ labels, value: status.ongoingRequests });
      queued.samples.push({ labels, value: status.queuedRequests });
    }
  }
  return [replicas, target, healthy, ongoing, queued];
}
