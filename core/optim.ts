/**
 * Optimizers and gradient clipping that update tensors in place on the GPU, with the semantics of
 * `torch.optim.AdamW`, `torch.optim.SGD` and `torch.nn.utils.clip_grad_norm_`.
 *
 * AdamW's step is one fused kernel for up to 12 parameters (it reads p, g, m, v and writes p, m, v), so the dozens
 * of small LoRA tensors of a model cost a few dispatches, like torch's `foreach` path; SGD's is one per parameter.
 * Step-dependent scalars such as AdamW's bias corrections are computed on the CPU from the step count and passed as
 * uniforms, so a step never reads anything back. Optimizer state is f32 and kept (no `scope` frees it); parameters
 * must be f32 (trainable weights are f32 in this project). Parameters whose `grad` is null are skipped, as in
 * PyTorch.
 *
 * An in-place update is not seen by the autograd graph: step after `backward()`, not between a forward pass and
 * its backward (PyTorch would raise its "modified by an inplace operation" error there).
 *
 * @example
 * ```ts
 * import { AdamW, clipCoefficient } from "./optim.ts";
 * const params = model.parameters();
 * const opt = new AdamW(params, { lr: 2e-4, weightDecay: 0 });
 * scope(() => {
 *   model.forward(x).loss.backward();
 *   opt.step({ gradScale: clipCoefficient(params, 1.0).coef }); // clip_grad_norm_(1.0), then the update
 *   opt.zeroGrad();
 * });
 * ```
 * @module
 */
import { fromArray, zeros } from "./creation.ts";
import type { DType } from "./dtype.ts";
import { getGpu, type Kernel, type KernelSource } from "./gpu.ts";
import { gridFor, UniformWriter } from "./kernels/common.ts";
import {
  adamwKernel,
  adamwUniformWords,
  COMBINE_UNIFORM_WORDS,
  inPlaceThreads,
  MULTI_MAX_SEGMENTS,
  normCombineKernel,
  OPTIM_WORKGROUP,
  SCALE_UNIFORM_WORDS,
  scaleByScalarKernel,
  SGD_UNIFORM_WORDS,
  sgdKernel,
  sumSquaresGroups,
  sumSquaresKernel,
  sumSquaresUniformWords,
} from "./kernels/optim.ts";
import { keep } from "./scope.ts";
import { fmtShape, Tensor } from "./tensor.ts";

const kernels = new Map<string, Kernel>();

/** Compiles a kernel once per key. */
function cachedKernel(key: string, make: () => KernelSource): Kernel {
  let k = kernels.get(key);
  if (!k) kernels.set(key, k = getGpu().kernel(make()));
  return k;
}

function describe(p: Tensor, i: number): string {
  return `parameter ${i}${p.name ? ` ("${p.name}")` : ""} of shape ${fmtShape(p.shape)}`;
}

/** Checks an optimizer's parameter list: f32, row-major, alive, no duplicates. */
function checkParams(opt: string, params: Tensor[]): Tensor[] {
  if (!Array.isArray(params)) throw new Error(`${opt}: params must be an array of tensors`);
  const seen = new Set<Tensor>();
  params.forEach((p, i) => {
    p.assertAlive(opt);
    if (p.dtype !== "f32") {
      throw new Error(
        `${opt}: ${describe(p, i)} is ${p.dtype}; trainable parameters must be f32 ` +
          "(keep frozen weights in f16/NF4 out of the optimizer, or convert trainable ones with .to('f32'))",
      );
    }
    if (!p.isContiguous) throw new Error(`${opt}: ${describe(p, i)} is not row-major; pass a contiguous tensor`);
    if (seen.has(p)) throw new Error(`${opt}: ${describe(p, i)} appears more than once in the parameter list`);
    seen.add(p);
  });
  return params.slice();
}

/** The gradient of `p` ready for an in-place kernel, or null when there is none. */
function gradOf(opt: string, p: Tensor, i: number): Tensor | null {
  const g = p.grad;
  if (!g) return null;
  g.assertAlive(`${opt}: gradient of ${describe(p, i)}`);
  if (g.numel !== p.numel || g.ndim !== p.ndim || g.shape.some((d, j) => d !== p.shape[j])) {
    throw new Error(`${opt}: gradient of shape ${fmtShape(g.shape)} does not match ${describe(p, i)}`);
  }
  if (g.dtype !== "f32" && g.dtype !== "f16") throw new Error(`${opt}: gradient of ${describe(p, i)} is ${g.dtype}`);
  if (!g.isContiguous) throw new Error(`${opt}: gradient of ${describe(p, i)} is not row-major`);
  if (g.storage === p.storage) throw new Error(`${opt}: gradient of ${describe(p, i)} shares the parameter's memory`);
  return g;
}

