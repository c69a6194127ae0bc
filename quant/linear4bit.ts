/**
 * `Linear4bit`: a frozen linear layer whose weight is stored in NF4 (4-bit NormalFloat, QLoRA's format), `y = x ·
 * dequant(W)ᵀ + b`. The forward runs a fused kernel that dequantizes W tile by tile inside the matmul (or streams
 * the packed weights, for 1–4 rows); the backward gives the input gradient `g · dequant(W)` through a fused kernel
 * too. W itself never exists densely on the GPU, and it has no gradient: train a LoRA adapter over the layer.
 *
 * Its tensors use bitsandbytes' names, so state-dict keys read like a bitsandbytes `Linear4bit`'s: `weight` (the
 * packed nibbles, u32 words), `absmax` (f32 per block, or with double quantization the u8 map indices packed in
 * u32 words), `nested_absmax` (f32 scale per 256 blocks), `nested_offset` (f32 [1]), `nested_quant_map` (f32 [256],
 * one GPU copy shared by all layers), `bias` (full precision, optional).
 *
 * @example
 * ```ts
 * import { Linear4bit } from "./linear4bit.ts";
 * const q = Linear4bit.fromLinear(new Linear(4096, 4096, { bias: false, dtype: "f16" }), { blockSize: 64, doubleQuant: true });
 * const y = q.forward(x);          // fused NF4 GEMM
 * const w = q.denseWeight("f16");  // [4096, 4096], e.g. for merging LoRA
 * ```
 * @module
 */
import { record } from "../core/autograd.ts";
import { add } from "../core/ops/elementwise.ts";
import { fmtShape, type Tensor } from "../core/tensor.ts";
import { isPlaceholder, type Linear } from "../nn/layers.ts";
import { Module } from "../nn/module.ts";
import {
  dequantizeNf4Gpu,
  nf4Matmul,
  nf4MatmulInputGrad,
  type Nf4Tensor,
  nf4Tensors,
  quantizeNf4Gpu,
  readNf4,
} from "./nf4.ts";
import { bitsPerParameter, type Nf4DoubleQuantized, type Nf4Quantized } from "./nf4_reference.ts";

/**
 * Options of {@linkcode Linear4bit.fromLinear}.
 *
 * @example
 * ```ts
 * Linear4bit.fromLinear(linear, { blockSize: 64, doubleQuant: true } satisfies Linear4bitOptions);
 * ```
 */
export interface Linear4bitOptions {
  /** NF4 block size: a power of two from 32 to 4096 (default 64, as QLoRA). */
  blockSize?: number;
  /** Quantize the absmax values too: 4.127 instead of 4.5 bits per weight at block size 64 (default true). */
  doubleQuant?: boolean;
}

const FROZEN_HELP = "NF4 weights are frozen and have no gradient: train a LoRA adapter over the layer (QLoRA: " +
  "getPeftModel on the quantized model), or, to train the full weight, build a Linear from denseWeight()";

/**
 * A linear layer with NF4 weights (see the module notes).
 *
 * @example
 * ```ts
 * const layer = Linear4bit.fromLinear(new Linear(4096, 11008, { bias: false, dtype: "f16" }));
 * const y = layer.forward(x); // [..., 4096] → [..., 11008]
 * ```
 */
export class Linear4bit extends Module {
  /** u32 [out·in / 8]: the packed 4-bit indices, little-endian bytes, first element of each pair in the high nibble. */
  weight: Tensor;
  /** f32 [blocks], or with double quantization u32 [ceil(blocks / 4)] holding one u8 map index per block. */
  absmax: Tensor;
  /** Double quantization: f32 [ceil(blocks / 256)] scales, or null. */
  nested_absmax: Tensor | null;
  /** Double quantization: f32 [1], the mean absmax, or null. */
  nested_offset: Tensor | null;
  /** Double quantization: f32 [256], the dynamic map, or null. */
  nested_quant_map: Tensor | null;
  /** Bias [out] in full precision, or null. */
  bias: Tensor | null;
  /** Input width. */
  readonly inFeatures: number;
  /** Output width. */
  readonly outFeatures: number;
  /** Elements per NF4 block. */
  readonly blockSize: number;
  /** Whether the absmax values are double-quantized. */
  readonly doubleQuant: boolean;

  /**
   * Wraps an NF4 tensor of shape [out, in] (from `quantizeNf4Gpu` or `uploadNf4`), taking ownership of its GPU
   * tensors, and an optional bias (kept as given). Use {@linkcode Linear4bit.fromLinear} to quantize a `Linear`.
   */
  constructor(q: Nf4Tensor, bias: Tensor | null = null) {
    super();
    if (q.shape.length !== 2) throw new Error(`Linear4bit needs a 2-D [out, in] weight, got ${fmtShape(q.shape)}`);
    [this.outFeatures, this.inFeatures] = q.shape;
    if (bias && (bias.ndim !== 1 || bias.shape[0] !== this.outFeatures)) {
      throw new Error(`Linear4bit: bias of shape ${fmtShape(bias.shape)} does not match ${this.outFeatures} outputs`);
    }
    this.blockSize = q.blockSize;
    this.doubleQuant = q.nested !== null;
    for (const t of nf4Tensors(q)) t.keep();
    this.weight = q.packed;
    this.absmax = q.nested ? q.nested.quantized : q.absmax!;
    this.nested_absmax = q.nested?.scale ?? null;
    this.nested_offset = q.nested?.offset ?? null;
    this.nested_quant_map = q.nested?.map ?? null;
    this.bias = bias?.keep() ?? null;
    for (const [key, t] of this.ownTensors()) t.name ??= key;
  }

