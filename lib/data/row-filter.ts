/**
 * Row filters as data, not code: `[column, operator, value]` predicates, ANDed in a list, ORed
 * across lists. Being data, a filter can be judged against what is known before rows are read (a
 * file's partition values, a row group's min and max) as well as applied to a block's rows, and
 * travels to tasks with nothing to register.
 */
import { DataType, type Vector } from 'apache-arrow';
import { InvalidArgumentError } from '../errors.js';
import type { Block } from './block.js';
import { takeRows } from './block.js';

export type RowFilterOperator = '=' | '==' | '!=' | '<' | '<=' | '>' | '>=' | 'in' | 'not in' | 'is null' | 'is not null';
export type RowFilterValue = number | bigint | string | boolean | Date;

/** `[column, operator, value]`; 'in' and 'not in' take a list, 'is null' and 'is not null' no value. */
export type RowPredicate =
  | readonly [column: string, operator: '=' | '==' | '!=' | '<' | '<=' | '>' | '>=', value: RowFilterValue]
  | readonly [column: string, operator: 'in' | 'not in', values: readonly RowFilterValue[]]
  | readonly [column: string, operator: 'is null' | 'is not null'];

/**
 * Predicates that must all hold (`[['lang', '=', 'en'], ['score', '>=', 0.5]]`), or a list of
 * such lists of which one must (`[[['lang', '=', 'en']], [['lang', '=', 'de'], ['score', '>', 0.9]]]`).
 * Comparisons with a null value are false, as in SQL: only 'is null' keeps null rows.
 */
export type RowFilter = readonly RowPredicate[] | readonly (readonly RowPredicate[])[];

/** Values as compared: Dates as their milliseconds (Arrow gives dates and timestamps so). */
export type FilterValue = number | bigint | string | boolean;
type Operator = '=' | '!=' | '<' | '<=' | '>' | '>=' | 'in' | 'not in' | 'is null' | 'is not null';

/** A checked predicate. */
export interface Predicate {
  column: string;
  operator: Operator;
  value?: FilterValue;
  values?: FilterValue[];
}

/** A checked filter: any clause whose predicates all hold keeps a row (none: no row; an empty clause: every row). */
export type Clauses = Predicate[][];

const OPERATORS = new Set<string>(['=', '==', '!=', '<', '<=', '>', '>=', 'in', 'not in', 'is null', 'is not null']);

function filterError(where: string, message: string): InvalidArgumentError {
  return new InvalidArgumentError(`${where}: ${message}`, 'ERR_DATA_FILTER');
}

function checkValue(value: unknown, where: string, predicate: string): FilterValue {
  if (value instanceof Date) {
    if (Number.isNaN(value.getTime())) throw filterError(where, `${predicate} compares with an invalid Date`);
    return value.getTime();
  }
  if (typeof value === 'number') {
    if (Number.isNaN(value)) throw filterError(where, `${predicate} compares with NaN, which nothing equals`);
    return value;
  }
  if (typeof value === 'bigint' || typeof value === 'string' || typeof value === 'boolean') return value;
  throw filterError(where, `${predicate} compares with ${value === null ? 'null (use \'is null\')' : typeof value}; values are numbers, bigints, strings, booleans or Dates`);
}

function checkPredicate(entry: unknown, where: string): Predicate {
  const shown = JSON.stringify(entry, (_key, value) => (typeof value === 'bigint' ? `${value}n` : value));
  if (!Array.isArray(entry) || typeof entry[0] !== 'string' || entry[0].length === 0) {
    throw filterError(where, `each predicate is [column, operator, value], got ${shown}`);
  }
  const [column, operator] = entry as [string, unknown];
  if (typeof operator !== 'string' || !OPERATORS.has(operator)) {
    throw filterError(where, `${shown} has no operator of ${[...OPERATORS].map((name) => `'${name}'`).join(', ')}`);
  }
  if (operator === 'is null' || operator === 'is not null') {
    if (entry.length !== 2) throw filterError(where, `${shown}: '${operator}' takes no value`);
    return { column, operator };
  }
  if (entry.length !== 3) throw filterError(where, `${shown}: '${operator}' takes one value`);
  if (operator === 'in' || operator === 'not in') {
    if (!Array.isArray(entry[2])) throw filterError(where, `${shown}: '${operator}' takes a list of values`);
    return { column, operator, values: entry[2].map((value: unknown) => checkValue(value, where, shown)) };
  }
  return { column, operator: operator === '==' ? '=' : (operator as Operator), value: checkValue(entry[2], where, shown) };
}

