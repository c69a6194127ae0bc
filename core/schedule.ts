/**
 * Learning-rate schedules: functions from the optimizer step to a multiplier of the base learning rate, identical
 * to transformers' `get_constant_schedule`, `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup`
 * and `get_cosine_schedule_with_warmup`, and {@linkcode LRScheduler}, which applies one to an optimizer the way
 * torch's `LambdaLR` does.
 *
 * @example
 * ```ts
 * import { cosineWithWarmup, LRScheduler, warmupStepsFromRatio } from "./schedule.ts";
 * const totalSteps = 1000;
 * const opt = new AdamW(params, { lr: 2e-4 });
 * const sched = new LRScheduler(opt, cosineWithWarmup({ warmupSteps: warmupStepsFromRatio(0.03, totalSteps), totalSteps }));
 * for (let i = 0; i < totalSteps; i++) {
 *   scope(() => { loss(batch(i)).backward(); opt.step(); opt.zeroGrad(); });
 *   sched.step();
 * }
 * ```
 * @module
 */

/** A schedule: optimizer step (0 for the first) → multiplier of the base learning rate. */
export type LRLambda = (step: number) => number;

function checkSteps(fn: string, warmupSteps: number, totalSteps?: number): void {
  if (!Number.isInteger(warmupSteps) || warmupSteps < 0) {
    throw new Error(`${fn}: warmupSteps must be an integer ≥ 0, got ${warmupSteps}`);
  }
  if (totalSteps !== undefined && (!Number.isInteger(totalSteps) || totalSteps < 0)) {
    throw new Error(`${fn}: totalSteps must be an integer ≥ 0, got ${totalSteps}`);
  }
}

/** Linear warm-up from 0 to 1 over `warmupSteps` (transformers divides by max(1, warmupSteps)). */
function warmup(step: number, warmupSteps: number): number {
  return step / Math.max(1, warmupSteps);
}

/**
 * The constant multiplier 1 (transformers' `get_constant_schedule`).
 *
 * @example
 * ```ts
 * const sched = new LRScheduler(opt, constant());
 * ```
 */
export function constant(): LRLambda {
  return () => 1;
}

/**
 * Linear warm-up over `warmupSteps`, then 1 (transformers' `get_constant_schedule_with_warmup`).
 *
 * @example
 * ```ts
 * const f = constantWithWarmup({ warmupSteps: 10 });
 * f(5); // 0.5
 * ```
 */
export function constantWithWarmup(opts: { warmupSteps: number }): LRLambda {
  const { warmupSteps } = opts;
  checkSteps("constantWithWarmup", warmupSteps);
  return (step) => (step < warmupSteps ? warmup(step, warmupSteps) : 1);
}

/**
 * Linear warm-up from 0 to 1 over `warmupSteps`, then linear decay to 0 at `totalSteps`
 * (transformers' `get_linear_schedule_with_warmup`): `max(0, (total − step) / max(1, total − warmup))`.
 *
 * @example
 * ```ts
 * const f = linearWithWarmup({ warmupSteps: 10, totalSteps: 100 });
 * f(0); f(10); f(55); // 0, 1, 0.5
 * ```
 */
export function linearWithWarmup(opts: { warmupSteps: number; totalSteps: number }): LRLambda {
  const { warmupSteps, totalSteps } = opts;
  checkSteps("linearWithWarmup", warmupSteps, totalSteps);
  return (step) => {
    if (step < warmupSteps) return warmup(step, warmupSteps);
    return Math.max(0, (totalSteps - step) / Math.max(1, totalSteps - warmupSteps));
  };
}

/**
 * Linear warm-up from 0 to 1 over `warmupSteps`, then a cosine from 1 down to 0 over the remaining steps
 * (`numCycles` = 0.5 is a half cosine; transformers' `get_cosine_schedule_with_warmup`):
 * `max(0, ½·(1 + cos(π · numCycles · 2 · progress)))` with `progress = (step − warmup) / max(1, total − warmup)`.
 *
 * @example
 * ```ts
 * const f = cosineWithWarmup({ warmupSteps: 10, totalSteps: 110 });
 * f(60); // 0.5
 * ```
 */
