/**
 * Images to tensors for models: JPEG and PNG decoded natively (GIF's first frame in TypeScript) into 8-bit pixels, in the mode a
 * model takes (RGB, RGBA or L), resized where a size is asked for. An image is a CPU Tensor of
 * dtype u8 and shape [height, width, channels] ([height, width] in mode L, as PIL and NumPy have
 * it), so it moves to a GPU with `.to('cuda:0')` and into a dataset's tensor column as it is.
 */
import { ImageError, InvalidArgumentError } from '../errors.js';
import { Tensor } from '../gpu/tensor.js';
import { native, type NativeDecodedImage } from '../native.js';
import { applyOrientation, jpegOrientation, swapsAxes } from './orientation.js';
import { decodeGif, isGif, probeGif } from './gif.js';
import { decodePng, probePng, PNG_SIGNATURE } from './png.js';

export type ImageMode = 'RGB' | 'RGBA' | 'L';
export type ImageFormat = 'jpeg' | 'png' | 'gif';
export type ImageFit = 'fill' | 'cover' | 'contain';

export const IMAGE_MODES: readonly ImageMode[] = ['RGB', 'RGBA', 'L'];
/** Channels per pixel of each mode. */
export const IMAGE_CHANNELS: Readonly<Record<ImageMode, number>> = { L: 1, RGB: 3, RGBA: 4 };

/** PIL's decompression-bomb limit: a larger image is refused unless `maxPixels` says otherwise. */
export const DEFAULT_MAX_IMAGE_PIXELS = 178_956_970;

export interface DecodeImageOptions {
  /** Channels of the result (default 'RGB'): a gray image is repeated into RGB, alpha dropped or set to 255. */
  mode?: ImageMode;
  /** [height, width] to resize to (bilinear, antialiased when shrinking). */
  size?: readonly [height: number, width: number];
  /**
   * How the image meets `size`: 'fill' (default) stretches it to exactly that; 'cover' keeps its
   * aspect ratio, scaled to cover the size, and crops the centre (torchvision's Resize then
   * CenterCrop, the usual evaluation transform); 'contain' keeps its aspect ratio inside the size
   * and pads the rest with zeros (letterboxing, as detectors take input).
   */
  fit?: ImageFit;
  /** Images of more pixels are refused with ERR_IMAGE_TOO_LARGE before they are decoded (0: no limit). */
  maxPixels?: number;
  /**
   * With `size`, a JPEG is first decoded at 1/2, 1/4 or 1/8 of its size in the DCT domain (as
   * Pillow's draft mode), the most that keeps it at least `size`, then resized: several times
   * faster for photographs much larger than the model's input; the pixels differ slightly from a
   * full decode and resize (default false).
   */
  draft?: boolean;
  /**
   * Turn a JPEG upright by its EXIF orientation, as a photo viewer shows it (default false, as
   * Pillow and Ray leave it; `size` is then the upright image's).
   */
  applyExifOrientation?: boolean;
}

export interface ImageInfo {
  format: ImageFormat;
  width: number;
  height: number;
  /** As stored: 1 gray, 2 gray and alpha, 3 colour (palettes too), 4 RGBA or CMYK. */
  channels: number;
}

/** Formats known by their first bytes, so a file the decoders cannot read is named, not misread. */
const OTHER_FORMATS: Array<[string, number[]]> = [
  ['BMP', [0x42, 0x4d]],
  ['TIFF', [0x49, 0x49, 0x2a, 0x00]],
  ['TIFF', [0x4d, 0x4d, 0x00, 0x2a]],
];

/** The format of an image's bytes, or undefined when it is none the decoders read. */
export function imageFormat(bytes: Uint8Array): ImageFormat | undefined {
  if (bytes.length >= 3 && bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff) return 'jpeg';
  if (bytes.length >= 8 && PNG_SIGNATURE.every((value, index) => bytes[index] === value)) return 'png';
  if (isGif(bytes)) return 'gif';
  return undefined;
}

function unknownFormat(bytes: Uint8Array): ImageError {
  const startsWith = (magic: number[]) => magic.every((value, index) => bytes[index] === value);
  const named = OTHER_FORMATS.find(([, magic]) => startsWith(magic))?.[0];
  const webp = bytes.length >= 12 && String.fromCharCode(...bytes.subarray(0, 4)) === 'RIFF' && String.fromCharCode(...bytes.subarray(8, 12)) === 'WEBP';
  const format = named ?? (webp ? 'WebP' : undefined);
  return format
    ? new ImageError('ERR_IMAGE_UNSUPPORTED', `${format} images are not supported (JPEG, PNG and GIF are)`)
    : new ImageError('ERR_IMAGE_DECODE', `not a JPEG, PNG or GIF image (first bytes ${Buffer.from(bytes.subarray(0, 8)).toString('hex') || 'none'})`);
}

