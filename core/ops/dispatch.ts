/**
 * Running elementwise kernels on tensors: output shape by broadcasting, per-input addressing mode, uniform
 * packing, and a cache from the (cheap) kernel key to the compiled kernel so the WGSL is generated once.
 *
 * @example
 * ```ts
 * import { elementwise } from "./dispatch.ts";
 * const y = elementwise("axpy", "a * p.c0 + b", [x, z], { out: "f32", c0: 2 });
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import { getGpu, type Kernel } from "../gpu.ts";
import { elementwiseKernel, ewUniformLayout, type InputMode, MAX_RANK } from "../kernels/elementwise.ts";
import { gridFor, UniformWriter } from "../kernels/common.ts";
import { fmtShape, numelOf, type Shape, Tensor } from "../tensor.ts";

/** Options of {@linkcode elementwise}. */
export interface EwOptions {
  /** Output dtype. */
  out: DType;
  /** Arithmetic type (default f32). */
  compute?: "f32" | "i32" | "u32";
  /** Scalar constant `p.c0` (f32, or integer bits when listed in `intConsts`). */
  c0?: number;
  /** Scalar constant `p.c1`. */
  c1?: number;
  /** Scalar constant `p.c2`. */
  c2?: number;
  /** Scalar constant `p.c3`. */
  c3?: number;
  /** Which constants (0–3) hold integer bits (read them with `bitcast<i32>(p.c0)` / `bitcast<u32>(p.c0)`). */
  intConsts?: number[];
  /** Extra WGSL helpers. */
  helpers?: string;
  /** Output shape (default: the inputs' broadcast shape). */
  shape?: Shape;
}

/** The broadcast shape of several shapes (NumPy rules); throws naming the shapes when incompatible. */
export function broadcastShapes(shapes: Shape[], op = "broadcast"): number[] {
  const rank = Math.max(0, ...shapes.map((s) => s.length));
  const out = new Array<number>(rank).fill(1);
  for (const s of shapes) {
    for (let i = 0; i < s.length; i++) {
      const d = s[s.length - 1 - i];
      const j = rank - 1 - i;
      if (d === out[j] || d === 1) continue;
      if (out[j] === 1) out[j] = d;
      else throw new Error(`${op}: shapes ${shapes.map(fmtShape).join(" and ")} cannot be broadcast together`);
    }
  }
  return out;
}

/** Strides with which `t` is read as `shape` (0 on broadcast dimensions). */
export function broadcastStrides(t: Tensor, shape: Shape): number[] {
  const out = new Array<number>(shape.length).fill(0);
  const k = shape.length - t.shape.length;
  for (let i = 0; i < t.shape.length; i++) out[k + i] = t.shape[i] === 1 ? 0 : t.strides[i];
  return out;
}

function sameShape(a: Shape, b: Shape): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

function modeOf(t: Tensor, shape: Shape): InputMode {
  if (t.numel === 1) return "scalar";
  if (sameShape(t.shape, shape) && t.isContiguous) return "contiguous";
  return "strided";
}

const kernelCache = new Map<string, Kernel>();

/** Runs an elementwise expression over tensors `a`, `b`, `c`, `d` into a new tensor. Records no gradient. */
export function elementwise(name: string, expr: string, inputs: Tensor[], opts: EwOptions): Tensor {
  for (const t of inputs) t.assertAlive(name);
  const shape = opts.shape ?? broadcastShapes(inputs.map((t) => t.shape), name);
  const out = Tensor.empty(shape, opts.out);
  const numel = numelOf(shape);
  if (numel === 0) return out;
  if (shape.length > MAX_RANK) throw new Error(`${name}: at most ${MAX_RANK} dimensions, got ${fmtShape(shape)}`);
  const modes = inputs.map((t) => modeOf(t, shape));
  const rank = Math.max(shape.length, 1);
  const key = `${name}|${expr}|${opts.out}|${opts.compute}|${rank}|${
    inputs.map((t, i) => t.dtype + modes[i]).join(",")
  }|${opts.helpers ?? ""}`;
  const gpu = getGpu();
  let k = kernelCache.get(key);
  if (!k) {
    k = gpu.kernel(elementwiseKernel({
      name,
      inputs: inputs.map((t, i) => ({ dtype: t.dtype, mode: modes[i] })),
      out: opts.out,
      rank,
      expr,
      compute: opts.compute,
      helpers: opts.helpers,
    }));
    kernelCache.set(key, k);
  }
  const L = ewUniformLayout(inputs.length);
  const u = new UniformWriter(L.words);
  const s = shape.length ? shape : [1];
  for (let d = 0; d < s.length; d++) u.u(L.shape + d, s[d]);
  inputs.forEach((t, i) => {
    if (modes[i] === "strided") {
      const st = broadcastStrides(t, shape);
      for (let d = 0; d < st.length; d++) u.u(L.strides(i) + d, st[d]);
    }
    u.u(L.offsets(i), t.offset);
  });
  u.u(L.numel, numel);
  [opts.c0, opts.c1, opts.c2, opts.c3].forEach((v, i) => {
    if (opts.intConsts?.includes(i)) u.u(L.c0 + i, (v ?? 0) >>> 0);
    else u.f(L.c0 + i, v ?? 0);
  });
  const threads = opts.out === "f16" ? Math.ceil(numel / 2) : numel;
  gpu.dispatch(k, [...inputs.map((t) => t.storage.buffer), out.storage.buffer], u.u32, gridFor(threads, 256));
  return out;
}
