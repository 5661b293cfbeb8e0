/** The input of a job whose blocks are already in the store. */
import { get } from '../../core/api.js';
import { ObjectRef } from '../../core/object-ref.js';
import type { Block } from '../block.js';
import type { InputBlock, PhysicalOperatorSpec } from '../plan.js';
import type { StreamingExecutor } from '../executor.js';
import { Operator, dispose, unitRows, type Unit } from './operator.js';

/** Blocks already in the store (fromItems, a materialized dataset): released under the budget. */
export class InputOperator extends Operator {
  readonly #pending: InputBlock[];

  constructor(executor: StreamingExecutor, spec: Extract<PhysicalOperatorSpec, { kind: 'input' }>, index: number) {
    super(executor, spec, index);
    // The dataset keeps its own handles; the job holds its own, let go as blocks are consumed.
    this.#pending = spec.blocks.map((block) => ({ ref: new ObjectRef<Block>(block.ref.id), meta: block.meta, slice: block.slice }));
    this.upstreamDone = true;
    this.rowsTotal = unitRows(spec.blocks);
    this.blocksTotal = spec.blocks.length;
  }
  override get isSource(): boolean {
    return true;
  }
  override get queuedUnits(): number {
    return this.#pending.length;
  }
  override done(): boolean {
    return (this.#pending.length === 0 || this.truncated) && super.done();
  }
  hasWork(): boolean {
    return !this.truncated && this.#pending.length > 0;
  }
  capacity(): number {
    return Infinity;
  }
  override estimateOutputBytes(): number {
    return this.#pending[0]?.meta.bytes ?? 0;
  }
  launch(): void {
    const block = this.#pending.shift()!;
    const unit: Unit = { seq: this.newSeq(), blocks: [], rows: 0, bytes: 0, attempts: 0 };
    this.began(unit);
    this.finished(unit, [block]);
  }
  override truncate(): void {
    super.truncate();
    dispose(this.#pending.splice(0));
  }
  override async shutdown(): Promise<void> {
    dispose(this.#pending.splice(0));
  }
}
