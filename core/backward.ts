/**
 * The backward pass: topological order over the graph below a tensor, rules run from the output down, gradients
 * summed where a tensor feeds several ops, leaves' `.grad` accumulated, and every node's saved tensors freed as
 * soon as its rule has run (the graph is consumed, like PyTorch without `retain_graph`). Each rule runs inside a
 * scope, so its temporaries are freed at once.
 *
 * @example
 * ```ts
 * import { runBackward } from "./backward.ts";
 * runBackward(loss); // same as loss.backward()
 * ```
 * @module
 */
import { noGrad } from "./autograd.ts";
import { full } from "./creation.ts";
import { add } from "./ops/elementwise.ts";
import { contiguous } from "./ops/shape.ts";
import { keep, scope } from "./scope.ts";
import { fmtShape, type Tensor } from "./tensor.ts";
import { getGpu, type Kernel } from "./gpu.ts";
import { broadcastShapes, broadcastStrides, elementwise } from "./ops/dispatch.ts";
import { gridFor, UniformWriter } from "./kernels/common.ts";
import {
  ACCUMULATE_UNIFORM_WORDS,
  accumulateKernel,
  type AccumulateMode,
  inPlaceThreads,
  OPTIM_WORKGROUP,
} from "./kernels/optim.ts";

/** Back-propagates from `root` (a scalar, or any shape with `grad` given). */
export function runBackward(root: Tensor, grad?: Tensor): void {
  root.assertAlive("backward");
  if (!root.requiresGrad) {
    throw new Error(
      "backward(): this tensor does not require a gradient (no input had requiresGrad, or it was computed under noGrad)",
    );
  }
  if (!grad && root.numel !== 1) {
    throw new Error(
      `backward() on a tensor of shape ${fmtShape(root.shape)} needs a gradient of that shape: ` +
        "call backward(grad) or reduce it to a scalar first (e.g. .sum() or .mean())",
    );
  }
  if (grad && (grad.ndim !== root.ndim || grad.shape.some((d, i) => d !== root.shape[i]))) {
    throw new Error(`backward(grad): grad shape ${fmtShape(grad.shape)} differs from ${fmtShape(root.shape)}`);
  }
  const order = topoOrder(root);
  noGrad(() => {
    const grads = new Map<Tensor, Tensor>();
    grads.set(root, grad ? grad.detach() : full(root.shape, 1, { dtype: root.dtype }));
    for (const t of order) {
      const g = grads.get(t);
      grads.delete(t);
      if (!g) continue;
      const node = t.node;
      if (!node) {
        accumulateLeaf(t, g);
        continue;
      }
      const inGrads = scope(() => node.rule(g, node.saved, node.needs));
      g.dispose();
      node.release();
      node.consumed = true;
      node.inputs.forEach((inp, i) => {
        const gi = inGrads[i];
        if (!gi) return;
        if (!node.needs[i]) {
          gi.dispose();
          return;
        }
        const prev = grads.get(inp);
        if (prev) {
          grads.set(inp, add(prev, gi));
          prev.dispose();
          gi.dispose();
        } else {
          grads.set(inp, gi);
        }
      });
    }
    for (const g of grads.values()) g.dispose();
  });
}

/** Tensors reachable from `root` through nodes, each after every tensor computed from it (root first). */
function topoOrder(root: Tensor): Tensor[] {
  const visited = new Set<Tensor>();
  const post: Tensor[] = [];
  // Iterative DFS (graphs of large models are deep enough to overflow recursion).
  const stack: [Tensor, number][] = [[root, 0]];
  visited.add(root);
  while (stack.length) {
    const top = stack[stack.length - 1];
    const [t, i] = top;
    if (t.node?.consumed) {
      throw new Error(
        `backward(): the graph through "${t.node.name}" was already used by an earlier backward() and freed; ` +
          "run the forward pass again (webtune does not retain graphs)",
      );
    }
    const inputs = t.node?.inputs ?? [];
    if (i < inputs.length) {
      top[1]++;
      const next = inputs[i];
      if (next.requiresGrad && !visited.has(next)) {
        visited.add(next);
        stack.push([next, 0]);
      }
    } else {
      stack.pop();
      post.push(t);
    }
  }
  return post.reverse();
}

