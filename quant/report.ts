/**
 * `modelMemoryReport`: what a model's tensors occupy, by kind — packed 4-bit weights, quantization constants,
 * frozen full-precision tensors, trainable tensors — and the storage bits per parameter of its quantized layers.
 *
 * Bytes are logical sizes (elements × element size; the buffer pool rounds each buffer up to its size class, by
 * at most 1/16: see `memoryStats()` for what is allocated). Tensors sharing storage (aliases, tied weights, the one
 * dynamic map every double-quantized layer uses) are counted once. Bits per parameter count what each quantized
 * layer stores for its weight — 4 bits per element plus its absmax values, or their indices, scales and offset —
 * over its logical element count, as the reference's `bitsPerParameter` does; the shared code tables (the NF4 code
 * lives in the kernels, the dynamic map in one 1 KiB tensor) are in `quantizationConstantBytes` but not in the
 * bits. With double quantization at block size 64 that is 4 + 8/64 + 32/(64·256) ≈ 4.127.
 *
 * @example
 * ```ts
 * import { formatMemoryReport, modelMemoryReport } from "./report.ts";
 * const r = modelMemoryReport(model);
 * console.log(r.bitsPerParameter.toFixed(3)); // 4.127
 * console.log(formatMemoryReport(r));
 * ```
 * @module
 */
import { itemSize } from "../core/dtype.ts";
import type { Storage, Tensor } from "../core/tensor.ts";
import type { Module } from "../nn/module.ts";
import { Linear4bit } from "./linear4bit.ts";

/**
 * Bytes by kind and the quantized layers' storage cost.
 *
 * @example
 * ```ts
 * const r: ModelMemoryReport = modelMemoryReport(model);
 * console.log((r.quantizedWeightBytes + r.quantizationConstantBytes) / 2 ** 30, "GiB in 4-bit layers");
 * ```
 */
export interface ModelMemoryReport {
  /** Packed 4-bit weights. */
  quantizedWeightBytes: number;
  /** Absmax values or their double-quantized form (indices, scales, offsets), and the shared maps once. */
  quantizationConstantBytes: number;
  /** Tensors in f16/f32 that do not require gradients (embeddings, norms, skipped layers, biases). */
  fullPrecisionBytes: number;
  /** Tensors that require gradients (e.g. LoRA adapters). */
  trainableBytes: number;
  /** The sum of the four. */
  totalBytes: number;
  /** Number of `Linear4bit` layers. */
  quantizedLayers: number;
  /** Their logical weight count (out·in summed). */
  quantizedParameters: number;
  /** Elements of the full-precision tensors. */
  fullPrecisionParameters: number;
  /** Elements of the trainable tensors. */
  trainableParameters: number;
  /** Storage bits per weight over the quantized layers (NaN without any). */
  bitsPerParameter: number;
}

function bytesOf(t: Tensor): number {
  return t.numel * itemSize(t.dtype);
}

/**
 * Measures a model's tensors by kind (see the module notes).
 *
 * @example
 * ```ts
 * const { quantizedWeightBytes, quantizationConstantBytes, bitsPerParameter } = modelMemoryReport(model);
 * ```
 */
export function modelMemoryReport(model: Module): ModelMemoryReport {
  const seen = new Set<Storage>();
  const once = (t: Tensor | null): number => {
    if (!t || t.disposed || seen.has(t.storage)) return 0;
    seen.add(t.storage);
    return bytesOf(t);
  };
  const r: ModelMemoryReport = {
    quantizedWeightBytes: 0,
    quantizationConstantBytes: 0,
    fullPrecisionBytes: 0,
    trainableBytes: 0,
    totalBytes: 0,
    quantizedLayers: 0,
    quantizedParameters: 0,
    fullPrecisionParameters: 0,
    trainableParameters: 0,
    bitsPerParameter: NaN,
  };
  let layerBits = 0;
  const quantTensors = new Set<Tensor>();
  for (const [, m] of model.namedModules()) {
    if (!(m instanceof Linear4bit)) continue;
    r.quantizedLayers++;
    r.quantizedParameters += m.inFeatures * m.outFeatures;
    const packed = once(m.weight);
    r.quantizedWeightBytes += packed;
    // Per-layer constants (the map is shared: counted in bytes once, never in the bits).
    let constants = once(m.absmax) + once(m.nested_absmax) + once(m.nested_offset);
    layerBits += 8 * (packed + constants);
    constants += once(m.nested_quant_map);
    r.quantizationConstantBytes += constants;
    for (const t of [m.weight, m.absmax, m.nested_absmax, m.nested_offset, m.nested_quant_map]) {
      if (t) quantTensors.add(t);
    }
  }
  for (const [, t] of model.namedParameters()) {
    if (quantTensors.has(t)) continue;
    const bytes = once(t);
    if (t.requiresGrad) {
      r.trainableBytes += bytes;
      r.trainableParameters += bytes > 0 ? t.numel : 0;
    } else {
      r.fullPrecisionBytes += bytes;
      r.fullPrecisionParameters += bytes > 0 ? t.numel : 0;
    }
  }
  r.totalBytes = r.quantizedWeightBytes + r.quantizationConstantBytes + r.fullPrecisionBytes + r.trainableBytes;
  if (r.quantizedParameters > 0) r.bitsPerParameter = layerBits / r.quantizedParameters;
  return r;
}

function fmtBytes(b: number): string {
  if (b >= 2 ** 30) return `${(b / 2 ** 30).toFixed(3)} GiB`;
  if (b >= 2 ** 20) return `${(b / 2 ** 20).toFixed(2)} MiB`;
  if (b >= 2 ** 10) return `${(b / 2 ** 10).toFixed(1)} KiB`;
  return `${b} B`;
}

/**
 * The report as a few aligned lines for logs.
 *
 * @example
 * ```ts
 * console.log(formatMemoryReport(modelMemoryReport(model)));
 * // 4-bit weights          3.008 GiB  (224 layers, 6,476,005,376 params, 4.127 bits/param)
 * // ...
 * ```
 */
export function formatMemoryReport(r: ModelMemoryReport): string {
  const n = (x: number) => x.toLocaleString("en-US");
  const bits = Number.isNaN(r.bitsPerParameter) ? "" : `, ${r.bitsPerParameter.toFixed(3)} bits/param`;
  return [
    `4-bit weights           ${fmtBytes(r.quantizedWeightBytes)}  (${r.quantizedLayers} layers, ${
      n(r.quantizedParameters)
    } params${bits})`,
    `quantization constants  ${fmtBytes(r.quantizationConstantBytes)}`,
    `full-precision weights  ${fmtBytes(r.fullPrecisionBytes)}  (${n(r.fullPrecisionParameters)} params)`,
    `trainable parameters    ${fmtBytes(r.trainableBytes)}  (${n(r.trainableParameters)} params)`,
    `total                   ${fmtBytes(r.totalBytes)}`,
  ].join("\n");
}
