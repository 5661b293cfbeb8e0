import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { ChannelReader, ChannelWriter, SpinPolicy, createChannel, destroyChannel, encodeMessage, decodeMessage, type Message } from '../../lib/dag/channel.js';
import { scriptArgs } from '../core/helpers.js';

describe('channel ends', () => {
  const opened: Array<{ name: string; ends: Array<ChannelReader | ChannelWriter> }> = [];
  const open = (slots = 4, slotBytes = 1 << 16) => {
    const name = createChannel(slots, 1, slotBytes);
    const writer = new ChannelWriter(name);
    const reader = new ChannelReader(name, 0);
    opened.push({ name, ends: [writer, reader] });
    return { writer, reader };
  };
  afterEach(() => {
    for (const { name, ends } of opened.splice(0)) {
      for (const end of ends) end.release();
      destroyChannel(name);
    }
  });

  const values: unknown[] = [
    0, -1, 2 ** 40, 1.5, NaN, true, null, undefined, '', 'text', 'é'.repeat(3000), 'x'.repeat(10_000),
    [], [1, 'two', null], Array.from({ length: 40 }, (_, i) => i), { a: 1, b: [2, { c: 3 }] },
    new Map<unknown, unknown>([[1, 'one'], ['k', [2]]]), new Set([1, 2]), new Date(5), Float64Array.of(1, 2, 3),
    new Uint8Array(5000).fill(7),
  ];

  it('carries every kind of value, small ones through the reader inbox and large ones beside it', () => {
    const { writer, reader } = open();
    for (const value of values) {
      expect(writer.write({ ok: true, value })).toBeUndefined();
      const message = reader.read() as Message;
      expect(message).toEqual({ ok: true, value });
    }
    const error = { name: 'RangeError', message: 'bad', code: 'ERR_X', stack: 'at here' };
    writer.write({ ok: false, error });
    expect(reader.read()).toEqual({ ok: false, error });
  });

  it('binary values read from the inbox stay intact when later messages overwrite it', () => {
    const { writer, reader } = open();
    // The codec decodes a Buffer as a view of its input.
    writer.write({ ok: true, value: Buffer.from([1, 2, 3]) });
    const first = reader.read() as { ok: true; value: Buffer };
    for (let i = 0; i < 10; i++) {
      writer.write({ ok: true, value: { bytes: Buffer.alloc(64, 200 + i) } });
      reader.read();
    }
    expect([...first.value]).toEqual([1, 2, 3]);
  });

  it('plain messages (scalars and flat lists) encode without the rich codec and decode the same', () => {
    for (const value of [1, 'a', [1, 'b', true, null], null]) {
      const bytes = encodeMessage({ ok: true, value });
      expect(bytes[1]).toBe(2);
      expect(decodeMessage(bytes)).toEqual({ ok: true, value });
    }
    expect(encodeMessage({ ok: true, value: [{ a: 1 }] })[1]).toBe(0);
  });

  it('reads synchronously what is there or comes within the first wait; a timeout and a close reject', async () => {
    const { writer, reader } = open();
    writer.write({ ok: true, value: 1 });
    expect(reader.read()).toEqual({ ok: true, value: 1 });
    await expect(Promise.resolve(reader.read(30))).rejects.toMatchObject({ code: 'ERR_CHANNEL_TIMEOUT' });
    const pending = reader.read();
    expect(pending).toBeInstanceOf(Promise);
    setTimeout(() => writer.close(), 20);
    await expect(pending).rejects.toMatchObject({ code: 'ERR_CHANNEL_CLOSED' });
  });

  it('keeps order and backpressure through a full ring', async () => {
    const { writer, reader } = open(2);
    expect(writer.write({ ok: true, value: 0 })).toBeUndefined();
    expect(writer.write({ ok: true, value: 1 })).toBeUndefined();
    const third = writer.write({ ok: true, value: 2 });
    expect(third).toBeInstanceOf(Promise);
    expect(reader.read()).toEqual({ ok: true, value: 0 });
    await third;
    expect(reader.read()).toEqual({ ok: true, value: 1 });
    expect(reader.read()).toEqual({ ok: true, value: 2 });
  });
});

describe('channel ends at exit', () => {
  it('a process that ends with channel ends still open (one has used its thread) exits cleanly', () => {
    const script = fileURLToPath(new URL('./fixtures/exit-with-open-ends.ts', import.meta.url));
    const child = spawnSync(process.execPath, [...scriptArgs(script)], { encoding: 'utf8', timeout: 30_000 });
    // Node aborted (134) when it tore the ends' thread-safe functions down before finalizing the
    // ends; each end's executor now stops itself in an environment cleanup hook first.
    expect({ status: child.status, signal: child.signal }).toEqual({ status: 0, signal: null });
  });
});

describe('spin policy', () => {
  it('spins while messages come soon and its spins find them', () => {
    const policy = new SpinPolicy();
    for (let i = 0; i < 20; i++) {
      const spun = policy.spinMicros();
      expect(spun).toBeGreaterThan(0);
      policy.record(spun, 3, 3);
    }
  });

  it('stops spinning when messages come late, and starts again when they come soon', () => {
    const policy = new SpinPolicy();
    for (let i = 0; i < 20; i++) policy.record(0, 2000, 2000);
    expect(policy.spinMicros()).toBe(0);
    for (let i = 0; i < 20; i++) policy.record(0, 3, 3);
    expect(policy.spinMicros()).toBeGreaterThan(0);
  });

  it('pauses the spin after misses in a row (a writer starved of CPU), then tries again', () => {
    const policy = new SpinPolicy();
    let spins = 0;
    for (let i = 0; i < 4; i++) {
      const spun = policy.spinMicros();
      if (spun > 0) spins++;
      // The message came after the spin, but soon enough that waits stay short.
      policy.record(spun, spun + 40, spun + 40);
    }
    expect(spins).toBe(4);
    let paused = 0;
    for (let i = 0; i < 200 && policy.spinMicros() === 0; i++) paused++;
    expect(paused).toBeGreaterThan(10);
    expect(paused).toBeLessThan(200);
  });

  it('pauses longer each time misses recur, and shorter again after a run of hits', () => {
    const policy = new SpinPolicy();
    const pauseAfterMisses = () => {
      for (let misses = 0; misses < 4; ) {
        const spun = policy.spinMicros();
        if (spun > 0) misses++;
        policy.record(spun, spun + 40, spun + 40);
      }
      let paused = 0;
      while (policy.spinMicros() === 0) paused++;
      return paused;
    };
    const first = pauseAfterMisses();
    const second = pauseAfterMisses();
    expect(second).toBe(2 * first);
    for (let i = 0; i < 40; i++) policy.record(policy.spinMicros() || 50, 3, 3);
    expect(pauseAfterMisses()).toBe(first);
  });
});
