/**
 * Every differentiable op against a float64 CPU reference: the forward values, and the backward pass against
 * central differences of the float64 reference, on fresh random inputs of odd sizes.
 *
 * How a case is checked (see {@linkcode checkOp}): the inputs are rounded to f32 once and the same values feed
 * the GPU and the float64 reference. The forward output must match the reference within rtol 1e-4, elementwise
 * (|a − e| ≤ 1e-4·|e|) for ops whose outputs stay away from zero, and relative to the output's largest magnitude
 * (|a − e| ≤ 1e-4·max|e|) where outputs can be near zero (sums, differences, odd functions). The backward pass
 * is driven by a fresh random output gradient R (`out.backward(R)`), so every input gradient is the gradient of
 * the scalar Σ ref(x)·R, which the test differentiates numerically in float64 (central differences, h = 1e-6)
 * and compares relative to the gradient's largest magnitude, rtol 1e-4 (gradients of a random projection cross
 * zero everywhere, so elementwise relative error is meaningless there). Each run draws new inputs; the seed is in
 * every failure message.
 *
 * @module
 */
import { assert, assertEquals, assertThrows } from "@std/assert";
import {
  abs,
  cast,
  cat,
  eq,
  exp,
  ge,
  gelu,
  gt,
  le,
  log,
  lt,
  maximum,
  ne,
  neg,
  relu,
  rsqrt,
  scope,
  sigmoid,
  silu,
  sqrt,
  square,
  tanh,
  type Tensor,
  tensor,
  where,
} from "../mod.ts";
import { f32ArrayToF16, roundToF16 } from "../core/half.ts";
import { assertClose, freshSeed, numericalGrad, randomArray, rng } from "./helpers.ts";
import { setup } from "./helpers.ts";

await setup();

// ---- float64 CPU references ----------------------------------------------------------------------------------

/** A float64 row-major array. */
interface Arr {
  shape: number[];
  data: Float64Array;
}

const numel = (shape: readonly number[]): number => shape.reduce((a, d) => a * d, 1);

function rowMajor(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i];
  }
  return s;
}

/** Reads `data` through (shape, strides, offset) into a fresh row-major array: the CPU model of a view. */
function gather(data: Float64Array, shape: number[], strides: number[], offset: number): Arr {
  const n = numel(shape);
  const out = new Float64Array(n);
  const idx = new Array<number>(shape.length).fill(0);
  for (let i = 0; i < n; i++) {
    let o = offset;
    for (let d = 0; d < shape.length; d++) o += idx[d] * strides[d];
    out[i] = data[o];
    for (let d = shape.length - 1; d >= 0; d--) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
  }
  return { shape, data: out };
}

function broadcastShape(a: readonly number[], b: readonly number[]): number[] {
  const r = Math.max(a.length, b.length);
  const out: number[] = [];
  for (let i = 0; i < r; i++) {
    const x = a[a.length - r + i] ?? 1, y = b[b.length - r + i] ?? 1;
    if (x !== y && x !== 1 && y !== 1) throw new Error(`reference: cannot broadcast ${a} and ${b}`);
    out.push(x === 1 ? y : x);
  }
  return out;
}

/** `a` broadcast to `shape`. */
function expandTo(a: Arr, shape: number[]): Arr {
  const lead = shape.length - a.shape.length;
  const st = rowMajor(a.shape);
  const strides = shape.map((_, i) => (i < lead || a.shape[i - lead] === 1 ? 0 : st[i - lead]));
  return gather(a.data, shape, strides, 0);
}

function map(a: Arr, f: (x: number) => number): Arr {
  return { shape: a.shape, data: a.data.map(f) };
}

function zip(a: Arr, b: Arr, f: (x: number, y: number) => number): Arr {
  const shape = broadcastShape(a.shape, b.shape);
  const x = expandTo(a, shape).data, y = expandTo(b, shape).data;
  return { shape, data: x.map((v, i) => f(v, y[i])) };
}

function permuteArr(a: Arr, dims: number[]): Arr {
  const st = rowMajor(a.shape);
  return gather(a.data, dims.map((d) => a.shape[d]), dims.map((d) => st[d]), 0);
}

function transposeArr(a: Arr, d0: number, d1: number): Arr {
  const dims = [...a.shape.keys()];
  [dims[d0], dims[d1]] = [dims[d1], dims[d0]];
  return permuteArr(a, dims);
}

function sliceArr(a: Arr, dim: number, start: number, end: number): Arr {
  const st = rowMajor(a.shape);
  const shape = a.shape.slice();
  shape[dim] = end - start;
  return gather(a.data, shape, st, start * st[dim]);
}

function catArr(list: Arr[], dim: number): Arr {
  const shape = list[0].shape.slice();
  shape[dim] = list.reduce((s, a) => s + a.shape[dim], 0);
  const outer = numel(shape.slice(0, dim));
  const out = new Float64Array(numel(shape));
  let at = 0;
  for (let o = 0; o < outer; o++) {
    for (const a of list) {
      const chunk = numel(a.shape.slice(dim));
      out.set(a.data.subarray(o * chunk, (o + 1) * chunk), at);
      at += chunk;
    }
  }
  return { shape, data: out };
}

function normAxes(axis: number | number[] | undefined, ndim: number): number[] {
  if (axis === undefined) return [...Array(ndim).keys()];
  return [...new Set((Array.isArray(axis) ? axis : [axis]).map((a) => (a < 0 ? a + ndim : a)))];
}

function reduceArr(a: Arr, axis: number | number[] | undefined, keepdim: boolean, op: "sum" | "mean" | "max"): Arr {
  const axes = normAxes(axis, a.shape.length);
  const kept = a.shape.map((d, i) => (axes.includes(i) ? 1 : d));
  const out = new Float64Array(numel(kept)).fill(op === "max" ? -Infinity : 0);
  const outSt = rowMajor(kept);
  const idx = new Array<number>(a.shape.length).fill(0);
  for (let i = 0; i < a.data.length; i++) {
    let o = 0;
    for (let d = 0; d < idx.length; d++) if (!axes.includes(d)) o += idx[d] * outSt[d];
    out[o] = op === "max" ? Math.max(out[o], a.data[i]) : out[o] + a.data[i];
    for (let d = idx.length - 1; d >= 0; d--) {
      if (++idx[d] < a.shape[d]) break;
      idx[d] = 0;
    }
  }
  if (op === "mean") {
    const n = numel(axes.map((d) => a.shape[d]));
    for (let i = 0; i < out.length; i++) out[i] /= n;
  }
  return { shape: keepdim ? kept : a.shape.filter((_, i) => !axes.includes(i)), data: out };
}

