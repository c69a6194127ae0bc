/**
 * Matrix-multiply kernel generators, all with f32 accumulation:
 *
 * - {@linkcode gemmKernel}: the register-tiled GEMM C[b] = alpha·A[b]·B[b] (+ C[b]). One workgroup computes a
 *   BM×BN tile of C; each thread a TM×TN block of it held in registers. K advances BK at a time through
 *   workgroup memory, staged k-major (`As[k][m]`, `Bs[k][n]`) so that every thread reads its A and B fragments as
 *   vec4s. Global loads are vectors of 1–8 elements (vec4<f32>, or 2/4/8 halves packed in u32 words) along
 *   whichever dimension is contiguous, so row-major and transposed operands are both read without a copy. The
 *   pipeline is `direct` (load, barrier, compute, barrier), `regs` (the next tile's global loads are issued into
 *   registers before computing the current one) or `double` (registers plus two workgroup buffers: one barrier
 *   per K step). A split-K index and the batch share the grid's z dimension; the epilogue scales by alpha,
 *   optionally adds the existing C, and writes f32 or packed f16 pairs (each pair owned by one thread).
 * - {@linkcode gemvTKernel}: one-row (up to 4 rows) inputs times a matrix stored [N, K] (`x·Wᵀ`, decoding):
 *   several threads per output row stream the row with 16-byte loads, then reduce in workgroup memory.
 * - {@linkcode gemvNKernel}: one-row inputs times a matrix stored [K, N]: threads own column vectors, slices of
 *   K are reduced in workgroup memory and K is split across workgroups into f32 partials.
 * - {@linkcode gemmFinishKernel}: sums split-K partials, applies alpha / accumulate, and writes f32 or f16 for
 *   any output alignment (f16 words whose other half lies outside the output keep that half).
 *
 * Loops over fragments and K steps are unrolled here, in TypeScript, so that the WGSL indexes registers and
 * workgroup memory only with constants or loop-invariant values (naga clamps every dynamic index it cannot prove).
 *
 * @example
 * ```ts
 * import { gemmKernel, TILE_LARGE } from "./matmul.ts";
 * const src = gemmKernel({
 *   tile: TILE_LARGE, a: "f16", b: "f16", transA: false, transB: true, vecA: 8, vecB: 8,
 *   out: "f16", outVec: 4, accumulate: false,
 * });
 * ```
 * @module
 */
import type { KernelSource } from "../gpu.ts";
import { PACK_F16 } from "./common.ts";

/** The float element types a GEMM reads and writes. */
export type FloatDType = "f32" | "f16";

/** How the K loop overlaps global loads with arithmetic. */
export type GemmPipeline = "direct" | "regs" | "double";

/** Tile shape and pipelining of {@linkcode gemmKernel}. */
export interface TileConfig {
  /** Rows of C per workgroup (multiple of 4·TM/4 threads). */
  bm: number;
  /** Columns of C per workgroup. */
  bn: number;
  /** K step staged through workgroup memory (multiple of 8 keeps every vector width possible). */
  bk: number;
  /** Rows per thread (4 or 8). */
  tm: number;
  /** Columns per thread (4 or 8). */
  tn: number;
  /** Load/compute overlap. */
  pipeline: GemmPipeline;
  /** 0, or the height in tiles of the bands the workgroups walk (better L2 reuse on large outputs). */
  swizzle: number;
  /** Keep f16 operands as f16 in workgroup memory (needs `shader-f16`; arithmetic stays f32). */
  smemF16?: boolean;
}

/** A GEMM kernel variant. */
export interface GemmKernelSpec {
  /** Tile shape and pipelining. */
  tile: TileConfig;
  /** A's dtype. */
  a: FloatDType;
  /** B's dtype. */
  b: FloatDType;
  /** A stored as [K, M] (read transposed). */
  transA: boolean;
  /** B stored as [N, K] (read transposed). */
  transB: boolean;
  /** Elements per global load of A (1, 2, 4; 8 for f16), along A's contiguous dimension. */
  vecA: number;
  /** Elements per global load of B. */
  vecB: number;
  /** C's dtype. f16 needs even ldc, offset and N (pairs owned by one thread). */
  out: FloatDType;
  /** Elements per store: 1 (f32), 2 (f16 pairs) or 4 (needs ldc, offset and N divisible by 4). */
  outVec: number;
  /** C = alpha·A·B + C instead of C = alpha·A·B. */
  accumulate: boolean;
}

/**
 * Uniform words shared by every kernel of this file (unused ones ignored):
 * 0 M, 1 N, 2 K, 3 lda, 4 ldb, 5 ldc, 6 offA, 7 offB, 8 offC, 9 batch stride A, 10 batch stride B,
 * 11 batch stride C, 12 alpha (f32), 13 K per split, 14 splits, 15 split stride of C.
 * Offsets and strides are in elements.
 */
export const GEMM_UNIFORM_WORDS = 16;

