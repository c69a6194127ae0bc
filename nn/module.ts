/**
 * `Module`: the base of every layer, as in PyTorch. A module's parameters and submodules are its own properties:
 * a `Tensor` property is a parameter, a `Module` property a submodule, an array of modules a list (`layers.0`,
 * `layers.1`, ...). Names therefore follow the property names, which the LLaMA code keeps identical to Hugging
 * Face's (`model.layers.0.self_attn.q_proj.weight`), so state-dict keys and PEFT target names are the same strings.
 *
 * @example
 * ```ts
 * import { Module } from "./module.ts";
 * import { Linear } from "./layers.ts";
 * class Mlp extends Module {
 *   fc1 = new Linear(8, 32);
 *   fc2 = new Linear(32, 1);
 *   forward(x: Tensor): Tensor {
 *     using h = this.fc1.forward(x).tanh();
 *     return this.fc2.forward(h);
 *   }
 * }
 * const m = new Mlp();
 * console.log(m.namedParameters().map(([name]) => name)); // ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
 * ```
 * @module
 */
import { fmtShape, type Tensor } from "../core/tensor.ts";
import { fromArray } from "../core/creation.ts";
import { getGpu } from "../core/gpu.ts";
import { isPlaceholder } from "./init.ts";
import type { DType, TensorData } from "../core/dtype.ts";

function isTensor(v: unknown): v is Tensor {
  return typeof v === "object" && v !== null && (v as { isTensor?: boolean }).isTensor === true;
}

/** Values accepted by {@linkcode Module.loadStateDict}: tensors, or CPU data with a shape. */
export type StateValue = Tensor | { data: TensorData; shape: readonly number[]; dtype?: DType };

/** Options of {@linkcode Module.loadStateDict}. */
export interface LoadStateOptions {
  /** Missing or unexpected keys are errors (default true). Shape mismatches are always errors. */
  strict?: boolean;
}

/** What {@linkcode Module.loadStateDict} did. */
export interface LoadStateResult {
  /** Keys the module has that the state did not provide. */
  missing: string[];
  /** Keys the state had that the module does not. */
  unexpected: string[];
}

/** Base class of layers and models. */
export class Module {
  /** Training mode (dropout active) or evaluation mode. */
  training = true;

  /** Property names that hold tensors which are not parameters (caches); excluded from parameters and state. */
  protected nonState(): string[] {
    return [];
  }

  /** Direct submodules by name (arrays of modules expand to `name.i`). */
  namedChildren(): [string, Module][] {
    const out: [string, Module][] = [];
    for (const [key, v] of Object.entries(this)) {
      if (v instanceof Module) out.push([key, v]);
      else if (Array.isArray(v) && v.length > 0 && v.every((x) => x instanceof Module)) {
        v.forEach((m, i) => out.push([`${key}.${i}`, m]));
      }
    }
    return out;
  }

  /** This module's own tensors (not its children's), by name. */
  ownTensors(): [string, Tensor][] {
    const skip = new Set(this.nonState());
    const out: [string, Tensor][] = [];
    for (const [key, v] of Object.entries(this)) if (isTensor(v) && !skip.has(key)) out.push([key, v]);
    return out;
  }

  /** Every module below and including this one, with dotted names ("" for this one). */
  namedModules(prefix = ""): [string, Module][] {
    const out: [string, Module][] = [[prefix, this]];
    for (const [name, m] of this.namedChildren()) out.push(...m.namedModules(prefix ? `${prefix}.${name}` : name));
    return out;
  }

  /** Every tensor (parameters, trainable or frozen) with its dotted name. */
  namedParameters(prefix = ""): [string, Tensor][] {
    const out: [string, Tensor][] = [];
    for (const [name, m] of this.namedModules(prefix)) {
      for (const [k, t] of m.ownTensors()) out.push([name ? `${name}.${k}` : k, t]);
    }
    return out;
  }

  /** Every parameter tensor. */
  parameters(): Tensor[] {
    return this.namedParameters().map(([, t]) => t);
  }

  /** The parameters that require gradients (what an optimizer gets). */
  trainableParameters(): Tensor[] {
    return this.parameters().filter((t) => t.requiresGrad);
  }

  /** Number of logical parameters of this module's own tensors (quantized layers override it). */
  ownParameterCount(): number {
    return this.ownTensors().reduce((a, [, t]) => a + t.numel, 0);
  }

  /** Sets training mode here and below; returns this. */
  train(on = true): this {
    for (const [, m] of this.namedModules()) m.training = on;
    return this;
  }

  /** Evaluation mode (dropout off); returns this. */
  eval(): this {
    return this.train(false);
  }

  /** Sets `requiresGrad` on every parameter; returns this. */
  requiresGrad_(on = true): this {
    for (const t of this.parameters()) t.requiresGrad_(on);
    return this;
  }

  /** The submodule at a dotted path ("model.layers.3.mlp"); throws naming the path when missing. */
  getSubmodule(path: string): Module {
    if (path === "") return this;
    const found = this.namedModules().find(([n]) => n === path);
    if (!found) throw new Error(`No submodule "${path}"`);
    return found[1];
  }

