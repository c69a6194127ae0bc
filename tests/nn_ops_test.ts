/**
 * The fused neural-network ops (`rmsNorm`, `embedding`, `dropout`, `crossEntropy`) against float64 CPU
 * references: forward values, and backward passes against central differences of the float64 reference, on
 * fresh random inputs of odd sizes (plus aligned sizes, which take the vectorised kernel paths), in f32 and f16.
 *
 * The backward pass is driven by a random output gradient G (`y.backward(G)`), so each input gradient is the
 * gradient of Σ ref(x)·G, differentiated numerically in float64 (h = 1e-6) and compared relative to the
 * gradient's largest magnitude (rtol 1e-4 for f32). f16 cases build the reference from the f16-rounded inputs
 * (and, for rmsNorm, Hugging Face's rounding order) and allow a few f16 ulps. PyTorch facts are checked by
 * value: the mean cross-entropy with ignored rows is Σ kept / count, eps sits inside the square root, repeated
 * embedding ids sum their gradients. Each run draws new inputs; the seed is in every failure message.
 *
 * @module
 */
import { assert, assertEquals, assertThrows } from "@std/assert";
import { fromArray, getGpu, manualSeed, memoryStats, scope, type Tensor, tensor } from "../mod.ts";
import { crossEntropy, dropout, embedding, rmsNorm } from "../core/ops/nn.ts";
import { randomBitsCpu, randomUniformCpu } from "../core/random.ts";
import { roundToF16 } from "../core/half.ts";
import { assertClose, freshSeed, numericalGrad, randomArray, rng, setup } from "./helpers.ts";

await setup();

type Float = "f32" | "f16";

/** Values as the GPU will hold them: rounded to f32, or to f16. */
function rounded(a: ArrayLike<number>, dtype: Float): Float64Array {
  return Float64Array.from(a, (v) => (dtype === "f16" ? roundToF16(v) : Math.fround(v)));
}

/** Uploads float64 values (already representable in `dtype`). */
function upload(a: Float64Array, shape: number[], dtype: Float, requiresGrad = false): Tensor {
  return fromArray(Float32Array.from(a), shape, { dtype, requiresGrad });
}

async function read(t: Tensor): Promise<Float64Array> {
  return Float64Array.from(await t.toArray());
}

const dot = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
};

// ---- rmsNorm ------------------------------------------------------------------------------------------------------

/**
 * Float64 LlamaRMSNorm. `half` applies Hugging Face's f16 order: the normalised value is rounded to f16, then
 * multiplied by the weight, and the product is rounded to f16.
 */
function rmsNormRef(x: ArrayLike<number>, w: ArrayLike<number>, n: number, eps: number, half = false): Float64Array {
  const y = new Float64Array(x.length);
  for (let r = 0; r < x.length / n; r++) {
    let ss = 0;
    for (let j = 0; j < n; j++) ss += x[r * n + j] ** 2;
    const inv = 1 / Math.sqrt(ss / n + eps);
    for (let j = 0; j < n; j++) {
      const h = x[r * n + j] * inv;
      y[r * n + j] = half ? roundToF16(w[j] * roundToF16(h)) : w[j] * h;
    }
  }
  return y;
}

/** Row-major [rows, n] values from their transpose [n, rows]. */
function transposeBack(gT: Float64Array, n: number, rows: number): Float64Array {
  const out = new Float64Array(gT.length);
  for (let r = 0; r < rows; r++) for (let j = 0; j < n; j++) out[r * n + j] = gT[j * rows + r];
  return out;
}

/**
 * Runs rmsNorm forward and backward on `shape` and checks both against the float64 reference. `transposed`
 * uploads xᵀ and passes the transposed view, a non-contiguous input.
 */
