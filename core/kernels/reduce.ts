/**
 * Reduction kernels over contiguous data viewed as `[outer, n, inner]`: sum or max over the middle axis.
 * With `inner = 1` (reducing the last axis) one 256-thread workgroup reduces each row through workgroup memory;
 * otherwise each thread reduces one (outer, inner) column, which keeps loads coalesced across threads.
 *
 * @example
 * ```ts
 * import { reduceKernel } from "./reduce.ts";
 * const src = reduceKernel({ op: "sum", input: "f32", out: "f32", rows: true });
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import type { KernelSource } from "../gpu.ts";
import { loadF32Fn, storageDecl } from "./common.ts";

/** A reduction kernel description. */
export interface ReduceSpec {
  /** Sum (scaled by `p.scale`, for means) or max. */
  op: "sum" | "max";
  /** Input dtype. */
  input: DType;
  /** Output dtype (f32 or f16). */
  out: DType;
  /** True: one workgroup per row (inner = 1). False: one thread per column. */
  rows: boolean;
}

/** Uniform words: outer, n, inner, input offset, scale, parts (workgroups per row, rows kernel). */
export const REDUCE_UNIFORM_WORDS = 8;

/** Generates a reduction kernel. */
export function reduceKernel(spec: ReduceSpec): KernelSource {
  // max starts from −∞ (bit pattern; WGSL has no infinity literal) so a row of −∞ reduces to −∞.
  const init = spec.op === "sum" ? "0.0" : "bitcast<f32>(0xff800000u)";
  const comb = spec.op === "sum" ? "acc + v" : "max(acc, v)";
  const combWg = spec.op === "sum" ? "sh[l] + sh[l + s]" : "max(sh[l], sh[l + s])";
  const head = `struct Params { outer: u32, n: u32, inner: u32, off: u32, scale: f32, parts: u32 }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "x", spec.input, "read")}
${storageDecl(2, "y", spec.out === "f16" ? "f32" : spec.out, "read_write")}
${loadF32Fn("ld", "x", spec.input)}`;
  if (spec.out === "f16") throw new Error("reduce kernels write f32; cast afterwards");
  if (spec.rows) {
    return {
      name: `reduce_rows_${spec.op}`,
      bindings: ["read", "write"],
      uniforms: true,
      code: `${head}
var<workgroup> sh: array<f32, 256>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) l: u32) {
  // Workgroup w reduces part (w % parts) of row (w / parts): a long row is split over several workgroups, whose
  // partial results a second pass combines.
  let w = wid.x + wid.y * nwg.x;
  let row = w / p.parts;
  if (row >= p.outer) { return; }
  let base = p.off + row * p.n;
  var acc = ${init};
  for (var i = (w % p.parts) * 256u + l; i < p.n; i += 256u * p.parts) { let v = ld(base + i); acc = ${comb}; }
  sh[l] = acc;
  workgroupBarrier();
  for (var s = 128u; s > 0u; s >>= 1u) {
    if (l < s) { sh[l] = ${combWg}; }
    workgroupBarrier();
  }
  if (l == 0u) { y[w] = sh[0] * ${spec.op === "sum" ? "p.scale" : "1.0"}; }
}`,
    };
  }
  return {
    name: `reduce_cols_${spec.op}`,
    bindings: ["read", "write"],
    uniforms: true,
    code: `${head}
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let t = gid.x + gid.y * nwg.x * 256u;
  if (t >= p.outer * p.inner) { return; }
  let o = t / p.inner;
  let i = t % p.inner;
  let base = p.off + o * p.n * p.inner + i;
  var acc = ${init};
  for (var k = 0u; k < p.n; k++) { let v = ld(base + k * p.inner); acc = ${comb}; }
  y[t] = acc * ${spec.op === "sum" ? "p.scale" : "1.0"};
}`,
  };
}
