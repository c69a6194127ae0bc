/**
 * Fused neural-network ops with their backward rules: `rmsNorm` (LLaMA's RMSNorm), `embedding` (a row gather
 * with a deterministic scatter-add gradient), `dropout` (inverted, with a mask recomputed from the counter-based
 * generator instead of stored) and `crossEntropy` (fused with log-softmax, ignore index, mean/sum/none). Each op is
 * one or two kernels forward and backward, and none reads anything back to the CPU.
 *
 * @example
 * ```ts
 * import { crossEntropy, dropout, embedding, rmsNorm } from "./nn.ts";
 * const h = embedding(ids, table);                          // [B, T] ids → [B, T, D]
 * const n = rmsNorm(dropout(h, 0.1, { training: true }), w, 1e-6);
 * const loss = crossEntropy(logits, labels, { ignoreIndex: -100 }); // logits [N, V], labels [N]
 * loss.backward();
 * ```
 * @module
 */
import { noGrad, record } from "../autograd.ts";
import { isFloat } from "../dtype.ts";
import { getGpu, type Kernel, type KernelSource } from "../gpu.ts";
import { gridFor, rowGrid, UniformWriter } from "../kernels/common.ts";
import {
  EMBEDDING_BACKWARD_UNIFORM_WORDS,
  EMBEDDING_COLUMNS,
  EMBEDDING_LINKS_UNIFORM_WORDS,
  EMBEDDING_UNIFORM_WORDS,
  embeddingBackwardKernel,
  embeddingKernel,
  embeddingLinksKernel,
  type EmbeddingUnit,
  UNIT_ELEMENTS,
} from "../kernels/embedding.ts";
import {
  CROSS_ENTROPY_BACKWARD_UNIFORM_WORDS,
  CROSS_ENTROPY_UNIFORM_WORDS,
  crossEntropyBackwardKernel,
  crossEntropyKernel,
  LOSS_REDUCE_UNIFORM_WORDS,
  lossReduceKernel,
  type Reduction,
} from "../kernels/loss.ts";
import {
  CPU_NORM_THREADS,
  NORM_WORKGROUP,
  RMSNORM_BACKWARD_UNIFORM_WORDS,
  RMSNORM_DW_UNIFORM_WORDS,
  RMSNORM_UNIFORM_WORDS,
  rmsNormBackwardKernel,
  rmsNormKernel,
  rmsNormWeightGradKernel,
} from "../kernels/norm.ts";
import { nextDraw, RNG_WGSL } from "../random.ts";
import { fmtShape, Tensor } from "../tensor.ts";
import { elementwise } from "./dispatch.ts";
import { cast } from "./elementwise.ts";
import { sum } from "./reduce.ts";
import { contiguous } from "./shape.ts";

export type { Reduction } from "../kernels/loss.ts";

const kernels = new Map<string, Kernel>();
function kernel(key: string, make: () => KernelSource): Kernel {
  let k = kernels.get(key);
  if (!k) kernels.set(key, k = getGpu().kernel(make()));
  return k;
}

/** A row-major handle on `t` (a view when it already is), recorded in no graph. */
function rowMajor(t: Tensor): Tensor {
  return noGrad(() => contiguous(t));
}

/** Whether rows of `n` elements starting at element `offset` can be read as vec4<f32> / eight packed halves. */
function vectorRows(t: Tensor, n: number): boolean {
  const per = t.dtype === "f32" ? 4 : t.dtype === "f16" ? 8 : 0;
  return per > 0 && n % per === 0 && t.offset % per === 0;
}

function requireFloat(t: Tensor, op: string, what: string): void {
  if (!isFloat(t.dtype)) throw new Error(`${op}: ${what} must be f32 or f16, got ${t.dtype}`);
}

// ---- rmsNorm ------------------------------------------------------------------------------------------------------

