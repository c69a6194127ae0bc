/**
 * Choosing the next token on the GPU, so generation never waits for a read-back per token: greedy argmax, or
 * sampling with temperature, top-k and top-p (applied in that order, as transformers' `generate` does). One
 * 256-thread workgroup per row finds the top-k and top-p cut-offs by bisection on the value (a few passes over
 * the row instead of a sort), then draws from the kept tokens with the counter-based RNG.
 *
 * @example
 * ```ts
 * import { sampleNext } from "./sampling.ts";
 * const next = sampleNext(logits, { temperature: 0.8, topP: 0.95, seed: 1, step: 0 }); // i32 [B]
 * ```
 * @module
 */
import { getGpu, type Kernel } from "../core/gpu.ts";
import { loadF32Fn, rowGrid, storageDecl, UniformWriter } from "../core/kernels/common.ts";
import { RNG_WGSL } from "../core/random.ts";
import { contiguous } from "../core/ops/shape.ts";
import { fmtShape, Tensor } from "../core/tensor.ts";
import type { DType } from "../core/dtype.ts";

/** How to pick the next token. */
export interface SamplingOptions {
  /** 0 (default) means greedy. */
  temperature?: number;
  /** Keep only the k most likely tokens (0 = off). */
  topK?: number;
  /** Keep the smallest set of tokens whose probability reaches p (1 = off). */
  topP?: number;
  /** Seed of the draws. */
  seed?: number;
  /** Step number (each step draws fresh numbers). */
  step?: number;
}

function kernelSource(dtype: DType): string {
  return `struct Params { rows: u32, n: u32, off: u32, greedy: u32, invTemp: f32, topK: u32, topP: f32, seed: u32, counter: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "logits", dtype, "read")}
@group(0) @binding(2) var<storage, read_write> outIds: array<i32>;
${loadF32Fn("ld", "logits", dtype)}
${RNG_WGSL}
var<workgroup> shf: array<f32, 256>;
var<workgroup> shu: array<u32, 256>;
fn sumAll(l: u32, v: f32) -> f32 {
  shf[l] = v;
  workgroupBarrier();
  for (var s = 128u; s > 0u; s >>= 1u) { if (l < s) { shf[l] = shf[l] + shf[l + s]; } workgroupBarrier(); }
  let r = shf[0];
  workgroupBarrier();
  return r;
}
fn maxAll(l: u32, v: f32) -> f32 {
  shf[l] = v;
  workgroupBarrier();
  for (var s = 128u; s > 0u; s >>= 1u) { if (l < s) { shf[l] = max(shf[l], shf[l + s]); } workgroupBarrier(); }
  let r = shf[0];
  workgroupBarrier();
  return r;
}
fn countAll(l: u32, v: u32) -> u32 {
  shu[l] = v;
  workgroupBarrier();
  for (var s = 128u; s > 0u; s >>= 1u) { if (l < s) { shu[l] = shu[l] + shu[l + s]; } workgroupBarrier(); }
  let r = shu[0];
  workgroupBarrier();
  return r;
}
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) l: u32) {
  let row = wid.x + wid.y * nwg.x;
  if (row >= p.rows) { return; }
  let base = p.off + row * p.n;
  // Greedy: the first index of the maximum (like torch.argmax).
  var best = -3.402823e38;
  var bestIdx = 0xffffffffu;
  for (var i = l; i < p.n; i += 256u) { let v = ld(base + i); if (v > best) { best = v; bestIdx = i; } }
  let mx = maxAll(l, best);
  var cand = 0xffffffffu;
  if (best == mx) { cand = bestIdx; }
  shu[l] = cand;
  workgroupBarrier();
  for (var s = 128u; s > 0u; s >>= 1u) { if (l < s) { shu[l] = min(shu[l], shu[l + s]); } workgroupBarrier(); }
  let argmax = shu[0];
  workgroupBarrier();
  if (p.greedy == 1u) {
    if (l == 0u) { outIds[row] = i32(argmax); }
    return;
  }
  // Scaled logits z = x / T; probabilities ∝ exp(z − zmax).
  let zmax = mx * p.invTemp;
  // top-k: the largest threshold t with count(z ≥ t) ≥ k, by bisection on [zmax − 100, zmax].
  var cut = -3.402823e38;
  if (p.topK > 0u && p.topK < p.n) {
    var lo = zmax - 100.0;
    var hi = zmax;
    for (var it = 0u; it < 40u; it++) {
      let mid = 0.5 * (lo + hi);
      var c = 0u;
      for (var i = l; i < p.n; i += 256u) { if (ld(base + i) * p.invTemp >= mid) { c++; } }
      if (countAll(l, c) >= p.topK) { lo = mid; } else { hi = mid; }
    }
    cut = lo;
  }
  var total = 0.0;
  for (var i = l; i < p.n; i += 256u) { let z = ld(base + i) * p.invTemp; if (z >= cut) { total += exp(z - zmax); } }
  let sumAllK = sumAll(l, total);
  // top-p: the largest threshold t whose kept mass Σ_{z ≥ t} p ≥ topP.
  if (p.topP < 1.0) {
    var lo = max(cut, zmax - 100.0);
    var hi = zmax;
    for (var it = 0u; it < 40u; it++) {
      let mid = 0.5 * (lo + hi);
      var m = 0.0;
      for (var i = l; i < p.n; i += 256u) { let z = ld(base + i) * p.invTemp; if (z >= mid && z >= cut) { m += exp(z - zmax); } }
      if (sumAll(l, m) >= p.topP * sumAllK) { lo = mid; } else { hi = mid; }
    }
    cut = max(cut, lo);
  }
  // Draw u ∈ [0, kept mass), then find the token where the running sum (in index order) passes u.
  var kept = 0.0;
  let chunk = (p.n + 255u) / 256u;
  let s0 = l * chunk;
  let s1 = min(s0 + chunk, p.n);
  for (var i = s0; i < s1; i++) { let z = ld(base + i) * p.invTemp; if (z >= cut) { kept += exp(z - zmax); } }
  shf[l] = kept;
  workgroupBarrier();
  if (l == 0u) {
    var acc = 0.0;
    for (var t = 0u; t < 256u; t++) { let v = shf[t]; shf[t] = acc; acc += v; }
    shu[0] = bitcast<u32>(acc);
  }
  workgroupBarrier();
  let mass = bitcast<f32>(shu[0]);
  let u = rngUniform(p.seed, p.counter + row) * mass;
  var run = shf[l];
  let mine = kept;
  workgroupBarrier();
  shu[l] = 0xffffffffu;
  if (u >= run && u < run + mine) {
    var pick = 0xffffffffu;
    for (var i = s0; i < s1; i++) {
      let z = ld(base + i) * p.invTemp;
      if (z >= cut) { run += exp(z - zmax); pick = i; if (run > u) { break; } }
    }
    shu[l] = pick;
  }
  workgroupBarrier();
  for (var s = 128u; s > 0u; s >>= 1u) { if (l < s) { shu[l] = min(shu[l], shu[l + s]); } workgroupBarrier(); }
  if (l == 0u) { outIds[row] = i32(select(shu[0], argmax, shu[0] == 0xffffffffu)); }
}`;
}

