/**
 * Tests of rotary embeddings and fused attention (core/ops/attention.ts): float64 CPU references for both rope
 * conventions and for masked grouped-query attention, numerical gradients, the op-composition reference
 * `attentionReference`, the split-over-keys decode kernel, f16 storage, fully masked rows, and the memory kept
 * for backward. Inputs are fresh on every run; each failure message names its seed.
 */
import { assert, assertEquals, assertLess, assertThrows } from "@std/assert";
import { assertClose, freshSeed, numericalGrad, randomArray, rng, setup } from "./helpers.ts";
import { fromArray, memoryStats, noGrad, resetPeakMemory, scope, type Tensor, tensor } from "../mod.ts";
import { roundToF16 } from "../core/half.ts";
import {
  attention,
  type AttentionOptions,
  attentionReference,
  rope,
  ropeInverseFrequencies,
} from "../core/ops/attention.ts";

await setup();

// ---- float64 references ---------------------------------------------------------------------------------------

/** HF's inv_freq, computed independently of the library: 1 / theta^(2i/D), each step rounded to f32. */
function invFreq(D: number, theta: number): number[] {
  return Array.from(
    { length: D / 2 },
    (_, i) => Math.fround(1 / Math.fround(Math.pow(theta, Math.fround((2 * i) / D)))),
  );
}

/**
 * Rope of contiguous x [B, T, H, D] at positions [B, T]. The angle is the f32 product and cos/sin are rounded to
 * f32, as `transformers` computes them; with `half`, cos/sin are rounded to f16 and so is every product and sum
 * (PyTorch half arithmetic). `inverse` rotates the other way (the backward).
 */
function ropeRef(
  x: ArrayLike<number>,
  pos: Int32Array,
  [B, T, H, D]: number[],
  theta: number,
  interleaved: boolean,
  half = false,
): Float64Array {
  const inv = invFreq(D, theta);
  const out = new Float64Array(B * T * H * D);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      for (let h = 0; h < H; h++) {
        const base = ((b * T + t) * H + h) * D;
        for (let d = 0; d < D; d++) {
          const i = interleaved ? d >> 1 : d % (D / 2);
          const partner = interleaved ? d ^ 1 : (d + D / 2) % D;
          const sign = (interleaved ? d % 2 === 0 : d < D / 2) ? -1 : 1;
          const angle = Math.fround(pos[b * T + t] * inv[i]);
          let c = Math.fround(Math.cos(angle)), s = Math.fround(Math.sin(angle));
          const xa = x[base + d], xp = x[base + partner];
          if (half) {
            c = roundToF16(c);
            s = roundToF16(s);
            out[base + d] = roundToF16(roundToF16(xa * c) + sign * roundToF16(xp * s));
          } else {
            out[base + d] = xa * c + sign * xp * s;
          }
        }
      }
    }
  }
  return out;
}

interface Dims {
  B: number;
  T: number;
  S: number;
  Hq: number;
  Hkv: number;
  D: number;
}

interface RefOpts {
  causal?: boolean;
  mask?: Int32Array;
  scale?: number;
  queryOffset?: number;
}

