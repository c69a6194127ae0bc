/**
 * `getPeftModel`: injects LoRA layers into the targeted linear layers of a model, freezes everything else, and
 * wraps it as PEFT does (`PeftModel.base_model.model` is the original model), so parameter names are PEFT's:
 * `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
 *
 * @example
 * ```ts
 * import { getPeftModel } from "./model.ts";
 * const peft = getPeftModel(model, { r: 16, alpha: 16, dropout: 0.1, targetModules: ["q_proj", "v_proj"] });
 * peft.printTrainableParameters();
 * // trainable params: 8,388,608 || all params: 6,746,804,224 || trainable%: 0.1243
 * ```
 * @module
 */
import { elementwise } from "../core/ops/dispatch.ts";
import type { Tensor } from "../core/tensor.ts";
import type { CausalLMOptions, CausalLMOutput, IdsInput, LlamaForCausalLM } from "../nn/llama.ts";
import { Linear } from "../nn/layers.ts";
import { Module } from "../nn/module.ts";
import { type LoraConfig, loraConfig, type LoraConfigInput, matchesTarget } from "./config.ts";
import { type LinearLike, LoraLinear } from "./lora.ts";

/** PEFT's `LoraModel`: holds the adapted model as `model`. */
export class LoraModel extends Module {
  /** The model with LoRA layers injected. */
  model: LlamaForCausalLM;

  /** Wraps an already-injected model. */
  constructor(model: LlamaForCausalLM) {
    super();
    this.model = model;
  }
}

function isLinearLike(m: Module): m is LinearLike {
  const x = m as unknown as Partial<LinearLike>;
  return typeof x.inFeatures === "number" && typeof x.outFeatures === "number" && !(m instanceof LoraLinear);
}

/** A model with LoRA adapters, PEFT-style. */
export class PeftModel extends Module {
  /** PEFT's wrapper level (`base_model.model` is the adapted model). */
  base_model: LoraModel;
  /** The adapter configuration. */
  readonly peftConfig: LoraConfig;

  /** Use {@linkcode getPeftModel}. */
  constructor(model: LlamaForCausalLM, config: LoraConfig) {
    super();
    this.base_model = new LoraModel(model);
    this.peftConfig = config;
  }

  /** The adapted model. */
  get model(): LlamaForCausalLM {
    return this.base_model.model;
  }

  /** The LoRA layers with their names inside the adapted model. */
  loraLayers(): [string, LoraLinear][] {
    return this.model.namedModules().filter((e): e is [string, LoraLinear] => e[1] instanceof LoraLinear);
  }

  /** Runs the adapted model. */
  forward(inputIds: IdsInput, opts: CausalLMOptions = {}): CausalLMOutput {
    return this.model.forward(inputIds, opts);
  }

  /** Turns gradient checkpointing on or off. */
  gradientCheckpointing(on = true): this {
    this.model.gradientCheckpointing(on);
    return this;
  }

  /** Counts as PEFT does: quantized layers at their logical parameter count. */
  parameterCounts(): { trainable: number; all: number } {
    let all = 0, trainable = 0;
    for (const [, m] of this.namedModules()) {
      all += m.ownParameterCount();
      for (const [, t] of m.ownTensors()) if (t.requiresGrad) trainable += t.numel;
    }
    return { trainable, all };
  }

  /** Prints `trainable params: … || all params: … || trainable%: …` like PEFT. Returns the line. */
  printTrainableParameters(): string {
    const { trainable, all } = this.parameterCounts();
    const fmt = (n: number) => n.toLocaleString("en-US");
    const line = `trainable params: ${fmt(trainable)} || all params: ${fmt(all)} || trainable%: ${
      (100 * trainable / all).toFixed(4)
    }`;
    console.log(line);
    return line;
  }

  /** Runs `fn` with every adapter switched off (base-model outputs), then switches them back on. */
  disableAdapters<T>(fn: () => T): T {
    const layers = this.loraLayers().map(([, l]) => l);
    for (const l of layers) l.disabled = true;
    const restore = () => layers.forEach((l) => (l.disabled = false));
    try {
      const r = fn();
      if (r instanceof Promise) return r.finally(restore) as T;
      restore();
      return r;
    } catch (e) {
      restore();
      throw e;
    }
  }