/**
 * LLaMA's RMSNorm over the last axis, in one kernel: `y = w · (x · rsqrt(mean(x²) + eps))`, computed in f32.
 * With f16 `x` the normalised value is rounded to f16 before the weight multiplies it, exactly like Hugging Face's
 * `LlamaRMSNorm` (`weight * (x.float() * rsqrt(var + eps)).to(input_dtype)`); the output has x's dtype. The
 * backward pass computes dx only when `x` requires a gradient and dw only when `weight` does.
 *
 * @example
 * ```ts
 * const h = randn([2, 7, 64]);
 * const w = ones([64], { requiresGrad: true });
 * const y = rmsNorm(h, w, 1e-6); // [2, 7, 64]
 * ```
 */
export function rmsNorm(x: Tensor, weight: Tensor, eps: number, opts: RmsNormOptions = {}): Tensor {
  x.assertAlive("rmsNorm");
  weight.assertAlive("rmsNorm");
  requireFloat(x, "rmsNorm", "x");
  requireFloat(weight, "rmsNorm", "weight");
  const n = x.shape[x.ndim - 1];
  if (x.ndim === 0 || weight.ndim !== 1 || weight.shape[0] !== n) {
    throw new Error(
      `rmsNorm: weight of shape ${fmtShape(weight.shape)} does not match the last axis of x ${
        fmtShape(x.shape)
      }; it must be [${x.ndim ? n : "last axis"}]`,
    );
  }
  if (!(eps >= 0) || !Number.isFinite(eps)) throw new Error(`rmsNorm: eps must be a finite number ≥ 0, got ${eps}`);
  const xc = rowMajor(x);
  const wc = rowMajor(weight);
  const rows = n === 0 ? 0 : x.numel / n;
  const y = Tensor.empty(x.shape, x.dtype);
  const rstd = Tensor.empty([rows], "f32");
  if (rows > 0 && n > 0) {
    const vec = vectorRows(xc, n);
    const oddRows = x.dtype === "f16" && n % 2 === 1;
    const threads = normThreads(opts);
    const k = kernel(
      `rms|${x.dtype}|${weight.dtype}|${vec}|${oddRows}|${threads}`,
      () => rmsNormKernel({ x: x.dtype, w: weight.dtype, vec, oddRows, threads }),
    );
    const u = new UniformWriter(RMSNORM_UNIFORM_WORDS).u(0, rows).u(1, n).u(2, xc.offset).u(3, wc.offset).f(4, eps);
    getGpu().dispatch(k, [xc.buffer, wc.buffer, y.buffer, rstd.buffer], u.u32, rowGrid(rows));
  }
  record(y, "rmsNorm", [x, weight], [xc, wc, rstd], (g, [sx, sw, sr], needs) => {
    using gc = contiguous(g);
    return [needs[0] ? rmsNormDx(sx, sw, gc, sr, opts) : null, needs[1] ? rmsNormDw(sx, gc, sr, sw) : null];
  });
  xc.dispose();
  wc.dispose();
  rstd.dispose();
  return y;
}

/**
 * Options of {@linkcode rmsNorm}.
 *
 * @example
 * ```ts
 * rmsNorm(h, w, 1e-6, { threads: 32 });
 * ```
 */
export interface RmsNormOptions {
  /** Advanced: threads per row (a power of two; default 256, or 8 on a CPU adapter, where wide groups run slowly). */
  threads?: number;
}

/** Threads per row of the RMSNorm kernels: fewer on a CPU adapter, where wide workgroups run in chunks. */
function normThreads(opts: RmsNormOptions): number {
  return opts.threads ?? (getGpu().info.isFallback ? CPU_NORM_THREADS : NORM_WORKGROUP);
}