/**
 * Splits `items` into the groups one multi-tensor dispatch takes: items with equal `key` together, in order of first
 * appearance, at most `max` per group.
 */
function dispatchGroups<T>(items: T[], max: number, key: (item: T) => string): T[][] {
  const byKey = new Map<string, T[]>();
  for (const it of items) {
    const k = key(it);
    const list = byKey.get(k);
    if (list) list.push(it);
    else byKey.set(k, [it]);
  }
  const groups: T[][] = [];
  for (const list of byKey.values()) {
    for (let i = 0; i < list.length; i += max) groups.push(list.slice(i, i + max));
  }
  return groups;
}

/** Tensors per multi-tensor dispatch when each needs `buffersEach` storage bindings and `extra` more are bound. */
function segmentsPerDispatch(buffersEach: number, extra: number): number {
  const fit = Math.floor((getGpu().info.maxStorageBuffersPerShaderStage - extra) / buffersEach);
  return Math.max(1, Math.min(MULTI_MAX_SEGMENTS, fit));
}

function checkNumber(opt: string, name: string, v: number, ok: boolean, want: string): void {
  if (typeof v !== "number" || Number.isNaN(v) || !ok) throw new Error(`${opt}: invalid ${name} ${v}: ${want}`);
}

/** Downloads a kept state tensor. */
async function download(t: Tensor): Promise<Float32Array> {
  return new Float32Array(await t.toArray());
}

/** Uploads saved state for parameter `p` (checking its size) as a kept tensor. */
function upload(opt: string, data: ArrayLike<number>, p: Tensor, i: number, what: string): Tensor {
  if (data.length !== p.numel) {
    throw new Error(
      `${opt}.loadStateDict: ${what} of ${describe(p, i)} has ${data.length} values, expected ${p.numel}`,
    );
  }
  const arr = data instanceof Float32Array ? data : Float32Array.from(data);
  return keep(fromArray(arr, p.shape, { dtype: "f32" }));
}

// ---- AdamW --------------------------------------------------------------------------------------------------------

/** Options of {@linkcode AdamW} (defaults as torch.optim.AdamW). */
export interface AdamWOptions {
  /** Learning rate. */
  lr: number;
  /** Coefficients of the running averages of the gradient and its square (default [0.9, 0.999]). */
  betas?: [number, number];
  /** Added to the denominator for stability (default 1e-8). */
  eps?: number;
  /** Decoupled weight decay (default 0.01). */
  weightDecay?: number;
}

/** AdamW state of one parameter (as in torch's `state_dict()["state"][i]`). */
export interface AdamWParamState {
  /** Steps taken by this parameter. */
  step: number;
  /** Running average of the gradient (`exp_avg`), row-major. */
  expAvg: Float32Array;
  /** Running average of the squared gradient (`exp_avg_sq`), row-major. */
  expAvgSq: Float32Array;
}

/** What {@linkcode AdamW.stateDict} returns: per-parameter state keyed by parameter index, and hyperparameters. */
export interface AdamWStateDict {
  /** State of each parameter that has taken a step, keyed by its index in the parameter list. */
  state: Record<number, AdamWParamState>;
  /** Hyperparameters (the learning rate included, so a resumed run continues its schedule). */
  paramGroups: [{ lr: number; betas: [number, number]; eps: number; weightDecay: number }];
}

interface AdamSlot {
  step: number;
  expAvg: Tensor;
  expAvgSq: Tensor;
}

/**
 * AdamW with decoupled weight decay, exactly as torch.optim.AdamW: per step, for each parameter with a gradient,
 * `p ← p·(1 − lr·wd)`, `m ← β1·m + (1 − β1)·g`, `v ← β2·v + (1 − β2)·g²`, and
 * `p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + eps)`, in one fused kernel per parameter.
 *
 * @example
 * ```ts
 * const opt = new AdamW([w, b], { lr: 1e-3, weightDecay: 0.01 });
 * scope(() => {
 *   x.matmul(w).add(b).sub(y).square().mean().backward();
 *   opt.step();
 *   opt.zeroGrad();
 * });
 * const saved = await opt.stateDict(); // later: opt.loadStateDict(saved)
 * ```
 */
