/**
 * A plain CPU implementation of NF4 blockwise quantization and double quantization, in the layout of
 * bitsandbytes' `quantize_4bit(quant_type="nf4")`. It is the reference the GPU kernels are tested against (they
 * must produce the same bytes and the same f32 values, bit for bit), and it can quantize small tensors on the CPU.
 *
 * Arithmetic contract (what a WGSL kernel must do to match exactly):
 * - absmax of a block = max |x| (exact in any order);
 * - a value is never divided by its absmax: the decision `x / absmax > t` is taken as `x > fl(t * absmax)`, with one
 *   correctly rounded f32 product (WGSL guarantees that for `*` but allows 2.5 ULP for `/`); see `nearestNf4Index`
 *   and `nearestMapIndex` in `codes.ts`;
 * - dequantization is `fl(code[i] * absmax)`, and with double quantization the absmax is first rebuilt as
 *   `fl(fl(map[q] * scale) + offset)` — two roundings, so a kernel must not fuse that multiply-add;
 * - the mean of the absmax values (the double-quantization offset) is `fl(sumF32(absmax) * fl(1 / n))`, with the
 *   summation order of `sumF32`.
 *
 * Subnormal f32 numbers may be flushed to zero on a GPU; exact agreement is promised only where every scaled
 * threshold is a normal number: NF4 block absmax above ~3e-37, double-quantization block scales above ~4e-32.
 *
 * @example
 * ```ts
 * import { dequantizeNf4, quantizeNf4 } from "./nf4_reference.ts";
 * const w = Float32Array.from({ length: 128 }, () => Math.random() - 0.5);
 * const q = quantizeNf4(w, { blockSize: 64 }); // 64 bytes + 2 absmax values
 * const back = dequantizeNf4(q);
 * ```
 * @module
 */
import { dynamicMap, nearestMapIndex, nearestNf4Index, NF4_CODE, NF4_ZERO_INDEX } from "./codes.ts";

/**
 * The supported block sizes, for the NF4 weights and for the absmax values in double quantization: powers of two
 * from 32 to 4096 (bitsandbytes supports 64 to 4096 on CUDA, and 32 in recent versions).
 *
 * @example
 * ```ts
 * import { NF4_BLOCK_SIZES } from "./nf4_reference.ts";
 * console.log(NF4_BLOCK_SIZES.includes(64)); // true
 * ```
 */
export const NF4_BLOCK_SIZES: readonly number[] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/**
 * An NF4-quantized tensor without double quantization.
 *
 * `packed[j]` holds elements `2j` (high nibble) and `2j + 1` (low nibble) as indices into `NF4_CODE`;
 * `absmax[b]` is the f32 absmax of elements `b * blockSize ... (b + 1) * blockSize - 1`.
 *
 * @example
 * ```ts
 * import { type Nf4Quantized, quantizeNf4 } from "./nf4_reference.ts";
 * const q: Nf4Quantized = quantizeNf4(new Float32Array(64).fill(1));
 * console.log(q.packed.length, q.absmax.length); // 32 1
 * ```
 */
export interface Nf4Quantized {
  /** `numel / 2` bytes, two 4-bit code indices each, the first element in the high nibble. */
  packed: Uint8Array;
  /** One f32 absmax per block: `numel / blockSize` values. */
  absmax: Float32Array;
  /** Elements per block. */
  blockSize: number;
  /** Number of elements of the original (flattened, row-major) tensor. */
  numel: number;
}

/**
 * Absmax values quantized to 8 bits with bitsandbytes' dynamic map (double quantization's second level):
 * `absmax[i] ≈ map[quantized[i]] * scale[floor(i / blockSize)] + offset`.
 *
 * @example
 * ```ts
 * import { quantizeAbsmax, type QuantizedAbsmax } from "./nf4_reference.ts";
 * const dq: QuantizedAbsmax = quantizeAbsmax(Float32Array.of(1, 2, 3));
 * console.log(dq.offset); // 2
 * ```
 */
