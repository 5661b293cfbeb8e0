/**
 * Serving's Prometheus metrics, added to every scrape of the driver (metricsText, serveMetrics):
 * the proxy's requests by application and status code with their latency, and each deployment's
 * replicas, target, load and queue as the controller sees them.
 */
import type { MetricFamily } from '../core/metrics.js';
import type { DeploymentStatus } from './controller.js';

/** Latency buckets (seconds): from a cached answer to a long generation. */
const BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

interface Latencies {
  counts: number[];
  sum: number;
  count: number;
}

export class HttpMetrics {
  readonly #requests = new Map<string, number>();
  readonly #latencies = new Map<string, Latencies>();

  /** One request answered (or abandoned: code 499) after `seconds`. */
  record(application: string, code: number, seconds: number): void {
    const key = `${application}\u0000${code}`;
    this.#requests.set(key, (this.#requests.get(key) ?? 0) + 1);
    let latencies = this.#latencies.get(application);
    if (!latencies) this.#latencies.set(application, (latencies = { counts: BUCKETS.map(() => 0), sum: 0, count: 0 }));
    for (let index = 0; index < BUCKETS.length; index++) if (seconds <= BUCKETS[index]) latencies.counts[index]++;
    latencies.sum += seconds;
    latencies.count++;
  }

  families(): MetricFamily[] {
    const requests: MetricFamily = { name: 'trellis_serve_http_requests_total', type: 'counter', help: "HTTP requests the proxy answered, by application and status code (499: the client left first).", samples: [] };
    for (const [key, value] of this.#requests) {
      const [application, code] = key.split('\u0000');
      requests.samples.push({ labels: { application, code }, value });
    }
    const latency: MetricFamily = { name: 'trellis_serve_http_request_duration_seconds', type: 'histogram', help: 'Time from a request reaching the proxy to its answer ending, by application.', samples: [] };
    for (const [application, latencies] of this.#latencies) {
      BUCKETS.forEach((bound, index) => latency.samples.push({ labels: { application, le: String(bound) }, value: latencies.counts[index], suffix: '_bucket' }));
      latency.samples.push({ labels: { application, le: '+Inf' }, value: latencies.count, suffix: '_bucket' });
      latency.samples.push({ labels: { application }, value: latencies.sum, suffix: '_sum' });
      latency.samples.push({ labels: { application }, value: latencies.count, suffix: '_count' });
    }
    return [requests, latency];
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
