/**
 * The `Tensor`: a view (shape, strides, element offset, dtype) of reference-counted GPU storage, plus its
 * autograd state. Ops record GPU work and return at once; only {@linkcode Tensor.toArray} and
 * {@linkcode Tensor.item} wait for the GPU.
 *
 * The methods are thin PyTorch-style wrappers over the functions in `ops/`; see those for the math.
 *
 * @example
 * ```ts
 * import { init, tensor } from "../mod.ts";
 * await init();
 * const x = tensor([[1, 2], [3, 4]], undefined, { requiresGrad: true });
 * const y = x.mul(x).sum();
 * y.backward();
 * console.log(await x.grad!.toArray()); // Float32Array [2, 4, 6, 8]
 * ```
 * @module
 */
import type { ArrayFor, DType } from "./dtype.ts";
import { byteSize } from "./dtype.ts";
import { getGpu } from "./gpu.ts";
import { pool } from "./memory.ts";
import type { GradNode } from "./autograd.ts";
import { track } from "./scope.ts";
import { f16ArrayToF32 } from "./half.ts";
import { runBackward } from "./backward.ts";
import * as ew from "./ops/elementwise.ts";
import * as red from "./ops/reduce.ts";
import * as shp from "./ops/shape.ts";
import { matmul } from "./ops/matmul.ts";
import { logSoftmax, softmax } from "./ops/softmax.ts";

/** Reference-counted GPU memory shared by a tensor and its views. */
export class Storage {
  /** The GPU buffer (its size is the pool's size class, at least `bytes`). */
  readonly buffer: GPUBuffer;
  /** Bytes requested. */
  readonly bytes: number;
  private refs = 1;

  /** Takes a buffer from the pool. */
  constructor(bytes: number) {
    this.bytes = bytes;
    this.buffer = pool.acquire(Math.max(bytes, 4));
  }

  /** One more owner. */
  retain(): void {
    this.refs++;
  }

  /** One owner fewer; the buffer returns to the pool with the last. */
  release(): void {
    if (--this.refs === 0) pool.release(this.buffer);
  }

  /** Number of owners (tensors and saved aliases). */
  get refCount(): number {
    return this.refs;
  }
}

/** A shape: a list of non-negative integer sizes. */
export type Shape = readonly number[];

/** Row-major strides of a shape. */
export function contiguousStrides(shape: Shape): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i];
  }
  return s;
}

/** Number of elements of a shape. */
export function numelOf(shape: Shape): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** `[2, 3]` → `"[2, 3]"`, for error messages. */
export function fmtShape(shape: Shape): string {
  return `[${shape.join(", ")}]`;
}

/** A multi-dimensional array on the GPU. Create tensors with `tensor`, `zeros`, `randn`, ... */
export class Tensor {
  /** Sizes of each dimension. */
  readonly shape: Shape;
  /** Element strides of each dimension (0 for broadcast dimensions). */
  readonly strides: Shape;
  /** First element's index in the storage. */
  readonly offset: number;
  /** Element type. */
  readonly dtype: DType;
  /** The GPU memory. */
  readonly storage: Storage;
  /** Whether gradients flow to this tensor. */
  requiresGrad = false;
  /** Accumulated gradient (leaves), set by `backward()`. */
  grad: Tensor | null = null;
  /** The op that made this tensor, while the graph is alive. */
  node: GradNode | null = null;
  /** True when no enclosing `scope` may dispose this tensor (parameters, gradients, optimizer state). */
  kept = false;
  /** Optional name (parameters), used in messages. */
  name?: string;
  /** Marks tensors for duck typing across module copies. */
  readonly isTensor = true;
  private disposedFlag = false;

  /** Low-level: wraps storage (retained by the caller). Use the creation functions instead. */
  constructor(storage: Storage, shape: Shape, dtype: DType, strides?: Shape, offset = 0, tracked = true) {
    this.storage = storage;
    this.shape = shape.slice();
    this.strides = strides ? strides.slice() : contiguousStrides(shape);
    this.offset = offset;
    this.dtype = dtype;
    if (tracked) track(this);
  }

  /** Allocates an uninitialised contiguous tensor. */
  static empty(shape: Shape, dtype: DType = "f32"): Tensor {
    for (const d of shape) {
      if (!Number.isInteger(d) || d < 0) {
        throw new Error(`Invalid shape ${fmtShape(shape)}: sizes must be integers ≥ 0`);
      }
    }
    return new Tensor(new Storage(byteSize(dtype, numelOf(shape))), shape, dtype);
  }

  /** Number of dimensions. */
  get ndim(): number {
    return this.shape.length;
  }

