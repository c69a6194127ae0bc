/**
 * Tensors and their creation: `tensor()` from nested and typed arrays, `zeros`/`ones`/`full`/`arange` in every
 * dtype, the seeded generators `randn`/`rand` (reproducibility, CPU twin, moments), `item()`, and reading views
 * back with `toArray()`.
 *
 * @module
 */
import { assert, assertEquals, assertNotEquals, assertThrows } from "@std/assert";
import {
  arange,
  type DType,
  fromArray,
  full,
  manualSeed,
  ones,
  onesLike,
  rand,
  randn,
  scope,
  type Tensor,
  tensor,
  zeros,
  zerosLike,
} from "../mod.ts";
import { f32ArrayToF16, roundToF16 } from "../core/half.ts";
import { randomBitsCpu, randomUniformCpu } from "../core/random.ts";
import { freshSeed, randomArray, rng, setup } from "./helpers.ts";

await setup();

const DTYPES: DType[] = ["f32", "f16", "i32", "u32"];

/** Runs `fn` in a scope so everything it creates is freed. */
function scoped(fn: () => Promise<void>): () => Promise<void> {
  return () => scope(fn);
}

Deno.test(
  "tensor(): nested arrays infer the shape; numbers give a 0-d tensor; dtype option converts",
  scoped(async () => {
    const s = freshSeed();
    const r = rng(s);
    const rows = Array.from({ length: 3 }, () => Array.from({ length: 5 }, () => Array.from({ length: 7 }, r)));
    const t = tensor(rows);
    assertEquals([...t.shape], [3, 5, 7]);
    assertEquals(t.dtype, "f32");
    assertEquals([...t.strides], [35, 7, 1]);
    assertEquals(t.ndim, 3);
    assertEquals(t.numel, 105);
    assertEquals(Array.from(await t.toArray()), rows.flat(2).map(Math.fround));
    const sc = tensor(2.5);
    assertEquals([...sc.shape], []);
    assertEquals(await sc.item(), 2.5);
    const ints = tensor([[1, -2, 3], [4, 5, -6]], undefined, { dtype: "i32" });
    assertEquals(ints.dtype, "i32");
    assertEquals(Array.from(await ints.toArray()), [1, -2, 3, 4, 5, -6]);
    const halves = tensor([0.1, 1 / 3, 70000, -2], undefined, { dtype: "f16" });
    assertEquals(halves.dtype, "f16");
    assertEquals(Array.from(await halves.toArray()), [roundToF16(0.1), roundToF16(1 / 3), Infinity, -2]);
    const u = tensor([0, 4_000_000_000], undefined, { dtype: "u32" });
    assertEquals(Array.from(await u.toArray()), [0, 4_000_000_000]);
    const reshaped = tensor([1, 2, 3, 4, 5, 6], [2, 3]);
    assertEquals([...reshaped.shape], [2, 3]);
    assertEquals(tensor([]).numel, 0);
    assertEquals(Array.from(await tensor([]).toArray()), []);
  }),
);

Deno.test(
  "tensor(): typed arrays set the dtype (Uint16Array = f16 bits) and may be converted; odd lengths",
  scoped(async () => {
    const s = freshSeed();
    const x = randomArray(91, s);
    const f = tensor(x, [7, 13]);
    assertEquals(f.dtype, "f32");
    assertEquals(await f.toArray(), x);
    const i = tensor(Int32Array.from(x, (v) => Math.round(v * 1000)));
    assertEquals(i.dtype, "i32");
    assertEquals([...i.shape], [91]);
    assertEquals(Array.from(await i.toArray()), Array.from(x, (v) => Math.round(v * 1000) | 0));
    const u = tensor(Uint32Array.from(x, (v) => Math.abs(v) * 1e6));
    assertEquals(u.dtype, "u32");
    assertEquals(await u.toArray(), Uint32Array.from(x, (v) => Math.abs(v) * 1e6));
    const h = tensor(f32ArrayToF16(x), [91]);
    assertEquals(h.dtype, "f16");
    assertEquals(Array.from(await h.toArray()), Array.from(x, roundToF16));
    const hf = tensor(x, [91], { dtype: "f16" });
    assertEquals(hf.dtype, "f16");
    assertEquals(Array.from(await hf.toArray()), Array.from(x, roundToF16));
    const fi = fromArray(x, [7, 13], { dtype: "i32" });
    assertEquals(Array.from(await fi.toArray()), Array.from(x, (v) => Math.trunc(v) | 0));
  }),
);

