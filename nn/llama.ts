/**
 * The LLaMA decoder, written as one straight path like llama2.c's `run.c`: token embedding → N × (RMSNorm →
 * attention with rotary embeddings and grouped-query heads → residual → RMSNorm → SwiGLU MLP → residual) → RMSNorm
 * → LM head. Module and parameter names are Hugging Face's, so checkpoints and PEFT adapters load by name.
 *
 * @example
 * ```ts
 * import { LlamaForCausalLM, llamaPreset } from "./llama.ts";
 * const model = new LlamaForCausalLM(llamaPreset("tiny"));
 * const { logits, loss } = model.forward([[1, 450, 4996]], { labels: [[-100, 450, 4996]] });
 * ```
 * @module
 */
import { record } from "../core/autograd.ts";
import { tensor } from "../core/creation.ts";
import type { DType } from "../core/dtype.ts";
import { elementwise } from "../core/ops/dispatch.ts";
import { add } from "../core/ops/elementwise.ts";
import { attention, rope } from "../core/ops/attention.ts";
import { crossEntropy, embedding } from "../core/ops/nn.ts";
import { cat, reshape, slice } from "../core/ops/shape.ts";
import { full } from "../core/creation.ts";
import { fmtShape, type Tensor } from "../core/tensor.ts";
import { checkpoint } from "./checkpoint.ts";
import { Embedding, Linear, RMSNorm } from "./layers.ts";
import { Module } from "./module.ts";
import { assignSlice } from "../core/ops/shape.ts";

/** The architecture of a LLaMA model (HF `config.json` fields, camel-cased). */
export interface LlamaConfig {
  /** Vocabulary size. */
  vocabSize: number;
  /** Model width. */
  hiddenSize: number;
  /** MLP width. */
  intermediateSize: number;
  /** Decoder layers. */
  numHiddenLayers: number;
  /** Query heads. */
  numAttentionHeads: number;
  /** Key/value heads (grouped-query attention when fewer than query heads). */
  numKeyValueHeads: number;
  /** Width of one head (default hiddenSize / numAttentionHeads). */
  headDim: number;
  /** RMSNorm epsilon. */
  rmsNormEps: number;
  /** RoPE base. */
  ropeTheta: number;
  /** Longest sequence the model accepts. */
  maxPositionEmbeddings: number;
  /** LM head shares the embedding table. */
  tieWordEmbeddings: boolean;
  /** BOS id. */
  bosTokenId: number;
  /** EOS id(s). */
  eosTokenId: number | number[];
  /** Biases on q/k/v/o projections. */
  attentionBias: boolean;
  /** Biases on the MLP projections. */
  mlpBias: boolean;
  /** RoPE on interleaved pairs (llama2.c / Meta checkpoints) instead of rotate-half (HF). */
  ropeInterleaved: boolean;
}

/** Named presets with random weights, for tests and for measuring speed and memory without a checkpoint. */
export const LLAMA_PRESETS: Record<string, Omit<LlamaConfig, "headDim"> & { headDim?: number }> = {
  "llama-2-7b": {
    vocabSize: 32000,
    hiddenSize: 4096,
    intermediateSize: 11008,
    numHiddenLayers: 32,
    numAttentionHeads: 32,
    numKeyValueHeads: 32,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    maxPositionEmbeddings: 4096,
    tieWordEmbeddings: false,
    bosTokenId: 1,
    eosTokenId: 2,
    attentionBias: false,
    mlpBias: false,
    ropeInterleaved: false,
  },
  // A small model over the Llama-2 vocabulary (≈ 9 M parameters, most in the embeddings): the examples' default.
  tiny: {
    vocabSize: 32000,
    hiddenSize: 128,
    intermediateSize: 384,
    numHiddenLayers: 4,
    numAttentionHeads: 4,
    numKeyValueHeads: 4,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    maxPositionEmbeddings: 512,
    tieWordEmbeddings: false,
    bosTokenId: 1,
    eosTokenId: 2,
    attentionBias: false,
    mlpBias: false,
    ropeInterleaved: false,
  },
};

/**
 * A preset configuration by name ("llama-2-7b", "tiny"); unknown names get an error listing the presets.
 *
 * @example
 * ```ts
 * const cfg = llamaPreset("llama-2-7b");
 * ```
 */
export function llamaPreset(name: string): LlamaConfig {
  const p = LLAMA_PRESETS[name];
  if (!p) throw new Error(`Unknown model preset "${name}". Presets: ${Object.keys(LLAMA_PRESETS).join(", ")}`);
  return { ...p, headDim: p.headDim ?? p.hiddenSize / p.numAttentionHeads };
}