export class AdamW {
  /** The parameters, in the order given. */
  readonly params: Tensor[];
  /** Learning rate used by the next {@linkcode AdamW.step} (schedulers set it). */
  lr: number;
  /** (β1, β2). */
  betas: [number, number];
  /** Denominator epsilon. */
  eps: number;
  /** Decoupled weight decay coefficient. */
  weightDecay: number;
  private readonly slots: (AdamSlot | null)[];

  /** Creates the optimizer; state is allocated on each parameter's first step. */
  constructor(params: Tensor[], opts: AdamWOptions) {
    this.params = checkParams("AdamW", params);
    const { lr, betas = [0.9, 0.999], eps = 1e-8, weightDecay = 0.01 } = opts;
    checkNumber("AdamW", "lr", lr, lr >= 0, "it must be ≥ 0");
    checkNumber("AdamW", "eps", eps, eps >= 0, "it must be ≥ 0");
    for (const [i, b] of betas.entries()) {
      checkNumber("AdamW", `betas[${i}]`, b, b >= 0 && b < 1, "it must lie in [0, 1)");
    }
    checkNumber("AdamW", "weightDecay", weightDecay, weightDecay >= 0, "it must be ≥ 0");
    this.lr = lr;
    this.betas = [betas[0], betas[1]];
    this.eps = eps;
    this.weightDecay = weightDecay;
    this.slots = this.params.map(() => null);
  }

  /**
   * Updates every parameter that has a gradient, up to {@linkcode MULTI_MAX_SEGMENTS} parameters per dispatch
   * (fewer where the device binds fewer buffers); nothing is read back. `gradScale` (a one-element f32 tensor on
   * the GPU, such as {@linkcode clipCoefficient}'s `coef`) multiplies every gradient inside the update, so clipping
   * costs no pass over the gradients; the gradients themselves are left as they are.
   */
  step(opts: { gradScale?: Tensor } = {}): void {
    checkNumber("AdamW", "lr", this.lr, this.lr >= 0, "it must be ≥ 0");
    const scale = opts.gradScale;
    if (scale) {
      scale.assertAlive("AdamW.step: gradScale");
      if (scale.dtype !== "f32" || scale.numel !== 1 || scale.offset !== 0) {
        throw new Error(
          `AdamW.step: gradScale must be a one-element f32 tensor at offset 0, got ${scale.dtype} ${
            fmtShape(scale.shape)
          } at offset ${scale.offset}`,
        );
      }
    }
    const [b1, b2] = this.betas;
    const gpu = getGpu();
    const items: { p: Tensor; g: Tensor; s: AdamSlot }[] = [];
    this.params.forEach((p, i) => {
      p.assertAlive("AdamW.step");
      const g = gradOf("AdamW", p, i);
      if (!g) return;
      let s = this.slots[i];
      if (!s) {
        s = this.slots[i] = {
          step: 0,
          expAvg: keep(zeros(p.shape, { dtype: "f32" })),
          expAvgSq: keep(zeros(p.shape, { dtype: "f32" })),
        };
      }
      if (s.expAvg.disposed || s.expAvgSq.disposed) {
        throw new Error(`AdamW.step: the state of ${describe(p, i)} was disposed (only AdamW.dispose() may free it)`);
      }
      s.step++;
      if (p.numel > 0) items.push({ p, g, s });
    });
    // One dispatch per group of parameters with the same step count (the bias corrections) and gradient dtype.
    const max = segmentsPerDispatch(4, scale ? 1 : 0);
    for (const group of dispatchGroups(items, max, (it) => `${it.s.step}|${it.g.dtype}`)) {
      const step = group[0].s.step;
      // Scalars as torch computes them in Python (double precision), rounded to f32 for the kernel.
      const biasCorrection1 = 1 - b1 ** step;
      const biasCorrection2 = 1 - b2 ** step;
      const u = new UniformWriter(adamwUniformWords(group.length))
        .f(0, 1 - this.lr * this.weightDecay)
        .f(1, 1 - b1).f(2, b1).f(3, b2).f(4, 1 - b2)
        .f(5, this.lr / biasCorrection1)
        .f(6, Math.sqrt(biasCorrection2))
        .f(7, this.eps);
      let start = 0;
      const buffers: GPUBuffer[] = [];
      group.forEach(({ p, g, s }, j) => {
        u.u(8 + 4 * j, p.numel).u(9 + 4 * j, p.offset).u(10 + 4 * j, g.offset).u(11 + 4 * j, start);
        start += Math.ceil(p.numel / OPTIM_WORKGROUP);
        buffers.push(p.buffer, g.buffer, s.expAvg.buffer, s.expAvgSq.buffer);
      });
      if (scale) buffers.push(scale.buffer);
      const dtypes = group.map((it) => it.g.dtype);
      const k = cachedKernel(`adamw|${dtypes.join(",")}|${!!scale}`, () => adamwKernel(dtypes, !!scale));
      gpu.dispatch(k, buffers, u.u32, gridFor(start * OPTIM_WORKGROUP, OPTIM_WORKGROUP));
    }
  }

