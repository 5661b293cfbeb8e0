// A service in a process of its own that answers every JSON POST after `latencyMs`, as a model
// behind an API would: its answer names the request's id. GET /arrivals answers how many POSTs
// arrived and the first and last arrival's time (ms), and starts counting afresh. Prints its port
// on stdout once listening.
import http from 'node:http';

const latencyMs = Number(process.argv[2] ?? 20);
let arrivals = { count: 0, first: 0, last: 0 };
const server = http.createServer((request, response) => {
  if (request.method === 'GET') {
    response.writeHead(200, { 'content-type': 'application/json' });
    response.end(JSON.stringify(arrivals));
    arrivals = { count: 0, first: 0, last: 0 };
    return;
  }
  const now = performance.now();
  arrivals.count++;
  if (arrivals.count === 1) arrivals.first = now;
  arrivals.last = now;
  let body = '';
  request.on('data', (chunk) => (body += chunk));
  request.on('end', () => {
    const { id } = JSON.parse(body);
    setTimeout(() => {
      response.writeHead(200, { 'content-type': 'application/json' });
      response.end(JSON.stringify({ id, label: id % 2 === 0 ? 'even' : 'odd' }));
    }, latencyMs);
  });
});
server.keepAliveTimeout = 60_000;
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
process.on('SIGTERM', () => process.exit(0));
