/**
 * Fused scaled-dot-product attention kernels (FlashAttention-2 style), forward and backward, all arithmetic in
 * f32 whatever the storage dtype. q is [B, T, Hq, D], k and v are [B, S, Hkv, D], each read through its own
 * strides (views of a fused qkv projection or of a KV cache cost no copy); query head h uses kv head
 * h / (Hq / Hkv). Query t sees key s when the key is not padding (`keyMask[b, s] ≠ 0`) and, if causal,
 * s ≤ t + queryOffset.
 *
 * Kernels (D, the head size, is a compile-time constant; tiles BQ × BK and the thread count NT are parameters
 * chosen per device by {@linkcode chooseAttentionTiles}):
 *
 * - **forward** (grid [⌈T/BQ⌉, Hq, B]): one workgroup per block of BQ query rows of one head. Q (pre-scaled) stays
 *   in workgroup memory; for each block of BK keys it stages K, computes the BQ×BK scores in registers, updates
 *   the running row max m and sum l (online softmax; the per-thread partial maxima and sums meet in workgroup
 *   memory), stages V into the same buffer and accumulates O += P·V in registers (rescaled by exp(m_old − m_new)).
 *   A thread owns the same query rows in the score tile and in the output tile, so it keeps m and l of its rows in
 *   registers. Key blocks wholly after the causal frontier are skipped. Writes O / l and the row logsumexp
 *   m + log l (f32 [B, Hq, T]). A row with no allowed key writes zeros and lse = 3e38 (FlashAttention-2 writes
 *   +∞), so exp(s − lse) = 0 there.
 * - **split** + **combine** (decode, T small, S large; grid [splits, Hq, B·T] then one workgroup per row): each
 *   workgroup scores one query row against a chunk of CH keys, writing the chunk's unnormalised P·V, max and
 *   sum; the combine rescales the chunks to the global max and normalises. Same results, parallel over keys.
 * - **row stats** (backward): Dᵢ = rowsum(dO ∘ O), stored next to the lse as [B, Hq, T, 2].
 * - **dQ** (grid [⌈T/BQ⌉, Hq, B]): per query block, loops over key blocks recomputing P = exp(S − lse) and
 *   dP = dO·Vᵀ, forms dS = P ∘ (dP − D) and accumulates dQ = scale · dS·K.
 * - **dK/dV** (grid [⌈S/BK⌉, Hkv, B]): per key block of one kv head, loops over the G query heads that share it
 *   and over their query blocks, accumulating dV = Pᵀ·dO and dK = scale · dSᵀ·Q in registers. Each key block
 *   is owned by one workgroup, so no atomics are needed.
 *
 * Code generation: every loop over a thread's fragment (its rows × columns of a tile) and every staging loop is
 * unrolled here in TypeScript, so the WGSL indexes the per-thread accumulators only with constants (naga clamps
 * each dynamic index, and a dynamically indexed private array is not kept in registers: on the H200 the first,
 * loop-based version of these kernels ran 10–100× slower). Workgroup-memory rows are padded to D + 1 words so
 * that threads reading different rows of one column hit different banks. Accumulators declared inside loops carry
 * an explicit `= array<f32, N>()`: the naga in Deno 2.9 zeroes a loop-local `var` without initializer only once,
 * at function entry (gfx-rs/wgpu#9489, fixed upstream by #9592), which would silently sum across key blocks.
 *
 * @example
 * ```ts
 * import { attentionForwardKernel, chooseAttentionTiles } from "./attention.ts";
 * const tiles = chooseAttentionTiles("forward", 64, 32768);
 * const src = attentionForwardKernel({ D: 64, q: "f32", k: "f32", v: "f32", out: "f32", mask: false, tiles });
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import type { KernelSource } from "../gpu.ts";
import { loadF32Fn, PACK_F16, storageDecl } from "./common.ts";
import { ROUND_F16_WGSL } from "./rope.ts";

/**
 * Uniform fields shared by every attention kernel, in word order (all 32-bit): sizes, the causal flag, the query
 * offset (i32), the softmax scale (f32), offset and four strides of q, k, v, dO (`g`) and O (`o`), offset and two
 * strides of the key mask, the number of key chunks of the split kernel, and the row count of the combine.
 */
export const ATTENTION_FIELDS: readonly [string, "u32" | "i32" | "f32"][] = [
  ["B", "u32"],
  ["T", "u32"],
  ["S", "u32"],
  ["H", "u32"],
  ["Hkv", "u32"],
  ["G", "u32"],
  ["causal", "u32"],
  ["qoff", "i32"],
  ["scale", "f32"],
  ...(["q", "k", "v", "g", "o"].flatMap((n) =>
    [`${n}o`, `${n}sb`, `${n}st`, `${n}sh`, `${n}sd`].map((f) => [f, "u32"] as [string, "u32"])
  )),
  ["mo", "u32"],
  ["msb", "u32"],
  ["mss", "u32"],
  ["nsplit", "u32"],
  ["rows", "u32"],
];

/** Tile sizes of the blocked kernels: query rows per block, keys per block, threads per workgroup. */
export interface AttentionTiles {
  /** Query rows per block (a power of two). */
  BQ: number;
  /** Keys per block (a power of two). */
  BK: number;
  /** Threads per workgroup (a power of two ≤ BQ·BK). */
  NT: number;
  /** Unroll factor of the loops over the reduction index of the tile products (code size vs. issue overhead). */
  unroll: number;
}

/** Which blocked kernel a tile choice is for. */
export type AttentionKernelKind = "forward" | "dq" | "dkv";

