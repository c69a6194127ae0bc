/**
 * LLaMA inference benchmark: a LLaMA-2-7B-shaped model with random f16 weights (drawn on the GPU by the
 * constructor), then
 *
 * - `7b-prefill-8x64`: a forward of 8 × 64 tokens without a cache (all logits), prefill tokens/s. Wall time with a
 *   GPU sync on both sides around `iters` back-to-back forwards (like torch_ref's CUDA-event timing around
 *   back-to-back calls), median of repeats after warm-up;
 * - `7b-decode-b1`: greedy `generate`, batch 1, a 32-token prompt, 128 new tokens (EOS disabled so all 128 are
 *   made, as torch_ref's `min_new_tokens`), wall time including the prefill, decode tokens/s;
 *
 * each with the peak GPU memory (`memoryStats().peakBytes`, reset before the case; the weights count). Case names
 * and fields follow bench/torch_ref.py's "llama" suite (bench/README.md). With another preset or depth the case
 * names say so (`tiny-prefill-8x64`, `7b-L2-decode-b1`), so they never mix with the full-size results.
 *
 * Run: `deno run -A bench/llama.ts [--preset llama-2-7b|tiny] [--layers N] [--vocab V] [--quick] [--smoke] [--json FILE]`
 * (`--smoke`: batch 2 × 16, an 8-token prompt and 16 new tokens, for a CPU driver; `--batch`, `--seq`,
 * `--prompt-tokens`, `--new-tokens` set the shapes one by one). `--budget SECONDS` skips cases once that much
 * time has passed.
 *
 * The helpers (`takeFlags`, `benchModelConfig`, `buildRandomLlama`, `randomIds`, `timeDecode`) are reused by
 * bench/lora_step.ts.
 * @module
 */
import { getGpu, init, manualSeed, noGrad, scope, tensor } from "../mod.ts";
import { emptyCache, memoryStats, resetPeakMemory } from "../core/memory.ts";
import type { DType } from "../core/dtype.ts";
import { generate } from "../nn/generate.ts";
import { type LlamaConfig, LlamaForCausalLM, llamaPreset } from "../nn/llama.ts";
import { type BenchFlags, benchFlags, BenchLog, fmtNum, median, metaLine, textTable } from "./common.ts";

/** Bytes per GiB (2³⁰), the unit of `peak_gib`. */
export const GIB = 2 ** 30;

/**
 * Splits `args` into this script's own flags (`--name value`, `--name=value`; switches in `booleans`) and the
 * rest, which go to `benchFlags` (it rejects flags it does not know).
 *
 * @example
 * ```ts
 * const { own, rest } = takeFlags(["--preset", "tiny", "--quick"], ["preset"]);
 * // own.preset === "tiny", rest = ["--quick"]
 * ```
 */
export function takeFlags(
  args: string[],
  names: string[],
  booleans: string[] = [],
): { own: Record<string, string | boolean>; rest: string[] } {
  const own: Record<string, string | boolean> = {};
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    const m = /^--([^=]+)(?:=(.*))?$/.exec(a);
    if (m && names.includes(m[1])) {
      const v = m[2] ?? args[++i];
      if (v === undefined) throw new Error(`--${m[1]} needs a value`);
      own[m[1]] = v;
    } else if (m && booleans.includes(m[1]) && m[2] === undefined) own[m[1]] = true;
    else if (m && m[1].startsWith("no-") && booleans.includes(m[1].slice(3))) own[m[1].slice(3)] = false;
    else rest.push(a);
  }
  return { own, rest };
}

/** A positive integer flag, or `fallback`; a clear error for anything else. */
export function intFlag(v: string | boolean | undefined, name: string, fallback: number): number {
  if (v === undefined || v === false) return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new Error(`--${name} must be a positive integer, got ${v}`);
  return n;
}

/**
 * The configuration for a benchmark model and the tag its case names start with: "7b" for the full
 * LLaMA-2-7B shape, the preset's name otherwise, with `-L<n>` when `layers` changes the depth and `-V<n>` when
 * `vocab` changes the vocabulary (lavapipe binds at most 128 MiB per buffer: the 7B embedding table is 250 MiB).
 *
 * @example
 * ```ts
 * const { cfg, tag } = benchModelConfig("llama-2-7b", 2); // tag "7b-L2"
 * ```
 */
