/**
 * Conversions between float32, float16 (IEEE binary16) and bfloat16, on single numbers and on whole arrays.
 *
 * Half-precision values travel as their raw bits in a `Uint16Array`, the way WebGPU buffers and safetensors files
 * hold them. The bulk functions work on the integer bits (through `Uint32Array` views), so they are fast enough
 * for multi-billion-element checkpoints and keep NaN payloads bit-exact. Every narrowing conversion rounds to
 * nearest, ties to even, like PyTorch's `.half()` / `.bfloat16()`; too-large values become ±infinity, tiny ones
 * become subnormals or signed zero, NaN stays NaN.
 *
 * @example
 * ```ts
 * import { f16ArrayToF32, f32ArrayToF16 } from "./half.ts";
 * const bits = f32ArrayToF16(new Float32Array([1, 0.1, 70000]));
 * console.log(bits); // Uint16Array [0x3c00, 0x2e66, 0x7c00]
 * console.log(f16ArrayToF32(bits)); // Float32Array [1, 0.0999755859375, Infinity]
 * ```
 * @module
 */

// ---------------------------------------------------------------------------------------------------------------
// Scalar conversions
// ---------------------------------------------------------------------------------------------------------------

const scratchF64 = new Float64Array(1);
const scratchU32 = new Uint32Array(scratchF64.buffer); // [low word, high word] on little-endian hosts
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const HI = LITTLE_ENDIAN ? 1 : 0;
const LO = LITTLE_ENDIAN ? 0 : 1;

/**
 * Rounds a number to the nearest float16 (ties to even) and returns its 16 bits.
 *
 * The rounding is done once, from the number's full float64 value, so it is exact for any input: for a float32
 * value (the usual case) it is the same as a float32→float16 cast. Overflow gives ±infinity (0x7c00 / 0xfc00),
 * NaN gives NaN (0x7e00 with the sign kept).
 *
 * @example
 * ```ts
 * import { f32ToF16Bits } from "./half.ts";
 * f32ToF16Bits(1); // 0x3c00
 * f32ToF16Bits(-2.5); // 0xc100
 * f32ToF16Bits(65520); // 0x7c00 (rounds up to infinity)
 * ```
 */
export function f32ToF16Bits(x: number): number {
  scratchF64[0] = x;
  const hi = scratchU32[HI], lo = scratchU32[LO];
  const sign = (hi >>> 16) & 0x8000;
  const ahi = hi & 0x7fffffff;
  if (ahi >= 0x7ff00000) { // infinity or NaN
    if ((ahi & 0xfffff) !== 0 || lo !== 0) return sign | nanBits((ahi >>> 10) & 0x3ff);
    return sign | 0x7c00;
  }
  const e = (ahi >>> 20) - 1023; // unbiased exponent
  if (e >= 16) return sign | 0x7c00; // |x| >= 65536 always rounds to infinity
  if (e >= -14) {
    // Normal float16: keep the top 10 of the 52 mantissa bits; the other 42 decide the rounding.
    let h = ((e + 15) << 10) | ((ahi >>> 10) & 0x3ff);
    const rest = ahi & 0x3ff; // the top 10 of the 42 dropped bits; `lo` holds the other 32
    if (rest > 0x200 || (rest === 0x200 && (lo !== 0 || (h & 1) !== 0))) h++; // a carry may reach infinity: correct
    return sign | h;
  }
  // Subnormal float16 (or zero): count in units of 2^-24. Scaling by a power of two is exact in float64.
  const v = Math.abs(x) * 16777216;
  let h = Math.floor(v);
  const frac = v - h;
  if (frac > 0.5 || (frac === 0.5 && (h & 1) !== 0)) h++; // h may become 0x400, the smallest normal: correct
  return sign | h;
}

/**
 * Float16 bits → the number they encode (exact).
 *
 * @example
 * ```ts
 * import { f16BitsToF32 } from "./half.ts";
 * f16BitsToF32(0x3c00); // 1
 * f16BitsToF32(0x0001); // 5.960464477539063e-8 (smallest subnormal, 2^-24)
 * ```
 */
export function f16BitsToF32(h: number): number {
  return f16TableF32()[h & 0xffff];
}

/**
 * Rounds a number to the nearest float16 value and returns that value as a number (like `Math.f16round`).
 *
 * @example
 * ```ts
 * import { roundToF16 } from "./half.ts";
 * roundToF16(0.1); // 0.0999755859375
 * ```
 */
export function roundToF16(x: number): number {
  return f16BitsToF32(f32ToF16Bits(x));
}

/**
 * Rounds a number to the nearest bfloat16 (ties to even, via float32) and returns its 16 bits.
 *
 * @example
 * ```ts
 * import { f32ToBf16Bits } from "./half.ts";
 * f32ToBf16Bits(1); // 0x3f80
 * ```
 */
export function f32ToBf16Bits(x: number): number {
  scratchF32[0] = x;
  return f32BitsToBf16Bits(scratchF32U32[0]);
}