/**
 * Reads a Hugging Face `config.json` object. Accepts `rope_theta` or `rope_parameters.rope_theta` (newer
 * transformers); rejects other model types and RoPE scaling it does not implement.
 *
 * @example
 * ```ts
 * const cfg = llamaConfigFromHF(JSON.parse(await Deno.readTextFile("config.json")));
 * ```
 */
export function llamaConfigFromHF(json: Record<string, unknown>): LlamaConfig {
  const type = json.model_type;
  if (type !== undefined && type !== "llama") {
    throw new Error(`Unsupported model_type "${type}": webtune implements "llama" (LLaMA-1/2/3 architecture)`);
  }
  const num = (key: string, fallback?: number): number => {
    const v = json[key];
    if (typeof v === "number") return v;
    if (fallback !== undefined) return fallback;
    throw new Error(`config.json is missing "${key}"`);
  };
  const ropeParams = json.rope_parameters as Record<string, unknown> | undefined;
  const scaling = (json.rope_scaling ?? null) as Record<string, unknown> | null;
  const ropeType = (ropeParams?.rope_type ?? scaling?.rope_type ?? scaling?.type ?? "default") as string;
  if (ropeType !== "default") throw new Error(`RoPE type "${ropeType}" is not supported (only "default")`);
  const hidden = num("hidden_size");
  const heads = num("num_attention_heads");
  const theta = typeof json.rope_theta === "number"
    ? json.rope_theta
    : typeof ropeParams?.rope_theta === "number"
    ? ropeParams.rope_theta
    : 10000;
  return {
    vocabSize: num("vocab_size"),
    hiddenSize: hidden,
    intermediateSize: num("intermediate_size"),
    numHiddenLayers: num("num_hidden_layers"),
    numAttentionHeads: heads,
    numKeyValueHeads: num("num_key_value_heads", heads),
    headDim: num("head_dim", hidden / heads),
    rmsNormEps: num("rms_norm_eps", 1e-6),
    ropeTheta: theta,
    maxPositionEmbeddings: num("max_position_embeddings", 2048),
    tieWordEmbeddings: json.tie_word_embeddings === true,
    bosTokenId: num("bos_token_id", 1),
    eosTokenId: (json.eos_token_id as number | number[] | undefined) ?? 2,
    attentionBias: json.attention_bias === true,
    mlpBias: json.mlp_bias === true,
    ropeInterleaved: false,
  };
}

/** Per-layer key/value cache for generation: [B, maxLen, Hkv, D] buffers and the filled length. */
export interface LayerCache {
  /** Keys after RoPE. */
  k: Tensor;
  /** Values. */
  v: Tensor;
}

/** Shared inputs of every layer in one forward pass. */
export interface LayerContext {
  /** Positions [B, T] (i32). */
  positions: Tensor;
  /** Key mask [B, S] (1 = attend), or null for no padding. */
  keyMask: Tensor | null;
  /** Per-layer caches during generation. */
  cache?: LayerCache[];
  /** Tokens already in the caches. */
  cacheLength?: number;
}

/** `silu(gate) · up`, fused (one kernel forward, one per input backward). */
export function swiglu(gate: Tensor, up: Tensor): Tensor {
  const dt = gate.dtype === "f16" && up.dtype === "f16" ? "f16" : "f32";
  const SIG =
    "fn sg(x: f32) -> f32 { if (x >= 0.0) { return 1.0 / (1.0 + exp(-x)); } let e = exp(x); return e / (1.0 + e); }";
  const y = elementwise("swiglu", "a * sg(a) * b", [gate, up], { out: dt, helpers: SIG });
  return record(y, "swiglu", [gate, up], [gate, up], (g, [a, b], needs) => [
    needs[0]
      ? elementwise("swiglu_da", "a * c * sg(b) * (1.0 + b * (1.0 - sg(b)))", [g, a, b], { out: g.dtype, helpers: SIG })
      : null,
    needs[1] ? elementwise("swiglu_db", "a * b * sg(b)", [g, a], { out: g.dtype, helpers: SIG }) : null,
  ]);
}

/** Multi-head attention with RoPE and grouped-query heads. */
export class LlamaAttention extends Module {
  /** Query projection. */
  q_proj: Linear;
  /** Key projection. */
  k_proj: Linear;
  /** Value projection. */
  v_proj: Linear;
  /** Output projection. */
  o_proj: Linear;
  private readonly cfg: LlamaConfig;

