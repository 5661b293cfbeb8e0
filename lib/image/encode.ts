/**
 * Images to files: a u8 tensor [height, width] or [height, width, channels] encoded as PNG
 * (lossless; gray, gray with alpha, RGB, RGBA) or JPEG (baseline JFIF, quality 1-100, 4:2:0 or
 * 4:4:4 chroma; alpha dropped). The pixel work is native (native/image); PNG's deflate is Node's
 * zlib.
 */
import zlib from 'node:zlib';
import { InvalidArgumentError } from '../errors.js';
import { Tensor } from '../gpu/tensor.js';
import { native } from '../native.js';
import { PNG_SIGNATURE } from './png.js';

export type EncodedImageFormat = 'png' | 'jpeg';

export interface EncodeImageOptions {
  /** 'png' (default) or 'jpeg'. */
  format?: EncodedImageFormat;
  /** JPEG quality, 1-100 (default 90). */
  quality?: number;
  /** JPEG chroma: '4:2:0' (default, half resolution as cameras write) or '4:4:4' (full). */
  chroma?: '4:2:0' | '4:4:4';
  /** PNG deflate level, 0-9 (default 6). */
  compressionLevel?: number;
}

const PNG_COLOR_TYPES: Record<number, number> = { 1: 0, 2: 4, 3: 2, 4: 6 };

/** CRC-32 as PNG chunks carry it (zlib's where Node has it, else a table). */
const crc32 = (() => {
  const builtin = (zlib as { crc32?: (data: Uint8Array) => number }).crc32;
  if (builtin) return builtin;
  const table = new Uint32Array(256).map((_, index) => {
    let value = index;
    for (let bit = 0; bit < 8; bit++) value = value & 1 ? 0xedb88320 ^ (value >>> 1) : value >>> 1;
    return value >>> 0;
  });
  return (data: Uint8Array) => {
    let crc = 0xffffffff;
    for (const byte of data) crc = table[(crc ^ byte) & 0xff] ^ (crc >>> 8);
    return (crc ^ 0xffffffff) >>> 0;
  };
})();

function chunk(type: string, body: Uint8Array): Buffer {
  const out = Buffer.alloc(12 + body.length);
  out.writeUInt32BE(body.length, 0);
  out.write(type, 4, 'latin1');
  out.set(body, 8);
  out.writeUInt32BE(crc32(out.subarray(4, 8 + body.length)) >>> 0, 8 + body.length);
  return out;
}

function shapeOf(image: Tensor): { height: number; width: number; channels: number } {
  if (!(image instanceof Tensor) || image.dtype !== 'u8' || (image.shape.length !== 2 && image.shape.length !== 3)) {
    throw new InvalidArgumentError(
      `encodeImage takes a u8 tensor [height, width] or [height, width, channels], got ${image instanceof Tensor ? String(image) : typeof image}`,
      'ERR_INVALID_ARGUMENT',
    );
  }
  const [height, width, channels = 1] = image.shape;
  if (channels < 1 || channels > 4) throw new InvalidArgumentError(`encodeImage: an image has 1 to 4 channels, got ${channels}`, 'ERR_INVALID_ARGUMENT');
  if (height === 0 || width === 0) throw new InvalidArgumentError('encodeImage: the image has no pixels', 'ERR_INVALID_ARGUMENT');
  return { height, width, channels };
}

/** An image tensor as the bytes of a PNG or JPEG file. */
export function encodeImage(image: Tensor, options: EncodeImageOptions = {}): Uint8Array {
  const { height, width, channels } = shapeOf(image);
  const pixels = (image.device === 'cpu' ? image : image.cpu()).data as Uint8Array;
  const format = options.format ?? 'png';
  if (format === 'jpeg') {
    const quality = options.quality ?? 90;
    if (!Number.isInteger(quality) || quality < 1 || quality > 100) throw new InvalidArgumentError(`encodeImage: quality must be an integer from 1 to 100, got ${String(quality)}`, 'ERR_INVALID_ARGUMENT');
    const chroma = options.chroma ?? '4:2:0';
    if (chroma !== '4:2:0' && chroma !== '4:4:4') throw new InvalidArgumentError(`encodeImage: chroma must be '4:2:0' or '4:4:4', got ${JSON.stringify(chroma)}`, 'ERR_INVALID_ARGUMENT');
    if (channels === 2) throw new InvalidArgumentError('encodeImage: JPEG has no gray-with-alpha form; drop the alpha channel first', 'ERR_INVALID_ARGUMENT');
    return native.image.encodeJpeg(pixels, height, width, channels, quality, chroma === '4:2:0');
  }
  if (format !== 'png') throw new InvalidArgumentError(`encodeImage: format must be 'png' or 'jpeg', got ${JSON.stringify(format)}`, 'ERR_INVALID_ARGUMENT');
  const level = options.compressionLevel ?? 6;
  if (!Number.isInteger(level) || level < 0 || level > 9) throw new InvalidArgumentError(`encodeImage: compressionLevel must be an integer from 0 to 9, got ${String(level)}`, 'ERR_INVALID_ARGUMENT');
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header[8] = 8;
  header[9] = PNG_COLOR_TYPES[channels];
  const data = zlib.deflateSync(native.image.filterPng(pixels, height, width, channels), { level });
  const file = Buffer.concat([PNG_SIGNATURE, chunk('IHDR', header), chunk('IDAT', data), chunk('IEND', new Uint8Array(0))]);
  return new Uint8Array(file.buffer, file.byteOffset, file.byteLength);
}
