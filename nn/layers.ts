/**
 * The basic layers: `Linear`, `Embedding`, `RMSNorm`, `Dropout`. Weights are created like PyTorch's defaults
 * (Linear: U(−1/√in, 1/√in), Embedding: N(0, 1), RMSNorm: ones) and are kept beyond scopes.
 *
 * @example
 * ```ts
 * import { Linear, RMSNorm } from "./layers.ts";
 * const proj = new Linear(4096, 4096, { bias: false, dtype: "f16" });
 * const norm = new RMSNorm(4096, 1e-5);
 * const y = proj.forward(norm.forward(x));
 * ```
 * @module
 */
import type { DType } from "../core/dtype.ts";
import { ones, rand, randn } from "../core/creation.ts";
import type { Tensor } from "../core/tensor.ts";
import { add } from "../core/ops/elementwise.ts";
import { matmul } from "../core/ops/matmul.ts";
import { transpose } from "../core/ops/shape.ts";
import { dropout, embedding, rmsNorm } from "../core/ops/nn.ts";
import { Module } from "./module.ts";
import { param } from "./init.ts";

export { isPlaceholder, withDeferredInit } from "./init.ts";

/** Options shared by layer constructors. */
export interface LayerOptions {
  /** Weight dtype (default f32). */
  dtype?: DType;
  /** Seed for the initial weights (default: the global generator). */
  seed?: number;
}

/** `y = x · Wᵀ + b`, W: [out, in]. */
export class Linear extends Module {
  /** Weight [outFeatures, inFeatures]. */
  weight: Tensor;
  /** Bias [outFeatures], or null. */
  bias: Tensor | null;
  /** Input width. */
  readonly inFeatures: number;
  /** Output width. */
  readonly outFeatures: number;

  /** A new layer with PyTorch's default initialisation. */
  constructor(inFeatures: number, outFeatures: number, opts: LayerOptions & { bias?: boolean } = {}) {
    super();
    this.inFeatures = inFeatures;
    this.outFeatures = outFeatures;
    const bound = 1 / Math.sqrt(inFeatures);
    const dtype = opts.dtype ?? "f32";
    this.weight = param(
      [outFeatures, inFeatures],
      dtype,
      () => rand([outFeatures, inFeatures], { low: -bound, high: bound, dtype, seed: opts.seed }),
    );
    const biasSeed = opts.seed === undefined ? undefined : opts.seed + 1;
    this.bias = opts.bias ?? true
      ? param([outFeatures], dtype, () => rand([outFeatures], { low: -bound, high: bound, dtype, seed: biasSeed }))
      : null;
  }

  /** Applies the layer to `x` [..., inFeatures]. */
  forward(x: Tensor): Tensor {
    if (x.shape[x.ndim - 1] !== this.inFeatures) {
      throw new Error(`Linear(${this.inFeatures} → ${this.outFeatures}) got input of shape [${x.shape.join(", ")}]`);
    }
    using wt = transpose(this.weight, 0, 1);
    const y = matmul(x, wt, { out: x.dtype === "f16" && this.weight.dtype === "f16" ? "f16" : "f32" });
    if (!this.bias) return y;
    const z = add(y, this.bias);
    y.dispose();
    return z;
  }
}

/** A lookup table: ids → rows of `weight` [numEmbeddings, dim]. */
export class Embedding extends Module {
  /** The table. */
  weight: Tensor;

  /** A new table drawn from N(0, 1). */
  constructor(numEmbeddings: number, dim: number, opts: LayerOptions = {}) {
    super();
    const dtype = opts.dtype ?? "f32";
    this.weight = param([numEmbeddings, dim], dtype, () => randn([numEmbeddings, dim], { dtype, seed: opts.seed }));
  }

  /** Rows for `ids` (i32, any shape) → [...ids.shape, dim]. */
  forward(ids: Tensor): Tensor {
    return embedding(ids, this.weight);
  }
}

/** Root-mean-square normalisation over the last axis, as in LLaMA. */
export class RMSNorm extends Module {
  /** Per-channel gain. */
  weight: Tensor;
  /** Added to the mean square. */
  readonly eps: number;

  /** Gain initialised to ones. */
  constructor(dim: number, eps = 1e-6, opts: LayerOptions = {}) {
    super();
    this.eps = eps;
    const dtype = opts.dtype ?? "f32";
    this.weight = param([dim], dtype, () => ones([dim], { dtype }));
  }

  /** Normalises `x`. */
  forward(x: Tensor): Tensor {
    return rmsNorm(x, this.weight, this.eps);
  }
}

/** Inverted dropout: zeroes a fraction `p` in training mode and scales the rest by 1/(1−p). */
export class Dropout extends Module {
  /** Drop probability. */
  readonly p: number;

  /** `p` must be in [0, 1). */
  constructor(p: number) {
    super();
    if (!(p >= 0 && p < 1)) throw new Error(`Dropout probability must be in [0, 1), got ${p}`);
    this.p = p;
  }

  /** Applies dropout in training mode; returns a view of `x` in evaluation mode. */
  forward(x: Tensor): Tensor {
    return dropout(x, this.p, { training: this.training });
  }
}
