/**
 * How long a process spins for an expected reply before its event loop sleeps. Waking a sleeping
 * process costs each hop of a call tens of microseconds (about 130 µs over a call's two hops on
 * the 16-core GPU host); spinning after a send catches a quick answer awake. The spin's length is
 * learned from how long recent answers took (native/loop/busy_poll.cc), up to a cap: answers that
 * usually come later than the cap are not spun for. It pays only where cores are spare: on two
 * cores the spinning process takes the CPU its peer needs (an empty call went from 106 to 345 µs),
 * so the default is off below 8 cores. TRELLIS_BUSY_POLL_US sets the cap for the driver and its
 * workers (0: off).
 */
import { availableParallelism } from 'node:os';
import { native } from '../native.js';
import { environmentNumber } from './settings.js';

/** The cap where the host has cores to spare: replies of an actor call with a GPU tensor took
 * 0.3-0.7 ms on the GPU host, a task's a tenth of that; longer waits are not worth a core. */
const DEFAULT_CAP_US = 1000;
const MIN_CORES = 8;
/** The largest cap accepted. */
export const MAX_BUSY_POLL_US = 10_000;

export function busyPollCap(): number {
  return environmentNumber('TRELLIS_BUSY_POLL_US', MAX_BUSY_POLL_US) ?? (availableParallelism() >= MIN_CORES ? DEFAULT_CAP_US : 0);
}

let armed = false;

/** Sets the cap once per process (`chosen`, else busyPollCap()); a cap of 0 leaves arm() a no-op. */
export function configureBusyPoll(chosen?: number): void {
  const cap = chosen ?? busyPollCap();
  native.busyPoll.configure(cap);
  armed = cap > 0;
}

/**
 * What a connection tells busy-polling: a message left (an answer is expected: spin for it before
 * the loop next sleeps) and data arrived (the answer: how long it took sets later spins).
 */
export const busyPollTraffic = {
  sent(): void {
    if (armed) native.busyPoll.arm();
  },
  received(): void {
    if (armed) native.busyPoll.answered();
  },
};

/** Whether this process spins before its loop sleeps (a cap above 0 was configured). */
export function busyPolling(): boolean {
  return armed;
}

export function busyPollStats(): ReturnType<typeof native.busyPoll.stats> {
  return native.busyPoll.stats();
}
