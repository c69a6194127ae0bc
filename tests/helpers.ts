/**
 * Test utilities: GPU set-up, seeded random inputs, float64 CPU references, closeness checks that report the
 * worst element, and central-difference numerical gradients.
 *
 * @example
 * ```ts
 * import { assertClose, randomArray, setup } from "./helpers.ts";
 * await setup();
 * const x = randomArray(7 * 13, 1);
 * ```
 * @module
 */
import { assertLess } from "@std/assert";
import { init } from "../mod.ts";
import { env } from "../core/platform.ts";

/** Initialises the GPU once (top-level `await setup()` in each test file). */
export async function setup(): Promise<void> {
  await init();
}

/** The shared-data root when available (CI sets it), else undefined: tests that need it skip. */
export const SHARED: string | undefined = env("WEBTUNE_SHARED");

/** A seeded PRNG (mulberry32) for test inputs; different seeds per test keep inputs fresh but reproducible. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A fresh seed per call (tests draw new inputs each run; the seed is printed on failure by assertClose's label). */
export function freshSeed(): number {
  return (Math.random() * 2 ** 31) | 0;
}

/** `n` samples from N(0, scale²) (Box–Muller) as a Float32Array. */
export function randomArray(n: number, seed: number, scale = 1): Float32Array {
  const r = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const u1 = r() || 1e-12;
    out[i] = Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * r()) * scale;
  }
  return out;
}

/** Largest |a−e| / (atol + |e|·1) style report: returns { maxAbs, maxRel, at }. */
export function compare(actual: ArrayLike<number>, expected: ArrayLike<number>): {
  maxAbs: number;
  maxRel: number;
  at: number;
} {
  if (actual.length !== expected.length) throw new Error(`length ${actual.length} ≠ expected ${expected.length}`);
  let maxAbs = 0, maxRel = 0, at = -1;
  for (let i = 0; i < actual.length; i++) {
    const d = Math.abs(actual[i] - expected[i]);
    if (!(d <= maxAbs) || Number.isNaN(actual[i])) {
      maxAbs = Number.isNaN(actual[i]) ? Infinity : d;
      at = i;
    }
    const r = d / Math.max(Math.abs(expected[i]), 1e-30);
    if (r > maxRel) maxRel = r;
  }
  return { maxAbs, maxRel, at };
}

/**
 * Asserts `|actual − expected| ≤ atol + rtol·|expected|` elementwise, or, when `relToMax` is set,
 * `|actual − expected| ≤ rtol · max|expected|` (relative error against the tensor's scale, which is the meaningful
 * measure where some expected values are near zero). The message names the worst element.
 */
export function assertClose(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  opts: { rtol?: number; atol?: number; relToMax?: boolean; label?: string } = {},
): void {
  const rtol = opts.rtol ?? 1e-4;
  const atol = opts.atol ?? 0;
  if (actual.length !== expected.length) {
    throw new Error(`${opts.label ?? "assertClose"}: length ${actual.length} ≠ expected ${expected.length}`);
  }
  let scale = 0;
  for (let i = 0; i < expected.length; i++) scale = Math.max(scale, Math.abs(expected[i]));
  let worst = -1, worstExcess = 0;
  for (let i = 0; i < actual.length; i++) {
    const d = Math.abs(actual[i] - expected[i]);
    const tol = opts.relToMax ? rtol * scale + atol : atol + rtol * Math.abs(expected[i]);
    if (!(d <= tol)) {
      const excess = Number.isNaN(d) ? Infinity : d / Math.max(tol, 1e-300);
      if (excess > worstExcess || worst < 0) {
        worst = i;
        worstExcess = excess;
      }
    }
  }
  if (worst >= 0) {
    const { maxRel } = compare(actual, expected);
    throw new Error(
      `${opts.label ?? "assertClose"}: element ${worst} is ${actual[worst]}, expected ${expected[worst]} ` +
        `(rtol ${rtol}${opts.relToMax ? " of max|expected| " + scale.toExponential(3) : ""}, atol ${atol}; ` +
        `max elementwise rel err ${maxRel.toExponential(3)})`,
    );
  }
}

/**
 * Central-difference gradient of a float64 scalar function `f` at `x` (each coordinate perturbed by ±h).
 */
