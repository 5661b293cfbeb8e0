/**
 * The HTTP batch processor (buildHttpRequestProcessor) against a server in this process that
 * answers by each payload's `behaviour`: answers in order with many requests in flight but never
 * more than allowed, retries what a service means as "later" (429 with Retry-After, 503, a reset
 * connection), fails or records what it must not retry (400, a timeout past the retries, JSON that
 * does not parse), keeps to its qps; and the pacing pieces on their own.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { buildHttpRequestProcessor, fromItems, init, shutdown, type Row } from '../../lib/index.js';
import { parseDuration, parseRetryAfter, spentLimitHoldMs } from '../../lib/llm/http-processor.js';
import { RequestPacer, RequestSlots, retryDelayMs } from '../../lib/llm/request-pacing.js';
import { describeAnswer, readDoubled, toPayload } from './fixtures/http-rows.js';

describe('request pacing', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it('reads Retry-After as seconds or a date, and waits base·2^attempt with jitter, never above the cap', () => {
    expect(parseRetryAfter('3')).toBe(3000);
    expect(parseRetryAfter('0.5')).toBe(500);
    expect(parseRetryAfter(new Date(61_000).toUTCString(), 1_000)).toBe(60_000);
    expect(parseRetryAfter('soon')).toBeUndefined();
    expect(parseRetryAfter(null)).toBeUndefined();
    expect(retryDelayMs(0, 100, 10_000, undefined, () => 0)).toBe(50);
    expect(retryDelayMs(3, 100, 10_000, undefined, () => 1)).toBe(800);
    expect(retryDelayMs(20, 100, 10_000, undefined, () => 1)).toBe(10_000);
    expect(retryDelayMs(0, 100, 10_000, 2_500)).toBe(2_500);
    expect(retryDelayMs(0, 100, 10_000, 90_000)).toBe(10_000);
    // Rate-limit headers (OpenAI's): durations in Go's form, or bare numbers.
    expect(parseDuration('6m0s', 's')).toBe(360_000);
    expect(parseDuration('1h2m3.5s', 's')).toBe(3_723_500);
    expect(parseDuration('250ms', 's')).toBe(250);
    expect(parseDuration('20', 'ms')).toBe(20);
    expect(parseDuration('2', 's')).toBe(2000);
    expect(parseDuration('soon', 's')).toBeUndefined();
    expect(spentLimitHoldMs(new Headers({ 'x-ratelimit-remaining-requests': '0', 'x-ratelimit-reset-requests': '1.5s' }))).toBe(1500);
    expect(spentLimitHoldMs(new Headers({ 'x-ratelimit-remaining-requests': '0' }))).toBe(1000);
    expect(spentLimitHoldMs(new Headers({ 'x-ratelimit-remaining-requests': '12', 'x-ratelimit-reset-requests': '1s' }))).toBeUndefined();
  });

  it('hands slots over in arrival order, never more than its limit at once', async () => {
    const slots = new RequestSlots(2);
    const order: number[] = [];
    await slots.acquire();
    await slots.acquire();
    const waiting = [3, 4, 5].map((id) => slots.acquire().then(() => order.push(id)));
    slots.release();
    await waiting[0];
    // A newcomer after a release does not jump the queue.
    const late = slots.acquire().then(() => order.push(6));
    slots.release();
    slots.release();
    await Promise.all(waiting.slice(1));
    slots.release();
    await late;
    expect(order).toEqual([3, 4, 5, 6]);
  });

  it('spaces starts evenly, and holds every waiting start back after a "slow down"', async () => {
    vi.useFakeTimers({ now: 0 });
    const pacer = new RequestPacer(10); // one start per 100 ms
    const starts: number[] = [];
    const turns = Array.from({ length: 4 }, () => pacer.next().then(() => starts.push(Date.now())));
    await vi.advanceTimersByTimeAsync(150);
    expect(starts).toEqual([0, 100]);
    pacer.holdFor(1_000); // at 150 ms: nothing before 1,150
    await vi.advanceTimersByTimeAsync(2_000);
    await Promise.all(turns);
    expect(starts.slice(2).every((start) => start >= 1_150)).toBe(true);
    expect(starts[3] - starts[2]).toBeGreaterThanOrEqual(100);
  });
});

/** What the server saw: attempts per row id, arrival times, the most requests it held at once. */
const seen = { attempts: new Map<number, number>(), arrivals: [] as number[], inFlight: 0, maxInFlight: 0, authorization: new Set<string>() };
/** Requests of behaviour 'gather' wait here until `gatherAt` requests are in flight at once (or a fallback timer), the first time. */
let gathered: Array<() => void> = [];
let gatherAt = Infinity;
const heldForever = new Set<ServerResponse>();
let server: Server;
let url = '';

function answer(response: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  response.writeHead(status, { 'content-type': typeof body === 'string' ? 'text/plain' : 'application/json', ...headers });
  response.end(text);
}

