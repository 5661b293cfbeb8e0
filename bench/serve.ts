/**
 * Serve suite: what serving costs over what it is made of, measured in one run. Handle calls
 * against plain calls to an actor of the same class (the router's share); HTTP requests through
 * the proxy against two floors: a bare node:http server answering the same JSON itself, and one
 * that calls a plain actor per request (a hand-written service). The load comes from a process
 * of its own with keep-alive connections. Model multiplexing: requests for 8 models over 4
 * replicas that keep 2 each, routed by model against the same requests routed by load alone
 * (each replica then loads whatever model comes), counting the loads.
 */
import { spawn } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import { get, init, serve, shutdown } from '../lib/index.js';
import { medianRate as rate, round, type Results, type Suite } from './harness.js';
import { HelloActor, ZooActor } from './serve-apps.js';

const CONCURRENCY = 32;
const LOAD_SECONDS = 3;

interface Load {
  requests: number;
  failures: number;
  seconds: number;
  p50: number;
  p99: number;
}

function load(url: string): Promise<Load> {
  const script = fileURLToPath(new URL('./http-load.mjs', import.meta.url));
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script, url, String(CONCURRENCY), String(LOAD_SECONDS)], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (chunk) => (out += chunk));
    child.once('exit', (code) => {
      if (code !== 0) return reject(new Error(`the load generator exited with ${code}`));
      const result = JSON.parse(out) as Load;
      if (result.failures > 0) return reject(new Error(`${result.failures} requests failed against ${url}`));
      resolve(result);
    });
  });
}

async function listen(handler: Parameters<typeof createServer>[1]): Promise<{ server: Server; url: string }> {
  const server = createServer(handler);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/` };
}

export const serveSuite: Suite = {
  name: 'serve',
  ratios: [
    ['handle calls / plain actor calls (sync)', 'handle_calls_sync', 'actor_calls_sync', ''],
    ['handle calls / plain actor calls (100 at once)', 'handle_calls_async', 'actor_calls_async', ''],
    ['HTTP through serve / node:http calling an actor', 'http_requests', 'http_actor_requests', ''],
    ['HTTP through serve / bare node:http', 'http_requests', 'http_floor_requests', ''],
    ['multiplexed: routed by model / by load alone', 'multiplexed_requests', 'unrouted_model_requests', ''],
  ],
  async run(): Promise<Results> {
    const results: Results = {};
    const perSecond = (name: string, value: number) => (results[name] = { value: Math.round(value), unit: 'per_s' });
    await init({ numCpus: 2 });
    try {
      const plain = HelloActor.options({ numCpus: 0, maxConcurrency: 100 }).remote();
      await get(plain.ping.remote());
      await serve.start({ http: { port: 0 } });
      const handle = await serve.run(serve.deployment(HelloActor, { actorOptions: { numCpus: 0 }, maxOngoingRequests: 100 }).bind(), { name: 'bench' });
      perSecond('actor_calls_sync', await rate(1_000, async () => {
        for (let i = 0; i < 1_000; i++) await get(plain.ping.remote());
      }));
      perSecond('handle_calls_sync', await rate(1_000, async () => {
        for (let i = 0; i < 1_000; i++) await handle.ping();
      }));
      perSecond('actor_calls_async', await rate(10_000, async () => {
        for (let i = 0; i < 100; i++) await get(Array.from({ length: 100 }, () => plain.ping.remote()));
      }));
      perSecond('handle_calls_async', await rate(10_000, async () => {
        for (let i = 0; i < 100; i++) await Promise.all(Array.from({ length: 100 }, () => handle.ping()));
      }));

      const floor = await listen((_request, response) => {
        const body = JSON.stringify({ hello: 'world', count: 0 });
        response.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
        response.end(body);
      });
      const viaActor = await listen((_request, response) => {
        void get(plain.fetch.remote(null as never)).then((value) => {
          const body = JSON.stringify(value);
          response.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
          response.end(body);
        });
      });
      try {
        const record = (name: string, measured: Load) => {
          perSecond(name, measured.requests / measured.seconds);
          results[`${name.replace(/_requests$/, '')}_p50_ms`] = { value: round(measured.p50, 2), unit: 'ms' };
          results[`${name.replace(/_requests$/, '')}_p99_ms`] = { value: round(measured.p99, 2), unit: 'ms' };
        };
        record('http_floor_requests', await load(floor.url));
        record('http_actor_requests', await load(viaActor.url));
        record('http_requests', await load(`${serve.status().proxy!.url}/`));
      } finally {
        floor.server.close();
        viaActor.server.close();
      }

      // 8 models, 4 replicas of 2 slots: enough room for every model, if each goes where it is held.
      let zoo = await serve.run(serve.deployment(ZooActor, { numReplicas: 4, actorOptions: { numCpus: 0 }, maxOngoingRequests: 8 }).bind(), { name: 'zoo', routePrefix: null });
      const models = Array.from({ length: 8 }, (_, index) => `model-${index}`);
      let seed = 7;
      const order = Array.from({ length: 2_000 }, () => models[((seed = (Math.imul(seed, 1_664_525) + 1_013_904_223) >>> 0) >>> 16) % models.length]);
      const measure = async (routed: boolean): Promise<{ perSecond: number; loads: number }> => {
        const loads = new Map<number, number>();
        const started = performance.now();
        for (let wave = 0; wave < order.length; wave += 16) {
          const answers = await Promise.all(order.slice(wave, wave + 16).map((model, index) =>
            routed ? zoo.options({ multiplexedModelId: model }).predict(index) : zoo.predict(index, model)));
          for (const answer of answers) loads.set(answer.pid, Math.max(loads.get(answer.pid) ?? 0, answer.loads));
        }
        const seconds = (performance.now() - started) / 1000;
        return { perSecond: order.length / seconds, loads: [...loads.values()].reduce((sum, count) => sum + count, 0) };
      };
      const unrouted = await measure(false);
      await serve.delete('zoo');
      zoo = await serve.run(serve.deployment(ZooActor, { numReplicas: 4, actorOptions: { numCpus: 0 }, maxOngoingRequests: 8 }).bind(), { name: 'zoo', routePrefix: null });
      const routed = await measure(true);
      perSecond('unrouted_model_requests', unrouted.perSecond);
      perSecond('multiplexed_requests', routed.perSecond);
      results.unrouted_model_loads = { value: unrouted.loads, unit: 'count' };
      results.multiplexed_model_loads = { value: routed.loads, unit: 'count' };
    } finally {
      await shutdown();
    }
    return results;
  },
};
