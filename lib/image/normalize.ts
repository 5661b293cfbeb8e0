/**
 * Model input from images: u8 pixels [N, H, W, C] (or one image [H, W, C]) to floats scaled,
 * centred and spread per channel as a vision model was trained on (torchvision's ToTensor then
 * Normalize), laid out NCHW (PyTorch, ONNX) or NHWC (TensorFlow), in f32 or f16. A u8 input has
 * only 256 values per channel, so each channel's 256 results are computed once and the pixels
 * looked up: a 224x224 image takes a fraction of a millisecond.
 */
import { InvalidArgumentError } from '../errors.js';
import { floatToF16 } from '../gpu/dtype.js';
import { Tensor } from '../gpu/tensor.js';

/** ImageNet's per-channel mean and standard deviation (RGB, on 0..1), which most vision models expect. */
export const IMAGENET_MEAN: readonly number[] = [0.485, 0.456, 0.406];
export const IMAGENET_STD: readonly number[] = [0.229, 0.224, 0.225];

export interface NormalizeImagesOptions {
  /** Per-channel mean subtracted after scaling (one number for every channel); default 0. */
  mean?: number | readonly number[];
  /** Per-channel divisor after the mean; default 1. */
  std?: number | readonly number[];
  /** Multiplies each u8 value first (default 1/255, to 0..1). */
  scale?: number;
  /** 'NCHW' (default) or 'NHWC'. */
  layout?: 'NCHW' | 'NHWC';
  /** 'f32' (default) or 'f16'. */
  dtype?: 'f32' | 'f16';
}

function perChannel(value: number | readonly number[] | undefined, fallback: number, channels: number, name: string): number[] {
  if (value === undefined) return new Array<number>(channels).fill(fallback);
  const values = typeof value === 'number' ? new Array<number>(channels).fill(value) : [...value];
  if (values.length !== channels || values.some((item) => typeof item !== 'number' || !Number.isFinite(item))) {
    throw new InvalidArgumentError(`normalizeImages: ${name} must be a number or ${channels} numbers (one per channel), got ${JSON.stringify(value)}`, 'ERR_INVALID_ARGUMENT');
  }
  if (name === 'std' && values.some((item) => item === 0)) throw new InvalidArgumentError('normalizeImages: std must not be 0', 'ERR_INVALID_ARGUMENT');
  return values;
}

/** u8 images to a model's float input: ((pixel * scale) - mean[c]) / std[c], NCHW by default. */
export function normalizeImages(images: Tensor, options: NormalizeImagesOptions = {}): Tensor {
  if (!(images instanceof Tensor) || images.dtype !== 'u8' || (images.shape.length !== 3 && images.shape.length !== 4)) {
    throw new InvalidArgumentError(
      `normalizeImages takes a u8 tensor [N, H, W, C] or [H, W, C], got ${images instanceof Tensor ? String(images) : typeof images}`,
      'ERR_INVALID_ARGUMENT',
    );
  }
  if (images.device !== 'cpu') throw new InvalidArgumentError(`normalizeImages runs on the CPU: normalize before moving the batch to ${images.device}`, 'ERR_INVALID_ARGUMENT');
  const layout = options.layout ?? 'NCHW';
  const dtype = options.dtype ?? 'f32';
  if (layout !== 'NCHW' && layout !== 'NHWC') throw new InvalidArgumentError(`normalizeImages: layout must be 'NCHW' or 'NHWC', got ${JSON.stringify(layout)}`, 'ERR_INVALID_ARGUMENT');
  if (dtype !== 'f32' && dtype !== 'f16') throw new InvalidArgumentError(`normalizeImages: dtype must be 'f32' or 'f16', got ${JSON.stringify(dtype)}`, 'ERR_INVALID_ARGUMENT');
  const scale = options.scale ?? 1 / 255;
  if (typeof scale !== 'number' || !Number.isFinite(scale)) throw new InvalidArgumentError(`normalizeImages: scale must be a finite number, got ${String(scale)}`, 'ERR_INVALID_ARGUMENT');
  const batched = images.shape.length === 4;
  const [count, height, width, channels] = batched ? images.shape : [1, ...images.shape];
  const mean = perChannel(options.mean, 0, channels, 'mean');
  const std = perChannel(options.std, 1, channels, 'std');
  // Every channel's answer for each of the 256 values.
  const table = new Float32Array(channels * 256);
  for (let channel = 0; channel < channels; channel++) {
    for (let value = 0; value < 256; value++) table[channel * 256 + value] = (value * scale - mean[channel]) / std[channel];
  }
  const lookup = dtype === 'f16' ? Uint16Array.from(table, (value) => floatToF16(value)) : table;
  const pixels = images.data as Uint8Array;
  const out = dtype === 'f16' ? new Uint16Array(pixels.length) : new Float32Array(pixels.length);
  const plane = height * width;
  if (layout === 'NHWC') {
    for (let index = 0; index < pixels.length; index++) out[index] = lookup[(index % channels) * 256 + pixels[index]];
  } else {
    for (let image = 0; image < count; image++) {
      const base = image * plane * channels;
      for (let channel = 0; channel < channels; channel++) {
        const offset = channel * 256;
        const target = base + channel * plane;
        for (let position = 0, source = base + channel; position < plane; position++, source += channels) out[target + position] = lookup[offset + pixels[source]];
      }
    }
  }
  const shape = layout === 'NCHW' ? [count, channels, height, width] : [count, height, width, channels];
  return Tensor.wrap(out, dtype, batched ? shape : shape.slice(1));
}