async function handle(request: IncomingMessage, response: ServerResponse): Promise<void> {
  let text = '';
  for await (const chunk of request) text += chunk;
  const { id, behaviour } = JSON.parse(text) as { id: number; behaviour: string };
  const attempt = (seen.attempts.get(id) ?? 0) + 1;
  seen.attempts.set(id, attempt);
  seen.arrivals.push(Date.now());
  seen.authorization.add(String(request.headers.authorization));
  seen.inFlight++;
  seen.maxInFlight = Math.max(seen.maxInFlight, seen.inFlight);
  response.on('close', () => seen.inFlight--);
  if (seen.inFlight >= gatherAt) {
    // Once: later 'gather' requests answer at once.
    gatherAt = 0;
    for (const release of gathered) release();
    gathered = [];
  }
  switch (behaviour) {
    case 'gather':
      if (seen.inFlight < gatherAt) {
        await new Promise<void>((resolve) => {
          gathered.push(resolve);
          setTimeout(resolve, 5_000).unref();
        });
      }
      return answer(response, 200, { id, doubled: id * 2 });
    case 'throttled-once':
      return attempt === 1 ? answer(response, 429, { error: 'slow down' }, { 'retry-after': '0' }) : answer(response, 200, { id, doubled: id * 2 });
    case 'unavailable-twice':
      return attempt <= 2 ? answer(response, 503, 'busy') : answer(response, 200, { id, doubled: id * 2 });
    case 'reset-once':
      if (attempt === 1) {
        request.socket.destroy();
        return;
      }
      return answer(response, 200, { id, doubled: id * 2 });
    case 'bad':
      return answer(response, 400, { error: { message: `row ${id} asks for nothing we have` } });
    case 'slow':
      heldForever.add(response);
      return;
    case 'text':
      return answer(response, 200, `plain ${id}`);
    case 'spent':
      return answer(response, 200, { id, doubled: id * 2 }, { 'x-ratelimit-remaining-requests': '0', 'x-ratelimit-reset-requests': '300ms' });
    case 'broken-json':
      response.writeHead(200, { 'content-type': 'application/json' });
      return void response.end('{"doubled": ');
    default:
      return answer(response, 200, { id, doubled: id * 2 });
  }
}