export function cosineWithWarmup(opts: { warmupSteps: number; totalSteps: number; numCycles?: number }): LRLambda {
  const { warmupSteps, totalSteps, numCycles = 0.5 } = opts;
  checkSteps("cosineWithWarmup", warmupSteps, totalSteps);
  if (typeof numCycles !== "number" || !Number.isFinite(numCycles)) {
    throw new Error(`cosineWithWarmup: numCycles must be a finite number, got ${numCycles}`);
  }
  return (step) => {
    if (step < warmupSteps) return warmup(step, warmupSteps);
    const progress = (step - warmupSteps) / Math.max(1, totalSteps - warmupSteps);
    return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * numCycles * 2 * progress)));
  };
}

/**
 * Warm-up steps for a warm-up ratio, as transformers' `TrainingArguments.get_warmup_steps` computes them when
 * `warmup_steps` is 0: `ceil(totalSteps · ratio)` (in double precision, so 100 · 0.07 gives 8, as in Python).
 *
 * @example
 * ```ts
 * warmupStepsFromRatio(0.1, 105); // 11
 * ```
 */
export function warmupStepsFromRatio(ratio: number, totalSteps: number): number {
  if (typeof ratio !== "number" || !(ratio >= 0 && ratio <= 1)) {
    throw new Error(`warmupStepsFromRatio: ratio must lie in [0, 1], got ${ratio}`);
  }
  if (!Number.isInteger(totalSteps) || totalSteps < 0) {
    throw new Error(`warmupStepsFromRatio: totalSteps must be an integer ≥ 0, got ${totalSteps}`);
  }
  return Math.ceil(totalSteps * ratio);
}

/** Anything with a settable learning rate (AdamW, SGD). */
export interface HasLearningRate {
  /** Learning rate used by the next step. */
  lr: number;
}

/**
 * Sets an optimizer's learning rate to `baseLr · fn(step)`, like torch's `LambdaLR`: the base is the optimizer's
 * learning rate when the scheduler is made, the constructor already applies `fn(0)` (so the first optimizer step
 * uses it), and each {@linkcode LRScheduler.step} (called after `opt.step()`) moves to the next step.
 *
 * @example
 * ```ts
 * const sched = new LRScheduler(opt, linearWithWarmup({ warmupSteps: 100, totalSteps: 1000 }));
 * opt.step();
 * sched.step();
 * console.log(sched.lr);
 * ```
 */
export class LRScheduler {
  /** The optimizer whose `lr` this sets. */
  readonly optimizer: HasLearningRate;
  /** The schedule. */
  readonly fn: LRLambda;
  /** The learning rate the multiplier applies to. */
  baseLr: number;
  /** Steps taken so far (torch's `last_epoch`); the current learning rate is `baseLr · fn(lastStep)`. */
  lastStep = 0;

  /** Records the optimizer's current learning rate as the base and applies `fn(0)`. */
  constructor(optimizer: HasLearningRate, fn: LRLambda) {
    if (typeof optimizer?.lr !== "number") throw new Error("LRScheduler: the optimizer has no numeric `lr`");
    if (typeof fn !== "function") throw new Error("LRScheduler: fn must be a function (step) => multiplier");
    this.optimizer = optimizer;
    this.fn = fn;
    this.baseLr = optimizer.lr;
    this.apply();
  }

  /** Advances one step and sets the optimizer's learning rate. */
  step(): void {
    this.lastStep++;
    this.apply();
  }

  /** The learning rate the next optimizer step uses. */
  get lr(): number {
    return this.optimizer.lr;
  }

  /** `{ baseLr, lastStep }`, for resuming training. */
  stateDict(): { baseLr: number; lastStep: number } {
    return { baseLr: this.baseLr, lastStep: this.lastStep };
  }

  /** Restores a {@linkcode LRScheduler.stateDict} and sets the optimizer's learning rate accordingly. */
  loadStateDict(state: { baseLr: number; lastStep: number }): void {
    if (!Number.isInteger(state.lastStep) || state.lastStep < 0 || typeof state.baseLr !== "number") {
      throw new Error(`LRScheduler.loadStateDict: expected { baseLr: number, lastStep: integer ≥ 0 }`);
    }
    this.baseLr = state.baseLr;
    this.lastStep = state.lastStep;
    this.apply();
  }

  private apply(): void {
    const m = this.fn(this.lastStep);
    if (typeof m !== "number" || Number.isNaN(m)) {
      throw new Error(`LRScheduler: the schedule returned ${m} at step ${this.lastStep}`);
    }
    this.optimizer.lr = this.baseLr * m;
  }
}