function softmaxArr(a: Arr, axis: number, logOut: boolean): Arr {
  const ax = axis < 0 ? axis + a.shape.length : axis;
  const n = a.shape[ax], inner = numel(a.shape.slice(ax + 1)), outer = numel(a.shape.slice(0, ax));
  const out = new Float64Array(a.data.length);
  for (let o = 0; o < outer; o++) {
    for (let j = 0; j < inner; j++) {
      const at = (k: number) => o * n * inner + k * inner + j;
      let mx = -Infinity;
      for (let k = 0; k < n; k++) mx = Math.max(mx, a.data[at(k)]);
      let s = 0;
      for (let k = 0; k < n; k++) s += Math.exp(a.data[at(k)] - mx);
      for (let k = 0; k < n; k++) {
        out[at(k)] = logOut ? a.data[at(k)] - mx - Math.log(s) : Math.exp(a.data[at(k)] - mx) / s;
      }
    }
  }
  return { shape: a.shape, data: out };
}

/** erf in float64 to ~1e-15: Maclaurin series below 3, Laplace's continued fraction for erfc above. */
function erf(x: number): number {
  const z = Math.abs(x);
  let r: number;
  if (z < 3) {
    let term = z, sum = z;
    for (let n = 1; n < 200; n++) {
      term *= (-z * z) / n;
      const t = term / (2 * n + 1);
      sum += t;
      if (Math.abs(t) < 1e-17 * Math.abs(sum)) break;
    }
    r = (2 / Math.sqrt(Math.PI)) * sum;
  } else {
    r = 1 - erfcLarge(z);
  }
  return x < 0 ? -r : r;
}

function erfcLarge(z: number): number {
  let k = z;
  for (let n = 80; n >= 1; n--) k = z + n / 2 / k;
  return Math.exp(-z * z) / (Math.sqrt(Math.PI) * k);
}

/** erfc without cancellation in the tails. */
function erfc(x: number): number {
  if (x >= 3) return erfcLarge(x);
  if (x <= -3) return 2 - erfcLarge(-x);
  return 1 - erf(x);
}

const sigmoid64 = (x: number) => (x >= 0 ? 1 / (1 + Math.exp(-x)) : Math.exp(x) / (1 + Math.exp(x)));
/** Exact GELU x·Φ(x), with Φ(x) = erfc(−x/√2)/2 (accurate in both tails). */
const gelu64 = (x: number) => 0.5 * x * erfc(-x / Math.SQRT2);

// ---- input generators ----------------------------------------------------------------------------------------

/** N(0, scale²) values. */
function normal(n: number, seed: number, scale = 1): Float32Array {
  return randomArray(n, seed, scale);
}

/** Values with |x| ≥ `min` (away from kinks and poles), random signs unless `positive`. */
function awayFromZero(n: number, seed: number, min: number, spread = 1, positive = false): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => {
    const v = min + spread * r();
    return positive || r() < 0.5 ? v : -v;
  });
}

/** A random permutation of a grid with spacing `step`, plus small noise: distinct values, no near-ties. */
function distinct(n: number, seed: number, step = 0.05): Float32Array {
  const r = rng(seed);
  const v = Array.from({ length: n }, (_, i) => (i - n / 2) * step + r() * step * 0.4);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [v[i], v[j]] = [v[j], v[i]];
  }
  return Float32Array.from(v);
}

// ---- the checker -----------------------------------------------------------------------------------------------

interface InputSpec {
  shape: number[];
  data: Float32Array;
  /** Whether the input requires a gradient (default true). */
  grad?: boolean;
  /** Upload as this dtype (default f32). Integer inputs never require gradients. */
  dtype?: "f32" | "u32" | "i32";
}

interface CheckOptions {
  /** Forward tolerance (default 1e-4). */
  rtol?: number;
  /** Forward error relative to max|expected| instead of elementwise (for outputs that can be near zero). */
  relToMax?: boolean;
  /** Forward absolute tolerance added to the relative one (default 0). */
  atol?: number;
  /** Backward tolerance relative to the gradient's max magnitude (default 1e-4). */
  gradRtol?: number;
  /** Skip the backward check. */
  noBackward?: boolean;
}

/**
 * Checks `gpu(inputs)` against `ref(inputs)` in float64: forward values, then every input gradient against
 * central differences of Σ ref(x)·R for a fresh random R.
 */
async function checkOp(
  label: string,
  inputs: InputSpec[],
  gpu: (ts: Tensor[]) => Tensor,
  ref: (xs: Arr[]) => Arr,
  opts: CheckOptions = {},
): Promise<void> {
  const seed = freshSeed();
  const name = `${label} (R seed ${seed})`;
  const xs: Arr[] = inputs.map((s) => ({ shape: s.shape, data: Float64Array.from(s.data) }));
  await scope(async () => {
    const ts = inputs.map((s) =>
      tensor(s.dtype && s.dtype !== "f32" ? Array.from(s.data) : s.data, s.shape, {
        dtype: s.dtype ?? "f32",
        requiresGrad: (s.dtype ?? "f32") === "f32" && s.grad !== false,
      })
    );
    const out = gpu(ts);
    const expected = ref(xs);
    assertEquals([...out.shape], expected.shape, `${name}: output shape`);
    assertEquals(out.dtype, "f32", `${name}: output dtype`);
    assertClose(await out.toArray(), expected.data, {
      rtol: opts.rtol ?? 1e-4,
      atol: opts.atol ?? 0,
      relToMax: opts.relToMax,
      label: `${name} forward`,
    });
    if (opts.noBackward) return;
    const r = randomArray(numel(expected.shape), seed);
    const R = Float64Array.from(r);
    out.backward(tensor(r, expected.shape));
    for (let i = 0; i < inputs.length; i++) {
      if (!ts[i].requiresGrad) {
        assertEquals(ts[i].grad, null, `${name}: input ${i} must get no gradient`);
        continue;
      }
      const f = (x: Float64Array): number => {
        const args = xs.slice();
        args[i] = { shape: xs[i].shape, data: x };
        const y = ref(args).data;
        let s = 0;
        for (let k = 0; k < y.length; k++) s += y[k] * R[k];
        return s;
      };
      const num = numericalGrad(f, Float64Array.from(xs[i].data));
      const g = ts[i].grad;
      assert(g !== null, `${name}: input ${i} has no gradient`);
      assertEquals([...g.shape], inputs[i].shape, `${name}: gradient ${i} shape`);
      assertClose(await g.toArray(), num, { rtol: opts.gradRtol ?? 1e-4, relToMax: true, label: `${name} grad ${i}` });
      ts[i].zeroGrad();
    }
  });
}