  /** Drops every parameter's gradient (PyTorch's default `set_to_none=True`), returning its memory to the pool. */
  zeroGrad(): void {
    for (const p of this.params) p.zeroGrad();
  }

  /** Copies the state to the CPU (waits for the GPU once per state tensor). */
  async stateDict(): Promise<AdamWStateDict> {
    const state: Record<number, AdamWParamState> = {};
    for (const [i, s] of this.slots.entries()) {
      if (!s) continue;
      state[i] = { step: s.step, expAvg: await download(s.expAvg), expAvgSq: await download(s.expAvgSq) };
    }
    return {
      state,
      paramGroups: [{
        lr: this.lr,
        betas: [this.betas[0], this.betas[1]],
        eps: this.eps,
        weightDecay: this.weightDecay,
      }],
    };
  }

  /** Restores state and hyperparameters saved by {@linkcode AdamW.stateDict} (same parameter order and shapes). */
  loadStateDict(dict: AdamWStateDict): void {
    const group = dict.paramGroups?.[0];
    if (!group || !dict.state) throw new Error("AdamW.loadStateDict: expected { state, paramGroups: [{ lr, ... }] }");
    const slots: (AdamSlot | null)[] = this.params.map(() => null);
    try {
      for (const [key, s] of Object.entries(dict.state)) {
        const i = Number(key);
        const p = this.params[i];
        if (!p) throw new Error(`AdamW.loadStateDict: state for parameter ${key}, but there are ${this.params.length}`);
        if (!Number.isInteger(s.step) || s.step < 0) throw new Error(`AdamW.loadStateDict: bad step ${s.step}`);
        const expAvg = upload("AdamW", s.expAvg, p, i, "expAvg");
        let expAvgSq: Tensor;
        try {
          expAvgSq = upload("AdamW", s.expAvgSq, p, i, "expAvgSq");
        } catch (e) {
          expAvg.dispose();
          throw e;
        }
        slots[i] = { step: s.step, expAvg, expAvgSq };
      }
    } catch (e) {
      for (const s of slots) disposeAdam(s);
      throw e;
    }
    for (const s of this.slots) disposeAdam(s);
    slots.forEach((s, i) => (this.slots[i] = s));
    this.lr = group.lr;
    this.betas = [group.betas[0], group.betas[1]];
    this.eps = group.eps;
    this.weightDecay = group.weightDecay;
  }

  /** Frees the optimizer state (the parameters are untouched). */
  dispose(): void {
    for (const s of this.slots) disposeAdam(s);
    this.slots.fill(null);
  }
}

function disposeAdam(s: AdamSlot | null): void {
  if (!s) return;
  s.expAvg.dispose();
  s.expAvgSq.dispose();
}

// ---- SGD ----------------------------------------------------------------------------------------------------------

/** Options of {@linkcode SGD} (defaults as torch.optim.SGD). */
export interface SGDOptions {
  /** Learning rate. */
  lr: number;
  /** Momentum factor (default 0: plain SGD, no state). */
  momentum?: number;
  /** Dampening of the momentum (default 0). */
  dampening?: number;
  /** L2 penalty added to the gradient (default 0). */
  weightDecay?: number;
  /** Nesterov momentum (default false; needs momentum > 0 and dampening 0). */
  nesterov?: boolean;
}

