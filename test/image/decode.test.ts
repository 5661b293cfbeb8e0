/**
 * Image decoding against references: every fixture (made by Pillow and libjpeg's cjpeg, see
 * fixtures/make-fixtures.py) decoded and compared with the pixels Pillow and libjpeg decode from it
 * (PNG exactly; JPEG within the rounding of a different inverse DCT); resizing against Pillow's
 * BILINEAR; damaged, truncated, unsupported and oversized inputs refused with typed errors, and
 * thousands of corrupted JPEGs and PNGs never read outside their input.
 */
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ImageError, InvalidArgumentError } from '../../lib/errors.js';
import { Tensor } from '../../lib/gpu/tensor.js';
import { decodeImage, imageFormat, imageInfo, resizeImage } from '../../lib/image/decode.js';
import { IMAGENET_MEAN, IMAGENET_STD, normalizeImages } from '../../lib/image/normalize.js';
import { f16ToFloat } from '../../lib/gpu/dtype.js';

const fixtures = join(import.meta.dirname, 'fixtures');
const read = (name: string) => new Uint8Array(readFileSync(join(fixtures, name)));
const images = readdirSync(fixtures).filter((name) => /\.(jpg|png|gif)$/.test(name) && !name.startsWith('bench'));

function difference(actual: Uint8Array, expected: Uint8Array): { max: number; mean: number } {
  expect(actual.length).toBe(expected.length);
  let max = 0;
  let sum = 0;
  for (let index = 0; index < actual.length; index++) {
    const delta = Math.abs(actual[index] - expected[index]);
    max = Math.max(max, delta);
    sum += delta;
  }
  return { max, mean: sum / actual.length };
}

function codeOf(run: () => unknown): string | undefined {
  try {
    run();
    return undefined;
  } catch (error) {
    expect(error).toBeInstanceOf(ImageError);
    return (error as ImageError).code;
  }
}