/** dx of RMSNorm from row-major x, w, g and the saved per-row rsqrt. */
function rmsNormDx(x: Tensor, w: Tensor, g: Tensor, rstd: Tensor, opts: RmsNormOptions): Tensor {
  const n = x.shape[x.ndim - 1];
  const rows = rstd.numel;
  const dx = Tensor.empty(x.shape, x.dtype);
  if (rows === 0 || n === 0) return dx;
  const oddRows = x.dtype === "f16" && n % 2 === 1;
  const threads = normThreads(opts);
  const k = kernel(
    `rms_dx|${x.dtype}|${w.dtype}|${g.dtype}|${oddRows}|${threads}`,
    () => rmsNormBackwardKernel({ x: x.dtype, w: w.dtype, g: g.dtype, oddRows, threads }),
  );
  const u = new UniformWriter(RMSNORM_BACKWARD_UNIFORM_WORDS)
    .u(0, rows).u(1, n).u(2, x.offset).u(3, w.offset).u(4, g.offset);
  getGpu().dispatch(k, [x.buffer, w.buffer, g.buffer, rstd.buffer, dx.buffer], u.u32, rowGrid(rows));
  return dx;
}

/**
 * dw of RMSNorm: Σ over rows of g · x · r, as per-block partial sums (blocks of at least 4 rows, enough blocks
 * for ~256 K threads) followed by a column sum over the blocks; no atomics, so the result is deterministic.
 */
function rmsNormDw(x: Tensor, g: Tensor, rstd: Tensor, w: Tensor): Tensor {
  const n = x.shape[x.ndim - 1];
  const rows = rstd.numel;
  const rowsPerBlock = Math.max(4, Math.ceil((rows * n) / 2 ** 18));
  const blocks = Math.ceil(rows / rowsPerBlock);
  using partial = Tensor.empty([blocks, n], "f32");
  if (blocks * n > 0) {
    const k = kernel(`rms_dw|${x.dtype}|${g.dtype}`, () => rmsNormWeightGradKernel({ x: x.dtype, g: g.dtype }));
    const u = new UniformWriter(RMSNORM_DW_UNIFORM_WORDS)
      .u(0, rows).u(1, n).u(2, x.offset).u(3, g.offset).u(4, rowsPerBlock).u(5, blocks);
    getGpu().dispatch(k, [x.buffer, g.buffer, rstd.buffer, partial.buffer], u.u32, gridFor(blocks * n, 256));
  }
  const dw = sum(partial, 0);
  if (w.dtype !== "f16") return dw;
  using d32 = dw;
  return cast(d32, "f16");
}

// ---- embedding ----------------------------------------------------------------------------------------------------

/** The widest unit an embedding row of width `d` at table offset `offset` can be copied in. */
function embeddingUnit(dtype: Tensor["dtype"], d: number, offset: number): EmbeddingUnit {
  if (dtype === "f32") return d % 4 === 0 && offset % 4 === 0 ? "vec4<f32>" : "f32";
  if (d % 8 === 0 && offset % 8 === 0) return "vec4<u32>";
  return d % 2 === 0 && offset % 2 === 0 ? "u32" : "f16pair";
}

/**
 * Looks up rows of `table` ([V, D], f32 or f16) by integer `ids` (i32 or u32, any shape) → `[...ids.shape, D]` in
 * the table's dtype. Ids outside `[0, V)` are clamped to the nearest row inside the kernel (a kernel cannot throw;
 * validate ids on the CPU where you have them, as the `Embedding` layer does). When `table` requires a gradient,
 * the backward pass sums the gradient rows of repeated ids in f32, deterministically (no atomics, a fixed order),
 * into a `[V, D]` gradient in the table's dtype.
 *
 * @example
 * ```ts
 * const table = randn([32000, 64], { requiresGrad: true });
 * const ids = tensor([[1, 15043, 3186]], undefined, { dtype: "i32" });
 * const h = embedding(ids, table); // [1, 3, 64]
 * ```
 */
