/**
 * Quantization code books shared by the CPU reference and the GPU kernels: the 4-bit NormalFloat (NF4) code with
 * the decision thresholds bitsandbytes uses, and bitsandbytes' signed dynamic 8-bit map used for double
 * quantization, with the exact rule bitsandbytes uses to pick a map entry.
 *
 * Every value here is an f32, and every decision is a comparison between f32 numbers, so a WGSL kernel can make
 * the same decisions bit for bit. Each "nearest index" function takes an optional `scale`: the decision
 * `x / scale > t` is taken as `x > fl(t * scale)` (one correctly rounded f32 product), because WGSL division is
 * only accurate to 2.5 ULP while its `*` is correctly rounded. With `scale = 1` the functions are exactly
 * bitsandbytes' device functions (`dQuantizeNF4`, `dQuantize<0>` in csrc/kernels.cu).
 *
 * @example
 * ```ts
 * import { NF4_CODE, nearestNf4Index } from "./codes.ts";
 * const i = nearestNf4Index(0.3);   // 11
 * console.log(NF4_CODE[i]);          // 0.33791524171829224
 * ```
 * @module
 */

/**
 * The 16 values of the 4-bit NormalFloat data type (NF4), index 0 to 15, as f32.
 *
 * NF4 (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") is information-theoretically
 * tuned for normally distributed weights: its values are quantiles of N(0, 1), normalised to [-1, 1], so that each
 * of the 16 bins holds about the same probability mass of a normal weight divided by its block's absmax. It is
 * asymmetric (7 negative values, 8 positive ones, from 8 quantiles on the positive side and 7 on the negative side)
 * so that 0 is represented exactly — padding and exact zeros survive quantization — while both -1 and +1 exist for
 * the block's extreme value. These are the values of bitsandbytes' `get_4bit_type("nf4")` (and of its CUDA lookup
 * table); index 7 is 0.0 and index 15 is 1.0. Stored as two indices per byte (see `quant/nf4_reference.ts`).
 *
 * @example
 * ```ts
 * import { NF4_CODE } from "./codes.ts";
 * console.log(NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]); // -1 0 1
 * ```
 */
export const NF4_CODE: Float32Array = Float32Array.of(
  -1.0,
  -0.6961928009986877,
  -0.5250730514526367,
  -0.39491748809814453,
  -0.28444138169288635,
  -0.18477343022823334,
  -0.09105003625154495,
  0.0,
  0.07958029955625534,
  0.16093020141124725,
  0.24611230194568634,
  0.33791524171829224,
  0.44070982933044434,
  0.5626170039176941,
  0.7229568362236023,
  1.0,
);

/** Index of 0.0 in `NF4_CODE`; an all-zero block is stored as this index (byte 0x77). */
export const NF4_ZERO_INDEX = 7;

/**
 * The 15 decision thresholds of NF4 as f32: `NF4_THRESHOLDS[i]` separates code `i` from code `i + 1`.
 *
 * They are the constants of bitsandbytes' `dQuantizeNF4` (csrc/kernels.cu), a 4-level binary decision tree whose
 * nodes test `x > 0.03979014977812767f`, `x > 0.3893125355243683f`, ...: each literal is the midpoint of two
 * neighbouring codes computed in double and printed to 16-17 digits, and the `f` suffix makes the compiler round
 * that decimal straight to f32. So each threshold is an f32 nearest to the exact midpoint. For 7 of the 15 the
 * exact midpoint lies exactly halfway between two f32 values, and the side the printed decimal falls on decides; for
 * 4 of those (indices 0, 8, 12, 14) rounding the midpoint itself to f32 (ties to even) would give the other
 * neighbour, 1 ULP away, and different nibbles for inputs between the two. The values below are the f32 numbers
 * nvcc 13.0 produced for the literals (read back on the H200), which the tests also derive from the decimal
 * strings by exact arithmetic.
 *
 * A tree of strict `>` tests on sorted thresholds returns the number of thresholds strictly below `x`, which is
 * what `nearestNf4Index` computes: a value exactly on a threshold goes to the lower code, and a value between two
 * codes goes to the nearer one (up to the f32 rounding of the midpoint).
 *
 * @example
 * ```ts
 * import { NF4_CODE, NF4_THRESHOLDS } from "./codes.ts";
 * console.log(NF4_CODE[8] < NF4_THRESHOLDS[8] && NF4_THRESHOLDS[8] < NF4_CODE[9]); // true
 * ```
 */
