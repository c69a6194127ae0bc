/**
 * Tokenizer tests: exact ids against SentencePiece (fixtures written by tests/fixtures/make_tokenizer_fixtures.py),
 * decoding, streaming decoding, the tokenizer.json reader and error messages.
 *
 * Tests that read ../shared (the Llama-2 and stories260K tokenizers, SST-2 dev) skip when WEBTUNE_SHARED is unset.
 */
import { assert, assertEquals, assertRejects, assertStringIncludes, assertThrows } from "@std/assert";
import { PieceType, Tokenizer } from "../data/tokenizer.ts";

const SHARED = Deno.env.get("WEBTUNE_SHARED");
const FIXTURES = new URL("./fixtures/data/", import.meta.url);
const LLAMA_MODEL = `${SHARED}/models/llama2-tokenizer/tokenizer.model`;
const LLAMA_BIN = `${SHARED}/models/llama2-tokenizer/tokenizer.bin`;
const TOK512_MODEL = `${SHARED}/models/stories260K/tok512.model`;
const TOK512_BIN = `${SHARED}/models/stories260K/tok512.bin`;

interface Cases {
  strings: string[];
  llama2: number[][];
  tok512: number[][];
  tiny: number[][];
  random: { strings: string[]; llama2: number[][]; tok512: number[][] };
  decode: { model: "llama2" | "tok512"; ids: number[]; text: string }[];
  answers: {
    alone: Record<string, number[]>;
    joint: { index: number; prompt: number[]; Positive: number[]; Negative: number[] }[];
    tails: Record<string, number[]>;
  };
}

const cases: Cases = JSON.parse(await Deno.readTextFile(new URL("tokenizer_cases.json", FIXTURES)));

async function devSentences(): Promise<string[]> {
  const lines = (await Deno.readTextFile(`${SHARED}/data/sst2/dev.tsv`)).split("\n");
  return lines.slice(1).filter((l) => l.length > 0).map((l) => l.split("\t")[0].replace(/ +$/, ""));
}

/** Strings whose SentencePiece round trip is lossless (no lone surrogates; Llama-2 keeps every space). */
function randomText(rand: () => number, length: number): string {
  const alphabet = [
    ..."abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 .,!?'\"-\n\t",
    "é",
    "ü",
    "ß",
    "日",
    "本",
    "語",
    "😀",
    "👍🏽",
    "𝔢",
    "\u0000",
    "ﬁ",
    "  ",
  ];
  let s = "";
  for (let i = 0; i < length; i++) s += alphabet[Math.floor(rand() * alphabet.length)];
  return s;
}

function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const freshSeed = () => crypto.getRandomValues(new Uint32Array(1))[0];

// ---------------------------------------------------------------------------------------------------------------
// Fixture-only tests (no shared data needed): the tiny model trained without byte fallback.

Deno.test("tiny_bpe.model (no byte fallback, user-defined and control symbols) matches SentencePiece", async () => {
  const tok = await Tokenizer.load(new URL("tiny_bpe.model", FIXTURES).pathname);
  assertEquals(tok.vocabSize, 200);
  assertEquals(tok.pieceType(tok.pieceToId("<sep>")), PieceType.USER_DEFINED);
  assertEquals(tok.pieceType(tok.pieceToId("<ctl>")), PieceType.CONTROL);
  cases.strings.forEach((s, i) => assertEquals(tok.encode(s), cases.tiny[i], `string ${i}: ${JSON.stringify(s)}`));
  // A user-defined piece is one id even inside a word; consecutive unknown characters are one <unk>.
  const sep = tok.pieceToId("<sep>");
  assert(tok.encode("a<sep>b").includes(sep));
  assertEquals(tok.encode("ÅÆØ").filter((id) => id === tok.unkId).length, 1);
});