const spec = (shape: number[], data: Float32Array, grad = true): InputSpec => ({ shape, data, grad });

// ---- binary arithmetic -----------------------------------------------------------------------------------------

const BINARY: Record<string, { gpu: (a: Tensor, b: Tensor | number) => Tensor; f: (x: number, y: number) => number }> =
  {
    add: { gpu: (a, b) => a.add(b), f: (x, y) => x + y },
    sub: { gpu: (a, b) => a.sub(b), f: (x, y) => x - y },
    mul: { gpu: (a, b) => a.mul(b), f: (x, y) => x * y },
    div: { gpu: (a, b) => a.div(b), f: (x, y) => x / y },
  };

/** Shape pairs: same shape, broadcasting in both directions, size-1 dims on both sides, rank mismatch. */
const BROADCAST_CASES: [number[], number[]][] = [
  [[7, 13], [7, 13]],
  [[7, 13], [13]],
  [[13], [7, 13]],
  [[7, 1], [1, 13]],
  [[3, 1, 5], [4, 1]],
  [[33, 65], [33, 1]],
];

for (const [op, def] of Object.entries(BINARY)) {
  Deno.test(`${op}: tensor operands with broadcasting, forward and gradients of both`, async () => {
    for (const [sa, sb] of BROADCAST_CASES) {
      const s = freshSeed();
      const a = normal(numel(sa), s);
      // Divisors stay away from zero so the quotient and its gradient are well conditioned.
      const b = op === "div" ? awayFromZero(numel(sb), s + 1, 0.5, 2) : normal(numel(sb), s + 1);
      await checkOp(
        `${op} ${JSON.stringify(sa)}·${JSON.stringify(sb)} seed ${s}`,
        [spec(sa, a), spec(sb, b)],
        ([x, y]) => def.gpu(x, y),
        ([x, y]) => zip(x, y, def.f),
        { relToMax: op === "add" || op === "sub" },
      );
    }
  });

  Deno.test(`${op}: scalar operand, and a transposed (strided) tensor operand`, async () => {
    const s = freshSeed();
    const c = op === "div" ? -1.75 : 2.5;
    await checkOp(
      `${op} [7,13]·scalar seed ${s}`,
      [spec([7, 13], normal(91, s))],
      ([x]) => def.gpu(x, c),
      ([x]) => map(x, (v) => def.f(v, c)),
      { relToMax: op === "add" || op === "sub" },
    );
    const b = op === "div" ? awayFromZero(91, s + 2, 0.5, 2) : normal(91, s + 2);
    await checkOp(
      `${op} [7,13]·[13,7]ᵀ seed ${s}`,
      [spec([7, 13], normal(91, s + 1)), spec([13, 7], b)],
      ([x, y]) => def.gpu(x, y.transpose()),
      ([x, y]) => zip(x, transposeArr(y, 0, 1), def.f),
      { relToMax: op === "add" || op === "sub" },
    );
  });
}

Deno.test("binary ops: mismatched shapes name both shapes", () => {
  scope(() => {
    const a = tensor(new Float32Array(91), [7, 13]);
    const b = tensor(new Float32Array(84), [7, 12]);
    for (const f of [() => a.add(b), () => a.sub(b), () => a.mul(b), () => a.div(b), () => maximum(a, b)]) {
      assertThrows(f, Error, "[7, 13] and [7, 12]");
    }
  });
});

Deno.test("maximum: broadcasting, gradients to the larger input; ties split the gradient in half", async () => {
  const s = freshSeed();
  const ab = distinct(91 + 13, s);
  await checkOp(
    `maximum [7,13]·[13] seed ${s}`,
    [spec([7, 13], ab.slice(0, 91)), spec([13], ab.slice(91))],
    ([x, y]) => maximum(x, y),
    ([x, y]) => zip(x, y, Math.max),
  );
  await scope(async () => {
    const a = tensor([1, 5, 3, -2], undefined, { requiresGrad: true });
    const b = tensor([1, 2, 4, -2], undefined, { requiresGrad: true });
    maximum(a, b).backward(tensor([2, 2, 2, 2]));
    assertEquals(Array.from(await a.grad!.toArray()), [1, 2, 0, 1]);
    assertEquals(Array.from(await b.grad!.toArray()), [1, 0, 2, 1]);
  });
});

// ---- unary functions -------------------------------------------------------------------------------------------

interface UnaryCase {
  gpu: (x: Tensor) => Tensor;
  f: (x: number) => number;
  data: (n: number, seed: number) => Float32Array;
  /** Outputs can be near zero with absolute (not relative) f32 accuracy: compare relative to the largest magnitude. */
  relToMax?: boolean;
}

/** Sets a few entries to large magnitudes (for overflow-safe formulas). */
function withExtremes(x: Float32Array, values: number[]): Float32Array {
  values.forEach((v, i) => (x[(i * 37) % x.length] = v));
  return x;
}

const UNARY: Record<string, UnaryCase> = {
  neg: { gpu: neg, f: (x) => -x, data: (n, s) => normal(n, s) },
  exp: { gpu: exp, f: Math.exp, data: (n, s) => normal(n, s, 2) },
  log: { gpu: log, f: Math.log, data: (n, s) => awayFromZero(n, s, 0.05, 5, true), relToMax: true },
  sqrt: { gpu: sqrt, f: Math.sqrt, data: (n, s) => awayFromZero(n, s, 0.05, 5, true) },
  rsqrt: { gpu: rsqrt, f: (x) => 1 / Math.sqrt(x), data: (n, s) => awayFromZero(n, s, 0.05, 5, true) },
  // tanh and sigmoid include |x| > 20, where naive formulas overflow to NaN.
  tanh: {
    gpu: tanh,
    f: Math.tanh,
    data: (n, s) => withExtremes(normal(n, s, 3), [21, -21, 35, -35, 90, -90, 1e4, 1e-3, -2e-5, 3e-9]),
  },
  sigmoid: {
    gpu: sigmoid,
    f: sigmoid64,
    data: (n, s) => withExtremes(normal(n, s, 4), [25, -25, 80, -80, -1e4, 1e4]),
  },
  silu: {
    gpu: silu,
    f: (x) => x * sigmoid64(x),
    data: (n, s) => withExtremes(normal(n, s, 4), [30, -30, 80, -80, 1e-3, -2e-5, 3e-9]),
  },
  relu: { gpu: relu, f: (x) => Math.max(x, 0), data: (n, s) => awayFromZero(n, s, 1e-3, 3), relToMax: true },
  gelu: {
    gpu: gelu,
    f: gelu64,
    data: (n, s) => withExtremes(normal(n, s, 3), [-6, 6, -10, 10, -12, 1e-3, -2e-5, 3e-9]),
  },
  abs: { gpu: abs, f: Math.abs, data: (n, s) => awayFromZero(n, s, 1e-3, 3) },
  square: { gpu: square, f: (x) => x * x, data: (n, s) => normal(n, s) },
};