  /** Layers sized by `cfg`. */
  constructor(cfg: LlamaConfig, dtype: DType) {
    super();
    this.cfg = cfg;
    const { hiddenSize: h, numAttentionHeads: nq, numKeyValueHeads: nkv, headDim: d, attentionBias: bias } = cfg;
    this.q_proj = new Linear(h, nq * d, { bias, dtype });
    this.k_proj = new Linear(h, nkv * d, { bias, dtype });
    this.v_proj = new Linear(h, nkv * d, { bias, dtype });
    this.o_proj = new Linear(nq * d, h, { bias, dtype });
  }

  /** `x` [B, T, hidden] → [B, T, hidden]. */
  forward(x: Tensor, ctx: LayerContext, layer: number): Tensor {
    const [B, T] = x.shape;
    const { numAttentionHeads: nq, numKeyValueHeads: nkv, headDim: d, ropeTheta: theta, ropeInterleaved } = this.cfg;
    using q0 = this.q_proj.forward(x);
    using k0 = this.k_proj.forward(x);
    using v0 = this.v_proj.forward(x);
    using q1 = reshape(q0, [B, T, nq, d]);
    using k1 = reshape(k0, [B, T, nkv, d]);
    using v = reshape(v0, [B, T, nkv, d]);
    using q = rope(q1, ctx.positions, { theta, interleaved: ropeInterleaved });
    using k = rope(k1, ctx.positions, { theta, interleaved: ropeInterleaved });
    let o: Tensor;
    const cache = ctx.cache?.[layer];
    if (cache) {
      const start = ctx.cacheLength ?? 0;
      assignSlice(cache.k, k, 1, start);
      assignSlice(cache.v, v, 1, start);
      using kAll = slice(cache.k, 1, 0, start + T);
      using vAll = slice(cache.v, 1, 0, start + T);
      o = attention(q, kAll, vAll, { keyMask: ctx.keyMask ?? undefined, queryOffset: start });
    } else {
      o = attention(q, k, v, { keyMask: ctx.keyMask ?? undefined });
    }
    using merged = reshape(o, [B, T, nq * d]);
    o.dispose();
    return this.o_proj.forward(merged);
  }
}

/** The SwiGLU feed-forward block: down(silu(gate(x)) · up(x)). */
export class LlamaMLP extends Module {
  /** Gate projection. */
  gate_proj: Linear;
  /** Up projection. */
  up_proj: Linear;
  /** Down projection. */
  down_proj: Linear;

  /** Layers sized by `cfg`. */
  constructor(cfg: LlamaConfig, dtype: DType) {
    super();
    const bias = cfg.mlpBias;
    this.gate_proj = new Linear(cfg.hiddenSize, cfg.intermediateSize, { bias, dtype });
    this.up_proj = new Linear(cfg.hiddenSize, cfg.intermediateSize, { bias, dtype });
    this.down_proj = new Linear(cfg.intermediateSize, cfg.hiddenSize, { bias, dtype });
  }

  /** `x` [..., hidden] → [..., hidden]. */
  forward(x: Tensor): Tensor {
    using g = this.gate_proj.forward(x);
    using u = this.up_proj.forward(x);
    using h = swiglu(g, u);
    return this.down_proj.forward(h);
  }
}

/** One decoder layer: pre-norm attention and pre-norm MLP, each with a residual connection. */
export class LlamaDecoderLayer extends Module {
  /** Attention block. */
  self_attn: LlamaAttention;
  /** MLP block. */
  mlp: LlamaMLP;
  /** Norm before attention. */
  input_layernorm: RMSNorm;
  /** Norm before the MLP. */
  post_attention_layernorm: RMSNorm;

  /** A layer sized by `cfg`; norms are f32 for numerical headroom. */
  constructor(cfg: LlamaConfig, dtype: DType) {
    super();
    this.self_attn = new LlamaAttention(cfg, dtype);
    this.mlp = new LlamaMLP(cfg, dtype);
    this.input_layernorm = new RMSNorm(cfg.hiddenSize, cfg.rmsNormEps, { dtype });
    this.post_attention_layernorm = new RMSNorm(cfg.hiddenSize, cfg.rmsNormEps, { dtype });
  }

  /** `x` [B, T, hidden] → [B, T, hidden]. */
  forward(x: Tensor, ctx: LayerContext, layer: number): Tensor {
    let h: Tensor;
    {
      using n = this.input_layernorm.forward(x);
      using a = this.self_attn.forward(n, ctx, layer);
      h = add(x, a);
    }
    using n2 = this.post_attention_layernorm.forward(h);
    using m = this.mlp.forward(n2);
    const out = add(h, m);
    h.dispose();
    return out;
  }
}

