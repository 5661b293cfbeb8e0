// A load generator in a process of its own: `concurrency` keep-alive clients each sending GET
// requests to `url` one after another for `seconds`. Prints one JSON line: requests done, the
// seconds taken, and the latency percentiles in milliseconds.
import http from 'node:http';

const [url, concurrencyText, secondsText] = process.argv.slice(2);
const concurrency = Number(concurrencyText);
const seconds = Number(secondsText);
const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });
const latencies = [];
let failures = 0;

function request() {
  return new Promise((resolve) => {
    const start = process.hrtime.bigint();
    const req = http.get(url, { agent }, (res) => {
      res.resume();
      res.on('end', () => {
        if (res.statusCode !== 200) failures++;
        latencies.push(Number(process.hrtime.bigint() - start) / 1e6);
        resolve();
      });
    });
    req.on('error', () => {
      failures++;
      resolve();
    });
  });
}

const started = process.hrtime.bigint();
const deadline = Date.now() + seconds * 1000;
await Promise.all(Array.from({ length: concurrency }, async () => {
  while (Date.now() < deadline) await request();
}));
const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
latencies.sort((a, b) => a - b);
const at = (q) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))] ?? 0;
agent.destroy();
console.log(JSON.stringify({ requests: latencies.length, failures, seconds: elapsed, p50: at(0.5), p99: at(0.99) }));
