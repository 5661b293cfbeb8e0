/**
 * Tensors inside other values (`{ logits, kvCache: [k, v], step }`): taken out, leaving a skeleton
 * with a TensorSlot in each one's place that travels with the rest of the value, and put back into
 * the skeleton where they arrive. Tensor transport and compiled graphs' IPC edges send tensors
 * this way, so that only the tensors take the fast path and the rest goes inline.
 */
import { TensorSlot } from '../core/serialization.js';
import { Tensor } from './tensor.js';

/**
 * `value` with each Tensor that `wanted` accepts (default: all) replaced by its TensorSlot, its
 * index in `found`. Plain objects, arrays, Maps and Sets are walked; anything else, and values
 * nested deeper than the codec allows, stay as they are.
 */
export function takeTensors(value: unknown, found: Tensor[], wanted: (tensor: Tensor) => boolean = () => true, depth = 0): unknown {
  if (value instanceof Tensor) {
    if (!wanted(value)) return value;
    found.push(value);
    return new TensorSlot(found.length - 1);
  }
  if (depth > 64 || typeof value !== 'object' || value === null || ArrayBuffer.isView(value)) return value;
  const take = (item: unknown) => takeTensors(item, found, wanted, depth + 1);
  if (Array.isArray(value)) return value.map(take);
  if (value instanceof Map) return new Map([...value].map(([key, item]) => [key, take(item)]));
  if (value instanceof Set) return new Set([...value].map(take));
  if (!isPlainObject(value)) return value;
  const copy: Record<string, unknown> = {};
  for (const key of Object.keys(value)) copy[key] = take((value as Record<string, unknown>)[key]);
  return copy;
}

/** The skeleton with its TensorSlots replaced by `tensors` (in place where it can be). */
export function putTensors(value: unknown, tensors: Tensor[]): unknown {
  if (value instanceof TensorSlot) return tensors[value.index];
  if (typeof value !== 'object' || value === null || ArrayBuffer.isView(value)) return value;
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) value[i] = putTensors(value[i], tensors);
    return value;
  }
  if (value instanceof Map) {
    for (const [key, item] of value) value.set(key, putTensors(item, tensors));
    return value;
  }
  if (value instanceof Set) return new Set([...value].map((item) => putTensors(item, tensors)));
  if (!isPlainObject(value)) return value;
  for (const key of Object.keys(value)) (value as Record<string, unknown>)[key] = putTensors((value as Record<string, unknown>)[key], tensors);
  return value;
}

function isPlainObject(value: object): boolean {
  const prototype = Object.getPrototypeOf(value);
  return prototype === Object.prototype || prototype === null;
}
