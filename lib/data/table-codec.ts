/**
 * Registers with the runtime's serialization how an Arrow table travels (IPC stream bytes, read
 * back zero-copy), so that the core never imports apache-arrow itself: see TableCodec.
 */
import { Table, tableFromIPC, tableToIPC } from 'apache-arrow';
import { registerTableCodec } from '../core/serialization.js';

registerTableCodec({
  isTable: (value) => value instanceof Table,
  encode: (table) => tableToIPC(table as Table, 'stream'),
  decode: (bytes) => tableFromIPC(bytes),
});