/** Masked grouped-query attention in float64; q [B, T, Hq, D], k/v [B, S, Hkv, D], contiguous. */
function attention64(q: ArrayLike<number>, k: ArrayLike<number>, v: ArrayLike<number>, n: Dims, o: RefOpts) {
  const { B, T, S, Hq, Hkv, D } = n;
  const G = Hq / Hkv;
  const scale = o.scale ?? 1 / Math.sqrt(D);
  const qoff = o.queryOffset ?? S - T;
  const causal = o.causal ?? true;
  const out = new Float64Array(B * T * Hq * D);
  const sc = new Float64Array(S);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      for (let h = 0; h < Hq; h++) {
        const hk = Math.floor(h / G);
        const qb = ((b * T + t) * Hq + h) * D;
        let m = -Infinity;
        for (let s = 0; s < S; s++) {
          const ok = (!causal || s <= t + qoff) && (!o.mask || o.mask[b * S + s] !== 0);
          if (!ok) {
            sc[s] = -Infinity;
            continue;
          }
          const kb = ((b * S + s) * Hkv + hk) * D;
          let dot = 0;
          for (let d = 0; d < D; d++) dot += q[qb + d] * k[kb + d];
          sc[s] = dot * scale;
          m = Math.max(m, sc[s]);
        }
        if (m === -Infinity) continue; // no allowed key: zeros
        let sum = 0;
        for (let s = 0; s < S; s++) sum += sc[s] === -Infinity ? 0 : Math.exp(sc[s] - m);
        for (let s = 0; s < S; s++) {
          if (sc[s] === -Infinity) continue;
          const p = Math.exp(sc[s] - m) / sum;
          const vb = ((b * S + s) * Hkv + hk) * D;
          for (let d = 0; d < D; d++) out[qb + d] += p * v[vb + d];
        }
      }
    }
  }
  return out;
}

// ---- helpers --------------------------------------------------------------------------------------------------

function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

function roundArrayF16(a: Float32Array): Float32Array {
  return a.map((x) => roundToF16(x));
}

/** Random q, k, v arrays (f32 values) for `n`. */
function qkvArrays(n: Dims, seed: number, scale = 1) {
  return {
    q: randomArray(n.B * n.T * n.Hq * n.D, seed, scale),
    k: randomArray(n.B * n.S * n.Hkv * n.D, seed + 1, scale),
    v: randomArray(n.B * n.S * n.Hkv * n.D, seed + 2),
  };
}

/** Key mask [B, S]: `left[b]` leading zeros and `right[b]` trailing zeros per sequence. */
function paddingMask(B: number, S: number, left: number[], right: number[]): Int32Array {
  const m = new Int32Array(B * S);
  for (let b = 0; b < B; b++) for (let s = left[b]; s < S - right[b]; s++) m[b * S + s] = 1;
  return m;
}

async function arr(t: Tensor): Promise<Float32Array> {
  return await t.toArray() as Float32Array;
}

// ---- rope -----------------------------------------------------------------------------------------------------

Deno.test("rope matches a float64 reference for both conventions, on strided views and arbitrary positions", async () => {
  const seed = freshSeed();
  const r = rng(seed);
  const [B, T, H] = [2, 9, 3];
  for (const D of [16, 64]) {
    for (const interleaved of [false, true]) {
      const theta = interleaved ? 10000 : 500000;
      // x is the middle third of a fused [B, T, 3·H·D] projection, read through strides.
      const W = 3 * H * D;
      const fused = randomArray(B * T * W, seed + D);
      const xs = new Float32Array(B * T * H * D);
      for (let bt = 0; bt < B * T; bt++) xs.set(fused.subarray(bt * W + H * D, bt * W + 2 * H * D), bt * H * D);
      // Sequence 0: HF left-padded position ids (pads get 1); sequence 1: arbitrary positions up to 100k.
      const pos = new Int32Array(B * T);
      const pad = 3;
      for (let t = 0; t < T; t++) pos[t] = t < pad ? 1 : t - pad;
      for (let t = 0; t < T; t++) pos[T + t] = Math.floor(r() * 100000);
      await scope(async () => {
        const base = fromArray(fused, [B, T, W]);
        const x = base.viewOf([B, T, H, D], [T * W, W, D, 1], H * D);
        const y = rope(x, fromArray(pos, [B, T]), { theta, interleaved });
        assertEquals(y.shape, [B, T, H, D]);
        assertClose(await arr(y), ropeRef(xs, pos, [B, T, H, D], theta, interleaved), {
          rtol: 2e-6,
          relToMax: true,
          label: `rope D=${D} interleaved=${interleaved} seed ${seed}`,
        });
      });
    }
  }
});

