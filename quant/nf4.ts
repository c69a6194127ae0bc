/**
 * NF4 on the GPU: the packed storage layout, blockwise quantization and double quantization kernels that produce
 * exactly the bytes and f32 values of the CPU reference (quant/nf4_reference.ts), dequantization, and the fused
 * dequantize-matmul drivers (`x · dequant(W)ᵀ` and `g · dequant(W)`) that `Linear4bit` runs.
 *
 * Layout of an {@linkcode Nf4Tensor} (bitsandbytes' `quantize_4bit`): `packed` is a u32 tensor of `numel / 8`
 * words whose little-endian bytes are the reference's `packed` bytes (element `2j` in the high nibble of byte `j`);
 * `absmax` is one f32 per block; with double quantization `absmax` is null and `nested` holds the u8 map indices (4
 * per u32 word, little-endian, so a byte view is the reference's `quantized`), one f32 scale per 256 absmax values,
 * the f32 offset (a one-element tensor, so it never leaves the GPU) and the 256-value map (one GPU copy of the
 * default map is shared by every tensor that uses it).
 *
 * Decisions (see core/kernels/nf4.ts for the arithmetic): with double quantization the fused kernels rebuild each
 * block's absmax inside the kernel (`fl(fl(map[q]·scale) + offset)`, the map staged in workgroup memory) rather
 * than expanding the absmax into an f32 buffer once per forward: the rebuild costs a byte load, a workgroup-memory
 * read and two flops per block of 64 weights, while a pre-pass would add an extra dispatch per layer and 40 bits of
 * memory traffic per block (write and read back 32 bits instead of reading 8), i.e. ~0.6 more bits per weight for
 * the bandwidth-bound GEMV.
 *
 * @example
 * ```ts
 * import { dequantizeNf4Gpu, nf4Matmul, quantizeNf4Gpu } from "./nf4.ts";
 * const q = quantizeNf4Gpu(w, { blockSize: 64, doubleQuant: true }); // w: [out, in] f16 or f32
 * const y = nf4Matmul(x, q);                                          // x · dequant(w)ᵀ, fused
 * const dense = dequantizeNf4Gpu(q, "f16");
 * ```
 * @module
 */
import type { DType } from "../core/dtype.ts";
import { fromArray } from "../core/creation.ts";
import { getGpu, type Kernel, type KernelSource } from "../core/gpu.ts";
import { gridFor, rowGrid, UniformWriter } from "../core/kernels/common.ts";
import {
  ABSMAX_BLOCK,
  ABSMAX_QUANTIZE_UNIFORM_WORDS,
  type AbsmaxMode,
  absmaxQuantizeKernel,
  checkNf4Tile,
  DEQUANTIZE_UNIFORM_WORDS,
  NF4_MATMUL_UNIFORM_WORDS,
  NF4_TILES,
  nf4DequantizeKernel,
  nf4GemmKernel,
  type Nf4GemmSpec,
  nf4GemvKernel,
  type Nf4GemvSpec,
  nf4QuantizeKernel,
  type Nf4Tile,
  nf4TileName,
  nf4TileSharedBytes,
  QUANTIZE_UNIFORM_WORDS,
  SUM_UNIFORM_WORDS,
  sumChunksKernel,
} from "../core/kernels/nf4.ts";
import { elementwise } from "../core/ops/dispatch.ts";
import { contiguousStrides, fmtShape, numelOf, type Shape, Tensor } from "../core/tensor.ts";
import { dynamicMap, NF4_CODE, NF4_THRESHOLDS } from "./codes.ts";
import { NF4_BLOCK_SIZES, type Nf4DoubleQuantized, type Nf4Quantized, type QuantizedAbsmax } from "./nf4_reference.ts";

/**
 * Absmax values per double-quantization block (bitsandbytes' fixed 256).
 *
 * @example
 * ```ts
 * const scales = Math.ceil(blocks / NF4_ABSMAX_BLOCK_SIZE); // f32 scales of a double-quantized tensor
 * ```
 */
export const NF4_ABSMAX_BLOCK_SIZE: number = ABSMAX_BLOCK;

/**
 * Double-quantized absmax values on the GPU: `absmax[i] = fl(fl(map[byte i of quantized] · scale[i >> 8]) + offset)`.
 *
 * @example
 * ```ts
 * const { quantized, scale, offset, map } = quantizeAbsmaxGpu(absmax);
 * ```
 */