/**
 * Default threads per workgroup for BQ×BK tiles: one score per thread up to 256 (on the H200, 256 threads ran
 * the three blocked kernels 1.4× faster than 128 at the LLaMA-7B training shape, and 64 twice as slow).
 */
export function defaultThreads(BQ: number, BK: number): number {
  return Math.min(256, BQ * BK);
}

/** Workgroup memory, in bytes, the blocked kernel `kind` needs for head size D and tiles (BQ, BK). */
export function attentionSharedBytes(kind: AttentionKernelKind, D: number, BQ: number, BK: number): number {
  const DP = D + 1;
  const NT = defaultThreads(BQ, BK);
  const words = kind === "forward"
    ? (BQ + BK) * DP + BQ * BK + 2 * BQ * rowMaps(BQ, BK, D, NT).s.TX + BK
    : kind === "dq"
    ? (2 * BQ + BK) * DP + BQ * BK + BK
    : (2 * BK + 2 * BQ) * DP + 2 * BQ * BK + 2 * BQ + BK;
  return 4 * words;
}

const CANDIDATES: Record<AttentionKernelKind, [number, number][]> = {
  // [BQ, BK], best first. On the H200 at B=8, T=64, H=32, D=128, f16, causal, 256 threads: forward 0.10 ms,
  // dQ 0.31 ms, dK/dV 0.35 ms with these first choices; [16, 32] tiles with 128 threads took 0.27 / 0.42 / 0.55.
  forward: [[16, 16], [16, 8], [8, 16], [8, 8], [4, 8], [4, 4]],
  dq: [[16, 16], [8, 16], [16, 8], [8, 8], [4, 8], [4, 4]],
  dkv: [[16, 16], [8, 32], [8, 16], [8, 8], [4, 8], [4, 4]],
};

/** Threads per attention workgroup on a CPU adapter: one 256-bit SIMD vector of f32 lanes (lavapipe's width). */
export const CPU_ATTENTION_THREADS = 8;

/**
 * The first of the preferred tile shapes whose workgroup memory fits `maxSharedBytes` (the device's
 * `maxComputeWorkgroupStorageSize`); throws when even 4×4 tiles do not fit (a head size far above 1000). On a CPU
 * adapter (`cpu`) the same tiles run with {@linkcode CPU_ATTENTION_THREADS} threads: lavapipe executes a workgroup
 * wider than its SIMD width in chunks at every barrier, and mini-llama's attention (8 × 8 heads of 8, 48 tokens)
 * took 11 ms for forward + backward with [16, 16] tiles and 8 threads, 57 ms with 256 threads.
 */
export function chooseAttentionTiles(
  kind: AttentionKernelKind,
  D: number,
  maxSharedBytes: number,
  cpu = false,
): AttentionTiles {
  for (const [BQ, BK] of CANDIDATES[kind]) {
    if (attentionSharedBytes(kind, D, BQ, BK) <= maxSharedBytes) {
      return { BQ, BK, NT: cpu ? CPU_ATTENTION_THREADS : defaultThreads(BQ, BK), unroll: 4 };
    }
  }
  throw new Error(
    `attention: head size ${D} needs more workgroup memory than this GPU offers (${maxSharedBytes} bytes) ` +
      "even with 4×4 tiles",
  );
}

/** How NT threads share an R×C tile: thread t owns rows t/TX + TY·i (i < RR) and columns t%TX + TX·j (j < CC). */
export interface TileMap {
  /** Rows of the tile. */
  R: number;
  /** Columns of the tile. */
  C: number;
  /** Threads along columns. */
  TX: number;
  /** Threads along rows (TX·TY = NT). */
  TY: number;
  /** Rows per thread. */
  RR: number;
  /** Columns per thread. */
  CC: number;
}

function mapWith(R: number, C: number, NT: number, TX: number): TileMap {
  const TY = NT / TX;
  return { R, C, TX, TY, RR: R / TY, CC: Math.ceil(C / TX) };
}

/**
 * Splits an R×C tile over NT threads (R and NT powers of two): the split with the least idle work, then the
 * fewest loads per multiply-add (RR + CC).
 */
export function tileMap(R: number, C: number, NT: number): TileMap {
  let best: TileMap | null = null;
  let bestWaste = Infinity, bestLoads = Infinity;
  for (let TX = 1; TX <= NT; TX *= 2) {
    if (NT / TX > R) continue;
    const m = mapWith(R, C, NT, TX);
    const waste = m.RR * m.CC * NT - R * C;
    if (waste < bestWaste || (waste === bestWaste && m.RR + m.CC < bestLoads)) {
      best = m;
      bestWaste = waste;
      bestLoads = m.RR + m.CC;
    }
  }
  if (!best) throw new Error(`tileMap: cannot split ${R}×${C} over ${NT} threads`);
  return best;
}

/**
 * Maps of a BQ×BK score tile and a BQ×D output tile that give each thread the same query rows (same TX), chosen
 * for the fewest workgroup-memory loads per multiply-add over both products.
 */
export function rowMaps(BQ: number, BK: number, D: number, NT: number): { s: TileMap; o: TileMap } {
  let best: { s: TileMap; o: TileMap } | null = null, bestCost = Infinity;
  for (let TX = 1; TX <= Math.min(BK, NT); TX *= 2) {
    if (NT / TX > BQ) continue;
    const s = mapWith(BQ, BK, NT, TX), o = mapWith(BQ, D, NT, TX);
    const cost = (s.RR + s.CC) / (s.RR * s.CC) + (o.RR + o.CC) / (o.RR * o.CC) + (o.CC * TX - D) / D;
    if (cost < bestCost) {
      best = { s, o };
      bestCost = cost;
    }
  }
  if (!best) throw new Error(`rowMaps: cannot split ${BQ}×${BK} over ${NT} threads`);
  return best;
}

