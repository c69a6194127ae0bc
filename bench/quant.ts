/**
 * NF4 benchmark (suite "quant"): one JSON line per (case, impl), GPU-timestamp times, each result checked against
 * float64 CPU rows of `x · dequant(W)ᵀ`. Case names follow bench/torch_ref.py's "quant" suite (`MxKxN` =
 * `F.linear(x[M, K], W[N, K])`). Impls (see bench/README.md):
 *
 * - `webtune-nf4`: the fused dequantize-GEMM / GEMV of `Linear4bit` (x f16, W NF4 with double quantization at block
 *   size 64, f16 out). GEMM lines carry `vs_f16` = time / time of `webtune-f16-linear` (issue 4's target: ≤ 1.5);
 *   GEMV lines carry `gbps` counting the bytes the kernel must read and write (packed nibbles, the u8 absmax
 *   indices, scales, offset, x and y: ~4.13 bits per weight) and `copy_frac` = gbps / the `copy-bw` line
 *   (target ≥ 0.5).
 * - `webtune-nf4-dx`: the input gradient `dX = G · dequant(W)` (QLoRA's backward through the frozen weight),
 *   against `webtune-f16-dx`, the same product with W dense f16.
 * - `webtune-f16-linear`: x f16 · Wᵀ with W dense f16 [N, K], core matmul (the baseline).
 * - case `7b-model`: a LLaMA-2-7B-shaped model quantized from random f16 weights, built layer by layer (a random
 *   f16 `Linear` is quantized and freed before the next is made, so the f16 model never exists); `total_gib` =
 *   4-bit weights + quantization constants + the f16 embeddings, norms and lm_head (target < 4.0 GiB).
 * - case `copy-bw`: device-to-device copy of 1 GiB, the ceiling for the GEMV.
 *
 * `--sweep` also times every NF4 tile (GEMM) and several GEMV configurations per case (lines with `"sweep": true`).
 * On a CPU (fallback) adapter such as lavapipe, shapes are divided by 8 (16 with `--smoke`) and the model case
 * uses 2 scaled layers, so the script can be checked there (`"scaled": true`; the numbers are then meaningless).
 *
 * Run: `deno run -A bench/quant.ts [--quick] [--sweep] [--json FILE] [--only TEXT] [--smoke]`
 * @module
 */
import { init, memoryStats, resetPeakMemory, Tensor } from "../mod.ts";
import { randn, zeros } from "../core/creation.ts";
import { getGpu } from "../core/gpu.ts";
import { f16ArrayToF32 } from "../core/half.ts";
import { NF4_TILES, type Nf4Tile, nf4TileSharedBytes } from "../core/kernels/nf4.ts";
import { gemmInto, planName } from "../core/ops/matmul.ts";
import { isPlaceholder, Linear, withDeferredInit } from "../nn/layers.ts";
import { LlamaForCausalLM, llamaPreset } from "../nn/llama.ts";
import {
  chooseNf4Plan,
  dequantizeNf4Gpu,
  disposeNf4,
  nf4Matmul,
  nf4MatmulInputGrad,
  type Nf4Plan,
  nf4PlanName,
  type Nf4Tensor,
  nf4Tensors,
  quantizeNf4Gpu,
} from "../quant/nf4.ts";
import { Linear4bit } from "../quant/linear4bit.ts";
import { bitsPerParameter } from "../quant/nf4_reference.ts";
import { modelMemoryReport } from "../quant/report.ts";
import {
  benchFlags,
  BenchLog,
  captureGpuErrors,
  copyBandwidth,
  fmtNum,
  metaLine,
  textTable,
  timeGpu,
} from "./common.ts";

const flags = benchFlags(Deno.args);
await init();
const gpu = getGpu();
const scaled = flags.smoke || gpu.info.isFallback;
const S = flags.smoke ? 16 : scaled ? 8 : 1;
const log = new BenchLog(flags.json);
await log.emit({ ...metaLine("quant", flags), scaled });
const started = performance.now();
const elapsedS = () => (performance.now() - started) / 1000;
const note = (s: string) => console.error(`[quant ${elapsedS().toFixed(0)}s] ${s}`);
const selected = (name: string) => !flags.only || name.includes(flags.only);
const sz = (d: number) => (d > 16 ? Math.max(64, Math.round(d / S / 64) * 64) : d);
const GIB = 2 ** 30;
let errors = 0;

