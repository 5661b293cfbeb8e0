/**
 * Compressed text files: which codec a file needs (from its name, or as the user says), streams
 * that decompress while reading and compress while writing, and the file-name suffixes that a
 * directory listing accepts beside a format's own extensions. The codecs are Node's zlib: gzip
 * and brotli everywhere, zstd where the running Node has it (22.15 and later).
 */
import zlib from 'node:zlib';
import type { Transform } from 'node:stream';
import { InvalidArgumentError } from '../../errors.js';

export type Compression = 'gzip' | 'brotli' | 'zstd';

/** What a reader is told: decide by the file's suffix ('auto', default), none, or one codec for every file. */
export type CompressionOption = 'auto' | 'none' | Compression;

const SUFFIXES: ReadonlyArray<readonly [string, Compression]> = [
  ['.gz', 'gzip'],
  ['.gzip', 'gzip'],
  ['.br', 'brotli'],
  ['.zst', 'zstd'],
  ['.zstd', 'zstd'],
];

/** The suffix a writer gives files of each codec. */
const WRITTEN_SUFFIX: Record<Compression, string> = { gzip: '.gz', brotli: '.br', zstd: '.zst' };

/** Node's zstd codecs, where it has them (typed here: the @types of Node 20 know none). */
type ZstdCodecs = { createZstdDecompress: (options: { chunkSize: number }) => Transform; createZstdCompress: (options: { chunkSize: number }) => Transform };

/** Whether this Node can read and write zstd. */
export const zstdAvailable = typeof (zlib as unknown as Partial<ZstdCodecs>).createZstdDecompress === 'function';

/** A format's extensions, each also with every compression suffix, for listing a directory. */
export function withCompressionSuffixes(extensions: readonly string[]): string[] {
  return extensions.flatMap((extension) => [extension, ...SUFFIXES.map(([suffix]) => `${extension}${suffix}`)]);
}

/** The codec a file's name says it is compressed with, if any. */
export function compressionOfName(path: string): Compression | undefined {
  const lower = path.toLowerCase();
  return SUFFIXES.find(([suffix]) => lower.endsWith(suffix))?.[1];
}

function checkAvailable(compression: Compression, what: string): void {
  if (compression === 'zstd' && !zstdAvailable) {
    throw new InvalidArgumentError(
      `${what} is zstd-compressed, and this Node.js (${process.version}) has no zstd: zstd needs Node.js 22.15 or later. Decompress it first, or use gzip or brotli`,
      'ERR_DATA_COMPRESSION',
    );
  }
}

const CODECS: readonly Compression[] = ['gzip', 'brotli', 'zstd'];

/** A reader's option, or with `forWriting` a writer's (no 'auto'): checked, zstd only where this Node has it. */
export function checkCompressionOption(value: unknown, format: string, forWriting = false): CompressionOption {
  const allowed: readonly string[] = [...(forWriting ? [] : ['auto']), 'none', ...CODECS];
  if (value === undefined) return forWriting ? 'none' : 'auto';
  if (typeof value !== 'string' || !allowed.includes(value)) {
    throw new InvalidArgumentError(`${format} option 'compression' must be ${allowed.map((name) => `'${name}'`).join(', ')}, got ${JSON.stringify(value)}`, 'ERR_DATA_COMPRESSION');
  }
  if (value === 'zstd') checkAvailable(value, `${format} option compression`);
  return value as CompressionOption;
}

/** The codec to read `path` with: by its name for 'auto'; checked to be one this Node has. */
export function compressionFor(path: string, option: CompressionOption): Compression | undefined {
  const compression = option === 'auto' ? compressionOfName(path) : option === 'none' ? undefined : option;
  if (compression) checkAvailable(compression, `file '${path}'`);
  return compression;
}

/** A writer's codec option: none, or one of the codecs (files then end in its suffix). */
export function checkWriteCompression(value: unknown, format: string): Compression | undefined {
  const option = checkCompressionOption(value, format, true);
  return option === 'none' ? undefined : (option as Compression);
}

export function compressionSuffix(compression: Compression | undefined): string {
  return compression ? WRITTEN_SUFFIX[compression] : '';
}

/** zlib's output pieces: larger than its 16 KiB default, so a stream is a few hundred awaits per 64 MiB, not thousands. */
const CHUNK_BYTES = 1 << 18;

export function decompressor(compression: Compression): Transform {
  if (compression === 'gzip') return zlib.createGunzip({ chunkSize: CHUNK_BYTES });
  if (compression === 'brotli') return zlib.createBrotliDecompress({ chunkSize: CHUNK_BYTES });
  return (zlib as unknown as ZstdCodecs).createZstdDecompress({ chunkSize: CHUNK_BYTES });
}

export function compressor(compression: Compression): Transform {
  // Level 6 gzip and brotli quality 5: near their best ratios for text at a fraction of the top levels' time.
  if (compression === 'gzip') return zlib.createGzip({ level: 6, chunkSize: CHUNK_BYTES });
  if (compression === 'brotli') return zlib.createBrotliCompress({ chunkSize: CHUNK_BYTES, params: { [zlib.constants.BROTLI_PARAM_QUALITY]: 5 } });
  return (zlib as unknown as ZstdCodecs).createZstdCompress({ chunkSize: CHUNK_BYTES });
}

/**
 * A rough ratio of text to its compressed size, for estimates made before reading (memory, a read
 * task's weight): text typically shrinks 4-10x.
 */
export const COMPRESSED_TEXT_RATIO = 5;
