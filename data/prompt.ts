/**
 * The SST-2 instruction prompt of the study, and its tokenization for training and generation.
 *
 * Prompt: `<s>[INST] Classify the sentiment of this text as Positive or Negative: {sentence} [/INST]`, answer
 * ` Positive` or ` Negative`, then EOS. `<s>` is Llama's BOS *id*, never the literal text "<s>" (Meta's Llama-2
 * chat convention; SentencePiece would split the text "<s>" into `<`, `s`, `>`).
 *
 * How the answer ids are derived: SentencePiece encodes the prompt and answer jointly as
 * `encode(prompt + " Positive")`; since the answer always follows the same text ` [/INST]`, and Llama's pieces
 * never merge across the `▁` that starts a word, that joint encoding is `encode(prompt)` followed by a fixed tail
 * (`▁Pos`, `itive` for Llama-2 — not `encode(" Positive")`, which adds a dummy-prefix `▁`). {@link answerIds}
 * computes that tail once per tokenizer from a joint encoding, and the tests check it against SentencePiece's
 * joint encoding of all 872 SST-2 dev prompts.
 *
 * @example
 * ```ts
 * import { Tokenizer } from "./tokenizer.ts";
 * import { encodeExample, parseAnswer } from "./prompt.ts";
 * const tok = await Tokenizer.load("tokenizer.model");
 * const { inputIds, labels } = encodeExample(tok, "a charming journey", 1);
 * // labels: -100 on [BOS] + prompt, then the ids of " Positive" and EOS
 * parseAnswer(" positive."); // 1
 * ```
 * @module
 */
import type { Tokenizer } from "./tokenizer.ts";

/** The study's prompt; `<s>` stands for the BOS id and `{sentence}` for the SST-2 sentence. */
export const PROMPT_TEMPLATE =
  "<s>[INST] Classify the sentiment of this text as Positive or Negative: {sentence} [/INST]";

/** The answer word per label: `LABEL_WORDS[1]` = "Positive", `LABEL_WORDS[0]` = "Negative". */
export const LABEL_WORDS = ["Negative", "Positive"] as const;

/** Label value that the loss ignores (PyTorch's `CrossEntropyLoss(ignore_index=-100)`, the HF convention). */
export const IGNORE_INDEX = -100;

/** A tokenized training example: `labels` is aligned with `inputIds` (the model shifts them by one). */
export interface EncodedExample {
  inputIds: number[];
  labels: number[];
}

/**
 * The prompt text for a sentence, without the leading `<s>` (which is added as an id).
 *
 * @example
 * ```ts
 * import { formatPrompt } from "./prompt.ts";
 * formatPrompt("great fun"); // "[INST] Classify the sentiment of this text as Positive or Negative: great fun [/INST]"
 * ```
 */
export function formatPrompt(sentence: string): string {
  return PROMPT_TEMPLATE.slice("<s>".length).replace("{sentence}", () => sentence);
}

function requireBos(tok: Tokenizer): number {
  if (tok.bosId < 0) throw new Error("The SST-2 prompt starts with BOS, but this tokenizer has no BOS token");
  return tok.bosId;
}

/**
 * The prompt ids for generation: `[BOS] + encode("[INST] ... {sentence} [/INST]")`.
 *
 * @example
 * ```ts
 * import { Tokenizer } from "./tokenizer.ts";
 * import { encodePrompt } from "./prompt.ts";
 * const tok = await Tokenizer.load("tokenizer.model");
 * encodePrompt(tok, "great fun"); // [1, 518, 25580, 29962, ...]
 * ```
 */
export function encodePrompt(tok: Tokenizer, sentence: string): number[] {
  const ids = tok.encode(formatPrompt(sentence));
  ids.unshift(requireBos(tok));
  return ids;
}

const answerCache = new WeakMap<Tokenizer, number[][]>();

/**
 * The ids that ` Positive` (label 1) or ` Negative` (label 0) add after a prompt, without EOS: the tail of the
 * joint encoding `encode(prompt + " " + word)` past `encode(prompt)`. Computed once per tokenizer.
 *
 * @throws when the joint encoding does not start with the prompt's own ids (a tokenizer whose pieces merge
 * across words), since the prompt/answer boundary would then not fall on a token boundary
 * @example
 * ```ts
 * import { Tokenizer } from "./tokenizer.ts";
 * import { answerIds } from "./prompt.ts";
 * const tok = await Tokenizer.load("tokenizer.model");
 * answerIds(tok, 1); // [10321, 3321]  ("▁Pos", "itive")
 * ```
 */
export function answerIds(tok: Tokenizer, label: 0 | 1): number[] {
  if (label !== 0 && label !== 1) throw new Error(`answerIds: label must be 0 or 1, got ${label}`);
  let cached = answerCache.get(tok);
  if (!cached) {
    const prompt = formatPrompt("a sentence");
    const promptIds = tok.encode(prompt);
    cached = LABEL_WORDS.map((word) => {
      const joint = tok.encode(`${prompt} ${word}`);
      const isPrefix = joint.length > promptIds.length && promptIds.every((id, i) => joint[i] === id);
      if (!isPrefix) {
        throw new Error(
          `answerIds: this tokenizer merges the answer " ${word}" into the prompt's last token, so the answer has no ` +
            `ids of its own after the prompt`,
        );
      }
      return joint.slice(promptIds.length);
    });
    answerCache.set(tok, cached);
  }
  return cached[label].slice();
}

/**
 * Tokenizes a training example: `inputIds = [BOS] + prompt + answer + [EOS]` and `labels` = -100 on BOS and every
 * prompt token, the answer ids and EOS on the answer positions. Without a label, only the prompt, all -100.
 *
 * @example
 * ```ts
 * import { Tokenizer } from "./tokenizer.ts";
 * import { encodeExample, IGNORE_INDEX } from "./prompt.ts";
 * const tok = await Tokenizer.load("tokenizer.model");
 * const ex = encodeExample(tok, "a dull , lifeless film", 0);
 * ex.labels.filter((l) => l !== IGNORE_INDEX); // [12610, 1230, 2]  ("▁Neg", "ative", EOS)
 * ```
 */
export function encodeExample(tok: Tokenizer, sentence: string, label?: 0 | 1): EncodedExample {
  const inputIds = encodePrompt(tok, sentence);
  const labels = new Array<number>(inputIds.length).fill(IGNORE_INDEX);
  if (label === undefined) return { inputIds, labels };
  if (tok.eosId < 0) throw new Error("encodeExample: the answer ends with EOS, but this tokenizer has no EOS token");
  for (const id of answerIds(tok, label)) {
    inputIds.push(id);
    labels.push(id);
  }
  inputIds.push(tok.eosId);
  labels.push(tok.eosId);
  return { inputIds, labels };
}

/**
 * Reads a generated answer: 1 when its first word is "positive", 0 when "negative" (any case, punctuation after
 * the word allowed), null otherwise.
 *
 * @example
 * ```ts
 * import { parseAnswer } from "./prompt.ts";
 * parseAnswer(" Positive"); // 1
 * parseAnswer("NEGATIVE."); // 0
 * parseAnswer("I think it is positive"); // null
 * ```
 */
export function parseAnswer(text: string): 1 | 0 | null {
  const m = /^[\s"'*`]*([A-Za-z]+)/.exec(text);
  const word = m?.[1].toLowerCase();
  return word === "positive" ? 1 : word === "negative" ? 0 : null;
}
