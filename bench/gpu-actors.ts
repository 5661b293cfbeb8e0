/** Actors of the GPU suite: a producer of CUDA tensors and a consumer that checks and copies them. */
import { Tensor, cuda, getRuntimeContext, remote, type IpcHandle } from '../lib/index.js';

export class Producer {
  make(bytes: number, value: number) {
    const tensor = Tensor.empty([bytes], { dtype: 'u8', device: 'cuda:0' });
    tensor.memory.fill(value);
    return tensor;
  }
}

export class Consumer {
  /**
   * Copies the received tensor into memory of its own (the transfer's last step) and checks it.
   * Returns the seconds the call spent getting the tensor (mapping it, or reading it from the
   * store onto the GPU) and copying it.
   */
  take(tensor: Tensor, value: number, warm = false) {
    const argumentsSeconds = (getRuntimeContext().argumentsMs ?? NaN) / 1000;
    const copy = cuda.allocate(0, tensor.byteLength);
    // Warm: a 1-byte fill first takes the switch of the GPU from the producer's context to this
    // one (about 170 µs on an H200), which any first GPU operation here would pay.
    if (warm) copy.fill(0);
    const start = performance.now();
    if (tensor.device === 'cpu') copy.copyFromHost(tensor.data);
    else copy.copyFromDevice(tensor.memory, tensor.byteLength);
    const copySeconds = (performance.now() - start) / 1000;
    const probe = new Uint8Array(Math.min(4096, tensor.byteLength));
    copy.copyToHost(probe, tensor.byteLength - probe.byteLength);
    copy.free();
    const onDevice = tensor.device !== 'cpu';
    tensor.free();
    return { ok: onDevice && probe.every((byte) => byte === value), argumentsSeconds, copySeconds };
  }

  /**
   * The tensor as it arrived (mapped, for IPC), its last bytes read back to the host and checked:
   * one GPU operation, where take() also copies it into memory of its own.
   */
  check(tensor: Tensor, value: number) {
    const probe = new Uint8Array(Math.min(4096, tensor.byteLength));
    tensor.memory.copyToHost(probe, tensor.byteLength - probe.byteLength);
    const onDevice = tensor.device !== 'cpu';
    tensor.free();
    return onDevice && probe.every((byte) => byte === value);
  }

  pageLockStats() {
    return cuda.pageLockStats();
  }

  /** An empty call: the floor under actor_to_actor_4KiB_us. */
  ping() {
    return 0;
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
