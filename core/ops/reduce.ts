/**
 * Differentiable reductions: `sum`, `mean`, `max` over one or more axes (keepdim optional), and `sumTo`, which
 * folds a broadcast gradient back to an input's shape. Results are f32 for f32 inputs and keep f16 for f16 inputs
 * (accumulation is f32 in both cases).
 *
 * @example
 * ```ts
 * import { mean, sum } from "./reduce.ts";
 * const total = sum(x);            // all elements
 * const rowMeans = mean(x, -1, true); // [rows, 1]
 * ```
 * @module
 */
import { getGpu, type Kernel } from "../gpu.ts";
import { reduceKernel } from "../kernels/reduce.ts";
import { gridFor, rowGrid, UniformWriter } from "../kernels/common.ts";
import { record } from "../autograd.ts";
import { fmtShape, numelOf, type Shape, Tensor } from "../tensor.ts";
import { contiguous, expand, permute, reshape } from "./shape.ts";
import { cast } from "./elementwise.ts";
import { elementwise } from "./dispatch.ts";

/** Normalises axis arguments: negative axes count from the end; `undefined` means all. Sorted, unique. */
export function normAxes(axis: number | number[] | undefined, ndim: number, op: string): number[] {
  if (axis === undefined) return [...Array(ndim).keys()];
  const list = Array.isArray(axis) ? axis : [axis];
  const out = list.map((a) => {
    const b = a < 0 ? a + ndim : a;
    if (!Number.isInteger(b) || b < 0 || b >= Math.max(ndim, 1)) {
      throw new Error(`${op}: axis ${a} is out of range for a tensor with ${ndim} dimensions`);
    }
    return b;
  });
  return [...new Set(out)].sort((x, y) => x - y);
}

const kernels = new Map<string, Kernel>();

/** Reduces contiguous `x` viewed as [outer, n, inner] over the middle axis into a new f32 tensor of `shape`. */
function reduce3(
  op: "sum" | "max",
  x: Tensor,
  outer: number,
  n: number,
  inner: number,
  scale: number,
  shape: Shape,
): Tensor {
  if (inner === 1 && outer <= 64 && n >= 65536) {
    // Few long rows: split each over several workgroups, then combine the partial results.
    const parts = Math.min(256, Math.ceil(n / 16384));
    using partial = reduceRows(op, x, outer, n, parts, 1, [outer * parts]);
    return reduceRows(op, partial, outer, parts, 1, scale, shape);
  }
  if (inner === 1) return reduceRows(op, x, outer, n, 1, scale, shape);
  const y = Tensor.empty(shape, "f32");
  if (outer * inner === 0) return y;
  const key = `${op}|${x.dtype}|false`;
  const gpu = getGpu();
  let k = kernels.get(key);
  if (!k) kernels.set(key, k = gpu.kernel(reduceKernel({ op, input: x.dtype, out: "f32", rows: false })));
  const u = new UniformWriter(8).u(0, outer).u(1, n).u(2, inner).u(3, x.offset).f(4, scale).u(5, 1);
  gpu.dispatch(k, [x.storage.buffer, y.storage.buffer], u.u32, gridFor(outer * inner, 256));
  return y;
}

/** Reduces each of `outer` contiguous rows of length `n`, each split over `parts` workgroups (→ outer·parts values). */
function reduceRows(
  op: "sum" | "max",
  x: Tensor,
  outer: number,
  n: number,
  parts: number,
  scale: number,
  shape: Shape,
): Tensor {
  const y = Tensor.empty(shape, "f32");
  if (outer === 0) return y;
  const key = `${op}|${x.dtype}|true`;
  const gpu = getGpu();
  let k = kernels.get(key);
  if (!k) kernels.set(key, k = gpu.kernel(reduceKernel({ op, input: x.dtype, out: "f32", rows: true })));
  const u = new UniformWriter(8).u(0, outer).u(1, n).u(2, 1).u(3, x.offset).f(4, scale).u(5, parts);
  gpu.dispatch(k, [x.storage.buffer, y.storage.buffer], u.u32, rowGrid(outer * parts));
  return y;
}

