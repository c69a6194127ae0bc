/**
 * The SST-2 experiment's configuration: a YAML file (`examples/configs/sst2_lora.yaml`, `sst2_qlora.yaml`), its
 * per-model overrides, CPU defaults, and command-line flags, merged in that order into one validated
 * {@linkcode ExperimentConfig}.
 *
 * Order of precedence (later wins):
 * 1. the YAML's top-level settings (the study's values);
 * 2. `models:` — overrides for the chosen model: the exact `--model` value (`"random:tiny"`), else `small`
 *    (under 1 B parameters: small models need a larger learning rate) or `large`;
 * 3. `cpu:` — on a CPU / software WebGPU adapter (lavapipe), a training subset so that a run ends in minutes;
 * 4. command-line flags.
 *
 * Every choice made by steps 2 and 3 is recorded in `notes`, which the examples print and keep in metrics.json.
 * Mistakes are one-line errors that say what to do: an unknown key (listing the known ones), a bad value, an
 * unknown model preset (listing the presets), a missing data directory or tokenizer.
 *
 * @example
 * ```ts
 * import { loadExperimentConfig } from "./config.ts";
 * const cfg = await loadExperimentConfig(["--model", "random:tiny", "--max-steps", "20"], { method: "lora" });
 * console.log(cfg.train.lr, cfg.notes);
 * ```
 * @module
 */
import { parseArgs } from "@std/cli";
import { parse as parseYaml } from "@std/yaml";
import { env, exists, isDirectory, joinPath, readRange, readText } from "../../core/platform.ts";
import { resolveSst2Dir } from "../../data/sst2.ts";
import { LLAMA_PRESETS, type LlamaConfig, llamaConfigFromHF, llamaPreset } from "../../nn/llama.ts";

/** The fine-tuning method. */
export type Method = "lora" | "qlora";

/** LoRA settings (PEFT's `LoraConfig`). */
export interface LoraSettings {
  /** Rank r. */
  r: number;
  /** Scale numerator alpha (the update is scaled by alpha / r). */
  alpha: number;
  /** Dropout on the adapter input. */
  dropout: number;
  /** Module-name suffixes to adapt. */
  targetModules: string[];
}

/** Quantization of the frozen base (QLoRA). */
export interface QuantizationSettings {
  /** Only "nf4". */
  type: "nf4";
  /** Weights per absmax block. */
  blockSize: number;
  /** Quantize the absmax values too (8-bit, blocks of 256). */
  doubleQuant: boolean;
}

/** Training-loop settings. */
export interface TrainSettings {
  /** Passes over the training data. */
  epochs: number;
  /** Stop after this many optimizer steps (null: the epochs' worth). */
  maxSteps: number | null;
  /** Train on this many examples (a seeded random subset; null: all 67,349). */
  trainSamples: number | null;
  /** Examples per micro-batch. */
  batchSize: number;
  /** Micro-batches per optimizer step. */
  gradAccum: number;
  /** Peak learning rate. */
  lr: number;
  /** Fraction of steps spent warming up. */
  warmupRatio: number;
  /** Schedule after warm-up. */
  schedule: "cosine" | "linear" | "constant";
  /** Gradient-norm clip (0 = off). */
  maxGradNorm: number;
  /** AdamW weight decay. */
  weightDecay: number;
  /** Seed of the model's random weights, the LoRA init, the data subset and order, and dropout. */
  seed: number;
  /** Batch examples of similar length together. */
  groupByLength: boolean;
  /** Recompute decoder layers in backward instead of storing activations. */
  gradientCheckpointing: boolean;
  /** Continue from `<out>/last-checkpoint` (adapter, optimizer state, step) instead of starting over. */
  resume: boolean;
}

/** Evaluation settings. */
export interface EvalSettings {
  /** Prompts per generation batch. */
  batchSize: number;
  /** Tokens generated per answer. */
  maxNewTokens: number;
  /** Evaluate on the first this many dev sentences (null: all 872). */
  samples: number | null;
}

/** Where the model comes from: random weights from a preset, a Hugging Face directory, or a llama2.c file. */
export type ModelSource =
  | { kind: "random"; spec: string; preset: string; config: LlamaConfig }
  | { kind: "hf"; spec: string; path: string; config: LlamaConfig }
  | { kind: "llama2c"; spec: string; path: string; config: LlamaConfig };