Deno.test("decode of <unk> gives the model's unk surface, and control pieces are invisible", async () => {
  const tok = await Tokenizer.load(new URL("tiny_bpe.model", FIXTURES).pathname);
  const ctl = tok.pieceToId("<ctl>");
  assertEquals(tok.decode([tok.bosId, ctl, tok.unkId, tok.eosId]), " \u2047 ");
});

// ---------------------------------------------------------------------------------------------------------------
// The Llama-2 and stories260K tokenizers (shared data).

Deno.test({
  name: "Llama-2 tokenizer.model and tokenizer.bin give SentencePiece's ids on all 872 SST-2 dev prompts",
  ignore: !SHARED,
  fn: async () => {
    const fixture = JSON.parse(await Deno.readTextFile(new URL("llama2_sst2_dev.json", FIXTURES)));
    const sentences = await devSentences();
    assertEquals(sentences.length, 872);
    assertEquals(fixture.rows.length, 872);
    for (const path of [LLAMA_MODEL, LLAMA_BIN]) {
      const tok = await Tokenizer.load(path);
      let mismatches = 0;
      sentences.forEach((s, i) => {
        const ids = tok.encode((fixture.template as string).replace("{}", s), { bos: true });
        const expected = [...fixture.prefix, ...fixture.rows[i]];
        if (JSON.stringify(ids) !== JSON.stringify(expected)) {
          if (mismatches++ < 3) assertEquals(ids, expected, `${path}, sentence ${i}: ${s}`);
        }
      });
      assertEquals(mismatches, 0, path);
    }
  },
});

Deno.test({
  name: "hard and random strings: exact ids under Llama-2 and tok512 (.model and .bin)",
  ignore: !SHARED,
  fn: async () => {
    const models: [string, number[][]][] = [
      [LLAMA_MODEL, cases.llama2],
      [LLAMA_BIN, cases.llama2],
      [TOK512_MODEL, cases.tok512],
    ];
    for (const [path, expected] of models) {
      const tok = await Tokenizer.load(path);
      cases.strings.forEach((s, i) => assertEquals(tok.encode(s), expected[i], `${path}: ${JSON.stringify(s)}`));
      const random = path.includes("tok512") ? cases.random.tok512 : cases.random.llama2;
      cases.random.strings.forEach((s, i) => assertEquals(tok.encode(s), random[i], `${path}: ${JSON.stringify(s)}`));
    }
    // tok512.bin cannot record tok512.model's remove_extra_whitespaces=true; with it set, the ids agree too.
    const bin512 = await Tokenizer.load(TOK512_BIN, { removeExtraWhitespaces: true });
    cases.strings.forEach((s, i) =>
      assertEquals(bin512.encode(s), cases.tok512[i], `tok512.bin: ${JSON.stringify(s)}`)
    );
  },
});

Deno.test({
  name: "tokenizer.bin stores the same pieces, scores and types as tokenizer.model",
  ignore: !SHARED,
  fn: async () => {
    for (const [model, bin] of [[LLAMA_MODEL, LLAMA_BIN], [TOK512_MODEL, TOK512_BIN]]) {
      const a = await Tokenizer.load(model), b = await Tokenizer.load(bin);
      assertEquals(b.vocabSize, a.vocabSize);
      assertEquals([b.bosId, b.eosId, b.unkId, b.padId], [a.bosId, a.eosId, a.unkId, a.padId]);
      for (let id = 0; id < a.vocabSize; id++) {
        if (a.idToPiece(id) !== b.idToPiece(id) || a.score(id) !== b.score(id) || a.pieceType(id) !== b.pieceType(id)) {
          throw new Error(
            `${bin} id ${id}: "${b.idToPiece(id)}" ${b.score(id)} vs "${a.idToPiece(id)}" ${a.score(id)}`,
          );
        }
      }
    }
  },
});

