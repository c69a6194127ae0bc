/**
 * webtune nn: modules and the LLaMA decoder.
 *
 * @example
 * ```ts
 * import * as nn from "./mod.ts";
 * ```
 * @module
 */
export const NN_AREA = "nn";
