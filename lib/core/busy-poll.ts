/**
 * How long a process spins for an expected reply before its event loop sleeps. Waking a sleeping
 * process costs each hop of a call tens of microseconds (about 130 µs over a call's two hops on
 * the 16-core GPU host); spinning for a moment after a send catches a quick answer awake. It pays
 * only where cores are spare: on two cores the spinning process takes the CPU its peer needs
 * (an empty call went from 106 to 345 µs), so the default is off below 8 cores.
 * TRELLIS_BUSY_POLL_US sets the budget for the driver and its workers (0: off).
 */
import { availableParallelism } from 'node:os';
import { native } from '../native.js';

/** Spin budget where the host has cores to spare. */
const DEFAULT_BUDGET_US = 100;
const MIN_CORES = 8;

export function busyPollBudget(): number {
  const chosen = process.env.TRELLIS_BUSY_POLL_US;
  if (chosen !== undefined && chosen !== '') {
    const value = Number(chosen);
    if (Number.isFinite(value) && value >= 0) return Math.min(value, 10_000);
  }
  return availableParallelism() >= MIN_CORES ? DEFAULT_BUDGET_US : 0;
}

let armed = false;

/** Reads the budget once per process; a budget of 0 leaves arm() a no-op. */
export function configureBusyPoll(): void {
  const budget = busyPollBudget();
  native.busyPoll.configure(budget);
  armed = budget > 0;
}

/** A message that expects an answer just left: spin for it before the loop next sleeps. */
export function expectReply(): void {
  if (armed) native.busyPoll.arm();
}

export function busyPollStats(): ReturnType<typeof native.busyPoll.stats> {
  return native.busyPoll.stats();
}