export interface Nf4NestedAbsmax {
  /** u32 [ceil(n / 4)]: one u8 map index per absmax value, little-endian (bitsandbytes' u8 `absmax`). */
  quantized: Tensor;
  /** f32 [ceil(n / 256)]: the absmax of the centred values per block of 256 (`nested_absmax`). */
  scale: Tensor;
  /** f32 [1]: the mean absmax, added back (`nested_offset`). */
  offset: Tensor;
  /** f32 [256]: the signed dynamic map (`nested_quant_map`). */
  map: Tensor;
}

/**
 * An NF4-quantized tensor on the GPU (see the module notes for the layout).
 *
 * @example
 * ```ts
 * const q: Nf4Tensor = quantizeNf4Gpu(w, { blockSize: 64 });
 * console.log(q.shape, q.packed.numel); // [out, in], out·in/8
 * ```
 */
export interface Nf4Tensor {
  /** The logical shape (row-major), e.g. [outFeatures, inFeatures]. */
  shape: number[];
  /** Elements per block. */
  blockSize: number;
  /** u32 [numel / 8]: the packed 4-bit indices. */
  packed: Tensor;
  /** f32 [numel / blockSize], or null with double quantization. */
  absmax: Tensor | null;
  /** The double-quantized absmax, or null. */
  nested: Nf4NestedAbsmax | null;
}

/**
 * Options of {@linkcode quantizeNf4Gpu}.
 *
 * @example
 * ```ts
 * const opts: Nf4QuantizeOptions = { blockSize: 64, doubleQuant: true };
 * ```
 */
export interface Nf4QuantizeOptions {
  /** Elements per block: a power of two from 32 to 4096 (default 64). */
  blockSize?: number;
  /** Quantize the absmax values too (default false here; `Linear4bit` defaults to true). */
  doubleQuant?: boolean;
}

// ---------------------------------------------------------------------------------------------------------------
// Checks with messages that say what to do
// ---------------------------------------------------------------------------------------------------------------

/**
 * Throws a RangeError unless `blockSize` is one of {@linkcode NF4_BLOCK_SIZES}.
 *
 * @example
 * ```ts
 * checkNf4BlockSize(64); // ok
 * ```
 */
export function checkNf4BlockSize(blockSize: number): void {
  if (!NF4_BLOCK_SIZES.includes(blockSize)) {
    throw new RangeError(
      `NF4 blockSize must be a power of two from 32 to 4096 (${NF4_BLOCK_SIZES.join(", ")}), got ${blockSize}`,
    );
  }
}

/**
 * Throws a RangeError, saying what to do, unless a tensor of `shape` can be quantized in blocks of `blockSize`
 * (its element count a positive multiple of the block size). `what` names the tensor in the message.
 *
 * @example
 * ```ts
 * checkNf4Shape([4096, 4096], 64, "q_proj.weight"); // ok
 * checkNf4Shape([37, 11], 64, "tiny.weight");       // throws: 407 elements, not a multiple of 64 ...
 * ```
 */
export function checkNf4Shape(shape: Shape, blockSize: number, what: string): void {
  checkNf4BlockSize(blockSize);
  const numel = numelOf(shape);
  if (numel === 0) throw new RangeError(`${what} ${fmtShape(shape)} is empty: there is nothing to quantize`);
  if (numel % blockSize === 0) return;
  const dividing = NF4_BLOCK_SIZES.filter((b) => numel % b === 0);
  const choose = dividing.length > 0
    ? `choose a blockSize that divides it (${dividing.join(", ")})`
    : `pad it with zeros to ${Math.ceil(numel / blockSize) * blockSize} elements (no supported block size divides it)`;
  throw new RangeError(
    `${what} ${fmtShape(shape)} has ${numel} elements, not a multiple of the NF4 block size ${blockSize}: ` +
      `${choose}, or leave this layer unquantized (add it to \`skip\`)`,
  );
}

// ---------------------------------------------------------------------------------------------------------------
// Kernel cache and small helpers
// ---------------------------------------------------------------------------------------------------------------

const kernels = new Map<string, Kernel>();
function kernelFor(key: string, make: () => KernelSource): Kernel {
  let k = kernels.get(key);
  if (!k) kernels.set(key, k = getGpu().kernel(make()));
  return k;
}

let sharedMap: Tensor | null = null;
/** A new handle on the one GPU copy of bitsandbytes' signed dynamic map (kept; dispose the handle when done). */
function defaultMapTensor(): Tensor {
  if (!sharedMap || sharedMap.disposed) sharedMap = fromArray(dynamicMap(), [256], { dtype: "f32" }).keep();
  return sharedMap.alias();
}

