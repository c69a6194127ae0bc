/**
 * Batching: padding examples into rectangular int32 batches, seeded shuffling, and length-grouped batch order.
 *
 * Everything here is deterministic for a given seed on every machine: the shuffle uses mulberry32 (a 32-bit
 * generator using only integer arithmetic) and Fisher–Yates, with no dependence on `Math.random`.
 *
 * @example
 * ```ts
 * import { batches, collate } from "./batching.ts";
 * const examples = [{ inputIds: [1, 5, 6], labels: [-100, 5, 6] }, { inputIds: [1, 7], labels: [-100, 7] }];
 * for (const group of batches(examples, { batchSize: 2, seed: 0 })) {
 *   const batch = collate(group, { padId: 0 }); // inputIds, attentionMask, labels: Int32Array of 2 × 3
 * }
 * ```
 * @module
 */
import { IGNORE_INDEX } from "./prompt.ts";

/** A tokenized example; `labels` (aligned with `inputIds`) is optional for {@link collate}. */
export interface TokenizedExample {
  inputIds: ArrayLike<number>;
  labels?: ArrayLike<number>;
}

/** A padded batch, row-major `[batchSize, seqLen]`. */
export interface Batch {
  inputIds: Int32Array;
  /** 1 on real tokens, 0 on padding. */
  attentionMask: Int32Array;
  /** -100 on padding (and wherever the example's labels are -100); all -100 when the examples have no labels. */
  labels: Int32Array;
  batchSize: number;
  seqLen: number;
}

/** A left-padded batch for generation. */
export interface GenerationBatch {
  inputIds: Int32Array;
  /** 1 on real tokens, 0 on the left padding. */
  attentionMask: Int32Array;
  /** Position of each token within its own sequence (0 at its first real token; 0 on padding). */
  positionIds: Int32Array;
  batchSize: number;
  seqLen: number;
}

/** Options of {@link collate} and {@link collateLeft}. */
export interface CollateOptions {
  /** The id written into padding positions (Llama-2 has no pad token: use 0 or the EOS id; the mask hides it). */
  padId: number;
  /** Pad every row to exactly this length (for fixed shapes); an example longer than this is an error. */
  padTo?: number;
  /** Round the padded length up to a multiple of this (like HF's `pad_to_multiple_of`). */
  padToMultipleOf?: number;
}

function paddedLength(lengths: number[], opts: CollateOptions, fn: string): number {
  if (!Number.isInteger(opts.padId)) throw new Error(`${fn}: padId must be an integer, got ${opts.padId}`);
  const longest = lengths.reduce((m, n) => Math.max(m, n), 0);
  let seqLen = longest;
  if (opts.padTo !== undefined) {
    if (!Number.isInteger(opts.padTo) || opts.padTo <= 0) {
      throw new Error(`${fn}: padTo must be a positive integer, got ${opts.padTo}`);
    }
    if (longest > opts.padTo) {
      throw new Error(
        `${fn}: an example has ${longest} tokens, more than padTo = ${opts.padTo}; truncate it or raise padTo`,
      );
    }
    seqLen = opts.padTo;
  }
  const multiple = opts.padToMultipleOf ?? 1;
  if (!Number.isInteger(multiple) || multiple <= 0) {
    throw new Error(`${fn}: padToMultipleOf must be a positive integer, got ${multiple}`);
  }
  return Math.ceil(seqLen / multiple) * multiple;
}

/**
 * Pads examples on the RIGHT into one batch (training): tokens first, then `padId` with attention mask 0 and
 * label -100.
 *
 * @example
 * ```ts
 * import { collate } from "./batching.ts";
 * const b = collate([{ inputIds: [1, 5, 6], labels: [-100, 5, 6] }, { inputIds: [1, 7] }], { padId: 0 });
 * // b.inputIds      = [1, 5, 6,   1, 7, 0]
 * // b.attentionMask = [1, 1, 1,   1, 1, 0]
 * // b.labels        = [-100, 5, 6,   -100, -100, -100]
 * ```
 */
export function collate(examples: TokenizedExample[], opts: CollateOptions): Batch {
  if (examples.length === 0) throw new Error("collate: no examples");
  const seqLen = paddedLength(examples.map((e) => e.inputIds.length), opts, "collate");
  const batchSize = examples.length;
  const inputIds = new Int32Array(batchSize * seqLen).fill(opts.padId);
  const attentionMask = new Int32Array(batchSize * seqLen);
  const labels = new Int32Array(batchSize * seqLen).fill(IGNORE_INDEX);
  examples.forEach((e, b) => {
    const row = b * seqLen, n = e.inputIds.length;
    if (e.labels && e.labels.length !== n) {
      throw new Error(`collate: example ${b} has ${n} input ids but ${e.labels.length} labels; they must align`);
    }
    for (let t = 0; t < n; t++) {
      inputIds[row + t] = e.inputIds[t];
      attentionMask[row + t] = 1;
      if (e.labels) labels[row + t] = e.labels[t];
    }
  });
  return { inputIds, attentionMask, labels, batchSize, seqLen };
}

/**
 * Pads prompts on the LEFT into one batch (generation), so every row's last prompt token sits in the last column
 * and new tokens are appended in step. Accepts id arrays or examples.
 *
 * @example
 * ```ts
 * import { collateLeft } from "./batching.ts";
 * const b = collateLeft([[1, 5, 6], [1, 7]], { padId: 0 });
 * // b.inputIds      = [1, 5, 6,   0, 1, 7]
 * // b.attentionMask = [1, 1, 1,   0, 1, 1]
 * // b.positionIds   = [0, 1, 2,   0, 0, 1]
 * ```
 */
