/**
 * Reverse-mode automatic differentiation.
 *
 * Each differentiable op that has an input requiring a gradient attaches a {@linkcode GradNode} to its output:
 * the inputs, the tensors its backward rule needs (held as private aliases, so a caller may dispose its own
 * handles freely), and the rule. `loss.backward()` orders the graph topologically, runs the rules from the loss
 * down, accumulates into `.grad` of leaves, and frees each node's saved tensors as soon as its rule has run.
 * Gradients are computed only for inputs that require them.
 *
 * @example
 * ```ts
 * import { noGrad } from "./autograd.ts";
 * const y = noGrad(() => model.forward(x)); // records nothing, keeps nothing for backward
 * ```
 * @module
 */
import type { Tensor } from "./tensor.ts";

/** A backward rule: the gradient of the output → gradients of the inputs (null where not needed). */
export type BackwardRule = (grad: Tensor, saved: Tensor[], needs: boolean[]) => (Tensor | null)[];

/** One recorded op in the graph. */
export class GradNode {
  /** Op name, for errors. */
  readonly name: string;
  /** The op's inputs (graph edges; their buffers are not used by the rule unless also saved). */
  readonly inputs: Tensor[];
  /** Which inputs need a gradient. */
  readonly needs: boolean[];
  /** Private aliases of the tensors the rule needs. */
  saved: Tensor[];
  /** The rule. */
  readonly rule: BackwardRule;

  /** Creates a node; `saved` must already be aliases owned by the node. */
  constructor(name: string, inputs: Tensor[], saved: Tensor[], rule: BackwardRule) {
    this.name = name;
    this.inputs = inputs;
    this.needs = inputs.map((t) => t.requiresGrad);
    this.saved = saved;
    this.rule = rule;
  }

  /** True once a backward pass has run this node's rule (its saved tensors are gone). */
  consumed = false;

  /** Frees the saved tensors. Safe to call twice. */
  release(): void {
    for (const t of this.saved) t.dispose();
    this.saved = [];
  }
}

let gradEnabled = true;

/** True unless inside {@linkcode noGrad}. */
export function isGradEnabled(): boolean {
  return gradEnabled;
}

/**
 * Runs `fn` without recording the graph (like `torch.no_grad()`); works for async `fn` too.
 *
 * @example
 * ```ts
 * const logits = noGrad(() => model.forward(ids).logits);
 * ```
 */
export function noGrad<T>(fn: () => T): T {
  const before = gradEnabled;
  gradEnabled = false;
  let result: T;
  try {
    result = fn();
  } catch (e) {
    gradEnabled = before;
    throw e;
  }
  if (result instanceof Promise) {
    return result.finally(() => (gradEnabled = before)) as T;
  }
  gradEnabled = before;
  return result;
}

/** Sets whether ops record the graph; returns the previous setting (for gradient checkpointing's recompute). */
export function setGradEnabled(on: boolean): boolean {
  const before = gradEnabled;
  gradEnabled = on;
  return before;
}

/**
 * Attaches a backward rule to `out` when recording is on and some input requires a gradient; `save` lists the
 * tensors the rule will receive (aliased, so callers may dispose their handles). Returns `out`.
 */
export function record(
  out: Tensor,
  name: string,
  inputs: Tensor[],
  save: Tensor[],
  rule: BackwardRule,
): Tensor {
  if (!gradEnabled || !inputs.some((t) => t.requiresGrad)) return out;
  out.requiresGrad = true;
  out.node = new GradNode(name, inputs, save.map((t) => t.alias()), rule);
  return out;
}
