/**
 * Embedding kernels: a gather of table rows by token id, and its deterministic scatter-add backward.
 *
 * Ids outside `[0, V)` cannot raise an error inside a kernel, so every kernel here clamps them to the nearest
 * valid row (negative → 0, ≥ V → V − 1), forward and backward alike; the `nn` layer validates ids on the CPU when
 * it has them.
 *
 * Forward: each thread copies one unit of an output row: a vec4<f32>, a packed pair of halves, eight packed
 * halves (vec4<u32>), or a single f32, whichever the row width and table offset allow. An f16 table whose rows
 * have an odd width straddles words, so that case assembles each output word from two looked-up halves.
 *
 * Backward (the gradient of the table is `[V, D]` f32, with repeated ids summed), without atomics and without a
 * sort, deterministic to the bit:
 * 1. `links`: for each token i, the previous token with the same (clamped) id, and whether i is the last one.
 *    Each thread scans backwards and forwards until it meets the same id (O(N²) id comparisons in the worst case
 *    of all-distinct ids: 8 M for 4,096 tokens, cheap next to moving the N·D gradient).
 * 2. `accumulate`: a workgroup per (token, 128-column block); only the last occurrence of each id does work: it
 *    walks the chain of earlier occurrences, summing their gradient rows in a fixed order, and writes the row of
 *    the table gradient once. Rows of ids that never occur keep the zeros the caller filled in.
 * A compare-and-swap float atomic add would be simpler but sums in a scheduling-dependent order (results change
 * in the last bits from run to run) and serialises on ids repeated thousands of times (padding); this scheme has
 * neither problem.
 *
 * @example
 * ```ts
 * import { embeddingKernel } from "./embedding.ts";
 * const src = embeddingKernel({ table: "f16", ids: "i32", unit: "vec4<u32>" });
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import type { KernelSource } from "../gpu.ts";
import { linearMain, loadF32Fn, PACK_F16, storageDecl } from "./common.ts";

/** Storage unit a forward thread copies; "f16pair" assembles a packed word from two arbitrary halves. */
export type EmbeddingUnit = "f32" | "vec4<f32>" | "u32" | "vec4<u32>" | "f16pair";

/** Table elements per unit ("f16pair" counts single elements). */
export const UNIT_ELEMENTS: Readonly<Record<EmbeddingUnit, number>> = {
  "f32": 1,
  "vec4<f32>": 4,
  "u32": 2,
  "vec4<u32>": 8,
  "f16pair": 1,
};

/** WGSL `fn cid(k: u32) -> u32`: token k's id, clamped to [0, V). */
function clampedId(ids: DType): string {
  return ids === "i32"
    ? "fn cid(k: u32) -> u32 { return u32(clamp(idb[p.idoff + k], 0, i32(p.vocab) - 1)); }"
    : "fn cid(k: u32) -> u32 { return min(idb[p.idoff + k], p.vocab - 1u); }";
}

/** Uniform words of the forward kernel: output units, units per row, V, table offset (in units), ids offset. */
export const EMBEDDING_UNIFORM_WORDS = 8;

/**
 * Gather: bindings ids, table (read), out (write). One thread per output unit; launch `gridFor(units, 256)`.
 * For "f16pair" the offsets and sizes are in elements and a unit is one output word (two elements).
 */
export function embeddingKernel(spec: { table: DType; ids: DType; unit: EmbeddingUnit }): KernelSource {
  const head = `struct Params { units: u32, rowUnits: u32, vocab: u32, toff: u32, idoff: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "idb", spec.ids, "read")}
${clampedId(spec.ids)}`;
  let code: string;
  if (spec.unit === "f16pair") {
    // Here `units` counts output elements and `rowUnits` is D.
    code = `${head}
${storageDecl(2, "table", "f16", "read")}
${storageDecl(3, "outBuf", "f16", "read_write")}
${loadF32Fn("ld", "table", "f16")}
${PACK_F16}
fn elem(e: u32) -> f32 { return ld(p.toff + cid(e / p.rowUnits) * p.rowUnits + e % p.rowUnits); }
${linearMain(256)}
  let e = 2u * t;
  if (e >= p.units) { return; }
  var hi = 0.0;
  if (e + 1u < p.units) { hi = elem(e + 1u); }
  outBuf[t] = packF16(elem(e), hi);
}`;
  } else {
    code = `${head}
@group(0) @binding(2) var<storage, read> table: array<${spec.unit}>;
@group(0) @binding(3) var<storage, read_write> outBuf: array<${spec.unit}>;
${linearMain(256)}
  if (t >= p.units) { return; }
  let tok = t / p.rowUnits;
  outBuf[t] = table[p.toff + cid(tok) * p.rowUnits + t % p.rowUnits];
}`;
  }
  return { name: "embedding", code, bindings: ["read", "read", "write"], uniforms: true };
}