/**
 * Bfloat16 bits → the number they encode (exact).
 *
 * @example
 * ```ts
 * import { bf16BitsToF32 } from "./half.ts";
 * bf16BitsToF32(0x3f80); // 1
 * ```
 */
export function bf16BitsToF32(b: number): number {
  scratchF32U32[0] = (b & 0xffff) << 16;
  return scratchF32[0];
}

const scratchF32 = new Float32Array(1);
const scratchF32U32 = new Uint32Array(scratchF32.buffer);

/** float32 bits → float16 bits, round to nearest even. The bulk conversions inline the same steps. */
function f32BitsToF16Bits(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const a = x & 0x7fffffff;
  if (a >= 0x38800000) { // |x| >= 2^-14: normal float16, infinity or NaN
    if (a < 0x47800000) { // |x| < 2^16
      // Re-bias the exponent (127 → 15) and round off 13 mantissa bits; a carry may reach infinity, correctly.
      const r = a - 0x38000000;
      return sign | ((r + 0xfff + ((r >>> 13) & 1)) >>> 13);
    }
    if (a > 0x7f800000) return sign | nanBits((a >>> 13) & 0x3ff);
    return sign | 0x7c00; // infinity, or too large
  }
  if (a <= 0x33000000) return sign; // |x| <= 2^-25 rounds to zero (2^-25 itself ties to the even zero)
  // Subnormal float16: shift the 24-bit significand so its unit is 2^-24, rounding half to even.
  const m = (a & 0x7fffff) | 0x800000;
  const s = 126 - (a >>> 23); // 14..24
  const q = m >>> s;
  const rem = m & ((1 << s) - 1);
  const half = 1 << (s - 1);
  return sign | (rem > half || (rem === half && (q & 1) !== 0) ? q + 1 : q);
}

/**
 * A float16 NaN carrying the top 10 payload bits of a wider NaN. Only when those are all zero (which would spell
 * infinity) is the quiet bit set, so every float16 NaN survives a trip through float32 bit for bit.
 */
function nanBits(payload: number): number {
  return 0x7c00 | (payload === 0 ? 0x200 : payload);
}

/** float32 bits → bfloat16 bits, round to nearest even; a NaN keeps its top payload bits (and stays a NaN). */
function f32BitsToBf16Bits(x: number): number {
  if ((x & 0x7fffffff) > 0x7f800000) return (x & 0x7f0000) !== 0 ? (x >>> 16) & 0xffff : ((x >>> 16) | 0x40) & 0xffff;
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
}

// ---------------------------------------------------------------------------------------------------------------
// Lookup tables, built on first use
// ---------------------------------------------------------------------------------------------------------------

let f16ToF32Bits: Uint32Array | undefined; // 65536 entries: float16 bits → float32 bits (256 KiB)
let f16ToF32Values: Float32Array | undefined; // the same memory, seen as floats
let bf16ToF16Bits: Uint16Array | undefined; // 65536 entries: bfloat16 bits → float16 bits (128 KiB)

function f16TableU32(): Uint32Array {
  if (f16ToF32Bits) return f16ToF32Bits;
  const t = new Uint32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = (h & 0x8000) << 16;
    const exp = (h >>> 10) & 0x1f;
    const man = h & 0x3ff;
    let bits: number;
    if (exp === 0x1f) bits = 0x7f800000 | (man << 13); // infinity, or NaN with its payload
    else if (exp !== 0) bits = ((exp + 112) << 23) | (man << 13); // normal: re-bias 15 → 127
    else if (man === 0) bits = 0; // zero
    else {
      // Subnormal float16 = man × 2^-24; normalize so the leading one becomes the implicit bit.
      let e = 113, m = man;
      while ((m & 0x400) === 0) {
        m <<= 1;
        e--;
      }
      bits = (e << 23) | ((m & 0x3ff) << 13);
    }
    t[h] = (sign | bits) >>> 0;
  }
  f16ToF32Bits = t;
  f16ToF32Values = new Float32Array(t.buffer);
  return t;
}

function f16TableF32(): Float32Array {
  if (!f16ToF32Values) f16TableU32();
  return f16ToF32Values!;
}

function bf16ToF16Table(): Uint16Array {
  if (bf16ToF16Bits) return bf16ToF16Bits;
  const t = new Uint16Array(65536);
  for (let b = 0; b < 65536; b++) t[b] = f32BitsToF16Bits((b << 16) >>> 0); // bf16 → f32 is exact: one rounding
  bf16ToF16Bits = t;
  return t;
}

// ---------------------------------------------------------------------------------------------------------------
// Bulk conversions
// ---------------------------------------------------------------------------------------------------------------

function output<T extends Uint16Array | Float32Array>(dst: T | undefined, n: number, make: (n: number) => T): T {
  if (dst === undefined) return make(n);
  if (dst.length < n) throw new RangeError(`destination holds ${dst.length} elements but the source has ${n}`);
  return dst;
}

