/**
 * LoRA / QLoRA training-step benchmark on a LLaMA-2-7B-shaped model with random weights: LoRA r=16, alpha 16,
 * dropout 0.1 on q, v, o, gate, up and down projections; batch 8 × 64 random tokens; one step = forward with
 * labels, backward, AdamW (lr 5e-5) step, zeroGrad. Step time is wall time with a GPU sync on both sides, median
 * over the timed steps after warm-up (torch_ref: 3 warm-up, 10 timed). Cases (bench/README.md, suite
 * "lora_step"):
 *
 * - `7b-f16-lora-r16-8x64`: f16 base, loss over all positions (HF `labels=input_ids`, as torch_ref);
 * - `7b-f16-lora-r16-8x64-gc`: the same with gradient checkpointing (each decoder layer recomputed in backward);
 * - `7b-f16-lora-r16-8x64-answer`: the study's SST-2 loss, labels only on the last 3 positions of each row (the
 *   answer tokens and EOS), the LM head run only where a label follows (`logitsPositions`), as the Trainer does;
 * - `7b-nf4-…` (same three): NF4 base with double quantization (blocks of 64), quantized layer by layer from random
 *   f16 weights, so the f16 model is never whole on the GPU (lm_head, embeddings and norms stay f16, as in
 *   QLoRA). Skipped with a `{"skipped": …}` line while `quant/` has no `Linear4bit.fromLinear` / `quantizeModel`;
 * - `7b-lora-decode-unmerged`, `7b-lora-decode-merged`: greedy decoding (batch 1, 32-token prompt, 128 new tokens)
 *   through the f16 LoRA model before and after `merge()`.
 *
 * `peak_gib` is the peak since just before the case's warm-up steps (model, adapters, optimizer state,
 * activations; as torch_ref resets it); `peak_with_load_gib` also covers building the model (for NF4: one f16
 * layer at a time on top of the quantized ones). Models are disposed and the pool emptied between bases.
 *
 * Run: `deno run -A bench/lora_step.ts [--preset llama-2-7b|tiny] [--layers N] [--vocab V] [--bases f16,nf4] [--warmup 3]
 * [--steps 10] [--no-answer] [--no-decode] [--quick] [--smoke] [--json FILE] [--only TEXT] [--budget SECONDS]`
 * (`--smoke`: batch 2 × 16 and 16 new tokens for a CPU driver; `--quant-module FILE`: take `Linear4bit` from
 * another module, to test the NF4 path with a stand-in).
 * @module
 */
import {
  AdamW,
  emptyCache,
  getGpu,
  init,
  manualSeed,
  memoryStats,
  resetPeakMemory,
  type Tensor,
  tensor,
} from "../mod.ts";
import { scope } from "../core/scope.ts";
import { Embedding, Linear, RMSNorm, withDeferredInit } from "../nn/layers.ts";
import { type LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM } from "../nn/llama.ts";
import type { Module } from "../nn/module.ts";
import { getPeftModel, type PeftModel } from "../peft/model.ts";
import type { LinearLike } from "../peft/lora.ts";
import { BenchLog, fmtNum, median, metaLine, textTable } from "./common.ts";
import { buildRandomLlama, GIB, intFlag, parseModelBenchArgs, randomIds, syncOverheadMs, timeDecode } from "./llama.ts";

const TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
const LORA = { r: 16, alpha: 16, dropout: 0.1, targetModules: TARGETS };
const LR = 5e-5;
/** Labelled positions per row in the answer-only case: " Positive"/" Negative" (2 tokens) and EOS. */
const ANSWER_TOKENS = 3;
const NF4 = { type: "nf4", blockSize: 64, doubleQuant: true };

type Base = "f16" | "nf4";

/** What this benchmark needs from `quant/` (being written; looked up at run time). */
interface QuantModule {
  Linear4bit?: { fromLinear(linear: Linear, opts?: Record<string, unknown>): LinearLike | Promise<LinearLike> };
  quantizeModel?: (model: Module, opts?: Record<string, unknown>) => unknown;
}

/** Turns one decoder layer's Linears into NF4 layers (freeing the f16 weights). */
type LayerQuantizer = (layer: LlamaDecoderLayer) => Promise<void>;

