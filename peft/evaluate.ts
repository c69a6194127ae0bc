/**
 * Evaluating a prompted binary classifier (SST-2 sentiment) the two ways the study's setting allows:
 * - by generation, as the study did: greedy-decode the answer after the prompt and parse "Positive"/"Negative"
 *   (an unparseable answer counts as wrong and is counted separately); this also measures generation speed;
 * - by likelihood: compare the log-probabilities the model gives the two answers (never unparseable).
 * Reports accuracy, F1 of the positive class and macro-F1 for each.
 *
 * @example
 * ```ts
 * import { evaluateSst2 } from "./evaluate.ts";
 * const m = await evaluateSst2(peft.model, tokenizer, devExamples, { batchSize: 16 });
 * console.log(m.accuracy, m.f1, m.logprobAccuracy, m.tokensPerSecond);
 * ```
 * @module
 */
import { noGrad } from "../core/autograd.ts";
import { tensor } from "../core/creation.ts";
import { crossEntropy } from "../core/ops/nn.ts";
import { scope } from "../core/scope.ts";
import { collate, collateLeft } from "../data/batching.ts";
import { answerIds, encodePrompt, parseAnswer } from "../data/prompt.ts";
import type { Sst2Example } from "../data/sst2.ts";
import type { Tokenizer } from "../data/tokenizer.ts";
import { generate } from "../nn/generate.ts";
import type { LlamaForCausalLM } from "../nn/llama.ts";

/** Classification metrics. */
export interface ClassificationMetrics {
  /** Examples evaluated. */
  n: number;
  /** Generation: fraction correct (unparseable answers are wrong). */
  accuracy: number;
  /** Generation: F1 of the positive class. */
  f1: number;
  /** Generation: mean F1 of both classes. */
  f1Macro: number;
  /** Generation: answers that were neither Positive nor Negative. */
  unparseable: number;
  /** Likelihood: fraction correct. */
  logprobAccuracy: number;
  /** Likelihood: F1 of the positive class. */
  logprobF1: number;
  /** Likelihood: mean F1 of both classes. */
  logprobF1Macro: number;
  /** Generated tokens per second during evaluation (batched, KV cache). */
  tokensPerSecond: number;
}

/** Accuracy and F1 from gold labels and predictions (null = unparseable, counted wrong). */
export function classificationScores(
  gold: (0 | 1)[],
  pred: (0 | 1 | null)[],
): { accuracy: number; f1: number; f1Macro: number } {
  const f1For = (cls: 0 | 1) => {
    let tp = 0, fp = 0, fn = 0;
    gold.forEach((g, i) => {
      const p = pred[i];
      if (p === cls && g === cls) tp++;
      else if (p === cls) fp++;
      else if (g === cls) fn++;
    });
    return tp === 0 ? 0 : (2 * tp) / (2 * tp + fp + fn);
  };
  const correct = gold.filter((g, i) => pred[i] === g).length;
  const f1 = f1For(1);
  return { accuracy: gold.length ? correct / gold.length : 0, f1, f1Macro: (f1 + f1For(0)) / 2 };
}

/** Options of {@linkcode evaluateSst2}. */
export interface EvalOptions {
  /** Prompts per batch (default 16). */
  batchSize?: number;
  /** Tokens to generate per answer (default: the longer answer's tokens + 1 for EOS; 3 for Llama-2). */
  maxNewTokens?: number;
  /** Skip the generation-based evaluation (likelihood only). */
  skipGeneration?: boolean;
  /** Called after each batch with (done, total). */
  onProgress?: (done: number, total: number) => void;
}

/**
 * Evaluates `model` on labelled sentences with the study's prompt. See the module doc for the two methods.
 *
 * @example
 * ```ts
 * const metrics = await evaluateSst2(model, tok, dev.slice(0, 100));
 * ```
 */
