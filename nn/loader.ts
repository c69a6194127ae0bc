/**
 * Checkpoint loading and saving: Hugging Face directories (`config.json` + `model.safetensors`, or sharded
 * `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`; f32, f16 or bf16 on disk) and llama2.c
 * `.bin` files (version 0: a header of 7 int32 then f32 weights). Weights stream one tensor at a time from disk
 * to the GPU, converted to the requested dtype on the way, so a 7B checkpoint never sits twice in memory.
 *
 * @example
 * ```ts
 * import { fromPretrained, loadLlama2c } from "./loader.ts";
 * const model = await fromPretrained("/models/Llama-2-7b-hf", { dtype: "f16" });
 * const small = await loadLlama2c("../shared/models/stories260K/stories260K.bin");
 * ```
 * @module
 */
import type { DType } from "../core/dtype.ts";
import { fromArray } from "../core/creation.ts";
import {
  exists,
  isDirectory,
  joinPath,
  listDir,
  makeDir,
  readBytes,
  readRange,
  readText,
  writeText,
} from "../core/platform.ts";
import {
  readSafetensorsHeader,
  readTensorData,
  type SafetensorsHeader,
  saveSafetensors,
  type TensorToSave,
} from "../core/safetensors.ts";
import { f32ArrayToF16 } from "../core/half.ts";
import type { Tensor } from "../core/tensor.ts";
import type { QuantizationConfig } from "../quant/quantize_model.ts";
import { isPlaceholder, withDeferredInit } from "./layers.ts";
import { type LlamaConfig, llamaConfigFromHF, LlamaForCausalLM } from "./llama.ts";
import type { Module } from "./module.ts";

/** Options of {@linkcode fromPretrained}. */
export interface PretrainedOptions {
  /** Weight dtype on the GPU (default f16 for f16/bf16 checkpoints, f32 for f32 ones). */
  dtype?: DType;
  /** Called after each tensor is loaded (for progress bars). */
  onProgress?: (loaded: number, total: number, name: string) => void;
  /**
   * Called with each weight as it arrives; may return a replacement module for the layer owning it (quantization
   * uses this to turn a Linear into a Linear4bit before the next weight is read).
   */
  onWeight?: (model: Module, name: string, weight: Tensor) => void;
  /**
   * Quantize the linear layers while loading (QLoRA), e.g. `{ type: "nf4", blockSize: 64, doubleQuant: true, skip:
   * ["lm_head"] }`: each `Linear` becomes an NF4 `Linear4bit` as soon as its weights have arrived and its
   * full-precision weight is freed, so the whole model never sits on the GPU in f16/f32 (see quant/quantize_model.ts).
   */
  quantization?: QuantizationConfig;
}

/** Keys some checkpoints carry that are derived state, not weights. */
const IGNORED = [/rotary_emb\.inv_freq$/];

/**
 * Loads a Hugging Face LLaMA directory. Errors name what is missing: the directory, `config.json`, the weights
 * (listing the files present), or any expected tensor.
 *
 * @example
 * ```ts
 * const model = await fromPretrained("./tiny-llama", { dtype: "f32" });
 * ```
 */
export async function fromPretrained(dir: string, opts: PretrainedOptions = {}): Promise<LlamaForCausalLM> {
  if (!(await isDirectory(dir))) throw new Error(`Model directory not found: ${dir}`);
  const configPath = joinPath(dir, "config.json");
  if (!(await exists(configPath))) {
    throw new Error(`${dir} has no config.json: expected a Hugging Face model directory (config.json + *.safetensors)`);
  }
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(await readText(configPath));
  } catch (e) {
    throw new Error(`${configPath} is not valid JSON: ${(e as Error).message}`);
  }
  const config = llamaConfigFromHF(json);
  const files = await weightFiles(dir);
  const headers = await Promise.all(files.map((f) => readSafetensorsHeader(f)));
  const onDisk = headers.flatMap((h) => h.entries.map((e) => e.dtype));
  const dtype: DType = opts.dtype ?? (onDisk.includes("F32") ? "f32" : "f16");
  const model = withDeferredInit(() => new LlamaForCausalLM(config, { dtype }));
  if (opts.quantization) {
    // Loaded on demand: nn does not depend on quant unless a quantized load is asked for.
    const { quantizeOnLoad } = await import("../quant/quantize_model.ts");
    const quantize = quantizeOnLoad(model, opts.quantization);
    const user = opts.onWeight;
    opts = {
      ...opts,
      onWeight: (m, name, weight) => {
        user?.(m, name, weight);
        quantize(m, name);
      },
    };
  }
  await loadWeights(model, headers, dtype, opts);
  return model;
}