/** The quantizer `quant/` (or `path`) offers, or the reason there is none (then the NF4 cases are skipped). */
async function loadQuantizer(path?: string): Promise<LayerQuantizer | string> {
  let q: QuantModule;
  try {
    // A computed specifier: quant/ is being written, so its state must not break this script's type check.
    const url = path ? new URL(path, `file://${Deno.cwd()}/`) : new URL("../quant/mod.ts", import.meta.url);
    q = await import(url.href) as QuantModule;
  } catch (e) {
    return `quant/mod.ts does not load: ${(e as Error).message.split("\n")[0]}`;
  }
  const fromLinear = q.Linear4bit?.fromLinear?.bind(q.Linear4bit);
  if (fromLinear) {
    return async (layer) => {
      for (const [name, m] of layer.namedModules()) {
        if (!(m instanceof Linear)) continue;
        const q4 = await fromLinear(m, { blockSize: NF4.blockSize, doubleQuant: NF4.doubleQuant });
        layer.setSubmodule(name, q4);
        m.dispose();
      }
    };
  }
  const quantizeModel = q.quantizeModel;
  if (quantizeModel) {
    return async (layer) => {
      await quantizeModel(layer, { ...NF4, skip: [] });
      const left = layer.namedModules().filter(([, m]) => m instanceof Linear).map(([n]) => n);
      if (left.length) throw new Error(`quantizeModel left dense Linear layers: ${left.join(", ")}`);
    };
  }
  return "quant/ has neither Linear4bit.fromLinear nor quantizeModel yet";
}

/**
 * The model with an NF4 base built without ever holding the f16 model: placeholders first, then per decoder
 * layer random f16 weights that are quantized and freed before the next layer is drawn.
 */
async function buildNf4Llama(
  cfg: LlamaConfig,
  seed: number,
  quantize: LayerQuantizer,
  note: (s: string) => void,
): Promise<{ model: LlamaForCausalLM; buildS: number }> {
  const t0 = performance.now();
  const gpu = getGpu();
  manualSeed(seed);
  const model = withDeferredInit(() => new LlamaForCausalLM(cfg, { dtype: "f16" }));
  const swap = (path: string, fresh: Module) => {
    const old = model.getSubmodule(path);
    model.setSubmodule(path, fresh);
    old.dispose();
  };
  swap("model.embed_tokens", new Embedding(cfg.vocabSize, cfg.hiddenSize, { dtype: "f16" }));
  swap("model.norm", new RMSNorm(cfg.hiddenSize, cfg.rmsNormEps, { dtype: "f16" }));
  if (model.lm_head) swap("lm_head", new Linear(cfg.hiddenSize, cfg.vocabSize, { bias: false, dtype: "f16" }));
  for (let i = 0; i < cfg.numHiddenLayers; i++) {
    const layer = new LlamaDecoderLayer(cfg, "f16");
    await quantize(layer);
    model.model.layers[i].dispose(); // (setSubmodule cannot reach list items: "model.layers" is no module)
    model.model.layers[i] = layer;
    gpu.flush(); // lets the pool hand the freed f16 buffers to the next layer
    if (i === 0 || (i + 1) % 8 === 0) note(`quantized layer ${i + 1}/${cfg.numHiddenLayers}`);
  }
  await gpu.sync();
  return { model, buildS: (performance.now() - t0) / 1000 };
}

/** Inputs of one step: token ids on the GPU and the forward's label options. */
interface StepData {
  ids: Tensor;
  labels: { data: Int32Array; shape: [number, number] };
  logitsPositions?: number[];
}

function stepData(B: number, T: number, vocab: number, answerOnly: boolean): StepData {
  const flat = Int32Array.from(randomIds(B, T, vocab, 12).flat());
  const ids = tensor(flat, [B, T], { dtype: "i32" }).keep();
  if (!answerOnly) return { ids, labels: { data: flat, shape: [B, T] } };
  const labels = flat.map((v, i) => (i % T >= T - ANSWER_TOKENS ? v : -100));
  const positions: number[] = [];
  for (let i = 0; i < B * T; i++) if (i % T !== T - 1 && labels[i + 1] !== -100) positions.push(i);
  return { ids, labels: { data: labels, shape: [B, T] }, logitsPositions: positions };
}

/** One training step, recorded (nothing is read back); returns the loss (a kept tensor). */
function trainStep(peft: PeftModel, opt: AdamW, d: StepData): Tensor {
  return scope(() => {
    const { logits, loss } = peft.forward(d.ids, { labels: d.labels, logitsPositions: d.logitsPositions });
    logits.dispose();
    loss!.backward();
    opt.step();
    opt.zeroGrad();
    return loss!.detach().keep();
  });
}