const PARAMS = `struct Params { M: u32, N: u32, K: u32, lda: u32, ldb: u32, ldc: u32, offA: u32, offB: u32, offC: u32,
  bsA: u32, bsB: u32, bsC: u32, alpha: f32, kChunk: u32, splits: u32, sstride: u32 }
@group(0) @binding(0) var<uniform> p: Params;`;

/** The tile that measured fastest on the H200 for large outputs: 128×64, 8×8 per thread, 128 threads. */
export const TILE_LARGE: TileConfig = { bm: 128, bn: 64, bk: 8, tm: 8, tn: 8, pipeline: "double", swizzle: 0 };

/** Threads of a tile config. */
export function tileThreads(t: TileConfig): number {
  return (t.bm / t.tm) * (t.bn / t.tn);
}

/** Workgroup-memory bytes a tile config uses. */
export function tileSharedBytes(t: TileConfig, a: FloatDType, b: FloatDType): number {
  const stages = t.pipeline === "double" ? 2 : 1;
  const sa = t.smemF16 && a === "f16" ? 2 : 4;
  const sb = t.smemF16 && b === "f16" ? 2 : 4;
  return stages * t.bk * (t.bm * sa + t.bn * sb);
}

/** A short name for a tile config, e.g. `128x128x8-8x8-double-s8`. */
export function tileName(t: TileConfig): string {
  return `${t.bm}x${t.bn}x${t.bk}-${t.tm}x${t.tn}-${t.pipeline}${t.swizzle ? `-s${t.swizzle}` : ""}${
    t.smemF16 ? "-h" : ""
  }`;
}

/** Throws unless the config is one {@linkcode gemmKernel} can generate. */
export function checkTile(t: TileConfig): void {
  const pow2 = (x: number) => Number.isInteger(x) && x > 0 && (x & (x - 1)) === 0;
  const ok = [t.bm, t.bn, t.bk, t.tm, t.tn].every(pow2) && (t.tm === 4 || t.tm === 8) &&
    (t.tn === 4 || t.tn === 8) && t.bm >= t.tm && t.bn >= t.tn && t.bk >= 4 && t.bk <= 32 &&
    tileThreads(t) >= 16 && tileThreads(t) <= 1024 && t.swizzle >= 0;
  if (!ok) throw new Error(`matmul: invalid tile config ${JSON.stringify(t)}`);
}

function vecType(n: number, s: string): string {
  return n === 1 ? s : `vec${n}<${s}>`;
}

/** Storage element type of an operand read `vw` elements at a time. */
function storageElem(dtype: FloatDType, vw: number): string {
  if (dtype === "f32") return vecType(Math.min(vw, 4), "f32");
  return vw <= 2 ? "u32" : vw === 4 ? "vec2<u32>" : "vec4<u32>";
}

/** log2 of a power of two. */
function lg(x: number): number {
  return Math.round(Math.log2(x));
}

/**
 * WGSL statements loading `vw` consecutive elements starting at element index expression `e` of buffer `buf`
 * into registers `regs` (one vec4 per 4 elements, or one vecN / scalar for fewer), converted to `st`.
 */
function loadInto(buf: string, dtype: FloatDType, vw: number, e: string, st: string, regs: string[]): string {
  if (dtype === "f32") {
    if (vw <= 4) return `${regs[0]} = ${st === "f32" ? "" : vecType(vw, st)}(${buf}[(${e}) >> ${lg(vw)}u]);`;
    return `{ let i = (${e}) >> 2u; ${regs[0]} = ${buf}[i]; ${regs[1]} = ${buf}[i + 1u]; }`; // two vec4
  }
  // (naga does not implement bitcast<vec2<f16>>(u32), so halves are widened and narrowed again; exact)
  const un = (w: string) => st === "f16" ? `vec2<f16>(unpack2x16float(${w}))` : `unpack2x16float(${w})`;
  if (vw === 1) return `{ let i = ${e}; ${regs[0]} = ${un(`${buf}[i >> 1u]`)}[i & 1u]; }`;
  if (vw === 2) return `${regs[0]} = ${un(`${buf}[(${e}) >> 1u]`)};`;
  // The packed temporary is named `pk_` so that it never shadows a destination register (e.g. one named `w`).
  if (vw === 4) {
    return `{ let pk_ = ${buf}[(${e}) >> 2u]; ${regs[0]} = ${vecType(4, st)}(${un("pk_.x")}, ${un("pk_.y")}); }`;
  }
  return `{ let pk_ = ${buf}[(${e}) >> 3u]; ${regs[0]} = ${vecType(4, st)}(${un("pk_.x")}, ${un("pk_.y")}); ${
    regs[1]
  } = ${vecType(4, st)}(${un("pk_.z")}, ${un("pk_.w")}); }`;
}

/** Register names and their declarations for one loaded vector of `vw` elements. */
function regSet(name: string, vw: number, st: string): { regs: string[]; decl: string } {
  const regs = vw === 8 ? [`${name}_0`, `${name}_1`] : [name];
  const t = vecType(Math.min(vw, 4), st);
  return { regs, decl: regs.map((r) => `var ${r}: ${t};`).join(" ") };
}

