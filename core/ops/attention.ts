/**
 * Rotary position embeddings and fused scaled-dot-product attention for the LLaMA decoder, both differentiable.
 *
 * Layout: activations are [B, T, H, D] ("BTHD", what a linear layer's [B, T, H·D] output is as a view). Inputs are
 * read through their strides, so views of a fused qkv projection or of a KV cache need no copy; outputs are
 * contiguous.
 *
 * - {@linkcode rope}: HF LLaMA rotate-half pairs (i, i + D/2) by default, llama2.c/Meta interleaved pairs
 *   (2i, 2i + 1) on request; angles and their cos/sin in f32 as `transformers` computes them.
 * - {@linkcode attention}: causal and key-padding masks, grouped-query attention, FlashAttention-style kernels
 *   (online softmax forward, recomputing backward: nothing of size T×S is stored), and a split-over-keys kernel
 *   for decoding with a KV cache that `attention` picks when there are few queries.
 * - {@linkcode attentionReference}: the same math as a plain composition of ops, the reference the tests use.
 *
 * @example
 * ```ts
 * import { attention, rope } from "./attention.ts";
 * const q = rope(qProj.view(B, T, 32, 128), positions, { theta: 10000 });
 * const k = rope(kProj.view(B, T, 8, 128), positions, { theta: 10000 });
 * const o = attention(q, k, vProj.view(B, T, 8, 128), { keyMask: attentionMask }); // [B, T, 32, 128]
 * const y = oProj(o.view(B, T, 32 * 128));
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import { record } from "../autograd.ts";
import { fromArray } from "../creation.ts";
import { getGpu, type Gpu, type Kernel, type KernelSource } from "../gpu.ts";
import { gridFor, rowGrid, UniformWriter } from "../kernels/common.ts";
import {
  ATTENTION_FIELDS,
  attentionBackwardKVKernel,
  attentionBackwardQKernel,
  attentionCombineKernel,
  attentionForwardKernel,
  type AttentionKernelKind,
  attentionRowStatsKernel,
  attentionSplitKernel,
  type AttentionTiles,
  chooseAttentionTiles,
  defaultThreads,
} from "../kernels/attention.ts";
import { ROPE_FIELDS, ropeKernel } from "../kernels/rope.ts";
import { keep } from "../scope.ts";
import { contiguousStrides, fmtShape, Tensor } from "../tensor.ts";
import { cast, mul, ne, where } from "./elementwise.ts";
import { matmul } from "./matmul.ts";
import { softmax } from "./softmax.ts";
import { contiguous, expand, permute, reshape, transpose, unsqueeze } from "./shape.ts";

const kernels = new Map<string, Kernel>();
function kernel(make: () => KernelSource, key: string): Kernel {
  let k = kernels.get(key);
  if (!k) kernels.set(key, k = getGpu().kernel(make()));
  return k;
}

function isFloatTensor(t: Tensor): boolean {
  return t.dtype === "f32" || t.dtype === "f16";
}

// ---- rope ---------------------------------------------------------------------------------------------------------

/** Options of {@linkcode rope}. */
export interface RopeOptions {
  /** Base of the inverse frequencies (`rope_theta`: 10000 for LLaMA-2, 500000 for LLaMA-3). */
  theta: number;
  /** Pairs (2i, 2i+1) as llama2.c and Meta's checkpoints; default false: rotate-half pairs (i, i+D/2) as HF. */
  interleaved?: boolean;
}

/**
 * The inverse frequencies `inv_freq[i] = 1 / theta^(2i/D)` for i < D/2, rounded to f32 step by step as
 * `transformers` computes them (`1.0 / (base ** (arange(0, dim, 2).float() / dim))`).
 *
 * @example
 * ```ts
 * const f = ropeInverseFrequencies(128, 10000); // Float32Array(64), f[0] = 1
 * ```
 */
