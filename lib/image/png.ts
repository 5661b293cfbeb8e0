/**
 * PNG files: the chunk layout and zlib here (Node's zlib inflates), the per-pixel work (filters,
 * interlacing, bit depths, palettes) in native/image/png_decoder.cc.
 */
import zlib from 'node:zlib';
import { ImageError } from '../errors.js';
import { native, type NativeDecodedImage, type NativePngHeader } from '../native.js';

export const PNG_SIGNATURE = Uint8Array.of(0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a);

interface PngChunks {
  header: NativePngHeader;
  palette: Uint8Array | null;
  transparency: Uint8Array | null;
  data: Uint8Array[];
}

const corrupt = (message: string) => new ImageError('ERR_IMAGE_DECODE', `PNG: ${message}`);
const crc32 = (zlib as { crc32?: (data: Uint8Array) => number }).crc32;

/** The chunks that make the pixels; `headerOnly` stops after IHDR. */
function readChunks(bytes: Uint8Array, headerOnly: boolean): PngChunks {
  if (bytes.length < 8 || PNG_SIGNATURE.some((value, index) => bytes[index] !== value)) throw corrupt('not a PNG file (bad signature)');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let header: NativePngHeader | undefined;
  let palette: Uint8Array | null = null;
  let transparency: Uint8Array | null = null;
  const data: Uint8Array[] = [];
  let offset = 8;
  while (true) {
    if (offset + 12 > bytes.length) {
      if (header && data.length > 0) break; // no IEND: what arrived may still be whole
      throw corrupt('the file ends before its image data (truncated?)');
    }
    const length = view.getUint32(offset);
    const type = String.fromCharCode(bytes[offset + 4], bytes[offset + 5], bytes[offset + 6], bytes[offset + 7]);
    if (offset + 12 + length > bytes.length) throw corrupt(`chunk ${type} runs past the end of the file (truncated?)`);
    const body = bytes.subarray(offset + 8, offset + 8 + length);
    // Critical chunks are checked; a damaged ancillary one (text, colour profile) is only skipped.
    const critical = (bytes[offset + 4] & 0x20) === 0;
    if (critical && crc32 && crc32(bytes.subarray(offset + 4, offset + 8 + length)) !== view.getUint32(offset + 8 + length)) {
      throw corrupt(`chunk ${type} fails its CRC check`);
    }
    offset += 12 + length;
    if (header === undefined && type !== 'IHDR') throw corrupt('the first chunk is not IHDR');
    if (type === 'IHDR') {
      if (length !== 13) throw corrupt('bad IHDR chunk');
      const fields = new DataView(body.buffer, body.byteOffset, 13);
      if (body[10] !== 0 || body[11] !== 0) throw new ImageError('ERR_IMAGE_UNSUPPORTED', 'PNG: an unknown compression or filter method');
      header = { width: fields.getUint32(0), height: fields.getUint32(4), bitDepth: body[8], colorType: body[9], interlace: body[12] };
      if (headerOnly) break;
    } else if (type === 'PLTE') palette = body;
    else if (type === 'tRNS') transparency = body;
    else if (type === 'IDAT') data.push(body);
    else if (type === 'IEND') break;
    else if (critical) throw new ImageError('ERR_IMAGE_UNSUPPORTED', `PNG: unknown critical chunk ${type}`);
  }
  return { header: header!, palette, transparency, data };
}

const CHANNELS_OF_COLOR_TYPE: Record<number, number> = { 0: 1, 2: 3, 3: 3, 4: 2, 6: 4 };

export function probePng(bytes: Uint8Array): { width: number; height: number; channels: number } {
  const { header } = readChunks(bytes, true);
  return { width: header.width, height: header.height, channels: CHANNELS_OF_COLOR_TYPE[header.colorType] ?? 0 };
}

export function decodePng(bytes: Uint8Array, channels: number, maxPixels: number): NativeDecodedImage {
  const chunks = readChunks(bytes, false);
  const { width, height } = chunks.header;
  if (maxPixels > 0 && width * height > maxPixels) {
    throw new ImageError('ERR_IMAGE_TOO_LARGE', `PNG: the image is ${width}x${height}, more than the limit of ${maxPixels} pixels`);
  }
  if (chunks.data.length === 0) throw corrupt('no IDAT chunk');
  // Inflating at most what the header says the image holds: a small file cannot unpack into gigabytes.
  const expected = native.image.pngDataSize(chunks.header);
  let inflated: Buffer;
  try {
    inflated = zlib.inflateSync(chunks.data.length === 1 ? chunks.data[0] : Buffer.concat(chunks.data), { maxOutputLength: Math.max(1, expected) });
  } catch (error) {
    const code = (error as { code?: string }).code;
    if (code === 'ERR_BUFFER_TOO_LARGE') throw corrupt(`the image data inflates past the ${expected} bytes its header allows`);
    if (code === 'Z_BUF_ERROR') {
      // A stream cut short: inflate what there is, and let the reconstruction name the shortfall.
      inflated = zlib.inflateSync(Buffer.concat(chunks.data), { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: Math.max(1, expected) });
    } else {
      throw corrupt(`the image data does not inflate (${(error as Error).message})`);
    }
  }
  return native.image.reconstructPng(new Uint8Array(inflated.buffer, inflated.byteOffset, inflated.byteLength), chunks.header, chunks.palette, chunks.transparency, channels);
}
