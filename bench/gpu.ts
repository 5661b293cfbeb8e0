/**
 * GPU suite (needs a CUDA device). The floor is the device-to-device copy in this process.
 * Transfers go actor to actor on one GPU, content checked, in steady state (the producer's
 * allocator hands out the same block again, the consumer's IPC mapping stays open):
 * - `<route>_transfer_GBps`: bytes over the time the consumer's call spent getting the tensor (an
 *   IPC mapping, or a read from the store onto the GPU) plus copying it into memory of its own,
 *   both timed in the consumer. The call's fixed cost is `actor_to_actor_4KiB_us`.
 * - `<route>_call_GBps`: bytes over the whole call, as the driver sees it.
 * - `actor_to_actor_4KiB_us`: a call whose reader gets a 4 KiB CUDA tensor by IPC and reads it
 *   back to the host to check it, as the driver sees it (`_copied`: copied into the reader's
 *   own memory first, as in the transfer figures; the figure sessions up to 5 reported).
 * - `<route>_reader_arguments_us` (256 MiB): the part of the transfer spent getting the argument,
 *   its fixed cost; the rest is the copy.
 * - `ipc_transfer_warm_GBps`: as ipc_transfer, with the consumer's first GPU operation (the GPU's
 *   switch from the producer's context, paid by any work there) done before the timed part.
 * The store route's producer side (device to host into the store) happens when the result is made
 * and is not in the transfer. Sizes 4 KiB to 1 GiB; unnamed sizes are 256 MiB.
 * Where nvidia-cuda-mps-control is found, the actor figures are measured again with the workers
 * as clients of a CUDA MPS server (`init({ gpuSharing: 'mps' })`), named `<metric>_mps_<unit>`.
 */
import { Tensor, cuda, events, get, init, shutdown, wait } from '../lib/index.js';
import { findControlProgram } from '../lib/gpu/mps.js';
import { RemoteConsumer, RemoteProducer } from './gpu-actors.js';
import { elapsedSeconds, median, nowNs, round, type Results, type Suite } from './harness.js';

const MiB = 2 ** 20;
const SIZES = [4096, 64 * 1024, MiB, 16 * MiB, 256 * MiB, 1024 * MiB];
const label = (bytes: number) => (bytes >= MiB ? `${bytes / MiB}MiB` : `${bytes / 1024}KiB`);

function copyRate(bytes: number, runs: number, copy: () => void): number {
  copy();
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    const start = nowNs();
    copy();
    times.push(elapsedSeconds(start));
  }
  return bytes / median(times) / 1e9;
}

type Transport = 'ipc' | 'store' | 'auto';
interface Sample {
  callSeconds: number;
  transferSeconds: number;
  argumentsSeconds: number;
}

export const gpuSuite: Suite = {
  name: 'gpu',
  ratios: [
    ['IPC transfer / device copy (256 MiB)', 'ipc_transfer_GBps', 'd2d_copy_GBps', '>= 0.90'],
    ['IPC transfer, consumer context warm / device copy', 'ipc_transfer_warm_GBps', 'd2d_copy_GBps', ''],
    ['store transfer / pinned host-to-device', 'store_transfer_GBps', 'h2d_pinned_GBps', '>= 0.60'],
    ['4 KiB actor to actor / empty call', 'actor_to_actor_4KiB_us', 'empty_call_us', ''],
    ['IPC transfer under MPS / device copy', 'ipc_transfer_mps_GBps', 'd2d_copy_GBps', ''],
    ['4 KiB actor to actor under MPS / empty call', 'actor_to_actor_4KiB_mps_us', 'empty_call_mps_us', ''],
  ],
  async run(): Promise<Results> {
    if (!cuda.available) {
      throw new Error(`the gpu suite needs CUDA: ${cuda.reason}`);
    }
    const results: Results = {};
    for (const bytes of SIZES) {
      const source = cuda.allocate(0, bytes);
      const target = cuda.allocate(0, bytes);
      results[`d2d_copy_${label(bytes)}_GBps`] = { value: round(copyRate(bytes, 5, () => target.copyFromDevice(source, bytes))), unit: 'GB/s' };
      source.free();
      target.free();
    }
    const size = 256 * MiB;
    const a = cuda.allocate(0, size);
    const b = cuda.allocate(0, size);
    results.d2d_copy_GBps = { value: round(copyRate(size, 10, () => b.copyFromDevice(a, size))), unit: 'GB/s' };
    const pinned = cuda.allocateHost(size);
    pinned.fill(1);
    results.h2d_pinned_GBps = { value: round(copyRate(size, 6, () => a.copyFromHost(pinned))), unit: 'GB/s' };
    const pageable = Buffer.alloc(size, 1);
    results.h2d_pageable_GBps = { value: round(copyRate(size, 6, () => a.copyFromHost(pageable))), unit: 'GB/s' };
    a.free();
    b.free();

    // TRELLIS_GPU_BENCH_SHARING: 'time-slice', 'mps', or both (the default; MPS where its control
    // program is found). A GPU check runs the two as separate steps, each under its own limit.
    const sharing = process.env.TRELLIS_GPU_BENCH_SHARING;
    if (sharing !== 'mps') await measureActors(results, 'time-slice');
    if (sharing === 'mps' || (sharing !== 'time-slice' && findControlProgram())) {
      try {
        await measureActors(results, 'mps');
      } catch (error) {
        if (sharing === 'mps') throw error;
        console.error(`gpu: no figures under MPS: ${(error as Error).message}`);
      }
    } else if (sharing !== 'time-slice') {
      console.error('gpu: nvidia-cuda-mps-control is not on PATH: no figures under MPS');
    }
    return results;
  },
};