Deno.test("tensor(): bad input gets clear errors", () => {
  scope(() => {
    assertThrows(() => tensor([[1, 2], [3]]), Error, "ragged");
    assertThrows(() => tensor(new Float32Array(5), [2, 3]), Error, "5 values do not fill shape [2, 3] (6 elements)");
    assertThrows(() => tensor(new Uint16Array(4), [4], { dtype: "f32" }), Error, "f16 bits");
    assertThrows(() => tensor([1], undefined, { dtype: "f64" as DType }), Error, 'Unknown dtype "f64"');
    assertThrows(() => tensor([1], undefined, { dtype: "i32", requiresGrad: true }), Error, "float tensors");
    assertThrows(() => zeros([2, -1]), Error, "Invalid shape [2, -1]");
  });
});

Deno.test(
  "zeros, ones, full, zerosLike, onesLike in f32, f16, i32, u32 (odd sizes)",
  scoped(async () => {
    const values: Record<DType, number> = { f32: -1.0e-3 / 3, f16: 0.1, i32: -123456, u32: 4_000_000_001 };
    const expect: Record<DType, number> = {
      f32: Math.fround(-1.0e-3 / 3),
      f16: roundToF16(0.1),
      i32: -123456,
      u32: 4_000_000_001,
    };
    for (const dtype of DTYPES) {
      const z = zeros([3, 5, 7], { dtype });
      assertEquals(z.dtype, dtype);
      assertEquals([...z.shape], [3, 5, 7]);
      assert((await z.toArray()).every((v) => v === 0), `zeros ${dtype}`);
      const o = ones([7, 13], { dtype });
      assert((await o.toArray()).every((v) => v === 1), `ones ${dtype}`);
      const f = full([13], values[dtype], { dtype });
      assertEquals(Array.from(await f.toArray()), new Array(13).fill(expect[dtype]), `full ${dtype}`);
      const zl = zerosLike(f), ol = onesLike(f);
      assertEquals([zl.dtype, ol.dtype], [dtype, dtype]);
      assertEquals(Array.from(await zl.toArray()), new Array(13).fill(0));
      assertEquals(Array.from(await ol.toArray()), new Array(13).fill(1));
    }
    assertEquals(await full([], 7).item(), 7);
    assertEquals(Array.from(await full([1, 1], -Infinity).toArray()), [-Infinity]);
    assertEquals(zeros([0, 5]).numel, 0);
    const g = ones([3], { requiresGrad: true });
    assert(g.requiresGrad && g.node === null, "ones({requiresGrad}) is a leaf");
  }),
);

Deno.test(
  "arange: one/two/three arguments, fractional and negative steps, every dtype",
  scoped(async () => {
    const cases: [number, number | undefined, number | undefined, DType, number[]][] = [
      [5, undefined, undefined, "f32", [0, 1, 2, 3, 4]],
      [2, 9, undefined, "i32", [2, 3, 4, 5, 6, 7, 8]],
      [0, 1, 0.25, "f32", [0, 0.25, 0.5, 0.75]],
      [5, -3, -2, "f32", [5, 3, 1, -1]],
      [5, -4, -3, "i32", [5, 2, -1]],
      [10, 0, -1, "u32", [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]],
      [-1, 1, 0.3, "f16", [-1, -0.7, -0.4, -0.1, 0.2, 0.5, 0.8].map(roundToF16)],
      [0, 13, 1, "f16", Array.from({ length: 13 }, (_, i) => i)],
      [1, -1.2, -0.5, "f16", [1, 0.5, 0, -0.5, -1]],
      [3, 3, 1, "f32", []],
      [3, 5, -1, "i32", []],
    ];
    for (const [a, b, step, dtype, want] of cases) {
      const t = arange(a, b, step, { dtype });
      assertEquals(t.dtype, dtype);
      assertEquals([...t.shape], [want.length], `arange(${a}, ${b}, ${step}) length`);
      const got = Array.from(await t.toArray());
      for (let i = 0; i < want.length; i++) {
        // Float ranges are start + i·step computed in f32 (then rounded to f16 for f16): within one f32/f16 ulp.
        const tol = dtype === "f16" ? 1e-3 : dtype === "f32" ? 1e-6 : 0;
        assert(Math.abs(got[i] - want[i]) <= tol * Math.max(1, Math.abs(want[i])), `arange ${dtype} [${i}]: ${got}`);
      }
    }
    assertThrows(() => arange(0, 5, 0), Error, "step must not be 0");
  }),
);