export const NF4_THRESHOLDS: Float32Array = Float32Array.of(
  -0.8480964303016663, // "-0.8480964004993439f": the midpoint is an f32 tie; the literal rounds away from even
  -0.6106328964233398, // "-0.6106329262256622f"
  -0.4599952697753906, // "-0.4599952697753906f"
  -0.33967941999435425, // "-0.33967943489551544f"
  -0.23460739850997925, // "-0.23460740596055984f"
  -0.13791173696517944, // "-0.13791173323988914f"
  -0.045525018125772476, // "-0.045525018125772476f"
  0.03979014977812767, // "0.03979014977812767f"
  0.1202552542090416, // "0.1202552504837513f": tie, rounds away from even
  0.2035212516784668, // "0.2035212516784668f"
  0.2920137643814087, // "0.2920137718319893f"
  0.3893125355243683, // "0.3893125355243683f"
  0.5016633868217468, // "0.5016634166240692f": tie, rounds away from even
  0.6427869200706482, // "0.6427869200706482f"
  0.8614783883094788, // "0.8614784181118011f": tie, rounds away from even
);

/**
 * The NF4 index for `x`, deciding as bitsandbytes' `dQuantizeNF4` does: the number of thresholds `t` with
 * `x > fl(t * scale)`.
 *
 * With `scale = 1`, `x` is a value already normalised by its block's absmax and the result equals
 * `dQuantizeNF4(x)` for every f32 `x` (NaN gives 0, as there). With `scale = absmax`, `x` is the raw weight: each
 * threshold is scaled by one correctly rounded f32 multiplication instead of dividing `x`, which a WGSL kernel
 * reproduces exactly. Both forms agree except when `x / absmax` lies within about an ULP of a threshold.
 *
 * @param x the value (f32)
 * @param scale the block's absmax, or 1 when `x` is already normalised; must be > 0 for a meaningful result
 * @returns an index 0..15 into `NF4_CODE`
 *
 * @example
 * ```ts
 * import { nearestNf4Index } from "./codes.ts";
 * console.log(nearestNf4Index(0.3), nearestNf4Index(0.6, 2)); // 11 11
 * ```
 */
export function nearestNf4Index(x: number, scale = 1): number {
  let index = 0;
  for (let t = 0; t < 15; t++) {
    if (x > Math.fround(NF4_THRESHOLDS[t] * scale)) index++;
  }
  return index;
}

/** `fl(a * b + c)` rounded once to f32, for the exact inputs `torchLinspaceF32` gives it (checked). */
function fusedMultiplyAddF32(a: number, b: number, c: number): number {
  const product = a * b; // a is an f32 (24 bits), b an integer below 2^7: exact in double
  const sum = product + c;
  // TwoSum: the rounding error of `product + c` in double; zero means `sum` is exact and one fround rounds once.
  const cPart = sum - product;
  const error = (product - (sum - cPart)) + (c - cPart);
  if (error !== 0) throw new Error(`internal: ${a} * ${b} + ${c} is not exact in double`);
  return Math.fround(sum);
}

/**
 * `torch.linspace(start, end, steps)` in float32 on the CPU, as PyTorch's `linspace_kernel` computes it: `step =
 * (end - start) / (steps - 1)` in f32; the first half is `start + step * i`, the second half `end - step * (steps -
 * 1 - i)`, each multiply-add fused (one rounding), as the compiler contracts it in PyTorch's builds.
 */
