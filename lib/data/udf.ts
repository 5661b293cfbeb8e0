/**
 * User functions and classes of a dataset. Closures never cross processes: a transform names a
 * function or class registered with remote(import.meta, ...) at its module's top level, and the
 * worker that runs it imports that module and finds it again by (module, name).
 */
import { InvalidArgumentError } from '../errors.js';
import { descriptorOf, importRegistered, isClass, lookupRegistered, methodNames } from '../core/registry.js';
import type { FunctionDescriptor } from '../core/protocol.js';
import type { Row } from './block.js';

type AnyFunction = (...args: any[]) => any;
type AnyClass = new (...args: any[]) => any;

/** A user function or class as a transform names it: registered, and how to call it. */
export interface UdfSpec {
  descriptor: FunctionDescriptor;
  kind: 'function' | 'class';
  /** For classes: the method each batch goes through. */
  method?: string;
}

/** What the user may pass: the function or class itself (registered) or what remote() returned. */
export type UdfTarget = AnyFunction | AnyClass | { readonly descriptor: FunctionDescriptor };

/** A row function as a processor's preprocess or postprocess takes it: registered, or what remote() returned. */
export type RowFunction = ((row: Row) => Row | Promise<Row>) | { readonly descriptor: FunctionDescriptor };

export function udfName(spec: UdfSpec): string {
  return spec.kind === 'class' ? `${spec.descriptor.name}.${spec.method}` : spec.descriptor.name;
}

/** Checks a transform's target in the driver, at the call site, with a message that says what to do. */
export function resolveUdf(target: unknown, what: string, method = 'call'): UdfSpec {
  if (typeof target !== 'function' && (typeof target !== 'object' || target === null)) {
    throw new InvalidArgumentError(`${what} takes a function or a class, got ${target === null ? 'null' : typeof target}`, 'ERR_DATA_UDF');
  }
  const descriptor = descriptorOf(target);
  if (!descriptor) {
    const name = (target as { name?: string }).name || 'an anonymous function';
    throw new InvalidArgumentError(
      `${what}: '${name}' is not registered. Register it at its module's top level with ` +
        `remote(import.meta, ${name === 'an anonymous function' ? 'fn' : name}): workers import that module and find it by name, ` +
        `since closures are never shipped`,
      'ERR_DATA_UDF',
    );
  }
  const registered = lookupRegistered(descriptor);
  if (!registered) throw new InvalidArgumentError(`${what}: ${descriptor.name} is not registered in this process`, 'ERR_DATA_UDF');
  if (!isClass(registered)) return { descriptor, kind: 'function' };
  const methods = methodNames(registered as AnyClass);
  if (!methods.includes(method)) {
    throw new InvalidArgumentError(
      `${what}: class ${descriptor.name} has no method '${method}' to call on each batch (it has: ${methods.join(', ') || 'none'}); ` +
        `name one with { method }`,
      'ERR_DATA_UDF',
    );
  }
  return { descriptor, kind: 'class', method };
}

/** In a worker: the function or class a spec names, importing its module when needed. */
export async function loadUdf(descriptor: FunctionDescriptor): Promise<AnyFunction | AnyClass> {
  const found = await importRegistered(descriptor);
  if (!found) {
    throw new InvalidArgumentError(`${descriptor.name} is not registered in ${descriptor.module}: call remote(import.meta, ${descriptor.name}) at its top level`, 'ERR_DATA_UDF');
  }
  return found;
}

/**
 * An instance the driver ships to workers by state: its class (registered) and its own fields.
 * Used for Datasinks, whose write() runs in write tasks.
 */
export interface ShippedInstance {
  descriptor: FunctionDescriptor;
  state: Record<string, unknown>;
}

export function shipInstance(instance: object, what: string): ShippedInstance {
  const cls = instance.constructor;
  const descriptor = descriptorOf(cls);
  if (!descriptor) {
    throw new InvalidArgumentError(
      `${what}: class ${cls?.name ?? '(anonymous)'} is not registered. Its methods run in worker processes: ` +
        `register it at its module's top level with remote(import.meta, ${cls?.name ?? 'TheClass'})`,
      'ERR_DATA_UDF',
    );
  }
  return { descriptor, state: { ...(instance as Record<string, unknown>) } };
}

export async function reviveInstance<T>(shipped: ShippedInstance): Promise<T> {
  const cls = (await loadUdf(shipped.descriptor)) as AnyClass;
  return Object.assign(Object.create(cls.prototype), shipped.state) as T;
}
