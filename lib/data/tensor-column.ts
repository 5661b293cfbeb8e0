/**
 * Tensor columns: a column whose every cell is an n-dimensional array (an image, an embedding, a
 * model's logits), kept as Arrow's canonical tensor extension types so that pyarrow, Ray and
 * other Arrow readers see tensors in what trellis writes:
 *
 * - `arrow.fixed_shape_tensor` when every cell has one shape: a FixedSizeList of the cells'
 *   elements, the shape in the field's metadata. A batch of N cells is one contiguous buffer, so
 *   a batch reaches a function as a single Tensor [N, ...shape] without a copy.
 * - `arrow.variable_shape_tensor` when shapes differ (images of their own sizes): a struct of the
 *   cell's elements (a List) and its shape (a FixedSizeList of int32, one per dimension).
 *
 * Cells come out as CPU Tensors (views of the block), so `.to('cuda:0')` moves one to a GPU.
 * Element types are the Tensor dtypes Arrow has: f32, f16, i8, u8, i32, i64.
 */
import {
  DataType, Field, FixedSizeList, Float16, Float32, Int32, Int64, Int8, List, Precision, Struct, Uint8, makeData, makeVector,
  type Data, type Vector,
} from 'apache-arrow';
import { InvalidArgumentError } from '../errors.js';
import { allocateHost, type DType, type HostArray } from '../gpu/dtype.js';
import { Tensor } from '../gpu/tensor.js';

export const FIXED_SHAPE_TENSOR = 'arrow.fixed_shape_tensor';
export const VARIABLE_SHAPE_TENSOR = 'arrow.variable_shape_tensor';
const EXTENSION_NAME = 'ARROW:extension:name';
const EXTENSION_METADATA = 'ARROW:extension:metadata';

export type TensorColumnInfo =
  | { kind: 'fixed'; shape: readonly number[]; dtype: DType }
  | { kind: 'variable'; ndim: number; dtype: DType };

const elementTypes: Partial<Record<DType, () => DataType>> = {
  f32: () => new Float32(),
  f16: () => new Float16(),
  i8: () => new Int8(),
  u8: () => new Uint8(),
  i32: () => new Int32(),
  i64: () => new Int64(),
};

function elementType(dtype: DType, column: string): DataType {
  const make = elementTypes[dtype];
  if (!make) {
    throw new InvalidArgumentError(
      `column '${column}' holds ${dtype} tensors, which Arrow has no type for; convert them to f32 or f16 first`,
      'ERR_DATA_TYPE',
    );
  }
  return make();
}

function dtypeOfElement(type: DataType): DType | undefined {
  if (DataType.isFloat(type)) return type.precision === Precision.SINGLE ? 'f32' : type.precision === Precision.HALF ? 'f16' : undefined;
  if (DataType.isInt(type)) {
    const { bitWidth, isSigned } = type as Int8;
    if (bitWidth === 8) return isSigned ? 'i8' : 'u8';
    if (bitWidth === 32 && isSigned) return 'i32';
    if (bitWidth === 64 && isSigned) return 'i64';
  }
  return undefined;
}

const product = (shape: readonly number[]) => shape.reduce((total, dimension) => total * dimension, 1);

/** Whether a field is a tensor column, and of what; undefined for any other column. */
export function tensorColumnInfo(field: Field): TensorColumnInfo | undefined {
  const name = field.metadata.get(EXTENSION_NAME);
  if (name !== FIXED_SHAPE_TENSOR && name !== VARIABLE_SHAPE_TENSOR) return undefined;
  let metadata: { shape?: unknown } = {};
  try {
    metadata = JSON.parse(field.metadata.get(EXTENSION_METADATA) || '{}') as { shape?: unknown };
  } catch {
    return undefined;
  }
  if (name === FIXED_SHAPE_TENSOR) {
    if (!DataType.isFixedSizeList(field.type)) return undefined;
    const shape = metadata.shape;
    const dtype = dtypeOfElement(field.type.children[0].type);
    if (!Array.isArray(shape) || !shape.every((dimension) => Number.isSafeInteger(dimension) && dimension >= 0)) return undefined;
    if (!dtype || product(shape as number[]) !== (field.type as FixedSizeList).listSize) return undefined;
    return { kind: 'fixed', shape: shape as number[], dtype };
  }
  if (!DataType.isStruct(field.type)) return undefined;
  const data = field.type.children.find((child) => child.name === 'data');
  const shape = field.type.children.find((child) => child.name === 'shape');
  if (!data || !shape || !DataType.isList(data.type) || !DataType.isFixedSizeList(shape.type)) return undefined;
  const dtype = dtypeOfElement(data.type.children[0].type);
  if (!dtype) return undefined;
  return { kind: 'variable', ndim: (shape.type as FixedSizeList).listSize, dtype };
}

