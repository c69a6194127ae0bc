/**
 * The fine-tuning loop: micro-batches with gradient accumulation, AdamW, warmup + cosine (or linear/constant)
 * schedule, gradient clipping, periodic evaluation, a progress line (loss with a moving average, learning rate,
 * tokens/s, peak memory, ETA), `loss.csv` appended step by step, PEFT-format adapter checkpoints with optimizer
 * state for resuming, and `metrics.json`. An interrupted run (Ctrl-C) saves a checkpoint before it exits, so
 * nothing already computed is lost.
 *
 * The loss is read back without stalling the GPU: each step's read is awaited only after the next step has been
 * recorded.
 *
 * @example
 * ```ts
 * import { Trainer } from "./trainer.ts";
 * const trainer = new Trainer(peft, trainExamples, {
 *   outDir: "runs/lora", epochs: 1, batchSize: 8, gradAccum: 4, lr: 5e-5, warmupRatio: 0.05, padId: 0,
 * });
 * const result = await trainer.train();
 * ```
 * @module
 */
import { getGpu } from "../core/gpu.ts";
import { memoryStats } from "../core/memory.ts";
import { AdamW, type AdamWStateDict, clipCoefficient } from "../core/optim.ts";
import { loadSafetensors, saveSafetensors, type TensorToSave } from "../core/safetensors.ts";
import { constant, cosineWithWarmup, linearWithWarmup, LRScheduler, warmupStepsFromRatio } from "../core/schedule.ts";
import {
  appendText,
  exists,
  joinPath,
  makeDir,
  onInterrupt,
  readText,
  writeProgress,
  writeText,
} from "../core/platform.ts";
import { scope } from "../core/scope.ts";
import { batches, collate, type TokenizedExample } from "../data/batching.ts";
import { loadAdapter, saveAdapter } from "./adapter.ts";
import type { PeftModel } from "./model.ts";

/** Training settings (the study's values are the examples' defaults). */
export interface TrainerConfig {
  /** Where loss.csv, metrics.json and adapters go. */
  outDir: string;
  /** Passes over the data (default 1). */
  epochs?: number;
  /** Stop after this many optimizer steps (default: the epochs' worth). */
  maxSteps?: number;
  /** Examples per micro-batch. */
  batchSize: number;
  /** Micro-batches per optimizer step. */
  gradAccum: number;
  /** Peak learning rate. */
  lr: number;
  /** Fraction of steps spent warming up (rounded up, as transformers does). */
  warmupRatio?: number;
  /** LR schedule after warmup (default cosine). */
  schedule?: "cosine" | "linear" | "constant";
  /** AdamW weight decay (transformers' default 0). */
  weightDecay?: number;
  /** Gradient-norm clip (transformers' default 1.0; 0 = off). */
  maxGradNorm?: number;
  /** Seed of the data order and dropout. */
  seed?: number;
  /** Group examples of similar length into batches (less padding). */
  groupByLength?: boolean;
  /** Token id written into padding. */
  padId: number;
  /** Run the evaluation callback every this many steps (0 = only at the end). */
  evalEvery?: number;
  /** Save a resumable checkpoint every this many steps (0 = only at the end and on interruption). */
  saveEvery?: number;
  /** Resume from this checkpoint directory (written by an earlier run). */
  resumeFrom?: string;
  /** Print the progress line (default true). */
  progress?: boolean;
  /** Moving-average window of the displayed loss (default 20 steps). */
  smoothWindow?: number;
}

/** One logged optimizer step. */
export interface StepLog {
  /** Optimizer step (1-based). */
  step: number;
  /** Mean loss over the step's micro-batches. */
  loss: number;
  /** Moving average of the loss. */
  lossAvg: number;
  /** Learning rate used by the step. */
  lr: number;
  /** Training tokens (non-padding) per second since the start. */
  tokensPerSecond: number;
  /** Peak GPU memory so far, bytes. */
  peakBytes: number;
  /** Seconds since the start. */
  elapsed: number;
}

/** What {@linkcode Trainer.train} returns. */
export interface TrainResult {
  /** Optimizer steps taken. */
  steps: number;
  /** Per-step log. */
  log: StepLog[];
  /** Training wall time, seconds (evaluation excluded). */
  trainSeconds: number;
  /** Peak GPU memory during training, bytes. */
  peakBytes: number;
  /** Results of the evaluation callback (last call). */
  eval: Record<string, number> | null;
  /** True when stopped by an interruption. */
  interrupted: boolean;
}