export function benchModelConfig(
  preset: string,
  layers?: number,
  vocab?: number,
): { cfg: LlamaConfig; tag: string } {
  const cfg = llamaPreset(preset);
  let tag = preset === "llama-2-7b" ? "7b" : preset;
  if (layers !== undefined && layers !== cfg.numHiddenLayers) tag += `-L${layers}`;
  if (vocab !== undefined && vocab !== cfg.vocabSize) tag += `-V${vocab}`;
  if (layers !== undefined) cfg.numHiddenLayers = layers;
  if (vocab !== undefined) cfg.vocabSize = vocab;
  return { cfg, tag };
}

/** What {@linkcode parseModelBenchArgs} returns: the model, batch and generation sizes, and the script's own flags. */
export interface ModelBenchArgs {
  /** The common benchmark flags (`--json`, `--quick`, `--smoke`, …). */
  flags: BenchFlags;
  /** The script's own flags (the names passed as `extra` and `booleans`). */
  own: Record<string, string | boolean>;
  /** `--preset` (default llama-2-7b). */
  preset: string;
  /** The architecture after `--layers` / `--vocab`, and its case-name tag. */
  cfg: LlamaConfig;
  tag: string;
  /** `--batch` and `--seq` of the prefill / training batch. */
  B: number;
  T: number;
  /** `--prompt-tokens` and `--new-tokens` of the decoding case. */
  promptTokens: number;
  newTokens: number;
}

/**
 * Parses the flags the model benchmarks share (`--preset --layers --vocab --batch --seq --prompt-tokens
 * --new-tokens` and the common ones) plus the script's `extra` value flags and `booleans`. Prints `usage` and
 * returns null for `--help`; exits with status 2 and the usage on an unknown flag.
 *
 * @example
 * ```ts
 * const args = parseModelBenchArgs(Deno.args, "usage: …", ["warmup"]);
 * if (args) console.log(args.tag, args.B, args.own.warmup);
 * ```
 */
export function parseModelBenchArgs(
  argv: string[],
  usage: string,
  extra: string[] = [],
  booleans: string[] = [],
): ModelBenchArgs | null {
  const shared = ["preset", "layers", "vocab", "batch", "seq", "prompt-tokens", "new-tokens"];
  const { own, rest } = takeFlags(argv, [...shared, ...extra], ["help", ...booleans]);
  if (own.help) {
    console.log(usage);
    return null;
  }
  let flags: BenchFlags;
  try {
    flags = benchFlags(rest);
  } catch (e) {
    console.error(`${(e as Error).message.split(". Known flags")[0]}\n${usage}`);
    Deno.exit(2);
  }
  const preset = (own.preset as string | undefined) ?? "llama-2-7b";
  const layers = own.layers === undefined ? undefined : intFlag(own.layers, "layers", 1);
  const vocab = own.vocab === undefined ? undefined : intFlag(own.vocab, "vocab", 32000);
  return {
    flags,
    own,
    preset,
    ...benchModelConfig(preset, layers, vocab),
    B: intFlag(own.batch, "batch", flags.smoke ? 2 : 8),
    T: intFlag(own.seq, "seq", flags.smoke ? 16 : 64),
    promptTokens: intFlag(own["prompt-tokens"], "prompt-tokens", flags.smoke ? 8 : 32),
    newTokens: intFlag(own["new-tokens"], "new-tokens", flags.smoke ? 16 : 128),
  };
}

/**
 * A LLaMA with random weights in `dtype`, drawn on the GPU; waits until they exist and says how long it took.
 *
 * @example
 * ```ts
 * const { model, buildS } = await buildRandomLlama(llamaPreset("tiny"), "f16", 0);
 * ```
 */
export async function buildRandomLlama(
  cfg: LlamaConfig,
  dtype: DType,
  seed: number,
): Promise<{ model: LlamaForCausalLM; buildS: number; params: number }> {
  const t0 = performance.now();
  manualSeed(seed);
  const model = new LlamaForCausalLM(cfg, { dtype });
  await getGpu().sync();
  const params = model.parameters().reduce((a, p) => a + p.numel, 0);
  return { model, buildS: (performance.now() - t0) / 1000, params };
}

/**
 * `rows` × `cols` random token ids in [3, vocab) from a seeded xorshift (the same for every run).
 *
 * @example
 * ```ts
 * const ids = randomIds(8, 64, 32000, 10);
 * ```
 */
export function randomIds(rows: number, cols: number, vocab: number, seed: number): number[][] {
  let s = (seed * 2654435761) >>> 0 || 1;
  const next = () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return s >>> 0;
  };
  return Array.from({ length: rows }, () => Array.from({ length: cols }, () => 3 + (next() % (vocab - 3))));
}

