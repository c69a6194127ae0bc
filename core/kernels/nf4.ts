/**
 * WGSL generators for NF4 (4-bit NormalFloat) weights: blockwise quantization, double quantization of the absmax
 * values, dequantization, and the fused kernels that dequantize inside a matrix product.
 *
 * Storage layout (bitsandbytes' `quantize_4bit`, see quant/nf4_reference.ts): the weight is flattened row-major;
 * element `i` is a 4-bit index into the 16-value code, two per byte with the first element in the high nibble,
 * and the bytes are packed little-endian into u32 words (8 elements per word), so a byte view of the word buffer
 * is the reference's `Uint8Array`. Element `i` sits in word `i >> 3` at bit `8·((i & 7) >> 1) + 4·(1 − (i & 1))`.
 * Each block of `blockSize` elements has an f32 absmax; with double quantization the absmax values are stored as
 * u8 indices into a 256-value map (4 per u32 word, little-endian), an f32 scale per 256 of them, and an f32 offset:
 * `absmax = fl(fl(map[q] · scale) + offset)`.
 *
 * The arithmetic follows the reference's contract bit for bit: a weight is never divided by its absmax (its index is
 * the number of thresholds `t` with `x > fl(t · absmax)`); dequantization is `fl(code · absmax)`; the rebuilt absmax
 * is two roundings — the product passes through `bitcast(bits ^ p.zero)` (p.zero is 0 at run time) so no compiler
 * can contract it with the addition into a fused multiply-add; the offset's sum runs in `sumF32`'s tree order.
 *
 * This file knows nothing of the code values: callers pass the 16 codes and 15 thresholds (quant/codes.ts), so core
 * does not import from quant.
 *
 * Kernels:
 * - {@linkcode nf4QuantizeKernel}: weights (f32/f16) → packed words + f32 absmax, one thread per block.
 * - {@linkcode sumChunksKernel}: one level of `sumF32` (256-value chunks, tree order), times a scale.
 * - {@linkcode absmaxQuantizeKernel}: centred absmax → u8 map indices + f32 scale per 256 (bitsandbytes'
 *   `dQuantize` search, scaled comparisons).
 * - {@linkcode nf4DequantizeKernel}: packed → dense f32/f16, one thread per word.
 * - {@linkcode nf4GemmKernel}: register-tiled GEMM whose B operand is NF4, dequantized tile by tile into workgroup
 *   memory (f32 accumulation), for `Y = X·Wᵀ` (forward) and `dX = G·W` (input gradient).
 * - {@linkcode nf4GemvKernel}: `y = x·Wᵀ` for 1–4 rows (decoding), streaming 32 weights (16 bytes) per load.
 *
 * @example
 * ```ts
 * import { nf4GemmKernel, NF4_TILES } from "./nf4.ts";
 * const src = nf4GemmKernel({
 *   tile: NF4_TILES.medium, x: "f16", vecX: 8, out: "f16", outVec: 4, mode: "forward", words: true,
 *   blockSize: 64, absmax: "double", code: NF4_CODE,
 * });
 * ```
 * @module
 */
import type { KernelSource } from "../gpu.ts";
import { loadF32Fn, PACK_F16 } from "./common.ts";
import { tileInnerProduct } from "./matmul.ts";

/** The float element types these kernels read and write. */
export type Nf4FloatDType = "f32" | "f16";

/** How a kernel gets a block's absmax: an f32 array, or rebuilt from double quantization. */
export type AbsmaxMode = "f32" | "double";

/** Absmax values per double-quantization block (bitsandbytes always uses 256). */
export const ABSMAX_BLOCK = 256;

/** log2 of a power of two. */
function lg(x: number): number {
  return Math.round(Math.log2(x));
}

function isPow2(x: number): boolean {
  return Number.isInteger(x) && x > 0 && (x & (x - 1)) === 0;
}

/**
 * An f32 value as an exact WGSL literal: the shortest decimal that reads back as this double (which is an f32),
 * with the `f` suffix, so the parser's decimal → f32 rounding lands on it exactly.
 */
export function f32Literal(x: number): string {
  if (Math.fround(x) !== x || !Number.isFinite(x)) throw new Error(`internal: ${x} is not a finite f32`);
  const s = Object.is(x, -0) ? "-0.0" : String(x);
  return /[.e]/.test(s) ? `${s}f` : `${s}.0f`;
}

/** Bit offset of element `j` (0..7) of a word: byte `j >> 1`, high nibble for even `j`. */
function nibbleShift(j: number): number {
  return (j >> 1) * 8 + ((j & 1) === 0 ? 4 : 0);
}

/** WGSL expression for the 4-bit index of element `j` (constant 0..7) of word expression `w`. */
function nibble(w: string, j: number): string {
  return `extractBits(${w}, ${nibbleShift(j)}u, 4u)`;
}

function checkCode(code: Float32Array): void {
  if (code.length !== 16) throw new Error(`internal: the NF4 code has 16 values, got ${code.length}`);
}

/** The code as a private array (source for the workgroup lookup table). */
function codeArray(code: Float32Array): string {
  checkCode(code);
  return `var<private> NF4_CODE: array<f32, 16> = array<f32, 16>(${Array.from(code, f32Literal).join(", ")});`;
}

/**
 * Declarations, per-workgroup initialisation and `fn absmaxAt(block: u32) -> f32` for an absmax mode, with
 * storage bindings from `first`. The double mode stages the 256-value map in workgroup memory (`init` must be
 * followed by a barrier before `absmaxAt` is used) and needs `p.zero` in the uniform block.
 */
