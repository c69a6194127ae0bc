/**
 * `quantizeModel`: replaces a model's `Linear` layers by NF4 `Linear4bit` layers (QLoRA's base model), freeing
 * each full-precision weight as soon as its layer is quantized. Embeddings, norms and skipped layers (by default
 * `lm_head`, as in QLoRA) keep their dtype. `quantizeOnLoad` does the same layer by layer while a checkpoint loads
 * (`fromPretrained(dir, { quantization })` uses it), so the full-precision model never sits on the GPU.
 *
 * @example
 * ```ts
 * import { quantizeModel } from "./quantize_model.ts";
 * quantizeModel(model, { type: "nf4", blockSize: 64, doubleQuant: true, skip: ["lm_head"] });
 * ```
 * @module
 */
import { getGpu } from "../core/gpu.ts";
import { isPlaceholder, Linear } from "../nn/layers.ts";
import type { Module } from "../nn/module.ts";
import { Linear4bit } from "./linear4bit.ts";
import { checkNf4BlockSize, checkNf4Shape } from "./nf4.ts";

/**
 * How to quantize a model.
 *
 * @example
 * ```ts
 * const config: QuantizationConfig = { type: "nf4", blockSize: 64, doubleQuant: true, skip: ["lm_head"] };
 * ```
 */
export interface QuantizationConfig {
  /** The data type: only "nf4" (4-bit NormalFloat) is implemented. */
  type: "nf4";
  /** Elements per block: a power of two from 32 to 4096 (default 64). */
  blockSize?: number;
  /** Double quantization of the absmax values (default true: 4.127 bits per weight at block size 64). */
  doubleQuant?: boolean;
  /**
   * Layers kept in full precision, by dotted name or any run of whole name segments: "lm_head", "mlp.down_proj",
   * "layers.0" (default ["lm_head"]). LoRA adapters (`lora_A`, `lora_B`) are never quantized.
   */
  skip?: string[];
}

/**
 * A validated configuration, defaults filled in.
 *
 * @example
 * ```ts
 * const { blockSize, doubleQuant, skip }: ResolvedQuantizationConfig = resolveQuantizationConfig({ type: "nf4" });
 * ```
 */
export interface ResolvedQuantizationConfig {
  /** "nf4". */
  type: "nf4";
  /** Elements per block. */
  blockSize: number;
  /** Double quantization. */
  doubleQuant: boolean;
  /** Names kept in full precision. */
  skip: string[];
}

/**
 * Validates a configuration and fills in the defaults; throws a clear error for an unsupported type or block size.
 *
 * @example
 * ```ts
 * resolveQuantizationConfig({ type: "nf4" }); // { type: "nf4", blockSize: 64, doubleQuant: true, skip: ["lm_head"] }
 * ```
 */
export function resolveQuantizationConfig(config: QuantizationConfig): ResolvedQuantizationConfig {
  const type = (config as { type?: unknown } | undefined)?.type;
  if (type !== "nf4") {
    throw new Error(
      `Unsupported quantization type ${JSON.stringify(type)}: webtune implements "nf4" (4-bit NormalFloat, as ` +
        `QLoRA); use { type: "nf4" }`,
    );
  }
  const blockSize = config.blockSize ?? 64;
  checkNf4BlockSize(blockSize);
  const doubleQuant = config.doubleQuant ?? true;
  if (typeof doubleQuant !== "boolean") throw new Error(`doubleQuant must be true or false, got ${doubleQuant}`);
  const skip = config.skip ?? ["lm_head"];
  if (!Array.isArray(skip) || skip.some((s) => typeof s !== "string" || s === "")) {
    throw new Error(`skip must be a list of layer names, e.g. ["lm_head"], got ${JSON.stringify(skip)}`);
  }
  return { type, blockSize, doubleQuant, skip };
}