/** Reduces over `axes` without recording a gradient; the result is f32, shaped with or without kept dims. */
function reduceRaw(op: "sum" | "max", x: Tensor, axes: number[], keepdim: boolean, mean: boolean): Tensor {
  const outShape = x.shape.map((d, i) => (axes.includes(i) ? 1 : d));
  const finalShape = keepdim ? outShape : x.shape.filter((_, i) => !axes.includes(i));
  const n = axes.reduce((acc, a) => acc * x.shape[a], 1);
  const scale = mean ? 1 / n : 1;
  const consecutive = axes.every((a, i) => i === 0 || a === axes[i - 1] + 1);
  if (consecutive && x.isContiguous) {
    const outer = numelOf(x.shape.slice(0, axes[0] ?? 0));
    const inner = numelOf(x.shape.slice((axes[axes.length - 1] ?? -1) + 1));
    return reduce3(op, x, outer, axes.length ? n : 1, inner, scale, finalShape);
  }
  // Move the reduced axes last, make that layout row-major, and reduce rows.
  const keepAxes = [...x.shape.keys()].filter((i) => !axes.includes(i));
  using p = permute(x, [...keepAxes, ...axes]);
  using c = contiguous(p);
  return reduce3(op, c, numelOf(keepAxes.map((i) => x.shape[i])), n, 1, scale, finalShape);
}

function finish(y: Tensor, like: Tensor): Tensor {
  if (like.dtype !== "f16") return y;
  const h = cast(y, "f16");
  y.dispose();
  return h;
}

/**
 * Sum over `axis` (all when omitted).
 *
 * @example
 * ```ts
 * const s = sum(x, 0);
 * ```
 */
export function sum(x: Tensor, axis?: number | number[], keepdim = false): Tensor {
  x.assertAlive("sum");
  const axes = normAxes(axis, x.ndim, "sum");
  const y = finish(reduceRaw("sum", x, axes, keepdim, false), x);
  return record(y, "sum", [x], [], (g) => [expandBack(g, x.shape, axes, keepdim)]);
}

/**
 * Mean over `axis` (all when omitted).
 *
 * @example
 * ```ts
 * const m = mean(x, -1, true);
 * ```
 */
export function mean(x: Tensor, axis?: number | number[], keepdim = false): Tensor {
  x.assertAlive("mean");
  const axes = normAxes(axis, x.ndim, "mean");
  const n = axes.reduce((acc, a) => acc * x.shape[a], 1);
  const y = finish(reduceRaw("sum", x, axes, keepdim, true), x);
  return record(y, "mean", [x], [], (g) => {
    using e = expandBack(g, x.shape, axes, keepdim);
    return [elementwise("scale", "a * p.c0", [e], { out: g.dtype, c0: 1 / n })];
  });
}

/**
 * Maximum over `axis` (all when omitted). The gradient is shared equally by tied maxima (like `torch.amax`).
 *
 * @example
 * ```ts
 * const m = max(scores, -1, true);
 * ```
 */
export function max(x: Tensor, axis?: number | number[], keepdim = false): Tensor {
  x.assertAlive("max");
  const axes = normAxes(axis, x.ndim, "max");
  const y = finish(reduceRaw("max", x, axes, keepdim, false), x);
  return record(y, "max", [x], [x, y], (g, [sx, sy]) => {
    using yk = expandBack(sy, x.shape, axes, keepdim);
    using hit = elementwise("is_max", "select(0.0, 1.0, a == b)", [sx, yk], { out: "f32" });
    using count = reduceRaw("sum", hit, axes, true, false);
    using gk = expandBack(g, x.shape, axes, keepdim);
    return [elementwise("max_grad", "a * b / c", [gk, hit, count], { out: g.dtype })];
  });
}

/** Broadcasts a reduced tensor back over the reduced axes (a view). */
function expandBack(g: Tensor, shape: Shape, axes: number[], keepdim: boolean): Tensor {
  const kept = shape.map((d, i) => (axes.includes(i) ? 1 : d));
  using r = keepdim ? g.detach() : reshape(g, kept);
  using e = expand(r, [...shape]);
  return contiguous(e);
}

/**
 * Sums a (broadcast) gradient down to `shape`: leading extra dims and dims where `shape` has 1 are summed.
 * Returns `g` itself when the shapes already match.
 *
 * @example
 * ```ts
 * const gb = sumTo(g, [1, 64]); // bias gradient from [batch, 64]
 * ```
 */
export function sumTo(g: Tensor, shape: Shape): Tensor {
  if (g.shape.length === shape.length && g.shape.every((d, i) => d === shape[i])) return g;
  const lead = g.ndim - shape.length;
  if (lead < 0) throw new Error(`sumTo: cannot reduce ${fmtShape(g.shape)} to ${fmtShape(shape)}`);
  const axes: number[] = [];
  for (let i = 0; i < g.ndim; i++) {
    if (i < lead || (shape[i - lead] === 1 && g.shape[i] !== 1)) axes.push(i);
  }
  const y = reduceRaw("sum", g, axes, true, false);
  const out = reshape(y, [...shape]);
  y.dispose();
  if (g.dtype === "f16") {
    const h = cast(out, "f16");
    out.dispose();
    return h;
  }
  return out;
}