export function fixedTensorField(name: string, dtype: DType, shape: readonly number[]): Field {
  const type = new FixedSizeList(product(shape), new Field('item', elementType(dtype, name), false));
  return new Field(name, type, true, new Map([[EXTENSION_NAME, FIXED_SHAPE_TENSOR], [EXTENSION_METADATA, JSON.stringify({ shape })]]));
}

export function variableTensorField(name: string, dtype: DType, ndim: number): Field {
  const type = new Struct([
    new Field('data', new List(new Field('item', elementType(dtype, name), false)), false),
    new Field('shape', new FixedSizeList(ndim, new Field('item', new Int32(), false)), false),
  ]);
  return new Field(name, type, true, new Map([[EXTENSION_NAME, VARIABLE_SHAPE_TENSOR], [EXTENSION_METADATA, '{}']]));
}

/** A CPU tensor's elements (a GPU tensor is copied to the host first). */
function hostData(tensor: Tensor): HostArray {
  return (tensor.device === 'cpu' ? tensor : tensor.cpu()).data;
}

/** One tensor [rows, ...cell shape] as a fixed-shape column of `rows` cells, sharing its memory. */
export function tensorToColumn(name: string, tensor: Tensor): { field: Field; vector: Vector } {
  if (tensor.shape.length < 2) {
    throw new InvalidArgumentError(`column '${name}': a tensor column needs a tensor of two or more dimensions [rows, ...], got [${tensor.shape.join(', ')}]`, 'ERR_DATA_TYPE');
  }
  const [rows, ...shape] = tensor.shape;
  const field = fixedTensorField(name, tensor.dtype, shape);
  const element = (field.type as FixedSizeList).children[0].type;
  const child = makeData({ type: element, length: tensor.numel, data: hostData(tensor) as never });
  const data = makeData({ type: field.type as FixedSizeList, length: rows, nullCount: 0, child });
  return { field, vector: makeVector(data) };
}

/** A 1-D tensor as a plain column of its elements (no tensor metadata: each cell is a number). */
export function tensorToPlainVector(name: string, tensor: Tensor): { field: Field; vector: Vector } {
  const element = elementType(tensor.dtype, name);
  const data = hostData(tensor);
  const vector = makeVector(makeData({ type: element as Int32, length: data.length, data: data as Int32Array }));
  return { field: new Field(name, element, true), vector };
}

function validity(cells: ReadonlyArray<Tensor | null | undefined>): { bitmap: Uint8Array | undefined; nulls: number } {
  let nulls = 0;
  const bitmap = new Uint8Array((cells.length + 7) >> 3);
  cells.forEach((cell, index) => {
    if (cell === null || cell === undefined) nulls++;
    else bitmap[index >> 3] |= 1 << (index & 7);
  });
  return { bitmap: nulls > 0 ? bitmap : undefined, nulls };
}

/**
 * Tensors (or nulls), a cell each, as a column: fixed-shape when they share a shape and a dtype
 * (their elements copied into one buffer), else variable-shape.
 */