/** A complete, validated experiment. */
export interface ExperimentConfig {
  /** LoRA over an f16 base, or QLoRA over an NF4 base. */
  method: Method;
  /** The `--model` value as given. */
  model: string;
  /** The resolved model source and its architecture. */
  modelSource: ModelSource;
  /** Logical parameter count of the base model. */
  modelParameters: number;
  /** Tokenizer file (resolved). */
  tokenizer: string;
  /** SST-2 directory (resolved; holds train.tsv and dev.tsv). */
  data: string;
  /** Output directory. */
  out: string;
  /** Storage dtype of the frozen base weights that are not quantized. */
  dtype: "f16" | "f32";
  /** LoRA settings. */
  lora: LoraSettings;
  /** NF4 settings (QLoRA), null for LoRA. */
  quantization: QuantizationSettings | null;
  /** Training settings. */
  train: TrainSettings;
  /** Evaluation settings. */
  eval: EvalSettings;
  /** The YAML file read. */
  configPath: string;
  /** What the overrides and CPU defaults changed, and why (printed, and kept in metrics.json). */
  notes: string[];
}

/** Options of {@linkcode loadExperimentConfig}. */
export interface LoadOptions {
  /** The method of the calling script; the YAML must agree. */
  method: Method;
  /** YAML to read when `--config` is absent (default: examples/configs/sst2_<method>.yaml). */
  defaultConfig?: string;
  /** Apply the YAML's `cpu:` section (default: false; the scripts pass `getGpu().info.isFallback`). */
  cpu?: boolean;
  /** Default output directory (default runs/sst2_<method>). */
  defaultOut?: string;
}

