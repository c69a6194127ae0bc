/**
 * Differentiable softmax and log-softmax along any axis (the last axis runs in place; another axis is moved last
 * first). Computed in f32; f16 inputs give f16 outputs.
 *
 * @example
 * ```ts
 * import { logSoftmax, softmax } from "./softmax.ts";
 * const p = softmax(scores, -1);
 * const lp = logSoftmax(logits);
 * ```
 * @module
 */
import { record } from "../autograd.ts";
import { getGpu, type Kernel, type KernelSource } from "../gpu.ts";
import { rowGrid, UniformWriter } from "../kernels/common.ts";
import { softmaxBackwardKernel, softmaxKernel } from "../kernels/softmax.ts";
import { Tensor } from "../tensor.ts";
import { cast } from "./elementwise.ts";
import { contiguous, transpose } from "./shape.ts";

const kernels = new Map<string, Kernel>();
function kernel(key: string, make: () => KernelSource): Kernel {
  let k = kernels.get(key);
  if (!k) kernels.set(key, k = getGpu().kernel(make()));
  return k;
}

function rowsOf(x: Tensor): [number, number] {
  const n = x.shape[x.ndim - 1] ?? 1;
  return [n === 0 ? 0 : x.numel / n, n];
}

function forward(x: Tensor, log: boolean): Tensor {
  using c = contiguous(x);
  const [rows, n] = rowsOf(c);
  const y = Tensor.empty(c.shape, "f32");
  const u = new UniformWriter(4).u(0, rows).u(1, n).u(2, c.offset);
  if (rows > 0) {
    getGpu().dispatch(
      kernel(`f${log}${c.dtype}`, () => softmaxKernel({ log, input: c.dtype })),
      [
        c.storage.buffer,
        y.storage.buffer,
      ],
      u.u32,
      rowGrid(rows),
    );
  }
  return y;
}

function backward(y: Tensor, g: Tensor, log: boolean): Tensor {
  using gc = contiguous(g);
  const [rows, n] = rowsOf(y);
  const dx = Tensor.empty(y.shape, "f32");
  const u = new UniformWriter(4).u(0, rows).u(1, n).u(2, y.offset).u(3, gc.offset);
  if (rows > 0) {
    getGpu().dispatch(
      kernel(`b${log}${gc.dtype}`, () => softmaxBackwardKernel({ log, grad: gc.dtype })),
      [
        y.storage.buffer,
        gc.storage.buffer,
        dx.storage.buffer,
      ],
      u.u32,
      rowGrid(rows),
    );
  }
  return dx;
}

function along(x: Tensor, axis: number, log: boolean): Tensor {
  x.assertAlive(log ? "logSoftmax" : "softmax");
  const a = axis < 0 ? axis + x.ndim : axis;
  if (a < 0 || a >= x.ndim) throw new Error(`softmax: axis ${axis} is out of range for ${x.ndim} dimensions`);
  if (a !== x.ndim - 1) {
    using t = transpose(x, a, -1);
    using y = along(t, -1, log);
    using back = transpose(y, a, -1); // a view: disposing it here keeps y's storage from leaking
    return contiguous(back);
  }
  const y32 = forward(x, log);
  const out = x.dtype === "f16" ? cast(y32, "f16") : y32;
  record(out, log ? "logSoftmax" : "softmax", [x], [y32], (g, [sy]) => {
    const d = backward(sy, g, log);
    if (x.dtype !== "f16") return [d];
    const h = cast(d, "f16");
    d.dispose();
    return [h];
  });
  if (out !== y32) y32.dispose();
  return out;
}

/**
 * Softmax along `axis` (default last).
 *
 * @example
 * ```ts
 * const probs = softmax(logits);
 * ```
 */
export function softmax(x: Tensor, axis = -1): Tensor {
  return along(x, axis, false);
}

/**
 * Log-softmax along `axis` (default last), computed stably as `x − max − log Σ exp(x − max)`.
 *
 * @example
 * ```ts
 * const logp = logSoftmax(logits);
 * ```
 */
export function logSoftmax(x: Tensor, axis = -1): Tensor {
  return along(x, axis, true);
}
