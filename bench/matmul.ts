/**
 * Matrix-multiply benchmark: one JSON line per (case, impl) with GPU-timestamp times, TFLOP/s and GB/s, each
 * result checked against float64 CPU rows. Case names follow bench/torch_ref.py: `MxKxN` for A[M,K]·B[K,N] in
 * suite "matmul" (`-AT`: A is a transposed view of a [K, M] tensor). Impls (see bench/README.md, "matmul"):
 *
 * - `webtune-f32` / `webtune-f16`: both operands f32 / f16, B row-major [K, N] as in torch_ref's matmul suite;
 *   f16 output for f16 inputs.
 * - `webtune-f16-linear`: x f16 · Wᵀ with W stored [N, K] f16 (F.linear, torch_ref's "quant" suite), f16 output.
 * - `webtune-f32xf16-linear`: x f32 · Wᵀ, W [N, K] f16, f32 output (LoRA with f32 activations).
 * - `webtune-f32-BT`: f32, B stored [N, K] (the LoRA factors as nn.Linear stores them).
 *
 * With `--sweep` every case is also run with several kernel configurations (lines with `"sweep": true`), after
 * all default cases, in priority order, until `--budget` seconds have passed. Each case's sweep starts and ends
 * with the chooser's plan again (lines with `"control": "before" | "after"`), so clock drift shows up as a control
 * that differs from the phase-1 figure; a summary table ends the run.
 *
 * Run: `deno run -A bench/matmul.ts [--quick] [--sweep] [--json FILE] [--only 4096] [--smoke]`
 * @module
 */
import { Tensor } from "../core/tensor.ts";
import { fromArray } from "../core/creation.ts";
import { getGpu, initGpu } from "../core/gpu.ts";
import { f16ArrayToF32 } from "../core/half.ts";
import type { TileConfig } from "../core/kernels/matmul.ts";
import { gemmInto, type GemmPlan, planName } from "../core/ops/matmul.ts";
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

type F = "f32" | "f16";

interface Impl {
  impl: string;
  a: F;
  b: F;
  out: F;
  /** B stored [N, K]. */
  bT: boolean;
}

interface CaseDef {
  m: number;
  k: number;
  n: number;
  /** A stored [K, M] (a transposed view). */
  aT: boolean;
  impls: Impl[];
  /** Headline metric. */
  metric: "tflops" | "gbps";
  /** Sweep order (lower first). */
  priority: number;
  /** Sweep variants for an impl. */
  variants: (impl: Impl) => GemmPlan[];
}

const flags = benchFlags(Deno.args);
await initGpu();
const gpu = getGpu();
const log = new BenchLog(flags.json);
await log.emit(metaLine("matmul", flags));
const started = performance.now();
const elapsedS = () => (performance.now() - started) / 1000;
const note = (s: string) => console.error(`[matmul ${elapsedS().toFixed(0)}s] ${s}`);

// ---- implementations ------------------------------------------------------------------------------------------
const F32: Impl = { impl: "webtune-f32", a: "f32", b: "f32", out: "f32", bT: false };
const F16: Impl = { impl: "webtune-f16", a: "f16", b: "f16", out: "f16", bT: false };
const F16_LINEAR: Impl = { impl: "webtune-f16-linear", a: "f16", b: "f16", out: "f16", bT: true };
const F32XF16_LINEAR: Impl = { impl: "webtune-f32xf16-linear", a: "f32", b: "f16", out: "f32", bT: true };
const F32_BT: Impl = { impl: "webtune-f32-BT", a: "f32", b: "f32", out: "f32", bT: true };

// ---- sweep variants -------------------------------------------------------------------------------------------
const tile = (
  bm: number,
  bn: number,
  bk: number,
  tm: number,
  tn: number,
  pipeline: TileConfig["pipeline"] = "double",
  extra: Partial<TileConfig> = {},
): TileConfig => ({ bm, bn, bk, tm, tn, pipeline, swizzle: 0, ...extra });
const plans = (tiles: TileConfig[], splits: number[] = [1]): GemmPlan[] =>
  tiles.flatMap((t) => splits.map((s) => ({ kind: "tile" as const, tile: t, splits: s })));
