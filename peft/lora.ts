/**
 * The LoRA layer (Hu et al. 2021): a frozen base linear layer W (dense `Linear`, or NF4 `Linear4bit` for QLoRA)
 * plus a trainable low-rank update, y = W x + s · B A dropout(x), with A ∈ R^{r×in}, B ∈ R^{out×r} and
 * s = alpha / r (alpha / √r with rsLoRA). Submodule names follow PEFT (`base_layer`, `lora_A`, `lora_B`), so the
 * parameter names are PEFT's adapter keys without the `.default` adapter-name infix.
 *
 * The update s · (x Aᵀ) Bᵀ is added into the base output's buffer by the second rank-r GEMM's epilogue (no extra
 * pass over the activations, and the base output's dtype is kept), both rank-r products run on the thin-matrix GEMM
 * path, and dropout's mask is recomputed in backward rather than stored.
 *
 * @example
 * ```ts
 * import { LoraLinear } from "./lora.ts";
 * const layer = new LoraLinear(new Linear(4096, 4096, { bias: false, dtype: "f16" }), loraConfig({ r: 16, targetModules: ["q_proj"] }));
 * const y = layer.forward(x);
 * ```
 * @module
 */
import { record } from "../core/autograd.ts";
import { zeros } from "../core/creation.ts";
import { elementwise } from "../core/ops/dispatch.ts";
import { gemmInto, matmul } from "../core/ops/matmul.ts";
import { dropout } from "../core/ops/nn.ts";
import { reshape, transpose } from "../core/ops/shape.ts";
import { Tensor } from "../core/tensor.ts";
import { Linear } from "../nn/layers.ts";
import { Module } from "../nn/module.ts";
import type { LoraConfig } from "./config.ts";

/** What LoRA can wrap: a linear layer with known widths (dense `Linear` or quantized `Linear4bit`). */
export interface LinearLike extends Module {
  /** Input width. */
  readonly inFeatures: number;
  /** Output width. */
  readonly outFeatures: number;
  /** y = x Wᵀ (+ b). */
  forward(x: Tensor): Tensor;
  /** The weight as a dense tensor [out, in] (dequantized for a quantized layer). */
  denseWeight?(): Tensor;
}

/**
 * y = base + s · t · Bᵀ, written by one GEMM whose epilogue adds into the base output's own buffer (no extra pass
 * over the [tokens, out] activations, no temporary of that size). This is safe because no base layer's backward
 * reads its own output. Gradients: g for the base output, s · g · B for t, s · gᵀ · t for B.
 */
function addLowRank(base: Tensor, t: Tensor, b: Tensor, s: number): Tensor {
  const rows = base.numel / base.shape[base.ndim - 1];
  using out2d = reshape(base, [rows, base.shape[base.ndim - 1]]);
  using t2d = reshape(t, [rows, t.shape[t.ndim - 1]]);
  using bt = transpose(b, 0, 1);
  gemmInto(out2d, t2d, bt, { alpha: s, accumulate: true });
  const y = base.viewOf(base.shape, base.strides, base.offset);
  return record(y, "lora_add", [base, t, b], [t, b], (g, [st, sb], needs) => {
    const r = sb.shape[1];
    using g2d = reshape(g, [rows, g.shape[g.ndim - 1]]);
    let dt: Tensor | null = null, db: Tensor | null = null;
    if (needs[1]) {
      const d = Tensor.empty([rows, r], "f32");
      gemmInto(d, g2d, sb, { alpha: s });
      dt = reshape(d, [...st.shape]);
      d.dispose();
    }
    if (needs[2]) {
      db = Tensor.empty([sb.shape[0], r], "f32");
      using st2d = reshape(st, [rows, r]);
      using gT = transpose(g2d, 0, 1);
      gemmInto(db, gT, st2d, { alpha: s });
    }
    return [needs[0] ? g.detach() : null, dt, db];
  });
}

/** A linear layer with a LoRA adapter. */
export class LoraLinear extends Module {
  /** The frozen layer being adapted. */
  base_layer: LinearLike;
  /** Down-projection A: weight [r, in], f32, trainable. */
  lora_A: Linear;
  /** Up-projection B: weight [out, r], f32, trainable. */
  lora_B: Linear;
  /** The adapter's settings. */
  readonly config: LoraConfig;
  /** Whether the update is currently added into the base weight. */
  merged = false;
  /** When true, forward returns the base output only (see `disableAdapters`). */
  disabled = false;

  /** Wraps `base` (frozen); A gets PEFT's Kaiming-uniform init, B zeros (or random with `initLoraWeights: false`). */
  constructor(base: LinearLike, config: LoraConfig) {
    super();
    this.base_layer = base;
    this.config = config;
    const { r } = config;
    base.requiresGrad_(false);
    this.lora_A = new Linear(base.inFeatures, r, { bias: false });
    this.lora_B = new Linear(r, base.outFeatures, { bias: false });
    if (config.initLoraWeights) {
      // PEFT: kaiming_uniform_(A, a=√5) → U(−1/√in, 1/√in) (nn.Linear's default, already drawn); B = 0.
      this.lora_B.weight.dispose();
      this.lora_B.weight = zeros([base.outFeatures, r]).keep();
    }
    this.lora_A.weight.requiresGrad_(true);
    this.lora_B.weight.requiresGrad_(true);
  }

  /** Input width. */
  get inFeatures(): number {
    return this.base_layer.inFeatures;
  }

  /** Output width. */
  get outFeatures(): number {
    return this.base_layer.outFeatures;
  }

  /** y = base(x) + s · B A dropout(x). */
  forward(x: Tensor): Tensor {
    const base = this.base_layer.forward(x);
    if (this.disabled || this.merged) return base;
    using xd = dropout(x, this.config.dropout, { training: this.training });
    using at = transpose(this.lora_A.weight, 0, 1);
    using t = matmul(xd, at, { out: "f32" });
    const y = addLowRank(base, t, this.lora_B.weight, this.config.scaling);
    base.dispose();
    return y;
  }

  /** s · B A as a dense [out, in] f32 tensor. */
  deltaWeight(): Tensor {
    using ba = matmul(this.lora_B.weight, this.lora_A.weight, { out: "f32" });
    return elementwise("scale", "a * p.c0", [ba], { out: "f32", c0: this.config.scaling });
  }
}

/**
 * Replaces a random initial A/B by given values (tests) — or use `loadAdapter` for files.
 *
 * @example
 * ```ts
 * setLoraWeights(layer, a, b);
 * ```
 */
export function setLoraWeights(layer: LoraLinear, a: Tensor, b: Tensor): void {
  layer.loadStateDict(new Map([["lora_A.weight", a], ["lora_B.weight", b]]), { strict: false });
}
