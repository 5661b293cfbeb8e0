/**
 * Where the file formats read and write: the local disk, or object storage named by a URL
 * (`s3://bucket/key`). A format asks `fileSystemFor(path)` and then speaks to one interface, so
 * every format (Parquet, Arrow, CSV, JSONL, text, binary) reads and writes both.
 */
import { createReadStream, openAsBlob } from 'node:fs';
import { mkdir, open, readFile, readdir, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { InvalidArgumentError } from '../../errors.js';

/** A file found by a listing: its full path (or URL) and size. */
export interface ListedFile {
  path: string;
  bytes: number;
}

/**
 * A file open for reads at any offset. Its shape is a subset of node's FileHandle, so that
 * apache-arrow's file reader takes it as it takes a local handle (`fd` is -1 for a remote one).
 */
export interface RandomAccessFile {
  readonly fd: number;
  stat(): Promise<{ size: number }>;
  read<T extends Uint8Array>(buffer: T, offset: number, length: number, position: number): Promise<{ bytesRead: number; buffer: T }>;
  close(): Promise<void>;
}

/** A file being written: what the format writers call. Nothing is visible under its name before close(). */
export interface WritableFile {
  write(data: string | Uint8Array): Promise<unknown>;
  /** Makes the bytes durable before close (fsync locally; object storage is durable once closed). */
  sync(): Promise<void>;
  close(): Promise<void>;
}

/** What parquet-wasm reads a file through: a Blob's size and ranged slices. */
export interface BlobLike {
  readonly size: number;
  slice(start?: number, end?: number): { arrayBuffer(): Promise<ArrayBuffer> };
  arrayBuffer(): Promise<ArrayBuffer>;
}

export interface FileSystem {
  /** 'local' or the URL scheme ('s3'). */
  readonly scheme: string;
  /** What is at `path`: a file with its size (and when it last changed), a directory (a prefix with objects below it), or nothing. */
  stat(path: string): Promise<{ kind: 'file'; bytes: number; modifiedMs?: number } | { kind: 'directory' } | { kind: 'missing' }>;
  /** Every file below `directory`, recursively, in no particular order. */
  listFiles(directory: string): Promise<ListedFile[]>;
  open(path: string): Promise<RandomAccessFile>;
  /** The file as a Blob whose slices are read on demand (a ranged request each on object storage). */
  openBlob(path: string): Promise<BlobLike>;
  /** A file's bytes from `start` to `end` (or its end), in chunks, in order (one request for object storage). */
  readStream(path: string, start?: number, end?: number): AsyncIterable<Uint8Array>;
  /**
   * A file to write at `path`. Locally it is written in place (callers write a temp file and
   * rename it); an object appears whole when the writer closes, never in part.
   */
  create(path: string): Promise<WritableFile & { abort(): Promise<void> }>;
  /** A whole file's bytes (a missing one rejects with code ENOENT or ERR_STORAGE_NOT_FOUND). */
  readFile(path: string): Promise<Uint8Array>;
  /** Writes a small file whole and durably: it appears at once with all its bytes, or not at all. */
  writeFileDurably(path: string, bytes: Uint8Array): Promise<void>;
  /** Writes a file only if none is there (false: one was), atomically: two racing writers, one wins. */
  createExclusive(path: string, bytes: Uint8Array): Promise<boolean>;
  /** Marks a file as changed now (its modifiedMs), leaving its bytes. */
  touch(path: string): Promise<void>;
  /** Moves a file (a copy and a delete on object storage). */
  rename(from: string, to: string): Promise<void>;
  /** Removes a file, or a directory with everything below it; nothing there is not an error. */
  remove(path: string): Promise<void>;
  /** Makes a directory and its parents (object storage has none to make). */
  makeDirectory(path: string): Promise<void>;
  /** Whether a file written, then renamed, is the way to make it appear whole (true locally). */
  readonly writesInPlace: boolean;
}

/** `s3://bucket/key` and other URLs: the scheme, or undefined for a local path. */
export function urlScheme(path: string): string | undefined {
  const match = /^([a-z][a-z0-9+.-]*):\/\//i.exec(path);
  if (!match) return undefined;
  return match[1].toLowerCase();
}

/**
 * Path operations that work on both kinds: a URL keeps its `scheme://` and never has its
 * segments resolved against the working directory.
 */
export const paths = {
  resolve(path: string): string {
    return urlScheme(path) ? path : resolve(path);
  },
  join(directory: string, ...names: string[]): string {
    if (!urlScheme(directory)) return join(directory, ...names);
    return [directory.replace(/\/+$/, ''), ...names.map((name) => name.replace(/^\/+|\/+$/g, ''))].filter((part) => part !== '').join('/');
  },
  dirname(path: string): string {
    if (!urlScheme(path)) return dirname(path);
    const trimmed = path.replace(/\/+$/, '');
    const cut = trimmed.lastIndexOf('/');
    return cut > trimmed.indexOf('://') + 2 ? trimmed.slice(0, cut) : trimmed;
  },
  basename(path: string): string {
    const trimmed = path.replace(/\/+$/, '');
    return trimmed.slice(trimmed.lastIndexOf('/') + 1);
  },
  /** `path` below `root`, with '/' between segments. */
  relative(root: string, path: string): string {
    const base = root.replace(/\/+$/, '');
    if (path === base) return '';
    return path.startsWith(`${base}/`) ? path.slice(base.length + 1) : path;
  },
};

class LocalFile implements RandomAccessFile {
  constructor(private readonly handle: Awaited<ReturnType<typeof open>>) {}
  get fd(): number {
    return this.handle.fd;
  }
  stat(): Promise<{ size: number }> {
    return this.handle.stat();
  }
  read<T extends Uint8Array>(buffer: T, offset: number, length: number, position: number): Promise<{ bytesRead: number; buffer: T }> {
    return this.handle.read(buffer, offset, length, position);
  }
  close(): Promise<void> {
    return this.handle.close();
  }
}

/** The local disk through node:fs. */
export class LocalFileSystem implements FileSystem {
  readonly scheme = 'local';
  readonly writesInPlace = true;

  async stat(path: string): Promise<{ kind: 'file'; bytes: number; modifiedMs?: number } | { kind: 'directory' } | { kind: 'missing' }> {
    try {
      const info = await stat(path);
      if (info.isDirectory()) return { kind: 'directory' };
      return { kind: 'file', bytes: info.size, modifiedMs: info.mtimeMs };
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return { kind: 'missing' };
      throw error;
    }
  }

  async listFiles(directory: string): Promise<ListedFile[]> {
    const found: ListedFile[] = [];
    const walk = async (current: string): Promise<void> => {
      for (const entry of await readdir(current, { withFileTypes: true })) {
        const path = join(current, entry.name);
        if (entry.isDirectory()) await walk(path);
        else if (entry.isFile()) found.push({ path, bytes: (await stat(path)).size });
      }
    };
    await walk(directory);
    return found;
  }

  async open(path: string): Promise<RandomAccessFile> {
    return new LocalFile(await open(path, 'r'));
  }

  openBlob(path: string): Promise<BlobLike> {
    return openAsBlob(path);
  }

  async *readStream(path: string, start = 0, end?: number): AsyncIterable<Uint8Array> {
    if (end !== undefined && end <= start) return;
    yield* createReadStream(path, { start, ...(end !== undefined ? { end: end - 1 } : {}), highWaterMark: 1 << 20 }) as AsyncIterable<Buffer>;
  }

  async create(path: string): Promise<WritableFile & { abort(): Promise<void> }> {
    const handle = await open(path, 'w');
    let closed = false;
    return {
      write: (data) => (typeof data === 'string' ? handle.write(data) : handle.write(data)),
      sync: () => handle.sync(),
      close: async () => {
        closed = true;
        await handle.close();
      },
      abort: async () => {
        if (!closed) await handle.close().catch(() => undefined);
        await rm(path, { force: true });
      },
    };
  }

  readFile(path: string): Promise<Uint8Array> {
    return readFile(path);
  }

  async writeFileDurably(path: string, bytes: Uint8Array): Promise<void> {
    // A temp file synced, then renamed: a reader sees the old file or the whole new one.
    const temp = join(dirname(path), `.${basename(path)}.${process.pid}.tmp`);
    const handle = await open(temp, 'w');
    try {
      await handle.writeFile(bytes);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temp, path);
  }

  async createExclusive(path: string, bytes: Uint8Array): Promise<boolean> {
    try {
      await writeFile(path, bytes, { flag: 'wx' });
      return true;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'EEXIST') return false;
      throw error;
    }
  }

  async touch(path: string): Promise<void> {
    const now = new Date();
    await utimes(path, now, now);
  }

  rename(from: string, to: string): Promise<void> {
    return rename(from, to);
  }

  remove(path: string): Promise<void> {
    return rm(path, { recursive: true, force: true });
  }

  async makeDirectory(path: string): Promise<void> {
    await mkdir(path, { recursive: true });
  }
}