/** Called for evaluation; returns named metrics. */
export type EvalFn = (step: number) => Promise<Record<string, number>>;

/** Fine-tunes a PEFT model on tokenized examples. */
export class Trainer {
  private readonly model: PeftModel;
  private readonly data: TokenizedExample[];
  private readonly cfg:
    & Required<Omit<TrainerConfig, "maxSteps" | "resumeFrom">>
    & Pick<TrainerConfig, "maxSteps" | "resumeFrom">;
  private readonly evaluate?: EvalFn;

  /** Prepares training; nothing runs until {@linkcode Trainer.train}. */
  constructor(model: PeftModel, data: TokenizedExample[], config: TrainerConfig, evaluate?: EvalFn) {
    if (data.length === 0) throw new Error("Trainer: no training examples");
    for (const [k, v] of Object.entries({ batchSize: config.batchSize, gradAccum: config.gradAccum })) {
      if (!Number.isInteger(v) || v <= 0) throw new Error(`Trainer: ${k} must be a positive integer, got ${v}`);
    }
    if (!(config.lr > 0)) throw new Error(`Trainer: lr must be > 0, got ${config.lr}`);
    this.model = model;
    this.data = data;
    this.evaluate = evaluate;
    this.cfg = {
      epochs: 1,
      warmupRatio: 0,
      schedule: "cosine",
      weightDecay: 0,
      maxGradNorm: 1,
      seed: 42,
      groupByLength: false,
      evalEvery: 0,
      saveEvery: 0,
      progress: true,
      smoothWindow: 20,
      ...config,
    };
  }

  /** Micro-batches of every epoch, in the seeded order (the same for every method given the same seed). */
  plan(): TokenizedExample[][] {
    const all: TokenizedExample[][] = [];
    for (let e = 0; e < this.cfg.epochs; e++) {
      all.push(
        ...batches(this.data, {
          batchSize: this.cfg.batchSize,
          seed: this.cfg.seed + e,
          groupByLength: this.cfg.groupByLength,
          lengthOf: (x) => x.inputIds.length,
        }),
      );
    }
    return all;
  }