Deno.test("rope on f16 follows transformers' half arithmetic (cos/sin cast to f16 before multiplying)", async () => {
  const seed = freshSeed();
  const [B, T, H, D] = [2, 6, 2, 64];
  const x = roundArrayF16(randomArray(B * T * H * D, seed, 2));
  const pos = Int32Array.from({ length: B * T }, (_, i) => (i * 977) % 5000);
  for (const interleaved of [false, true]) {
    await scope(async () => {
      const y = rope(fromArray(x, [B, T, H, D], { dtype: "f16" }), fromArray(pos, [B, T]), {
        theta: 10000,
        interleaved,
      });
      assertEquals(y.dtype, "f16");
      const got = await arr(y);
      const want = ropeRef(x, pos, [B, T, H, D], 10000, interleaved, true);
      // Bit-exact except where the f32 cos/sin of the GPU and of the CPU sit on opposite sides of an f16 rounding
      // boundary (rare): then the f16 cos/sin differ by one f16 ulp, and the result by up to 2⁻¹¹·(|x| + |partner|).
      let exact = 0;
      for (let i = 0; i < got.length; i++) {
        if (got[i] === want[i]) exact++;
        const d = i % D, base = i - d;
        const partner = base + (interleaved ? d ^ 1 : (d + D / 2) % D);
        const ulp = 2 ** (Math.floor(Math.log2(Math.max(Math.abs(want[i]), 2 ** -14))) - 10);
        const tol = ulp + 2 ** -11 * (Math.abs(x[i]) + Math.abs(x[partner]));
        assert(Math.abs(got[i] - want[i]) <= tol, `f16 rope element ${i}: ${got[i]} vs ${want[i]} (seed ${seed})`);
      }
      assert(exact >= 0.99 * got.length, `only ${exact}/${got.length} f16 rope values exact (seed ${seed})`);
    });
  }
});

Deno.test("rope backward equals numerical gradients (the inverse rotation)", async () => {
  const seed = freshSeed();
  const [B, T, H, D] = [2, 5, 2, 8];
  const n = B * T * H * D;
  const x = randomArray(n, seed);
  const w = randomArray(n, seed + 1);
  const pos = Int32Array.from({ length: B * T }, (_, i) => (i * 37) % 300);
  for (const interleaved of [false, true]) {
    await scope(async () => {
      const xt = fromArray(x, [B, T, H, D], { requiresGrad: true });
      rope(xt, fromArray(pos, [B, T]), { theta: 10000, interleaved }).backward(fromArray(w, [B, T, H, D]));
      const num = numericalGrad(
        (xx) => dot(ropeRef(xx, pos, [B, T, H, D], 10000, interleaved), w),
        Float64Array.from(x),
      );
      assertClose(await arr(xt.grad!), num, { rtol: 1e-5, relToMax: true, label: `rope grad seed ${seed}` });
    });
  }
  assertEquals(ropeInverseFrequencies(8, 10000)[0], 1);
});

Deno.test("rope rejects bad inputs with clear errors", () => {
  scope(() => {
    const pos = tensor([[0, 1]], undefined, { dtype: "i32" });
    assertThrows(() => rope(tensor(new Float32Array(6), [1, 2, 1, 3]), pos, { theta: 1e4 }), Error, "even");
    assertThrows(() => rope(tensor(new Float32Array(8), [1, 2, 1, 4]), tensor([[0, 1]]), { theta: 1e4 }), Error, "i32");
    assertThrows(
      () => rope(tensor(new Float32Array(12), [1, 3, 1, 4]), pos, { theta: 1e4 }),
      Error,
      "do not match",
    );
  });
});

// ---- attention forward ----------------------------------------------------------------------------------------

interface Case {
  name: string;
  n: Dims;
  opts: RefOpts;
  /** Pass the key mask as u32 instead of i32. */
  u32Mask?: boolean;
}

