/**
 * Shape ops. `reshape`, `view`, `permute`, `transpose`, `slice`, `expand`, `squeeze` and `unsqueeze` return views
 * (no copy) whenever the layout allows; `contiguous` copies into row-major order when needed; `cat` copies its
 * inputs into one new tensor. All are differentiable.
 *
 * @example
 * ```ts
 * import { cat, permute, slice } from "./shape.ts";
 * const heads = permute(x.reshape(B, T, H, D), [0, 2, 1, 3]); // [B, H, T, D], a view
 * const first = slice(x, 1, 0, 4);                              // x[:, 0:4], a view
 * const both = cat([a, b], -1);
 * ```
 * @module
 */
import { record } from "../autograd.ts";
import { getGpu, type Kernel } from "../gpu.ts";
import { gridFor, storageDecl, UniformWriter } from "../kernels/common.ts";
import { contiguousStrides, fmtShape, numelOf, type Shape, Tensor } from "../tensor.ts";
import { elementwise } from "./dispatch.ts";
import { sumTo } from "./reduce.ts";

function normDim(d: number, ndim: number, op: string): number {
  const r = d < 0 ? d + ndim : d;
  if (!Number.isInteger(r) || r < 0 || r >= ndim) {
    throw new Error(`${op}: dimension ${d} is out of range for a tensor with ${ndim} dimensions`);
  }
  return r;
}

function resolveShape(x: Tensor, shape: number[], op: string): number[] {
  const free = shape.filter((d) => d === -1).length;
  if (free > 1) throw new Error(`${op}: only one size may be -1, got ${fmtShape(shape)}`);
  const known = shape.reduce((a, d) => (d === -1 ? a : a * d), 1);
  const out = shape.map((d) => (d === -1 ? (known === 0 ? 0 : x.numel / known) : d));
  if (out.some((d) => !Number.isInteger(d) || d < 0) || numelOf(out) !== x.numel) {
    throw new Error(
      `${op}: cannot reshape a tensor of shape ${fmtShape(x.shape)} (${x.numel} elements) into ${fmtShape(shape)}`,
    );
  }
  return out;
}

/**
 * A copy in row-major order, or a view when already row-major. Differentiable.
 *
 * @example
 * ```ts
 * const c = contiguous(x.transpose());
 * ```
 */
export function contiguous(x: Tensor): Tensor {
  x.assertAlive("contiguous");
  if (x.isContiguous) {
    const v = x.viewOf(x.shape, contiguousStrides(x.shape), x.offset);
    return record(v, "contiguous", [x], [], (g) => [g.detach()]);
  }
  const y = elementwise("copy", "a", [x], {
    out: x.dtype,
    compute: x.dtype === "f32" || x.dtype === "f16" ? "f32" : x.dtype,
    shape: x.shape,
  });
  return record(y, "contiguous", [x], [], (g) => [g.detach()]);
}

/**
 * Another shape with the same elements: a view when `x` is row-major, otherwise a copy. One size may be -1.
 *
 * @example
 * ```ts
 * const flat = reshape(x, [-1]);
 * ```
 */
export function reshape(x: Tensor, shape: number[]): Tensor {
  x.assertAlive("reshape");
  const s = resolveShape(x, shape, "reshape");
  if (x.isContiguous) {
    const v = x.viewOf(s, contiguousStrides(s), x.offset);
    return record(v, "reshape", [x], [], (g) => [reshape(g, [...x.shape])]);
  }
  using c = contiguous(x);
  return reshape(c, s);
}

/**
 * Like {@linkcode reshape} but never copies: throws when `x` is not row-major (call `contiguous()` first).
 *
 * @example
 * ```ts
 * const v = view(x, [2, -1]);
 * ```
 */
export function view(x: Tensor, shape: number[]): Tensor {
  if (!x.isContiguous) {
    throw new Error(
      `view: a tensor of shape ${fmtShape(x.shape)} with strides ${fmtShape(x.strides)} is not contiguous; ` +
        "use reshape() or call contiguous() first",
    );
  }
  return reshape(x, shape);
}

