/**
 * Offline image batch inference: JPEGs read and decoded by the read tasks into 64x64 tensors, a
 * pool of classifier actors (each loads its "model" once; a GPU each where there is one) labels
 * them a batch at a time from one Tensor [N, 64, 64, 3], and the job writes the labels to
 * Parquet and a thumbnail per image. The photographs are made first (shapes in a few colours,
 * written with trellis's own JPEG encoder), so the example needs no download.
 * Run: node --import tsx examples/image-batch-inference.ts [directory]   (default: a temp directory)
 */
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  Count, IMAGENET_MEAN, IMAGENET_STD, Mean, Tensor, cuda, encodeImage, init, normalizeImages, readImages, readParquet, remote, shutdown,
} from '../lib/index.js';

const COLORS: Record<string, [number, number, number]> = { red: [220, 40, 40], green: [40, 180, 60], blue: [40, 70, 220], yellow: [230, 210, 40] };
const NAMES = Object.keys(COLORS);

/** A photograph of a shape in one colour on a gray, noisy background (seeded: the same every run). */
function photograph(index: number): Uint8Array {
  const [height, width] = [180 + (index % 5) * 20, 240 + (index % 3) * 40];
  const color = COLORS[NAMES[index % NAMES.length]];
  const pixels = new Uint8Array(height * width * 3);
  let seed = index * 7919 + 1;
  const noise = () => ((seed = (seed * 48271) % 2147483647) % 21) - 10;
  const [cy, cx, radius] = [height / 2 + ((index * 13) % 40) - 20, width / 2 + ((index * 29) % 60) - 30, Math.min(height, width) / 3];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const inside = index % 2 === 0 ? Math.hypot(y - cy, x - cx) < radius : Math.abs(y - cy) < radius && Math.abs(x - cx) < radius;
      for (let channel = 0; channel < 3; channel++) {
        pixels[(y * width + x) * 3 + channel] = Math.max(0, Math.min(255, (inside ? color[channel] : 128) + noise()));
      }
    }
  }
  return encodeImage(Tensor.wrap(pixels, 'u8', [height, width, 3]), { format: 'jpeg', quality: 85 });
}

/**
 * The model: a linear classifier over each image's mean normalized colour inside its centre,
 * its weights made once per actor (as a real model's weights load once). Where the actor has a
 * GPU, the normalized batch goes there as a real model's input would.
 */
export class ColorClassifier {
  readonly prototypes = NAMES.map((name) => COLORS[name].map((value, channel) => (value / 255 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]));
  readonly device = cuda.available && cuda.deviceCount() > 0 ? 'cuda:0' : 'cpu';

  call(batch: { image: Tensor; path: string[] }) {
    const input = normalizeImages(batch.image, { mean: IMAGENET_MEAN, std: IMAGENET_STD }); // f32 [N, 3, 64, 64]
    if (this.device !== 'cpu') input.to(this.device as 'cuda:0').free(); // where a GPU model would run
    const [count, channels, height, width] = input.shape;
    const values = input.data as Float32Array;
    const labels: string[] = [];
    const confidence: number[] = [];
    for (let image = 0; image < count; image++) {
      // The centre's mean colour, then the nearest prototype and a softmax over distances.
      const mean = [0, 0, 0];
      for (let channel = 0; channel < channels; channel++) {
        let sum = 0;
        for (let y = height / 4; y < (3 * height) / 4; y++) for (let x = width / 4; x < (3 * width) / 4; x++) sum += values[((image * channels + channel) * height + y) * width + x];
        mean[channel] = sum / ((height / 2) * (width / 2));
      }
      const scores = this.prototypes.map((prototype) => -prototype.reduce((total, value, channel) => total + (value - mean[channel]) ** 2, 0));
      const best = scores.indexOf(Math.max(...scores));
      const exponentials = scores.map((score) => Math.exp(score - scores[best]));
      labels.push(NAMES[best]);
      confidence.push(1 / exponentials.reduce((total, value) => total + value, 0));
    }
    return { path: batch.path, label: labels, confidence, thumbnail: batch.image };
  }
}
remote(import.meta, ColorClassifier);

async function main(directory?: string) {
  const root = directory ?? mkdtempSync(join(tmpdir(), 'trellis-images-'));
  const photos = join(root, 'photos');
  mkdirSync(photos, { recursive: true });
  for (let index = 0; index < 400; index++) writeFileSync(join(photos, `photo-${String(index).padStart(4, '0')}.jpg`), photograph(index));
  console.log(`made ${readdirSync(photos).length} photographs in ${photos}`);

  await init();
  try {
    const started = performance.now();
    const gpus = cuda.available ? cuda.deviceCount() : 0;
    const labeled = await readImages(photos, { size: [64, 64], includePaths: true, draft: true })
      .mapBatches(ColorClassifier, { batchSize: 32, concurrency: [1, 2], numGpus: gpus > 0 ? 1 : 0 })
      .materialize();
    const rows = await labeled.count();
    await labeled.dropColumns(['thumbnail']).writeParquet(join(root, 'labels'));
    await labeled.writeImages(join(root, 'thumbnails'), { column: 'thumbnail', format: 'jpeg', quality: 80 });
    const seconds = (performance.now() - started) / 1000;
    console.log(`labeled ${rows} images in ${seconds.toFixed(1)} s (${(rows / seconds).toFixed(0)} images/s)`);
    const summary = await readParquet(join(root, 'labels')).groupBy('label').aggregate(Count(), Mean('confidence')).takeAll();
    for (const row of summary) console.log(`  ${String(row.label).padEnd(7)} ${row['count()']} images, mean confidence ${(row['mean(confidence)'] as number).toFixed(3)}`);
    console.log(`thumbnails: ${readdirSync(join(root, 'thumbnails')).length} files in ${join(root, 'thumbnails')}`);
  } finally {
    await shutdown();
    if (!directory) rmSync(root, { recursive: true, force: true });
  }
}

if (import.meta.url === `file://${process.argv[1]}`) await main(process.argv[2]);