function asBytes(bytes: unknown, what: string): Uint8Array {
  if (bytes instanceof Uint8Array) return bytes;
  if (bytes instanceof ArrayBuffer) return new Uint8Array(bytes);
  throw new InvalidArgumentError(`${what} takes an image's bytes as a Uint8Array or Buffer, got ${bytes === null ? 'null' : typeof bytes}`, 'ERR_INVALID_ARGUMENT');
}

/** An image's format and size from its header, without decoding it. */
export function imageInfo(bytes: Uint8Array): ImageInfo {
  const data = asBytes(bytes, 'imageInfo');
  const format = imageFormat(data);
  if (format === 'jpeg') return { format, ...native.image.probeJpeg(data) };
  if (format === 'png') return { format, ...probePng(data) };
  if (format === 'gif') return { format, ...probeGif(data) };
  throw unknownFormat(data);
}

export function checkImageMode(mode: unknown, what: string): ImageMode {
  if (!IMAGE_MODES.includes(mode as ImageMode)) {
    throw new InvalidArgumentError(`${what}: mode must be one of ${IMAGE_MODES.join(', ')}, got ${JSON.stringify(mode)}`, 'ERR_INVALID_ARGUMENT');
  }
  return mode as ImageMode;
}

export function checkImageSize(size: unknown, what: string): readonly [number, number] {
  const valid = Array.isArray(size) && size.length === 2 && size.every((value) => Number.isSafeInteger(value) && value >= 1 && value <= 1 << 20);
  if (!valid) throw new InvalidArgumentError(`${what}: size must be [height, width], two positive integers, got ${JSON.stringify(size)}`, 'ERR_INVALID_ARGUMENT');
  return size as unknown as readonly [number, number];
}

/** A maxPixels option checked (undefined: the default limit). */
export function checkMaxPixels(maxPixels: unknown, what: string): number {
  if (maxPixels === undefined) return DEFAULT_MAX_IMAGE_PIXELS;
  if (typeof maxPixels !== 'number' || !Number.isSafeInteger(maxPixels) || maxPixels < 0) {
    throw new InvalidArgumentError(`${what}: maxPixels must be a non-negative integer (0: no limit), got ${String(maxPixels)}`, 'ERR_INVALID_ARGUMENT');
  }
  return maxPixels;
}

/** Pixels as a tensor: [height, width] for one channel, else [height, width, channels]. */
function toTensor(pixels: Uint8Array, height: number, width: number, channels: number): Tensor {
  return Tensor.wrap(pixels, 'u8', channels === 1 ? [height, width] : [height, width, channels]);
}