export interface QuantizedAbsmax {
  /** One map index per absmax value. */
  quantized: Uint8Array;
  /** One f32 absmax of the centred values per block of `blockSize` (the last block may be partial). */
  scale: Float32Array;
  /** The f32 mean of the absmax values, subtracted before quantizing and added back after. */
  offset: number;
  /** Values per block (bitsandbytes: 256). */
  blockSize: number;
  /** The 256-value map the indices point into (bitsandbytes stores it as `nested_quant_map`). */
  map: Float32Array;
}

/**
 * An NF4-quantized tensor with double quantization: like `Nf4Quantized`, but its absmax values are themselves
 * quantized to 8 bits (bitsandbytes' `compress_statistics=True`).
 *
 * @example
 * ```ts
 * import { type Nf4DoubleQuantized, quantizeNf4DoubleQuant } from "./nf4_reference.ts";
 * const q: Nf4DoubleQuantized = quantizeNf4DoubleQuant(new Float32Array(128).fill(0.5));
 * console.log(q.quantizedAbsmax.quantized.length); // 2
 * ```
 */
export interface Nf4DoubleQuantized {
  /** As in `Nf4Quantized`. */
  packed: Uint8Array;
  /** The block absmax values, quantized. */
  quantizedAbsmax: QuantizedAbsmax;
  /** Elements per NF4 block. */
  blockSize: number;
  /** Number of elements of the original tensor. */
  numel: number;
}

function checkBlockSize(blockSize: number, name: string): void {
  if (!NF4_BLOCK_SIZES.includes(blockSize)) {
    throw new RangeError(
      `${name} must be a power of two from 32 to 4096 (${NF4_BLOCK_SIZES.join(", ")}), got ${blockSize}`,
    );
  }
}

/** Throws unless `numel` is a positive multiple of `blockSize`, saying how to fix it. */
function checkLength(numel: number, blockSize: number, what: string): void {
  if (numel === 0) throw new RangeError(`${what} is empty: there is nothing to quantize`);
  if (numel % blockSize === 0) return;
  const padded = Math.ceil(numel / blockSize) * blockSize;
  const dividing = NF4_BLOCK_SIZES.filter((b) => numel % b === 0);
  const choose = dividing.length > 0
    ? `or choose a block size that divides it (${dividing.join(", ")})`
    : `since no supported block size (${NF4_BLOCK_SIZES.join(", ")}) divides ${numel}`;
  throw new RangeError(
    `${what} has ${numel} elements, not a multiple of the block size ${blockSize}: ` +
      `pad it with zeros to ${padded} elements ${choose}`,
  );
}

function checkFinite(values: Float32Array, what: string): void {
  for (let i = 0; i < values.length; i++) {
    if (!Number.isFinite(values[i])) {
      throw new RangeError(`${what}[${i}] is ${values[i]}: quantization needs finite values`);
    }
  }
}

/** max |x| over `values[start, end)`. */
function absmaxOf(values: Float32Array, start: number, end: number): number {
  let max = 0;
  for (let i = start; i < end; i++) max = Math.max(max, Math.abs(values[i]));
  return max;
}

