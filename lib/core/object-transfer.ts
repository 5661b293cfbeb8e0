/**
 * Moves one sealed object from a store to another in chunks: read from the source, written into
 * the target as they come, a bounded number in flight (so a transfer's memory is a few chunks,
 * whatever the object's size). Either end may be a store mapped here or a node agent's store.
 */
import type { ObjectStore, ObjectBuilder, ObjectView } from '../store/object-store.js';

/** An open object to read from. */
export interface ObjectReader {
  readonly size: number;
  readonly metadata: Uint8Array | undefined;
  read(offset: number, length: number): Uint8Array | Promise<Uint8Array>;
  close(): void;
}

/** A created object being filled. */
export interface ObjectWriter {
  write(offset: number, bytes: Uint8Array): void | Promise<void>;
  seal(): void | Promise<void>;
  abort(): void;
}

export interface ObjectSource {
  open(id: string): ObjectReader | Promise<ObjectReader>;
}

export interface ObjectTarget {
  create(id: string, size: number, metadata: Uint8Array | undefined): ObjectWriter | Promise<ObjectWriter>;
}

export interface TransferOptions {
  /** Bytes per chunk (default 4 MiB). */
  chunkBytes?: number;
  /** Chunks read or being written at once (default 4). */
  window?: number;
}

/** Copies `id` from `source` to `target`; resolves with its size once sealed there. */
export async function transferObject(source: ObjectSource, target: ObjectTarget, id: string, options: TransferOptions = {}): Promise<number> {
  const chunkBytes = options.chunkBytes ?? 4 * 1024 * 1024;
  const window = options.window ?? 4;
  const reader = await source.open(id);
  try {
    const writer = await target.create(id, reader.size, reader.metadata);
    try {
      let next = 0;
      // Each lane reads a chunk, writes it, then takes the next: `window` chunks are in flight.
      const lane = async () => {
        while (next < reader.size) {
          const offset = next;
          const length = Math.min(chunkBytes, reader.size - offset);
          next += length;
          const bytes = await reader.read(offset, length);
          if (bytes.byteLength !== length) throw new Error(`object ${id}: read ${bytes.byteLength} bytes at ${offset}, expected ${length}`);
          await writer.write(offset, bytes);
        }
      };
      await Promise.all(Array.from({ length: Math.max(1, Math.min(window, Math.ceil(reader.size / chunkBytes))) }, lane));
      await writer.seal();
    } catch (error) {
      writer.abort();
      throw error;
    }
  } finally {
    reader.close();
  }
  return reader.size;
}

/** Reads from a store mapped in this process (its pinned view, without copying). */
export function storeSource(store: ObjectStore): ObjectSource {
  return {
    open(id) {
      const view: ObjectView | undefined = store.getIfSealed(id);
      if (!view) throw new Error(`object ${id} is not in store ${store.name}`);
      return {
        size: view.size,
        metadata: view.metadata ?? undefined,
        read: (offset, length) => view.data.subarray(offset, offset + length),
        close: () => view.release(),
      };
    },
  };
}

/** Writes into a store mapped in this process. */
export function storeTarget(store: ObjectStore): ObjectTarget {
  return {
    create(id, size, metadata) {
      const builder: ObjectBuilder = store.create(id, size, { metadata });
      return {
        write: (offset, bytes) => builder.write(bytes, offset),
        seal: () => builder.seal(),
        abort: () => builder.abort(),
      };
    },
  };
}
