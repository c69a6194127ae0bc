/**
 * Deferred weight initialisation: layers built inside {@linkcode withDeferredInit} get placeholder weights (no GPU
 * memory, no random draws) that a checkpoint loader then replaces, so loading a 7B model never holds a random copy.
 *
 * @example
 * ```ts
 * import { isPlaceholder, withDeferredInit } from "./init.ts";
 * const model = withDeferredInit(() => new LlamaForCausalLM(cfg, { dtype: "f16" }));
 * model.loadStateDict(weights); // every placeholder replaced, or an error naming the missing keys
 * ```
 * @module
 */
import type { DType } from "../core/dtype.ts";
import { Storage, Tensor } from "../core/tensor.ts";

let deferred = 0;

/**
 * Runs `fn` with weight initialisation deferred: layers built inside get placeholder weights (no GPU memory, no
 * random draws) that a checkpoint loader must replace. Used so that loading a 7B model never holds a random copy.
 *
 * @example
 * ```ts
 * const model = withDeferredInit(() => new LlamaForCausalLM(cfg, { dtype: "f16" }));
 * model.loadStateDict(weights); // every placeholder replaced, or an error naming the missing keys
 * ```
 */
export function withDeferredInit<T>(fn: () => T): T {
  deferred++;
  try {
    return fn();
  } finally {
    deferred--;
  }
}

let placeholderStorage: Storage | null = null;

/** True for a weight created under {@linkcode withDeferredInit} and not yet loaded. */
export function isPlaceholder(t: Tensor): boolean {
  return placeholderStorage !== null && t.storage === placeholderStorage;
}

/** A layer's weight: `init()` normally, a placeholder under deferred initialisation. */
export function param(shape: number[], dtype: DType, init: () => Tensor): Tensor {
  if (deferred === 0) return init().keep();
  placeholderStorage ??= new Storage(4);
  placeholderStorage.retain();
  const t = new Tensor(placeholderStorage, shape, dtype, undefined, 0, false);
  return t.keep();
}
