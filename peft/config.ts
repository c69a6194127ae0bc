/**
 * `LoraConfig`: what to adapt and how, with PEFT's names and defaults, validated up front with errors that say
 * what to change.
 *
 * @example
 * ```ts
 * import { loraConfig } from "./config.ts";
 * const cfg = loraConfig({ r: 16, alpha: 16, dropout: 0.1, targetModules: ["q_proj", "v_proj"] });
 * cfg.scaling; // alpha / r = 1
 * ```
 * @module
 */

/** The options a user gives (PEFT's `LoraConfig` fields, camel-cased). */
export interface LoraConfigInput {
  /** Rank of the update (> 0). */
  r: number;
  /** Scale numerator: the update is multiplied by alpha / r (or alpha / √r with rsLoRA). Default: r. */
  alpha?: number;
  /** Dropout on the adapter's input, in [0, 1). Default 0. */
  dropout?: number;
  /**
   * Which linear layers to adapt: names or name suffixes (`"q_proj"` matches `model.layers.0.self_attn.q_proj`),
   * or a RegExp matched against the whole dotted name.
   */
  targetModules: string[] | RegExp;
  /** Bias handling; only "none" (biases stay frozen), as in the study. */
  bias?: "none";
  /** rsLoRA: scale by alpha / √r. Default false. */
  useRslora?: boolean;
  /**
   * PEFT's default `true`: A Kaiming-uniform (a = √5), B zeros, so training starts from the base model.
   * `false`: B random too (PEFT's `init_lora_weights=False`, used by tests so the adapter has an effect).
   */
  initLoraWeights?: boolean;
  /** Extra modules trained and saved in full (not supported yet: must be empty). */
  modulesToSave?: string[];
  /** Recorded in adapter_config.json. */
  baseModelNameOrPath?: string;
}

/** A validated configuration. */
export interface LoraConfig extends Required<Omit<LoraConfigInput, "baseModelNameOrPath">> {
  /** The multiplier of the low-rank update. */
  scaling: number;
  /** Recorded in adapter_config.json. */
  baseModelNameOrPath: string | null;
}

/**
 * Validates and completes a configuration.
 *
 * @example
 * ```ts
 * const cfg = loraConfig({ r: 8, alpha: 16, targetModules: ["q_proj", "v_proj"] });
 * ```
 */
export function loraConfig(input: LoraConfigInput): LoraConfig {
  const { r } = input;
  if (!Number.isInteger(r) || r <= 0) throw new Error(`LoRA rank r must be a positive integer, got ${r}`);
  const alpha = input.alpha ?? r;
  if (!(alpha > 0)) throw new Error(`LoRA alpha must be > 0, got ${alpha}`);
  const dropout = input.dropout ?? 0;
  if (!(dropout >= 0 && dropout < 1)) throw new Error(`LoRA dropout must be in [0, 1), got ${dropout}`);
  if (input.bias !== undefined && input.bias !== "none") {
    throw new Error(`LoRA bias "${input.bias}" is not supported: use "none"`);
  }
  const targets = input.targetModules;
  if (!(targets instanceof RegExp) && (!Array.isArray(targets) || targets.length === 0)) {
    throw new Error(
      'LoRA targetModules must be a non-empty list of module names (e.g. ["q_proj", "v_proj"]) or a RegExp',
    );
  }
  if ((input.modulesToSave ?? []).length > 0) throw new Error("modulesToSave is not supported yet");
  const useRslora = input.useRslora ?? false;
  return {
    r,
    alpha,
    dropout,
    targetModules: targets,
    bias: "none",
    useRslora,
    initLoraWeights: input.initLoraWeights ?? true,
    modulesToSave: [],
    baseModelNameOrPath: input.baseModelNameOrPath ?? null,
    scaling: useRslora ? alpha / Math.sqrt(r) : alpha / r,
  };
}

/** True when the dotted module `name` is targeted (PEFT's rule: exact name or `.`-separated suffix). */
export function matchesTarget(name: string, targets: string[] | RegExp): boolean {
  if (targets instanceof RegExp) {
    const m = targets.exec(name);
    return m !== null && m.index === 0 && m[0].length === name.length;
  }
  return targets.some((t) => name === t || name.endsWith(`.${t}`));
}
