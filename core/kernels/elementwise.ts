/**
 * Elementwise kernels: any expression of up to four inputs, each read through its own strides (so broadcasting,
 * transposes and slices cost no copy), written to a fresh row-major output. f16 outputs are written two elements
 * per thread (one packed word), so no two threads write the same word.
 *
 * @example
 * ```ts
 * import { elementwiseKernel } from "./elementwise.ts";
 * const src = elementwiseKernel({
 *   name: "add", rank: 2, out: "f32",
 *   inputs: [{ dtype: "f32", mode: "contiguous" }, { dtype: "f16", mode: "strided" }],
 *   expr: "a + b",
 * });
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";
import type { KernelSource } from "../gpu.ts";
import { linearMain, loadF32Fn, PACK_F16, storageDecl, storageType } from "./common.ts";

/** How an input is addressed: same layout as the output, arbitrary strides, or one element for all. */
export type InputMode = "contiguous" | "strided" | "scalar";

/** One input of an elementwise kernel. */
export interface EwInput {
  /** Stored dtype. */
  dtype: DType;
  /** Addressing. */
  mode: InputMode;
}

/** Description of an elementwise kernel. */
export interface EwSpec {
  /** Kernel name. */
  name: string;
  /** Inputs, named `a`, `b`, `c`, `d` in `expr`. */
  inputs: EwInput[];
  /** Output dtype. */
  out: DType;
  /** Rank of the output (strided inputs are addressed through it). Up to 8. */
  rank: number;
  /**
   * WGSL expression of the inputs (`a`, `b`, ...) and the scalar constants `p.c0` … `p.c3`; the element index is
   * `idx`. Values are f32 unless `compute` says otherwise.
   */
  expr: string;
  /** Arithmetic type (default f32). Integer math is exact for i32/u32 tensors. */
  compute?: "f32" | "i32" | "u32";
  /** Extra WGSL helper functions the expression uses. */
  helpers?: string;
}

/** Maximum rank an elementwise kernel supports. */
export const MAX_RANK = 8;
const NAMES = ["a", "b", "c", "d"];
const COMP = ["x", "y", "z", "w"];

/**
 * Uniform layout (in 32-bit words): shape at 0..7, then 8 words of strides per input, then numel, one offset per
 * input, and the constants c0..c3 (consecutive words from `c0`).
 */
export function ewUniformLayout(
  nInputs: number,
): {
  shape: number;
  strides: (i: number) => number;
  numel: number;
  offsets: (i: number) => number;
  c0: number;
  words: number;
} {
  const base = 8 + 8 * nInputs;
  return {
    shape: 0,
    strides: (i) => 8 + 8 * i,
    numel: base,
    offsets: (i) => base + 1 + i,
    c0: base + 1 + nInputs,
    words: base + 5 + nInputs,
  };
}

/** Generates the WGSL of an elementwise kernel. */
export function elementwiseKernel(spec: EwSpec): KernelSource {
  const { inputs, out, rank } = spec;
  if (rank > MAX_RANK) throw new Error(`elementwise ops support up to ${MAX_RANK} dimensions, got ${rank}`);
  const compute = spec.compute ?? "f32";
  const n = inputs.length;
  const lines: string[] = [];
  const fields = ["shape: array<vec4<u32>, 2>,"];
  for (let i = 0; i < n; i++) fields.push(`st${i}: array<vec4<u32>, 2>,`);
  fields.push("numel: u32,");
  for (let i = 0; i < n; i++) fields.push(`off${i}: u32,`);
  fields.push("c0: f32,", "c1: f32,", "c2: f32,", "c3: f32,");
  lines.push(`struct Params { ${fields.join(" ")} }`);
  lines.push("@group(0) @binding(0) var<uniform> p: Params;");
  inputs.forEach((inp, i) => lines.push(storageDecl(i + 1, `in${i}`, inp.dtype, "read")));
  lines.push(storageDecl(n + 1, "outBuf", out, "read_write"));
  inputs.forEach((inp, i) => lines.push(loadFn(`ld${i}`, `in${i}`, inp.dtype, compute)));
  if (out === "f16") lines.push(PACK_F16);
  if (spec.helpers) lines.push(spec.helpers);
  const T = compute;
  // value(idx): computes one output element.
  const body: string[] = [];
  const strided = inputs.map((x, i) => (x.mode === "strided" ? i : -1)).filter((i) => i >= 0);
  for (let i = 0; i < n; i++) {
    const m = inputs[i].mode;
    body.push(`  var o${i} = p.off${i}${m === "contiguous" ? " + idx" : ""};`);
  }
  if (strided.length > 0) {
    body.push("  var rem = idx;");
    for (let d = rank - 1; d >= 0; d--) {
      const dim = `p.shape[${d >> 2}].${COMP[d & 3]}`;
      body.push(`  { let c = rem % ${dim}; rem = rem / ${dim};`);
      for (const i of strided) body.push(`    o${i} = o${i} + c * p.st${i}[${d >> 2}].${COMP[d & 3]};`);
      body.push("  }");
    }
  }
  for (let i = 0; i < n; i++) body.push(`  let ${NAMES[i]} = ld${i}(o${i});`);
  body.push(`  return ${spec.expr};`);
  lines.push(`fn value(idx: u32) -> ${T} {\n${body.join("\n")}\n}`);
  lines.push(linearMain(256));
  if (out === "f16") {
    lines.push(`  let i0 = 2u * t;
  if (i0 >= p.numel) { return; }
  let v0 = f32(value(i0));
  var v1 = 0.0;
  if (i0 + 1u < p.numel) { v1 = f32(value(i0 + 1u)); }
  outBuf[t] = packF16(v0, v1);
}`);
  } else {
    lines.push(`  if (t >= p.numel) { return; }
  outBuf[t] = ${storageType(out)}(value(t));
}`);
  }
  return {
    name: spec.name,
    code: lines.join("\n"),
    bindings: [...inputs.map(() => "read" as const), "write"],
    uniforms: true,
  };
}

function loadFn(fnName: string, buf: string, dtype: DType, compute: "f32" | "i32" | "u32"): string {
  if (compute === "f32") return loadF32Fn(fnName, buf, dtype);
  if (dtype === "f16") {
    return `fn ${fnName}(i: u32) -> ${compute} { let v = unpack2x16float(${buf}[i >> 1u]); return ${compute}(select(v.x, v.y, (i & 1u) == 1u)); }`;
  }
  return `fn ${fnName}(i: u32) -> ${compute} { return ${compute}(${buf}[i]); }`;
}
