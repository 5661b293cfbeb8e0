/** Actors of the GPU suite: a producer of CUDA tensors and a consumer that checks and copies them. */
import { Tensor, cuda, remote, type IpcHandle } from '../lib/index.js';

export class Producer {
  make(bytes: number, value: number) {
    const tensor = Tensor.empty([bytes], { dtype: 'u8', device: 'cuda:0' });
    tensor.memory.fill(value);
    return tensor;
  }
}

export class Consumer {
  /** Copies the received tensor into memory of its own (the transfer's last step) and checks it. */
  take(tensor: Tensor, value: number) {
    const copy = cuda.allocate(0, tensor.byteLength);
    if (tensor.device === 'cpu') copy.copyFromHost(tensor.data);
    else copy.copyFromDevice(tensor.memory, tensor.byteLength);
    const probe = new Uint8Array(Math.min(4096, tensor.byteLength));
    copy.copyToHost(probe);
    copy.free();
    tensor.free();
    return probe.every((byte) => byte === value);
  }

  /** Microseconds to map another process's allocation (first open in this process). */
  openIpc(handle: IpcHandle) {
    const start = performance.now();
    const memory = cuda.importIpc(handle);
    const micros = (performance.now() - start) * 1000;
    memory.free();
    return micros;
  }
}

export const RemoteProducer = remote(import.meta, Producer, { methods: { make: { tensorTransport: 'ipc' } } });
export const RemoteConsumer = remote(import.meta, Consumer);