// ---- helpers ----------------------------------------------------------------------------------------------------

async function readF32(t: Tensor, row: number, cols: number): Promise<Float32Array> {
  const es = t.dtype === "f16" ? 2 : 4;
  const raw = await gpu.read(t.storage.buffer, (t.offset + row * cols) * es, cols * es);
  return es === 2 ? f16ArrayToF32(new Uint16Array(raw)) : new Float32Array(raw);
}

/** max |got − ref| / max |ref| over a few rows of `C` = A·Bᵀ (B [N, K] dense f32 on the CPU) or A·B (B [K, N]). */
async function checkRows(
  C: Tensor,
  A: Tensor,
  B: Float32Array,
  dims: { M: number; N: number; K: number; bT: boolean },
): Promise<number> {
  const { M, N, K, bT } = dims;
  let err = 0, scale = 0;
  for (const m of [...new Set([0, M >> 1, M - 1])]) {
    const a = await readF32(A, m, K);
    const got = await readF32(C, m, N);
    const ref = new Float64Array(N);
    for (let k = 0; k < K; k++) {
      const av = a[k];
      if (av === 0) continue;
      if (bT) { for (let n = 0; n < N; n++) ref[n] += av * B[n * K + k]; }
      else for (let n = 0; n < N; n++) ref[n] += av * B[k * N + n];
    }
    for (let n = 0; n < N; n++) {
      err = Math.max(err, Number.isNaN(got[n]) ? Infinity : Math.abs(got[n] - ref[n]));
      scale = Math.max(scale, Math.abs(ref[n]));
    }
  }
  return err / Math.max(scale, 1e-30);
}

/** Times `call`, checks its result, emits a line; returns ms or null on error / failed check. */
async function measure(
  base: Record<string, unknown>,
  call: () => void,
  check: () => Promise<number>,
  extra: (ms: number) => Record<string, unknown>,
): Promise<number | null> {
  const err0 = await captureGpuErrors(call);
  if (err0) {
    errors++;
    await log.emit({ ...base, error: err0.slice(0, 400) });
    return null;
  }
  await gpu.sync();
  const err = await check();
  const ok = err <= 4e-3; // f16 output
  try {
    const t = await timeGpu(call, { ...flags, maxIters: 1000 });
    await log.emit({ ...base, ...t, ...extra(t.ms), err, ok });
    if (!ok) errors++;
    return ok ? t.ms : null;
  } catch (e) {
    errors++;
    await log.emit({ ...base, error: (e as Error).message.slice(0, 400) });
    return null;
  }
}

function nf4Bytes(q: Nf4Tensor): number {
  return nf4Tensors(q).filter((t) => t !== q.nested?.map).reduce((s, t) => s + t.numel * 4, 0);
}

// ---- copy bandwidth ----------------------------------------------------------------------------------------------

let copyGbps: number | null = null;
if (selected("copy-bw")) {
  const bytes = scaled ? 1 << 24 : 1 << 30;
  const { timing: t, gbps } = await copyBandwidth(bytes, flags);
  copyGbps = gbps;
  await log.emit({ suite: "quant", case: "copy-bw", impl: "webtune-wgsl", ...t, gbps: copyGbps, bytes, scaled });
}

// ---- GEMM and GEMV cases -----------------------------------------------------------------------------------------

interface Row {
  name: string;
  impl: string;
  metric: string;
  value: number;
  plan: string;
  best?: { plan: string; value: number };
}
const summary: Row[] = [];

