import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { readdirSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createCollectiveGroup, get, init, kill, shutdown, state, CommunicatorError, TaskError, type ActorHandle, type DType } from '../../lib/index.js';
import { RemoteOpRank, inputFor, type OpRank, type OpSpec } from './fixtures/ops.js';
import { scriptArgs } from '../core/helpers.js';

const dtypes: DType[] = ['f32', 'f16', 'bf16', 'i8', 'u8', 'i32', 'i64'];

function inputs(size: number, spec: OpSpec): number[][] {
  return Array.from({ length: size }, (_, rank) => inputFor(rank, spec.length).map((v) => (spec.dtype === 'u8' ? Math.abs(v) : v)));
}

function reduce(columns: number[][], op: string): number[] {
  return columns[0].map((_, i) => {
    const values = columns.map((column) => column[i]);
    switch (op) {
      case 'prod': return values.reduce((a, b) => a * b, 1);
      case 'min': return Math.min(...values);
      case 'max': return Math.max(...values);
      case 'avg': return values.reduce((a, b) => a + b, 0) / values.length;
      default: return values.reduce((a, b) => a + b, 0);
    }
  });
}

/** What every rank should hold after `spec`, computed plainly. */
function expected(size: number, spec: OpSpec): number[][] {
  const all = inputs(size, spec);
  switch (spec.op) {
    case 'allreduce': return all.map(() => reduce(all, spec.reduce ?? 'sum'));
    case 'allgather': return all.map(() => all.flat());
    case 'reducescatter': {
      const total = reduce(all, spec.reduce ?? 'sum');
      const share = spec.length / size;
      return all.map((_, rank) => total.slice(rank * share, (rank + 1) * share));
    }
    case 'broadcast': return all.map(() => all[spec.root ?? 0]);
    case 'sendrecv': return all.map((_, rank) => all[(rank - 1 + size) % size]);
    default: return all.map((_, rank) => [rank]);
  }
}

/** Integer dtypes average by truncation, as NCCL does. */
function normalize(values: number[], dtype: DType, op?: string): number[] {
  if (op === 'avg' && !['f32', 'f16', 'bf16'].includes(dtype)) return values.map(Math.trunc);
  return values;
}

