/**
 * Data for fine-tuning: the Llama tokenizer, SST-2 readers, the instruction prompt, and batching.
 *
 * @example
 * ```ts
 * import { batches, collate, encodeExample, loadSst2Split, resolveSst2Dir, Tokenizer } from "./mod.ts";
 * const tok = await Tokenizer.load("../shared/models/llama2-tokenizer/tokenizer.model");
 * const train = await loadSst2Split(await resolveSst2Dir(), "train");
 * const examples = train.map((e) => encodeExample(tok, e.sentence, e.label));
 * for (const group of batches(examples, { batchSize: 8, seed: 0, groupByLength: true })) {
 *   const batch = collate(group, { padId: tok.eosId });
 * }
 * ```
 * @module
 */
export {
  type DecodeStream,
  type EncodeOptions,
  type Llama2cTokenizerOptions,
  PieceType,
  SPACE_SYMBOL,
  type TextPipeline,
  Tokenizer,
  type TokenizerSpec,
} from "./tokenizer.ts";
export {
  ModelType,
  type NormalizerSpec,
  parseSentencePieceModel,
  type SentencePieceEntry,
  type SentencePieceModel,
  type TrainerSpec,
} from "./sentencepiece_proto.ts";
export {
  loadSst2Split,
  parseSst2,
  readSst2,
  resolveSst2Dir,
  type Sst2Example,
  type Sst2Format,
  sst2FormatOf,
  type Sst2Split,
} from "./sst2.ts";
export {
  answerIds,
  type EncodedExample,
  encodeExample,
  encodePrompt,
  formatPrompt,
  IGNORE_INDEX,
  LABEL_WORDS,
  parseAnswer,
  PROMPT_TEMPLATE,
} from "./prompt.ts";
export {
  type Batch,
  batches,
  type BatchOptions,
  collate,
  collateLeft,
  type CollateOptions,
  type GenerationBatch,
  mulberry32,
  shuffled,
  type TokenizedExample,
} from "./batching.ts";