  /** Number of elements. */
  get numel(): number {
    return numelOf(this.shape);
  }

  /** True once disposed. */
  get disposed(): boolean {
    return this.disposedFlag;
  }

  /** True when the elements are laid out row-major without gaps. */
  get isContiguous(): boolean {
    let acc = 1;
    for (let i = this.shape.length - 1; i >= 0; i--) {
      if (this.shape[i] !== 1 && this.strides[i] !== acc) return false;
      acc *= this.shape[i];
    }
    return true;
  }

  /** The GPU buffer; throws a clear error if this tensor was disposed. */
  get buffer(): GPUBuffer {
    this.assertAlive();
    return this.storage.buffer;
  }

  /** Throws if disposed. */
  assertAlive(op?: string): void {
    if (this.disposedFlag) {
      throw new Error(
        `${op ? `${op}: ` : ""}tensor${this.name ? ` "${this.name}"` : ""} of shape ${
          fmtShape(this.shape)
        } was already disposed (by dispose(), a \`using\` block or the end of a scope())`,
      );
    }
  }

  /** Releases this handle's GPU memory (views and saved copies keep the storage alive). Idempotent. */
  dispose(): void {
    if (this.disposedFlag) return;
    this.disposedFlag = true;
    this.storage.release();
  }

  /** `using t = ...` disposes at the end of the block. */
  [Symbol.dispose](): void {
    this.dispose();
  }

  /** A new handle on the same storage and view (used to save tensors for backward). Not tracked by scopes. */
  alias(): Tensor {
    this.assertAlive();
    this.storage.retain();
    const t = new Tensor(this.storage, this.shape, this.dtype, this.strides, this.offset, false);
    t.kept = true;
    t.name = this.name;
    return t;
  }

  /** A view with another shape/strides/offset on the same storage. */
  viewOf(shape: Shape, strides: Shape, offset: number): Tensor {
    this.assertAlive();
    this.storage.retain();
    return new Tensor(this.storage, shape, this.dtype, strides, offset);
  }

  /** Keeps this tensor beyond enclosing scopes. */
  keep(): this {
    this.kept = true;
    return this;
  }

  /** Sets `requiresGrad` in place (like `requires_grad_`). Only float tensors can require gradients. */
  requiresGrad_(on = true): this {
    if (on && this.dtype !== "f32" && this.dtype !== "f16") {
      throw new Error(`Only float tensors can require gradients; this one is ${this.dtype}`);
    }
    this.requiresGrad = on;
    return this;
  }

  /** A tensor sharing data with this one but outside the graph. */
  detach(): Tensor {
    return this.viewOf(this.shape, this.strides, this.offset);
  }

  /** Drops the gradient. */
  zeroGrad(): void {
    this.grad?.dispose();
    this.grad = null;
  }

  /** Back-propagates from this tensor; a non-scalar needs `grad` of its shape. */
  backward(grad?: Tensor): void {
    runBackward(this, grad);
  }

  /** Copies the values to the CPU (f16 is widened to f32). Waits for the GPU (~11 ms round trip). */
  async toArray(): Promise<ArrayFor<DType>> {
    this.assertAlive("toArray");
    const src = this.isContiguous ? this : shp.contiguous(this);
    try {
      const gpu = getGpu();
      const n = this.numel;
      const isz = src.dtype === "f16" ? 2 : 4;
      const raw = await gpu.read(src.storage.buffer, src.offset * isz, n * isz);
      switch (src.dtype) {
        case "f16":
          return f16ArrayToF32(new Uint16Array(raw));
        case "i32":
          return new Int32Array(raw);
        case "u32":
          return new Uint32Array(raw);
        default:
          return new Float32Array(raw);
      }
    } finally {
      if (src !== this) src.dispose();
    }
  }

  /** The value of a one-element tensor. */
  async item(): Promise<number> {
    if (this.numel !== 1) throw new Error(`item() needs a one-element tensor, got shape ${fmtShape(this.shape)}`);
    return (await this.toArray())[0];
  }

  /** A readable summary (does not read the data). */
  toString(): string {
    return `Tensor(${fmtShape(this.shape)}, ${this.dtype}${this.requiresGrad ? ", requiresGrad" : ""})`;
  }

