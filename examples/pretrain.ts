/**
 * Pretrains a small Llama from scratch (every parameter trained, causal-LM loss on every token) and saves it as a
 * Hugging Face directory (config.json + model.safetensors) that the SST-2 examples take as `--model`.
 *
 * ```sh
 * # the project's small base (examples/models/mini-llama), on the H200 in about two minutes:
 * deno run -A examples/pretrain.ts --out examples/models/mini-llama
 * # a quick look on a CPU adapter
 * deno run -A examples/pretrain.ts --out runs/pretrain --max-steps 20 --dim 32 --batch 4
 * ```
 *
 * Text: the sentences of SST-2's training split (labels unused; the dev split is never read) from `--data DIR`
 * (default `$SST2_DIR`), and every `.txt` file under `--corpora DIR` (default `$WEBTUNE_SHARED/data/corpora`),
 * split into paragraphs at blank lines. Each document becomes `<s> … </s>`; the token stream is cut into
 * `--seq`-token rows, 1 % of them held out for a validation loss. Tokenizer: Llama-2's (`--tokenizer`, default
 * `$WEBTUNE_SHARED/models/llama2-tokenizer/tokenizer.model`), so the model reads the SST-2 prompt as Llama-2 does.
 *
 * Architecture flags: `--dim 64 --layers 4 --heads 8 --hidden 192` and tied input/output embeddings (the
 * 32,000 × dim table is most of the parameters; tying halves the file). Training flags: `--seq 128 --batch 32
 * --lr 3e-3 --warmup 0.02 --epochs 2 --max-steps N --seed 0`; AdamW β = (0.9, 0.95), no weight decay, clip 1.0,
 * cosine schedule. Weights start as N(0, 0.02), residual output projections scaled by 1/√(2·layers) (GPT-2).
 * Writes loss.csv and README.md (what was trained, on what, the final losses) next to the weights (f16).
 * `--time-limit SECONDS` (or Ctrl-C) ends training early; the model trained so far is still evaluated and saved.
 * @module
 */
import { parseArgs } from "@std/cli";
import { fromArray, randn } from "../core/creation.ts";
import { init } from "../core/mod.ts";
import { memoryStats } from "../core/memory.ts";
import { AdamW, clipCoefficient } from "../core/optim.ts";
import {
  appendText,
  env,
  exists,
  isDirectory,
  joinPath,
  listDir,
  makeDir,
  onInterrupt,
  readText,
  writeProgress,
  writeText,
} from "../core/platform.ts";
import { cosineWithWarmup, LRScheduler } from "../core/schedule.ts";
import { scope } from "../core/scope.ts";
import { noGrad } from "../core/autograd.ts";
import { mulberry32, shuffled } from "../data/batching.ts";
import { loadSst2Split, resolveSst2Dir } from "../data/sst2.ts";
import { Tokenizer } from "../data/tokenizer.ts";
import { type LlamaConfig, LlamaForCausalLM, llamaPreset } from "../nn/llama.ts";
import { savePretrained } from "../nn/loader.ts";
import { cliMain } from "./sst2/run.ts";
import { progressLine } from "../peft/trainer.ts";

const USAGE =
  "usage: deno run -A examples/pretrain.ts --out DIR [--data SST2_DIR] [--corpora DIR] [--tokenizer FILE] " +
  "[--dim 64] [--layers 4] [--heads 8] [--hidden 192] [--seq 128] [--batch 32] [--lr 3e-3] [--warmup 0.02] " +
  "[--epochs 2] [--max-steps N] [--seed 0] [--time-limit SECONDS]";

/** Paragraphs of a text file (blank-line separated, whitespace collapsed). */
function paragraphs(text: string): string[] {
  return text.split(/\n\s*\n/).map((p) => p.replace(/\s+/g, " ").trim()).filter((p) => p.length > 0);
}

/** Every `.txt` file under `dir`, recursively, sorted. */
async function textFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const name of (await listDir(dir)).sort()) {
    const path = joinPath(dir, name);
    if (await isDirectory(path)) out.push(...await textFiles(path));
    else if (name.endsWith(".txt")) out.push(path);
  }
  return out;
}

/** A positive integer flag. */
function intFlag(flags: Record<string, unknown>, name: string): number {
  const v = Number(flags[name]);
  if (!Number.isInteger(v) || v <= 0) throw new Error(`--${name} must be a positive integer, got ${flags[name]}`);
  return v;
}