export function ropeInverseFrequencies(headDim: number, theta: number): Float32Array {
  const out = new Float32Array(headDim / 2);
  for (let i = 0; i < out.length; i++) {
    out[i] = Math.fround(1 / Math.fround(Math.pow(theta, Math.fround((2 * i) / headDim))));
  }
  return out;
}

/** inv_freq tables on the GPU, per device and (D, theta); kept (a few hundred bytes each). */
const invFreqTables = new WeakMap<Gpu, Map<string, Tensor>>();
function invFreqTable(D: number, theta: number): Tensor {
  const gpu = getGpu();
  let m = invFreqTables.get(gpu);
  if (!m) invFreqTables.set(gpu, m = new Map());
  const key = `${D}|${theta}`;
  let t = m.get(key);
  if (!t) {
    t = keep(fromArray(ropeInverseFrequencies(D, theta), [D / 2]));
    m.set(key, t);
  }
  return t;
}

/** Rotates `x` ([B, T, H, D], any strides) by `positions`; see the kernel for the math. No gradient. */
function ropeApply(
  x: Tensor,
  positions: Tensor,
  invFreq: Tensor,
  o: { interleaved: boolean; inverse: boolean; out: DType; trig: DType; roundProducts: boolean },
): Tensor {
  const [B, T, H, D] = x.shape;
  const out = Tensor.empty([B, T, H, D], o.out);
  const numel = out.numel;
  if (numel === 0) return out;
  const k = kernel(
    () =>
      ropeKernel({
        input: x.dtype,
        out: o.out,
        trig: o.trig,
        roundProducts: o.roundProducts,
        interleaved: o.interleaved,
      }),
    `rope|${x.dtype}|${o.out}|${o.trig}|${o.roundProducts}|${o.interleaved}`,
  );
  const [psb, pst] = positionStrides(positions, B, T);
  const vals: Record<(typeof ROPE_FIELDS)[number], number> = {
    numel,
    D,
    H,
    T,
    xo: x.offset,
    xsb: x.strides[0],
    xst: x.strides[1],
    xsh: x.strides[2],
    xsd: x.strides[3],
    po: positions.offset,
    psb,
    pst,
    inverse: o.inverse ? 1 : 0,
  };
  const u = new UniformWriter(ROPE_FIELDS.length);
  ROPE_FIELDS.forEach((f, i) => u.u(i, vals[f]));
  const threads = o.out === "f16" ? Math.ceil(numel / 2) : numel;
  getGpu().dispatch(
    k,
    [x.storage.buffer, positions.storage.buffer, invFreq.storage.buffer, out.storage.buffer],
    u.u32,
    gridFor(threads, 256),
  );
  return out;
}

/** Strides (batch, time) with which positions of shape [B, T], [1, T] or [T] are read for a [B, T] grid. */
function positionStrides(positions: Tensor, B: number, T: number): [number, number] {
  if (positions.ndim === 1 && positions.shape[0] === T) return [0, positions.strides[0]];
  if (positions.ndim === 2 && positions.shape[1] === T && (positions.shape[0] === B || positions.shape[0] === 1)) {
    return [positions.shape[0] === 1 ? 0 : positions.strides[0], positions.strides[1]];
  }
  throw new Error(
    `rope: positions of shape ${fmtShape(positions.shape)} do not match x's batch and time [${B}, ${T}]: ` +
      "pass i32 position ids of shape [B, T] (or [T] shared by the batch)",
  );
}

/**
 * Rotary position embedding of `x` ([B, T, H, D], f32 or f16, any strides) at integer `positions` (i32 [B, T],
 * or [T] for every sequence; left-padded batches pass their own position ids). Returns a contiguous tensor of x's
 * shape and dtype. Differentiable in `x` (the gradient is the inverse rotation).
 *
 * By default pairs (i, i + D/2) rotate, as Hugging Face LLaMA's `rotate_half`; `interleaved: true` rotates
 * (2i, 2i + 1) as llama2.c. The angle `position · inv_freq[i]` is an f32 product and its cos/sin are computed in
 * f32 (accurate to ~2 ulp for positions below 131,072), then rounded to x's dtype before multiplying, exactly
 * the order `transformers` uses.
 *
 * @example
 * ```ts
 * const q = rope(qProj.view(B, T, H, D), positionIds, { theta: 10000 });          // HF convention
 * const k = rope(kProj.view(B, T, Hkv, D), positionIds, { theta: 10000, interleaved: true }); // llama2.c
 * ```
 */
