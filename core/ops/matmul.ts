/**
 * Differentiable matrix product with batching, and the GEMM driver under it.
 *
 * Operands may be row-major or transposed views (read through strides, no copy); a 2-D right operand is shared by
 * every batch element, and then the batch is folded into the rows so one large GEMM runs instead of many small
 * ones. A chooser ({@linkcode chooseGemm}) picks the kernel per shape: a GEMV for one to four rows, the
 * register-tiled GEMM with a tile config per shape class (large, medium, small, thin in M, thin in N), and split-K
 * when the output has too few tiles to fill the GPU. {@linkcode gemmInto} exposes the fused epilogue
 * (`C = alpha·A·B` or `C += alpha·A·B`, f32 or f16 C) to other ops, e.g. LoRA's `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`.
 *
 * @example
 * ```ts
 * import { gemmInto, matmul } from "./matmul.ts";
 * const y = matmul(x, w.transpose()); // x: [B, T, in], w: [out, in] → [B, T, out]
 * gemmInto(y, matmul(x, loraA.transpose()), loraB.transpose(), { alpha: scale, accumulate: true });
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import { record } from "../autograd.ts";
import { onEmptyCache } from "../memory.ts";
import { getGpu, type Kernel, type KernelSource } from "../gpu.ts";
import { gridFor, rowGrid, UniformWriter } from "../kernels/common.ts";
import {
  checkTile,
  FINISH_UNIFORM_WORDS,
  type FloatDType,
  GEMM_UNIFORM_WORDS,
  gemmFinishKernel,
  gemmKernel,
  type GemmKernelSpec,
  gemvNKernel,
  gemvTKernel,
  type TileConfig,
  tileName,
  tileSharedBytes,
} from "../kernels/matmul.ts";
import { fmtShape, numelOf, Storage, Tensor } from "../tensor.ts";
import { sumTo } from "./reduce.ts";
import { contiguous, reshape, transpose } from "./shape.ts";

/**
 * Which kernel computes a product. `tile` is the register-tiled GEMM (`splits` > 1 splits K across workgroups
 * and adds a reduction pass); `gemvT` streams rows of a B stored [N, K] for M ≤ 4; `gemvN` streams columns of a
 * B stored [K, N] for M ≤ 4.
 */
export type GemmPlan =
  | { kind: "tile"; tile: TileConfig; splits?: number }
  | { kind: "gemvT"; rowsPerGroup: number; threads: number }
  | { kind: "gemvN"; colThreads: number; kSlices: number; splits?: number };

/** A short name for a plan, e.g. `tile:128x128x8-8x8-double/k4`. */
export function planName(p: GemmPlan): string {
  if (p.kind === "tile") return `tile:${tileName(p.tile)}${p.splits && p.splits > 1 ? `/k${p.splits}` : ""}`;
  if (p.kind === "gemvT") return `gemvT:${p.rowsPerGroup}r/${p.threads}t`;
  return `gemvN:${p.colThreads}c/${p.kSlices}k${p.splits && p.splits > 1 ? `/k${p.splits}` : ""}`;
}

/** What the chooser looks at. */
export interface GemmShape {
  /** Rows of C (after folding the batch into rows). */
  M: number;
  /** Columns of C. */
  N: number;
  /** Reduction length. */
  K: number;
  /** Independent products (grid z). */
  batch: number;
  /** A's dtype. */
  a: FloatDType;
  /** B's dtype. */
  b: FloatDType;
  /** B stored [N, K]. */
  transB: boolean;
}

/** Workgroups the chooser aims to have in flight before it splits K (about two per SM on an H200). */
export const TARGET_GROUPS = 264;

