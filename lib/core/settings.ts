/**
 * Numeric settings that come from init() or, for workers and by default, from the environment
 * (busy-polling's cap, the wait before idle exported IPC blocks go back).
 */
import { InvalidArgumentError } from '../errors.js';

/** `name` from the environment: a number of 0 or more, capped at `max`; undefined if unset or not one. */
export function environmentNumber(name: string, max: number): number | undefined {
  const chosen = process.env[name];
  if (chosen === undefined || chosen === '') return undefined;
  const value = Number(chosen);
  return Number.isFinite(value) && value >= 0 ? Math.min(value, max) : undefined;
}

/** Checks an init() option: absent, or a number from 0 to `max` (`unit` names it in the error). */
export function checkRangeOption(name: string, value: unknown, max: number, unit: string): void {
  if (value === undefined) return;
  if (!(typeof value === 'number' && Number.isFinite(value) && value >= 0 && value <= max)) {
    throw new InvalidArgumentError(`${name} must be a number of ${unit} from 0 to ${max}, got ${String(value)}`);
  }
}
