/**
 * Text generation with a KV cache. The prompt is run once (prefill) and then one token per step; every step's
 * token is chosen on the GPU (`sampleNext`) and fed straight into the next step without a read-back. Tokens come
 * back to the CPU in chunks (a read-back costs ~11 ms), where EOS is looked for and the callback is called; the
 * few steps computed past an EOS inside a chunk are discarded. Batches are left-padded, as in transformers.
 *
 * @example
 * ```ts
 * import { generate } from "./generate.ts";
 * const out = await generate(model, [[1, 9038, 2501]], { maxNewTokens: 20, onTokens: (rows) => print(rows[0]) });
 * console.log(out.tokens[0], out.tokensPerSecond);
 * ```
 * @module
 */
import { noGrad } from "../core/autograd.ts";
import { full, tensor, zeros } from "../core/creation.ts";
import { getGpu } from "../core/gpu.ts";
import { assignSlice, reshape, slice } from "../core/ops/shape.ts";
import { scope } from "../core/scope.ts";
import type { Tensor } from "../core/tensor.ts";
import type { LayerCache, LlamaForCausalLM } from "./llama.ts";
import { sampleNext, type SamplingOptions } from "./sampling.ts";

/** Options of {@linkcode generate}. */
export interface GenerateOptions extends SamplingOptions {
  /** Tokens to generate per row at most. */
  maxNewTokens: number;
  /** Stop a row at this token (default the model's EOS); `null` never stops early. */
  eosTokenId?: number | number[] | null;
  /** 1 = token, 0 = left padding, per prompt row (default: all ones). */
  attentionMask?: number[][];
  /** Called with the newly generated tokens of every row, chunk by chunk. */
  onTokens?: (newTokens: number[][]) => void;
  /** Steps between read-backs (default 16). */
  chunk?: number;
}

/** The result of {@linkcode generate}. */
export interface GenerateResult {
  /** Generated tokens per row (EOS included when reached; nothing after it). */
  tokens: number[][];
  /** Tokens generated in all rows (up to and including EOS). */
  newTokens: number;
  /** Wall time of prefill + decoding, ms. */
  timeMs: number;
  /** newTokens / seconds. */
  tokensPerSecond: number;
}

/**
 * Generates from left-padded prompts `ids` [B][T] (pad positions marked 0 in `attentionMask`). Greedy when
 * `temperature` is 0 (the default).
 *
 * @example
 * ```ts
 * const { tokens } = await generate(model, [[1, 450]], { maxNewTokens: 8 });
 * ```
 */
export async function generate(
  model: LlamaForCausalLM,
  ids: number[][],
  opts: GenerateOptions,
): Promise<GenerateResult> {
  const cfg = model.config;
  const B = ids.length;
  const T0 = ids[0]?.length ?? 0;
  if (B === 0 || T0 === 0) throw new Error("generate: needs at least one non-empty prompt");
  if (ids.some((r) => r.length !== T0)) throw new Error("generate: prompts must be left-padded to one length");
  const maxLen = T0 + opts.maxNewTokens;
  if (maxLen > cfg.maxPositionEmbeddings) {
    throw new Error(
      `generate: prompt (${T0}) + maxNewTokens (${opts.maxNewTokens}) exceeds max_position_embeddings (${cfg.maxPositionEmbeddings})`,
    );
  }
  const mask = opts.attentionMask ?? ids.map((r) => r.map(() => 1));
  const eos = opts.eosTokenId === null ? [] : [opts.eosTokenId ?? cfg.eosTokenId].flat();
  const chunk = Math.max(1, opts.chunk ?? 16);
  const realLen = mask.map((r) => r.reduce((a, v) => a + (v ? 1 : 0), 0));
  const wasTraining = model.training;
  model.eval();
  const t0 = performance.now();
  const dtype = model.model.embed_tokens.weight.dtype === "f16" ? "f16" : "f32";
  const { numKeyValueHeads: nkv, headDim: d } = cfg;
  const caches: LayerCache[] = model.model.layers.map(() => ({
    k: zeros([B, maxLen, nkv, d], { dtype }).keep(),
    v: zeros([B, maxLen, nkv, d], { dtype }).keep(),
  }));
  const keyMask = tensor(Int32Array.from(mask.flatMap((r) => [...r, ...new Array(opts.maxNewTokens).fill(1)])), [
    B,
    maxLen,
  ], {
    dtype: "i32",
  }).keep();
  const out = full([B, Math.max(opts.maxNewTokens, 1)], -1, { dtype: "i32" }).keep();
  const tokens: number[][] = ids.map(() => []);
  const done = ids.map(() => false);
  let next: Tensor | null = null;
  let readUpTo = 0;
  try {
    for (let step = 0; step < opts.maxNewTokens; step++) {
      const produced = scope(() =>
        noGrad(() => {
          // Positions follow transformers: cumsum(mask) − 1 for the prompt; real length + step afterwards.
          const len = step === 0 ? T0 : 1;
          const pos = new Int32Array(B * len);
          for (let b = 0; b < B; b++) {
            if (step === 0) {
              let c = 0;
              for (let t = 0; t < T0; t++) pos[b * T0 + t] = mask[b][t] ? c++ : 1;
            } else pos[b] = realLen[b] + step - 1;
          }
          const past = step === 0 ? 0 : T0 + step - 1;
          const inputIds = step === 0 ? ids : reshape(next!, [B, 1]);
          using m = slice(keyMask, 1, 0, past + len).contiguous();
          const lastPositions = Array.from({ length: B }, (_, b) => b * len + len - 1);
          const { logits } = model.forward(inputIds, {
            attentionMask: m,
            positionIds: { data: pos, shape: [B, len] },
            cache: caches,
            cacheLength: past,
            logitsPositions: lastPositions,
          });
          const picked = sampleNext(logits, { ...opts, step });
          assignSlice(out, reshape(picked, [B, 1]), 1, step);
          return picked;
        })
      );
      next?.dispose();
      next = produced;
      const last = step === opts.maxNewTokens - 1;
      if ((step + 1) % chunk === 0 || last) {
        const all = await out.toArray() as Int32Array;
        const fresh: number[][] = ids.map(() => []);
        for (let b = 0; b < B; b++) {
          for (let s = readUpTo; s <= step && !done[b]; s++) {
            const tok = all[b * opts.maxNewTokens + s];
            tokens[b].push(tok);
            fresh[b].push(tok);
            if (eos.includes(tok)) done[b] = true;
          }
        }
        readUpTo = step + 1;
        opts.onTokens?.(fresh);
        if (done.every(Boolean)) break;
      }
    }
  } finally {
    next?.dispose();
    for (const c of caches) {
      c.k.dispose();
      c.v.dispose();
    }
    keyMask.dispose();
    out.dispose();
    model.train(wasTraining);
  }
  await getGpu().sync();
  const timeMs = performance.now() - t0;
  const newTokens = tokens.reduce((a, r) => a + r.length, 0);
  return { tokens, newTokens, timeMs, tokensPerSecond: newTokens / (timeMs / 1000) };
}