/**
 * Quantizes weights to NF4 in blocks, as bitsandbytes' `quantize_4bit(A, blocksize, quant_type="nf4")`.
 *
 * The weights are taken as one flat row-major array (a `[out, in]` matrix's rows one after the other). For each
 * block of `blockSize` consecutive elements: `absmax = max |x|`; each `x` gets the NF4 index
 * `nearestNf4Index(x, absmax)`, the number of thresholds `t` with `x > fl(t * absmax)`; indices are packed two per
 * byte, the first element in the high nibble. An all-zero block (absmax 0) is stored as index 7 (the code 0.0,
 * byte 0x77) and dequantizes to exact zeros.
 *
 * Difference from bitsandbytes: its kernel (built with `--use_fast_math`) normalises with
 * `x * (1.0f / absmax)`, where the reciprocal is the approximate `rcp.approx.ftz.f32`, and compares the result with
 * the thresholds; we compare `x` with `fl(threshold * absmax)`, which is exact up to one rounding and which WGSL
 * reproduces. The two choose different codes only when `x / absmax` lies within about an ULP of a threshold, where
 * both codes are equally near. Measured on the H200 against a fast-math CUDA port of `kQuantizeBlockwise` (same
 * thresholds, same tree): 1 nibble of 4,194,304 N(0, 0.02) weights differed, `x / absmax` 0.36 ULP above the
 * threshold, where our code is the exact one. For an all-zero block bitsandbytes computes `0 * inf = NaN` and
 * stores index 0 (-1.0), which dequantizes to 0 without double quantization but to `-absmax'` with it (the
 * rebuilt absmax is not 0); we store index 7.
 *
 * @param weights the tensor's elements, row-major; finite
 * @param options `blockSize` (default 64): one of `NF4_BLOCK_SIZES`, dividing `weights.length`
 * @returns the packed indices and the f32 absmax per block
 * @throws RangeError for an unsupported block size, a length that is not a multiple of it (pad, or choose a block
 * size that divides it), an empty tensor or a non-finite weight
 *
 * @example
 * ```ts
 * import { quantizeNf4 } from "./nf4_reference.ts";
 * const w = new Float32Array(64);
 * w[0] = -2; w[1] = 2; // absmax 2; -1.0 is code 0, +1.0 is code 15, 0 is code 7
 * const q = quantizeNf4(w);
 * console.log(q.packed[0].toString(16), q.packed[1].toString(16), q.absmax[0]); // f 77 2
 * ```
 */
export function quantizeNf4(weights: Float32Array, options: { blockSize?: number } = {}): Nf4Quantized {
  const blockSize = options.blockSize ?? 64;
  checkBlockSize(blockSize, "blockSize");
  checkLength(weights.length, blockSize, "the weight");
  checkFinite(weights, "weights");
  const numel = weights.length;
  const blocks = numel / blockSize;
  const packed = new Uint8Array(numel / 2);
  const absmax = new Float32Array(blocks);
  for (let b = 0; b < blocks; b++) {
    const start = b * blockSize;
    const end = start + blockSize;
    const scale = absmaxOf(weights, start, end);
    absmax[b] = scale;
    for (let i = start; i < end; i += 2) {
      const high = scale === 0 ? NF4_ZERO_INDEX : nearestNf4Index(weights[i], scale);
      const low = scale === 0 ? NF4_ZERO_INDEX : nearestNf4Index(weights[i + 1], scale);
      packed[i >> 1] = (high << 4) | low;
    }
  }
  return { packed, absmax, blockSize, numel };
}

/** `out[i] = fl(NF4_CODE[index of element i] * absmax[block of i])`. */
function dequantizePacked(packed: Uint8Array, absmax: Float32Array, blockSize: number, numel: number): Float32Array {
  checkBlockSize(blockSize, "blockSize");
  checkLength(numel, blockSize, "the quantized tensor");
  if (packed.length !== numel / 2) {
    throw new RangeError(`packed has ${packed.length} bytes; ${numel} elements need ${numel / 2}`);
  }
  if (absmax.length !== numel / blockSize) {
    throw new RangeError(
      `absmax has ${absmax.length} values; ${numel} elements in blocks of ${blockSize} need ${numel / blockSize}`,
    );
  }
  const out = new Float32Array(numel);
  for (let i = 0; i < numel; i += 2) {
    const byte = packed[i >> 1];
    const scale = absmax[Math.floor(i / blockSize)];
    out[i] = NF4_CODE[byte >> 4] * scale; // the Float32Array store rounds the exact product to f32 once
    out[i + 1] = NF4_CODE[byte & 0x0f] * scale;
  }
  return out;
}

/**
 * Reconstructs the weights of an NF4-quantized tensor: element `i` is `fl(NF4_CODE[index] * absmax[block])`, as
 * bitsandbytes' `dequantize_4bit` computes it in f32.
 *
 * @param q the result of `quantizeNf4`
 * @returns `q.numel` f32 values, row-major
 * @throws RangeError when the sizes in `q` do not agree
 *
 * @example
 * ```ts
 * import { dequantizeNf4, quantizeNf4 } from "./nf4_reference.ts";
 * const w = Float32Array.from({ length: 64 }, (_, i) => (i - 32) / 32);
 * const back = dequantizeNf4(quantizeNf4(w));
 * console.log(back[0], back[63]); // -1 and the NF4 value nearest 31/32 (1)
 * ```
 */