const SMALL = { B: 2, T: 7, Hq: 4, Hkv: 2, D: 16 };
const FORWARD_CASES: Case[] = [
  { name: "causal T=S=7", n: { ...SMALL, S: 7 }, opts: {} },
  { name: "causal S=11 (default offset S-T)", n: { ...SMALL, S: 11 }, opts: {} },
  { name: "causal S=11 queryOffset=2", n: { ...SMALL, S: 11 }, opts: { queryOffset: 2 } },
  { name: "non-causal S=11, scale 0.3", n: { ...SMALL, S: 11 }, opts: { causal: false, scale: 0.3 } },
  {
    name: "causal + right padding",
    n: { ...SMALL, S: 7 },
    opts: { mask: paddingMask(2, 7, [0, 0], [3, 0]) },
  },
  {
    name: "causal + left padding (fully masked rows)",
    n: { ...SMALL, S: 7 },
    opts: { mask: paddingMask(2, 7, [2, 4], [0, 0]) },
  },
  {
    name: "GQA 8→1 heads, S=11, left+right padding, u32 mask",
    n: { B: 2, T: 7, S: 11, Hq: 8, Hkv: 1, D: 16 },
    opts: { mask: paddingMask(2, 11, [3, 0], [0, 2]) },
    u32Mask: true,
  },
  { name: "MHA D=64", n: { B: 1, T: 7, S: 7, Hq: 2, Hkv: 2, D: 64 }, opts: {} },
];

function toOpts(o: RefOpts, B: number, S: number, u32Mask = false): AttentionOptions {
  const mask = o.mask && u32Mask ? Uint32Array.from(o.mask) : o.mask;
  return {
    causal: o.causal,
    scale: o.scale,
    queryOffset: o.queryOffset,
    keyMask: mask ? fromArray(mask, [B, S]) : undefined,
  };
}

Deno.test("attention forward matches float64 and attentionReference (masks, offsets, GQA, both kernels)", async () => {
  const seed = freshSeed();
  for (const [ci, c] of FORWARD_CASES.entries()) {
    const { n } = c;
    const { q, k, v } = qkvArrays(n, seed + 10 * ci);
    const want = attention64(q, k, v, n, c.opts);
    await scope(async () => {
      const qt = fromArray(q, [n.B, n.T, n.Hq, n.D]);
      const kt = fromArray(k, [n.B, n.S, n.Hkv, n.D]);
      const vt = fromArray(v, [n.B, n.S, n.Hkv, n.D]);
      const opts = toOpts(c.opts, n.B, n.S, c.u32Mask);
      for (const kernel of ["blocked", "split"] as const) {
        const got = await arr(attention(qt, kt, vt, { ...opts, kernel }));
        assertClose(got, want, { rtol: 1e-5, relToMax: true, label: `${c.name} [${kernel}] seed ${seed}` });
      }
      const ref = await arr(attentionReference(qt, kt, vt, opts));
      assertClose(ref, want, { rtol: 1e-5, relToMax: true, label: `${c.name} [reference] seed ${seed}` });
    });
  }
});

Deno.test("attention reads q/k/v as strided views of a fused qkv projection", async () => {
  const seed = freshSeed();
  const n = { B: 2, T: 9, S: 9, Hq: 4, Hkv: 2, D: 16 };
  const W = (n.Hq + 2 * n.Hkv) * n.D;
  const fused = randomArray(n.B * n.T * W, seed);
  const pick = (h0: number, H: number) => {
    const out = new Float32Array(n.B * n.T * H * n.D);
    for (let bt = 0; bt < n.B * n.T; bt++) {
      out.set(fused.subarray(bt * W + h0 * n.D, bt * W + (h0 + H) * n.D), bt * H * n.D);
    }
    return out;
  };
  const want = attention64(pick(0, n.Hq), pick(n.Hq, n.Hkv), pick(n.Hq + n.Hkv, n.Hkv), n, {});
  await scope(async () => {
    const base = fromArray(fused, [n.B, n.T, W]);
    const view = (h0: number, H: number) => base.viewOf([n.B, n.T, H, n.D], [n.T * W, W, n.D, 1], h0 * n.D);
    const got = attention(view(0, n.Hq), view(n.Hq, n.Hkv), view(n.Hq + n.Hkv, n.Hkv));
    assertClose(await arr(got), want, { rtol: 1e-5, relToMax: true, label: `fused qkv seed ${seed}` });
  });
});