/** What {@linkcode SGD.stateDict} returns. */
export interface SGDStateDict {
  /** Momentum buffers keyed by parameter index (only with momentum, for parameters that have stepped). */
  state: Record<number, { momentumBuffer: Float32Array }>;
  /** Hyperparameters. */
  paramGroups: [{ lr: number; momentum: number; dampening: number; weightDecay: number; nesterov: boolean }];
}

/**
 * Stochastic gradient descent with optional momentum, dampening, weight decay (L2, added to the gradient) and
 * Nesterov momentum, exactly as torch.optim.SGD; one fused kernel per parameter.
 *
 * @example
 * ```ts
 * const opt = new SGD([w], { lr: 0.1, momentum: 0.9, nesterov: true });
 * scope(() => {
 *   x.matmul(w).square().mean().backward();
 *   opt.step();
 *   opt.zeroGrad();
 * });
 * ```
 */
export class SGD {
  /** The parameters, in the order given. */
  readonly params: Tensor[];
  /** Learning rate used by the next {@linkcode SGD.step} (schedulers set it). */
  lr: number;
  /** Momentum factor. */
  readonly momentum: number;
  /** Dampening of the momentum. */
  readonly dampening: number;
  /** L2 penalty. */
  readonly weightDecay: number;
  /** Nesterov momentum. */
  readonly nesterov: boolean;
  private readonly buffers: (Tensor | null)[];

  /** Creates the optimizer; momentum buffers are allocated on each parameter's first step. */
  constructor(params: Tensor[], opts: SGDOptions) {
    this.params = checkParams("SGD", params);
    const { lr, momentum = 0, dampening = 0, weightDecay = 0, nesterov = false } = opts;
    checkNumber("SGD", "lr", lr, lr >= 0, "it must be ≥ 0");
    checkNumber("SGD", "momentum", momentum, momentum >= 0, "it must be ≥ 0");
    checkNumber("SGD", "dampening", dampening, true, "it must be a number");
    checkNumber("SGD", "weightDecay", weightDecay, weightDecay >= 0, "it must be ≥ 0");
    if (nesterov && (momentum <= 0 || dampening !== 0)) {
      throw new Error("SGD: Nesterov momentum requires momentum > 0 and dampening 0");
    }
    this.lr = lr;
    this.momentum = momentum;
    this.dampening = dampening;
    this.weightDecay = weightDecay;
    this.nesterov = nesterov;
    this.buffers = this.params.map(() => null);
  }

  /** Updates every parameter that has a gradient (one dispatch each). */
  step(): void {
    checkNumber("SGD", "lr", this.lr, this.lr >= 0, "it must be ≥ 0");
    const gpu = getGpu();
    const useMomentum = this.momentum !== 0;
    this.params.forEach((p, i) => {
      p.assertAlive("SGD.step");
      const g = gradOf("SGD", p, i);
      if (!g) return;
      let first = 0;
      if (useMomentum && !this.buffers[i]) {
        // torch initialises the buffer to the first update direction; the kernel writes it (flag `first`).
        this.buffers[i] = keep(Tensor.empty(p.shape, "f32"));
        first = 1;
      }
      const n = p.numel;
      if (n === 0) return;
      const u = new UniformWriter(SGD_UNIFORM_WORDS)
        .u(0, n).u(1, p.offset).u(2, g.offset).u(3, first)
        .f(4, this.lr).f(5, this.weightDecay).f(6, this.momentum).f(7, 1 - this.dampening);
      const k = cachedKernel(
        `sgd|${g.dtype}|${useMomentum}|${this.nesterov}`,
        () => sgdKernel(g.dtype, useMomentum, this.nesterov),
      );
      const bufs = [p.buffer, g.buffer];
      if (useMomentum) bufs.push(this.buffers[i]!.buffer);
      gpu.dispatch(k, bufs, u.u32, gridFor(n, OPTIM_WORKGROUP));
    });
  }

  /** Drops every parameter's gradient (PyTorch's default `set_to_none=True`). */
  zeroGrad(): void {
    for (const p of this.params) p.zeroGrad();
  }