/**
 * Tile configs per shape class. Measured on the H200 through Deno (bench/NOTES.md, 2026-11-29): 128×64 tiles
 * with 8×8 per thread (128 threads, BK 8, double-buffered) beat 128×128 at 4096³ (35.3 vs 31.2 TFLOP/s f32)
 * and 8192³ (36.2 vs 31.3 f32, 38.0 vs 31.7 f16), and reach 31–33 TFLOP/s on the 7B LoRA shapes, so the large
 * and medium classes share it; the thin classes and split-K reach or beat cuBLAS on the rank-16 products. The
 * chooser picks only from these, and the tests run each of them.
 */
export const GEMM_TILES: Readonly<Record<string, TileConfig>> = {
  /** M, N ≥ 1024 and M·N ≥ 2048²: square-ish GEMMs. */
  large: { bm: 128, bn: 64, bk: 8, tm: 8, tn: 8, pipeline: "double", swizzle: 0 },
  /** M·N ≥ 256K: e.g. 512 tokens × 4096 features. */
  medium: { bm: 128, bn: 64, bk: 8, tm: 8, tn: 8, pipeline: "double", swizzle: 0 },
  /** Everything smaller. */
  small: { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4, pipeline: "double", swizzle: 0 },
  /** N ≤ 16 (LoRA x·Aᵀ at rank ≤ 16), with split-K. */
  thinN16: { bm: 64, bn: 16, bk: 16, tm: 4, tn: 4, pipeline: "double", swizzle: 0 },
  /** 16 < N ≤ 64 (ranks up to 64), with split-K. */
  thinN64: { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4, pipeline: "double", swizzle: 0 },
  /** M ≤ 16 (LoRA weight gradient dA = (G·B)ᵀ·X at rank ≤ 16), with split-K. */
  thinM16: { bm: 16, bn: 128, bk: 16, tm: 4, tn: 4, pipeline: "double", swizzle: 0 },
  /** 16 < M ≤ 64, with split-K. */
  thinM64: { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4, pipeline: "double", swizzle: 0 },
};

/**
 * The tile a CPU adapter (lavapipe) uses instead of the large, medium and small ones: 64 threads with 8 × 8 outputs
 * each and no double buffering — lavapipe runs a workgroup in 8-lane SIMD chunks, switching chunks at every barrier,
 * so fewer threads doing more work each is faster there (mini-llama's [384, 64] × [64, 192] products: ~25 %).
 */
export const CPU_GEMM_TILE: TileConfig = { bm: 64, bn: 64, bk: 16, tm: 8, tn: 8, pipeline: "direct", swizzle: 0 };

/** The GEMV configurations the chooser uses (rows of W per workgroup, threads; columns, K slices). */
export const GEMV_CONFIGS: {
  readonly t: { rowsPerGroup: number; threads: number };
  readonly n: { colThreads: number; kSlices: number };
} = {
  t: { rowsPerGroup: 8, threads: 256 },
  n: { colThreads: 32, kSlices: 8 },
};

/** The tile config the chooser uses for a shape (before split-K). */
export function chooseTile(s: GemmShape): TileConfig {
  const { M, N } = s;
  const T = GEMM_TILES;
  if (N <= 16) return T.thinN16;
  if (N <= 64) return T.thinN64;
  if (M <= 16) return T.thinM16;
  if (M <= 64) return T.thinM64;
  if (M >= 1024 && N >= 1024 && M * N >= 2048 * 2048) return T.large;
  if (M * N >= 256 * 1024) return T.medium;
  return T.small;
}

/** How many K splits a tile plan gets: enough workgroups to fill the GPU, at least 128 of K per split. */
export function chooseSplits(s: GemmShape, tile: TileConfig): number {
  const groups = Math.ceil(s.M / tile.bm) * Math.ceil(s.N / tile.bn) * s.batch;
  if (groups >= TARGET_GROUPS / 2) return 1;
  const byK = Math.floor(s.K / Math.max(128, 2 * tile.bk));
  const byMem = Math.floor((64 << 20) / Math.max(1, s.M * s.N * s.batch * 4));
  return Math.max(1, Math.min(Math.ceil(TARGET_GROUPS / groups), byK, byMem, 64));
}

