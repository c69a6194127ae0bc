/**
 * Cross-entropy kernels, fused with log-softmax, for logits `[N, V]` and integer targets `[N]`:
 *
 * - forward, one 256-thread workgroup per row: a single pass over the row keeps a running maximum and a running
 *   Σ exp(x − max) per thread (rescaled when the maximum grows: the "online" log-sum-exp), the pairs are merged
 *   in workgroup memory, and the row's loss `lse − x[target]` and `lse` are written (loss 0 for ignored rows;
 *   NaN for a target outside `[0, V)` that is not the ignore index, since a kernel cannot throw). Rows are read as
 *   vec4<f32> or eight packed halves when aligned, so a 32,000-wide row is ~31 vector loads per thread.
 * - reduce, one workgroup: Σ loss and the number of non-ignored rows, both on the GPU (the count is kept in a
 *   buffer for the backward pass, never read back). "mean" is Σ / count, NaN when count is 0 (like PyTorch).
 * - backward, elementwise over `N·V`: dx = (exp(x − lse) − onehot(target)) · scale(row), 0 on ignored rows, where
 *   scale is g[row] ("none"), g ("sum") or g / count ("mean"). The softmax is recomputed from the logits and the
 *   saved per-row lse, never stored.
 *
 * @example
 * ```ts
 * import { crossEntropyKernel } from "./loss.ts";
 * const src = crossEntropyKernel({ logits: "f16", targets: "i32", vec: true });
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import type { KernelSource } from "../gpu.ts";
import { linearMain, loadF32Fn, PACK_F16, storageDecl } from "./common.ts";

/** Threads per workgroup of the row kernel and the reduction. */
export const LOSS_WORKGROUP = 256;

/** How per-row losses are combined. */
export type Reduction = "mean" | "sum" | "none";

const NAN = "bitcast<f32>(0x7fc00000u)";

/** WGSL `fn tgt(row: u32) -> i32` reading the target of a row (u32 targets are reinterpreted as i32). */
function targetFn(dtype: DType): string {
  return dtype === "i32"
    ? "fn tgt(row: u32) -> i32 { return tg[p.toff + row]; }"
    : "fn tgt(row: u32) -> i32 { return bitcast<i32>(tg[p.toff + row]); }";
}

/** Logits loader: a scalar `ld(i)` plus, for `vec`, the vector binding `xv`. */
function logitsDecl(dtype: DType, vec: boolean): string {
  if (!vec) return `${storageDecl(1, "xb", dtype, "read")}\n${loadF32Fn("ld", "xb", dtype)}`;
  if (dtype === "f32") {
    return `@group(0) @binding(1) var<storage, read> xv: array<vec4<f32>>;
fn ld(i: u32) -> f32 { return xv[i >> 2u][i & 3u]; }`;
  }
  return `@group(0) @binding(1) var<storage, read> xv: array<vec4<u32>>;
fn ld(i: u32) -> f32 { return unpack2x16float(xv[i >> 3u][(i >> 1u) & 3u])[i & 1u]; }`;
}

/** A cross-entropy forward variant. */
export interface CrossEntropySpec {
  /** Logits dtype (f32 or f16). */
  logits: DType;
  /** Targets dtype (i32 or u32). */
  targets: DType;
  /** Vector loads: f32 rows with V % 4 == 0 and offset % 4 == 0, or f16 rows with V % 8 == 0, offset % 8 == 0. */
  vec: boolean;
}

/** Uniform words of the forward kernel: rows, V, logits offset, targets offset, ignore index (i32). */
export const CROSS_ENTROPY_UNIFORM_WORDS = 8;

/**
 * Per-row cross-entropy: bindings logits, targets (read), loss (f32 [N]), lse (f32 [N]) (write). Dispatch one
 * workgroup per row (`rowGrid(N)`).
 */
