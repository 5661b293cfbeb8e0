/**
 * Moves one sealed object from a store to another in chunks: read from the source, written into
 * the target as they come, a bounded number in flight (so a transfer's memory is a few chunks,
 * whatever the object's size). Either end may be a store mapped here or a node agent's store.
 */
import type { ObjectStore, ObjectBuilder, ObjectView } from '../store/object-store.js';
import type { BulkPlace } from './connection.js';

/** An open object to read from. */
export interface ObjectReader {
  readonly size: number;
  readonly metadata: Uint8Array | undefined;
  /** `place`: where the bytes may be read straight into; the result is then that memory. */
  read(offset: number, length: number, place?: BulkPlace): Uint8Array | Promise<Uint8Array>;
  close(): void;
}

/** A created object being filled. */
export interface ObjectWriter {
  write(offset: number, bytes: Uint8Array): void | Promise<void>;
  /** The object's own memory for these bytes, where a reader may put them straight. */
  place?(offset: number, length: number): BulkPlace | undefined;
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
          const bytes = await reader.read(offset, length, writer.place?.(offset, length));
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
      let open = true;
      return {
        write: (offset, bytes) => {
          if (!isPlaced(builder, bytes, offset)) builder.write(bytes, offset);
        },
        place: (offset, length) => ({ into: builder.data.subarray(offset, offset + length), valid: () => open }),
        seal: () => {
          open = false;
          builder.seal();
        },
        abort: () => {
          open = false;
          builder.abort();
        },
      };
    },
  };
}

/** True where `bytes` already are the object's own memory at `offset` (read straight there). */
export function isPlaced(builder: ObjectBuilder, bytes: Uint8Array, offset: number): boolean {
  const data = builder.data;
  return bytes.buffer === data.buffer && bytes.byteOffset === data.byteOffset + offset;
}
