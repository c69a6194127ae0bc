/**
 * Creating tensors: from JavaScript data, constants, ranges, seeded random draws, and safetensors files.
 *
 * @example
 * ```ts
 * import { arange, randn, tensor, zeros } from "./creation.ts";
 * const a = tensor([[1, 2, 3], [4, 5, 6]]);            // f32 [2, 3]
 * const ids = tensor([5, 9, 2], undefined, { dtype: "i32" });
 * const w = randn([64, 32], { std: 0.02, seed: 1, requiresGrad: true });
 * const z = zeros([8], { dtype: "f16" });
 * const r = arange(10);
 * ```
 * @module
 */
import { checkDType, type DType, type TensorData } from "./dtype.ts";
import { getGpu } from "./gpu.ts";
import { f32ArrayToF16 } from "./half.ts";
import { nextDraw, RNG_WGSL } from "./random.ts";
import { fmtShape, numelOf, type Shape, Tensor } from "./tensor.ts";
import { elementwise } from "./ops/dispatch.ts";
import { parseSafetensorsHeader, readSafetensorsHeader, readTensorData } from "./safetensors.ts";

/** Options shared by the creation functions. */
export interface CreateOptions {
  /** Element type (default f32, or inferred from a typed array). */
  dtype?: DType;
  /** Track gradients for this tensor (a leaf). */
  requiresGrad?: boolean;
}

/** Nested arrays of numbers, e.g. `[[1, 2], [3, 4]]`. */
export type NestedArray = number | NestedArray[];

function finish(t: Tensor, opts: CreateOptions): Tensor {
  if (opts.requiresGrad) t.requiresGrad_(true);
  return t;
}

function inferShape(data: NestedArray): number[] {
  const shape: number[] = [];
  let v: NestedArray = data;
  while (Array.isArray(v)) {
    shape.push(v.length);
    v = v[0];
  }
  return shape;
}

function flatten(data: NestedArray, shape: number[], out: number[], depth = 0): void {
  if (depth === shape.length) {
    if (typeof data !== "number") throw new Error(`tensor(): expected a number at depth ${depth}, got ${typeof data}`);
    out.push(data);
    return;
  }
  if (!Array.isArray(data) || data.length !== shape[depth]) {
    throw new Error(`tensor(): ragged nested array: expected ${shape[depth]} items at depth ${depth}`);
  }
  for (const x of data) flatten(x, shape, out, depth + 1);
}

function dtypeOfArray(a: TensorData): DType {
  if (a instanceof Int32Array) return "i32";
  if (a instanceof Uint32Array) return "u32";
  if (a instanceof Uint16Array) return "f16";
  return "f32";
}

/**
 * Uploads typed-array data as a tensor of `shape`. A Uint16Array is taken as f16 bits; other arrays are converted
 * to `dtype` when it differs.
 */
export function fromArray(data: TensorData, shape: Shape, opts: CreateOptions = {}): Tensor {
  const dtype = checkDType(opts.dtype ?? dtypeOfArray(data));
  if (numelOf(shape) !== data.length) {
    throw new Error(
      `tensor(): ${data.length} values do not fill shape ${fmtShape(shape)} (${numelOf(shape)} elements)`,
    );
  }
  let payload: ArrayBufferView;
  if (dtype === "f16") {
    payload = data instanceof Uint16Array
      ? data
      : f32ArrayToF16(data instanceof Float32Array ? data : Float32Array.from(data));
  } else if (dtype === "f32") {
    payload = data instanceof Float32Array ? data : data instanceof Uint16Array ? badF16() : Float32Array.from(data);
  } else if (dtype === "i32") {
    payload = data instanceof Int32Array ? data : Int32Array.from(data);
  } else {
    payload = data instanceof Uint32Array ? data : Uint32Array.from(data);
  }
  const t = Tensor.empty(shape, dtype);
  if (payload.byteLength > 0) getGpu().write(t.storage.buffer, 0, payload);
  return finish(t, opts);
}

function badF16(): never {
  throw new Error("tensor(): a Uint16Array holds f16 bits; pass dtype 'f16' (convert it with .to('f32') on the GPU)");
}

/**
 * A tensor from a number, nested arrays or a typed array. `shape` defaults to the nesting (or 1-D for typed arrays).
 *
 * @example
 * ```ts
 * const x = tensor([[1, 2], [3, 4]], undefined, { requiresGrad: true });
 * const y = tensor(new Float32Array(6), [2, 3]);
 * ```
 */
export function tensor(data: NestedArray | TensorData, shape?: Shape, opts: CreateOptions = {}): Tensor {
  if (ArrayBuffer.isView(data)) return fromArray(data as TensorData, shape ?? [data.length], opts);
  const inferred = inferShape(data);
  const flat: number[] = [];
  flatten(data, inferred, flat);
  const dtype = opts.dtype ?? "f32";
  const arr = dtype === "i32"
    ? Int32Array.from(flat)
    : dtype === "u32"
    ? Uint32Array.from(flat)
    : Float32Array.from(flat);
  return fromArray(arr, shape ?? inferred, { ...opts, dtype });
}

/**
 * A tensor filled with `value`.
 *
 * @example
 * ```ts
 * const mask = full([4, 4], -1e9);
 * ```
 */
export function full(shape: Shape, value: number, opts: CreateOptions = {}): Tensor {
  const dtype = checkDType(opts.dtype ?? "f32");
  const isInt = dtype === "i32" || dtype === "u32";
  const t = elementwise("fill", isInt ? `bitcast<${dtype}>(p.c0)` : "p.c0", [], {
    out: dtype,
    shape: [...shape],
    compute: isInt ? dtype : "f32",
    c0: value,
    intConsts: isInt ? [0] : [],
  });
  return finish(t, opts);
}

