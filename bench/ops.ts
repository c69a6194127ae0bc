/**
 * Memory-bound op benchmark at LLaMA sizes: softmax over LM-head rows and attention scores, RMSNorm, and the
 * fused cross-entropy (forward, and forward + backward). One JSON line per (case, impl) with the GPU-timestamp
 * time (median of repeats after warm-up, `bench/common.ts`'s `timeGpu`) and GB/s, plus a check of the result
 * against a float64 CPU reference (`err`, `ok`). Case names and the bytes counted for GB/s are those of
 * bench/torch_ref.py's "ops" suite (bench/README.md):
 *
 * - `softmax-512x32000`, `softmax-8x32x64x64`: last axis; 2·numel·elem bytes.
 * - `rmsnorm-512x4096`: `rmsNorm(x, w, 1e-5)`, one fused kernel; (2·numel + 4096)·elem bytes.
 * - `cross-entropy-512x32000`: mean loss over integer targets; numel·elem + targets bytes.
 * - `cross-entropy-fwd-bwd-512x32000`: loss, `backward()`, gradient dropped (torch: `lg.grad = None`);
 *   3·numel·elem bytes.
 *
 * Impls `webtune-f32` and `webtune-f16` (f16 inputs and outputs; the arithmetic is f32 inside the kernels).
 *
 * Run: `deno run -A bench/ops.ts [--quick] [--smoke] [--json FILE] [--only softmax] [--budget SECONDS]`
 * (`--smoke`: shapes divided by 8, numbers meaningless, for a CPU driver).
 * @module
 */
import { crossEntropy, init, noGrad, rand, randn, rmsNorm, scope, softmax, tensor } from "../mod.ts";
import { emptyCache } from "../core/memory.ts";
import { benchFlags, BenchLog, captureGpuErrors, fmtNum, metaLine, textTable, timeGpu } from "./common.ts";

type F = "f32" | "f16";

const flags = benchFlags(Deno.args);
await init();
const log = new BenchLog(flags.json);
await log.emit(metaLine("ops", flags));
const started = performance.now();
const elapsedS = () => (performance.now() - started) / 1000;
const note = (s: string) => console.error(`[ops ${elapsedS().toFixed(0)}s] ${s}`);

// Shapes (torch_ref.py divides by 8 with --smoke, keeping the attention rows at 64).
const S = flags.smoke ? 8 : 1;
const ROWS = 512 / S, VOCAB = 32000 / S, HIDDEN = 4096 / S;
const ATT = flags.smoke ? [1, 32 / S, 64, 64] : [8, 32, 64, 64];
const EPS = 1e-5;
/** A timed batch allocates a fresh output per call (the pool recycles only after a submit): cap its total. */
const BATCH_ALLOC_BYTES = 4 * 2 ** 30;

/** One benchmark case: what to record per call and how to check one call's result. */
interface OpCase {
  name: string;
  dtype: F;
  /** Bytes counted for GB/s. */
  bytes: number;
  /** Bytes allocated by one call (caps the calls per timed batch). */
  allocBytes: number;
  /** Records one call (frees what it made). */
  record: () => void;
  /** Runs one call and returns max |got − ref| / max |ref| over the checked values. */
  check: () => Promise<number>;
  /** Frees the inputs. */
  dispose: () => void;
  extra?: Record<string, unknown>;
}

const elem = (d: F) => (d === "f16" ? 2 : 4);
const tolerance = (d: F) => (d === "f16" ? 4e-3 : 2e-5);

/** Rows of a [rows, n] CPU array to check: first, middle, last. */
const checkRows = (rows: number) => [...new Set([0, rows >> 1, rows - 1])];

function relErr(got: ArrayLike<number>, ref: ArrayLike<number>, err: { d: number; s: number }): void {
  for (let i = 0; i < ref.length; i++) {
    const g = got[i];
    err.d = Math.max(err.d, Number.isNaN(g) ? Infinity : Math.abs(g - ref[i]));
    err.s = Math.max(err.s, Math.abs(ref[i]));
  }
}