for (const [op, def] of Object.entries(UNARY)) {
  Deno.test(`${op}: forward and gradient on [33, 65] and on a transposed [13, 7] input`, async () => {
    const s = freshSeed();
    await checkOp(
      `${op} [33,65] seed ${s}`,
      [spec([33, 65], def.data(33 * 65, s))],
      ([x]) => def.gpu(x),
      ([x]) => map(x, def.f),
      // atol 1e-30 only forgives results in f32's subnormal range (e.g. sigmoid(−80) ≈ 1.8e−35 is normal, kept).
      { relToMax: def.relToMax, atol: 1e-30 },
    );
    await checkOp(
      `${op} [7,13]ᵀ seed ${s}`,
      [spec([7, 13], def.data(91, s + 1))],
      ([x]) => def.gpu(x.transpose()),
      ([x]) => map(transposeArr(x, 0, 1), def.f),
      { relToMax: def.relToMax, atol: 1e-30 },
    );
  });
}

Deno.test("tanh, sigmoid, silu, gelu: exact limits far out (no NaN or overflow)", async () => {
  await scope(async () => {
    const x = tensor([-1e4, -90, -25, 25, 90, 1e4]);
    assertEquals(Array.from(await x.tanh().toArray()), [-1, -1, -1, 1, 1, 1]);
    const sg = await x.sigmoid().toArray();
    assertEquals(Array.from(sg.slice(3)), [1, 1, 1]);
    assert(sg.slice(0, 3).every((v) => v >= 0 && v < 1e-10), `sigmoid of large negatives: ${sg}`);
    const si = await x.silu().toArray();
    assertEquals(Array.from(si.slice(3)), [25, 90, 1e4]);
    assert(si.slice(0, 3).every((v) => v <= 0 && v > -1e-6), `silu of large negatives: ${si}`);
    const ge = await x.gelu().toArray();
    assertEquals(Array.from(ge.slice(3)), [25, 90, 1e4]);
    assert(ge.slice(0, 3).every((v) => v <= 0 && v > -1e-6), `gelu of large negatives: ${ge}`);
  });
});

Deno.test("pow: integer and fractional exponents, negative bases with integer exponents", async () => {
  const cases: [number, (n: number, s: number) => Float32Array][] = [
    [2, (n, s) => normal(n, s)],
    [3, (n, s) => awayFromZero(n, s, 0.3, 2)],
    [-1, (n, s) => awayFromZero(n, s, 0.3, 2)],
    [-2, (n, s) => awayFromZero(n, s, 0.3, 2)],
    [4, (n, s) => awayFromZero(n, s, 0.3, 1.5)],
    [0.5, (n, s) => awayFromZero(n, s, 0.1, 4, true)],
    [1.7, (n, s) => awayFromZero(n, s, 0.1, 4, true)],
    [-0.5, (n, s) => awayFromZero(n, s, 0.1, 4, true)],
    [0, (n, s) => awayFromZero(n, s, 0.3, 2)],
    [1, (n, s) => normal(n, s)],
  ];
  for (const [e, data] of cases) {
    const s = freshSeed();
    await checkOp(
      `pow(x, ${e}) seed ${s}`,
      [spec([7, 13], data(91, s))],
      ([x]) => x.pow(e),
      ([x]) => map(x, (v) => Math.pow(v, e)),
      // x^1 passes signs through (values near zero); the others are checked elementwise.
      { relToMax: e === 1 },
    );
  }
  await scope(async () => {
    // A negative base with a fractional exponent is NaN, as in PyTorch.
    const y = await tensor([-2, 4]).pow(0.5).toArray();
    assert(Number.isNaN(y[0]) && y[1] === 2, `pow(-2, 0.5), pow(4, 0.5) = ${y}`);
  });
});

// ---- reductions ------------------------------------------------------------------------------------------------

const AXES: (number | number[] | undefined)[] = [undefined, 0, 1, 2, -1, [0, 1], [1, 2], [0, 2], [2, 0], [0, 1, 2]];

for (const op of ["sum", "mean", "max"] as const) {
  Deno.test(`${op}: every axis, several axes, all axes, keepdim true/false, contiguous and permuted inputs`, async () => {
    const gpu = (x: Tensor, axis: number | number[] | undefined, keep: boolean) =>
      op === "sum" ? x.sum(axis, keep) : op === "mean" ? x.mean(axis, keep) : x.max(axis, keep);
    for (const axis of AXES) {
      for (const keep of [false, true]) {
        const s = freshSeed();
        // Distinct values keep max differentiable (no ties within 1e-6 of each other).
        await checkOp(
          `${op}(axis ${JSON.stringify(axis)}, keepdim ${keep}) [3,5,7] seed ${s}`,
          [spec([3, 5, 7], distinct(105, s))],
          ([x]) => gpu(x, axis, keep),
          ([x]) => reduceArr(x, axis, keep, op),
          { relToMax: op !== "max" },
        );
      }
      // The same reduction of a non-contiguous input: [7,5,3] permuted to [3,5,7].
      const s = freshSeed();
      await checkOp(
        `${op}(axis ${JSON.stringify(axis)}) of a permuted [7,5,3] seed ${s}`,
        [spec([7, 5, 3], distinct(105, s))],
        ([x]) => gpu(x.permute(2, 1, 0), axis, false),
        ([x]) => reduceArr(permuteArr(x, [2, 1, 0]), axis, false, op),
        { relToMax: op !== "max" },
      );
    }
    // Rows longer than one 256-thread workgroup, and long columns.
    for (const [shape, axis] of [[[33, 65], 0], [[33, 65], 1], [[3, 300], -1], [[300, 3], 0]] as const) {
      const s = freshSeed();
      await checkOp(
        `${op}(axis ${axis}) ${JSON.stringify(shape)} seed ${s}`,
        [spec([...shape], distinct(numel(shape), s, 0.01))],
        ([x]) => gpu(x, axis, false),
        ([x]) => reduceArr(x, axis, false, op),
        { relToMax: op !== "max" },
      );
    }
  });
}

