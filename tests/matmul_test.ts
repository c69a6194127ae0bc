/**
 * matmul and gemmInto against a float64 CPU reference on fresh random inputs: odd sizes, every transpose
 * combination, f16 inputs and outputs, batching with 2-D and 3-D right operands, the fused alpha/accumulate
 * epilogue, every kernel the chooser can pick (forced through `plan`), backward against numerical gradients, and
 * the shape-mismatch error.
 */
import { assert, assertEquals, assertThrows } from "@std/assert";
import { assertClose, freshSeed, matmul64, numericalGrad, randomArray, setup } from "./helpers.ts";
import { roundToF16 } from "../core/half.ts";
import { fromArray, getGpu, type Tensor, zeros } from "../mod.ts";
import { Tensor as TensorClass } from "../core/tensor.ts";
import {
  chooseGemm,
  CPU_GEMM_TILE,
  GEMM_TILES,
  gemmInto,
  type GemmPlan,
  GEMV_CONFIGS,
  matmul,
  planName,
} from "../core/ops/matmul.ts";
import type { TileConfig } from "../core/kernels/matmul.ts";

await setup();

type F = "f32" | "f16";

/** Values as the GPU will see them (rounded to f16 for f16 tensors). */
function rounded(x: Float32Array, dtype: F): Float32Array {
  return dtype === "f16" ? x.map(roundToF16) : x;
}

/**
 * A [rows, cols] tensor holding `x` (row-major data), stored row-major or, with `trans`, as the transposed view
 * of a [cols, rows] tensor.
 */
function mat(x: Float32Array, rows: number, cols: number, dtype: F = "f32", trans = false): Tensor {
  if (!trans) return fromArray(x, [rows, cols], { dtype });
  const t = new Float32Array(x.length);
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) t[j * rows + i] = x[i * cols + j];
  return fromArray(t, [cols, rows], { dtype }).transpose();
}

/** Reference [M, N] product of row-major data, in float64, from the (rounded) values the GPU sees. */
function ref(a: Float32Array, b: Float32Array, M: number, K: number, N: number, da: F = "f32", db: F = "f32") {
  return matmul64(rounded(a, da), rounded(b, db), M, K, N);
}

/** Tolerance relative to max|expected|: f32 accumulation, plus f16 rounding of the output. */
function tol(out: F): { rtol: number; relToMax: true } {
  return { rtol: out === "f16" ? 2e-3 : 2e-5, relToMax: true };
}

interface Case {
  M: number;
  K: number;
  N: number;
  ta?: boolean;
  tb?: boolean;
  da?: F;
  db?: F;
  out?: F;
  plan?: GemmPlan;
  alpha?: number;
  accumulate?: boolean;
}

/** Runs one product through gemmInto (or matmul when no plan/alpha/accumulate) and checks it. */
async function check(c: Case, label: string): Promise<string> {
  const { M, K, N, ta = false, tb = false, da = "f32", db = "f32" } = c;
  const out = c.out ?? (da === "f16" && db === "f16" ? "f16" : "f32");
  const seed = freshSeed();
  const a = randomArray(M * K, seed), b = randomArray(K * N, seed + 1);
  const A = mat(a, M, K, da, ta), B = mat(b, K, N, db, tb);
  const expect = ref(a, b, M, K, N, da, db);
  const alpha = c.alpha ?? 1;
  let used = "matmul";
  let C: Tensor;
  if (c.plan || c.alpha !== undefined || c.accumulate) {
    const init = randomArray(M * N, seed + 2);
    C = c.accumulate ? fromArray(init, [M, N], { dtype: out }) : TensorClass.empty([M, N], out);
    const start = rounded(init, out);
    used = planName(gemmInto(C, A, B, { plan: c.plan, alpha, accumulate: c.accumulate }));
    for (let i = 0; i < expect.length; i++) expect[i] = alpha * expect[i] + (c.accumulate ? start[i] : 0);
  } else {
    C = matmul(A, B, { out });
  }
  assertEquals(C.dtype, out);
  const got = await C.toArray();
  assertClose(got, expect, { ...tol(out), label: `${label} ${M}x${K}x${N} ${used} (seed ${seed})` });
  for (const t of [A, B, C]) t.dispose();
  return used;
}

Deno.test("matmul: odd sizes, every transpose combination, f32", async () => {
  for (const [M, K, N] of [[7, 13, 5], [33, 65, 17], [5, 1, 9], [1, 7, 3]]) {
    for (const ta of [false, true]) {
      for (const tb of [false, true]) await check({ M, K, N, ta, tb }, `ta=${ta} tb=${tb}`);
    }
  }
});

