/**
 * Driver-worker connections (lib/core/connection.ts) over a ring in shared memory and a socket:
 * the native ring's whole-unit writes and wrap-around, and a connection to a real peer process
 * that delivers every batch in order, whichever way each went, rings a sleeping reader, and
 * leaves nothing behind when the peer exits right after writing; and the cluster, which gives its
 * workers rings where it busy-polls.
 */
import { spawn } from 'node:child_process';
import { createServer, type Server } from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { native } from '../../lib/native.js';
import { FrameConnection, connectionStats } from '../../lib/core/connection.js';
import type { AnyMessage } from '../../lib/core/protocol.js';
import { get, init, shutdown } from '../../lib/index.js';
import { connectionOfWorker, square } from './fixtures/core.js';

describe('connection ring (native)', () => {
  it('hands over units whole across the wrap, and says when there is no room', () => {
    const writer = native.ConnectionRing.create(4096);
    const reader = native.ConnectionRing.open(writer.fd);
    try {
      // The creator writes the first direction; the peer reads it.
      let seed = 7;
      const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
      let queued = 0;
      let next = 0;
      const expected: number[] = [];
      for (let round = 0; round < 2000; round++) {
        const size = 1 + Math.floor(random() * 1500);
        const unit = new Uint8Array(size).fill(next % 256);
        const result = writer.write(unit);
        if (queued + size > 4096) {
          expect(result).toBe(2);
        } else {
          expect(result === 0 || result === 1).toBe(true);
          expected.push(size);
          queued += size;
          next++;
        }
        if (random() < 0.4) {
          const taken = reader.take();
          expect(taken?.length ?? 0).toBe(queued);
          let offset = 0;
          for (let i = 0; i < expected.length; i++) {
            const value = (next - expected.length + i) % 256;
            const part = taken!.subarray(offset, offset + expected[i]);
            expect(part.every((byte) => byte === value)).toBe(true);
            offset += expected[i];
          }
          expected.length = 0;
          queued = 0;
        }
      }
      expect(reader.take()).toBeUndefined();
      expect(writer.capacity).toBe(4096);
      expect(reader.fd).toBe(-1);
    } finally {
      reader.close();
      writer.close();
    }
  });

  it('rings once for a reader that sleeps, and again each time it goes back to sleep', () => {
    const writer = native.ConnectionRing.create(4096);
    const reader = native.ConnectionRing.open(writer.fd);
    // A fresh ring's reader counts as sleeping: the first write rings, the next ones do not.
    expect(writer.write(new Uint8Array(8))).toBe(1);
    expect(writer.write(new Uint8Array(8))).toBe(0);
    expect(reader.take()?.length).toBe(16);
    // Its loop never slept meanwhile (so never marked it awake): going to sleep now must still
    // make the next write ring, the doorbell above having been read.
    expect(reader.markSleeping()).toBe(true);
    expect(writer.write(new Uint8Array(8))).toBe(1);
    // Bytes that came before it marks itself keep it awake; an awake reader is not rung.
    expect(reader.markSleeping()).toBe(false);
    expect(writer.write(new Uint8Array(8))).toBe(0);
    expect(reader.take()?.length).toBe(16);
    reader.markAwake();
    expect(writer.write(new Uint8Array(8))).toBe(0);
    writer.close();
    reader.close();
  });

  it('rejects bad capacities and descriptors with typed errors', () => {
    for (const capacity of [1000, 5000, 0, 1.5]) {
      expect(() => native.ConnectionRing.create(capacity)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
    }
    expect(() => native.ConnectionRing.open(987)).toThrow(expect.objectContaining({ code: 'ERR_SYSTEM' }));
    const ring = native.ConnectionRing.create(4096);
    ring.close();
    expect(() => ring.write(new Uint8Array(1))).toThrow(expect.objectContaining({ code: 'ERR_CHANNEL_CLOSED' }));
  });
});

describe('FrameConnection with a ring', () => {
  let server: Server | undefined;
  let directory: string | undefined;
  afterEach(() => {
    server?.close();
    if (directory) rmSync(directory, { recursive: true, force: true });
  });

  it('delivers every batch in order by ring and socket, rings a sleeping reader, and loses nothing at exit', async () => {
    directory = mkdtempSync(join(tmpdir(), 'trellis-connection-'));
    const socketPath = join(directory, 'socket');
    // A small ring, so that larger batches find it full and go by socket.
    const ring = native.ConnectionRing.create(64 * 1024);
    const before = { ...connectionStats };
    const count = 400;
    const received: Array<{ requestId: number; value: Uint8Array }> = [];
    const closed = new Promise<void>((resolve) => {
      server = createServer((socket) => {
        const connection = new FrameConnection<never, never>(
          socket,
          (message: { t: string; requestId: number; value: Uint8Array }) => {
            if (message.t === 'hello') connection.attachRing(ring);
            else received.push(message);
          },
          resolve,
        );
      });
    });
    await new Promise<void>((resolve) => server!.listen(socketPath, resolve));
    const fixture = new URL('./fixtures/connection-peer.ts', import.meta.url).pathname;
    const peer = spawn(process.execPath, ['--import', 'tsx', fixture, socketPath, String(count), '11'], {
      stdio: ['ignore', 'pipe', 'inherit', ring.fd],
    });
    let printed = '';
    peer.stdout!.on('data', (chunk: Buffer) => (printed += chunk.toString()));
    ring.closeFd();
    const exited = new Promise<number | null>((resolve) => peer.on('exit', resolve));
    await closed;
    expect(await exited).toBe(0);
    expect(received.map((message) => message.requestId)).toEqual(Array.from({ length: count + 1 }, (_, i) => i));
    for (const message of received.slice(0, count)) {
      expect(message.value.every((byte) => byte === message.requestId % 251)).toBe(true);
    }
    // Both ways were taken: the ring, and the socket for batches larger than its free room.
    const sent = JSON.parse(printed) as typeof connectionStats;
    expect(sent.ring + sent.rang).toBeGreaterThan(20);
    expect(sent.socket).toBeGreaterThan(10);
    // The peer paused between some batches while this process slept: those rang.
    expect(connectionStats.doorbells - before.doorbells).toBeGreaterThan(0);
  }, 60_000);
});

describe('rings in the cluster', () => {
  const saved = { ring: process.env.TRELLIS_CONNECTION_RING, busyPoll: process.env.TRELLIS_BUSY_POLL_US };
  afterEach(async () => {
    await shutdown();
    for (const [name, value] of [['TRELLIS_CONNECTION_RING', saved.ring], ['TRELLIS_BUSY_POLL_US', saved.busyPoll]] as const) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
  });

  const callsBy = async () => {
    const before = { ...connectionStats };
    for (let i = 0; i < 40; i++) expect(await get(square.remote(i))).toBe(i * i);
    const worker = await get(connectionOfWorker.remote());
    return {
      driverRing: connectionStats.ring + connectionStats.rang - before.ring - before.rang,
      driverSocket: connectionStats.socket - before.socket,
      workerRing: worker.ring + worker.rang,
      workerSocket: worker.socket,
    };
  };

  it('gives workers rings where the driver busy-polls, and calls go through them', async () => {
    delete process.env.TRELLIS_CONNECTION_RING;
    await init({ numCpus: 1, prestartWorkers: 1, busyPollMicros: 10_000 });
    const spinning = await callsBy();
    expect(spinning.driverRing).toBeGreaterThanOrEqual(40);
    expect(spinning.driverSocket).toBe(0);
    // The worker's hello went by socket; everything after by ring.
    expect(spinning.workerRing).toBeGreaterThanOrEqual(40);
    expect(spinning.workerSocket).toBe(1);
    await shutdown();
    await init({ numCpus: 1, prestartWorkers: 1, busyPollMicros: 0 });
    const sleeping = await callsBy();
    expect(sleeping.driverRing).toBe(0);
    expect(sleeping.workerRing).toBe(0);
  });

  it('follows TRELLIS_CONNECTION_RING: 1 gives rings to sleeping readers (rung), 0 none', async () => {
    process.env.TRELLIS_CONNECTION_RING = '1';
    await init({ numCpus: 1, prestartWorkers: 1, busyPollMicros: 0 });
    const rung = await callsBy();
    expect(rung.driverRing).toBeGreaterThanOrEqual(40);
    expect(rung.driverSocket).toBe(0);
    await shutdown();
    process.env.TRELLIS_CONNECTION_RING = '0';
    await init({ numCpus: 1, prestartWorkers: 1, busyPollMicros: 10_000 });
    const sockets = await callsBy();
    expect(sockets.driverRing).toBe(0);
    expect(sockets.driverSocket).toBeGreaterThanOrEqual(40);
  });
});

describe('bulk frames read straight into place', () => {
  /** Two FrameConnections over loopback TCP; the reader's bulkSink says where bulk bytes go. */
  type Test = AnyMessage & { t: string; n?: number; bulk?: Uint8Array };
  async function pair(sink: (message: Test) => { into: Uint8Array; valid(): boolean } | undefined) {
    const received: Test[] = [];
    let accepted!: (connection: FrameConnection<AnyMessage, AnyMessage>) => void;
    const writerReady = new Promise<FrameConnection<AnyMessage, AnyMessage>>((resolve) => (accepted = resolve));
    const server = createServer((socket) => accepted(new FrameConnection(socket, () => undefined, () => undefined)));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const { connect } = await import('node:net');
    const socket = connect({ host: '127.0.0.1', port: (server.address() as { port: number }).port });
    const reader = new FrameConnection<AnyMessage, AnyMessage>(socket, (message) => received.push(message as Test), () => undefined);
    reader.bulkSink = (message) => sink(message as Test);
    const writer = await writerReady;
    return { writer, reader, received, close: () => (writer.close(), reader.close(), server.close()) };
  }

  const until = async (condition: () => boolean) => {
    const deadline = Date.now() + 10_000;
    while (!condition()) {
      if (Date.now() > deadline) throw new Error('timed out');
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  };

  it('copies a large bulk frame into the memory its sink names, in order with the frames around it', async () => {
    const target = new Uint8Array(8 << 20);
    const { writer, received, close } = await pair((message) => ((message.t as string) === 'chunk' ? { into: target.subarray(1 << 20, 5 << 20), valid: () => true } : undefined));
    try {
      const bytes = new Uint8Array(4 << 20).map((_, index) => (index * 31) & 0xff);
      writer.send({ t: 'before', n: 1 } as Test);
      writer.sendBulk({ t: 'chunk', n: 2 } as Test, bytes);
      writer.sendBulk({ t: 'other', n: 3 } as Test, bytes.subarray(0, 300_000)); // no place: joined as usual
      writer.send({ t: 'after', n: 4 } as Test);
      await until(() => received.length === 4);
      expect(received.map((message) => message.n)).toEqual([1, 2, 3, 4]);
      const chunk = received[1].bulk!;
      expect(chunk.buffer).toBe(target.buffer);
      expect(chunk.byteOffset).toBe(1 << 20);
      expect(Buffer.compare(target.subarray(1 << 20, 5 << 20), bytes)).toBe(0);
      expect(target[0]).toBe(0);
      expect(target[5 << 20]).toBe(0);
      expect(Buffer.compare(received[2].bulk!, bytes.subarray(0, 300_000))).toBe(0);
    } finally {
      close();
    }
  });

  it('stops writing into a place that is no longer valid, and delivers the frame without its bytes', async () => {
    const target = new Uint8Array(32 << 20);
    let valid = true;
    const { writer, received, close } = await pair(() => {
      // The place goes away once the first bytes have landed (a store object aborted meanwhile).
      setImmediate(() => (valid = false));
      return { into: target, valid: () => valid };
    });
    try {
      writer.sendBulk({ t: 'chunk', n: 1 } as Test, new Uint8Array(32 << 20).fill(9));
      writer.send({ t: 'after', n: 2 } as Test);
      await until(() => received.length === 2);
      expect(received[0].bulk).toBeUndefined();
      expect(received[1].n).toBe(2);
      // What landed before the place went is the sender's; nothing after it.
      expect(target[target.length - 1]).toBe(0);
    } finally {
      close();
    }
  });
});