// ---- WGSL building blocks -----------------------------------------------------------------------------------

function paramsStruct(): string {
  return `struct Params { ${ATTENTION_FIELDS.map(([n, t]) => `${n}: ${t},`).join(" ")} }
@group(0) @binding(0) var<uniform> p: Params;`;
}

/** Index helpers `xIdx(b, t, h, d)` for each strided tensor, the key mask and the causal test. */
function indexFns(mask: boolean): string {
  const idx = (n: string) =>
    `fn ${n}Idx(b: u32, t: u32, h: u32, d: u32) -> u32 { return p.${n}o + b * p.${n}sb + t * p.${n}st + h * p.${n}sh + d * p.${n}sd; }`;
  return `${["q", "k", "v", "g"].map(idx).join("\n")}
fn keyOk(b: u32, s: u32) -> bool {
  if (s >= p.S) { return false; }
  ${mask ? "return kmask[p.mo + b * p.msb + s * p.mss] != 0u;" : "return true;"}
}
fn causalOk(t: u32, s: u32) -> bool { return p.causal == 0u || i32(s) <= i32(t) + p.qoff; }`;
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i);

/** Row `i` of the fragment of map `m` (prefix `n`): `nR0 + i·TY`. */
function rowOf(n: string, m: TileMap, i: number): string {
  return i === 0 ? `${n}R0` : `(${n}R0 + ${i * m.TY}u)`;
}

/** Column `j` of the fragment; clamped into the tile for reads when the split overhangs it. */
function colOf(n: string, m: TileMap, j: number, clamp: boolean): string {
  const c = j === 0 ? `${n}C0` : `(${n}C0 + ${j * m.TX}u)`;
  return clamp && (j + 1) * m.TX > m.C ? `min(${c}, ${m.C - 1}u)` : c;
}

function mapStart(n: string, m: TileMap): string {
  return `let ${n}R0 = tid / ${m.TX}u; let ${n}C0 = tid % ${m.TX}u;`;
}

/**
 * `acc[i·CC + j] += Σ_k A(row_i, k) · B(k, col_j)` over the thread's fragment: a loop over k (unrolled by up to
 * `unroll`) around a fully unrolled RR×CC outer product.
 */
function tileProduct(
  n: string,
  m: TileMap,
  acc: string,
  K: number,
  a: (r: string, k: string) => string,
  b: (k: string, c: string) => string,
  unroll: number,
): string {
  let U = Math.max(1, Math.min(unroll, K));
  while (K % U !== 0) U--;
  const step = (k: string) => {
    const lines = [
      ...range(m.RR).map((i) => `let x${i} = ${a(rowOf(n, m, i), "k")};`),
      ...range(m.CC).map((j) => `let y${j} = ${b("k", colOf(n, m, j, true))};`),
    ];
    for (const i of range(m.RR)) {
      for (const j of range(m.CC)) lines.push(`${acc}[${i * m.CC + j}] += x${i} * y${j};`);
    }
    return `{ let k = ${k};\n      ${lines.join("\n      ")}\n    }`;
  };
  return `for (var kk = 0u; kk < ${K}u; kk += ${U}u) {
    ${range(U).map((u) => step(u === 0 ? "kk" : `kk + ${u}u`)).join("\n    ")}
  }`;
}

/**
 * Runs `body(i, j)` for each element (row i, column j) of the thread's fragment, unrolled, with `r` and `c` in
 * scope and every `[a]` in the body replaced by the element's accumulator index (a literal, so naga neither clamps
 * it nor keeps the accumulator array out of registers); columns past the tile are skipped.
 */
function forOwned(n: string, m: TileMap, body: (i: number, j: number) => string): string {
  const out: string[] = [];
  for (const i of range(m.RR)) {
    for (const j of range(m.CC)) {
      const code = body(i, j).replaceAll("[a]", `[${i * m.CC + j}]`);
      const guarded = (j + 1) * m.TX > m.C ? `if (c < ${m.C}u) { ${code} }` : code;
      out.push(`{ let r = ${rowOf(n, m, i)}; let c = ${colOf(n, m, j, false)};
    ${guarded}
  }`);
    }
  }
  return out.join("\n  ");
}

/** Marks which of the BK keys from k0 may be attended (`kOk`), NT threads striding over them. */
function keyOkLoad(BK: number, NT: number): string {
  return `for (var i = tid; i < ${BK}u; i += ${NT}u) { kOk[i] = select(0u, 1u, keyOk(b, k0 + i)); }`;
}

/** Runs `body` for e = tid, tid + NT, … below `total` (a runtime loop: it indexes only workgroup memory). */
function forStrided(total: number, NT: number, body: string): string {
  return `for (var e = tid; e < ${total}u; e += ${NT}u) {
    ${body}
  }`;
}

/** Stages rows `row0 .. row0+R` of a strided [B, *, H, D] tensor into `dst` ([R][D+1]), × `scale`, 0 past `n`. */
function stageRows(
  dst: string,
  R: number,
  D: number,
  NT: number,
  ld: string,
  idx: string,
  row0: string,
  n: string,
  head: string,
  scale = "",
): string {
  return forStrided(
    R * D,
    NT,
    `let rr = e / ${D}u; let d = e % ${D}u; let at = ${row0} + rr;
    var v = 0.0;
    if (at < ${n}) { v = ${ld}(${idx}(b, at, ${head}, d))${scale}; }
    ${dst}[rr * ${D + 1}u + d] = v;`,
  );
}