Deno.test("matmul: f16 inputs (f16 and f32 output), mixed f32·f16, odd and even sizes", async () => {
  await check({ M: 33, K: 65, N: 17, da: "f16", db: "f16" }, "f16 odd N (unaligned f16 output)");
  await check({ M: 33, K: 64, N: 18, da: "f16", db: "f16", tb: true }, "f16 even N, packed pairs");
  await check({ M: 20, K: 48, N: 40, da: "f16", db: "f16", ta: true }, "f16 vec8 loads, vec4 stores");
  await check({ M: 9, K: 40, N: 24, da: "f16", db: "f16", out: "f32" }, "f16 in, f32 out");
  await check({ M: 7, K: 13, N: 5, da: "f32", db: "f16", tb: true }, "f32·f16ᵀ odd");
  await check({ M: 12, K: 64, N: 72, da: "f32", db: "f16", tb: true }, "f32·f16ᵀ aligned");
  await check({ M: 12, K: 64, N: 72, da: "f16", db: "f32" }, "f16·f32");
  // every global-load vector width: 4 and 2 halves, 2 floats (K divisible by 4 / by 2 only)
  await check({ M: 10, K: 36, N: 20, da: "f16", db: "f16", tb: true }, "f16 vec4 loads");
  await check({ M: 10, K: 34, N: 22, da: "f16", db: "f16", tb: true }, "f16 vec2 loads");
  await check({ M: 10, K: 34, N: 22, tb: true }, "f32 vec2 loads");
});

Deno.test("matmul: one-row inputs (GEMV paths), M=1, K=1", async () => {
  assertEquals(chooseGemm({ M: 1, N: 4096, K: 4096, batch: 1, a: "f16", b: "f16", transB: true }).kind, "gemvT");
  assertEquals(chooseGemm({ M: 1, N: 4096, K: 4096, batch: 1, a: "f32", b: "f32", transB: false }).kind, "gemvN");
  const cases: Case[] = [
    { M: 1, K: 64, N: 40, tb: true, da: "f16", db: "f16" }, // x·Wᵀ, f16 vec8, f16 pairs
    { M: 1, K: 37, N: 21, tb: true }, // odd: scalar loads
    { M: 3, K: 48, N: 30, tb: true, da: "f32", db: "f16" }, // 4-row variant
    { M: 1, K: 50, N: 33 }, // x·W with W [K, N]
    { M: 4, K: 300, N: 64, da: "f16", db: "f16" }, // split K, f16 finish
    { M: 2, K: 19, N: 7, ta: true, tb: true }, // A transposed: copied to rows first
    { M: 1, K: 1, N: 9 },
    { M: 6, K: 1, N: 11, tb: true },
  ];
  for (const c of cases) await check(c, "gemv");
});