Deno.test(
  "a kernel over more than 65,535 × 256 elements (2-D workgroup grid) covers every element exactly once",
  scoped(async () => {
    const n = 256 * 65535 + 513;
    const v = await arange(n, undefined, 1, { dtype: "i32" }).toArray();
    assertEquals(v.length, n);
    let bad = -1;
    for (let i = 0; i < n && bad < 0; i++) if (v[i] !== i) bad = i;
    assertEquals(bad, -1, `element ${bad} is ${v[bad]}`);
  }),
);

Deno.test(
  "rand: same seed → identical values equal to the CPU twin randomUniformCpu; different seeds differ",
  scoped(async () => {
    const seed = freshSeed();
    const a = await rand([1001], { seed }).toArray();
    const b = await rand([1001], { seed }).toArray();
    assertEquals(a, b);
    const cpu = Float32Array.from({ length: 1001 }, (_, i) => randomUniformCpu(seed, i));
    assertEquals(a, cpu, `rand vs randomUniformCpu (seed ${seed})`);
    const c = await rand([1001], { seed: seed + 1 }).toArray();
    assertNotEquals(a, c);
    assert(a.every((v) => v >= 0 && v < 1), "rand in [0, 1)");
    // The global generator: manualSeed(s) then draw k uses key randomBitsCpu(s, k); successive draws differ.
    manualSeed(seed);
    const g0 = await rand([257]).toArray();
    const g1 = await rand([257]).toArray();
    manualSeed(seed);
    assertEquals(await rand([257]).toArray(), g0);
    assertNotEquals(g0, g1);
    const key0 = randomBitsCpu(seed, 0), key1 = randomBitsCpu(seed, 1);
    assertEquals(g0, Float32Array.from({ length: 257 }, (_, i) => randomUniformCpu(key0, i)));
    assertEquals(g1, Float32Array.from({ length: 257 }, (_, i) => randomUniformCpu(key1, i)));
    // low/high scale the same draw: low + (high − low)·u in f32 (within one ulp: the GPU may fuse the multiply-add).
    const lh = await rand([101], { seed, low: -2, high: 5 }).toArray();
    for (let i = 0; i < 101; i++) {
      assert(Math.abs(lh[i] - (-2 + 7 * a[i])) <= 2 ** -20, `rand low/high [${i}]: ${lh[i]} vs ${-2 + 7 * a[i]}`);
    }
    const h = rand([13], { seed, dtype: "f16" });
    assertEquals(h.dtype, "f16");
    assertEquals(Array.from(await h.toArray()), Array.from(a.subarray(0, 13), roundToF16));
  }),
);

/** The CPU twin of the GPU's Box–Muller draw (float64). */
function normalCpu(seed: number, i: number): number {
  const u1 = ((randomBitsCpu(seed, 2 * i) >>> 8) + 0.5) * 5.9604644775390625e-8;
  const u2 = (randomBitsCpu(seed, 2 * i + 1) >>> 8) * 5.9604644775390625e-8;
  return Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * u2);
}