/** Checks a filter given by a user, naming `where` it was given in errors (typed ERR_DATA_FILTER). */
export function checkRowFilter(filter: unknown, where: string): Clauses {
  if (!Array.isArray(filter) || filter.length === 0) throw filterError(where, 'filter takes a non-empty list of [column, operator, value] predicates, or a list of such lists');
  if (typeof filter[0] === 'string') {
    throw filterError(where, `a filter is a list of predicates: write [${JSON.stringify(filter)}], not ${JSON.stringify(filter)}`);
  }
  const nested = Array.isArray(filter[0]) && Array.isArray(filter[0][0]);
  const clauses = nested ? filter : [filter];
  return clauses.map((clause: unknown) => {
    if (!Array.isArray(clause) || clause.length === 0) throw filterError(where, `each list of predicates must be non-empty, got ${JSON.stringify(clause)}`);
    return clause.map((entry: unknown) => checkPredicate(entry, where));
  });
}

/** The columns a filter reads. */
export function filterColumns(clauses: Clauses): string[] {
  return [...new Set(clauses.flat().map((predicate) => predicate.column))];
}

/**
 * Orders strings by code point, as Parquet orders UTF-8 bytes (JavaScript's `<` orders UTF-16
 * units, which differ above U+FFFF): the first differing unit decides, surrogates moved above
 * U+E000-U+FFFF.
 */
function compareStrings(left: string, right: string): number {
  const length = Math.min(left.length, right.length);
  for (let index = 0; index < length; index++) {
    let a = left.charCodeAt(index);
    let b = right.charCodeAt(index);
    if (a === b) continue;
    if (a >= 0xd800 && b >= 0xd800) {
      a = a >= 0xe000 ? a - 0x800 : a + 0x2000;
      b = b >= 0xe000 ? b - 0x800 : b + 0x2000;
    }
    return a < b ? -1 : 1;
  }
  return left.length - right.length;
}

/** -1, 0 or 1; NaN where the two cannot be compared (different kinds, NaN). */
export function compareFilterValues(left: FilterValue, right: FilterValue): number {
  if (typeof left === 'string' || typeof right === 'string') return typeof left === typeof right ? Math.sign(compareStrings(left as string, right as string)) : Number.NaN;
  if (typeof left === 'boolean' || typeof right === 'boolean') return typeof left === typeof right ? Number(left) - Number(right) : Number.NaN;
  // Numbers and bigints compare with each other exactly.
  return left < right ? -1 : left > right ? 1 : left == right ? 0 : Number.NaN;
}

/** Whether a (non-null) value satisfies a comparison. */
function holds(predicate: Predicate, value: FilterValue): boolean {
  switch (predicate.operator) {
    case 'in':
      return predicate.values!.some((candidate) => compareFilterValues(value, candidate) === 0);
    case 'not in':
      return predicate.values!.every((candidate) => compareFilterValues(value, candidate) !== 0);
    default: {
      const order = compareFilterValues(value, predicate.value!);
      switch (predicate.operator) {
        case '=':
          return order === 0;
        case '!=':
          return order === 1 || order === -1;
        case '<':
          return order === -1;
        case '<=':
          return order === -1 || order === 0;
        case '>':
          return order === 1;
        default:
          return order === 1 || order === 0;
      }
    }
  }
}

function holdsFor(predicate: Predicate, value: FilterValue | null | undefined): boolean {
  if (predicate.operator === 'is null') return value === null || value === undefined;
  if (predicate.operator === 'is not null') return value !== null && value !== undefined;
  return value !== null && value !== undefined && holds(predicate, value);
}

/**
 * The filter with the predicates on `known` columns (a file's partition values, one per file)
 * decided: clauses they refute go, predicates they satisfy leave their clause. No clause left:
 * no row can match; an empty clause: every row does.
 */