Deno.test("attention on f16 inputs matches float64 on the f16-rounded inputs", async () => {
  const seed = freshSeed();
  const n = { ...SMALL, S: 11 };
  const raw = qkvArrays(n, seed);
  const [q, k, v] = [raw.q, raw.k, raw.v].map(roundArrayF16);
  const mask = paddingMask(2, 11, [2, 0], [0, 3]);
  const want = attention64(q, k, v, n, { mask });
  await scope(async () => {
    const qt = fromArray(q, [n.B, n.T, n.Hq, n.D], { dtype: "f16" });
    const kt = fromArray(k, [n.B, n.S, n.Hkv, n.D], { dtype: "f16" });
    const vt = fromArray(v, [n.B, n.S, n.Hkv, n.D], { dtype: "f16" });
    const keyMask = fromArray(mask, [n.B, n.S]);
    for (const kernel of ["blocked", "split"] as const) {
      const o = attention(qt, kt, vt, { keyMask, kernel });
      assertEquals(o.dtype, "f16");
      assertClose(await arr(o), want, { rtol: 1e-3, relToMax: true, label: `f16 [${kernel}] seed ${seed}` });
    }
    const ref = attentionReference(qt, kt, vt, { keyMask });
    assertClose(await arr(ref), want, { rtol: 1e-3, relToMax: true, label: `f16 reference seed ${seed}` });
  });
});

Deno.test("decode path (split over keys) matches the blocked kernel and float64 on KV-cache views", async () => {
  const seed = freshSeed();
  // T=1 and T=3 against S=37 (chunks of 32 keys); many rows against S=300 (chunks of 64 keys, staged in halves).
  const cases = [
    { B: 2, T: 1, Hq: 4, Hkv: 2, D: 16, Smax: 48, S: 37, left: [5, 0] },
    { B: 2, T: 3, Hq: 4, Hkv: 2, D: 16, Smax: 48, S: 37, left: [5, 0] },
    { B: 4, T: 2, Hq: 16, Hkv: 4, D: 16, Smax: 320, S: 300, left: [0, 7, 0, 290] },
  ];
  for (const [ci, { B, T, Hq, Hkv, D, Smax, S, left }] of cases.entries()) {
    const cacheK = randomArray(B * Smax * Hkv * D, seed + ci);
    const cacheV = randomArray(B * Smax * Hkv * D, seed + ci + 1);
    const qa = randomArray(B * T * Hq * D, seed + ci + 2);
    const mask = paddingMask(B, S, left, new Array(B).fill(0)); // left padding, as in batched generation
    const slice = (c: Float32Array) => {
      const out = new Float32Array(B * S * Hkv * D);
      for (let b = 0; b < B; b++) out.set(c.subarray(b * Smax * Hkv * D, (b * Smax + S) * Hkv * D), b * S * Hkv * D);
      return out;
    };
    const want = attention64(qa, slice(cacheK), slice(cacheV), { B, T, S, Hq, Hkv, D }, { mask });
    for (const dtype of ["f32", "f16"] as const) {
      await scope(async () => {
        const q = fromArray(qa, [B, T, Hq, D], { dtype });
        const k = fromArray(cacheK, [B, Smax, Hkv, D], { dtype }).slice(1, 0, S);
        const v = fromArray(cacheV, [B, Smax, Hkv, D], { dtype }).slice(1, 0, S);
        const keyMask = fromArray(mask, [B, S]);
        const split = await arr(attention(q, k, v, { keyMask, kernel: "split" }));
        const auto = await arr(attention(q, k, v, { keyMask }));
        const blocked = await arr(attention(q, k, v, { keyMask, kernel: "blocked" }));
        const label = `decode T=${T} S=${S} ${dtype} seed ${seed}`;
        assertClose(split, blocked, { rtol: dtype === "f32" ? 1e-6 : 1e-3, relToMax: true, label });
        assertEquals(Array.from(auto), Array.from(split), `${label}: auto should pick the split kernel`);
        if (dtype === "f32") assertClose(split, want, { rtol: 1e-5, relToMax: true, label: `${label} vs float64` });
      });
    }
  }
});