function torchLinspaceF32(start: number, end: number, steps: number): Float32Array {
  const s = Math.fround(start);
  const e = Math.fround(end);
  const step = Math.fround(Math.fround(e - s) / (steps - 1));
  const halfway = Math.floor(steps / 2);
  const out = new Float32Array(steps);
  for (let i = 0; i < steps; i++) {
    out[i] = i < halfway ? fusedMultiplyAddF32(step, i, s) : fusedMultiplyAddF32(-step, steps - 1 - i, e);
  }
  return out;
}

/** `10 ** (i - 6)` for i = 0..6 as Python computes it (correctly rounded doubles), before the f32 conversion. */
const DECADES = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1];

/**
 * bitsandbytes' dynamic 8-bit map, `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: 256 sorted
 * f32 values in [-1, 1] (signed) or [0, 1] (unsigned). The signed map quantizes the centred absmax values in double
 * quantization (`quantize_4bit(compress_statistics=True)` calls `quantize_blockwise(absmax - mean, blocksize=256)`
 * with the default map, which is this one).
 *
 * Structure (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep Learning"): after the sign bit, the 7
 * remaining bits start with `z` leading zeros (0..6) that give a decimal exponent, then an indicator 1 bit, then
 * `6 - z` linear fraction bits. So decade `i = 6 - z` covers `[0.1, 1] * 10^(i - 6)` with `2^i` equal bins and the
 * value is the bin's centre: 1 value in [1e-7, 1e-6], 2 in [1e-6, 1e-5], ..., 64 in [0.1, 1] — 127 magnitudes, fine
 * near zero and coarse (steps of 0.9/64 ≈ 0.014) near 1. The all-zero pattern is 0.
 *
 * The signed map has the 127 magnitudes with both signs, plus 0 and +1.0 (256 values): it is antisymmetric about
 * index 127 (`map[127] = 0`, `map[254 - k] = -map[k]`), and +1.0 at index 255 has no negative twin — the most
 * negative value is -0.99296875 (the centre of the top bin), not -1. The unsigned map has 254 magnitudes (one more
 * fraction bit per decade), 0 and 1.0.
 *
 * The f32 arithmetic follows the Python code: `boundaries = torch.linspace(0.1, 1, 2^i + 1)` (float32), `means =
 * (boundaries[:-1] + boundaries[1:]) / 2` (f32), `value = f32(10^(i-6)) * means` (f32). The linspace values depend on
 * how PyTorch's kernel was compiled: this follows its formula with fused multiply-adds, which reproduces entry for
 * entry the map that bitsandbytes users print with current PyTorch (e.g. index 1 = -0.9789062738418579); torch 2.11
 * on the H200 machine's CPU (AVX512 kernels) gave the same 256 values.
 * Older PyTorch builds give maps that differ by up to 2 ULP in 10–30 entries (measured with torch 1.13 under
 * ATEN_CPU_CAPABILITY default/avx2/avx512). That is why QLoRA checkpoints store the map (`nested_quant_map`): a
 * loader must use the stored map, never a regenerated one.
 *
 * @param signed true (default) for the signed map used by double quantization
 * @returns a new Float32Array(256), sorted ascending
 *
 * @example
 * ```ts
 * import { dynamicMap } from "./codes.ts";
 * const map = dynamicMap();
 * console.log(map[0], map[127], map[255]); // -0.992968738079071 0 1
 * ```
 */