/** A row-major copy of `t` (no gradient recorded) when it is not row-major already; else `t`. */
function rowMajor(t: Tensor): Tensor {
  return t.isContiguous ? t : elementwise("copy", "a", [t], { out: t.dtype, shape: t.shape });
}

/**
 * The number of elements of a quantized tensor.
 *
 * @example
 * ```ts
 * nf4Numel(q); // out · in
 * ```
 */
export function nf4Numel(q: Nf4Tensor): number {
  return numelOf(q.shape);
}

/** The absmax mode and the buffers the kernels bind for it, in binding order. */
function absmaxBindings(q: Nf4Tensor): { mode: AbsmaxMode; buffers: GPUBuffer[] } {
  if (q.absmax) return { mode: "f32", buffers: [q.absmax.buffer] };
  if (!q.nested) throw new Error("internal: an NF4 tensor needs absmax or nested absmax");
  const n = q.nested;
  return { mode: "double", buffers: [n.quantized.buffer, n.scale.buffer, n.map.buffer, n.offset.buffer] };
}

/**
 * Every GPU tensor an NF4 tensor holds (packed weights, absmax or its nested form).
 *
 * @example
 * ```ts
 * for (const t of nf4Tensors(q)) t.keep();
 * ```
 */
export function nf4Tensors(q: Nf4Tensor): Tensor[] {
  const out = [q.packed];
  if (q.absmax) out.push(q.absmax);
  if (q.nested) out.push(q.nested.quantized, q.nested.scale, q.nested.offset, q.nested.map);
  return out;
}

/**
 * Frees the GPU memory of an NF4 tensor.
 *
 * @example
 * ```ts
 * disposeNf4(q);
 * ```
 */
export function disposeNf4(q: Nf4Tensor): void {
  for (const t of nf4Tensors(q)) t.dispose();
}

// ---------------------------------------------------------------------------------------------------------------
// Quantization
// ---------------------------------------------------------------------------------------------------------------

/**
 * Quantizes a weight tensor (f32 or f16, any shape, flattened row-major) to NF4 on the GPU: the same packed bytes
 * and absmax values as `quantizeNf4` (and, with `doubleQuant`, the same indices, scales and offset as
 * `quantizeNf4DoubleQuant`) of the CPU reference. Records GPU work and returns at once; the source tensor is not
 * modified or freed. Weights must be finite (non-finite values give unspecified codes: the GPU cannot throw).
 *
 * @param weight the tensor to quantize
 * @param opts block size (default 64) and double quantization (default false)
 * @returns the quantized tensor, on the GPU
 * @throws RangeError for an unsupported block size or an element count that is not a multiple of it
 *
 * @example
 * ```ts
 * const q = quantizeNf4Gpu(randn([4096, 4096], { dtype: "f16" }), { blockSize: 64, doubleQuant: true });
 * ```
 */
export function quantizeNf4Gpu(weight: Tensor, opts: Nf4QuantizeOptions = {}): Nf4Tensor {
  weight.assertAlive("quantizeNf4Gpu");
  if (weight.dtype !== "f32" && weight.dtype !== "f16") {
    throw new Error(`quantizeNf4Gpu: weights must be f32 or f16, got ${weight.dtype}`);
  }
  const blockSize = opts.blockSize ?? 64;
  checkNf4Shape(weight.shape, blockSize, "the weight");
  const numel = weight.numel;
  const blocks = numel / blockSize;
  const src = rowMajor(weight);
  const packed = Tensor.empty([numel / 8], "u32");
  const absmax = Tensor.empty([blocks], "f32");
  const k = kernelFor(
    `quantize|${src.dtype}|${blockSize}`,
    () => nf4QuantizeKernel({ input: src.dtype as "f32" | "f16", blockSize, thresholds: NF4_THRESHOLDS }),
  );
  const u = new UniformWriter(QUANTIZE_UNIFORM_WORDS).u(0, blocks).u(1, src.offset);
  getGpu().dispatch(k, [src.buffer, packed.buffer, absmax.buffer], u.u32, gridFor(blocks, 64));
  if (src !== weight) src.dispose();
  const shape = [...weight.shape];
  if (!opts.doubleQuant) return { shape, blockSize, packed, absmax, nested: null };
  const nested = quantizeAbsmaxGpu(absmax);
  absmax.dispose();
  return { shape, blockSize, packed, absmax: null, nested };
}