/** Component `c` of a loaded vector. */
function comp(regs: string[], vw: number, c: number): string {
  if (vw === 1) return regs[0];
  if (vw === 8) return `${regs[c >> 2]}[${c & 3}]`;
  return `${regs[0]}[${c}]`;
}

interface Operand {
  buf: string; // storage buffer name
  smem: string; // workgroup array name
  dtype: FloatDType;
  st: string; // workgroup element scalar type
  vw: number;
  dContig: boolean; // contiguous along M (A) / N (B) rather than along K
  bd: number; // BM or BN
  tileOrigin: string; // tileM / tileN
  extent: string; // p.M / p.N
  ld: string;
  base: string;
}

/** Code pieces that move one operand's tile from global memory into registers and into workgroup memory. */
function loader(op: Operand, bk: number, threads: number) {
  const nv = (bk * op.bd) / op.vw; // vectors per tile
  const per = Math.ceil(nv / threads);
  const guard = nv % threads !== 0;
  const pre: string[] = [];
  const decls: string[] = [];
  const loads: string[] = [];
  const stores: string[] = [];
  const zero = (vw: number) => `${vecType(Math.min(vw, 4), op.st)}()`;
  for (let i = 0; i < per; i++) {
    const id = `${op.buf}${i}`;
    const v = `lid + ${i * threads}u`;
    const rowLen = op.dContig ? op.bd / op.vw : bk / op.vw; // vectors along the contiguous dimension
    // (k, d) of this thread's vector within the tile
    const k = op.dContig ? `(${v}) >> ${lg(rowLen)}u` : `((${v}) & ${rowLen - 1}u) * ${op.vw}u`;
    const d = op.dContig ? `((${v}) & ${rowLen - 1}u) * ${op.vw}u` : `(${v}) >> ${lg(rowLen)}u`;
    pre.push(`let lk${id} = ${k}; let ld${id} = ${d};`);
    const { regs, decl } = regSet(`r${id}`, op.vw, op.st);
    decls.push(decl);
    const gd = `${op.tileOrigin} + ld${id}`;
    const e = op.dContig
      ? `${op.base} + (k0 + lk${id}) * ${op.ld} + ${gd}`
      : `${op.base} + (${gd}) * ${op.ld} + k0 + lk${id}`;
    const cond = `${guard ? `${v} < ${nv}u && ` : ""}k0 + lk${id} < kEnd && ${gd} < ${op.extent}`;
    loads.push(
      `${regs.map((r) => `${r} = ${zero(op.vw)};`).join(" ")}\n    if (${cond}) { ${
        loadInto(op.buf, op.dtype, op.vw, e, op.st, regs)
      } }`,
    );
    // Store: workgroup memory is [stage][k][d/4] of vec4.
    const st: string[] = [];
    if (op.dContig) {
      if (op.vw >= 4) {
        regs.forEach((r, j) => st.push(`${op.smem}[S][lk${id}][(ld${id} >> 2u) + ${j}u] = ${r};`));
      } else {
        for (let c = 0; c < op.vw; c++) {
          st.push(`${op.smem}[S][lk${id}][ld${id} >> 2u][(ld${id} & 3u) + ${c}u] = ${comp(regs, op.vw, c)};`);
        }
      }
    } else {
      for (let c = 0; c < op.vw; c++) {
        st.push(`${op.smem}[S][lk${id} + ${c}u][ld${id} >> 2u][ld${id} & 3u] = ${comp(regs, op.vw, c)};`);
      }
    }
    const body = st.join(" ");
    stores.push(guard ? `if (${v} < ${nv}u) { ${body} }` : body);
  }
  return { pre, decls, loads, stores };
}

/**
 * The fully unrolled inner product of one staged K step of a register-tiled GEMM: for each of `bk` steps, load the
 * thread's `tmv` vec4 fragments of A (`As[S][k][ia<g>]`) and `tnv` of B (`Bs[S][k][ib<f>]`), then accumulate their
 * outer product into the accumulators `c<row>_<f>` with f32 FMAs. `loadA`/`loadB` wrap a fragment load (e.g. a
 * widening from f16). Shared by the dense GEMM and the fused NF4 dequantize-GEMM.
 *
 * @example
 * ```ts
 * const lines = tileInnerProduct(8, 2, 2); // WGSL statements for BK 8 and an 8×8 per-thread tile
 * ```
 */
export function tileInnerProduct(
  bk: number,
  tmv: number,
  tnv: number,
  loadA: (x: string) => string = (x) => x,
  loadB: (x: string) => string = (x) => x,
): string[] {
  const out: string[] = [];
  for (let kk = 0; kk < bk; kk++) {
    for (let g = 0; g < tmv; g++) out.push(`let a${kk}_${g} = ${loadA(`As[S][${kk}][ia${g}]`)};`);
    for (let f = 0; f < tnv; f++) out.push(`let b${kk}_${f} = ${loadB(`Bs[S][${kk}][ib${f}]`)};`);
    for (let g = 0; g < tmv; g++) {
      for (let r = 0; r < 4; r++) {
        for (let f = 0; f < tnv; f++) {
          const c = `c${g * 4 + r}_${f}`;
          out.push(`${c} = fma(vec4<f32>(a${kk}_${g}[${r}]), b${kk}_${f}, ${c});`);
        }
      }
    }
  }
  return out;
}

