/**
 * GIF images (web crawls are full of them): the first frame, composed on the logical screen as
 * viewers show it, through the LZW decoder here. Palettes global or local, transparency from the
 * graphic control extension, interlaced rows. A GIF's frames are small and few bytes per pixel, so
 * TypeScript keeps up; every read is checked against the input's length.
 */
import { ImageError } from '../errors.js';
import type { NativeDecodedImage } from '../native.js';

export const GIF_SIGNATURES = ['GIF87a', 'GIF89a'];

const corrupt = (message: string) => new ImageError('ERR_IMAGE_DECODE', `GIF: ${message}`);

export function isGif(bytes: Uint8Array): boolean {
  return bytes.length >= 6 && GIF_SIGNATURES.includes(String.fromCharCode(...bytes.subarray(0, 6)));
}

export function probeGif(bytes: Uint8Array): { width: number; height: number; channels: number } {
  if (!isGif(bytes) || bytes.length < 13) throw corrupt('not a GIF file');
  return { width: bytes[6] | (bytes[7] << 8), height: bytes[8] | (bytes[9] << 8), channels: 3 };
}

/** The LZW-coded sub-blocks of an image, decoded into `count` palette indices. */
function decompress(data: Uint8Array, minimumCodeSize: number, count: number): Uint8Array {
  if (minimumCodeSize < 2 || minimumCodeSize > 11) throw corrupt(`LZW minimum code size ${minimumCodeSize} is out of range`);
  const clear = 1 << minimumCodeSize;
  const end = clear + 1;
  const prefix = new Int16Array(4096);
  const suffix = new Uint8Array(4096);
  const lengths = new Uint16Array(4096);
  for (let code = 0; code < clear; code++) {
    suffix[code] = code;
    lengths[code] = 1;
    prefix[code] = -1;
  }
  const out = new Uint8Array(count);
  let written = 0;
  let codeSize = minimumCodeSize + 1;
  let next = end + 1;
  let previous = -1;
  let bits = 0;
  let held = 0;
  let position = 0;
  // Writes the string of `code` at `at` (strings are stored backwards through their prefixes).
  const emit = (code: number, at: number): number => {
    const length = lengths[code];
    let place = at + length - 1;
    for (let walk = code; walk >= 0 && place >= at; walk = prefix[walk], place--) if (place < count) out[place] = suffix[walk];
    return length;
  };
  const firstOf = (code: number): number => {
    let walk = code;
    while (prefix[walk] >= 0) walk = prefix[walk];
    return suffix[walk];
  };
  while (written < count) {
    while (held < codeSize) {
      if (position >= data.length) {
        // Encoders sometimes end a frame early; what is missing stays index 0, as viewers show it.
        return out;
      }
      bits |= data[position++] << held;
      held += 8;
    }
    const code = bits & ((1 << codeSize) - 1);
    bits >>>= codeSize;
    held -= codeSize;
    if (code === clear) {
      codeSize = minimumCodeSize + 1;
      next = end + 1;
      previous = -1;
      continue;
    }
    if (code === end) break;
    if (previous < 0) {
      if (code >= clear) throw corrupt(`the first code after a clear is ${code}, not a colour`);
      out[written++] = code;
      previous = code;
      continue;
    }
    if (code > next || (code === next && next >= 4096)) throw corrupt(`code ${code} is past the dictionary's ${next} entries`);
    if (next < 4096) {
      // The new entry: the previous string and the first byte of this one (or of the previous
      // string itself, for the one code not yet in the dictionary).
      prefix[next] = previous;
      suffix[next] = code === next ? firstOf(previous) : firstOf(code);
      lengths[next] = lengths[previous] + 1;
      next++;
      if (next === 1 << codeSize && codeSize < 12) codeSize++;
    }
    written += emit(code, written);
    previous = code;
  }
  return out;
}

