/**
 * examples/pretrain.ts end to end on a tiny corpus: the training loss falls, the saved Hugging Face directory reloads
 * with the trained weights (its loss on the corpus is far below a random model's), and bad flags fail in one line.
 * Needs the Llama-2 tokenizer from WEBTUNE_SHARED (skipped without it).
 */
import { assert, assertEquals, assertStringIncludes } from "@std/assert";
import { init } from "../core/mod.ts";
import { fromPretrained } from "../nn/loader.ts";
import { Tokenizer } from "../data/tokenizer.ts";

const SHARED = Deno.env.get("WEBTUNE_SHARED");
const SCRIPT = new URL("../examples/pretrain.ts", import.meta.url).pathname;

/** Runs pretrain.ts with `args`; returns exit code and stderr. */
async function pretrain(args: string[]): Promise<{ code: number; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", SCRIPT, ...args],
    stdout: "piped",
    stderr: "piped",
    env: { WEBTUNE_SHARED: SHARED ?? "" },
  }).output();
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
}

Deno.test({
  name: "pretrain.ts: loss falls on a tiny corpus, the saved model reloads with its trained weights",
  ignore: !SHARED,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "webtune-pretrain-" });
    try {
      const seed = crypto.getRandomValues(new Uint32Array(1))[0] % 1000;
      // A repetitive corpus a 2-layer model learns within a few dozen steps.
      const words = ["a", "good", "film", "bad", "movie", "the", "story", "is", "dull", "fun"];
      let state = seed + 1;
      const next = () => (state = (state * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
      const sentence = () => Array.from({ length: 6 }, () => words[Math.floor(next() * words.length)]).join(" ");
      await Deno.mkdir(`${dir}/sst2`);
      const rows = Array.from({ length: 300 }, (_, i) => `${sentence()} \t${i % 2}`);
      await Deno.writeTextFile(`${dir}/sst2/train.tsv`, `sentence\tlabel\n${rows.join("\n")}\n`);
      await Deno.mkdir(`${dir}/corpora`);
      await Deno.writeTextFile(`${dir}/corpora/text.txt`, `${sentence()}.\n\n${sentence()}.\n`);
      const out = `${dir}/model`;
      const flags = ["--data", `${dir}/sst2`, "--corpora", `${dir}/corpora`, "--out", out, "--seed", String(seed)];
      const tiny = ["--dim", "32", "--heads", "4", "--hidden", "64", "--layers", "2", "--seq", "32", "--batch", "8"];
      const r = await pretrain([...flags, ...tiny, "--lr", "1e-2", "--epochs", "50", "--max-steps", "40"]);
      assertEquals(r.code, 0, r.stderr);
      assertStringIncludes(r.stderr, "SST-2 train sentences: 300 documents");

      const csv = (await Deno.readTextFile(`${out}/loss.csv`)).trim().split("\n").slice(1).map((l) => l.split(","));
      assertEquals(csv.length, 40);
      const losses = csv.map((c) => Number(c[1]));
      const first = losses[0], last = losses.slice(-5).reduce((a, b) => a + b, 0) / 5;
      assert(first > 9.5, `a fresh model's loss should be near ln(32000) = 10.37, got ${first}`);
      assert(last < first - 4, `the loss should fall: first ${first}, last five ${last}`);

      await init();
      const model = await fromPretrained(out);
      assertEquals([model.config.hiddenSize, model.config.numHiddenLayers], [32, 2]);
      assert(model.config.tieWordEmbeddings && model.lm_head === null);
      const tok = await Tokenizer.load(`${SHARED}/models/llama2-tokenizer/tokenizer.model`);
      // Rows of tokens the text never contains (" Pos", " Neg") were redrawn apart, not left as one shared vector.
      assertStringIncludes(r.stderr, "never occur in the text");
      const table = await model.model.embed_tokens.weight.toArray() as Float32Array;
      const row = (id: number) => table.subarray(id * 32, (id + 1) * 32);
      const [pos, neg] = [tok.encode(" Positive")[1], tok.encode(" Negative")[1]];
      const seenRow = row(tok.encode("film")[0]);
      const apart = Math.hypot(...row(pos).map((x, i) => x - row(neg)[i]));
      assert(
        apart > 0.5 * Math.hypot(...seenRow),
        `unseen rows ${apart} apart; a seen row's norm ${Math.hypot(...seenRow)}`,
      );
      const ids = tok.encode(rows[0].split("\t")[0].trim(), { bos: true });
      const { loss, logits } = model.forward([ids], { labels: [ids] });
      logits.dispose();
      const reloaded = await loss!.item();
      assert(reloaded < last + 1.5, `the reloaded model's loss ${reloaded} should be near training's ${last}`);
      model.dispose();
      const card = await Deno.readTextFile(`${out}/README.md`);
      assertStringIncludes(card, "40 steps of 8 × 32 tokens");
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "pretrain.ts: a missing --out and a bad number fail with a one-line error",
  ignore: !SHARED,
  async fn() {
    const a = await pretrain([]);
    assertEquals(a.code, 1);
    assertStringIncludes(a.stderr, "--out DIR is required");
    const b = await pretrain(["--out", "/tmp/never", "--dim", "0"]);
    assertEquals(b.code, 1);
    assertStringIncludes(b.stderr, "--dim must be a positive integer");
  },
});
