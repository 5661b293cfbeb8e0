/**
 * CUDA IPC edges of compiled graphs: the bookkeeping on both sides (no GPU needed), how compile
 * marks edges, CPU tensors on 'ipc' edges, and (only where CUDA is present) GPU tensors between two
 * actors. ipc-fake-gpu.test.ts runs the same path end to end on the fake driver.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InputNode, MultiOutputNode, Tensor, cuda, get, init, nccl, shutdown, type ActorHandle, type DeviceMemory, type IpcHandle } from '../../lib/index.js';
import { ChannelReader, ChannelWriter, createChannel, destroyChannel, decodeMessage, encodeIpcMessage } from '../../lib/dag/channel.js';
import { IpcImporter, IpcLender, cudaTensorsOf, type IpcPayload } from '../../lib/dag/ipc.js';
import { RemoteStage, type Stage } from './fixtures/stages.js';
import { checkNcclCollectiveOneRank, checkOverlappedIpcPipeline } from './fixtures/ipc-checks.js';

function fakeHandle(allocation: number, offset = 0, byteLength = 16): IpcHandle {
  const handle = new Uint8Array(64);
  handle[0] = allocation;
  return { handle, offset, byteLength, device: 0, deviceUuid: 'GPU-fake' };
}

/** Imports that record what is open: one entry per import, removed when freed. */
function fakeImports() {
  const open = new Set<{ allocation: number }>();
  const importIpc = (handle: IpcHandle): DeviceMemory => {
    const entry = { allocation: handle.handle[0] };
    open.add(entry);
    return { device: 0, byteLength: handle.byteLength, imported: true, free: () => open.delete(entry) } as unknown as DeviceMemory;
  };
  return { open, importIpc, allocations: () => new Set([...open].map((entry) => entry.allocation)) };
}

describe('CUDA IPC bookkeeping', () => {
  it('a writer holds each message until every reader is done with it, in order', () => {
    const lender = new IpcLender();
    lender.lend(0, ['a']);
    lender.lend(2, ['c']);
    lender.lend(3, ['d']);
    lender.settle(0);
    expect(lender.outstanding).toBe(3);
    lender.settle(1);
    expect(lender.outstanding).toBe(2);
    lender.settle(3);
    expect(lender.outstanding).toBe(1);
    lender.settle(10);
    expect(lender.outstanding).toBe(0);
  });

  it('a reader opens each allocation once, frees the views of a message on request, and closes the least recently used', () => {
    const imports = fakeImports();
    const importer = new IpcImporter(imports.importIpc, 2);
    const views: DeviceMemory[] = [];
    const value = importer.open({ tensors: [['f32', [4], fakeHandle(1)], ['f32', [2, 2], fakeHandle(1, 16)]], array: true }, views) as Tensor[];
    expect(value.map((tensor) => [tensor.dtype, tensor.shape])).toEqual([['f32', [4]], ['f32', [2, 2]]]);
    expect(importer.openAllocations).toBe(1);
    expect(views).toHaveLength(2);
    for (const view of views.splice(0)) view.free();
    // The allocation's mapping stays open for the next message.
    expect(imports.allocations()).toEqual(new Set([1]));
    importer.open({ tensors: [['f32', [4], fakeHandle(2)]], array: false }, views);
    importer.open({ tensors: [['f32', [4], fakeHandle(1)]], array: false }, views);
    importer.open({ tensors: [['f32', [4], fakeHandle(3)]], array: false }, views);
    for (const view of views.splice(0)) view.free();
    // Capacity 2: allocation 2, least recently used, was closed.
    expect(imports.allocations()).toEqual(new Set([1, 3]));
    importer.close();
    expect(imports.open.size).toBe(0);
  });

  it('only CUDA tensors go by IPC', () => {
    expect(cudaTensorsOf(Tensor.fromArray([1, 2]))).toBeUndefined();
    expect(cudaTensorsOf([Tensor.fromArray([1])])).toBeUndefined();
    expect(cudaTensorsOf([])).toBeUndefined();
    expect(cudaTensorsOf(3)).toBeUndefined();
  });

  it('IPC messages decode as handles for the reader to map', () => {
    const payload: IpcPayload = { tensors: [['f32', [2], fakeHandle(7)]], array: false };
    const message = decodeMessage(encodeIpcMessage(payload));
    expect(message.ok && message.ipc).toBe(true);
    expect(message.ok && (message.value as IpcPayload).tensors[0][2].handle[0]).toBe(7);
  });

  it('channels count the messages every reader is done with', () => {
    const name = createChannel(4, 2, 1024);
    const writer = new ChannelWriter(name);
    const readers = [new ChannelReader(name, 0), new ChannelReader(name, 1)];
    try {
      for (let i = 0; i < 3; i++) writer.write({ ok: true, value: i });
      expect(writer.finished).toBe(0);
      readers[0].finish(2);
      expect(writer.finished).toBe(0);
      readers[1].finish(1);
      expect(writer.finished).toBe(1);
      readers[1].finish(3);
      // Never moves back.
      readers[0].finish(1);
      expect(writer.finished).toBe(2);
    } finally {
      for (const end of [writer, ...readers]) end.release();
      destroyChannel(name);
    }
  });
});