/** Tile variants for the sweep that fit this GPU's workgroup memory. */
const tileVariants = (): Nf4Plan[] =>
  [
    ...Object.values(NF4_TILES),
    { bm: 64, bn: 64, bk: 32, tm: 4, tn: 4, pipeline: "double" },
    { bm: 128, bn: 128, bk: 16, tm: 8, tn: 8, pipeline: "double" },
    { bm: 64, bn: 128, bk: 16, tm: 8, tn: 8, pipeline: "double" },
    { bm: 128, bn: 64, bk: 8, tm: 8, tn: 8, pipeline: "double" },
    { bm: 64, bn: 64, bk: 16, tm: 8, tn: 8, pipeline: "double" },
    { bm: 128, bn: 64, bk: 16, tm: 8, tn: 8, pipeline: "direct" },
    { bm: 128, bn: 64, bk: 32, tm: 8, tn: 8, pipeline: "direct" },
    // Taller tiles decode each weight fewer times (M / bm times in all).
    { bm: 256, bn: 64, bk: 16, tm: 8, tn: 8, pipeline: "double" },
    { bm: 256, bn: 64, bk: 8, tm: 8, tn: 8, pipeline: "double" },
    { bm: 256, bn: 128, bk: 8, tm: 8, tn: 8, pipeline: "double" },
    { bm: 128, bn: 128, bk: 16, tm: 8, tn: 8, pipeline: "direct" },
    { bm: 64, bn: 128, bk: 32, tm: 8, tn: 8, pipeline: "direct" },
  ].filter((t) => nf4TileSharedBytes(t as Nf4Tile, "double") <= gpu.info.maxComputeWorkgroupStorageSize)
    .map((tile) => ({ kind: "tile" as const, tile: tile as Nf4Tile }));
const gemvVariants = (): Nf4Plan[] =>
  [
    [64, 2, 1],
    [128, 4, 1],
    [128, 8, 2],
    [256, 8, 1],
    [256, 8, 4],
    [256, 16, 2],
    [256, 16, 4],
    [512, 16, 2],
    [128, 16, 4],
    // Fewer lanes per row (8 or 16): more units per thread, a shorter reduction, the prologue shared by more rows.
    [128, 16, 1],
    [128, 32, 2],
    [256, 32, 2],
    [256, 64, 4],
    [256, 32, 1],
    [256, 64, 2],
    [512, 64, 2],
    [512, 128, 4],
  ].map(([threads, rowsPerGroup, rowsPerThread]) => ({ kind: "gemv" as const, threads, rowsPerGroup, rowsPerThread }));