/** Whether `name` is skipped: some entry matches a run of whole dotted segments of it. */
function isSkipped(name: string, skip: string[]): boolean {
  const dotted = `.${name}.`;
  return skip.some((s) => dotted.includes(`.${s}.`)) || /(^|\.)lora_[AB]$/.test(name);
}

/** The `Linear` layers of `model` that `config` quantizes, by dotted name (the root itself excluded). */
function targets(model: Module, config: ResolvedQuantizationConfig): [string, Linear][] {
  return model.namedModules().filter((e): e is [string, Linear] =>
    e[0] !== "" && e[1] instanceof Linear && !isSkipped(e[0], config.skip)
  );
}

/** Throws, naming the layer and what to do, when a target's element count is not a multiple of the block size. */
function checkTargets(list: [string, Linear][], config: ResolvedQuantizationConfig): void {
  for (const [name, layer] of list) checkNf4Shape(layer.weight.shape, config.blockSize, `${name}.weight`);
}

/**
 * Replaces every `Linear` of `model` (except skipped names) by a `Linear4bit` holding its weight in NF4, disposing
 * the full-precision weight as it goes. Every target is checked before anything is quantized, so an error leaves
 * the model unchanged. Quantize before adding LoRA adapters (QLoRA: `quantizeModel`, then `getPeftModel`).
 * Returns the model.
 *
 * @param model any module, e.g. a `LlamaForCausalLM`
 * @param config `{ type: "nf4", blockSize = 64, doubleQuant = true, skip = ["lm_head"] }`
 * @throws Error for an unsupported type; RangeError for a bad block size or a weight whose element count is not a
 * multiple of it (saying which layer and what to do); Error for weights that were never loaded
 *
 * @example
 * ```ts
 * const model = quantizeModel(new LlamaForCausalLM(llamaPreset("tiny")), { type: "nf4" });
 * console.log(formatMemoryReport(modelMemoryReport(model)));
 * ```
 */
export function quantizeModel<M extends Module>(model: M, config: QuantizationConfig): M {
  const cfg = resolveQuantizationConfig(config);
  const list = targets(model, cfg);
  checkTargets(list, cfg);
  for (const [name, layer] of list) {
    if (isPlaceholder(layer.weight)) {
      throw new Error(`quantizeModel: ${name}.weight has not been loaded yet; load the weights first`);
    }
  }
  for (const [name, layer] of list) quantizeLayer(model, name, layer, cfg);
  return model;
}

function quantizeLayer(root: Module, name: string, layer: Linear, cfg: ResolvedQuantizationConfig): void {
  root.setSubmodule(name, Linear4bit.fromLinear(layer, cfg));
  layer.dispose();
  // Submit now, so the freed full-precision buffer can be reused by the next layer.
  getGpu().flush();
}

/**
 * A hook for the checkpoint loader's `onWeight`: each time a weight arrives, the `Linear` owning it is quantized
 * as soon as all its tensors are loaded, and its full-precision weight freed. Validates the configuration and every
 * target's shape against `model` (built with deferred initialisation) before any weight is read.
 *
 * @example
 * ```ts
 * const onWeight = quantizeOnLoad(model, { type: "nf4" });
 * // what fromPretrained(dir, { quantization: { type: "nf4" } }) does with it
 * ```
 */
export function quantizeOnLoad(model: Module, config: QuantizationConfig): (root: Module, name: string) => void {
  const cfg = resolveQuantizationConfig(config);
  checkTargets(targets(model, cfg), cfg);
  return (root: Module, name: string) => {
    const dot = name.lastIndexOf(".");
    if (dot < 0) return;
    const owner = name.slice(0, dot);
    if (isSkipped(owner, cfg.skip)) return;
    const found = root.namedModules().find(([n]) => n === owner);
    const layer = found?.[1];
    if (!(layer instanceof Linear)) return;
    if (layer.ownTensors().some(([, t]) => isPlaceholder(t))) return; // e.g. its bias comes later
    quantizeLayer(root, owner, layer, cfg);
  };
}
