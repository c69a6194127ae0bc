/**
 * webtune peft: LoRA adapters, PEFT-format files and the Trainer.
 *
 * @example
 * ```ts
 * import * as peft from "./mod.ts";
 * ```
 * @module
 */
export const PEFT_AREA = "peft";