/** Float64 softmax of one row. */
function softmaxRow(x: ArrayLike<number>, off: number, n: number): Float64Array {
  let m = -Infinity;
  for (let j = 0; j < n; j++) m = Math.max(m, x[off + j]);
  const out = new Float64Array(n);
  let s = 0;
  for (let j = 0; j < n; j++) s += out[j] = Math.exp(x[off + j] - m);
  for (let j = 0; j < n; j++) out[j] /= s;
  return out;
}

/** Float64 log-sum-exp of one row. */
function logSumExp(x: ArrayLike<number>, off: number, n: number): number {
  let m = -Infinity;
  for (let j = 0; j < n; j++) m = Math.max(m, x[off + j]);
  let s = 0;
  for (let j = 0; j < n; j++) s += Math.exp(x[off + j] - m);
  return m + Math.log(s);
}

function softmaxCase(shape: number[], dtype: F, seed: number): OpCase {
  const x = randn(shape, { dtype, seed }).keep();
  const n = shape[shape.length - 1], rows = x.numel / n;
  return {
    name: `softmax-${shape.join("x")}`,
    dtype,
    bytes: 2 * x.numel * elem(dtype),
    allocBytes: x.numel * (4 + (dtype === "f16" ? 2 : 0)),
    record: () => scope(() => noGrad(() => void softmax(x))),
    check: async () => {
      const xs = await x.toArray() as Float32Array;
      const y = noGrad(() => softmax(x));
      const ys = await y.toArray() as Float32Array;
      y.dispose();
      const e = { d: 0, s: 0 };
      for (const r of checkRows(rows)) relErr(ys.subarray(r * n, (r + 1) * n), softmaxRow(xs, r * n, n), e);
      return e.d / e.s;
    },
    dispose: () => x.dispose(),
  };
}

function rmsNormCase(dtype: F, seed: number): OpCase {
  const x = randn([ROWS, HIDDEN], { dtype, seed }).keep();
  const w = rand([HIDDEN], { low: 0.9, high: 1.1, dtype, seed: seed + 1 }).keep();
  return {
    name: `rmsnorm-${ROWS}x${HIDDEN}`,
    dtype,
    bytes: (2 * x.numel + HIDDEN) * elem(dtype),
    allocBytes: x.numel * elem(dtype) + ROWS * 4,
    record: () => scope(() => noGrad(() => void rmsNorm(x, w, EPS))),
    check: async () => {
      const xs = await x.toArray() as Float32Array, ws = await w.toArray() as Float32Array;
      const y = noGrad(() => rmsNorm(x, w, EPS));
      const ys = await y.toArray() as Float32Array;
      y.dispose();
      const e = { d: 0, s: 0 };
      for (const r of checkRows(ROWS)) {
        let ms = 0;
        for (let j = 0; j < HIDDEN; j++) ms += xs[r * HIDDEN + j] ** 2;
        const inv = 1 / Math.sqrt(ms / HIDDEN + EPS);
        const ref = Float64Array.from({ length: HIDDEN }, (_, j) => xs[r * HIDDEN + j] * inv * ws[j]);
        relErr(ys.subarray(r * HIDDEN, (r + 1) * HIDDEN), ref, e);
      }
      return e.d / e.s;
    },
    dispose: () => {
      x.dispose();
      w.dispose();
    },
    extra: { variant: "fused kernel, f32 statistics (= HF LlamaRMSNorm rounding)" },
  };
}

function randomTargets(seed: number): Int32Array {
  let s = (seed * 2654435761) >>> 0 || 1;
  return Int32Array.from({ length: ROWS }, () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) % VOCAB;
  });
}