export function rope(x: Tensor, positions: Tensor, opts: RopeOptions): Tensor {
  x.assertAlive("rope");
  positions.assertAlive("rope");
  if (x.ndim !== 4 || !isFloatTensor(x)) {
    throw new Error(`rope: x must be a float tensor [B, T, H, D]; got ${x.dtype} ${fmtShape(x.shape)}`);
  }
  const D = x.shape[3];
  if (D % 2 !== 0) throw new Error(`rope: the head size D = ${D} must be even (dimensions rotate in pairs)`);
  if (positions.dtype !== "i32" && positions.dtype !== "u32") {
    throw new Error(`rope: positions must be integer (i32) position ids, got ${positions.dtype}`);
  }
  if (!(opts.theta > 0)) throw new Error(`rope: theta must be a positive number, got ${opts.theta}`);
  const interleaved = opts.interleaved ?? false;
  const table = invFreqTable(D, opts.theta);
  const out = ropeApply(x, positions, table, {
    interleaved,
    inverse: false,
    out: x.dtype,
    trig: x.dtype,
    roundProducts: x.dtype === "f16",
  });
  return record(out, "rope", [x], [positions], (g, [sp]) => [
    ropeApply(g, sp, table, { interleaved, inverse: true, out: x.dtype, trig: x.dtype, roundProducts: false }),
  ]);
}

// ---- attention ------------------------------------------------------------------------------------------------------

/** Options of {@linkcode attention} and {@linkcode attentionReference}. */
export interface AttentionOptions {
  /** Causal mask: query t sees keys s ≤ t + queryOffset. Default true. */
  causal?: boolean;
  /** Key-padding mask, i32 or u32 [B, S]: 1 = attend, 0 = padding. */
  keyMask?: Tensor;
  /** Softmax scale; default 1/√D. */
  scale?: number;
  /** Key position of query 0 (query t sits at key position t + queryOffset); default S − T. */
  queryOffset?: number;
  /**
   * Which forward kernel: "blocked" (tiles of queries × keys), "split" (split over keys, for decoding), or "auto"
   * (default: "split" when T ≤ 4). Both give the same results; the choice exists for tests and benchmarks.
   */
  kernel?: "auto" | "blocked" | "split";
  /** Advanced: tile shapes [BQ, BK] (or [BQ, BK, threads]) per kernel instead of the per-device choice. */
  tiles?: Partial<Record<AttentionKernelKind, [number, number] | [number, number, number]>>;
  /** Advanced: unroll factor of the kernels' inner loops (default 4; 1 on software adapters such as lavapipe). */
  unroll?: number;
}

interface AttnShape {
  B: number;
  T: number;
  S: number;
  Hq: number;
  Hkv: number;
  G: number;
  D: number;
  causal: boolean;
  scale: number;
  qoff: number;
}