const halfSmem = (impl: Impl, tiles: TileConfig[]) =>
  impl.a === "f16" || impl.b === "f16" ? tiles.map((t) => ({ ...t, smemF16: true })) : [];

// The 4096³ case (the acceptance figure) gets the full list; the other squares the first six.
const SQUARE_TILES = [
  tile(128, 128, 8, 8, 8),
  tile(128, 128, 16, 8, 8),
  tile(128, 128, 8, 8, 8, "double", { swizzle: 8 }),
  tile(128, 64, 8, 8, 8),
  tile(64, 64, 16, 4, 4),
  tile(256, 128, 8, 8, 8),
  tile(128, 128, 8, 8, 8, "regs"),
  tile(128, 128, 16, 8, 8, "regs"),
  tile(128, 128, 8, 8, 8, "direct"),
  tile(128, 128, 32, 8, 8, "direct"),
  tile(64, 128, 8, 8, 8),
  tile(64, 64, 8, 8, 8),
  tile(128, 128, 8, 8, 4),
  tile(64, 64, 16, 4, 4, "direct"), // the old portable kernel's shape, for before/after
];
const squareVariants = (full: boolean) => (impl: Impl) =>
  plans([
    ...(full ? SQUARE_TILES : SQUARE_TILES.slice(0, 6)),
    ...halfSmem(impl, full ? [tile(128, 128, 8, 8, 8), tile(128, 128, 16, 8, 8)] : [tile(128, 128, 8, 8, 8)]),
  ]);

const MEDIUM_TILES = [
  tile(128, 128, 8, 8, 8),
  tile(128, 128, 16, 8, 8),
  tile(128, 64, 8, 8, 8),
  tile(128, 64, 16, 8, 8),
  tile(64, 128, 8, 8, 8),
  tile(64, 64, 8, 8, 8),
  tile(64, 64, 16, 8, 8),
  tile(64, 64, 16, 4, 4),
  tile(128, 128, 8, 8, 4),
];
const mediumVariants = (impl: Impl) => [
  ...plans([...MEDIUM_TILES, ...halfSmem(impl, [tile(128, 64, 8, 8, 8)])]),
  ...plans([tile(128, 128, 8, 8, 8), tile(128, 128, 16, 8, 8)], [2, 3]),
];

// small N (LoRA x·Aᵀ, dB): thin tiles × K splits
const thinNVariants = () =>
  plans([
    tile(64, 16, 16, 4, 4),
    tile(128, 16, 16, 4, 4),
    tile(32, 16, 16, 4, 4),
    tile(128, 16, 16, 8, 4),
  ], [1, 4, 8, 16, 32]);
// small M (LoRA dA = (G·B)ᵀ·X)
const thinMVariants = () =>
  plans([
    tile(16, 128, 16, 4, 4),
    tile(16, 64, 16, 4, 4),
    tile(16, 256, 16, 4, 8),
    tile(32, 128, 16, 4, 4),
  ], [1, 2, 4, 8]);
// small K (LoRA (x·Aᵀ)·Bᵀ)
const smallKVariants = () =>
  plans([
    tile(64, 64, 16, 4, 4),
    tile(128, 64, 16, 8, 8),
    tile(64, 128, 16, 8, 8),
    tile(128, 128, 16, 8, 8),
    tile(32, 128, 16, 4, 4),
    tile(64, 64, 16, 8, 8),
    tile(128, 128, 16, 8, 4),
  ]);
const gemvTVariants = (): GemmPlan[] =>
  [[64, 2], [64, 4], [128, 4], [128, 8], [256, 4], [256, 8], [256, 16], [128, 2]].map(([threads, rowsPerGroup]) => ({
    kind: "gemvT",
    rowsPerGroup,
    threads,
  }));
