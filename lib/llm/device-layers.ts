/**
 * A decoder rank's transformer layers and language-model head on its device (a GPU, or the host:
 * the two backends of lib/llm/device-kernels.ts), with every sequence's key/value cache in that
 * device's memory. lib/llm/shard.ts keeps what is small and host-side (embedding lookup, sampling,
 * pooling, scoring) and hands each step's hidden states here: they go up once, through every
 * layer, and come back once, so a step crosses the bus twice whatever the depth of the model.
 *
 * Every rank runs its layers here, CPU ranks on the 'cpu' backend (the CPU kernels over host
 * memory), GPU ranks on 'cuda'; the two differ by rounding only (16-bit weights multiply 16-bit
 * inputs in cuBLAS, sums in f32), as the tests check operation by operation.
 *
 * The caches are kept in blocks (lib/llm/cache-blocks.ts): a sequence's cache is a list of blocks
 * of CACHE_BLOCK_POSITIONS positions, each [layer][keys | values][positions][kvHeads][headSize],
 * and sequences with a common prefix share its blocks.
 */
import { InvalidArgumentError, TrellisError } from '../errors.js';
import type { Communicator } from '../gpu/communicator.js';
import { Tensor } from '../gpu/tensor.js';
import { cuda } from '../gpu/cuda.js';
import type { ResolvedDecoderConfig } from './config.js';
import { CacheBlocks } from './cache-blocks.js';
import { CACHE_BLOCK_POSITIONS, DeviceKernels, ELEMENT_BYTES, TILE_ROWS, type DeviceBuffer, type DeviceMatrix, type DeviceTensor, type ElementType, type StepLayout } from './device-kernels.js';
import { isHalfMatrix, isQuantizedMatrix, type CacheDType, type WeightMatrix } from './kernels.js';
import type { ShardingPlan } from './plan.js';
import type { LayerWeights, NormWeights } from './weights.js';
import type { LayerAdapter } from './lora.js';
import { routeExperts } from './routing.js';

interface DeviceNorm {
  gamma: DeviceTensor;
  beta?: DeviceTensor;
}

interface DeviceLayer {
  attentionNorm: DeviceNorm;
  qkvWeight: DeviceMatrix;
  qkvBias?: DeviceTensor;
  queryNorm?: DeviceTensor;
  keyNorm?: DeviceTensor;
  projectionWeight: DeviceMatrix;
  projectionBias?: DeviceTensor;
  mlpNorm: DeviceNorm;
  mlp: DeviceDenseMlp | DeviceExpertMlp;
}

interface DeviceDenseMlp {
  kind: 'dense';
  up: DeviceMatrix;
  upBias?: DeviceTensor;
  gate?: DeviceMatrix;
  down: DeviceMatrix;
  downBias?: DeviceTensor;
}

/** A mixture of experts: the router on the device, routing on the host (routeExperts), each expert's rows gathered. */
interface DeviceExpertMlp {
  kind: 'experts';
  router: DeviceTensor;
  topK: number;
  normalizeTopK: boolean;
  experts: Array<{ gate: DeviceMatrix; up: DeviceMatrix; down: DeviceMatrix }>;
}

/** A LoRA update on the device: out += B (A x) for an adapter's rows. */
interface DeviceLowRank {
  a: DeviceTensor;
  b: DeviceTensor;
  rank: number;
}

type AdaptedModule = 'qkv' | 'projection' | 'gate' | 'up' | 'down';
type DeviceLayerAdapter = Partial<Record<AdaptedModule, DeviceLowRank>>;

/** The rows of a step one adapter's sequences take (ascending), as the shard found them. */
export interface AdapterRows {
  adapter: number;
  rows: number[];
}

/** A step's sequences as the layers need them: rows packed in order, `count` of each after `past`. */
export interface LayerStepSequence {
  id: number;
  past: number;
  count: number;
}

export interface DeviceLayersOptions {
  config: ResolvedDecoderConfig;
  plan: ShardingPlan;
  layers: LayerWeights[];
  /** This rank's rows of the head, [vocabularyPerRank, hidden] (the last stage only). */
  head?: WeightMatrix;
  kvCacheDtype: CacheDType;
  inverseFrequencies?: Float32Array;
  /** The stage's tensor-parallel group (NCCL for 'cuda' tensors, or the CPU one: then sums go through the host). */
  communicator?: Communicator;
  /**
   * Where a mixture of experts routes a step's rows: 'host' (router logits brought back, each
   * expert over its rows), 'device' (routed on the device, every expert over every row, each
   * row keeping its experts' shares: no wait for the host, at experts/topK times the products,
   * which decoding steps, bound by reading the weights, barely notice), or 'auto' (default:
   * 'device' for GPU steps of up to DEVICE_ROUTING_ROWS rows, else 'host').
   */
  expertRouting?: 'auto' | 'host' | 'device';
}