/** Common kernel spec. */
export interface AttentionKernelSpec {
  /** Head size. */
  D: number;
  /** q storage dtype. */
  q: DType;
  /** k storage dtype. */
  k: DType;
  /** v storage dtype. */
  v: DType;
  /** Whether a key-padding mask (i32/u32 [B, S]) is bound. */
  mask: boolean;
}

function head(spec: AttentionKernelSpec, extra: { g?: DType } = {}): string {
  const lines = [loadF32Fn("ldq", "qb", spec.q), loadF32Fn("ldk", "kb", spec.k), loadF32Fn("ldv", "vb", spec.v)];
  if (extra.g) lines.push(loadF32Fn("ldg", "gb", extra.g));
  return `${lines.join("\n")}
${indexFns(spec.mask)}
const NEG = -1.0e30;
const BIG = 3.0e38;`;
}

/** Binding declarations in order, starting at @binding(1); returns WGSL and the binding kinds. */
function bindings(list: [string, DType, "read" | "read_write"][]): {
  decls: string;
  kinds: ("read" | "write")[];
} {
  return {
    decls: list.map(([n, t, a], i) => storageDecl(i + 1, n, t, a)).join("\n"),
    kinds: list.map(([, , a]) => (a === "read" ? "read" : "write")),
  };
}

function inputBindings(spec: AttentionKernelSpec, g?: DType): [string, DType, "read"][] {
  const list: [string, DType, "read"][] = [["qb", spec.q, "read"], ["kb", spec.k, "read"], ["vb", spec.v, "read"]];
  if (g) list.push(["gb", g, "read"], ["stats", "f32", "read"]);
  if (spec.mask) list.push(["kmask", "u32", "read"]);
  return list;
}

// ---- forward ----------------------------------------------------------------------------------------------------

/** The blocked forward kernel's spec. */
export interface AttentionForwardSpec extends AttentionKernelSpec {
  /** Output dtype (f16 needs an even D). */
  out: DType;
  /** Tiles. */
  tiles: AttentionTiles;
}

/**
 * Blocked forward. Bindings: q, k, v, [mask], out (contiguous [B, T, Hq, D]), lse (f32 [B, Hq, T]).
 * Dispatch [⌈T/BQ⌉, Hq, B].
 */
export function attentionForwardKernel(spec: AttentionForwardSpec): KernelSource {
  const { D } = spec;
  const { BQ, BK, NT, unroll: U } = spec.tiles;
  const DP = D + 1;
  const { s: S, o: O } = rowMaps(BQ, BK, D, NT);
  const TX = S.TX;
  const bind = bindings([...inputBindings(spec), ["outb", spec.out, "read_write"], ["lse", "f32", "read_write"]]);
  const rows = range(S.RR);
  // S = (scale·Q)·Kᵀ and O += P·V over the thread's fragments.
  const scores = tileProduct(
    "s",
    S,
    "sc",
    D,
    (r, k) => `Qs[${r} * ${DP}u + ${k}]`,
    (k, c) => `KVs[${c} * ${DP}u + ${k}]`,
    U,
  );
  const pv = tileProduct(
    "s",
    O,
    "acc",
    BK,
    (r, k) => `Ps[${r} * ${BK}u + ${k}]`,
    (k, c) => `KVs[${k} * ${DP}u + ${c}]`,
    U,
  );
  const allowed = (i: number, c: string) => `kOk[${c}] != 0u && causalOk(q0 + ${rowOf("s", S, i)}, k0 + ${c})`;
  // Per row: the thread's partial max over its columns of the score tile.
  const partialMax = rows.map((i) =>
    `{ var pm = NEG;
    ${
      range(S.CC).map((j) => `if (${allowed(i, colOf("s", S, j, false))}) { pm = max(pm, sc[${i * S.CC + j}]); }`).join(
        "\n    ",
      )
    }
    pmax[${rowOf("s", S, i)} * ${TX}u + sC0] = pm; }`
  ).join("\n    ");
  // Per row: the new running max, the rescale factor, the probabilities (to Ps) and their partial sum.
  const probs = rows.map((i) =>
    `{ let r = ${rowOf("s", S, i)};
    var mx = m${i};
    for (var u = 0u; u < ${TX}u; u++) { mx = max(mx, pmax[r * ${TX}u + u]); }
    let alpha = exp(m${i} - mx);
    m${i} = mx;
    l${i} *= alpha;
    var ps = 0.0;
    ${
      range(S.CC).map((j) => {
        const c = colOf("s", S, j, false);
        return `{ var e = 0.0; if (${allowed(i, c)}) { e = exp(sc[${
          i * S.CC + j
        }] - mx); } Ps[r * ${BK}u + ${c}] = e; ps += e; }`;
      }).join("\n    ")
    }
    psum[r * ${TX}u + sC0] = ps;
    ${range(O.CC).map((j) => `acc[${i * O.CC + j}] *= alpha;`).join(" ")} }`
  ).join("\n    ");
  const sums = rows.map((i) => `for (var u = 0u; u < ${TX}u; u++) { l${i} += psum[${rowOf("s", S, i)} * ${TX}u + u]; }`)
    .join("\n    ");
  const normalise = forOwned("s", O, (i) => `Qs[r * ${DP}u + c] = select(0.0, acc[a] / l${i}, l${i} > 0.0);`);
  const lseWrite = rows.map((i) =>
    `{ let t = q0 + ${
      rowOf("s", S, i)
    }; if (t < p.T) { lse[(b * p.H + h) * p.T + t] = select(BIG, m${i} + log(l${i}), l${i} > 0.0); } }`
  ).join("\n    ");
  const write = spec.out === "f16"
    ? forStrided(
      (BQ * D) / 2,
      NT,
      `let rr = e / ${D / 2}u; let c2 = e % ${D / 2}u; let t = q0 + rr;
    if (t < p.T) { outb[(((b * p.T + t) * p.H + h) * ${D}u) / 2u + c2] = packF16(r16(Qs[rr * ${DP}u + 2u * c2]), r16(Qs[rr * ${DP}u + 2u * c2 + 1u])); }`,
    )
    : forStrided(
      BQ * D,
      NT,
      `let rr = e / ${D}u; let d = e % ${D}u; let t = q0 + rr;
    if (t < p.T) { outb[((b * p.T + t) * p.H + h) * ${D}u + d] = Qs[rr * ${DP}u + d]; }`,
    );
  const code = `${paramsStruct()}
${bind.decls}
${head(spec)}
${PACK_F16}
${ROUND_F16_WGSL}
var<workgroup> Qs: array<f32, ${BQ * DP}>;
var<workgroup> KVs: array<f32, ${BK * DP}>;
var<workgroup> Ps: array<f32, ${BQ * BK}>;
var<workgroup> pmax: array<f32, ${BQ * TX}>;
var<workgroup> psum: array<f32, ${BQ * TX}>;
var<workgroup> kOk: array<u32, ${BK}>;
@compute @workgroup_size(${NT})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
  let q0 = wid.x * ${BQ}u;
  let h = wid.y;
  let b = wid.z;
  let hk = h / p.G;
  ${mapStart("s", S)}
  ${stageRows("Qs", BQ, D, NT, "ldq", "qIdx", "q0", "p.T", "h", " * p.scale")}
  ${rows.map((i) => `var m${i} = NEG; var l${i} = 0.0;`).join(" ")}
  var acc = array<f32, ${O.RR * O.CC}>();
  var kEnd = p.S;
  if (p.causal != 0u) {
    // The last query row of this block sees keys up to its position + qoff.
    kEnd = u32(clamp(i32(min(q0 + ${BQ}u, p.T)) + p.qoff, 0, i32(p.S)));
  }
  for (var k0 = 0u; k0 < kEnd; k0 += ${BK}u) {
    workgroupBarrier();
    ${stageRows("KVs", BK, D, NT, "ldk", "kIdx", "k0", "p.S", "hk")}
    ${keyOkLoad(BK, NT)}
    workgroupBarrier();
    var sc = array<f32, ${S.RR * S.CC}>();
    ${scores}
    ${partialMax}
    workgroupBarrier();
    ${stageRows("KVs", BK, D, NT, "ldv", "vIdx", "k0", "p.S", "hk")}
    ${probs}
    workgroupBarrier();
    ${sums}
    ${pv}
  }
  workgroupBarrier();
  ${normalise}
  if (sC0 == 0u) {
    ${lseWrite}
  }
  workgroupBarrier();
  ${write}
}`;
  return {
    name: `attention_fwd_d${D}_${spec.q}${spec.k}${spec.v}_${spec.out}${spec.mask ? "_mask" : ""}`,
    code,
    bindings: bind.kinds,
    uniforms: true,
  };
}

