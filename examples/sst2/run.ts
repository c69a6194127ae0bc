/**
 * One SST-2 fine-tuning experiment end to end: data → base model (f16 for LoRA, NF4 + double quantization for
 * QLoRA) → LoRA injection → training with the {@linkcode Trainer} → evaluation (generation and log-likelihood) →
 * inference speed → `<out>/metrics.json`.
 *
 * What is measured, and how it maps to the study's Table 2:
 * - accuracy / F1: greedy generation of the answer after the study's prompt (unparseable answers count as wrong
 *   and are counted separately), on the dev set or its first `eval.samples` sentences; log-likelihood accuracy
 *   beside it;
 * - peak GPU memory: `memoryStats().peakBytes` over training, reset just before it (the study:
 *   `torch.cuda.max_memory_allocated()`); it includes the model's weights;
 * - training time: the Trainer's wall time, evaluation excluded;
 * - inference speed: tokens/s of a batch-1 greedy decode of a fixed prompt for 32 new tokens with the KV cache,
 *   adapters active (not merged), after a warm-up; the eval's batched generation rate is reported too.
 *
 * LoRA and QLoRA given the same seed build the same random base (before quantization), the same LoRA init, the
 * same training subset and data order, and the same dropout masks.
 *
 * @example
 * ```ts
 * import { loadExperimentConfig } from "./config.ts";
 * import { runExperiment } from "./run.ts";
 * const cfg = await loadExperimentConfig(["--max-steps", "10"], { method: "lora" });
 * const metrics = await runExperiment(cfg);
 * console.log(metrics.eval?.accuracy, metrics.train.peakBytes);
 * ```
 * @module
 */
import { init } from "../../core/mod.ts";
import { getGpu, gpuReady } from "../../core/gpu.ts";
import { emptyCache, fmtBytes, memoryStats, resetPeakMemory } from "../../core/memory.ts";
import { env, joinPath, makeDir, writeProgress, writeText } from "../../core/platform.ts";
import { releaseMatmulScratch } from "../../core/ops/matmul.ts";
import { manualSeed } from "../../core/random.ts";
import { scope } from "../../core/scope.ts";
import { collate, shuffled } from "../../data/batching.ts";
import { type EncodedExample, encodeExample, encodePrompt } from "../../data/prompt.ts";
import { loadSst2Split, type Sst2Example } from "../../data/sst2.ts";
import { Tokenizer } from "../../data/tokenizer.ts";
import { generate } from "../../nn/generate.ts";
import { Linear } from "../../nn/layers.ts";
import { LlamaForCausalLM } from "../../nn/llama.ts";
import { fromPretrained, loadLlama2c } from "../../nn/loader.ts";
import { type ClassificationMetrics, evaluateSst2 } from "../../peft/evaluate.ts";
import { getPeftModel, type PeftModel } from "../../peft/model.ts";
import { Trainer } from "../../peft/trainer.ts";
import { type ModelMemoryReport, modelMemoryReport, quantizeModel } from "../../quant/mod.ts";
import {
  configSummary,
  type ExperimentConfig,
  fmtCount,
  loadExperimentConfig,
  type Method,
  SMALL_MODEL_LIMIT,
  usage,
} from "./config.ts";
import { writeReport } from "./report.ts";

/** Everything one run measured; written to `<out>/metrics.json` and gathered into results.json. */
export interface RunMetrics {
  /** "lora" or "qlora". */
  method: Method;
  /** Display name: "LoRA" or "QLoRA". */
  label: string;
  /** The `--model` value. */
  model: string;
  /** Where the weights came from. */
  modelKind: "random" | "hf" | "llama2c";
  /** Logical parameter count of the base. */
  modelParameters: number;
  /** False for random weights of a large model: its accuracy means nothing. */
  accuracyMeaningful: boolean;
  /** GPU adapter description. */
  device: string;
  /** True on a CPU / software adapter. */
  cpuAdapter: boolean;
  /** The settings as run (snake_case, as in the YAML). */
  config: Record<string, unknown>;
  /** What the overrides and CPU defaults changed, and why; caveats. */
  notes: string[];
  /** Output directory of this run (loss.csv, adapter/, last-checkpoint/, metrics.json). */
  outDir: string;
  /** Data used. */
  data: { trainExamples: number; trainTokens: number; devExamples: number };
  /** `trainable params: … || all params: … || trainable%: …` and its numbers. */
  parameters: { trainable: number; all: number; trainablePercent: number; line: string };
  /** Storage bits per parameter of the base's linear layers (LM head excluded): 16 for f16, ~4.127 for NF4-DQ. */
  bitsPerBaseParameter: number;
  /** The base's bytes by kind (4-bit weights, quantization constants, full precision), before LoRA injection. */
  memoryReport: ModelMemoryReport;
  /** GPU bytes held after the model was built and the adapters injected (weights, constants, adapters). */
  modelBytes: number;
  /** Training. */
  train: {
    steps: number;
    trainSeconds: number;
    secondsPerStep: number;
    tokensPerSecond: number;
    peakBytes: number;
    interrupted: boolean;
    /** Loss per optimizer step (index i = step i + 1). */
    losses: number[];
  };
  /** Evaluation (null when training was interrupted). */
  eval:
    | (ClassificationMetrics & {
      /** Accuracy of always answering the evaluated sentences' more frequent label (the chance level to beat). */
      majorityAccuracy: number;
      seconds: number;
    })
    | null;
  /** Batch-1 greedy decoding with the KV cache. */
  inference: { tokensPerSecond: number; newTokens: number; prompt: string } | null;
  /** Wall time of the whole run, seconds. */
  wallSeconds: number;
  /** When the run started (ISO 8601). */
  startedAt: string;
}