Deno.test(
  "randn: seeded reproducibility, matches its CPU twin, mean/std options; different seeds differ",
  scoped(async () => {
    const seed = freshSeed();
    const a = await randn([7, 13], { seed }).toArray();
    assertEquals(await randn([7, 13], { seed }).toArray(), a);
    assertNotEquals(await randn([7, 13], { seed: seed ^ 1 }).toArray(), a);
    // GPU log/cos are approximations: each value within 1e-5 of the float64 Box–Muller of the same bits.
    for (let i = 0; i < a.length; i++) {
      const e = normalCpu(seed, i);
      assert(Math.abs(a[i] - e) <= 1e-5 * Math.max(1, Math.abs(e)), `randn[${i}] = ${a[i]}, CPU ${e} (seed ${seed})`);
    }
    const ms = await randn([7, 13], { seed, mean: 3, std: 0.5 }).toArray();
    for (let i = 0; i < a.length; i++) {
      assert(Math.abs(ms[i] - (3 + 0.5 * a[i])) <= 1e-6 * 4, `mean/std option [${i}]`);
    }
    manualSeed(seed);
    const g0 = await randn([33]).toArray();
    const g1 = await randn([33]).toArray();
    manualSeed(seed);
    assertEquals(await randn([33]).toArray(), g0);
    assertNotEquals(g0, g1);
  }),
);

/** Sample mean and variance. */
function moments(x: ArrayLike<number>): { mean: number; variance: number } {
  let m = 0;
  for (let i = 0; i < x.length; i++) m += x[i];
  m /= x.length;
  let v = 0;
  for (let i = 0; i < x.length; i++) v += (x[i] - m) ** 2;
  return { mean: m, variance: v / (x.length - 1) };
}

Deno.test(
  "randn and rand moments are within 5 standard errors of N(μ, σ²) and U(low, high) (n = 65,537)",
  scoped(async () => {
    // Standard errors for n samples: mean σ/√n; variance σ²·√(2/(n−1)) for a normal, and for a uniform of
    // width w the variance of the sample variance is (μ4 − σ⁴)/n with μ4 = w⁴/80, σ² = w²/12.
    // A fresh seed each run; 5 standard errors fail with probability < 1e-6 per check.
    const n = 65537;
    const seed = freshSeed();
    const z = moments(await randn([n], { seed, mean: 1.5, std: 2 }).toArray());
    const se = 2 / Math.sqrt(n);
    assert(Math.abs(z.mean - 1.5) < 5 * se, `randn mean ${z.mean} (seed ${seed})`);
    assert(Math.abs(z.variance - 4) < 5 * 4 * Math.sqrt(2 / (n - 1)), `randn variance ${z.variance} (seed ${seed})`);
    const u = await rand([n], { seed, low: -1, high: 3 }).toArray();
    assert(u.every((v) => v >= -1 && v < 3), "rand range");
    const m = moments(u);
    const w = 4, varU = (w * w) / 12;
    assert(Math.abs(m.mean - 1) < 5 * Math.sqrt(varU / n), `rand mean ${m.mean} (seed ${seed})`);
    const seVar = Math.sqrt((w ** 4 / 80 - varU * varU) / n);
    assert(Math.abs(m.variance - varU) < 5 * seVar, `rand variance ${m.variance} (seed ${seed})`);
    // Neighbouring values are uncorrelated (lag-1 correlation within 5 standard errors of 0).
    const zz = await randn([n], { seed: seed + 7 }).toArray();
    let c = 0;
    for (let i = 1; i < n; i++) c += zz[i] * zz[i - 1];
    assert(Math.abs(c / (n - 1)) < 5 / Math.sqrt(n), `randn lag-1 correlation ${c / (n - 1)}`);
  }),
);

Deno.test(
  "item(): one-element tensors of any rank and dtype; other shapes name the shape",
  scoped(async () => {
    assertEquals(await tensor([[4.5]]).item(), 4.5);
    assertEquals(await tensor([-7], undefined, { dtype: "i32" }).item(), -7);
    assertEquals(await full([1, 1, 1], 0.1, { dtype: "f16" }).item(), roundToF16(0.1));
    assertEquals(await tensor([1, 2, 3]).slice(0, 1, 2).item(), 2);
    assertEquals(await tensor([[1, 2], [3, 4]]).sum().item(), 10);
    let err: Error | null = null;
    try {
      await tensor([[1, 2, 3]]).item();
    } catch (e) {
      err = e as Error;
    }
    assert(err?.message.includes("[1, 3]"), `item() error: ${err?.message}`);
  }),
);

