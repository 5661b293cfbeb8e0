/**
 * Actors' concurrency groups: a group's calls wait only for calls of their group (each group with
 * its own limit), by method or by call; bad limits and unknown groups are refused by name.
 */
import { existsSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { InvalidArgumentError, get, init, kill, shutdown, wait } from '../../lib/index.js';
import { RemoteService } from './fixtures/concurrency-groups.js';
import { openGate, scratch, started, until } from './helpers.js';

const files = scratch();

beforeAll(async () => {
  await init({ numCpus: 2 });
});

afterAll(async () => {
  await shutdown();
  files.cleanup();
});

const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('concurrency groups', () => {
  it("runs a group's method beside a blocked call of the default group", async () => {
    const service = RemoteService.options({ concurrencyGroups: { control: 1 }, methods: { health: { concurrencyGroup: 'control' } } }).remote();
    const gate = files.path('default-gate');
    const blocked = service.blockOn.remote(gate);
    await until(() => started(gate), 'the blocking call to start');
    // In its own group, health answers while the default group's only slot is taken.
    expect(await get(service.health.remote())).toBe('ok');
    // A call in the default group still waits for the blocked one.
    const [ready] = await wait([service.served.remote()], { numReturns: 1, timeout: 300 });
    expect(ready).toHaveLength(0);
    openGate(gate);
    expect(await get(blocked)).toBe(1);
    kill(service);
  });

  it('without groups, the same call waits behind the blocked one (maxConcurrency 1)', async () => {
    const service = RemoteService.remote();
    const gate = files.path('plain-gate');
    const blocked = service.blockOn.remote(gate);
    await until(() => started(gate), 'the blocking call to start');
    const health = service.health.remote();
    const [ready] = await wait([health], { numReturns: 1, timeout: 300 });
    expect(ready).toHaveLength(0);
    openGate(gate);
    expect(await get([blocked, health])).toEqual([1, 'ok']);
    kill(service);
  });

  it('holds a group to its limit; a call can name its group itself', async () => {
    const service = RemoteService.options({ concurrencyGroups: { io: 2 } }).remote();
    const gates = [0, 1, 2].map((index) => files.path(`io-gate-${index}`));
    const calls = gates.map((gate) => service.blockOn.options({ concurrencyGroup: 'io' }).remote(gate));
    await until(() => started(gates[0]) && started(gates[1]), 'two io calls to start');
    // The third waits for a slot of its group; the default group is free meanwhile.
    await pause(200);
    expect(started(gates[2])).toBe(false);
    expect(await get(service.health.remote())).toBe('ok');
    openGate(gates[0]);
    await until(() => started(gates[2]), 'the third io call to start once one ended');
    openGate(gates[1]);
    openGate(gates[2]);
    expect((await get(calls)).sort()).toEqual([1, 2, 3]);
    expect(existsSync(`${gates[2]}.started`)).toBe(true);
    kill(service);
  });

  it('refuses bad limits and unknown groups by name', async () => {
    const refused = (make: () => unknown, message: RegExp) => {
      expect(make).toThrow(InvalidArgumentError);
      expect(make).toThrow(message);
    };
    refused(() => RemoteService.options({ maxConcurrency: 0 }).remote(), /actor Service maxConcurrency must be a whole number from 1 to 100000, got 0/);
    refused(() => RemoteService.options({ maxConcurrency: 1.5 }).remote(), /maxConcurrency must be a whole number/);
    refused(() => RemoteService.options({ concurrencyGroups: { io: 0 } }).remote(), /concurrency group 'io' must be a whole number from 1/);
    refused(() => RemoteService.options({ concurrencyGroups: { '': 1 } }).remote(), /a group name is empty/);
    refused(
      () => RemoteService.options({ concurrencyGroups: { io: 1 }, methods: { health: { concurrencyGroup: 'control' } } }).remote(),
      /actor Service method health: concurrency group "control" is not one of the actor's \(io\)/,
    );
    const service = RemoteService.remote();
    await expect(get(service.health.options({ concurrencyGroup: 'io' }).remote())).rejects.toThrow(/Service.health: concurrency group "io" is not one of the actor's \(it has none: see concurrencyGroups\)/);
    expect(await get(service.health.remote())).toBe('ok');
    kill(service);
  });
});
