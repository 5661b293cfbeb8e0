/** limit(n): cut in the driver, stopping everything upstream once it has its rows. */
import { get, put } from '../../core/api.js';
import { ObjectRef } from '../../core/object-ref.js';
import type { Block } from '../block.js';
import type { InputBlock, PhysicalOperatorSpec } from '../plan.js';
import { trackDriverView, type StreamingExecutor } from '../executor.js';
import { Operator, dispose } from './operator.js';

/** A limit: passes blocks until it has its rows, cuts the last one, and stops everything upstream. */
export class LimitOperator extends Operator {
  declare readonly spec: Extract<PhysicalOperatorSpec, { kind: 'limit' }>;
  #remaining: number;
  constructor(executor: StreamingExecutor, spec: Extract<PhysicalOperatorSpec, { kind: 'limit' }>, index: number) {
    super(executor, spec, index);
    this.#remaining = spec.rows;
    this.rowsTotal = spec.rows;
  }
  hasWork(): boolean {
    return this.inputs.length > 0 && !this.truncated && this.#remaining > 0;
  }
  capacity(): number {
    return 1;
  }
  override takeInput(block: InputBlock): void {
    // Blocks made upstream after the limit was reached are not needed.
    if (this.#remaining === 0) return dispose([block]);
    super.takeInput(block);
  }
  override done(): boolean {
    return super.done() || (this.#remaining === 0 && this.active === 0);
  }
  #reached(): void {
    this.dropInputs();
    this.executor.truncateUpstreamOf(this);
  }
  override async start(): Promise<void> {
    if (this.#remaining === 0) this.#reached();
  }
  launch(): void {
    const unit = this.nextUnit();
    this.began(unit);
    const block = unit.blocks[0];
    if (block.meta.rows <= this.#remaining) {
      this.#remaining -= block.meta.rows;
      this.finished(unit, [block], false);
      if (this.#remaining === 0) this.#reached();
      return;
    }
    const keep = this.#remaining;
    this.#remaining = 0;
    this.#reached();
    // Cutting a block reads it here (zero-copy) and stores the cut: the copy is at most a block.
    get(block.ref).then(
      (table) => {
        trackDriverView(table as Block, block.meta.bytes);
        const offset = block.slice?.[0] ?? 0;
        const cut = (table as Block).slice(offset, offset + keep);
        const ref = put(cut) as ObjectRef<Block>;
        const bytes = Math.ceil((block.meta.bytes * keep) / Math.max(1, block.meta.rows));
        this.finished(unit, [{ ref, meta: { rows: keep, bytes } }]);
      },
      (error: unknown) => this.onInfrastructureError(unit, error),
    );
  }
}