const gemvNVariants = (): GemmPlan[] =>
  [16, 32, 64].flatMap((colThreads) =>
    [4, 16, 64].map((splits) => ({ kind: "gemvN" as const, colThreads, kSlices: 8, splits }))
  );

// ---- cases ------------------------------------------------------------------------------------------------------
const S = flags.smoke ? 16 : 1;
const sz = (d: number) => (d > 16 ? Math.max(16, Math.round(d / S)) : d);
const cases: CaseDef[] = [];
const squares = flags.quick ? [1024, 2048, 4096] : [1024, 2048, 4096, 8192];
for (const s of squares) {
  cases.push({
    m: sz(s),
    k: sz(s),
    n: sz(s),
    aT: false,
    impls: [F32, F16],
    metric: "tflops",
    priority: s === 4096 ? 0 : s === 8192 ? 4 : s === 2048 ? 6 : 7,
    variants: squareVariants(s === 4096),
  });
}
for (const [m, k, n] of [[512, 4096, 4096], [512, 4096, 11008], [512, 11008, 4096]]) {
  cases.push({
    m: sz(m),
    k: sz(k),
    n: sz(n),
    aT: false,
    impls: [F32XF16_LINEAR, F16_LINEAR, F16, F32],
    metric: "tflops",
    priority: 1,
    variants: mediumVariants,
  });
}
cases.push(
  {
    m: sz(512),
    k: sz(4096),
    n: 16,
    aT: false,
    impls: [F32_BT, F32],
    metric: "tflops",
    priority: 2,
    variants: thinNVariants,
  },
  {
    m: sz(512),
    k: 16,
    n: sz(4096),
    aT: false,
    impls: [F32_BT, F32],
    metric: "tflops",
    priority: 2,
    variants: smallKVariants,
  },
  { m: 16, k: sz(512), n: sz(4096), aT: true, impls: [F32], metric: "tflops", priority: 2, variants: thinMVariants },
  { m: sz(4096), k: sz(512), n: 16, aT: true, impls: [F32], metric: "tflops", priority: 2, variants: thinNVariants },
);
for (const [k, n] of [[4096, 4096], [4096, 11008], [11008, 4096]]) {
  cases.push({
    m: 1,
    k: sz(k),
    n: sz(n),
    aT: false,
    impls: [F16_LINEAR, F32XF16_LINEAR],
    metric: "gbps",
    priority: 3,
    variants: gemvTVariants,
  });
}
cases.push({
  m: 1,
  k: sz(4096),
  n: sz(4096),
  aT: false,
  impls: [F16],
  metric: "gbps",
  priority: 4,
  variants: gemvNVariants,
});

const caseName = (c: CaseDef) => `${c.m}x${c.k}x${c.n}${c.aT ? "-AT" : ""}`;

// ---- data and reference -----------------------------------------------------------------------------------------
/** Values j/2048 with |j| < 2048: exact in f16, so f32 and f16 runs share one reference. */
function exactData(n: number, seed: number): Float32Array {
  const out = new Float32Array(n);
  let s = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    out[i] = (((s >>> 0) % 4095) - 2047) / 2048;
  }
  return out;
}

function transposeData(x: Float32Array, rows: number, cols: number): Float32Array {
  const t = new Float32Array(x.length);
  for (let i = 0; i < rows; i++) {
    const r = i * cols;
    for (let j = 0; j < cols; j++) t[j * rows + i] = x[r + j];
  }
  return t;
}

interface Prepared {
  c: CaseDef;
  impl: Impl;
  A: Tensor;
  B: Tensor;
  C: Tensor;
  refRows: Map<number, Float64Array>;
  flops: number;
  bytes: number;
  auto?: { plan: string; value: number };
  best?: { plan: string; value: number };
  /** The chooser's plan timed again right before and after the sweep of this case (clock-drift control). */
  control?: [number | null, number | null];
  skipped?: number;
}

