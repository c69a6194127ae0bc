/**
 * Gradient checkpointing: run a block without keeping its activations, and recompute it during the backward
 * pass (trading one extra forward for memory, as PEFT's k-bit training does by default). The block's random
 * draws (dropout masks) are replayed exactly, so gradients equal those of the plain block.
 *
 * @example
 * ```ts
 * import { checkpoint } from "./checkpoint.ts";
 * const y = checkpoint((h, [pos]) => layer.forward(h, pos), x, [positions], layer.trainableParameters());
 * ```
 * @module
 */
import { noGrad, record, setGradEnabled } from "../core/autograd.ts";
import { getRngState, setRngState } from "../core/random.ts";
import type { Tensor } from "../core/tensor.ts";

/**
 * Computes `fn(x, extras)` without recording its graph; in backward, recomputes it with gradients and
 * back-propagates into `x` and into `params` (the trainable tensors `fn` uses, which receive their `.grad`
 * directly). `extras` are further inputs without gradients (positions, masks): they are kept for the recompute.
 */
export function checkpoint(
  fn: (x: Tensor, extras: Tensor[]) => Tensor,
  x: Tensor,
  extras: Tensor[],
  params: Tensor[],
): Tensor {
  const rng = getRngState();
  const y = noGrad(() => fn(x, extras));
  return record(y, "checkpoint", [x, ...params], [x, ...extras], (g, [sx, ...savedExtras], needs) => {
    const after = getRngState();
    setRngState(rng);
    const was = setGradEnabled(true);
    try {
      const input = sx.detach();
      if (needs[0]) input.requiresGrad_(true);
      const out = fn(input, savedExtras);
      if (out.requiresGrad) out.backward(g);
      else out.dispose();
      const gx = needs[0] ? input.grad : null;
      input.grad = null;
      return [gx, ...params.map(() => null)];
    } finally {
      setGradEnabled(was);
      setRngState(after);
    }
  });
}