Deno.test("a query row with no allowed key gives zeros (no NaN), forward and backward", async () => {
  const seed = freshSeed();
  const n = { B: 2, T: 5, S: 5, Hq: 2, Hkv: 1, D: 16 };
  const { q, k, v } = qkvArrays(n, seed);
  const mask = paddingMask(2, 5, [5, 2], [0, 0]); // sequence 0 fully masked; sequence 1 rows 0, 1 masked
  for (const kernel of ["blocked", "split"] as const) {
    await scope(async () => {
      const qt = fromArray(q, [n.B, n.T, n.Hq, n.D], { requiresGrad: true });
      const kt = fromArray(k, [n.B, n.S, n.Hkv, n.D], { requiresGrad: true });
      const vt = fromArray(v, [n.B, n.S, n.Hkv, n.D], { requiresGrad: true });
      const o = attention(qt, kt, vt, { keyMask: fromArray(mask, [n.B, n.S]), kernel });
      const got = await arr(o);
      const row = n.Hq * n.D;
      for (let i = 0; i < got.length; i++) {
        const [b, t] = [Math.floor(i / (n.T * row)), Math.floor(i / row) % n.T];
        if (b === 0 || t < 2) assertEquals(got[i], 0, `element ${i} [${kernel}] seed ${seed}`);
        else assert(Number.isFinite(got[i]) && got[i] !== 0, `element ${i} [${kernel}] seed ${seed}`);
      }
      o.backward(fromArray(randomArray(got.length, seed + 5), o.shape));
      for (const t of [qt, kt, vt]) {
        const g = await arr(t.grad!);
        assert(g.every(Number.isFinite), `non-finite gradient [${kernel}] seed ${seed}`);
      }
      // Sequence 0 sees nothing, so its gradients vanish.
      assert((await arr(qt.grad!)).slice(0, n.T * row).every((x) => x === 0), `dq of masked rows seed ${seed}`);
    });
  }
});

// ---- attention backward ---------------------------------------------------------------------------------------

/** Checks dq, dk, dv of Σ attention(q, k, v)·w against numerical gradients and attentionReference's autograd. */
async function checkBackward(n: Dims, o: RefOpts, seed: number, label: string, extra: AttentionOptions = {}) {
  const { q, k, v } = qkvArrays(n, seed);
  const nq = q.length, nk = k.length;
  const w = randomArray(nq, seed + 3);
  const all = new Float64Array(nq + 2 * nk);
  all.set(q);
  all.set(k, nq);
  all.set(v, nq + nk);
  const num = numericalGrad(
    (x) => dot(attention64(x.subarray(0, nq), x.subarray(nq, nq + nk), x.subarray(nq + nk), n, o), w),
    all,
    1e-5,
  );
  const wants = [num.subarray(0, nq), num.subarray(nq, nq + nk), num.subarray(nq + nk)];
  await scope(async () => {
    const qt = fromArray(q, [n.B, n.T, n.Hq, n.D], { requiresGrad: true });
    const kt = fromArray(k, [n.B, n.S, n.Hkv, n.D], { requiresGrad: true });
    const vt = fromArray(v, [n.B, n.S, n.Hkv, n.D], { requiresGrad: true });
    const wt = fromArray(w, [n.B, n.T, n.Hq, n.D]);
    const opts = { ...toOpts(o, n.B, n.S), ...extra };
    attention(qt, kt, vt, opts).backward(wt);
    const fused = await Promise.all([qt, kt, vt].map((t) => arr(t.grad!)));
    [qt, kt, vt].forEach((t) => t.zeroGrad());
    attentionReference(qt, kt, vt, opts).backward(wt);
    const viaRef = await Promise.all([qt, kt, vt].map((t) => arr(t.grad!)));
    ["dq", "dk", "dv"].forEach((name, i) => {
      assertClose(fused[i], wants[i], { rtol: 1e-4, relToMax: true, label: `${label} ${name} vs numerical` });
      assertClose(fused[i], viaRef[i], { rtol: 1e-4, relToMax: true, label: `${label} ${name} vs reference` });
    });
  });
}