export function specializeFilter(clauses: Clauses, known: Record<string, FilterValue | null>, where: string): Clauses {
  const out: Clauses = [];
  for (const clause of clauses) {
    const left: Predicate[] = [];
    let refuted = false;
    for (const predicate of clause) {
      if (!(predicate.column in known)) {
        left.push(predicate);
        continue;
      }
      const value = known[predicate.column];
      // A mismatch would refute every file quietly: '2026' never equals the number 2026.
      for (const literal of value === null ? [] : (predicate.values ?? (predicate.value === undefined ? [] : [predicate.value]))) {
        if (literalKind(literal) !== literalKind(value!)) {
          throw filterError(where, `column '${predicate.column}' holds ${typeof value}s (${JSON.stringify(value)}), compared with the ${typeof literal} ${JSON.stringify(typeof literal === 'bigint' ? `${literal}n` : literal)}`);
        }
      }
      if (!holdsFor(predicate, value)) {
        refuted = true;
        break;
      }
    }
    if (!refuted) out.push(left);
  }
  return out;
}

/** What is known of a column's values in a range of rows (a row group). */
export interface ValueRange {
  rows: number;
  min?: FilterValue;
  max?: FilterValue;
  nullCount?: number;
}

/** Whether some row whose column lies in `range` might satisfy the predicate (false: none can). */
function mayHold(predicate: Predicate, range: ValueRange | undefined): boolean {
  if (!range) return true;
  const { min, max, nullCount, rows } = range;
  if (predicate.operator === 'is null') return nullCount === undefined || nullCount > 0;
  if (predicate.operator === 'is not null') return nullCount === undefined || nullCount < rows;
  if (nullCount !== undefined && nullCount >= rows) return false; // all null: no comparison holds
  if (min === undefined || max === undefined) return true;
  const within = (value: FilterValue): boolean => !(compareFilterValues(value, min) === -1 || compareFilterValues(value, max) === 1);
  switch (predicate.operator) {
    case '=':
      return within(predicate.value!);
    case 'in':
      return predicate.values!.some(within);
    case '!=':
      return !(compareFilterValues(min, predicate.value!) === 0 && compareFilterValues(max, predicate.value!) === 0);
    case 'not in':
      return !(compareFilterValues(min, max) === 0 && predicate.values!.some((value) => compareFilterValues(min, value) === 0));
    case '<':
      return compareFilterValues(min, predicate.value!) !== 1 && compareFilterValues(min, predicate.value!) !== 0;
    case '<=':
      return compareFilterValues(min, predicate.value!) !== 1;
    case '>':
      return compareFilterValues(max, predicate.value!) !== -1 && compareFilterValues(max, predicate.value!) !== 0;
    default:
      return compareFilterValues(max, predicate.value!) !== -1;
  }
}

/** Whether a range of rows (a row group), its columns' ranges given, might hold a matching row. */
export function mayMatch(clauses: Clauses, ranges: (column: string) => ValueRange | undefined): boolean {
  return clauses.some((clause) => clause.every((predicate) => mayHold(predicate, ranges(predicate.column))));
}

type ValueKind = 'number' | 'string' | 'boolean';

/** What values a column of this type compares as, or a reason it cannot be filtered. */
function kindOfType(type: DataType): ValueKind | string {
  if (DataType.isDictionary(type)) return kindOfType(type.dictionary);
  if (DataType.isInt(type) || DataType.isFloat(type) || DataType.isDate(type) || DataType.isTimestamp(type)) return 'number';
  if (DataType.isUtf8(type) || DataType.isLargeUtf8(type)) return 'string';
  if (DataType.isBool(type)) return 'boolean';
  return `${type} columns cannot be filtered`;
}

function literalKind(value: FilterValue): ValueKind {
  return typeof value === 'bigint' ? 'number' : (typeof value as ValueKind);
}

