/**
 * Methods the runtime itself calls on actors (joining a collective group, handing over tensors),
 * next to the user's class methods. Their names start with '__trellis_', which user methods
 * cannot be called by: actor handles only expose the class's own methods.
 */
type SystemMethod = (...args: any[]) => unknown;

const methods = new Map<string, SystemMethod>();

export const SYSTEM_PREFIX = '__trellis_';

/**
 * Short synchronous bookkeeping on held tensors (transport.ts), known to the driver and the
 * workers alike: the driver sends it ahead of calls still waiting on their arguments, and the
 * worker runs it as soon as it arrives, between the awaits of calls in progress, instead of
 * queueing it behind them by the actor's concurrency. A method awaiting `tensor.whenFreed()` must
 * not wait on itself, nor on a later call that waits for its result.
 */
const IMMEDIATE = new Set(['__trellis_free_held', '__trellis_export_held', '__trellis_materialize']);

export function registerSystemMethod(name: string, method: SystemMethod): void {
  if (!name.startsWith(SYSTEM_PREFIX)) throw new Error(`system method '${name}' must start with ${SYSTEM_PREFIX}`);
  methods.set(name, method);
}

export function systemMethod(name: string): SystemMethod | undefined {
  return methods.get(name);
}

export function isImmediateSystemMethod(name: string): boolean {
  return IMMEDIATE.has(name);
}