/** Options of {@linkcode runExperiment}. */
export interface RunOptions {
  /** Print progress (default true). */
  verbose?: boolean;
  /** Sentence of the fixed prompt for the batch-1 decoding speed. */
  speedSentence?: string;
  /** New tokens of the batch-1 decode (default 32). */
  speedTokens?: number;
}

/** Storage bits per parameter of the dense linear layers other than the LM head (16 for an f16 base). */
function denseBitsPerParameter(model: LlamaForCausalLM): number {
  let bits = 0, params = 0;
  for (const [name, m] of model.namedModules()) {
    if (!(m instanceof Linear) || name === "lm_head") continue;
    const n = m.weight.numel;
    params += n;
    bits += n * (m.weight.dtype === "f16" ? 16 : m.weight.dtype === "f32" ? 32 : 0);
  }
  return params > 0 ? bits / params : 0;
}

/**
 * Builds or loads the base model: weights in `cfg.dtype`, and for QLoRA every linear layer but the LM head in NF4
 * (a Hugging Face directory is quantized layer by layer as it loads, so its f16 copy never sits on the GPU whole).
 * Random presets draw from the seeded global generator, so LoRA and QLoRA start from the same weights.
 */
async function buildBase(cfg: ExperimentConfig): Promise<LlamaForCausalLM> {
  const src = cfg.modelSource;
  const q = cfg.quantization;
  const quantization = q
    ? { type: q.type, blockSize: q.blockSize, doubleQuant: q.doubleQuant, skip: ["lm_head"] }
    : undefined;
  manualSeed(cfg.train.seed);
  if (src.kind === "hf") return await fromPretrained(src.path, { dtype: cfg.dtype, quantization });
  const model = src.kind === "random"
    ? new LlamaForCausalLM(src.config, { dtype: cfg.dtype })
    : await loadLlama2c(src.path, { dtype: cfg.dtype });
  if (quantization) quantizeModel(model, quantization);
  return model;
}

/** The first `n` examples of a seeded shuffle (all of them, in file order, when `n` is null). */
export function subset<T>(items: T[], n: number | null, seed: number): T[] {
  if (n === null || n >= items.length) return items;
  return shuffled(items.length, seed).slice(0, n).map((i) => items[i]);
}

const DISPLAY: Record<Method, string> = { lora: "LoRA", qlora: "QLoRA" };

/**
 * Runs one experiment and writes `<out>/metrics.json` (plus the Trainer's loss.csv, adapter/ and
 * last-checkpoint/). Frees the model's GPU memory before returning.
 *
 * @example
 * ```ts
 * const m = await runExperiment(await loadExperimentConfig([], { method: "qlora" }));
 * ```
 */
