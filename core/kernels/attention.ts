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
 *   in workgroup memory; for each block of BK keys it stages K, computes the BQ×BK scores, updates the running
 *   row max m and sum l (online softmax), stages V into the same buffer and accumulates O += P·V in registers
 *   (rescaled by exp(m_old − m_new)). Key blocks wholly after the causal frontier are skipped. Writes O / l and
 *   the row logsumexp m + log l (f32 [B, Hq, T]). A row with no allowed key writes zeros and lse = 3e38 (FA2
 *   writes +∞), so exp(s − lse) = 0 there.
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
 * Workgroup memory rows are padded to D + 1 words so that threads reading different rows of the same column hit
 * different banks. Per-block accumulators declared inside loops carry an explicit `= array<f32, N>()`: wgpu's
 * naga (as shipped in Deno 2.9) zeroes a loop-local `var` without initializer only once, at function entry
 * (gfx-rs/wgpu#9489, fixed upstream by #9592), which silently sums scores across key blocks.
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

/** Word index of each uniform field. */
export const ATTENTION_FIELD_INDEX: Readonly<Record<string, number>> = Object.fromEntries(
  ATTENTION_FIELDS.map(([name], i) => [name, i]),
);

/** Tile sizes of the blocked kernels: query rows per block, keys per block, threads per workgroup. */
export interface AttentionTiles {
  /** Query rows per block (a power of two). */
  BQ: number;
  /** Keys per block (a power of two). */
  BK: number;
  /** Threads per workgroup (a power of two ≤ BQ·BK). */
  NT: number;
}

/** Which blocked kernel a tile choice is for. */
export type AttentionKernelKind = "forward" | "dq" | "dkv";

/** Workgroup memory, in bytes, the blocked kernel `kind` needs for head size D and tiles (BQ, BK). */
export function attentionSharedBytes(kind: AttentionKernelKind, D: number, BQ: number, BK: number): number {
  const DP = D + 1;
  const words = kind === "forward"
    ? (BQ + BK) * DP + BQ * BK + 3 * BQ + BK
    : kind === "dq"
    ? (2 * BQ + BK) * DP + BQ * BK + 2 * BQ + BK
    : (2 * BK + 2 * BQ) * DP + 2 * BQ * BK + 2 * BQ + BK;
  return 4 * words;
}

const CANDIDATES: Record<AttentionKernelKind, [number, number][]> = {
  // [BQ, BK], best first.
  forward: [[16, 32], [16, 16], [8, 16], [8, 8], [4, 8], [4, 4]],
  dq: [[16, 32], [16, 16], [8, 16], [8, 8], [4, 8], [4, 4]],
  dkv: [[16, 16], [8, 16], [8, 8], [4, 8], [4, 4]],
};

/**
 * The largest tiles of the preferred shapes whose workgroup memory fits `maxSharedBytes` (the device's
 * `maxComputeWorkgroupStorageSize`); throws when even 4×4 tiles do not fit (a head size far above 1000).
 */
export function chooseAttentionTiles(kind: AttentionKernelKind, D: number, maxSharedBytes: number): AttentionTiles {
  for (const [BQ, BK] of CANDIDATES[kind]) {
    if (attentionSharedBytes(kind, D, BQ, BK) <= maxSharedBytes) return { BQ, BK, NT: Math.min(128, BQ * BK) };
  }
  throw new Error(
    `attention: head size ${D} needs more workgroup memory than this GPU offers (${maxSharedBytes} bytes) ` +
      "even with 4×4 tiles",
  );
}

/** How NT threads share an R×C tile: thread t owns rows t/TX + TY·i (i < RR) and columns t%TX + TX·j (j < CC). */
export interface TileMap {
  /** Rows and columns of the tile. */
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

/**
 * Splits an R×C tile over NT threads (R and NT powers of two): the split with the least idle work, then the
 * fewest loads per multiply-add (RR + CC).
 */
export function tileMap(R: number, C: number, NT: number): TileMap {
  let best: TileMap | null = null;
  let bestWaste = Infinity, bestLoads = Infinity;
  for (let TX = 1; TX <= NT; TX *= 2) {
    const TY = NT / TX;
    if (TY > R) continue;
    const RR = R / TY, CC = Math.ceil(C / TX);
    const waste = RR * CC * NT - R * C;
    if (waste < bestWaste || (waste === bestWaste && RR + CC < bestLoads)) {
      best = { R, C, TX, TY, RR, CC };
      bestWaste = waste;
      bestLoads = RR + CC;
    }
  }
  if (!best) throw new Error(`tileMap: cannot split ${R}×${C} over ${NT} threads`);
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

/** The row index of owned element i of map `m` named `n` (clamped into the tile when the split overhangs). */
function rowOf(n: string, m: TileMap, i: string): string {
  return `(${n}R0 + ${i} * ${m.TY}u)`;
}
function colOf(n: string, m: TileMap, j: string, clamp: boolean): string {
  const c = `(${n}C0 + ${j} * ${m.TX}u)`;
  return clamp && m.CC * m.TX !== m.C ? `min(${c}, ${m.C - 1}u)` : c;
}

function mapStart(n: string, m: TileMap): string {
  return `let ${n}R0 = tid / ${m.TX}u; let ${n}C0 = tid % ${m.TX}u;`;
}

/** `acc[i·CC + j] += Σ_k A(row_i, k) · B(k, col_j)` over the elements thread `tid` owns. */
function tileProduct(
  n: string,
  m: TileMap,
  acc: string,
  K: string,
  a: (r: string, k: string) => string,
  b: (k: string, c: string) => string,
): string {
  return `for (var kk = 0u; kk < ${K}; kk++) {
    var av = array<f32, ${m.RR}>();
    for (var i = 0u; i < ${m.RR}u; i++) { av[i] = ${a(rowOf(n, m, "i"), "kk")}; }
    for (var j = 0u; j < ${m.CC}u; j++) {
      let bv = ${b("kk", colOf(n, m, "j", true))};
      for (var i = 0u; i < ${m.RR}u; i++) { ${acc}[i * ${m.CC}u + j] += av[i] * bv; }
    }
  }`;
}

/** Runs `body` for each owned element (r, c, accumulator index a), skipping columns past the tile. */
function forOwned(n: string, m: TileMap, body: string): string {
  const guard = m.CC * m.TX !== m.C;
  return `for (var i = 0u; i < ${m.RR}u; i++) {
    let r = ${rowOf(n, m, "i")};
    for (var j = 0u; j < ${m.CC}u; j++) {
      let c = ${colOf(n, m, "j", false)};
      let a = i * ${m.CC}u + j;
      ${guard ? `if (c < ${m.C}u) {` : "{"} ${body} }
    }
  }`;
}

/** Stages rows `row0 .. row0+R` of a strided [B, *, H, D] tensor into `dst` ([R][D+1]), times `scale`, zero past `n`. */
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
  return `for (var e = tid; e < ${R * D}u; e += ${NT}u) {
    let rr = e / ${D}u; let d = e % ${D}u; let at = ${row0} + rr;
    var v = 0.0;
    if (at < ${n}) { v = ${ld}(${idx}(b, at, ${head}, d))${scale}; }
    ${dst}[rr * ${D + 1}u + d] = v;
  }`;
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

function head(spec: AttentionKernelSpec, extra: { g?: DType; o?: DType } = {}): string {
  const lines = [loadF32Fn("ldq", "qb", spec.q), loadF32Fn("ldk", "kb", spec.k), loadF32Fn("ldv", "vb", spec.v)];
  if (extra.g) lines.push(loadF32Fn("ldg", "gb", extra.g));
  if (extra.o) lines.push(loadF32Fn("ldo", "ob", extra.o));
  return `${lines.join("\n")}
${indexFns(spec.mask)}
const NEG = -1.0e30;
const BIG = 3.0e38;`;
}

/** Binding declarations in order, starting at @binding(1); returns WGSL and the binding kinds. */
function bindings(list: [string, DType | "f32", "read" | "read_write"][]): {
  decls: string;
  kinds: ("read" | "write")[];
} {
  return {
    decls: list.map(([n, t, a], i) => storageDecl(i + 1, n, t, a)).join("\n"),
    kinds: list.map(([, , a]) => (a === "read" ? "read" : "write")),
  };
}

function qkvBindings(spec: AttentionKernelSpec): [string, DType, "read"][] {
  return [["qb", spec.q, "read"], ["kb", spec.k, "read"], ["vb", spec.v, "read"]];
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
  const { BQ, BK, NT } = spec.tiles;
  const DP = D + 1;
  const S = tileMap(BQ, BK, NT);
  const O = tileMap(BQ, D, NT);
  const bind = bindings([
    ...qkvBindings(spec),
    ...(spec.mask ? [["kmask", "u32", "read"] as [string, DType, "read"]] : []),
    ["outb", spec.out, "read_write"],
    ["lse", "f32", "read_write"],
  ]);
  const write = spec.out === "f16"
    ? `for (var w = tid; w < ${(BQ * D) / 2}u; w += ${NT}u) {
    let rr = w / ${D / 2}u; let c2 = w % ${D / 2}u; let t = q0 + rr;
    if (t < p.T) { outb[(((b * p.T + t) * p.H + h) * ${D}u) / 2u + c2] = packF16(Qs[rr * ${DP}u + 2u * c2], Qs[rr * ${DP}u + 2u * c2 + 1u]); }
  }`
    : `for (var e = tid; e < ${BQ * D}u; e += ${NT}u) {
    let rr = e / ${D}u; let d = e % ${D}u; let t = q0 + rr;
    if (t < p.T) { outb[((b * p.T + t) * p.H + h) * ${D}u + d] = Qs[rr * ${DP}u + d]; }
  }`;
  const code = `${paramsStruct()}
${bind.decls}
${head(spec)}
${PACK_F16}
var<workgroup> Qs: array<f32, ${BQ * DP}>;
var<workgroup> KVs: array<f32, ${BK * DP}>;
var<workgroup> Ps: array<f32, ${BQ * BK}>;
var<workgroup> rowM: array<f32, ${BQ}>;
var<workgroup> rowL: array<f32, ${BQ}>;
var<workgroup> rowA: array<f32, ${BQ}>;
var<workgroup> kOk: array<u32, ${BK}>;
@compute @workgroup_size(${NT})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
  let q0 = wid.x * ${BQ}u;
  let h = wid.y;
  let b = wid.z;
  let hk = h / p.G;
  ${mapStart("s", S)}
  ${mapStart("o", O)}
  ${stageRows("Qs", BQ, D, NT, "ldq", "qIdx", "q0", "p.T", "h", " * p.scale")}
  if (tid < ${BQ}u) { rowM[tid] = NEG; rowL[tid] = 0.0; }
  var acc: array<f32, ${O.RR * O.CC}>;
  var kEnd = p.S;
  if (p.causal != 0u) {
    // The last query row of this block sees keys up to its position + qoff.
    kEnd = u32(clamp(i32(min(q0 + ${BQ}u, p.T)) + p.qoff, 0, i32(p.S)));
  }
  for (var k0 = 0u; k0 < kEnd; k0 += ${BK}u) {
    workgroupBarrier();
    ${stageRows("KVs", BK, D, NT, "ldk", "kIdx", "k0", "p.S", "hk")}
    if (tid < ${BK}u) { kOk[tid] = select(0u, 1u, keyOk(b, k0 + tid)); }
    workgroupBarrier();
    var sc = array<f32, ${S.RR * S.CC}>();
    ${tileProduct("s", S, "sc", `${D}u`, (r, k) => `Qs[${r} * ${DP}u + ${k}]`, (k, c) => `KVs[${c} * ${DP}u + ${k}]`)}
    ${forOwned("s", S, `Ps[r * ${BK}u + c] = sc[a];`)}
    workgroupBarrier();
    ${stageRows("KVs", BK, D, NT, "ldv", "vIdx", "k0", "p.S", "hk")}
    if (tid < ${BQ}u) {
      // Online softmax: new running max, rescale factor for the old sum and accumulator, probabilities.
      let t = q0 + tid;
      let mOld = rowM[tid];
      var mNew = mOld;
      for (var c = 0u; c < ${BK}u; c++) {
        if (kOk[c] != 0u && causalOk(t, k0 + c)) { mNew = max(mNew, Ps[tid * ${BK}u + c]); }
      }
      var sum = 0.0;
      for (var c = 0u; c < ${BK}u; c++) {
        var e = 0.0;
        if (kOk[c] != 0u && causalOk(t, k0 + c)) { e = exp(Ps[tid * ${BK}u + c] - mNew); }
        Ps[tid * ${BK}u + c] = e;
        sum += e;
      }
      let alpha = exp(mOld - mNew);
      rowA[tid] = alpha;
      rowM[tid] = mNew;
      rowL[tid] = rowL[tid] * alpha + sum;
    }
    workgroupBarrier();
    ${forOwned("o", O, "acc[a] *= rowA[r];")}
    ${tileProduct("o", O, "acc", `${BK}u`, (r, k) => `Ps[${r} * ${BK}u + ${k}]`, (k, c) => `KVs[${k} * ${DP}u + ${c}]`)}
  }
  workgroupBarrier();
  ${forOwned("o", O, `let l = rowL[r]; Qs[r * ${DP}u + c] = select(0.0, acc[a] / l, l > 0.0);`)}
  if (tid < ${BQ}u && q0 + tid < p.T) {
    let l = rowL[tid];
    lse[(b * p.H + h) * p.T + q0 + tid] = select(BIG, rowM[tid] + log(l), l > 0.0);
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
    ...qkvBindings(spec),
    ...(spec.mask ? [["kmask", "u32", "read"] as [string, DType, "read"]] : []),
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
      outb[row * ${D / 2}u + w] = packF16(oc0, oc1);
    }`
    : `for (var c = tid; c < ${D}u; c += ${NT}u) {
      ${col("c")}
      outb[row * ${D}u + c] = oc;
    }`;
  const code = `${paramsStruct()}
${bind.decls}
${PACK_F16}
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
  const { BQ, BK, NT } = spec.tiles;
  const DP = D + 1;
  const S = tileMap(BQ, BK, NT);
  const O = tileMap(BQ, D, NT);
  // dS = P ∘ (dP − D), with P recomputed from the scores and the row logsumexp.
  const dsToShared = forOwned(
    "s",
    S,
    `let t = q0 + r;
      var pr = 0.0;
      if (t < p.T && kOk[c] != 0u && causalOk(t, k0 + c)) { pr = exp(sc[a] - rowLse[r]); }
      Ps[r * ${BK}u + c] = pr * (dp[a] - rowD[r]);`,
  );
  const bind = bindings([
    ...qkvBindings(spec),
    ["gb", spec.g, "read"],
    ["stats", "f32", "read"],
    ...(spec.mask ? [["kmask", "u32", "read"] as [string, DType, "read"]] : []),
    ["dq", "f32", "read_write"],
  ]);
  const code = `${paramsStruct()}
${bind.decls}
${head(spec, { g: spec.g })}
var<workgroup> Qs: array<f32, ${BQ * DP}>;
var<workgroup> Gs: array<f32, ${BQ * DP}>;
var<workgroup> KVs: array<f32, ${BK * DP}>;
var<workgroup> Ps: array<f32, ${BQ * BK}>;
var<workgroup> rowLse: array<f32, ${BQ}>;
var<workgroup> rowD: array<f32, ${BQ}>;
var<workgroup> kOk: array<u32, ${BK}>;
@compute @workgroup_size(${NT})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
  let q0 = wid.x * ${BQ}u;
  let h = wid.y;
  let b = wid.z;
  let hk = h / p.G;
  ${mapStart("s", S)}
  ${mapStart("o", O)}
  ${stageRows("Qs", BQ, D, NT, "ldq", "qIdx", "q0", "p.T", "h", " * p.scale")}
  ${stageRows("Gs", BQ, D, NT, "ldg", "gIdx", "q0", "p.T", "h")}
  if (tid < ${BQ}u) {
    let r = (b * p.H + h) * p.T + min(q0 + tid, p.T - 1u);
    rowLse[tid] = stats[2u * r];
    rowD[tid] = stats[2u * r + 1u];
  }
  var acc: array<f32, ${O.RR * O.CC}>;
  var kEnd = p.S;
  if (p.causal != 0u) { kEnd = u32(clamp(i32(min(q0 + ${BQ}u, p.T)) + p.qoff, 0, i32(p.S))); }
  for (var k0 = 0u; k0 < kEnd; k0 += ${BK}u) {
    workgroupBarrier();
    ${stageRows("KVs", BK, D, NT, "ldv", "vIdx", "k0", "p.S", "hk")}
    if (tid < ${BK}u) { kOk[tid] = select(0u, 1u, keyOk(b, k0 + tid)); }
    workgroupBarrier();
    var dp = array<f32, ${S.RR * S.CC}>();
    ${tileProduct("s", S, "dp", `${D}u`, (r, k) => `Gs[${r} * ${DP}u + ${k}]`, (k, c) => `KVs[${c} * ${DP}u + ${k}]`)}
    workgroupBarrier();
    ${stageRows("KVs", BK, D, NT, "ldk", "kIdx", "k0", "p.S", "hk")}
    workgroupBarrier();
    var sc = array<f32, ${S.RR * S.CC}>();
    ${tileProduct("s", S, "sc", `${D}u`, (r, k) => `Qs[${r} * ${DP}u + ${k}]`, (k, c) => `KVs[${c} * ${DP}u + ${k}]`)}
    ${dsToShared}
    workgroupBarrier();
    ${tileProduct("o", O, "acc", `${BK}u`, (r, k) => `Ps[${r} * ${BK}u + ${k}]`, (k, c) => `KVs[${k} * ${DP}u + ${c}]`)}
  }
  ${forOwned("o", O, `let t = q0 + r; if (t < p.T) { dq[((b * p.T + t) * p.H + h) * ${D}u + c] = acc[a] * p.scale; }`)}
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
  const { BQ, BK, NT } = spec.tiles;
  const DP = D + 1;
  const S = tileMap(BQ, BK, NT);
  const KV = tileMap(BK, D, NT);
  // dV += Pᵀ·dO and dK += dSᵀ·(scale·Q): rows of these products are keys j, the reduction runs over queries.
  const dvUpdate = tileProduct(
    "o",
    KV,
    "dv",
    `${BQ}u`,
    (j, k) => `Ps[${k} * ${BK}u + ${j}]`,
    (k, c) => `Gs[${k} * ${DP}u + ${c}]`,
  );
  const dkUpdate = tileProduct(
    "o",
    KV,
    "dk",
    `${BQ}u`,
    (j, k) => `Ds[${k} * ${BK}u + ${j}]`,
    (k, c) => `Qs[${k} * ${DP}u + ${c}]`,
  );
  const pdsToShared = forOwned(
    "s",
    S,
    `let t = q0 + r;
      var pr = 0.0;
      if (t < p.T && kOk[c] != 0u && causalOk(t, k0 + c)) { pr = exp(sc[a] - rowLse[r]); }
      Ps[r * ${BK}u + c] = pr;
      Ds[r * ${BK}u + c] = pr * (dp[a] - rowD[r]);`,
  );
  const writeGrads = forOwned(
    "o",
    KV,
    `let s = k0 + r;
      if (s < p.S) {
        let at = ((b * p.S + s) * p.Hkv + hk) * ${D}u + c;
        dkv[at] = dk[a];
        dkv[nkv + at] = dv[a];
      }`,
  );
  const bind = bindings([
    ...qkvBindings(spec),
    ["gb", spec.g, "read"],
    ["stats", "f32", "read"],
    ...(spec.mask ? [["kmask", "u32", "read"] as [string, DType, "read"]] : []),
    ["dkv", "f32", "read_write"],
  ]);
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
  if (tid < ${BK}u) { kOk[tid] = select(0u, 1u, keyOk(b, k0 + tid)); }
  var dk: array<f32, ${KV.RR * KV.CC}>;
  var dv: array<f32, ${KV.RR * KV.CC}>;
  // With a causal mask, queries before k0 − qoff see none of these keys.
  var qStart = 0u;
  if (p.causal != 0u) { qStart = (u32(clamp(i32(k0) - p.qoff, 0, i32(p.T))) / ${BQ}u) * ${BQ}u; }
  for (var g = 0u; g < p.G; g++) {
    let h = hk * p.G + g;
    for (var q0 = qStart; q0 < p.T; q0 += ${BQ}u) {
      workgroupBarrier();
      ${stageRows("Qs", BQ, D, NT, "ldq", "qIdx", "q0", "p.T", "h", " * p.scale")}
      ${stageRows("Gs", BQ, D, NT, "ldg", "gIdx", "q0", "p.T", "h")}
      if (tid < ${BQ}u) {
        let r = (b * p.H + h) * p.T + min(q0 + tid, p.T - 1u);
        rowLse[tid] = stats[2u * r];
        rowD[tid] = stats[2u * r + 1u];
      }
      workgroupBarrier();
      var sc = array<f32, ${S.RR * S.CC}>();
      var dp = array<f32, ${S.RR * S.CC}>();
      ${tileProduct("s", S, "sc", `${D}u`, (r, k) => `Qs[${r} * ${DP}u + ${k}]`, (k, c) => `Ks[${c} * ${DP}u + ${k}]`)}
      ${tileProduct("s", S, "dp", `${D}u`, (r, k) => `Gs[${r} * ${DP}u + ${k}]`, (k, c) => `Vs[${c} * ${DP}u + ${k}]`)}
      ${pdsToShared}
      workgroupBarrier();
      ${dvUpdate}
      ${dkUpdate}
    }
  }
  let nkv = p.B * p.S * p.Hkv * ${D}u;
  ${writeGrads}
}`;
  return {
    name: `attention_dkv_d${D}_${spec.q}${spec.k}${spec.v}_${spec.g}${spec.mask ? "_mask" : ""}`,
    code,
    bindings: bind.kinds,
    uniforms: true,
  };
}