/** Generates a register-tiled GEMM; dispatch `[ceil(N/BN), ceil(M/BM), batch·splits]` workgroups. */
export function gemmKernel(spec: GemmKernelSpec): KernelSource {
  const t = spec.tile;
  checkTile(t);
  const { bm, bn, bk, tm, tn } = t;
  const TX = bn / tn, TY = bm / tm, T = TX * TY;
  const stages = t.pipeline === "double" ? 2 : 1;
  const useF16 = !!t.smemF16 && (spec.a === "f16" || spec.b === "f16");
  for (const [name, dt, vw] of [["A", spec.a, spec.vecA], ["B", spec.b, spec.vecB]] as const) {
    const okW = dt === "f32" ? [1, 2, 4] : [1, 2, 4, 8];
    if (!okW.includes(vw)) throw new Error(`matmul: vector width ${vw} is not supported for ${dt} operand ${name}`);
  }
  if (spec.out === "f16" && spec.outVec === 1) throw new Error("matmul: f16 output needs outVec 2 or 4");
  const A: Operand = {
    buf: "A",
    smem: "As",
    dtype: spec.a,
    st: useF16 && spec.a === "f16" ? "f16" : "f32",
    vw: spec.vecA,
    dContig: spec.transA,
    bd: bm,
    tileOrigin: "tileM",
    extent: "p.M",
    ld: "p.lda",
    base: "baseA",
  };
  const B: Operand = {
    buf: "B",
    smem: "Bs",
    dtype: spec.b,
    st: useF16 && spec.b === "f16" ? "f16" : "f32",
    vw: spec.vecB,
    dContig: !spec.transB,
    bd: bn,
    tileOrigin: "tileN",
    extent: "p.N",
    ld: "p.ldb",
    base: "baseB",
  };
  for (const op of [A, B]) {
    const contigLen = op.dContig ? op.bd : bk;
    if (op.vw > contigLen) throw new Error(`matmul: vector width ${op.vw} exceeds the tile edge ${contigLen}`);
  }
  const la = loader(A, bk, T), lb = loader(B, bk, T);
  const tmv = tm / 4, tnv = tn / 4;

  // Inner product over one staged K step, fully unrolled.
  const cvt = (op: Operand) => (x: string) => op.st === "f16" ? `vec4<f32>(${x})` : x;
  const compute = tileInnerProduct(bk, tmv, tnv, cvt(A), cvt(B));
  const computeAt = (s: string) => `{\n    let S = ${s};\n    ${compute.join("\n    ")}\n  }`;
  const storeAt = (s: string) => `{\n    let S = ${s};\n    ${[...la.stores, ...lb.stores].join("\n    ")}\n  }`;
  const loads = `${la.loads.join("\n    ")}\n    ${lb.loads.join("\n    ")}`;

  let loop: string;
  if (t.pipeline === "direct") {
    loop = `for (var kt = 0u; kt < numTiles; kt++) {
    let k0 = kBeg + kt * ${bk}u;
    ${loads}
    ${storeAt("0u")}
    workgroupBarrier();
    ${computeAt("0u")}
    workgroupBarrier();
  }`;
  } else if (t.pipeline === "regs") {
    loop = `if (numTiles > 0u) {
    let k0 = kBeg;
    ${loads}
    ${storeAt("0u")}
  }
  workgroupBarrier();
  for (var kt = 0u; kt < numTiles; kt++) {
    let more = kt + 1u < numTiles;
    if (more) {
      let k0 = kBeg + (kt + 1u) * ${bk}u;
      ${loads}
    }
    ${computeAt("0u")}
    workgroupBarrier();
    if (more) ${storeAt("0u")}
    workgroupBarrier();
  }`;
  } else {
    loop = `if (numTiles > 0u) {
    let k0 = kBeg;
    ${loads}
    ${storeAt("0u")}
  }
  workgroupBarrier();
  for (var kt = 0u; kt < numTiles; kt++) {
    let s = kt & 1u;
    let more = kt + 1u < numTiles;
    if (more) {
      let k0 = kBeg + (kt + 1u) * ${bk}u;
      ${loads}
    }
    ${computeAt("s")}
    if (more) ${storeAt("s ^ 1u")}
    workgroupBarrier();
  }`;
  }

  // Epilogue: thread (tx, ty) owns rows (g·TY + ty)·4 + r and columns (f·TX + tx)·4 + c of the tile.
  const epi: string[] = [];
  const outDecl = spec.out === "f32"
    ? `array<${spec.outVec === 4 ? "vec4<f32>" : "f32"}>`
    : `array<${spec.outVec === 4 ? "vec2<u32>" : "u32"}>`;
  const acc = spec.accumulate;
  for (let g = 0; g < tmv; g++) {
    for (let r = 0; r < 4; r++) {
      const row: string[] = [];
      for (let f = 0; f < tnv; f++) {
        const c = `c${g * 4 + r}_${f}`;
        const n = `tileN + ${f * TX * 4}u + tx * 4u`;
        if (spec.out === "f32" && spec.outVec === 4) {
          row.push(
            `if (${n} < p.N) { let i = (rowC + ${n}) >> 2u; C[i] = p.alpha * ${c}${acc ? " + C[i]" : ""}; }`,
          );
        } else if (spec.out === "f32") {
          for (let q = 0; q < 4; q++) {
            row.push(
              `if (${n} + ${q}u < p.N) { let i = rowC + ${n} + ${q}u; C[i] = p.alpha * ${c}[${q}]${
                acc ? " + C[i]" : ""
              }; }`,
            );
          }
        } else if (spec.outVec === 4) {
          row.push(
            `if (${n} < p.N) { let i = (rowC + ${n}) >> 2u; var v = p.alpha * ${c}; ${
              acc ? "let o = C[i]; v += vec4<f32>(unpack2x16float(o.x), unpack2x16float(o.y)); " : ""
            }C[i] = vec2<u32>(packF16(v.x, v.y), packF16(v.z, v.w)); }`,
          );
        } else {
          for (const q of [0, 2]) {
            row.push(
              `if (${n} + ${q}u < p.N) { let i = (rowC + ${n} + ${q}u) >> 1u; var v = p.alpha * ${c}.${
                q === 0 ? "xy" : "zw"
              }; ${acc ? "v += unpack2x16float(C[i]); " : ""}C[i] = packF16(v.x, v.y); }`,
            );
          }
        }
      }
      epi.push(`{ let m = tileM + ${g * TY * 4 + r}u + ty * 4u;
    if (m < p.M) { let rowC = baseC + m * p.ldc;
      ${row.join("\n      ")} } }`);
    }
  }

  const accDecl: string[] = [];
  for (let i = 0; i < tm; i++) for (let f = 0; f < tnv; f++) accDecl.push(`var c${i}_${f} = vec4<f32>();`);
  const smemDecl = (op: Operand) =>
    `var<workgroup> ${op.smem}: array<array<array<vec4<${op.st}>, ${op.bd / 4}>, ${bk}>, ${stages}>;`;
  const swz = t.swizzle > 0
    ? `let lin = wid.y * nwg.x + wid.x;
  let per = ${t.swizzle}u * nwg.x;
  let grp = lin / per;
  let first = grp * ${t.swizzle}u;
  let gm = min(nwg.y - first, ${t.swizzle}u);
  let loc = lin - grp * per;
  let tileM = (first + loc % gm) * ${bm}u;
  let tileN = (loc / gm) * ${bn}u;`
    : `let tileM = wid.y * ${bm}u;
  let tileN = wid.x * ${bn}u;`;

  const code = `${useF16 ? "enable f16;\n" : ""}${PARAMS}
@group(0) @binding(1) var<storage, read> A: array<${storageElem(spec.a, spec.vecA)}>;
@group(0) @binding(2) var<storage, read> B: array<${storageElem(spec.b, spec.vecB)}>;
@group(0) @binding(3) var<storage, read_write> C: ${outDecl};
${PACK_F16}
${smemDecl(A)}
${smemDecl(B)}
@compute @workgroup_size(${T})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  ${swz}
  let bz = wid.z / p.splits;
  let sz = wid.z - bz * p.splits;
  let baseA = p.offA + bz * p.bsA;
  let baseB = p.offB + bz * p.bsB;
  let baseC = p.offC + bz * p.bsC + sz * p.sstride;
  let kBeg = sz * p.kChunk;
  let kEnd = min(p.K, kBeg + p.kChunk);
  let numTiles = select(0u, (kEnd - kBeg + ${bk - 1}u) / ${bk}u, kEnd > kBeg);
  let tx = lid % ${TX}u;
  let ty = lid / ${TX}u;
  ${Array.from({ length: tmv }, (_, g) => `let ia${g} = ${g * TY}u + ty;`).join(" ")}
  ${Array.from({ length: tnv }, (_, f) => `let ib${f} = ${f * TX}u + tx;`).join(" ")}
  ${[...la.pre, ...lb.pre].join("\n  ")}
  ${[...la.decls, ...lb.decls].join("\n  ")}
  ${accDecl.join(" ")}
  ${loop}
  ${epi.join("\n  ")}
}`;
  return {
    name: `gemm_${spec.a}${spec.transA ? "T" : "N"}${spec.vecA}_${spec.b}${spec.transB ? "T" : "N"}${spec.vecB}_${
      tileName(t)
    }_${spec.out}${spec.outVec}${acc ? "_acc" : ""}`,
    code,
    bindings: ["read", "read", "write"],
    uniforms: true,
  };
}