const shapes: [number, number, number][] = [
  [512, 4096, 4096],
  [512, 4096, 11008],
  [512, 11008, 4096],
  [1, 4096, 4096],
  [1, 4096, 11008],
  [1, 11008, 4096],
];
for (const [m0, k0, n0] of shapes) {
  const name = `${m0}x${k0}x${n0}`;
  if (!selected(name)) continue;
  const [M, K, N] = [m0 === 1 ? 1 : sz(m0), sz(k0), sz(n0)];
  note(`case ${name} (${M}x${K}x${N}): preparing data`);
  const W = randn([N, K], { dtype: "f16", std: 0.02 }).keep();
  const x = randn([M, K], { dtype: "f16" }).keep();
  const q = quantizeNf4Gpu(W, { blockSize: 64, doubleQuant: true });
  for (const t of nf4Tensors(q)) t.keep();
  const Y = Tensor.empty([M, N], "f16").keep();
  const dq = dequantizeNf4Gpu(q, "f32");
  const dense = await dq.toArray() as Float32Array; // the reference weight of the NF4 lines
  dq.dispose();
  const wDense = await W.toArray() as Float32Array;
  const base = { suite: "quant", case: name, m: M, k: K, n: N, scaled };
  const flops = 2 * M * N * K;
  const gemv = M === 1;
  const tflops = (ms: number) => flops / (ms / 1e3) / 1e12;

  // Dense f16 baseline: F.linear.
  const wT = W.transpose();
  const f16Bytes = (N * K + M * K + M * N) * 2;
  let used = "";
  const f16ms = await measure(
    { ...base, impl: "webtune-f16-linear" },
    () => {
      used = planName(gemmInto(Y, x, wT));
    },
    () => checkRows(Y, x, wDense, { M, N, K, bT: true }),
    (ms) => ({ plan: used, tflops: tflops(ms), gbps: f16Bytes / (ms / 1e3) / 1e9 }),
  );
  if (f16ms) {
    const value = gemv ? f16Bytes / (f16ms / 1e3) / 1e9 : tflops(f16ms);
    summary.push({ name, impl: "webtune-f16-linear", metric: gemv ? "GB/s" : "TFLOP/s", value, plan: used });
  }

  // NF4 forward: bytes the kernel must move (packed weights and constants, x, y).
  const bytes = nf4Bytes(q) + (M * K + M * N) * 2;
  const metric = (ms: number) => (gemv ? bytes / (ms / 1e3) / 1e9 : tflops(ms));
  const runNf4 = (plan: Nf4Plan | undefined, sweep: boolean) => {
    const chosen = nf4PlanName(plan ?? chooseNf4Plan({ M, N, K, mode: "forward" }));
    return measure(
      { ...base, impl: "webtune-nf4", sweep, plan: chosen },
      () => void nf4Matmul(x, q, { into: Y, plan }),
      () => checkRows(Y, x, dense, { M, N, K, bT: true }),
      (ms) => ({
        tflops: tflops(ms),
        gbps: bytes / (ms / 1e3) / 1e9,
        weight_bits: (8 * nf4Bytes(q)) / (N * K),
        ...(gemv && copyGbps ? { copy_frac: bytes / (ms / 1e3) / 1e9 / copyGbps } : {}),
        ...(f16ms ? { vs_f16: ms / f16ms } : {}),
      }),
    );
  };
  const nf4ms = await runNf4(undefined, false);
  const row: Row = {
    name,
    impl: "webtune-nf4",
    metric: gemv ? "GB/s" : "TFLOP/s",
    value: nf4ms ? metric(nf4ms) : NaN,
    plan: nf4PlanName(chooseNf4Plan({ M, N, K, mode: "forward" })),
  };
  summary.push(row);
  if (flags.sweep) {
    for (const plan of gemv ? gemvVariants() : tileVariants()) {
      if (elapsedS() > flags.budgetS) break;
      const ms = await runNf4(plan, true);
      if (ms !== null && (!row.best || metric(ms) > row.best.value)) {
        row.best = { plan: nf4PlanName(plan), value: metric(ms) };
      }
    }
    if (gemv) {
      // Diagnostic: the same GEMV over f32 absmax (no double quantization), to see what the nested lookup costs.
      const q32 = quantizeNf4Gpu(W, { blockSize: 64, doubleQuant: false });
      const dq32 = dequantizeNf4Gpu(q32, "f32");
      const dense32 = await dq32.toArray() as Float32Array;
      dq32.dispose();
      const bytes32 = nf4Bytes(q32) + (M * K + M * N) * 2;
      await measure(
        { ...base, impl: "webtune-nf4-no-dq", sweep: true, plan: row.plan },
        () => void nf4Matmul(x, q32, { into: Y }),
        () => checkRows(Y, x, dense32, { M, N, K, bT: true }),
        (ms) => ({
          gbps: bytes32 / (ms / 1e3) / 1e9,
          weight_bits: (8 * nf4Bytes(q32)) / (N * K),
          ...(copyGbps ? { copy_frac: bytes32 / (ms / 1e3) / 1e9 / copyGbps } : {}),
          ...(nf4ms ? { vs_dq: ms / nf4ms } : {}),
        }),
      );
      disposeNf4(q32);
    }
  }

  // Input gradient (training shapes): dX[M, K] = G[M, N] · W.
  if (!gemv) {
    const G = randn([M, N], { dtype: "f16" }).keep();
    const DX = Tensor.empty([M, K], "f16").keep();
    const dxF16 = await measure(
      { ...base, impl: "webtune-f16-dx" },
      () => {
        used = planName(gemmInto(DX, G, W));
      },
      () => checkRows(DX, G, wDense, { M, N: K, K: N, bT: false }),
      (ms) => ({ plan: used, tflops: tflops(ms) }),
    );
    const plan = nf4PlanName(chooseNf4Plan({ M, N: K, K: N, mode: "backward" }));
    const dxMs = await measure(
      { ...base, impl: "webtune-nf4-dx", plan },
      () => void nf4MatmulInputGrad(G, q, { into: DX }),
      () => checkRows(DX, G, dense, { M, N: K, K: N, bT: false }),
      (ms) => ({ tflops: tflops(ms), ...(dxF16 ? { vs_f16: ms / dxF16 } : {}) }),
    );
    summary.push({ name, impl: "webtune-nf4-dx", metric: "TFLOP/s", value: dxMs ? tflops(dxMs) : NaN, plan });
    G.dispose();
    DX.dispose();
  }
  wT.dispose();
  for (const t of [W, x, Y]) t.dispose();
  disposeNf4(q);
}