export function dequantizeNf4(q: Nf4Quantized): Float32Array {
  return dequantizePacked(q.packed, q.absmax, q.blockSize, q.numel);
}

/**
 * The f32 sum of `values` in the fixed order the GPU reduction uses, so both get the same bits.
 *
 * Order: split the values into chunks of 256 consecutive values (the last one padded with +0); reduce each chunk
 * as a 256-thread workgroup does, `v[i] = fl(v[i] + v[i + stride])` for `i < stride`, stride = 128, 64, ..., 1,
 * giving `v[0]`; repeat on the chunk sums until one value remains (at least one pass is made).
 *
 * @param values f32 values
 * @returns their sum, an f32 (0 for an empty array)
 *
 * @example
 * ```ts
 * import { sumF32 } from "./nf4_reference.ts";
 * console.log(sumF32(Float32Array.of(1, 2, 3))); // 6
 * ```
 */
export function sumF32(values: Float32Array): number {
  let level = values;
  do {
    const chunks = Math.max(1, Math.ceil(level.length / 256));
    const next = new Float32Array(chunks);
    const lanes = new Float32Array(256);
    for (let c = 0; c < chunks; c++) {
      lanes.fill(0);
      lanes.set(level.subarray(c * 256, Math.min(level.length, (c + 1) * 256)));
      for (let stride = 128; stride >= 1; stride >>= 1) {
        for (let i = 0; i < stride; i++) lanes[i] = lanes[i] + lanes[i + stride]; // rounded to f32 on store
      }
      next[c] = lanes[0];
    }
    level = next;
  } while (level.length > 1);
  return level[0];
}

function checkMap(map: Float32Array): void {
  if (map.length !== 256) throw new RangeError(`the map must have 256 values, got ${map.length}`);
  for (let i = 0; i < 256; i++) {
    if (!Number.isFinite(map[i]) || (i > 0 && !(map[i] > map[i - 1]))) {
      throw new RangeError(`the map must be finite and strictly increasing; it is not at index ${i}`);
    }
  }
}

/**
 * Double quantization of NF4 absmax values, as bitsandbytes' `quantize_4bit(compress_statistics=True)`:
 * `offset = mean(absmax)`; the centred values `fl(absmax - offset)` are quantized blockwise (`blockSize`, 256 in
 * bitsandbytes, the last block may be partial) with the signed dynamic 8-bit map, each block by its own f32
 * absmax (`scale`), choosing entries with bitsandbytes' `dQuantize` rule (`nearestMapIndex`).
 *
 * As for NF4, a centred value is compared with `fl(v * scale)` for each map value or midpoint `v` instead of being
 * multiplied by `1.0f / scale` (a fast-math reciprocal in bitsandbytes); given the same offset, the indices and
 * scales equalled those of a fast-math CUDA port of bitsandbytes' kernel on all 65,536 absmax values of a 4M-weight
 * test. The offset is `fl(sumF32(absmax) * fl(1 / n))`, where bitsandbytes uses `torch.mean` on the GPU, whose
 * summation order is its own: the two differed by 1 ULP there, which moved 5 of the 65,536 centred values across a
 * bin midpoint (each then rebuilt one bin, up to ~1.3%, away from bitsandbytes' value — both about equally near).
 * Pass `offset` to use a given one instead (e.g. a checkpoint's `nested_offset`, to reproduce its indices).
 * A block whose centred values are all 0 gets scale 0 and index 0 (as in bitsandbytes), which dequantizes to
 * exactly the offset.
 *
 * @param absmax the values to compress, finite (NF4 block absmax values)
 * @param options `blockSize` (default 256, one of `NF4_BLOCK_SIZES`); `map` (default `dynamicMap()`), 256
 * strictly increasing values — pass the stored `nested_quant_map` to reproduce a checkpoint's quantization;
 * `offset` (default: the mean as above), a finite number subtracted before quantizing
 * @returns indices, per-block scales, the offset, the block size and the map
 * @throws RangeError for an empty input, a non-finite value, a bad block size or map
 *
 * @example
 * ```ts
 * import { dequantizeAbsmax, quantizeAbsmax } from "./nf4_reference.ts";
 * const absmax = Float32Array.from({ length: 1000 }, () => 2 + Math.random());
 * const back = dequantizeAbsmax(quantizeAbsmax(absmax)); // within 1% of absmax
 * ```
 */