/** A GEMV variant for x[M ≤ 4, K] · W where W is stored [N, K] (each output is a dot product of two rows). */
export interface GemvTSpec {
  /** x's dtype. */
  a: FloatDType;
  /** W's dtype. */
  b: FloatDType;
  /** Elements per load of W (1, 2, 4; 8 for f16); needs K, ldb and offsets divisible by it. */
  vec: number;
  /** Whether x is loaded with the same vector width (needs lda and offA divisible by `vec`). */
  vecX: boolean;
  /** Rows of x handled at once (1 or 4; rows ≥ M are clamped and discarded). */
  rows: number;
  /** Output rows (of W) per workgroup. */
  rowsPerGroup: number;
  /** Threads per workgroup. */
  threads: number;
  /** Output dtype; f16 writes pairs (needs even N, ldc, offset and rowsPerGroup). */
  out: FloatDType;
  /** C = alpha·x·Wᵀ + C. */
  accumulate: boolean;
}

/** Generates the row-streaming GEMV; dispatch `[ceil(N / rowsPerGroup), 1, batch]` workgroups. */
export function gemvTKernel(s: GemvTSpec): KernelSource {
  const T = s.threads, R = s.rowsPerGroup, TPR = T / R, VW = s.vec, MR = s.rows;
  if (!Number.isInteger(TPR) || TPR < 1 || (TPR & (TPR - 1)) !== 0) {
    throw new Error(`gemv: threads ${T} / rows ${R} must be a power of two`);
  }
  if (s.out === "f16" && R % 2 !== 0) throw new Error("gemv: f16 output needs an even rowsPerGroup");
  const UNROLL = 4;
  const { regs: wr, decl: wdecl } = regSet("w", VW, "f32");
  const xregs = Array.from({ length: MR }, (_, m) => regSet(`x${m}`, VW, "f32"));
  const dot = (a: string, b: string) => VW === 1 ? `${a} * ${b}` : `dot(${a}, ${b})`;
  const step = (kv: string) => {
    const lines = [loadInto("B", s.b, VW, `wrow + (${kv}) * ${VW}u`, "f32", wr)];
    for (let m = 0; m < MR; m++) {
      const xe = `xrow${m} + (${kv}) * ${VW}u`;
      if (s.vecX) lines.push(loadInto("A", s.a, VW, xe, "f32", xregs[m].regs));
      else {
        for (let c = 0; c < VW; c++) {
          const tgt = VW === 1
            ? xregs[m].regs[0]
            : VW === 8
            ? `${xregs[m].regs[c >> 2]}[${c & 3}]`
            : `${xregs[m].regs[0]}[${c}]`;
          lines.push(`${tgt} = ldX(${xe} + ${c}u);`);
        }
      }
      for (let j = 0; j < wr.length; j++) lines.push(`acc${m} += ${dot(wr[j], xregs[m].regs[j])};`);
    }
    return lines.join("\n      ");
  };
  const ldx = s.vecX
    ? ""
    : s.a === "f32"
    ? "fn ldX(i: u32) -> f32 { return A[i]; }"
    : "fn ldX(i: u32) -> f32 { return unpack2x16float(A[i >> 1u])[i & 1u]; }";
  const xDecl = s.vecX ? storageElem(s.a, VW) : s.a === "f32" ? "f32" : "u32";
  const reduce: string[] = [];
  for (let h = TPR / 2; h >= 1; h /= 2) {
    const body = Array.from({ length: MR }, (_, m) => `red[${m * T}u + lid] += red[${m * T}u + lid + ${h}u];`)
      .join(" ");
    reduce.push(`if (lane < ${h}u) { ${body} }\n  workgroupBarrier();`);
  }
  const acc = s.accumulate;
  const write = s.out === "f32"
    ? `if (lid < ${MR * R}u) {
    let m = lid / ${R}u;
    let n = n0 + lid % ${R}u;
    if (m < p.M && n < p.N) {
      let i = baseC + m * p.ldc + n;
      C[i] = p.alpha * red[m * ${T}u + (lid % ${R}u) * ${TPR}u]${acc ? " + C[i]" : ""};
    }
  }`
    : `if (lid < ${(MR * R) / 2}u) {
    let m = lid / ${R / 2}u;
    let j = (lid % ${R / 2}u) * 2u;
    let n = n0 + j;
    if (m < p.M && n < p.N) {
      let i = (baseC + m * p.ldc + n) >> 1u;
      var v = p.alpha * vec2<f32>(red[m * ${T}u + j * ${TPR}u], red[m * ${T}u + (j + 1u) * ${TPR}u]);
      ${acc ? "v += unpack2x16float(C[i]);" : ""}
      C[i] = packF16(v.x, v.y);
    }
  }`;
  const code = `${PARAMS}
@group(0) @binding(1) var<storage, read> A: array<${xDecl}>;
@group(0) @binding(2) var<storage, read> B: array<${storageElem(s.b, VW)}>;
@group(0) @binding(3) var<storage, read_write> C: array<${s.out === "f32" ? "f32" : "u32"}>;
${PACK_F16}
${ldx}
var<workgroup> red: array<f32, ${MR * T}>;
@compute @workgroup_size(${T})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let n0 = (wid.x + wid.y * nwg.x) * ${R}u;
  let lane = lid % ${TPR}u;
  let n = n0 + lid / ${TPR}u;
  let baseA = p.offA + wid.z * p.bsA;
  let baseB = p.offB + wid.z * p.bsB;
  let baseC = p.offC + wid.z * p.bsC;
  let KV = p.K / ${VW}u;
  ${Array.from({ length: MR }, (_, m) => `var acc${m} = 0.0;`).join(" ")}
  if (n < p.N) {
    let wrow = baseB + n * p.ldb;
    ${Array.from({ length: MR }, (_, m) => `let xrow${m} = baseA + min(${m}u, p.M - 1u) * p.lda;`).join(" ")}
    ${wdecl}
    ${xregs.map((x) => x.decl).join(" ")}
    var kv = lane;
    loop {
      if (kv + ${(UNROLL - 1) * TPR}u >= KV) { break; }
      ${Array.from({ length: UNROLL }, (_, u) => step(`kv + ${u * TPR}u`)).join("\n      ")}
      kv += ${UNROLL * TPR}u;
    }
    for (; kv < KV; kv += ${TPR}u) {
      ${step("kv")}
    }
  }
  ${Array.from({ length: MR }, (_, m) => `red[${m * T}u + lid] = acc${m};`).join(" ")}
  workgroupBarrier();
  ${reduce.join("\n  ")}
  ${write}
}`;
  return {
    name: `gemvT_${s.a}${s.vecX ? "v" : "s"}_${s.b}${VW}_r${MR}_${R}x${TPR}_${s.out}${acc ? "_acc" : ""}`,
    code,
    bindings: ["read", "read", "write"],
    uniforms: true,
  };
}