/**
 * The pretraining text as one token stream: SST-2's training sentences from `sst2Dir` (else `$SST2_DIR`; labels
 * unused), then every `.txt` under `corpora` paragraph by paragraph, each document `<s> … </s>`.
 *
 * @example
 * ```ts
 * const { docs, stream } = await pretrainingStream(tok, "../shared/data/sst2", "../shared/data/corpora");
 * ```
 */
export async function pretrainingStream(
  tok: Tokenizer,
  sst2Dir: string | undefined,
  corpora: string | undefined,
): Promise<{ docs: { source: string; texts: string[] }[]; stream: number[] }> {
  const docs = [{
    source: "SST-2 train sentences",
    texts: (await loadSst2Split(await resolveSst2Dir(sst2Dir), "train")).map((e) => e.sentence),
  }];
  if (corpora) {
    if (!(await isDirectory(corpora))) throw new Error(`--corpora ${corpora}: not a directory`);
    for (const f of await textFiles(corpora)) {
      docs.push({ source: f.slice(corpora.length + 1), texts: paragraphs(await readText(f)) });
    }
  }
  const stream: number[] = [];
  for (const d of docs) {
    const before = stream.length;
    for (const t of d.texts) stream.push(...tok.encode(t, { bos: true }), tok.eosId);
    console.error(
      `[pretrain] ${d.source}: ${d.texts.length.toLocaleString("en")} documents, ${
        (stream.length - before).toLocaleString("en")
      } tokens`,
    );
  }
  return { docs, stream };
}

/**
 * Gives the tied embedding rows of tokens that never occur in `stream` distinct random parts. Such rows get no
 * signal but the softmax's push away from every hidden state, so pretraining leaves them as one shared vector
 * (mini-llama: 20,266 rows of norm 4.78 against ~1.1 for seen tokens); an adapter then cannot make one of them,
 * say " Pos", win over the others. Each becomes the shared mean plus N(0, σ²) per coordinate, σ = the median norm of
 * the seen rows / √dim: still suppressed in ordinary text, now distinguishable. Returns how many rows changed.
 *
 * @example
 * ```ts
 * const changed = await separateUnseenRows(model, stream, 0);
 * ```
 */
export async function separateUnseenRows(model: LlamaForCausalLM, stream: number[], seed: number): Promise<number> {
  const W = model.model.embed_tokens.weight;
  const [V, D] = W.shape;
  const seen = new Uint8Array(V);
  for (const id of stream) seen[id] = 1;
  const unseen = [...seen.keys()].filter((i) => !seen[i]);
  if (unseen.length === 0) return 0;
  const w = Float32Array.from(await W.toArray() as Float32Array);
  const mean = new Float64Array(D);
  for (const i of unseen) for (let d = 0; d < D; d++) mean[d] += w[i * D + d] / unseen.length;
  const norms = [...seen.keys()].filter((i) => seen[i]).map((i) => Math.hypot(...w.subarray(i * D, (i + 1) * D)));
  norms.sort((a, b) => a - b);
  const sigma = norms[norms.length >> 1] / Math.sqrt(D);
  const uniform = mulberry32(seed + 0x5eed);
  const gauss = () => Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform());
  for (const i of unseen) for (let d = 0; d < D; d++) w[i * D + d] = mean[d] + sigma * gauss();
  noGrad(() => {
    using t = fromArray(w, [V, D], { dtype: W.dtype });
    model.loadStateDict({ "model.embed_tokens.weight": t }, { strict: false });
  });
  return unseen.length;
}

/** Flags with a default value (all strings, as parsed). */
const DEFAULTS = {
  dim: "64",
  layers: "4",
  heads: "8",
  hidden: "192",
  seq: "128",
  batch: "32",
  lr: "3e-3",
  warmup: "0.02",
  epochs: "2",
  seed: "0",
};