function checkAttention(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions, op: string): AttnShape {
  for (const t of [q, k, v]) t.assertAlive(op);
  const names = ["q", "k", "v"];
  [q, k, v].forEach((t, i) => {
    if (t.ndim !== 4 || !isFloatTensor(t)) {
      throw new Error(
        `${op}: ${names[i]} must be a float tensor [B, ${i === 0 ? "T, Hq" : "S, Hkv"}, D]; got ${t.dtype} ${
          fmtShape(t.shape)
        }`,
      );
    }
  });
  const [B, T, Hq, D] = q.shape;
  const [Bk, S, Hkv, Dk] = k.shape;
  if (Bk !== B || Dk !== D || v.shape.some((d, i) => d !== k.shape[i])) {
    throw new Error(
      `${op}: shapes q ${fmtShape(q.shape)}, k ${fmtShape(k.shape)}, v ${fmtShape(v.shape)} do not match: ` +
        "expected q [B, T, Hq, D] and k, v [B, S, Hkv, D]",
    );
  }
  if (Hkv === 0 || Hq % Hkv !== 0) {
    throw new Error(`${op}: ${Hq} query heads are not a multiple of ${Hkv} key/value heads (grouped-query attention)`);
  }
  const m = opts.keyMask;
  if (m) {
    m.assertAlive(op);
    if (m.dtype !== "i32" && m.dtype !== "u32") {
      throw new Error(`${op}: keyMask must be i32 or u32 (1 = attend, 0 = padding), got ${m.dtype}`);
    }
    if (m.ndim !== 2 || m.shape[1] !== S || (m.shape[0] !== B && m.shape[0] !== 1)) {
      throw new Error(`${op}: keyMask of shape ${fmtShape(m.shape)} does not match [B, S] = [${B}, ${S}]`);
    }
  }
  const qoff = opts.queryOffset ?? S - T;
  if (!Number.isInteger(qoff)) throw new Error(`${op}: queryOffset must be an integer, got ${qoff}`);
  const scale = opts.scale ?? 1 / Math.sqrt(D);
  if (!Number.isFinite(scale)) throw new Error(`${op}: scale must be a finite number, got ${scale}`);
  return { B, T, S, Hq, Hkv, G: Hq / Hkv, D, causal: opts.causal ?? true, scale, qoff };
}

function strideFields(t: Tensor, n: string): Record<string, number> {
  return {
    [`${n}o`]: t.offset,
    [`${n}sb`]: t.strides[0],
    [`${n}st`]: t.strides[1],
    [`${n}sh`]: t.strides[2],
    [`${n}sd`]: t.strides[3],
  };
}

function uniforms(a: AttnShape, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | undefined, extra = {}): Uint32Array {
  const vals: Record<string, number> = {
    B: a.B,
    T: a.T,
    S: a.S,
    H: a.Hq,
    Hkv: a.Hkv,
    G: a.G,
    causal: a.causal ? 1 : 0,
    qoff: a.qoff,
    scale: a.scale,
    ...strideFields(q, "q"),
    ...strideFields(k, "k"),
    ...strideFields(v, "v"),
    ...(mask ? { mo: mask.offset, msb: mask.shape[0] === 1 ? 0 : mask.strides[0], mss: mask.strides[1] } : {}),
    ...extra,
  };
  const u = new UniformWriter(ATTENTION_FIELDS.length);
  ATTENTION_FIELDS.forEach(([name, type], i) => {
    const x = vals[name] ?? 0;
    if (type === "f32") u.f(i, x);
    else if (type === "i32") u.i(i, x);
    else u.u(i, x);
  });
  return u.u32;
}

function tilesFor(kind: AttentionKernelKind, D: number, opts: AttentionOptions): AttentionTiles {
  const info = getGpu().info;
  // Software adapters compile big unrolled shaders slowly (seconds each on lavapipe) and run them no faster.
  const unroll = opts.unroll ?? (info.isFallback ? 1 : 4);
  const forced = opts.tiles?.[kind];
  if (forced) {
    const [BQ, BK, NT = defaultThreads(BQ, BK)] = forced;
    const pow2 = (n: number) => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
    if (!pow2(BQ) || !pow2(BK) || !pow2(NT) || NT > BQ * BK) {
      throw new Error(`attention: tiles [${forced.join(", ")}] must be powers of two with threads ≤ BQ·BK`);
    }
    return { BQ, BK, NT, unroll };
  }
  return { ...chooseAttentionTiles(kind, D, info.maxComputeWorkgroupStorageSize, info.isFallback), unroll };
}