Deno.test("max: tied maxima share the gradient equally; sum of a sliced view", async () => {
  await scope(async () => {
    const x = tensor([[1, 3, 3], [2, 2, 2]], undefined, { requiresGrad: true });
    x.max(1).backward(tensor([6, 6]));
    assertEquals(Array.from(await x.grad!.toArray()), [0, 3, 3, 2, 2, 2]);
    // Fully masked rows: the max of −∞ is −∞ (not −3.4e38), along rows and along columns.
    const m = tensor([[-Infinity, -Infinity], [-Infinity, 1]]);
    assertEquals(Array.from(await m.max(1).toArray()), [-Infinity, 1]);
    assertEquals(Array.from(await m.max(0).toArray()), [-Infinity, 1]);
  });
  const s = freshSeed();
  await checkOp(
    `sum(axis 0) of x[:, 2:-3] seed ${s}`,
    [spec([7, 13], normal(91, s))],
    ([x]) => x.slice(1, 2, -3).sum(0),
    ([x]) => reduceArr(sliceArr(x, 1, 2, 10), 0, false, "sum"),
    { relToMax: true },
  );
});

Deno.test("reductions: out-of-range axes are rejected with the rank", () => {
  scope(() => {
    const x = tensor(new Float32Array(6), [2, 3]);
    assertThrows(() => x.sum(2), Error, "axis 2 is out of range for a tensor with 2 dimensions");
    assertThrows(() => x.max(-3), Error, "out of range");
  });
});

// ---- softmax ---------------------------------------------------------------------------------------------------

for (const logOut of [false, true]) {
  const name = logOut ? "logSoftmax" : "softmax";
  Deno.test(`${name}: last axis and other axes, long rows, large logits`, async () => {
    const f = (x: Tensor, axis: number) => (logOut ? x.logSoftmax(axis) : x.softmax(axis));
    const cases: [number[], number, (n: number, s: number) => Float32Array][] = [
      [[7, 13], -1, (n, s) => normal(n, s, 2)],
      [[7, 13], 0, (n, s) => normal(n, s, 2)],
      [[3, 5, 7], 1, (n, s) => normal(n, s, 2)],
      [[33, 65], 1, (n, s) => normal(n, s, 3)],
      [[3, 300], -1, (n, s) => normal(n, s, 2)],
      // Logits around ±1000: exp would overflow without the max subtraction.
      [[7, 13], -1, (n, s) => normal(n, s, 2).map((v, i) => v + (i % 2 ? 1000 : -1000))],
      [[7, 13], 0, (n, s) => normal(n, s, 2).map((v) => v + 1000)],
    ];
    for (const [shape, axis, data] of cases) {
      const s = freshSeed();
      await checkOp(
        `${name}(axis ${axis}) ${JSON.stringify(shape)} seed ${s}`,
        [spec(shape, data(numel(shape), s))],
        ([x]) => f(x, axis),
        ([x]) => softmaxArr(x, axis, logOut),
        // Softmax probabilities underflow towards 0 for very negative logits; log-softmax values cross no zero
        // but can be tiny next to the largest; both are checked relative to the largest magnitude.
        { relToMax: true },
      );
    }
  });
}

Deno.test("softmax: a row of ±1000 logits gives exact probabilities, no NaN", async () => {
  await scope(async () => {
    const p = await tensor([[1000, 1000, -1000], [0, 0, 0]]).softmax().toArray();
    assertClose(p, [0.5, 0.5, 0, 1 / 3, 1 / 3, 1 / 3], { rtol: 1e-6, label: "softmax extremes" });
    const lp = await tensor([[1000, 1000, -1000]]).logSoftmax().toArray();
    assertClose(lp, [-Math.LN2, -Math.LN2, -2000 - Math.LN2], { rtol: 1e-6, label: "logSoftmax extremes" });
  });
});

// ---- where, comparisons, casts --------------------------------------------------------------------------------

Deno.test("where: tensor and number branches, broadcasting cond; gradients to tensor branches only", async () => {
  const s = freshSeed();
  const mask = (n: number, seed: number) => Float32Array.from({ length: n }, (_, i) => (rng(seed + i)() < 0.5 ? 1 : 0));
  const sel = (c: number, x: number, y: number) => (c !== 0 ? x : y);
  const cases: {
    label: string;
    shapes: [number[], number[] | number, number[] | number];
  }[] = [
    { label: "tensor/tensor", shapes: [[7, 13], [7, 13], [7, 13]] },
    { label: "tensor/number", shapes: [[7, 13], [7, 13], -0.5] },
    { label: "number/tensor", shapes: [[7, 13], 2, [7, 13]] },
    { label: "cond [7,1], a [7,13], b [13]", shapes: [[7, 1], [7, 13], [13]] },
    { label: "cond [13], a [7,1], b number", shapes: [[13], [7, 1], 3] },
  ];
  for (const [k, c] of cases.entries()) {
    const [cs, as, bs] = c.shapes;
    const inputs: InputSpec[] = [{ shape: cs, data: mask(numel(cs), s + 10 * k), dtype: "u32" }];
    if (Array.isArray(as)) inputs.push(spec(as, normal(numel(as), s + 10 * k + 1)));
    if (Array.isArray(bs)) inputs.push(spec(bs, normal(numel(bs), s + 10 * k + 2)));
    await checkOp(
      `where ${c.label} seed ${s}`,
      inputs,
      (ts) => {
        const a = Array.isArray(as) ? ts[1] : as;
        const b = Array.isArray(bs) ? ts[ts.length - 1] : bs;
        return where(ts[0], a, b);
      },
      (xs) => {
        const a: Arr = Array.isArray(as) ? xs[1] : { shape: [], data: Float64Array.of(as) };
        const b: Arr = Array.isArray(bs) ? xs[xs.length - 1] : { shape: [], data: Float64Array.of(bs) };
        const shape = broadcastShape(broadcastShape(xs[0].shape, a.shape), b.shape);
        const cc = expandTo(xs[0], shape).data, aa = expandTo(a, shape).data, bb = expandTo(b, shape).data;
        return { shape, data: cc.map((v, i) => sel(v, aa[i], bb[i])) };
      },
      { relToMax: true },
    );
  }
  await scope(async () => {
    const y = where(tensor([1, 0, 1], undefined, { dtype: "u32" }), 1, 2);
    assertEquals(Array.from(await y.toArray()), [1, 2, 1]);
    assertEquals(y.node, null);
  });
});