/**
 * The chooser: the kernel and configuration for a product of this shape.
 *
 * @example
 * ```ts
 * chooseGemm({ M: 1, N: 4096, K: 4096, batch: 1, a: "f16", b: "f16", transB: true }); // a gemvT plan
 * ```
 */
export function chooseGemm(s: GemmShape): GemmPlan {
  if (s.M <= 4) {
    if (s.transB) return { kind: "gemvT", ...GEMV_CONFIGS.t };
    const cfg = GEMV_CONFIGS.n;
    const cols = Math.ceil(s.N / (cfg.colThreads * (s.b === "f16" ? 8 : 4))) * s.batch;
    const splits = Math.max(1, Math.min(Math.ceil(TARGET_GROUPS / cols), Math.floor(s.K / (8 * cfg.kSlices)), 64));
    return { kind: "gemvN", ...cfg, splits };
  }
  const tile = chooseTile(s);
  return { kind: "tile", tile, splits: chooseSplits(s, tile) };
}

// ---------------------------------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------------------------------

/** A matrix operand as the kernels see it: element offset, leading dimension, batch stride, layout. */
interface Operand {
  t: Tensor;
  trans: boolean;
  ld: number;
  off: number;
  bs: number;
}

/** Row-major (stride 1 along columns) or transposed (stride 1 along rows), or null when neither. */
function layoutOf(t: Tensor): { trans: boolean; ld: number } | null {
  const n = t.ndim;
  const [r, c] = [t.shape[n - 2], t.shape[n - 1]];
  const [sr, sc] = [t.strides[n - 2], t.strides[n - 1]];
  if ((sc === 1 || c === 1) && (sr >= c || r === 1)) return { trans: false, ld: r === 1 ? c : sr };
  if ((sr === 1 || r === 1) && (sc >= r || c === 1)) return { trans: true, ld: c === 1 ? r : sc };
  return null;
}

/** Stride between consecutive matrices of the flattened batch dims; 0 when broadcast; null when not uniform. */
function batchStride(t: Tensor): number | null {
  const dims = [...Array(t.ndim - 2).keys()].filter((i) => t.shape[i] !== 1);
  if (dims.length === 0) return 0;
  for (let j = dims.length - 2; j >= 0; j--) {
    if (t.strides[dims[j]] !== t.strides[dims[j + 1]] * t.shape[dims[j + 1]]) return null;
  }
  return t.strides[dims[dims.length - 1]];
}

/** The operand view of `t`, copying it to row-major first when its strides fit no kernel. */
function operand(t: Tensor, temps: Tensor[]): Operand {
  let la = layoutOf(t), bs = batchStride(t);
  if (!la || bs === null) {
    t = contiguous(t);
    temps.push(t);
    la = layoutOf(t)!;
    bs = batchStride(t)!;
  }
  return { t, trans: la.trans, ld: la.ld, off: t.offset, bs };
}

/** Largest vector width ≤ `max` that divides every offset and stride (1 when none does). */
function vecWidth(dtype: DType, max: number, ...values: number[]): number {
  for (const w of dtype === "f16" ? [8, 4, 2] : [4, 2]) {
    if (w <= max && values.every((v) => v % w === 0)) return w;
  }
  return 1;
}

const kernels = new Map<string, Kernel>();
function kernelFor(key: string, make: () => KernelSource): Kernel {
  let k = kernels.get(key);
  if (!k) kernels.set(key, k = getGpu().kernel(make()));
  return k;
}

/** Reusable f32 scratch for split-K partials and unaligned f16 outputs (kept; grows to the largest use). */
let scratch: Storage | null = null;
function scratchBuffer(bytes: number): GPUBuffer {
  if (!scratch || scratch.bytes < bytes) {
    scratch?.release();
    scratch = new Storage(Math.max(bytes, (scratch?.bytes ?? 0) * 2, 1 << 20));
  }
  return scratch.buffer;
}

