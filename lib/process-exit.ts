/**
 * What a driver leaves outside itself (a shared-memory segment, a spill directory, a Unix socket)
 * must go however the process ends: shutdown(), process.exit(), an uncaught error, or Ctrl-C.
 * Node runs 'exit' listeners for the first three but not when a signal ends the process, so a
 * terminating signal that nobody else handles runs the cleanups here and is then raised again,
 * ending the process as the signal would have (same exit status) and not a moment later.
 * SIGKILL and crashes leave their entries behind; `removeStaleEntries` takes those away the next
 * time a process of the same host starts.
 */
import { readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';

type Cleanup = () => void;

const TERMINATING_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
type TerminatingSignal = (typeof TERMINATING_SIGNALS)[number];

const cleanups = new Set<Cleanup>();
let installed = false;

function runCleanups(): void {
  const pending = [...cleanups];
  cleanups.clear();
  for (const cleanup of pending) {
    try {
      cleanup();
    } catch {
      // The process is ending: one failed removal must not keep the others from running.
    }
  }
}

function onSignal(signal: TerminatingSignal): void {
  // Another listener means the program handles the signal itself: whether and when the process
  // ends is its call, and its process.exit() or shutdown() cleans up.
  if (process.listenerCount(signal) > 1) return;
  runCleanups();
  uninstall();
  // With no listener left Node restores the default action, so this ends the process as the
  // original signal would have.
  process.kill(process.pid, signal);
}

const signalListeners = new Map<TerminatingSignal, () => void>(TERMINATING_SIGNALS.map((signal) => [signal, () => onSignal(signal)]));

function install(): void {
  if (installed) return;
  installed = true;
  process.on('exit', runCleanups);
  // First in line: a program's own listener added with once() is gone by the time later
  // listeners run, and would then look like none.
  for (const [signal, listener] of signalListeners) process.prependListener(signal, listener);
}

function uninstall(): void {
  if (!installed) return;
  installed = false;
  process.off('exit', runCleanups);
  for (const [signal, listener] of signalListeners) process.off(signal, listener);
}

/**
 * Runs `cleanup` (synchronous, quick) when the process ends, unless the returned function is
 * called first (the owner closed). Signal listeners are held only while a cleanup is pending, so
 * a process that shut trellis down has its signals' default behaviour back.
 */
export function onProcessExit(cleanup: Cleanup): () => void {
  cleanups.add(cleanup);
  install();
  return () => {
    cleanups.delete(cleanup);
    if (cleanups.size === 0) uninstall();
  };
}

/** Whether a process of this pid namespace is alive; one we may not signal is. */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Removes the entries of `directory` that `pattern` matches (its first group: the owner's pid)
 * and whose owner is dead. Entries are named after
 * their owner's pid, so processes that share the directory must share a pid namespace (as they
 * share /dev/shm). Returns the names removed.
 */
export function removeStaleEntries(directory: string, pattern: RegExp): string[] {
  let names: string[];
  try {
    names = readdirSync(directory);
  } catch {
    return [];
  }
  const removed: string[] = [];
  for (const name of names) {
    const match = pattern.exec(name);
    if (!match) continue;
    const pid = Number(match[1]);
    if (pid === process.pid || processAlive(pid)) continue;
    try {
      rmSync(join(directory, name), { recursive: true, force: true });
      removed.push(name);
    } catch {
      // Another process's sweep got there first, or it is not ours to remove.
    }
  }
  return removed;
}
