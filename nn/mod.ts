/**
 * webtune nn: `Module` and the basic layers, the LLaMA decoder, checkpoint loading (Hugging Face directories and
 * llama2.c `.bin` files), and generation with a KV cache.
 *
 * @example
 * ```ts
 * import { init } from "../core/mod.ts";
 * import { fromPretrained, generate } from "./mod.ts";
 * await init();
 * const model = await fromPretrained("./Llama-2-7b-hf", { dtype: "f16" });
 * const { tokens } = await generate(model, [[1, 450, 4996]], { maxNewTokens: 16 });
 * ```
 * @module
 */
export { type LoadStateOptions, type LoadStateResult, Module, type StateValue } from "./module.ts";
export { Dropout, Embedding, type LayerOptions, Linear, RMSNorm } from "./layers.ts";
export { isPlaceholder, withDeferredInit } from "./init.ts";
export {
  type CausalLMOptions,
  type CausalLMOutput,
  type IdsInput,
  LLAMA_PRESETS,
  LlamaAttention,
  type LlamaConfig,
  llamaConfigFromHF,
  LlamaDecoderLayer,
  LlamaForCausalLM,
  LlamaMLP,
  LlamaModel,
  llamaPreset,
  swiglu,
} from "./llama.ts";
export { checkpoint } from "./checkpoint.ts";
export { fromPretrained, loadLlama2c, type PretrainedOptions, savePretrained } from "./loader.ts";
export { generate, type GenerateOptions, type GenerateResult } from "./generate.ts";
export { sampleNext, type SamplingOptions } from "./sampling.ts";