/**
 * Frees the matmul scratch buffer (split-K partials); the next split-K product allocates it again.
 *
 * @example
 * ```ts
 * releaseMatmulScratch();
 * ```
 */
export function releaseMatmulScratch(): void {
  scratch?.release();
  scratch = null;
}
onEmptyCache(releaseMatmulScratch);

const MAX_GRID = 65535;

/** The product C[b] = alpha·A[b]·B[b] (+ C[b]) over `batch` matrices; C given by buffer and addressing. */
interface Job {
  A: Operand;
  B: Operand;
  C: { buf: GPUBuffer; dtype: FloatDType; ld: number; off: number; bs: number };
  M: number;
  N: number;
  K: number;
  batch: number;
  alpha: number;
  accumulate: boolean;
  plan?: GemmPlan;
}

function dtypeOf(t: Tensor): FloatDType {
  return t.dtype as FloatDType;
}

/** Runs one product with the chosen (or given) plan. */
function runJob(job: Job): GemmPlan {
  const gpu = getGpu();
  const { A, B, C, M, N, K, batch } = job;
  let plan = job.plan ??
    chooseGemm({ M, N, K, batch, a: dtypeOf(A.t), b: dtypeOf(B.t), transB: B.trans });
  if (M === 0 || N === 0 || batch === 0) return plan;
  if (plan.kind === "gemvT" && (!B.trans || A.trans || M > 4)) {
    throw new Error(`matmul: plan ${planName(plan)} needs M ≤ 4, a row-major A and a B stored [N, K]`);
  }
  if (plan.kind === "gemvN" && (B.trans || A.trans || M > 4)) {
    throw new Error(`matmul: plan ${planName(plan)} needs M ≤ 4, a row-major A and a B stored [K, N]`);
  }
  if (plan.kind === "tile") {
    const T = GEMM_TILES;
    if (!job.plan && gpu.info.isFallback && [T.small, T.medium, T.large].includes(plan.tile)) {
      plan = { ...plan, tile: CPU_GEMM_TILE };
    }
    checkTile(plan.tile);
    const limit = gpu.info.maxComputeWorkgroupStorageSize;
    if (tileSharedBytes(plan.tile, dtypeOf(A.t), dtypeOf(B.t)) > limit) {
      if (job.plan) {
        throw new Error(`matmul: tile ${tileName(plan.tile)} needs more than ${limit} bytes of workgroup memory`);
      }
      plan = { ...plan, tile: { ...GEMM_TILES.small } };
    }
    if (plan.tile.smemF16 && !gpu.info.shaderF16) plan = { ...plan, tile: { ...plan.tile, smemF16: false } };
  }
  const split = plan.kind === "gemvT" ? 1 : Math.max(1, Math.min(plan.splits ?? 1, K || 1));
  const kChunk = split > 1 ? Math.ceil(K / split / 8) * 8 : Math.max(K, 1);
  const splits = Math.max(1, Math.ceil(K / kChunk));

  // Fused epilogue, or f32 partials in the scratch buffer and a finishing pass.
  const even = (...v: number[]) => v.every((x) => x % 2 === 0);
  const fuse = splits === 1 && plan.kind !== "gemvN" && (C.dtype === "f32" || even(C.ld, C.off, C.bs, N));
  const target = fuse ? C : {
    buf: scratchBuffer(splits * batch * M * N * 4),
    dtype: "f32" as FloatDType,
    ld: N,
    off: 0,
    bs: M * N,
  };
  const alpha = fuse ? job.alpha : 1;
  const accumulate = fuse ? job.accumulate : false;
  const sstride = batch * M * N;

  const u = new UniformWriter(GEMM_UNIFORM_WORDS)
    .u(0, M).u(1, N).u(2, K).u(3, A.ld).u(4, B.ld).u(5, target.ld)
    .u(6, A.off).u(7, B.off).u(8, target.off)
    .u(9, A.bs).u(10, B.bs).u(11, target.bs).f(12, alpha).u(13, kChunk).u(14, splits).u(15, sstride);
  const a = dtypeOf(A.t), b = dtypeOf(B.t);
  const bufs = [A.t.storage.buffer, B.t.storage.buffer, target.buf];
  // Dispatch in batch chunks when the grid's z would exceed its limit.
  const perZ = plan.kind === "tile" ? splits : 1;
  const chunk = Math.max(1, Math.floor(MAX_GRID / perZ));
  const dispatchChunks = (k: Kernel, xy: [number, number]) => {
    for (let b0 = 0; b0 < batch; b0 += chunk) {
      const nb = Math.min(chunk, batch - b0);
      const uc = new UniformWriter(GEMM_UNIFORM_WORDS);
      uc.u32.set(u.u32);
      uc.u(6, A.off + b0 * A.bs).u(7, B.off + b0 * B.bs).u(8, target.off + b0 * target.bs);
      gpu.dispatch(k, bufs, uc.u32, [xy[0], xy[1], nb * perZ]);
    }
  };

  if (plan.kind === "tile") {
    const tile = plan.tile;
    const spec: GemmKernelSpec = {
      tile,
      a,
      b,
      transA: A.trans,
      transB: B.trans,
      vecA: A.trans ? vecWidth(a, tile.bm, A.ld, A.off, A.bs, M) : vecWidth(a, tile.bk, A.ld, A.off, A.bs, K, kChunk),
      vecB: B.trans ? vecWidth(b, tile.bk, B.ld, B.off, B.bs, K, kChunk) : vecWidth(b, tile.bn, B.ld, B.off, B.bs, N),
      out: target.dtype,
      outVec: target.dtype === "f32"
        ? ([target.ld, target.off, target.bs, N].every((v) => v % 4 === 0) ? 4 : 1)
        : ([target.ld, target.off, target.bs, N].every((v) => v % 4 === 0) ? 4 : 2),
      accumulate,
    };
    const key = JSON.stringify(spec);
    const k = kernelFor(key, () => gemmKernel(spec));
    if (Math.ceil(N / tile.bn) > MAX_GRID || Math.ceil(M / tile.bm) > MAX_GRID) {
      throw new Error(`matmul: ${M}×${N} output exceeds the dispatch grid for tile ${tileName(tile)}`);
    }
    dispatchChunks(k, [Math.ceil(N / tile.bn), Math.ceil(M / tile.bm)]);
  } else if (plan.kind === "gemvT") {
    const vec = vecWidth(b, 8, B.ld, B.off, B.bs, K);
    const xw = a === "f32" ? Math.min(vec, 4) : vec;
    const spec = {
      a,
      b,
      vec,
      // x is read as wide as W (an f32 x next to 8-wide f16 W loads: two vec4 loads, which need 4-alignment)
      vecX: vecWidth(a, xw, A.ld, A.off, A.bs, K) === xw,
      rows: M === 1 ? 1 : 4,
      rowsPerGroup: plan.rowsPerGroup,
      threads: plan.threads,
      out: target.dtype,
      accumulate,
    };
    const k = kernelFor(JSON.stringify(["gemvT", spec]), () => gemvTKernel(spec));
    dispatchChunks(k, rowGrid(Math.ceil(N / plan.rowsPerGroup)));
  } else {
    const vec = vecWidth(b, 8, B.ld, B.off, B.bs, N);
    const spec = { a, b, vec, rows: M === 1 ? 1 : 4, colThreads: plan.colThreads, kSlices: plan.kSlices };
    const k = kernelFor(JSON.stringify(["gemvN", spec]), () => gemvNKernel(spec));
    const x = Math.ceil(N / (plan.colThreads * vec));
    if (x > MAX_GRID) throw new Error(`matmul: N = ${N} exceeds the dispatch grid of the gemvN kernel`);
    // gemvN always writes partials; its z is the batch and its y the split.
    for (let b0 = 0; b0 < batch; b0 += MAX_GRID) {
      const nb = Math.min(MAX_GRID, batch - b0);
      const uc = new UniformWriter(GEMM_UNIFORM_WORDS);
      uc.u32.set(u.u32);
      uc.u(6, A.off + b0 * A.bs).u(7, B.off + b0 * B.bs).u(8, b0 * M * N);
      gpu.dispatch(k, bufs, uc.u32, [x, splits, nb]);
    }
  }
  if (!fuse) finish(target.buf, C, M, N, batch, splits, sstride, job.alpha, job.accumulate);
  return plan;
}

