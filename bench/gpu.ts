/**
 * GPU suite (needs a CUDA device): the device-to-device copy is the floor; actor-to-actor
 * transfers by CUDA IPC and through the object store, pinned host-to-device copies, IPC open time,
 * and a 4 KiB actor-to-actor round trip. Sizes 4 KiB to 1 GiB; metrics at 256 MiB unless named.
 */
import { Tensor, cuda, get, init, shutdown } from '../lib/index.js';
import { RemoteConsumer, RemoteProducer } from './gpu-actors.js';
import { elapsedSeconds, median, nowNs, round, type Results, type Suite } from './harness.js';

const MiB = 2 ** 20;

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

export const gpuSuite: Suite = {
  name: 'gpu',
  ratios: [
    ['IPC transfer / device copy (256 MiB)', 'ipc_transfer_GBps', 'd2d_copy_GBps', '>= 0.90'],
    ['store transfer / pinned host-to-device', 'store_transfer_GBps', 'h2d_pinned_GBps', '>= 0.60'],
  ],
  async run(): Promise<Results> {
    if (!cuda.available) {
      throw new Error(`the gpu suite needs CUDA: ${cuda.reason}`);
    }
    const results: Results = {};
    const size = 256 * MiB;
    const a = cuda.allocate(0, size);
    const b = cuda.allocate(0, size);
    for (let bytes = 4096; bytes <= 1024 * MiB; bytes *= 16) {
      const source = cuda.allocate(0, bytes);
      const target = cuda.allocate(0, bytes);
      results[`d2d_copy_${bytes >= MiB ? `${bytes / MiB}MiB` : `${bytes / 1024}KiB`}_GBps`] = {
        value: round(copyRate(bytes, 5, () => target.copyFromDevice(source, bytes))),
        unit: 'GB/s',
      };
      source.free();
      target.free();
    }
    results.d2d_copy_GBps = { value: round(copyRate(size, 10, () => b.copyFromDevice(a, size))), unit: 'GB/s' };
    const host = Buffer.alloc(size, 1);
    const times: number[] = [];
    for (let i = 0; i < 6; i++) {
      const start = nowNs();
      await a.copyFromHostAsync(host);
      times.push(elapsedSeconds(start));
    }
    results.h2d_pinned_GBps = { value: round(size / median(times.slice(1)) / 1e9), unit: 'GB/s' };
    a.free();
    b.free();

    await init({ numCpus: 4, numGpus: 1 });
    try {
      const producer = RemoteProducer.options({ numGpus: 0.5 }).remote();
      const consumer = RemoteConsumer.options({ numGpus: 0.5 }).remote();
      const transfer = async (bytes: number, transport: 'ipc' | 'store') => {
        const made = producer.make.options({ tensorTransport: transport }).remote(bytes, 7);
        await get(made).catch(() => undefined); // produce first: time only the transfer
        const start = nowNs();
        const ok = await get(consumer.take.remote(made, 7));
        const seconds = elapsedSeconds(start);
        if (!ok) throw new Error(`content check failed for ${transport} transfer of ${bytes} bytes`);
        return seconds;
      };
      const rate = async (transport: 'ipc' | 'store') => {
        const samples: number[] = [];
        for (let i = 0; i < 4; i++) samples.push(await transfer(size, transport));
        return size / median(samples.slice(1)) / 1e9;
      };
      results.ipc_transfer_GBps = { value: round(await rate('ipc')), unit: 'GB/s' };
      results.store_transfer_GBps = { value: round(await rate('store')), unit: 'GB/s' };
      const small: number[] = [];
      for (let i = 0; i < 50; i++) small.push(await transfer(4096, 'ipc'));
      results.actor_to_actor_4KiB_us = { value: round(median(small.slice(5)) * 1e6, 1), unit: 'us' };
      const exported = Tensor.empty([MiB], { dtype: 'u8', device: 'cuda:0' });
      results.ipc_open_us = { value: round((await get(consumer.openIpc.remote(exported.memory.exportIpc()))) as number, 1), unit: 'us' };
      exported.free();
    } finally {
      await shutdown();
    }
    return results;
  },
};
