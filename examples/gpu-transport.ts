/**
 * Tensors that stay where they are made: an encoder actor returns `{ hidden, tokens, step }`, a
 * head actor reads it. With a GPU, the tensors live in the encoder's GPU memory and the head maps
 * them by CUDA IPC (nothing goes through host memory); without one, they are CPU tensors that go
 * over the two actors' CPU communicator. Either way the driver's get() copies them to host.
 * Run: npm run demo:gpu
 */
import { createCollectiveGroup, cuda, events, get, init, remote, shutdown, Tensor, wait } from '../lib/index.js';

const device = cuda.available ? 'cuda:0' : 'cpu';

export class Encoder {
  encode(batch: number, width: number, step: number) {
    const hidden = Tensor.fromArray(Float32Array.from({ length: batch * width }, (_, i) => (i % width) / width), { shape: [batch, width], device });
    const tokens = Tensor.fromArray(Int32Array.from({ length: batch }, (_, i) => 100 + i), { dtype: 'i32', device });
    return { hidden, tokens, step };
  }
}

export class Head {
  /** Where the tensors arrived, and a checksum of each row of `hidden` read back on the host. */
  score(input: { hidden: Tensor; tokens: Tensor; step: number }) {
    const [batch, width] = input.hidden.shape;
    const values = input.hidden.cpu().toArray() as number[];
    const rows = Array.from({ length: batch }, (_, row) => values.slice(row * width, (row + 1) * width).reduce((a, b) => a + b, 0));
    const arrived = { device: input.hidden.device, mapped: input.hidden.device !== 'cpu' && input.hidden.memory.imported };
    const tokens = input.tokens.numel;
    // A mapping goes back at once rather than when collected (a no-op for CPU tensors).
    input.hidden.free();
    input.tokens.free();
    return { step: input.step, arrived, rowSum: Math.round(rows[0] * 1000) / 1000, tokens };
  }
}

// 'auto': over a collective group's communicator between its members, else by CUDA IPC on one node,
// else through the object store.
export const RemoteEncoder = remote(import.meta, Encoder, { methods: { encode: { tensorTransport: 'auto' } } });
export const RemoteHead = remote(import.meta, Head);

async function main() {
  await init({ numCpus: 2, numGpus: cuda.available ? 1 : 0 });
  try {
    const gpu = cuda.available ? { numGpus: 0.5 } : {};
    const encoder = RemoteEncoder.options(gpu).remote();
    const head = RemoteHead.options(gpu).remote();
    // Without a GPU, CPU tensors move over the pair's CPU communicator (shared memory).
    if (!cuda.available) await createCollectiveGroup([encoder, head], { backend: 'cpu', name: 'encoder-head' });
    const routes = new Map<string, string>();
    events().on('tensor-transport', (event) => routes.set(event.objectId, event.route));

    console.log(`tensors on ${device}${cuda.available ? '' : ` (${cuda.reason})`}`);
    for (let step = 0; step < 3; step++) {
      const encoded = encoder.encode.remote(8, 1024, step);
      await wait([encoded]);
      const started = performance.now();
      const scored = await get(head.score.remote(encoded));
      const ms = (performance.now() - started).toFixed(2);
      console.log(`step ${step}: ${routes.get(encoded.id)} -> ${JSON.stringify(scored)} in ${ms} ms`);
    }
    // The driver's get() brings the whole value to host memory.
    const local = (await get(encoder.encode.remote(2, 4, 9))) as { hidden: Tensor; step: number };
    console.log('driver get():', local.hidden.device, local.hidden.shape, local.step);
  } finally {
    await shutdown();
  }
}

if (import.meta.url === `file://${process.argv[1]}`) await main();