export async function runExperiment(cfg: ExperimentConfig, opts: RunOptions = {}): Promise<RunMetrics> {
  const verbose = opts.verbose ?? true;
  const say = (s: string) => verbose && console.log(s);
  const startedAt = new Date().toISOString();
  const t0 = performance.now();
  if (!gpuReady()) await init();
  const gpu = getGpu();
  const label = DISPLAY[cfg.method];
  await makeDir(cfg.out);

  // Data.
  const tok = await Tokenizer.load(cfg.tokenizer);
  if (tok.vocabSize > cfg.modelSource.config.vocabSize) {
    throw new Error(
      `The tokenizer ${cfg.tokenizer} has ${tok.vocabSize} pieces but the model's vocabulary has ` +
        `${cfg.modelSource.config.vocabSize}: pass the model's own tokenizer with --tokenizer`,
    );
  }
  const trainAll = await loadSst2Split(cfg.data, "train");
  const devAll = await loadSst2Split(cfg.data, "dev");
  const trainRows = subset(trainAll, cfg.train.trainSamples, cfg.train.seed);
  const devRows: Sst2Example[] = cfg.eval.samples === null ? devAll : devAll.slice(0, cfg.eval.samples);
  const examples = trainRows.map((e) => encodeExample(tok, e.sentence, e.label));
  const trainTokens = examples.reduce((a, e) => a + e.inputIds.length, 0);
  const longest = examples.reduce((m, e) => Math.max(m, e.inputIds.length), 0);
  if (longest > cfg.modelSource.config.maxPositionEmbeddings) {
    throw new Error(
      `A training example has ${longest} tokens, more than the model's ${cfg.modelSource.config.maxPositionEmbeddings} positions`,
    );
  }
  say(
    `[${label}] data: ${trainRows.length.toLocaleString("en-US")} of ${trainAll.length.toLocaleString("en-US")} ` +
      `training sentences (${
        trainTokens.toLocaleString("en-US")
      } tokens), ${devRows.length} of ${devAll.length} dev sentences`,
  );

  // Model.
  const tm = performance.now();
  const model = await buildBase(cfg);
  try {
    emptyCache(); // the pool's copies of freed f16 weights (QLoRA) are not part of the model
    const memoryReport = modelMemoryReport(model);
    const bitsPerBaseParameter = cfg.quantization ? memoryReport.bitsPerParameter : denseBitsPerParameter(model);
    manualSeed(cfg.train.seed + 1);
    const peft = getPeftModel(model, {
      r: cfg.lora.r,
      alpha: cfg.lora.alpha,
      dropout: cfg.lora.dropout,
      targetModules: cfg.lora.targetModules,
      baseModelNameOrPath: cfg.model,
    });
    if (cfg.train.gradientCheckpointing) peft.gradientCheckpointing(true);
    await gpu.sync();
    const modelBytes = memoryStats().liveBytes;
    const kind = cfg.quantization
      ? `NF4 base (block ${cfg.quantization.blockSize}${cfg.quantization.doubleQuant ? ", double quantization" : ""})`
      : `${cfg.dtype} base`;
    say(
      `[${label}] model: ${cfg.model} (${fmtCount(cfg.modelParameters)} parameters, ${kind}, ` +
        `${bitsPerBaseParameter.toFixed(3)} bits per base parameter), ${fmtBytes(modelBytes)} on the GPU, ` +
        `built in ${((performance.now() - tm) / 1000).toFixed(1)} s`,
    );
    const line = verbose ? peft.printTrainableParameters() : "";
    const counts = peft.parameterCounts();
    const notes = [...cfg.notes];
    const accuracyMeaningful = !(cfg.modelSource.kind === "random" && cfg.modelParameters >= SMALL_MODEL_LIMIT);
    if (!accuracyMeaningful) {
      notes.push(`${cfg.model} has random weights: its accuracy is meaningless; the run measures speed and memory`);
    } else if (cfg.modelSource.kind === "random") {
      notes.push(
        `${cfg.model} starts from random weights (it knows no English): accuracy shows what the LoRA adapters ` +
          `learned from ${examples.length} examples alone, not the study's pretrained Llama-2-7B`,
      );
    }

    // Training. One untimed forward + backward first compiles the GPU kernels, so that compilation is charged to
    // neither method's training time (the first method would otherwise pay for kernels the second reuses).
    const padId = tok.padId >= 0 ? tok.padId : 0;
    await warmUp(peft, examples.slice(0, cfg.train.batchSize), padId);
    manualSeed(cfg.train.seed + 2);
    resetPeakMemory();
    const trainer = new Trainer(peft, examples, {
      outDir: cfg.out,
      resumeFrom: cfg.train.resume ? joinPath(cfg.out, "last-checkpoint") : undefined,
      epochs: cfg.train.epochs,
      maxSteps: cfg.train.maxSteps ?? undefined,
      batchSize: cfg.train.batchSize,
      gradAccum: cfg.train.gradAccum,
      lr: cfg.train.lr,
      warmupRatio: cfg.train.warmupRatio,
      schedule: cfg.train.schedule,
      weightDecay: cfg.train.weightDecay,
      maxGradNorm: cfg.train.maxGradNorm,
      seed: cfg.train.seed,
      groupByLength: cfg.train.groupByLength,
      padId,
      progress: verbose,
    });
    const plannedSteps = Math.min(
      cfg.train.maxSteps ?? Infinity,
      Math.ceil(Math.ceil(examples.length / cfg.train.batchSize) * cfg.train.epochs / cfg.train.gradAccum),
    );
    say(
      `[${label}] training: ${plannedSteps} optimizer steps of ${cfg.train.batchSize} × ${cfg.train.gradAccum} ` +
        `examples, lr ${cfg.train.lr}, warm-up ${cfg.train.warmupRatio}, ${cfg.train.schedule}`,
    );
    const result = await trainer.train();
    const steps = result.steps;
    const train = {
      steps,
      trainSeconds: result.trainSeconds,
      secondsPerStep: steps > 0 ? result.trainSeconds / steps : 0,
      tokensPerSecond: result.log.length ? result.log[result.log.length - 1].tokensPerSecond : 0,
      peakBytes: result.peakBytes,
      interrupted: result.interrupted,
      losses: result.log.map((l) => l.loss),
    };
    say(
      `[${label}] trained ${steps} steps in ${result.trainSeconds.toFixed(1)} s, peak GPU memory ${
        fmtBytes(result.peakBytes)
      }`,
    );

    // Inference speed (batch-1 decoding, after its own warm-up, which also compiles the eval's decode kernels),
    // then evaluation.
    let evalMetrics: RunMetrics["eval"] = null;
    let inference: RunMetrics["inference"] = null;
    if (!result.interrupted) {
      inference = await decodeSpeed(peft.model, tok, opts.speedSentence ?? devAll[0].sentence, opts.speedTokens ?? 32);
      say(
        `[${label}] batch-1 greedy decoding: ${
          inference.tokensPerSecond.toFixed(2)
        } tokens/s (KV cache, adapters unmerged)`,
      );
      const te = performance.now();
      const m = await evaluateSst2(peft.model, tok, devRows, {
        batchSize: cfg.eval.batchSize,
        maxNewTokens: cfg.eval.maxNewTokens,
        onProgress: verbose
          ? (done, total) => writeProgress(`[${label}] evaluating ${done}/${total}`, done === total)
          : undefined,
      });
      const positives = devRows.filter((e) => e.label === 1).length;
      const majorityAccuracy = Math.max(positives, devRows.length - positives) / Math.max(1, devRows.length);
      evalMetrics = { ...m, majorityAccuracy, seconds: (performance.now() - te) / 1000 };
      say(
        `[${label}] dev: accuracy ${pct(m.accuracy)}, F1 ${pct(m.f1)}, macro-F1 ${pct(m.f1Macro)}, ` +
          `${m.unparseable} unparseable; log-likelihood accuracy ${pct(m.logprobAccuracy)}; always answering the ` +
          `majority label would score ${pct(majorityAccuracy)} (${m.n} sentences, ${evalMetrics.seconds.toFixed(1)} s)`,
      );
      if (accuracyMeaningful && m.n > 0 && m.unparseable === m.n) {
        notes.push(
          'greedy generation answered neither "Positive" nor "Negative" for any sentence, so the ' +
            "generation accuracy is 0; the log-prob accuracy against the majority class shows what the adapters " +
            "learned (a small base may never have seen the answer tokens: examples/models/mini-llama/README.md)",
        );
      }
    }

    const metrics: RunMetrics = {
      method: cfg.method,
      label,
      model: cfg.model,
      modelKind: cfg.modelSource.kind,
      modelParameters: cfg.modelParameters,
      accuracyMeaningful,
      device: gpu.info.description,
      cpuAdapter: gpu.info.isFallback,
      config: configSummary(cfg),
      notes,
      outDir: cfg.out,
      data: { trainExamples: examples.length, trainTokens, devExamples: devRows.length },
      parameters: {
        trainable: counts.trainable,
        all: counts.all,
        trainablePercent: (100 * counts.trainable) / counts.all,
        line,
      },
      bitsPerBaseParameter,
      memoryReport,
      modelBytes,
      train,
      eval: evalMetrics,
      inference,
      wallSeconds: (performance.now() - t0) / 1000,
      startedAt,
    };
    await writeText(joinPath(cfg.out, "metrics.json"), JSON.stringify(metrics, null, 2) + "\n");
    return metrics;
  } finally {
    model.dispose();
    // The matmul's split-K scratch grows to the largest product and is kept; free it too, so that the next run
    // (sst2_compare: QLoRA after LoRA) starts from an empty GPU and measures its own memory.
    releaseMatmulScratch();
    emptyCache();
  }
}