  /**
   * Quantizes a `Linear` (f32 or f16 weight [out, in]) to NF4 on the GPU. The `Linear` is left intact: dispose it
   * when it is no longer needed (`quantizeModel` does). The bias, if any, is shared (not copied).
   *
   * @throws RangeError when out·in is not a multiple of the block size (with what to do), Error for weights that
   * were never loaded
   *
   * @example
   * ```ts
   * const q = Linear4bit.fromLinear(linear, { blockSize: 64, doubleQuant: true });
   * linear.dispose();
   * ```
   */
  static fromLinear(linear: Linear, opts: Linear4bitOptions = {}): Linear4bit {
    if (isPlaceholder(linear.weight) || (linear.bias && isPlaceholder(linear.bias))) {
      throw new Error("Linear4bit.fromLinear: the layer's weights have not been loaded yet (deferred initialisation)");
    }
    const q = quantizeNf4Gpu(linear.weight, { blockSize: opts.blockSize ?? 64, doubleQuant: opts.doubleQuant ?? true });
    let bias: Tensor | null = null;
    if (linear.bias) {
      bias = linear.bias.alias();
      bias.requiresGrad = linear.bias.requiresGrad;
    }
    return new Linear4bit(q, bias);
  }

  /** The quantized weight as an {@linkcode Nf4Tensor} (views of this layer's tensors, not copies). */
  get quantized(): Nf4Tensor {
    return {
      shape: [this.outFeatures, this.inFeatures],
      blockSize: this.blockSize,
      packed: this.weight,
      absmax: this.doubleQuant ? null : this.absmax,
      nested: this.doubleQuant
        ? {
          quantized: this.absmax,
          scale: this.nested_absmax!,
          offset: this.nested_offset!,
          map: this.nested_quant_map!,
        }
        : null,
    };
  }

  /** The quantization state's tensors (everything but the bias). */
  private frozenTensors(): Tensor[] {
    return nf4Tensors(this.quantized);
  }

  /**
   * y = x · dequant(W)ᵀ (+ b) for x [..., in] in f32 or f16; y has x's dtype. Records the input gradient (fused
   * `g · dequant(W)`) when x requires one; a backward that asks for the gradient of the 4-bit weight throws.
   */
  forward(x: Tensor): Tensor {
    if (x.shape[x.ndim - 1] !== this.inFeatures) {
      throw new Error(`Linear4bit(${this.inFeatures} → ${this.outFeatures}) got input of shape ${fmtShape(x.shape)}`);
    }
    const q = this.quantized;
    const frozen = this.frozenTensors();
    const xDtype = x.dtype as "f32" | "f16";
    const y = record(nf4Matmul(x, q), "linear4bit", [x, ...frozen], [], (g, _saved, needs) => {
      if (needs.slice(1).some((n) => n)) {
        const names = frozen.filter((t) => t.requiresGrad).map((t) => t.name ?? "a quantization tensor");
        throw new Error(
          `Linear4bit: backward asked for the gradient of its 4-bit weight (${names.join(", ")}). ${FROZEN_HELP}`,
        );
      }
      return [needs[0] ? nf4MatmulInputGrad(g, q, { out: xDtype }) : null, ...frozen.map(() => null)];
    });
    if (!this.bias) return y;
    const z = add(y, this.bias);
    y.dispose();
    return z;
  }

  /**
   * The weight dequantized to a dense [out, in] tensor (default f16), e.g. to merge a LoRA update into it. In f32
   * it equals the reference's `dequantizeNf4` / `dequantizeNf4DoubleQuant` bit for bit.
   *
   * @example
   * ```ts
   * const w = layer.denseWeight("f32");
   * ```
   */
  denseWeight(dtype: "f32" | "f16" = "f16"): Tensor {
    return dequantizeNf4Gpu(this.quantized, dtype);
  }

  /**
   * Reads the quantization state back to the CPU in the reference's types (for saving, or checks).
   *
   * @example
   * ```ts
   * const state = await layer.readQuantized();
   * ```
   */
  readQuantized(): Promise<Nf4Quantized | Nf4DoubleQuantized> {
    return readNf4(this.quantized);
  }

  /** The logical parameter count, out·in (+ bias), as PEFT counts 4-bit layers. */
  override ownParameterCount(): number {
    return this.inFeatures * this.outFeatures + (this.bias?.numel ?? 0);
  }

  /** Storage bits per weight of this layer (the shared map not counted), as the reference's `bitsPerParameter`. */
  bitsPerParameter(): number {
    return bitsPerParameter({
      numel: this.inFeatures * this.outFeatures,
      blockSize: this.blockSize,
      doubleQuant: this.doubleQuant,
    });
  }

  /** Turning gradients off is allowed; turning them on throws (4-bit weights are frozen). */
  override requiresGrad_(on = true): this {
    if (on) {
      throw new Error(`Linear4bit(${this.inFeatures} → ${this.outFeatures}) cannot require gradients. ${FROZEN_HELP}`);
    }
    return super.requiresGrad_(false);
  }

  /** E.g. `Linear4bit(4096 → 11008, nf4, block 64, double quant)`. */
  override toString(): string {
    return `Linear4bit(${this.inFeatures} → ${this.outFeatures}, nf4, block ${this.blockSize}${
      this.doubleQuant ? ", double quant" : ""
    }${this.bias ? ", bias" : ""})`;
  }
}