const USAGE =
  `usage: deno run -A bench/lora_step.ts [--preset llama-2-7b|tiny] [--layers N] [--vocab V] [--bases f16,nf4]
       [--batch 8] [--seq 64] [--warmup 3] [--steps 10] [--no-answer] [--no-decode] [--prompt-tokens 32]
       [--new-tokens 128] [--quick] [--smoke] [--json FILE] [--only TEXT] [--budget SECONDS] [--quant-module FILE]`;

async function main(): Promise<void> {
  const args = parseModelBenchArgs(Deno.args, USAGE, ["bases", "warmup", "steps", "quant-module"], [
    "answer",
    "decode",
  ]);
  if (!args) return;
  const { flags, own, preset, cfg, tag, B, T, promptTokens, newTokens } = args;
  const warmup = own.warmup === "0" ? 0 : intFlag(own.warmup, "warmup", flags.smoke || flags.quick ? 1 : 3);
  const steps = intFlag(own.steps, "steps", flags.smoke ? 2 : flags.quick ? 3 : 10);
  const bases = String(own.bases ?? "f16,nf4").split(",").filter(Boolean) as Base[];
  for (const b of bases) if (b !== "f16" && b !== "nf4") throw new Error(`--bases: unknown base "${b}" (f16, nf4)`);
  const withAnswer = own.answer !== false, withDecode = own.decode !== false;
  if (T <= ANSWER_TOKENS) throw new Error(`--seq must exceed ${ANSWER_TOKENS}`);

  await init();
  const log = new BenchLog(flags.json);
  const started = performance.now();
  const elapsedS = () => (performance.now() - started) / 1000;
  const note = (s: string) => console.error(`[lora_step ${elapsedS().toFixed(0)}s] ${s}`);
  const syncMs = await syncOverheadMs();
  await log.emit({ ...metaLine("lora_step", flags), preset, layers: cfg.numHiddenLayers, sync_ms: syncMs });
  const summary: (string | number)[][] = [["case", "s (step or generate)", "tokens/s", "peak GiB", "peak+load GiB"]];
  let failures = 0;
  const suite = "lora_step";
  const want = (c: string) => !flags.only || c.includes(flags.only);

  for (const base of bases) {
    const impl = `webtune-${base}`;
    const stem = `${tag}-${base}-lora-r${LORA.r}-${B}x${T}`;
    const trainCases = [
      { name: stem, gc: false, answer: false },
      { name: `${stem}-gc`, gc: true, answer: false },
      ...(withAnswer ? [{ name: `${stem}-answer`, gc: false, answer: true }] : []),
    ].filter((c) => want(c.name));
    const decodeCases = base === "f16" && withDecode
      ? [`${tag}-lora-decode-unmerged`, `${tag}-lora-decode-merged`].filter(want)
      : [];
    if (trainCases.length + decodeCases.length === 0) continue;
    const all = [...trainCases.map((c) => c.name), ...decodeCases];
    if (elapsedS() > flags.budgetS) {
      for (const c of all) await log.emit({ suite, case: c, impl, skipped: `--budget ${flags.budgetS} s reached` });
      continue;
    }

    // ---- build ----
    let quantize: LayerQuantizer | string | null = null;
    if (base === "nf4") {
      quantize = await loadQuantizer(own["quant-module"] as string | undefined);
      if (typeof quantize === "string") {
        note(`NF4 cases skipped: ${quantize}`);
        for (const c of all) await log.emit({ suite, case: c, impl, skipped: quantize });
        continue;
      }
    }
    note(`building ${tag} with a random ${base} base (${cfg.numHiddenLayers} layers)`);
    resetPeakMemory();
    let model: LlamaForCausalLM | null = null;
    let peft: PeftModel | null = null;
    let buildS = 0;
    try {
      if (base === "nf4") ({ model, buildS } = await buildNf4Llama(cfg, 1, quantize as LayerQuantizer, note));
      else ({ model, buildS } = await buildRandomLlama(cfg, "f16", 1));
      peft = getPeftModel(model, LORA);
      await getGpu().sync();
    } catch (e) {
      failures++;
      model?.dispose();
      emptyCache();
      for (const c of all) await log.emit({ suite, case: c, impl, error: `build: ${(e as Error).message}` });
      continue;
    }
    const loadPeak = memoryStats().peakBytes;
    const counts = peft.parameterCounts();
    note(
      `built in ${buildS.toFixed(1)} s: ${(memoryStats().liveBytes / GIB).toFixed(2)} GiB live, ` +
        `trainable ${counts.trainable.toLocaleString("en-US")} of ${counts.all.toLocaleString("en-US")}`,
    );
    const common = {
      trainable_params: counts.trainable,
      all_params: counts.all,
      r: LORA.r,
      lora_alpha: LORA.alpha,
      lora_dropout: LORA.dropout,
      targets: TARGETS,
      lora_dtype: "f32",
      base_dtype: base,
      build_s: buildS,
      load_peak_gib: loadPeak / GIB,
      layers: cfg.numHiddenLayers,
      preset,
      smoke: flags.smoke || undefined,
      ...(base === "nf4" ? { quant: NF4 } : {}),
    };

    // ---- training steps ----
    for (const c of trainCases) {
      if (elapsedS() > flags.budgetS) {
        await log.emit({ suite, case: c.name, impl, skipped: `--budget ${flags.budgetS} s reached` });
        continue;
      }
      note(`${c.name}: ${warmup} warm-up + ${steps} timed steps`);
      const d = stepData(B, T, cfg.vocabSize, c.answer);
      const opt = new AdamW(peft.trainableParameters(), { lr: LR });
      let last: Tensor | null = null;
      try {
        peft.gradientCheckpointing(c.gc);
        peft.train();
        const gpu = getGpu();
        await gpu.sync();
        resetPeakMemory();
        const d0 = gpu.dispatchCount;
        const times: number[] = [];
        for (let s = 0; s < warmup + steps; s++) {
          const t0 = performance.now();
          const loss = trainStep(peft, opt, d);
          await gpu.sync();
          if (s >= warmup) times.push((performance.now() - t0) / 1000);
          last?.dispose();
          last = loss;
        }
        const dispatchesPerStep = Math.round((gpu.dispatchCount - d0) / (warmup + steps));
        const lossLast = await last!.item();
        const sec = median(times);
        const peak = memoryStats().peakBytes;
        const rec = {
          suite,
          case: c.name,
          impl,
          ms: sec * 1000,
          step_s: sec,
          step_s_min: Math.min(...times),
          tokens_per_s: (B * T) / sec,
          peak_gib: peak / GIB,
          peak_with_load_gib: Math.max(peak, loadPeak) / GIB,
          steps,
          warmup_steps: warmup,
          gradient_checkpointing: c.gc,
          loss_positions: c.answer ? `last ${ANSWER_TOKENS} per row (answer-only)` : "all",
          optimizer: `AdamW lr ${LR}`,
          loss_last: lossLast,
          dispatches_per_step: dispatchesPerStep,
          ...common,
        };
        await log.emit(rec);
        summary.push([c.name, sec, rec.tokens_per_s, rec.peak_gib, rec.peak_with_load_gib]);
        if (!Number.isFinite(lossLast)) note(`WARNING: ${c.name} loss is ${lossLast}`);
      } catch (e) {
        failures++;
        await log.emit({ suite, case: c.name, impl, error: (e as Error).message.slice(0, 400) });
      } finally {
        last?.dispose();
        opt.dispose();
        for (const p of peft.trainableParameters()) p.zeroGrad();
        d.ids.dispose();
        peft.gradientCheckpointing(false);
        emptyCache();
      }
    }

    // ---- decoding through the adapter, unmerged then merged ----
    for (const c of decodeCases) {
      if (elapsedS() > flags.budgetS) {
        await log.emit({ suite, case: c, impl, skipped: `--budget ${flags.budgetS} s reached` });
        continue;
      }
      const merged = c.endsWith("-merged");
      note(`${c}: greedy, ${promptTokens}-token prompt, ${newTokens} new tokens`);
      try {
        peft.eval();
        if (merged) peft.merge();
        const r = await timeDecode(peft.model, {
          promptTokens,
          newTokens,
          repeats: flags.quick || flags.smoke ? 1 : merged ? 3 : 2,
          seed: 11,
        });
        await log.emit({ suite, case: c, impl, ...r, note: "wall time of generate incl. prefill", ...common });
        summary.push([c, r.ms / 1000, r.tokens_per_s, r.peak_gib, "—"]);
      } catch (e) {
        failures++;
        await log.emit({ suite, case: c, impl, error: (e as Error).message.slice(0, 400) });
      } finally {
        emptyCache();
      }
    }
    peft.dispose();
    model.dispose();
    emptyCache();
    note(`${base} done; ${(memoryStats().liveBytes / GIB).toFixed(3)} GiB still live`);
  }
  console.error(textTable(summary));
  console.error(`[lora_step] done in ${fmtNum(elapsedS())} s${failures ? `, ${failures} case(s) failed` : ""}`);
  if (failures) Deno.exitCode = 1;
}

if (import.meta.main) await main();