/** A mistake in the configuration or the flags: the message says what to do (printed as one line). */
export class ConfigError extends Error {
  /** Creates the error. */
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Schema: every key the YAML may hold. "?" marks values that may be null.

type Kind = "string" | "string?" | "int" | "int?" | "number" | "bool" | "string[]";
type Schema = { [key: string]: Kind | Schema };

const SETTINGS: Schema = {
  method: "string",
  model: "string",
  tokenizer: "string?",
  data: "string?",
  out: "string?",
  dtype: "string",
  lora: { r: "int", alpha: "number", dropout: "number", target_modules: "string[]" },
  quantization: { type: "string", block_size: "int", double_quant: "bool" },
  train: {
    epochs: "int",
    max_steps: "int?",
    train_samples: "int?",
    batch_size: "int",
    grad_accum: "int",
    lr: "number",
    warmup_ratio: "number",
    schedule: "string",
    max_grad_norm: "number",
    weight_decay: "number",
    seed: "int",
    group_by_length: "bool",
    gradient_checkpointing: "bool",
    resume: "bool",
  },
  eval: { batch_size: "int", max_new_tokens: "int", samples: "int?" },
};

/** Sections that are partial settings applied on top (not settings themselves). */
const OVERRIDE_SECTIONS = ["models", "cpu"];

/** Every key path the YAML may hold, e.g. "train.lr" (for messages and tests). */
export function knownKeys(schema: Schema = SETTINGS, prefix = ""): string[] {
  return Object.entries(schema).flatMap(([k, v]) =>
    typeof v === "string" ? [`${prefix}${k}`] : knownKeys(v, `${prefix}${k}.`)
  );
}

// Flags: name → [key path, how to read the value].
type FlagKind = "string" | "int" | "int|all" | "number" | "bool";
const FLAGS: Record<string, [string, FlagKind]> = {
  model: ["model", "string"],
  tokenizer: ["tokenizer", "string"],
  data: ["data", "string"],
  out: ["out", "string"],
  epochs: ["train.epochs", "int"],
  "max-steps": ["train.max_steps", "int|all"],
  "train-samples": ["train.train_samples", "int|all"],
  "batch-size": ["train.batch_size", "int"],
  "grad-accum": ["train.grad_accum", "int"],
  lr: ["train.lr", "number"],
  rank: ["lora.r", "int"],
  alpha: ["lora.alpha", "number"],
  seed: ["train.seed", "int"],
  "gradient-checkpointing": ["train.gradient_checkpointing", "bool"],
  resume: ["train.resume", "bool"],
  "eval-samples": ["eval.samples", "int|all"],
};

/** The flags the examples accept (besides --config and --help), for usage text and tests. */
export const FLAG_NAMES: string[] = ["config", ...Object.keys(FLAGS)];

/** One-paragraph usage text of the SST-2 examples. */
export function usage(script: string, extra = ""): string {
  return `usage: deno run -A ${script} [--config FILE.yaml] [--model random:tiny|random:llama-2-7b|HF_DIR|FILE.bin] ` +
    `[--tokenizer tokenizer.model] [--data SST2_DIR] [--out DIR] [--epochs N] [--max-steps N|all] ` +
    `[--train-samples N|all] [--batch-size N] [--grad-accum N] [--lr X] [--rank R] [--alpha A] [--seed S] ` +
    `[--gradient-checkpointing] [--resume] [--eval-samples N|all]${extra}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Presets with random weights. The library's presets (nn/llama.ts) plus small ones for tests, kept here so that
// nn/ stays about the architecture.

/** Presets added by the examples: `micro` is a 2-layer model for end-to-end tests (seconds on lavapipe). */
export const EXAMPLE_PRESETS: Record<string, LlamaConfig> = {
  micro: {
    vocabSize: 32000,
    hiddenSize: 64,
    intermediateSize: 128,
    numHiddenLayers: 2,
    numAttentionHeads: 2,
    numKeyValueHeads: 2,
    headDim: 32,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    maxPositionEmbeddings: 256,
    tieWordEmbeddings: false,
    bosTokenId: 1,
    eosTokenId: 2,
    attentionBias: false,
    mlpBias: false,
    ropeInterleaved: false,
  },
};

/** The `--model` values with random weights: `random:llama-2-7b`, `random:tiny`, `random:micro`. */
export function presetNames(): string[] {
  return [...Object.keys(LLAMA_PRESETS), ...Object.keys(EXAMPLE_PRESETS)].map((n) => `random:${n}`);
}

/** Logical parameter count of a LLaMA architecture (embeddings, layers, final norm, LM head). */
export function llamaParameterCount(c: LlamaConfig): number {
  const q = c.numAttentionHeads * c.headDim, kv = c.numKeyValueHeads * c.headDim, h = c.hiddenSize;
  const attn = h * q + 2 * h * kv + q * h + (c.attentionBias ? q + 2 * kv + h : 0);
  const mlp = 3 * h * c.intermediateSize + (c.mlpBias ? 2 * c.intermediateSize + h : 0);
  const layer = attn + mlp + 2 * h;
  return c.vocabSize * h + c.numHiddenLayers * layer + h + (c.tieWordEmbeddings ? 0 : c.vocabSize * h);
}

/**
 * Resolves `--model`: `random:<preset>`, a Hugging Face directory (config.json), or a llama2.c `.bin` file. Only
 * the architecture is read here; the weights are loaded by the run.
 *
 * @example
 * ```ts
 * const src = await resolveModel("random:tiny"); // { kind: "random", preset: "tiny", config: {...} }
 * ```
 */
export async function resolveModel(spec: string): Promise<ModelSource> {
  if (spec.startsWith("random:")) {
    const name = spec.slice("random:".length);
    const config = EXAMPLE_PRESETS[name] ?? (LLAMA_PRESETS[name] ? llamaPreset(name) : null);
    if (!config) {
      throw new ConfigError(
        `--model ${spec}: unknown preset "${name}". Presets: ${presetNames().join(", ")} ` +
          `(or pass a Hugging Face model directory or a llama2.c .bin file)`,
      );
    }
    return { kind: "random", spec, preset: name, config };
  }
  if (await isDirectory(spec)) {
    const path = joinPath(spec, "config.json");
    if (!(await exists(path))) {
      throw new ConfigError(`--model ${spec}: the directory has no config.json; pass a Hugging Face LLaMA directory`);
    }
    return { kind: "hf", spec, path: spec, config: llamaConfigFromHF(JSON.parse(await readText(path))) };
  }
  if (await exists(spec)) {
    if (!spec.endsWith(".bin")) {
      throw new ConfigError(`--model ${spec}: a file must be a llama2.c checkpoint ending in .bin`);
    }
    return { kind: "llama2c", spec, path: spec, config: await llama2cArchitecture(spec) };
  }
  throw new ConfigError(
    `--model ${spec}: no such directory or file, and not a preset. Pass a Hugging Face directory, a llama2.c .bin ` +
      `file, or one of ${presetNames().join(", ")}`,
  );
}

/** The architecture from a llama2.c header (7 int32: dim, hidden, layers, heads, kv heads, vocab, seq len). */
async function llama2cArchitecture(path: string): Promise<LlamaConfig> {
  const head = await readRange(path, 0, 28);
  const v = new DataView(head.buffer, head.byteOffset, 28);
  const [dim, hidden, layers, heads, kvHeads, vocab, seqLen] = Array.from(
    { length: 7 },
    (_, i) => v.getInt32(i * 4, true),
  );
  if ([dim, hidden, layers, heads, kvHeads, seqLen].some((x) => !(x > 0)) || vocab === 0) {
    throw new ConfigError(`--model ${path}: not a llama2.c version-0 checkpoint (implausible header)`);
  }
  return {
    vocabSize: Math.abs(vocab),
    hiddenSize: dim,
    intermediateSize: hidden,
    numHiddenLayers: layers,
    numAttentionHeads: heads,
    numKeyValueHeads: kvHeads,
    headDim: dim / heads,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    maxPositionEmbeddings: seqLen,
    tieWordEmbeddings: vocab > 0,
    bosTokenId: 1,
    eosTokenId: 2,
    attentionBias: false,
    mlpBias: false,
    ropeInterleaved: true,
  };
}

/** Models at or above this size are "large" (the study's settings apply as they are). */
export const SMALL_MODEL_LIMIT = 1e9;

// ---------------------------------------------------------------------------------------------------------------
// Merging.

type Raw = Record<string, unknown>;
/** Where each setting's value came from ("sst2_lora.yaml", "models.random:tiny", "--lr"), for messages. */
type Origins = Map<string, string>;

function isObject(v: unknown): v is Raw {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Throws on a key the schema does not have, listing the known keys of that section. */
function checkKeys(raw: Raw, schema: Schema, where: string, prefix = ""): void {
  for (const [k, v] of Object.entries(raw)) {
    const spec = schema[k];
    if (spec === undefined) {
      const section = prefix.replace(/\.$/, "");
      const known = [...Object.keys(schema), ...(schema === SETTINGS && !where.includes("(") ? OVERRIDE_SECTIONS : [])]
        .join(", ");
      throw new ConfigError(
        `${where}: unknown key "${prefix}${k}". Known keys${section ? ` in ${section}` : ""}: ${known}`,
      );
    }
    if (typeof spec !== "string") {
      if (v === null) continue; // a null section (e.g. "quantization: null") is allowed
      if (!isObject(v)) {
        throw new ConfigError(`${where}: "${prefix}${k}" must be a mapping of ${Object.keys(spec).join(", ")}`);
      }
      checkKeys(v, spec, where, `${prefix}${k}.`);
    }
  }
}

/** Copies `src` into `dst` (deep), recording the origin of each leaf. */
function mergeInto(dst: Raw, src: Raw, origin: string, origins: Origins, prefix = ""): string[] {
  const changed: string[] = [];
  for (const [k, v] of Object.entries(src)) {
    const path = `${prefix}${k}`;
    if (isObject(v)) {
      if (!isObject(dst[k])) dst[k] = {};
      changed.push(...mergeInto(dst[k] as Raw, v, origin, origins, `${path}.`));
    } else {
      dst[k] = v;
      origins.set(path, origin);
      changed.push(path);
    }
  }
  return changed;
}

function getPath(raw: Raw, path: string): unknown {
  return path.split(".").reduce<unknown>((o, k) => (isObject(o) ? o[k] : undefined), raw);
}

function flagValue(name: string, kind: FlagKind, text: string | boolean): unknown {
  if (kind === "bool") return text;
  const s = String(text).trim();
  if (kind === "string") {
    if (s === "") throw new ConfigError(`--${name} needs a value`);
    return s;
  }
  if (kind === "int|all" && (s === "all" || s === "none")) return null;
  const n = Number(s);
  if (s === "" || !Number.isFinite(n)) {
    throw new ConfigError(`--${name} ${s}: expected ${kind === "number" ? "a number (e.g. 5e-5)" : "an integer"}`);
  }
  return n;
}

/**
 * Reads the YAML, applies the overrides for the model, the CPU defaults and the flags, resolves the model, the
 * tokenizer and the data directory, and validates everything. See the module doc for the order.
 *
 * @example
 * ```ts
 * const cfg = await loadExperimentConfig(Deno.args, { method: "qlora", cpu: getGpu().info.isFallback });
 * ```
 */
export async function loadExperimentConfig(argv: string[], opts: LoadOptions): Promise<ExperimentConfig> {
  let flags;
  try {
    flags = parseArgs(argv, {
      string: FLAG_NAMES.filter((f) => FLAGS[f]?.[1] !== "bool"),
      boolean: FLAG_NAMES.filter((f) => FLAGS[f]?.[1] === "bool"),
    });
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
  if (flags._.length > 0) throw new ConfigError(`unexpected argument "${flags._[0]}": every option is a --flag`);
  const configPath = (flags.config as string | undefined) ??
    opts.defaultConfig ?? new URL(`../configs/sst2_${opts.method}.yaml`, import.meta.url).pathname;
  const where = configPath.split("/").pop()!;
  let text: string;
  try {
    text = await readText(configPath);
  } catch {
    throw new ConfigError(
      `--config ${configPath}: no such file; pass a YAML file like examples/configs/sst2_lora.yaml`,
    );
  }
  let doc: unknown;
  try {
    doc = parseYaml(text) ?? {};
  } catch (e) {
    throw new ConfigError(`${where}: not valid YAML: ${(e as Error).message.split("\n")[0]}`);
  }
  if (!isObject(doc)) throw new ConfigError(`${where}: expected a mapping of settings at the top level`);

  // 1. The file's own settings, and every section's keys checked before the model is looked for.
  const { models, cpu, ...base } = doc;
  checkKeys(base, SETTINGS, where);
  if (models !== undefined && models !== null) {
    if (!isObject(models)) throw new ConfigError(`${where}: "models" must map model names to settings`);
    for (const [key, section] of Object.entries(models)) {
      if (!isObject(section)) throw new ConfigError(`${where}: models."${key}" must be a mapping of settings`);
      checkKeys(section, SETTINGS, `${where} (models."${key}")`);
    }
  }
  if (cpu !== undefined && cpu !== null) {
    if (!isObject(cpu)) throw new ConfigError(`${where}: "cpu" must be a mapping of settings`);
    const { note: _note, ...settings } = cpu;
    checkKeys(settings, SETTINGS, `${where} (cpu)`);
  }
  const origins: Origins = new Map();
  const raw: Raw = {};
  mergeInto(raw, base, where, origins);
  const notes: string[] = [];

  // Flags are applied last, but the model must be known first (its overrides come before the flags).
  const flagEntries: [string, unknown, string][] = [];
  for (const [name, [path, kind]] of Object.entries(FLAGS)) {
    const v = flags[name];
    if (v === undefined) continue;
    flagEntries.push([path, flagValue(name, kind, v as string | boolean), `--${name}`]);
  }
  const modelFlag = flagEntries.find(([p]) => p === "model")?.[1] as string | undefined;
  const modelSpec = (modelFlag ?? raw.model ?? "random:tiny") as string;
  if (typeof modelSpec !== "string") throw new ConfigError(`${where}: "model" must be a string`);
  // A relative path written in the YAML file is relative to that file; a --model path to the working directory.
  const modelSource = await resolveModel(
    modelFlag === undefined && isRelativePath(modelSpec) ? relativeTo(configPath, modelSpec) : modelSpec,
  );
  const modelParameters = llamaParameterCount(modelSource.config);
  const flagged = new Set(flagEntries.map(([p]) => p));

  // 2. Per-model overrides.
  if (isObject(models)) {
    const size = modelParameters < SMALL_MODEL_LIMIT ? "small" : "large";
    // A key names the model as the YAML would: a preset, or a directory or file relative to the YAML file.
    const here = modelSource.kind === "random" ? null : absolutePath(modelSource.path);
    const named = Object.keys(models).find((k) =>
      k === modelSpec || (here !== null && isRelativePath(k) && absolutePath(relativeTo(configPath, k)) === here)
    );
    const key = named ?? (size in models ? size : null);
    if (key !== null && models[key]) {
      const changed = mergeInto(raw, models[key] as Raw, `${where} models."${key}"`, origins)
        .filter((p) => !flagged.has(p));
      if (changed.length > 0) {
        const why = key === named ? `settings for ${key}` : `${key} model (${fmtCount(modelParameters)} parameters)`;
        notes.push(`${why}: ${changed.map((p) => `${p} = ${fmtValue(getPath(raw, p))}`).join(", ")}`);
      }
    }
  }

  // 3. CPU adapter defaults.
  if (isObject(cpu)) {
    const { note, ...settings } = cpu;
    if (opts.cpu) {
      const changed = mergeInto(raw, settings, `${where} cpu`, origins).filter((p) => !flagged.has(p));
      if (changed.length > 0) {
        notes.push(
          `CPU adapter: ${changed.map((p) => `${p} = ${fmtValue(getPath(raw, p))}`).join(", ")}` +
            (typeof note === "string" ? ` — ${note.trim().replace(/\s+/g, " ")}` : "") +
            ` (override with flags, e.g. --train-samples all)`,
        );
      }
    }
  }

  // 4. Flags.
  for (const [path, value, origin] of flagEntries) {
    const parts = path.split(".");
    let o = raw;
    for (const p of parts.slice(0, -1)) o = (isObject(o[p]) ? o[p] : (o[p] = {})) as Raw;
    o[parts[parts.length - 1]] = value;
    origins.set(path, origin);
  }
  raw.model = modelSpec;

  const cfg = validate(raw, origins, where, opts, modelSource, modelParameters, configPath, notes);
  cfg.data = await resolveData(raw.data as string | null | undefined);
  cfg.tokenizer = await resolveTokenizer(
    raw.tokenizer as string | null | undefined,
    modelSource,
    cfg.modelSource.config,
    cfg.data,
  );
  return cfg;
}

/** True for a relative file path (not a preset, not absolute). */
function isRelativePath(spec: string): boolean {
  return !spec.startsWith("random:") && !spec.startsWith("/") && !/^[A-Za-z]:[\\/]/.test(spec);
}

/** `path` with `.`, `..` and repeated `/` folded (relative paths stay relative). */
function normalizePath(path: string): string {
  const out: string[] = [];
  for (const part of path.split("/")) {
    if (part === "." || part === "") {
      if (out.length === 0) out.push(part); // keep the leading "" of an absolute path
    } else if (part === ".." && out.length > 0 && out[out.length - 1] !== "..") out.pop();
    else out.push(part);
  }
  return out.join("/") || ".";
}

/** `rel` resolved against the directory of the file `file`. */
function relativeTo(file: string, rel: string): string {
  return normalizePath([...file.split("/").slice(0, -1), rel].join("/"));
}

/** An absolute, normalised path (relative ones against the working directory). */
function absolutePath(path: string): string {
  return normalizePath(path.startsWith("/") ? path : `${Deno.cwd()}/${path}`);
}

function fmtValue(v: unknown): string {
  return v === null ? "all" : Array.isArray(v) ? `[${v.join(", ")}]` : String(v);
}

/** 6742609920 → "6.74 B", 9192576 → "9.19 M". */
export function fmtCount(n: number): string {
  return n >= 1e9 ? `${(n / 1e9).toFixed(2)} B` : n >= 1e6 ? `${(n / 1e6).toFixed(2)} M` : n.toLocaleString("en-US");
}

async function resolveData(fromConfig: string | null | undefined): Promise<string> {
  try {
    return await resolveSst2Dir(fromConfig ?? undefined);
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
}

/**
 * The tokenizer file: `--tokenizer` (or the YAML's `tokenizer`), else the HF directory's tokenizer.model, else
 * `$WEBTUNE_SHARED/models/llama2-tokenizer/tokenizer.model`; otherwise an error saying what to pass.
 */
async function resolveTokenizer(
  given: string | null | undefined,
  src: ModelSource,
  arch: LlamaConfig,
  dataDir: string,
): Promise<string> {
  if (given) {
    if (!(await exists(given))) throw new ConfigError(`--tokenizer ${given}: no such file`);
    return given;
  }
  if (src.kind === "hf") {
    for (const name of ["tokenizer.model", "tokenizer.json"]) {
      const p = joinPath(src.path, name);
      if (await exists(p)) return p;
    }
  }
  // The shared folder: $WEBTUNE_SHARED, else the one holding the data when it sits at <shared>/data/sst2.
  const data = normalizePath(dataDir);
  const fromData = /(^|\/)data\/sst2$/.test(data) ? data.slice(0, -"data/sst2".length) || "." : undefined;
  for (const shared of [env("WEBTUNE_SHARED"), fromData]) {
    if (!shared) continue;
    const p = joinPath(shared, "models/llama2-tokenizer/tokenizer.model");
    if (await exists(p)) {
      if (arch.vocabSize < 32000) {
        throw new ConfigError(
          `--model ${src.spec} has a ${arch.vocabSize}-token vocabulary, smaller than the Llama-2 tokenizer's 32000: ` +
            `pass the model's own tokenizer with --tokenizer`,
        );
      }
      return p;
    }
  }
  throw new ConfigError(
    `no tokenizer: pass --tokenizer path/to/tokenizer.model (Llama-2's SentencePiece model), use a Hugging Face ` +
      `--model directory that holds tokenizer.model, or set WEBTUNE_SHARED to the shared folder ` +
      `(it holds models/llama2-tokenizer/tokenizer.model; so does the folder above data/sst2 in that layout)`,
  );
}