export function tensorCellsToColumn(
  name: string,
  cells: ReadonlyArray<Tensor | null | undefined>,
  options: { variable?: boolean; like?: Field } = {},
): { field: Field; vector: Vector } {
  const present = cells.filter((cell): cell is Tensor => cell !== null && cell !== undefined);
  const bad = present.find((cell) => !(cell instanceof Tensor));
  if (bad !== undefined) throw new InvalidArgumentError(`column '${name}' mixes tensors with other values`, 'ERR_DATA_TYPE');
  if (present.length === 0) {
    if (options.like) return nullTensorColumn(options.like, cells.length);
    throw new InvalidArgumentError(`column '${name}': no tensor to take a type from`, 'ERR_DATA_TYPE');
  }
  const dtypes = new Set(present.map((cell) => cell.dtype));
  if (dtypes.size > 1) throw new InvalidArgumentError(`column '${name}' mixes tensors of dtypes ${[...dtypes].join(', ')}`, 'ERR_DATA_TYPE');
  const dtype = present[0].dtype;
  const { bitmap, nulls } = validity(cells);
  const shapeKey = (cell: Tensor) => cell.shape.join(',');
  const first = shapeKey(present[0]);
  if (!options.variable && present.every((cell) => shapeKey(cell) === first)) {
    const shape = present[0].shape;
    const field = fixedTensorField(name, dtype, shape);
    const size = product(shape);
    const values = allocateHost(dtype, size * cells.length);
    cells.forEach((cell, index) => {
      if (cell) (values as Uint8Array).set(hostData(cell) as Uint8Array, index * size);
    });
    const element = (field.type as FixedSizeList).children[0].type;
    const child = makeData({ type: element, length: values.length, data: values as never });
    const data = makeData({ type: field.type as FixedSizeList, length: cells.length, nullCount: nulls, nullBitmap: bitmap, child });
    return { field, vector: makeVector(data) };
  }
  const ndims = new Set(present.map((cell) => cell.shape.length));
  if (ndims.size > 1) throw new InvalidArgumentError(`column '${name}' mixes tensors of ${[...ndims].join(' and ')} dimensions`, 'ERR_DATA_TYPE');
  const ndim = present[0].shape.length;
  const field = variableTensorField(name, dtype, ndim);
  const offsets = new Int32Array(cells.length + 1);
  let total = 0;
  cells.forEach((cell, index) => {
    total += cell ? cell.numel : 0;
    if (total > 0x7fffffff) throw new InvalidArgumentError(`column '${name}': more than 2^31 elements in one block`, 'ERR_DATA_TYPE');
    offsets[index + 1] = total;
  });
  const values = allocateHost(dtype, total);
  const shapes = new Int32Array(cells.length * ndim);
  cells.forEach((cell, index) => {
    if (!cell) return;
    (values as Uint8Array).set(hostData(cell) as Uint8Array, offsets[index]);
    shapes.set(cell.shape, index * ndim);
  });
  const [dataField, shapeField] = (field.type as Struct).children;
  const element = dataField.type.children[0].type;
  const dataChild = makeData({
    type: dataField.type as List,
    length: cells.length,
    nullCount: 0,
    valueOffsets: offsets,
    child: makeData({ type: element, length: total, data: values as never }),
  });
  const shapeChild = makeData({
    type: shapeField.type as FixedSizeList,
    length: cells.length,
    nullCount: 0,
    child: makeData({ type: new Int32(), length: shapes.length, data: shapes }),
  });
  const data = makeData({ type: field.type as Struct, length: cells.length, nullCount: nulls, nullBitmap: bitmap, children: [dataChild, shapeChild] });
  return { field, vector: makeVector(data) };
}

/** A column of `length` null cells of a tensor field's type. */
function nullTensorColumn(field: Field, length: number): { field: Field; vector: Vector } {
  const info = tensorColumnInfo(field)!;
  const bitmap = new Uint8Array((length + 7) >> 3);
  if (info.kind === 'fixed') {
    const element = (field.type as FixedSizeList).children[0].type;
    const values = allocateHost(info.dtype, product(info.shape) * length);
    const child = makeData({ type: element, length: values.length, data: values as never });
    return { field, vector: makeVector(makeData({ type: field.type as FixedSizeList, length, nullCount: length, nullBitmap: bitmap, child })) };
  }
  const [dataField, shapeField] = (field.type as Struct).children;
  const dataChild = makeData({
    type: dataField.type as List,
    length,
    nullCount: 0,
    valueOffsets: new Int32Array(length + 1),
    child: makeData({ type: dataField.type.children[0].type, length: 0, data: allocateHost(info.dtype, 0) as never }),
  });
  const shapes = new Int32Array(length * info.ndim);
  const shapeChild = makeData({ type: shapeField.type as FixedSizeList, length, nullCount: 0, child: makeData({ type: new Int32(), length: shapes.length, data: shapes }) });
  return { field, vector: makeVector(makeData({ type: field.type as Struct, length, nullCount: length, nullBitmap: bitmap, children: [dataChild, shapeChild] })) };
}