async function checkRmsNorm(
  shape: number[],
  xType: Float,
  wType: Float,
  opts: { transposed?: boolean; threads?: number } = {},
) {
  const seed = freshSeed();
  const n = shape[shape.length - 1];
  const numel = shape.reduce((a, d) => a * d, 1);
  const rows = numel / n;
  const eps = 1e-5;
  const label = `rmsNorm ${shape} x:${xType} w:${wType}${opts.transposed ? " (transposed input)" : ""}${
    opts.threads ? ` ${opts.threads} threads` : ""
  } seed ${seed}`;
  const x = rounded(randomArray(numel, seed), xType);
  const w = rounded(randomArray(n, seed + 1, 0.5).map((v) => v + 1), wType);
  const G = rounded(randomArray(numel, seed + 2), "f32");
  const leaf = opts.transposed
    ? upload(transposeBack(x, rows, n), [n, rows], xType, true) // xᵀ
    : upload(x, shape, xType, true);
  const xt = opts.transposed ? leaf.transpose(0, 1) : leaf;
  const wt = upload(w, [n], wType, true);
  const y = rmsNorm(xt, wt, eps, { threads: opts.threads });
  assertEquals(y.dtype, xType, `${label}: output dtype`);
  assertEquals([...y.shape], shape, `${label}: output shape`);
  const half = xType === "f16";
  assertClose(await read(y), rmsNormRef(x, w, n, eps, half), {
    rtol: half ? 2e-3 : 1e-4,
    atol: half ? 1e-3 : 0,
    label: `${label} forward`,
  });
  y.backward(upload(G, shape, "f32"));
  // Gradients of Σ G·y; the f16 rounding steps are not differentiated (as in PyTorch, a cast passes the gradient).
  const dx = numericalGrad((v) => dot(rmsNormRef(v, w, n, eps), G), Float64Array.from(x));
  const dw = numericalGrad((v) => dot(rmsNormRef(x, v, n, eps), G), Float64Array.from(w));
  const tol = half || wType === "f16" ? 3e-3 : 1e-4;
  assertEquals(leaf.grad!.dtype, xType, `${label}: dx dtype`);
  const gx = await read(leaf.grad!);
  assertClose(opts.transposed ? transposeBack(gx, n, rows) : gx, dx, {
    rtol: tol,
    relToMax: true,
    label: `${label} dx`,
  });
  assertEquals(wt.grad!.dtype, wType, `${label}: dw dtype`);
  assertClose(await read(wt.grad!), dw, { rtol: tol, relToMax: true, label: `${label} dw` });
  for (const t of [leaf, xt, wt, y, wt.grad!, leaf.grad!]) t.dispose();
}

Deno.test("rmsNorm f32: forward and backward on odd shapes, a 3-D input, a transposed input", async () => {
  await checkRmsNorm([7, 13], "f32", "f32");
  await checkRmsNorm([3, 5, 17], "f32", "f32");
  await checkRmsNorm([33, 65], "f32", "f32", { transposed: true });
});

Deno.test("rmsNorm f32: vectorised rows (width 64) and an f16 weight", async () => {
  await checkRmsNorm([9, 64], "f32", "f32");
  await checkRmsNorm([7, 13], "f32", "f16");
});

Deno.test("rmsNorm with 256, 32 and 2 threads per row (the GPU default, others; CPU adapters use 8)", async () => {
  for (const threads of [256, 32, 2]) {
    await checkRmsNorm([7, 13], "f16", "f16", { threads });
    await checkRmsNorm([9, 64], "f32", "f32", { threads });
    await checkRmsNorm([5, 300], "f32", "f16", { threads });
  }
  assertThrows(
    () =>
      rmsNorm(upload(new Float64Array(4), [1, 4], "f32"), upload(new Float64Array(4), [4], "f32"), 1e-6, {
        threads: 3,
      }),
    Error,
    "power of two",
  );
});

Deno.test("rmsNorm f16: Hugging Face's rounding order; odd rows (shared words), even rows, vectorised rows", async () => {
  await checkRmsNorm([7, 13], "f16", "f16");
  await checkRmsNorm([5, 14], "f16", "f16");
  await checkRmsNorm([6, 32], "f16", "f32");
});