// ---------------------------------------------------------------------------------------------------------------
// Validation: turns the merged snake_case settings into an ExperimentConfig.

function validate(
  raw: Raw,
  origins: Origins,
  where: string,
  opts: LoadOptions,
  modelSource: ModelSource,
  modelParameters: number,
  configPath: string,
  notes: string[],
): ExperimentConfig {
  const from = (path: string) => origins.get(path) ?? where;
  const fail = (path: string, msg: string): never => {
    const o = from(path);
    const v = getPath(raw, path);
    throw new ConfigError(
      o.startsWith("--") ? `${o} ${fmtValue(v)}: ${msg}` : `${o}: ${path} = ${fmtValue(v)}: ${msg}`,
    );
  };
  const kindOf = (path: string): Kind => {
    const k = path.split(".").reduce<Kind | Schema>((s, p) => (s as Schema)[p], SETTINGS);
    return k as Kind;
  };
  const get = <T>(path: string, check?: (v: T) => string | null): T => {
    const v = getPath(raw, path);
    const kind = kindOf(path);
    if (v === undefined || (v === null && !kind.endsWith("?"))) {
      throw new ConfigError(
        `${where}: "${path}" is missing; set it in the YAML (known keys: ${knownKeys().join(", ")})`,
      );
    }
    if (v !== null) {
      const ok = kind.startsWith("int")
        ? typeof v === "number" && Number.isInteger(v)
        : kind === "number"
        ? typeof v === "number" && Number.isFinite(v)
        : kind === "bool"
        ? typeof v === "boolean"
        : kind === "string[]"
        ? Array.isArray(v) && v.every((x) => typeof x === "string")
        : typeof v === "string";
      if (!ok) {
        const expected = { int: "an integer", number: "a number", bool: "true or false", string: "a string" }[
          kind.replace("?", "").replace("[]", "") as "int"
        ];
        fail(
          path,
          `expected ${kind === "string[]" ? "a list of names" : expected}${kind.endsWith("?") ? " or null" : ""}`,
        );
      }
      const problem = check?.(v as T);
      if (problem) fail(path, problem);
    }
    return v as T;
  };
  const positiveInt = (what: string) => (v: number) => v > 0 ? null : `${what} must be a positive integer`;
  const optionalPositive = (what: string) => (v: number | null) =>
    v === null || v > 0 ? null : `${what} must be a positive integer (or "all")`;

  const method = get<string>("method", (v) => (v === "lora" || v === "qlora" ? null : 'use "lora" or "qlora"'));
  if (method !== opts.method) {
    throw new ConfigError(
      `${where} is a ${method} configuration but this script runs ${opts.method}: use examples/sst2_${method}.ts, ` +
        `or pass --config examples/configs/sst2_${opts.method}.yaml`,
    );
  }
  const dtype = get<string>("dtype", (v) => (v === "f16" || v === "f32" ? null : 'use "f16" (the study) or "f32"'));
  const lora: LoraSettings = {
    r: get<number>("lora.r", (v) => v > 0 ? null : "the LoRA rank must be a positive integer (the study uses 16)"),
    alpha: get<number>("lora.alpha", (v) => v > 0 ? null : "alpha must be > 0 (the study uses 16)"),
    dropout: get<number>(
      "lora.dropout",
      (v) => v >= 0 && v < 1 ? null : "dropout must lie in [0, 1) (the study uses 0.1)",
    ),
    targetModules: get<string[]>(
      "lora.target_modules",
      (v) =>
        v.length > 0 ? null : "list at least one module, e.g. [q_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
    ),
  };
  let quantization: QuantizationSettings | null = null;
  const q = raw.quantization;
  if (method === "qlora") {
    if (!isObject(q)) {
      throw new ConfigError(
        `${where}: QLoRA needs a "quantization" section (type: nf4, block_size: 64, double_quant: true)`,
      );
    }
    quantization = {
      type: get<string>("quantization.type", (v) => v === "nf4" ? null : 'only "nf4" is supported') as "nf4",
      blockSize: get<number>(
        "quantization.block_size",
        (v) =>
          [32, 64, 128, 256, 512, 1024, 2048, 4096].includes(v)
            ? null
            : "use a power of two from 32 to 4096 (QLoRA: 64)",
      ),
      doubleQuant: get<boolean>("quantization.double_quant"),
    };
  } else if (isObject(q)) {
    throw new ConfigError(
      `${where}: a "quantization" section belongs to QLoRA; remove it or use examples/sst2_qlora.ts`,
    );
  }
  const train: TrainSettings = {
    epochs: get<number>("train.epochs", positiveInt("epochs")),
    maxSteps: get<number | null>("train.max_steps", optionalPositive("max_steps")),
    trainSamples: get<number | null>("train.train_samples", optionalPositive("train_samples")),
    batchSize: get<number>("train.batch_size", positiveInt("the batch size")),
    gradAccum: get<number>("train.grad_accum", positiveInt("gradient accumulation")),
    lr: get<number>("train.lr", (v) => v > 0 ? null : "the learning rate must be > 0"),
    warmupRatio: get<number>(
      "train.warmup_ratio",
      (v) => v >= 0 && v < 1 ? null : "the warm-up ratio must lie in [0, 1)",
    ),
    schedule: get<string>(
      "train.schedule",
      (v) => ["cosine", "linear", "constant"].includes(v) ? null : 'use "cosine", "linear" or "constant"',
    ) as TrainSettings["schedule"],
    maxGradNorm: get<number>("train.max_grad_norm", (v) => v >= 0 ? null : "use a value ≥ 0 (0 turns clipping off)"),
    weightDecay: get<number>("train.weight_decay", (v) => v >= 0 ? null : "weight decay must be ≥ 0"),
    seed: get<number>("train.seed", (v) => v >= 0 && v < 2 ** 32 ? null : "the seed must be an integer in [0, 2^32)"),
    groupByLength: get<boolean>("train.group_by_length"),
    gradientCheckpointing: get<boolean>("train.gradient_checkpointing"),
    resume: get<boolean>("train.resume"),
  };
  const evalSettings: EvalSettings = {
    batchSize: get<number>("eval.batch_size", positiveInt("the eval batch size")),
    maxNewTokens: get<number>(
      "eval.max_new_tokens",
      (v) => v >= 3 ? null : 'the answer " Positive" + EOS takes 3 Llama-2 tokens: use at least 3',
    ),
    samples: get<number | null>("eval.samples", optionalPositive("eval samples")),
  };
  const out = (getPath(raw, "out") as string | null | undefined) ?? opts.defaultOut ?? `runs/sst2_${method}`;
  return {
    method,
    model: modelSource.spec,
    modelSource,
    modelParameters,
    tokenizer: "",
    data: "",
    out,
    dtype: dtype as "f16" | "f32",
    lora,
    quantization,
    train,
    eval: evalSettings,
    configPath,
    notes,
  };
}