async function weightFiles(dir: string): Promise<string[]> {
  const single = joinPath(dir, "model.safetensors");
  if (await exists(single)) return [single];
  const indexPath = joinPath(dir, "model.safetensors.index.json");
  if (await exists(indexPath)) {
    const index = JSON.parse(await readText(indexPath)) as { weight_map?: Record<string, string> };
    if (!index.weight_map) throw new Error(`${indexPath} has no weight_map`);
    const names = [...new Set(Object.values(index.weight_map))].sort();
    for (const n of names) {
      if (!(await exists(joinPath(dir, n)))) throw new Error(`${indexPath} lists ${n}, which is missing from ${dir}`);
    }
    return names.map((n) => joinPath(dir, n));
  }
  const present = await listDir(dir);
  const hint = present.some((n) => n.endsWith(".bin") || n.endsWith(".pth"))
    ? " (PyTorch .bin/.pth weights are not read: convert them with `save_pretrained(..., safe_serialization=True)`)"
    : "";
  throw new Error(
    `${dir} has no model.safetensors or model.safetensors.index.json${hint}. Files present: ${present.join(", ")}`,
  );
}

async function loadWeights(
  model: LlamaForCausalLM,
  headers: SafetensorsHeader[],
  dtype: DType,
  opts: PretrainedOptions,
): Promise<void> {
  const expected = new Map(model.namedParameters());
  const total = headers.reduce((a, h) => a + h.entries.length, 0);
  let loaded = 0;
  const unexpected: string[] = [];
  for (const header of headers) {
    for (const entry of header.entries) {
      loaded++;
      if (IGNORED.some((r) => r.test(entry.name))) continue;
      const target = expected.get(entry.name);
      if (!target) {
        unexpected.push(entry.name);
        continue;
      }
      if (entry.shape.length !== target.shape.length || entry.shape.some((d, i) => d !== target.shape[i])) {
        throw new Error(
          `${header.source}: ${entry.name} has shape [${entry.shape}] but the config implies [${target.shape}]`,
        );
      }
      const data = await readTensorData(header.source, entry, { as: dtype === "f16" ? "f16" : "f32" });
      const t = fromArray(data as Float32Array | Uint16Array, entry.shape, { dtype });
      model.loadStateDict(new Map([[entry.name, t]]), { strict: false });
      t.dispose();
      opts.onWeight?.(model, entry.name, model.stateDict().get(entry.name)!);
      opts.onProgress?.(loaded, total, entry.name);
    }
  }
  const missing = model.namedParameters().filter(([, t]) => isPlaceholder(t)).map(([n]) => n);
  if (missing.length) {
    throw new Error(
      `The checkpoint lacks ${missing.length} weight(s): ${missing.slice(0, 6).join(", ")}${
        missing.length > 6 ? ", …" : ""
      }`,
    );
  }
  if (unexpected.length) {
    throw new Error(`The checkpoint has weights this LLaMA does not: ${unexpected.slice(0, 6).join(", ")}`);
  }
}

/**
 * Reads a llama2.c checkpoint (version 0: int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
 * seq_len — a negative vocab_size means a separate classifier follows — then f32 weights in run.c's order). Its
 * q/k weights are in Meta's interleaved-pair RoPE layout, so the model applies RoPE to pairs (2i, 2i+1).
 *
 * @example
 * ```ts
 * const model = await loadLlama2c("stories260K.bin");
 * ```
 */
