/**
 * Tensor transport of CUDA tensors between two actors on one GPU: by CUDA IPC, through the store
 * when asked, and the driver's get() onto the host. Runs on the
 * real driver where there is one, else on the fake driver (host memory behind the CUDA ABI), so the
 * routing and the bookkeeping are checked in CI and the real mappings on a GPU host.
 */
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createCollectiveGroup, events, get, init, kill, ObjectLostError, shutdown, Tensor, wait, type ActorHandle } from '../../lib/index.js';
import { buildFakeGpu, scenario } from './gpu-helpers.js';
import { RemoteConsumer, RemoteProducer, type Consumer, type Producer } from './fixtures/cuda-actors.js';

const MiB = 1 << 20;
// Decided in a child process, so this one loads whichever driver is chosen, once.
const real = (await scenario('absent')).cuda.available === true;
const fake = real ? {} : buildFakeGpu();
if (fake.path) process.env.TRELLIS_CUDA_DRIVER = process.env.TRELLIS_NCCL_LIBRARY = fake.path;
// Two NCCL ranks need two GPUs on a real host (NCCL refuses two on one); the fake has no such rule.
const twoRanks = fake.path !== undefined || (real && (await scenario('devices')).devices.length >= 2);
const driver = real ? 'the CUDA driver' : fake.path ? 'the fake CUDA driver' : undefined;