  /** Runs training; see {@linkcode TrainResult}. */
  async train(): Promise<TrainResult> {
    const cfg = this.cfg;
    const model = this.model;
    const micro = this.plan();
    const stepsPerEpochAll = Math.ceil(micro.length / cfg.gradAccum);
    const totalSteps = Math.min(cfg.maxSteps ?? stepsPerEpochAll, stepsPerEpochAll);
    const params = model.trainableParameters();
    if (params.length === 0) throw new Error("Trainer: the model has no trainable parameters");
    const opt = new AdamW(params, { lr: cfg.lr, weightDecay: cfg.weightDecay });
    const warmup = warmupStepsFromRatio(cfg.warmupRatio, totalSteps);
    const fn = cfg.schedule === "cosine"
      ? cosineWithWarmup({ warmupSteps: warmup, totalSteps })
      : cfg.schedule === "linear"
      ? linearWithWarmup({ warmupSteps: warmup, totalSteps })
      : constant();
    const sched = new LRScheduler(opt, fn);
    await makeDir(cfg.outDir);
    const lossCsv = joinPath(cfg.outDir, "loss.csv");
    let startStep = 0;
    if (cfg.resumeFrom) startStep = await this.resume(cfg.resumeFrom, opt, sched);
    if (startStep === 0 || !(await exists(lossCsv))) {
      await writeText(lossCsv, "step,loss,loss_avg,lr,tokens_per_s,peak_gib,elapsed_s\n");
    }
    let interrupted = false;
    const stopListening = onInterrupt(() => {
      interrupted = true;
      writeProgress("interrupt received: finishing this step and saving a checkpoint…", true);
    });
    model.train();
    const log: StepLog[] = [];
    const window: number[] = [];
    let tokens = 0;
    let evalResult: Record<string, number> | null = null;
    const t0 = performance.now();
    let evalSeconds = 0;
    let pending: { step: number; lr: number; loss: Promise<number> } | null = null;
    const flushPending = async () => {
      if (!pending) return;
      const p = pending;
      pending = null;
      const loss = await p.loss;
      window.push(loss);
      if (window.length > cfg.smoothWindow) window.shift();
      const elapsed = (performance.now() - t0) / 1000 - evalSeconds;
      const entry: StepLog = {
        step: p.step,
        loss,
        lossAvg: window.reduce((a, b) => a + b, 0) / window.length,
        lr: p.lr,
        tokensPerSecond: tokens / Math.max(elapsed, 1e-9),
        peakBytes: memoryStats().peakBytes,
        elapsed,
      };
      log.push(entry);
      await appendText(
        lossCsv,
        `${entry.step},${loss.toFixed(6)},${entry.lossAvg.toFixed(6)},${entry.lr.toExponential(4)},${
          entry.tokensPerSecond.toFixed(1)
        },${(entry.peakBytes / 2 ** 30).toFixed(3)},${elapsed.toFixed(2)}\n`,
      );
      if (cfg.progress) writeProgress(progressLine(entry, totalSteps, startStep));
    };
    try {
      for (let step = startStep; step < totalSteps && !interrupted; step++) {
        const group = micro.slice(step * cfg.gradAccum, (step + 1) * cfg.gradAccum);
        const lr = opt.lr;
        const lossSum = scope(() => {
          let acc: ReturnType<typeof collate> | null = null;
          let total = null as null | import("../core/tensor.ts").Tensor;
          for (const examples of group) {
            acc = collate(examples, { padId: cfg.padId });
            const { inputIds, attentionMask, labels, batchSize: B, seqLen: T } = acc;
            const positions: number[] = [];
            for (let i = 0; i < B * T; i++) {
              if (i % T !== T - 1 && labels[i + 1] !== -100) positions.push(i);
            }
            tokens += attentionMask.reduce((a, v) => a + v, 0);
            const { logits, loss } = model.forward({ data: inputIds, shape: [B, T] }, {
              attentionMask: { data: attentionMask, shape: [B, T] },
              labels: { data: labels, shape: [B, T] },
              logitsPositions: positions,
            });
            logits.dispose();
            const scaled = loss!.div(group.length);
            scaled.backward();
            const d = scaled.detach();
            total = total ? total.add(d) : d;
          }
          // clip_grad_norm_ folded into the update: the coefficient scales the gradients inside AdamW's kernel.
          opt.step(cfg.maxGradNorm > 0 ? { gradScale: clipCoefficient(params, cfg.maxGradNorm).coef } : {});
          opt.zeroGrad();
          sched.step();
          return total!.keep();
        });
        await flushPending();
        pending = { step: step + 1, lr, loss: lossSum.item().finally(() => lossSum.dispose()) };
        const s = step + 1;
        if (cfg.saveEvery > 0 && s % cfg.saveEvery === 0) await this.checkpoint(s, opt, sched);
        if (this.evaluate && cfg.evalEvery > 0 && s % cfg.evalEvery === 0 && s < totalSteps) {
          await flushPending();
          const e0 = performance.now();
          evalResult = await this.runEval(s);
          evalSeconds += (performance.now() - e0) / 1000;
        }
      }
      await flushPending();
      await getGpu().sync();
    } finally {
      stopListening();
    }
    const trainSeconds = (performance.now() - t0) / 1000 - evalSeconds;
    const steps = log.length ? log[log.length - 1].step : startStep;
    const peakBytes = memoryStats().peakBytes;
    if (cfg.progress) {
      writeProgress(log.length ? progressLine(log[log.length - 1], totalSteps, startStep) : "no steps", true);
    }
    await this.checkpoint(steps, opt, sched);
    // The optimizer's state (two f32 tensors per trainable parameter) is not needed past the checkpoint: free it,
    // so that a second run in the same process (sst2_compare: LoRA, then QLoRA) does not start with it resident.
    opt.dispose();
    await saveAdapter(model, joinPath(cfg.outDir, "adapter"));
    if (this.evaluate && !interrupted) evalResult = await this.runEval(steps);
    return { steps, log, trainSeconds, peakBytes, eval: evalResult, interrupted };
  }