  /** Copies the momentum buffers to the CPU. */
  async stateDict(): Promise<SGDStateDict> {
    const state: Record<number, { momentumBuffer: Float32Array }> = {};
    for (const [i, b] of this.buffers.entries()) if (b) state[i] = { momentumBuffer: await download(b) };
    const { lr, momentum, dampening, weightDecay, nesterov } = this;
    return { state, paramGroups: [{ lr, momentum, dampening, weightDecay, nesterov }] };
  }

  /**
   * Restores momentum buffers and the learning rate saved by {@linkcode SGD.stateDict}. The other hyperparameters
   * are fixed at construction and must match.
   */
  loadStateDict(dict: SGDStateDict): void {
    const group = dict.paramGroups?.[0];
    if (!group || !dict.state) throw new Error("SGD.loadStateDict: expected { state, paramGroups: [{ lr, ... }] }");
    for (const key of ["momentum", "dampening", "weightDecay", "nesterov"] as const) {
      if (group[key] !== this[key]) {
        throw new Error(`SGD.loadStateDict: saved ${key} ${group[key]} differs from this optimizer's ${this[key]}`);
      }
    }
    const buffers: (Tensor | null)[] = this.params.map(() => null);
    try {
      for (const [key, s] of Object.entries(dict.state)) {
        const i = Number(key);
        const p = this.params[i];
        if (!p) throw new Error(`SGD.loadStateDict: state for parameter ${key}, but there are ${this.params.length}`);
        buffers[i] = upload("SGD", s.momentumBuffer, p, i, "momentumBuffer");
      }
    } catch (e) {
      for (const b of buffers) b?.dispose();
      throw e;
    }
    for (const b of this.buffers) b?.dispose();
    buffers.forEach((b, i) => (this.buffers[i] = b));
    this.lr = group.lr;
  }

  /** Frees the momentum buffers. */
  dispose(): void {
    for (const b of this.buffers) b?.dispose();
    this.buffers.fill(null);
  }
}

// ---- gradient clipping --------------------------------------------------------------------------------------------

/**
 * Scales `x` in place by the f32 value at element `at` of `scalar` (a GPU value: nothing is read back). `x` must be
 * row-major f32 or f16.
 *
 * @example
 * ```ts
 * scaleInPlace(grad, coef); // grad *= coef[0]
 * ```
 */
export function scaleInPlace(x: Tensor, scalar: Tensor, at = 0): void {
  x.assertAlive("scaleInPlace");
  scalar.assertAlive("scaleInPlace");
  if (!x.isContiguous) throw new Error(`scaleInPlace: tensor of shape ${fmtShape(x.shape)} is not row-major`);
  if (scalar.dtype !== "f32") throw new Error(`scaleInPlace: the scale must be an f32 tensor, got ${scalar.dtype}`);
  if (at < 0 || at >= scalar.numel) {
    throw new Error(`scaleInPlace: index ${at} outside a ${scalar.numel}-element scale`);
  }
  if (x.storage === scalar.storage) throw new Error("scaleInPlace: the scale must not share memory with the tensor");
  const n = x.numel;
  if (n === 0) return;
  const dtype: DType = x.dtype;
  const k = cachedKernel(`scale|${dtype}`, () => scaleByScalarKernel(dtype));
  const u = new UniformWriter(SCALE_UNIFORM_WORDS).u(0, n).u(1, x.offset).u(2, scalar.offset + at);
  getGpu().dispatch(
    k,
    [x.buffer, scalar.buffer],
    u.u32,
    gridFor(inPlaceThreads(dtype, n, x.offset), OPTIM_WORKGROUP),
  );
}

/**
 * The total L2 norm of the gradients of `params` and torch.nn.utils.clip_grad_norm_'s clipping coefficient
 * `min(1, maxNorm / (norm + 1e-6))`, both as one-element f32 tensors computed on the GPU (sums of squares for up to
 * {@linkcode MULTI_MAX_SEGMENTS} gradients per dispatch into one buffer, then a combine); nothing is read back and
 * no gradient is changed. Pass `coef` to `AdamW.step({ gradScale })` to clip inside the update; dispose both when
 * done. Parameters without a gradient are ignored.
 *
 * @example
 * ```ts
 * loss.backward();
 * const { norm, coef } = clipCoefficient(params, 1.0);
 * opt.step({ gradScale: coef });
 * coef.dispose();
 * if (logNow) console.log("grad norm", await norm.item());
 * norm.dispose();
 * ```
 */