  // ---- elementwise -------------------------------------------------------------------------------------------
  /** `this + other`, broadcasting. */
  add(other: Tensor | number): Tensor {
    return ew.add(this, other);
  }
  /** `this - other`, broadcasting. */
  sub(other: Tensor | number): Tensor {
    return ew.sub(this, other);
  }
  /** `this * other`, broadcasting. */
  mul(other: Tensor | number): Tensor {
    return ew.mul(this, other);
  }
  /** `this / other`, broadcasting. */
  div(other: Tensor | number): Tensor {
    return ew.div(this, other);
  }
  /** `this ** exponent` (scalar exponent). */
  pow(exponent: number): Tensor {
    return ew.pow(this, exponent);
  }
  /** `-this`. */
  neg(): Tensor {
    return ew.neg(this);
  }
  /** `e^this`. */
  exp(): Tensor {
    return ew.exp(this);
  }
  /** Natural logarithm. */
  log(): Tensor {
    return ew.log(this);
  }
  /** Square root. */
  sqrt(): Tensor {
    return ew.sqrt(this);
  }
  /** `1 / sqrt(this)`. */
  rsqrt(): Tensor {
    return ew.rsqrt(this);
  }
  /** Hyperbolic tangent. */
  tanh(): Tensor {
    return ew.tanh(this);
  }
  /** Logistic sigmoid. */
  sigmoid(): Tensor {
    return ew.sigmoid(this);
  }
  /** `x · sigmoid(x)`. */
  silu(): Tensor {
    return ew.silu(this);
  }
  /** `max(x, 0)`. */
  relu(): Tensor {
    return ew.relu(this);
  }
  /** Gaussian error linear unit (exact, erf-based, like PyTorch's default). */
  gelu(): Tensor {
    return ew.gelu(this);
  }
  /** `x²`. */
  square(): Tensor {
    return ew.square(this);
  }
  /** `|x|`. */
  abs(): Tensor {
    return ew.abs(this);
  }
  /** Converts to another dtype (a copy; differentiable between float dtypes). */
  to(dtype: DType): Tensor {
    return ew.cast(this, dtype);
  }

  // ---- reductions --------------------------------------------------------------------------------------------
  /** Sum over `axis` (all axes when omitted). */
  sum(axis?: number | number[], keepdim = false): Tensor {
    return red.sum(this, axis, keepdim);
  }
  /** Mean over `axis` (all axes when omitted). */
  mean(axis?: number | number[], keepdim = false): Tensor {
    return red.mean(this, axis, keepdim);
  }
  /** Maximum over `axis` (all axes when omitted). */
  max(axis?: number | number[], keepdim = false): Tensor {
    return red.max(this, axis, keepdim);
  }

  // ---- linear algebra & normalisation ------------------------------------------------------------------------
  /** Matrix product (batched, broadcasting batch dims). */
  matmul(other: Tensor): Tensor {
    return matmul(this, other);
  }
  /** Softmax over `axis` (default last). */
  softmax(axis = -1): Tensor {
    return softmax(this, axis);
  }
  /** Log-softmax over `axis` (default last). */
  logSoftmax(axis = -1): Tensor {
    return logSoftmax(this, axis);
  }

  // ---- shape -------------------------------------------------------------------------------------------------
  /** Same data, another shape (a view when contiguous, else a copy). One size may be -1. */
  reshape(...shape: number[] | [number[]]): Tensor {
    return shp.reshape(this, flatArgs(shape));
  }
  /** Same data, another shape; a view, never a copy (errors when not contiguous). */
  view(...shape: number[] | [number[]]): Tensor {
    return shp.view(this, flatArgs(shape));
  }
  /** Swaps two dimensions (a view). */
  transpose(dim0 = -2, dim1 = -1): Tensor {
    return shp.transpose(this, dim0, dim1);
  }
  /** Reorders dimensions (a view). */
  permute(...dims: number[] | [number[]]): Tensor {
    return shp.permute(this, flatArgs(dims));
  }
  /** Elements `start..end` (exclusive) along `dim` (a view). */
  slice(dim: number, start: number, end?: number): Tensor {
    return shp.slice(this, dim, start, end);
  }
  /** Broadcasts size-1 dimensions to `shape` (a view; -1 keeps a size). */
  expand(...shape: number[] | [number[]]): Tensor {
    return shp.expand(this, flatArgs(shape));
  }
  /** Inserts a size-1 dimension at `dim`. */
  unsqueeze(dim: number): Tensor {
    return shp.unsqueeze(this, dim);
  }
  /** Removes size-1 dimension `dim`. */
  squeeze(dim: number): Tensor {
    return shp.squeeze(this, dim);
  }
  /** A row-major copy when the layout is not already row-major (else a view). */
  contiguous(): Tensor {
    return shp.contiguous(this);
  }
  /** Flattens all dimensions into one. */
  flatten(): Tensor {
    return shp.reshape(this, [this.numel]);
  }
}

function flatArgs(a: number[] | [number[]]): number[] {
  return Array.isArray(a[0]) ? (a[0] as number[]) : (a as number[]);
}
