/**
 * Tar archives as WebDataset shards use them: entries read one after another from a stream (no
 * seeking, so a shard on object storage is one GET), and written as ustar headers with a PAX
 * record for names longer than ustar holds. Reads ustar, PAX ('x') and GNU long names ('L'), the
 * forms GNU tar, bsdtar and Python's tarfile write; other entry kinds (directories, links) are
 * passed over.
 */
import { parseError } from './files.js';

const BLOCK = 512;

export interface TarEntry {
  name: string;
  bytes: Uint8Array;
}

/** Reads exact byte counts from a stream of chunks. */
class ByteReader {
  readonly #chunks: AsyncIterator<Uint8Array>;
  #pending: Buffer[] = [];
  #available = 0;
  offset = 0;

  constructor(chunks: AsyncIterable<Uint8Array>) {
    this.#chunks = chunks[Symbol.asyncIterator]();
  }

  /** `length` bytes, or null at the stream's end before any of them; a stream that ends midway is an error. */
  async read(length: number, where: string): Promise<Buffer | null> {
    while (this.#available < length) {
      const next = await this.#chunks.next();
      if (next.done) {
        if (this.#available === 0) return null;
        throw parseError(`${where}: the archive ends in the middle of an entry (at byte ${this.offset + this.#available})`);
      }
      // Copied: a stream may hand out a buffer it reuses for its next chunk.
      const chunk = Buffer.from(next.value);
      this.#pending.push(chunk);
      this.#available += chunk.length;
    }
    const whole = this.#pending.length === 1 ? this.#pending[0] : Buffer.concat(this.#pending, this.#available);
    const taken = whole.subarray(0, length);
    const rest = whole.subarray(length);
    this.#pending = rest.length > 0 ? [rest] : [];
    this.#available = rest.length;
    this.offset += length;
    return taken;
  }

  async close(): Promise<void> {
    await this.#chunks.return?.();
  }
}

const text = (header: Buffer, start: number, length: number): string => {
  const field = header.subarray(start, start + length);
  const end = field.indexOf(0);
  return field.subarray(0, end < 0 ? field.length : end).toString('utf8');
};

/** A numeric field: octal text, or base-256 (high bit set) for values octal cannot hold. */
function number(header: Buffer, start: number, length: number): number {
  if (header[start] & 0x80) {
    let value = header[start] & 0x7f;
    for (let index = start + 1; index < start + length; index++) value = value * 256 + header[index];
    return value;
  }
  const digits = text(header, start, length).trim();
  return digits === '' ? 0 : parseInt(digits, 8);
}

/** PAX records: `<length> <key>=<value>\n`, the length counting the whole record. */
function paxRecords(data: Buffer): Map<string, string> {
  const records = new Map<string, string>();
  let at = 0;
  while (at < data.length) {
    const space = data.indexOf(0x20, at);
    if (space < 0) break;
    const length = Number(data.subarray(at, space).toString('latin1'));
    if (!Number.isInteger(length) || length <= 0) break;
    const record = data.subarray(space + 1, at + length - 1).toString('utf8');
    const equals = record.indexOf('=');
    if (equals > 0) records.set(record.slice(0, equals), record.slice(equals + 1));
    at += length;
  }
  return records;
}

/** The regular files of a tar archive, in order. `where` names the archive in errors. */
export async function* tarEntries(chunks: AsyncIterable<Uint8Array>, where: string): AsyncGenerator<TarEntry> {
  const reader = new ByteReader(chunks);
  let longName: string | undefined;
  let pax = new Map<string, string>();
  try {
    for (;;) {
      const at = reader.offset;
      const header = await reader.read(BLOCK, where);
      if (!header || header.every((byte) => byte === 0)) return;
      let sum = 0;
      for (let index = 0; index < BLOCK; index++) sum += index >= 148 && index < 156 ? 0x20 : header[index];
      if (sum !== number(header, 148, 8)) throw parseError(`${where}: not a tar archive (the header at byte ${at} fails its checksum)`);
      const type = String.fromCharCode(header[156] || 0x30);
      const size = pax.has('size') ? Number(pax.get('size')) : number(header, 124, 12);
      const data = (await reader.read(size, where)) ?? Buffer.alloc(0);
      const padding = (BLOCK - (size % BLOCK)) % BLOCK;
      if (padding > 0) await reader.read(padding, where);
      if (type === 'x') {
        pax = paxRecords(data);
        continue;
      }
      if (type === 'L') {
        longName = text(data, 0, data.length);
        continue;
      }
      if (type === 'g' || type === 'K') continue;
      const prefix = header.subarray(257, 262).toString('latin1') === 'ustar' ? text(header, 345, 155) : '';
      const name = pax.get('path') ?? longName ?? (prefix ? `${prefix}/${text(header, 0, 100)}` : text(header, 0, 100));
      longName = undefined;
      pax = new Map();
      // Regular files only ('0', '7', or the old '\0'): directories and links hold no sample data.
      if (type === '0' || type === '7') yield { name, bytes: data };
    }
  } finally {
    await reader.close();
  }
}

function header(name: Buffer, size: number, type: string): Buffer {
  const block = Buffer.alloc(BLOCK);
  name.copy(block, 0, 0, Math.min(100, name.length));
  block.write('0000644\0', 100, 'latin1');
  block.write('0000000\0', 108, 'latin1');
  block.write('0000000\0', 116, 'latin1');
  block.write(`${size.toString(8).padStart(11, '0')}\0`, 124, 'latin1');
  block.write(`${Math.floor(Date.now() / 1000).toString(8).padStart(11, '0')}\0`, 136, 'latin1');
  block.write(type, 156, 'latin1');
  block.write('ustar\0', 257, 'latin1');
  block.write('00', 263, 'latin1');
  block.fill(0x20, 148, 156);
  let sum = 0;
  for (const byte of block) sum += byte;
  block.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'latin1');
  return block;
}

const padding = (size: number): Buffer => Buffer.alloc((BLOCK - (size % BLOCK)) % BLOCK);

/** A PAX record whose length prefix counts itself. */
function paxRecord(key: string, value: string): string {
  const body = ` ${key}=${value}\n`;
  let length = Buffer.byteLength(body) + 1;
  while (String(length).length + Buffer.byteLength(body) !== length) length = String(length).length + Buffer.byteLength(body);
  return `${length}${body}`;
}

/** One regular file as tar blocks: a PAX header first when its name does not fit ustar's 100 bytes. */
export function tarEntry(name: string, bytes: Uint8Array): Buffer[] {
  const encoded = Buffer.from(name, 'utf8');
  const blocks: Buffer[] = [];
  if (encoded.length > 100) {
    const records = Buffer.from(paxRecord('path', name), 'utf8');
    blocks.push(header(Buffer.from('PaxHeader'), records.length, 'x'), records, padding(records.length));
  }
  blocks.push(header(encoded, bytes.byteLength, '0'), Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength), padding(bytes.byteLength));
  return blocks;
}

/** The two zero blocks that end an archive. */
export const TAR_END = Buffer.alloc(2 * BLOCK);