function absmaxSource(mode: AbsmaxMode, first: number, threads: number): { decl: string; init: string; count: number } {
  if (mode === "f32") {
    return {
      decl: `@group(0) @binding(${first}) var<storage, read> absmax: array<f32>;
fn absmaxAt(b: u32) -> f32 { return absmax[b]; }`,
      init: "",
      count: 1,
    };
  }
  const init = threads >= 256
    ? "if (lid < 256u) { dqMap[lid] = qMap[lid]; }"
    : `for (var i = lid; i < 256u; i += ${threads}u) { dqMap[i] = qMap[i]; }`;
  return {
    decl: `@group(0) @binding(${first}) var<storage, read> qAbsmax: array<u32>;
@group(0) @binding(${first + 1}) var<storage, read> qScale: array<f32>;
@group(0) @binding(${first + 2}) var<storage, read> qMap: array<f32>;
@group(0) @binding(${first + 3}) var<storage, read> qOffset: array<f32>;
var<workgroup> dqMap: array<f32, 256>;
// absmax = fl(fl(map[q] * scale) + offset): the xor with p.zero (0) hides the product from FMA contraction.
fn absmaxAt(b: u32) -> f32 {
  let q = (qAbsmax[b >> 2u] >> ((b & 3u) << 3u)) & 255u;
  let s = dqMap[q] * qScale[b >> ${lg(ABSMAX_BLOCK)}u];
  return bitcast<f32>(bitcast<u32>(s) ^ p.zero) + qOffset[0];
}`,
    init,
    count: 4,
  };
}