/** Options of {@linkcode timeDecode}. */
export interface DecodeOptions {
  /** Prompt length. */
  promptTokens: number;
  /** Tokens generated per call (all of them: EOS is disabled). */
  newTokens: number;
  /** Timed calls (median). */
  repeats: number;
  /** Seed of the prompt. */
  seed: number;
}

/**
 * Greedy decoding speed of `model` (batch 1): a 16-token warm-up call, then `repeats` timed `generate` calls (wall
 * time including the prefill), with the peak memory since the warm-up. Throws if a call stops early.
 *
 * @example
 * ```ts
 * const r = await timeDecode(model, { promptTokens: 32, newTokens: 128, repeats: 3, seed: 11 });
 * console.log(r.tokens_per_s);
 * ```
 */
export async function timeDecode(model: LlamaForCausalLM, o: DecodeOptions): Promise<Record<string, number>> {
  const prompt = randomIds(1, o.promptTokens, model.config.vocabSize, o.seed);
  await generate(model, prompt, { maxNewTokens: Math.min(16, o.newTokens), eosTokenId: null }); // compiles, clocks up
  resetPeakMemory();
  const times: number[] = [];
  for (let r = 0; r < o.repeats; r++) {
    await getGpu().sync();
    const t0 = performance.now();
    const out = await generate(model, prompt, { maxNewTokens: o.newTokens, eosTokenId: null });
    times.push(performance.now() - t0);
    if (out.newTokens !== o.newTokens) {
      throw new Error(`generate returned ${out.newTokens} new tokens, expected ${o.newTokens}`);
    }
  }
  const ms = median(times);
  return {
    ms,
    ms_min: Math.min(...times),
    ms_per_token: ms / o.newTokens,
    tokens_per_s: o.newTokens / (ms / 1000),
    new_tokens: o.newTokens,
    prompt_tokens: o.promptTokens,
    batch: 1,
    repeats: o.repeats,
    peak_gib: memoryStats().peakBytes / GIB,
  };
}

/**
 * Wall time per call of `fn` (which records GPU work): `warmup` calls, more calls until `warmupMs` have passed,
 * one call to size the batch, then `repeats` batches of `iters` back-to-back calls between GPU syncs, each batch
 * about `targetMs` long.
 *
 * @example
 * ```ts
 * const t = await timeWall(() => scope(() => void model.forward(ids)), { warmup: 1, repeats: 5, targetMs: 300 });
 * ```
 */
export async function timeWall(
  fn: () => void,
  o: { warmup: number; repeats: number; targetMs: number; warmupMs?: number; maxIters?: number },
): Promise<{ ms: number; ms_min: number; iters: number; repeats: number }> {
  const gpu = getGpu();
  for (let i = 0; i < o.warmup; i++) fn();
  await gpu.sync();
  // An idle H200 clocks down to 345 MHz (bench/NOTES.md): keep it busy for `warmupMs` before timing.
  let t0 = performance.now();
  while (performance.now() - t0 < (o.warmupMs ?? 0)) {
    fn();
    await gpu.sync();
  }
  t0 = performance.now();
  fn();
  await gpu.sync();
  const first = performance.now() - t0;
  const iters = Math.max(1, Math.min(o.maxIters ?? 50, Math.round(o.targetMs / Math.max(first, 1e-3))));
  const samples: number[] = [];
  for (let r = 0; r < o.repeats; r++) {
    t0 = performance.now();
    for (let i = 0; i < iters; i++) fn();
    await gpu.sync();
    samples.push((performance.now() - t0) / iters);
  }
  return { ms: median(samples), ms_min: Math.min(...samples), iters, repeats: samples.length };
}

/** Milliseconds of an empty GPU round trip (`gpu.sync()` with nothing pending), median of 5. */
export async function syncOverheadMs(): Promise<number> {
  const gpu = getGpu();
  await gpu.sync();
  const t: number[] = [];
  for (let i = 0; i < 5; i++) {
    const t0 = performance.now();
    await gpu.sync();
    t.push(performance.now() - t0);
  }
  return median(t);
}

const USAGE =
  `usage: deno run -A bench/llama.ts [--preset llama-2-7b|tiny] [--layers N] [--vocab V] [--batch 8] [--seq 64]
       [--prompt-tokens 32] [--new-tokens 128] [--quick] [--smoke] [--json FILE] [--only prefill|decode]
       [--budget SECONDS]`;