// ---- decode: split over keys, then combine ----------------------------------------------------------------------

/** Threads per workgroup of the split and combine kernels. */
export const SPLIT_THREADS = 64;

/** The split-keys kernel's spec. */
export interface AttentionSplitSpec extends AttentionKernelSpec {
  /** Keys per chunk (≤ 256). */
  CH: number;
}

/**
 * Split-keys forward for short queries: one workgroup per (chunk, query head, b·T + t). Bindings: q, k, v, [mask],
 * partial O (f32 [B, T, Hq, nsplit, D], unnormalised), partial stats (f32 [B, T, Hq, nsplit, 2]: max, sum).
 * Dispatch [nsplit, Hq, B·T].
 */
export function attentionSplitKernel(spec: AttentionSplitSpec): KernelSource {
  const { D, CH } = spec;
  const NT = SPLIT_THREADS;
  const KP = Math.max(1, Math.floor(NT / D));
  const bind = bindings([
    ...inputBindings(spec),
    ["opart", "f32", "read_write"],
    ["mlpart", "f32", "read_write"],
  ]);
  const reduce = (op: string) =>
    `for (var st = ${NT / 2}u; st > 0u; st >>= 1u) {
    if (tid < st) { red[tid] = ${op}; }
    workgroupBarrier();
  }`;
  const code = `${paramsStruct()}
${bind.decls}
${head(spec)}
var<workgroup> qs: array<f32, ${D}>;
var<workgroup> sc: array<f32, ${CH}>;
var<workgroup> okS: array<u32, ${CH}>;
var<workgroup> red: array<f32, ${NT}>;
var<workgroup> part: array<f32, ${KP * D}>;
@compute @workgroup_size(${NT})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
  let chunk = wid.x;
  let h = wid.y;
  let b = wid.z / p.T;
  let t = wid.z % p.T;
  let hk = h / p.G;
  let s0 = chunk * ${CH}u;
  for (var d = tid; d < ${D}u; d += ${NT}u) { qs[d] = ldq(qIdx(b, t, h, d)) * p.scale; }
  workgroupBarrier();
  var mx = NEG;
  // One thread per key: it walks the key's row (consecutive words, so each cache line serves it whole). Staging
  // the chunk through workgroup memory for coalesced loads measured 2–3× slower on the H200 at S = 2048.
  for (var j = tid; j < ${CH}u; j += ${NT}u) {
    let s = s0 + j;
    let ok = keyOk(b, s) && causalOk(t, s);
    var v = 0.0;
    if (ok) {
      for (var d = 0u; d < ${D}u; d++) { v += qs[d] * ldk(kIdx(b, s, hk, d)); }
      mx = max(mx, v);
    }
    sc[j] = v;
    okS[j] = select(0u, 1u, ok);
  }
  red[tid] = mx;
  workgroupBarrier();
  ${reduce("max(red[tid], red[tid + st])")}
  let m = red[0];
  workgroupBarrier();
  var sum = 0.0;
  for (var j = tid; j < ${CH}u; j += ${NT}u) {
    var e = 0.0;
    if (okS[j] != 0u) { e = exp(sc[j] - m); }
    sc[j] = e;
    sum += e;
  }
  red[tid] = sum;
  workgroupBarrier();
  ${reduce("red[tid] + red[tid + st]")}
  let l = red[0];
  for (var e = tid; e < ${KP * D}u; e += ${NT}u) {
    let c = e % ${D}u;
    var acc = 0.0;
    for (var j = e / ${D}u; j < ${CH}u; j += ${KP}u) {
      if (okS[j] != 0u) { acc += sc[j] * ldv(vIdx(b, s0 + j, hk, c)); }
    }
    part[e] = acc;
  }
  workgroupBarrier();
  let slot = ((b * p.T + t) * p.H + h) * p.nsplit + chunk;
  for (var c = tid; c < ${D}u; c += ${NT}u) {
    var o = 0.0;
    for (var k = 0u; k < ${KP}u; k++) { o += part[k * ${D}u + c]; }
    opart[slot * ${D}u + c] = o;
  }
  if (tid == 0u) { mlpart[slot * 2u] = m; mlpart[slot * 2u + 1u] = l; }
}`;
  return {
    name: `attention_split_d${D}_c${CH}_${spec.q}${spec.k}${spec.v}${spec.mask ? "_mask" : ""}`,
    code,
    bindings: bind.kinds,
    uniforms: true,
  };
}