export function embedding(ids: Tensor, table: Tensor): Tensor {
  ids.assertAlive("embedding");
  table.assertAlive("embedding");
  if (ids.dtype !== "i32" && ids.dtype !== "u32") {
    throw new Error(`embedding: ids must be i32 or u32, got ${ids.dtype} (convert with .to("i32"))`);
  }
  requireFloat(table, "embedding", "the table");
  if (table.ndim !== 2 || table.shape[0] === 0) {
    throw new Error(`embedding: the table must be [V, D] with V ≥ 1, got ${fmtShape(table.shape)}`);
  }
  const [V, D] = table.shape;
  const ic = rowMajor(ids);
  const tc = rowMajor(table);
  const N = ic.numel;
  const out = Tensor.empty([...ids.shape, D], table.dtype);
  if (N * D > 0) {
    const unit = embeddingUnit(tc.dtype, D, tc.offset);
    const per = UNIT_ELEMENTS[unit];
    const units = (N * D) / per;
    const k = kernel(
      `emb|${tc.dtype}|${ic.dtype}|${unit}`,
      () => embeddingKernel({ table: tc.dtype, ids: ic.dtype, unit }),
    );
    const u = new UniformWriter(EMBEDDING_UNIFORM_WORDS)
      .u(0, units).u(1, D / per).u(2, V).u(3, tc.offset / per).u(4, ic.offset);
    const threads = unit === "f16pair" ? Math.ceil(units / 2) : units;
    getGpu().dispatch(k, [ic.buffer, tc.buffer, out.buffer], u.u32, gridFor(threads, 256));
  }
  record(out, "embedding", [table], [ic], (g, [sid]) => {
    using gc = contiguous(g);
    const dw = embeddingBackward(sid, gc, V, D);
    if (table.dtype !== "f16") return [dw];
    using d32 = dw;
    return [cast(d32, "f16")];
  });
  ic.dispose();
  tc.dispose();
  return out;
}

/** The [V, D] f32 table gradient: zeros, then one write per distinct id of its summed gradient rows. */
function embeddingBackward(ids: Tensor, g: Tensor, V: number, D: number): Tensor {
  const dw = elementwise("fill", "0.0", [], { out: "f32", shape: [V, D] });
  const N = ids.numel;
  if (N * D === 0) return dw;
  const gpu = getGpu();
  using links = Tensor.empty([2 * N], "u32");
  const kl = kernel(`emb_links|${ids.dtype}`, () => embeddingLinksKernel({ ids: ids.dtype }));
  const ul = new UniformWriter(EMBEDDING_LINKS_UNIFORM_WORDS).u(0, N).u(1, V).u(2, ids.offset);
  gpu.dispatch(kl, [ids.buffer, links.buffer], ul.u32, gridFor(N, 256));
  const blocks = Math.ceil(D / EMBEDDING_COLUMNS);
  const kb = kernel(
    `emb_bwd|${ids.dtype}|${g.dtype}`,
    () => embeddingBackwardKernel({ ids: ids.dtype, grad: g.dtype }),
  );
  const ub = new UniformWriter(EMBEDDING_BACKWARD_UNIFORM_WORDS)
    .u(0, N).u(1, D).u(2, V).u(3, blocks).u(4, ids.offset).u(5, g.offset);
  gpu.dispatch(kb, [ids.buffer, links.buffer, g.buffer, dw.buffer], ub.u32, rowGrid(N * blocks));
  return dw;
}

// ---- dropout ------------------------------------------------------------------------------------------------------

/** Options of {@linkcode dropout}. */
export interface DropoutOptions {
  /** Drop only in training; `false` returns `x` unchanged (a view). */
  training: boolean;
  /** Key of the mask; by default the global generator (`manualSeed`) supplies a fresh one per call. */
  seed?: number;
}

/**
 * Inverted dropout: each element is kept with probability 1 − p and then scaled by 1 / (1 − p), else zeroed.
 * Element `i` is kept when `rngUniform(seed, offset + i) ≥ p` (`core/random.ts`; `randomUniformCpu` is its exact
 * CPU twin; i is the row-major index, and with an explicit `seed` the offset is 0). The backward pass recomputes
 * the same mask from the same key, so nothing is stored. `p = 0` or `training: false` returns a view of `x` and
 * runs no kernel; `p = 1` zeroes everything (like PyTorch).
 *
 * @example
 * ```ts
 * const h = dropout(x, 0.1, { training: true });          // fresh mask each call
 * const r = dropout(x, 0.1, { training: true, seed: 7 }); // reproducible mask
 * ```
 */