// ---- a 7B-shaped model, quantized layer by layer --------------------------------------------------------------------

if (selected("7b-model")) {
  const full = llamaPreset("llama-2-7b");
  const cfg = scaled
    ? {
      ...full,
      hiddenSize: 512,
      intermediateSize: 1376,
      numHiddenLayers: 2,
      vocabSize: 4000,
      numAttentionHeads: 4,
      numKeyValueHeads: 4,
      headDim: 128,
    }
    : full;
  note(`7b-model: building ${cfg.numHiddenLayers} layers of ${cfg.hiddenSize}/${cfg.intermediateSize}`);
  const before = memoryStats().liveBytes;
  resetPeakMemory();
  const t0 = performance.now();
  const model = withDeferredInit(() => new LlamaForCausalLM(cfg, { dtype: "f16" }));
  for (const [name, m] of model.namedModules()) {
    if (m instanceof Linear && name !== "lm_head") {
      // A random f16 layer of this shape, quantized and freed before the next one exists.
      const lin = new Linear(m.inFeatures, m.outFeatures, { bias: false, dtype: "f16" });
      model.setSubmodule(name, Linear4bit.fromLinear(lin, { blockSize: 64, doubleQuant: true }));
      lin.dispose();
      gpu.flush();
    }
  }
  // Embeddings, norms and lm_head stay f16 (random / ones; their values do not matter here).
  for (const [name, t] of model.namedParameters()) {
    if (!isPlaceholder(t)) continue;
    const fresh = name.endsWith("norm.weight")
      ? zeros([...t.shape], { dtype: "f16" })
      : randn([...t.shape], { dtype: "f16", std: 0.02 });
    model.loadStateDict(new Map([[name, fresh]]), { strict: false });
    fresh.dispose();
  }
  await gpu.sync();
  const buildS = (performance.now() - t0) / 1e3;
  const r = modelMemoryReport(model);
  const stats = memoryStats();
  // What the full 7B model comes to, from its shapes (for scaled runs).
  const layerShapes = [
    ...Array(4).fill(full.hiddenSize * full.hiddenSize),
    ...Array(3).fill(full.hiddenSize * full.intermediateSize),
  ];
  const projectedQuant = full.numHiddenLayers *
    layerShapes.reduce((s, n) => s + n * bitsPerParameter({ numel: n, doubleQuant: true }) / 8, 0);
  const projectedFp = 2 * (2 * full.vocabSize * full.hiddenSize + (2 * full.numHiddenLayers + 1) * full.hiddenSize);
  const total = r.quantizedWeightBytes + r.quantizationConstantBytes + r.fullPrecisionBytes;
  await log.emit({
    suite: "quant",
    case: "7b-model",
    impl: "webtune-nf4",
    scaled,
    layers: cfg.numHiddenLayers,
    quantized_params: r.quantizedParameters,
    bits_per_param: r.bitsPerParameter,
    weights_gib: r.quantizedWeightBytes / GIB,
    constants_gib: r.quantizationConstantBytes / GIB,
    full_precision_gib: r.fullPrecisionBytes / GIB,
    total_gib: total / GIB,
    allocated_gib: (stats.liveBytes - before) / GIB,
    peak_gib: (stats.peakBytes - before) / GIB,
    projected_7b_total_gib: (projectedQuant + projectedFp) / GIB,
    target_gib: 4,
    ok: (scaled ? projectedQuant + projectedFp : total) < 4 * GIB,
    build_s: buildS,
  });
  model.dispose();
}

// ---- summary -------------------------------------------------------------------------------------------------------

const rows: (string | number)[][] = [["case", "impl", "unit", "value", "plan", "best (sweep)", "best plan"]];
for (const r of summary) {
  rows.push([
    r.name,
    r.impl,
    r.metric,
    fmtNum(r.value),
    r.plan,
    r.best ? fmtNum(r.best.value) : "",
    r.best?.plan ?? "",
  ]);
}
console.error(
  `\nquant on ${gpu.info.description}, ${elapsedS().toFixed(0)} s${scaled ? " (scaled shapes)" : ""}\n${
    textTable(rows)
  }`,
);
if (errors > 0) Deno.exit(1);
