/**
 * Differentiable matrix product with batching. Operands may be row-major or transposed views (read through
 * strides, no copy); a 2-D right operand is shared by every batch element, and then the batch is folded into
 * the rows so one large GEMM runs instead of many small ones.
 *
 * @example
 * ```ts
 * import { matmul } from "./matmul.ts";
 * const y = matmul(x, w.transpose()); // x: [B, T, in], w: [out, in] → [B, T, out]
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import { record } from "../autograd.ts";
import { getGpu, type Kernel } from "../gpu.ts";
import { UniformWriter } from "../kernels/common.ts";
import { MATMUL_TILE, matmulKernel } from "../kernels/matmul.ts";
import { fmtShape, numelOf, Tensor } from "../tensor.ts";
import { cast } from "./elementwise.ts";
import { sumTo } from "./reduce.ts";
import { contiguous, reshape, transpose } from "./shape.ts";

/** How a matrix operand is laid out in memory. */
interface Layout {
  trans: boolean;
  ld: number;
}

/** Row-major (stride 1 along columns) or transposed (stride 1 along rows), or null when neither. */
function layoutOf(t: Tensor): Layout | null {
  const n = t.ndim;
  const [r, c] = [t.shape[n - 2], t.shape[n - 1]];
  const [sr, sc] = [t.strides[n - 2], t.strides[n - 1]];
  if ((sc === 1 || c === 1) && (sr >= c || r === 1)) return { trans: false, ld: r === 1 ? c : sr };
  if ((sr === 1 || r === 1) && (sc >= r || c === 1)) return { trans: true, ld: c === 1 ? r : sc };
  return null;
}

/** Stride between consecutive matrices of the flattened batch dims; 0 when broadcast; null when not uniform. */
function batchStride(t: Tensor): number | null {
  const dims = [...Array(t.ndim - 2).keys()].filter((i) => t.shape[i] !== 1);
  if (dims.length === 0) return 0;
  for (let j = dims.length - 2; j >= 0; j--) {
    if (t.strides[dims[j]] !== t.strides[dims[j + 1]] * t.shape[dims[j + 1]]) return null;
  }
  return t.strides[dims[dims.length - 1]];
}

const kernels = new Map<string, Kernel>();

/** C = A·B into a new f32 tensor, no gradient. Shapes already validated. */
function gemm(a: Tensor, b: Tensor, batchShape: number[], M: number, K: number, N: number): Tensor {
  let A = a, B = b;
  let la = layoutOf(A), lb = layoutOf(B);
  const batch = numelOf(batchShape);
  let bsA = batchStride(A), bsB = batchStride(B);
  if (!la || bsA === null) {
    A = contiguous(a);
    la = layoutOf(A)!;
    bsA = batchStride(A)!;
  }
  if (!lb || bsB === null) {
    B = contiguous(b);
    lb = layoutOf(B)!;
    bsB = batchStride(B)!;
  }
  const C = Tensor.empty([...batchShape, M, N], "f32");
  let rows = M, groupsZ = batch;
  // Fold the batch into the rows when B is shared and A's rows are evenly spaced across batch elements.
  if (bsB === 0 && !la.trans && batch > 1 && bsA === M * la.ld) {
    rows = M * batch;
    groupsZ = 1;
  }
  const gpu = getGpu();
  const key = `${A.dtype}${la.trans}|${B.dtype}${lb.trans}`;
  let k = kernels.get(key);
  if (!k) {
    kernels.set(key, k = gpu.kernel(matmulKernel({ a: A.dtype, b: B.dtype, transA: la.trans, transB: lb.trans })));
  }
  const u = new UniformWriter(16)
    .u(0, rows).u(1, N).u(2, K).u(3, la.ld).u(4, lb.ld).u(5, N)
    .u(6, A.offset).u(7, B.offset).u(8, 0)
    .u(9, bsA).u(10, bsB).u(11, M * N).f(12, 1);
  if (numelOf(C.shape) > 0 && groupsZ > 0) {
    if (groupsZ > 65535) throw new Error(`matmul: batch of ${groupsZ} exceeds 65535`);
    gpu.dispatch(k, [A.storage.buffer, B.storage.buffer, C.storage.buffer], u.u32, [
      Math.ceil(N / MATMUL_TILE),
      Math.ceil(rows / MATMUL_TILE),
      groupsZ,
    ]);
  }
  if (A !== a) A.dispose();
  if (B !== b) B.dispose();
  return C;
}

