/**
 * GroupedData: what groupBy() returns. Aggregations stream (partial states per block, merged);
 * mapGroups exchanges the rows so that each group meets in one task, then calls the function once
 * per group.
 */
import { InvalidArgumentError } from '../errors.js';
import { AbsMax, Count, Max, Mean, Min, Quantile, Std, Sum, Unique, checkAggregations, type AggregateFn, type AggregateOptions } from './aggregate.js';
import type { BatchFormat } from './block.js';
import type { Dataset } from './dataset.js';
import type { LogicalOperator } from './plan.js';
import type { StageSpec } from './stages.js';
import { resolveUdf, udfName, type UdfTarget } from './udf.js';

export interface MapGroupsOptions {
  /** What the function receives per group: columns (default), rows or an Arrow table. */
  batchFormat?: BatchFormat;
  /** Extra arguments after the group. */
  fnArgs?: unknown[];
  /** Partitions the groups are spread over (default: by the data's size). */
  numBlocks?: number;
}

/** The output name of an aggregation over several columns at once: one per column. */
type ColumnAggregation = (column: string, options?: AggregateOptions) => AggregateFn;

export class GroupedData {
  /** @internal Made by Dataset.groupBy(). */
  constructor(
    readonly dataset: Dataset,
    readonly keys: readonly string[],
    readonly withOperator: (operator: LogicalOperator) => Dataset,
  ) {}

  /** One row per group (sorted by key): the keys, then one column per aggregation. */
  aggregate(...aggregations: AggregateFn[]): Dataset {
    const checked = checkAggregations(aggregations, this.keys, 'groupBy().aggregate()');
    return this.withOperator({
      op: 'aggregate',
      name: `Aggregate(${checked.map((aggregation) => aggregation.name).join(', ')}) by ${this.keys.join(', ')}`,
      plan: { keys: [...this.keys], aggregations: checked },
    });
  }

  /** Rows per group, as column 'count()'. */
  count(): Dataset {
    return this.aggregate(Count());
  }

  sum(columns: string | string[], options?: AggregateOptions): Dataset {
    return this.#each(Sum, columns, options);
  }
  min(columns: string | string[], options?: AggregateOptions): Dataset {
    return this.#each(Min, columns, options);
  }
  max(columns: string | string[], options?: AggregateOptions): Dataset {
    return this.#each(Max, columns, options);
  }
  mean(columns: string | string[], options?: AggregateOptions): Dataset {
    return this.#each(Mean, columns, options);
  }
  std(columns: string | string[], options?: AggregateOptions & { ddof?: number }): Dataset {
    return this.#each((column, rest) => Std(column, { ...rest, ddof: options?.ddof }), columns, options && { ignoreNulls: options.ignoreNulls });
  }
  absMax(columns: string | string[], options?: AggregateOptions): Dataset {
    return this.#each(AbsMax, columns, options);
  }
  unique(columns: string | string[], options?: AggregateOptions): Dataset {
    return this.#each(Unique, columns, options);
  }
  /** The q-th quantile per group (default 0.5, the median); see Quantile. */
  quantile(columns: string | string[], options?: AggregateOptions & { q?: number }): Dataset {
    return this.#each((column, rest) => Quantile(column, { ...rest, q: options?.q }), columns, options && { alias: options.alias, ignoreNulls: options.ignoreNulls });
  }

  #each(aggregation: ColumnAggregation, columns: string | string[], options: AggregateOptions = {}): Dataset {
    const list = typeof columns === 'string' ? [columns] : columns;
    if (!Array.isArray(list) || list.length === 0) throw new InvalidArgumentError(`takes a column name or an array of them, got ${JSON.stringify(columns)}`, 'ERR_DATA_COLUMN');
    if (options.alias !== undefined && list.length > 1) throw new InvalidArgumentError('alias names one output column; give each aggregation its own with aggregate()');
    return this.aggregate(...list.map((column) => aggregation(column, options)));
  }

  /**
   * Each group's rows through `fn` (a registered function), once per group, sorted by key within
   * the task; what it returns (rows, columns or an Arrow table) are the output rows.
   */
  mapGroups(fn: UdfTarget, options: MapGroupsOptions = {}): Dataset {
    const udf = resolveUdf(fn, 'mapGroups()');
    if (udf.kind === 'class') throw new InvalidArgumentError('mapGroups() takes a function; classes run through mapBatches() on an actor pool', 'ERR_DATA_UDF');
    const fnArgs = options.fnArgs ?? [];
    if (!Array.isArray(fnArgs)) throw new InvalidArgumentError('mapGroups(): fnArgs must be an array');
    const format = options.batchFormat ?? 'columns';
    if (format !== 'arrow' && format !== 'rows' && format !== 'columns') {
      throw new InvalidArgumentError(`mapGroups(): batchFormat must be 'arrow', 'rows' or 'columns', got ${String(format)}`);
    }
    checkNumBlocks(options.numBlocks, 'mapGroups()');
    const stage: StageSpec = { kind: 'mapBatches', name: `MapGroups(${udfName(udf)})`, udf, fnArgs, batchFormat: format };
    return this.withOperator({
      op: 'exchange',
      name: `${stage.name} by ${this.keys.join(', ')}`,
      exchange: { kind: 'mapGroups', keys: [...this.keys], stage },
      numBlocks: options.numBlocks,
    });
  }
}

export function checkNumBlocks(value: unknown, what: string): void {
  if (value !== undefined && (typeof value !== 'number' || !Number.isInteger(value) || value < 1)) {
    throw new InvalidArgumentError(`${what}: numBlocks must be a positive integer, got ${String(value)}`);
  }
}