/** A Uint32Array over the same bytes as a Float32Array (float32 bits). */
function bitsOf(a: Float32Array): Uint32Array {
  return new Uint32Array(a.buffer, a.byteOffset, a.length);
}

/**
 * Float32 array → float16 bits, round to nearest even (overflow → ±infinity, subnormals kept, NaN stays NaN).
 * Writes into `dst` when given (it must hold at least `src.length` elements) and returns it.
 *
 * @example
 * ```ts
 * import { f32ArrayToF16 } from "./half.ts";
 * f32ArrayToF16(new Float32Array([1, -2])); // Uint16Array [0x3c00, 0xc000]
 * ```
 */
export function f32ArrayToF16(src: Float32Array, dst?: Uint16Array): Uint16Array {
  const n = src.length;
  const out = output(dst, n, (k) => new Uint16Array(k));
  const x32 = bitsOf(src);
  for (let i = 0; i < n; i++) {
    const x = x32[i];
    const a = x & 0x7fffffff;
    if (a >= 0x38800000 && a < 0x47800000) { // the common case: a normal float16
      const r = a - 0x38000000;
      out[i] = ((x >>> 16) & 0x8000) | ((r + 0xfff + ((r >>> 13) & 1)) >>> 13);
    } else {
      out[i] = f32BitsToF16Bits(x);
    }
  }
  return out;
}

/**
 * Float16 bits → float32 array (exact; bit-exact for NaN payloads too). Table-driven.
 *
 * @example
 * ```ts
 * import { f16ArrayToF32 } from "./half.ts";
 * f16ArrayToF32(new Uint16Array([0x3c00, 0xc000])); // Float32Array [1, -2]
 * ```
 */
export function f16ArrayToF32(src: Uint16Array, dst?: Float32Array): Float32Array {
  const n = src.length;
  const out = output(dst, n, (k) => new Float32Array(k));
  const t = f16TableU32();
  const o32 = bitsOf(out);
  for (let i = 0; i < n; i++) o32[i] = t[src[i]];
  return out;
}

/**
 * Bfloat16 bits → float32 array (exact: bfloat16 is the top half of a float32).
 *
 * @example
 * ```ts
 * import { bf16ArrayToF32 } from "./half.ts";
 * bf16ArrayToF32(new Uint16Array([0x3f80, 0xc000])); // Float32Array [1, -2]
 * ```
 */
export function bf16ArrayToF32(src: Uint16Array, dst?: Float32Array): Float32Array {
  const n = src.length;
  const out = output(dst, n, (k) => new Float32Array(k));
  const o32 = bitsOf(out);
  for (let i = 0; i < n; i++) o32[i] = src[i] << 16;
  return out;
}

/**
 * Bfloat16 bits → float16 bits, correctly rounded (one rounding, to nearest even). Bfloat16's wider exponent means
 * values above 65504 become ±infinity and values below 2^-24 flush to zero, as in PyTorch's `.half()`.
 *
 * @example
 * ```ts
 * import { bf16ArrayToF16 } from "./half.ts";
 * bf16ArrayToF16(new Uint16Array([0x3f80])); // Uint16Array [0x3c00]
 * ```
 */
export function bf16ArrayToF16(src: Uint16Array, dst?: Uint16Array): Uint16Array {
  const n = src.length;
  const out = output(dst, n, (k) => new Uint16Array(k));
  const t = bf16ToF16Table();
  for (let i = 0; i < n; i++) out[i] = t[src[i]];
  return out;
}

/**
 * Float32 array → bfloat16 bits, round to nearest even (NaN stays NaN; overflow past the largest bfloat16 → ±inf).
 *
 * @example
 * ```ts
 * import { f32ArrayToBf16 } from "./half.ts";
 * f32ArrayToBf16(new Float32Array([1, 1 + 2 ** -8])); // Uint16Array [0x3f80, 0x3f80] (the tie goes to even)
 * ```
 */
export function f32ArrayToBf16(src: Float32Array, dst?: Uint16Array): Uint16Array {
  const n = src.length;
  const out = output(dst, n, (k) => new Uint16Array(k));
  const x32 = bitsOf(src);
  for (let i = 0; i < n; i++) {
    const x = x32[i];
    out[i] = (x & 0x7fffffff) > 0x7f800000 ? f32BitsToBf16Bits(x) : (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
  return out;
}

/**
 * Float16 bits → bfloat16 bits, round to nearest even (float16 subnormals and 11-bit mantissas lose bits).
 *
 * @example
 * ```ts
 * import { f16ArrayToBf16 } from "./half.ts";
 * f16ArrayToBf16(new Uint16Array([0x3c00])); // Uint16Array [0x3f80]
 * ```
 */
export function f16ArrayToBf16(src: Uint16Array, dst?: Uint16Array): Uint16Array {
  const n = src.length;
  const out = output(dst, n, (k) => new Uint16Array(k));
  const t = f16TableU32();
  for (let i = 0; i < n; i++) out[i] = f32BitsToBf16Bits(t[src[i]]);
  return out;
}