export async function loadLlama2c(
  source: string | Uint8Array,
  opts: { dtype?: DType } = {},
): Promise<LlamaForCausalLM> {
  const bytes = typeof source === "string" ? await readBytes(source) : source;
  const name = typeof source === "string" ? source : "llama2.c checkpoint";
  if (bytes.byteLength < 28) throw new Error(`${name} is too short for a llama2.c header (${bytes.byteLength} bytes)`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(0, true) === 0x616b3432) {
    throw new Error(
      `${name} is a llama2.c version ≥ 1 file ("ak42" magic); only version 0 (legacy export) is supported`,
    );
  }
  const [dim, hidden, layers, heads, kvHeads, vocabRaw, seqLen] = Array.from(
    { length: 7 },
    (_, i) => view.getInt32(i * 4, true),
  );
  const shared = vocabRaw > 0;
  const vocab = Math.abs(vocabRaw);
  if ([dim, hidden, layers, heads, kvHeads, vocab, seqLen].some((v) => !(v > 0)) || dim % heads !== 0) {
    throw new Error(
      `${name}: implausible llama2.c header [${[dim, hidden, layers, heads, kvHeads, vocabRaw, seqLen]}]`,
    );
  }
  const headDim = dim / heads;
  const kvDim = kvHeads * headDim;
  const config: LlamaConfig = {
    vocabSize: vocab,
    hiddenSize: dim,
    intermediateSize: hidden,
    numHiddenLayers: layers,
    numAttentionHeads: heads,
    numKeyValueHeads: kvHeads,
    headDim,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    maxPositionEmbeddings: seqLen,
    tieWordEmbeddings: shared,
    bosTokenId: 1,
    eosTokenId: 2,
    attentionBias: false,
    mlpBias: false,
    ropeInterleaved: true,
  };
  const floats = (bytes.byteLength - 28) / 4;
  const expectedFloats = vocab * dim + layers * (2 * dim + dim * dim * 2 + dim * kvDim * 2 + 3 * dim * hidden) + dim +
    seqLen * headDim + (shared ? 0 : vocab * dim);
  if (floats < expectedFloats) {
    throw new Error(`${name} is truncated: ${floats} floats after the header, the header implies ${expectedFloats}`);
  }
  const all = new Float32Array(bytes.buffer.slice(bytes.byteOffset + 28, bytes.byteOffset + 28 + floats * 4));
  let at = 0;
  const take = (n: number) => all.subarray(at, at += n);
  const dtype = opts.dtype ?? "f32";
  const state = new Map<string, { data: Float32Array | Uint16Array; shape: number[]; dtype: DType }>();
  const put = (key: string, data: Float32Array, shape: number[]) =>
    state.set(key, { data: dtype === "f16" ? f32ArrayToF16(data) : data, shape, dtype });
  const perLayer = (n: number) => Array.from({ length: layers }, () => take(n));
  put("model.embed_tokens.weight", take(vocab * dim), [vocab, dim]);
  const attNorm = perLayer(dim), wq = perLayer(dim * dim), wk = perLayer(dim * kvDim), wv = perLayer(dim * kvDim);
  const wo = perLayer(dim * dim), ffnNorm = perLayer(dim);
  const w1 = perLayer(hidden * dim), w2 = perLayer(dim * hidden), w3 = perLayer(hidden * dim);
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}`;
    put(`${p}.input_layernorm.weight`, attNorm[l], [dim]);
    put(`${p}.self_attn.q_proj.weight`, wq[l], [dim, dim]);
    put(`${p}.self_attn.k_proj.weight`, wk[l], [kvDim, dim]);
    put(`${p}.self_attn.v_proj.weight`, wv[l], [kvDim, dim]);
    put(`${p}.self_attn.o_proj.weight`, wo[l], [dim, dim]);
    put(`${p}.post_attention_layernorm.weight`, ffnNorm[l], [dim]);
    put(`${p}.mlp.gate_proj.weight`, w1[l], [hidden, dim]);
    put(`${p}.mlp.down_proj.weight`, w2[l], [dim, hidden]);
    put(`${p}.mlp.up_proj.weight`, w3[l], [hidden, dim]);
  }
  put("model.norm.weight", take(dim), [dim]);
  take(seqLen * headDim); // freq_cis_real and freq_cis_imag (RoPE tables; recomputed on the GPU)
  if (!shared) put("lm_head.weight", take(vocab * dim), [vocab, dim]);
  const model = withDeferredInit(() => new LlamaForCausalLM(config, { dtype }));
  model.loadStateDict(state);
  return model;
}

/**
 * Saves a model as a Hugging Face directory: `config.json` and `model.safetensors` (weights in their GPU dtype,
 * F32 or F16, unless `opts.dtype` converts them).
 *
 * @example
 * ```ts
 * await savePretrained(model, "./out/merged");
 * await savePretrained(model, "./out/small", { dtype: "f16" }); // an f32 model stored in half precision
 * ```
 */
export async function savePretrained(
  model: LlamaForCausalLM,
  dir: string,
  opts: { dtype?: "f16" | "f32" } = {},
): Promise<void> {
  await makeDir(dir);
  const c = model.config;
  const config = {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    vocab_size: c.vocabSize,
    hidden_size: c.hiddenSize,
    intermediate_size: c.intermediateSize,
    num_hidden_layers: c.numHiddenLayers,
    num_attention_heads: c.numAttentionHeads,
    num_key_value_heads: c.numKeyValueHeads,
    head_dim: c.headDim,
    rms_norm_eps: c.rmsNormEps,
    rope_theta: c.ropeTheta,
    max_position_embeddings: c.maxPositionEmbeddings,
    tie_word_embeddings: c.tieWordEmbeddings,
    bos_token_id: c.bosTokenId,
    eos_token_id: c.eosTokenId,
    attention_bias: c.attentionBias,
    mlp_bias: c.mlpBias,
    hidden_act: "silu",
    torch_dtype: (opts.dtype ?? model.model.embed_tokens.weight.dtype) === "f16" ? "float16" : "float32",
  };
  if (c.ropeInterleaved) {
    throw new Error(
      "savePretrained: this model uses llama2.c's interleaved RoPE; HF checkpoints need q/k permuted first",
    );
  }
  await writeText(joinPath(dir, "config.json"), JSON.stringify(config, null, 2) + "\n");
  const tensors: Record<string, TensorToSave> = {};
  for (const [name, t] of model.namedParameters()) {
    const data = await t.toArray();
    tensors[name] = (opts.dtype ?? t.dtype) === "f16"
      ? { dtype: "F16", shape: t.shape, data: f32ArrayToF16(data as Float32Array) }
      : { dtype: "F32", shape: t.shape, data: data as Float32Array };
  }
  await saveSafetensors(joinPath(dir, "model.safetensors"), tensors, { format: "pt" });
}

/** Reads just the header of a llama2.c file (for `--model` auto-detection). */
export async function isLlama2cFile(path: string): Promise<boolean> {
  if (!path.endsWith(".bin")) return false;
  const head = await readRange(path, 0, 28);
  return new DataView(head.buffer).getInt32(0, true) > 0;
}