/**
 * Combines the chunks of {@linkcode attentionSplitKernel}: one workgroup per row (b, t, h) (grid from `rowGrid`).
 * Bindings: partial O, partial stats, out (contiguous [B, T, Hq, D]), lse (f32 [B, Hq, T]).
 */
export function attentionCombineKernel(spec: { D: number; out: DType }): KernelSource {
  const { D } = spec;
  const NT = SPLIT_THREADS;
  const bind = bindings([
    ["opart", "f32", "read"],
    ["mlpart", "f32", "read"],
    ["outb", spec.out, "read_write"],
    ["lse", "f32", "read_write"],
  ]);
  const col = (c: string) =>
    `var o${c} = 0.0;
      for (var s = 0u; s < p.nsplit; s++) { o${c} += exp(mlpart[(row * p.nsplit + s) * 2u] - mx) * opart[(row * p.nsplit + s) * ${D}u + ${c}]; }
      o${c} = select(0.0, o${c} / l, l > 0.0);`;
  const write = spec.out === "f16"
    ? `for (var w = tid; w < ${D / 2}u; w += ${NT}u) {
      let c0 = 2u * w; let c1 = 2u * w + 1u;
      ${col("c0")}
      ${col("c1")}
      outb[row * ${D / 2}u + w] = packF16(r16(oc0), r16(oc1));
    }`
    : `for (var c = tid; c < ${D}u; c += ${NT}u) {
      ${col("c")}
      outb[row * ${D}u + c] = oc;
    }`;
  const code = `${paramsStruct()}
${bind.decls}
${PACK_F16}
${ROUND_F16_WGSL}
const BIG = 3.0e38;
@compute @workgroup_size(${NT})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) tid: u32) {
  let row = wid.x + wid.y * nwg.x;
  if (row >= p.rows) { return; }
  var mx = -1.0e30;
  for (var s = 0u; s < p.nsplit; s++) { mx = max(mx, mlpart[(row * p.nsplit + s) * 2u]); }
  var l = 0.0;
  for (var s = 0u; s < p.nsplit; s++) {
    l += mlpart[(row * p.nsplit + s) * 2u + 1u] * exp(mlpart[(row * p.nsplit + s) * 2u] - mx);
  }
  ${write}
  if (tid == 0u) {
    let h = row % p.H;
    let bt = row / p.H;
    lse[((bt / p.T) * p.H + h) * p.T + bt % p.T] = select(BIG, mx + log(l), l > 0.0);
  }
}`;
  return { name: `attention_combine_d${D}_${spec.out}`, code, bindings: bind.kinds, uniforms: true };
}

// ---- backward ---------------------------------------------------------------------------------------------------

/**
 * Row statistics for the backward: stats[(b·Hq + h)·T + t] = (lse, Σ_d dO·O). One thread per row (grid from
 * `gridFor(rows, 64)`). Bindings: O (contiguous, offset `p.oo`), dO (strided, `g`), lse, stats.
 */