Deno.test("matmul: batched, with 3-D and shared 2-D right operands and broadcast left operand", async () => {
  const seed = freshSeed();
  const [Bt, M, K, N] = [3, 5, 11, 6];
  const a = randomArray(Bt * M * K, seed), b3 = randomArray(Bt * K * N, seed + 1), b2 = randomArray(K * N, seed + 2);
  const A = fromArray(a, [Bt, M, K]);
  const expect3 = new Float64Array(Bt * M * N), expect2 = new Float64Array(Bt * M * N);
  for (let i = 0; i < Bt; i++) {
    expect3.set(matmul64(a.subarray(i * M * K), b3.subarray(i * K * N), M, K, N), i * M * N);
    expect2.set(matmul64(a.subarray(i * M * K), b2, M, K, N), i * M * N);
  }
  const C3 = matmul(A, fromArray(b3, [Bt, K, N]));
  assertEquals(C3.shape, [Bt, M, N]);
  assertClose(await C3.toArray(), expect3, { ...tol("f32"), label: `batched 3-D (seed ${seed})` });
  const C2 = matmul(A, fromArray(b2, [K, N]));
  assertClose(await C2.toArray(), expect2, { ...tol("f32"), label: `batched 2-D, folded (seed ${seed})` });
  // 3-D right operand stored transposed, [B, N, K] viewed as [B, K, N]; f16 with odd N per batch
  const bt = new Float32Array(Bt * K * N);
  for (let i = 0; i < Bt; i++) {
    for (let k = 0; k < K; k++) for (let n = 0; n < N; n++) bt[i * K * N + n * K + k] = b3[i * K * N + k * N + n];
  }
  const Bh = fromArray(bt, [Bt, N, K], { dtype: "f16" }).transpose();
  const Ah = fromArray(a, [Bt, M, K], { dtype: "f16" });
  const Ch = matmul(Ah, Bh);
  const expectH = new Float64Array(Bt * M * N);
  for (let i = 0; i < Bt; i++) {
    expectH.set(ref(a.subarray(i * M * K), b3.subarray(i * K * N), M, K, N, "f16", "f16"), i * M * N);
  }
  assertEquals(Ch.dtype, "f16");
  assertClose(await Ch.toArray(), expectH, { ...tol("f16"), label: `batched f16 transposed (seed ${seed})` });
  // broadcast left operand: [M, K] · [B, K, N]
  const A2 = fromArray(a.subarray(0, M * K), [M, K]);
  const Cb = matmul(A2, fromArray(b3, [Bt, K, N]));
  const expectB = new Float64Array(Bt * M * N);
  for (let i = 0; i < Bt; i++) expectB.set(matmul64(a.subarray(0, M * K), b3.subarray(i * K * N), M, K, N), i * M * N);
  assertClose(await Cb.toArray(), expectB, { ...tol("f32"), label: `broadcast A (seed ${seed})` });
  // batched GEMV: [B, 1, K] · [B, K, N] stored transposed
  const Ag = fromArray(a.subarray(0, Bt * K), [Bt, 1, K]);
  const Bg = fromArray(bt, [Bt, N, K]).transpose();
  const Cg = matmul(Ag, Bg);
  const expectG = new Float64Array(Bt * N);
  for (let i = 0; i < Bt; i++) expectG.set(matmul64(a.subarray(i * K), b3.subarray(i * K * N), 1, K, N), i * N);
  assertClose(await Cg.toArray(), expectG, { ...tol("f32"), label: `batched gemv (seed ${seed})` });
});

Deno.test("gemmInto: alpha and accumulate, f32 and f16 outputs, into a view", async () => {
  await check({ M: 33, K: 40, N: 20, alpha: 0.5, accumulate: true }, "f32 += 0.5·AB");
  await check({ M: 33, K: 40, N: 20, alpha: -2, accumulate: false }, "f32 = -2·AB");
  await check({ M: 17, K: 24, N: 32, da: "f16", db: "f16", alpha: 2, accumulate: true }, "f16 += 2·AB");
  await check({ M: 17, K: 24, N: 31, da: "f16", db: "f16", alpha: 2, accumulate: true }, "f16 odd N += 2·AB");
  await check({ M: 1, K: 64, N: 32, tb: true, da: "f16", db: "f16", alpha: 3, accumulate: true }, "gemv f16 +=");
  await check({ M: 1, K: 64, N: 32, alpha: 3, accumulate: true }, "gemvN f32 +=");
  // LoRA: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, with y a column slice of a wider buffer (odd offset and stride for f16)
  const seed = freshSeed();
  const [M, K, N, r, s] = [9, 32, 22, 4, 1.5];
  const x = randomArray(M * K, seed), w = randomArray(N * K, seed + 1);
  const la = randomArray(r * K, seed + 2), lb = randomArray(N * r, seed + 3);
  for (const dt of ["f32", "f16"] as const) {
    const wide = zeros([M, N + 3], { dtype: dt });
    const y = wide.slice(1, 1, N + 1);
    const X = fromArray(x, [M, K], { dtype: dt });
    gemmInto(y, X, mat(w, N, K, dt).transpose());
    const xa = matmul(X, mat(la, r, K).transpose(), { out: "f32" });
    gemmInto(y, xa, mat(lb, N, r).transpose(), { alpha: s, accumulate: true });
    // reference on the values the GPU sees (x and W rounded for f16; x·Aᵀ in f32 either way)
    const xr = rounded(x, dt);
    const xaRef = Float32Array.from(matmul64(xr, transposed(la, r, K), M, K, r));
    const base = matmul64(xr, transposed(rounded(w, dt), N, K), M, K, N);
    const lora = matmul64(xaRef, transposed(lb, N, r), M, r, N);
    const got = await wide.toArray();
    const expect: number[] = [], actual: number[] = [];
    for (let i = 0; i < M; i++) {
      for (let j = 0; j < N + 3; j++) {
        actual.push(got[i * (N + 3) + j]);
        expect.push(j >= 1 && j <= N ? base[i * N + j - 1] + s * lora[i * N + j - 1] : 0);
      }
    }
    assertClose(actual, expect, { ...tol(dt), label: `LoRA into a ${dt} view (seed ${seed})` });
  }
});

