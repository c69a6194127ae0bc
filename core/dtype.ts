/**
 * Element types of tensors.
 *
 * - `f32`: 32-bit float.
 * - `f16`: 16-bit float, stored packed two per 32-bit word so that it works on every WebGPU adapter, with or
 *   without the `shader-f16` feature; kernels unpack to f32 for arithmetic.
 * - `i32`, `u32`: 32-bit integers (token ids, labels, masks).
 *
 * @example
 * ```ts
 * import { byteSize, isFloat } from "./dtype.ts";
 * byteSize("f16", 3); // 8: three halves round up to two words
 * isFloat("i32"); // false
 * ```
 * @module
 */

/** The element types a tensor can hold. */
export type DType = "f32" | "f16" | "i32" | "u32";

/** Every dtype, for validation and tests. */
export const DTYPES: readonly DType[] = ["f32", "f16", "i32", "u32"];

/** Bytes per element (f16 is 2, although storage is rounded up to whole 32-bit words). */
export function itemSize(dtype: DType): number {
  return dtype === "f16" ? 2 : 4;
}

/** Bytes a buffer needs to hold `numel` elements of `dtype`, rounded up to a whole 32-bit word. */
export function byteSize(dtype: DType, numel: number): number {
  return Math.ceil((numel * itemSize(dtype)) / 4) * 4;
}

/** True for floating-point dtypes. */
export function isFloat(dtype: DType): boolean {
  return dtype === "f32" || dtype === "f16";
}

/** The dtype of a result computed from inputs of the given dtypes (f32 wins over f16, floats over integers). */
export function promote(...dtypes: DType[]): DType {
  if (dtypes.includes("f32")) return "f32";
  if (dtypes.includes("f16")) return "f16";
  if (dtypes.includes("i32")) return "i32";
  return "u32";
}

/** Throws a clear error for anything that is not a dtype name. */
export function checkDType(dtype: unknown): DType {
  if (!DTYPES.includes(dtype as DType)) {
    throw new Error(`Unknown dtype ${JSON.stringify(dtype)}: use one of ${DTYPES.join(", ")}`);
  }
  return dtype as DType;
}

/** The typed array `toArray()` returns for each dtype (f16 comes back widened to Float32Array). */
export type ArrayFor<D extends DType> = D extends "i32" ? Int32Array : D extends "u32" ? Uint32Array : Float32Array;

/** Any typed array a tensor can be created from or read back into. */
export type TensorData = Float32Array | Int32Array | Uint32Array | Uint16Array;