/** Float64 rows of A·B (a: [M, K], b: [K, N], row-major). */
function referenceRows(a: Float32Array, b: Float32Array, c: CaseDef, rows: number[]): Map<number, Float64Array> {
  const out = new Map<number, Float64Array>();
  for (const m of rows) {
    const r = new Float64Array(c.n);
    for (let k = 0; k < c.k; k++) {
      const av = a[m * c.k + k];
      if (av === 0) continue;
      const bo = k * c.n;
      for (let j = 0; j < c.n; j++) r[j] += av * b[bo + j];
    }
    out.set(m, r);
  }
  return out;
}

/** max |C − ref| / max |ref| over the reference rows. */
async function checkRows(p: Prepared): Promise<number> {
  const es = p.C.dtype === "f16" ? 2 : 4;
  let err = 0, scale = 0;
  for (const [m, ref] of p.refRows) {
    const raw = await gpu.read(p.C.storage.buffer, m * p.c.n * es, p.c.n * es);
    const got = es === 2 ? f16ArrayToF32(new Uint16Array(raw)) : new Float32Array(raw);
    for (let j = 0; j < p.c.n; j++) {
      err = Math.max(err, Number.isNaN(got[j]) ? Infinity : Math.abs(got[j] - ref[j]));
      scale = Math.max(scale, Math.abs(ref[j]));
    }
  }
  return err / Math.max(scale, 1e-30);
}

const tolFor = (impl: Impl) => (impl.out === "f16" ? 4e-3 : 1e-4);

// ---- running one plan -------------------------------------------------------------------------------------------
async function runPlan(
  p: Prepared,
  plan: GemmPlan | undefined,
  sweep: boolean,
  control?: string,
): Promise<number | null> {
  const name = caseName(p.c);
  let used = "";
  const call = () => {
    used = planName(gemmInto(p.C, p.A, p.B, { plan }));
  };
  const err0 = await captureGpuErrors(call);
  const base = {
    suite: "matmul",
    case: name,
    impl: p.impl.impl,
    plan: plan ? planName(plan) : used,
    sweep,
    ...(control ? { control } : {}),
  };
  if (err0) {
    await log.emit({ ...base, error: err0.slice(0, 400) });
    return null;
  }
  await gpu.sync();
  const err = await checkRows(p);
  const ok = err <= tolFor(p.impl);
  try {
    const timing = sweep
      ? { ...flags, repeats: Math.min(flags.repeats, 3), targetMs: Math.min(flags.targetMs, 15) }
      : flags;
    const t = await timeGpu(call, { ...timing, maxIters: 1000 });
    const sec = t.ms / 1e3;
    const rec = {
      ...base,
      plan: used,
      ...t,
      tflops: p.flops / sec / 1e12,
      gbps: p.bytes / sec / 1e9,
      m: p.c.m,
      k: p.c.k,
      n: p.c.n,
      a: p.impl.a,
      b: p.impl.b,
      out: p.impl.out,
      b_layout: p.impl.bT ? "[N,K] (transposed view)" : "[K,N]",
      err,
      ok,
    };
    await log.emit(rec);
    return ok ? rec[p.c.metric] : null;
  } catch (e) {
    await log.emit({ ...base, error: (e as Error).message.slice(0, 400) });
    return null;
  }
}

