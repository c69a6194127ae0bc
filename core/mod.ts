/**
 * webtune core: the GPU device, tensors, differentiable ops, autograd, memory accounting, optimizers and
 * safetensors I/O. Everything here uses WebGPU and web APIs only (files go through `platform.ts`).
 *
 * @example
 * ```ts
 * import { init, randn, scope, tensor } from "./mod.ts";
 * await init();
 * const w = randn([3, 2], { seed: 0, requiresGrad: true });
 * const loss = scope(() => {
 *   const l = tensor([[1, 2, 3]]).matmul(w).square().mean();
 *   l.backward();
 *   return l.detach();
 * });
 * console.log(await loss.item(), await w.grad!.toArray());
 * ```
 * @module
 */
import { type GpuOptions, initGpu } from "./gpu.ts";

export { getGpu, type Gpu, type GpuInfo, type GpuOptions, initGpu } from "./gpu.ts";
export { type DType, type TensorData } from "./dtype.ts";
export { contiguousStrides, fmtShape, numelOf, type Shape, Storage, Tensor } from "./tensor.ts";
export { emptyCache, type MemoryStats, memoryStats, resetPeakMemory } from "./memory.ts";
export { keep, scope } from "./scope.ts";
export { isGradEnabled, noGrad } from "./autograd.ts";
export { manualSeed } from "./random.ts";
export {
  arange,
  type CreateOptions,
  fromArray,
  fromSafetensors,
  full,
  type NestedArray,
  ones,
  onesLike,
  rand,
  randn,
  type RandomOptions,
  tensor,
  zeros,
  zerosLike,
} from "./creation.ts";
export * from "./ops/elementwise.ts";
export { max, mean, sum, sumTo } from "./ops/reduce.ts";
export { cat, contiguous, expand, permute, reshape, slice, squeeze, transpose, unsqueeze, view } from "./ops/shape.ts";
export { matmul, type MatmulOptions } from "./ops/matmul.ts";
export { logSoftmax, softmax } from "./ops/softmax.ts";
export {
  crossEntropy,
  type CrossEntropyOptions,
  dropout,
  type DropoutOptions,
  embedding,
  type Reduction,
  rmsNorm,
  type RmsNormOptions,
} from "./ops/nn.ts";
export { attention, type AttentionOptions, attentionReference, rope, type RopeOptions } from "./ops/attention.ts";
export {
  AdamW,
  type AdamWOptions,
  type AdamWParamState,
  type AdamWStateDict,
  clipCoefficient,
  clipGradNorm,
  scaleInPlace,
  SGD,
  type SGDOptions,
  type SGDStateDict,
} from "./optim.ts";
export {
  constant,
  constantWithWarmup,
  cosineWithWarmup,
  type HasLearningRate,
  linearWithWarmup,
  type LRLambda,
  LRScheduler,
  warmupStepsFromRatio,
} from "./schedule.ts";
export {
  loadSafetensors,
  parseSafetensorsHeader,
  readSafetensorsHeader,
  readTensorData,
  saveSafetensors,
} from "./safetensors.ts";

/**
 * Acquires the GPU; call once before creating tensors. Returns a description of the adapter.
 *
 * @example
 * ```ts
 * const { description } = await init();
 * ```
 */
export async function init(options: GpuOptions = {}): Promise<{ description: string; shaderF16: boolean }> {
  const gpu = await initGpu(options);
  return { description: gpu.info.description, shaderF16: gpu.info.shaderF16 };
}
