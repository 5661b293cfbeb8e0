/**
 * How a decoder is cut across tensorParallel × pipelineParallel ranks (Megatron's layout):
 * - Pipeline: consecutive layers per stage, as even as the count allows; the first stage also
 *   embeds the tokens, the last applies the final norm and the head.
 * - Tensor: in each block, attention heads (query and key/value heads alike) and the MLP's
 *   inner columns are split across the stage's ranks. The first matrix of each pair is cut by output (column-parallel), the second
 *   by input (row-parallel), so a block needs one allreduce after attention and one after the MLP.
 * - The head is cut by vocabulary rows; the last stage's ranks gather their logits.
 */
import { InvalidArgumentError } from '../errors.js';
import { checkDecoderConfig, type DecoderConfig } from './config.js';

export interface ParallelismOptions {
  /** Ranks that split each layer (default 1). */
  tensorParallel?: number;
  /** Stages that split the layers (default 1). */
  pipelineParallel?: number;
}

export interface StagePlan {
  index: number;
  /** Layers [first, end). */
  firstLayer: number;
  endLayer: number;
  embeds: boolean;
  hasHead: boolean;
}

export interface ShardingPlan {
  tensorParallel: number;
  pipelineParallel: number;
  stages: StagePlan[];
  headsPerRank: number;
  keyValueHeadsPerRank: number;
  headSize: number;
  intermediatePerRank: number;
  /** Vocabulary rows of the head per rank; the last rank's slice may be shorter (padded in the gather). */
  vocabularyPerRank: number;
}

function checkCount(value: unknown, what: string): number {
  if (value === undefined) return 1;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) {
    throw new InvalidArgumentError(`${what} must be a positive integer, got ${String(value)}`, 'ERR_PARALLELISM');
  }
  return value;
}

export function planSharding(decoder: DecoderConfig, options: ParallelismOptions = {}): ShardingPlan {
  const config = checkDecoderConfig(decoder);
  const tensorParallel = checkCount(options.tensorParallel, 'tensorParallel');
  const pipelineParallel = checkCount(options.pipelineParallel, 'pipelineParallel');
  if (config.numHeads % tensorParallel !== 0) {
    throw new InvalidArgumentError(`tensorParallel ${tensorParallel} does not divide the model's ${config.numHeads} attention heads`, 'ERR_PARALLELISM');
  }
  if (config.numKeyValueHeads % tensorParallel !== 0) {
    throw new InvalidArgumentError(`tensorParallel ${tensorParallel} does not divide the model's ${config.numKeyValueHeads} key/value heads`, 'ERR_PARALLELISM');
  }
  if (config.intermediateSize % tensorParallel !== 0) {
    throw new InvalidArgumentError(`tensorParallel ${tensorParallel} does not divide the model's MLP width ${config.intermediateSize}`, 'ERR_PARALLELISM');
  }
  if (pipelineParallel > config.numLayers) {
    throw new InvalidArgumentError(`pipelineParallel ${pipelineParallel} is more than the model's ${config.numLayers} layers`, 'ERR_PARALLELISM');
  }
  const stages: StagePlan[] = [];
  const base = Math.floor(config.numLayers / pipelineParallel);
  const extra = config.numLayers % pipelineParallel;
  let firstLayer = 0;
  for (let index = 0; index < pipelineParallel; index++) {
    // The first and last stages carry the embedding and the head: the spare layers go to the middle ones first.
    const middleFirst = pipelineParallel > 2 ? ((index - 1 + pipelineParallel) % pipelineParallel) : index;
    const count = base + (middleFirst < extra ? 1 : 0);
    stages.push({ index, firstLayer, endLayer: firstLayer + count, embeds: index === 0, hasHead: index === pipelineParallel - 1 });
    firstLayer += count;
  }
  return {
    tensorParallel,
    pipelineParallel,
    stages,
    headsPerRank: config.numHeads / tensorParallel,
    keyValueHeadsPerRank: config.numKeyValueHeads / tensorParallel,
    headSize: config.headSize,
    intermediatePerRank: config.intermediateSize / tensorParallel,
    vocabularyPerRank: Math.ceil(config.vocabSize / tensorParallel),
  };
}
