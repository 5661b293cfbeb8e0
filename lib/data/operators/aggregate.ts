/**
 * Aggregations (groupBy().aggregate(), Dataset.sum(), ...) as a streaming operator: input blocks
 * become small partial blocks as they arrive, partial blocks are merged sixteen at a time, and
 * once the input has ended one last task merges what is left and makes the result. Memory stays
 * bounded by the partial states, never by the dataset.
 */
import { get } from '../../core/api.js';
import { ObjectRef } from '../../core/object-ref.js';
import type { Block } from '../block.js';
import { aggregateTask } from '../exchange-tasks.js';
import type { TaskResult } from '../worker-tasks.js';
import { slicesOf, type InputBlock, type PhysicalOperatorSpec } from '../plan.js';
import { Operator, dispose, taskTargets, unitBytes, type Unit } from './operator.js';

/** Partial blocks merged by one task. */
const MERGE_FAN_IN = 16;

export class AggregateOperator extends Operator {
  declare readonly spec: Extract<PhysicalOperatorSpec, { kind: 'aggregate' }>;
  #partials: InputBlock[] = [];
  #finalLaunched = false;

  hasWork(): boolean {
    if (this.truncated || this.#finalLaunched) return false;
    if (this.inputs.length > 0 || this.#partials.length >= MERGE_FAN_IN) return true;
    return this.upstreamDone && this.active === 0;
  }

  /** Input blocks are counted as their partial steps end; the final step counts none. */
  protected override blocksDoneBy(): number {
    return 0;
  }

  override get phase(): string {
    if (this.spec.reduction.kind === 'topk') return this.#finalLaunched ? 'final top rows' : 'top rows of each block';
    return this.#finalLaunched ? 'final merge' : 'partial aggregation';
  }

  capacity(): number {
    return this.executor.taskSlots({ numCpus: 1 });
  }

  override done(): boolean {
    return super.done() && (this.#finalLaunched || this.truncated);
  }

  override heldBytes(): number {
    return super.heldBytes() + unitBytes(this.#partials);
  }

  /** A partial state is small next to the blocks it sums up. */
  protected override firstEstimate(unitBytes: number): number {
    return Math.min(unitBytes, 1 << 20);
  }

  launch(): void {
    if (this.inputs.length > 0) {
      const unit = this.nextBlockBundle();
      this.abandonSeq(unit.seq);
      this.#runStep(unit, 'partial');
    } else if (this.#partials.length >= MERGE_FAN_IN) {
      const unit: Unit = { seq: -1, blocks: this.#partials.splice(0, MERGE_FAN_IN), rows: 0, bytes: 0, attempts: 0 };
      unit.bytes = unitBytes(unit.blocks);
      this.#runStep(unit, 'merge');
    } else {
      this.#finalLaunched = true;
      const blocks = this.#partials.splice(0);
      const unit: Unit = { seq: this.newSeq(), blocks, rows: 0, bytes: unitBytes(blocks), attempts: 0 };
      this.began(unit);
      this.#call(unit, 'final').then(
        (result) => {
          if (result.error) return this.failTask(unit, result.error);
          this.finished(unit, result.blocks.map((block) => ({ ref: block.ref, meta: { rows: block.rows, bytes: block.bytes } })));
        },
        (error: unknown) => this.onInfrastructureError(unit, error),
      );
    }
  }

  /** A partial or merge step: its output joins the partial blocks, not the operator's output. */
  #runStep(unit: Unit, step: 'partial' | 'merge'): void {
    // Counted as running work (no output reserved), so that a failure's dropUnit lets it go.
    unit.reserved = 0;
    this.active++;
    this.activeInputBytes += unit.bytes;
    this.executor.touch();
    this.#call(unit, step).then(
      (result) => {
        if (result.error) return this.failTask(unit, result.error);
        this.unlaunched(unit);
        dispose(unit.blocks);
        this.executor.noteFreed(unit.bytes);
        if (step === 'partial') this.blocksDone += unit.blocks.filter((block) => !block.continued).length;
        for (const block of result.blocks) {
          const partial: InputBlock = { ref: block.ref, meta: { rows: block.rows, bytes: block.bytes } };
          if (this.truncated) dispose([partial]);
          else this.#partials.push(partial);
        }
        this.lastCompletion = Date.now();
        this.executor.touch();
        this.executor.schedule();
      },
      (error: unknown) => this.onInfrastructureError(unit, error),
    );
  }

  async #call(unit: Unit, step: 'partial' | 'merge' | 'final'): Promise<TaskResult> {
    const ref = aggregateTask
      .options({ numCpus: 1, maxRetries: this.executor.options.maxRetries, name: this.name })
      .remote(this.spec.reduction, step, slicesOf(unit.blocks), taskTargets(this.executor), ...(unit.blocks.map((block) => block.ref) as unknown as Block[]));
    try {
      return await get(ref as ObjectRef<TaskResult>);
    } finally {
      ref[Symbol.dispose]();
    }
  }

  override async shutdown(): Promise<void> {
    dispose(this.#partials.splice(0));
  }
}
