/**
 * In-place kernels for optimizers and gradient bookkeeping: the fused AdamW step and the per-workgroup sums of squares
 * for up to {@linkcode MULTI_MAX_SEGMENTS} tensors per dispatch (PyTorch's `foreach` idea: a training step's dozens
 * of small LoRA tensors cost a few dispatches, not one each), the SGD step, `x *= s` with `s` read from a GPU
 * buffer, the combine of partial sums into an L2 norm and a clipping coefficient, and `dst += src`.
 *
 * A tensor updated in place is bound once, `read_write` (WebGPU forbids binding one buffer both read-only and
 * writable in a dispatch). f16 tensors updated in place are handled one packed 32-bit word per thread, so no two
 * threads write the same word, and a half outside the tensor (an odd start or end) keeps its exact bits.
 *
 * @example
 * ```ts
 * import { adamwKernel } from "./optim.ts";
 * const src = adamwKernel(["f32", "f16"]); // per tensor: param (rw), grad (r), exp_avg (rw), exp_avg_sq (rw)
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import type { BindingKind, KernelSource } from "../gpu.ts";
import { linearMain, loadF32Fn, PACK_F16, storageDecl, storageType } from "./common.ts";

/** Threads per workgroup of every kernel here. */
export const OPTIM_WORKGROUP = 256;

/** Most workgroups one sum-of-squares dispatch uses (each writes one partial sum). */
export const SUMSQ_MAX_GROUPS = 256;

/** Elements each thread of a sum-of-squares dispatch should cover at least before more workgroups are used. */
export const SUMSQ_ELEMS_PER_THREAD = 8;

/** Workgroups (and so partial sums) a sum-of-squares dispatch over `n` elements uses. */
export function sumSquaresGroups(n: number): number {
  return Math.max(1, Math.min(SUMSQ_MAX_GROUPS, Math.ceil(n / (OPTIM_WORKGROUP * SUMSQ_ELEMS_PER_THREAD))));
}

/**
 * The statement choosing a multi-tensor kernel's segment: workgroup `w` of the dispatch belongs to the last segment
 * whose first workgroup (`p.seg[i].w`) is at most `w`; `call(i)` runs for it. Segments are in dispatch order.
 */
function segmentSwitch(count: number, call: (i: number) => string): string {
  const lines: string[] = [];
  for (let i = 0; i < count; i++) {
    const cond = i + 1 < count ? `if (w < p.seg[${i + 1}].w) ` : "";
    lines.push(`${i === 0 ? "" : "else "}${cond}{ ${call(i)} }`);
  }
  return lines.join("\n  ");
}

/** The segment count a multi-tensor kernel's uniform block can describe (one `vec4<u32>` each, 256 bytes). */
export const MULTI_MAX_SEGMENTS = 12;

/**
 * Uniform words of {@linkcode adamwKernel} for `count` tensors: f32 `decay` (1 − lr·wd), `omb1` (1 − β1), `b1`,
 * `b2`, `omb2` (1 − β2), `stepSize` (lr / (1 − β1^t)), `bc2Sqrt` (√(1 − β2^t)), `eps`; then per tensor `i` the
 * u32 words `8 + 4i …`: `n`, `pOff`, `gOff`, and its first workgroup.
 */
export function adamwUniformWords(count: number): number {
  return 8 + 4 * count;
}

/**
 * The fused AdamW step of torch.optim.AdamW (single-tensor path's arithmetic) for `grads.length` tensors in one
 * dispatch (torch's `foreach` idea): tensor `i` owns workgroups `[seg[i].w, seg[i+1].w)`, one thread per element:
 * `g ← g·gradScale`; `p ← p·(1 − lr·wd)`; `m ← lerp(m, g, 1 − β1)`; `v ← β2·v + (1 − β2)·g²`;
 * `p ← p − stepSize · m / (√v / √(1 − β2^t) + eps)` with `stepSize = lr / (1 − β1^t)`.
 * Bindings per tensor `i` (from 1 + 4i): param f32 (read_write), grad `grads[i]` (read), exp_avg f32 (read_write),
 * exp_avg_sq f32 (read_write); last, when `scaled`, `gradScale` f32 (read; element 0 multiplies every gradient,
 * e.g. a clipping coefficient computed on the GPU). Launch a 2-D grid of at least the segments' total workgroups.
 */
