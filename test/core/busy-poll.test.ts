/**
 * Busy-polling before the event loop sleeps (lib/core/busy-poll.ts, native/loop): its budget comes
 * from TRELLIS_BUSY_POLL_US or the host's cores, calls run the same with it on, and the native
 * prepare handle neither keeps a process alive nor outlives a worker thread's event loop.
 */
import { spawnSync } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { afterEach, describe, expect, it } from 'vitest';
import { get, init, shutdown } from '../../lib/index.js';
import { busyPollBudget, busyPollStats } from '../../lib/core/busy-poll.js';
import { busyPollOfWorker, sleepFor, square } from './fixtures/core.js';

const saved = process.env.TRELLIS_BUSY_POLL_US;
afterEach(async () => {
  await shutdown();
  if (saved === undefined) delete process.env.TRELLIS_BUSY_POLL_US;
  else process.env.TRELLIS_BUSY_POLL_US = saved;
});

describe('busy-polling', () => {
  it('takes its budget from TRELLIS_BUSY_POLL_US, else spins only on hosts with 8 cores or more', () => {
    process.env.TRELLIS_BUSY_POLL_US = '250';
    expect(busyPollBudget()).toBe(250);
    process.env.TRELLIS_BUSY_POLL_US = '0';
    expect(busyPollBudget()).toBe(0);
    const byCores = availableParallelism() >= 8 ? 100 : 0;
    for (const value of ['', 'fast', '-5']) {
      process.env.TRELLIS_BUSY_POLL_US = value;
      expect(busyPollBudget()).toBe(byCores);
    }
    delete process.env.TRELLIS_BUSY_POLL_US;
    expect(busyPollBudget()).toBe(byCores);
  });

  it('spins for replies in the driver and for the next task in workers, with the same results', async () => {
    process.env.TRELLIS_BUSY_POLL_US = '200';
    await init({ numCpus: 1, prestartWorkers: 1 });
    const before = busyPollStats().spins;
    for (let i = 0; i < 50; i++) expect(await get(square.remote(i))).toBe(i * i);
    const driver = busyPollStats();
    expect(driver.budgetMicros).toBe(200);
    expect(driver.spins - before).toBeGreaterThan(0);
    const worker = await get(busyPollOfWorker.remote());
    expect(worker.budgetMicros).toBe(200);
    expect(worker.spins).toBeGreaterThan(0);
  });

  it('stops spinning for a while where answers keep coming later than the budget', async () => {
    process.env.TRELLIS_BUSY_POLL_US = '50';
    await init({ numCpus: 1, prestartWorkers: 1 });
    await get(sleepFor.remote(0));
    const before = busyPollStats();
    for (let i = 0; i < 40; i++) await get(sleepFor.remote(3));
    const after = busyPollStats();
    // Each call arms a spin that misses (the answer comes 3 ms later): 8 misses in a row pause it
    // for the next 64 arms.
    expect(after.spins - before.spins).toBeLessThan(20);
  });

  it('never spins with a budget of 0', async () => {
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