  private async runEval(step: number): Promise<Record<string, number>> {
    this.model.eval();
    try {
      const r = await this.evaluate!(step);
      await appendText(joinPath(this.cfg.outDir, "eval.jsonl"), JSON.stringify({ step, ...r }) + "\n");
      return r;
    } finally {
      this.model.train();
    }
  }

  /**
   * Saves adapter + optimizer state + position into `outDir/last-checkpoint`: the adapter in PEFT's format, AdamW's
   * moment estimates in `optimizer.safetensors` (they are as large as two copies of the adapter), and the step,
   * scheduler and per-parameter step counts in `trainer_state.json`.
   */
  private async checkpoint(step: number, opt: AdamW, sched: LRScheduler): Promise<void> {
    const dir = joinPath(this.cfg.outDir, "last-checkpoint");
    await saveAdapter(this.model, dir);
    const state = await opt.stateDict();
    const tensors: Record<string, TensorToSave> = {};
    const steps: Record<string, number> = {};
    for (const [i, s] of Object.entries(state.state)) {
      tensors[`state.${i}.exp_avg`] = { dtype: "F32", shape: [s.expAvg.length], data: s.expAvg };
      tensors[`state.${i}.exp_avg_sq`] = { dtype: "F32", shape: [s.expAvgSq.length], data: s.expAvgSq };
      steps[i] = s.step;
    }
    await saveSafetensors(joinPath(dir, "optimizer.safetensors"), tensors);
    await writeText(
      joinPath(dir, "trainer_state.json"),
      JSON.stringify({
        step,
        seed: this.cfg.seed,
        scheduler: sched.stateDict(),
        paramGroups: state.paramGroups,
        steps,
      }) +
        "\n",
    );
  }

  private async resume(dir: string, opt: AdamW, sched: LRScheduler): Promise<number> {
    const statePath = joinPath(dir, "trainer_state.json");
    if (!(await exists(statePath))) {
      throw new Error(
        `--resume ${dir}: no checkpoint there (no trainer_state.json, so not a checkpoint; a run writes one when it ` +
          `ends or is interrupted): drop --resume to start over, or pass the --out of the run to continue`,
      );
    }
    const saved = JSON.parse(await readText(statePath));
    if (saved.seed !== this.cfg.seed) {
      throw new Error(`--resume ${dir}: it was trained with seed ${saved.seed}, this run has seed ${this.cfg.seed}`);
    }
    await loadAdapter(this.model, dir);
    const moments = await loadSafetensors(joinPath(dir, "optimizer.safetensors"), { as: "f32" });
    const state: AdamWStateDict["state"] = {};
    for (const [i, step] of Object.entries(saved.steps as Record<string, number>)) {
      const m = moments.get(`state.${i}.exp_avg`), v = moments.get(`state.${i}.exp_avg_sq`);
      if (!m || !v) throw new Error(`--resume ${dir}: optimizer.safetensors lacks the state of parameter ${i}`);
      state[Number(i)] = { step, expAvg: m.data as Float32Array, expAvgSq: v.data as Float32Array };
    }
    opt.loadStateDict({ state, paramGroups: saved.paramGroups });
    sched.loadStateDict(saved.scheduler);
    return saved.step as number;
  }
}

function fmtDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return "--:--";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h > 0
    ? `${h}:${String(m).padStart(2, "0")}:${String(r).padStart(2, "0")}`
    : `${m}:${String(r).padStart(2, "0")}`;
}

/** One progress line: bar, step, loss (moving average), lr, tokens/s, peak memory, ETA. */
export function progressLine(e: StepLog, total: number, start = 0): string {
  const frac = e.step / total;
  const width = 24;
  const filled = Math.round(frac * width);
  const bar = "█".repeat(filled) + "░".repeat(width - filled);
  const done = e.step - start;
  const eta = done > 0 ? (e.elapsed / done) * (total - e.step) : Infinity;
  return `${bar} ${e.step}/${total} loss ${e.loss.toFixed(4)} (avg ${e.lossAvg.toFixed(4)}) lr ${
    e.lr.toExponential(2)
  } ` +
    `${e.tokensPerSecond.toFixed(0)} tok/s peak ${(e.peakBytes / 2 ** 30).toFixed(2)} GiB ` +
    `elapsed ${fmtDuration(e.elapsed)} ETA ${fmtDuration(eta)}`;
}
