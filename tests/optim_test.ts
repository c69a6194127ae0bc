// Tests for core/optim.ts (AdamW, SGD, clipGradNorm, scaleInPlace), core/schedule.ts (LR schedules and
// LRScheduler) and accumulateInto in core/backward.ts.
//
// The optimizers are checked against float64 CPU implementations of torch.optim.AdamW / torch.optim.SGD written
// here, for 20 steps on fresh random parameters and gradients of odd sizes. Schedule values were computed with the
// transformers formulas in Python (literal numbers below), including the boundary steps.

import { assert, assertAlmostEquals, assertEquals, assertNotEquals, assertThrows } from "@std/assert";
import { f16ArrayToF32, f32ArrayToF16, roundToF16 } from "../core/half.ts";
import { fromArray, getGpu, memoryStats, scope, type Tensor, tensor, zeros } from "../mod.ts";
import { accumulateInto } from "../core/backward.ts";
import { AdamW, clipCoefficient, clipGradNorm, scaleInPlace, SGD } from "../core/optim.ts";
import {
  constant,
  constantWithWarmup,
  cosineWithWarmup,
  linearWithWarmup,
  LRScheduler,
  warmupStepsFromRatio,
} from "../core/schedule.ts";
import { assertClose, freshSeed, randomArray, setup } from "./helpers.ts";

await setup();

// ---------------------------------------------------------------------------------------------------------------
// Float64 references
// ---------------------------------------------------------------------------------------------------------------

interface AdamRefState {
  p: Float64Array;
  m: Float64Array;
  v: Float64Array;
  step: number;
}

/** One step of torch.optim.AdamW (single-tensor path) in float64. */
function adamwRef(
  s: AdamRefState,
  g: ArrayLike<number>,
  h: { lr: number; b1: number; b2: number; eps: number; wd: number },
): void {
  s.step++;
  const bc1 = 1 - h.b1 ** s.step;
  const bc2 = 1 - h.b2 ** s.step;
  const stepSize = h.lr / bc1;
  const bc2Sqrt = Math.sqrt(bc2);
  for (let i = 0; i < s.p.length; i++) {
    s.p[i] *= 1 - h.lr * h.wd;
    s.m[i] += (1 - h.b1) * (g[i] - s.m[i]);
    s.v[i] = s.v[i] * h.b2 + (1 - h.b2) * g[i] * g[i];
    const denom = Math.sqrt(s.v[i]) / bc2Sqrt + h.eps;
    s.p[i] -= stepSize * (s.m[i] / denom);
  }
}

interface SgdRefState {
  p: Float64Array;
  buf: Float64Array | null;
}

/** One step of torch.optim.SGD in float64. */
function sgdRef(
  s: SgdRefState,
  g: ArrayLike<number>,
  h: { lr: number; momentum: number; dampening: number; wd: number; nesterov: boolean },
): void {
  const d = Float64Array.from(g, (x, i) => x + h.wd * s.p[i]);
  if (h.momentum !== 0) {
    if (!s.buf) s.buf = d.slice();
    else for (let i = 0; i < d.length; i++) s.buf[i] = h.momentum * s.buf[i] + (1 - h.dampening) * d[i];
    for (let i = 0; i < d.length; i++) d[i] = h.nesterov ? d[i] + h.momentum * s.buf[i] : s.buf[i];
  }
  for (let i = 0; i < d.length; i++) s.p[i] -= h.lr * d[i];
}

const numel = (shape: number[]) => shape.reduce((a, b) => a * b, 1);

/** Replaces `p.grad` with `data` (as f32, or f16 when asked). */
function setGrad(p: Tensor, data: Float32Array, dtype: "f32" | "f16" = "f32"): void {
  p.zeroGrad();
  p.grad = fromArray(data, p.shape, { dtype }).keep();
}

async function read(t: Tensor): Promise<Float32Array> {
  return new Float32Array(await t.toArray());
}

/** Drops each tensor's gradient and frees it. */
function release(...ts: Tensor[]): void {
  for (const t of ts) {
    t.zeroGrad();
    t.dispose();
  }
}

