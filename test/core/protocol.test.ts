import { describe, it, expect } from 'vitest';
import { decodeFrame, encodeFrame, type DoneMessage, type TaskMessage } from '../../lib/core/protocol.js';

/** Encodes then decodes, checking the length prefix on the way. */
function roundTrip<T>(message: T): T {
  const frame = encodeFrame(message as never);
  expect(frame.readUInt32LE(0)).toBe(frame.length - 4);
  return decodeFrame(frame.subarray(4)) as T;
}

const id = (digit: string) => digit.repeat(40);

describe('frames', () => {
  it('carries a task in the compact form, fields intact', () => {
    const task: TaskMessage = {
      t: 'task',
      taskId: id('a'),
      name: 'square',
      fn: { module: 'file:///tmp/ünïcode módule.ts', name: 'square' },
      args: Uint8Array.of(0x91, 0x07),
      resolved: {},
      returnId: id('b'),
      gpuIds: [],
    };
    const frame = encodeFrame(task);
    expect(frame[4]).toBeLessThan(0x10);
    const decoded = roundTrip(task);
    expect(decoded).toMatchObject({ t: 'task', taskId: task.taskId, name: 'square', fn: task.fn, returnId: task.returnId, resolved: {} });
    expect([...decoded.args]).toEqual([0x91, 0x07]);
    // An empty GPU list stays a list: a pooled task without GPUs must not inherit the last one's.
    expect(decoded.gpuIds).toEqual([]);
    expect(decoded.actorId).toBeUndefined();
  });

  it('carries actor calls with GPU ids, a transport and resolved arguments', () => {
    const big = new Uint8Array(200_000).map((_, i) => i & 0xff);
    const task: TaskMessage = {
      t: 'task',
      taskId: id('c'),
      name: 'Model.forward',
      actorId: 'actor-0123456789abcdef',
      method: 'forward',
      args: big,
      resolved: { [id('d')]: { inline: Uint8Array.of(1, 2, 3) }, [id('e')]: { node: 'node-0', id: id('e') } },
      returnId: id('f'),
      gpuIds: [0, 3],
      tensorTransport: 'nccl',
    };
    const decoded = roundTrip(task);
    expect(decoded).toMatchObject({ actorId: task.actorId, method: 'forward', gpuIds: [0, 3], tensorTransport: 'nccl', fn: undefined });
    expect(decoded.concurrencyGroup).toBeUndefined();
    expect(roundTrip({ ...task, concurrencyGroup: 'health' }).concurrencyGroup).toBe('health');
    expect(Buffer.compare(Buffer.from(decoded.args), Buffer.from(big))).toBe(0);
    expect([...(decoded.resolved[id('d')] as { inline: Uint8Array }).inline]).toEqual([1, 2, 3]);
    expect(decoded.resolved[id('e')]).toEqual({ node: 'node-0', id: id('e') });
  });

  it('carries inline results compactly and everything else as msgpack', () => {
    const done: DoneMessage = { t: 'done', taskId: id('1'), value: { inline: Uint8Array.of(0x2a) }, nested: [id('2'), id('3')] };
    expect(encodeFrame(done)[4]).toBeLessThan(0x10);
    const decoded = roundTrip(done);
    expect(decoded.taskId).toBe(done.taskId);
    expect(decoded.nested).toEqual(done.nested);
    expect([...(decoded.value as { inline: Uint8Array }).inline]).toEqual([0x2a]);
    expect(decoded.ran).toBeUndefined();
    // The worker's run time rides in the compact form; one past its range takes msgpack.
    expect(roundTrip({ ...done, ran: 1234 }).ran).toBe(1234);
    expect(roundTrip({ ...done, ran: 0 }).ran).toBe(0);
    const long = { ...done, ran: 2 ** 33 };
    expect(encodeFrame(long)[4]).toBeGreaterThanOrEqual(0x80);
    expect(roundTrip(long).ran).toBe(2 ** 33);

    const failed: DoneMessage = { t: 'done', taskId: id('4'), error: { name: 'RangeError', message: 'bad', code: 'E_X' } };
    expect(encodeFrame(failed)[4]).toBeGreaterThanOrEqual(0x80);
    expect(roundTrip(failed)).toEqual(failed);
    const stored: DoneMessage = { t: 'done', taskId: id('5'), value: { node: 'node-1', id: id('5') }, nested: [] };
    expect(roundTrip(stored)).toEqual(stored);
    const request = { t: 'request', requestId: 7, op: 'get', body: { ids: [id('6')], timeout: 10, returnTasks: [] } };
    expect(roundTrip(request)).toEqual(request);
  });

  it('falls back to msgpack for ids that are not short ASCII', () => {
    const task: TaskMessage = { t: 'task', taskId: 'tâsk', name: 'n', fn: { module: 'm', name: 'n' }, args: Uint8Array.of(0x90), resolved: {}, returnId: id('7') };
    const frame = encodeFrame(task);
    expect(frame[4]).toBeGreaterThanOrEqual(0x80);
    expect(roundTrip(task).taskId).toBe('tâsk');
  });
});
