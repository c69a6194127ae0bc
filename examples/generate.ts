/**
 * Generates text from a prompt, printing it as it comes.
 *
 * ```sh
 * deno run -A examples/generate.ts --model ../shared/models/stories260K/stories260K.bin \
 *   --tokenizer ../shared/models/stories260K/tok512.bin --prompt "Once upon a time"
 * deno run -A examples/generate.ts --model ./Llama-2-7b-hf --prompt "The capital of France is" --temperature 0.7
 * ```
 *
 * `--model` takes a Hugging Face directory (its tokenizer.model is used unless `--tokenizer` is given) or a
 * llama2.c `.bin` file. Flags: --max-new-tokens (default 100), --temperature (0 = greedy), --top-p, --top-k,
 * --seed, --dtype f16|f32.
 * @module
 */
import { parseArgs } from "@std/cli";
import { init } from "../core/mod.ts";
import { exists, isDirectory, joinPath } from "../core/platform.ts";
import { Tokenizer } from "../data/tokenizer.ts";
import { fromPretrained, generate, type LlamaForCausalLM, loadLlama2c } from "../nn/mod.ts";

const flags = parseArgs(Deno.args, {
  string: ["model", "tokenizer", "prompt", "max-new-tokens", "temperature", "top-p", "top-k", "seed", "dtype"],
  boolean: ["help"],
  default: { prompt: "", "max-new-tokens": "100", temperature: "0", "top-p": "1", "top-k": "0", seed: "0" },
});
if (flags.help || !flags.model) {
  console.log("usage: deno run -A examples/generate.ts --model DIR|FILE.bin [--tokenizer FILE] [--prompt TEXT] ...");
  Deno.exit(flags.help ? 0 : 2);
}
const modelPath = flags.model as string;
const gpu = await init();
console.error(`GPU: ${gpu.description}`);
let model: LlamaForCausalLM;
let tokPath = flags.tokenizer as string | undefined;
const dtype = flags.dtype as "f16" | "f32" | undefined;
if (await isDirectory(modelPath)) {
  model = await fromPretrained(modelPath, { dtype });
  tokPath ??= joinPath(modelPath, "tokenizer.model");
} else if (await exists(modelPath)) {
  model = await loadLlama2c(modelPath, { dtype });
} else {
  throw new Error(`--model ${modelPath}: no such file or directory`);
}
if (!tokPath) throw new Error("--tokenizer is required with a llama2.c .bin model (e.g. tok512.bin)");
const tok = await Tokenizer.load(tokPath);
const ids = tok.encode(flags.prompt as string, { bos: true });
const stream = tok.decodeStream();
const enc = new TextEncoder();
Deno.stdout.writeSync(enc.encode(flags.prompt as string));
for (const id of ids.slice(1)) stream.push(id);
const result = await generate(model, [ids], {
  maxNewTokens: Number(flags["max-new-tokens"]),
  temperature: Number(flags.temperature),
  topP: Number(flags["top-p"]),
  topK: Number(flags["top-k"]),
  seed: Number(flags.seed),
  onTokens: (rows) => {
    for (const id of rows[0]) {
      if (id !== tok.eosId) Deno.stdout.writeSync(enc.encode(stream.push(id)));
    }
  },
});
console.log();
console.error(
  `${result.newTokens} tokens in ${(result.timeMs / 1000).toFixed(2)} s (${result.tokensPerSecond.toFixed(1)} tok/s)`,
);
