/**
 * RMSNorm kernels (LLaMA's `LlamaRMSNorm`), computed in f32 whatever the storage dtypes:
 *
 * - forward, one workgroup per row (256 threads, or `threads`): r = rsqrt(mean(x²) + eps), y = w · round(x · r),
 *   where `round` rounds to x's dtype (identity for f32, f16 rounding for f16, which is Hugging Face's order of
 *   operations: `weight * (x.float() * rsqrt(var + eps)).to(input_dtype)`); it also writes r per row for the
 *   backward pass.
 *   The sum of squares reads vectors (vec4 of f32, or eight packed halves) when the rows are aligned.
 * - backward dx, one workgroup per row: dx = r · w · g − x · r³ · mean(w · g · x).
 * - backward dw, without atomics: thread (block b, column j) sums g · round(x · r) over the rows of block b into
 *   `partial[b, j]`; the caller then sums `partial` over blocks (a column reduction).
 *
 * f16 outputs are packed two per 32-bit word. When rows have an odd length a word straddles two rows, which two
 * workgroups write; those kernels declare the output `atomic<u32>` and update their own half of a shared word
 * with `atomicAnd`/`atomicOr` (the other words are stored whole).
 *
 * @example
 * ```ts
 * import { rmsNormKernel } from "./norm.ts";
 * const src = rmsNormKernel({ x: "f16", w: "f16", vec: true, oddRows: false });
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import type { KernelSource } from "../gpu.ts";
import { loadF32Fn, PACK_F16, storageDecl } from "./common.ts";

/** Threads per workgroup of the row kernels (the default; CPU adapters use {@linkcode CPU_NORM_THREADS}). */
export const NORM_WORKGROUP = 256;

/** Threads per row on a CPU adapter: one 256-bit SIMD vector of f32 lanes (lavapipe runs wider groups in chunks). */
export const CPU_NORM_THREADS = 8;

function checkThreads(t: number | undefined): number {
  const W = t ?? NORM_WORKGROUP;
  if (!Number.isInteger(W) || W < 2 || (W & (W - 1)) !== 0 || W > 1024) {
    throw new Error(`rmsNorm: threads per row must be a power of two from 2 to 1024, got ${t}`);
  }
  return W;
}

/** Forward variant. The output has x's dtype. */
export interface RmsNormSpec {
  /** Dtype of x (and of y). */
  x: DType;
  /** Dtype of the weight. */
  w: DType;
  /** Read x as vec4<f32> (n % 4 == 0 and offset % 4 == 0) or as 8 packed halves (n % 8 == 0, offset % 8 == 0). */
  vec: boolean;
  /** f16 output whose rows have an odd length (words shared between rows are updated atomically). */
  oddRows: boolean;
  /** Threads per row (a power of two ≥ 2; default {@linkcode NORM_WORKGROUP}). */
  threads?: number;
}

/** Uniform words of the forward kernel: rows, n, x offset, w offset, eps (f32). */
export const RMSNORM_UNIFORM_WORDS = 8;

/** WGSL that rounds an f32 to the nearest f16 value and back (f16's `.to(input_dtype)` step). */
const ROUND_F16 = `fn roundF16(v: f32) -> f32 {
  return unpack2x16float(pack2x16float(vec2<f32>(clamp(v, -65504.0, 65504.0), 0.0))).x;
}`;

/** Declaration of an output buffer of `dtype` written by row kernels. */
function outDecl(binding: number, name: string, dtype: DType, oddRows: boolean): string {
  if (dtype === "f16" && oddRows) {
    return `@group(0) @binding(${binding}) var<storage, read_write> ${name}: array<atomic<u32>>;`;
  }
  return storageDecl(binding, name, dtype, "read_write");
}

/**
 * WGSL statements writing one row of `n = p.n` values `val(j)` (j = 0..n−1) to `out` starting at element `ob`,
 * with thread `l` of the workgroup. f16 rows are written a packed word at a time.
 */