function crossEntropyCase(dtype: F, seed: number, withBackward: boolean): OpCase {
  const targetsCpu = randomTargets(seed + 1);
  const logits = randn([ROWS, VOCAB], { dtype, seed }).keep();
  const targets = tensor(targetsCpu, [ROWS], { dtype: "i32" }).keep();
  if (withBackward) logits.requiresGrad_(true);
  const numel = ROWS * VOCAB;
  const fwdBwd = () =>
    scope(() => {
      crossEntropy(logits, targets).backward();
    });
  return {
    name: withBackward ? `cross-entropy-fwd-bwd-${ROWS}x${VOCAB}` : `cross-entropy-${ROWS}x${VOCAB}`,
    dtype,
    bytes: withBackward ? 3 * numel * elem(dtype) : numel * elem(dtype) + ROWS * 4,
    allocBytes: withBackward ? numel * elem(dtype) + ROWS * 16 : ROWS * 16,
    record: withBackward
      ? () => {
        fwdBwd();
        logits.zeroGrad();
      }
      : () => scope(() => noGrad(() => void crossEntropy(logits, targets))),
    check: async () => {
      const xs = await logits.toArray() as Float32Array;
      const e = { d: 0, s: 0 };
      if (!withBackward) {
        const loss = noGrad(() => crossEntropy(logits, targets));
        const got = await loss.item();
        loss.dispose();
        let ref = 0;
        for (let r = 0; r < ROWS; r++) ref += logSumExp(xs, r * VOCAB, VOCAB) - xs[r * VOCAB + targetsCpu[r]];
        relErr([got], [ref / ROWS], e);
      } else {
        fwdBwd();
        const gs = await logits.grad!.toArray() as Float32Array;
        logits.zeroGrad();
        for (const r of checkRows(ROWS)) {
          const ref = softmaxRow(xs, r * VOCAB, VOCAB);
          ref[targetsCpu[r]] -= 1;
          for (let j = 0; j < VOCAB; j++) ref[j] /= ROWS;
          relErr(gs.subarray(r * VOCAB, (r + 1) * VOCAB), ref, e);
        }
      }
      return e.d / e.s;
    },
    dispose: () => {
      logits.zeroGrad();
      logits.dispose();
      targets.dispose();
    },
  };
}

const makers: { name: string; make: (d: F) => OpCase }[] = [
  { name: `softmax-${ROWS}x${VOCAB}`, make: (d) => softmaxCase([ROWS, VOCAB], d, 3) },
  { name: `softmax-${ATT.join("x")}`, make: (d) => softmaxCase(ATT, d, 4) },
  { name: `rmsnorm-${ROWS}x${HIDDEN}`, make: (d) => rmsNormCase(d, 5) },
  { name: `cross-entropy-${ROWS}x${VOCAB}`, make: (d) => crossEntropyCase(d, 7, false) },
  { name: `cross-entropy-fwd-bwd-${ROWS}x${VOCAB}`, make: (d) => crossEntropyCase(d, 7, true) },
];

const summary: (string | number)[][] = [["case", "impl", "ms", "GB/s", "err", "ok"]];
let failures = 0;
for (const dtype of ["f32", "f16"] as F[]) {
  const impl = `webtune-${dtype}`;
  for (const m of makers) {
    if (flags.only && !m.name.includes(flags.only)) continue;
    const base = { suite: "ops", case: m.name, impl };
    if (elapsedS() > flags.budgetS) {
      await log.emit({ ...base, skipped: `--budget ${flags.budgetS} s reached` });
      continue;
    }
    note(`${m.name} ${impl}`);
    let c: OpCase | null = null;
    try {
      c = m.make(dtype);
      let err = NaN;
      const gpuErr = await captureGpuErrors(async () => {
        err = await c!.check();
      });
      if (gpuErr) throw new Error(gpuErr);
      const ok = err <= tolerance(dtype);
      const maxIters = Math.max(1, Math.floor(BATCH_ALLOC_BYTES / Math.max(c.allocBytes, 1)));
      const t = await timeGpu(c.record, { ...flags, maxIters });
      const gbps = c.bytes / (t.ms / 1e3) / 1e9;
      await log.emit({
        ...base,
        ...t,
        gbps,
        dtype,
        bytes: c.bytes,
        err,
        ok,
        smoke: flags.smoke || undefined,
        ...c.extra,
      });
      summary.push([m.name, impl, t.ms, gbps, err.toExponential(1), ok ? "yes" : "NO"]);
      if (!ok) failures++;
    } catch (e) {
      failures++;
      await log.emit({ ...base, error: (e as Error).message.slice(0, 400) });
    } finally {
      c?.dispose();
      emptyCache();
    }
  }
}
console.error(textTable(summary));
console.error(`[ops] done in ${fmtNum(elapsedS())} s${failures ? `, ${failures} case(s) failed or were wrong` : ""}`);
if (failures) Deno.exitCode = 1;