  /** Replaces the submodule at a dotted path (used by quantization and LoRA injection); list items too. */
  setSubmodule(path: string, m: Module): void {
    const dot = path.lastIndexOf(".");
    const last = path.slice(dot + 1);
    if (/^\d+$/.test(last) && dot > 0) {
      // "model.layers.3": item 3 of the list property "layers" of "model".
      const listPath = path.slice(0, dot);
      const d2 = listPath.lastIndexOf(".");
      const owner = this.getSubmodule(d2 < 0 ? "" : listPath.slice(0, d2)) as unknown as Record<string, unknown>;
      const list = owner[listPath.slice(d2 + 1)];
      if (!Array.isArray(list) || !(list[Number(last)] instanceof Module)) {
        throw new Error(`No submodule "${path}" to replace`);
      }
      list[Number(last)] = m;
      return;
    }
    const rec = this.getSubmodule(dot < 0 ? "" : path.slice(0, dot)) as unknown as Record<string, unknown>;
    if (!(rec[last] instanceof Module)) throw new Error(`No submodule "${path}" to replace`);
    rec[last] = m;
  }

  /** Parameters by name (the tensors themselves, not copies). */
  stateDict(): Map<string, Tensor> {
    return new Map(this.namedParameters());
  }

  /**
   * Copies values into this module's parameters by name. Shape mismatches are always errors; missing and
   * unexpected keys are errors unless `strict: false`. Each error lists the offending keys.
   */
  loadStateDict(
    state: Map<string, StateValue> | Record<string, StateValue>,
    opts: LoadStateOptions = {},
  ): LoadStateResult {
    const strict = opts.strict ?? true;
    const entries = state instanceof Map ? state : new Map(Object.entries(state));
    const own = this.stateDict();
    const missing = [...own.keys()].filter((k) => !entries.has(k));
    const unexpected = [...entries.keys()].filter((k) => !own.has(k));
    const badShape: string[] = [];
    for (const [k, v] of entries) {
      const t = own.get(k);
      if (!t) continue;
      const shape = v.shape;
      if (shape.length !== t.shape.length || shape.some((d, i) => d !== t.shape[i])) {
        badShape.push(`${k}: expected ${fmtShape(t.shape)}, got ${fmtShape(shape)}`);
      }
    }
    const problems: string[] = [];
    if (badShape.length) problems.push(`mis-shaped keys:\n  ${badShape.join("\n  ")}`);
    if (strict && missing.length) problems.push(`missing keys: ${listKeys(missing)}`);
    if (strict && unexpected.length) problems.push(`unexpected keys: ${listKeys(unexpected)}`);
    if (problems.length) throw new Error(`loadStateDict: ${problems.join("\n")}`);
    for (const [k, v] of entries) {
      const t = own.get(k);
      if (t) assign(this, k, t, v);
    }
    return { missing, unexpected };
  }

  /** Frees every parameter's GPU memory. */
  dispose(): void {
    for (const t of this.parameters()) t.dispose();
  }
}

function listKeys(keys: string[]): string {
  return keys.length <= 8 ? keys.join(", ") : `${keys.slice(0, 8).join(", ")} … (${keys.length} in all)`;
}

/** Replaces parameter `name` of `root` by a tensor holding `v`'s values, in the parameter's dtype. */
function assign(root: Module, name: string, old: Tensor, v: StateValue): void {
  const dot = name.lastIndexOf(".");
  const owner = root.getSubmodule(dot < 0 ? "" : name.slice(0, dot)) as unknown as Record<string, Tensor>;
  const key = name.slice(dot + 1);
  let fresh: Tensor;
  if (isTensor(v)) fresh = v.dtype === old.dtype ? v.contiguous() : v.to(old.dtype);
  else fresh = fromArray(v.data, v.shape, { dtype: v.dtype ?? old.dtype }).keep();
  if (fresh.dtype !== old.dtype) {
    const c = fresh.to(old.dtype);
    fresh.dispose();
    fresh = c;
  }
  if (!isPlaceholder(old) && old.isContiguous && fresh.isContiguous && fresh.storage !== old.storage) {
    // Like PyTorch's load_state_dict: copy into the existing tensor, so references to it (an optimizer's parameter
    // list, a caller's handle) stay valid.
    const bytes = old.numel * (old.dtype === "f16" ? 2 : 4);
    const isz = old.dtype === "f16" ? 2 : 4;
    if ((fresh.offset * isz) % 4 === 0 && (old.offset * isz) % 4 === 0 && bytes % 4 === 0) {
      getGpu().copy(fresh.storage.buffer, fresh.offset * isz, old.storage.buffer, old.offset * isz, bytes);
      fresh.dispose();
      return;
    }
  }
  fresh.keep();
  fresh.requiresGrad = old.requiresGrad;
  fresh.name = old.name ?? name;
  owner[key] = fresh;
  if (fresh.storage !== old.storage) old.dispose();
}
