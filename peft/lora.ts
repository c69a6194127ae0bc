/**
 * The LoRA layer (Hu et al. 2021): a frozen base linear layer W (dense `Linear`, or NF4 `Linear4bit` for QLoRA)
 * plus a trainable low-rank update, y = W x + s · B A dropout(x), with A ∈ R^{r×in}, B ∈ R^{out×r} and
 * s = alpha / r (alpha / √r with rsLoRA). Submodule names follow PEFT (`base_layer`, `lora_A`, `lora_B`), so the
 * parameter names are PEFT's adapter keys without the `.default` adapter-name infix.
 *
 * The scale and the residual add are one fused kernel that keeps the base output's dtype, the rank-r products run
 * on the thin-matrix GEMM path, and dropout's mask is recomputed in backward rather than stored.
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
import { matmul } from "../core/ops/matmul.ts";
import { dropout } from "../core/ops/nn.ts";
import { transpose } from "../core/ops/shape.ts";
import type { Tensor } from "../core/tensor.ts";
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

/** `base + s · update`, in the base's dtype, one kernel; gradients: g for the base, s·g for the update. */
function addScaled(base: Tensor, update: Tensor, s: number): Tensor {
  const y = elementwise("lora_add", "a + b * p.c0", [base, update], { out: base.dtype, c0: s });
  return record(y, "lora_add", [base, update], [], (g, _saved, needs) => [
    needs[0] ? g.detach() : null,
    needs[1] ? elementwise("scale", "a * p.c0", [g], { out: "f32", c0: s }) : null,
  ]);
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
    using bt = transpose(this.lora_B.weight, 0, 1);
    using t = matmul(xd, at, { out: "f32" });
    using u = matmul(t, bt, { out: "f32" });
    const y = addScaled(base, u, this.config.scaling);
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