/** The decoder stack without the LM head. */
export class LlamaModel extends Module {
  /** Token embeddings. */
  embed_tokens: Embedding;
  /** Decoder layers. */
  layers: LlamaDecoderLayer[];
  /** Final norm. */
  norm: RMSNorm;
  /** Recompute each layer in backward instead of keeping its activations. */
  gradientCheckpointing = false;

  /** A stack sized by `cfg` with random weights. */
  constructor(cfg: LlamaConfig, dtype: DType) {
    super();
    this.embed_tokens = new Embedding(cfg.vocabSize, cfg.hiddenSize, { dtype });
    this.layers = Array.from({ length: cfg.numHiddenLayers }, () => new LlamaDecoderLayer(cfg, dtype));
    this.norm = new RMSNorm(cfg.hiddenSize, cfg.rmsNormEps, { dtype });
  }

  /** ids [B, T] → final hidden states [B, T, hidden]. */
  forward(ids: Tensor, ctx: LayerContext): Tensor {
    let h = this.embed_tokens.forward(ids);
    this.layers.forEach((layer, i) => {
      const useCheckpoint = this.gradientCheckpointing && this.training && ctx.cache === undefined;
      const extras = ctx.keyMask ? [ctx.positions, ctx.keyMask] : [ctx.positions];
      const next = useCheckpoint
        ? checkpoint(
          (x, [positions, keyMask]) => layer.forward(x, { positions, keyMask: keyMask ?? null }, i),
          h,
          extras,
          layer.trainableParameters(),
        )
        : layer.forward(h, ctx, i);
      h.dispose();
      h = next;
    });
    const out = this.norm.forward(h);
    h.dispose();
    return out;
  }
}

/** Token ids as a tensor, nested arrays, or a flat Int32Array with its shape. */
export type IdsInput = Tensor | number[][] | { data: Int32Array; shape: [number, number] };

/** Options of {@linkcode LlamaForCausalLM.forward}. */
export interface CausalLMOptions {
  /** 1 for real tokens, 0 for padding, [B, T]; default all ones. */
  attentionMask?: IdsInput;
  /** Targets aligned with the inputs (HF convention: the model shifts them); -100 is ignored. */
  labels?: IdsInput;
  /** Positions [B, T]; default 0..T−1 for every row. */
  positionIds?: IdsInput;
  /**
   * Flat indices into [B·T] where logits are needed; the LM head runs only there (logits come back as [P, V]).
   * With labels, the loss uses the label that follows each position.
   */
  logitsPositions?: Int32Array | number[];
  /** Generation state (see `generate`). */
  cache?: LayerCache[];
  /** Tokens already in the cache. */
  cacheLength?: number;
}

/** The output of a causal-LM forward. */
export interface CausalLMOutput {
  /** [B, T, V], or [P, V] with `logitsPositions`. */
  logits: Tensor;
  /** Mean cross-entropy over the non-ignored shifted labels, when labels were given. */
  loss: Tensor | null;
}

/** A LLaMA decoder with its LM head. */
export class LlamaForCausalLM extends Module {
  /** The decoder stack. */
  model: LlamaModel;
  /** Output projection to the vocabulary (absent when tied to the embeddings). */
  lm_head: Linear | null;
  /** The architecture. */
  readonly config: LlamaConfig;

  /** A model with random weights in `dtype` (default f32). */
  constructor(config: LlamaConfig, opts: { dtype?: DType } = {}) {
    super();
    const dtype = opts.dtype ?? "f32";
    this.config = config;
    if (config.numAttentionHeads % config.numKeyValueHeads !== 0) {
      throw new Error(
        `num_attention_heads (${config.numAttentionHeads}) must be a multiple of num_key_value_heads (${config.numKeyValueHeads})`,
      );
    }
    this.model = new LlamaModel(config, dtype);
    this.lm_head = config.tieWordEmbeddings
      ? null
      : new Linear(config.hiddenSize, config.vocabSize, { bias: false, dtype });
  }

  /** Turns gradient checkpointing on or off (recompute each decoder layer in backward). Returns this. */
  gradientCheckpointing(on = true): this {
    this.model.gradientCheckpointing = on;
    return this;
  }

  /** Logits for hidden states `h` [..., hidden]. */
  head(h: Tensor): Tensor {
    if (this.lm_head) return this.lm_head.forward(h);
    using wt = this.model.embed_tokens.weight.transpose(0, 1);
    return h.matmul(wt);
  }