/** One forward + backward on `examples` (gradients discarded): compiles the kernels training will use. */
async function warmUp(peft: PeftModel, examples: EncodedExample[], padId: number): Promise<void> {
  const b = collate(examples, { padId });
  const T = b.seqLen;
  const positions: number[] = [];
  for (let i = 0; i < b.batchSize * T; i++) if (i % T !== T - 1 && b.labels[i + 1] !== -100) positions.push(i);
  scope(() => {
    const { logits, loss } = peft.forward({ data: b.inputIds, shape: [b.batchSize, T] }, {
      attentionMask: { data: b.attentionMask, shape: [b.batchSize, T] },
      labels: { data: b.labels, shape: [b.batchSize, T] },
      logitsPositions: positions,
    });
    logits.dispose();
    loss!.backward();
  });
  for (const p of peft.trainableParameters()) p.zeroGrad();
  await getGpu().sync();
}

function pct(x: number): string {
  return `${(100 * x).toFixed(2)}%`;
}

/** Tokens/s of a batch-1 greedy decode of the study's prompt for `sentence` (after a short warm-up). */
async function decodeSpeed(
  model: LlamaForCausalLM,
  tok: Tokenizer,
  sentence: string,
  newTokens: number,
): Promise<NonNullable<RunMetrics["inference"]>> {
  const prompt = encodePrompt(tok, sentence);
  const n = Math.min(newTokens, model.config.maxPositionEmbeddings - prompt.length);
  await generate(model, [prompt], { maxNewTokens: 2, eosTokenId: null }); // compiles the decode kernels
  const out = await generate(model, [prompt], { maxNewTokens: n, eosTokenId: null, chunk: n });
  return { tokensPerSecond: out.tokensPerSecond, newTokens: out.newTokens, prompt: sentence };
}