Deno.test({
  name: "Llama-2 special ids and vocabulary lookups",
  ignore: !SHARED,
  fn: async () => {
    const tok = await Tokenizer.load(LLAMA_MODEL);
    assertEquals([tok.vocabSize, tok.unkId, tok.bosId, tok.eosId, tok.padId], [32000, 0, 1, 2, -1]);
    assertEquals(tok.idToPiece(13), "<0x0A>");
    assertEquals(tok.pieceType(13), PieceType.BYTE);
    assertEquals(tok.pieceToId("▁Hello"), 15043);
    assertEquals(tok.pieceToId("no such piece"), -1);
    assertEquals(tok.encode("Hello", { bos: true, eos: true }), [1, 15043, 2]);
  },
});

Deno.test({
  name: "decode equals SentencePiece's decode on mixed byte / control / unk / normal id sequences",
  ignore: !SHARED,
  fn: async () => {
    const toks = { llama2: await Tokenizer.load(LLAMA_MODEL), tok512: await Tokenizer.load(TOK512_MODEL) };
    for (const c of cases.decode) assertEquals(toks[c.model].decode(c.ids), c.text, `${c.model} ${c.ids}`);
  },
});

Deno.test({
  name: "decode(encode(s)) == s under Llama-2 (hard strings and fresh random strings)",
  ignore: !SHARED,
  fn: async () => {
    const tok = await Tokenizer.load(LLAMA_MODEL);
    // A literal "▁" in the text decodes as a space, in SentencePiece too: leave those strings out.
    for (const s of cases.strings.filter((s) => !s.includes("\u2581"))) assertEquals(tok.decode(tok.encode(s)), s);
    const seed = freshSeed(), rand = rng(seed);
    for (let i = 0; i < 300; i++) {
      const s = randomText(rand, Math.floor(rand() * 60));
      assertEquals(tok.decode(tok.encode(s, { bos: true, eos: true })), s, `seed ${seed}: ${JSON.stringify(s)}`);
      assertEquals(tok.decode(Int32Array.from(tok.encode(s))), s);
    }
  },
});

Deno.test({
  name: "word-by-word encoding (with its cache) equals whole-text BPE on fresh random text",
  ignore: !SHARED,
  fn: async () => {
    const tok = await Tokenizer.load(LLAMA_MODEL);
    // The same vocabulary plus one user-defined piece that never occurs in the text: that switches the tokenizer
    // to running BPE over the whole text at once, without splitting into words or caching.
    const pieces = Array.from({ length: tok.vocabSize }, (_, id) => tok.idToPiece(id));
    const whole = new Tokenizer({
      pieces: [...pieces, "\uE000\uE001"],
      scores: [...pieces.map((_, id) => tok.score(id)), 0],
      types: [...pieces.map((_, id) => tok.pieceType(id)), PieceType.USER_DEFINED],
      unkId: 0,
      bosId: 1,
      eosId: 2,
    });
    const seed = freshSeed(), rand = rng(seed);
    for (let i = 0; i < 300; i++) {
      const s = randomText(rand, Math.floor(rand() * 200));
      assertEquals(tok.encode(s), whole.encode(s), `seed ${seed}: ${JSON.stringify(s)}`);
    }
  },
});

Deno.test({
  name: "streaming decode yields exactly decode's text, one id at a time",
  ignore: !SHARED,
  fn: async () => {
    const seed = freshSeed(), rand = rng(seed);
    for (const path of [LLAMA_MODEL, TOK512_MODEL]) {
      const tok = await Tokenizer.load(path);
      const sequences: number[][] = cases.strings.map((s) => tok.encode(s, { bos: true }));
      for (let i = 0; i < 300; i++) {
        // Random ids with many byte tokens, so UTF-8 characters split across pushes and invalid bytes both occur.
        const ids = Array.from({ length: 1 + Math.floor(rand() * 16) }, () => {
          const r = rand();
          if (r < 0.5) return 3 + Math.floor(rand() * 256);
          if (r < 0.6) return Math.floor(rand() * 3);
          return Math.floor(rand() * tok.vocabSize);
        });
        sequences.push(ids);
      }
      for (const ids of sequences) {
        const stream = tok.decodeStream();
        let text = "";
        for (const id of ids) text += stream.push(id);
        text += stream.flush();
        assertEquals(text, tok.decode(ids), `${path} seed ${seed}: ${ids}`);
      }
    }
    // A 4-byte emoji pushed byte by byte appears only when complete.
    const tok = await Tokenizer.load(LLAMA_MODEL);
    const ids = tok.encode("😀");
    const stream = tok.decodeStream();
    assertEquals(ids.map((id) => stream.push(id)), ["", "", "", "", "😀"]);
  },
});