export function dynamicMap(signed = true): Float32Array {
  const maxExponentBits = 7;
  const totalBits = 8;
  // bitsandbytes writes `total_bits - (1 if signed else 1)`: one bit is set aside in both cases, and the
  // unsigned map spends it on one more fraction bit per decade instead.
  const nonSignBits = totalBits - 1;
  const values: number[] = [];
  for (let i = 0; i < maxExponentBits; i++) {
    const fractionItems = signed
      ? 2 ** (i + nonSignBits - maxExponentBits) + 1
      : 2 ** (i + nonSignBits - maxExponentBits + 1) + 1;
    const boundaries = torchLinspaceF32(0.1, 1, fractionItems);
    const decade = Math.fround(DECADES[i]);
    for (let k = 0; k + 1 < fractionItems; k++) {
      const mean = Math.fround(Math.fround(boundaries[k] + boundaries[k + 1]) / 2);
      const value = Math.fround(decade * mean);
      values.push(value);
      if (signed) values.push(-value);
    }
  }
  // bitsandbytes' `additional_items` is 2^(non_sign_bits - max_exponent_bits) - 1 = 0 for 7 exponent bits of 8.
  values.push(0, 1);
  if (values.length !== 256) throw new Error(`internal: dynamic map has ${values.length} values, not 256`);
  return Float32Array.from(values.sort((a, b) => a - b));
}

/**
 * The index of the entry of a sorted 256-value map nearest to `x`, decided exactly as bitsandbytes' `dQuantize<0>`
 * (csrc/kernels.cu, used by `kQuantizeBlockwise` for 8-bit blockwise quantization with the dynamic map).
 *
 * The kernel binary-searches 7 steps from pivot 127 with `x > map[pivot]` (the pivots tested are odd), which leaves
 * an even pivot `p` with `map[p - 1] < x <= map[p + 1]`; it then compares `x` with the f32 midpoint
 * `(map[a] + map[b]) * 0.5f` between `map[p]` and the neighbour on `x`'s side. The result is the nearest entry,
 * judged against those f32 midpoints; a value exactly on a midpoint goes to the even index of the two (the search's
 * last pivot). Equivalently: the number of midpoints `m_k` (k = 0..254) with `x > m_k`, plus those with
 * `x == m_k` and `k` odd. NaN gives 0, as in the kernel.
 *
 * With `scale = 1`, `x` is already normalised (bitsandbytes multiplies by `1.0f / absmax`). With `scale = absmax`,
 * `x` is the raw value and every comparison `x > v` becomes `x > fl(v * scale)` — map entries and midpoints are
 * computed unscaled, as in the kernel, then scaled by one correctly rounded f32 multiplication — which WGSL
 * reproduces exactly.
 *
 * @param x the value (f32)
 * @param map 256 strictly increasing f32 values, e.g. `dynamicMap()`
 * @param scale the block's absmax, or 1 when `x` is already normalised
 * @returns an index 0..255 into `map`
 *
 * @example
 * ```ts
 * import { dynamicMap, nearestMapIndex } from "./codes.ts";
 * const map = dynamicMap();
 * console.log(nearestMapIndex(0, map), nearestMapIndex(1, map), nearestMapIndex(-1, map)); // 127 255 0
 * ```
 */
export function nearestMapIndex(x: number, map: Float32Array, scale = 1): number {
  const scaled = (v: number) => Math.fround(v * scale);
  let pivot = 127;
  let upperPivot = 255;
  let lowerPivot = 0;
  let lower = -1;
  let upper = 1;
  let value = map[pivot];
  for (let step = 64; step > 0; step >>= 1) {
    if (x > scaled(value)) {
      lowerPivot = pivot;
      lower = value;
      pivot += step;
    } else {
      upperPivot = pivot;
      upper = value;
      pivot -= step;
    }
    value = map[pivot];
  }
  if (upperPivot === 255) upper = map[upperPivot];
  if (lowerPivot === 0) lower = map[lowerPivot];
  if (x > scaled(value)) {
    const midpoint = Math.fround(Math.fround(upper + value) * 0.5);
    return x > scaled(midpoint) ? upperPivot : pivot;
  }
  const midpoint = Math.fround(Math.fround(lower + value) * 0.5);
  return x < scaled(midpoint) ? lowerPivot : pivot;
}
