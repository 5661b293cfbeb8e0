/** Placeholder until the native CUDA layer lands: CUDA is reported unavailable. */
import { TrellisError } from '../errors.js';
import type { CudaApi } from './cuda-types.js';

const unavailable = (): never => {
  throw new TrellisError('ERR_CUDA_UNAVAILABLE', 'CUDA is not available: the CUDA layer is not built yet');
};

export const cuda: CudaApi = {
  available: false,
  reason: 'the CUDA layer is not built yet',
  deviceCount: () => 0,
  devices: () => [],
  allocate: unavailable,
  importIpc: unavailable,
  createStream: unavailable,
  allocatorStats: unavailable,
  emptyCache: () => {},
};