export function crossEntropyKernel(spec: CrossEntropySpec): KernelSource {
  const W = LOSS_WORKGROUP;
  let loop: string;
  if (!spec.vec) {
    loop = `for (var j = l; j < p.n; j += ${W}u) {
    let v = ld(base + j);
    if (v > m) { s = s * exp(m - v) + 1.0; m = v; } else { s += exp(v - m); }
  }`;
  } else {
    const per = spec.logits === "f32" ? 4 : 8;
    const load = spec.logits === "f32" ? "let v = xv[vb + k];" : `let q = xv[vb + k];
    let v = vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
    let v2 = vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w));`;
    const mx = spec.logits === "f32"
      ? "max(max(v.x, v.y), max(v.z, v.w))"
      : "max(max(max(v.x, v.y), max(v.z, v.w)), max(max(v2.x, v2.y), max(v2.z, v2.w)))";
    const add = spec.logits === "f32"
      ? "s += dot(exp(v - vec4<f32>(m)), vec4<f32>(1.0));"
      : "s += dot(exp(v - vec4<f32>(m)), vec4<f32>(1.0)) + dot(exp(v2 - vec4<f32>(m)), vec4<f32>(1.0));";
    loop = `let vb = base / ${per}u;
  for (var k = l; k < p.n / ${per}u; k += ${W}u) {
    ${load}
    let mx = ${mx};
    if (mx > m) { s = s * exp(m - mx); m = mx; }
    ${add}
  }`;
  }
  const code = `struct Params { rows: u32, n: u32, off: u32, toff: u32, ignore: i32 }
@group(0) @binding(0) var<uniform> p: Params;
${logitsDecl(spec.logits, spec.vec)}
${storageDecl(2, "tg", spec.targets, "read")}
${storageDecl(3, "loss", "f32", "read_write")}
${storageDecl(4, "lseOut", "f32", "read_write")}
var<workgroup> shm: array<f32, ${W}>;
var<workgroup> shs: array<f32, ${W}>;
${targetFn(spec.targets)}
@compute @workgroup_size(${W})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) l: u32) {
  let row = wid.x + wid.y * nwg.x;
  if (row >= p.rows) { return; }
  let base = p.off + row * p.n;
  // Running maximum m and Σ exp(x − m) of this thread's elements.
  var m = -3.402823e38;
  var s = 0.0;
  ${loop}
  shm[l] = m;
  shs[l] = s;
  workgroupBarrier();
  for (var st = ${W / 2}u; st > 0u; st >>= 1u) {
    if (l < st) {
      let m1 = shm[l];
      let m2 = shm[l + st];
      let mm = max(m1, m2);
      shs[l] = shs[l] * exp(m1 - mm) + shs[l + st] * exp(m2 - mm);
      shm[l] = mm;
    }
    workgroupBarrier();
  }
  if (l == 0u) {
    let lse = shm[0] + log(shs[0]);
    lseOut[row] = lse;
    let t = tgt(row);
    if (t == p.ignore) {
      loss[row] = 0.0;
    } else if (t < 0 || u32(t) >= p.n) {
      loss[row] = ${NAN};
    } else {
      loss[row] = lse - ld(base + u32(t));
    }
  }
}`;
  return { name: "cross_entropy", code, bindings: ["read", "read", "write", "write"], uniforms: true };
}

/** Uniform words of the reduction: rows, targets offset, ignore index (i32), mean flag. */
export const LOSS_REDUCE_UNIFORM_WORDS = 4;

/**
 * Sums per-row losses and counts non-ignored rows in one workgroup (dispatch `[1]`): bindings loss (f32 [N]),
 * targets (read), out (f32 [1]: the sum, or sum / count when `p.mean` is 1, NaN for count 0), count (f32 [1]).
 */
export function lossReduceKernel(spec: { targets: DType }): KernelSource {
  const W = LOSS_WORKGROUP;
  const code = `struct Params { rows: u32, toff: u32, ignore: i32, mean: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "loss", "f32", "read")}
${storageDecl(2, "tg", spec.targets, "read")}
${storageDecl(3, "outBuf", "f32", "read_write")}
${storageDecl(4, "countBuf", "f32", "read_write")}
var<workgroup> shs: array<f32, ${W}>;
var<workgroup> shc: array<u32, ${W}>;
${targetFn(spec.targets)}
@compute @workgroup_size(${W})
fn main(@builtin(local_invocation_index) l: u32) {
  var s = 0.0;
  var c = 0u;
  for (var i = l; i < p.rows; i += ${W}u) {
    s += loss[i];
    c += select(1u, 0u, tgt(i) == p.ignore);
  }
  shs[l] = s;
  shc[l] = c;
  workgroupBarrier();
  for (var st = ${W / 2}u; st > 0u; st >>= 1u) {
    if (l < st) {
      shs[l] = shs[l] + shs[l + st];
      shc[l] = shc[l] + shc[l + st];
    }
    workgroupBarrier();
  }
  if (l == 0u) {
    let count = f32(shc[0]);
    countBuf[0] = count;
    if (p.mean == 1u) {
      outBuf[0] = select(shs[0] / count, ${NAN}, shc[0] == 0u);
    } else {
      outBuf[0] = shs[0];
    }
  }
}`;
  return { name: "loss_reduce", code, bindings: ["read", "read", "write", "write"], uniforms: true };
}