function transposed(x: Float32Array, rows: number, cols: number): Float32Array {
  const t = new Float32Array(x.length);
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) t[j * rows + i] = x[i * cols + j];
  return t;
}

Deno.test("matmul: every tile config of the chooser, split-K, pipelines, f16 workgroup memory", async () => {
  const picks = new Set<string>();
  const run = async (tile: TileConfig, extra: Partial<Case> = {}) => {
    const M = tile.bm + 3, N = tile.bn + 5, K = 3 * tile.bk + 3;
    picks.add(await check({ M, K, N, plan: { kind: "tile", tile }, ...extra }, `tile ${JSON.stringify(tile)}`));
  };
  for (const tile of Object.values(GEMM_TILES)) await run(tile);
  // the CPU adapters' replacement of large/medium/small, as the base layers use it (f16 x·Wᵀ) and in f32
  await run(CPU_GEMM_TILE, { da: "f16", db: "f16", tb: true });
  await run(CPU_GEMM_TILE);
  // each in the orientation and dtype the LoRA shapes use: x·Wᵀ with f16 W, and the weight-gradient Aᵀ·B
  await run(GEMM_TILES.medium, { da: "f32", db: "f16", tb: true });
  await run(GEMM_TILES.thinM16, { ta: true });
  await run(GEMM_TILES.thinN16, { ta: true });
  // pipelines and swizzle
  const base: TileConfig = { bm: 64, bn: 64, bk: 8, tm: 8, tn: 4, pipeline: "direct", swizzle: 0 };
  await run(base);
  await run({ ...base, pipeline: "regs", swizzle: 2 });
  if (getGpu().info.shaderF16) {
    await run({ ...GEMM_TILES.large, smemF16: true }, { da: "f16", db: "f16" });
    await run({ ...GEMM_TILES.medium, smemF16: true }, { da: "f32", db: "f16", tb: true });
  }
  // split-K (f32 and f16 outputs, accumulate) and a K that is not a multiple of the split
  const thin = GEMM_TILES.thinN16;
  await check({ M: 70, K: 203, N: 16, plan: { kind: "tile", tile: thin, splits: 5 } }, "split-K");
  await check(
    {
      M: 16,
      K: 150,
      N: 70,
      ta: true,
      da: "f16",
      db: "f16",
      plan: { kind: "tile", tile: GEMM_TILES.thinM16, splits: 3 },
    },
    "split-K f16",
  );
  await check(
    { M: 20, K: 90, N: 12, plan: { kind: "tile", tile: thin, splits: 4 }, alpha: 0.25, accumulate: true },
    "split-K accumulate",
  );
  // the chooser's GEMV configs, forced on shapes with more than four rows of W per group
  await check({ M: 1, K: 40, N: 37, tb: true, plan: { kind: "gemvT", ...GEMV_CONFIGS.t } }, "gemvT forced");
  await check({ M: 4, K: 40, N: 70, plan: { kind: "gemvN", ...GEMV_CONFIGS.n, splits: 3 } }, "gemvN forced");
  assert(picks.size >= Object.keys(GEMM_TILES).length, `distinct plans ${[...picks]}`);
});

Deno.test("matmul: the chooser's picks per shape class", () => {
  const pick = (M: number, K: number, N: number, transB = false) =>
    chooseGemm({ M, N, K, batch: 1, a: "f32", b: "f32", transB });
  const large = pick(4096, 4096, 4096);
  assert(large.kind === "tile" && large.tile === GEMM_TILES.large && (large.splits ?? 1) === 1, planName(large));
  const thin = pick(512, 4096, 16, true);
  assert(thin.kind === "tile" && thin.tile === GEMM_TILES.thinN16 && (thin.splits ?? 1) > 1, planName(thin));
  const grad = pick(16, 512, 4096);
  assert(grad.kind === "tile" && grad.tile === GEMM_TILES.thinM16, planName(grad));
  assertEquals(pick(1, 4096, 11008, true).kind, "gemvT");
});

