/**
 * Images suite: a directory of 640x480 JPEGs (quality 85, 4:2:0, as a camera or a web crawl gives
 * them; one photograph copied, so every file costs the same) read into 224x224 RGB tensors, the
 * shape a vision model takes.
 *
 * - images_read_per_s: readImages(dir, { size: [224, 224] }) consumed in batches of 64 by the
 *   driver, decoding spread over the cluster's CPUs by read tasks.
 * - images_single_process_per_s, its baseline: the same files read and decoded one after another
 *   in this process (readFile, decodeImage with the size): what a loop without trellis does.
 * - images_bytes_read_per_s: readBinaryFiles of the same files (no decoding): the dataset's
 *   ceiling here, so the gap to it is the decoding's share.
 * - images_read_draft_per_s: the same with `draft: true`, each JPEG decoded at half size in the
 *   DCT domain (320x240, still above 224x224) before resizing, as Pillow's draft mode.
 * - images_decode_megapixels_per_s: one thread's decoding of the photograph (JPEG to RGB, full
 *   size), and images_resize_megapixels_per_s its resizing to 224x224 (source megapixels/s).
 * Medians of three rounds after a warm-up.
 */
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DataContext, decodeImage, init, readBinaryFiles, readImages, resizeImage, shutdown } from '../lib/index.js';
import { elapsedSeconds, median, nowNs, round, type Results, type Suite } from './harness.js';

const FILES = 384;
const SIZE: [number, number] = [224, 224];
const PHOTO = join(import.meta.dirname, '..', 'test', 'image', 'fixtures', 'bench-640x480.jpg');

async function rounds(body: () => Promise<number>, count = 3): Promise<number> {
  await body();
  const rates: number[] = [];
  for (let index = 0; index < count; index++) rates.push(await body());
  return median(rates);
}

export const imagesSuite: Suite = {
  name: 'images',
  ratios: [
    ['readImages across the cluster / one process decoding the same files', 'images_read_per_s', 'images_single_process_per_s', ''],
    ['readImages / readBinaryFiles of the same files (no decoding)', 'images_read_per_s', 'images_bytes_read_per_s', ''],
    ['readImages with draft decoding / without', 'images_read_draft_per_s', 'images_read_per_s', ''],
  ],
  async run(): Promise<Results> {
    const dir = mkdtempSync(join(tmpdir(), 'trellis-bench-images-'));
    for (let index = 0; index < FILES; index++) copyFileSync(PHOTO, join(dir, `photo-${String(index).padStart(4, '0')}.jpg`));
    const paths = Array.from({ length: FILES }, (_, index) => join(dir, `photo-${String(index).padStart(4, '0')}.jpg`));
    const results: Results = {};
    try {
      const photo = new Uint8Array(readFileSync(PHOTO));
      const megapixels = (640 * 480) / 1e6;
      const decodeRate = await rounds(async () => {
        const start = nowNs();
        for (let index = 0; index < 40; index++) decodeImage(photo);
        return (40 * megapixels) / elapsedSeconds(start);
      });
      const decoded = decodeImage(photo);
      const resizeRate = await rounds(async () => {
        const start = nowNs();
        for (let index = 0; index < 40; index++) resizeImage(decoded, SIZE);
        return (40 * megapixels) / elapsedSeconds(start);
      });
      const single = await rounds(async () => {
        const start = nowNs();
        for (const path of paths) decodeImage(new Uint8Array(await readFile(path)), { size: SIZE });
        return FILES / elapsedSeconds(start);
      });

      DataContext.progress = false;
      await init();
      const consume = async (batches: AsyncIterable<unknown>, rowsOf: (batch: never) => number) => {
        const start = nowNs();
        let rows = 0;
        for await (const batch of batches) rows += rowsOf(batch as never);
        if (rows !== FILES) throw new Error(`read ${rows} of ${FILES} images`);
        return FILES / elapsedSeconds(start);
      };
      const read = await rounds(() =>
        consume(readImages(dir, { size: SIZE }).iterBatches({ batchSize: 64 }), (batch: { image: { shape: number[] } }) => batch.image.shape[0]),
      );
      const draft = await rounds(() =>
        consume(readImages(dir, { size: SIZE, draft: true }).iterBatches({ batchSize: 64 }), (batch: { image: { shape: number[] } }) => batch.image.shape[0]),
      );
      const bytes = await rounds(() => consume(readBinaryFiles(dir).iterBatches({ batchSize: 64, batchFormat: 'arrow' }), (batch: { numRows: number }) => batch.numRows));
      results.images_read_per_s = { value: round(read, 1), unit: 'images/s' };
      results.images_read_draft_per_s = { value: round(draft, 1), unit: 'images/s' };
      results.images_single_process_per_s = { value: round(single, 1), unit: 'images/s' };
      results.images_bytes_read_per_s = { value: round(bytes, 1), unit: 'images/s' };
      results.images_decode_megapixels_per_s = { value: round(decodeRate, 1), unit: 'MP/s' };
      results.images_resize_megapixels_per_s = { value: round(resizeRate, 1), unit: 'MP/s' };
    } finally {
      await shutdown();
      rmSync(dir, { recursive: true, force: true });
    }
    return results;
  },
};