/** Uniform words of the links kernel: tokens, V, ids offset. */
export const EMBEDDING_LINKS_UNIFORM_WORDS = 4;

/** Marks "no earlier token with this id" in the links buffer. */
export const NO_PREVIOUS = 0xffffffff;

/**
 * Links between equal ids: bindings ids (read), links (u32 [2N], write): `links[2i]` = the previous token with
 * the same id (or 0xffffffff), `links[2i + 1]` = 1 when i is the last token with its id. Launch
 * `gridFor(N, 256)`.
 */
export function embeddingLinksKernel(spec: { ids: DType }): KernelSource {
  const code = `struct Params { n: u32, vocab: u32, idoff: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "idb", spec.ids, "read")}
${storageDecl(2, "links", "u32", "read_write")}
${clampedId(spec.ids)}
${linearMain(256)}
  if (t >= p.n) { return; }
  let id = cid(t);
  var prev = ${NO_PREVIOUS}u;
  for (var j = t; j > 0u; j--) {
    if (cid(j - 1u) == id) { prev = j - 1u; break; }
  }
  var last = 1u;
  for (var k = t + 1u; k < p.n; k++) {
    if (cid(k) == id) { last = 0u; break; }
  }
  links[2u * t] = prev;
  links[2u * t + 1u] = last;
}`;
  return { name: "embedding_links", code, bindings: ["read", "write"], uniforms: true };
}

/** Columns per workgroup of the accumulate kernel. */
export const EMBEDDING_COLUMNS = 128;

/** Uniform words of the accumulate kernel: tokens, D, V, column blocks, ids offset, grad offset. */
export const EMBEDDING_BACKWARD_UNIFORM_WORDS = 8;

/**
 * Table gradient rows: bindings ids, links, g (read), dw (f32 [V, D], pre-zeroed, write). Workgroup
 * `token · blocks + block` (launch `rowGrid(N · blocks)`, blocks = ceil(D / 128)); the last occurrence of each id
 * sums the gradient rows of all its occurrences, latest first.
 */
export function embeddingBackwardKernel(spec: { ids: DType; grad: DType }): KernelSource {
  const C = EMBEDDING_COLUMNS;
  const code = `struct Params { n: u32, d: u32, vocab: u32, blocks: u32, idoff: u32, goff: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "idb", spec.ids, "read")}
${storageDecl(2, "links", "u32", "read")}
${storageDecl(3, "gb", spec.grad, "read")}
${storageDecl(4, "dw", "f32", "read_write")}
${clampedId(spec.ids)}
${loadF32Fn("ldg", "gb", spec.grad)}
@compute @workgroup_size(${C})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) l: u32) {
  let w = wid.x + wid.y * nwg.x;
  let tok = w / p.blocks;
  let col = (w % p.blocks) * ${C}u + l;
  if (tok >= p.n || col >= p.d || links[2u * tok + 1u] == 0u) { return; }
  var acc = 0.0;
  var j = tok;
  loop {
    acc += ldg(p.goff + j * p.d + col);
    let q = links[2u * j];
    if (q == ${NO_PREVIOUS}u) { break; }
    j = q;
  }
  dw[cid(tok) * p.d + col] = acc;
}`;
  return { name: "embedding_backward", code, bindings: ["read", "read", "read", "write"], uniforms: true };
}
