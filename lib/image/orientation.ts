/**
 * EXIF orientation: phones and cameras store a photograph as the sensor saw it and record in its
 * EXIF data how to turn it upright (tag 0x0112, values 1-8). Pillow and Ray leave it unapplied by
 * default, as `decodeImage` does; `applyExifOrientation` turns the pixels as a viewer would
 * (torchvision's decode_jpeg option of that name).
 */
import { Tensor } from '../gpu/tensor.js';

/**
 * The EXIF orientation of a JPEG (1 when it has none, or its EXIF data cannot be read: a damaged
 * tag must not fail an image whose pixels are fine).
 */
export function jpegOrientation(bytes: Uint8Array): number {
  let offset = 2;
  while (offset + 4 <= bytes.length) {
    if (bytes[offset] !== 0xff) return 1;
    const marker = bytes[offset + 1];
    if (marker === 0xff) {
      offset++;
      continue;
    }
    if (marker === 0xda || marker === 0xd9) return 1; // the scan: no EXIF before it
    const length = (bytes[offset + 2] << 8) | bytes[offset + 3];
    if (length < 2 || offset + 2 + length > bytes.length) return 1;
    if (marker === 0xe1) {
      const found = exifOrientation(bytes.subarray(offset + 4, offset + 2 + length));
      if (found !== undefined) return found;
    }
    offset += 2 + length;
  }
  return 1;
}

/** The orientation tag in an APP1 segment's body ("Exif\0\0" then a TIFF structure). */
function exifOrientation(segment: Uint8Array): number | undefined {
  if (segment.length < 14 || String.fromCharCode(...segment.subarray(0, 4)) !== 'Exif' || segment[4] !== 0 || segment[5] !== 0) return undefined;
  const tiff = new DataView(segment.buffer, segment.byteOffset + 6, segment.length - 6);
  const order = tiff.getUint16(0);
  if (order !== 0x4949 && order !== 0x4d4d) return undefined;
  const little = order === 0x4949;
  if (tiff.getUint16(2, little) !== 42) return undefined;
  const directory = tiff.getUint32(4, little);
  if (directory + 2 > tiff.byteLength) return undefined;
  const entries = tiff.getUint16(directory, little);
  for (let index = 0; index < entries; index++) {
    const entry = directory + 2 + index * 12;
    if (entry + 12 > tiff.byteLength) return undefined;
    if (tiff.getUint16(entry, little) !== 0x0112) continue;
    // A SHORT, its value in the first two bytes of the value field.
    const value = tiff.getUint16(entry + 2, little) === 3 ? tiff.getUint16(entry + 8, little) : 0;
    return value >= 1 && value <= 8 ? value : 1;
  }
  return undefined;
}

/** Whether an orientation swaps height and width (a quarter turn, with or without a flip). */
export const swapsAxes = (orientation: number) => orientation >= 5 && orientation <= 8;

/**
 * Pixels [height, width(, channels)] turned upright for an EXIF orientation: for each output
 * pixel, the source pixel it shows.
 */
export function applyOrientation(image: Tensor, orientation: number): Tensor {
  if (orientation <= 1 || orientation > 8) return image;
  const [height, width, channels = 1] = image.shape;
  const swapped = swapsAxes(orientation);
  const outHeight = swapped ? width : height;
  const outWidth = swapped ? height : width;
  const source = image.data as Uint8Array;
  const out = new Uint8Array(source.length);
  // Where output (y, x) reads from, per orientation (EXIF's 2 mirror, 3 half turn, 4 flip,
  // 5 transpose, 6 quarter turn clockwise, 7 transverse, 8 quarter turn anticlockwise).
  const from: (y: number, x: number) => [number, number] = {
    2: (y: number, x: number) => [y, width - 1 - x],
    3: (y: number, x: number) => [height - 1 - y, width - 1 - x],
    4: (y: number, x: number) => [height - 1 - y, x],
    5: (y: number, x: number) => [x, y],
    6: (y: number, x: number) => [height - 1 - x, y],
    7: (y: number, x: number) => [height - 1 - x, width - 1 - y],
    8: (y: number, x: number) => [x, width - 1 - y],
  }[orientation] as (y: number, x: number) => [number, number];
  for (let y = 0; y < outHeight; y++) {
    for (let x = 0; x < outWidth; x++) {
      const [sourceY, sourceX] = from(y, x);
      const target = (y * outWidth + x) * channels;
      const start = (sourceY * width + sourceX) * channels;
      for (let channel = 0; channel < channels; channel++) out[target + channel] = source[start + channel];
    }
  }
  return Tensor.wrap(out, 'u8', image.shape.length === 2 ? [outHeight, outWidth] : [outHeight, outWidth, channels]);
}