/**
 * Reorders dimensions (a view).
 *
 * @example
 * ```ts
 * const y = permute(x, [0, 2, 1, 3]);
 * ```
 */
export function permute(x: Tensor, dims: number[]): Tensor {
  x.assertAlive("permute");
  if (dims.length !== x.ndim) {
    throw new Error(
      `permute: got ${dims.length} dimensions ${fmtShape(dims)} for a tensor of shape ${fmtShape(x.shape)}`,
    );
  }
  const d = dims.map((i) => normDim(i, x.ndim, "permute"));
  if (new Set(d).size !== d.length) throw new Error(`permute: repeated dimension in ${fmtShape(dims)}`);
  const v = x.viewOf(d.map((i) => x.shape[i]), d.map((i) => x.strides[i]), x.offset);
  const inverse = new Array<number>(d.length);
  d.forEach((src, dst) => (inverse[src] = dst));
  return record(v, "permute", [x], [], (g) => [permute(g, inverse)]);
}

/**
 * Swaps two dimensions (a view).
 *
 * @example
 * ```ts
 * const wt = transpose(w, 0, 1);
 * ```
 */
export function transpose(x: Tensor, dim0 = -2, dim1 = -1): Tensor {
  const a = normDim(dim0, x.ndim, "transpose");
  const b = normDim(dim1, x.ndim, "transpose");
  const dims = [...x.shape.keys()];
  [dims[a], dims[b]] = [dims[b], dims[a]];
  return permute(x, dims);
}

/**
 * Elements `start` to `end` (exclusive; negative counts from the end) along `dim`, as a view.
 *
 * @example
 * ```ts
 * const lastToken = slice(h, 1, -1); // h[:, -1:]
 * ```
 */
export function slice(x: Tensor, dim: number, start: number, end?: number): Tensor {
  x.assertAlive("slice");
  const d = normDim(dim, x.ndim, "slice");
  const size = x.shape[d];
  const s = start < 0 ? start + size : start;
  const e = end === undefined ? size : end < 0 ? end + size : end;
  if (s < 0 || e > size || s > e) {
    throw new Error(`slice: range ${start}..${end ?? size} is out of bounds for dimension ${dim} of size ${size}`);
  }
  const shape = x.shape.slice();
  shape[d] = e - s;
  const v = x.viewOf(shape, x.strides, x.offset + s * x.strides[d]);
  return record(v, "slice", [x], [], (g) => [padSlice(g, x.shape, d, s)]);
}

/**
 * Broadcasts size-1 dimensions (and new leading ones) to `shape` without copying; -1 keeps a size.
 *
 * @example
 * ```ts
 * const b = expand(bias, [batch, 64]);
 * ```
 */
export function expand(x: Tensor, shape: number[]): Tensor {
  x.assertAlive("expand");
  const lead = shape.length - x.ndim;
  if (lead < 0) throw new Error(`expand: cannot expand ${fmtShape(x.shape)} to fewer dimensions ${fmtShape(shape)}`);
  const out: number[] = [];
  const strides: number[] = [];
  for (let i = 0; i < shape.length; i++) {
    const src = i - lead;
    const want = shape[i] === -1 && src >= 0 ? x.shape[src] : shape[i];
    if (!Number.isInteger(want) || want < 0) {
      throw new Error(
        `expand: cannot expand ${fmtShape(x.shape)} to ${fmtShape(shape)} (-1 keeps an existing size only)`,
      );
    }
    if (src < 0) {
      out.push(want);
      strides.push(0);
    } else if (x.shape[src] === want) {
      out.push(want);
      strides.push(x.strides[src]);
    } else if (x.shape[src] === 1) {
      out.push(want);
      strides.push(0);
    } else {
      throw new Error(`expand: cannot expand ${fmtShape(x.shape)} to ${fmtShape(shape)}`);
    }
  }
  const v = x.viewOf(out, strides, x.offset);
  return record(v, "expand", [x], [], (g) => [sumToLazy(g, x.shape)]);
}

