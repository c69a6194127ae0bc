/**
 * Rotary position embedding kernels. Each output element is `x[d]·cos θ + sign·x[partner(d)]·sin θ` with
 * θ = position · inv_freq[i], where `i` and the partner come from the pairing convention:
 *
 * - rotate-half (Hugging Face LLaMA): pairs (i, i + D/2); `out[i] = x[i]·c − x[i+D/2]·s`,
 *   `out[i+D/2] = x[i+D/2]·c + x[i]·s`;
 * - interleaved (llama2.c, Meta): pairs (2i, 2i + 1); `out[2i] = x[2i]·c − x[2i+1]·s`,
 *   `out[2i+1] = x[2i+1]·c + x[2i]·s`.
 *
 * The backward is the inverse rotation (the same kernel with the sign of sin flipped).
 *
 * The angle is the f32 product `f32(position) · inv_freq[i]`, as in `transformers` (`position_ids.float() @
 * inv_freq`), and its cos/sin are computed to about 2 ulp by {@linkcode SINCOS_WGSL} (WGSL's built-in `sin`/`cos`
 * only promise 2⁻¹¹ absolute error on [−π, π] and nothing outside it, while angles reach the position count).
 * Like `transformers`, cos/sin are then rounded to the activation dtype; for f16 activations each product and the
 * sum are rounded to f16 as PyTorch's half arithmetic does.
 *
 * f16 outputs are written one packed word (two elements) per thread, so no two threads write the same word.
 *
 * @example
 * ```ts
 * import { ropeKernel } from "./rope.ts";
 * const src = ropeKernel({ input: "f16", out: "f16", trig: "f16", roundProducts: true, interleaved: false });
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import type { KernelSource } from "../gpu.ts";
import { linearMain, loadF32Fn, PACK_F16, storageDecl, storageType } from "./common.ts";

/**
 * WGSL `fn sincos(x: f32) -> vec2<f32>` (sin, cos) accurate to ~2 ulp for |x| < 2¹⁷ (positions up to 131,072):
 * Cody–Waite reduction by π/2 with π/2 split into parts of 7 significant bits (so `k·part` is exact for
 * k < 2¹⁷), then the Cephes minimax polynomials on [−π/4, π/4].
 */
export const SINCOS_WGSL = `
fn sincos(x: f32) -> vec2<f32> {
  let k = round(x * 0.63661977236758134);
  var r = x - k * 1.578125;
  r = r - k * -0.00732421875;
  r = r - k * -0.000004470348358154297;
  r = r - k * 1.5893254712295857e-8;
  let z = r * r;
  let s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * (z * r) + r;
  let c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0;
  let q = i32(k) & 3;
  if (q == 0) { return vec2<f32>(s, c); }
  if (q == 1) { return vec2<f32>(c, -s); }
  if (q == 2) { return vec2<f32>(-s, -c); }
  return vec2<f32>(-c, s);
}`;

/**
 * WGSL `fn r16(v: f32) -> f32`: the f16 value nearest to `v` (ties to even), as an f32, saturating at ±65504.
 * Done with integer arithmetic because `pack2x16float`'s rounding is left to the driver (it is round-to-nearest
 * on lavapipe, but not every driver promises it), and PyTorch rounds to nearest even.
 */
export const ROUND_F16_WGSL = `
fn r16(v: f32) -> f32 {
  if (abs(v) < 6.103515625e-5) { return round(v * 16777216.0) * 5.9604644775390625e-8; }
  let u = bitcast<u32>(v);
  return clamp(bitcast<f32>((u + 0xfffu + ((u >> 13u) & 1u)) & 0xffffe000u), -65504.0, 65504.0);
}`;

/** A rope kernel variant. */
export interface RopeSpec {
  /** Dtype of the tensor read (x in the forward, the gradient in the backward). */
  input: DType;
  /** Output dtype (x's dtype). */
  out: DType;
  /** Dtype cos/sin are rounded to before multiplying (the activation dtype, as in `transformers`). */
  trig: DType;
  /** Round each product and the sum to f16, as PyTorch's half arithmetic does (forward with f16 activations). */
  roundProducts: boolean;
  /** Pairs (2i, 2i+1) instead of (i, i+D/2). */
  interleaved: boolean;
}

/** Uniform fields of the rope kernel, in word order. */
export const ROPE_FIELDS = [
  "numel",
  "D",
  "H",
  "T",
  "xo",
  "xsb",
  "xst",
  "xsh",
  "xsd",
  "po",
  "psb",
  "pst",
  "inverse",
] as const;

/**
 * Generates the rope kernel. Bindings: x (input), positions (i32), inv_freq (f32, D/2 values), out (contiguous
 * [B, T, H, D]). Dispatch {@linkcode gridFor}(numel, or numel/2 words for f16 output, 256).
 */
export function ropeKernel(spec: RopeSpec): KernelSource {
  const trig = spec.trig === "f16" ? "vec2<f32>(r16(sc.x), r16(sc.y))" : "sc";
  const partner = spec.interleaved
    ? "let i = d / 2u; let pd = d ^ 1u; let lower = (d & 1u) == 0u;"
    : "let hd = p.D / 2u; let lower = d < hd; let i = select(d - hd, d, lower); let pd = select(d - hd, d + hd, lower);";
  const combine = spec.roundProducts
    ? "return r16(r16(xa * cs.y) + sgn * r16(xp * cs.x));"
    : "return xa * cs.y + sgn * (xp * cs.x);";
  const code = `struct Params { ${ROPE_FIELDS.map((f) => `${f}: u32,`).join(" ")} }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "x", spec.input, "read")}
@group(0) @binding(2) var<storage, read> pos: array<i32>;
@group(0) @binding(3) var<storage, read> invFreq: array<f32>;
${storageDecl(4, "outBuf", spec.out, "read_write")}
${loadF32Fn("ldx", "x", spec.input)}
${PACK_F16}
${ROUND_F16_WGSL}
${SINCOS_WGSL}
fn value(e: u32) -> f32 {
  let d = e % p.D;
  let row = e / p.D;
  let h = row % p.H;
  let bt = row / p.H;
  let t = bt % p.T;
  let b = bt / p.T;
  ${partner}
  let theta = f32(pos[p.po + b * p.psb + t * p.pst]) * invFreq[i];
  let sc = sincos(theta);
  let cs = ${trig};
  let base = p.xo + b * p.xsb + t * p.xst + h * p.xsh;
  let xa = ldx(base + d * p.xsd);
  let xp = ldx(base + pd * p.xsd);
  // lower half: a·c − partner·s; upper half: a·c + partner·s; the inverse rotation flips the sign.
  var sgn = select(1.0, -1.0, lower);
  if (p.inverse != 0u) { sgn = -sgn; }
  ${combine}
}
${linearMain(256)}
${
    spec.out === "f16"
      ? `  let i0 = 2u * t;
  if (i0 >= p.numel) { return; }
  var v1 = 0.0;
  if (i0 + 1u < p.numel) { v1 = value(i0 + 1u); }
  outBuf[t] = packF16(r16(value(i0)), r16(v1));
}`
      : `  if (t >= p.numel) { return; }
  outBuf[t] = ${storageType(spec.out)}(value(t));
}`
  }`;
  return {
    name: `rope_${spec.interleaved ? "interleaved" : "half"}_${spec.input}_${spec.out}`,
    code,
    bindings: ["read", "read", "read", "write"],
    uniforms: true,
  };
}
