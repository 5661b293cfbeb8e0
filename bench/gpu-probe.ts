/**
 * Where the time of a small GPU transfer goes (run on a GPU host): each CUDA call in this process,
 * then the steps of one actor-to-actor call as the consumer times them, with its IPC mapping stats.
 *   node --import tsx bench/gpu-probe.ts [--mps]
 * With --mps the actors are clients of a CUDA MPS server (init's gpuSharing: 'mps').
 */
import { cuda, get, getRuntimeContext, init, remote, shutdown, Tensor, wait } from '../lib/index.js';
import { busyPollStats } from '../lib/core/busy-poll.js';
import { RemoteProducer } from './gpu-actors.js';

const us = (ms: number) => Math.round(ms * 10000) / 10;
function time(runs: number, body: () => void): number {
  const samples: number[] = [];
  for (let i = 0; i < runs; i++) {
    const start = performance.now();
    body();
    samples.push(performance.now() - start);
  }
  samples.sort((a, b) => a - b);
  return us(samples[samples.length >> 1]);
}

export class Probe {
  /** A first GPU operation on local memory, then the same steps. */
  warmSteps(tensor: Tensor) {
    const start = performance.now();
    const scratch = cuda.allocate(0, 4096);
    scratch.fill(0);
    scratch.free();
    return { warmup: us(performance.now() - start), ...this.steps(tensor) };
  }
  /** Wall-clock marks (ms since the epoch) of this call: arguments begun, method begun and ended. */
  marks(tensor?: Tensor) {
    const begun = performance.timeOrigin + performance.now();
    tensor?.free();
    const ended = performance.timeOrigin + performance.now();
    return { argumentsBegun: begun - (getRuntimeContext().argumentsMs ?? 0), begun, ended };
  }
  /** Microseconds of one small GPU operation (allocate, fill, free). */
  warmup() {
    const start = performance.now();
    const scratch = cuda.allocate(0, 4096);
    scratch.fill(0);
    scratch.free();
    return us(performance.now() - start);
  }
  steps(tensor: Tensor) {
    const steps: Record<string, number> = { arguments: us(getRuntimeContext().argumentsMs ?? NaN) };
    let start = performance.now();
    const copy = cuda.allocate(0, tensor.byteLength);
    steps.allocate = us(performance.now() - start);
    start = performance.now();
    copy.copyFromDevice(tensor.memory, tensor.byteLength);
    steps.copyFromDevice = us(performance.now() - start);
    start = performance.now();
    copy.copyFromDevice(tensor.memory, tensor.byteLength);
    steps.copyAgain = us(performance.now() - start);
    const probe = new Uint8Array(Math.min(4096, tensor.byteLength));
    start = performance.now();
    copy.copyToHost(probe);
    steps.copyToHost = us(performance.now() - start);
    start = performance.now();
    copy.free();
    tensor.free();
    steps.free = us(performance.now() - start);
    return steps;
  }
  ping() {
    return 0;
  }
  ipcStats() {
    return cuda.ipcStats();
  }
  busyPoll() {
    return busyPollStats();
  }
}
const RemoteProbe = remote(import.meta, Probe);