const kernels = new Map<string, Kernel>();

/**
 * Picks one token per row of `logits` [B, V] on the GPU; returns i32 [B]. Greedy when `temperature` is 0.
 *
 * @example
 * ```ts
 * const next = sampleNext(logits, {}); // greedy
 * ```
 */
export function sampleNext(logits: Tensor, opts: SamplingOptions): Tensor {
  if (logits.ndim !== 2) throw new Error(`sampleNext expects [batch, vocab] logits, got ${fmtShape(logits.shape)}`);
  const temperature = opts.temperature ?? 0;
  const topP = opts.topP ?? 1;
  if (temperature < 0) throw new Error(`temperature must be ≥ 0, got ${temperature}`);
  if (!(topP > 0 && topP <= 1)) throw new Error(`topP must be in (0, 1], got ${topP}`);
  using x = contiguous(logits);
  const [rows, n] = x.shape;
  const out = Tensor.empty([rows], "i32");
  const gpu = getGpu();
  let k = kernels.get(x.dtype);
  if (!k) {
    kernels.set(
      x.dtype,
      k = gpu.kernel({ name: "sample", code: kernelSource(x.dtype), bindings: ["read", "write"], uniforms: true }),
    );
  }
  const u = new UniformWriter(12)
    .u(0, rows).u(1, n).u(2, x.offset).u(3, temperature === 0 ? 1 : 0)
    .f(4, temperature === 0 ? 1 : 1 / temperature).u(5, opts.topK ?? 0).f(6, topP)
    .u(7, (opts.seed ?? 0) >>> 0).u(8, ((opts.step ?? 0) * rows) >>> 0);
  gpu.dispatch(k, [x.storage.buffer, out.storage.buffer], u.u32, rowGrid(rows));
  return out;
}