const maskBuf = (m: Tensor | undefined) => (m ? [m.storage.buffer] : []);

/** The blocked forward: returns [out, lse]. */
function forwardBlocked(a: AttnShape, q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions): [Tensor, Tensor] {
  const out = Tensor.empty([a.B, a.T, a.Hq, a.D], q.dtype);
  const lse = Tensor.empty([a.B, a.Hq, a.T], "f32");
  const tiles = tilesFor("forward", a.D, opts);
  const mask = opts.keyMask;
  const spec = { D: a.D, q: q.dtype, k: k.dtype, v: v.dtype, out: q.dtype, mask: !!mask, tiles };
  const kn = kernel(() => attentionForwardKernel(spec), `fwd|${JSON.stringify(spec)}`);
  getGpu().dispatch(
    kn,
    [q.storage.buffer, k.storage.buffer, v.storage.buffer, ...maskBuf(mask), out.storage.buffer, lse.storage.buffer],
    uniforms(a, q, k, v, mask),
    [Math.ceil(a.T / tiles.BQ), a.Hq, a.B],
  );
  return [out, lse];
}

/** The split-over-keys forward (decode): returns [out, lse]. */
function forwardSplit(a: AttnShape, q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions): [Tensor, Tensor] {
  const rows = a.B * a.T * a.Hq;
  // Enough chunks to give the GPU ~1000 workgroups, each chunk 32..256 keys.
  const wantSplits = Math.max(1, Math.ceil(1024 / Math.max(rows, 1)));
  const per = Math.ceil(a.S / wantSplits);
  const CH = Math.min(256, Math.max(32, 2 ** Math.ceil(Math.log2(Math.max(per, 1)))));
  const nsplit = Math.max(1, Math.ceil(a.S / CH));
  const mask = opts.keyMask;
  const opart = Tensor.empty([rows * nsplit * a.D], "f32");
  const ml = Tensor.empty([rows * nsplit * 2], "f32");
  const out = Tensor.empty([a.B, a.T, a.Hq, a.D], q.dtype);
  const lse = Tensor.empty([a.B, a.Hq, a.T], "f32");
  const spec = { D: a.D, q: q.dtype, k: k.dtype, v: v.dtype, mask: !!mask, CH };
  const gpu = getGpu();
  const u = uniforms(a, q, k, v, mask, { nsplit, rows });
  gpu.dispatch(
    kernel(() => attentionSplitKernel(spec), `split|${JSON.stringify(spec)}`),
    [q.storage.buffer, k.storage.buffer, v.storage.buffer, ...maskBuf(mask), opart.storage.buffer, ml.storage.buffer],
    u,
    [nsplit, a.Hq, a.B * a.T],
  );
  gpu.dispatch(
    kernel(() => attentionCombineKernel({ D: a.D, out: q.dtype }), `combine|${a.D}|${q.dtype}`),
    [opart.storage.buffer, ml.storage.buffer, out.storage.buffer, lse.storage.buffer],
    u,
    rowGrid(rows),
  );
  opart.dispose();
  ml.dispose();
  return [out, lse];
}