export function adamwKernel(grads: DType[], scaled: boolean): KernelSource {
  const G = grads.length;
  if (G < 1 || G > MULTI_MAX_SEGMENTS) throw new Error(`adamw: 1 to ${MULTI_MAX_SEGMENTS} tensors, got ${G}`);
  const decls: string[] = [], fns: string[] = [];
  grads.forEach((dt, i) => {
    const b = 1 + 4 * i;
    decls.push(
      storageDecl(b, `param${i}`, "f32", "read_write"),
      storageDecl(b + 1, `grad${i}`, dt, "read"),
      storageDecl(b + 2, `expAvg${i}`, "f32", "read_write"),
      storageDecl(b + 3, `expAvgSq${i}`, "f32", "read_write"),
      loadF32Fn(`ldGrad${i}`, `grad${i}`, dt),
    );
    fns.push(`fn step${i}(t: u32, gs: f32) {
  let s = p.seg[${i}];
  if (t >= s.x) { return; }
  let g = ldGrad${i}(s.z + t) * gs;
  let w = param${i}[s.y + t] * p.decay;
  // exp_avg.lerp_(grad, 1 - beta1), with torch's two-sided lerp formula.
  let m0 = expAvg${i}[t];
  let m = select(g - (g - m0) * p.b1, m0 + p.omb1 * (g - m0), p.omb1 < 0.5);
  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
  let v = expAvgSq${i}[t] * p.b2 + p.omb2 * (g * g);
  // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps); param.addcdiv_(exp_avg, denom, value=-step_size)
  let denom = sqrt(v) / p.bc2Sqrt + p.eps;
  param${i}[s.y + t] = w + (-p.stepSize) * (m / denom);
  expAvg${i}[t] = m;
  expAvgSq${i}[t] = v;
}`);
  });
  return {
    name: `adamw_${grads.join("_")}${scaled ? "_scaled" : ""}`,
    bindings: [
      ...grads.flatMap((): BindingKind[] => ["write", "read", "write", "write"]),
      ...(scaled ? ["read" as const] : []),
    ],
    uniforms: true,
    code: `struct Params { decay: f32, omb1: f32, b1: f32, b2: f32, omb2: f32, stepSize: f32, bc2Sqrt: f32, eps: f32,
  seg: array<vec4<u32>, ${G}> }
@group(0) @binding(0) var<uniform> p: Params;
${decls.join("\n")}
${scaled ? storageDecl(1 + 4 * G, "gradScale", "f32", "read") : ""}
${fns.join("\n")}
@compute @workgroup_size(${OPTIM_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) l: u32) {
  let w = wid.x + wid.y * nwg.x;
  let gs = ${scaled ? "gradScale[0]" : "1.0"};
  ${segmentSwitch(G, (i) => `step${i}((w - p.seg[${i}].w) * ${OPTIM_WORKGROUP}u + l, gs);`)}
}`,
  };
}

/**
 * Uniform words of {@linkcode sgdKernel}: u32 `n`, `pOff`, `gOff`, `first` (1 on a buffer's first step); f32 `lr`,
 * `wd`, `momentum`, `omDamp` (1 − dampening).
 */
export const SGD_UNIFORM_WORDS = 8;

/**
 * The SGD step of torch.optim.SGD, per element: `d ← g + wd·p`; with momentum `b ← d` on the first step, else
 * `b ← momentum·b + (1 − dampening)·d`, then `d ← d + momentum·b` (Nesterov) or `d ← b`; finally `p ← p − lr·d`.
 * Bindings: param f32 (read_write), grad (read), and with momentum the buffer f32 (read_write).
 */
