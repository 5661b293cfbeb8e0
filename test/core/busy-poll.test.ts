/**
 * Busy-polling before the event loop sleeps (lib/core/busy-poll.ts, native/loop): its cap comes
 * from TRELLIS_BUSY_POLL_US or the host's cores, the spin's length follows how long answers take,
 * calls run the same with it on, and the native handles neither keep a process alive nor outlive a
 * worker thread's event loop.
 */
import { spawnSync } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { afterEach, describe, expect, it } from 'vitest';
import { get, init, InvalidArgumentError, shutdown } from '../../lib/index.js';
import { busyPollCap, busyPollStats, configureBusyPoll } from '../../lib/core/busy-poll.js';
import { native } from '../../lib/native.js';
import { busyPollOfWorker, sleepFor, square } from './fixtures/core.js';

const saved = process.env.TRELLIS_BUSY_POLL_US;
afterEach(async () => {
  await shutdown();
  if (saved === undefined) delete process.env.TRELLIS_BUSY_POLL_US;
  else process.env.TRELLIS_BUSY_POLL_US = saved;
});

describe('busy-polling', () => {
  it('takes its cap from TRELLIS_BUSY_POLL_US, else spins only on hosts with 8 cores or more', () => {
    process.env.TRELLIS_BUSY_POLL_US = '250';
    expect(busyPollCap()).toBe(250);
    process.env.TRELLIS_BUSY_POLL_US = '0';
    expect(busyPollCap()).toBe(0);
    process.env.TRELLIS_BUSY_POLL_US = '1e9';
    expect(busyPollCap()).toBe(10_000);
    const byCores = availableParallelism() >= 8 ? 1000 : 0;
    for (const value of ['', 'fast', '-5']) {
      process.env.TRELLIS_BUSY_POLL_US = value;
      expect(busyPollCap()).toBe(byCores);
    }
    delete process.env.TRELLIS_BUSY_POLL_US;
    expect(busyPollCap()).toBe(byCores);
  });

  it('spins for replies in the driver and for the next task in workers, with the same results', async () => {
    // The largest cap: answers come well within it even on a loaded machine.
    process.env.TRELLIS_BUSY_POLL_US = '10000';
    await init({ numCpus: 1, prestartWorkers: 1 });
    const before = busyPollStats().spins;
    for (let i = 0; i < 50; i++) expect(await get(square.remote(i))).toBe(i * i);
    const driver = busyPollStats();
    expect(driver.capMicros).toBe(10_000);
    expect(driver.spins - before).toBeGreaterThan(0);
    const worker = await get(busyPollOfWorker.remote());
    expect(worker.capMicros).toBe(10_000);
    expect(worker.spins).toBeGreaterThan(0);
  });

  it('does not spin where answers come later than the cap', async () => {
    process.env.TRELLIS_BUSY_POLL_US = '50';
    await init({ numCpus: 1, prestartWorkers: 1 });
    await get(sleepFor.remote(0));
    const before = busyPollStats();
    for (let i = 0; i < 40; i++) await get(sleepFor.remote(3));
    const after = busyPollStats();
    // Each answer comes 3 ms after its call: once a few waits are learned, no arm spins.
    expect(after.spins - before.spins).toBeLessThan(8);
    expect(after.spinMicros).toBe(0);
  });

  it('spins about as long as recent answers took, and not at all when they take longer than the cap', () => {
    // The learner fed exact waits (a real wait, on a loaded host, can be descheduled past the cap):
    // each answer comes 2 ms after its call.
    configureBusyPoll(10_000);
    try {
      for (let i = 0; i < 16; i++) native.busyPoll.learn(2000);
      const learned = busyPollStats();
      // A quarter more than the typical wait, and 5 us.
      expect(learned.spinMicros).toBe(2505);
      // A few slow answers among quick ones do not move the 75th percentile.
      for (let i = 0; i < 3; i++) native.busyPoll.learn(50_000);
      expect(busyPollStats().spinMicros).toBe(2505);
      // Answers slower than the cap: spinning would only burn a core.
      for (let i = 0; i < 16; i++) native.busyPoll.learn(11_000);
      expect(busyPollStats().spinMicros).toBe(0);
    } finally {
      configureBusyPoll(0);
    }
  });

  it("takes init's busyPollMicros over the variable, in the driver and its workers, and rejects bad ones", async () => {
    process.env.TRELLIS_BUSY_POLL_US = '0';
    await init({ numCpus: 1, prestartWorkers: 1, busyPollMicros: 2500 });
    expect(busyPollStats().capMicros).toBe(2500);
    expect((await get(busyPollOfWorker.remote())).capMicros).toBe(2500);
    await shutdown();
    for (const bad of [-1, 20_000, Number.NaN, '100' as unknown as number]) {
      await expect(init({ busyPollMicros: bad })).rejects.toThrow(InvalidArgumentError);
    }
  });

  it('never spins with a cap of 0', async () => {
    process.env.TRELLIS_BUSY_POLL_US = '0';
    await init({ numCpus: 1, prestartWorkers: 1 });
    const before = busyPollStats().spins;
    for (let i = 0; i < 20; i++) await get(square.remote(i));
    expect(busyPollStats().spins).toBe(before);
    expect((await get(busyPollOfWorker.remote())).spins).toBe(0);
  });

  it('lets a process exit on its own, and a worker thread that loaded it end cleanly', () => {
    // The addon itself, in the process and in a worker thread (plain CommonJS: no loader there).
    const load = "const addon = require('node-gyp-build')(process.cwd()); addon.busyPoll.configure(500); addon.busyPoll.arm();";
    const script = `${load}
      const { Worker } = require('node:worker_threads');
      const worker = new Worker(${JSON.stringify(`${load} setTimeout(() => {}, 10);`)}, { eval: true });
      worker.on('exit', (exitCode) => console.log('thread exited', exitCode));`;
    const run = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 60_000, cwd: process.cwd() });
    expect(run.stderr).toBe('');
    expect(run.stdout.trim()).toBe('thread exited 0');
    expect(run.status).toBe(0);
  });
});