export function attentionRowStatsKernel(spec: { D: number; o: DType; g: DType }): KernelSource {
  const { D } = spec;
  const bind = bindings([
    ["ob", spec.o, "read"],
    ["gb", spec.g, "read"],
    ["lse", "f32", "read"],
    ["stats", "f32", "read_write"],
  ]);
  const code = `${paramsStruct()}
${bind.decls}
${loadF32Fn("ldo", "ob", spec.o)}
${loadF32Fn("ldg", "gb", spec.g)}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let row = gid.x + gid.y * nwg.x * 64u;
  if (row >= p.rows) { return; }
  let h = row % p.H;
  let bt = row / p.H;
  let t = bt % p.T;
  let b = bt / p.T;
  var acc = 0.0;
  for (var d = 0u; d < ${D}u; d++) {
    acc += ldo(p.oo + row * ${D}u + d) * ldg(p.go + b * p.gsb + t * p.gst + h * p.gsh + d * p.gsd);
  }
  let r = (b * p.H + h) * p.T + t;
  stats[2u * r] = lse[r];
  stats[2u * r + 1u] = acc;
}`;
  return { name: `attention_rowstats_d${D}_${spec.o}_${spec.g}`, code, bindings: bind.kinds, uniforms: true };
}

/** Spec of the backward kernels. */
export interface AttentionBackwardSpec extends AttentionKernelSpec {
  /** dO dtype. */
  g: DType;
  /** Tiles. */
  tiles: AttentionTiles;
}

/**
 * dQ kernel. Bindings: q, k, v, dO, stats, [mask], dq (f32 contiguous [B, T, Hq, D]). Dispatch [⌈T/BQ⌉, Hq, B].
 */
export function attentionBackwardQKernel(spec: AttentionBackwardSpec): KernelSource {
  const { D } = spec;
  const { BQ, BK, NT, unroll: U } = spec.tiles;
  const DP = D + 1;
  const { s: S, o: O } = rowMaps(BQ, BK, D, NT);
  const bind = bindings([...inputBindings(spec, spec.g), ["dq", "f32", "read_write"]]);
  const rows = range(S.RR);
  // dP = dO·Vᵀ, S = (scale·Q)·Kᵀ, dQ += dS·K over the thread's fragments (V, then K, staged in KVs).
  const dpProduct = tileProduct(
    "s",
    S,
    "dp",
    D,
    (r, k) => `Gs[${r} * ${DP}u + ${k}]`,
    (k, c) => `KVs[${c} * ${DP}u + ${k}]`,
    U,
  );
  const scores = tileProduct(
    "s",
    S,
    "sc",
    D,
    (r, k) => `Qs[${r} * ${DP}u + ${k}]`,
    (k, c) => `KVs[${c} * ${DP}u + ${k}]`,
    U,
  );
  const dqUpdate = tileProduct(
    "s",
    O,
    "acc",
    BK,
    (r, k) => `Ps[${r} * ${BK}u + ${k}]`,
    (k, c) => `KVs[${k} * ${DP}u + ${c}]`,
    U,
  );
  // Each thread keeps the logsumexp and D of its query rows in registers.
  const rowStats = rows.map((i) =>
    `var lse${i} = 0.0; var dr${i} = 0.0;
  { let t = q0 + ${
      rowOf("s", S, i)
    }; if (t < p.T) { let x = (b * p.H + h) * p.T + t; lse${i} = stats[2u * x]; dr${i} = stats[2u * x + 1u]; } }`
  ).join("\n  ");
  // dS = P ∘ (dP − D), with P recomputed from the scores and the row logsumexp.
  const dsToShared = forOwned("s", S, (i) =>
    `var pr = 0.0;
    if (kOk[c] != 0u && causalOk(q0 + r, k0 + c)) { pr = exp(sc[a] - lse${i}); }
    Ps[r * ${BK}u + c] = pr * (dp[a] - dr${i});`);
  const write = forOwned(
    "s",
    O,
    () => `let t = q0 + r; if (t < p.T) { dq[((b * p.T + t) * p.H + h) * ${D}u + c] = acc[a] * p.scale; }`,
  );
  const code = `${paramsStruct()}
${bind.decls}
${head(spec, { g: spec.g })}
var<workgroup> Qs: array<f32, ${BQ * DP}>;
var<workgroup> Gs: array<f32, ${BQ * DP}>;
var<workgroup> KVs: array<f32, ${BK * DP}>;
var<workgroup> Ps: array<f32, ${BQ * BK}>;
var<workgroup> kOk: array<u32, ${BK}>;
@compute @workgroup_size(${NT})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
  let q0 = wid.x * ${BQ}u;
  let h = wid.y;
  let b = wid.z;
  let hk = h / p.G;
  ${mapStart("s", S)}
  ${stageRows("Qs", BQ, D, NT, "ldq", "qIdx", "q0", "p.T", "h", " * p.scale")}
  ${stageRows("Gs", BQ, D, NT, "ldg", "gIdx", "q0", "p.T", "h")}
  ${rowStats}
  var acc = array<f32, ${O.RR * O.CC}>();
  var kEnd = p.S;
  if (p.causal != 0u) { kEnd = u32(clamp(i32(min(q0 + ${BQ}u, p.T)) + p.qoff, 0, i32(p.S))); }
  for (var k0 = 0u; k0 < kEnd; k0 += ${BK}u) {
    workgroupBarrier();
    ${stageRows("KVs", BK, D, NT, "ldv", "vIdx", "k0", "p.S", "hk")}
    ${keyOkLoad(BK, NT)}
    workgroupBarrier();
    var dp = array<f32, ${S.RR * S.CC}>();
    ${dpProduct}
    workgroupBarrier();
    ${stageRows("KVs", BK, D, NT, "ldk", "kIdx", "k0", "p.S", "hk")}
    workgroupBarrier();
    var sc = array<f32, ${S.RR * S.CC}>();
    ${scores}
    ${dsToShared}
    workgroupBarrier();
    ${dqUpdate}
  }
  ${write}
}`;
  return {
    name: `attention_dq_d${D}_${spec.q}${spec.k}${spec.v}_${spec.g}${spec.mask ? "_mask" : ""}`,
    code,
    bindings: bind.kinds,
    uniforms: true,
  };
}