Deno.test("rmsNorm f16: bit-for-bit Hugging Face order, weight · f16(x · r), not f16(weight · x · r)", async () => {
  const seed = freshSeed();
  const [rows, n, eps] = [32, 255, 1e-6];
  const x = rounded(randomArray(rows * n, seed, 2), "f16");
  const w = rounded(randomArray(n, seed + 1, 0.5).map((v) => v + 1), "f16");
  const y = await read(rmsNorm(upload(x, [rows, n], "f16"), upload(w, [n], "f16"), eps));
  const hf = rmsNormRef(x, w, n, eps, true);
  const oneRounding = rmsNormRef(x, w, n, eps).map(roundToF16);
  const rate = (ref: Float64Array) => ref.reduce((a, v, i) => a + (v === y[i] ? 1 : 0), 0) / y.length;
  // The GPU's f32 rsqrt may differ from float64 in the last bits, which flips an f16 rounding now and then.
  const [hfRate, otherRate] = [rate(hf), rate(oneRounding)];
  assert(hfRate > 0.99, `seed ${seed}: ${hfRate} of outputs equal HF's rounding order (want > 0.99)`);
  assert(otherRate < 0.95, `seed ${seed}: ${otherRate} equal a single rounding, so the order is not tested`);
});

Deno.test("rmsNorm: eps is added to mean(x²) inside the square root (LlamaRMSNorm)", async () => {
  const seed = freshSeed();
  const [rows, n, eps] = [5, 13, 1e-2];
  // Tiny inputs: mean(x²) ~ 1e-6 ≪ eps, so where eps goes changes the result by ~10×.
  const x = rounded(randomArray(rows * n, seed, 1e-3), "f32");
  const w = rounded(randomArray(n, seed + 1), "f32");
  const y = await read(rmsNorm(upload(x, [rows, n], "f32"), upload(w, [n], "f32"), eps));
  assertClose(y, rmsNormRef(x, w, n, eps), { rtol: 1e-4, label: `rmsNorm eps inside sqrt, seed ${seed}` });
  const outside = new Float64Array(x.length); // x / (sqrt(mean x²) + eps): the placement LLaMA does not use
  for (let r = 0; r < rows; r++) {
    const ms = x.slice(r * n, r * n + n).reduce((a, v) => a + v * v, 0) / n;
    for (let j = 0; j < n; j++) outside[r * n + j] = (w[j] * x[r * n + j]) / (Math.sqrt(ms) + eps);
  }
  const i = y.findIndex((v) => v !== 0);
  assert(Math.abs(y[i] / outside[i] - 1) > 0.5, "rmsNorm must not put eps outside the square root");
});

Deno.test("rmsNorm: computes only the gradients that are required", async () => {
  const seed = freshSeed();
  const [rows, n] = [7, 13];
  const x = rounded(randomArray(rows * n, seed), "f32");
  const w = rounded(randomArray(n, seed + 1), "f32");
  const gpu = getGpu();
  const dispatches = (xGrad: boolean, wGrad: boolean) =>
    scope(() => {
      const xt = upload(x, [rows, n], "f32", xGrad);
      const wt = upload(w, [n], "f32", wGrad);
      const y = rmsNorm(xt, wt, 1e-6);
      const before = gpu.dispatchCount;
      y.sum().backward();
      const count = gpu.dispatchCount - before;
      assertEquals(xt.grad !== null, xGrad);
      assertEquals(wt.grad !== null, wGrad);
      xt.zeroGrad();
      wt.zeroGrad();
      return count;
    });
  const both = dispatches(true, true), xOnly = dispatches(true, false), wOnly = dispatches(false, true);
  assert(xOnly < both && wOnly < both, `dispatches: both ${both}, x only ${xOnly}, w only ${wOnly}`);
  const y = await read(rmsNorm(upload(x, [rows, n], "f32"), upload(w, [n], "f32"), 1e-6));
  assertClose(y, rmsNormRef(x, w, n, 1e-6), { rtol: 1e-4, label: `rmsNorm without gradients, seed ${seed}` });
});

Deno.test("rmsNorm: clear errors for mismatched weights and non-float inputs", () => {
  const x = tensor([[1, 2, 3]]);
  assertThrows(() => rmsNorm(x, tensor([1, 2]), 1e-6), Error, "does not match the last axis");
  assertThrows(() => rmsNorm(tensor([[1, 2]], undefined, { dtype: "i32" }), tensor([1, 2]), 1e-6), Error, "f32 or f16");
});

// ---- embedding ----------------------------------------------------------------------------------------------------

/** Random ids in [lo, hi) with some ids forced to repeat. */
function randomIds(n: number, lo: number, hi: number, seed: number): Int32Array {
  const r = rng(seed);
  const ids = Int32Array.from({ length: n }, () => lo + Math.floor(r() * (hi - lo)));
  for (let i = 1; i < n; i += 3) ids[i] = ids[Math.floor(r() * i)]; // repeats of earlier ids
  return ids;
}

