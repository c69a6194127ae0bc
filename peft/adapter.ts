/**
 * Adapter files in PEFT's own format, so adapters move between webtune and Python in both directions:
 * `adapter_config.json` (PEFT's `LoraConfig` fields) and `adapter_model.safetensors` with PEFT's key names,
 * `base_model.model.<module>.lora_A.weight` (f32). Loading also accepts the `.default` adapter-name infix that PEFT
 * uses in memory (`...lora_A.default.weight`).
 *
 * @example
 * ```ts
 * import { loadAdapter, saveAdapter } from "./adapter.ts";
 * await saveAdapter(peft, "out/adapter");
 * const again = await loadAdapter(baseModel, "out/adapter"); // injects LoRA per the file's config, then loads
 * ```
 * @module
 */
import { fromArray } from "../core/creation.ts";
import { exists, joinPath, makeDir, readText, writeText } from "../core/platform.ts";
import { loadSafetensors, saveSafetensors, type TensorToSave } from "../core/safetensors.ts";
import { fmtShape } from "../core/tensor.ts";
import type { LlamaForCausalLM } from "../nn/llama.ts";
import { type LoraConfig, loraConfig } from "./config.ts";
import { getPeftModel, PeftModel } from "./model.ts";

/** PEFT's `adapter_config.json` for a LoRA adapter. */
export function adapterConfigJson(config: LoraConfig): Record<string, unknown> {
  const targets = config.targetModules;
  return {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: config.baseModelNameOrPath,
    bias: config.bias,
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: config.initLoraWeights,
    layers_pattern: null,
    layers_to_transform: null,
    lora_alpha: config.alpha,
    lora_dropout: config.dropout,
    modules_to_save: null,
    peft_type: "LORA",
    r: config.r,
    rank_pattern: {},
    revision: null,
    target_modules: targets instanceof RegExp ? targets.source : [...targets].sort(),
    task_type: "CAUSAL_LM",
    use_dora: false,
    use_rslora: config.useRslora,
  };
}

/** Reads a PEFT `adapter_config.json` object into a validated config; rejects what webtune cannot reproduce. */
export function loraConfigFromJson(json: Record<string, unknown>, source = "adapter_config.json"): LoraConfig {
  if (json.peft_type !== undefined && json.peft_type !== "LORA") {
    throw new Error(`${source}: peft_type "${json.peft_type}" is not supported (only LORA)`);
  }
  for (const key of ["use_dora", "fan_in_fan_out"]) {
    if (json[key] === true) throw new Error(`${source}: ${key}=true is not supported`);
  }
  for (const key of ["rank_pattern", "alpha_pattern"]) {
    const v = json[key] as Record<string, unknown> | undefined;
    if (v && Object.keys(v).length > 0) throw new Error(`${source}: ${key} is not supported`);
  }
  const t = json.target_modules;
  const targetModules = typeof t === "string" ? new RegExp(t) : (t as string[]);
  return loraConfig({
    r: json.r as number,
    alpha: json.lora_alpha as number,
    dropout: (json.lora_dropout as number | undefined) ?? 0,
    targetModules,
    useRslora: json.use_rslora === true,
    initLoraWeights: json.init_lora_weights !== false,
    baseModelNameOrPath: (json.base_model_name_or_path as string | null | undefined) ?? undefined,
  });
}

/**
 * Writes `adapter_config.json` and `adapter_model.safetensors` (LoRA weights only, f32) into `dir`.
 *
 * @example
 * ```ts
 * await saveAdapter(peft, "runs/sst2/adapter");
 * ```
 */
export async function saveAdapter(model: PeftModel, dir: string): Promise<void> {
  await makeDir(dir);
  const tensors: Record<string, TensorToSave> = {};
  for (const [name, t] of model.namedParameters()) {
    if (!/\.lora_[AB]\.weight$/.test(name)) continue;
    tensors[name] = { dtype: "F32", shape: t.shape, data: await t.toArray() as Float32Array };
  }
  await saveSafetensors(joinPath(dir, "adapter_model.safetensors"), tensors, { format: "pt" });
  await writeText(
    joinPath(dir, "adapter_config.json"),
    JSON.stringify(adapterConfigJson(model.peftConfig), null, 2) + "\n",
  );
}

/** PEFT key → webtune parameter name: drop the `.default` adapter infix. */
function normaliseKey(key: string): string {
  return key.replace(/\.lora_([AB])\.default\.weight$/, ".lora_$1.weight");
}

/**
 * Loads a PEFT adapter directory. Given a plain model, first injects LoRA layers per the file's config; given a
 * `PeftModel`, loads into its existing layers (ranks must agree). Errors name missing, unexpected and mis-shaped
 * keys.
 *
 * @example
 * ```ts
 * const peft = await loadAdapter(model, "adapters/sst2");
 * ```
 */
export async function loadAdapter(model: LlamaForCausalLM | PeftModel, dir: string): Promise<PeftModel> {
  const configPath = joinPath(dir, "adapter_config.json");
  const weightsPath = joinPath(dir, "adapter_model.safetensors");
  if (!(await exists(configPath))) throw new Error(`${dir} has no adapter_config.json: not a PEFT adapter directory`);
  if (!(await exists(weightsPath))) {
    const hint = (await exists(joinPath(dir, "adapter_model.bin")))
      ? " (adapter_model.bin is a pickle: re-save it with safe_serialization=True)"
      : "";
    throw new Error(`${dir} has no adapter_model.safetensors${hint}`);
  }
  const config = loraConfigFromJson(JSON.parse(await readText(configPath)), configPath);
  const peft = model instanceof PeftModel ? model : getPeftModel(model, config);
  if (peft.peftConfig.r !== config.r) {
    throw new Error(`${configPath}: r=${config.r}, but the model's adapters have r=${peft.peftConfig.r}`);
  }
  const own = new Map(peft.namedParameters().filter(([n]) => /\.lora_[AB]\.weight$/.test(n)));
  const file = await loadSafetensors(weightsPath, { as: "f32" });
  const unexpected: string[] = [];
  const bad: string[] = [];
  const seen = new Set<string>();
  for (const [key, t] of file) {
    const name = normaliseKey(key);
    const target = own.get(name);
    if (!target) {
      unexpected.push(key);
      continue;
    }
    if (t.shape.length !== target.shape.length || t.shape.some((d, i) => d !== target.shape[i])) {
      bad.push(`${key}: file ${fmtShape(t.shape)}, model ${fmtShape(target.shape)}`);
      continue;
    }
    seen.add(name);
  }
  const missing = [...own.keys()].filter((n) => !seen.has(n));
  const problems = [
    bad.length ? `mis-shaped: ${bad.slice(0, 5).join("; ")}` : "",
    missing.length ? `missing from the file: ${missing.slice(0, 5).join(", ")}${missing.length > 5 ? ", …" : ""}` : "",
    unexpected.length
      ? `not in the model: ${unexpected.slice(0, 5).join(", ")}${unexpected.length > 5 ? ", …" : ""}`
      : "",
  ].filter(Boolean);
  if (problems.length) throw new Error(`loadAdapter(${dir}): ${problems.join("\n")}`);
  const state = new Map<string, ReturnType<typeof fromArray>>();
  for (const [key, t] of file) {
    state.set(normaliseKey(key), fromArray(t.data as Float32Array, t.shape, { dtype: "f32" }));
  }
  peft.loadStateDict(state, { strict: false });
  for (const t of state.values()) t.dispose();
  return peft;
}