async function main(): Promise<void> {
  const args = parseModelBenchArgs(Deno.args, USAGE);
  if (!args) return;
  const { flags, preset, cfg, tag, B, T, promptTokens, newTokens } = args;

  await init();
  const log = new BenchLog(flags.json);
  const started = performance.now();
  const elapsedS = () => (performance.now() - started) / 1000;
  const note = (s: string) => console.error(`[llama ${elapsedS().toFixed(0)}s] ${s}`);
  const syncMs = await syncOverheadMs();
  await log.emit({ ...metaLine("llama", flags), preset, layers: cfg.numHiddenLayers, sync_ms: syncMs });

  const impl = "webtune-f16";
  const prefillCase = `${tag}-prefill-${B}x${T}`, decodeCase = `${tag}-decode-b1`;
  const wanted = [prefillCase, decodeCase].filter((c) => !flags.only || c.includes(flags.only));
  const summary: (string | number)[][] = [["case", "ms", "tokens/s", "peak GiB"]];
  let failures = 0;

  note(`building ${tag} (${cfg.numHiddenLayers} layers, hidden ${cfg.hiddenSize}) with random f16 weights`);
  resetPeakMemory();
  let built: Awaited<ReturnType<typeof buildRandomLlama>> | null = null;
  try {
    built = await buildRandomLlama(cfg, "f16", 0);
    note(
      `built: ${(built.params / 1e9).toFixed(3)} B parameters in ${built.buildS.toFixed(1)} s, ` +
        `${(memoryStats().liveBytes / GIB).toFixed(2)} GiB live`,
    );
  } catch (e) {
    failures++;
    for (const c of wanted) await log.emit({ suite: "llama", case: c, impl, error: `build: ${(e as Error).message}` });
  }
  if (built) {
    const { model, buildS, params } = built;
    model.eval();
    const extra = { build_s: buildS, params, layers: cfg.numHiddenLayers, preset, smoke: flags.smoke || undefined };
    const budgetLeft = () => elapsedS() < flags.budgetS;

    if (wanted.includes(prefillCase)) {
      if (!budgetLeft()) await log.emit({ suite: "llama", case: prefillCase, impl, skipped: "--budget reached" });
      else {
        note(`${prefillCase}: forward of ${B} × ${T} tokens`);
        const idsT = tensor(Int32Array.from(randomIds(B, T, cfg.vocabSize, 10).flat()), [B, T], { dtype: "i32" })
          .keep();
        try {
          resetPeakMemory();
          const gpu = getGpu();
          const d0 = gpu.dispatchCount;
          scope(() => noGrad(() => void model.forward(idsT)));
          const dispatches = gpu.dispatchCount - d0;
          const t = await timeWall(() => scope(() => noGrad(() => void model.forward(idsT))), {
            warmup: flags.smoke ? 0 : 1,
            warmupMs: flags.warmupMs,
            repeats: flags.repeats,
            targetMs: flags.quick ? 150 : 300,
            maxIters: 20,
          });
          const rec = {
            suite: "llama",
            case: prefillCase,
            impl,
            ...t,
            tokens_per_s: (B * T) / (t.ms / 1000),
            peak_gib: memoryStats().peakBytes / GIB,
            dispatches,
            batch: B,
            seq: T,
            note: "wall time per forward, GPU sync around back-to-back calls",
            ...extra,
          };
          await log.emit(rec);
          summary.push([prefillCase, t.ms, rec.tokens_per_s, rec.peak_gib]);
        } catch (e) {
          failures++;
          await log.emit({ suite: "llama", case: prefillCase, impl, error: (e as Error).message.slice(0, 400) });
        } finally {
          idsT.dispose();
          emptyCache();
        }
      }
    }

    if (wanted.includes(decodeCase)) {
      if (!budgetLeft()) await log.emit({ suite: "llama", case: decodeCase, impl, skipped: "--budget reached" });
      else {
        note(`${decodeCase}: greedy, ${promptTokens}-token prompt, ${newTokens} new tokens`);
        try {
          const r = await timeDecode(model, {
            promptTokens,
            newTokens,
            repeats: flags.quick || flags.smoke ? 1 : 3,
            seed: 11,
          });
          await log.emit({
            suite: "llama",
            case: decodeCase,
            impl,
            ...r,
            note: "wall time of generate incl. prefill",
            ...extra,
          });
          summary.push([decodeCase, r.ms, r.tokens_per_s, r.peak_gib]);
        } catch (e) {
          failures++;
          await log.emit({ suite: "llama", case: decodeCase, impl, error: (e as Error).message.slice(0, 400) });
        }
      }
    }
    model.dispose();
    emptyCache();
  }
  console.error(textTable(summary));
  console.error(`[llama] done in ${fmtNum(elapsedS())} s${failures ? `, ${failures} case(s) failed` : ""}`);
  if (failures) Deno.exitCode = 1;
}

if (import.meta.main) await main();