/**
 * Actor-to-actor figures, with the workers sharing the GPU by `sharing`. Under MPS the names get
 * `_mps` before the unit, for the same transfers without the GPU's context switch between the
 * producer's process and the reader's, and the sweep is shorter.
 */
async function measureActors(results: Results, sharing: 'time-slice' | 'mps'): Promise<void> {
  const record = (metric: string, value: number, unit: string) => {
    results[sharing === 'mps' ? metric.replace(/_(GBps|us|ms_per_64MiB)$/, '_mps_$1') : metric] = { value, unit };
  };
  const size = 256 * MiB;
  await init({ numCpus: 4, numGpus: 1, gpuSharing: sharing });
  const routes = new Map<string, string[]>();
  events().on('tensor-transport', (event) => routes.set(event.objectId, [...(routes.get(event.objectId) ?? []), event.route]));
  try {
    const producer = RemoteProducer.options({ numGpus: 0.5 }).remote();
    const consumer = RemoteConsumer.options({ numGpus: 0.5 }).remote();
    const transfer = async (bytes: number, transport: Transport, warm = false): Promise<Sample> => {
      using made = producer.make.options({ tensorTransport: transport }).remote(bytes, 7);
      await wait([made]); // produced first (wait leaves it where it is): time only the transfer
      const start = nowNs();
      const taken = (await get(consumer.take.remote(made, 7, warm))) as { ok: boolean; argumentsSeconds: number; copySeconds: number };
      const callSeconds = elapsedSeconds(start);
      if (!taken.ok) throw new Error(`content check failed for the ${transport} transfer of ${bytes} bytes`);
      const expected = transport === 'store' ? [] : ['ipc'];
      const seen = routes.get(made.id) ?? [];
      if (seen.join() !== expected.join()) throw new Error(`the ${transport} transfer of ${bytes} bytes took route [${seen}], not [${expected}]`);
      return { callSeconds, transferSeconds: taken.argumentsSeconds + taken.copySeconds, argumentsSeconds: taken.argumentsSeconds };
    };
    const measure = async (bytes: number, transport: Transport, runs = 5, warm = false) => {
      const samples: Sample[] = [];
      await transfer(bytes, transport, warm); // the first mapping, the first store chunks
      for (let i = 0; i < runs; i++) samples.push(await transfer(bytes, transport, warm));
      return {
        argumentsUs: median(samples.map((sample) => sample.argumentsSeconds)) * 1e6,
        transfer: bytes / median(samples.map((sample) => sample.transferSeconds)) / 1e9,
        call: bytes / median(samples.map((sample) => sample.callSeconds)) / 1e9,
        callUs: median(samples.map((sample) => sample.callSeconds)) * 1e6,
      };
    };
    const sweeps: Array<[Transport, number[]]> = sharing === 'mps'
      ? [['ipc', [size, 1024 * MiB]], ['store', [size]]]
      : [['ipc', SIZES], ['store', [MiB, 16 * MiB, size]]];
    for (const [transport, sizes] of sweeps) {
      for (const bytes of sizes) {
        const rates = await measure(bytes, transport);
        for (const name of [`${label(bytes)}_`, ...(bytes === size ? [''] : [])]) {
          record(`${transport}_transfer_${name}GBps`, round(rates.transfer), 'GB/s');
          record(`${transport}_call_${name}GBps`, round(rates.call), 'GB/s');
        }
        // The transfer's fixed part: the reader getting its argument (mapping it, or the store read).
        if (bytes === size) record(`${transport}_reader_arguments_us`, round(rates.argumentsUs, 1), 'us');
      }
    }
    // Without the GPU's context switch from producer to consumer (see gpu-actors.ts).
    record('ipc_transfer_warm_GBps', round((await measure(size, 'ipc', 5, true)).transfer), 'GB/s');
    const locked = (await get(consumer.pageLockStats.remote())) as { chunksLocked: number; lockMs: number };
    record('store_page_lock_ms_per_64MiB', round(locked.lockMs / Math.max(1, locked.chunksLocked), 2), 'ms');
    const pings: number[] = [];
    for (let i = 0; i < 60; i++) {
      const start = nowNs();
      await get(consumer.ping.remote());
      pings.push(elapsedSeconds(start));
    }
    record('empty_call_us', round(median(pings.slice(10)) * 1e6, 1), 'us');
    // 'auto' maps it by IPC (the reader's idle mapping of the producer's reused block); the
    // reader reads the tensor where it arrived and checks it. `_copied`: it also copies it into
    // memory of its own first (take), as the transfer figures do.
    const smallCalls: number[] = [];
    for (let i = 0; i < 51; i++) {
      using made = producer.make.options({ tensorTransport: 'auto' }).remote(4096, 7);
      await wait([made]);
      const start = nowNs();
      const ok = await get(consumer.check.remote(made, 7));
      if (i > 0) smallCalls.push(elapsedSeconds(start));
      if (!ok) throw new Error('content check failed for a 4 KiB actor-to-actor transfer');
      if ((routes.get(made.id) ?? []).join() !== 'ipc') throw new Error(`the 4 KiB transfer took route [${routes.get(made.id)}], not [ipc]`);
    }
    record('actor_to_actor_4KiB_us', round(median(smallCalls) * 1e6, 1), 'us');
    record('actor_to_actor_4KiB_copied_us', round((await measure(4096, 'auto', 50)).callUs, 1), 'us');
    const exported = Tensor.empty([MiB], { dtype: 'u8', device: 'cuda:0' });
    record('ipc_open_us', round((await get(consumer.openIpc.remote(exported.memory.exportIpc()))) as number, 1), 'us');
    exported.free();
  } finally {
    await shutdown();
  }
}