/** Gradients of q, k, v (null where not needed) from the saved forward tensors. */
function backward(
  a: AttnShape,
  g: Tensor,
  [q, k, v, o, lse]: Tensor[],
  mask: Tensor | undefined,
  needs: boolean[],
  opts: AttentionOptions,
): (Tensor | null)[] {
  const gpu = getGpu();
  const rows = a.B * a.T * a.Hq;
  const stats = Tensor.empty([a.B, a.Hq, a.T, 2], "f32");
  const u = uniforms(a, q, k, v, mask, { ...strideFields(g, "g"), oo: o.offset, rows });
  gpu.dispatch(
    kernel(() => attentionRowStatsKernel({ D: a.D, o: o.dtype, g: g.dtype }), `rowstats|${a.D}|${o.dtype}|${g.dtype}`),
    [o.storage.buffer, g.storage.buffer, lse.storage.buffer, stats.storage.buffer],
    u,
    gridFor(rows, 64),
  );
  const ins = [q.storage.buffer, k.storage.buffer, v.storage.buffer, g.storage.buffer, stats.storage.buffer];
  const base = { D: a.D, q: q.dtype, k: k.dtype, v: v.dtype, g: g.dtype, mask: !!mask };
  let dq: Tensor | null = null, dk: Tensor | null = null, dv: Tensor | null = null;
  if (needs[0]) {
    const spec = { ...base, tiles: tilesFor("dq", a.D, opts) };
    dq = Tensor.empty(q.shape, "f32");
    gpu.dispatch(
      kernel(() => attentionBackwardQKernel(spec), `dq|${JSON.stringify(spec)}`),
      [...ins, ...maskBuf(mask), dq.storage.buffer],
      u,
      [Math.ceil(a.T / spec.tiles.BQ), a.Hq, a.B],
    );
  }
  if (needs[1] || needs[2]) {
    const spec = { ...base, tiles: tilesFor("dkv", a.D, opts) };
    const shape = [a.B, a.S, a.Hkv, a.D];
    const n = a.B * a.S * a.Hkv * a.D;
    const dkv = Tensor.empty([2 * n], "f32");
    gpu.dispatch(
      kernel(() => attentionBackwardKVKernel(spec), `dkv|${JSON.stringify(spec)}`),
      [...ins, ...maskBuf(mask), dkv.storage.buffer],
      u,
      [Math.ceil(a.S / spec.tiles.BK), a.Hkv, a.B],
    );
    if (needs[1]) dk = dkv.viewOf(shape, contiguousStrides(shape), 0);
    if (needs[2]) dv = dkv.viewOf(shape, contiguousStrides(shape), n);
    dkv.dispose();
  }
  stats.dispose();
  const as = (t: Tensor | null, like: Tensor) => {
    if (!t || like.dtype === "f32") return t;
    const c = cast(t, like.dtype);
    t.dispose();
    return c;
  };
  return [as(dq, q), as(dk, k), as(dv, v)];
}

/**
 * Fused scaled-dot-product attention: `softmax(scale · q·kᵀ + mask) · v` per head, for q [B, T, Hq, D] and
 * k, v [B, S, Hkv, D] (f32 or f16, any strides; grouped-query attention when Hkv < Hq: query head h uses kv head
 * h / (Hq / Hkv)). Returns [B, T, Hq, D] in q's dtype, contiguous (view it as [B, T, Hq·D] for the output
 * projection). All arithmetic is f32.
 *
 * Masking: with `causal` (default) query t sees keys s ≤ t + queryOffset (default S − T, i.e. the queries are the
 * last T positions of the keys, which is right for training, prefill and cached decoding alike); `keyMask` hides
 * padding keys (right padding in training, left padding in batched generation). A query row that sees no key at
 * all (a left-padding row) outputs zeros.
 *
 * Differentiable in q, k and v (only those that require gradients get them). The backward recomputes the
 * probabilities from the saved per-row logsumexp (FlashAttention-2), so the memory kept for backward is O and
 * B·Hq·T floats, never T×S.
 *
 * @example
 * ```ts
 * // Training: q [B, T, 32, 128], k/v [B, T, 8, 128], right padding in `mask` (i32 [B, T]).
 * const o = attention(q, k, v, { keyMask: mask });
 * // Decoding one token against a KV cache of S positions (views of a preallocated cache).
 * const o1 = attention(q1, kCache.slice(1, 0, S), vCache.slice(1, 0, S), { keyMask: cacheMask.slice(1, 0, S) });
 * ```
 */