/** Most rows of a step that 'auto' routes on the device. */
export const DEVICE_ROUTING_ROWS = 128;

function matrixOf(kernels: DeviceKernels, matrix: WeightMatrix): DeviceMatrix {
  if (isQuantizedMatrix(matrix)) return kernels.int8Matrix(matrix.values, matrix.scales);
  if (isHalfMatrix(matrix)) return kernels.tensor(matrix.bits, matrix.dtype);
  return kernels.tensor(matrix, 'f32');
}

function vectorOf(kernels: DeviceKernels, values: Float32Array | undefined): DeviceTensor | undefined {
  return values ? kernels.tensor(values, 'f32') : undefined;
}

function normOf(kernels: DeviceKernels, norm: NormWeights): DeviceNorm {
  return { gamma: kernels.tensor(norm.gamma, 'f32'), ...(norm.beta ? { beta: kernels.tensor(norm.beta, 'f32') } : {}) };
}

export class DeviceLayers {
  readonly kernels: DeviceKernels;
  readonly config: ResolvedDecoderConfig;
  readonly plan: ShardingPlan;
  readonly cacheType: ElementType;
  /** Bytes of weights held on the device. */
  readonly weightBytes: number;
  readonly #layers: DeviceLayer[];
  readonly #head: DeviceMatrix | undefined;
  readonly #inverseFrequencies: DeviceTensor | undefined;
  readonly #communicator: Communicator | undefined;
  readonly #expertRouting: 'auto' | 'host' | 'device';
  readonly #caches: CacheBlocks;
  /** LoRA adapters loaded on this rank, by the replica's ids: each layer's updates on the device. */
  readonly #adapters = new Map<number, DeviceLayerAdapter[]>();
  /** Every weight's device memory (an int8 matrix's values and scales both). */
  readonly #weightBuffers: DeviceBuffer[] = [];
  /** Elements of the largest int8 matrix (0: none), which a prompt step widens to bf16 in scratch. */
  readonly #largestInt8: number;
  /** Page-locked host memory the head's logits come back into (GPU only). */
  #pinned: Float32Array | undefined;
  #closed = false;