Deno.test("attention backward: dq, dk, dv match numerical gradients of float64 and attentionReference", async () => {
  const seed = freshSeed();
  const n = { ...SMALL, S: 11 };
  await checkBackward(n, { mask: paddingMask(2, 11, [3, 0], [0, 2]) }, seed, `GQA S=11 padded seed ${seed}`);
  await checkBackward(n, { queryOffset: 2, causal: true }, seed + 100, `S=11 offset 2 seed ${seed}`);
  await checkBackward({ ...SMALL, S: 7 }, { causal: false, scale: 0.4 }, seed + 200, `non-causal seed ${seed}`);
});

Deno.test("attention backward over several blocks (T=S=45) with default and small unrolled tiles, D=64", async () => {
  const seed = freshSeed();
  const n = { B: 1, T: 45, S: 45, Hq: 4, Hkv: 2, D: 64 };
  const mask = paddingMask(1, 45, [0], [6]);
  // Small tiles, unrolled by 4 as on real GPUs (lavapipe's default is 1).
  const small: AttentionOptions = { tiles: { forward: [8, 16], dq: [8, 8], dkv: [4, 8] }, unroll: 4 };
  const { q, k, v } = qkvArrays(n, seed);
  const w = randomArray(q.length, seed + 3);
  await scope(async () => {
    const qt = fromArray(q, [n.B, n.T, n.Hq, n.D], { requiresGrad: true });
    const kt = fromArray(k, [n.B, n.S, n.Hkv, n.D], { requiresGrad: true });
    const vt = fromArray(v, [n.B, n.S, n.Hkv, n.D], { requiresGrad: true });
    const wt = fromArray(w, [n.B, n.T, n.Hq, n.D]);
    const keyMask = fromArray(mask, [n.B, n.S]);
    const grads = async (f: () => Tensor) => {
      [qt, kt, vt].forEach((t) => t.zeroGrad());
      const o = f();
      const out = await arr(o);
      o.backward(wt);
      return [out, ...await Promise.all([qt, kt, vt].map((t) => arr(t.grad!)))];
    };
    const ref = await grads(() => attentionReference(qt, kt, vt, { keyMask }));
    assertClose(ref[0], attention64(q, k, v, n, { mask }), { rtol: 1e-5, relToMax: true, label: `ref seed ${seed}` });
    for (const [name, extra] of [["default tiles", {}], ["small tiles", small]] as const) {
      const got = await grads(() => attention(qt, kt, vt, { keyMask, ...extra }));
      ["out", "dq", "dk", "dv"].forEach((what, i) => {
        assertClose(got[i], ref[i], { rtol: 1e-4, relToMax: true, label: `${name} ${what} seed ${seed}` });
      });
    }
  });
});