const clampId = (id: number, V: number) => Math.min(Math.max(id, 0), V - 1);

async function checkEmbedding(
  idShape: number[],
  V: number,
  D: number,
  dtype: Float,
  opts: { idType?: "i32" | "u32"; outOfRange?: boolean; tableOffsetRows?: number } = {},
) {
  const seed = freshSeed();
  const label = `embedding ids ${idShape} table [${V}, ${D}] ${dtype}${opts.idType === "u32" ? " u32 ids" : ""} ` +
    `offset ${opts.tableOffsetRows ?? 0} seed ${seed}`;
  const N = idShape.reduce((a, d) => a * d, 1);
  const ids = randomIds(N, opts.outOfRange ? -3 : 0, opts.outOfRange ? V + 4 : V, seed);
  const pad = opts.tableOffsetRows ?? 0;
  const table = rounded(randomArray((V + pad) * D, seed + 1), dtype);
  const G = rounded(randomArray(N * D, seed + 2), "f32");
  const base = upload(table, [V + pad, D], dtype, true);
  const t = pad ? base.slice(0, pad) : base; // a view with an element offset when padded
  const idT = tensor(opts.idType === "u32" ? Uint32Array.from(ids) : ids, idShape);
  const y = embedding(idT, t);
  assertEquals([...y.shape], [...idShape, D], `${label}: shape`);
  assertEquals(y.dtype, dtype, `${label}: dtype`);
  const expected = new Float64Array(N * D);
  for (let i = 0; i < N; i++) {
    for (let d = 0; d < D; d++) expected[i * D + d] = table[(pad + clampId(ids[i], V)) * D + d];
  }
  assertEquals([...await read(y)], [...expected], `${label}: forward is an exact gather (clamped ids)`);
  y.backward(upload(G, [...idShape, D], "f32"));
  // Reference gradient: numerical derivative of Σ G·table[ids] w.r.t. the table (rows of repeated ids add up).
  const ref = numericalGrad((tb) => {
    let s = 0;
    for (let i = 0; i < N; i++) for (let d = 0; d < D; d++) s += G[i * D + d] * tb[(pad + clampId(ids[i], V)) * D + d];
    return s;
  }, Float64Array.from(table));
  const got = await read(base.grad!);
  assertEquals(base.grad!.dtype, dtype, `${label}: gradient dtype`);
  assertClose(got, ref, { rtol: dtype === "f16" ? 2e-3 : 1e-5, relToMax: true, label: `${label} backward` });
  for (const x of [base, t, idT, y, base.grad!]) x.dispose();
}

Deno.test("embedding f32: odd width, repeated ids, i32 and u32 ids, a 2-D id tensor", async () => {
  await checkEmbedding([3, 5], 37, 13, "f32");
  await checkEmbedding([11], 37, 13, "f32", { idType: "u32" });
});

Deno.test("embedding f32: vectorised rows (width 16) from a table view with an offset", async () => {
  await checkEmbedding([2, 7], 37, 16, "f32", { tableOffsetRows: 1 });
});

Deno.test("embedding f16: odd width (halves straddle words), even width, width 16", async () => {
  await checkEmbedding([3, 5], 37, 13, "f16");
  await checkEmbedding([9], 37, 14, "f16");
  await checkEmbedding([2, 6], 37, 16, "f16", { tableOffsetRows: 3 });
});

Deno.test("embedding: out-of-range ids are clamped to the first and last rows", async () => {
  await checkEmbedding([4, 5], 37, 13, "f32", { outOfRange: true });
  const table = tensor([[1, 2], [3, 4], [5, 6]]);
  const y = embedding(tensor([-7, 0, 2, 3, 1000], undefined, { dtype: "i32" }), table);
  assertEquals([...await y.toArray()], [1, 2, 1, 2, 5, 6, 5, 6, 5, 6]);
});

