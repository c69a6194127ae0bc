/**
 * webtune: LoRA and QLoRA fine-tuning of LLaMA-family models in TypeScript, with tensor ops as WebGPU compute
 * shaders.
 *
 * @example
 * ```ts
 * import { AdamW, init, randn, scope, tensor } from "./mod.ts";
 * await init();
 * const w = randn([4, 1], { seed: 0, requiresGrad: true });
 * const x = randn([32, 4], { seed: 1 });
 * const y = x.matmul(tensor([[1], [2], [3], [4]]));
 * const opt = new AdamW([w], { lr: 0.1 });
 * for (let step = 0; step < 100; step++) {
 *   scope(() => {
 *     x.matmul(w).sub(y).square().mean().backward();
 *     opt.step();
 *     opt.zeroGrad();
 *   });
 * }
 * ```
 * @module
 */
export * from "./core/mod.ts";
