/**
 * webtune quant: NF4 quantization and Linear4bit.
 *
 * @example
 * ```ts
 * import * as quant from "./mod.ts";
 * ```
 * @module
 */
export const QUANT_AREA = "quant";