/** Makes the file system of a URL scheme from its options (given, or read from the environment). */
export type FileSystemFactory = (options?: unknown) => FileSystem;

const local = new LocalFileSystem();
const factories = new Map<string, FileSystemFactory>();
const defaults = new Map<string, FileSystem>();

/** Lets `fileSystemFor` answer URLs of `scheme` (the S3 module registers 's3'). */
export function registerFileSystem(scheme: string, factory: FileSystemFactory): void {
  factories.set(scheme, factory);
  defaults.delete(scheme);
}

/**
 * The file system `path` lives on: `given` when the caller named one (it must serve the path's
 * scheme), else the local disk for a plain path, else the scheme's default (configured from the
 * environment, as AWS's tools are).
 */
export function fileSystemFor(path: string, given?: FileSystem): FileSystem {
  const scheme = urlScheme(path) ?? 'local';
  if (given) {
    if (given.scheme !== scheme) {
      throw new InvalidArgumentError(`path '${path}' is ${scheme === 'local' ? 'a local path' : `an ${scheme}:// URL`}, but the filesystem given is for ${given.scheme === 'local' ? 'local paths' : `${given.scheme}:// URLs`}`, 'ERR_DATA_PATH');
    }
    return given;
  }
  if (scheme === 'local') return local;
  let found = defaults.get(scheme);
  if (!found) {
    const factory = factories.get(scheme);
    if (!factory) throw new InvalidArgumentError(`path '${path}': no filesystem reads ${scheme}:// URLs (trellis reads local paths and s3:// URLs)`, 'ERR_DATA_PATH');
    found = factory();
    defaults.set(scheme, found);
  }
  return found;
}

/** Checks a `filesystem` option: a FileSystem or nothing. */
export function checkFileSystem(value: unknown, where: string): FileSystem | undefined {
  if (value === undefined) return undefined;
  const candidate = value as Partial<FileSystem>;
  if (typeof value !== 'object' || value === null || typeof candidate.scheme !== 'string' || typeof candidate.open !== 'function' || typeof candidate.listFiles !== 'function') {
    throw new InvalidArgumentError(`${where} option 'filesystem' must be a FileSystem (such as new S3FileSystem({ ... })), got ${value === null ? 'null' : typeof value}`);
  }
  return value as FileSystem;
}
