/**
 * Seeded random numbers that are the same on every GPU and on the CPU: a counter-based generator. Value `i` of
 * a draw is a hash of (seed, offset + i), so no state lives on the GPU, kernels draw in parallel, and a dropout
 * mask can be recomputed in the backward pass instead of stored. The hash is Chris Wellons' `lowbias32`
 * (a well-mixed 32-bit integer permutation), applied twice with the seed folded in.
 *
 * Each draw of the global generator gets its own key derived from the global seed and a draw counter, so
 * successive draws differ; `manualSeed(s)` makes a run repeatable.
 *
 * @example
 * ```ts
 * import { manualSeed, nextDraw, randomBitsCpu } from "./random.ts";
 * manualSeed(42);
 * const { seed, offset } = nextDraw(); // the key a kernel will hash with
 * randomBitsCpu(seed, offset); // the first u32 that kernel sees, computed on the CPU
 * ```
 * @module
 */

/** WGSL of the generator: `rngBits(seed, counter)` → u32, `rngUniform` → [0, 1), `rngNormal` → N(0, 1). */
export const RNG_WGSL = `
fn lowbias32(v: u32) -> u32 {
  var x = v;
  x ^= x >> 16u; x *= 0x7feb352du; x ^= x >> 15u; x *= 0x846ca68bu; x ^= x >> 16u;
  return x;
}
fn rngBits(seed: u32, counter: u32) -> u32 { return lowbias32(lowbias32(counter) ^ lowbias32(seed ^ 0x9e3779b9u)); }
fn rngUniform(seed: u32, counter: u32) -> f32 { return f32(rngBits(seed, counter) >> 8u) * 5.9604644775390625e-8; }
fn rngNormal(seed: u32, counter: u32) -> f32 {
  // Box–Muller on two uniforms; u1 is kept away from 0.
  let u1 = (f32(rngBits(seed, 2u * counter) >> 8u) + 0.5) * 5.9604644775390625e-8;
  let u2 = f32(rngBits(seed, 2u * counter + 1u) >> 8u) * 5.9604644775390625e-8;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}`;

function lowbias32(v: number): number {
  let x = v >>> 0;
  x ^= x >>> 16;
  x = Math.imul(x, 0x7feb352d) >>> 0;
  x ^= x >>> 15;
  x = Math.imul(x, 0x846ca68b) >>> 0;
  x ^= x >>> 16;
  return x >>> 0;
}

/** The CPU twin of WGSL `rngBits`: identical bits. */
export function randomBitsCpu(seed: number, counter: number): number {
  return lowbias32(lowbias32(counter >>> 0) ^ lowbias32((seed ^ 0x9e3779b9) >>> 0)) >>> 0;
}

/** The CPU twin of WGSL `rngUniform`. */
export function randomUniformCpu(seed: number, counter: number): number {
  return (randomBitsCpu(seed, counter) >>> 8) * 5.9604644775390625e-8;
}

let globalSeed = 0x5eed;
let draws = 0;

/**
 * Seeds the global generator (like `torch.manual_seed`).
 *
 * @example
 * ```ts
 * manualSeed(0);
 * ```
 */
export function manualSeed(seed: number): void {
  globalSeed = seed >>> 0;
  draws = 0;
}

/**
 * The key for the next draw of the global generator: a fresh seed derived from (global seed, draw number), with
 * counters from 0, so one draw may use up to 2³² counters and draws never overlap.
 */
export function nextDraw(): { seed: number; offset: number } {
  return { seed: randomBitsCpu(globalSeed, draws++), offset: 0 };
}

/**
 * The global generator's position, to replay draws exactly (gradient checkpointing recomputes a layer with the
 * same dropout masks).
 *
 * @example
 * ```ts
 * const state = getRngState();
 * // ... draws ...
 * setRngState(state); // the same draws again
 * ```
 */
export function getRngState(): { seed: number; draws: number } {
  return { seed: globalSeed, draws };
}

/** Restores a position saved by {@linkcode getRngState}. @example `setRngState(state);` */
export function setRngState(state: { seed: number; draws: number }): void {
  globalSeed = state.seed >>> 0;
  draws = state.draws;
}
