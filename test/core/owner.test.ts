/**
 * The driver owns every object, so an object's owner dies only when the driver does: a worker
 * whose driver went away fails what it waits on with OwnerDiedError, and exits.
 */
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { OwnerDiedError } from '../../lib/index.js';
import { DriverRequests } from '../../lib/core/requests.js';
import type { RequestMessage } from '../../lib/core/protocol.js';
import { rejection, scratch, started, scriptArgs, until } from './helpers.js';

const files = scratch();
afterAll(() => files.cleanup());

describe('a worker’s requests to its driver', () => {
  it('settle by reply, and fail with OwnerDiedError once the driver is gone', async () => {
    const sent: RequestMessage[] = [];
    const requests = new DriverRequests((message) => sent.push(message));
    const answered = requests.request('get-actor', { name: 'a' });
    const pendingGet = requests.request('get', { ids: ['a'.repeat(40), 'b'.repeat(40)], timeout: Infinity, returnTasks: [] });
    const pendingWait = requests.request('wait', { ids: ['c'.repeat(40)], numReturns: 1, timeout: Infinity });
    expect(sent.map((message) => [message.op, message.requestId])).toEqual([['get-actor', 1], ['get', 2], ['wait', 3]]);
    requests.settle(1, true, { actorId: 'actor-1' });
    expect(await answered).toEqual({ actorId: 'actor-1' });

    requests.ownerDied();
    const getError = await rejection(pendingGet);
    expect(getError).toBeInstanceOf(OwnerDiedError);
    expect(getError.code).toBe('ERR_OWNER_DIED');
    expect(getError.objectIds).toEqual(['a'.repeat(40), 'b'.repeat(40)]);
    expect(getError.message).toContain('the driver, which owns every object, is gone');
    expect((await rejection(pendingWait)).objectIds).toEqual(['c'.repeat(40)]);
    expect(requests.size).toBe(0);

    // Asked afterwards: failed at once, nothing sent; a late reply changes nothing.
    const late = await rejection(requests.request('get', { ids: ['d'.repeat(40)] }));
    expect(late).toBeInstanceOf(OwnerDiedError);
    requests.notify('cancel', { id: 'd'.repeat(40) });
    requests.settle(2, true, []);
    expect(sent).toHaveLength(3);
  });

  it('turn an error reply into an error with its name and code', async () => {
    const requests = new DriverRequests(() => {});
    const pending = requests.request('get-actor', { name: 'missing' });
    requests.settle(1, false, undefined, { name: 'ActorDiedError', message: 'no live actor', code: 'ERR_ACTOR_DIED' });
    const error = await rejection(pending);
    expect(error).toMatchObject({ name: 'ActorDiedError', message: 'no live actor', code: 'ERR_ACTOR_DIED' });
  });
});

/** Gone: no such process, or a zombie nobody has reaped yet. */
function gone(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].startsWith('Z');
  } catch {
    return true;
  }
}

/** What a killed driver leaves: its segments, its socket and spill directories. */
function removeLeftovers(pid: number): void {
  for (const dir of ['/dev/shm', tmpdir()]) {
    for (const name of readdirSync(dir)) {
      if (name.startsWith(`trellis-${pid}-`)) rmSync(join(dir, name), { recursive: true, force: true });
    }
  }
}

describe('when the driver dies', () => {
  it('a worker’s pending get fails with OwnerDiedError, and the worker exits', async () => {
    const marker = files.path('owner');
    const script = fileURLToPath(new URL('./fixtures/owner-driver.ts', import.meta.url));
    const driver = spawn(process.execPath, [...scriptArgs(script), marker], { stdio: ['ignore', 'pipe', 'inherit'] });
    let output = '';
    driver.stdout.on('data', (chunk: Buffer) => (output += chunk));
    try {
      await until(() => started(marker) && output.includes('\n'), 'the worker to begin its get');
      const { pending } = JSON.parse(output.trim().split('\n')[0]);
      const workerPid = Number(readFileSync(`${marker}.started`, 'utf8'));
      driver.kill('SIGKILL');
      await until(() => existsSync(marker), 'the orphaned worker to record how its get ended');
      expect(JSON.parse(readFileSync(marker, 'utf8'))).toEqual({
        name: 'OwnerDiedError',
        code: 'ERR_OWNER_DIED',
        objectIds: [pending],
        isOwnerDiedError: true,
      });
      await until(() => gone(workerPid), 'the orphaned worker to exit');
    } finally {
      driver.kill('SIGKILL');
      removeLeftovers(driver.pid!);
    }
  });
});