describe('CPU communicator across worker processes', () => {
  let ranks: Array<ActorHandle<OpRank>>;
  beforeAll(async () => {
    await init({ numCpus: 2 });
    ranks = Array.from({ length: 4 }, () => RemoteOpRank.remote());
  });
  afterAll(async () => {
    await shutdown();
  });

  for (const size of [2, 3, 4]) {
    it(`runs every operation on ${size} ranks, each dtype, checked against a plain computation`, async () => {
      const members = ranks.slice(0, size);
      const group = await createCollectiveGroup(members, { backend: 'cpu', name: `ops-${size}` });
      try {
        const specs: OpSpec[] = [];
        for (const dtype of dtypes) {
          specs.push({ op: 'allreduce', dtype, length: 37, reduce: 'sum' });
          specs.push({ op: 'allgather', dtype, length: 5 });
          specs.push({ op: 'reducescatter', dtype, length: size * 4, reduce: 'sum' });
          specs.push({ op: 'broadcast', dtype, length: 9, root: size - 1 });
          specs.push({ op: 'sendrecv', dtype, length: 13 });
        }
        for (const reduceOp of ['prod', 'min', 'max', 'avg'] as const) {
          specs.push({ op: 'allreduce', dtype: 'f32', length: 11, reduce: reduceOp });
          specs.push({ op: 'allreduce', dtype: 'i32', length: 11, reduce: reduceOp });
          specs.push({ op: 'reducescatter', dtype: 'f32', length: size * 3, reduce: reduceOp });
        }
        specs.push({ op: 'barrier', dtype: 'f32', length: 1 });
        for (const spec of specs) {
          const results = (await get(members.map((rank) => rank.run.remote(group.name, spec)))) as number[][];
          const want = expected(size, spec).map((values) => normalize(values, spec.dtype, spec.reduce));
          for (let rank = 0; rank < size; rank++) {
            const got = results[rank];
            expect(got.length, `${spec.op} ${spec.dtype} rank ${rank}`).toBe(want[rank].length);
            got.forEach((value, i) => expect(value, `${spec.op} ${spec.dtype} ${spec.reduce ?? ''} rank ${rank} [${i}]`).toBeCloseTo(want[rank][i], 1));
          }
        }
      } finally {
        await group.destroy();
      }
    });
  }

  it('moves tensors larger than one staging slot (chunked) intact', async () => {
    const members = ranks.slice(0, 3);
    const group = await createCollectiveGroup(members, { backend: 'cpu', name: 'large' });
    try {
      const length = 1_200_001; // 4.8 MB of f32 per rank: more than one 4 MiB slot
      for (const op of ['allreduce', 'sendrecv', 'broadcast'] as const) {
        const spec: OpSpec = { op, dtype: 'f32', length, root: 1 };
        const results = (await get(members.map((rank) => rank.run.remote(group.name, spec)))) as number[][];
        const want = expected(3, spec);
        for (let rank = 0; rank < 3; rank++) {
          for (const i of [0, 1, length >> 1, length - 2, length - 1]) expect(results[rank][i]).toBe(want[rank][i]);
        }
      }
    } finally {
      await group.destroy();
    }
  });

  it('pairs several sends to one peer in one group in order, whole (never one chunk of each)', async () => {
    const members = ranks.slice(0, 2);
    const group = await createCollectiveGroup(members, { backend: 'cpu', name: 'many' });
    try {
      // A tensor of three slots' chunks between small ones: each must arrive whole, in order.
      const lengths = [3_000_000, 3, 6, 1_100_000, 2];
      const [sent, wrong] = await get(members.map((rank) => rank.manyInOneGroup.remote(group.name, lengths, 8)));
      expect(sent).toEqual([]);
      expect(wrong).toEqual([]);
    } finally {
      await group.destroy();
    }
  });

  it('a dead peer fails the survivors with a typed error instead of hanging', async () => {
    const members = [RemoteOpRank.remote(), RemoteOpRank.remote()];
    const group = await createCollectiveGroup(members, { backend: 'cpu', name: 'dies', timeout: 30_000 });
    const waiting = members[0].stuck.remote(group.name);
    // Rank 1 never joins the allreduce: it dies.
    await new Promise((resolve) => setTimeout(resolve, 200));
    kill(members[1]);
    const error = await get(waiting).catch((e) => e);
    expect(error).toBeInstanceOf(TaskError);
    expect(error.cause.code).toBe('ERR_PEER_DIED');
    await group.destroy();
  });

  it('an operation its peers never join times out and aborts the group', async () => {
    const members = [RemoteOpRank.remote(), RemoteOpRank.remote()];
    const group = await createCollectiveGroup(members, { backend: 'cpu', name: 'slow', timeout: 300 });
    const error = await get(members[0].stuck.remote(group.name)).catch((e) => e);
    expect(error.cause.code).toBe('ERR_COMMUNICATOR_TIMEOUT');
    // Aborted for every rank: the other one fails at once too.
    const other = await get(members[1].stuck.remote(group.name)).catch((e) => e);
    expect(other.cause.code).toBe('ERR_COMMUNICATOR_ABORTED');
    expect(error.cause.name).toBe(CommunicatorError.name);
    await group.destroy();
  });

  it('rejects bad groups and leaves no segment behind', async () => {
    await expect(createCollectiveGroup([])).rejects.toThrow(/at least one actor/);
    await expect(createCollectiveGroup([ranks[0], ranks[0]])).rejects.toThrow(/twice/);
    await expect(createCollectiveGroup(ranks.slice(0, 2), { backend: 'mpi' as 'cpu' })).rejects.toThrow(/backend/);
    // Refused before any segment was made: none of this process's communicator segments remain.
    const leftovers = readdirSync('/dev/shm').filter((name) => name.startsWith(`trellis-${process.pid}-comm-`));
    expect(leftovers).toEqual([]);
  });
});

describe('CPU communicators at exit', () => {
  const script = fileURLToPath(new URL('./fixtures/exit-with-open-communicator.ts', import.meta.url));
  it.each(['idle', 'waiting'])('a process that exits with a communicator still open (%s) exits cleanly and at once', (mode) => {
    // 'waiting': its thread waits on a peer for up to 10 minutes; exit must interrupt it, not join it.
    const child = spawnSync(process.execPath, [...scriptArgs(script), mode], { encoding: 'utf8', timeout: 30_000 });
    expect({ status: child.status, signal: child.signal, stderr: child.stderr }).toEqual({ status: 0, signal: null, stderr: '' });
  });
});