export function quantizeAbsmax(
  absmax: Float32Array,
  options: { blockSize?: number; map?: Float32Array; offset?: number } = {},
): QuantizedAbsmax {
  const blockSize = options.blockSize ?? 256;
  checkBlockSize(blockSize, "the absmax block size");
  const map = options.map ?? dynamicMap();
  checkMap(map);
  if (absmax.length === 0) throw new RangeError("absmax is empty: there is nothing to quantize");
  checkFinite(absmax, "absmax");
  const n = absmax.length;
  const offset = Math.fround(options.offset ?? sumF32(absmax) * Math.fround(1 / n));
  if (!Number.isFinite(offset)) throw new RangeError(`offset must be finite, got ${options.offset}`);
  const centred = new Float32Array(n);
  for (let i = 0; i < n; i++) centred[i] = absmax[i] - offset; // rounded to f32 on store
  const blocks = Math.ceil(n / blockSize);
  const scale = new Float32Array(blocks);
  const quantized = new Uint8Array(n);
  for (let b = 0; b < blocks; b++) {
    const start = b * blockSize;
    const end = Math.min(n, start + blockSize);
    const s = absmaxOf(centred, start, end);
    scale[b] = s;
    for (let i = start; i < end; i++) quantized[i] = nearestMapIndex(centred[i], map, s);
  }
  return { quantized, scale, offset, blockSize, map };
}

/**
 * Rebuilds the absmax values from `quantizeAbsmax`'s result: `fl(fl(map[q] * scale[block]) + offset)`, the two
 * steps bitsandbytes takes (`dequantize_blockwise`, then `absmax += offset`).
 *
 * @param dq the result of `quantizeAbsmax`
 * @returns one f32 per quantized value
 * @throws RangeError when the number of scales does not match the number of values and the block size
 *
 * @example
 * ```ts
 * import { dequantizeAbsmax, quantizeAbsmax } from "./nf4_reference.ts";
 * // Centred, these are -1 and +1 times the scale; the map has +1 but no -1 (its end is -0.99297):
 * console.log(dequantizeAbsmax(quantizeAbsmax(Float32Array.of(1, 3)))); // Float32Array [1.0070312, 3]
 * ```
 */
export function dequantizeAbsmax(dq: QuantizedAbsmax): Float32Array {
  checkBlockSize(dq.blockSize, "the absmax block size");
  checkMap(dq.map);
  const n = dq.quantized.length;
  if (dq.scale.length !== Math.ceil(n / dq.blockSize)) {
    throw new RangeError(
      `scale has ${dq.scale.length} values; ${n} values in blocks of ${dq.blockSize} need ${
        Math.ceil(n / dq.blockSize)
      }`,
    );
  }
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const scaled = Math.fround(dq.map[dq.quantized[i]] * dq.scale[Math.floor(i / dq.blockSize)]);
    out[i] = scaled + dq.offset; // rounded to f32 on store
  }
  return out;
}

/**
 * NF4 quantization with double quantization (QLoRA's storage format, bitsandbytes' `quantize_4bit(blocksize=64,
 * compress_statistics=True, quant_type="nf4")`): `quantizeNf4`, then `quantizeAbsmax` on its absmax values. The
 * weights are quantized with the exact absmax; only the stored absmax is approximate.
 *
 * @param weights the tensor's elements, row-major, finite
 * @param options `blockSize` (default 64) for the weights, `absmaxBlockSize` (default 256) for the absmax values
 * @returns packed indices and the quantized absmax
 * @throws RangeError as `quantizeNf4` and `quantizeAbsmax`
 *
 * @example
 * ```ts
 * import { dequantizeNf4DoubleQuant, quantizeNf4DoubleQuant } from "./nf4_reference.ts";
 * const w = Float32Array.from({ length: 4096 }, () => Math.random() - 0.5);
 * const back = dequantizeNf4DoubleQuant(quantizeNf4DoubleQuant(w));
 * ```
 */
