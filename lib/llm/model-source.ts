/**
 * Model checkpoints on object storage (`s3://bucket/models/llama-3-8b`): each host copies the
 * model's directory once into a local cache and every process there loads from the copy (weights
 * are read at offsets many times over, which object storage is no place for). Concurrent loaders
 * on one host (a replica and its ranks) share one download: the first takes a lock file, the
 * others wait for the finished directory. Large files come down in ranges, several at once.
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { hostIdentity } from '../core/host.js';
import { ModelLoadError } from '../errors.js';
import { processAlive } from '../process-exit.js';
import { LocalFileSystem, fileSystemFor, paths, urlScheme, type FileSystem } from '../data/filesystem/file-system.js';
// s3:// URLs, and an S3FileSystem arriving in a rank's light worker, need the S3 filesystem registered.
import '../data/filesystem/s3.js';

export interface ModelSourceOptions {
  /** The filesystem of the checkpoint's URL (default: the scheme's, from the environment). */
  filesystem?: FileSystem;
  /** Where copies are kept (default: TRELLIS_MODEL_CACHE, else ~/.cache/trellis/models). */
  cacheDirectory?: string;
  /** A file larger than this comes down in ranges of this size (default 64 MiB). */
  rangeBytes?: number;
  /** Ranges (and files) fetched at once (default 8). */
  concurrency?: number;
}

const local = new LocalFileSystem();
const WAIT_MS = 250;

/** The directory part of a checkpoint URL: itself, or the directory of a named file. */
function directoryOf(url: string): { directory: string; file: string | undefined } {
  const trimmed = url.replace(/\/+$/, '');
  return /\.(safetensors|json)$/i.test(trimmed) ? { directory: paths.dirname(trimmed), file: paths.basename(trimmed) } : { directory: trimmed, file: undefined };
}

async function runAll<T>(items: readonly T[], concurrency: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, async () => {
    while (next < items.length) await work(items[next++]);
  }));
}

/** Copies one remote file to `target`: one streamed GET, or ranges written at their offsets. */
async function download(storage: FileSystem, source: string, bytes: number, target: string, rangeBytes: number, concurrency: number): Promise<void> {
  await mkdir(dirname(target), { recursive: true });
  const handle = await open(target, 'w');
  try {
    const ranges: Array<[number, number]> = [];
    for (let start = 0; start < Math.max(bytes, 1); start += rangeBytes) ranges.push([start, Math.min(bytes, start + rangeBytes)]);
    await runAll(ranges, concurrency, async ([start, end]) => {
      let position = start;
      for await (const chunk of storage.readStream(source, start, bytes > rangeBytes ? end : undefined)) {
        await handle.write(chunk, 0, chunk.byteLength, position);
        position += chunk.byteLength;
      }
      if (bytes > rangeBytes && position !== end) throw new ModelLoadError('ERR_MODEL_DOWNLOAD', `${source}: bytes ${start}-${end} came back ${position - start} long`, { file: source });
    });
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * The local path to load a checkpoint from: the path itself when it is local; for a URL, the
 * host's copy of its directory (made now if there is none), and in it the file the URL names.
 */
export async function localCheckpoint(checkpoint: string, options: ModelSourceOptions = {}): Promise<string> {
  if (!urlScheme(checkpoint)) return checkpoint;
  const storage = fileSystemFor(checkpoint, options.filesystem);
  const { directory, file } = directoryOf(checkpoint);
  const root = options.cacheDirectory ?? process.env.TRELLIS_MODEL_CACHE ?? join(homedir(), '.cache', 'trellis', 'models');
  const copy = join(root, `${createHash('sha256').update(directory).digest('hex').slice(0, 16)}-${paths.basename(directory)}`);
  const result = file ? join(copy, file) : copy;
  if (existsSync(copy)) return result;
  await mkdir(root, { recursive: true });
  const lock = `${copy}.lock`;
  for (;;) {
    if (existsSync(copy)) return result;
    if (await local.createExclusive(lock, Buffer.from(JSON.stringify({ host: hostIdentity(), pid: process.pid })))) break;
    // Another process here is copying it: wait for the finished directory, or take over from a dead one.
    let holder: { pid?: number } = {};
    try {
      holder = JSON.parse(await readFile(lock, 'utf8')) as { pid?: number };
    } catch {
      continue; // gone between the two looks
    }
    if (typeof holder.pid === 'number' && !processAlive(holder.pid)) {
      await rm(lock, { force: true });
      continue;
    }
    await new Promise((resolve) => setTimeout(resolve, WAIT_MS));
  }
  const partial = `${copy}.partial-${process.pid}`;
  try {
    if (existsSync(copy)) return result;
    const files = await storage.listFiles(directory);
    if (files.length === 0) throw new ModelLoadError('ERR_MODEL_DOWNLOAD', `no checkpoint at ${directory}: nothing is stored under it`, { file: checkpoint });
    if (file && !files.some((found) => paths.basename(found.path) === file)) throw new ModelLoadError('ERR_MODEL_DOWNLOAD', `no checkpoint file ${checkpoint}`, { file: checkpoint });
    await rm(partial, { recursive: true, force: true });
    const rangeBytes = options.rangeBytes ?? 64 << 20;
    const concurrency = options.concurrency ?? 8;
    // Small files side by side; a large one's ranges side by side.
    await runAll(files, Math.max(1, Math.floor(concurrency / 2)), (found) =>
      download(storage, found.path, found.bytes, join(partial, ...paths.relative(directory, found.path).split('/')), rangeBytes, concurrency),
    );
    // Whole or not at all: the finished directory appears by one rename.
    await rename(partial, copy);
    return result;
  } catch (error) {
    await rm(partial, { recursive: true, force: true }).catch(() => undefined);
    throw error;
  } finally {
    await rm(lock, { force: true });
  }
}