/** C = alpha·Σ partials (+ C) for any layout of C (see gemmFinishKernel for the f16 word rule). */
function finish(
  partials: GPUBuffer,
  C: Job["C"],
  M: number,
  N: number,
  batch: number,
  splits: number,
  sstride: number,
  alpha: number,
  accumulate: boolean,
): void {
  let R: number, L: number, RB: number, ldc: number, bsC: number;
  if (C.dtype === "f16" && C.ld === N) {
    // Rows are adjacent: treat each batch matrix (or the whole output) as one row so no word has two writers.
    if (C.bs === M * N || batch === 1) [R, L, RB, ldc, bsC] = [1, batch * M * N, 1, 0, 0];
    else [R, L, RB, ldc, bsC] = [batch, M * N, 1, 0, C.bs];
  } else {
    [R, L, RB, ldc, bsC] = [batch * M, N, M, C.ld, C.bs];
  }
  const wpr = (L >> 1) + 1;
  const u = new UniformWriter(FINISH_UNIFORM_WORDS)
    .u(0, R).u(1, L).u(2, RB).u(3, ldc).u(4, bsC).u(5, C.off).u(6, splits).u(7, sstride).f(8, alpha).u(9, wpr);
  const k = kernelFor(`finish|${C.dtype}|${accumulate}`, () => gemmFinishKernel(C.dtype, accumulate));
  const threads = C.dtype === "f32" ? R * L : R * wpr;
  getGpu().dispatch(k, [partials, C.buf], u.u32, gridFor(threads, 256));
}

