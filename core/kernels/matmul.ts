/**
 * Matrix-multiply kernels: C[b] = A[b] · B[b] with f32 accumulation, where A is read row-major or transposed and
 * B likewise, through strides (so `x.matmul(w.transpose())` costs no copy), f32 or packed-f16 inputs, and a batch
 * index in the grid's z dimension.
 *
 * This is the portable baseline: 64×64 output tiles, 16-deep K steps staged through workgroup memory, 4×4 outputs
 * per thread.
 *
 * @example
 * ```ts
 * import { matmulKernel } from "./matmul.ts";
 * const src = matmulKernel({ a: "f16", b: "f16", transA: false, transB: true });
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import type { KernelSource } from "../gpu.ts";
import { loadF32Fn, storageDecl } from "./common.ts";

/** A GEMM variant. */
export interface MatmulSpec {
  /** A's dtype. */
  a: DType;
  /** B's dtype. */
  b: DType;
  /** A stored as [K, M] (read transposed). */
  transA: boolean;
  /** B stored as [N, K] (read transposed). */
  transB: boolean;
}

/**
 * Uniform words: M, N, K, lda, ldb, ldc, offA, offB, offC, batchStrideA, batchStrideB, batchStrideC, alpha (f32).
 */
export const MATMUL_UNIFORM_WORDS = 16;

/** Output tile edge (rows and columns). */
export const MATMUL_TILE = 64;

/** Generates the GEMM kernel; dispatch `[ceil(N/64), ceil(M/64), batch]` workgroups. */
export function matmulKernel(spec: MatmulSpec): KernelSource {
  const aIdx = spec.transA ? "(k * p.lda + m)" : "(m * p.lda + k)";
  const bIdx = spec.transB ? "(n * p.ldb + k)" : "(k * p.ldb + n)";
  const code = `struct Params { M: u32, N: u32, K: u32, lda: u32, ldb: u32, ldc: u32, offA: u32, offB: u32, offC: u32,
  bsA: u32, bsB: u32, bsC: u32, alpha: f32 }
@group(0) @binding(0) var<uniform> p: Params;
${storageDecl(1, "A", spec.a, "read")}
${storageDecl(2, "B", spec.b, "read")}
@group(0) @binding(3) var<storage, read_write> C: array<f32>;
${loadF32Fn("ldA", "A", spec.a)}
${loadF32Fn("ldB", "B", spec.b)}
var<workgroup> As: array<array<f32, 64>, 16>;
var<workgroup> Bs: array<array<f32, 64>, 16>;
@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let tileM = wid.y * 64u;
  let tileN = wid.x * 64u;
  let baseA = p.offA + wid.z * p.bsA;
  let baseB = p.offB + wid.z * p.bsB;
  let tid = lid.y * 16u + lid.x;
  var acc: array<array<f32, 4>, 4>;
  for (var k0 = 0u; k0 < p.K; k0 += 16u) {
    // Stage a 64×16 slice of A and a 16×64 slice of B: 1024 elements each, 4 per thread.
    for (var r = 0u; r < 4u; r++) {
      let e = tid + r * 256u;
      let kk = e / 64u;
      let mm = e % 64u;
      let m = tileM + mm;
      let k = k0 + kk;
      var va = 0.0;
      if (m < p.M && k < p.K) { va = ldA(baseA + ${aIdx}); }
      As[kk][mm] = va;
      let n = tileN + mm;
      var vb = 0.0;
      if (n < p.N && k < p.K) { vb = ldB(baseB + ${bIdx}); }
      Bs[kk][mm] = vb;
    }
    workgroupBarrier();
    for (var kk = 0u; kk < 16u; kk++) {
      var a: array<f32, 4>;
      var b: array<f32, 4>;
      for (var i = 0u; i < 4u; i++) { a[i] = As[kk][lid.y * 4u + i]; b[i] = Bs[kk][lid.x * 4u + i]; }
      for (var i = 0u; i < 4u; i++) { for (var j = 0u; j < 4u; j++) { acc[i][j] = fma(a[i], b[j], acc[i][j]); } }
    }
    workgroupBarrier();
  }
  let baseC = p.offC + wid.z * p.bsC;
  for (var i = 0u; i < 4u; i++) {
    let m = tileM + lid.y * 4u + i;
    if (m >= p.M) { continue; }
    for (var j = 0u; j < 4u; j++) {
      let n = tileN + lid.x * 4u + j;
      if (n < p.N) { C[baseC + m * p.ldc + n] = acc[i][j] * p.alpha; }
    }
  }
}`;
  return {
    name: `matmul_${spec.a}${spec.transA ? "T" : "N"}_${spec.b}${spec.transB ? "T" : "N"}`,
    code,
    bindings: ["read", "read", "write"],
    uniforms: true,
  };
}