/** A test that must also leave live GPU memory as it found it (optimizer state freed by dispose(), no leaks). */
function test(name: string, fn: () => void | Promise<void>): void {
  Deno.test(name, async () => {
    const before = memoryStats().liveBytes;
    await fn();
    assertEquals(memoryStats().liveBytes, before, "live GPU bytes after the test");
  });
}

// ---------------------------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------------------------

test("AdamW matches a float64 torch.optim.AdamW for 20 steps (weight decay, changing lr, f16 grad, skips)", async () => {
  const seed = freshSeed();
  const shapes = [[7, 13], [33], [3, 5, 7], [1], [5, 3]];
  const gradDtypes: ("f32" | "f16" | null)[] = ["f32", "f32", "f32", "f32", "f16"];
  const params = shapes.map((s, i) => fromArray(randomArray(numel(s), seed + i), s).keep());
  const frozenInit = randomArray(11, seed + 99);
  const frozen = fromArray(frozenInit, [11]).keep(); // never gets a gradient: must stay untouched
  const refs: AdamRefState[] = params.map((_, i) => ({
    p: Float64Array.from(randomArray(numel(shapes[i]), seed + i)),
    m: new Float64Array(numel(shapes[i])),
    v: new Float64Array(numel(shapes[i])),
    step: 0,
  }));
  const h = { lr: 0, b1: 0.85, b2: 0.99, eps: 1e-6, wd: 0.1 };
  const opt = new AdamW([...params, frozen], { lr: 0.01, betas: [h.b1, h.b2], eps: h.eps, weightDecay: h.wd });
  for (let step = 0; step < 20; step++) {
    h.lr = 0.01 * (1 + (step % 3)); // a scheduler would set this
    opt.lr = h.lr;
    params.forEach((p, i) => {
      // Parameter 3 gets a gradient only on even steps (skipped otherwise: its step count lags, as in torch).
      if (i === 3 && step % 2 === 1) {
        p.zeroGrad();
        return;
      }
      let g = randomArray(p.numel, seed + 1000 * (step + 1) + i, 0.5 + i);
      if (gradDtypes[i] === "f16") g = f16ArrayToF32(f32ArrayToF16(g));
      setGrad(p, g, gradDtypes[i]!);
      adamwRef(refs[i], g, h);
    });
    opt.step();
  }
  for (const [i, p] of params.entries()) {
    assertClose(await read(p), refs[i].p, { rtol: 1e-5, relToMax: true, label: `param ${i} (seed ${seed})` });
    assertClose(await read(p), refs[i].p, { rtol: 1e-4, atol: 1e-6, label: `param ${i} elementwise (seed ${seed})` });
  }
  assertEquals(await read(frozen), frozenInit);
  const state = await opt.stateDict();
  assertEquals(Object.keys(state.state), ["0", "1", "2", "3", "4"]);
  assertEquals(state.state[3].step, 10);
  assertEquals(state.state[0].step, 20);
  assertClose(state.state[2].expAvg, refs[2].m, { rtol: 1e-5, relToMax: true, label: "exp_avg" });
  assertClose(state.state[2].expAvgSq, refs[2].v, { rtol: 1e-5, relToMax: true, label: "exp_avg_sq" });
  opt.zeroGrad();
  assert(params.every((p) => p.grad === null));
  opt.dispose();
  release(...params, frozen);
});