Deno.test({
  name: "answer words: ids alone and after the prompt",
  ignore: !SHARED,
  fn: async () => {
    const tok = await Tokenizer.load(LLAMA_MODEL);
    for (const [text, ids] of Object.entries(cases.answers.alone)) assertEquals(tok.encode(text), ids, text);
    const sentences = await devSentences();
    for (const j of cases.answers.joint) {
      const prompt = `[INST] Classify the sentiment of this text as Positive or Negative: ${
        sentences[j.index]
      } [/INST]`;
      assertEquals(tok.encode(prompt, { bos: true }), j.prompt);
      assertEquals(tok.encode(prompt + " Positive", { bos: true }), j.Positive);
      assertEquals(tok.encode(prompt + " Negative", { bos: true }), j.Negative);
      assertEquals(j.Positive, [...j.prompt, ...cases.answers.tails.Positive]);
    }
  },
});

// ---------------------------------------------------------------------------------------------------------------
// Hugging Face tokenizer.json

/** A small Llama-style tokenizer.json: <unk> <s> </s>, 256 byte pieces, then a few characters and merges. */
function handWrittenTokenizerJson(opts: { metaspace?: boolean; byteFallback?: boolean } = {}) {
  const vocab: Record<string, number> = { "<unk>": 0, "<s>": 1, "</s>": 2 };
  for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`] = 3 + b;
  const extra = ["▁", "a", "b", "c", "l", "o", "w", "e", "r", "▁l", "lo", "low", "▁low", "er", "▁lower", "ab", "bc"];
  for (const p of extra) vocab[p] = Object.keys(vocab).length;
  // "b c" ranks above "a b": for "abc" the merges list, not any score, decides: a + bc. "▁ l" ranks below "l o",
  // so "lower" becomes ▁lower, while "l" alone after a space still becomes ▁l.
  const merges = ["l o", "lo w", "▁ low", "e r", "▁low er", "▁ l", "b c", "a b"];
  const special = (id: number, content: string) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  });
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
    normalizer: opts.metaspace ? null : {
      type: "Sequence",
      normalizers: [{ type: "Prepend", prepend: "▁" }, { type: "Replace", pattern: { String: " " }, content: "▁" }],
    },
    pre_tokenizer: opts.metaspace
      ? { type: "Metaspace", replacement: "▁", prepend_scheme: "first", split: false }
      : null,
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "<s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
    },
    decoder: null,
    model: {
      type: "BPE",
      dropout: null,
      unk_token: "<unk>",
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: opts.byteFallback ?? true,
      vocab,
      merges,
    },
  };
}

Deno.test("tokenizer.json reader: merge ranks, byte fallback, added tokens, Metaspace, decode", async () => {
  const json = handWrittenTokenizerJson();
  const tok = Tokenizer.fromHuggingFace(JSON.stringify(json));
  const v = json.model.vocab;
  assertEquals([tok.vocabSize, tok.bosId, tok.eosId, tok.unkId, tok.padId], [Object.keys(v).length, 1, 2, 0, -1]);
  assertEquals(tok.encode("lower"), [v["▁lower"]]);
  assertEquals(tok.encode("low"), [v["▁low"]]);
  assertEquals(tok.encode("l lo"), [v["▁l"], v["▁"], v["lo"]]);
  // Rank decides: "b c" (rank 6) merges before "a b" (rank 7).
  assertEquals(tok.encode("abc"), [v["▁"], v["a"], v["bc"]]);
  // Byte fallback for characters not in the vocabulary (é = C3 A9).
  assertEquals(tok.encode("é"), [v["▁"], 3 + 0xc3, 3 + 0xa9]);
  // Added tokens are matched whole in the raw text, and each segment is normalized on its own (as HF does).
  assertEquals(tok.encode("low</s>low"), [v["▁low"], 2, v["▁low"]]);
  assertEquals(tok.encode("a b", { bos: true, eos: true }), [1, v["▁"], v["a"], v["▁"], v["b"], 2]);
  assertEquals(tok.encode(""), []);
  assertEquals(tok.decode(tok.encode("lower  abc é", { bos: true })), "lower  abc é");

  // The same vocabulary with the Metaspace pre-tokenizer (prepend_scheme "first") gives the same ids.
  const meta = Tokenizer.fromHuggingFace(JSON.stringify(handWrittenTokenizerJson({ metaspace: true })));
  for (const s of ["lower", "abc low", "lower  lower ", "é"]) assertEquals(meta.encode(s), tok.encode(s), s);
  // Unlike Prepend, Metaspace adds no "▁" to text that already starts with a space (HF behaviour).
  assertEquals(meta.encode(" lower"), [v["▁lower"]]);
  assertEquals(tok.encode(" lower"), [v["▁"], v["▁lower"]]);

  // Without byte fallback, consecutive unknown characters fuse into one <unk> (fuse_unk).
  const noBytes = Tokenizer.fromHuggingFace(JSON.stringify(handWrittenTokenizerJson({ byteFallback: false })));
  assertEquals(noBytes.encode("éé low"), [v["▁"], 0, v["▁low"]]);

  // Tokenizer.load picks the reader by the .json extension.
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/tokenizer.json`, JSON.stringify(json));
    assertEquals((await Tokenizer.load(`${dir}/tokenizer.json`)).encode("lower abc"), tok.encode("lower abc"));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }

  // Merges may also be given as [a, b] pairs (newer tokenizers versions).
  const pairs = handWrittenTokenizerJson();
  (pairs.model as { merges: unknown }).merges = pairs.model.merges.map((m) => m.split(" "));
  assertEquals(Tokenizer.fromHuggingFace(JSON.stringify(pairs)).encode("lower abc"), tok.encode("lower abc"));
});