export function sgdKernel(grad: DType, momentum: boolean, nesterov: boolean): KernelSource {
  const lines = [
    `  if (t >= p.n) { return; }`,
    `  let w = param[p.pOff + t];`,
    `  var d = ldGrad(p.gOff + t);`,
    `  if (p.wd != 0.0) { d = d + p.wd * w; }`,
  ];
  if (momentum) {
    lines.push(
      `  let b = select(buf[t] * p.momentum + p.omDamp * d, d, p.first == 1u);`,
      `  buf[t] = b;`,
      nesterov ? `  d = d + p.momentum * b;` : `  d = b;`,
    );
  }
  lines.push(`  param[p.pOff + t] = w + (-p.lr) * d;`, `}`);
  return {
    name: `sgd_${grad}${momentum ? (nesterov ? "_nesterov" : "_momentum") : ""}`,
    bindings: momentum ? ["write", "read", "write"] : ["write", "read"],
    uniforms: true,
    code: `struct Params { n: u32, pOff: u32, gOff: u32, first: u32, lr: f32, wd: f32, momentum: f32, omDamp: f32 }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "param", "f32", "read_write")}
${storageDecl(2, "grad", grad, "read")}
${momentum ? storageDecl(3, "buf", "f32", "read_write") : ""}
${loadF32Fn("ldGrad", "grad", grad)}
${linearMain(OPTIM_WORKGROUP)}
${lines.join("\n")}`,
  };
}

/**
 * Body of an in-place elementwise update of `x` (binding 1, `dtype`, read_write) over `p.n` elements from element
 * `p.off`: each element becomes `upd(old, k)` for its index `k`; the caller defines `fn upd(old: f32, k: u32) -> f32`.
 * f16 is updated one packed word per thread; launch {@linkcode inPlaceThreads} threads.
 */
function inPlaceMain(dtype: DType): string {
  if (dtype === "f32") {
    return `${linearMain(OPTIM_WORKGROUP)}
  if (t >= p.n) { return; }
  let i = p.off + t;
  x[i] = upd(x[i], t);
}`;
  }
  if (dtype !== "f16") throw new Error(`in-place float kernels take f32 or f16 tensors, got ${dtype}`);
  return `${PACK_F16}
${linearMain(OPTIM_WORKGROUP)}
  let lead = p.off & 1u;
  if (t >= (lead + p.n + 1u) / 2u) { return; }
  let w = (p.off >> 1u) + t;
  let old = x[w];
  let v = unpack2x16float(old);
  let k0 = i32(2u * t) - i32(lead); // tensor index of the low half (-1 when it precedes the tensor)
  let lo = k0 >= 0 && k0 < i32(p.n);
  let hi = k0 + 1 < i32(p.n);
  var a = v.x;
  var b = v.y;
  if (lo) { a = upd(v.x, u32(k0)); }
  if (hi) { b = upd(v.y, u32(k0 + 1)); }
  let packed = packF16(a, b);
  x[w] = select(old & 0xffffu, packed & 0xffffu, lo) | select(old & 0xffff0000u, packed & 0xffff0000u, hi);
}`;
}

/** Threads an in-place kernel over `n` elements of `dtype` starting at element `offset` needs. */
export function inPlaceThreads(dtype: DType, n: number, offset: number): number {
  return dtype === "f16" ? Math.ceil(((offset & 1) + n) / 2) : n;
}

/** Uniform words of {@linkcode scaleByScalarKernel}: u32 `n`, `off`, `sOff`. */
export const SCALE_UNIFORM_WORDS = 4;

/**
 * `x[off + k] *= s[sOff]` in place, the factor read from a GPU buffer (so it can be computed on the GPU, e.g. a
 * gradient-clipping coefficient). Bindings: x (`dtype`, read_write), s f32 (read).
 */