test("AdamW and clipCoefficient batch many parameters per dispatch: 30 parameters, f16 grads, views, a lagging step", async () => {
  const seed = freshSeed();
  const count = 30;
  const shapes = Array.from({ length: count }, (_, i) => (i % 4 === 0 ? [3, 1 + i] : [1 + ((i * 37) % 300)]));
  // Parameter 0 is a row-major view at an offset (its storage holds a row before it).
  const host = fromArray(randomArray(numel(shapes[0]) + shapes[0][1], seed + 500), [1 + shapes[0][0], shapes[0][1]])
    .keep();
  const params = shapes.map((s, i) =>
    i === 0 ? host.slice(0, 1).keep() : fromArray(randomArray(numel(s), seed + i), s).keep()
  );
  assert(params[0].offset > 0 && params[0].isContiguous);
  const refs: AdamRefState[] = await Promise.all(params.map(async (p) => ({
    p: Float64Array.from(await read(p)),
    m: new Float64Array(p.numel),
    v: new Float64Array(p.numel),
    step: 0,
  })));
  const h = { lr: 0.02, b1: 0.9, b2: 0.95, eps: 1e-7, wd: 0.05 };
  const opt = new AdamW(params, { lr: h.lr, betas: [h.b1, h.b2], eps: h.eps, weightDecay: h.wd });
  const gpu = getGpu();
  const perDispatch = Math.min(12, Math.floor((gpu.info.maxStorageBuffersPerShaderStage - 1) / 4));
  for (let step = 0; step < 4; step++) {
    const grads: Float32Array[] = [];
    params.forEach((p, i) => {
      if (i === 5 && step % 2 === 1) return p.zeroGrad(); // skipped: its step count lags behind the others'
      const dtype = i % 3 === 2 ? "f16" : "f32";
      let g = randomArray(p.numel, seed + 100 * (step + 1) + i, 0.3);
      if (dtype === "f16") g = f16ArrayToF32(f32ArrayToF16(g));
      setGrad(p, g, dtype);
      grads[i] = g;
    });
    // Clip inside the update: the coefficient comes from clipCoefficient, the float64 reference clips first.
    const { norm, coef } = clipCoefficient(params, 1.5);
    const d0 = gpu.dispatchCount;
    opt.step({ gradScale: coef });
    const dispatches = gpu.dispatchCount - d0;
    let sq = 0;
    for (const g of grads) if (g) { for (const x of g) sq += x * x; }
    const total = Math.sqrt(sq), c = Math.min(1, 1.5 / (total + 1e-6));
    assertAlmostEquals(await norm.item(), total, 1e-4 * total);
    params.forEach((_, i) => grads[i] && adamwRef(refs[i], grads[i].map((x) => x * c), h));
    norm.dispose();
    coef.dispose();
    // Groups: same step count and gradient dtype, at most `perDispatch` each.
    const sizes = new Map<string, number>();
    params.forEach((_, i) => {
      if (!grads[i]) return;
      const key = `${refs[i].step}|${i % 3 === 2 ? "f16" : "f32"}`;
      sizes.set(key, (sizes.get(key) ?? 0) + 1);
    });
    const expected = [...sizes.values()].reduce((a, n) => a + Math.ceil(n / perDispatch), 0);
    // (The first step also fills each parameter's new state with zeros.)
    assertEquals(dispatches, expected + (step === 0 ? 2 * count : 0), `dispatches of step ${step}`);
    assert(expected < count / 2, `${expected} dispatches for ${count} parameters`);
  }
  for (const [i, p] of params.entries()) {
    assertClose(await read(p), refs[i].p, { rtol: 1e-4, atol: 1e-6, label: `parameter ${i}` });
  }
  opt.dispose();
  release(...params);
  host.dispose();
});

test("AdamW.step({ gradScale }) equals clipGradNorm then step, and checks its scale", async () => {
  const seed = freshSeed();
  const make = () => [fromArray(randomArray(40, seed), [40]).keep(), fromArray(randomArray(7, seed + 1), [7]).keep()];
  const [a, b] = [make(), make()];
  const optA = new AdamW(a, { lr: 0.1 }), optB = new AdamW(b, { lr: 0.1 });
  for (let step = 0; step < 3; step++) {
    for (const [j, ps] of [a, b].entries()) {
      ps.forEach((p, i) => setGrad(p, randomArray(p.numel, seed + 10 * step + i, 2)));
      if (j === 0) {
        clipGradNorm(ps, 0.5).dispose();
        optA.step();
      } else {
        const { norm, coef } = clipCoefficient(ps, 0.5);
        optB.step({ gradScale: coef });
        norm.dispose();
        coef.dispose();
      }
    }
  }
  for (let i = 0; i < 2; i++) assertEquals(await read(b[i]), await read(a[i]), `parameter ${i}`);
  const bad = zeros([2]);
  const err = assertThrows(() => optB.step({ gradScale: bad }));
  assert((err as Error).message.includes("one-element f32"), (err as Error).message);
  bad.dispose();
  optA.dispose();
  optB.dispose();
  release(...a, ...b);
});