/** A chunk's element values for its rows (Arrow slices a fixed-size list's child with it). */
function chunkValues(data: Data, cellSize: number): HostArray {
  const child = data.children[0];
  const values = child.values as unknown as HostArray;
  if (child.length === data.length * cellSize && values.length >= child.length) return values.subarray(0, child.length) as HostArray;
  // Not sliced alongside: start from the parent's offset.
  const start = data.offset * cellSize;
  return values.subarray(start, start + data.length * cellSize) as HostArray;
}

/** The cells of a tensor column, each a Tensor view of the block (null where the cell is null). */
export function columnTensorCells(vector: Vector, info: TensorColumnInfo): Array<Tensor | null> {
  const cells: Array<Tensor | null> = [];
  if (info.kind === 'fixed') {
    const size = product(info.shape);
    for (const chunk of vector.data) {
      const values = chunkValues(chunk, size);
      for (let row = 0; row < chunk.length; row++) {
        cells.push(chunk.getValid(row) ? Tensor.wrap(values.subarray(row * size, (row + 1) * size) as HostArray, info.dtype, info.shape) : null);
      }
    }
    return cells;
  }
  for (const chunk of vector.data) {
    const [dataChild, shapeChild] = chunk.children;
    const offsets = dataChild.valueOffsets as Int32Array;
    const elements = dataChild.children[0].values as unknown as HostArray;
    const elementOffset = dataChild.children[0].offset;
    const shapes = chunkValues(shapeChild, info.ndim) as Int32Array;
    for (let row = 0; row < chunk.length; row++) {
      if (!chunk.getValid(row)) {
        cells.push(null);
        continue;
      }
      // A sliced list's offsets are cut with it, but still count from the start of its child,
      // whose values begin at the child's own offset.
      const start = offsets[row] - elementOffset;
      const end = offsets[row + 1] - elementOffset;
      const shape = Array.from(shapes.subarray(row * info.ndim, (row + 1) * info.ndim));
      cells.push(Tensor.wrap(elements.subarray(start, end) as HostArray, info.dtype, shape));
    }
  }
  return cells;
}

/**
 * A fixed-shape column without nulls as one Tensor [rows, ...shape]: a view of the block when the
 * column is one buffer, else its chunks copied together. Undefined when cells may be null or
 * shapes differ (take the cells then).
 */
export function columnTensor(vector: Vector, info: TensorColumnInfo): Tensor | undefined {
  if (info.kind !== 'fixed' || vector.nullCount > 0) return undefined;
  const size = product(info.shape);
  const shape = [vector.length, ...info.shape];
  if (vector.data.length === 1) return Tensor.wrap(chunkValues(vector.data[0], size), info.dtype, shape);
  const values = allocateHost(info.dtype, vector.length * size);
  let offset = 0;
  for (const chunk of vector.data) {
    const chunkData = chunkValues(chunk, size);
    (values as Uint8Array).set(chunkData as Uint8Array, offset);
    offset += chunkData.length;
  }
  return Tensor.wrap(values, info.dtype, shape);
}

/** A tensor column's cells as nested arrays of numbers (for JSON and CSV writers, and show()). */
export function tensorToNested(tensor: Tensor): unknown {
  const flat = Array.from(tensor.toArray() as ArrayLike<number | bigint>);
  const build = (dimension: number, offset: number): unknown => {
    if (dimension === tensor.shape.length) return flat[offset];
    const stride = product(tensor.shape.slice(dimension + 1));
    return Array.from({ length: tensor.shape[dimension] }, (_, index) => build(dimension + 1, offset + index * stride));
  };
  return build(0, 0);
}

/**
 * One field for tensor columns that disagree across blocks: fixed shapes that differ become a
 * variable-shape column; undefined when they cannot meet (other dtypes or dimension counts).
 */
export function unifyTensorFields(name: string, infos: readonly TensorColumnInfo[]): Field | undefined {
  const dtypes = new Set(infos.map((info) => info.dtype));
  const ndims = new Set(infos.map((info) => (info.kind === 'fixed' ? info.shape.length : info.ndim)));
  if (dtypes.size > 1 || ndims.size > 1) return undefined;
  const [first] = infos;
  if (first.kind === 'fixed' && infos.every((info) => info.kind === 'fixed' && info.shape.join(',') === first.shape.join(','))) {
    return fixedTensorField(name, first.dtype, first.shape);
  }
  return variableTensorField(name, first.dtype, [...ndims][0]);
}