Deno.test("embedding: gradient of repeated ids is their sum (PyTorch), deterministic, long chains", async () => {
  const seed = freshSeed();
  const [V, D, N] = [5, 9, 301]; // ~60 occurrences of each id
  const ids = randomIds(N, 0, V, seed);
  const G = rounded(randomArray(N * D, seed + 1), "f32");
  const expected = new Float64Array(V * D);
  for (let i = 0; i < N; i++) for (let d = 0; d < D; d++) expected[ids[i] * D + d] += G[i * D + d];
  const grads: Float64Array[] = [];
  for (let run = 0; run < 2; run++) {
    const table = upload(rounded(randomArray(V * D, seed + 2), "f32"), [V, D], "f32", true);
    const idT = tensor(ids, [N]);
    const y = embedding(idT, table);
    y.backward(upload(G, [N, D], "f32"));
    grads.push(await read(table.grad!));
    for (const t of [table, idT, y, table.grad!]) t.dispose();
  }
  assertClose(grads[0], expected, { rtol: 1e-5, relToMax: true, label: `embedding repeated ids, seed ${seed}` });
  assertEquals([...grads[0]], [...grads[1]], "the embedding gradient is bitwise reproducible");
});

Deno.test("embedding: clear errors for float ids and a 1-D table", () => {
  const table = tensor([[1, 2], [3, 4]]);
  assertThrows(() => embedding(tensor([0, 1]), table), Error, "ids must be i32 or u32");
  assertThrows(() => embedding(tensor([0], undefined, { dtype: "i32" }), tensor([1, 2])), Error, "[V, D]");
});

// ---- dropout ------------------------------------------------------------------------------------------------------

/** The CPU twin of the kernel's mask: element i (row-major) is kept when rngUniform(seed, offset + i) ≥ p. */
function maskCpu(n: number, p: number, seed: number, offset = 0): boolean[] {
  return Array.from({ length: n }, (_, i) => randomUniformCpu(seed, offset + i) >= p);
}

Deno.test("dropout f32: mask equals the CPU twin exactly, keep fraction, scaling, gradient", async () => {
  const seed = freshSeed();
  const [rows, cols, p] = [33, 65, 0.3];
  const n = rows * cols;
  const label = `dropout f32 seed ${seed}`;
  const x = rounded(randomArray(n, seed), "f32");
  const G = rounded(randomArray(n, seed + 1), "f32");
  const xt = upload(x, [rows, cols], "f32", true);
  const y = dropout(xt, p, { training: true, seed });
  const got = await read(y);
  const keep = maskCpu(n, p, seed);
  const scale = Math.fround(1 / (1 - p));
  const expected = x.map((v, i) => (keep[i] ? Math.fround(v * scale) : 0));
  assertEquals([...got], [...expected], `${label}: kept values are x·f32(1/(1−p)), dropped ones 0, mask exact`);
  y.backward(upload(G, [rows, cols], "f32"));
  const ref = numericalGrad(
    (v) => v.reduce((s, vi, i) => s + (keep[i] ? vi / (1 - p) : 0) * G[i], 0),
    Float64Array.from(x),
  );
  assertClose(await read(xt.grad!), ref, { rtol: 1e-4, relToMax: true, label: `${label} backward` });
});

Deno.test("dropout: keep fraction is 1 − p (large tensor) and a seed reproduces the mask", async () => {
  const seed = freshSeed();
  const [n, p] = [200_003, 0.1];
  const ones = fromArray(new Float32Array(n).fill(1), [n]);
  const a = await read(dropout(ones, p, { training: true, seed }));
  const b = await read(dropout(ones, p, { training: true, seed }));
  const kept = a.reduce((s, v) => s + (v !== 0 ? 1 : 0), 0);
  const sd = Math.sqrt((p * (1 - p)) / n);
  assert(Math.abs(kept / n - (1 - p)) < 6 * sd, `keep fraction ${kept / n}, expected ${1 - p} ± ${6 * sd}`);
  assertEquals(a.filter((v) => v !== 0 && v !== Math.fround(1 / (1 - p))).length, 0, "kept values are 1/(1−p)");
  assertEquals([...a], [...b], "the same seed gives the same mask");
  const cpuKept = maskCpu(n, p, seed).filter((k) => k).length;
  assertEquals(kept, cpuKept, `seed ${seed}: the CPU twin keeps as many`);
});