/** Reads `data` (row-major with `shape`) through strides: the expected contents of a view. */
function viewOf(data: ArrayLike<number>, shape: number[], strides: number[], offset: number): number[] {
  const out: number[] = [];
  const n = shape.reduce((a, d) => a * d, 1);
  const idx = new Array<number>(shape.length).fill(0);
  for (let i = 0; i < n; i++) {
    out.push(data[offset + idx.reduce((a, v, d) => a + v * strides[d], 0)]);
    for (let d = shape.length - 1; d >= 0; d--) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
  }
  return out;
}

Deno.test(
  "toArray() of views: transposes, permutes, slices with offsets, expands, in f32, f16 (odd offsets), i32",
  scoped(async () => {
    const s = freshSeed();
    const x = Float32Array.from(randomArray(105, s), roundToF16);
    const ints = Int32Array.from(x, (v) => Math.round(v * 1000));
    const sources: [string, Tensor, ArrayLike<number>][] = [
      ["f32", tensor(x, [3, 5, 7]), x],
      ["f16", tensor(f32ArrayToF16(x), [3, 5, 7]), x],
      ["i32", tensor(ints, [3, 5, 7]), ints],
    ];
    for (const [name, t, data] of sources) {
      const views: [string, Tensor, number[], number[], number][] = [
        ["permute(2,0,1)", t.permute(2, 0, 1), [7, 3, 5], [1, 35, 7], 0],
        ["transpose(0,1)", t.transpose(0, 1), [5, 3, 7], [7, 35, 1], 0],
        ["slice(2,1,6)", t.slice(2, 1, 6), [3, 5, 5], [35, 7, 1], 1],
        ["slice(0,1)", t.slice(0, 1), [2, 5, 7], [35, 7, 1], 35],
        ["slice(1,-2,-1).slice(2,3)", t.slice(1, -2, -1).slice(2, 3), [3, 1, 4], [35, 7, 1], 21 + 3],
        ["slice(0,2,3).squeeze(0).transpose()", t.slice(0, 2, 3).squeeze(0).transpose(), [7, 5], [1, 7], 70],
        ["slice(2,3,4).expand(3,5,4)", t.slice(2, 3, 4).expand(3, 5, 4), [3, 5, 4], [35, 7, 0], 3],
        ["unsqueeze(1)", t.unsqueeze(1), [3, 1, 5, 7], [35, 35, 7, 1], 0],
      ];
      for (const [vname, v, shape, strides, offset] of views) {
        assertEquals([...v.shape], shape, `${name} ${vname} shape`);
        assertEquals(v.offset, offset, `${name} ${vname} offset`);
        assertEquals(v.dtype, t.dtype);
        assertEquals(
          Array.from(await v.toArray()),
          viewOf(data, shape, strides, offset),
          `${name} ${vname} values (seed ${s})`,
        );
      }
      // Views share storage: no copy until contiguous() is needed.
      const p = t.permute(2, 0, 1);
      assertEquals(p.storage, t.storage);
      assert(!p.isContiguous && t.isContiguous && t.slice(0, 1).isContiguous && !t.slice(2, 1).isContiguous);
      const c = p.contiguous();
      assert(c.isContiguous && c.storage !== t.storage);
      assertEquals(Array.from(await c.toArray()), Array.from(await p.toArray()));
    }
  }),
);

Deno.test(
  "detach() shares data and leaves the graph; toString() does not read data",
  scoped(async () => {
    const x = tensor([1, 2, 3], undefined, { requiresGrad: true });
    const y = x.mul(2);
    const d = y.detach();
    assert(!d.requiresGrad && d.node === null && d.storage === y.storage);
    assertEquals(Array.from(await d.toArray()), [2, 4, 6]);
    assertEquals(x.toString(), "Tensor([3], f32, requiresGrad)");
  }),
);