/**
 * dK/dV kernel. Bindings: q, k, v, dO, stats, [mask], dkv (f32 [2, B, S, Hkv, D]: dK then dV).
 * Dispatch [⌈S/BK⌉, Hkv, B].
 */
export function attentionBackwardKVKernel(spec: AttentionBackwardSpec): KernelSource {
  const { D } = spec;
  const { BQ, BK, NT, unroll: U } = spec.tiles;
  const DP = D + 1;
  const S = tileMap(BQ, BK, NT);
  const KV = tileMap(BK, D, NT);
  const bind = bindings([...inputBindings(spec, spec.g), ["dkv", "f32", "read_write"]]);
  const pdsToShared = forOwned("s", S, () =>
    `let t = q0 + r;
    var pr = 0.0;
    if (t < p.T && kOk[c] != 0u && causalOk(t, k0 + c)) { pr = exp(sc[a] - rowLse[r]); }
    Ps[r * ${BK}u + c] = pr;
    Ds[r * ${BK}u + c] = pr * (dp[a] - rowD[r]);`);
  const scores = tileProduct(
    "s",
    S,
    "sc",
    D,
    (r, k) => `Qs[${r} * ${DP}u + ${k}]`,
    (k, c) => `Ks[${c} * ${DP}u + ${k}]`,
    U,
  );
  const dpProduct = tileProduct(
    "s",
    S,
    "dp",
    D,
    (r, k) => `Gs[${r} * ${DP}u + ${k}]`,
    (k, c) => `Vs[${c} * ${DP}u + ${k}]`,
    U,
  );
  // dV += Pᵀ·dO and dK += dSᵀ·(scale·Q): rows of these products are keys, the reduction runs over queries.
  const dvUpdate = tileProduct(
    "o",
    KV,
    "dv",
    BQ,
    (j, k) => `Ps[${k} * ${BK}u + ${j}]`,
    (k, c) => `Gs[${k} * ${DP}u + ${c}]`,
    U,
  );
  const dkUpdate = tileProduct(
    "o",
    KV,
    "dk",
    BQ,
    (j, k) => `Ds[${k} * ${BK}u + ${j}]`,
    (k, c) => `Qs[${k} * ${DP}u + ${c}]`,
    U,
  );
  const write = forOwned("o", KV, () =>
    `let s = k0 + r;
    if (s < p.S) {
      let at = ((b * p.S + s) * p.Hkv + hk) * ${D}u + c;
      dkv[at] = dk[a];
      dkv[nkv + at] = dv[a];
    }`);
  const code = `${paramsStruct()}
${bind.decls}
${head(spec, { g: spec.g })}
var<workgroup> Ks: array<f32, ${BK * DP}>;
var<workgroup> Vs: array<f32, ${BK * DP}>;
var<workgroup> Qs: array<f32, ${BQ * DP}>;
var<workgroup> Gs: array<f32, ${BQ * DP}>;
var<workgroup> Ps: array<f32, ${BQ * BK}>;
var<workgroup> Ds: array<f32, ${BQ * BK}>;
var<workgroup> rowLse: array<f32, ${BQ}>;
var<workgroup> rowD: array<f32, ${BQ}>;
var<workgroup> kOk: array<u32, ${BK}>;
@compute @workgroup_size(${NT})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
  let k0 = wid.x * ${BK}u;
  let hk = wid.y;
  let b = wid.z;
  ${mapStart("s", S)}
  ${mapStart("o", KV)}
  ${stageRows("Ks", BK, D, NT, "ldk", "kIdx", "k0", "p.S", "hk")}
  ${stageRows("Vs", BK, D, NT, "ldv", "vIdx", "k0", "p.S", "hk")}
  ${keyOkLoad(BK, NT)}
  var dk = array<f32, ${KV.RR * KV.CC}>();
  var dv = array<f32, ${KV.RR * KV.CC}>();
  // With a causal mask, queries before k0 − qoff see none of these keys.
  var qStart = 0u;
  if (p.causal != 0u) { qStart = (u32(clamp(i32(k0) - p.qoff, 0, i32(p.T))) / ${BQ}u) * ${BQ}u; }
  for (var g = 0u; g < p.G; g++) {
    let h = hk * p.G + g;
    for (var q0 = qStart; q0 < p.T; q0 += ${BQ}u) {
      workgroupBarrier();
      ${stageRows("Qs", BQ, D, NT, "ldq", "qIdx", "q0", "p.T", "h", " * p.scale")}
      ${stageRows("Gs", BQ, D, NT, "ldg", "gIdx", "q0", "p.T", "h")}
      for (var i = tid; i < ${BQ}u; i += ${NT}u) {
        let x = (b * p.H + h) * p.T + min(q0 + i, p.T - 1u);
        rowLse[i] = stats[2u * x];
        rowD[i] = stats[2u * x + 1u];
      }
      workgroupBarrier();
      var sc = array<f32, ${S.RR * S.CC}>();
      var dp = array<f32, ${S.RR * S.CC}>();
      ${scores}
      ${dpProduct}
      ${pdsToShared}
      workgroupBarrier();
      ${dvUpdate}
      ${dkUpdate}
    }
  }
  let nkv = p.B * p.S * p.Hkv * ${D}u;
  ${write}
}`;
  return {
    name: `attention_dkv_d${D}_${spec.q}${spec.k}${spec.v}_${spec.g}${spec.mask ? "_mask" : ""}`,
    code,
    bindings: bind.kinds,
    uniforms: true,
  };
}