/**
 * The command-line entry of `sst2_lora.ts` / `sst2_qlora.ts`: reads the config and flags, runs, writes
 * `metrics.json`, `results.json`, `results.md` and `loss.svg` into `<out>`, and prints the table.
 *
 * @example
 * ```ts
 * if (import.meta.main) await cliMain(() => runSingle("lora", Deno.args));
 * ```
 */
export async function runSingle(method: Method, argv: string[]): Promise<RunMetrics | null> {
  if (argv.includes("--help") || argv.includes("-h")) {
    console.log(usage(`examples/sst2_${method}.ts`));
    return null;
  }
  const info = gpuReady() ? getGpu().info : (await init(), getGpu().info);
  const cfg = await loadExperimentConfig(argv, { method, cpu: info.isFallback });
  console.log(`GPU: ${info.description}${info.isFallback ? " (CPU / software adapter)" : ""}`);
  printConfig(cfg);
  const metrics = await runExperiment(cfg);
  const md = await writeReport(cfg.out, [metrics]);
  console.log(`\n${md.split("\n## The study")[0].trim()}\n`);
  console.log(
    `Wrote ${cfg.out}/metrics.json, results.md, results.json, loss.svg, loss.csv and the adapter in ${cfg.out}/adapter`,
  );
  return metrics;
}

/** Prints the resolved settings and the notes on what was chosen and why. */
export function printConfig(cfg: ExperimentConfig): void {
  const t = cfg.train;
  console.log(
    `[${DISPLAY[cfg.method]}] ${cfg.configPath.split("/").pop()}: model ${cfg.model}, r ${cfg.lora.r}, alpha ` +
      `${cfg.lora.alpha}, dropout ${cfg.lora.dropout}, targets ${cfg.lora.targetModules.join(",")}; ` +
      `${t.trainSamples === null ? "all" : t.trainSamples} training sentences, ${t.epochs} epoch(s)` +
      `${
        t.maxSteps === null ? "" : `, at most ${t.maxSteps} steps`
      }, batch ${t.batchSize} × ${t.gradAccum}, lr ${t.lr}, ` +
      `seed ${t.seed}; ${cfg.eval.samples === null ? "all" : cfg.eval.samples} dev sentences; out ${cfg.out}`,
  );
  for (const n of cfg.notes) console.log(`[${DISPLAY[cfg.method]}] note: ${n}`);
}

/**
 * Runs `fn` and turns any error into one line on stderr (the stack too when WEBTUNE_DEBUG is set), exit code 1.
 *
 * @example
 * ```ts
 * if (import.meta.main) await cliMain(() => runSingle("qlora", Deno.args));
 * ```
 */
export async function cliMain(fn: () => Promise<unknown>): Promise<void> {
  try {
    await fn();
  } catch (e) {
    const err = e as Error;
    console.error(`error: ${err?.message ?? String(e)}`);
    if (env("WEBTUNE_DEBUG")) console.error(err.stack);
    // deno-lint-ignore no-explicit-any
    (globalThis as any).Deno?.exit(1);
  }
}