export function dropout(x: Tensor, p: number, opts: DropoutOptions): Tensor {
  x.assertAlive("dropout");
  requireFloat(x, "dropout", "x");
  if (!(p >= 0 && p <= 1)) throw new Error(`dropout: p must be in [0, 1], got ${p}`);
  if (!opts.training || p === 0) {
    const v = x.viewOf(x.shape, x.strides, x.offset);
    return record(v, "dropout", [x], [], (g) => [g.detach()]);
  }
  const key = opts.seed === undefined ? nextDraw() : { seed: opts.seed >>> 0, offset: 0 };
  // u is a multiple of 2⁻²⁴, so u ≥ p ⟺ u ≥ ⌈p·2²⁴⌉·2⁻²⁴, a threshold f32 holds exactly (unlike p itself).
  const threshold = Math.ceil(p * 2 ** 24) / 2 ** 24;
  const scale = p === 1 ? 0 : 1 / (1 - p);
  const apply = (t: Tensor) =>
    elementwise(
      "dropout",
      "select(0.0, a * p.c2, rngUniform(bitcast<u32>(p.c0), bitcast<u32>(p.c1) + idx) >= p.c3)",
      [t],
      { out: t.dtype, c0: key.seed, c1: key.offset, c2: scale, c3: threshold, intConsts: [0, 1], helpers: RNG_WGSL },
    );
  return record(apply(x), "dropout", [x], [], (g) => [apply(g)]);
}

// ---- crossEntropy -------------------------------------------------------------------------------------------------

/** Options of {@linkcode crossEntropy}. */
export interface CrossEntropyOptions {
  /** Targets equal to this contribute no loss and no gradient (default -100, like PyTorch). */
  ignoreIndex?: number;
  /** "mean" over non-ignored targets (default), "sum", or "none" (per-row losses, 0 for ignored rows). */
  reduction?: Reduction;
}

/**
 * Cross-entropy between `logits` ([N, V], f32 or f16) and integer class `targets` ([N], i32 or u32), fused with
 * log-softmax: per row `logsumexp(logits) − logits[target]`, computed in f32; the result is f32. "mean" divides by
 * the number of non-ignored targets, counted on the GPU (no read-back); with every target ignored it is NaN, as in
 * PyTorch. A target outside [0, V) that is not `ignoreIndex` gives a NaN loss for its row (PyTorch raises; a
 * kernel cannot). The backward pass recomputes the softmax from the logits and the saved per-row logsumexp, so the
 * N×V probabilities are never stored; ignored rows get a zero gradient.
 *
 * @example
 * ```ts
 * const logits = randn([4, 32000], { requiresGrad: true });
 * const labels = tensor([17, -100, 2, 9], undefined, { dtype: "i32" });
 * const loss = crossEntropy(logits, labels); // mean over the 3 kept rows
 * loss.backward();
 * ```
 */