export function collateLeft(prompts: (ArrayLike<number> | TokenizedExample)[], opts: CollateOptions): GenerationBatch {
  if (prompts.length === 0) throw new Error("collateLeft: no prompts");
  const rows = prompts.map((p) => ("inputIds" in p ? p.inputIds : p) as ArrayLike<number>);
  const seqLen = paddedLength(rows.map((r) => r.length), opts, "collateLeft");
  const batchSize = rows.length;
  const inputIds = new Int32Array(batchSize * seqLen).fill(opts.padId);
  const attentionMask = new Int32Array(batchSize * seqLen);
  const positionIds = new Int32Array(batchSize * seqLen);
  rows.forEach((ids, b) => {
    const offset = b * seqLen + seqLen - ids.length;
    for (let t = 0; t < ids.length; t++) {
      inputIds[offset + t] = ids[t];
      attentionMask[offset + t] = 1;
      positionIds[offset + t] = t;
    }
  });
  return { inputIds, attentionMask, positionIds, batchSize, seqLen };
}

/**
 * mulberry32: a 32-bit state generator (Tommy Ettinger's), returning doubles in [0, 1) that are exact multiples
 * of 2^-32. Integer-only arithmetic, so the sequence is the same on every machine and runtime.
 *
 * @example
 * ```ts
 * import { mulberry32 } from "./batching.ts";
 * const rand = mulberry32(42);
 * rand(); // 0.6011037519201636, the same everywhere
 * ```
 */
export function mulberry32(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * A seeded permutation of 0..n-1: Fisher–Yates (from the last position down, swapping position i with a uniform
 * j in 0..i) driven by {@link mulberry32}(seed). Identical across runs and machines.
 *
 * @example
 * ```ts
 * import { shuffled } from "./batching.ts";
 * shuffled(5, 0); // the same permutation of [0, 1, 2, 3, 4] every time
 * ```
 */
export function shuffled(n: number, seed: number): number[] {
  if (!Number.isInteger(n) || n < 0) throw new Error(`shuffled: n must be a non-negative integer, got ${n}`);
  const order = Array.from({ length: n }, (_, i) => i);
  const rand = mulberry32(seed);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    const tmp = order[i];
    order[i] = order[j];
    order[j] = tmp;
  }
  return order;
}

/** Options of {@link batches}. */
export interface BatchOptions<T> {
  batchSize: number;
  /** Seed of the epoch's order (use e.g. `seed + epoch` for a fresh order each epoch). */
  seed: number;
  /**
   * Hugging Face's `group_by_length`: shuffle, cut the order into megabatches of `min(n / (4·batchSize), 50)`
   * batches, sort each megabatch by length (longest first), then cut batches — so each batch holds examples of
   * similar length and needs little padding, while the epoch stays randomized. Default false.
   */
  groupByLength?: boolean;
  /** Drop the last batch when it is smaller than `batchSize`. Default false. */
  dropLast?: boolean;
  /** Length of an example; default `example.inputIds.length`. */
  lengthOf?: (example: T) => number;
}

/**
 * One epoch of batches in a seeded shuffled order (optionally grouped by length). Deterministic for a seed.
 *
 * @example
 * ```ts
 * import { batches, collate } from "./batching.ts";
 * const data = [[1, 2], [1, 2, 3], [1], [1, 4, 5, 6]].map((ids) => ({ inputIds: ids }));
 * for (const group of batches(data, { batchSize: 2, seed: 7, groupByLength: true })) {
 *   collate(group, { padId: 0 });
 * }
 * ```
 */
export function batches<T>(examples: T[], opts: BatchOptions<T>): T[][] {
  const { batchSize } = opts;
  if (!Number.isInteger(batchSize) || batchSize <= 0) {
    throw new Error(`batches: batchSize must be a positive integer, got ${batchSize}`);
  }
  const n = examples.length;
  let order = shuffled(n, opts.seed);
  if (opts.groupByLength && n > 0) {
    const lengthOf = opts.lengthOf ?? ((e: T) => (e as TokenizedExample).inputIds.length);
    const lengths = examples.map(lengthOf);
    order = lengthGroupedOrder(order, lengths, batchSize);
  }
  const out: T[][] = [];
  for (let i = 0; i < n; i += batchSize) {
    const idx = order.slice(i, i + batchSize);
    if (idx.length < batchSize && opts.dropLast) break;
    out.push(idx.map((k) => examples[k]));
  }
  return out;
}

/** HF `get_length_grouped_indices` applied to an already shuffled order. */
function lengthGroupedOrder(order: number[], lengths: number[], batchSize: number): number[] {
  const n = order.length;
  const megaBatchMult = Math.max(1, Math.min(Math.floor(n / (batchSize * 4)), 50));
  const megaSize = megaBatchMult * batchSize;
  const megas: number[][] = [];
  for (let i = 0; i < n; i += megaSize) {
    // Stable sort, longest first (Python's sorted(..., reverse=True) keeps ties in order too).
    megas.push(order.slice(i, i + megaSize).sort((a, b) => lengths[b] - lengths[a]));
  }
  // Put the longest example of the epoch first, so a too-large batch fails at once rather than hours in.
  let maxMega = 0;
  megas.forEach((m, k) => {
    if (lengths[m[0]] > lengths[megas[maxMega][0]]) maxMega = k;
  });
  [megas[0][0], megas[maxMega][0]] = [megas[maxMega][0], megas[0][0]];
  return megas.flat();
}