/** A GEMV variant for x[M ≤ 4, K] · W where W is stored [K, N]; writes f32 partials per K split. */
export interface GemvNSpec {
  /** x's dtype. */
  a: FloatDType;
  /** W's dtype. */
  b: FloatDType;
  /** Columns per thread and load (1, 2, 4; 8 for f16); needs N, ldb and offsets divisible by it. */
  vec: number;
  /** Rows of x handled at once (1 or 4). */
  rows: number;
  /** Threads along N per workgroup. */
  colThreads: number;
  /** Threads along K per workgroup (a power of two). */
  kSlices: number;
}

/**
 * Generates the column-streaming GEMV; dispatch `[ceil(N / (colThreads·vec)), splits, batch]` workgroups. The
 * output (binding 3) is the f32 partials buffer `[splits][batch][M][N]` (split stride `p.sstride`), finished by
 * {@linkcode gemmFinishKernel}.
 */
export function gemvNKernel(s: GemvNSpec): KernelSource {
  const VW = s.vec, MR = s.rows, CV = s.colThreads, KS = s.kSlices, T = CV * KS;
  if ((KS & (KS - 1)) !== 0) throw new Error("gemvN: kSlices must be a power of two");
  const { regs: wr, decl: wdecl } = regSet("w", VW, "f32");
  const accs = Array.from({ length: MR }, (_, m) => regSet(`acc${m}`, VW, "f32"));
  const nreg = wr.length;
  const vt = vecType(Math.min(VW, 4), "f32");
  const ldx = s.a === "f32"
    ? "fn ldX(i: u32) -> f32 { return A[i]; }"
    : "fn ldX(i: u32) -> f32 { return unpack2x16float(A[i >> 1u])[i & 1u]; }";
  const body: string[] = [loadInto("B", s.b, VW, "baseB + k * p.ldb + n", "f32", wr)];
  for (let m = 0; m < MR; m++) {
    body.push(`{ let xv = ldX(xrow${m} + k);`);
    for (let j = 0; j < nreg; j++) body.push(`${accs[m].regs[j]} = fma(${vt}(xv), ${wr[j]}, ${accs[m].regs[j]});`);
    body.push("}");
  }
  const slot = (m: number, j: number, ks: string) => `red[((${m * nreg + j}u * ${KS}u + ${ks}) * ${CV}u) + cv]`;
  const saves: string[] = [];
  for (let m = 0; m < MR; m++) for (let j = 0; j < nreg; j++) saves.push(`${slot(m, j, "ks")} = ${accs[m].regs[j]};`);
  const reduce: string[] = [];
  for (let h = KS / 2; h >= 1; h /= 2) {
    const adds: string[] = [];
    for (let m = 0; m < MR; m++) {
      for (let j = 0; j < nreg; j++) adds.push(`${slot(m, j, "ks")} += ${slot(m, j, `ks + ${h}u`)};`);
    }
    reduce.push(`if (ks < ${h}u) { ${adds.join(" ")} }\n  workgroupBarrier();`);
  }
  const writes: string[] = [];
  for (let m = 0; m < MR; m++) {
    const w: string[] = [];
    for (let c = 0; c < VW; c++) {
      const v = VW === 1 ? slot(m, 0, "0u") : `${slot(m, c >> 2, "0u")}[${c & 3}]`;
      w.push(`W[row${m} + ${c}u] = ${v};`);
    }
    writes.push(`if (${m}u < p.M) { let row${m} = baseW + ${m}u * p.N + n; ${w.join(" ")} }`);
  }
  const code = `${PARAMS}
@group(0) @binding(1) var<storage, read> A: array<${s.a === "f32" ? "f32" : "u32"}>;
@group(0) @binding(2) var<storage, read> B: array<${storageElem(s.b, VW)}>;
@group(0) @binding(3) var<storage, read_write> W: array<f32>;
${ldx}
var<workgroup> red: array<${vt}, ${MR * nreg * KS * CV}>;
@compute @workgroup_size(${T})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let cv = lid % ${CV}u;
  let ks = lid / ${CV}u;
  let n = (wid.x * ${CV}u + cv) * ${VW}u;
  let baseA = p.offA + wid.z * p.bsA;
  let baseB = p.offB + wid.z * p.bsB;
  let baseW = p.offC + wid.y * p.sstride + wid.z * p.M * p.N;
  let kBeg = wid.y * p.kChunk;
  let kEnd = min(p.K, kBeg + p.kChunk);
  ${Array.from({ length: MR }, (_, m) => `let xrow${m} = baseA + min(${m}u, p.M - 1u) * p.lda;`).join(" ")}
  ${accs.map((a) => a.decl).join(" ")}
  ${wdecl}
  if (n < p.N) {
    for (var k = kBeg + ks; k < kEnd; k += ${KS}u) {
      ${body.join("\n      ")}
    }
  }
  ${saves.join(" ")}
  workgroupBarrier();
  ${reduce.join("\n  ")}
  if (ks == 0u && n < p.N) {
    ${writes.join("\n    ")}
  }
}`;
  return {
    name: `gemvN_${s.a}_${s.b}${VW}_r${MR}_${CV}x${KS}`,
    code,
    bindings: ["read", "read", "write"],
    uniforms: true,
  };
}