export function crossEntropy(logits: Tensor, targets: Tensor, opts: CrossEntropyOptions = {}): Tensor {
  logits.assertAlive("crossEntropy");
  targets.assertAlive("crossEntropy");
  const reduction = opts.reduction ?? "mean";
  const ignoreIndex = opts.ignoreIndex ?? -100;
  requireFloat(logits, "crossEntropy", "logits");
  if (targets.dtype !== "i32" && targets.dtype !== "u32") {
    throw new Error(`crossEntropy: targets must be i32 or u32 class indices, got ${targets.dtype}`);
  }
  if (logits.ndim !== 2 || targets.ndim !== 1 || targets.shape[0] !== logits.shape[0] || logits.shape[1] === 0) {
    throw new Error(
      `crossEntropy: expected logits [N, V] (V ≥ 1) and targets [N], got logits ${fmtShape(logits.shape)} and ` +
        `targets ${fmtShape(targets.shape)} (flatten batch and time first: logits.reshape(-1, V), targets.reshape(-1))`,
    );
  }
  if (!["mean", "sum", "none"].includes(reduction)) {
    throw new Error(`crossEntropy: reduction must be "mean", "sum" or "none", got ${JSON.stringify(reduction)}`);
  }
  if (!Number.isInteger(ignoreIndex) || ignoreIndex < -(2 ** 31) || ignoreIndex >= 2 ** 31) {
    throw new Error(`crossEntropy: ignoreIndex must be a 32-bit integer, got ${ignoreIndex}`);
  }
  const [N, V] = logits.shape;
  const lc = rowMajor(logits);
  const tc = rowMajor(targets);
  const gpu = getGpu();
  const rowLoss = Tensor.empty([N], "f32");
  const lse = Tensor.empty([N], "f32");
  if (N > 0) {
    const vec = vectorRows(lc, V);
    const k = kernel(
      `ce|${lc.dtype}|${tc.dtype}|${vec}`,
      () => crossEntropyKernel({ logits: lc.dtype, targets: tc.dtype, vec }),
    );
    const u = new UniformWriter(CROSS_ENTROPY_UNIFORM_WORDS)
      .u(0, N).u(1, V).u(2, lc.offset).u(3, tc.offset).i(4, ignoreIndex);
    gpu.dispatch(k, [lc.buffer, tc.buffer, rowLoss.buffer, lse.buffer], u.u32, rowGrid(N));
  }
  let out = rowLoss;
  let count: Tensor | null = null;
  if (reduction !== "none") {
    out = Tensor.empty([], "f32");
    count = Tensor.empty([1], "f32");
    const k = kernel(`ce_reduce|${tc.dtype}`, () => lossReduceKernel({ targets: tc.dtype }));
    const u = new UniformWriter(LOSS_REDUCE_UNIFORM_WORDS)
      .u(0, N).u(1, tc.offset).i(2, ignoreIndex).u(3, reduction === "mean" ? 1 : 0);
    gpu.dispatch(k, [rowLoss.buffer, tc.buffer, out.buffer, count.buffer], u.u32, [1]);
    rowLoss.dispose();
  }
  // Only "mean" needs the count in backward ("sum" scales by g alone).
  if (count && reduction !== "mean") {
    count.dispose();
    count = null;
  }
  const saved = count ? [lc, tc, lse, count] : [lc, tc, lse];
  record(out, "crossEntropy", [logits], saved, (g, [sl, st, slse, scount]) => {
    using gc = contiguous(g);
    return [crossEntropyBackward(sl, st, slse, gc, scount ?? null, reduction, ignoreIndex)];
  });
  for (const t of saved) t.dispose();
  return out;
}

function crossEntropyBackward(
  logits: Tensor,
  targets: Tensor,
  lse: Tensor,
  g: Tensor,
  count: Tensor | null,
  reduction: Reduction,
  ignoreIndex: number,
): Tensor {
  const [N, V] = logits.shape;
  const dx = Tensor.empty(logits.shape, logits.dtype);
  const numel = N * V;
  if (numel === 0) return dx;
  const vec = logits.dtype === "f32" && vectorRows(logits, V);
  const k = kernel(
    `ce_bwd|${logits.dtype}|${targets.dtype}|${g.dtype}|${reduction}|${vec}`,
    () =>
      crossEntropyBackwardKernel({
        logits: logits.dtype,
        targets: targets.dtype,
        grad: g.dtype,
        out: logits.dtype,
        reduction,
        vec,
      }),
  );
  const u = new UniformWriter(CROSS_ENTROPY_BACKWARD_UNIFORM_WORDS)
    .u(0, numel).u(1, V).u(2, logits.offset).u(3, targets.offset).i(4, ignoreIndex).u(5, g.offset);
  const buffers = [logits.buffer, targets.buffer, lse.buffer, g.buffer];
  if (count) buffers.push(count.buffer);
  buffers.push(dx.buffer);
  const threads = vec ? numel / 4 : logits.dtype === "f16" ? Math.ceil(numel / 2) : numel;
  getGpu().dispatch(k, buffers, u.u32, gridFor(threads, 256));
  return dx;
}