Deno.test("comparisons eq/ne/lt/le/gt/ge: u32 0/1 masks, tensor and number operands, broadcasting, ties", async () => {
  const s = freshSeed();
  const r = rng(s);
  // Small integers (as floats) so ties are frequent.
  const a = Float32Array.from({ length: 91 }, () => Math.floor(r() * 5) - 2);
  const b = Float32Array.from({ length: 13 }, () => Math.floor(r() * 5) - 2);
  const ops = { eq, ne, lt, le, gt, ge };
  const f: Record<string, (x: number, y: number) => boolean> = {
    eq: (x, y) => x === y,
    ne: (x, y) => x !== y,
    lt: (x, y) => x < y,
    le: (x, y) => x <= y,
    gt: (x, y) => x > y,
    ge: (x, y) => x >= y,
  };
  await scope(async () => {
    const ta = tensor(a, [7, 13]), tb = tensor(b, [13]);
    const ia = cast(ta, "i32");
    for (const [name, op] of Object.entries(ops)) {
      const m = op(ta, tb);
      assertEquals(m.dtype, "u32", `${name} dtype`);
      assertEquals([...m.shape], [7, 13]);
      const want = Array.from(a, (v, i) => (f[name](v, b[i % 13]) ? 1 : 0));
      assertEquals(Array.from(await m.toArray()), want, `${name} tensor (seed ${s})`);
      const ms = op(ta, 0);
      assertEquals(Array.from(await ms.toArray()), Array.from(a, (v) => (f[name](v, 0) ? 1 : 0)), `${name} number`);
      const mi = op(ia, 1);
      assertEquals(Array.from(await mi.toArray()), Array.from(a, (v) => (f[name](v, 1) ? 1 : 0)), `${name} i32`);
    }
  });
});

Deno.test("cast: f32→f16 rounds like roundToF16 (odd sizes); f16→f32 exact; float↔int; gradients", async () => {
  const s = freshSeed();
  const r = rng(s);
  // Values across the f16 range: normal numbers, subnormals (|x| < 6.1e-5), and values at the f16 spacing limits.
  const x = Float32Array.from({ length: 7 * 13 }, (_, i) => {
    const scale = [1e-6, 1e-3, 1, 30, 3000, 60000][i % 6];
    return (r() * 2 - 1) * scale;
  });
  await scope(async () => {
    const t = tensor(x, [7, 13]);
    const h = t.to("f16");
    assertEquals(h.dtype, "f16");
    assertEquals(Array.from(await h.toArray()), Array.from(x, roundToF16), `f32→f16 (seed ${s})`);
    // f16 → f32 is exact: upload f16 bits, widen on the GPU.
    const bits = f32ArrayToF16(x);
    const h2 = tensor(bits, [7, 13], { dtype: "f16" });
    const w = h2.to("f32");
    assertEquals(w.dtype, "f32");
    assertEquals(Array.from(await w.toArray()), Array.from(x, roundToF16), "f16→f32");
    // Beyond the f16 range the cast saturates at ±65504 (documented in kernels/common.ts PACK_F16).
    assertEquals(Array.from(await tensor([1e6, -1e6, 65519]).to("f16").toArray()), [65504, -65504, 65504]);
    // float → int truncates toward zero; int → float is exact (|v| < 2^24).
    const xi = Float32Array.from({ length: 91 }, () => (r() * 2 - 1) * 1000);
    const ti = tensor(xi, [7, 13]).to("i32");
    assertEquals(ti.dtype, "i32");
    assertEquals(Array.from(await ti.toArray()), Array.from(xi, (v) => Math.trunc(v) | 0));
    assertEquals(Array.from(await ti.to("f32").toArray()), Array.from(xi, (v) => Math.trunc(v) | 0));
    const tu = tensor(xi.map(Math.abs), [7, 13]).to("u32");
    assertEquals(tu.dtype, "u32");
    assertEquals(Array.from(await tu.toArray()), Array.from(xi, (v) => Math.trunc(Math.abs(v)) | 0));
    assertEquals(Array.from(await h.to("i32").toArray()), Array.from(x, (v) => Math.trunc(roundToF16(v)) | 0));
    const big = tensor([3_000_000_000, 7], undefined, { dtype: "u32" });
    assertEquals(Array.from(await big.to("f32").toArray()), [3_000_000_000, 7]);
    assertEquals(Array.from(await tensor([-5, 16_000_000], undefined, { dtype: "i32" }).to("f16").toArray()), [
      -5,
      65504,
    ]);
  });
  // Gradients: f32 → f16 passes the f16 gradient back widened; f16 → f32 passes it back rounded to f16.
  await scope(async () => {
    const g = Float32Array.from(normal(91, s + 1));
    const a = tensor(x, [7, 13], { requiresGrad: true });
    a.to("f16").backward(tensor(f32ArrayToF16(g), [7, 13], { dtype: "f16" }));
    assertEquals(a.grad!.dtype, "f32");
    assertEquals(Array.from(await a.grad!.toArray()), Array.from(g, roundToF16));
    const b = tensor(f32ArrayToF16(x), [7, 13], { dtype: "f16", requiresGrad: true });
    b.to("f32").mul(2).backward(tensor(g, [7, 13]));
    assertEquals(b.grad!.dtype, "f16");
    assertEquals(Array.from(await b.grad!.toArray()), Array.from(g, (v) => roundToF16(Math.fround(v * 2))));
    // Casts to integers leave the graph.
    assertEquals(a.to("i32").node, null);
  });
});

Deno.test("f16 arithmetic: results stay f16, computed in f32 and rounded once", async () => {
  const s = freshSeed();
  const a = Float32Array.from(normal(91, s), roundToF16);
  const b = Float32Array.from(normal(13, s + 1), roundToF16);
  await scope(async () => {
    const ta = tensor(f32ArrayToF16(a), [7, 13], { dtype: "f16" });
    const tb = tensor(f32ArrayToF16(b), [13], { dtype: "f16" });
    const y = ta.mul(tb).add(1);
    assertEquals(y.dtype, "f16");
    const want = Array.from(a, (v, i) => roundToF16(Math.fround(roundToF16(v * b[i % 13]) + 1)));
    assertEquals(Array.from(await y.toArray()), want, `f16 a·b + 1 (seed ${s})`);
    const sm = ta.softmax();
    assertEquals(sm.dtype, "f16");
    const ref = softmaxArr({ shape: [7, 13], data: Float64Array.from(a) }, -1, false).data;
    assertClose(await sm.toArray(), ref, { rtol: 1e-3, atol: 1e-4, label: "f16 softmax" });
    const sum = ta.sum(1);
    assertEquals(sum.dtype, "f16");
    const rs = reduceArr({ shape: [7, 13], data: Float64Array.from(a) }, 1, false, "sum").data;
    assertClose(await sum.toArray(), rs, { rtol: 1e-3, atol: 1e-6, label: "f16 sum (half an f16 ulp)" });
  });
});

// ---- shape ops -------------------------------------------------------------------------------------------------