/** Shapes of a product: batch shape, M, K, N; throws naming both shapes when they do not fit. */
function productShape(a: Tensor, b: Tensor, op: string): { batchShape: number[]; M: number; K: number; N: number } {
  if (a.ndim < 2 || b.ndim < 2) {
    throw new Error(`${op} needs at least 2-D operands, got ${fmtShape(a.shape)} and ${fmtShape(b.shape)}`);
  }
  const [M, K] = a.shape.slice(-2);
  const [K2, N] = b.shape.slice(-2);
  if (K !== K2) {
    throw new Error(
      `${op}: shapes ${fmtShape(a.shape)} and ${fmtShape(b.shape)} do not match: ` +
        `the last dimension of the first (${K}) must equal the second-to-last of the second (${K2})`,
    );
  }
  const batchA = a.shape.slice(0, -2), batchB = b.shape.slice(0, -2);
  const rank = Math.max(batchA.length, batchB.length);
  const batchShape: number[] = [];
  for (let i = 0; i < rank; i++) {
    const da = batchA[batchA.length - rank + i] ?? 1, db = batchB[batchB.length - rank + i] ?? 1;
    if (da !== db && da !== 1 && db !== 1) {
      throw new Error(`${op}: batch dimensions of ${fmtShape(a.shape)} and ${fmtShape(b.shape)} do not broadcast`);
    }
    batchShape.push(Math.max(da, db));
  }
  const sameA = numelOf(batchA) === 1 || (batchA.length === rank && batchA.every((d, i) => d === batchShape[i]));
  const sameB = numelOf(batchB) === 1 || (batchB.length === rank && batchB.every((d, i) => d === batchShape[i]));
  if (!sameA || !sameB) {
    throw new Error(
      `${op}: partial batch broadcasting (${fmtShape(a.shape)} · ${
        fmtShape(b.shape)
      }) is not supported; expand() first`,
    );
  }
  return { batchShape, M, K, N };
}

