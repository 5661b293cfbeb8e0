/**
 * Calls suite: an empty actor call's latency (the driver's get() of one call at a time) with the
 * connections' rings in shared memory, and in the same run with sockets only (the baseline).
 * Clusters of each kind take turns, so that drift in the machine's load falls on both.
 * - `actor_call_spinning_us` / `actor_call_socket_spinning_us`: with busy-polling on (1 ms), where
 *   the driver uses rings by default: the reader is awake and takes a batch with no system call.
 * - `actor_call_rung_us` / `actor_call_socket_us`: with busy-polling off (the default below 8
 *   cores, where rings are off by default): every batch by ring rings a sleeping reader.
 * - `ring_unrung_share`: of the driver's ring batches while spinning, the share that found the
 *   reader awake (no doorbell).
 */
import { get, init, shutdown } from '../lib/index.js';
import { connectionStats } from '../lib/core/connection.js';
import { RemoteSink } from './core-tasks.js';
import { median, nowNs, elapsedSeconds, round, type Results, type Suite } from './harness.js';

const CALLS = 2000;
const TURNS = 4;

async function callMicros(ring: boolean, busyPollMicros: number): Promise<number[]> {
  // Read whenever the driver spawns a worker: set for the cluster's whole life.
  const saved = process.env.TRELLIS_CONNECTION_RING;
  process.env.TRELLIS_CONNECTION_RING = ring ? '1' : '0';
  try {
    await init({ numCpus: 2, prestartWorkers: 0, busyPollMicros });
    const sink = RemoteSink.remote();
    for (let i = 0; i < 200; i++) await get(sink.ping.remote());
    const times: number[] = [];
    for (let i = 0; i < CALLS; i++) {
      const start = nowNs();
      await get(sink.ping.remote());
      times.push(elapsedSeconds(start) * 1e6);
    }
    return times;
  } finally {
    await shutdown();
    if (saved === undefined) delete process.env.TRELLIS_CONNECTION_RING;
    else process.env.TRELLIS_CONNECTION_RING = saved;
  }
}

export const callsSuite: Suite = {
  name: 'calls',
  ratios: [
    ['actor call spinning, ring / sockets only', 'actor_call_spinning_us', 'actor_call_socket_spinning_us', '<= 1.0'],
    ['actor call sleeping, ring / sockets only', 'actor_call_rung_us', 'actor_call_socket_us', ''],
  ],
  async run(): Promise<Results> {
    const results: Results = {};
    for (const [ringName, socketName, busyPoll] of [
      ['actor_call_spinning_us', 'actor_call_socket_spinning_us', 1000],
      ['actor_call_rung_us', 'actor_call_socket_us', 0],
    ] as const) {
      const ring: number[] = [];
      const socket: number[] = [];
      const before = { ...connectionStats };
      for (let turn = 0; turn < TURNS; turn++) {
        ring.push(median(await callMicros(true, busyPoll)));
        socket.push(median(await callMicros(false, busyPoll)));
      }
      results[ringName] = { value: round(median(ring), 1), unit: 'us' };
      results[socketName] = { value: round(median(socket), 1), unit: 'us' };
      if (busyPoll > 0) {
        const unrung = connectionStats.ring - before.ring;
        results.ring_unrung_share = { value: round(unrung / Math.max(1, unrung + connectionStats.rang - before.rang), 2), unit: 'share' };
      }
    }
    return results;
  },
};
