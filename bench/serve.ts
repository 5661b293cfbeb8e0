/**
 * Serve suite: what serving costs over what it is made of, measured in one run. Handle calls
 * against plain calls to an actor of the same class (the router's share); HTTP requests through
 * the proxy against two floors: a bare node:http server answering the same JSON itself, and one
 * that calls a plain actor per request (a hand-written service). The load comes from a process
 * of its own with keep-alive connections.
 */
import { spawn } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import { get, init, serve, shutdown } from '../lib/index.js';
import { medianRate as rate, round, type Results, type Suite } from './harness.js';
import { HelloActor } from './serve-apps.js';

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
    } finally {
      await shutdown();
    }
    return results;
  },
};