/** Zeros. @example `const z = zeros([2, 3]);` */
export function zeros(shape: Shape, opts: CreateOptions = {}): Tensor {
  return full(shape, 0, opts);
}

/** Ones. @example `const o = ones([2, 3], { dtype: "f16" });` */
export function ones(shape: Shape, opts: CreateOptions = {}): Tensor {
  return full(shape, 1, opts);
}

/** Zeros shaped and typed like `t`. @example `const z = zerosLike(x);` */
export function zerosLike(t: Tensor, opts: CreateOptions = {}): Tensor {
  return full(t.shape, 0, { dtype: t.dtype, ...opts });
}

/** Ones shaped and typed like `t`. @example `const o = onesLike(x);` */
export function onesLike(t: Tensor, opts: CreateOptions = {}): Tensor {
  return full(t.shape, 1, { dtype: t.dtype, ...opts });
}

/**
 * `start, start + step, ...` up to `end` (exclusive); with one argument, `0 .. end`.
 *
 * @example
 * ```ts
 * const positions = arange(0, 16, 1, { dtype: "i32" });
 * ```
 */
export function arange(start: number, end?: number, step = 1, opts: CreateOptions = {}): Tensor {
  const [s, e] = end === undefined ? [0, start] : [start, end];
  if (step === 0) throw new Error("arange: step must not be 0");
  const n = Math.max(0, Math.ceil((e - s) / step));
  const dtype = checkDType(opts.dtype ?? "f32");
  const isInt = dtype === "i32" || dtype === "u32";
  const t = elementwise(
    "arange",
    isInt ? `bitcast<i32>(p.c0) + i32(idx) * bitcast<i32>(p.c1)` : "p.c0 + f32(idx) * p.c1",
    [],
    {
      out: dtype,
      shape: [n],
      compute: isInt ? "i32" : "f32",
      c0: s,
      c1: step,
      intConsts: isInt ? [0, 1] : [],
    },
  );
  return finish(t, opts);
}

/** Options of the random creation functions. */
export interface RandomOptions extends CreateOptions {
  /** Seed for this draw; by default the global generator (`manualSeed`) supplies one. */
  seed?: number;
}

function drawKey(opts: RandomOptions): { seed: number; offset: number } {
  return opts.seed === undefined ? nextDraw() : { seed: opts.seed >>> 0, offset: 0 };
}

/**
 * Normal samples `mean + std · N(0, 1)` (Box–Muller on the GPU; reproducible for a seed).
 *
 * @example
 * ```ts
 * const w = randn([4096, 16], { std: 0.02, seed: 7 });
 * ```
 */
export function randn(shape: Shape, opts: RandomOptions & { mean?: number; std?: number } = {}): Tensor {
  const dtype = checkDType(opts.dtype ?? "f32");
  const { seed, offset } = drawKey(opts);
  const t = elementwise("randn", "p.c2 + p.c3 * rngNormal(bitcast<u32>(p.c0), bitcast<u32>(p.c1) + idx)", [], {
    out: dtype,
    shape: [...shape],
    c0: seed,
    c1: offset,
    c2: opts.mean ?? 0,
    c3: opts.std ?? 1,
    intConsts: [0, 1],
    helpers: RNG_WGSL,
  });
  return finish(t, opts);
}

/**
 * Uniform samples in `[low, high)` (default [0, 1)).
 *
 * @example
 * ```ts
 * const u = rand([10], { low: -1, high: 1, seed: 3 });
 * ```
 */
export function rand(shape: Shape, opts: RandomOptions & { low?: number; high?: number } = {}): Tensor {
  const dtype = checkDType(opts.dtype ?? "f32");
  const { seed, offset } = drawKey(opts);
  const low = opts.low ?? 0, high = opts.high ?? 1;
  const t = elementwise("rand", "p.c2 + p.c3 * rngUniform(bitcast<u32>(p.c0), bitcast<u32>(p.c1) + idx)", [], {
    out: dtype,
    shape: [...shape],
    c0: seed,
    c1: offset,
    c2: low,
    c3: high - low,
    intConsts: [0, 1],
    helpers: RNG_WGSL,
  });
  return finish(t, opts);
}

/**
 * Loads every tensor of a safetensors file (a path, or the file's bytes) onto the GPU, converting to `dtype`
 * when given (bf16 becomes f32 unless `dtype` says f16).
 *
 * @example
 * ```ts
 * const tensors = await fromSafetensors("model.safetensors", { dtype: "f16" });
 * const wq = tensors.get("model.layers.0.self_attn.q_proj.weight")!;
 * ```
 */
export async function fromSafetensors(
  source: string | Uint8Array,
  opts: { dtype?: DType } = {},
): Promise<Map<string, Tensor>> {
  const header = typeof source === "string" ? await readSafetensorsHeader(source) : parseSafetensorsHeader(source);
  const out = new Map<string, Tensor>();
  for (const e of header.entries) {
    const isFloat = ["F64", "F32", "F16", "BF16"].includes(e.dtype);
    const dtype: DType = isFloat ? (opts.dtype ?? (e.dtype === "F16" ? "f16" : "f32")) : (opts.dtype ?? "i32");
    const as = dtype === "f16" ? "f16" : dtype === "f32" ? "f32" : "i32";
    const data = await readTensorData(source, e, { as }) as TensorData;
    const t = fromArray(data, e.shape, { dtype });
    t.name = e.name;
    out.set(e.name, t);
  }
  return out;
}