/** The 16-entry code table in workgroup memory (bank-conflict free) and its initialisation by threads 0..15. */
function lutSource(code: Float32Array): { decl: string; init: string } {
  return {
    decl: `${codeArray(code)}\nvar<workgroup> nf4Lut: array<f32, 16>;`,
    init: "if (lid < 16u) { nf4Lut[lid] = NF4_CODE[lid]; }",
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Quantization
// ---------------------------------------------------------------------------------------------------------------

/** Options of {@linkcode nf4QuantizeKernel}. */
export interface Nf4QuantizeSpec {
  /** The weights' dtype. */
  input: Nf4FloatDType;
  /** Elements per block (a power of two, 32…4096). */
  blockSize: number;
  /** The 15 decision thresholds (f32, increasing). */
  thresholds: Float32Array;
}

/** Uniform words of {@linkcode nf4QuantizeKernel}: blocks, element offset of the weights. */
export const QUANTIZE_UNIFORM_WORDS = 4;

/**
 * Quantizes weights to NF4, one thread per block: the block's absmax (max |x|, exact in any order), then each
 * element's index as the count of thresholds `t` with `x > fl(t · absmax)` (index 7, the code 0, for an all-zero
 * block). Bindings: weights (read), packed words (write), absmax (write). Launch with `gridFor(blocks, 64)`.
 */
export function nf4QuantizeKernel(s: Nf4QuantizeSpec): KernelSource {
  if (!isPow2(s.blockSize) || s.blockSize < 8) throw new Error(`internal: block size ${s.blockSize}`);
  if (s.thresholds.length !== 15) throw new Error("internal: NF4 has 15 thresholds");
  const bs = s.blockSize;
  const tests = Array.from(s.thresholds, (t) => `  i += select(0u, 1u, x > ${f32Literal(t)} * a);`).join("\n");
  const word = Array.from(
    { length: 8 },
    (_, j) => `    word |= select(nf4Index(ldW(e + ${j}u), m), 7u, m == 0.0) << ${nibbleShift(j)}u;`,
  ).join("\n");
  const code = `struct Params { blocks: u32, offW: u32, zero: u32, pad: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> W: array<${s.input === "f32" ? "f32" : "u32"}>;
@group(0) @binding(2) var<storage, read_write> packed: array<u32>;
@group(0) @binding(3) var<storage, read_write> absmax: array<f32>;
${loadF32Fn("ldW", "W", s.input)}
// The number of thresholds t with x > fl(t * a): bitsandbytes' dQuantizeNF4 on x / a, without the division.
fn nf4Index(x: f32, a: f32) -> u32 {
  var i = 0u;
${tests}
  return i;
}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let b = gid.x + gid.y * nwg.x * 64u;
  if (b >= p.blocks) { return; }
  let start = p.offW + b * ${bs}u;
  var m = 0.0;
  for (var i = 0u; i < ${bs}u; i++) { m = max(m, abs(ldW(start + i))); }
  absmax[b] = m;
  for (var w = 0u; w < ${bs / 8}u; w++) {
    let e = start + w * 8u;
    var word = 0u;
${word}
    packed[b * ${bs / 8}u + w] = word;
  }
}`;
  return { name: `nf4_quantize_${s.input}_b${bs}`, code, bindings: ["read", "write", "write"], uniforms: true };
}

/** Uniform words of {@linkcode sumChunksKernel}: n, scale (f32). */
export const SUM_UNIFORM_WORDS = 4;

/**
 * One level of `sumF32` (quant/nf4_reference.ts): workgroup `c` adds values `256c … 256c + 255` of `src` (missing
 * ones are +0) by the tree `v[i] = fl(v[i] + v[i + stride])`, stride 128 … 1, and writes `fl(v[0] · p.scale)` to
 * `dst[c]` (scale 1 on intermediate levels, `fl(1 / n)` on the last, giving the mean). Bindings: src, dst.
 * Launch with `rowGrid(chunks)`.
 */
export function sumChunksKernel(): KernelSource {
  const tree: string[] = [];
  for (let stride = 128; stride >= 1; stride >>= 1) {
    tree.push(`if (lid < ${stride}u) { v[lid] = v[lid] + v[lid + ${stride}u]; }\n  workgroupBarrier();`);
  }
  const code = `struct Params { n: u32, scale: f32, zero: u32, pad: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
var<workgroup> v: array<f32, 256>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let c = wid.x + wid.y * nwg.x;
  let i = c * 256u + lid;
  var x = 0.0;
  if (i < p.n) { x = src[i]; }
  v[lid] = x;
  workgroupBarrier();
  ${tree.join("\n  ")}
  if (lid == 0u) { dst[c] = v[0] * p.scale; }
}`;
  return { name: "nf4_sum_chunks", code, bindings: ["read", "write"], uniforms: true };
}

/** Uniform words of {@linkcode absmaxQuantizeKernel}: n. */
export const ABSMAX_QUANTIZE_UNIFORM_WORDS = 4;

/**
 * Double quantization's second level, one workgroup per block of 256 absmax values: `c = fl(absmax − offset)`,
 * the block's scale `s = max |c|`, and each value's map index by bitsandbytes' `dQuantize` binary search with
 * every comparison `c > v` taken as `c > fl(v · s)` (`nearestMapIndex` in quant/codes.ts). Indices are written
 * as bytes, 4 per u32 word (bytes past `n` are 0). Bindings: absmax, offset [1], map [256] (read); indices, scales
 * (write). Launch with `rowGrid(ceil(n / 256))`.
 */
export function absmaxQuantizeKernel(): KernelSource {
  const tree: string[] = [];
  for (let stride = 128; stride >= 1; stride >>= 1) {
    tree.push(`if (lid < ${stride}u) { red[lid] = max(red[lid], red[lid + ${stride}u]); }\n  workgroupBarrier();`);
  }
  const code = `struct Params { n: u32, zero: u32, p2: u32, p3: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> absmax: array<f32>;
@group(0) @binding(2) var<storage, read> offset: array<f32>;
@group(0) @binding(3) var<storage, read> map: array<f32>;
@group(0) @binding(4) var<storage, read_write> codes: array<u32>;
@group(0) @binding(5) var<storage, read_write> scales: array<f32>;
var<workgroup> red: array<f32, 256>;
var<workgroup> lmap: array<f32, 256>;
var<workgroup> bytes: array<u32, 256>;
// bitsandbytes' dQuantize<0>: 7 halving steps from pivot 127, then the nearer of two neighbours by the f32
// midpoint; every test x > v is taken as x > fl(v * s).
fn mapIndex(x: f32, s: f32) -> u32 {
  var pivot = 127u;
  var upperPivot = 255u;
  var lowerPivot = 0u;
  var lower = -1.0;
  var upper = 1.0;
  var value = lmap[pivot];
  for (var step = 64u; step > 0u; step >>= 1u) {
    if (x > value * s) {
      lowerPivot = pivot;
      lower = value;
      pivot += step;
    } else {
      upperPivot = pivot;
      upper = value;
      pivot -= step;
    }
    value = lmap[pivot];
  }
  if (upperPivot == 255u) { upper = lmap[255]; }
  if (lowerPivot == 0u) { lower = lmap[0]; }
  if (x > value * s) {
    let mid = (upper + value) * 0.5;
    return select(pivot, upperPivot, x > mid * s);
  }
  let mid = (lower + value) * 0.5;
  return select(pivot, lowerPivot, x < mid * s);
}
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let blk = wid.x + wid.y * nwg.x;
  let i = blk * 256u + lid;
  lmap[lid] = map[lid];
  var c = 0.0;
  if (i < p.n) { c = absmax[i] - offset[0]; }
  red[lid] = abs(c);
  workgroupBarrier();
  ${tree.join("\n  ")}
  let s = red[0];
  if (lid == 0u) { scales[blk] = s; }
  var q = 0u;
  if (i < p.n) { q = mapIndex(c, s); }
  bytes[lid] = q;
  workgroupBarrier();
  if ((lid & 3u) == 0u && i < p.n) {
    codes[i >> 2u] = bytes[lid] | (bytes[lid + 1u] << 8u) | (bytes[lid + 2u] << 16u) | (bytes[lid + 3u] << 24u);
  }
}`;
  return {
    name: "nf4_absmax_quantize",
    code,
    bindings: ["read", "read", "read", "write", "write"],
    uniforms: true,
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------------------------

/** Options of {@linkcode nf4DequantizeKernel}. */
export interface Nf4DequantizeSpec {
  /** Elements per block. */
  blockSize: number;
  /** Where the absmax comes from. */
  absmax: AbsmaxMode;
  /** Output dtype. */
  out: Nf4FloatDType;
  /** The 16 code values. */
  code: Float32Array;
}

/** Uniform words of {@linkcode nf4DequantizeKernel}: words, zero. */
export const DEQUANTIZE_UNIFORM_WORDS = 4;

/**
 * Dense weights from NF4, one thread per packed word (8 elements): `out[i] = fl(code[index] · absmax[block])`.
 * Bindings: packed (read), the absmax bindings (1 or 4, read), out (write; 2 vec4<f32> or one vec4<u32> of halves
 * per word). Launch with `gridFor(words, 256)`.
 */
export function nf4DequantizeKernel(s: Nf4DequantizeSpec): KernelSource {
  const lut = lutSource(s.code);
  const src = absmaxSource(s.absmax, 2, 256);
  const vals = Array.from({ length: 8 }, (_, j) => `let v${j} = nf4Lut[${nibble("w", j)}] * s;`).join("\n    ");
  const store = s.out === "f32"
    ? "out[2u * t] = vec4<f32>(v0, v1, v2, v3);\n    out[2u * t + 1u] = vec4<f32>(v4, v5, v6, v7);"
    : "out[t] = vec4<u32>(packF16(v0, v1), packF16(v2, v3), packF16(v4, v5), packF16(v6, v7));";
  const code = `struct Params { words: u32, zero: u32, p2: u32, p3: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
${src.decl}
@group(0) @binding(${2 + src.count}) var<storage, read_write> out: array<${
    s.out === "f32" ? "vec4<f32>" : "vec4<u32>"
  }>;
${PACK_F16}
${lut.decl}
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  ${lut.init}
  ${src.init}
  workgroupBarrier();
  let t = gid.x + gid.y * nwg.x * 256u;
  if (t < p.words) {
    let w = W[t];
    let s = absmaxAt(t >> ${lg(s.blockSize / 8)}u);
    ${vals}
    ${store}
  }
}`;
  return {
    name: `nf4_dequantize_${s.absmax}_b${s.blockSize}_${s.out}`,
    code,
    bindings: ["read", ...Array<"read">(src.count).fill("read"), "write"],
    uniforms: true,
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Fused dequantize-GEMM
// ---------------------------------------------------------------------------------------------------------------

/** Tile shape of {@linkcode nf4GemmKernel}. */
export interface Nf4Tile {
  /** Rows of the output per workgroup. */
  bm: number;
  /** Columns of the output per workgroup. */
  bn: number;
  /** K step staged through workgroup memory: 8, 16 or 32 (whole packed words along K). */
  bk: number;
  /** Output rows per thread (4 or 8). */
  tm: number;
  /** Output columns per thread (4 or 8). */
  tn: number;
  /** `direct` (load, barrier, compute, barrier) or `double` (next tile's loads in registers, two buffers). */
  pipeline: "direct" | "double";
}

/** Tile configs the NF4 matmul chooser picks from (see quant/nf4.ts). */
export const NF4_TILES: Readonly<Record<string, Nf4Tile>> = {
  /** Large outputs (M, N ≥ 1024). */
  large: { bm: 128, bn: 128, bk: 8, tm: 8, tn: 8, pipeline: "double" },
  /**
   * M·N ≥ 256K, e.g. 512 tokens × 4096 features. Single-buffered: on the H200 this tile matched the f16 GEMM at
   * the 7B LoRA shapes (0.95–1.00×) where its double-buffered twin took 1.39–1.62× (bench/NOTES.md).
   */
  medium: { bm: 128, bn: 64, bk: 16, tm: 8, tn: 8, pipeline: "direct" },
  /** Everything else with M > 16. */
  small: { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4, pipeline: "double" },
  /** M ≤ 16. */
  thinM: { bm: 16, bn: 128, bk: 16, tm: 4, tn: 4, pipeline: "double" },
};

/** Threads of a tile. */
export function nf4TileThreads(t: Nf4Tile): number {
  return (t.bm / t.tm) * (t.bn / t.tn);
}

/** Workgroup-memory bytes of a GEMM variant (operand tiles, the code table and, for double quantization, the map). */
export function nf4TileSharedBytes(t: Nf4Tile, absmax: AbsmaxMode): number {
  const stages = t.pipeline === "double" ? 2 : 1;
  return stages * t.bk * (t.bm + t.bn) * 4 + 64 + (absmax === "double" ? 1024 : 0);
}

/** A short name, e.g. `128x64x16-8x8-double`. */
export function nf4TileName(t: Nf4Tile): string {
  return `${t.bm}x${t.bn}x${t.bk}-${t.tm}x${t.tn}-${t.pipeline}`;
}

/** Throws unless {@linkcode nf4GemmKernel} can generate this tile. */
export function checkNf4Tile(t: Nf4Tile): void {
  const ok = [t.bm, t.bn, t.bk, t.tm, t.tn].every(isPow2) && (t.tm === 4 || t.tm === 8) &&
    (t.tn === 4 || t.tn === 8) && t.bm >= t.tm && t.bn >= t.tn && t.bn >= 8 && t.bk >= 8 && t.bk <= 32 &&
    nf4TileThreads(t) >= 16 && nf4TileThreads(t) <= 1024 && (t.pipeline === "direct" || t.pipeline === "double");
  if (!ok) throw new Error(`nf4 matmul: invalid tile config ${JSON.stringify(t)}`);
}

/** A fused NF4 GEMM variant. */
export interface Nf4GemmSpec {
  /** Tile shape. */
  tile: Nf4Tile;
  /** dtype of the dense operand X (or G), stored [M, K] row-major. */
  x: Nf4FloatDType;
  /** Elements per load of X along K: 1, 2, 4 (8 for f16); must divide K, lda and the offset. */
  vecX: number;
  /** Output dtype. */
  out: Nf4FloatDType;
  /** Elements per store: f32 1 or 4, f16 2 or 4 (must divide N, ldc and the offset). */
  outVec: number;
  /**
   * `forward`: Y[M, N] = X[M, K] · Wᵀ with W [N, K] (N = out features, K = in features). `backward`:
   * dX[M, N] = G[M, K] · W with W [K, N] (N = in features, K = out features).
   */
  mode: "forward" | "backward";
  /** Read W a packed word (8 elements along W's rows) at a time; needs W's row length divisible by 8. */
  words: boolean;
  /** Elements per NF4 block. */
  blockSize: number;
  /** Where the absmax comes from. */
  absmax: AbsmaxMode;
  /** The 16 code values. */
  code: Float32Array;
}

/** Uniform words of the NF4 GEMM and GEMV: M, N, K, lda, offA, ldc, offC, zero. */
export const NF4_MATMUL_UNIFORM_WORDS = 8;

const MATMUL_PARAMS = `struct Params { M: u32, N: u32, K: u32, lda: u32, offA: u32, ldc: u32, offC: u32, zero: u32 }
@group(0) @binding(0) var<uniform> p: Params;`;

function vecType(n: number, s: string): string {
  return n === 1 ? s : `vec${n}<${s}>`;
}

/** Storage element type of a dense operand read `vw` elements at a time. */
function denseElem(dtype: Nf4FloatDType, vw: number): string {
  if (dtype === "f32") return vecType(vw, "f32");
  return vw <= 2 ? "u32" : vw === 4 ? "vec2<u32>" : "vec4<u32>";
}

/** WGSL loading `vw` consecutive elements at element index `e` of buffer `buf` into f32 registers `regs`. */
function loadDense(buf: string, dtype: Nf4FloatDType, vw: number, e: string, regs: string[]): string {
  if (dtype === "f32") return `${regs[0]} = ${buf}[(${e}) >> ${lg(vw)}u];`;
  if (vw === 1) return `{ let i = ${e}; ${regs[0]} = unpack2x16float(${buf}[i >> 1u])[i & 1u]; }`;
  if (vw === 2) return `${regs[0]} = unpack2x16float(${buf}[(${e}) >> 1u]);`;
  if (vw === 4) {
    return `{ let w = ${buf}[(${e}) >> 2u]; ${regs[0]} = vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }`;
  }
  return `{ let w = ${buf}[(${e}) >> 3u]; ${regs[0]} = vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); ${
    regs[1]
  } = vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)); }`;
}

/** Component `c` of a loaded register set. */
function comp(regs: string[], vw: number, c: number): string {
  if (vw === 1) return regs[0];
  if (vw === 8) return `${regs[c >> 2]}[${c & 3}]`;
  return `${regs[0]}[${c}]`;
}

interface LoaderCode {
  pre: string[];
  decls: string[];
  loads: string[];
  stores: string[];
}

/** Moves the dense operand's [BM, BK] tile (row-major, vectors along K) into registers, then into `As[S][k][m]`. */
function denseLoader(dtype: Nf4FloatDType, vw: number, bm: number, bk: number, threads: number): LoaderCode {
  const rowLen = bk / vw;
  const nv = (bk * bm) / vw;
  const per = Math.ceil(nv / threads);
  const guard = nv % threads !== 0;
  const out: LoaderCode = { pre: [], decls: [], loads: [], stores: [] };
  for (let i = 0; i < per; i++) {
    const v = `lid + ${i * threads}u`;
    out.pre.push(`let lkA${i} = ((${v}) & ${rowLen - 1}u) * ${vw}u; let lmA${i} = (${v}) >> ${lg(rowLen)}u;`);
    const regs = vw === 8 ? [`rA${i}_0`, `rA${i}_1`] : [`rA${i}`];
    const t = vecType(Math.min(vw, 4), "f32");
    out.decls.push(regs.map((r) => `var ${r}: ${t};`).join(" "));
    const cond = `${guard ? `${v} < ${nv}u && ` : ""}k0 + lkA${i} < p.K && tileM + lmA${i} < p.M`;
    const e = `p.offA + (tileM + lmA${i}) * p.lda + k0 + lkA${i}`;
    out.loads.push(
      `${regs.map((r) => `${r} = ${t}();`).join(" ")}\n    if (${cond}) { ${loadDense("A", dtype, vw, e, regs)} }`,
    );
    const st: string[] = [];
    for (let c = 0; c < vw; c++) st.push(`As[S][lkA${i} + ${c}u][lmA${i} >> 2u][lmA${i} & 3u] = ${comp(regs, vw, c)};`);
    out.stores.push(guard ? `if (${v} < ${nv}u) { ${st.join(" ")} }` : st.join(" "));
  }
  return out;
}

/**
 * Moves the NF4 operand's [BK, BN] tile into registers (raw words and absmax values) and, dequantized, into
 * `Bs[S][k][n]`. Element (k, n) of the tile is W[n, k] (forward) or W[k, n] (backward).
 */
function nf4Loader(s: Nf4GemmSpec, threads: number): LoaderCode {
  const { bn, bk } = s.tile;
  const forward = s.mode === "forward";
  const out: LoaderCode = { pre: [], decls: [], loads: [], stores: [] };
  const blockShift = lg(s.blockSize);
  if (s.words) {
    // One packed word = 8 consecutive elements of a row of W: along the tile's k (forward) or n (backward).
    const perRow = forward ? bk / 8 : bn / 8;
    const nu = (bk * bn) / 8;
    const per = Math.ceil(nu / threads);
    const guard = nu % threads !== 0;
    for (let i = 0; i < per; i++) {
      const v = `lid + ${i * threads}u`;
      const along = `((${v}) & ${perRow - 1}u) * 8u`;
      const across = `(${v}) >> ${lg(perRow)}u`;
      out.pre.push(
        forward
          ? `let lkB${i} = ${along}; let lnB${i} = ${across};`
          : `let lnB${i} = ${along}; let lkB${i} = ${across};`,
      );
      out.decls.push(`var wB${i}: u32; var sB${i}: f32;`);
      const e = forward ? `(tileN + lnB${i}) * p.K + k0 + lkB${i}` : `(k0 + lkB${i}) * p.N + tileN + lnB${i}`;
      const cond = `${guard ? `${v} < ${nu}u && ` : ""}k0 + lkB${i} < p.K && tileN + lnB${i} < p.N`;
      out.loads.push(
        `wB${i} = 0u; sB${i} = 0.0;\n    if (${cond}) { let e = ${e}; wB${i} = W[e >> 3u]; sB${i} = absmaxAt(e >> ${blockShift}u); }`,
      );
      const val = (j: number) => `nf4Lut[${nibble(`wB${i}`, j)}] * sB${i}`;
      let st: string;
      if (forward) {
        st = Array.from({ length: 8 }, (_, j) => `Bs[S][lkB${i} + ${j}u][lnB${i} >> 2u][lnB${i} & 3u] = ${val(j)};`)
          .join(" ");
      } else {
        st = `Bs[S][lkB${i}][lnB${i} >> 2u] = vec4<f32>(${[0, 1, 2, 3].map(val).join(", ")}); ` +
          `Bs[S][lkB${i}][(lnB${i} >> 2u) + 1u] = vec4<f32>(${[4, 5, 6, 7].map(val).join(", ")});`;
      }
      out.stores.push(guard ? `if (${v} < ${nu}u) { ${st} }` : st);
    }
    return out;
  }
  // One element at a time (W's row length not a multiple of 8: words straddle rows).
  const nv = bk * bn;
  const per = Math.ceil(nv / threads);
  const guard = nv % threads !== 0;
  for (let i = 0; i < per; i++) {
    const v = `lid + ${i * threads}u`;
    out.pre.push(
      forward
        ? `let lkB${i} = (${v}) & ${bk - 1}u; let lnB${i} = (${v}) >> ${lg(bk)}u;`
        : `let lnB${i} = (${v}) & ${bn - 1}u; let lkB${i} = (${v}) >> ${lg(bn)}u;`,
    );
    out.decls.push(`var wB${i}: u32; var sB${i}: f32;`);
    const e = forward ? `(tileN + lnB${i}) * p.K + k0 + lkB${i}` : `(k0 + lkB${i}) * p.N + tileN + lnB${i}`;
    const cond = `${guard ? `${v} < ${nv}u && ` : ""}k0 + lkB${i} < p.K && tileN + lnB${i} < p.N`;
    out.loads.push(
      `wB${i} = 0u; sB${i} = 0.0;\n    if (${cond}) { let e = ${e}; ` +
        `wB${i} = (W[e >> 3u] >> ((((e & 7u) >> 1u) << 3u) + ((~e & 1u) << 2u))) & 15u; ` +
        `sB${i} = absmaxAt(e >> ${blockShift}u); }`,
    );
    const st = `Bs[S][lkB${i}][lnB${i} >> 2u][lnB${i} & 3u] = nf4Lut[wB${i}] * sB${i};`;
    out.stores.push(guard ? `if (${v} < ${nv}u) { ${st} }` : st);
  }
  return out;
}

/**
 * Generates the fused dequantize-GEMM; dispatch `[ceil(N / bn), ceil(M / bm)]` workgroups. Bindings: the dense
 * operand (read), packed W (read), the absmax bindings (1 or 4, read), the output (write). Same register tiling as
 * core/kernels/matmul.ts's `gemmKernel` (k-major workgroup tiles read as vec4s, a TM×TN block per thread, f32
 * accumulation); W's tile is decoded — `fl(code · absmax)`, the reference's value — on its way into workgroup
 * memory, so the dense weight never exists outside a BK×BN tile.
 */
export function nf4GemmKernel(s: Nf4GemmSpec): KernelSource {
  const t = s.tile;
  checkNf4Tile(t);
  const { bm, bn, bk, tm, tn } = t;
  const TX = bn / tn, TY = bm / tm, T = TX * TY;
  const stages = t.pipeline === "double" ? 2 : 1;
  const okVec = s.x === "f32" ? [1, 2, 4] : [1, 2, 4, 8];
  if (!okVec.includes(s.vecX) || s.vecX > bk) throw new Error(`nf4 matmul: vector width ${s.vecX} for ${s.x}`);
  if (s.out === "f32" ? ![1, 4].includes(s.outVec) : ![2, 4].includes(s.outVec)) {
    throw new Error(`nf4 matmul: output vector width ${s.outVec} for ${s.out}`);
  }
  const la = denseLoader(s.x, s.vecX, bm, bk, T);
  const lb = nf4Loader(s, T);
  const lut = lutSource(s.code);
  const src = absmaxSource(s.absmax, 3, T);
  const tmv = tm / 4, tnv = tn / 4;

  const compute = tileInnerProduct(bk, tmv, tnv);
  const computeAt = (st: string) => `{\n    let S = ${st};\n    ${compute.join("\n    ")}\n  }`;
  const storeAt = (st: string) => `{\n    let S = ${st};\n    ${[...la.stores, ...lb.stores].join("\n    ")}\n  }`;
  const loads = `${la.loads.join("\n    ")}\n    ${lb.loads.join("\n    ")}`;
  const loop = t.pipeline === "direct"
    ? `for (var kt = 0u; kt < numTiles; kt++) {
    let k0 = kt * ${bk}u;
    ${loads}
    ${storeAt("0u")}
    workgroupBarrier();
    ${computeAt("0u")}
    workgroupBarrier();
  }`
    : `if (numTiles > 0u) {
    let k0 = 0u;
    ${loads}
    ${storeAt("0u")}
  }
  workgroupBarrier();
  for (var kt = 0u; kt < numTiles; kt++) {
    let s = kt & 1u;
    let more = kt + 1u < numTiles;
    if (more) {
      let k0 = (kt + 1u) * ${bk}u;
      ${loads}
    }
    ${computeAt("s")}
    if (more) ${storeAt("s ^ 1u")}
    workgroupBarrier();
  }`;

  // Epilogue: thread (tx, ty) owns rows (g·TY + ty)·4 + r and columns (f·TX + tx)·4 + c of the tile.
  const epi: string[] = [];
  for (let g = 0; g < tmv; g++) {
    for (let r = 0; r < 4; r++) {
      const row: string[] = [];
      for (let f = 0; f < tnv; f++) {
        const c = `c${g * 4 + r}_${f}`;
        const n = `tileN + ${f * TX * 4}u + tx * 4u`;
        if (s.out === "f32" && s.outVec === 4) {
          row.push(`if (${n} < p.N) { C[(rowC + ${n}) >> 2u] = ${c}; }`);
        } else if (s.out === "f32") {
          for (let q = 0; q < 4; q++) row.push(`if (${n} + ${q}u < p.N) { C[rowC + ${n} + ${q}u] = ${c}[${q}]; }`);
        } else if (s.outVec === 4) {
          row.push(
            `if (${n} < p.N) { C[(rowC + ${n}) >> 2u] = vec2<u32>(packF16(${c}.x, ${c}.y), packF16(${c}.z, ${c}.w)); }`,
          );
        } else {
          for (const q of [0, 2]) {
            const h = q === 0 ? `${c}.x, ${c}.y` : `${c}.z, ${c}.w`;
            row.push(`if (${n} + ${q}u < p.N) { C[(rowC + ${n} + ${q}u) >> 1u] = packF16(${h}); }`);
          }
        }
      }
      epi.push(`{ let m = tileM + ${g * TY * 4 + r}u + ty * 4u;
    if (m < p.M) { let rowC = p.offC + m * p.ldc;
      ${row.join("\n      ")} } }`);
    }
  }
  const outDecl = s.out === "f32"
    ? `array<${s.outVec === 4 ? "vec4<f32>" : "f32"}>`
    : `array<${s.outVec === 4 ? "vec2<u32>" : "u32"}>`;
  const accDecl: string[] = [];
  for (let i = 0; i < tm; i++) for (let f = 0; f < tnv; f++) accDecl.push(`var c${i}_${f} = vec4<f32>();`);

  const code = `${MATMUL_PARAMS}
@group(0) @binding(1) var<storage, read> A: array<${denseElem(s.x, s.vecX)}>;
@group(0) @binding(2) var<storage, read> W: array<u32>;
${src.decl}
@group(0) @binding(${3 + src.count}) var<storage, read_write> C: ${outDecl};
${PACK_F16}
${lut.decl}
var<workgroup> As: array<array<array<vec4<f32>, ${bm / 4}>, ${bk}>, ${stages}>;
var<workgroup> Bs: array<array<array<vec4<f32>, ${bn / 4}>, ${bk}>, ${stages}>;
@compute @workgroup_size(${T})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  ${lut.init}
  ${src.init}
  workgroupBarrier();
  let tileM = wid.y * ${bm}u;
  let tileN = wid.x * ${bn}u;
  let numTiles = (p.K + ${bk - 1}u) / ${bk}u;
  let tx = lid % ${TX}u;
  let ty = lid / ${TX}u;
  ${Array.from({ length: tmv }, (_, g) => `let ia${g} = ${g * TY}u + ty;`).join(" ")}
  ${Array.from({ length: tnv }, (_, f) => `let ib${f} = ${f * TX}u + tx;`).join(" ")}
  ${[...la.pre, ...lb.pre].join("\n  ")}
  ${[...la.decls, ...lb.decls].join("\n  ")}
  ${accDecl.join(" ")}
  ${loop}
  ${epi.join("\n  ")}
}`;
  return {
    name: `nf4_gemm_${s.mode}_${s.x}${s.vecX}_${s.words ? "w" : "e"}_b${s.blockSize}_${s.absmax}_${
      nf4TileName(t)
    }_${s.out}${s.outVec}`,
    code,
    bindings: ["read", "read", ...Array<"read">(src.count).fill("read"), "write"],
    uniforms: true,
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Dequantize-GEMV (decoding)
// ---------------------------------------------------------------------------------------------------------------

/** A fused NF4 GEMV variant: y[M ≤ 4, N] = x[M, K] · Wᵀ, W [N, K] in NF4. */
export interface Nf4GemvSpec {
  /** x's dtype (x row-major; K, lda and the offset divisible by 8). */
  x: Nf4FloatDType;
  /** Output dtype; f16 writes pairs (needs even N, ldc, offset and rowsPerGroup). */
  out: Nf4FloatDType;
  /** Rows of x (1 to 4). */
  rows: number;
  /** Weights per load: 32 (a vec4<u32>, needs K % 32 == 0) or 8 (one word). */
  unit: 8 | 32;
  /** Threads per workgroup. */
  threads: number;
  /** Rows of W per workgroup. */
  rowsPerGroup: number;
  /** Rows of W per thread (1, 2 or 4), sharing each load of x; threads·rowsPerThread/rowsPerGroup lanes per row. */
  rowsPerThread: number;
  /** Elements per NF4 block (≥ unit). */
  blockSize: number;
  /** Where the absmax comes from. */
  absmax: AbsmaxMode;
  /** The 16 code values. */
  code: Float32Array;
}

/**
 * Generates the dequantize-GEMV; dispatch `rowGrid(ceil(N / rowsPerGroup))` workgroups. Bindings: x (read),
 * packed W (read), the absmax bindings (read), the output (write). A thread owns `rowsPerThread` rows of W and a
 * strided share of their units of 8 or 32 weights (4 or 16 bytes per load); each unit of x is loaded once for all
 * of the thread's rows. Codes come from a 16-entry workgroup table (one conflict-free lookup per weight), the dot
 * product with x is scaled by the unit's absmax (a unit lies in one block), and lanes are summed in workgroup
 * memory. Weight traffic is the packed nibbles plus one absmax (or one byte, with double quantization) per block.
 */
export function nf4GemvKernel(s: Nf4GemvSpec): KernelSource {
  const T = s.threads, R = s.rowsPerGroup, RPT = s.rowsPerThread, MR = s.rows, U = s.unit;
  const G = R / RPT, TPR = T / G;
  if (![1, 2, 4].includes(RPT) || !Number.isInteger(G) || !isPow2(TPR)) {
    throw new Error(`nf4 gemv: ${T} threads, ${R} rows per group, ${RPT} per thread do not give 2^n lanes per row`);
  }
  if (MR < 1 || MR > 4) throw new Error(`nf4 gemv: rows ${MR} must be 1 to 4`);
  if (s.blockSize < U) throw new Error(`nf4 gemv: block size ${s.blockSize} below the unit ${U}`);
  if (s.out === "f16" && R % 2 !== 0) throw new Error("nf4 gemv: f16 output needs an even rowsPerGroup");
  const lut = lutSource(s.code);
  const src = absmaxSource(s.absmax, 3, T);
  const words = U / 8;
  const body: string[] = [];
  for (let r = 0; r < RPT; r++) {
    body.push(`let s${r} = absmaxAt((rowE${r} + kx) >> ${lg(s.blockSize)}u);`);
    body.push(U === 32 ? `let wv${r} = W[(rowE${r} + kx) >> 5u];` : `let wv${r} = W[(rowE${r} + kx) >> 3u];`);
    for (let m = 0; m < MR; m++) body.push(`var d${r}_${m} = 0.0;`);
  }
  for (let j = 0; j < words; j++) {
    // x for elements kx + 8j … kx + 8j + 7 of every row of x, shared by the thread's rows of W.
    for (let m = 0; m < MR; m++) {
      const xe = `xrow${m} + kx + ${8 * j}u`;
      if (s.x === "f32") {
        body.push(`let xa${m} = A[(${xe}) >> 2u]; let xb${m} = A[((${xe}) >> 2u) + 1u];`);
      } else {
        body.push(
          `let xv${m} = A[(${xe}) >> 3u]; ` +
            `let xa${m} = vec4<f32>(unpack2x16float(xv${m}.x), unpack2x16float(xv${m}.y)); ` +
            `let xb${m} = vec4<f32>(unpack2x16float(xv${m}.z), unpack2x16float(xv${m}.w));`,
        );
      }
    }
    for (let r = 0; r < RPT; r++) {
      const w = U === 32 ? `wv${r}[${j}]` : `wv${r}`;
      body.push(
        `{ let ca = vec4<f32>(${[0, 1, 2, 3].map((q) => `nf4Lut[${nibble(w, q)}]`).join(", ")});`,
        `  let cb = vec4<f32>(${[4, 5, 6, 7].map((q) => `nf4Lut[${nibble(w, q)}]`).join(", ")});`,
        ...Array.from({ length: MR }, (_, m) => `  d${r}_${m} += dot(ca, xa${m}) + dot(cb, xb${m});`),
        "}",
      );
    }
    if (j + 1 < words) body.push("{"); // scope the next word's x registers
  }
  for (let j = 1; j < words; j++) body.push("}");
  for (let r = 0; r < RPT; r++) {
    for (let m = 0; m < MR; m++) body.push(`acc${r}_${m} = fma(s${r}, d${r}_${m}, acc${r}_${m});`);
  }
  const slot = (m: number, r: number) => (m * RPT + r) * T;
  const reduce: string[] = [];
  for (let h = TPR / 2; h >= 1; h /= 2) {
    const adds: string[] = [];
    for (let m = 0; m < MR; m++) {
      for (let r = 0; r < RPT; r++) adds.push(`red[${slot(m, r)}u + lid] += red[${slot(m, r)}u + lid + ${h}u];`);
    }
    reduce.push(`if (lane < ${h}u) { ${adds.join(" ")} }\n  workgroupBarrier();`);
  }
  // Row rr of the workgroup belongs to group rr / RPT, thread row rr % RPT; its sum sits at its group's lane 0.
  const sumOf = (m: string, rr: string) =>
    `red[(${m} * ${RPT}u + (${rr}) % ${RPT}u) * ${T}u + ((${rr}) / ${RPT}u) * ${TPR}u]`;
  const write = s.out === "f32"
    ? `if (lid < ${MR * R}u) {
    let m = lid / ${R}u;
    let rr = lid % ${R}u;
    let n = n0 + rr;
    if (n < p.N) { C[p.offC + m * p.ldc + n] = ${sumOf("m", "rr")}; }
  }`
    : `if (lid < ${(MR * R) / 2}u) {
    let m = lid / ${R / 2}u;
    let rr = (lid % ${R / 2}u) * 2u;
    let n = n0 + rr;
    if (n < p.N) { C[(p.offC + m * p.ldc + n) >> 1u] = packF16(${sumOf("m", "rr")}, ${sumOf("m", "rr + 1u")}); }
  }`;
  const accs: string[] = [];
  for (let r = 0; r < RPT; r++) for (let m = 0; m < MR; m++) accs.push(`var acc${r}_${m} = 0.0;`);
  const saves: string[] = [];
  for (let r = 0; r < RPT; r++) for (let m = 0; m < MR; m++) saves.push(`red[${slot(m, r)}u + lid] = acc${r}_${m};`);
  const code = `${MATMUL_PARAMS}
@group(0) @binding(1) var<storage, read> A: array<${s.x === "f32" ? "vec4<f32>" : "vec4<u32>"}>;
@group(0) @binding(2) var<storage, read> W: array<${U === 32 ? "vec4<u32>" : "u32"}>;
${src.decl}
@group(0) @binding(${3 + src.count}) var<storage, read_write> C: array<${s.out === "f32" ? "f32" : "u32"}>;
${PACK_F16}
${lut.decl}
var<workgroup> red: array<f32, ${MR * RPT * T}>;
@compute @workgroup_size(${T})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  ${lut.init}
  ${src.init}
  workgroupBarrier();
  let n0 = (wid.x + wid.y * nwg.x) * ${R}u;
  let lane = lid % ${TPR}u;
  let first = n0 + (lid / ${TPR}u) * ${RPT}u;
  ${accs.join(" ")}
  if (first < p.N) {
    let units = p.K / ${U}u;
    // Rows past N repeat the last row (loads stay in bounds; their sums are never written).
    ${Array.from({ length: RPT }, (_, r) => `let rowE${r} = min(first + ${r}u, p.N - 1u) * p.K;`).join(" ")}
    ${Array.from({ length: MR }, (_, m) => `let xrow${m} = p.offA + ${m}u * p.lda;`).join(" ")}
    for (var u = lane; u < units; u += ${TPR}u) {
      let kx = u * ${U}u;
      ${body.join("\n      ")}
    }
  }
  ${saves.join(" ")}
  workgroupBarrier();
  ${reduce.join("\n  ")}
  ${write}
}`;
  return {
    name: `nf4_gemv_${s.x}_r${MR}_u${U}_b${s.blockSize}_${s.absmax}_${R}x${RPT}x${TPR}_${s.out}`,
    code,
    bindings: ["read", "read", ...Array<"read">(src.count).fill("read"), "write"],
    uniforms: true,
  };
}