Deno.test("dropout: the global generator gives fresh masks per call and replays after manualSeed", async () => {
  const seed = freshSeed();
  const [n, p] = [257, 0.5];
  const ones = fromArray(new Float32Array(n).fill(1), [n]);
  manualSeed(seed);
  const a = await read(dropout(ones, p, { training: true }));
  const b = await read(dropout(ones, p, { training: true }));
  manualSeed(seed);
  const c = await read(dropout(ones, p, { training: true }));
  assert(a.some((v, i) => v !== b[i]), "two calls draw different masks");
  assertEquals([...a], [...c], "manualSeed replays the masks");
  // The first draw after manualSeed(s) uses the key randomBitsCpu(s, 0) with counters from 0.
  assertEquals([...a].map((v) => v !== 0), maskCpu(n, p, randomBitsCpu(seed, 0)));
});

Deno.test("dropout f16 and a transposed input: the mask follows the row-major output index", async () => {
  const seed = freshSeed();
  const [rows, cols, p] = [7, 13, 0.4];
  const x = rounded(randomArray(rows * cols, seed), "f16");
  // Upload xᵀ and view it as [rows, cols].
  const xT = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) xT[c * rows + r] = x[r * cols + c];
  const base = upload(xT, [cols, rows], "f16", true);
  const view = base.transpose(0, 1);
  const y = dropout(view, p, { training: true, seed });
  assertEquals(y.dtype, "f16");
  const keep = maskCpu(rows * cols, p, seed);
  const scale = Math.fround(1 / (1 - p));
  const expected = x.map((v, i) => (keep[i] ? roundToF16(Math.fround(v * scale)) : 0));
  assertEquals([...await read(y)], [...expected], `dropout f16 seed ${seed}`);
  y.backward(upload(new Float64Array(rows * cols).fill(1), [rows, cols], "f32"));
  const gT = await read(base.grad!); // gradient of the base, [cols, rows]
  const g = transposeBack(gT, cols, rows);
  const want = keep.map((k) => (k ? roundToF16(scale) : 0));
  assertEquals([...g], want, `dropout f16 backward, seed ${seed}`);
});

Deno.test("dropout: p = 0 and eval mode return a view and run no kernel; p = 1 zeroes", async () => {
  const x = tensor([[1, -2, 3], [4, 5, -6]], undefined, { requiresGrad: true });
  const gpu = getGpu();
  const before = gpu.dispatchCount;
  const a = dropout(x, 0.5, { training: false });
  const b = dropout(x, 0, { training: true });
  assertEquals(gpu.dispatchCount, before, "no kernel for an identity dropout");
  assert(a.storage === x.storage && b.storage === x.storage, "views share x's storage");
  a.add(b).sum().backward();
  assertEquals([...await x.grad!.toArray()], [2, 2, 2, 2, 2, 2], "the gradient flows through the views");
  assertEquals([...await dropout(x, 1, { training: true, seed: 3 }).toArray()], [0, 0, 0, 0, 0, 0]);
  assertThrows(() => dropout(x, 1.5, { training: true }), Error, "p must be in [0, 1]");
});

// ---- crossEntropy -------------------------------------------------------------------------------------------------

/** Float64 per-row cross-entropy (0 for ignored rows) and the number of kept rows. */
function ceRows(x: ArrayLike<number>, N: number, V: number, t: ArrayLike<number>, ignore: number) {
  const loss = new Float64Array(N);
  let kept = 0;
  for (let r = 0; r < N; r++) {
    if (t[r] === ignore) continue;
    kept++;
    let m = -Infinity;
    for (let j = 0; j < V; j++) m = Math.max(m, x[r * V + j]);
    let s = 0;
    for (let j = 0; j < V; j++) s += Math.exp(x[r * V + j] - m);
    loss[r] = m + Math.log(s) - x[r * V + t[r]];
  }
  return { loss, kept };
}

/** Random targets in [0, V) with repeats and `ignored` rows set to the ignore index. */
function randomTargets(N: number, V: number, seed: number, ignore: number, ignored: number): Int32Array {
  const r = rng(seed);
  const t = Int32Array.from({ length: N }, () => Math.floor(r() * V));
  if (N > 2) t[N - 1] = t[0]; // a repeated target
  for (let k = 0; k < ignored; k++) t[1 + ((k * 3) % (N - 1))] = ignore;
  return t;
}

