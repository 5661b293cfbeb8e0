/** union(): the blocks of several input chains, passed on as they come (in order: chain by chain). */
import type { PhysicalOperatorSpec } from '../plan.js';
import { Operator } from './operator.js';

/**
 * A union of the chains built before it. Blocks pass through in the driver, untouched; with
 * preserveOrder the executor starts each chain once the one before it is done, so blocks arrive,
 * and leave, chain by chain.
 */
export class UnionOperator extends Operator {
  declare readonly spec: Extract<PhysicalOperatorSpec, { kind: 'union' }>;

  hasWork(): boolean {
    return this.inputs.length > 0 && !this.truncated;
  }

  capacity(): number {
    return Infinity;
  }

  launch(): void {
    const unit = this.nextUnit();
    this.began(unit);
    this.finished(unit, unit.blocks, false);
  }
}