/** Decodes a JPEG or PNG image into a u8 tensor [height, width, channels] ([height, width] for 'L'). */
export function decodeImage(bytes: Uint8Array, options: DecodeImageOptions = {}): Tensor {
  const data = asBytes(bytes, 'decodeImage');
  const mode = checkImageMode(options.mode ?? 'RGB', 'decodeImage');
  const size = options.size === undefined ? undefined : checkImageSize(options.size, 'decodeImage');
  const maxPixels = checkMaxPixels(options.maxPixels, 'decodeImage');
  const channels = IMAGE_CHANNELS[mode];
  const format = imageFormat(data);
  let decoded: NativeDecodedImage;
  if (options.draft !== undefined && typeof options.draft !== 'boolean') throw new InvalidArgumentError(`decodeImage: draft must be a boolean, got ${JSON.stringify(options.draft)}`, 'ERR_INVALID_ARGUMENT');
  if (options.applyExifOrientation !== undefined && typeof options.applyExifOrientation !== 'boolean') {
    throw new InvalidArgumentError(`decodeImage: applyExifOrientation must be a boolean, got ${JSON.stringify(options.applyExifOrientation)}`, 'ERR_INVALID_ARGUMENT');
  }
  const fit = options.fit ?? 'fill';
  if (fit !== 'fill' && fit !== 'cover' && fit !== 'contain') throw new InvalidArgumentError(`decodeImage: fit must be 'fill', 'cover' or 'contain', got ${JSON.stringify(fit)}`, 'ERR_INVALID_ARGUMENT');
  const orientation = options.applyExifOrientation && format === 'jpeg' ? jpegOrientation(data) : 1;
  if (orientation !== 1) {
    // Resized before it is turned (the filter is the same along both axes, so the order does
    // not change the pixels): a quarter turn swaps the size asked for.
    const sideways = size && swapsAxes(orientation) ? ([size[1], size[0]] as const) : size;
    const upright = decodeImage(data, { mode, maxPixels, fit, ...(sideways ? { size: sideways } : {}), ...(options.draft ? { draft: true } : {}) });
    return applyOrientation(upright, orientation);
  }
  if (size && fit !== 'fill' && format) {
    // Scaled as a whole to cover (or fit inside) the size, then cut (or padded) to it.
    const { height, width } = imageInfo(data);
    const scale = fit === 'cover' ? Math.max(size[0] / height, size[1] / width) : Math.min(size[0] / height, size[1] / width);
    const scaled: [number, number] =
      fit === 'cover'
        ? [Math.max(size[0], Math.round(height * scale)), Math.max(size[1], Math.round(width * scale))]
        : [Math.max(1, Math.min(size[0], Math.round(height * scale))), Math.max(1, Math.min(size[1], Math.round(width * scale)))];
    const resized = decodeImage(data, { mode, maxPixels, size: scaled, ...(options.draft ? { draft: true } : {}) });
    return placeCentered(resized, size);
  }
  if (format === 'jpeg') decoded = size ? native.image.decodeJpeg(data, channels, maxPixels, size[0], size[1], options.draft === true) : native.image.decodeJpeg(data, channels, maxPixels);
  else if (format === 'png') decoded = decodePng(data, channels, maxPixels);
  else if (format === 'gif') decoded = decodeGif(data, channels, maxPixels);
  else throw unknownFormat(data);
  let { pixels, height, width } = decoded;
  if (size && (size[0] !== height || size[1] !== width)) {
    pixels = native.image.resize(pixels, height, width, channels, size[0], size[1]);
    [height, width] = size;
  }
  return toTensor(pixels, height, width, channels);
}

/** The centre of `image` cut to `size`, or `image` in the centre of a zero `size` where it is smaller (per axis). */
function placeCentered(image: Tensor, size: readonly [number, number]): Tensor {
  const [height, width, channels = 1] = image.shape;
  const [outHeight, outWidth] = size;
  if (height === outHeight && width === outWidth) return image;
  const source = image.data as Uint8Array;
  const out = new Uint8Array(outHeight * outWidth * channels);
  // Offsets of the source in the output: negative where the source is cut, positive where padded.
  const top = Math.floor((outHeight - height) / 2);
  const left = Math.floor((outWidth - width) / 2);
  const columns = Math.min(width, outWidth);
  const fromColumn = Math.max(0, -left);
  const toColumn = Math.max(0, left);
  for (let y = Math.max(0, top); y < Math.min(outHeight, top + height); y++) {
    const sourceRow = y - top;
    const start = (sourceRow * width + fromColumn) * channels;
    out.set(source.subarray(start, start + columns * channels), (y * outWidth + toColumn) * channels);
  }
  return Tensor.wrap(out, 'u8', image.shape.length === 2 ? [outHeight, outWidth] : [outHeight, outWidth, channels]);
}

/** A u8 image tensor ([height, width] or [height, width, channels]) resized to [height, width]. */
export function resizeImage(image: Tensor, size: readonly [height: number, width: number]): Tensor {
  const [height, width] = checkImageSize(size, 'resizeImage');
  if (!(image instanceof Tensor) || image.dtype !== 'u8' || image.device !== 'cpu' || (image.shape.length !== 2 && image.shape.length !== 3)) {
    throw new InvalidArgumentError(
      `resizeImage takes a CPU u8 tensor of shape [height, width] or [height, width, channels], got ${image instanceof Tensor ? String(image) : typeof image}`,
      'ERR_INVALID_ARGUMENT',
    );
  }
  const [inHeight, inWidth, channels = 1] = image.shape;
  if (inHeight === height && inWidth === width) return image;
  const data = image.data as Uint8Array;
  const pixels = native.image.resize(data, inHeight, inWidth, channels, height, width);
  return Tensor.wrap(pixels, 'u8', image.shape.length === 2 ? [height, width] : [height, width, channels]);
}