// ---- phase 1: every case with the chooser's plan ------------------------------------------------------------------
const prepared: Prepared[] = [];
for (const c of cases) {
  const name = caseName(c);
  if (flags.only && !name.includes(flags.only)) continue;
  note(`case ${name}: preparing data`);
  const a = exactData(c.m * c.k, c.m + 7 * c.k), b = exactData(c.k * c.n, c.n + 13 * c.k);
  const rows = [...new Set([0, c.m >> 1, c.m - 1])];
  const refRows = referenceRows(a, b, c, rows);
  const aStore = c.aT ? transposeData(a, c.m, c.k) : a;
  const bT = c.impls.some((i) => i.bT) ? transposeData(b, c.k, c.n) : null;
  for (const impl of c.impls) {
    const A = c.aT
      ? fromArray(aStore, [c.k, c.m], { dtype: impl.a }).transpose()
      : fromArray(aStore, [c.m, c.k], { dtype: impl.a });
    const B = impl.bT
      ? fromArray(bT!, [c.n, c.k], { dtype: impl.b }).transpose()
      : fromArray(b, [c.k, c.n], { dtype: impl.b });
    const C = Tensor.empty([c.m, c.n], impl.out);
    for (const t of [A, B, C]) t.keep();
    const es = (d: F) => (d === "f16" ? 2 : 4);
    const p: Prepared = {
      c,
      impl,
      A,
      B,
      C,
      refRows,
      flops: 2 * c.m * c.n * c.k,
      bytes: c.m * c.k * es(impl.a) + c.k * c.n * es(impl.b) + c.m * c.n * es(impl.out),
    };
    const v = await runPlan(p, undefined, false);
    if (v !== null) p.auto = { plan: String(log.lines[log.lines.length - 1].plan), value: v };
    prepared.push(p);
  }
}

// ---- copy bandwidth (the ceiling for GEMV) ------------------------------------------------------------------------
if (!flags.only || "copy-bw".includes(flags.only)) {
  const bytes = flags.smoke ? 1 << 24 : 1 << 30;
  const { timing: t, gbps } = await copyBandwidth(bytes, flags);
  await log.emit({
    suite: "matmul",
    case: "copy-bw",
    impl: "webtune-wgsl",
    ...t,
    gbps,
    bytes,
    note: "GB/s = (read + write) / time",
  });
}

// ---- phase 2: sweep ----------------------------------------------------------------------------------------------
if (flags.sweep) {
  const order = [...prepared].sort((x, y) => x.c.priority - y.c.priority);
  for (const p of order) {
    const variants = p.c.variants(p.impl);
    if (elapsedS() > flags.budgetS) {
      p.skipped = variants.length;
      continue;
    }
    note(`sweep ${caseName(p.c)} ${p.impl.impl}: ${variants.length} variants`);
    const before = await runPlan(p, undefined, true, "before");
    for (let i = 0; i < variants.length; i++) {
      if (elapsedS() > flags.budgetS) {
        p.skipped = variants.length - i;
        break;
      }
      const v = await runPlan(p, variants[i], true);
      if (v !== null && (!p.best || v > p.best.value)) p.best = { plan: planName(variants[i]), value: v };
    }
    p.control = [before, await runPlan(p, undefined, true, "after")];
  }
}

// ---- summary -------------------------------------------------------------------------------------------------------
const rows: (string | number)[][] = [
  ["case", "impl", "unit", "auto", "auto plan", "control", "best", "best plan", "best/control"],
];
for (const p of prepared) {
  const unit = p.c.metric === "tflops" ? "TFLOP/s" : "GB/s";
  rows.push([
    caseName(p.c),
    p.impl.impl,
    unit,
    p.auto ? fmtNum(p.auto.value) : "fail",
    p.auto?.plan ?? "",
    p.control ? p.control.map((v) => (v === null ? "fail" : fmtNum(v))).join("→") : "",
    p.best ? fmtNum(p.best.value) : "",
    p.best ? p.best.plan + (p.skipped ? ` (${p.skipped} skipped)` : "") : p.skipped ? `${p.skipped} skipped` : "",
    p.best && p.control?.[0] ? fmtNum(p.best.value / p.control[0]) : "",
  ]);
}
console.error(`\nmatmul on ${gpu.info.description}, ${elapsedS().toFixed(0)} s\n${textTable(rows)}`);
for (const p of prepared) for (const t of [p.A, p.B, p.C]) t.dispose();