/**
 * Double quantization of absmax values on the GPU, exactly as the reference's `quantizeAbsmax` with its defaults
 * (blocks of 256, the offset `fl(sumF32(absmax) · fl(1/n))` summed in the same tree order): u8 indices into the
 * signed dynamic map, one f32 scale per 256 values, the offset as a one-element tensor.
 *
 * @param absmax f32 [n], finite
 * @param opts `map`: an f32 [256] map tensor to use instead of the default one (e.g. a checkpoint's stored map)
 * @returns the quantized absmax (the map is a new handle on the shared or given map)
 *
 * @example
 * ```ts
 * const nested = quantizeAbsmaxGpu(fromArray(absmaxValues, [absmaxValues.length]));
 * ```
 */
export function quantizeAbsmaxGpu(absmax: Tensor, opts: { map?: Tensor } = {}): Nf4NestedAbsmax {
  absmax.assertAlive("quantizeAbsmaxGpu");
  if (absmax.dtype !== "f32") throw new Error(`quantizeAbsmaxGpu: absmax must be f32, got ${absmax.dtype}`);
  const n = absmax.numel;
  if (n === 0) throw new RangeError("quantizeAbsmaxGpu: absmax is empty: there is nothing to quantize");
  if (opts.map && (opts.map.dtype !== "f32" || opts.map.numel !== 256)) {
    throw new RangeError(`quantizeAbsmaxGpu: the map must be an f32 tensor of 256 values, got ${opts.map}`);
  }
  const gpu = getGpu();
  const src = absmax.isContiguous && absmax.offset === 0
    ? absmax
    : elementwise("copy", "a", [absmax], { out: "f32", shape: absmax.shape });
  // The mean: sumF32's levels (256-value chunks, tree order), the last one scaled by fl(1 / n).
  const offset = Tensor.empty([1], "f32");
  const sum = kernelFor("sum", sumChunksKernel);
  let level = src;
  let len = n;
  for (;;) {
    const chunks = Math.ceil(len / 256);
    const last = chunks === 1;
    const dst = last ? offset : Tensor.empty([chunks], "f32");
    const u = new UniformWriter(SUM_UNIFORM_WORDS).u(0, len).f(1, last ? Math.fround(1 / n) : 1);
    gpu.dispatch(sum, [level.buffer, dst.buffer], u.u32, rowGrid(chunks));
    if (level !== src) level.dispose();
    if (last) break;
    level = dst;
    len = chunks;
  }
  const map = opts.map ? opts.map.alias() : defaultMapTensor();
  const quantized = Tensor.empty([Math.ceil(n / 4)], "u32");
  const scale = Tensor.empty([Math.ceil(n / ABSMAX_BLOCK)], "f32");
  const k = kernelFor("absmaxQuantize", absmaxQuantizeKernel);
  const u = new UniformWriter(ABSMAX_QUANTIZE_UNIFORM_WORDS).u(0, n);
  gpu.dispatch(k, [src.buffer, offset.buffer, map.buffer, quantized.buffer, scale.buffer], u.u32, rowGrid(scale.numel));
  if (src !== absmax) src.dispose();
  return { quantized, scale, offset, map };
}

/**
 * Dense weights from an NF4 tensor: element `i` is `fl(code[index] · absmax[block])` (the absmax rebuilt from
 * double quantization as the reference does), in f32 — bit for bit the reference's `dequantizeNf4` /
 * `dequantizeNf4DoubleQuant` — or rounded to f16.
 *
 * @param q the quantized tensor
 * @param dtype output dtype (default f32)
 * @returns a new tensor of `q.shape`
 *
 * @example
 * ```ts
 * const w = dequantizeNf4Gpu(q, "f16"); // e.g. to merge a LoRA update into it
 * ```
 */
