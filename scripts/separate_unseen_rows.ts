/**
 * Applies `separateUnseenRows` (examples/pretrain.ts) to a checkpoint that pretrain.ts saved before it had that step,
 * in place: the rows of tokens absent from the pretraining text get distinct random parts. This is how
 * examples/models/mini-llama got them; pass the same text the model was pretrained on.
 *
 * ```sh
 * deno run -A scripts/separate_unseen_rows.ts examples/models/mini-llama --data ../shared/data/sst2 \
 *   --corpora DIR_WITH_TINYSTORIES_4MB_AND_AUSTEN --tokenizer ../shared/models/llama2-tokenizer/tokenizer.model
 * ```
 * @module
 */
import { parseArgs } from "@std/cli";
import { init } from "../core/mod.ts";
import { Tokenizer } from "../data/tokenizer.ts";
import { pretrainingStream, separateUnseenRows } from "../examples/pretrain.ts";
import { cliMain } from "../examples/sst2/run.ts";
import { fromPretrained, savePretrained } from "../nn/loader.ts";

async function main(): Promise<void> {
  const flags = parseArgs(Deno.args, { string: ["data", "corpora", "tokenizer", "seed"], default: { seed: "0" } });
  const dir = flags._[0] as string | undefined;
  if (!dir || !flags.tokenizer) {
    throw new Error(
      "usage: deno run -A scripts/separate_unseen_rows.ts MODEL_DIR --tokenizer FILE [--data D] [--corpora D]",
    );
  }
  await init();
  const tok = await Tokenizer.load(flags.tokenizer as string);
  const { stream } = await pretrainingStream(
    tok,
    flags.data as string | undefined,
    flags.corpora as string | undefined,
  );
  const model = await fromPretrained(dir);
  const changed = await separateUnseenRows(model, stream, Number(flags.seed));
  await savePretrained(model, dir, { dtype: "f16" });
  console.error(`${dir}: ${changed.toLocaleString("en")} rows of tokens absent from the text redrawn apart`);
}

if (import.meta.main) await cliMain(main);