async function main(): Promise<void> {
  const flags = parseArgs(Deno.args, {
    string: ["out", "data", "corpora", "tokenizer", "max-steps", "time-limit", ...Object.keys(DEFAULTS)],
    boolean: ["help"],
    default: DEFAULTS,
  });
  if (flags.help) return void console.log(USAGE);
  if (!flags.out) throw new Error("--out DIR is required (where config.json and model.safetensors go); see --help");
  const outDir = flags.out as string;
  const [dim, layers, heads, hidden, seq, batch, epochs] = [
    "dim",
    "layers",
    "heads",
    "hidden",
    "seq",
    "batch",
    "epochs",
  ]
    .map((n) => intFlag(flags, n));
  const lr = Number(flags.lr), warmup = Number(flags.warmup), seed = Number(flags.seed);
  if (!(lr > 0)) throw new Error(`--lr must be > 0, got ${flags.lr}`);
  if (dim % heads !== 0) throw new Error(`--dim ${dim} must be a multiple of --heads ${heads}`);

  // ---- text → token rows ---------------------------------------------------------------------------------------
  const shared = env("WEBTUNE_SHARED");
  const tokPath = (flags.tokenizer as string | undefined) ??
    (shared ? joinPath(shared, "models/llama2-tokenizer/tokenizer.model") : undefined);
  if (!tokPath || !(await exists(tokPath))) {
    throw new Error(`no tokenizer: pass --tokenizer tokenizer.model or set WEBTUNE_SHARED (tried ${tokPath})`);
  }
  const tok = await Tokenizer.load(tokPath);
  const corpora = (flags.corpora as string | undefined) ?? (shared ? joinPath(shared, "data/corpora") : undefined);
  const { docs, stream } = await pretrainingStream(tok, flags.data as string | undefined, corpora);
  const rowsAll = Math.floor(stream.length / seq);
  const order = shuffled(rowsAll, seed);
  const nVal = Math.max(1, Math.floor(rowsAll * 0.01));
  const valRows = order.slice(0, nVal), trainRows = order.slice(nVal);
  const stepsPerEpoch = Math.floor(trainRows.length / batch);
  const totalSteps = Math.min(flags["max-steps"] ? intFlag(flags, "max-steps") : Infinity, stepsPerEpoch * epochs);
  if (totalSteps < 1) throw new Error(`only ${trainRows.length} rows of ${seq} tokens: lower --batch or --seq`);

  // ---- model ---------------------------------------------------------------------------------------------------
  const config: LlamaConfig = {
    ...llamaPreset("tiny"),
    hiddenSize: dim,
    intermediateSize: hidden,
    numHiddenLayers: layers,
    numAttentionHeads: heads,
    numKeyValueHeads: heads,
    headDim: dim / heads,
    maxPositionEmbeddings: Math.max(512, seq),
    tieWordEmbeddings: true,
  };
  await init();
  const model = new LlamaForCausalLM(config).requiresGrad_(true);
  noGrad(() => {
    const fresh = new Map<string, ReturnType<typeof randn>>();
    for (const [name, p] of model.namedParameters()) {
      if (p.ndim !== 2) continue; // RMSNorm weights stay 1
      const residual = name.endsWith("o_proj.weight") || name.endsWith("down_proj.weight");
      fresh.set(
        name,
        randn(p.shape, { std: residual ? 0.02 / Math.sqrt(2 * layers) : 0.02, seed: seed + fresh.size + 1 }),
      );
    }
    model.loadStateDict(fresh, { strict: false });
    for (const t of fresh.values()) t.dispose();
  });
  const params = model.parameters();
  const nParams = params.reduce((a, p) => a + p.numel, 0);
  console.error(
    `[pretrain] model: dim ${dim}, ${layers} layers, ${heads} heads, MLP ${hidden}, tied embeddings: ` +
      `${(nParams / 1e6).toFixed(2)} M parameters; ${trainRows.length.toLocaleString("en")} rows of ${seq} tokens ` +
      `(${nVal} held out), ${totalSteps} steps of ${batch} rows (${epochs} epoch(s) = ${stepsPerEpoch * epochs})`,
  );

  // ---- training --------------------------------------------------------------------------------------------------
  const opt = new AdamW(params, { lr, betas: [0.9, 0.95], weightDecay: 0 });
  const sched = new LRScheduler(opt, cosineWithWarmup({ warmupSteps: Math.ceil(warmup * totalSteps), totalSteps }));
  const rowIds = (rows: number[]) => {
    const ids = new Int32Array(rows.length * seq);
    rows.forEach((r, i) => ids.set(stream.slice(r * seq, (r + 1) * seq), i * seq));
    return { data: ids, shape: [rows.length, seq] as [number, number] };
  };
  await makeDir(outDir);
  const lossCsv = joinPath(outDir, "loss.csv");
  await writeText(lossCsv, "step,loss,lr,tokens_per_s,elapsed_s\n");
  const window: number[] = [];
  const t0 = performance.now();
  let pending: Promise<void> | null = null;
  let lastLoss = NaN;
  const timeLimit = flags["time-limit"] ? Number(flags["time-limit"]) : Infinity;
  let stopReason = "";
  const stopListening = onInterrupt(() => (stopReason = "interrupted"));
  let perm: number[] = [];
  let stepsDone = 0;
  for (let step = 0; step < totalSteps && !stopReason; step++) {
    if ((performance.now() - t0) / 1000 > timeLimit) {
      stopReason = `time limit of ${timeLimit} s`;
      break;
    }
    if (step % stepsPerEpoch === 0) perm = shuffled(trainRows.length, seed + 1 + step / stepsPerEpoch);
    const at = (step % stepsPerEpoch) * batch;
    const rows = perm.slice(at, at + batch).map((i) => trainRows[i]);
    const stepLr = opt.lr;
    const loss = scope(() => {
      const ids = rowIds(rows);
      const { logits, loss } = model.forward(ids, { labels: ids });
      logits.dispose();
      loss!.backward();
      opt.step({ gradScale: clipCoefficient(params, 1.0).coef }); // clip_grad_norm_(1.0) inside the update
      opt.zeroGrad();
      sched.step();
      return loss!.detach().keep();
    });
    stepsDone = step + 1;
    // Read the loss one step late, so the GPU never waits for the CPU.
    await pending;
    pending = loss.item().then(async (v) => {
      loss.dispose();
      lastLoss = v;
      window.push(v);
      if (window.length > 50) window.shift();
      const elapsed = (performance.now() - t0) / 1000;
      const entry = {
        step: step + 1,
        loss: v,
        lossAvg: window.reduce((a, b) => a + b, 0) / window.length,
        lr: stepLr,
        tokensPerSecond: ((step + 1) * batch * seq) / elapsed,
        peakBytes: memoryStats().peakBytes,
        elapsed,
      };
      await appendText(
        lossCsv,
        `${entry.step},${v.toFixed(5)},${stepLr.toExponential(4)},${entry.tokensPerSecond.toFixed(0)},${
          elapsed.toFixed(2)
        }\n`,
      );
      writeProgress(progressLine(entry, totalSteps), entry.step === totalSteps);
    });
  }
  await pending;
  stopListening();
  const trainSeconds = (performance.now() - t0) / 1000;
  if (stopReason) console.error(`\n[pretrain] stopped after ${stepsDone} of ${totalSteps} steps (${stopReason})`);

  // ---- unseen rows, held-out loss, save ------------------------------------------------------------------------------
  const separated = await separateUnseenRows(model, stream, seed);
  console.error(
    `[pretrain] ${separated.toLocaleString("en")} tokens never occur in the text: their rows redrawn apart`,
  );
  model.eval();
  let valSum = 0, valN = 0;
  for (let i = 0; i < valRows.length; i += batch) {
    const rows = valRows.slice(i, i + batch);
    const v = await scope(() =>
      noGrad(() => {
        const ids = rowIds(rows);
        const { logits, loss } = model.forward(ids, { labels: ids });
        logits.dispose();
        return loss!.keep();
      })
    ).item();
    valSum += v * rows.length;
    valN += rows.length;
  }
  const valLoss = valSum / valN;
  console.error(
    `[pretrain] ${stepsDone} steps in ${trainSeconds.toFixed(1)} s; train loss (last 50) ${
      (window.reduce((a, b) => a + b, 0) / window.length).toFixed(3)
    }, held-out loss ${valLoss.toFixed(3)} (${valN} rows)`,
  );
  await savePretrained(model, outDir, { dtype: "f16" });
  await writeText(
    joinPath(outDir, "README.md"),
    `# ${outDir.split("/").pop()}\n\n` +
      `A ${
        (nParams / 1e6).toFixed(2)
      } M-parameter Llama (dim ${dim}, ${layers} layers, ${heads} heads, MLP ${hidden}, ` +
      `tied embeddings, Llama-2 tokenizer) pretrained from scratch by \`examples/pretrain.ts\` on ${
        new Date().toISOString().slice(0, 10)
      }:\n\n` +
      docs.map((d) => `- ${d.source}: ${d.texts.length.toLocaleString("en")} documents`).join("\n") +
      `\n\n${stepsDone} steps of ${batch} × ${seq} tokens, lr ${lr} (warm-up ${warmup}, cosine), AdamW (0.9, 0.95), ` +
      `seed ${seed}, ${trainSeconds.toFixed(0)} s. Final training loss ${lastLoss.toFixed(3)}, held-out loss ` +
      `${
        valLoss.toFixed(3)
      } on ${valN} rows. SST-2 labels and the dev split were not used. The rows of the ${separated} tokens absent from the text were ` +
      `redrawn apart (separateUnseenRows). Weights in f16; the ` +
      `tokenizer is not included: the examples read Llama-2's from \`$WEBTUNE_SHARED\` (or \`--tokenizer\`).\n`,
  );
  console.error(`[pretrain] wrote ${outDir}/config.json, model.safetensors, README.md, loss.csv`);
}

if (import.meta.main) await cliMain(main);