async function checkCrossEntropy(
  N: number,
  V: number,
  dtype: Float,
  opts: { ignore?: number; ignored?: number; rowOffset?: number; scale?: number; shift?: number; ascending?: boolean } =
    {},
) {
  const seed = freshSeed();
  const ignore = opts.ignore ?? -100;
  const pad = opts.rowOffset ?? 0;
  const label = `crossEntropy [${N}, ${V}] ${dtype} ignore ${ignore} offset rows ${pad} seed ${seed}`;
  const all = rounded(randomArray((N + pad) * V, seed, opts.scale ?? 2).map((v) => v + (opts.shift ?? 0)), dtype);
  if (opts.ascending) { for (let r = 0; r < N + pad; r++) all.subarray(r * V, (r + 1) * V).sort(); }
  const x = all.slice(pad * V);
  const t = randomTargets(N, V, seed + 1, ignore, opts.ignored ?? 2);
  const { loss, kept } = ceRows(x, N, V, t, ignore);
  const total = loss.reduce((a, v) => a + v, 0);
  const G = rounded(randomArray(N, seed + 2), "f32");
  const gScalar = Math.fround(0.5 + rng(seed + 3)());
  const refs = {
    none: { value: [...loss], f: (v: Float64Array) => dot(ceRows(v, N, V, t, ignore).loss, G) },
    sum: { value: [total], f: (v: Float64Array) => gScalar * ceRows(v, N, V, t, ignore).loss.reduce((a, b) => a + b) },
    mean: {
      value: [total / kept],
      f: (v: Float64Array) => (gScalar * ceRows(v, N, V, t, ignore).loss.reduce((a, b) => a + b)) / kept,
    },
  };
  const outs: Record<string, number> = {};
  for (const reduction of ["none", "sum", "mean"] as const) {
    const base = upload(all, [N + pad, V], dtype, true);
    const logits = pad ? base.slice(0, pad) : base;
    const targets = tensor(t, [N]);
    const out = crossEntropy(logits, targets, { ignoreIndex: ignore, reduction });
    assertEquals(out.dtype, "f32");
    assertEquals([...out.shape], reduction === "none" ? [N] : [], `${label}: ${reduction} shape`);
    const got = await read(out);
    const shiftTol = Math.abs(opts.shift ?? 0) * 2e-7; // lse − x[target] cancels two values of size |shift|
    assertClose(got, refs[reduction].value, { rtol: 1e-5, atol: shiftTol, label: `${label} ${reduction} forward` });
    if (reduction !== "none") outs[reduction] = got[0];
    out.backward(reduction === "none" ? upload(G, [N], "f32") : tensor(gScalar));
    const ref = numericalGrad(refs[reduction].f, Float64Array.from(x));
    const g = await read(base.grad!);
    assertEquals(base.grad!.dtype, dtype, `${label}: gradient dtype`);
    assertClose(g.slice(pad * V), ref, {
      rtol: dtype === "f16" ? 2e-3 : 1e-4,
      relToMax: true,
      label: `${label} ${reduction} backward`,
    });
    for (let r = 0; r < N; r++) {
      if (t[r] === ignore) assert(g.slice((pad + r) * V, (pad + r + 1) * V).every((v) => v === 0), "ignored row grad");
    }
    for (const z of [base, logits, targets, out, base.grad!]) z.dispose();
  }
  // PyTorch: "mean" over ignored rows is the sum over kept rows divided by their count.
  assertClose([outs.mean * kept], [outs.sum], { rtol: 1e-6, label: `${label}: mean·count = sum` });
}

Deno.test("crossEntropy f32: odd vocab (37), ignored rows, repeated targets, none/sum/mean", async () => {
  await checkCrossEntropy(7, 37, "f32");
  await checkCrossEntropy(11, 37, "f32", { ignore: 0, ignored: 3 }); // a custom ignore index that is a class id
});

Deno.test("crossEntropy f32: vectorised rows (64) from an offset view, wide rows, large logits", async () => {
  await checkCrossEntropy(5, 64, "f32", { rowOffset: 1 });
  await checkCrossEntropy(3, 1031, "f32", { ascending: true }); // the running max grows at every element
  await checkCrossEntropy(3, 1032, "f32", { ascending: true }); // the same through vector loads
  await checkCrossEntropy(3, 1031, "f32", { scale: 30 });
  await checkCrossEntropy(4, 40, "f32", { shift: 1000 }); // stable: exp never overflows
});