  /**
   * Adds each adapter's update into its base weight (W ← W + s·BA), so inference costs no extra matmuls. For an
   * NF4 base the merged layer becomes a dense f16 `Linear` (4-bit storage cannot hold the sum); `unmerge` brings
   * the quantized layer back.
   */
  merge(): void {
    for (const [, l] of this.loraLayers()) mergeLayer(l);
  }

  /** Undoes {@linkcode PeftModel.merge}. */
  unmerge(): void {
    for (const [, l] of this.loraLayers()) unmergeLayer(l);
  }

  /** Merges and replaces every LoRA layer by its merged base; returns the plain model (adapters are gone). */
  mergeAndUnload(): LlamaForCausalLM {
    for (const [name, l] of this.loraLayers()) {
      mergeLayer(l);
      l.lora_A.dispose();
      l.lora_B.dispose();
      this.model.setSubmodule(name, l.base_layer);
    }
    return this.model;
  }
}

const quantizedBases = new WeakMap<LoraLinear, LinearLike>();

function mergeLayer(l: LoraLinear): void {
  if (l.merged) return;
  using delta = l.deltaWeight();
  const base = l.base_layer;
  if (base instanceof Linear) {
    const w = base.weight;
    const merged = elementwise("lora_merge", "a + b", [w, delta], { out: w.dtype }).keep();
    w.dispose();
    base.weight = merged;
  } else {
    if (!base.denseWeight) throw new Error("merge: this base layer cannot produce a dense weight");
    using dense = base.denseWeight();
    const lin = new Linear(base.inFeatures, base.outFeatures, { bias: false, dtype: "f16" });
    lin.weight.dispose();
    lin.weight = elementwise("lora_merge", "a + b", [dense, delta], { out: "f16" }).keep();
    lin.requiresGrad_(false);
    quantizedBases.set(l, base);
    l.base_layer = lin;
  }
  l.merged = true;
}

function unmergeLayer(l: LoraLinear): void {
  if (!l.merged) return;
  const q = quantizedBases.get(l);
  if (q) {
    l.base_layer.dispose();
    l.base_layer = q;
    quantizedBases.delete(l);
  } else {
    const base = l.base_layer as Linear;
    using delta = l.deltaWeight();
    const w = base.weight;
    base.weight = elementwise("lora_unmerge", "a - b", [w, delta], { out: w.dtype }).keep();
    w.dispose();
  }
  l.merged = false;
}

/**
 * Injects LoRA into every linear layer of `model` whose name matches `targetModules`, freezes all other
 * parameters, and returns the wrapped model. Throws, listing the linear layers available, when a target matches
 * nothing.
 *
 * @example
 * ```ts
 * const peft = getPeftModel(model, { r: 8, alpha: 16, targetModules: ["q_proj", "v_proj"], dropout: 0.05 });
 * ```
 */
export function getPeftModel(model: LlamaForCausalLM, input: LoraConfigInput | LoraConfig): PeftModel {
  const config = "scaling" in input ? input : loraConfig(input);
  model.requiresGrad_(false);
  const candidates = model.namedModules().filter(([name, m]) => name !== "" && isLinearLike(m));
  const chosen = candidates.filter(([name]) => matchesTarget(name, config.targetModules));
  if (chosen.length === 0) {
    const suffixes = [...new Set(candidates.map(([n]) => n.split(".").pop()!))];
    throw new Error(
      `LoRA targetModules ${String(config.targetModules)} matched no linear layer. Available: ${suffixes.join(", ")}`,
    );
  }
  if (Array.isArray(config.targetModules)) {
    for (const t of config.targetModules) {
      if (!chosen.some(([n]) => matchesTarget(n, [t]))) {
        const suffixes = [...new Set(candidates.map(([n]) => n.split(".").pop()!))];
        throw new Error(`LoRA target "${t}" matches no linear layer. Available: ${suffixes.join(", ")}`);
      }
    }
  }
  for (const [name, m] of chosen) model.setSubmodule(name, new LoraLinear(m as LinearLike, config));
  return new PeftModel(model, config);
}

/** The trainable tensors of a PEFT model (LoRA A and B). */
export function loraParameters(model: PeftModel): Tensor[] {
  return model.trainableParameters();
}