test("AdamW defaults are torch's (betas 0.9/0.999, eps 1e-8, weight decay 0.01)", async () => {
  const seed = freshSeed();
  const init = randomArray(19, seed);
  const p = fromArray(init, [19]).keep();
  const opt = new AdamW([p], { lr: 0.003 });
  assertEquals([opt.betas, opt.eps, opt.weightDecay], [[0.9, 0.999], 1e-8, 0.01]);
  const ref: AdamRefState = { p: Float64Array.from(init), m: new Float64Array(19), v: new Float64Array(19), step: 0 };
  for (let step = 0; step < 3; step++) {
    const g = randomArray(19, seed + step + 1, 1e-3);
    setGrad(p, g);
    opt.step();
    adamwRef(ref, g, { lr: 0.003, b1: 0.9, b2: 0.999, eps: 1e-8, wd: 0.01 });
  }
  assertClose(await read(p), ref.p, { rtol: 1e-5, relToMax: true, label: `defaults (seed ${seed})` });
  opt.dispose();
  release(p);
});

test("AdamW state dict round trip resumes identically", async () => {
  const seed = freshSeed();
  const shapes = [[9, 5], [17], [2, 3]];
  const a = shapes.map((s, i) => fromArray(randomArray(numel(s), seed + i), s).keep());
  const optA = new AdamW(a, { lr: 0.02, weightDecay: 0.05 });
  const grads = (step: number) => shapes.map((s, i) => randomArray(numel(s), seed + 100 * step + i));
  for (let step = 0; step < 5; step++) {
    grads(step).forEach((g, i) => i !== 2 && setGrad(a[i], g)); // parameter 2 has no gradient yet
    optA.step();
  }
  optA.lr = 0.015;
  const saved = await optA.stateDict();
  assertEquals(Object.keys(saved.state), ["0", "1"]);
  const b: Tensor[] = [];
  for (const p of a) b.push(fromArray(await read(p), p.shape).keep());
  const optB = new AdamW(b, { lr: 1, betas: [0.5, 0.5], eps: 1, weightDecay: 0 });
  optB.loadStateDict(saved);
  assertEquals([optB.lr, optB.betas, optB.eps, optB.weightDecay], [0.015, [0.9, 0.999], 1e-8, 0.05]);
  for (let step = 5; step < 10; step++) {
    grads(step).forEach((g, i) => {
      setGrad(a[i], g);
      setGrad(b[i], g);
    });
    optA.step();
    optB.step();
  }
  for (let i = 0; i < a.length; i++) assertEquals(await read(b[i]), await read(a[i]), `param ${i}`);
  const [sa, sb] = [await optA.stateDict(), await optB.stateDict()];
  assertEquals(sb, sa);
  assertEquals(sa.state[2].step, 5);
  // A state dict that does not fit is refused with a clear error and leaves the optimizer as it was.
  const bad = structuredClone(saved);
  bad.state[1].expAvg = new Float32Array(3);
  let msg = "";
  try {
    optB.loadStateDict(bad);
  } catch (e) {
    msg = (e as Error).message;
  }
  assert(msg.includes("expAvg") && msg.includes("expected 17"), msg);
  assertEquals(await optB.stateDict(), sb);
  optA.dispose();
  optB.dispose();
  release(...a, ...b);
});

test("AdamW refuses non-f32 parameters and bad hyperparameters with clear errors", () => {
  const h = zeros([4], { dtype: "f16" });
  const f = zeros([4]);
  const err = assertThrows(() => new AdamW([f, h], { lr: 1e-3 }));
  assert(err.message.includes("parameter 1") && err.message.includes("f16") && err.message.includes("f32"));
  assertThrows(() => new AdamW([f], { lr: -1 }), Error, "lr");
  assertThrows(() => new AdamW([f], { lr: 1e-3, betas: [1, 0.9] }), Error, "betas[0]");
  assertThrows(() => new AdamW([f, f], { lr: 1e-3 }), Error, "more than once");
  assertThrows(() => new SGD([f], { lr: 0.1, nesterov: true }), Error, "Nesterov");
  assertThrows(() => new SGD([h], { lr: 0.1 }), Error, "f32");
  h.dispose();
  f.dispose();
});