/** Adds `g` into `leaf.grad` (creating it, row-major and in the leaf's dtype, on first use). */
function accumulateLeaf(leaf: Tensor, g: Tensor): void {
  if (leaf.grad && !leaf.grad.disposed) {
    // In place: grad += g.
    accumulateInto(leaf.grad, g);
    g.dispose();
    return;
  }
  let owned = g.isContiguous && g.dtype === leaf.dtype && g.offset === 0 ? g : contiguousAs(g, leaf.dtype);
  if (owned !== g) g.dispose();
  if (owned.storage.refCount > 1) {
    // Shares storage with something else (a view of a forward tensor): take a private copy.
    const copy = elementwise("copy", "a", [owned], { out: leaf.dtype });
    owned.dispose();
    owned = copy;
  }
  leaf.grad = keep(owned);
}

function contiguousAs(g: Tensor, dtype: Tensor["dtype"]): Tensor {
  if (g.dtype === dtype) return contiguous(g);
  return elementwise("copy", "a", [g], { out: dtype });
}

const accumulateKernels = new Map<string, Kernel>();

/**
 * `dst += src` in place (dst row-major f32/f16, src broadcastable to it): one dispatch that binds `dst` once,
 * read_write, so the open compute pass goes on. A `src` sharing `dst`'s memory is copied first (WebGPU cannot
 * bind one buffer both read-only and writable in a dispatch).
 */
export function accumulateInto(dst: Tensor, src: Tensor): void {
  dst.assertAlive("accumulateInto");
  src.assertAlive("accumulateInto");
  if (dst.dtype !== "f32" && dst.dtype !== "f16") throw new Error(`accumulateInto: dst is ${dst.dtype}, not a float`);
  if (!dst.isContiguous) throw new Error(`accumulateInto: dst of shape ${fmtShape(dst.shape)} is not row-major`);
  const shape = dst.shape;
  const b = src.numel === 1 ? shape : broadcastShapes([shape, src.shape], "accumulateInto");
  if (b.length !== shape.length || b.some((d, i) => d !== shape[i])) {
    throw new Error(`accumulateInto: ${fmtShape(src.shape)} does not broadcast to ${fmtShape(shape)}`);
  }
  const n = dst.numel;
  if (n === 0) return;
  if (src.storage === dst.storage) {
    using copy = elementwise("copy", "a", [src], { out: src.dtype });
    accumulateInto(dst, copy);
    return;
  }
  const rank = Math.max(shape.length, 1);
  const sameLayout = src.isContiguous && src.ndim === shape.length && src.shape.every((d, i) => d === shape[i]);
  const mode: AccumulateMode = src.numel === 1 ? "scalar" : sameLayout ? "contiguous" : "strided";
  const key = `${dst.dtype}|${src.dtype}|${mode}|${rank}`;
  const gpu = getGpu();
  let k = accumulateKernels.get(key);
  if (!k) accumulateKernels.set(key, k = gpu.kernel(accumulateKernel(dst.dtype, src.dtype, mode, rank)));
  const u = new UniformWriter(ACCUMULATE_UNIFORM_WORDS);
  const s = shape.length ? shape : [1];
  s.forEach((d, i) => u.u(i, d));
  if (mode === "strided") broadcastStrides(src, shape).forEach((st, i) => u.u(8 + i, st));
  u.u(16, n).u(17, dst.offset).u(18, src.offset);
  const threads = inPlaceThreads(dst.dtype, n, dst.offset);
  gpu.dispatch(k, [dst.buffer, src.buffer], u.u32, gridFor(threads, OPTIM_WORKGROUP));
}
