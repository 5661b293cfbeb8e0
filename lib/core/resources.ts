/**
 * Resource sets: CPU, GPU, memory and custom names, fractional amounts allowed. Amounts are kept
 * in fixed point (1/10,000) so that fractions add and subtract without drift.
 */
export type Resources = Record<string, number>;

const SCALE = 10_000;

export function toFixed(resources: Resources): Map<string, number> {
  const fixed = new Map<string, number>();
  for (const [name, amount] of Object.entries(resources)) {
    if (amount > 0) fixed.set(name, Math.round(amount * SCALE));
  }
  return fixed;
}

export class ResourcePool {
  readonly total: Map<string, number>;
  readonly available: Map<string, number>;

  constructor(total: Resources) {
    this.total = toFixed(total);
    this.available = new Map(this.total);
  }

  fitsTotal(request: Map<string, number>): boolean {
    for (const [name, amount] of request) if ((this.total.get(name) ?? 0) < amount) return false;
    return true;
  }

  fits(request: Map<string, number>): boolean {
    for (const [name, amount] of request) if ((this.available.get(name) ?? 0) < amount) return false;
    return true;
  }

  acquire(request: Map<string, number>): void {
    for (const [name, amount] of request) this.available.set(name, (this.available.get(name) ?? 0) - amount);
  }

  release(request: Map<string, number>): void {
    for (const [name, amount] of request) this.available.set(name, (this.available.get(name) ?? 0) + amount);
  }

  /** Highest used fraction over the named resources (all when none named). */
  utilization(names?: Iterable<string>): number {
    let highest = 0;
    for (const name of names ?? this.total.keys()) {
      const total = this.total.get(name) ?? 0;
      if (total > 0) highest = Math.max(highest, 1 - (this.available.get(name) ?? 0) / total);
    }
    return highest;
  }

  /** What `request` lacks against the total, in user units. */
  missing(request: Map<string, number>): Resources {
    const missing: Resources = {};
    for (const [name, amount] of request) {
      const total = this.total.get(name) ?? 0;
      if (total < amount) missing[name] = (amount - total) / SCALE;
    }
    return missing;
  }

  snapshot(): { total: Resources; available: Resources } {
    const out = (map: Map<string, number>) => Object.fromEntries([...map].map(([k, v]) => [k, v / SCALE]));
    return { total: out(this.total), available: out(this.available) };
  }
}

export function describeResources(request: Map<string, number>): string {
  return [...request].map(([name, amount]) => `${name}: ${amount / SCALE}`).join(', ') || 'nothing';
}

export const FIXED_SCALE = SCALE;