/** Uniform words of {@linkcode gemmFinishKernel}: rows, rowLen, rowsPerBatch, ldc, bsC, offC, splits, sstride,
 * alpha (f32), wordsPerRow. */
export const FINISH_UNIFORM_WORDS = 12;

/**
 * Generates the kernel that finishes a GEMM from f32 partials `P[split][r·rowLen + n]`:
 * `C(r, n) = alpha · Σ_split P + (accumulate ? C(r, n) : 0)`, where C(r, n) lies at
 * `offC + (r / rowsPerBatch)·bsC + (r % rowsPerBatch)·ldc + n`. f32: one thread per element. f16: one thread per
 * output word, so each word is written by exactly one thread, and a half that belongs to no output element keeps
 * its value (rows must not share words: pass a contiguous output as one row). Launch with `gridFor(threads, 256)`.
 */
export function gemmFinishKernel(out: FloatDType, accumulate: boolean): KernelSource {
  const head = `struct Params { R: u32, L: u32, RB: u32, ldc: u32, bsC: u32, offC: u32, splits: u32, sstride: u32,
  alpha: f32, WPR: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> P: array<f32>;
@group(0) @binding(2) var<storage, read_write> C: array<${out === "f32" ? "f32" : "u32"}>;
${PACK_F16}
fn total(j: u32) -> f32 {
  var s = 0.0;
  for (var q = 0u; q < p.splits; q++) { s += P[q * p.sstride + j]; }
  return p.alpha * s;
}
fn rowStart(r: u32) -> u32 { return p.offC + (r / p.RB) * p.bsC + (r % p.RB) * p.ldc; }
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let t = gid.x + gid.y * nwg.x * 256u;`;
  const body = out === "f32"
    ? `
  if (t >= p.R * p.L) { return; }
  let r = t / p.L;
  let n = t - r * p.L;
  let i = rowStart(r) + n;
  C[i] = total(t)${accumulate ? " + C[i]" : ""};
}`
    : `
  if (t >= p.R * p.WPR) { return; }
  let r = t / p.WPR;
  let es = rowStart(r);
  let w = (es >> 1u) + (t - r * p.WPR);
  let n0 = i32(w * 2u) - i32(es);
  if (n0 >= i32(p.L)) { return; }
  let old = unpack2x16float(C[w]);
  var v = old;
  if (n0 >= 0) { v.x = total(r * p.L + u32(n0))${accumulate ? " + old.x" : ""}; }
  if (n0 + 1 < i32(p.L)) { v.y = total(r * p.L + u32(n0 + 1))${accumulate ? " + old.y" : ""}; }
  C[w] = packF16(v.x, v.y);
}`;
  return {
    name: `gemm_finish_${out}${accumulate ? "_acc" : ""}`,
    code: head + body,
    bindings: ["read", "write"],
    uniforms: true,
  };
}