function checkFloat(a: Tensor, b: Tensor, op: string): void {
  for (const t of [a, b]) {
    if (t.dtype !== "f32" && t.dtype !== "f16") {
      throw new Error(
        `${op}: operands must be f32 or f16, got ${t.dtype} (${fmtShape(a.shape)} · ${
          fmtShape(b.shape)
        }); cast with .to("f32")`,
      );
    }
  }
}

/** Options of {@linkcode gemmInto}. */
export interface GemmOptions {
  /** Scale of the product (default 1). */
  alpha?: number;
  /** Add to the existing contents of `out` instead of overwriting them (default false). */
  accumulate?: boolean;
  /** Force a kernel instead of the chooser's pick (tests and benchmarks). */
  plan?: GemmPlan;
}

/**
 * `out = alpha·(a·b)` or, with `accumulate`, `out += alpha·(a·b)`, in one GEMM whose epilogue does the scaling,
 * the addition and the f16 rounding. Records no gradient. `out` must have the product's shape
 * (`[...batch, M, N]`), dtype f32 or f16, and a row-major last dimension; it may be a view. Returns the plan used.
 *
 * @example
 * ```ts
 * const y = matmul(x, w.transpose());                                   // x·Wᵀ
 * const xa = matmul(x, loraA.transpose());                              // x·Aᵀ, [M, r]
 * gemmInto(y, xa, loraB.transpose(), { alpha: 2, accumulate: true });   // y += 2·(x·Aᵀ)·Bᵀ
 * ```
 */
export function gemmInto(out: Tensor, a: Tensor, b: Tensor, opts: GemmOptions = {}): GemmPlan {
  for (const t of [out, a, b]) t.assertAlive("gemmInto");
  const { batchShape, M, K, N } = productShape(a, b, "gemmInto");
  const want = [...batchShape, M, N];
  const outOk = out.ndim === want.length && out.shape.every((d, i) => d === want[i]);
  if (!outOk) {
    throw new Error(
      `gemmInto: out has shape ${fmtShape(out.shape)}, but ${fmtShape(a.shape)} · ${fmtShape(b.shape)} is ${
        fmtShape(want)
      }`,
    );
  }
  if (out.dtype !== "f32" && out.dtype !== "f16") throw new Error(`gemmInto: out must be f32 or f16, got ${out.dtype}`);
  checkFloat(a, b, "gemmInto");
  const n = out.ndim, sr = out.strides[n - 2], sc = out.strides[n - 1], bsC = batchStride(out);
  if (!(sc === 1 || N === 1) || (M > 1 && sr < N) || bsC === null) {
    throw new Error(
      `gemmInto: out (shape ${fmtShape(out.shape)}, strides ${
        fmtShape(out.strides)
      }) must be row-major in its last two dimensions with a uniform batch stride`,
    );
  }
  const ld = M === 1 ? N : sr;
  return gemm(a, b, { buf: out.storage.buffer, dtype: out.dtype, ld, off: out.offset, bs: bsC }, {
    batch: numelOf(batchShape),
    M,
    K,
    N,
    alpha: opts.alpha ?? 1,
    accumulate: opts.accumulate ?? false,
    plan: opts.plan,
  });
}