/** The first frame's pixels as `channels` (1, 3 or 4) 8-bit channels on the logical screen. */
export function decodeGif(bytes: Uint8Array, channels: number, maxPixels: number): NativeDecodedImage {
  const { width, height } = probeGif(bytes);
  if (width === 0 || height === 0) throw corrupt('the logical screen has no pixels');
  if (maxPixels > 0 && width * height > maxPixels) throw new ImageError('ERR_IMAGE_TOO_LARGE', `GIF: the image is ${width}x${height}, more than the limit of ${maxPixels} pixels`);
  const need = (at: number, length: number) => {
    if (at + length > bytes.length) throw corrupt('the file ends before its first image (truncated?)');
  };
  let offset = 13;
  let globalPalette: Uint8Array | undefined;
  const packed = bytes[10];
  if (packed & 0x80) {
    const size = 3 * (1 << ((packed & 7) + 1));
    need(offset, size);
    globalPalette = bytes.subarray(offset, offset + size);
    offset += size;
  }
  const background = bytes[11];
  let transparent = -1;
  // Sub-blocks (a length byte, then that many bytes) up to a zero length.
  const subBlocks = (): Uint8Array[] => {
    const parts: Uint8Array[] = [];
    for (;;) {
      need(offset, 1);
      const length = bytes[offset++];
      if (length === 0) return parts;
      need(offset, length);
      parts.push(bytes.subarray(offset, offset + length));
      offset += length;
    }
  };
  for (;;) {
    need(offset, 1);
    const introducer = bytes[offset++];
    if (introducer === 0x3b) throw corrupt('the file has no image');
    if (introducer === 0x21) {
      need(offset, 1);
      const label = bytes[offset++];
      const parts = subBlocks();
      if (label === 0xf9 && parts[0]?.length >= 4 && parts[0][0] & 1) transparent = parts[0][3];
      continue;
    }
    if (introducer !== 0x2c) throw corrupt(`unknown block 0x${introducer.toString(16)} at byte ${offset - 1}`);
    need(offset, 10);
    const view = new DataView(bytes.buffer, bytes.byteOffset + offset, 9);
    const [left, top, frameWidth, frameHeight] = [view.getUint16(0, true), view.getUint16(2, true), view.getUint16(4, true), view.getUint16(6, true)];
    const framePacked = bytes[offset + 8];
    offset += 9;
    let palette = globalPalette;
    if (framePacked & 0x80) {
      const size = 3 * (1 << ((framePacked & 7) + 1));
      need(offset, size);
      palette = bytes.subarray(offset, offset + size);
      offset += size;
    }
    if (!palette) throw corrupt('the image has no palette, global or local');
    need(offset, 1);
    const minimumCodeSize = bytes[offset++];
    const parts = subBlocks();
    const data = parts.length === 1 ? parts[0] : Buffer.concat(parts);
    const indices = decompress(data, minimumCodeSize, frameWidth * frameHeight);
    // Rows in file order; interlaced frames store every 8th row from 0, from 4, every 4th from 2, every 2nd from 1.
    const rowOrder: number[] = [];
    if (framePacked & 0x40) {
      for (const [start, step] of [[0, 8], [4, 8], [2, 4], [1, 2]]) for (let row = start; row < frameHeight; row += step) rowOrder.push(row);
    } else {
      for (let row = 0; row < frameHeight; row++) rowOrder.push(row);
    }
    // The screen starts as the background colour (transparent where the frame has transparency).
    const rgba = new Uint8Array(width * height * 4);
    const backgroundColor = transparent >= 0 || !globalPalette || background * 3 + 2 >= globalPalette.length ? [0, 0, 0, transparent >= 0 ? 0 : 255] : [...globalPalette.subarray(background * 3, background * 3 + 3), 255];
    for (let pixel = 0; pixel < width * height; pixel++) rgba.set(backgroundColor, pixel * 4);
    const entries = palette.length / 3;
    rowOrder.forEach((row, stored) => {
      const y = top + row;
      if (y >= height) return;
      for (let column = 0; column < frameWidth; column++) {
        const x = left + column;
        if (x >= width) continue;
        const index = indices[stored * frameWidth + column];
        const at = (y * width + x) * 4;
        // A transparent pixel keeps its palette colour with alpha 0, as Pillow gives it.
        if (index < entries) rgba.set(palette!.subarray(index * 3, index * 3 + 3), at);
        rgba[at + 3] = index === transparent ? 0 : 255;
      }
    });
    return { width, height, channels, pixels: fromRgba(rgba, channels) };
  }
}

function fromRgba(rgba: Uint8Array, channels: number): Uint8Array {
  if (channels === 4) return rgba;
  const pixels = rgba.length / 4;
  const out = new Uint8Array(pixels * channels);
  for (let pixel = 0; pixel < pixels; pixel++) {
    const [r, g, b] = [rgba[pixel * 4], rgba[pixel * 4 + 1], rgba[pixel * 4 + 2]];
    if (channels === 3) out.set([r, g, b], pixel * 3);
    else out[pixel] = (r * 19595 + g * 38470 + b * 7471 + 32768) >> 16;
  }
  return out;
}