/**
 * The settings as the YAML spells them (snake_case), for printing and for metrics.json.
 *
 * @example
 * ```ts
 * console.log(JSON.stringify(configSummary(cfg)));
 * ```
 */
export function configSummary(cfg: ExperimentConfig): Record<string, unknown> {
  const t = cfg.train, e = cfg.eval;
  return {
    method: cfg.method,
    model: cfg.model,
    model_parameters: cfg.modelParameters,
    tokenizer: cfg.tokenizer,
    data: cfg.data,
    out: cfg.out,
    dtype: cfg.dtype,
    lora: { r: cfg.lora.r, alpha: cfg.lora.alpha, dropout: cfg.lora.dropout, target_modules: cfg.lora.targetModules },
    quantization: cfg.quantization
      ? {
        type: cfg.quantization.type,
        block_size: cfg.quantization.blockSize,
        double_quant: cfg.quantization.doubleQuant,
      }
      : null,
    train: {
      epochs: t.epochs,
      max_steps: t.maxSteps,
      train_samples: t.trainSamples,
      batch_size: t.batchSize,
      grad_accum: t.gradAccum,
      lr: t.lr,
      warmup_ratio: t.warmupRatio,
      schedule: t.schedule,
      max_grad_norm: t.maxGradNorm,
      weight_decay: t.weightDecay,
      seed: t.seed,
      group_by_length: t.groupByLength,
      gradient_checkpointing: t.gradientCheckpointing,
    },
    eval: { batch_size: e.batchSize, max_new_tokens: e.maxNewTokens, samples: e.samples },
    config_file: cfg.configPath,
  };
}
