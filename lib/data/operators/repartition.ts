/** repartition(n): an all-to-all step, after all input has arrived. */
import { get } from '../../core/api.js';
import { ObjectRef } from '../../core/object-ref.js';
import type { Block } from '../block.js';
import type { InputBlock, PhysicalOperatorSpec } from '../plan.js';
import { sliceTask } from '../worker-tasks.js';
import { Operator, dispose, taskTargets, unitBytes, unitRows, type Unit } from './operator.js';

/** Repartition: waits for all input, then cuts it into numBlocks blocks of equal rows. */
export class RepartitionOperator extends Operator {
  declare readonly spec: Extract<PhysicalOperatorSpec, { kind: 'repartition' }>;
  #planned = false;
  #held: InputBlock[] = [];
  #outstanding = 0;

  hasWork(): boolean {
    return !this.#planned && this.upstreamDone && !this.truncated;
  }
  capacity(): number {
    return 1;
  }
  override get queuedUnits(): number {
    return this.#planned ? 0 : this.inputs.length;
  }
  override done(): boolean {
    return this.#planned && this.#outstanding === 0 && super.done();
  }
  /**
   * Its input waits for all the rest, as an exchange's does: outside the budget (holding the
   * sources back would wait forever; the store spills what does not fit).
   */
  override heldBytes(): number {
    return super.heldBytes() - this.inputBytes;
  }
  override stagedBytes(): number {
    return this.inputBytes + unitBytes(this.#held);
  }
  launch(): void {
    this.#planned = true;
    this.#held = [];
    while (this.inputs.length) this.#held.push(this.inputs.shift()!);
    this.inputBytes = 0;
    this.inputRows = 0;
    const total = unitRows(this.#held);
    const parts = Math.max(1, this.spec.numBlocks);
    this.blocksTotal = parts;
    this.rowsTotal = total;
    // Output i covers rows [start_i, end_i) of the concatenated input.
    let blockIndex = 0;
    let offsetInBlock = 0;
    this.#outstanding = parts;
    for (let part = 0; part < parts; part++) {
      const want = Math.floor(total / parts) + (part < total % parts ? 1 : 0);
      const refs: ObjectRef<Block>[] = [];
      const slices: Array<[number, number]> = [];
      let need = want;
      let bytes = 0;
      while (need > 0 && blockIndex < this.#held.length) {
        const block = this.#held[blockIndex];
        const take = Math.min(need, block.meta.rows - offsetInBlock);
        if (take > 0) {
          refs.push(block.ref);
          slices.push([(block.slice?.[0] ?? 0) + offsetInBlock, take]);
          bytes += Math.ceil((block.meta.bytes * take) / Math.max(1, block.meta.rows));
        }
        need -= take;
        offsetInBlock += take;
        if (offsetInBlock >= block.meta.rows) {
          blockIndex++;
          offsetInBlock = 0;
        }
      }
      const unit: Unit = { seq: this.newSeq(), blocks: [], rows: want, bytes: 0, attempts: 0, estimate: bytes };
      this.began(unit);
      if (refs.length === 0) {
        this.#partDone(unit, []);
        continue;
      }
      const ref = sliceTask
        .options({ numCpus: 1, maxRetries: this.executor.options.maxRetries, name: this.name })
        .remote(slices, taskTargets(this.executor), ...(refs as unknown as Block[]));
      get(ref).then(
        (result) => {
          ref[Symbol.dispose]();
          this.#partDone(unit, result.blocks.map((block) => ({ ref: block.ref, meta: { rows: block.rows, bytes: block.bytes } })));
        },
        (error: unknown) => this.onInfrastructureError(unit, error),
      );
    }
  }
  #partDone(unit: Unit, outputs: InputBlock[]): void {
    this.#outstanding--;
    if (this.#outstanding === 0) {
      dispose(this.#held);
      this.#held = [];
    }
    this.finished(unit, outputs);
  }
  override async shutdown(): Promise<void> {
    dispose(this.#held);
    this.#held = [];
  }
}