Deno.test("reshape (with -1, of contiguous and transposed inputs) and view: values and gradients", async () => {
  const s = freshSeed();
  await checkOp(
    `reshape [7,13]→[13,-1] seed ${s}`,
    [spec([7, 13], normal(91, s))],
    ([x]) => x.reshape(13, -1).mul(1),
    ([x]) => ({ shape: [13, 7], data: x.data }),
    { relToMax: true },
  );
  await checkOp(
    `reshape of a transposed [7,13] to [-1] seed ${s}`,
    [spec([7, 13], normal(91, s + 1))],
    ([x]) => x.transpose().reshape(-1),
    ([x]) => ({ shape: [91], data: transposeArr(x, 0, 1).data }),
    { relToMax: true },
  );
  await checkOp(
    `view [3,5,7]→[15,7]→[7,15]ᵀ seed ${s}`,
    [spec([3, 5, 7], normal(105, s + 2))],
    ([x]) => x.view(15, 7).transpose(),
    ([x]) => transposeArr({ shape: [15, 7], data: x.data }, 0, 1),
    { relToMax: true },
  );
  scope(() => {
    const x = tensor(new Float32Array(91), [7, 13]);
    assertThrows(() => x.transpose().view(91), Error, "not contiguous");
    assertThrows(() => x.transpose().view(91), Error, "[13, 7]");
    assertThrows(() => x.reshape(9, 10), Error, "cannot reshape a tensor of shape [7, 13] (91 elements) into [9, 10]");
    assertThrows(() => x.reshape(-1, -1), Error, "only one size may be -1");
    assertThrows(() => x.reshape(2, -1), Error, "[2, -1]");
  });
});

Deno.test("permute, transpose, contiguous, squeeze, unsqueeze: values and gradients", async () => {
  const s = freshSeed();
  await checkOp(
    `permute [3,5,7]→(2,0,1) seed ${s}`,
    [spec([3, 5, 7], normal(105, s))],
    ([x]) => x.permute(2, 0, 1),
    ([x]) => permuteArr(x, [2, 0, 1]),
    { relToMax: true },
  );
  await checkOp(
    `transpose(0, 2).contiguous() [3,5,7] seed ${s}`,
    [spec([3, 5, 7], normal(105, s + 1))],
    ([x]) => x.transpose(0, 2).contiguous(),
    ([x]) => transposeArr(x, 0, 2),
    { relToMax: true },
  );
  await checkOp(
    `unsqueeze(1).squeeze(0) / unsqueeze(-1) [1,7,13] seed ${s}`,
    [spec([1, 7, 13], normal(91, s + 2))],
    ([x]) => x.unsqueeze(1).squeeze(0).unsqueeze(-1).mul(x.squeeze(0).unsqueeze(0).unsqueeze(-1)),
    ([x]) => ({ shape: [1, 7, 13, 1], data: x.data.map((v) => v * v) }),
    { relToMax: true },
  );
  scope(() => {
    const x = tensor(new Float32Array(91), [7, 13]);
    assertThrows(() => x.squeeze(0), Error, "dimension 0 of [7, 13] has size 7, not 1");
    assertThrows(() => x.permute(0, 0), Error, "repeated dimension");
    assertThrows(() => x.permute(0), Error, "for a tensor of shape [7, 13]");
    assertThrows(() => x.transpose(0, 2), Error, "dimension 2 is out of range");
  });
});

Deno.test("slice: positive and negative indices, slices of slices; backward pads with zeros", async () => {
  const cases: [number, number, number | undefined][] = [
    [0, 2, 5],
    [1, -5, -1],
    [1, 3, undefined],
    [0, -1, undefined],
    [-1, 0, 1],
  ];
  for (const [dim, start, end] of cases) {
    const s = freshSeed();
    const size = [7, 13][dim < 0 ? dim + 2 : dim];
    const st = start < 0 ? start + size : start;
    const en = end === undefined ? size : end < 0 ? end + size : end;
    await checkOp(
      `slice(${dim}, ${start}, ${end}) [7,13] seed ${s}`,
      [spec([7, 13], normal(91, s))],
      ([x]) => x.slice(dim, start, end),
      ([x]) => sliceArr(x, dim < 0 ? dim + 2 : dim, st, en),
      { relToMax: true },
    );
  }
  const s = freshSeed();
  await checkOp(
    `x[1:-1, :][:, 2:9]ᵀ[1:4] of [7,13] seed ${s}`,
    [spec([7, 13], normal(91, s))],
    ([x]) => x.slice(0, 1, -1).slice(1, 2, 9).transpose().slice(0, 1, 4),
    ([x]) => sliceArr(transposeArr(sliceArr(sliceArr(x, 0, 1, 6), 1, 2, 9), 0, 1), 0, 1, 4),
    { relToMax: true },
  );
  scope(() => {
    const x = tensor(new Float32Array(91), [7, 13]);
    assertThrows(() => x.slice(0, 3, 9), Error, "out of bounds for dimension 0 of size 7");
    assertThrows(() => x.slice(1, -20), Error, "out of bounds");
  });
});

Deno.test("expand: size-1 and new leading dimensions, -1; backward sums over the broadcast", async () => {
  const s = freshSeed();
  await checkOp(
    `expand [7,1]→[7,13] seed ${s}`,
    [spec([7, 1], normal(7, s))],
    ([x]) => x.expand(7, 13),
    ([x]) => expandTo(x, [7, 13]),
    { relToMax: true },
  );
  await checkOp(
    `expand [13]→[3,7,13] via -1 seed ${s}`,
    [spec([13], normal(13, s + 1))],
    ([x]) => x.expand(3, 7, -1),
    ([x]) => expandTo(x, [3, 7, 13]),
    { relToMax: true },
  );
  await checkOp(
    `expand [3,1,5]→[3,4,5] then mul by itself seed ${s}`,
    [spec([3, 1, 5], normal(15, s + 2))],
    ([x]) => x.expand(3, 4, 5).mul(x),
    ([x]) => {
      const e = expandTo(x, [3, 4, 5]);
      return zip(e, x, (a, b) => a * b);
    },
    { relToMax: true },
  );
  scope(() => {
    const x = tensor(new Float32Array(14), [7, 2]);
    assertThrows(() => x.expand(7, 13), Error, "cannot expand [7, 2] to [7, 13]");
    assertThrows(() => x.expand(2), Error, "fewer dimensions");
    assertThrows(() => x.expand(-1, 7, 2), Error, "cannot expand [7, 2] to [-1, 7, 2]");
  });
});

