/**
 * CUDA IPC edges end to end on the fake CUDA driver (test/gpu/fake: "device" memory is host
 * memory from memfd, which other processes map by IPC as the real driver's would be): handles
 * through the channel, one mapping per allocation in the reader, views that end with their
 * execution, tensors passed on, and nothing left mapped after teardown. What the fake cannot tell
 * (the real driver's behaviour) waits for the GPU test in ipc.test.ts.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InputNode, MultiOutputNode, get, init, shutdown, type ActorHandle, type Tensor } from '../../lib/index.js';
import { buildFakeGpu } from '../gpu/gpu-helpers.js';
import { checkNcclCollectiveOneRank, checkNcclTwoRanks, checkOverlappedIpcPipeline } from './fixtures/ipc-checks.js';
import type { Stage } from './fixtures/stages.js';

const fake = buildFakeGpu();

describe.skipIf(!fake.path)(`CUDA IPC edges on the fake driver${fake.reason ? ` (skipped: ${fake.reason})` : ''}`, () => {
  let stages: Array<ActorHandle<Stage>>;
  beforeAll(async () => {
    // Workers inherit this: every actor (and the driver) loads the fake driver.
    process.env.TRELLIS_CUDA_DRIVER = fake.path;
    process.env.TRELLIS_NCCL_LIBRARY = fake.path;
    const { RemoteStage } = await import('./fixtures/stages.js');
    await init({ numCpus: 2 });
    stages = [1, 2, 3].map((offset) => RemoteStage.remote(offset));
    await get(stages.map((stage) => stage.pid.remote()));
  });
  afterAll(async () => {
    await shutdown();
    delete process.env.TRELLIS_CUDA_DRIVER;
    delete process.env.TRELLIS_NCCL_LIBRARY;
  });

  it('moves CUDA tensors as handles: the reader maps the writer memory, results are right, teardown unmaps', async () => {
    const [a, b] = stages;
    const input = new InputNode();
    const graph = await b.inspect.bind(a.cudaFill.bind(input, 2).withTensorTransport('ipc')).compile({ maxInflight: 4 });
    try {
      expect(graph.visualize().text).toMatch(/READ .* \(CUDA IPC\)/);
      for (let i = 0; i < 30; i++) expect(await graph.execute(64)).toEqual({ device: 'cuda:0', imported: true, sum: 128 });
      // Pipelined, several messages in the ring at once.
      const refs = Array.from({ length: 40 }, (_, i) => graph.execute(10 + i));
      expect(await Promise.all(refs.map((ref) => ref.get()))).toEqual(Array.from({ length: 40 }, (_, i) => ({ device: 'cuda:0', imported: true, sum: 2 * (10 + i) })));
    } finally {
      await graph.teardown();
    }
    expect(await get(b.ipcMappings.remote())).toBe(0);
  });

  it('maps CUDA tensors nested in a value, and sends the rest (a CPU tensor, plain data) inline', async () => {
    const [a, b] = stages;
    const graph = await b.inspectNamed.bind(a.cudaNamed.bind(new InputNode()).withTensorTransport('ipc')).compile();
    try {
      for (let i = 0; i < 10; i++) {
        expect(await graph.execute(50 + i)).toEqual({
          hidden: { device: 'cuda:0', imported: true, sum: 2 * (50 + i) },
          mask: { device: 'cuda:0', imported: true, sum: 2 },
          onHost: { device: 'cpu', imported: false, sum: 10 },
          step: 50 + i,
        });
      }
    } finally {
      await graph.teardown();
    }
    expect(await get(b.ipcMappings.remote())).toBe(0);
  });

  it("opens each allocation once however many messages point into it ('auto' between actors that have CUDA)", async () => {
    const [a, b] = stages;
    const graph = await b.inspect.bind(a.cudaConstant.bind(new InputNode()).withTensorTransport('auto')).compile();
    try {
      expect(graph.visualize().text).toMatch(/WRITE .* \(CUDA IPC\)/);
      for (let i = 0; i < 20; i++) expect(await graph.execute(100)).toEqual({ device: 'cuda:0', imported: true, sum: 4950 });
      expect(await get(b.ipcMappings.remote())).toBe(1);
    } finally {
      await graph.teardown();
    }
  });

  it('runs a collective node on NCCL with CUDA tensors (one rank)', async () => {
    await checkNcclCollectiveOneRank(stages[0]);
  });

  it("swaps CUDA tensors over 'nccl' edges and allreduces them on an NCCL communicator of two ranks", async () => {
    await checkNcclTwoRanks(stages[0], stages[1]);
  });

  it('with overlap, pipelines IPC edges: 4 in flight, results in order', async () => {
    const [a, b] = stages;
    await checkOverlappedIpcPipeline(a, b);
  });

  it('passes a mapped tensor on to a third actor (copied into the passing actor memory), and to the driver through shared memory', async () => {
    const [a, b, c] = stages;
    const input = new InputNode();
    const first = a.cudaFill.bind(input, 1).withTensorTransport('ipc');
    const passed = b.passOn.bind(first).withTensorTransport('ipc');
    const added = b.cudaAdd.bind(first, 1).withTensorTransport('ipc');
    const graph = await new MultiOutputNode([c.inspect.bind(passed), c.inspect.bind(added), b.passOn.bind(first)]).compile();
    try {
      for (let i = 0; i < 5; i++) {
        const [viaB, sum, driverCopy] = (await graph.execute(8)) as [unknown, unknown, Tensor];
        expect(viaB).toEqual({ device: 'cuda:0', imported: true, sum: 8 });
        expect(sum).toEqual({ device: 'cuda:0', imported: true, sum: 16 });
        // The driver reads through shared memory, onto the host (as get() does).
        expect(driverCopy.device).toBe('cpu');
        expect(driverCopy.toArray()).toEqual(Array(8).fill(1));
      }
    } finally {
      await graph.teardown();
    }
  });

  it('a received tensor is valid during its execution only: kept past it, it fails instead of reading reused memory', async () => {
    const [a, b] = stages;
    const graph = await b.keep.bind(a.cudaFill.bind(new InputNode(), 5).withTensorTransport('ipc')).compile();
    try {
      expect(await graph.execute(4)).toBe(4);
    } finally {
      await graph.teardown();
    }
    await expect(get(b.readKept.remote())).rejects.toThrow();
  });
});
