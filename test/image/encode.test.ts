/**
 * Image encoding: PNG written losslessly for every channel count and read back exactly; JPEG at
 * its qualities and chroma layouts read back close (by PSNR), smaller at lower quality, and read by
 * libjpeg's djpeg where it is installed; odd sizes; bad options refused by name.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { Tensor } from '../../lib/gpu/tensor.js';
import { decodeImage } from '../../lib/image/decode.js';
import { encodeImage } from '../../lib/image/encode.js';

const fixtures = join(import.meta.dirname, 'fixtures');
const photo = decodeImage(new Uint8Array(readFileSync(join(fixtures, 'bench-640x480.jpg'))));

const hasDjpeg = (() => {
  try {
    execFileSync('djpeg', ['-version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

function psnr(a: Tensor, b: Tensor): number {
  const left = a.data as Uint8Array;
  const right = b.data as Uint8Array;
  expect(right.length).toBe(left.length);
  let squared = 0;
  for (let index = 0; index < left.length; index++) squared += (left[index] - right[index]) ** 2;
  return 10 * Math.log10((255 * 255) / (squared / left.length));
}

/** A smooth test card: gradients and a soft disc, as photographs mostly are. */
function card(height: number, width: number, channels: number): Tensor {
  const pixels = new Uint8Array(height * width * channels);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const disc = Math.hypot(x - width / 2, y - height / 2) < Math.min(width, height) / 3 ? 60 : 0;
      const values = [(x * 255) / Math.max(1, width - 1), (y * 255) / Math.max(1, height - 1), 128 + disc, 200 - disc];
      for (let channel = 0; channel < channels; channel++) pixels[(y * width + x) * channels + channel] = Math.round(values[channel]);
    }
  }
  return Tensor.wrap(pixels, 'u8', channels === 1 ? [height, width] : [height, width, channels]);
}

describe('encodeImage', () => {
  it('writes PNG losslessly in every channel count', () => {
    for (const channels of [1, 2, 3, 4]) {
      const image = card(23, 31, channels);
      const back = decodeImage(encodeImage(image), { mode: 'RGBA' }).data as Uint8Array;
      const source = image.data as Uint8Array;
      const expected = new Uint8Array(23 * 31 * 4);
      for (let pixel = 0; pixel < 23 * 31; pixel++) {
        expected.set(
          channels === 1 ? [source[pixel], source[pixel], source[pixel], 255]
          : channels === 2 ? [source[2 * pixel], source[2 * pixel], source[2 * pixel], source[2 * pixel + 1]]
          : channels === 3 ? [...source.subarray(3 * pixel, 3 * pixel + 3), 255]
          : [...source.subarray(4 * pixel, 4 * pixel + 4)],
          pixel * 4,
        );
      }
      expect(Buffer.compare(back, expected), `${channels} channels`).toBe(0);
    }
    // A photograph too, every pixel.
    expect(Buffer.compare(decodeImage(encodeImage(photo)).data as Uint8Array, photo.data as Uint8Array)).toBe(0);
  });

  it('writes JPEG close to the source, smaller at lower quality, 4:2:0 or 4:4:4, gray or colour', () => {
    const image = card(64, 96, 3);
    const high = encodeImage(image, { format: 'jpeg', quality: 95 });
    const low = encodeImage(image, { format: 'jpeg', quality: 30 });
    expect(psnr(image, decodeImage(high))).toBeGreaterThan(38);
    expect(psnr(image, decodeImage(low))).toBeGreaterThan(30);
    expect(low.length).toBeLessThan(high.length);
    const full = encodeImage(image, { format: 'jpeg', quality: 95, chroma: '4:4:4' });
    expect(psnr(image, decodeImage(full))).toBeGreaterThan(psnr(image, decodeImage(high)) - 0.5);
    // A photograph: close at quality 90 to what it was decoded from.
    expect(psnr(photo, decodeImage(encodeImage(photo, { format: 'jpeg', quality: 90 })))).toBeGreaterThan(29);
    const gray = card(20, 20, 1);
    const grayBack = decodeImage(encodeImage(gray, { format: 'jpeg' }), { mode: 'L' });
    expect(grayBack.shape).toEqual([20, 20]);
    expect(psnr(gray, grayBack)).toBeGreaterThan(38);
    // RGBA: alpha dropped; sizes that are not whole blocks, down to one pixel.
    for (const [height, width] of [[1, 1], [9, 17], [17, 9]]) {
      const back = decodeImage(encodeImage(card(height, width, 4), { format: 'jpeg', quality: 100 }));
      expect(back.shape).toEqual([height, width, 3]);
    }
  });

  it.skipIf(!hasDjpeg)('writes JPEG that libjpeg reads (djpeg)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'trellis-encode-'));
    try {
      for (const [name, options] of [['a.jpg', { format: 'jpeg' }], ['b.jpg', { format: 'jpeg', quality: 40, chroma: '4:4:4' }]] as const) {
        writeFileSync(join(dir, name), encodeImage(photo, options));
        const ppm = execFileSync('djpeg', ['-ppm', join(dir, name)]);
        // P6 header then 640x480x3 bytes, close to the photograph.
        const pixels = new Uint8Array(ppm.subarray(ppm.length - 640 * 480 * 3));
        expect(psnr(photo, Tensor.wrap(pixels, 'u8', [480, 640, 3]))).toBeGreaterThan(name === 'a.jpg' ? 29 : 24);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses what it cannot encode by name', () => {
    expect(() => encodeImage(Tensor.wrap(new Float32Array(3), 'f32', [1, 1, 3]))).toThrow(/takes a u8 tensor/);
    expect(() => encodeImage(card(2, 2, 3), { format: 'gif' as never })).toThrow(/format must be 'png' or 'jpeg'/);
    expect(() => encodeImage(card(2, 2, 3), { format: 'jpeg', quality: 0 })).toThrow(/quality must be an integer from 1 to 100/);
    expect(() => encodeImage(card(2, 2, 2), { format: 'jpeg' })).toThrow(/no gray-with-alpha form/);
    expect(() => encodeImage(Tensor.wrap(new Uint8Array(10), 'u8', [1, 2, 5]))).toThrow(/1 to 4 channels/);
  });
});