export function dequantizeNf4Gpu(q: Nf4Tensor, dtype: "f32" | "f16" = "f32"): Tensor {
  for (const t of nf4Tensors(q)) t.assertAlive("dequantizeNf4Gpu");
  if (dtype !== "f32" && dtype !== "f16") throw new Error(`dequantizeNf4Gpu: dtype must be f32 or f16, got ${dtype}`);
  const words = nf4Numel(q) / 8;
  const out = Tensor.empty(q.shape, dtype);
  const { mode, buffers } = absmaxBindings(q);
  const k = kernelFor(
    `dequantize|${q.blockSize}|${mode}|${dtype}`,
    () => nf4DequantizeKernel({ blockSize: q.blockSize, absmax: mode, out: dtype, code: NF4_CODE }),
  );
  const u = new UniformWriter(DEQUANTIZE_UNIFORM_WORDS).u(0, words).u(1, 0);
  getGpu().dispatch(k, [q.packed.buffer, ...buffers, out.buffer], u.u32, gridFor(words, 256));
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// CPU transfer (the reference's types)
// ---------------------------------------------------------------------------------------------------------------

/**
 * Reads an NF4 tensor back to the CPU in the reference's types (`Nf4Quantized`, or `Nf4DoubleQuantized` with
 * double quantization): the byte views of the packed words and of the absmax indices, the scales, the offset and
 * the map. Waits for the GPU.
 *
 * @example
 * ```ts
 * const cpu = await readNf4(q);
 * console.log(cpu.packed.length); // numel / 2 bytes
 * ```
 */
export async function readNf4(q: Nf4Tensor): Promise<Nf4Quantized | Nf4DoubleQuantized> {
  const numel = nf4Numel(q);
  const words = await q.packed.toArray() as Uint32Array;
  const packed = new Uint8Array(words.buffer, words.byteOffset, numel / 2);
  if (q.absmax) {
    return { packed, absmax: await q.absmax.toArray() as Float32Array, blockSize: q.blockSize, numel };
  }
  const n = q.nested!;
  const blocks = numel / q.blockSize;
  const codeWords = await n.quantized.toArray() as Uint32Array;
  const quantizedAbsmax: QuantizedAbsmax = {
    quantized: new Uint8Array(codeWords.buffer, codeWords.byteOffset, blocks),
    scale: await n.scale.toArray() as Float32Array,
    offset: (await n.offset.toArray())[0],
    blockSize: ABSMAX_BLOCK,
    map: await n.map.toArray() as Float32Array,
  };
  return { packed, quantizedAbsmax, blockSize: q.blockSize, numel };
}

/** `bytes` as u32 words (zero-padded to a multiple of 4 bytes). */
function wordsOf(bytes: Uint8Array): Uint32Array {
  const out = new Uint32Array(Math.ceil(bytes.length / 4));
  new Uint8Array(out.buffer).set(bytes);
  return out;
}

/**
 * Uploads a CPU-quantized tensor (the reference's `quantizeNf4` / `quantizeNf4DoubleQuant`, or values read from a
 * bitsandbytes checkpoint in that form) to the GPU layout, with the given logical shape.
 *
 * @throws RangeError when the sizes do not agree with the shape and block size
 *
 * @example
 * ```ts
 * const q = uploadNf4(quantizeNf4DoubleQuant(weights), [out, inFeatures]);
 * ```
 */
export function uploadNf4(cpu: Nf4Quantized | Nf4DoubleQuantized, shape: number[]): Nf4Tensor {
  checkNf4Shape(shape, cpu.blockSize, "the quantized tensor");
  const numel = numelOf(shape);
  if (cpu.numel !== numel) throw new RangeError(`uploadNf4: ${cpu.numel} elements do not fill ${fmtShape(shape)}`);
  if (cpu.packed.length !== numel / 2) {
    throw new RangeError(`uploadNf4: packed has ${cpu.packed.length} bytes; ${numel} elements need ${numel / 2}`);
  }
  const blocks = numel / cpu.blockSize;
  const packed = fromArray(wordsOf(cpu.packed), [numel / 8], { dtype: "u32" });
  if ("absmax" in cpu) {
    if (cpu.absmax.length !== blocks) {
      throw new RangeError(`uploadNf4: absmax has ${cpu.absmax.length} values, need ${blocks}`);
    }
    return {
      shape: [...shape],
      blockSize: cpu.blockSize,
      packed,
      absmax: fromArray(cpu.absmax, [blocks]),
      nested: null,
    };
  }
  const d = cpu.quantizedAbsmax;
  if (d.blockSize !== ABSMAX_BLOCK) {
    throw new RangeError(`uploadNf4: the GPU kernels use absmax blocks of ${ABSMAX_BLOCK}, got ${d.blockSize}`);
  }
  if (d.quantized.length !== blocks || d.scale.length !== Math.ceil(blocks / ABSMAX_BLOCK) || d.map.length !== 256) {
    throw new RangeError(`uploadNf4: the nested absmax sizes do not match ${blocks} blocks`);
  }
  return {
    shape: [...shape],
    blockSize: cpu.blockSize,
    packed,
    absmax: null,
    nested: {
      quantized: fromArray(wordsOf(d.quantized), [Math.ceil(blocks / 4)], { dtype: "u32" }),
      scale: fromArray(Float32Array.from(d.scale), [d.scale.length]),
      offset: fromArray(Float32Array.of(d.offset), [1]),
      map: fromArray(Float32Array.from(d.map), [256]),
    },
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Fused dequantize-matmul
// ---------------------------------------------------------------------------------------------------------------

/**
 * Which kernel computes an NF4 product: the tiled fused GEMM (`tile`), or the GEMV for 1–4 rows (`gemv`,
 * forward only, in-features divisible by 8).
 *
 * @example
 * ```ts
 * const plan: Nf4Plan = { kind: "gemv", threads: 256, rowsPerGroup: 8, rowsPerThread: 2 };
 * nf4Matmul(x, q, { plan });
 * ```
 */
export type Nf4Plan =
  | { kind: "tile"; tile: Nf4Tile }
  | { kind: "gemv"; threads: number; rowsPerGroup: number; rowsPerThread: number };

/**
 * A short name for a plan, e.g. `tile:128x64x16-8x8-double` or `gemv:8r/2pt/256t`.
 *
 * @example
 * ```ts
 * nf4PlanName(chooseNf4Plan({ M: 512, N: 4096, K: 4096, mode: "forward" })); // "tile:128x64x16-8x8-direct"
 * ```
 */
export function nf4PlanName(p: Nf4Plan): string {
  return p.kind === "tile"
    ? `tile:${nf4TileName(p.tile)}`
    : `gemv:${p.rowsPerGroup}r/${p.rowsPerThread}pt/${p.threads}t`;
}

/**
 * The GEMV configuration the chooser uses (threads per workgroup, rows of W per workgroup and per thread): the
 * fastest of 27 configurations on the H200 at the 7B decoding shapes (913–1286 GB/s; bench/NOTES.md).
 *
 * @example
 * ```ts
 * nf4Matmul(x, q, { plan: { kind: "gemv", ...NF4_GEMV_CONFIG } });
 * ```
 */
export const NF4_GEMV_CONFIG: {
  readonly threads: number;
  readonly rowsPerGroup: number;
  readonly rowsPerThread: number;
} = { threads: 256, rowsPerGroup: 8, rowsPerThread: 4 };

/**
 * The tile a CPU adapter (lavapipe) uses instead of the large, medium and small ones: 64 threads with 8 × 8 outputs
 * each, single-buffered (lavapipe runs a workgroup in 8-lane SIMD chunks, switching chunks at every barrier); the
 * dense GEMM does the same (`CPU_GEMM_TILE` in core/ops/matmul.ts).
 *
 * @example
 * ```ts
 * nf4Matmul(x, q, { plan: { kind: "tile", tile: NF4_CPU_TILE } });
 * ```
 */
export const NF4_CPU_TILE: Nf4Tile = { bm: 64, bn: 64, bk: 16, tm: 8, tn: 8, pipeline: "direct" };

/**
 * The chooser: GEMV for a forward product of at most 4 rows with in-features divisible by 8; otherwise a tile by
 * output shape (M rows, N columns), like core's GEMM chooser.
 *
 * @example
 * ```ts
 * chooseNf4Plan({ M: 1, N: 4096, K: 4096, mode: "forward" }); // { kind: "gemv", ... }
 * ```
 */
export function chooseNf4Plan(s: { M: number; N: number; K: number; mode: "forward" | "backward" }): Nf4Plan {
  if (s.mode === "forward" && s.M <= 4 && s.K % 8 === 0) return { kind: "gemv", ...NF4_GEMV_CONFIG };
  const T = NF4_TILES;
  if (s.M <= 16) return { kind: "tile", tile: T.thinM };
  if (s.M >= 1024 && s.N >= 1024) return { kind: "tile", tile: T.large };
  if (s.M * s.N >= 256 * 1024) return { kind: "tile", tile: T.medium };
  return { kind: "tile", tile: T.small };
}

/**
 * Options of {@linkcode nf4Matmul} and {@linkcode nf4MatmulInputGrad}.
 *
 * @example
 * ```ts
 * nf4Matmul(x, q, { out: "f32" });
 * ```
 */
export interface Nf4MatmulOptions {
  /** Output dtype (default: the dense input's). */
  out?: "f32" | "f16";
  /** Force a kernel (tests and benchmarks). */
  plan?: Nf4Plan;
  /**
   * Write into this row-major tensor (the product's shape; f32, or f16 with an even last dimension and offset)
   * instead of a new one; it is returned. For loops that must not allocate (benchmarks, preallocated outputs).
   */
  into?: Tensor;
}

/** Largest vector width ≤ max (8/4/2/1 for f16, 4/2/1 for f32) dividing every value. */
function vecWidth(dtype: DType, max: number, ...values: number[]): number {
  for (const w of dtype === "f16" ? [8, 4, 2] : [4, 2]) {
    if (w <= max && values.every((v) => v % w === 0)) return w;
  }
  return 1;
}

/** The dense operand as [M, K] rows (a view when row-major, else a copy), and whether it is a copy. */
function denseRows(x: Tensor, K: number, op: string): { rows: Tensor; M: number } {
  x.assertAlive(op);
  if (x.dtype !== "f32" && x.dtype !== "f16") throw new Error(`${op}: the input must be f32 or f16, got ${x.dtype}`);
  if (x.ndim < 1 || x.shape[x.ndim - 1] !== K) {
    throw new Error(`${op}: the input's last dimension must be ${K}, got shape ${fmtShape(x.shape)}`);
  }
  const M = x.numel / K;
  const src = rowMajor(x);
  const rows = src.viewOf([M, K], [K, 1], src.offset);
  if (src !== x) src.dispose();
  return { rows, M };
}

/**
 * Runs one fused product. forward: C[M, N] = A[M, K]·Wᵀ, W [N, K]; backward: C[M, N] = A[M, K]·W, W [K, N].
 * `A` is row-major [M, K]; C is `into`, or a new contiguous [M, N] tensor of dtype `out`.
 */
function runNf4(
  A: Tensor,
  q: Nf4Tensor,
  mode: "forward" | "backward",
  M: number,
  N: number,
  K: number,
  out: "f32" | "f16",
  forced?: Nf4Plan,
  into?: Tensor,
): Tensor {
  const gpu = getGpu();
  const plan = forced ?? chooseNf4Plan({ M, N, K, mode });
  const rowLen = mode === "forward" ? K : N; // W's row length (in-features)
  const { mode: absmax, buffers } = absmaxBindings(q);
  let a = A;
  if (plan.kind === "gemv") {
    if (mode !== "forward" || M > 4 || K % 8 !== 0) {
      throw new Error(`nf4 matmul: plan ${nf4PlanName(plan)} needs a forward product of ≤ 4 rows and K % 8 == 0`);
    }
    // The GEMV reads x 4 (f32) or 8 (f16) elements at a time: its offset must be a multiple of 8.
    if (a.offset % 8 !== 0) a = elementwise("copy", "a", [a], { out: a.dtype, shape: a.shape });
  }
  // f16 pairs are written by one thread each: an odd N goes through an f32 result and a cast.
  const direct = out === "f32" || N % 2 === 0;
  if (into && (!direct || (into.dtype === "f16" && into.offset % 2 !== 0))) {
    throw new Error("nf4 matmul: an f16 `into` output needs an even last dimension and offset");
  }
  const C = into ?? Tensor.empty([M, N], direct ? out : "f32");
  const u = new UniformWriter(NF4_MATMUL_UNIFORM_WORDS)
    .u(0, M).u(1, N).u(2, K).u(3, K).u(4, a.offset).u(5, N).u(6, C.offset).u(7, 0);
  if (M > 0 && N > 0) {
    const bufs = [a.buffer, q.packed.buffer, ...buffers, C.buffer];
    if (plan.kind === "gemv") {
      const spec: Omit<Nf4GemvSpec, "code"> = {
        x: a.dtype as "f32" | "f16",
        out: C.dtype as "f32" | "f16",
        rows: M,
        unit: K % 32 === 0 ? 32 : 8,
        threads: plan.threads,
        rowsPerGroup: plan.rowsPerGroup,
        rowsPerThread: plan.rowsPerThread,
        blockSize: q.blockSize,
        absmax,
      };
      const k = kernelFor(JSON.stringify(["gemv", spec]), () => nf4GemvKernel({ ...spec, code: NF4_CODE }));
      gpu.dispatch(k, bufs, u.u32, rowGrid(Math.ceil(N / plan.rowsPerGroup)));
    } else {
      let tile = plan.tile;
      const T = NF4_TILES;
      if (!forced && gpu.info.isFallback && [T.small, T.medium, T.large].includes(tile)) tile = NF4_CPU_TILE;
      checkNf4Tile(tile);
      if (nf4TileSharedBytes(tile, absmax) > gpu.info.maxComputeWorkgroupStorageSize) {
        if (forced) {
          throw new Error(`nf4 matmul: tile ${nf4TileName(tile)} needs more workgroup memory than this GPU has`);
        }
        tile = NF4_TILES.small;
      }
      const spec: Omit<Nf4GemmSpec, "code"> = {
        tile,
        x: a.dtype as "f32" | "f16",
        vecX: vecWidth(a.dtype, tile.bk, K, a.offset),
        out: C.dtype as "f32" | "f16",
        outVec: N % 4 === 0 && C.offset % 4 === 0 ? 4 : C.dtype === "f32" ? 1 : 2,
        mode,
        words: rowLen % 8 === 0,
        blockSize: q.blockSize,
        absmax,
      };
      const gx = Math.ceil(N / tile.bn), gy = Math.ceil(M / tile.bm);
      if (gx > 65535 || gy > 65535) throw new Error(`nf4 matmul: a ${M}×${N} output exceeds the dispatch grid`);
      const k = kernelFor(JSON.stringify(["gemm", spec]), () => nf4GemmKernel({ ...spec, code: NF4_CODE }));
      gpu.dispatch(k, bufs, u.u32, [gx, gy]);
    }
  }
  if (a !== A) a.dispose();
  if (direct || into) return C;
  const h = elementwise("copy", "a", [C], { out: "f16", shape: C.shape });
  C.dispose();
  return h;
}

/** `into` as the [M, N] matrix the kernels write (a view), after checking it fits `shape`. */
function checkInto(into: Tensor, shape: number[], op: string): Tensor {
  into.assertAlive(op);
  const ok = into.ndim === shape.length && into.shape.every((d, i) => d === shape[i]) && into.isContiguous &&
    (into.dtype === "f32" || into.dtype === "f16");
  if (!ok) {
    throw new Error(
      `${op}: \`into\` must be a row-major f32 or f16 tensor of shape ${fmtShape(shape)}, got ${into.toString()}`,
    );
  }
  return into;
}

/**
 * `x · dequant(W)ᵀ` for x [..., K] and W [N, K] in NF4: a fused kernel that dequantizes W's tiles in workgroup
 * memory (or, for 1–4 rows, streams the packed weights), accumulating in f32. Returns [..., N] in `opts.out`
 * (default x's dtype). Records no gradient (`Linear4bit` does).
 *
 * @example
 * ```ts
 * const y = nf4Matmul(x, q); // x: [B, T, 4096] f16, q: [11008, 4096] → [B, T, 11008] f16
 * ```
 */
export function nf4Matmul(x: Tensor, q: Nf4Tensor, opts: Nf4MatmulOptions = {}): Tensor {
  if (q.shape.length !== 2) throw new Error(`nf4Matmul: W must be 2-D, got ${fmtShape(q.shape)}`);
  const [N, K] = q.shape;
  const { rows, M } = denseRows(x, K, "nf4Matmul");
  const out = opts.into?.dtype as "f32" | "f16" ?? opts.out ?? (x.dtype as "f32" | "f16");
  const shape = [...x.shape.slice(0, -1), N];
  try {
    if (opts.into) return runNf4(rows, q, "forward", M, N, K, out, opts.plan, checkInto(opts.into, shape, "nf4Matmul"));
    const y = runNf4(rows, q, "forward", M, N, K, out, opts.plan);
    const v = y.viewOf(shape, contiguousStrides(shape), 0);
    y.dispose();
    return v;
  } finally {
    rows.dispose();
  }
}

/**
 * `g · dequant(W)` for g [..., N] and W [N, K] in NF4 (the input gradient of `x · Wᵀ`), fused like
 * {@linkcode nf4Matmul}: W is never materialised. Returns [..., K] in `opts.out` (default g's dtype).
 *
 * @example
 * ```ts
 * const dx = nf4MatmulInputGrad(dy, q); // dy: [B, T, 11008] → [B, T, 4096]
 * ```
 */
export function nf4MatmulInputGrad(g: Tensor, q: Nf4Tensor, opts: Nf4MatmulOptions = {}): Tensor {
  if (q.shape.length !== 2) throw new Error(`nf4MatmulInputGrad: W must be 2-D, got ${fmtShape(q.shape)}`);
  const [N, K] = q.shape;
  const { rows, M } = denseRows(g, N, "nf4MatmulInputGrad");
  const out = opts.into?.dtype as "f32" | "f16" ?? opts.out ?? (g.dtype as "f32" | "f16");
  if (opts.plan?.kind === "gemv") throw new Error("nf4MatmulInputGrad: the GEMV computes forward products only");
  const shape = [...g.shape.slice(0, -1), K];
  try {
    if (opts.into) {
      return runNf4(rows, q, "backward", M, K, N, out, opts.plan, checkInto(opts.into, shape, "nf4MatmulInputGrad"));
    }
    const y = runNf4(rows, q, "backward", M, K, N, out, opts.plan);
    const v = y.viewOf(shape, contiguousStrides(shape), 0);
    y.dispose();
    return v;
  } finally {
    rows.dispose();
  }
}