async function until<T>(read: () => Promise<T>, done: (value: T) => boolean): Promise<T> {
  for (let i = 0; ; i++) {
    const value = await read();
    if (done(value) || i === 200) return value;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

describe.skipIf(!driver)(`CUDA tensors between actors on one GPU (${driver ?? `skipped: ${fake.reason}`})`, () => {
  const routes: Array<{ objectId: string; route: string }> = [];
  let producer: ActorHandle<Producer>;
  let consumer: ActorHandle<Consumer>;
  // A close-ipc round gives up on a silent worker after this (10 s by default).
  const closeTimeoutMs = 1500;
  beforeAll(async () => {
    process.env.TRELLIS_CLOSE_IPC_TIMEOUT_MS = String(closeTimeoutMs);
    await init({ numCpus: 2, numGpus: 1 });
    events().on('tensor-transport', (event) => routes.push(event));
    producer = RemoteProducer.options({ numGpus: 0.5 }).remote();
    consumer = RemoteConsumer.options({ numGpus: 0.5 }).remote();
  });
  afterAll(async () => {
    await shutdown();
    delete process.env.TRELLIS_CLOSE_IPC_TIMEOUT_MS;
  });
  const routeOf = (id: string) => routes.filter((event) => event.objectId === id).map((event) => event.route);

  it('keeps the producer\'s tensor while a reader keeps its mapping, past the last ref, and frees it after', async () => {
    const baseline = await get(producer.allocatedBytes.remote());
    for (const collect of [false, true]) {
      {
        using made = producer.make.remote(2 * MiB, 5);
        expect(await get(consumer.keep.remote(made))).toBe('cuda:0');
      }
      // The ref is gone, but the reader's tensor still maps the block: it stays the producer's,
      // and a new tensor of the same size gets another block, not that one.
      for (let i = 0; i < 3; i++) {
        using other = producer.make.remote(2 * MiB, 9);
        expect(await get(consumer.inspect.remote(other))).toEqual([{ device: 'cuda:0', imported: true, numel: 2 * MiB, sum: 18 * MiB }]);
      }
      expect(await get(consumer.readKept.remote())).toBe(10 * MiB);
      expect(await get(producer.allocatedBytes.remote())).toBeGreaterThan(baseline);
      // Freed (or collected) in the reader: the object goes, and the producer's memory with it.
      await get(consumer.dropKept.remote(collect));
      expect(await until(() => get(producer.allocatedBytes.remote()), (bytes) => bytes === baseline)).toBe(baseline);
    }
  });

  it("keeps a result's tensors for a reader that maps them after the driver's get() brought them into the store, and frees them after", async () => {
    const baseline = await get(producer.allocatedBytes.remote());
    {
      using made = producer.make.remote(2 * MiB, 5);
      expect(await get(consumer.keep.remote(made))).toBe('cuda:0');
      const local = (await get(made)) as Tensor;
      expect(local.device).toBe('cpu');
    }
    // The result went into the store and its ref is gone; the reader's mapping still reads it.
    for (let i = 0; i < 3; i++) {
      using other = producer.make.remote(2 * MiB, 9);
      expect(await get(consumer.inspect.remote(other))).toEqual([{ device: 'cuda:0', imported: true, numel: 2 * MiB, sum: 18 * MiB }]);
    }
    expect(await get(consumer.readKept.remote())).toBe(10 * MiB);
    await get(consumer.dropKept.remote(false));
    expect(await until(() => get(producer.allocatedBytes.remote()), (bytes) => bytes === baseline)).toBe(baseline);
  });

  it('frees only the shares an actor returns of a buffer it keeps; a share a reader keeps holds the mapping as the tensor did', async () => {
    const baseline = await get(producer.allocatedBytes.remote());
    for (const value of [3, 4]) {
      using shared = producer.fillShared.remote(value);
      expect(await get(consumer.inspect.remote(shared))).toEqual([{ device: 'cuda:0', imported: true, numel: MiB, sum: value * MiB }]);
    }
    // Both results' shares were freed with their last refs; the buffer is still the producer's.
    expect(await get(producer.bufferByte.remote())).toBe(4);
    const withBuffer = await until(() => get(producer.allocatedBytes.remote()), (bytes) => bytes > baseline);
    {
      using made = producer.make.remote(2 * MiB, 5);
      expect(await get(consumer.keepShare.remote(made))).toBe('cuda:0');
    }
    // The reader freed the tensor but keeps a share: the block stays the producer's.
    {
      using other = producer.make.remote(2 * MiB, 9);
      expect(await get(consumer.inspect.remote(other))).toEqual([{ device: 'cuda:0', imported: true, numel: 2 * MiB, sum: 18 * MiB }]);
    }
    expect(await get(consumer.readKept.remote())).toBe(10 * MiB);
    await get(consumer.dropKept.remote(false));
    expect(await until(() => get(producer.allocatedBytes.remote()), (bytes) => bytes === withBuffer)).toBe(withBuffer);
    await get(producer.dropBuffer.remote());
    expect(await get(producer.allocatedBytes.remote())).toBe(baseline);
  });

  it('says why a tensor an actor returned itself (not a share) fails once its result is freed', async () => {
    {
      using returned = producer.fillReturned.remote(6);
      expect(await get(consumer.inspect.remote(returned))).toEqual([{ device: 'cuda:0', imported: true, numel: MiB, sum: 6 * MiB }]);
    }
    const failure = await until(() => get(producer.bufferByte.remote()).then(() => undefined, (error: Error) => error), (error) => error !== undefined);
    expect(failure?.message).toMatch(/Tensor\(u8, \[1048576\], cuda:0\) was returned by a method with a tensorTransport, and its result freed it with its last ref; return tensor.share\(\) to keep using it/);
    await get(producer.dropBuffer.remote());
  });

  it('gives freed exported blocks back to the driver once readers have closed their idle mappings', async () => {
    const size = 14 * MiB + 3; // a size class no other test uses
    {
      using made = producer.make.remote(size, 4);
      expect(await get(consumer.inspect.remote(made))).toEqual([{ device: 'cuda:0', imported: true, numel: size, sum: 4 * size }]);
    }
    // The block went back to the producer's cache, and the reader keeps its mapping idle.
    const cached = await until(() => get(producer.cachedBytes.remote()), (bytes) => bytes >= 16 * MiB);
    expect(cached).toBeGreaterThanOrEqual(16 * MiB);
    const before = await get(consumer.ipcStats.remote());
    expect(before.idle).toBeGreaterThan(0);
    const { freedBytes } = await get(producer.reclaim.remote());
    expect(freedBytes).toBeGreaterThanOrEqual(16 * MiB);
    expect(await get(producer.cachedBytes.remote())).toBe(cached - freedBytes);
    const after = await get(consumer.ipcStats.remote());
    expect(after.idle).toBe(0);
    expect(after.closes - before.closes).toBe(before.idle);
    // Nothing left to give back, and transfers go on with fresh blocks and mappings.
    expect(await get(producer.reclaim.remote())).toEqual({ freedBytes: 0 });
    using again = producer.make.remote(size, 6);
    expect(await get(consumer.inspect.remote(again))).toEqual([{ device: 'cuda:0', imported: true, numel: size, sum: 6 * size }]);
  });

  it('gives up on a worker busy in a long call, counting it as mapping every handle, and reclaims once it answers', async () => {
    const size = 13 * MiB + 3; // a size class no other test uses
    {
      using made = producer.make.remote(size, 2);
      expect(await get(consumer.inspect.remote(made))).toEqual([{ device: 'cuda:0', imported: true, numel: size, sum: 2 * size }]);
    }
    expect(await until(() => get(producer.cachedBytes.remote()), (bytes) => bytes >= 14 * MiB)).toBeGreaterThanOrEqual(14 * MiB);
    const files = mkdtempSync(join(tmpdir(), 'trellis-busy-'));
    const busy = RemoteConsumer.remote();
    try {
      const blocked = busy.blockUntil.remote(join(files, 'gate'), join(files, 'started'));
      await until(async () => existsSync(join(files, 'started')), (started) => started);
      const started = performance.now();
      // The busy worker cannot say what it maps: every handle counts as mapped, nothing is freed,
      // and the round ends at its timeout instead of waiting for the call.
      expect(await get(producer.reclaim.remote())).toEqual({ freedBytes: 0 });
      expect(performance.now() - started).toBeGreaterThanOrEqual(closeTimeoutMs - 50);
      writeFileSync(join(files, 'gate'), '');
      expect(await get(blocked)).toBe(true);
      expect((await get(producer.reclaim.remote())).freedBytes).toBeGreaterThanOrEqual(14 * MiB);
    } finally {
      writeFileSync(join(files, 'gate'), '');
      kill(busy);
      rmSync(files, { recursive: true, force: true });
    }
  });

  it('fails a call with ObjectLostError when its held argument\'s holder dies after the call was sent', async () => {
    const files = mkdtempSync(join(tmpdir(), 'trellis-lost-'));
    const doomed = RemoteProducer.remote();
    const busy = RemoteConsumer.remote(); // a process of its own: no idle mapping to reuse
    try {
      const pid = await get(doomed.processId.remote());
      const blocked = busy.blockUntil.remote(join(files, 'gate'), join(files, 'started'));
      await until(async () => existsSync(join(files, 'started')), (started) => started);
      using made = doomed.make.remote(3 * MiB + 5, 2);
      await wait([made]);
      // Sent at once with the IPC handles, it waits in the busy worker while the holder dies.
      const reading = busy.inspect.remote(made);
      kill(doomed);
      const alive = () => {
        try {
          process.kill(pid, 0);
          return true;
        } catch {
          return false;
        }
      };
      await until(async () => alive(), (running) => !running);
      writeFileSync(join(files, 'gate'), '');
      expect(await get(blocked)).toBe(true);
      const failure = await get(reading).then(() => undefined, (error: Error) => error);
      expect(failure).toBeInstanceOf(ObjectLostError);
      expect((failure as ObjectLostError).objectId).toBe(made.id);
      expect(failure?.message).toMatch(/Consumer\.inspect: object [0-9a-f]+'s tensors could not be mapped from the process holding them, which has most likely died/);
    } finally {
      writeFileSync(join(files, 'gate'), '');
      kill(busy);
      rmSync(files, { recursive: true, force: true });
    }
  });

  it("maps an 'ipc' result in the reader by CUDA IPC, content checked, and frees it with the last ref", async () => {
    const baseline = await get(producer.allocatedBytes.remote());
    {
      using made = producer.make.remote(3 * MiB + 5, 9);
      for (let i = 0; i < 2; i++) {
        expect(await get(consumer.inspect.remote(made))).toEqual([{ device: 'cuda:0', imported: true, numel: 3 * MiB + 5, sum: 9 * (3 * MiB + 5) }]);
      }
      expect(routeOf(made.id)).toEqual(['ipc', 'ipc']);
      // The reader closed its mapping with its last view.
      expect(await get(consumer.mappings.remote())).toBe(0);
      expect(await get(producer.allocatedBytes.remote())).toBeGreaterThan(baseline);
    }
    expect(await until(() => get(producer.allocatedBytes.remote()), (bytes) => bytes === baseline)).toBe(baseline);
  });

  it("maps 'auto' results of any size by IPC on one node, a Tensor[] whole", async () => {
    using pair = producer.makePair.remote(1000);
    expect(await get(consumer.inspect.remote(pair))).toEqual([
      { device: 'cuda:0', imported: true, numel: 1000, sum: 1000 },
      { device: 'cuda:0', imported: true, numel: 3, sum: 21 },
    ]);
    expect(routeOf(pair.id)).toEqual(['ipc']);
    using large = producer.makePair.remote(MiB);
    expect(await get(consumer.inspect.remote(large))).toEqual([
      { device: 'cuda:0', imported: true, numel: MiB, sum: MiB },
      { device: 'cuda:0', imported: true, numel: 3, sum: 21 },
    ]);
    expect(routeOf(large.id)).toEqual(['ipc']);
  });

  it('maps CUDA tensors nested in a result by IPC, and rebuilds the value around them', async () => {
    using named = producer.makeNamed.remote(MiB);
    expect(await get(consumer.inspectNamed.remote(named))).toEqual({
      hidden: [{ device: 'cuda:0', imported: true, numel: MiB, sum: 3 * MiB }],
      ids: [{ device: 'cuda:0', imported: true, numel: 3, sum: 6 }],
      step: 7,
    });
    expect(routeOf(named.id)).toEqual(['ipc']);
    // The driver's get() copies the tensors to host, in the same value.
    const local = (await get(named)) as { hidden: Tensor; extra: { ids: Tensor[]; step: number } };
    expect([local.hidden.device, local.hidden.numel, local.extra.ids[0].toArray(), local.extra.step]).toEqual(['cpu', MiB, [1, 2, 3], 7]);
  });

  it('hands an actor its own held result where it is, as a view its free() leaves to the result', async () => {
    using made = producer.make.remote(MiB, 4);
    expect(await get(producer.inspectOwn.remote(made))).toEqual({ device: 'cuda:0', imported: false, numel: MiB, sum: 4 * MiB });
    // Its free() did not give the block back: new tensors of that size get other blocks, and a
    // reader still maps the result's content.
    for (let i = 0; i < 2; i++) {
      using other = producer.make.remote(MiB, 9);
      await get(consumer.inspect.remote(other));
    }
    expect(await get(consumer.inspect.remote(made))).toEqual([{ device: 'cuda:0', imported: true, numel: MiB, sum: 4 * MiB }]);
    expect(routeOf(made.id)).toEqual(['local', 'ipc']);
  });

  it("maps a held result that an actor's get() fetches from a nested ref, and hands the holder its own", async () => {
    using made = producer.make.remote(MiB, 2);
    expect(await get(consumer.inspectNested.remote({ ref: made }))).toEqual([{ device: 'cuda:0', imported: true, numel: MiB, sum: 2 * MiB }]);
    expect(await get(producer.inspectOwnNested.remote({ ref: made }))).toEqual({ device: 'cuda:0', imported: false, numel: MiB, sum: 2 * MiB });
    expect(routeOf(made.id)).toEqual(['ipc', 'local']);
  });

  it('passes on a tensor received by IPC as a copy of its own on the GPU, which readers map', async () => {
    using made = producer.make.remote(MiB, 6);
    using passed = consumer.passOn.remote(made);
    // The producer maps the consumer's copy: the content of its own tensor, in another block.
    expect(await get(producer.inspectOwn.remote(passed))).toEqual({ device: 'cuda:0', imported: true, numel: MiB, sum: 6 * MiB });
    expect(routeOf(made.id)).toEqual(['ipc']);
    expect(routeOf(passed.id)).toEqual(['ipc']);
  });

  it.skipIf(!twoRanks)(`sends 'nccl' results to a member of the producer's NCCL group over the communicator${twoRanks ? '' : ' (skipped: needs two GPUs)'}`, async () => {
    const group = await createCollectiveGroup([producer, consumer], { backend: 'nccl', name: 'cuda-pair' });
    try {
      using made = producer.make.options({ tensorTransport: 'nccl' }).remote(3 * MiB, 5);
      expect(await get(consumer.inspect.remote(made))).toEqual([{ device: 'cuda:0', imported: false, numel: 3 * MiB, sum: 15 * MiB }]);
      expect(routeOf(made.id)).toEqual(['communicator']);
    } finally {
      await group.destroy();
    }
  });

  it.skipIf(!twoRanks)(`fails a group's creation with its dead member's error at once, not with the survivors' NCCL timeout${twoRanks ? '' : ' (skipped: needs two GPUs)'}`, async () => {
    // Rank 0 waits in NCCL's init for rank 1, which is dead: the group fails with rank 1's death,
    // long before rank 0's init would time out (past this test's own timeout).
    const waiting = RemoteConsumer.options({ numGpus: 0 }).remote();
    const dead = RemoteConsumer.options({ numGpus: 0 }).remote();
    try {
      await get([waiting.mappings.remote(), dead.mappings.remote()]);
      kill(dead);
      await expect(createCollectiveGroup([waiting, dead], { backend: 'nccl', name: 'half-dead', timeout: 600_000 })).rejects.toMatchObject({ name: 'ActorDiedError' });
    } finally {
      kill(waiting);
    }
  }, 30_000);

  it("goes through the store when asked, back onto the reader's GPU; the driver's get() copies to host", async () => {
    using stored = producer.make.options({ tensorTransport: 'store' }).remote(2 * MiB, 4);
    expect(await get(consumer.inspect.remote(stored))).toEqual([{ device: 'cuda:0', imported: false, numel: 2 * MiB, sum: 8 * MiB }]);
    expect(routeOf(stored.id)).toEqual([]);
    // The producer copied it from the device straight into store memory, page-locked for it.
    expect(await get(producer.chunksLocked.remote())).toBeGreaterThan(0);
    using held = producer.make.remote(MiB, 2);
    const onHost = (await get(held)) as Tensor;
    expect(onHost.device).toBe('cpu');
    expect(onHost.bytes().every((byte) => byte === 2)).toBe(true);
    // Once stored for the driver, other readers take the stored copy.
    expect(await get(consumer.inspect.remote(held))).toEqual([{ device: 'cuda:0', imported: false, numel: MiB, sum: 2 * MiB }]);
    expect(routeOf(held.id)).toEqual(['store']);
  });
});