  /** Runs the model; see {@linkcode CausalLMOptions}. */
  forward(inputIds: IdsInput, opts: CausalLMOptions = {}): CausalLMOutput {
    const cfg = this.config;
    const ids = toIds(inputIds, "inputIds", cfg.vocabSize);
    const [B, T] = ids.shape;
    const start = opts.cacheLength ?? 0;
    if (start + T > cfg.maxPositionEmbeddings) {
      throw new Error(
        `Sequence of ${start + T} tokens exceeds max_position_embeddings (${cfg.maxPositionEmbeddings})`,
      );
    }
    using mask = opts.attentionMask ? toIds(opts.attentionMask, "attentionMask") : null;
    using positions = opts.positionIds ? toIds(opts.positionIds, "positionIds") : defaultPositions(B, T, start);
    const h = this.model.forward(ids, { positions, keyMask: mask, cache: opts.cache, cacheLength: start });
    if (ids !== inputIds) ids.dispose();
    let logits: Tensor;
    let loss: Tensor | null = null;
    if (opts.logitsPositions) {
      const pos = Int32Array.from(opts.logitsPositions);
      for (const p of pos) {
        if (p < 0 || p >= B * T) throw new Error(`logitsPositions: ${p} is outside [0, ${B * T})`);
      }
      using flat = reshape(h, [B * T, cfg.hiddenSize]);
      using posT = tensor(pos, [pos.length], { dtype: "i32" });
      using picked = embedding(posT, flat);
      h.dispose();
      logits = this.head(picked);
      if (opts.labels) {
        const labels = cpuIds(opts.labels, "labels", [B, T]);
        const targets = new Int32Array(pos.length);
        pos.forEach((p, i) => (targets[i] = p % T === T - 1 ? -100 : labels[p + 1]));
        using tgt = tensor(targets, [targets.length], { dtype: "i32" });
        loss = crossEntropy(logits, tgt, { ignoreIndex: -100 });
      }
    } else {
      logits = this.head(h);
      h.dispose();
      if (opts.labels) {
        using labels = toIds(opts.labels, "labels");
        using shifted = slice(labels, 1, 1);
        using pad = full([B, 1], -100, { dtype: "i32" });
        using targets = cat([shifted, pad], 1);
        using flatT = reshape(targets, [B * T]);
        using flatL = reshape(logits, [B * T, cfg.vocabSize]);
        loss = crossEntropy(flatL, flatT, { ignoreIndex: -100 });
      }
    }
    return { logits, loss };
  }
}

function defaultPositions(B: number, T: number, start: number): Tensor {
  const p = new Int32Array(B * T);
  for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) p[b * T + t] = start + t;
  return tensor(p, [B, T], { dtype: "i32" });
}

/** Converts ids to an i32 [B, T] tensor, validating CPU values against the vocabulary. */
export function toIds(x: IdsInput, what: string, vocabSize?: number): Tensor {
  if ((x as Tensor).isTensor) {
    const t = x as Tensor;
    if (t.ndim !== 2) throw new Error(`${what} must be [batch, seq], got ${fmtShape(t.shape)}`);
    return t;
  }
  const { data, shape } = cpuIdsWithShape(x, what);
  if (vocabSize !== undefined) {
    for (let i = 0; i < data.length; i++) {
      if (data[i] < 0 || data[i] >= vocabSize) {
        throw new Error(`${what}: token id ${data[i]} at position ${i} is outside the vocabulary [0, ${vocabSize})`);
      }
    }
  }
  return tensor(data, shape, { dtype: "i32" });
}

function cpuIdsWithShape(x: IdsInput, what: string): { data: Int32Array; shape: [number, number] } {
  if (Array.isArray(x)) {
    const B = x.length, T = x[0]?.length ?? 0;
    const data = new Int32Array(B * T);
    x.forEach((row, b) => {
      if (row.length !== T) throw new Error(`${what}: rows have different lengths (${T} and ${row.length})`);
      data.set(row, b * T);
    });
    return { data, shape: [B, T] };
  }
  if ((x as Tensor).isTensor) throw new Error(`${what} must be on the CPU (number[][] or Int32Array) here`);
  const { data, shape } = x as { data: Int32Array; shape: [number, number] };
  if (data.length !== shape[0] * shape[1]) {
    throw new Error(`${what}: ${data.length} values do not fill ${fmtShape(shape)}`);
  }
  return { data, shape };
}

function cpuIds(x: IdsInput, what: string, shape: [number, number]): Int32Array {
  const r = cpuIdsWithShape(x, what);
  if (r.shape[0] !== shape[0] || r.shape[1] !== shape[1]) {
    throw new Error(`${what} has shape ${fmtShape(r.shape)}, expected ${fmtShape(shape)}`);
  }
  return r.data;
}