export async function evaluateSst2(
  model: LlamaForCausalLM,
  tok: Tokenizer,
  examples: Sst2Example[],
  opts: EvalOptions = {},
): Promise<ClassificationMetrics> {
  const batchSize = opts.batchSize ?? 16;
  const prompts = examples.map((e) => encodePrompt(tok, e.sentence));
  // Sort by length so batches pad little; remember where each example went.
  const order = prompts.map((_, i) => i).sort((a, b) => prompts[a].length - prompts[b].length);
  const genPred: (0 | 1 | null)[] = new Array(examples.length).fill(null);
  const lpPred: (0 | 1)[] = new Array(examples.length).fill(0);
  const answers = [answerIds(tok, 0), answerIds(tok, 1)];
  const maxNewTokens = opts.maxNewTokens ?? Math.max(...answers.map((a) => a.length)) + 1;
  let genTokens = 0, genMs = 0;
  const wasTraining = model.training;
  model.eval();
  try {
    for (let s = 0; s < order.length; s += batchSize) {
      const idx = order.slice(s, s + batchSize);
      if (!opts.skipGeneration) {
        const batch = collateLeft(idx.map((i) => prompts[i]), { padId: 0 });
        const rows: number[][] = [], mask: number[][] = [];
        for (let b = 0; b < batch.batchSize; b++) {
          rows.push(Array.from(batch.inputIds.subarray(b * batch.seqLen, (b + 1) * batch.seqLen)));
          mask.push(Array.from(batch.attentionMask.subarray(b * batch.seqLen, (b + 1) * batch.seqLen)));
        }
        const out = await generate(model, rows, {
          maxNewTokens,
          attentionMask: mask,
          eosTokenId: tok.eosId,
          chunk: maxNewTokens,
        });
        genTokens += out.newTokens;
        genMs += out.timeMs;
        out.tokens.forEach((t, b) => (genPred[idx[b]] = parseAnswer(tok.decode(t))));
      }
      const scores = await answerLogprobs(model, idx.map((i) => prompts[i]), answers);
      idx.forEach((i, b) => (lpPred[i] = scores[b][1] > scores[b][0] ? 1 : 0));
      opts.onProgress?.(Math.min(s + batchSize, order.length), order.length);
    }
  } finally {
    model.train(wasTraining);
  }
  const gold = examples.map((e) => e.label);
  const gen = classificationScores(gold, genPred);
  const lp = classificationScores(gold, lpPred);
  return {
    n: examples.length,
    accuracy: gen.accuracy,
    f1: gen.f1,
    f1Macro: gen.f1Macro,
    unparseable: opts.skipGeneration ? 0 : genPred.filter((p) => p === null).length,
    logprobAccuracy: lp.accuracy,
    logprobF1: lp.f1,
    logprobF1Macro: lp.f1Macro,
    tokensPerSecond: genMs > 0 ? genTokens / (genMs / 1000) : 0,
  };
}

/** Σ log p(answer tokens | prompt) for every prompt × candidate answer: [prompts][answers]. */
async function answerLogprobs(model: LlamaForCausalLM, prompts: number[][], answers: number[][]): Promise<number[][]> {
  const seqs = prompts.flatMap((p) => answers.map((a) => ({ inputIds: [...p, ...a] })));
  const batch = collate(seqs, { padId: 0 });
  const T = batch.seqLen;
  const positions: number[] = [], targets: number[] = [], owner: number[] = [];
  seqs.forEach((_, k) => {
    const p = prompts[Math.floor(k / answers.length)], a = answers[k % answers.length];
    a.forEach((id, j) => {
      positions.push(k * T + p.length - 1 + j);
      targets.push(id);
      owner.push(k);
    });
  });
  const nll = scope(() =>
    noGrad(() => {
      const { logits } = model.forward({ data: batch.inputIds, shape: [batch.batchSize, T] }, {
        attentionMask: { data: batch.attentionMask, shape: [batch.batchSize, T] },
        logitsPositions: positions,
      });
      const tgt = tensor(Int32Array.from(targets), [targets.length], { dtype: "i32" });
      return crossEntropy(logits, tgt, { reduction: "none" });
    })
  );
  const values = await nll.toArray();
  nll.dispose();
  const sums = new Array(seqs.length).fill(0);
  owner.forEach((k, i) => (sums[k] -= values[i]));
  return prompts.map((_, i) => answers.map((_, j) => sums[i * answers.length + j]));
}
