/**
 * LoRA vs QLoRA on SST-2, the study's experiment: runs examples/configs/sst2_lora.yaml and sst2_qlora.yaml one after
 * the other with the same seed (so the same training subset, data order and LoRA initialisation), freeing the first
 * model before the second, then writes into `--out` (default runs/sst2_compare):
 * - `lora/` and `qlora/`: each run's loss.csv, adapter/ (PEFT format), last-checkpoint/ and metrics.json;
 * - `results.json`: both runs' metrics and the study's numbers;
 * - `results.md`: the table in the layout of the study's Table 2, and the study's own table;
 * - `loss.svg`: both training-loss curves against optimizer steps, smoothed, like the study's Figure 1.
 *
 * ```sh
 * deno run -A examples/sst2_compare.ts                                        # mini-llama; on a CPU adapter a subset
 * deno run -A examples/sst2_compare.ts --model ./Llama-2-7b-hf                # the study
 * deno run -A examples/sst2_compare.ts --model random:llama-2-7b --max-steps 50   # speed and memory, no accuracy
 * ```
 *
 * Flags are those of sst2_lora.ts / sst2_qlora.ts and apply to both runs; `--lora-config` and `--qlora-config`
 * replace the two YAML files.
 * @module
 */
import { init } from "../core/mod.ts";
import { getGpu, gpuReady } from "../core/gpu.ts";
import { fmtBytes, memoryStats } from "../core/memory.ts";
import { joinPath } from "../core/platform.ts";
import { type ExperimentConfig, loadExperimentConfig, usage } from "./sst2/config.ts";
import { writeReport } from "./sst2/report.ts";
import { cliMain, printConfig, runExperiment, type RunMetrics, type RunOptions } from "./sst2/run.ts";

/** What {@linkcode runCompare} produced. */
export interface CompareResult {
  /** The runs that completed, LoRA first. */
  runs: RunMetrics[];
  /** Methods that did not run (after an interruption), with the reason. */
  skipped: { method: string; reason: string }[];
  /** The Markdown report (also in results.md). */
  markdown: string;
  /** Where everything was written. */
  outDir: string;
  /** Wall time, seconds. */
  wallSeconds: number;
}

/** Options of {@linkcode runCompare}. */
export interface CompareOptions {
  /** Print progress (default true). */
  verbose?: boolean;
  /** Passed to each run (e.g. fewer decoding tokens in tests). */
  run?: RunOptions;
}

/** Takes `--name value` / `--name=value` out of `argv`; returns the value (or undefined) and the rest. */
function takeFlag(argv: string[], name: string): [string | undefined, string[]] {
  const rest: string[] = [];
  let value: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === `--${name}`) {
      if (i + 1 >= argv.length) throw new Error(`--${name} needs a value`);
      value = argv[++i];
    } else if (a.startsWith(`--${name}=`)) value = a.slice(name.length + 3);
    else rest.push(a);
  }
  return [value, rest];
}

/** The settings that decide which examples are seen in which order; they must agree between the two runs. */
function dataOrderKey(c: ExperimentConfig): string {
  const t = c.train;
  return JSON.stringify({
    seed: t.seed,
    trainSamples: t.trainSamples,
    batchSize: t.batchSize,
    gradAccum: t.gradAccum,
    epochs: t.epochs,
    maxSteps: t.maxSteps,
    groupByLength: t.groupByLength,
  });
}

/**
 * Runs LoRA then QLoRA with the flags in `argv` and writes the report (see the module doc). An interrupted run
 * (Ctrl-C) keeps its checkpoint and loss.csv, and the comparison stops after it with a report of what ran.
 *
 * @example
 * ```ts
 * const { markdown } = await runCompare(["--model", "random:tiny", "--max-steps", "2"]);
 * ```
 */
export async function runCompare(argv: string[], opts: CompareOptions = {}): Promise<CompareResult> {
  const verbose = opts.verbose ?? true;
  const say = (s: string) => verbose && console.log(s);
  const t0 = performance.now();
  let rest = argv;
  let loraConfig: string | undefined,
    qloraConfig: string | undefined,
    out: string | undefined,
    single: string | undefined;
  [loraConfig, rest] = takeFlag(rest, "lora-config");
  [qloraConfig, rest] = takeFlag(rest, "qlora-config");
  [out, rest] = takeFlag(rest, "out");
  [single, rest] = takeFlag(rest, "config");
  if (single !== undefined) {
    throw new Error(
      `sst2_compare runs two configurations: use --lora-config FILE and/or --qlora-config FILE instead of --config`,
    );
  }
  const outDir = out ?? "runs/sst2_compare";
  if (!gpuReady()) await init();
  const info = getGpu().info;
  say(`GPU: ${info.description}${info.isFallback ? " (CPU / software adapter)" : ""}`);
  // Both configurations are read and checked before anything runs.
  const configs = [
    await loadExperimentConfig([...rest, "--out", joinPath(outDir, "lora")], {
      method: "lora",
      defaultConfig: loraConfig,
      cpu: info.isFallback,
    }),
    await loadExperimentConfig([...rest, "--out", joinPath(outDir, "qlora")], {
      method: "qlora",
      defaultConfig: qloraConfig,
      cpu: info.isFallback,
    }),
  ];
  for (const c of configs) if (verbose) printConfig(c);
  if (dataOrderKey(configs[0]) !== dataOrderKey(configs[1])) {
    say(
      `warning: the two configurations differ in seed, training subset, batching or steps, so LoRA and QLoRA will ` +
        `not see the same data in the same order: ${dataOrderKey(configs[0])} vs ${dataOrderKey(configs[1])}`,
    );
  }
  const runs: RunMetrics[] = [];
  const skipped: { method: string; reason: string }[] = [];
  for (const cfg of configs) {
    say(`\n=== ${cfg.method === "lora" ? "LoRA" : "QLoRA"} (${cfg.model}) ===`);
    const m = await runExperiment(cfg, { verbose, ...opts.run });
    runs.push(m);
    say(`GPU memory after freeing the model: ${fmtBytes(memoryStats().liveBytes)} live`);
    if (m.train.interrupted) {
      say("interrupted: the checkpoint and loss.csv are saved; the comparison stops here");
      for (const rest of configs.slice(runs.length)) {
        skipped.push({
          method: rest.method === "lora" ? "LoRA" : "QLoRA",
          reason: `the ${m.label} run was interrupted`,
        });
      }
      break;
    }
  }
  const markdown = await writeReport(outDir, runs, skipped);
  const wallSeconds = (performance.now() - t0) / 1000;
  say(`\n${markdown.trim()}\n`);
  say(
    `Wrote ${outDir}/results.md, results.json and loss.svg (runs in ${outDir}/lora and ${outDir}/qlora); ` +
      `wall time ${(wallSeconds / 60).toFixed(1)} min`,
  );
  return { runs, skipped, markdown, outDir, wallSeconds };
}

if (import.meta.main) {
  if (Deno.args.includes("--help") || Deno.args.includes("-h")) {
    console.log(usage("examples/sst2_compare.ts", " [--lora-config FILE] [--qlora-config FILE]"));
  } else {
    await cliMain(() => runCompare(Deno.args));
  }
}