  private constructor(kernels: DeviceKernels, options: DeviceLayersOptions) {
    this.kernels = kernels;
    this.config = options.config;
    this.plan = options.plan;
    this.cacheType = options.kvCacheDtype;
    this.#communicator = options.plan.tensorParallel > 1 ? options.communicator : undefined;
    this.#expertRouting = options.expertRouting ?? 'auto';
    const track = <T extends DeviceMatrix | undefined>(matrix: T): T => {
      if (matrix) this.#weightBuffers.push(matrix.buffer);
      if (matrix?.dtype === 'int8') this.#weightBuffers.push(matrix.scales.buffer);
      return matrix;
    };
    const trackNorm = (norm: DeviceNorm): DeviceNorm => {
      track(norm.gamma);
      track(norm.beta);
      return norm;
    };
    try {
      this.#layers = options.layers.map((layer, index) => {
        const where = `layer ${index}`;
        const mlp = layer.mlp;
        return {
          attentionNorm: trackNorm(normOf(kernels, layer.attentionNorm)),
          qkvWeight: track(matrixOf(kernels, layer.qkvWeight)),
          qkvBias: track(vectorOf(kernels, layer.qkvBias)),
          queryNorm: track(vectorOf(kernels, layer.queryNorm)),
          keyNorm: track(vectorOf(kernels, layer.keyNorm)),
          projectionWeight: track(matrixOf(kernels, layer.projectionWeight)),
          projectionBias: track(vectorOf(kernels, layer.projectionBias)),
          mlpNorm: trackNorm(normOf(kernels, layer.mlpNorm)),
          mlp: mlp.kind === 'dense'
            ? {
                kind: 'dense',
                up: track(matrixOf(kernels, mlp.up)),
                upBias: track(vectorOf(kernels, mlp.upBias)),
                gate: mlp.gate ? track(matrixOf(kernels, mlp.gate)) : undefined,
                down: track(matrixOf(kernels, mlp.down)),
                downBias: track(vectorOf(kernels, mlp.downBias)),
              }
            : {
                kind: 'experts',
                router: track(kernels.tensor(mlp.router, 'f32')),
                topK: mlp.topK,
                normalizeTopK: mlp.normalizeTopK,
                experts: mlp.experts.map((expert) => ({
                  gate: track(matrixOf(kernels, expert.gate)),
                  up: track(matrixOf(kernels, expert.up)),
                  down: track(matrixOf(kernels, expert.down)),
                })),
              },
        };
      });
      this.#head = options.head ? track(matrixOf(kernels, options.head)) : undefined;
      this.#inverseFrequencies = track(vectorOf(kernels, options.inverseFrequencies));
    } catch (error) {
      for (const buffer of this.#weightBuffers) buffer.free();
      throw error;
    }
    this.weightBytes = this.#weightBuffers.reduce((sum, buffer) => sum + buffer.byteLength, 0);
    const matrices = [
      ...this.#layers.flatMap((layer) => [layer.qkvWeight, layer.projectionWeight, ...(layer.mlp.kind === 'dense' ? [layer.mlp.up, layer.mlp.gate, layer.mlp.down] : layer.mlp.experts.flatMap((expert) => [expert.gate, expert.up, expert.down]))]),
      this.#head,
    ];
    this.#largestInt8 = Math.max(0, ...matrices.map((matrix) => (matrix?.dtype === 'int8' ? matrix.length : 0)));
    this.#caches = new CacheBlocks(kernels, CACHE_BLOCK_POSITIONS * this.bytesPerPosition);
  }

  /** Uploads a rank's layers (and head) to the device `kernels` runs on. */
  static create(kernels: DeviceKernels, options: DeviceLayersOptions): DeviceLayers {
    const { plan, communicator } = options;
    if (plan.tensorParallel > 1 && communicator?.size !== plan.tensorParallel) {
      throw new InvalidArgumentError(`tensor parallelism ${plan.tensorParallel} needs a communicator of that size`);
    }
    if (kernels.backend === 'cuda' && communicator && communicator.tensorDevice !== 'cpu' && communicator.tensorDevice !== `cuda:${kernels.device}`) {
      throw new InvalidArgumentError(`the communicator moves tensors on ${communicator.tensorDevice}, the layers are on cuda:${kernels.device}`, 'ERR_TENSOR_DEVICE');
    }
    return new DeviceLayers(kernels, options);
  }

  get hasHead(): boolean {
    return this.#head !== undefined;
  }

  /** Elements of one position of one layer's keys (or values): kvHeads × headSize. */
  get #rowSize(): number {
    return this.plan.keyValueHeadsPerRank * this.plan.headSize;
  }

  get cachedSequences(): number {
    return this.#caches.sequences;
  }

  /** Device memory the caches' blocks take (those held and free ones kept for reuse). */
  get cacheBytes(): number {
    return this.#caches.bytes;
  }

  /** Positions of sequence `id` this rank has read (0: none). */
  length(id: number): number {
    return this.#caches.length(id);
  }

  /** Drops the positions from `length` on (proposals the replica did not keep). */
  truncate(id: number, length: number): void {
    this.#caches.truncate(id, length);
  }

  /** Bytes one position of one sequence takes in this rank's cache (every layer's keys and values). */
  get bytesPerPosition(): number {
    return this.#layers.length * 2 * this.#rowSize * ELEMENT_BYTES[this.cacheType];
  }

  /**
   * Device memory a step of `tokens` rows and `sequences` sequences takes besides the caches: the
   * layers' activations, the narrowed inputs of 16-bit matrices, the step's table (with every
   * sequence's cache block addresses), the head's logits, an int8 model's largest matrix widened
   * to bf16, and the scratch of LoRA updates (an adapter's rows gathered and expanded, at rank 64
   * at most) and of experts.
   */
  stepBytes(tokens: number, sequences: number): number {
    const { hiddenSize } = this.config;
    const { headSize, headsPerRank, keyValueHeadsPerRank, intermediatePerRank, vocabularyPerRank } = this.plan;
    const queryWidth = headsPerRank * headSize;
    const rowWidth = queryWidth + 2 * keyValueHeadsPerRank * headSize;
    const floats = tokens * (3 * hiddenSize + rowWidth + 2 * queryWidth + 2 * intermediatePerRank);
    const narrowed = tokens * Math.max(hiddenSize, intermediatePerRank, queryWidth) * 2;
    const table = sequences * (4 + 8 * CacheBlocks.blocksFor(this.config.maxPositions)) + tokens * 12;
    const head = sequences * (hiddenSize + vocabularyPerRank) * 4;
    const widest = Math.max(hiddenSize, rowWidth, intermediatePerRank);
    const lowRank = tokens * (2 * widest + 64) * 4 + tokens * 4;
    const experts = this.#layers.some((layer) => layer.mlp.kind === 'experts') ? tokens * (2 * hiddenSize + 2 * intermediatePerRank + 64) * 4 + tokens * 12 : 0;
    return floats * 4 + narrowed + table + head + this.#largestInt8 * 2 + lowRank + experts;
  }

  /** Takes the memory of `positions` cache positions now (the replica's whole budget, on a GPU). */
  reserveCache(positions: number): void {
    this.#caches.ensureBlocks(CacheBlocks.blocksFor(positions));
  }

  /** Room for `length` positions of sequence `id`: blocks taken as it grows, nothing it holds copied. */
  reserve(id: number, length: number): void {
    this.#caches.reserve(id, length);
  }

  /** Sequence `id` starts from the first `length` positions of sequence `from` (prefix caching): their blocks are shared, not copied. */
  copyPrefix(id: number, from: number, length: number): void {
    this.#caches.share(id, from, length);
  }

  release(id: number): void {
    this.#caches.release(id);
  }

  clearCaches(): void {
    this.#caches.clear();
  }

  /** Host arrays gathered over the group (NCCL: through device memory), in rank order. */
  async allgatherHost(input: Float32Array, output: Float32Array): Promise<void> {
    const communicator = this.#communicator;
    if (!communicator) throw new TrellisError('ERR_NO_COMMUNICATOR', 'these layers have no tensor-parallel group');
    const source = this.kernels.allocate(input.byteLength);
    const target = this.kernels.allocate(output.byteLength);
    try {
      this.kernels.upload(source, input);
      const sent = Tensor.onDevice(source.memory!.share(), 'f32', [input.length]);
      const received = Tensor.onDevice(target.memory!.share(), 'f32', [output.length]);
      try {
        await communicator.allgather(sent, received);
      } finally {
        sent.free();
        received.free();
      }
      this.kernels.download(output, target);
    } finally {
      source.free();
      target.free();
    }
  }

  /** Uploads a LoRA adapter's updates of this rank's layers (lib/llm/lora.ts loadShardAdapter) under the replica's id. */
  loadAdapter(id: number, layers: LayerAdapter[]): void {
    if (this.#adapters.has(id)) return;
    if (layers.length !== this.#layers.length) throw new InvalidArgumentError(`adapter ${id} has updates for ${layers.length} layers, this rank holds ${this.#layers.length}`, 'ERR_ADAPTER');
    const uploaded: DeviceLayerAdapter[] = [];
    try {
      for (const layer of layers) {
        const updates: DeviceLayerAdapter = {};
        for (const module of ['qkv', 'projection', 'gate', 'up', 'down'] as const) {
          const update = layer[module];
          if (update) updates[module] = { a: this.kernels.tensor(update.a, 'f32'), b: this.kernels.tensor(update.b, 'f32'), rank: update.rank };
        }
        uploaded.push(updates);
      }
    } catch (error) {
      freeAdapter(uploaded);
      throw error;
    }
    this.#adapters.set(id, uploaded);
  }

  unloadAdapter(id: number): void {
    const adapter = this.#adapters.get(id);
    if (adapter) freeAdapter(adapter);
    this.#adapters.delete(id);
  }

  hasAdapter(id: number): boolean {
    return this.#adapters.has(id);
  }

  /**
   * Runs every layer over the step's rows: `hidden` ([rows, hiddenSize]) goes up, through every
   * layer, and comes back (into the same array, which is returned). On a GPU it may instead come
   * as a CUDA tensor (the previous pipeline stage's, over CUDA IPC) and, with `keepOnDevice`, stay
   * there: the result is then a new CUDA tensor, which the next stage reads the same way. Each
   * sequence's cache must hold `past` positions and have room reserved for `past + count`; its
   * length becomes `past + count`. `adapted`: the rows each loaded LoRA adapter adds its updates
   * to, in order.
   */
  async run(hidden: Float32Array | Tensor, sequences: readonly LayerStepSequence[], adapted: readonly AdapterRows[] = [], keepOnDevice = false): Promise<Float32Array | Tensor> {
    if (this.#closed) throw new TrellisError('ERR_CLOSED', 'these device layers are closed');
    const { config, plan, kernels } = this;
    const size = config.hiddenSize;
    const rows = sequences.reduce((sum, sequence) => sum + sequence.count, 0);
    const onDevice = hidden instanceof Tensor;
    const elements = onDevice ? hidden.numel : hidden.length;
    if (elements !== rows * size || (onDevice && hidden.dtype !== 'f32')) {
      throw new InvalidArgumentError(`the layers need hidden states of ${rows} × ${size} (f32), got ${elements}${onDevice ? ` (${hidden.dtype}, ${hidden.device})` : ''}`);
    }
    const keep = keepOnDevice && kernels.backend === 'cuda';
    if (rows === 0) return onDevice ? new Float32Array(0) : hidden;
    for (const group of adapted) {
      if (!this.#adapters.has(group.adapter)) throw new InvalidArgumentError(`adapter ${group.adapter} is not loaded on this rank`, 'ERR_ADAPTER');
      if (group.rows.some((row, index) => !(Number.isInteger(row) && row >= 0 && row < rows) || (index > 0 && row <= group.rows[index - 1]))) {
        throw new InvalidArgumentError(`adapter ${group.adapter}'s rows must ascend within the step's ${rows}`, 'ERR_ADAPTER');
      }
    }
    const headSize = plan.headSize;
    const queryWidth = plan.headsPerRank * headSize;
    const rowWidth = queryWidth + 2 * plan.keyValueHeadsPerRank * headSize;
    const inner = plan.intermediatePerRank;
    const shape = { heads: plan.headsPerRank, kvHeads: plan.keyValueHeadsPerRank, headSize, cache: this.cacheType };
    const layout = stepLayout(kernels, this.#caches, sequences, rows);
    const buffers: DeviceBuffer[] = [layout.buffer];
    const scratch = (bytes: number) => {
      const buffer = kernels.allocate(bytes);
      buffers.push(buffer);
      return buffer;
    };
    // Kept on the device, the state itself becomes the result: it is not freed with the scratch.
    const state = keep ? kernels.allocate(rows * size * 4) : scratch(rows * size * 4);
    let result: Float32Array | Tensor | undefined;
    try {
      if (onDevice) kernels.copyFromTensor(state, hidden);
      else kernels.upload(state, hidden);
      const normed = scratch(rows * size * 4);
      const qkv = scratch(rows * rowWidth * 4);
      const queries = scratch(rows * queryWidth * 4);
      const attended = scratch(rows * queryWidth * 4);
      const projected = scratch(rows * size * 4);
      const dense = this.#layers.some((layer) => layer.mlp.kind === 'dense');
      const up = dense ? scratch(rows * inner * 4) : undefined;
      const gate = this.#layers.some((layer) => layer.mlp.kind === 'dense' && layer.mlp.gate) ? scratch(rows * inner * 4) : undefined;
      const lowRank = this.#lowRankStep(adapted, rows, scratch);
      const window = config.slidingWindow ?? 0;
      for (let index = 0; index < this.#layers.length; index++) {
        const layer = this.#layers[index];
        this.#norm(normed, state, layer.attentionNorm, rows);
        kernels.linear(qkv, normed, layer.qkvWeight, layer.qkvBias ?? null, rows, size, rowWidth);
        lowRank(index, 'qkv', qkv, normed, size, rowWidth);
        const norms = layer.queryNorm && layer.keyNorm ? { query: layer.queryNorm, key: layer.keyNorm, epsilon: config.layerNormEpsilon } : null;
        kernels.prepareAttention(queries, qkv, layout, shape, index, norms, this.#inverseFrequencies ?? null);
        kernels.attention(attended, queries, layout, shape, index, window);
        kernels.linear(projected, attended, layer.projectionWeight, null, rows, queryWidth, size);
        // Before the allreduce: each rank's share of B (A x) is summed with the partial outputs.
        lowRank(index, 'projection', projected, attended, queryWidth, size);
        await this.#allreduce(projected, rows * size);
        kernels.addRows(state, projected, layer.projectionBias ?? null, rows, size);
        this.#norm(normed, state, layer.mlpNorm, rows);
        const mlp = layer.mlp;
        if (mlp.kind === 'experts') {
          this.#experts(projected, normed, mlp, rows, scratch);
        } else {
          kernels.linear(up!, normed, mlp.up, mlp.upBias ?? null, rows, size, inner);
          lowRank(index, 'up', up!, normed, size, inner);
          let activated = up!;
          if (mlp.gate && gate) {
            kernels.linear(gate, normed, mlp.gate, null, rows, size, inner);
            lowRank(index, 'gate', gate, normed, size, inner);
            kernels.siluMultiply(gate, gate, up!, rows * inner);
            activated = gate;
          } else {
            kernels.gelu(up!, rows * inner);
          }
          kernels.linear(projected, activated, mlp.down, null, rows, inner, size);
          lowRank(index, 'down', projected, activated, inner, size);
        }
        await this.#allreduce(projected, rows * size);
        kernels.addRows(state, projected, mlp.kind === 'dense' ? (mlp.downBias ?? null) : null, rows, size);
      }
      if (keep) {
        // Complete when returned, as CUDA IPC readers expect: the stream is synchronized below.
        result = Tensor.onDevice(state.release(), 'f32', [rows, size]);
      } else {
        const out = onDevice ? new Float32Array(rows * size) : hidden;
        kernels.download(out, state);
        result = out;
      }
    } finally {
      // The download waited for the stream; after a failure, wait before the memory is reused.
      try {
        kernels.synchronize();
      } finally {
        for (const buffer of buffers) buffer.free();
        if (keep && !result) state.free();
      }
    }
    for (const sequence of sequences) this.#caches.setLength(sequence.id, sequence.past + sequence.count);
    return result!;
  }

  /**
   * The step's LoRA updates: every adapter's rows uploaded once, and a function adding each
   * adapter's B (A x) to its rows of `out` after a layer's matrix (gathered, two thin products,
   * added back), as lib/llm/shard.ts addLowRank does on the host.
   */
  #lowRankStep(adapted: readonly AdapterRows[], rows: number, scratch: (bytes: number) => DeviceBuffer) {
    const none = (_layer: number, _module: AdaptedModule, _out: DeviceBuffer, _input: DeviceBuffer, _inWidth: number, _outWidth: number): void => {};
    if (adapted.length === 0) return none;
    const { hiddenSize } = this.config;
    const { headsPerRank, keyValueHeadsPerRank, headSize, intermediatePerRank } = this.plan;
    const widest = Math.max(hiddenSize, (headsPerRank + 2 * keyValueHeadsPerRank) * headSize, intermediatePerRank);
    let largestRank = 1;
    for (const group of adapted) for (const layer of this.#adapters.get(group.adapter)!) for (const update of Object.values(layer)) largestRank = Math.max(largestRank, update!.rank);
    const most = Math.max(...adapted.map((group) => group.rows.length));
    const offsets: number[] = [];
    const list = new Int32Array(adapted.reduce((sum, group) => sum + group.rows.length, 0));
    let at = 0;
    for (const group of adapted) {
      offsets.push(at * 4);
      list.set(group.rows, at);
      at += group.rows.length;
    }
    const rowList = scratch(Math.max(4, list.byteLength));
    this.kernels.upload(rowList, list);
    const gathered = scratch(most * widest * 4);
    const reduced = scratch(most * largestRank * 4);
    const expanded = scratch(most * widest * 4);
    return (layer: number, module: AdaptedModule, out: DeviceBuffer, input: DeviceBuffer, inWidth: number, outWidth: number): void => {
      adapted.forEach((group, index) => {
        const update = this.#adapters.get(group.adapter)![layer][module];
        if (!update) return;
        const count = group.rows.length;
        this.kernels.gatherRows(gathered, input, rowList, offsets[index], count, inWidth, rows);
        this.kernels.linear(reduced, gathered, update.a, null, count, inWidth, update.rank);
        this.kernels.linear(expanded, reduced, update.b, null, count, update.rank, outWidth);
        this.kernels.scatterAddRows(out, rows, expanded, rowList, offsets[index], null, count, outWidth);
      });
    };
  }

  /**
   * A mixture of experts over `x` into `out` (this rank's share; the caller's allreduce adds the
   * others'): router logits on the device, brought back for routing (routeExperts, the CPU
   * decoder's own), then each expert over its rows, weighted and added in expert order.
   */
  #experts(out: DeviceBuffer, x: DeviceBuffer, mlp: DeviceExpertMlp, rows: number, scratch: (bytes: number) => DeviceBuffer): void {
    const { kernels } = this;
    const size = this.config.hiddenSize;
    const inner = this.plan.intermediatePerRank;
    const count = mlp.experts.length;
    const logits = scratch(rows * count * 4);
    kernels.linear(logits, x, mlp.router, null, rows, size, count);
    const onDevice = this.#expertRouting === 'device' || (this.#expertRouting === 'auto' && kernels.backend === 'cuda' && rows <= DEVICE_ROUTING_ROWS);
    if (onDevice && count <= 256) {
      const weights = scratch(rows * count * 8);
      kernels.routeExperts(weights, logits, rows, count, mlp.topK, mlp.normalizeTopK);
      const gate = scratch(rows * inner * 4);
      const up = scratch(rows * inner * 4);
      const result = scratch(rows * size * 4);
      kernels.zero(out, rows * size);
      for (let expert = 0; expert < count; expert++) {
        const expertWeights = mlp.experts[expert];
        kernels.linear(gate, x, expertWeights.gate, null, rows, size, inner);
        kernels.linear(up, x, expertWeights.up, null, rows, size, inner);
        kernels.siluMultiply(gate, gate, up, rows * inner);
        kernels.linear(result, gate, expertWeights.down, null, rows, inner, size);
        kernels.addWeightedRows(out, result, weights, expert, count, rows, size);
      }
      return;
    }
    const hostLogits = new Float32Array(rows * count);
    kernels.download(hostLogits, logits);
    const { rowsOf, weightsOf } = routeExperts(hostLogits, rows, count, mlp.topK, mlp.normalizeTopK);
    // Weights (doubles) first, then the rows, all experts' in one upload.
    const routed = rowsOf.reduce((sum, list) => sum + list.length, 0);
    const host = new ArrayBuffer(routed * 12);
    const weights = new Float64Array(host, 0, routed);
    const list = new Int32Array(host, routed * 8, routed);
    const starts: number[] = [];
    let at = 0;
    for (let expert = 0; expert < count; expert++) {
      starts.push(at);
      weights.set(weightsOf[expert], at);
      list.set(rowsOf[expert], at);
      at += rowsOf[expert].length;
    }
    const table = scratch(Math.max(16, host.byteLength));
    kernels.upload(table, new Uint8Array(host));
    const most = Math.max(...rowsOf.map((expertRows) => expertRows.length));
    const gathered = scratch(most * size * 4);
    const gate = scratch(most * inner * 4);
    const up = scratch(most * inner * 4);
    const result = scratch(most * size * 4);
    kernels.zero(out, rows * size);
    for (let expert = 0; expert < count; expert++) {
      const taken = rowsOf[expert].length;
      if (taken === 0) continue;
      const weightsAt = starts[expert] * 8;
      const rowsAt = routed * 8 + starts[expert] * 4;
      const expertWeights = mlp.experts[expert];
      kernels.gatherRows(gathered, x, table, rowsAt, taken, size, rows);
      kernels.linear(gate, gathered, expertWeights.gate, null, taken, size, inner);
      kernels.linear(up, gathered, expertWeights.up, null, taken, size, inner);
      kernels.siluMultiply(gate, gate, up, taken * inner);
      kernels.linear(result, gate, expertWeights.down, null, taken, inner, size);
      kernels.scatterAddRows(out, rows, result, table, rowsAt, { buffer: table, offset: weightsAt }, taken, size);
    }
  }

  /**
   * This rank's slice of the logits, [rows, vocabularyPerRank], for final-normed hidden states
   * [rows, hiddenSize]. On a GPU they land in page-locked host memory (a 150,000-token vocabulary
   * is 38 MB for 64 rows, four times quicker to copy there than into ordinary memory), reused by
   * the next call: read them before it.
   */
  headLogits(normed: Float32Array, rows: number): Float32Array {
    if (!this.#head) throw new TrellisError('ERR_NO_LM_HEAD', 'this rank holds no language-model head');
    const size = this.config.hiddenSize;
    const slice = this.plan.vocabularyPerRank;
    if (normed.length < rows * size) throw new InvalidArgumentError(`headLogits: ${rows} rows need ${rows * size} inputs, got ${normed.length}`);
    const out = this.#staging(rows * slice);
    if (rows === 0) return out;
    const input = this.kernels.allocate(rows * size * 4);
    const logits = this.kernels.allocate(rows * slice * 4);
    try {
      this.kernels.upload(input, normed.subarray(0, rows * size));
      this.kernels.linear(logits, input, this.#head, null, rows, size, slice);
      this.kernels.download(out, logits);
    } finally {
      try {
        this.kernels.synchronize();
      } finally {
        input.free();
        logits.free();
      }
    }
    return out;
  }

  /** `length` floats of host memory the device copies into: page-locked and reused on a GPU, a new array on the host. */
  #staging(length: number): Float32Array {
    if (this.kernels.backend !== 'cuda') return new Float32Array(length);
    if (!this.#pinned || this.#pinned.length < length) {
      // Grown by half again each time, so a slowly growing batch does not page-lock anew each step.
      const floats = Math.max(length, Math.ceil((this.#pinned?.length ?? 0) * 1.5));
      const bytes = cuda.allocateHost(floats * 4);
      this.#pinned = new Float32Array(bytes.buffer, bytes.byteOffset, floats);
    }
    return this.#pinned.subarray(0, length);
  }

  /** Frees the weights and every cache; the kernels stay with their owner. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#caches.close();
    for (const adapter of this.#adapters.values()) freeAdapter(adapter);
    this.#adapters.clear();
    for (const buffer of this.#weightBuffers) buffer.free();
    this.#pinned = undefined;
  }

  [Symbol.dispose](): void {
    this.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }

  #norm(out: DeviceBuffer, x: DeviceBuffer, norm: DeviceNorm, rows: number): void {
    const { hiddenSize, layerNormEpsilon } = this.config;
    if (norm.beta) this.kernels.layerNorm(out, x, norm.gamma, norm.beta, rows, hiddenSize, layerNormEpsilon);
    else this.kernels.rmsNorm(out, x, norm.gamma, rows, hiddenSize, layerNormEpsilon);
  }

  /** Sums the ranks' partial outputs: NCCL on the device's memory, or the CPU group through the host. */
  async #allreduce(buffer: DeviceBuffer, elements: number): Promise<void> {
    const communicator = this.#communicator;
    if (!communicator) return;
    const host = buffer.hostFloats(elements);
    if (host) {
      await communicator.allreduce(Tensor.wrap(host, 'f32'), 'sum');
      return;
    }
    if (communicator.tensorDevice === 'cpu') {
      const values = new Float32Array(elements);
      this.kernels.download(values, buffer);
      await communicator.allreduce(Tensor.wrap(values, 'f32'), 'sum');
      this.kernels.upload(buffer, values);
      return;
    }
    // NCCL runs on its own stream: what this stream queued must be done first.
    this.kernels.synchronize();
    const tensor = Tensor.onDevice(buffer.memory!.share(), 'f32', [elements]);
    try {
      await communicator.allreduce(tensor, 'sum');
    } finally {
      tensor.free();
    }
  }

}

/**
 * The step's layout, checked (every row's position inside its sequence's reserved cache, whose
 * shared blocks there are first copied) and uploaded in one buffer. A sequence with several rows
 * (a prompt's piece, a speculative draft) goes to attention in tiles of up to TILE_ROWS rows,
 * which read their keys once together.
 */
export function stepLayout(kernels: DeviceKernels, caches: CacheBlocks, sequences: readonly LayerStepSequence[], rows: number): StepLayout {
  const count = sequences.length;
  let tileCount = 0;
  let singleCount = 0;
  let blockCount = 0;
  for (const sequence of sequences) {
    caches.prepareWrite(sequence.id, sequence.past, sequence.past + sequence.count);
    if (sequence.count > 1) tileCount += Math.ceil(sequence.count / TILE_ROWS);
    else singleCount += sequence.count;
    blockCount += CacheBlocks.blocksFor(sequence.past + sequence.count);
  }
  // Eight-byte addresses first, then the 4-byte arrays.
  const cacheBlocks = 0;
  const cacheTable = blockCount * 8;
  const rowSequence = cacheTable + count * 4;
  const rowPosition = rowSequence + rows * 4;
  const tiles = rowPosition + rows * 4;
  const singleRows = tiles + tileCount * 8;
  const bytes = singleRows + singleCount * 4;
  const host = new ArrayBuffer(bytes);
  const addressWords = new Uint32Array(host, cacheBlocks, blockCount * 2);
  const table = new Int32Array(host, cacheTable, count);
  const rowSequences = new Int32Array(host, rowSequence, rows);
  const rowPositions = new Int32Array(host, rowPosition, rows);
  const tileTable = new Int32Array(host, tiles, tileCount * 2);
  const singles = new Int32Array(host, singleRows, singleCount);
  let row = 0;
  let tile = 0;
  let single = 0;
  let block = 0;
  sequences.forEach((sequence, index) => {
    table[index] = block;
    // Only the blocks the step reads: a sequence may hold more (reserved ahead).
    block += caches.writeAddresses(sequence.id, addressWords, block, CacheBlocks.blocksFor(sequence.past + sequence.count));
    if (sequence.count > 1) {
      for (let first = 0; first < sequence.count; first += TILE_ROWS) {
        tileTable[2 * tile] = row + first;
        tileTable[2 * tile + 1] = Math.min(TILE_ROWS, sequence.count - first);
        tile++;
      }
    } else if (sequence.count === 1) {
      singles[single++] = row;
    }
    for (let position = sequence.past; position < sequence.past + sequence.count; position++, row++) {
      rowSequences[row] = index;
      rowPositions[row] = position;
    }
  });
  const buffer = kernels.allocate(bytes);
  kernels.upload(buffer, new Uint8Array(host));
  return { buffer, rows, sequences: count, tileCount, singleCount, cacheBlocks, blockCount, cacheTable, rowSequence, rowPosition, tiles, singleRows };
}

function freeAdapter(layers: DeviceLayerAdapter[]): void {
  for (const layer of layers) {
    for (const update of Object.values(layer)) {
      update!.a.buffer.free();
      update!.b.buffer.free();
    }
  }
}