function sumToLazy(g: Tensor, shape: Shape): Tensor {
  const r = sumTo(g, shape);
  return r === g ? g.detach() : r;
}

/**
 * Inserts a size-1 dimension (a view).
 *
 * @example
 * ```ts
 * const col = unsqueeze(x, -1);
 * ```
 */
export function unsqueeze(x: Tensor, dim: number): Tensor {
  const d = normDim(dim, x.ndim + 1, "unsqueeze");
  const shape = x.shape.slice();
  shape.splice(d, 0, 1);
  const strides = x.strides.slice();
  strides.splice(d, 0, d < x.ndim ? x.strides[d] * x.shape[d] : 1);
  const v = x.viewOf(shape, strides, x.offset);
  return record(v, "unsqueeze", [x], [], (g) => [squeeze(g, d)]);
}

/**
 * Removes a size-1 dimension (a view).
 *
 * @example
 * ```ts
 * const v = squeeze(x, 0);
 * ```
 */
export function squeeze(x: Tensor, dim: number): Tensor {
  const d = normDim(dim, x.ndim, "squeeze");
  if (x.shape[d] !== 1) {
    throw new Error(`squeeze: dimension ${dim} of ${fmtShape(x.shape)} has size ${x.shape[d]}, not 1`);
  }
  const shape = x.shape.filter((_, i) => i !== d);
  const strides = x.strides.filter((_, i) => i !== d);
  const v = x.viewOf(shape, strides, x.offset);
  return record(v, "squeeze", [x], [], (g) => [unsqueeze(g, d)]);
}

// ---- copies into regions: cat and slice backward ----------------------------------------------------------------

const copyKernels = new Map<string, Kernel>();

/**
 * Copies `src` (any layout) into the region of `dst` (row-major, shape `dstShape`) that starts at `start` along
 * `dim`. f16 destinations use atomic and/or on the packed word, so neighbours written by other threads survive.
 */
function copyInto(dst: Tensor, src: Tensor, dim: number, start: number): void {
  const rank = Math.max(src.ndim, 1);
  if (rank > 8) throw new Error(`copies into regions support up to 8 dimensions, got ${fmtShape(src.shape)}`);
  const f16 = dst.dtype === "f16";
  const key = `${src.dtype}|${dst.dtype}|${rank}`;
  const gpu = getGpu();
  let k = copyKernels.get(key);
  if (!k) {
    const comp = ["x", "y", "z", "w"];
    const steps: string[] = [];
    for (let d = rank - 1; d >= 0; d--) {
      const f = `[${d >> 2}].${comp[d & 3]}`;
      steps.push(`{ let c = rem % p.shape${f}; rem = rem / p.shape${f}; so += c * p.sst${f}; dof += c * p.dst${f}; }`);
    }
    const load = src.dtype === "f16"
      ? "let w = unpack2x16float(src[so >> 1u]); let v = select(w.x, w.y, (so & 1u) == 1u);"
      : "let v = src[so];";
    const store = f16
      ? `let h = pack2x16float(vec2<f32>(clamp(f32(v), -65504.0, 65504.0), 0.0)) & 0xffffu;
  let sh = (dof & 1u) * 16u;
  atomicAnd(&dstBuf[dof >> 1u], ~(0xffffu << sh));
  atomicOr(&dstBuf[dof >> 1u], h << sh);`
      : `dstBuf[dof] = ${dst.dtype === "f32" ? "f32" : dst.dtype}(v);`;
    const code = `struct Params { shape: array<vec4<u32>, 2>, sst: array<vec4<u32>, 2>, dst: array<vec4<u32>, 2>,
  numel: u32, soff: u32, doff: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "src", src.dtype, "read")}
@group(0) @binding(2) var<storage, read_write> dstBuf: array<${
      f16 ? "atomic<u32>" : dst.dtype === "f32" ? "f32" : dst.dtype
    }>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let t = gid.x + gid.y * nwg.x * 256u;
  if (t >= p.numel) { return; }
  var rem = t; var so = p.soff; var dof = p.doff;
  ${steps.join("\n  ")}
  ${load}
  ${store}
}`;
    copyKernels.set(key, k = gpu.kernel({ name: "copy_into", code, bindings: ["read", "write"], uniforms: true }));
  }
  const dstStrides = contiguousStrides(dst.shape);
  const u = new UniformWriter(28);
  const shape = src.ndim ? src.shape : [1];
  shape.forEach((d, i) => u.u(i, d));
  (src.ndim ? src.strides : [0]).forEach((s, i) => u.u(8 + i, s));
  (src.ndim ? dstStrides : [0]).forEach((s, i) => u.u(16 + i, s));
  u.u(24, src.numel).u(25, src.offset).u(26, dst.offset + start * (dstStrides[dim] ?? 0));
  if (src.numel > 0) gpu.dispatch(k, [src.storage.buffer, dst.storage.buffer], u.u32, gridFor(src.numel, 256));
}