beforeAll(async () => {
  server = createServer((request, response) => void handle(request, response));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1/score`;
  await init({ numCpus: 2, prestartWorkers: 0 });
});

afterAll(async () => {
  await shutdown();
  for (const response of heldForever) response.destroy();
  server.closeAllConnections();
  await new Promise((resolve) => server.close(resolve));
});

function reset(): void {
  seen.attempts.clear();
  seen.arrivals = [];
  seen.maxInFlight = 0;
  seen.authorization.clear();
}

describe('buildHttpRequestProcessor', () => {
  it('answers every row in order with many requests in flight, never more than allowed, retrying 429s, 503s and reset connections', async () => {
    reset();
    gatherAt = 4;
    const behaviours = ['gather', 'throttled-once', 'unavailable-twice', 'reset-once', 'answer'];
    const rows = Array.from({ length: 120 }, (_, id) => ({ id, behaviour: id < 6 ? 'gather' : behaviours[id % behaviours.length] }));
    const processor = buildHttpRequestProcessor({
      url,
      headers: { authorization: 'Bearer test-key' },
      preprocess: toPayload,
      postprocess: readDoubled,
      concurrency: 2,
      maxConcurrentRequests: 3,
      batchSize: 16,
      retryBaseDelayMs: 5,
    });
    const out = await processor(fromItems(rows, { parallelism: 4 })).takeAll();
    expect(out.map((row) => row.id)).toEqual(rows.map((row) => row.id));
    expect(out.every((row) => row.doubled === (row.id as number) * 2 && row.httpStatus === 200)).toBe(true);
    expect(out[0]).not.toHaveProperty('payload');
    // The first requests waited until 4 were in flight at once: two actors' requests overlap.
    expect(seen.maxInFlight).toBeGreaterThanOrEqual(4);
    expect(seen.maxInFlight).toBeLessThanOrEqual(2 * 3);
    for (const row of rows) {
      const expected = { 'throttled-once': 2, 'unavailable-twice': 3, 'reset-once': 2 }[row.behaviour as string] ?? 1;
      expect([row.id, seen.attempts.get(row.id)]).toEqual([row.id, expected]);
    }
    expect([...seen.authorization]).toEqual(['Bearer test-key']);
  });

  it('records what fails for good (400, a timeout past its retries, JSON that does not parse) beside the rows that succeed, or fails the job naming the row', async () => {
    reset();
    const rows: Row[] = [
      { id: 0, behaviour: 'answer' },
      { id: 1, behaviour: 'bad' },
      { id: 2, behaviour: 'slow' },
      { id: 3, behaviour: 'text' },
      { id: 4, behaviour: 'broken-json' },
      { id: 5, behaviour: 'none' },
    ];
    // No preprocess here: the rows bring their payloads, and row 5's is missing.
    const payloads = rows.map((row) => ({ ...row, payload: row.behaviour === 'none' ? null : { id: row.id, behaviour: row.behaviour } }));
    // Postprocessed in the actor: a JSON answer and a text one end up in one column of strings.
    const recorded = await buildHttpRequestProcessor({ url, rowErrors: 'record', timeoutMs: 300, maxRetries: 1, retryBaseDelayMs: 5, postprocess: describeAnswer })(fromItems(payloads)).takeAll();
    const byId = new Map(recorded.map((row) => [row.id, row]));
    expect(byId.get(0)).toMatchObject({ answer: '{"id":0,"doubled":0}', httpStatus: 200, error: null });
    expect(byId.get(1)).toMatchObject({ answer: null, httpStatus: 400 });
    expect(byId.get(1)!.error).toMatch(/^ERR_HTTP_STATUS: batch row \d+: .* answered 400 Bad Request: .*asks for nothing we have/);
    expect(byId.get(2)!.error).toMatch(/^ERR_HTTP_TIMEOUT: .*did not answer within 300 ms \(attempt 2\)/);
    expect(byId.get(3)).toMatchObject({ answer: 'plain 3', httpStatus: 200, error: null });
    expect(byId.get(4)!.error).toMatch(/^ERR_HTTP_RESPONSE: .*does not parse/);
    expect(byId.get(5)!.error).toMatch(/^ERR_HTTP_PAYLOAD: batch row \d+ has no 'payload' to send/);
    // Not retried: a 400; retried once: the timeout.
    expect(seen.attempts.get(1)).toBe(1);
    expect(seen.attempts.get(2)).toBe(2);

    await expect(buildHttpRequestProcessor({ url, maxRetries: 0 })(fromItems(payloads.slice(0, 2))).takeAll()).rejects.toThrow(/answered 400 Bad Request.*asks for nothing we have/);
  });

  it('keeps to its qps over all its actors', async () => {
    reset();
    const started = Date.now();
    const rows = Array.from({ length: 24 }, (_, id) => ({ id }));
    const out = await buildHttpRequestProcessor({ url, preprocess: toPayload, qps: 40, concurrency: 2, batchSize: 4 })(fromItems(rows)).takeAll();
    expect(out).toHaveLength(24);
    // Each actor starts at most one request per 50 ms (its half of 40 a second), the first at once:
    // its 12th cannot start before 550 ms, whenever the actors began.
    expect(Math.max(...seen.arrivals) - started).toBeGreaterThanOrEqual(550);
  });

  it("waits out a spent rate limit the service reports (x-ratelimit-remaining-requests 0) before its next request", async () => {
    reset();
    const rows = [{ id: 0, behaviour: 'spent' }, { id: 1, behaviour: 'answer' }, { id: 2, behaviour: 'answer' }];
    const out = await buildHttpRequestProcessor({ url, preprocess: toPayload, maxConcurrentRequests: 1, batchSize: 3 })(fromItems(rows, { parallelism: 1 })).takeAll();
    expect(out.map((row) => row.httpStatus)).toEqual([200, 200, 200]);
    // The answer that spent the budget came before the next request left, which then waited 300 ms.
    expect(seen.arrivals[1] - seen.arrivals[0]).toBeGreaterThanOrEqual(290);
  });

  it('names what is wrong with its options', () => {
    expect(() => buildHttpRequestProcessor({ url: 'not a url' })).toThrow(/url must be an absolute http or https URL/);
    expect(() => buildHttpRequestProcessor({ url: 'ftp://host/x' })).toThrow(/url must be http or https, got ftp:/);
    expect(() => buildHttpRequestProcessor({ url, qps: 0 })).toThrow(/qps must be a number > 0, got 0/);
    expect(() => buildHttpRequestProcessor({ url, maxConcurrentRequests: 2.5 })).toThrow(/maxConcurrentRequests must be a whole number/);
    expect(() => buildHttpRequestProcessor({ url, method: 'GET' as 'POST' })).toThrow(/method must be 'POST', 'PUT' or 'PATCH'/);
    expect(() => buildHttpRequestProcessor({ url, retryStatuses: [200] })).toThrow(/retryStatuses must be a list of statuses from 400 to 599/);
    expect(() => buildHttpRequestProcessor({ url, rowErrors: 'skip' as 'record' })).toThrow(/rowErrors must be 'fail' or 'record'/);
    expect(() => buildHttpRequestProcessor({ url, qsp: 3 } as never)).toThrow(/unknown option qsp/);
    expect(() => buildHttpRequestProcessor({ url, headers: { 'x-retries': 3 } as never })).toThrow(/headers must map names to strings/);
    expect(() => buildHttpRequestProcessor({ url, postprocess: (row) => row })).toThrow(/postprocess: .* is not registered/);
  });
});