describe('compiled graphs with IPC edges', () => {
  let stages: Array<ActorHandle<Stage>>;
  beforeAll(async () => {
    await init({ numCpus: 2 });
    stages = [1, 2, 3].map((offset) => RemoteStage.remote(offset));
    await get(stages.map((stage) => stage.pid.remote()));
  });
  afterAll(async () => {
    await shutdown();
  });

  it("marks 'ipc' edges between actors; the driver's reads, and 'auto' edges where CUDA is absent, stay in shared memory", async () => {
    const [a, b, c] = stages;
    const input = new InputNode();
    const produced = a.tensor.bind(input, 2).withTensorTransport('ipc');
    const auto = b.tensor.bind(input, 3).withTensorTransport('auto');
    const graph = await new MultiOutputNode([b.sum.bind(produced), c.sum.bind(auto), c.sum.bind(produced), a.tensor.bind(input, 1).withTensorTransport('ipc')]).compile();
    try {
      const text = graph.visualize().text;
      const ipcLines = text.split('\n').filter((line) => line.includes('(CUDA IPC)'));
      // a writes the 'ipc' tensor once (one channel, two readers: b and c), each reader reads it by
      // IPC; where CUDA is present, b's 'auto' edge to c goes by IPC too.
      expect(ipcLines.filter((line) => line.includes('WRITE'))).toHaveLength(cuda.available ? 2 : 1);
      expect(ipcLines.filter((line) => line.includes('READ'))).toHaveLength(cuda.available ? 3 : 2);
      // CPU tensors on an 'ipc' edge still travel as bytes.
      const [sumB, sumC, sumC2, direct] = (await graph.execute(4)) as [number, number, number, Tensor];
      expect([sumB, sumC, sumC2]).toEqual([8, 12, 8]);
      expect(direct.toArray()).toEqual([1, 1, 1, 1]);
    } finally {
      await graph.teardown();
    }
  });

  it.skipIf(!cuda.available)(`GPU tensors travel by IPC between two actors${cuda.available ? '' : ` (skipped: CUDA is not available here: ${cuda.reason})`}`, async () => {
    const [a, b] = stages;
    const input = new InputNode();
    const graph = await b.inspect.bind(a.cudaFill.bind(input, 3).withTensorTransport('ipc')).compile({ maxInflight: 4 });
    try {
      for (let i = 0; i < 20; i++) expect(await graph.execute(1000)).toEqual({ device: 'cuda:0', imported: true, sum: 3000 });
    } finally {
      await graph.teardown();
    }
    expect(await get(b.ipcMappings.remote())).toBe(0);
  });

  it.skipIf(!cuda.available)(`with overlap, GPU tensors pipeline by IPC: 4 in flight, results in order${cuda.available ? '' : ' (skipped: no CUDA)'}`, async () => {
    const [a, b] = stages;
    await checkOverlappedIpcPipeline(a, b);
  });

  it.skipIf(!cuda.available || !nccl.available)(`runs a collective node on NCCL with CUDA tensors (one rank)${cuda.available && nccl.available ? '' : ' (skipped: needs CUDA and NCCL)'}`, async () => {
    await checkNcclCollectiveOneRank(stages[0]);
  });
});