export function clipCoefficient(params: Tensor[], maxNorm: number): { norm: Tensor; coef: Tensor } {
  const { norm, coef } = normAndCoefficient("clipCoefficient", params, maxNorm);
  return { norm, coef };
}

/** {@linkcode clipCoefficient}, also returning the distinct gradients it summed. */
function normAndCoefficient(
  op: string,
  params: Tensor[],
  maxNorm: number,
): { norm: Tensor; coef: Tensor; grads: Tensor[] } {
  checkNumber(op, "maxNorm", maxNorm, true, "it must be a number");
  const grads: Tensor[] = [];
  const seen = new Set<Tensor>();
  for (const [i, p] of params.entries()) {
    const g = p.grad;
    if (!g) continue;
    g.assertAlive(`${op}: gradient of ${describe(p, i)}`);
    if (g.dtype !== "f32" && g.dtype !== "f16") {
      throw new Error(`${op}: gradient of ${describe(p, i)} is ${g.dtype}; gradients are f32 or f16`);
    }
    if (!g.isContiguous) throw new Error(`${op}: gradient of ${describe(p, i)} is not row-major`);
    if (seen.has(g)) continue;
    seen.add(g);
    grads.push(g);
  }
  const gpu = getGpu();
  const norm = Tensor.empty([], "f32");
  const coef = Tensor.empty([], "f32");
  const slots = grads.reduce((a, g) => a + sumSquaresGroups(g.numel), 0);
  const partials = Tensor.empty([Math.max(slots, 1)], "f32");
  try {
    let slot = 0;
    for (const group of dispatchGroups(grads, segmentsPerDispatch(1, 1), (g) => g.dtype)) {
      // Every gradient gets at least one workgroup (an empty one writes a zero partial), so every slot is written.
      const u = new UniformWriter(sumSquaresUniformWords(group.length)).u(0, slot);
      let start = 0;
      group.forEach((g, j) => {
        const groups = sumSquaresGroups(g.numel);
        u.u(4 + 4 * j, g.numel).u(5 + 4 * j, g.offset).u(6 + 4 * j, groups).u(7 + 4 * j, start);
        start += groups;
      });
      u.u(1, start);
      const dtypes = group.map((g) => g.dtype);
      const k = cachedKernel(`sumsq|${dtypes.join(",")}`, () => sumSquaresKernel(dtypes));
      gpu.dispatch(
        k,
        [...group.map((g) => g.buffer), partials.buffer],
        u.u32,
        gridFor(start * OPTIM_WORKGROUP, OPTIM_WORKGROUP),
      );
      slot += start;
    }
    const combine = cachedKernel("norm_combine", normCombineKernel);
    const u = new UniformWriter(COMBINE_UNIFORM_WORDS).u(0, slots).f(1, maxNorm);
    gpu.dispatch(combine, [partials.buffer, norm.buffer, coef.buffer], u.u32, [1]);
  } catch (e) {
    norm.dispose();
    coef.dispose();
    throw e;
  } finally {
    // Returned to the pool only after the recorded work is submitted, so the kernels above still see it.
    partials.dispose();
  }
  return { norm, coef, grads };
}

/**
 * Clips gradients in place to a total L2 norm of at most `maxNorm`, as torch.nn.utils.clip_grad_norm_: the norm
 * over all gradients together ({@linkcode clipCoefficient}), then each gradient multiplied by
 * `min(1, maxNorm / (norm + 1e-6))` read from a GPU buffer inside the kernel. Nothing is read back. Returns the
 * total norm (before clipping) as a one-element f32 tensor; read it only when logging. Parameters without a
 * gradient are ignored. Before `AdamW.step`, `clipCoefficient` + `step({ gradScale })` does the same in fewer
 * dispatches.
 *
 * @example
 * ```ts
 * loss.backward();
 * const norm = clipGradNorm(model.parameters(), 1.0);
 * opt.step();
 * if (logNow) console.log("grad norm", await norm.item());
 * ```
 */
export function clipGradNorm(params: Tensor[], maxNorm: number): Tensor {
  const { norm, coef, grads } = normAndCoefficient("clipGradNorm", params, maxNorm);
  try {
    for (const g of grads) scaleInPlace(g, coef);
  } catch (e) {
    norm.dispose();
    throw e;
  } finally {
    coef.dispose();
  }
  return norm;
}