Deno.test("attention with D=128 (per-device tiles) forward and backward", async () => {
  const seed = freshSeed();
  await checkBackward(
    { B: 1, T: 6, S: 6, Hq: 2, Hkv: 1, D: 128 },
    { mask: paddingMask(1, 6, [1], [0]) },
    seed,
    `D=128 seed ${seed}`,
  );
});

Deno.test("attention gives gradients only to inputs that require them", () => {
  const seed = freshSeed();
  const n = { ...SMALL, S: 7 };
  const { q, k, v } = qkvArrays(n, seed);
  scope(() => {
    const qt = fromArray(q, [n.B, n.T, n.Hq, n.D]);
    const kt = fromArray(k, [n.B, n.S, n.Hkv, n.D], { requiresGrad: true });
    const vt = fromArray(v, [n.B, n.S, n.Hkv, n.D]);
    attention(qt, kt, vt).sum().backward();
    assertEquals(qt.grad, null);
    assertEquals(vt.grad, null);
    assertEquals(kt.grad!.shape, [n.B, n.S, n.Hkv, n.D]);
    const o = noGrad(() => attention(qt, kt, vt));
    assertEquals(o.node, null);
  });
});

Deno.test("attention keeps no T×S buffer for backward (memoryStats)", async () => {
  const seed = freshSeed();
  const n = { B: 1, T: 512, S: 512, Hq: 4, Hkv: 4, D: 16 };
  const probBytes = n.B * n.Hq * n.T * n.S * 4;
  const outBytes = n.B * n.T * n.Hq * n.D * 4;
  const { q, k, v } = qkvArrays(n, seed);
  await scope(async () => {
    const qt = fromArray(q, [n.B, n.T, n.Hq, n.D], { requiresGrad: true });
    const kt = fromArray(k, [n.B, n.S, n.Hkv, n.D], { requiresGrad: true });
    const vt = fromArray(v, [n.B, n.S, n.Hkv, n.D], { requiresGrad: true });
    const g = fromArray(randomArray(q.length, seed + 3), qt.shape);
    // The measurement can see a T×S buffer: the reference keeps its probabilities for backward.
    const refKept = scope(() => {
      const before = memoryStats().liveBytes;
      attentionReference(qt, kt, vt);
      return memoryStats().liveBytes - before;
    });
    assert(refKept >= probBytes, `reference keeps ${refKept} bytes, expected ≥ ${probBytes}`);
    const start = memoryStats().liveBytes;
    const o = attention(qt, kt, vt);
    const kept = memoryStats().liveBytes - start;
    // O itself plus the f32 logsumexp per row (B·Hq·T floats); nothing of size T×S.
    assertLess(kept, outBytes + n.B * n.Hq * n.T * 4 + 4096);
    resetPeakMemory();
    const base = memoryStats().liveBytes;
    o.backward(g);
    const peak = memoryStats().peakBytes - base;
    assertLess(peak, probBytes / 2, `backward peak ${peak} bytes`);
    assert((await arr(qt.grad!)).every(Number.isFinite));
  });
});

Deno.test("attention rejects bad inputs with clear errors", () => {
  scope(() => {
    const q = fromArray(new Float32Array(2 * 3 * 3 * 4), [2, 3, 3, 4]);
    const k = fromArray(new Float32Array(2 * 3 * 2 * 4), [2, 3, 2, 4]);
    assertThrows(() => attention(q, k, k), Error, "not a multiple");
    const k1 = fromArray(new Float32Array(2 * 3 * 1 * 4), [2, 3, 1, 4]);
    assertThrows(() => attention(q, k1, k1, { keyMask: fromArray(new Float32Array(6), [2, 3]) }), Error, "i32 or u32");
    assertThrows(() => attention(q, k1, k1, { keyMask: fromArray(new Int32Array(4), [2, 2]) }), Error, "[B, S]");
    assertThrows(() => attention(q, k1, fromArray(new Float32Array(2 * 4 * 4), [2, 4, 1, 4])), Error, "do not match");
  });
});