export function scaleByScalarKernel(dtype: DType): KernelSource {
  return {
    name: `scale_by_scalar_${dtype}`,
    bindings: ["write", "read"],
    uniforms: true,
    code: `struct Params { n: u32, off: u32, sOff: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "x", dtype, "read_write")}
${storageDecl(2, "s", "f32", "read")}
fn upd(old: f32, k: u32) -> f32 { return old * s[p.sOff]; }
${inPlaceMain(dtype)}`,
  };
}

/**
 * Uniform words of {@linkcode sumSquaresKernel} for `count` tensors: u32 `slot` (partial written by the dispatch's
 * workgroup 0), `total` (its workgroups), 2 pad; then per tensor `i` the words `4 + 4i …`: `n`, `off`, `groups`, and
 * its first workgroup.
 */
export function sumSquaresUniformWords(count: number): number {
  return 4 + 4 * count;
}

/**
 * Sums of squares of `dtypes.length` tensors in one dispatch: tensor `i` owns `seg[i].z` workgroups from
 * `seg[i].w` ({@linkcode sumSquaresGroups} of its size), which stride over its `n` elements (from element `off`);
 * workgroup `w` writes its f32 partial sum to `partials[slot + w]`. Bindings: x_i (`dtypes[i]`, read) from 1,
 * partials f32 (read_write) last.
 */
export function sumSquaresKernel(dtypes: DType[]): KernelSource {
  const G = dtypes.length;
  if (G < 1 || G > MULTI_MAX_SEGMENTS) throw new Error(`sum of squares: 1 to ${MULTI_MAX_SEGMENTS} tensors, got ${G}`);
  const decls = dtypes.map((dt, i) =>
    `${storageDecl(1 + i, `x${i}`, dt, "read")}\n${loadF32Fn(`ld${i}`, `x${i}`, dt)}`
  );
  const fns = dtypes.map((_, i) =>
    `fn sumsq${i}(w: u32, l: u32) -> f32 {
  let s = p.seg[${i}];
  var acc = 0.0;
  for (var k = w * ${OPTIM_WORKGROUP}u + l; k < s.x; k += s.z * ${OPTIM_WORKGROUP}u) {
    let v = ld${i}(s.y + k);
    acc += v * v;
  }
  return acc;
}`
  );
  return {
    name: `sum_squares_${dtypes.join("_")}`,
    bindings: [...dtypes.map((): BindingKind => "read"), "write"],
    uniforms: true,
    code: `struct Params { slot: u32, total: u32, pad0: u32, pad1: u32, seg: array<vec4<u32>, ${G}> }
@group(0) @binding(0) var<uniform> p: Params;
${decls.join("\n")}
${storageDecl(1 + G, "partials", "f32", "read_write")}
${fns.join("\n")}
var<workgroup> sh: array<f32, ${OPTIM_WORKGROUP}>;
@compute @workgroup_size(${OPTIM_WORKGROUP})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) l: u32) {
  let w = wid.x + wid.y * nwg.x;
  if (w >= p.total) { return; }
  var acc = 0.0;
  ${segmentSwitch(G, (i) => `acc = sumsq${i}(w - p.seg[${i}].w, l);`)}
  sh[l] = acc;
  workgroupBarrier();
  for (var s = ${OPTIM_WORKGROUP / 2}u; s > 0u; s >>= 1u) {
    if (l < s) { sh[l] = sh[l] + sh[l + s]; }
    workgroupBarrier();
  }
  if (l == 0u) { partials[p.slot + w] = sh[0]; }
}`,
  };
}

/** Uniform words of {@linkcode normCombineKernel}: u32 `count`; f32 `maxNorm`. */
export const COMBINE_UNIFORM_WORDS = 4;