function rowWrite(out: string, dtype: DType, oddRows: boolean, W: number): string {
  if (dtype !== "f16") return `for (var j = l; j < p.n; j += ${W}u) { ${out}[ob + j] = val(j); }`;
  if (!oddRows) {
    return `let wb = ob >> 1u;
  for (var k = l; k < p.n / 2u; k += ${W}u) { ${out}[wb + k] = packF16(val(2u * k), val(2u * k + 1u)); }`;
  }
  // A word holds elements e0 = 2w (low half) and e0 + 1 (high half); only halves inside [ob, ob + n) are ours.
  return `let w0 = ob >> 1u;
  let w1 = (ob + p.n + 1u) >> 1u;
  for (var w = w0 + l; w < w1; w += ${W}u) {
    let e0 = 2u * w;
    let lo = e0 >= ob;
    let hi = e0 + 1u < ob + p.n;
    if (lo && hi) {
      atomicStore(&${out}[w], packF16(val(e0 - ob), val(e0 + 1u - ob)));
    } else if (lo) {
      atomicAnd(&${out}[w], 0xffff0000u);
      atomicOr(&${out}[w], packF16(val(e0 - ob), 0.0) & 0xffffu);
    } else {
      atomicAnd(&${out}[w], 0x0000ffffu);
      atomicOr(&${out}[w], packF16(0.0, val(e0 + 1u - ob)) & 0xffff0000u);
    }
  }`;
}

/** Workgroup tree reduction of `acc` (sum) into `result`, all `W` threads. */
function workgroupSum(result: string, W: number): string {
  return `sh[l] = acc;
  workgroupBarrier();
  for (var s = ${W / 2}u; s > 0u; s >>= 1u) {
    if (l < s) { sh[l] = sh[l] + sh[l + s]; }
    workgroupBarrier();
  }
  let ${result} = sh[0];`;
}

/** Loader of x: scalar, or through the vector binding `xv`. */
function xLoader(dtype: DType, vec: boolean, W: number): { decl: string; ld: string; sumSq: string } {
  if (!vec) {
    return {
      decl: storageDecl(1, "xb", dtype, "read"),
      ld: loadF32Fn("ldx", "xb", dtype),
      sumSq: `for (var j = l; j < p.n; j += ${W}u) { let v = ldx(base + j); acc += v * v; }`,
    };
  }
  if (dtype === "f32") {
    return {
      decl: "@group(0) @binding(1) var<storage, read> xv: array<vec4<f32>>;",
      ld: "fn ldx(i: u32) -> f32 { return xv[i >> 2u][i & 3u]; }",
      sumSq: `let vb = base >> 2u;
  for (var k = l; k < p.n / 4u; k += ${W}u) { let v = xv[vb + k]; acc += dot(v, v); }`,
    };
  }
  if (dtype !== "f16") throw new Error(`rmsNorm: unsupported dtype ${dtype}`);
  return {
    decl: "@group(0) @binding(1) var<storage, read> xv: array<vec4<u32>>;",
    ld: "fn ldx(i: u32) -> f32 { return unpack2x16float(xv[i >> 3u][(i >> 1u) & 3u])[i & 1u]; }",
    sumSq: `let vb = base >> 3u;
  for (var k = l; k < p.n / 8u; k += ${W}u) {
    let q = xv[vb + k];
    let a = unpack2x16float(q.x); let b = unpack2x16float(q.y);
    let c = unpack2x16float(q.z); let d = unpack2x16float(q.w);
    acc += dot(a, a) + dot(b, b) + dot(c, c) + dot(d, d);
  }`,
  };
}

/**
 * Forward RMSNorm: bindings x (read), w (read), y (x's dtype), rstd (f32, one per row). Dispatch one workgroup
 * per row (`rowGrid(rows)`).
 */
export function rmsNormKernel(spec: RmsNormSpec): KernelSource {
  const W = checkThreads(spec.threads);
  const xl = xLoader(spec.x, spec.vec, W);
  const round = spec.x === "f16" ? "roundF16" : "";
  const code = `struct Params { rows: u32, n: u32, xoff: u32, woff: u32, eps: f32 }
@group(0) @binding(0) var<uniform> p: Params;
${xl.decl}
${storageDecl(2, "wb", spec.w, "read")}
${outDecl(3, "y", spec.x, spec.oddRows)}
${storageDecl(4, "rstd", "f32", "read_write")}
var<workgroup> sh: array<f32, ${W}>;
var<private> base: u32;
var<private> r: f32;
${xl.ld}
${loadF32Fn("ldw", "wb", spec.w)}
${PACK_F16}
${ROUND_F16}
fn val(j: u32) -> f32 { return ldw(p.woff + j) * ${round}(ldx(base + j) * r); }
@compute @workgroup_size(${W})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) l: u32) {
  let row = wid.x + wid.y * nwg.x;
  if (row >= p.rows) { return; }
  base = p.xoff + row * p.n;
  let ob = row * p.n;
  var acc = 0.0;
  ${xl.sumSq}
  ${workgroupSum("ss", W)}
  r = inverseSqrt(ss / f32(p.n) + p.eps);
  if (l == 0u) { rstd[row] = r; }
  ${rowWrite("y", spec.x, spec.oddRows, W)}
}`;
  return { name: `rms_norm_t${W}`, code, bindings: ["read", "read", "write", "write"], uniforms: true };
}