export function numericalGrad(f: (x: Float64Array) => number, x: Float64Array, h = 1e-6): Float64Array {
  const g = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const v = x[i];
    x[i] = v + h;
    const fp = f(x);
    x[i] = v - h;
    const fm = f(x);
    x[i] = v;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

/** Float64 row-major matmul reference: [m,k]·[k,n]. */
export function matmul64(a: ArrayLike<number>, b: ArrayLike<number>, m: number, k: number, n: number): Float64Array {
  const c = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let p = 0; p < k; p++) {
      const av = a[i * k + p];
      for (let j = 0; j < n; j++) c[i * n + j] += av * b[p * n + j];
    }
  }
  return c;
}

/** Normwise relative error max|a−b| / max|b| over the selected indices (how the fixtures' tolerances are stated). */
export function normwise(a: ArrayLike<number>, b: ArrayLike<number>, pick?: (i: number) => boolean): number {
  let num = 0, den = 0;
  for (let i = 0; i < b.length; i++) {
    if (pick && !pick(i)) continue;
    num = Math.max(num, Math.abs(a[i] - b[i]));
    den = Math.max(den, Math.abs(b[i]));
  }
  return num / den;
}

/**
 * A reference fixture (safetensors) read as a lookup: `get(key)` for a tensor, `rows(key)` for an I32 [B, T] tensor
 * as nested arrays (the form `LlamaForCausalLM.forward` takes).
 */
export async function loadFixture(path: string): Promise<{
  get: (key: string) => { shape: number[]; data: ArrayLike<number> };
  rows: (key: string) => number[][];
}> {
  const { loadSafetensors } = await import("../core/safetensors.ts");
  const ref = await loadSafetensors(path, { as: "native" });
  const get = (key: string) => {
    const t = ref.get(key);
    if (!t) throw new Error(`${path} has no tensor "${key}"`);
    return t as { shape: number[]; data: ArrayLike<number> };
  };
  const rows = (key: string): number[][] => {
    const t = get(key);
    const [B, T] = t.shape;
    const d = t.data as Int32Array;
    return Array.from({ length: B }, (_, b) => Array.from(d.subarray(b * T, (b + 1) * T)));
  };
  return { get, rows };
}

/**
 * Double-quantized absmax values against the exact ones, in the form that holds for every draw (see
 * tests/nf4_reference_test.ts): mean relative change < 0.25 %, 99th percentile < 1 %, and every value within half a
 * bin of the 8-bit map's top decade (0.9/64/2 ≈ 0.0071 of its 256-block's scale). The maximum relative change has no
 * hard bound (a small absmax in a block whose scale is set by a large one can move by over 1 % of itself).
 */
export function assertAbsmaxDoubleQuantized(
  rebuilt: ArrayLike<number>,
  exact: ArrayLike<number>,
  scale: ArrayLike<number>,
  context: string,
): void {
  const relative = Float64Array.from({ length: exact.length }, (_, i) => Math.abs(rebuilt[i] - exact[i]) / exact[i])
    .sort();
  const mean = relative.reduce((a, b) => a + b, 0) / relative.length;
  const p99 = relative[Math.floor(0.99 * relative.length)];
  const what = `${context}: mean ${mean}, 99th percentile ${p99}, max ${relative.at(-1)}`;
  assertLess(mean, 0.0025, what);
  assertLess(p99, 0.01, what);
  for (let i = 0; i < exact.length; i++) {
    const bound = 0.0071 * scale[Math.floor(i / 256)] + 2 ** -22 * exact[i];
    assertLess(Math.abs(rebuilt[i] - exact[i]), bound, `${what}, value ${i}`);
  }
}

const f32Scratch = new Float32Array(1);
const f32Bits = new Int32Array(f32Scratch.buffer);
/** The next f32 after `x` towards +∞ (`up`) or −∞ (for probing decision thresholds one ulp away). */
export function nextF32(x: number, up: boolean): number {
  f32Scratch[0] = x;
  if (x === 0) return up ? 1e-45 : -1e-45;
  f32Bits[0] += (x > 0) === up ? 1 : -1;
  return f32Scratch[0];
}