Deno.test({
  name: "tokenizer.json built from tok512.model's vocabulary (merges ordered by score) matches SentencePiece",
  ignore: !SHARED,
  fn: async () => {
    const sp = await Tokenizer.load(TOK512_MODEL);
    const vocab: Record<string, number> = {};
    const added = [];
    for (let id = 0; id < sp.vocabSize; id++) {
      vocab[sp.idToPiece(id)] = id;
      const type = sp.pieceType(id);
      if (type === PieceType.CONTROL || type === PieceType.UNKNOWN) {
        added.push({ id, content: sp.idToPiece(id), special: true, normalized: false, lstrip: false, rstrip: false });
      }
    }
    // Like transformers' SentencePieceExtractor: every split of a normal piece into two pieces, by piece score.
    const merges: [string, string, number][] = [];
    for (let id = 0; id < sp.vocabSize; id++) {
      if (sp.pieceType(id) !== PieceType.NORMAL) continue;
      const chars = Array.from(sp.idToPiece(id));
      for (let k = 1; k < chars.length; k++) {
        const a = chars.slice(0, k).join(""), b = chars.slice(k).join("");
        if (sp.pieceToId(a) >= 0 && sp.pieceToId(b) >= 0) merges.push([a, b, id]);
      }
    }
    merges.sort((x, y) => sp.score(y[2]) - sp.score(x[2]) || x[2] - y[2]);
    const json = {
      added_tokens: added,
      normalizer: {
        type: "Sequence",
        normalizers: [{ type: "Prepend", prepend: "▁" }, { type: "Replace", pattern: { String: " " }, content: "▁" }],
      },
      pre_tokenizer: null,
      model: {
        type: "BPE",
        unk_token: "<unk>",
        fuse_unk: true,
        byte_fallback: true,
        vocab,
        merges: merges.map((m) => `${m[0]} ${m[1]}`),
      },
    };
    const hf = Tokenizer.fromHuggingFace(JSON.stringify(json));
    // tok512 removes extra whitespace, which tokenizer.json expresses differently: compare on single-spaced text.
    const seed = freshSeed(), rand = rng(seed);
    const texts = cases.strings.filter((s) => !/ {2}|^ | $|<\/?s>|<unk>|\u2581/.test(s));
    for (let i = 0; i < 200; i++) {
      texts.push(randomText(rand, 40).replace(/ +/g, " ").replace(/^ | $/g, "").replace(/<\/?s>|<unk>/g, ""));
    }
    for (const s of texts) assertEquals(hf.encode(s), sp.encode(s), `seed ${seed}: ${JSON.stringify(s)}`);
  },
});

