/**
 * webtune peft: LoRA configuration, the LoRA layer over dense and NF4 bases, injection into a model
 * (`getPeftModel`), merging, adapters in PEFT's file format, and the fine-tuning loop.
 *
 * @example
 * ```ts
 * import { getPeftModel, saveAdapter } from "./mod.ts";
 * const peft = getPeftModel(model, { r: 16, alpha: 16, dropout: 0.1, targetModules: ["q_proj", "v_proj"] });
 * peft.printTrainableParameters();
 * await saveAdapter(peft, "out/adapter");
 * ```
 * @module
 */
export { type LoraConfig, loraConfig, type LoraConfigInput, matchesTarget } from "./config.ts";
export { type LinearLike, LoraLinear, setLoraWeights } from "./lora.ts";
export { getPeftModel, LoraModel, loraParameters, PeftModel } from "./model.ts";
export { adapterConfigJson, loadAdapter, loraConfigFromJson, saveAdapter } from "./adapter.ts";
export { type EvalFn, progressLine, type StepLog, Trainer, type TrainerConfig, type TrainResult } from "./trainer.ts";
export { type ClassificationMetrics, classificationScores, type EvalOptions, evaluateSst2 } from "./evaluate.ts";