// ---------------------------------------------------------------------------------------------------------------
// SGD
// ---------------------------------------------------------------------------------------------------------------

for (
  const cfg of [
    { momentum: 0, dampening: 0, wd: 0, nesterov: false },
    { momentum: 0, dampening: 0, wd: 0.03, nesterov: false },
    { momentum: 0.9, dampening: 0.2, wd: 0.01, nesterov: false },
    { momentum: 0.8, dampening: 0, wd: 0.02, nesterov: true },
  ]
) {
  test(`SGD matches a float64 torch.optim.SGD for 20 steps (${JSON.stringify(cfg)})`, async () => {
    const seed = freshSeed();
    const shapes = [[7, 13], [33], [1]];
    const params = shapes.map((s, i) => fromArray(randomArray(numel(s), seed + i), s).keep());
    const refs: SgdRefState[] = shapes.map((s, i) => ({
      p: Float64Array.from(randomArray(numel(s), seed + i)),
      buf: null,
    }));
    const opt = new SGD(params, {
      lr: 0.05,
      momentum: cfg.momentum,
      dampening: cfg.dampening,
      weightDecay: cfg.wd,
      nesterov: cfg.nesterov,
    });
    for (let step = 0; step < 20; step++) {
      const lr = 0.05 / (1 + step);
      opt.lr = lr;
      params.forEach((p, i) => {
        if (i === 2 && step < 3) return; // its momentum buffer starts later, from its own first gradient
        const g = randomArray(p.numel, seed + 1000 * (step + 1) + i);
        setGrad(p, g);
        sgdRef(refs[i], g, { ...cfg, lr });
      });
      opt.step();
    }
    for (const [i, p] of params.entries()) {
      assertClose(await read(p), refs[i].p, { rtol: 1e-5, relToMax: true, label: `param ${i} (seed ${seed})` });
    }
    const state = await opt.stateDict();
    if (cfg.momentum) {
      assertClose(state.state[0].momentumBuffer, refs[0].buf!, { rtol: 1e-5, relToMax: true, label: "buffer" });
      // Round trip: a fresh optimizer with the loaded buffers takes the same next step.
      const copies: Tensor[] = [];
      for (const p of params) copies.push(fromArray(await read(p), p.shape).keep());
      const opt2 = new SGD(copies, {
        lr: 1,
        momentum: cfg.momentum,
        dampening: cfg.dampening,
        weightDecay: cfg.wd,
        nesterov: cfg.nesterov,
      });
      opt2.loadStateDict(state);
      params.forEach((p, i) => {
        const g = randomArray(p.numel, seed + 7 + i);
        setGrad(p, g);
        setGrad(copies[i], g);
      });
      opt.step();
      opt2.step();
      for (let i = 0; i < params.length; i++) assertEquals(await read(copies[i]), await read(params[i]));
      opt2.dispose();
      release(...copies);
    } else {
      assertEquals(Object.keys(state.state).length, 0);
    }
    opt.dispose();
    release(...params);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// clipGradNorm
// ---------------------------------------------------------------------------------------------------------------

test("clipGradNorm: norm and scaled gradients match torch.nn.utils.clip_grad_norm_, clipping or not", async () => {
  const seed = freshSeed();
  const shapes = [[7, 13], [70001], [1], [3, 5, 7]];
  const params = shapes.map((s) => zeros(s).keep());
  const half = zeros([9, 3], { dtype: "f16" }).keep(); // an f16 gradient is clipped too (packed words)
  const noGrad = zeros([5]).keep();
  const all = [...params, half, noGrad];
  for (const [factor, clips] of [[0.37, true], [1.5, false]] as const) {
    const grads = shapes.map((s, i) => randomArray(numel(s), seed + i, 0.01 * (i + 1)));
    const halfGrad = f16ArrayToF32(f32ArrayToF16(randomArray(27, seed + 50)));
    params.forEach((p, i) => setGrad(p, grads[i]));
    setGrad(half, halfGrad, "f16");
    let sq = 0;
    for (const g of [...grads, halfGrad]) for (const x of g) sq += x * x;
    const norm = Math.sqrt(sq);
    const maxNorm = factor * norm;
    const before = memoryStats().liveBytes;
    const total = scope(() => clipGradNorm(all, maxNorm));
    assertEquals(memoryStats().liveBytes, before + 256, "only the returned norm stays alive");
    assertEquals(total.shape, []);
    assertAlmostEquals(await total.item(), norm, norm * 1e-5, `norm (seed ${seed})`);
    total.dispose();
    const coef = Math.min(1, maxNorm / (norm + 1e-6));
    for (const [i, p] of params.entries()) {
      const got = await read(p.grad!);
      if (!clips) assertEquals(got, grads[i], "gradients are left exactly as they were");
      assertClose(got, grads[i].map((x) => x * coef), { rtol: 1e-5, label: `grad ${i} (seed ${seed})` });
    }
    const gotHalf = await read(half.grad!);
    if (!clips) assertEquals(gotHalf, halfGrad);
    assertClose(gotHalf, halfGrad.map((x) => roundToF16(x * coef)), { rtol: 1e-3, label: "f16 grad" });
  }
  assertEquals(noGrad.grad, null);
  for (const p of all) p.zeroGrad();
  const none = clipGradNorm(all, 1);
  assertEquals(await none.item(), 0);
  none.dispose();
  release(...all);
});

/** f16 test data: [5, 5] values with ±∞ just outside rows 1..2 (elements 5..14), which start in the high half of a
 * packed word and end in the low half of one: an in-place kernel must leave those halves' bits alone. */
function f16Rows(seed: number): { values: Float32Array; tensor: Tensor } {
  const values = f16ArrayToF32(f32ArrayToF16(randomArray(25, seed)));
  values[4] = Infinity;
  values[15] = -Infinity;
  return { values, tensor: fromArray(values, [5, 5], { dtype: "f16" }) };
}

test("scaleInPlace multiplies by a scalar read from the GPU, f16 with an odd offset keeps its neighbours", async () => {
  const seed = freshSeed();
  const { values, tensor: t } = f16Rows(seed);
  const s = tensor([0.25, -3]);
  using rows = t.slice(0, 1, 3); // elements 5..14
  scaleInPlace(rows, s, 1);
  const got = await read(t);
  for (let i = 0; i < 25; i++) {
    const inside = i >= 5 && i < 15;
    if (!inside) assertEquals(got[i], values[i], `element ${i} outside the view`);
    else assertAlmostEquals(got[i], roundToF16(values[i] * -3), Math.abs(values[i]) * 3e-3, `element ${i}`);
  }
  const base = randomArray(35, seed + 1);
  const f = fromArray(base, [35]);
  scaleInPlace(f, s);
  assertEquals(await read(f), base.map((x) => Math.fround(x * 0.25)));
  t.dispose();
  s.dispose();
  f.dispose();
});

// ---------------------------------------------------------------------------------------------------------------
// Schedules
// ---------------------------------------------------------------------------------------------------------------

test("schedules equal transformers' formulas, boundary steps included", () => {
  const lin = linearWithWarmup({ warmupSteps: 7, totalSteps: 50 });
  const linExpected: [number, number][] = [
    [0, 0],
    [1, 0.14285714285714285],
    [3, 0.42857142857142855],
    [6, 0.8571428571428571],
    [7, 1],
    [8, 0.9767441860465116],
    [30, 0.46511627906976744],
    [49, 0.023255813953488372],
    [50, 0],
    [51, 0],
    [80, 0],
  ];
  for (const [s, e] of linExpected) assertEquals(lin(s), e, `linear step ${s}`);
  const lin0 = linearWithWarmup({ warmupSteps: 0, totalSteps: 1 });
  assertEquals([lin0(0), lin0(1), lin0(2)], [1, 0, 0]);

  const cos = cosineWithWarmup({ warmupSteps: 7, totalSteps: 50 });
  const cosExpected: [number, number][] = [
    [0, 0],
    [3, 0.42857142857142855],
    [6, 0.8571428571428571],
    [7, 1],
    [8, 0.9986661418317758],
    [20, 0.7909294577789765],
    [30, 0.4453143958110629],
    [49, 0.001333858168224178],
    [50, 0],
    [51, 0.001333858168224178], // past the end the cosine rises again, as in transformers
  ];
  for (const [s, e] of cosExpected) assertAlmostEquals(cos(s), e, 1e-15, `cosine step ${s}`);
  const cos15 = cosineWithWarmup({ warmupSteps: 7, totalSteps: 50, numCycles: 1.5 });
  const cos15Expected: [number, number][] = [
    [7, 1],
    [20, 0.021199700045797076],
    [30, 0.6614402023857227],
    [43, 0.4817389884711704],
    [49, 0.011962061222036469],
    [50, 0],
    [60, 0.7909294577789762],
  ];
  for (const [s, e] of cos15Expected) assertAlmostEquals(cos15(s), e, 1e-15, `cosine×1.5 step ${s}`);
  const cos0 = cosineWithWarmup({ warmupSteps: 0, totalSteps: 13 });
  for (const [s, e] of [[0, 1], [1, 0.985470908713026], [6, 0.5602683401276615], [13, 0]]) {
    assertAlmostEquals(cos0(s), e, 1e-15, `cosine, no warm-up, step ${s}`);
  }
  const cw = constantWithWarmup({ warmupSteps: 4 });
  assertEquals([0, 2, 4, 9].map(cw), [0, 0.5, 1, 1]);
  assertEquals([0, 1, 1000].map(constant()), [1, 1, 1]);
  assertThrows(() => linearWithWarmup({ warmupSteps: -1, totalSteps: 10 }), Error, "warmupSteps");
  assertThrows(() => cosineWithWarmup({ warmupSteps: 1, totalSteps: 2.5 }), Error, "totalSteps");
});

test("warmupStepsFromRatio is transformers' math.ceil(total · ratio)", () => {
  const cases: [number, number, number][] = [
    [0.07, 100, 8], // 100 · 0.07 = 7.000000000000001 in double precision
    [0.1, 105, 11],
    [0.03, 1000, 30],
    [0, 100, 0],
    [0.06, 50, 3],
    [0.15, 20, 3],
    [0.29, 100, 29], // 28.999999999999996
    [1 / 3, 9, 3],
  ];
  for (const [r, t, e] of cases) assertEquals(warmupStepsFromRatio(r, t), e, `${r} × ${t}`);
  assertThrows(() => warmupStepsFromRatio(1.5, 10), Error, "ratio");
});

test("LRScheduler mirrors LambdaLR: base lr × fn(step), the first optimizer step uses fn(0)", async () => {
  const seed = freshSeed();
  const init = randomArray(13, seed);
  const p = fromArray(init, [13]).keep();
  const opt = new AdamW([p], { lr: 0.1, weightDecay: 0.5 });
  const sched = new LRScheduler(opt, linearWithWarmup({ warmupSteps: 2, totalSteps: 10 }));
  assertEquals([sched.lr, opt.lr], [0, 0]);
  setGrad(p, randomArray(13, seed + 1));
  opt.step(); // lr 0: neither the decay nor the update moves the parameter
  assertEquals(await read(p), init);
  sched.step();
  assertEquals(opt.lr, 0.05);
  opt.step();
  assertNotEquals(await read(p), init);
  const lrs = [];
  for (let i = 0; i < 10; i++) {
    sched.step();
    lrs.push(sched.lr);
  }
  const f = linearWithWarmup({ warmupSteps: 2, totalSteps: 10 });
  assertEquals(lrs, [2, 3, 4, 5, 6, 7, 8, 9, 10, 11].map((s) => 0.1 * f(s)));
  const saved = sched.stateDict();
  const opt2 = new SGD([p], { lr: 0.1 });
  const sched2 = new LRScheduler(opt2, f);
  sched2.loadStateDict({ baseLr: saved.baseLr, lastStep: 5 });
  assertEquals(opt2.lr, 0.1 * f(5));
  opt.dispose();
  release(p);
});

// ---------------------------------------------------------------------------------------------------------------
// accumulateInto
// ---------------------------------------------------------------------------------------------------------------

test("gradient accumulation over two backward calls equals the sum of the gradients", async () => {
  const seed = freshSeed();
  const [xs, as, bs] = [randomArray(7 * 13, seed), randomArray(7 * 13, seed + 1), randomArray(13, seed + 2)];
  const x = fromArray(xs, [7, 13], { requiresGrad: true }).keep();
  scope(() => {
    x.mul(fromArray(as, [7, 13])).sum().backward();
  });
  scope(() => {
    x.mul(x).mul(fromArray(bs, [13])).sum().backward(); // d/dx = 2·x·b (b broadcast over rows)
  });
  const expected = Float64Array.from(xs, (v, i) => as[i] + 2 * v * bs[i % 13]);
  assertClose(await read(x.grad!), expected, { rtol: 1e-5, atol: 1e-6, label: `accumulated grad (seed ${seed})` });
  release(x);
});

test("accumulateInto adds in place with broadcasting, strides, f16 and aliasing, without ending the pass", async () => {
  const seed = freshSeed();
  const d = randomArray(7 * 13, seed);
  const cases: [string, Float32Array, number[], (i: number) => number][] = [];
  const same = randomArray(7 * 13, seed + 1);
  cases.push(["same shape", same, [7, 13], (i) => same[i]]);
  const row = randomArray(13, seed + 2);
  cases.push(["broadcast row", row, [13], (i) => row[i % 13]]);
  const col = randomArray(7, seed + 3);
  cases.push(["broadcast column", col, [7, 1], (i) => col[Math.floor(i / 13)]]);
  const one = randomArray(1, seed + 4);
  cases.push(["scalar", one, [1], () => one[0]]);
  for (const [name, src, shape, at] of cases) {
    const dst = fromArray(d, [7, 13]);
    const s = fromArray(src, shape);
    accumulateInto(dst, s);
    assertEquals(await read(dst), d.map((v, i) => Math.fround(v + at(i))), name);
    dst.dispose();
    s.dispose();
  }
  // A transposed (strided) f16 source.
  const tSrc = randomArray(13 * 7, seed + 5);
  const tH = f16ArrayToF32(f32ArrayToF16(tSrc));
  const dst = fromArray(d, [7, 13]);
  const srcT = fromArray(tSrc, [13, 7], { dtype: "f16" });
  using view = srcT.transpose(0, 1);
  accumulateInto(dst, view);
  assertEquals(await read(dst), d.map((v, i) => Math.fround(v + tH[(i % 13) * 7 + Math.floor(i / 13)])));
  // Aliasing: dst += dst.
  using alias = dst.detach();
  const before = await read(dst);
  accumulateInto(dst, alias);
  assertEquals(await read(dst), before.map((v) => 2 * v));
  // An f16 destination starting at an odd element: the neighbouring halves keep their bits.
  const { values, tensor: h } = f16Rows(seed + 6);
  using rows = h.slice(0, 1, 3);
  const add = randomArray(10, seed + 7);
  const a = fromArray(add, [2, 5]);
  accumulateInto(rows, a);
  const got = await read(h);
  for (let i = 0; i < 25; i++) {
    const inside = i >= 5 && i < 15;
    if (!inside) assertEquals(got[i], values[i], `f16 element ${i} outside the view`);
    else {
      const e = roundToF16(Math.fround(values[i] + add[i - 5]));
      assertAlmostEquals(got[i], e, Math.abs(e) * 1e-3 + 1e-7, `f16 element ${i}`);
    }
  }
  // The in-place kernel is a dispatch in the open compute pass (the old add-and-copy ended it).
  const gpu = getGpu() as unknown as { pass: unknown };
  const z = zeros([7, 13]);
  assert(gpu.pass !== null, "a dispatch opens the compute pass");
  accumulateInto(z, dst);
  assert(gpu.pass !== null, "accumulateInto must not end the compute pass");
  assertEquals(await read(z), await read(dst));
  assertThrows(() => accumulateInto(z, a), Error, "broadcast");
  for (const t of [dst, srcT, h, a, z]) t.dispose();
});