Deno.test("matmul: backward matches numerical gradients of the float64 reference", async () => {
  for (const [M, K, N, tb] of [[7, 13, 5, false], [6, 9, 11, true]] as const) {
    const seed = freshSeed();
    const a = randomArray(M * K, seed), b = randomArray(K * N, seed + 1), g = randomArray(M * N, seed + 2);
    const A = fromArray(a, [M, K], { requiresGrad: true });
    // the leaf is B itself, or (tb) a [N, K] tensor used through its transposed view
    const leaf = tb ? fromArray(transposed(b, K, N), [N, K], { requiresGrad: true }) : fromArray(b, [K, N], {
      requiresGrad: true,
    });
    const B = tb ? leaf.transpose() : leaf;
    const C = matmul(A, B);
    C.backward(fromArray(g, [M, N]));
    const loss = (av: Float64Array, bv: Float64Array) => {
      const c = matmul64(av, bv, M, K, N);
      let s = 0;
      for (let i = 0; i < c.length; i++) s += c[i] * g[i];
      return s;
    };
    const a64 = Float64Array.from(a), b64 = Float64Array.from(b);
    const dA = numericalGrad((x) => loss(x, b64), a64);
    const dB = numericalGrad((x) => loss(a64, x), b64);
    assertClose(await A.grad!.toArray(), dA, { rtol: 1e-4, relToMax: true, label: `dA (seed ${seed})` });
    const gB = Float32Array.from(await leaf.grad!.toArray());
    assertClose(tb ? transposed(gB, N, K) : gB, dB, { rtol: 1e-4, relToMax: true, label: `dB (seed ${seed})` });
  }
  // batched A with a shared 2-D B: dB sums over the batch
  const seed = freshSeed();
  const [Bt, M, K, N] = [2, 3, 5, 4];
  const a = randomArray(Bt * M * K, seed), b = randomArray(K * N, seed + 1), g = randomArray(Bt * M * N, seed + 2);
  const A = fromArray(a, [Bt, M, K], { requiresGrad: true }), B = fromArray(b, [K, N], { requiresGrad: true });
  matmul(A, B).backward(fromArray(g, [Bt, M, N]));
  const loss = (av: Float64Array, bv: Float64Array) => {
    const c = matmul64(av, bv, Bt * M, K, N);
    let s = 0;
    for (let i = 0; i < c.length; i++) s += c[i] * g[i];
    return s;
  };
  const a64 = Float64Array.from(a), b64 = Float64Array.from(b);
  assertClose(await A.grad!.toArray(), numericalGrad((x) => loss(x, b64), a64), {
    rtol: 1e-4,
    relToMax: true,
    label: `batched dA (seed ${seed})`,
  });
  assertClose(await B.grad!.toArray(), numericalGrad((x) => loss(a64, x), b64), {
    rtol: 1e-4,
    relToMax: true,
    label: `batched dB (seed ${seed})`,
  });
});

Deno.test("matmul: mismatched shapes give an error naming both shapes", () => {
  const a = zeros([3, 4]), b = zeros([5, 6]);
  const e = assertThrows(() => matmul(a, b));
  assert(e instanceof Error && e.message.includes("[3, 4]") && e.message.includes("[5, 6]"), String(e));
  const out = zeros([3, 7]);
  const e2 = assertThrows(() => gemmInto(out, a, zeros([4, 6])));
  assert(e2 instanceof Error && e2.message.includes("[3, 7]") && e2.message.includes("[3, 6]"), String(e2));
  const e3 = assertThrows(() => matmul(zeros([2, 3, 4]), zeros([3, 4, 5])));
  assert(e3 instanceof Error && e3.message.includes("[2, 3, 4]") && e3.message.includes("[3, 4, 5]"), String(e3));
});

Deno.test("matmul: one-row f16 × f16ᵀ products at every load width (GEMV, K = 36, 38, 40, 64)", async () => {
  const { fromArray, matmul } = await import("../mod.ts");
  const { roundToF16 } = await import("../core/half.ts");
  const { assertClose, matmul64, randomArray } = await import("./helpers.ts");
  for (const K of [36, 38, 40, 64]) {
    const N = 20;
    const x = randomArray(K, 100 + K).map(roundToF16), w = randomArray(N * K, 200 + K).map(roundToF16);
    const xt = fromArray(x, [1, K], { dtype: "f16" }), wt = fromArray(w, [N, K], { dtype: "f16" });
    const y = matmul(xt, wt.transpose(), { out: "f32" });
    const wT = new Float64Array(K * N);
    for (let n = 0; n < N; n++) for (let k = 0; k < K; k++) wT[k * N + n] = w[n * K + k];
    assertClose(await y.toArray(), matmul64(x, wT, 1, K, N), { rtol: 1e-4, relToMax: true, label: `K=${K}` });
    for (const t of [xt, wt, y]) t.dispose();
  }
});
