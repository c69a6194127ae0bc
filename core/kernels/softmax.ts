/**
 * Row-wise softmax and log-softmax over the last axis, one 256-thread workgroup per row: a pass for the row
 * maximum, a pass for Σ exp(x − max), a pass writing the result. Backward kernels take the output `y` and the
 * incoming gradient `g`: softmax dx = y·(g − Σ g·y), log-softmax dx = g − exp(y)·Σ g.
 *
 * @example
 * ```ts
 * import { softmaxKernel } from "./softmax.ts";
 * const src = softmaxKernel({ log: false, input: "f32", out: "f32" });
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import type { KernelSource } from "../gpu.ts";
import { loadF32Fn, storageDecl } from "./common.ts";

/** Uniform words: rows, n (row length), input offset. */
export const SOFTMAX_UNIFORM_WORDS = 4;

const REDUCE = (op: string, result: string) => `
  sh[l] = acc;
  workgroupBarrier();
  for (var s = 128u; s > 0u; s >>= 1u) {
    if (l < s) { sh[l] = ${op}; }
    workgroupBarrier();
  }
  let ${result} = sh[0];
  workgroupBarrier();`;

const HEAD = (input: DType, extra = "") =>
  `struct Params { rows: u32, n: u32, off: u32, off2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
var<workgroup> sh: array<f32, 256>;
${extra}
${loadF32Fn("ld", "x", input)}
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) l: u32) {
  let row = wid.x + wid.y * nwg.x;
  if (row >= p.rows) { return; }
  let base = p.off + row * p.n;
  let ob = row * p.n;`;

/** Softmax / log-softmax forward. Output is f32 (cast afterwards for f16). */
export function softmaxKernel(spec: { log: boolean; input: DType }): KernelSource {
  const code = `${
    HEAD(spec.input, `${storageDecl(1, "x", spec.input, "read")}\n${storageDecl(2, "y", "f32", "read_write")}`)
  }
  var acc = -3.402823e38;
  for (var i = l; i < p.n; i += 256u) { acc = max(acc, ld(base + i)); }
  ${REDUCE("max(sh[l], sh[l + s])", "mx")}
  acc = 0.0;
  for (var i = l; i < p.n; i += 256u) { acc += exp(ld(base + i) - mx); }
  ${REDUCE("sh[l] + sh[l + s]", "sum")}
  ${spec.log ? "let ls = log(sum);" : "let inv = 1.0 / sum;"}
  for (var i = l; i < p.n; i += 256u) {
    // (x − max) is exact near the max; folding max and log-sum first would round at the logits' magnitude.
    ${spec.log ? "y[ob + i] = (ld(base + i) - mx) - ls;" : "y[ob + i] = exp(ld(base + i) - mx) * inv;"}
  }
}`;
  return { name: spec.log ? "log_softmax" : "softmax", code, bindings: ["read", "write"], uniforms: true };
}

/** Backward of softmax / log-softmax from contiguous f32 `y` and gradient `g` (offset `p.off2`). */
export function softmaxBackwardKernel(spec: { log: boolean; grad: DType }): KernelSource {
  const code = `${
    HEAD(
      "f32",
      `${storageDecl(1, "x", "f32", "read")}\n${storageDecl(2, "gbuf", spec.grad, "read")}\n${
        storageDecl(3, "dx", "f32", "read_write")
      }\n${loadF32Fn("ldg", "gbuf", spec.grad)}`,
    )
  }
  let gb = p.off2 + row * p.n;
  var acc = 0.0;
  for (var i = l; i < p.n; i += 256u) { acc += ldg(gb + i)${spec.log ? "" : " * ld(base + i)"}; }
  ${REDUCE("sh[l] + sh[l + s]", "total")}
  for (var i = l; i < p.n; i += 256u) {
    let y = ld(base + i);
    let g = ldg(gb + i);
    ${spec.log ? "dx[ob + i] = g - exp(y) * total;" : "dx[ob + i] = y * (g - total);"}
  }
}`;
  return {
    name: spec.log ? "log_softmax_backward" : "softmax_backward",
    code,
    bindings: ["read", "read", "write"],
    uniforms: true,
  };
}
