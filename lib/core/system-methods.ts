/**
 * Methods the runtime itself calls on actors (joining a collective group, handing over tensors),
 * next to the user's class methods. Their names start with '__trellis_', which user methods
 * cannot be called by: actor handles only expose the class's own methods.
 */
type SystemMethod = (...args: any[]) => unknown;

const methods = new Map<string, SystemMethod>();

export const SYSTEM_PREFIX = '__trellis_';

export function registerSystemMethod(name: string, method: SystemMethod): void {
  if (!name.startsWith(SYSTEM_PREFIX)) throw new Error(`system method '${name}' must start with ${SYSTEM_PREFIX}`);
  methods.set(name, method);
}

export function systemMethod(name: string): SystemMethod | undefined {
  return methods.get(name);
}