/** Resolves operand layouts, folds the batch into rows when possible, and runs the product. */
function gemm(
  a: Tensor,
  b: Tensor,
  C: Job["C"],
  d: { batch: number; M: number; K: number; N: number; alpha: number; accumulate: boolean; plan?: GemmPlan },
): GemmPlan {
  const temps: Tensor[] = [];
  try {
    const A = operand(a, temps), B = operand(b, temps);
    let { M, batch } = d;
    if (batch === 1) {
      A.bs = B.bs = C.bs = 0;
    } else if (B.bs === 0 && !A.trans && A.bs === M * A.ld && C.bs === M * C.ld) {
      // A shared B and evenly spaced rows of A and C: one GEMM over batch·M rows.
      M *= batch;
      batch = 1;
      A.bs = B.bs = C.bs = 0;
    }
    if (d.plan?.kind !== "tile" && M <= 4 && A.trans) {
      // The GEMV kernels read rows of A contiguously.
      const t = contiguous(A.t);
      temps.push(t);
      Object.assign(A, { t, trans: false, ld: d.K, off: t.offset, bs: batch > 1 ? batchStride(t)! : 0 });
    }
    return runJob({ A, B, C, M, N: d.N, K: d.K, batch, alpha: d.alpha, accumulate: d.accumulate, plan: d.plan });
  } finally {
    for (const t of temps) t.dispose();
  }
}

/** Options of {@linkcode matmul}. */
export interface MatmulOptions {
  /** Output dtype; default f16 when both inputs are f16, else f32. Accumulation is always f32. */
  out?: DType;
}

/**
 * Matrix product `a · b` for a: [..., M, K], b: [..., K, N] or [K, N]; batch dims broadcast. Accumulates in f32;
 * an f16 output is rounded once, in the GEMM's epilogue.
 *
 * @example
 * ```ts
 * const scores = matmul(q, k.transpose()); // [B, H, T, D] · [B, H, D, T]
 * ```
 */
export function matmul(a: Tensor, b: Tensor, opts: MatmulOptions = {}): Tensor {
  a.assertAlive("matmul");
  b.assertAlive("matmul");
  const { batchShape, M, K, N } = productShape(a, b, "matmul");
  checkFloat(a, b, "matmul");
  const outDtype = opts.out ?? (a.dtype === "f16" && b.dtype === "f16" ? "f16" : "f32");
  if (outDtype !== "f32" && outDtype !== "f16") {
    throw new Error(`matmul: output dtype must be f32 or f16, got ${outDtype}`);
  }
  const y = Tensor.empty([...batchShape, M, N], outDtype);
  gemm(a, b, { buf: y.storage.buffer, dtype: outDtype, ld: N, off: 0, bs: M * N }, {
    batch: numelOf(batchShape),
    M,
    K,
    N,
    alpha: 1,
    accumulate: false,
  });
  const save = [a.requiresGrad ? b : null, b.requiresGrad ? a : null].filter((t): t is Tensor => t !== null);
  return record(y, "matmul", [a, b], save, (g, saved, needs) => {
    const sb = needs[0] ? saved[0] : null;
    const sa = needs[1] ? saved[saved.length - 1] : null;
    let ga: Tensor | null = null, gb: Tensor | null = null;
    if (sb) {
      // dA = G · Bᵀ, summed over broadcast batch dims of A
      ga = sumTo(matmul(g, transpose(sb), { out: a.dtype }), a.shape);
    }
    if (sa) {
      if (b.ndim === 2 && K > 1 && N > 1 && b.strides[0] === 1 && b.strides[1] === K) {
        // B is the transposed view of a row-major [N, K] weight (x·Wᵀ): dBᵀ = Gᵀ·A comes out in the weight's own
        // layout, so the transpose's backward hands W a row-major gradient (no copy when it is accumulated).
        gb = transpose(matmul(transpose(reshape(g, [-1, N])), reshape(sa, [-1, K]), { out: b.dtype }), 0, 1);
      } else if (b.ndim === 2) {
        // dB = Σ_batch Aᵀ·G = (A flattened to [rows, K])ᵀ · (G flattened to [rows, N])
        gb = matmul(transpose(reshape(sa, [-1, K])), reshape(g, [-1, N]), { out: b.dtype });
      } else {
        gb = sumTo(matmul(transpose(sa), g, { out: b.dtype }), b.shape);
      }
    }
    return [ga, gb];
  });
}
