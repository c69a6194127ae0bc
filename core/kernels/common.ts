/**
 * WGSL pieces shared by the kernel generators: storage types per dtype, element loads (f16 is packed two per
 * u32 word), and the 1-D thread index over a 2-D grid (one grid dimension holds at most 65,535 workgroups).
 *
 * @example
 * ```ts
 * import { gridFor, storageDecl } from "./common.ts";
 * storageDecl(1, "x", "f16", "read"); // "@group(0) @binding(1) var<storage, read> x: array<u32>;"
 * gridFor(1_000_000, 256); // [3907, 1]
 * ```
 * @module
 */
import type { DType } from "../dtype.ts";

/** WGSL element type of a storage array holding `dtype` (f16 is packed into u32 words). */
export function storageType(dtype: DType): string {
  return dtype === "f32" ? "f32" : dtype === "i32" ? "i32" : "u32";
}

/** A storage binding declaration. */
export function storageDecl(binding: number, name: string, dtype: DType, access: "read" | "read_write"): string {
  return `@group(0) @binding(${binding}) var<storage, ${access}> ${name}: array<${storageType(dtype)}>;`;
}

/** WGSL function `fn <fnName>(i: u32) -> f32` loading element `i` of `buf` as f32. */
export function loadF32Fn(fnName: string, buf: string, dtype: DType): string {
  switch (dtype) {
    case "f32":
      return `fn ${fnName}(i: u32) -> f32 { return ${buf}[i]; }`;
    case "f16":
      return `fn ${fnName}(i: u32) -> f32 { let v = unpack2x16float(${buf}[i >> 1u]); return select(v.x, v.y, (i & 1u) == 1u); }`;
    default:
      return `fn ${fnName}(i: u32) -> f32 { return f32(${buf}[i]); }`;
  }
}

/** Clamps to the finite f16 range before packing (pack2x16float is undefined outside it). */
export const PACK_F16 =
  `fn packF16(a: f32, b: f32) -> u32 { return pack2x16float(clamp(vec2<f32>(a, b), vec2<f32>(-65504.0), vec2<f32>(65504.0))); }`;

/** The entry-point signature and linear thread index `t` for kernels launched with {@linkcode gridFor}. */
export function linearMain(workgroupSize: number): string {
  return `@compute @workgroup_size(${workgroupSize})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let t = gid.x + gid.y * nwg.x * ${workgroupSize}u;`;
}

/** Workgroup grid covering `threads` threads with `workgroupSize` per group: [x, y] with x ≤ 65,535. */
export function gridFor(threads: number, workgroupSize: number): [number, number] {
  const groups = Math.max(1, Math.ceil(threads / workgroupSize));
  if (groups <= 65535) return [groups, 1];
  const y = Math.ceil(groups / 65535);
  return [Math.ceil(groups / y), y];
}

/** Grid for one workgroup per row: [x, y] with x·y ≥ rows; the kernel computes `row = wid.x + wid.y * nwg.x`. */
export function rowGrid(rows: number): [number, number] {
  if (rows <= 65535) return [Math.max(rows, 1), 1];
  const y = Math.ceil(rows / 65535);
  return [Math.ceil(rows / y), y];
}

/** Writes u32/i32/f32 values into a uniform block by word index. */
export class UniformWriter {
  /** The words. */
  readonly u32: Uint32Array;
  private readonly f32: Float32Array;
  private readonly i32: Int32Array;

  /** A block of `words` 32-bit words (rounded up to a multiple of 4). */
  constructor(words: number) {
    this.u32 = new Uint32Array(Math.ceil(words / 4) * 4);
    this.f32 = new Float32Array(this.u32.buffer);
    this.i32 = new Int32Array(this.u32.buffer);
  }
  /** Sets word `i` to an unsigned integer. */
  u(i: number, v: number): this {
    this.u32[i] = v;
    return this;
  }
  /** Sets word `i` to a signed integer. */
  i(i: number, v: number): this {
    this.i32[i] = v;
    return this;
  }
  /** Sets word `i` to a float. */
  f(i: number, v: number): this {
    this.f32[i] = v;
    return this;
  }
}