export function attention(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions = {}): Tensor {
  const a = checkAttention(q, k, v, opts, "attention");
  if (q.dtype === "f16" && a.D % 2 !== 0) {
    throw new Error(`attention: f16 attention needs an even head size, got D = ${a.D}`);
  }
  const mask = opts.keyMask;
  if (a.B * a.T * a.Hq * a.D === 0) {
    return Tensor.empty([a.B, a.T, a.Hq, a.D], q.dtype);
  }
  const choice = opts.kernel ?? "auto";
  const split = choice === "split" || (choice === "auto" && a.T <= 4);
  const [out, lse] = split ? forwardSplit(a, q, k, v, opts) : forwardBlocked(a, q, k, v, opts);
  const save = [q, k, v, out, lse, ...(mask ? [mask] : [])];
  record(out, "attention", [q, k, v], save, (g, saved, needs) => {
    return backward(a, g, saved, mask ? saved[5] : undefined, needs, opts);
  });
  lse.dispose();
  return out;
}

/**
 * The reference for {@linkcode attention}: the same math as a plain composition of differentiable ops, slow but
 * obviously right. Upcasts to f32; permutes to [B, H, T, D]; repeats each kv head for its query heads; scores =
 * scale · q·kᵀ; disallowed scores → −1e30; softmax; disallowed probabilities → 0 (so a row with no allowed key
 * gives zeros, as the fused kernel); · v; permutes back; casts to q's dtype. Stores the T×S probabilities for
 * backward, which is exactly what the fused kernel avoids.
 *
 * @example
 * ```ts
 * const expected = attentionReference(q, k, v, { keyMask });
 * const actual = attention(q, k, v, { keyMask });
 * ```
 */
export function attentionReference(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions = {}): Tensor {
  const a = checkAttention(q, k, v, opts, "attentionReference");
  // Outside the graph: which (b, t, s) may attend, as u32 [B or 1, 1, T, S].
  const allow = new Uint32Array(a.T * a.S);
  for (let t = 0; t < a.T; t++) {
    for (let s = 0; s < a.S; s++) allow[t * a.S + s] = !a.causal || s <= t + a.qoff ? 1 : 0;
  }
  using causal = fromArray(allow, [1, 1, a.T, a.S]);
  let allowed: Tensor;
  if (opts.keyMask) {
    using nz = ne(opts.keyMask, 0);
    using km = reshape(nz, [opts.keyMask.shape[0], 1, 1, a.S]);
    allowed = mul(causal, km);
  } else {
    allowed = causal.detach();
  }
  using allowedT = allowed;
  // Heads first: [B, H, T or S, D], in f32.
  using qh = headsFirst(q);
  using kh = repeatHeads(headsFirst(k), a.G);
  using vh = repeatHeads(headsFirst(v), a.G);
  using kt = transpose(kh, -2, -1);
  using raw = matmul(qh, kt);
  using scores = mul(raw, a.scale);
  using masked = where(allowedT, scores, -1e30);
  using probs = softmax(masked, -1);
  using kept = where(allowedT, probs, 0);
  using o = matmul(kept, vh); // [B, Hq, T, D]
  using ob = permute(o, [0, 2, 1, 3]);
  const out = contiguous(ob);
  if (q.dtype === "f32") return out;
  const c = cast(out, q.dtype);
  out.dispose();
  return c;
}

/** [B, T, H, D] → [B, H, T, D] in f32 (a view for f32 input). */
function headsFirst(x: Tensor): Tensor {
  if (x.dtype === "f32") return permute(x, [0, 2, 1, 3]);
  using c = cast(x, "f32");
  return permute(c, [0, 2, 1, 3]);
}

/** [B, Hkv, S, D] → [B, Hkv·G, S, D], each kv head repeated for its G query heads (a copy when G > 1). */
function repeatHeads(x: Tensor, G: number): Tensor {
  if (G === 1) return x;
  const [B, Hkv, S, D] = x.shape;
  using u = unsqueeze(x, 2);
  using e = expand(u, [B, Hkv, G, S, D]);
  const r = reshape(e, [B, Hkv * G, S, D]);
  x.dispose();
  return r;
}