export function quantizeNf4DoubleQuant(
  weights: Float32Array,
  options: { blockSize?: number; absmaxBlockSize?: number } = {},
): Nf4DoubleQuantized {
  const { packed, absmax, blockSize, numel } = quantizeNf4(weights, { blockSize: options.blockSize });
  const quantizedAbsmax = quantizeAbsmax(absmax, { blockSize: options.absmaxBlockSize ?? 256 });
  return { packed, quantizedAbsmax, blockSize, numel };
}

/**
 * Reconstructs the weights of a double-quantized NF4 tensor: the absmax values are rebuilt with
 * `dequantizeAbsmax`, then element `i` is `fl(NF4_CODE[index] * absmax[block])`.
 *
 * @param q the result of `quantizeNf4DoubleQuant`
 * @returns `q.numel` f32 values, row-major
 * @throws RangeError when the sizes in `q` do not agree
 *
 * @example
 * ```ts
 * import { dequantizeNf4DoubleQuant, quantizeNf4DoubleQuant } from "./nf4_reference.ts";
 * const back = dequantizeNf4DoubleQuant(quantizeNf4DoubleQuant(new Float32Array(64).fill(0.25)));
 * console.log(back[0]); // 0.25
 * ```
 */
export function dequantizeNf4DoubleQuant(q: Nf4DoubleQuantized): Float32Array {
  return dequantizePacked(q.packed, dequantizeAbsmax(q.quantizedAbsmax), q.blockSize, q.numel);
}

/**
 * Exact storage, in bits per parameter, of an NF4 tensor of `numel` elements: 4 bits per element, plus a 32-bit
 * absmax per block without double quantization; with it, an 8-bit index per block, a 32-bit scale per
 * `absmaxBlockSize` blocks (the last may be partial) and the 32-bit offset (counted: 32 bits per tensor). The code
 * tables (16 + 256 f32 values) are constants shared by all tensors and not counted (bitsandbytes' serialized state
 * repeats them per tensor, 8,704 bits, which adds 0.0005 bits/parameter to a 4096 × 4096 matrix).
 *
 * For large tensors with the defaults this is 4 + 32/64 = 4.5 without double quantization and
 * 4 + 8/64 + 32/(64·256) ≈ 4.127 with it.
 *
 * @param spec `numel` (a positive multiple of `blockSize`), `blockSize` (default 64), `doubleQuant` (default false),
 * `absmaxBlockSize` (default 256)
 * @returns bits per parameter
 * @throws RangeError for a bad block size or a `numel` that is not a positive multiple of it
 *
 * @example
 * ```ts
 * import { bitsPerParameter } from "./nf4_reference.ts";
 * console.log(bitsPerParameter({ numel: 4096 * 4096 }));                    // 4.5
 * console.log(bitsPerParameter({ numel: 4096 * 4096, doubleQuant: true })); // 4.126955...
 * ```
 */
export function bitsPerParameter(spec: {
  numel: number;
  blockSize?: number;
  doubleQuant?: boolean;
  absmaxBlockSize?: number;
}): number {
  const blockSize = spec.blockSize ?? 64;
  const absmaxBlockSize = spec.absmaxBlockSize ?? 256;
  checkBlockSize(blockSize, "blockSize");
  checkBlockSize(absmaxBlockSize, "the absmax block size");
  if (!Number.isInteger(spec.numel) || spec.numel < 0) {
    throw new RangeError(`numel must be a non-negative integer, got ${spec.numel}`);
  }
  checkLength(spec.numel, blockSize, "the tensor");
  const blocks = spec.numel / blockSize;
  const constantBits = spec.doubleQuant ? 8 * blocks + 32 * Math.ceil(blocks / absmaxBlockSize) + 32 : 32 * blocks;
  return (4 * spec.numel + constantBits) / spec.numel;
}