/** Backward (dx) variant. dx has x's dtype. */
export interface RmsNormBackwardSpec {
  /** Dtype of x (and of dx). */
  x: DType;
  /** Dtype of the weight. */
  w: DType;
  /** Dtype of the incoming gradient. */
  g: DType;
  /** f16 dx whose rows have an odd length. */
  oddRows: boolean;
  /** Threads per row (a power of two ≥ 2; default {@linkcode NORM_WORKGROUP}). */
  threads?: number;
}

/** Uniform words of the dx kernel: rows, n, x offset, w offset, g offset. */
export const RMSNORM_BACKWARD_UNIFORM_WORDS = 8;

/**
 * dx of RMSNorm: bindings x, w, g, rstd (read), dx (write). One workgroup per row:
 * dx = r·w·g − x·r³·mean(w·g·x).
 */
export function rmsNormBackwardKernel(spec: RmsNormBackwardSpec): KernelSource {
  const W = checkThreads(spec.threads);
  const code = `struct Params { rows: u32, n: u32, xoff: u32, woff: u32, goff: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "xb", spec.x, "read")}
${storageDecl(2, "wb", spec.w, "read")}
${storageDecl(3, "gb", spec.g, "read")}
${storageDecl(4, "rstd", "f32", "read")}
${outDecl(5, "dx", spec.x, spec.oddRows)}
var<workgroup> sh: array<f32, ${W}>;
var<private> base: u32;
var<private> gbase: u32;
var<private> r: f32;
var<private> coef: f32;
${loadF32Fn("ldx", "xb", spec.x)}
${loadF32Fn("ldw", "wb", spec.w)}
${loadF32Fn("ldg", "gb", spec.g)}
${PACK_F16}
fn val(j: u32) -> f32 { return r * ldw(p.woff + j) * ldg(gbase + j) - ldx(base + j) * coef; }
@compute @workgroup_size(${W})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) l: u32) {
  let row = wid.x + wid.y * nwg.x;
  if (row >= p.rows) { return; }
  base = p.xoff + row * p.n;
  gbase = p.goff + row * p.n;
  let ob = row * p.n;
  r = rstd[row];
  var acc = 0.0;
  for (var j = l; j < p.n; j += ${W}u) { acc += ldw(p.woff + j) * ldg(gbase + j) * ldx(base + j); }
  ${workgroupSum("s", W)}
  coef = r * r * r * s / f32(p.n);
  ${rowWrite("dx", spec.x, spec.oddRows, W)}
}`;
  return { name: `rms_norm_dx_t${W}`, code, bindings: ["read", "read", "read", "read", "write"], uniforms: true };
}

/** Uniform words of the dw kernel: rows, n, x offset, g offset, rows per block, blocks. */
export const RMSNORM_DW_UNIFORM_WORDS = 8;

/**
 * Partial weight gradients of RMSNorm: bindings x, g, rstd (read), partial (f32 [blocks, n], write). Thread
 * (b, j), launched with `gridFor(blocks * n, 256)`, sums g·round(x·r) over rows b·rowsPerBlock ..
 * (b+1)·rowsPerBlock − 1; consecutive threads take consecutive columns, so loads are coalesced.
 */
export function rmsNormWeightGradKernel(spec: { x: DType; g: DType }): KernelSource {
  const round = spec.x === "f16" ? "roundF16" : "";
  const code = `struct Params { rows: u32, n: u32, xoff: u32, goff: u32, rowsPerBlock: u32, blocks: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "xb", spec.x, "read")}
${storageDecl(2, "gb", spec.g, "read")}
${storageDecl(3, "rstd", "f32", "read")}
${storageDecl(4, "partial", "f32", "read_write")}
${loadF32Fn("ldx", "xb", spec.x)}
${loadF32Fn("ldg", "gb", spec.g)}
${ROUND_F16}
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let t = gid.x + gid.y * nwg.x * 256u;
  if (t >= p.blocks * p.n) { return; }
  let b = t / p.n;
  let j = t % p.n;
  let r0 = b * p.rowsPerBlock;
  let r1 = min(r0 + p.rowsPerBlock, p.rows);
  var acc = 0.0;
  for (var row = r0; row < r1; row++) {
    acc += ldg(p.goff + row * p.n + j) * ${round}(ldx(p.xoff + row * p.n + j) * rstd[row]);
  }
  partial[t] = acc;
}`;
  return { name: "rms_norm_dw", code, bindings: ["read", "read", "read", "write"], uniforms: true };
}
