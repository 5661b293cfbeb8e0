/**
 * zip(other): the columns of two datasets side by side, row by row. Both inputs are held (outside
 * the budget, as an exchange's are) until both have ended; then the rows are cut into ranges
 * along the left's blocks, and one task per range joins the two sides' slices of it (zero-copy
 * slices of the stored blocks; only the joined block is new).
 */
import { get } from '../../core/api.js';
import type { ObjectRef } from '../../core/object-ref.js';
import { DataError } from '../../errors.js';
import type { Block } from '../block.js';
import { zipTask } from '../exchange-tasks.js';
import { slicesOf, type InputBlock, type PhysicalOperatorSpec } from '../plan.js';
import type { TaskResult } from '../worker-tasks.js';
import { Operator, cutInputBlocks, dispose, taskTargets, unitBytes, unitRows, type Unit } from './operator.js';

export class ZipOperator extends Operator {
  declare readonly spec: Extract<PhysicalOperatorSpec, { kind: 'zip' }>;
  readonly #staged: [InputBlock[], InputBlock[]] = [[], []];
  /** Per output range: the left's slices and the right's. */
  #ranges: Array<[InputBlock[], InputBlock[]]> | undefined;
  #next = 0;

  override takeInput(block: InputBlock, from?: Operator): void {
    if (this.truncated) return dispose([block]);
    this.#staged[from && this.upstreams.indexOf(from) === 1 ? 1 : 0].push(block);
  }

  override get phase(): string {
    return this.#ranges ? 'pairing rows' : 'collecting all input';
  }

  override stagedBytes(): number {
    let bytes = unitBytes(this.#staged[0]) + unitBytes(this.#staged[1]);
    for (let index = this.#next; index < (this.#ranges?.length ?? 0); index++) bytes += unitBytes(this.#ranges![index][0]) + unitBytes(this.#ranges![index][1]);
    return bytes;
  }

  override get queuedUnits(): number {
    return this.#ranges ? this.#ranges.length - this.#next : 0;
  }

  capacity(): number {
    return this.executor.taskSlots({ numCpus: 1 });
  }

  override done(): boolean {
    return super.done() && (this.truncated || (this.#ranges !== undefined && this.#next >= this.#ranges.length));
  }

  hasWork(): boolean {
    if (this.truncated || this.executor.failed) return false;
    if (!this.#ranges) {
      if (!this.upstreamDone) return false;
      if (!this.#plan()) return false;
    }
    return this.#next < this.#ranges!.length;
  }

  override nextUnitBytes(): number {
    const range = this.#ranges?.[this.#next];
    return range ? unitBytes(range[0]) + unitBytes(range[1]) : 0;
  }

  /** Ranges along the left's blocks, each paired with the right's rows at the same positions. */
  #plan(): boolean {
    const [left, right] = this.#staged;
    const leftRows = unitRows(left);
    const rightRows = unitRows(right);
    if (leftRows !== rightRows) {
      this.executor.fail(
        new DataError('ERR_DATA_ZIP', `zip() takes datasets of the same number of rows: this one has ${leftRows}, the other ${rightRows}`, { operator: this.name }),
      );
      return false;
    }
    // One range per block of the left, with the right's rows at the same positions.
    const lefts = left.filter((block) => block.meta.rows > 0);
    const rights = cutInputBlocks(right, lefts.map((block) => block.meta.rows));
    const ranges = lefts.map((block, index): [InputBlock[], InputBlock[]] => [[block], rights[index]]);
    // The ranges hold their own handles on the right's blocks: the staged ones go, and so do the left's empty blocks.
    dispose(right);
    dispose(left.filter((block) => block.meta.rows === 0));
    this.#staged[1] = [];
    this.#staged[0] = [];
    this.#ranges = ranges;
    this.rowsTotal = leftRows;
    this.blocksTotal = ranges.length;
    return true;
  }

  launch(): void {
    const [left, right] = this.#ranges![this.#next];
    this.#ranges![this.#next++] = [[], []];
    const blocks = [...left, ...right];
    const bytes = unitBytes(blocks);
    const unit: Unit = { seq: this.newSeq(), blocks, rows: unitRows(left), bytes, attempts: 0 };
    this.began(unit);
    const ref = zipTask
      .options({ numCpus: 1, maxRetries: this.executor.options.maxRetries, name: this.name })
      .remote(left.length, this.spec.suffix, slicesOf(blocks), taskTargets(this.executor), ...(blocks.map((block) => block.ref) as unknown as Block[]));
    get(ref as ObjectRef<TaskResult>).then(
      (result) => {
        ref[Symbol.dispose]();
        if (result.error) return this.failTask(unit, result.error);
        this.finished(unit, result.blocks.map((block) => ({ ref: block.ref, meta: { rows: block.rows, bytes: block.bytes } })));
      },
      (error: unknown) => {
        ref[Symbol.dispose]();
        this.onInfrastructureError(unit, error);
      },
    );
  }

  /** One range of rows is one block of the output. */
  protected override blocksDoneBy(): number {
    return 1;
  }

  override async shutdown(): Promise<void> {
    for (const side of this.#staged) dispose(side.splice(0));
    for (const [left, right] of this.#ranges ?? []) dispose([...left, ...right]);
    this.#ranges = [];
  }
}