Deno.test("crossEntropy f16: odd vocab, vectorised rows", async () => {
  await checkCrossEntropy(7, 37, "f16");
  await checkCrossEntropy(5, 64, "f16", { rowOffset: 1 });
});

Deno.test("crossEntropy: a 32,000-word vocabulary, forward and backward", async () => {
  const seed = freshSeed();
  const [N, V] = [3, 32000];
  const x = rounded(randomArray(N * V, seed, 3), "f32");
  const t = Int32Array.from([17, 31999, -100]);
  const { loss, kept } = ceRows(x, N, V, t, -100);
  const logits = upload(x, [N, V], "f32", true);
  const out = crossEntropy(logits, tensor(t));
  assertClose([await out.item()], [(loss[0] + loss[1]) / kept], { rtol: 1e-5, label: `V=32000 seed ${seed}` });
  out.backward();
  const g = await read(logits.grad!);
  // d/dx of the mean = (softmax − onehot) / count on kept rows.
  const expected = new Float64Array(N * V);
  for (let r = 0; r < 2; r++) {
    const lse = loss[r] + x[r * V + t[r]];
    for (let j = 0; j < V; j++) expected[r * V + j] = (Math.exp(x[r * V + j] - lse) - (j === t[r] ? 1 : 0)) / kept;
  }
  assertClose(g, expected, { rtol: 1e-4, relToMax: true, label: `V=32000 backward seed ${seed}` });
});

Deno.test("crossEntropy: every target ignored gives NaN for mean (PyTorch), 0 for sum, zero gradients", async () => {
  const logits = tensor([[1, 2, 3], [4, 5, 6]], undefined, { requiresGrad: true });
  const targets = tensor([-100, -100], undefined, { dtype: "i32" });
  const mean = crossEntropy(logits, targets);
  assert(Number.isNaN(await mean.item()), "mean over no targets is NaN");
  assertEquals(await crossEntropy(logits, targets, { reduction: "sum" }).item(), 0);
  mean.backward();
  assertEquals([...await logits.grad!.toArray()], [0, 0, 0, 0, 0, 0]);
});

Deno.test("crossEntropy: a target outside [0, V) gives NaN for its row; clear errors for bad shapes", async () => {
  const logits = tensor([[1, 2, 3], [4, 5, 6]]);
  const rows = await crossEntropy(logits, tensor([1, 3], undefined, { dtype: "i32" }), { reduction: "none" })
    .toArray();
  assert(Number.isFinite(rows[0]) && Number.isNaN(rows[1]), `got ${rows}`);
  assertThrows(() => crossEntropy(logits, tensor([1, 2, 0], undefined, { dtype: "i32" })), Error, "targets [N]");
  assertThrows(() => crossEntropy(logits, tensor([1, 2])), Error, "i32 or u32");
  assertThrows(
    () => crossEntropy(logits, tensor([1, 2], undefined, { dtype: "i32" }), { reduction: "avg" as "mean" }),
    Error,
    "reduction",
  );
});

// ---- memory -------------------------------------------------------------------------------------------------------

Deno.test("nn ops free everything they make: live memory returns to its level after forward and backward", async () => {
  const seed = freshSeed();
  const step = () =>
    scope(() => {
      const x = upload(rounded(randomArray(6 * 16, seed), "f32"), [6, 16], "f32", true);
      const w = upload(rounded(randomArray(16, seed + 1), "f32"), [16], "f32", true);
      const table = upload(rounded(randomArray(10 * 16, seed + 2), "f32"), [10, 16], "f32", true);
      const ids = tensor(Int32Array.from([1, 2, 1, 9, 0, 3]), [6]);
      const h = embedding(ids, table).add(x);
      const y = dropout(rmsNorm(h, w, 1e-6), 0.2, { training: true, seed });
      const loss = crossEntropy(y, tensor(Int32Array.from([3, -100, 0, 15, 2, 2])));
      loss.backward();
      for (const p of [x, w, table]) p.zeroGrad();
    });
  step();
  await getGpu().sync();
  const live = memoryStats().liveBytes;
  for (let i = 0; i < 3; i++) step();
  await getGpu().sync();
  assertEquals(memoryStats().liveBytes, live, "live bytes after 3 more steps");
});