/**
 * One workgroup sums `count` partial sums of squares into the L2 norm `norm[0] = √Σ` and the clipping coefficient
 * `coef[0] = min(maxNorm / (norm + 1e-6), 1)` of torch.nn.utils.clip_grad_norm_ (NaN propagates, as there).
 * Bindings: partials f32 (read), norm f32 (read_write), coef f32 (read_write).
 */
export function normCombineKernel(): KernelSource {
  return {
    name: "norm_combine",
    bindings: ["read", "write", "write"],
    uniforms: true,
    code: `struct Params { count: u32, maxNorm: f32 }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "partials", "f32", "read")}
${storageDecl(2, "norm", "f32", "read_write")}
${storageDecl(3, "coef", "f32", "read_write")}
var<workgroup> sh: array<f32, ${OPTIM_WORKGROUP}>;
@compute @workgroup_size(${OPTIM_WORKGROUP})
fn main(@builtin(local_invocation_index) l: u32) {
  var acc = 0.0;
  for (var i = l; i < p.count; i += ${OPTIM_WORKGROUP}u) { acc += partials[i]; }
  sh[l] = acc;
  workgroupBarrier();
  for (var s = ${OPTIM_WORKGROUP / 2}u; s > 0u; s >>= 1u) {
    if (l < s) { sh[l] = sh[l] + sh[l + s]; }
    workgroupBarrier();
  }
  if (l == 0u) {
    let total = sqrt(sh[0]);
    norm[0] = total;
    let c = p.maxNorm / (total + 1e-6);
    coef[0] = select(c, 1.0, c > 1.0);
  }
}`,
  };
}

/** How the source of {@linkcode accumulateKernel} is addressed. */
export type AccumulateMode = "contiguous" | "strided" | "scalar";

/** Most dimensions {@linkcode accumulateKernel} addresses. */
export const ACCUMULATE_MAX_RANK = 8;

/**
 * Uniform words of {@linkcode accumulateKernel}: u32 `shape` (8 words), source `strides` (8 words), `n`, `off`
 * (destination element offset), `sOff` (source element offset).
 */
export const ACCUMULATE_UNIFORM_WORDS = 20;

/**
 * `dst += src` in place over a row-major `dst` (f32 or f16) of rank `rank`; `src` (`srcDtype`) is read with its own
 * (broadcast) strides, or as one element for all, or in the same layout. Bindings: dst (read_write), src (read).
 */
export function accumulateKernel(dst: DType, src: DType, mode: AccumulateMode, rank: number): KernelSource {
  if (rank > ACCUMULATE_MAX_RANK) {
    throw new Error(`accumulate: at most ${ACCUMULATE_MAX_RANK} dimensions, got ${rank}`);
  }
  const comp = ["x", "y", "z", "w"];
  const index: string[] = [];
  if (mode === "contiguous") index.push("  return p.sOff + k;");
  else if (mode === "scalar") index.push("  return p.sOff;");
  else {
    index.push("  var o = p.sOff;", "  var rem = k;");
    for (let d = rank - 1; d >= 0; d--) {
      const at = `[${d >> 2}].${comp[d & 3]}`;
      index.push(`  { let c = rem % p.shape${at}; rem = rem / p.shape${at}; o = o + c * p.st${at}; }`);
    }
    index.push("  return o;");
  }
  return {
    name: `accumulate_${dst}_${src}_${mode}`,
    bindings: ["write", "read"],
    uniforms: true,
    code: `struct Params { shape: array<vec4<u32>, 2>, st: array<vec4<u32>, 2>, n: u32, off: u32, sOff: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<${storageType(dst)}>;
${storageDecl(2, "src", src, "read")}
${loadF32Fn("ldSrc", "src", src)}
fn srcIndex(k: u32) -> u32 {
${index.join("\n")}
}
fn upd(old: f32, k: u32) -> f32 { return old + ldSrc(srcIndex(k)); }
${inPlaceMain(dst)}`,
  };
}