/** Checks that every compared column exists in the block with values its literals can be compared to. */
function checkAgainst(block: Block, clauses: Clauses, where: string): void {
  for (const predicate of clauses.flat()) {
    const field = block.schema.fields.find((candidate) => candidate.name === predicate.column);
    if (!field) {
      throw filterError(where, `the filter names column '${predicate.column}', which is not there (the columns are: ${block.schema.fields.map((candidate) => candidate.name).join(', ') || 'none'})`);
    }
    if (predicate.operator === 'is null' || predicate.operator === 'is not null') continue;
    const kind = kindOfType(field.type);
    if (kind !== 'number' && kind !== 'string' && kind !== 'boolean') throw filterError(where, `column '${predicate.column}': ${kind}`);
    for (const value of predicate.values ?? [predicate.value!]) {
      if (literalKind(value) !== kind) {
        throw filterError(where, `column '${predicate.column}' holds ${field.type} values, compared with the ${typeof value} ${JSON.stringify(typeof value === 'bigint' ? `${value}n` : value)}`);
      }
    }
  }
}

/** A predicate's outcome for each row: 1 where it holds. */
function predicateMask(vector: Vector, predicate: Predicate, rows: number): Uint8Array {
  const mask = new Uint8Array(rows);
  const nulls = vector.nullCount > 0;
  if (predicate.operator === 'is null' || predicate.operator === 'is not null') {
    const wanted = predicate.operator === 'is null';
    for (let row = 0; row < rows; row++) mask[row] = (nulls && !vector.isValid(row)) === wanted ? 1 : 0;
    return mask;
  }
  const type = vector.type;
  // Plain numbers read as one typed array: far quicker than a get() per row.
  const direct = !DataType.isDictionary(type) && (DataType.isInt(type) || DataType.isFloat(type));
  const values = direct ? (vector.toArray() as ArrayLike<number | bigint>) : undefined;
  for (let row = 0; row < rows; row++) {
    if (nulls && !vector.isValid(row)) continue;
    const value = (values ? values[row] : vector.get(row)) as FilterValue | null;
    if (value !== null && holds(predicate, value)) mask[row] = 1;
  }
  return mask;
}

/** The rows of `block` that the filter keeps (the block itself when it keeps all). */
export function filterBlock(block: Block, clauses: Clauses, where: string): Block {
  if (clauses.some((clause) => clause.length === 0)) return block;
  const rows = block.numRows;
  if (clauses.length === 0 || rows === 0) return block.slice(0, 0);
  checkAgainst(block, clauses, where);
  const masks = new Map<Predicate, Uint8Array>();
  const keep = new Uint8Array(rows);
  for (const clause of clauses) {
    const clauseMask = new Uint8Array(rows).fill(1);
    for (const predicate of clause) {
      let mask = masks.get(predicate);
      if (!mask) {
        mask = predicateMask(block.getChild(predicate.column)!, predicate, rows);
        masks.set(predicate, mask);
      }
      for (let row = 0; row < rows; row++) clauseMask[row] &= mask[row];
    }
    for (let row = 0; row < rows; row++) keep[row] |= clauseMask[row];
  }
  let kept = 0;
  for (let row = 0; row < rows; row++) kept += keep[row];
  if (kept === rows) return block;
  const indices = new Int32Array(kept);
  for (let row = 0, next = 0; row < rows; row++) if (keep[row]) indices[next++] = row;
  return takeRows(block, indices);
}

/** Both filters: each clause of one with each of the other (AND of two ORs of ANDs). */
export function andFilters(left: Clauses, right: Clauses): Clauses {
  return left.flatMap((a) => right.map((b) => [...a, ...b]));
}

/** A checked filter in the form users write, to hand to a source's options. */
export function toRowFilter(clauses: Clauses): RowFilter {
  return clauses.map((clause) =>
    clause.map((predicate) => (predicate.values ? [predicate.column, predicate.operator, predicate.values] : predicate.value !== undefined ? [predicate.column, predicate.operator, predicate.value] : [predicate.column, predicate.operator]) as unknown as RowPredicate),
  );
}

/** Shown in plans: `FilterRows(lang = 'en' and score >= 0.5)`. */
export function describeFilter(clauses: Clauses): string {
  const show = (value: FilterValue) => (typeof value === 'string' ? `'${value}'` : typeof value === 'bigint' ? `${value}n` : String(value));
  const one = (predicate: Predicate) =>
    predicate.values ? `${predicate.column} ${predicate.operator} (${predicate.values.map(show).join(', ')})` : predicate.value !== undefined ? `${predicate.column} ${predicate.operator} ${show(predicate.value)}` : `${predicate.column} ${predicate.operator}`;
  return clauses.map((clause) => clause.map(one).join(' and ')).join(' or ');
}
