/**
 * WebAssembly traps that escape their caller. A wasm library whose async calls run as futures in
 * microtasks of its own (parquet-wasm's reads) traps there when its code panics, on a corrupt
 * file say: the RuntimeError is thrown where no caller can catch it, and the caller's promise
 * never settles. Guarded operations give such a trap back to their callers: the worker's handler
 * of uncaught errors offers it here first, and every guarded operation in flight fails with it.
 * The trapped instance cannot be trusted afterwards, so the worker still ends, once the tasks
 * that were running have replied with the error, rather than taking its death with them.
 */

interface InFlight {
  fail: (error: Error) => void;
}

const inFlight = new Set<InFlight>();

/** WebAssembly.RuntimeError (the compiler's libraries here declare no WebAssembly globals). */
const WasmRuntimeError = (globalThis as unknown as { WebAssembly: { RuntimeError: abstract new () => Error } }).WebAssembly.RuntimeError;

/**
 * `work`, failing with the trap itself if a WebAssembly trap nothing caught happens while it runs
 * (in this process, which runs one guarded library's calls at a time per task).
 */
export function guardTraps<T>(work: () => Promise<T>): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const entry: InFlight = { fail: reject };
    inFlight.add(entry);
    const settle = <V>(then: (value: V) => void) => (value: V) => {
      inFlight.delete(entry);
      then(value);
    };
    try {
      work().then(settle(resolve), settle(reject));
    } catch (error) {
      settle(reject)(error);
    }
  });
}

/**
 * For a process's handler of uncaught errors: a WebAssembly trap while guarded operations run
 * fails them all with it (they may share the trapped instance) and returns true; anything else,
 * or a trap with nothing guarded in flight, returns false.
 */
export function claimTrap(error: unknown): boolean {
  if (!(error instanceof WasmRuntimeError) || inFlight.size === 0) return false;
  const failing = [...inFlight];
  inFlight.clear();
  for (const entry of failing) entry.fail(error);
  return true;
}