describe('decodeImage', () => {
  it.each(images)('decodes %s as Pillow and libjpeg do', (name) => {
    const reference = read(name.replace(/\.\w+$/, '.rgba'));
    const image = decodeImage(read(name), { mode: 'RGBA' });
    expect(image.dtype).toBe('u8');
    expect(image.shape).toEqual([47, 61, 4]);
    const { max, mean } = difference(image.data as Uint8Array, reference);
    if (!name.endsWith('.jpg')) {
      expect(max).toBe(0); // PNG and GIF are lossless: Pillow's pixels exactly
    } else {
      // libjpeg's integer inverse DCT and ours (floats) round differently by a level or two.
      expect(max).toBeLessThanOrEqual(4);
      expect(mean).toBeLessThan(0.6);
    }
  });

  it('gives the channels of each mode: RGB drops alpha, L is [height, width] luma', () => {
    const rgba = decodeImage(read('rgba.png'), { mode: 'RGBA' });
    const rgb = decodeImage(read('rgba.png'));
    const gray = decodeImage(read('rgba.png'), { mode: 'L' });
    expect(rgb.shape).toEqual([47, 61, 3]);
    expect(gray.shape).toEqual([47, 61]);
    const [r, g, b] = [...(rgba.data as Uint8Array).subarray(0, 3)];
    expect([...(rgb.data as Uint8Array).subarray(0, 3)]).toEqual([r, g, b]);
    expect((gray.data as Uint8Array)[0]).toBe(Math.round((r * 299 + g * 587 + b * 114) / 1000));
    // A gray JPEG in RGB repeats its one channel; a colour JPEG in L is its luma plane.
    const grayJpeg = decodeImage(read('gray.jpg'));
    const pixels = grayJpeg.data as Uint8Array;
    expect(pixels[0]).toBe(pixels[1]);
    expect(pixels[1]).toBe(pixels[2]);
    const luma = decodeImage(read('baseline-444.jpg'), { mode: 'L' }).data as Uint8Array;
    const reference = read('baseline-444.rgba');
    let worst = 0;
    for (let index = 0; index < luma.length; index++) {
      const expected = (reference[index * 4] * 299 + reference[index * 4 + 1] * 587 + reference[index * 4 + 2] * 114) / 1000;
      worst = Math.max(worst, Math.abs(luma[index] - expected));
    }
    expect(worst).toBeLessThan(6);
  });

  it('resizes as Pillow BILINEAR does, shrinking with an antialiasing filter', () => {
    const source = decodeImage(read('rgb.png'));
    const down = resizeImage(source, [18, 24]);
    expect(down.shape).toEqual([18, 24, 3]);
    expect(difference(down.data as Uint8Array, read('resize-down.rgb')).max).toBeLessThanOrEqual(2);
    const up = decodeImage(read('rgb.png'), { size: [70, 90] });
    expect(up.shape).toEqual([70, 90, 3]);
    expect(difference(up.data as Uint8Array, read('resize-up.rgb')).max).toBeLessThanOrEqual(2);
    // A one-pixel checkerboard shrunk fourfold averages out to gray: sampling would keep black or white.
    const checker = new Uint8Array(64 * 64).map((_, index) => (((index >> 6) + index) % 2 === 0 ? 0 : 255));
    const small = resizeImage(Tensor.wrap(checker, 'u8', [64, 64]), [16, 16]).data as Uint8Array;
    for (const value of small) expect(Math.abs(value - 127.5)).toBeLessThan(20);
    // A JPEG resized as it decodes (one native call) equals decoding then resizing.
    const jpeg = read('progressive-420.jpg');
    expect(decodeImage(jpeg, { size: [20, 30] }).data).toEqual(resizeImage(decodeImage(jpeg), [20, 30]).data);
    expect(decodeImage(jpeg, { size: [47, 61], mode: 'L' }).data).toEqual(decodeImage(jpeg, { mode: 'L' }).data);
    // The same size is the same tensor.
    expect(resizeImage(source, [47, 61])).toBe(source);
  });

  it('decodes reduced in the DCT domain (draft) as Pillow\'s draft mode does', () => {
    for (const name of ['baseline-420', 'baseline-444', 'gray']) {
      for (const [width, height, worst, mean] of [[31, 24, 12, 2.5], [16, 12, 30, 4]]) {
        const image = decodeImage(read(`${name}.jpg`), { size: [height, width], draft: true });
        const { max, mean: average } = difference(image.data as Uint8Array, read(`draft-${name}-${width}x${height}.rgb`));
        expect(max).toBeLessThanOrEqual(worst);
        expect(average).toBeLessThan(mean);
      }
    }
    // At 1/8 each pixel of a gray image is its block's mean.
    const full = decodeImage(read('gray.jpg'), { mode: 'L' }).data as Uint8Array;
    const eighth = decodeImage(read('gray.jpg'), { mode: 'L', size: [6, 8], draft: true }).data as Uint8Array;
    for (let y = 0; y < 5; y++) {
      for (let x = 0; x < 7; x++) {
        let sum = 0;
        for (let dy = 0; dy < 8; dy++) for (let dx = 0; dx < 8; dx++) sum += full[(y * 8 + dy) * 61 + x * 8 + dx];
        expect(Math.abs(eighth[y * 8 + x] - sum / 64)).toBeLessThan(1.5);
      }
    }
    // Without a size there is nothing to reduce toward; PNG has no DCT and decodes whole.
    expect(decodeImage(read('rgb.png'), { size: [12, 16], draft: true }).data).toEqual(decodeImage(read('rgb.png'), { size: [12, 16] }).data);
  });

  it('turns a JPEG upright by its EXIF orientation when asked', () => {
    // A JPEG with an EXIF segment holding one tag, the orientation (little- or big-endian TIFF).
    const withOrientation = (jpeg: Uint8Array, orientation: number, little = true): Uint8Array => {
      const tiff = Buffer.alloc(26);
      tiff.write(little ? 'II' : 'MM', 0, 'latin1');
      const u16 = (value: number, at: number) => (little ? tiff.writeUInt16LE(value, at) : tiff.writeUInt16BE(value, at));
      const u32 = (value: number, at: number) => (little ? tiff.writeUInt32LE(value, at) : tiff.writeUInt32BE(value, at));
      u16(42, 2);
      u32(8, 4);
      u16(1, 8);
      u16(0x0112, 10);
      u16(3, 12);
      u32(1, 14);
      u16(orientation, 18);
      u32(0, 22);
      const body = Buffer.concat([Buffer.from('Exif\0\0', 'latin1'), tiff]);
      const segment = Buffer.concat([Buffer.from([0xff, 0xe1, (body.length + 2) >> 8, (body.length + 2) & 0xff]), body]);
      return new Uint8Array(Buffer.concat([jpeg.subarray(0, 2), segment, jpeg.subarray(2)]));
    };
    const jpeg = read('baseline-444.jpg');
    const plain = decodeImage(jpeg);
    const pixel = (image: Tensor, y: number, x: number) => [...(image.data as Uint8Array).subarray((y * image.shape[1] + x) * 3, (y * image.shape[1] + x) * 3 + 3)];
    const [height, width] = [47, 61];
    // The source corner each orientation shows at the top left.
    const corners: Record<number, [number, number]> = { 1: [0, 0], 2: [0, width - 1], 3: [height - 1, width - 1], 4: [height - 1, 0], 5: [0, 0], 6: [height - 1, 0], 7: [height - 1, width - 1], 8: [0, width - 1] };
    for (let orientation = 1; orientation <= 8; orientation++) {
      for (const little of [true, false]) {
        const tagged = withOrientation(jpeg, orientation, little);
        expect(decodeImage(tagged).shape).toEqual([47, 61, 3]); // not applied unless asked
        const upright = decodeImage(tagged, { applyExifOrientation: true });
        expect(upright.shape).toEqual(orientation >= 5 ? [61, 47, 3] : [47, 61, 3]);
        expect(pixel(upright, 0, 0)).toEqual(pixel(plain, ...corners[orientation]));
        // A size is the upright image's; resized then turned equals turned then resized.
        const small = decodeImage(tagged, { applyExifOrientation: true, size: [20, 30] });
        expect(small.shape).toEqual([20, 30, 3]);
        expect(difference(small.data as Uint8Array, resizeImage(upright, [20, 30]).data as Uint8Array).max).toBeLessThanOrEqual(1);
      }
    }
    // Orientation 6 pixel by pixel: a quarter turn clockwise.
    const turned = decodeImage(withOrientation(jpeg, 6), { applyExifOrientation: true });
    for (const [y, x] of [[0, 0], [10, 20], [60, 46], [33, 5]]) expect(pixel(turned, y, x)).toEqual(pixel(plain, height - 1 - x, y));
    // A damaged EXIF segment is ignored: the pixels are fine.
    const damaged = withOrientation(jpeg, 6);
    damaged[12] = 0x00; // the TIFF byte order
    expect(decodeImage(damaged, { applyExifOrientation: true }).shape).toEqual([47, 61, 3]);
  });

  it('keeps the aspect ratio with fit: cover crops the centre, contain pads with zeros', () => {
    const jpeg = read('baseline-444.jpg'); // 61 wide, 47 high
    const full = decodeImage(jpeg);
    const row = (image: Tensor, y: number) => [...(image.data as Uint8Array).subarray(y * image.shape[1] * 3, (y + 1) * image.shape[1] * 3)];
    // cover [32, 32]: scaled to 32 x 42, then columns 5..36 kept.
    const covered = decodeImage(jpeg, { size: [32, 32], fit: 'cover' });
    expect(covered.shape).toEqual([32, 32, 3]);
    const scaled = resizeImage(full, [32, 42]);
    for (const y of [0, 15, 31]) expect(row(covered, y)).toEqual(row(scaled, y).slice(5 * 3, 37 * 3));
    // contain [32, 32]: scaled to 25 x 32, rows 3..27 of the output, zeros above and below.
    const contained = decodeImage(jpeg, { size: [32, 32], fit: 'contain' });
    expect(contained.shape).toEqual([32, 32, 3]);
    const inside = resizeImage(full, [25, 32]);
    expect(row(contained, 0).every((value) => value === 0)).toBe(true);
    expect(row(contained, 31).every((value) => value === 0)).toBe(true);
    for (const y of [0, 12, 24]) expect(row(contained, y + 3)).toEqual(row(inside, y));
    // A PNG the same way, and a quarter-turned JPEG (fit applies to the upright image).
    expect(decodeImage(read('rgb.png'), { size: [10, 40], fit: 'cover' }).shape).toEqual([10, 40, 3]);
    expect(decodeImage(read('gray8.png'), { mode: 'L', size: [40, 10], fit: 'contain' }).shape).toEqual([40, 10]);
    expect(() => decodeImage(jpeg, { size: [8, 8], fit: 'crop' as never })).toThrow(/fit must be 'fill', 'cover' or 'contain'/);
  });

  it('reads a header without decoding', () => {
    expect(imageInfo(read('progressive-420.jpg'))).toEqual({ format: 'jpeg', width: 61, height: 47, channels: 3 });
    expect(imageInfo(read('gray.jpg'))).toEqual({ format: 'jpeg', width: 61, height: 47, channels: 1 });
    expect(imageInfo(read('cmyk.jpg'))).toEqual({ format: 'jpeg', width: 61, height: 47, channels: 4 });
    expect(imageInfo(read('palette.png'))).toEqual({ format: 'png', width: 61, height: 47, channels: 3 });
    expect(imageInfo(read('gray-alpha.png'))).toEqual({ format: 'png', width: 61, height: 47, channels: 2 });
    expect(imageFormat(read('rgb.png'))).toBe('png');
    expect(imageInfo(read('gif-animated.gif'))).toEqual({ format: 'gif', width: 61, height: 47, channels: 3 });
    expect(imageFormat(new Uint8Array([1, 2, 3]))).toBeUndefined();
  });

  it('refuses damaged, truncated, unsupported and oversized images with typed errors', () => {
    const jpeg = read('baseline-420.jpg');
    const png = read('rgb.png');
    expect(codeOf(() => decodeImage(jpeg.subarray(0, jpeg.length - 400)))).toBe('ERR_IMAGE_DECODE');
    expect(codeOf(() => decodeImage(jpeg.subarray(0, 300)))).toBe('ERR_IMAGE_DECODE');
    expect(codeOf(() => decodeImage(png.subarray(0, png.length - 1000)))).toBe('ERR_IMAGE_DECODE');
    const badCrc = png.slice();
    badCrc[40] ^= 0xff; // inside IDAT
    expect(() => decodeImage(badCrc)).toThrow(/CRC/);
    // SOF9 (arithmetic coding) and 12-bit samples: named, not misdecoded.
    const arithmetic = jpeg.slice();
    const sof = arithmetic.findIndex((value, index) => value === 0xff && arithmetic[index + 1] === 0xc0);
    arithmetic[sof + 1] = 0xc9;
    expect(() => decodeImage(arithmetic)).toThrow(/arithmetic/);
    expect(codeOf(() => decodeImage(arithmetic))).toBe('ERR_IMAGE_UNSUPPORTED');
    const twelveBit = jpeg.slice();
    twelveBit[sof + 4] = 12;
    expect(codeOf(() => decodeImage(twelveBit))).toBe('ERR_IMAGE_UNSUPPORTED');
    // A Huffman table claiming five 1-bit codes (a bit can tell only two apart).
    const overfull = jpeg.slice();
    const dht = overfull.findIndex((value, index) => value === 0xff && overfull[index + 1] === 0xc4);
    const counts = dht + 5; // after the marker, the length and the class/index byte: codes of 1..16 bits
    const moved = 5 - overfull[counts];
    const donor = [...Array(15).keys()].map((step) => counts + 1 + step).find((at) => overfull[at] >= moved)!;
    overfull[donor] -= moved;
    overfull[counts] = 5;
    expect(() => decodeImage(overfull)).toThrow(/Huffman table/);
    expect(codeOf(() => decodeImage(new Uint8Array(Buffer.from('GIF89a....'))))).toBe('ERR_IMAGE_DECODE');
    const gif = read('gif-plain.gif');
    expect(() => decodeImage(gif.subarray(0, 40))).toThrow(/GIF: the file ends before its first image/);
    expect(codeOf(() => decodeImage(gif, { maxPixels: 100 }))).toBe('ERR_IMAGE_TOO_LARGE');
    expect(() => decodeImage(new Uint8Array(Buffer.from('BM6\0\0\0')))).toThrow(/BMP images are not supported/);
    expect(() => decodeImage(new Uint8Array(Buffer.from('RIFF\0\0\0\0WEBPVP8 ')))).toThrow(/WebP/);
    expect(codeOf(() => decodeImage(new Uint8Array([1, 2, 3, 4])))).toBe('ERR_IMAGE_DECODE');
    expect(codeOf(() => decodeImage(jpeg, { maxPixels: 1000 }))).toBe('ERR_IMAGE_TOO_LARGE');
    expect(codeOf(() => decodeImage(png, { maxPixels: 1000 }))).toBe('ERR_IMAGE_TOO_LARGE');
    expect(() => decodeImage(jpeg, { maxPixels: 0 })).not.toThrow();
    expect(() => decodeImage('x' as never)).toThrow(InvalidArgumentError);
    expect(() => decodeImage(jpeg, { mode: 'CMYK' as never })).toThrow(/mode must be one of RGB, RGBA, L/);
    expect(() => decodeImage(jpeg, { size: [0, 10] })).toThrow(/size must be \[height, width\]/);
  });

  it('survives corrupted files: each decodes or fails with an ImageError, never a crash', () => {
    // A seeded generator: the same corruptions every run.
    let state = 12345;
    const random = () => {
      state = (state * 1103515245 + 12345) & 0x7fffffff;
      return state / 0x7fffffff;
    };
    for (const name of ['baseline-420.jpg', 'progressive-420.jpg', 'restart.jpg', 'rgba-interlaced.png', 'palette4.png', 'gif-interlaced.gif']) {
      const original = read(name);
      for (let trial = 0; trial < 300; trial++) {
        const damaged = original.slice(0, trial % 3 === 0 ? Math.floor(random() * original.length) : original.length);
        for (let flips = 1 + Math.floor(random() * 4); flips > 0; flips--) {
          damaged[Math.floor(random() * damaged.length)] = Math.floor(random() * 256);
        }
        try {
          const image = decodeImage(damaged, { maxPixels: 1 << 22 });
          expect(image.shape[2]).toBe(3);
        } catch (error) {
          expect(error).toBeInstanceOf(ImageError);
        }
      }
    }
  });
});

