/**
 * webtune quant: NF4 (4-bit NormalFloat) quantization as QLoRA and bitsandbytes use it — the code book, the CPU
 * reference of blockwise and double quantization, the GPU kernels that reproduce it bit for bit, `Linear4bit`
 * with fused dequantize-matmul kernels, `quantizeModel`, and the memory report.
 *
 * @example
 * ```ts
 * import { formatMemoryReport, modelMemoryReport, quantizeModel } from "./mod.ts";
 * quantizeModel(model, { type: "nf4", blockSize: 64, doubleQuant: true, skip: ["lm_head"] });
 * console.log(formatMemoryReport(modelMemoryReport(model))); // 4.127 bits/param on the quantized layers
 * ```
 * @module
 */
export { dynamicMap, nearestMapIndex, nearestNf4Index, NF4_CODE, NF4_THRESHOLDS, NF4_ZERO_INDEX } from "./codes.ts";
export {
  bitsPerParameter,
  dequantizeAbsmax,
  dequantizeNf4,
  dequantizeNf4DoubleQuant,
  NF4_BLOCK_SIZES,
  type Nf4DoubleQuantized,
  type Nf4Quantized,
  quantizeAbsmax,
  type QuantizedAbsmax,
  quantizeNf4,
  quantizeNf4DoubleQuant,
  sumF32,
} from "./nf4_reference.ts";
export {
  checkNf4BlockSize,
  checkNf4Shape,
  chooseNf4Plan,
  dequantizeNf4Gpu,
  disposeNf4,
  NF4_ABSMAX_BLOCK_SIZE,
  NF4_CPU_TILE,
  NF4_GEMV_CONFIG,
  nf4Matmul,
  nf4MatmulInputGrad,
  type Nf4MatmulOptions,
  type Nf4NestedAbsmax,
  nf4Numel,
  type Nf4Plan,
  nf4PlanName,
  type Nf4QuantizeOptions,
  type Nf4Tensor,
  nf4Tensors,
  quantizeAbsmaxGpu,
  quantizeNf4Gpu,
  readNf4,
  uploadNf4,
} from "./nf4.ts";
export { Linear4bit, type Linear4bitOptions } from "./linear4bit.ts";
export {
  type QuantizationConfig,
  quantizeModel,
  quantizeOnLoad,
  type ResolvedQuantizationConfig,
  resolveQuantizationConfig,
} from "./quantize_model.ts";
export { formatMemoryReport, type ModelMemoryReport, modelMemoryReport } from "./report.ts";