if (!process.env.TRELLIS_WORKER_ID) {
  const memory = cuda.allocate(0, 4096);
  const other = cuda.allocate(0, 4096);
  const host = new Uint8Array(4096);
  console.log('in process (median us):', JSON.stringify({
    allocateFree: time(200, () => cuda.allocate(0, 4096).free()),
    copyFromHost: time(200, () => memory.copyFromHost(host)),
    copyToHost: time(200, () => memory.copyToHost(host)),
    copyFromDevice: time(200, () => other.copyFromDevice(memory)),
    fill: time(200, () => memory.fill(1)),
    exportIpc: time(200, () => memory.exportIpc()),
    tensorToCuda: time(200, () => Tensor.fromArray(host, { dtype: 'u8', device: 'cuda:0' }).free()),
    tensorToCpu: time(200, () => Tensor.empty([4096], { dtype: 'u8', device: 'cuda:0' }).cpu()),
  }));
  await init({ numCpus: 4, numGpus: 1, gpuSharing: process.argv.includes('--mps') ? 'mps' : 'time-slice' });
  const producer = RemoteProducer.options({ numGpus: 0.5 }).remote();
  const probe = RemoteProbe.options({ numGpus: 0.5 }).remote();
  for (const [transport, method] of [['auto', 'steps'], ['ipc', 'steps'], ['ipc', 'warmSteps']] as const) {
    const rows: Array<Record<string, number>> = [];
    for (let i = 0; i < 40; i++) {
      using made = producer.make.options({ tensorTransport: transport }).remote(4096, 7);
      await wait([made]);
      const start = performance.now();
      const steps = (await get(probe[method].remote(made))) as Record<string, number>;
      rows.push({ call: us(performance.now() - start), ...steps });
    }
    const medians = Object.fromEntries(Object.keys(rows[0]).map((key) => [key, rows.map((row) => row[key]).sort((a, b) => a - b)[20]]));
    console.log(`${transport} 4 KiB ${method} (median us):`, JSON.stringify(medians));
  }
  // Is the first operation slow because the GPU last ran another process's work? Compare a
  // small operation right after the producer's with the same operation right after its own.
  const afterProducer: number[] = [];
  const afterSelf: number[] = [];
  for (let i = 0; i < 40; i++) {
    using made = producer.make.remote(4096, 1);
    await wait([made]);
    afterProducer.push((await get(probe.warmup.remote())) as number);
    afterSelf.push((await get(probe.warmup.remote())) as number);
  }
  const middle = (values: number[]) => values.sort((a, b) => a - b)[values.length >> 1];
  console.log('consumer GPU op (median us): after the producer', middle(afterProducer), 'after its own', middle(afterSelf));
  // Where a call's time goes between processes: driver to reader, in the reader, reader to driver.
  const wall = () => performance.timeOrigin + performance.now();
  // 'none after producer': the producer works first, the reader gets no argument (its idle time
  // and the driver's, without the transfer). Clocks of two processes may be offset: the sum of
  // the two hops is the reliable figure.
  for (const transport of ['none', 'none after producer', 'auto', 'ipc'] as const) {
    const hops: Array<Record<string, number>> = [];
    for (let i = 0; i < 40; i++) {
      const withArgument = transport === 'auto' || transport === 'ipc';
      using made = transport === 'none' ? undefined : producer.make.options({ tensorTransport: withArgument ? transport : 'store' }).remote(4096, 1);
      if (made) await wait([made]);
      const sent = wall();
      const marks = (await get(withArgument ? probe.marks.remote(made) : probe.marks.remote())) as { argumentsBegun: number; begun: number; ended: number };
      const back = wall();
      const toReader = (marks.argumentsBegun - sent) * 1000;
      const toDriver = (back - marks.ended) * 1000;
      hops.push({ toReader, toDriver, bothHops: toReader + toDriver, arguments: (marks.begun - marks.argumentsBegun) * 1000, method: (marks.ended - marks.begun) * 1000 });
    }
    const medians = Object.fromEntries(Object.keys(hops[0]).map((key) => [key, Math.round(hops.map((hop) => hop[key]).sort((a, b) => a - b)[20])]));
    console.log(`hops with a ${transport} 4 KiB argument (median us):`, JSON.stringify(medians));
  }
  const pings: number[] = [];
  for (let i = 0; i < 100; i++) {
    const start = performance.now();
    await get(probe.ping.remote());
    pings.push(performance.now() - start);
  }
  console.log('empty call (median us):', us(pings.sort((a, b) => a - b)[50]));
  console.log('consumer IPC stats:', JSON.stringify(await get(probe.ipcStats.remote())));
  // Spins begun and those that saw the answer arrive (TRELLIS_BUSY_POLL_US; off below 8 cores).
  console.log('busy-poll: driver', JSON.stringify(busyPollStats()), 'consumer', JSON.stringify(await get(probe.busyPoll.remote())));
  await shutdown();
}