Deno.test("cat: along every axis, negative dim, non-contiguous inputs; gradients to each input", async () => {
  const cases: [number[][], number][] = [
    [[[2, 5, 7], [3, 5, 7], [1, 5, 7]], 0],
    [[[3, 5, 7], [3, 2, 7]], 1],
    [[[3, 5, 7], [3, 5, 4], [3, 5, 1]], 2],
    [[[3, 5, 7], [3, 5, 4]], -1],
  ];
  for (const [shapes, dim] of cases) {
    const s = freshSeed();
    const d = dim < 0 ? dim + 3 : dim;
    await checkOp(
      `cat(${JSON.stringify(shapes)}, ${dim}) seed ${s}`,
      shapes.map((sh, i) => spec(sh, normal(numel(sh), s + i))),
      (ts) => cat(ts, dim),
      (xs) => catArr(xs, d),
      { relToMax: true },
    );
  }
  const s = freshSeed();
  await checkOp(
    `cat([aᵀ, b], 0) with a [13,7] seed ${s}`,
    [spec([13, 7], normal(91, s)), spec([4, 13], normal(52, s + 1))],
    ([a, b]) => cat([a.transpose(), b], 0),
    ([a, b]) => catArr([transposeArr(a, 0, 1), b], 0),
    { relToMax: true },
  );
  scope(() => {
    const a = tensor(new Float32Array(6), [2, 3]), b = tensor(new Float32Array(8), [2, 4]);
    assertThrows(() => cat([a, b], 0), Error, "[2, 3] f32, [2, 4] f32");
    assertThrows(() => cat([], 0), Error, "at least one tensor");
  });
});

Deno.test("cat: f16 and integer tensors of odd sizes along each axis are exact (packed f16 words)", async () => {
  const s = freshSeed();
  const shapes: [number[], number[], number][] = [
    [[3, 5], [2, 5], 0],
    [[3, 5], [3, 3], 1],
    [[1, 1], [1, 2], 1],
    [[3, 1, 3], [3, 2, 3], 1],
    [[3, 3, 1], [3, 3, 3], 2],
  ];
  for (const [sa, sb, dim] of shapes) {
    const a = Float32Array.from(normal(numel(sa), s), roundToF16);
    const b = Float32Array.from(normal(numel(sb), s + 1), roundToF16);
    const want = catArr([{ shape: sa, data: Float64Array.from(a) }, { shape: sb, data: Float64Array.from(b) }], dim);
    await scope(async () => {
      const ha = tensor(f32ArrayToF16(a), sa, { dtype: "f16" });
      const hb = tensor(f32ArrayToF16(b), sb, { dtype: "f16" });
      // Three inputs, the middle one a strided view, so writes start on both halves of packed words.
      const y = cat([ha, hb, ha.transpose(0, -1).contiguous().transpose(0, -1)], dim);
      assertEquals(y.dtype, "f16");
      const want3 = catArr([want, { shape: sa, data: Float64Array.from(a) }], dim);
      assertEquals(Array.from(await y.toArray()), Array.from(want3.data), `f16 cat ${sa}+${sb}+${sa} dim ${dim}`);
      const ia = tensor(Array.from(a, (v) => Math.round(v * 100) | 0), sa, { dtype: "i32" });
      const ib = tensor(Array.from(b, (v) => Math.round(v * 100) | 0), sb, { dtype: "i32" });
      assertEquals(
        Array.from(await cat([ia, ib], dim).toArray()),
        Array.from(want.data, (v) => Math.round(v * 100) | 0),
        `i32 cat dim ${dim}`,
      );
    });
  }
  // Gradient of an f16 cat: slices of the f16 gradient, each input's grad in f16.
  await scope(async () => {
    const a = tensor(f32ArrayToF16(Float32Array.of(1, 2, 3)), [3], { dtype: "f16", requiresGrad: true });
    const b = tensor(f32ArrayToF16(Float32Array.of(4, 5)), [2], { dtype: "f16", requiresGrad: true });
    cat([a, b]).backward(tensor(f32ArrayToF16(Float32Array.of(0.5, 1.5, 2.5, 3.5, 4.5)), [5], { dtype: "f16" }));
    assertEquals(Array.from(await a.grad!.toArray()), [0.5, 1.5, 2.5]);
    assertEquals(Array.from(await b.grad!.toArray()), [3.5, 4.5]);
  });
});

Deno.test("slice backward of an f16 tensor pads with exact zeros at odd offsets", async () => {
  await scope(async () => {
    const x = tensor(f32ArrayToF16(Float32Array.from({ length: 9 }, (_, i) => i)), [9], {
      dtype: "f16",
      requiresGrad: true,
    });
    x.slice(0, 3, 6).backward(tensor(f32ArrayToF16(Float32Array.of(1, 2, 3)), [3], { dtype: "f16" }));
    assertEquals(x.grad!.dtype, "f16");
    assertEquals(Array.from(await x.grad!.toArray()), [0, 0, 0, 1, 2, 3, 0, 0, 0]);
  });
});

// ---- matmul (light: the matmul suite tests it fully) -----------------------------------------------------------

Deno.test("matmul through the public API: forward and both gradients on odd sizes", async () => {
  const s = freshSeed();
  await checkOp(
    `matmul [7,13]·[13,5] seed ${s}`,
    [spec([7, 13], normal(91, s)), spec([13, 5], normal(65, s + 1))],
    ([a, b]) => a.matmul(b),
    ([a, b]) => {
      const out = new Float64Array(35);
      for (let i = 0; i < 7; i++) {
        for (let j = 0; j < 5; j++) {
          for (let k = 0; k < 13; k++) out[i * 5 + j] += a.data[i * 13 + k] * b.data[k * 5 + j];
        }
      }
      return { shape: [7, 5], data: out };
    },
    { relToMax: true },
  );
});

Deno.test("sum/max/mean of a long single row split over several workgroups equal the float64 reference", async () => {
  const { fromArray } = await import("../mod.ts");
  const { randomArray, assertClose } = await import("./helpers.ts");
  const n = 200_003;
  const data = randomArray(n, 11);
  let s = 0, m = -Infinity;
  for (const v of data) {
    s += v;
    m = Math.max(m, v);
  }
  const x = fromArray(data, [n]);
  assertClose([await x.sum().item()], [s], { atol: 1e-3 * Math.sqrt(n) * 1e-3, rtol: 1e-4 });
  assertClose([await x.mean().item()], [s / n], { atol: 1e-6, rtol: 1e-4 });
  assertClose([await x.max().item()], [m], { rtol: 0 });
  const two = fromArray(data.subarray(0, 2 * 100_001), [2, 100_001]);
  const rows = await two.sum(1).toArray();
  let r0 = 0, r1 = 0;
  for (let i = 0; i < 100_001; i++) {
    r0 += data[i];
    r1 += data[100_001 + i];
  }
  assertClose(rows, [r0, r1], { atol: 1e-3, rtol: 1e-4 });
  for (const t of [x, two]) t.dispose();
});
