// The S3-compatible test server in a process of its own, answering each request after the latency
// given (milliseconds, as object storage's time to first byte), with signatures checked. Prints
// its port on stdout once listening; GET /__stats reports requests and body bytes served. Exits
// when its stdin closes.
import { S3TestServer } from '../test/data/fixtures/s3-server.js';

const server = new S3TestServer({ latencyMs: Number(process.argv[2] ?? 10) });
await server.start();
server.bucket('bench');
console.log(new URL(server.endpoint).port);
// Gone with the benchmark that started it, however that one ends.
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