/** A cross-entropy backward variant. */
export interface CrossEntropyBackwardSpec {
  /** Logits dtype. */
  logits: DType;
  /** Targets dtype. */
  targets: DType;
  /** Incoming gradient dtype. */
  grad: DType;
  /** Gradient dtype (the logits'). */
  out: DType;
  /** The forward reduction (which says how the incoming gradient scales each row). */
  reduction: Reduction;
  /** f32 only: four elements per thread with vector loads and stores (V % 4 == 0, offset % 4 == 0). */
  vec: boolean;
}

/** Uniform words of the backward kernel: N·V, V, logits offset, targets offset, ignore (i32), grad offset. */
export const CROSS_ENTROPY_BACKWARD_UNIFORM_WORDS = 8;

/**
 * Gradient of cross-entropy w.r.t. the logits: bindings logits, targets, lse, g, [count when "mean"] (read),
 * dx (write). One thread per element, per four elements (`vec`), or per packed word (f16 output); launch
 * `gridFor(threads, 256)`.
 */
export function crossEntropyBackwardKernel(spec: CrossEntropyBackwardSpec): KernelSource {
  const mean = spec.reduction === "mean";
  const scale = spec.reduction === "none" ? "ldg(p.goff + row)" : mean ? "ldg(p.goff) / countBuf[0]" : "ldg(p.goff)";
  const dxBinding = mean ? 6 : 5;
  const vec = spec.vec && spec.out === "f32" && spec.logits === "f32";
  let body: string;
  if (vec) {
    body = `  let e = 4u * t;
  if (e >= p.numel) { return; }
  let row = e / p.n;
  let col = e % p.n;
  let tr = tgt(row);
  if (tr == p.ignore) { dx[t] = vec4<f32>(0.0); return; }
  let pr = exp(xv[(p.off + e) >> 2u] - vec4<f32>(lse[row]));
  let hit = vec4<i32>(i32(col)) + vec4<i32>(0, 1, 2, 3) == vec4<i32>(tr);
  dx[t] = (pr - select(vec4<f32>(0.0), vec4<f32>(1.0), hit)) * ${scale};
}`;
  } else if (spec.out === "f16") {
    body = `  let e = 2u * t;
  if (e >= p.numel) { return; }
  var hi = 0.0;
  if (e + 1u < p.numel) { hi = grad(e + 1u); }
  dx[t] = packF16(grad(e), hi);
}`;
  } else {
    body = `  if (t >= p.numel) { return; }
  dx[t] = grad(t);
}`;
  }
  const code = `struct Params { numel: u32, n: u32, off: u32, toff: u32, ignore: i32, goff: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${logitsDecl(spec.logits, vec)}
${storageDecl(2, "tg", spec.targets, "read")}
${storageDecl(3, "lse", "f32", "read")}
${storageDecl(4, "gb", spec.grad, "read")}
${mean ? storageDecl(5, "countBuf", "f32", "read") : ""}
@group(0) @binding(${dxBinding}) var<storage, read_write> dx: array<${
    vec ? "vec4<f32>" : spec.out === "f16" ? "u32" : "f32"
  }>;
${loadF32Fn("ldg", "gb", spec.grad)}
${targetFn(spec.targets)}
${PACK_F16}
fn grad(e: u32) -> f32 {
  let row = e / p.n;
  let tr = tgt(row);
  if (tr == p.ignore) { return 0.0; }
  let pr = exp(ld(p.off + e) - lse[row]);
  return (pr - select(0.0, 1.0, i32(e % p.n) == tr)) * ${scale};
}
${linearMain(256)}
${body}`;
  const bindings: ("read" | "write")[] = ["read", "read", "read", "read"];
  if (mean) bindings.push("read");
  bindings.push("write");
  return { name: `cross_entropy_backward_${spec.reduction}`, code, bindings, uniforms: true };
}