function zerosOf(shape: Shape, dtype: Tensor["dtype"]): Tensor {
  return elementwise("fill", "0.0", [], { out: dtype, shape });
}

/** The gradient of a slice: zeros of the input shape with `g` placed at `start` along `dim`. */
function padSlice(g: Tensor, shape: Shape, dim: number, start: number): Tensor {
  const out = zerosOf(shape, g.dtype);
  copyInto(out, g, dim, start);
  return out;
}

/**
 * Concatenates tensors along `dim` (all other sizes must match).
 *
 * @example
 * ```ts
 * const kv = cat([pastK, k], 2);
 * ```
 */
export function cat(tensors: Tensor[], dim = 0): Tensor {
  if (tensors.length === 0) throw new Error("cat: needs at least one tensor");
  const first = tensors[0];
  const d = normDim(dim, first.ndim, "cat");
  for (const t of tensors) {
    t.assertAlive("cat");
    if (t.ndim !== first.ndim || t.shape.some((s, i) => i !== d && s !== first.shape[i]) || t.dtype !== first.dtype) {
      throw new Error(
        `cat: tensors must share dtype and every size except dimension ${dim}; got ${
          tensors.map((x) => `${fmtShape(x.shape)} ${x.dtype}`).join(", ")
        }`,
      );
    }
  }
  const shape = first.shape.slice();
  shape[d] = tensors.reduce((a, t) => a + t.shape[d], 0);
  const out = Tensor.empty(shape, first.dtype);
  const starts: number[] = [];
  let at = 0;
  for (const t of tensors) {
    starts.push(at);
    copyInto(out, t, d, at);
    at += t.shape[d];
  }
  return record(
    out,
    "cat",
    tensors,
    [],
    (g, _s, needs) =>
      tensors.map((t, i) => (needs[i] ? slice(g, d, starts[i], starts[i] + t.shape[d]).contiguous() : null)),
  );
}

/**
 * Writes `src` into `dst` starting at index `start` along `dim`, in place and without recording a gradient
 * (`dst` must be row-major; used for KV caches).
 *
 * @example
 * ```ts
 * assignSlice(cacheK, k, 1, pastLength); // cacheK[:, past:past+T] = k
 * ```
 */
export function assignSlice(dst: Tensor, src: Tensor, dim: number, start: number): void {
  dst.assertAlive("assignSlice");
  src.assertAlive("assignSlice");
  const d = normDim(dim, dst.ndim, "assignSlice");
  if (!dst.isContiguous) throw new Error("assignSlice: the destination must be contiguous");
  if (src.ndim !== dst.ndim || src.shape.some((s, i) => (i === d ? start + s > dst.shape[i] : s !== dst.shape[i]))) {
    throw new Error(
      `assignSlice: cannot write ${fmtShape(src.shape)} into ${fmtShape(dst.shape)} at ${start} along dimension ${dim}`,
    );
  }
  copyInto(dst, src, d, start);
}