// ---------------------------------------------------------------------------------------------------------------
// Errors

Deno.test("clear errors: wrong path, unknown format, truncated .model and .bin, bad ids, bad JSON", async () => {
  await assertRejects(
    () => Tokenizer.load("/nonexistent/dir/tokenizer.model"),
    Error,
    "/nonexistent/dir/tokenizer.model",
  );
  const dir = await Deno.makeTempDir();
  try {
    await assertRejects(() => Tokenizer.load(dir), Error, "No tokenizer in directory");
    await Deno.writeTextFile(`${dir}/vocab.txt`, "hello");
    await assertRejects(() => Tokenizer.load(`${dir}/vocab.txt`), Error, "Unknown tokenizer format");
    const model = await Deno.readFile(new URL("tiny_bpe.model", FIXTURES));
    await Deno.writeFile(`${dir}/tokenizer.model`, model.subarray(0, Math.floor(model.length * 0.6)));
    const e = await assertRejects(() => Tokenizer.load(`${dir}/tokenizer.model`), Error, "truncated");
    assertStringIncludes(e.message, `${dir}/tokenizer.model`);
    // Loading a directory picks tokenizer.model inside it.
    await Deno.writeFile(`${dir}/tokenizer.model`, model);
    assertEquals((await Tokenizer.load(dir)).vocabSize, 200);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  assertThrows(() => Tokenizer.fromSentencePiece(new Uint8Array([0x0a, 0x05, 0x0a])), Error, "truncated");
  assertThrows(() => Tokenizer.fromLlama2c(new Uint8Array([16, 0, 0, 0, 0, 0, 0, 0, 9, 0])), Error, "truncated");
  assertThrows(() => Tokenizer.fromHuggingFace("{not json"), Error, "not valid JSON");
  assertThrows(() => Tokenizer.fromHuggingFace('{"model": {"type": "WordPiece", "vocab": {}}}'), Error, "WordPiece");

  const tok = Tokenizer.fromSentencePiece(await Deno.readFile(new URL("tiny_bpe.model", FIXTURES)));
  const err = assertThrows(() => tok.decode([5, tok.vocabSize]), RangeError, `id ${tok.vocabSize} at position 1`);
  assertStringIncludes(err.message, "0..199");
  assertThrows(() => tok.decode([-1]), RangeError, "out of range");
  assertThrows(() => tok.decode([1.5]), RangeError, "out of range");
  assertThrows(() => tok.decodeStream().push(1000), RangeError, "out of range");
  assertThrows(() => tok.idToPiece(200), RangeError, "out of range");
  const noBos = new Tokenizer({ pieces: ["▁", "a"] });
  assertThrows(() => noBos.encode("a", { bos: true }), Error, "no BOS");
});