describe('normalizeImages', () => {
  // Two 1x2 RGB images: pixel values chosen so each position is recognizable.
  const pixels = Uint8Array.from([0, 51, 102, 153, 204, 255, 255, 0, 0, 0, 255, 0]);
  const batch = Tensor.wrap(pixels, 'u8', [2, 1, 2, 3]);

  it('scales, centres and spreads each channel, laid out NCHW or NHWC', () => {
    const plain = normalizeImages(batch);
    expect(plain.shape).toEqual([2, 3, 1, 2]);
    // Image 0, channel 0 holds its two pixels' red values; channel 1 their green ones.
    expect(Array.from(plain.data as Float32Array).map((value) => Math.round(value * 255))).toEqual([0, 153, 51, 204, 102, 255, 255, 0, 0, 255, 0, 0]);
    const imagenet = normalizeImages(batch, { mean: IMAGENET_MEAN, std: IMAGENET_STD, layout: 'NHWC' });
    expect(imagenet.shape).toEqual([2, 1, 2, 3]);
    const values = imagenet.data as Float32Array;
    pixels.forEach((value, index) => expect(values[index]).toBeCloseTo((value / 255 - IMAGENET_MEAN[index % 3]) / IMAGENET_STD[index % 3], 5));
    const half = normalizeImages(batch, { mean: 0.5, std: 0.5, dtype: 'f16' });
    expect(half.dtype).toBe('f16');
    expect(f16ToFloat((half.data as Uint16Array)[0])).toBe(-1);
    expect(f16ToFloat((half.data as Uint16Array)[5])).toBe(1);
    // One image [H, W, C] gives [C, H, W].
    expect(normalizeImages(Tensor.wrap(pixels.subarray(0, 6), 'u8', [1, 2, 3])).shape).toEqual([3, 1, 2]);
  });

  it('refuses what it cannot normalize by name', () => {
    expect(() => normalizeImages(Tensor.wrap(new Float32Array(6), 'f32', [1, 2, 3]))).toThrow(/takes a u8 tensor/);
    expect(() => normalizeImages(batch, { mean: [0.5, 0.5] })).toThrow(/mean must be a number or 3 numbers/);
    expect(() => normalizeImages(batch, { std: 0 })).toThrow(/std must not be 0/);
    expect(() => normalizeImages(batch, { layout: 'CHW' as never })).toThrow(/layout must be 'NCHW' or 'NHWC'/);
  });
});