/** Options of {@linkcode matmul}. */
export interface MatmulOptions {
  /** Output dtype; default f16 when both inputs are f16, else f32. Accumulation is always f32. */
  out?: DType;
}

/**
 * Matrix product `a · b` for a: [..., M, K], b: [..., K, N] or [K, N]; batch dims broadcast.
 *
 * @example
 * ```ts
 * const scores = matmul(q, k.transpose()); // [B, H, T, D] · [B, H, D, T]
 * ```
 */
export function matmul(a: Tensor, b: Tensor, opts: MatmulOptions = {}): Tensor {
  a.assertAlive("matmul");
  b.assertAlive("matmul");
  if (a.ndim < 2 || b.ndim < 2) {
    throw new Error(`matmul needs at least 2-D operands, got ${fmtShape(a.shape)} and ${fmtShape(b.shape)}`);
  }
  const [M, K] = a.shape.slice(-2);
  const [K2, N] = b.shape.slice(-2);
  if (K !== K2) {
    throw new Error(
      `matmul: shapes ${fmtShape(a.shape)} and ${fmtShape(b.shape)} do not match: ` +
        `the last dimension of the first (${K}) must equal the second-to-last of the second (${K2})`,
    );
  }
  const batchA = a.shape.slice(0, -2), batchB = b.shape.slice(0, -2);
  const rank = Math.max(batchA.length, batchB.length);
  const batchShape: number[] = [];
  for (let i = 0; i < rank; i++) {
    const da = batchA[batchA.length - rank + i] ?? 1, db = batchB[batchB.length - rank + i] ?? 1;
    if (da !== db && da !== 1 && db !== 1) {
      throw new Error(`matmul: batch dimensions of ${fmtShape(a.shape)} and ${fmtShape(b.shape)} do not broadcast`);
    }
    batchShape.push(Math.max(da, db));
  }
  const sameA = batchA.length === rank && batchA.every((d, i) => d === batchShape[i] || numelOf(batchA) === 1);
  const sameB = batchB.length === 0 || (batchB.length === rank && batchB.every((d, i) => d === batchShape[i])) ||
    numelOf(batchB) === 1;
  if (!sameA || !sameB) {
    throw new Error(
      `matmul: partial batch broadcasting (${fmtShape(a.shape)} · ${
        fmtShape(b.shape)
      }) is not supported; expand() first`,
    );
  }
  const outDtype = opts.out ?? (a.dtype === "f16" && b.dtype === "f16" ? "f16" : "f32");
  let y = gemm(a, b, batchShape, M, K, N);
  if (outDtype !== "f32") {
    const c = cast(y, outDtype);
    y.dispose();
    y = c;
  }
  const save = [a.requiresGrad ? b : null, b.requiresGrad ? a : null].filter((t): t is Tensor => t !== null);
  return record(y, "matmul", [a, b], save, (g, saved, needs) => {
    const sb = needs[0] ? saved[0] : null;
    const sa = needs[1] ? saved[saved.length - 1] : null;
    let ga: Tensor | null = null, gb: Tensor | null = null;
    if (sb) {
      const t = matmul(g, transpose(sb), { out: g.dtype });
      ga = sumTo(t, a.shape);
    }
    if (sa) {
      if (b.ndim === 2) {
        // dB = Σ_batch Aᵀ·G = (A flattened to [rows, K])ᵀ · (G flattened to [rows, N])
        const af = reshape(sa, [-1, K]);
        const gf = reshape(g, [-1, N]);
        gb = matmul(transpose(af), gf, { out: "f32" });
      } else {
        gb = sumTo(matmul(transpose(sa), g, { out: "f32" }), b.shape);
      }
      if (b.dtype === "f16") gb = cast(gb, "f16");
    }
    return [ga, gb];
  });
}
