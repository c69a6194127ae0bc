/**
 * The Llama tokenizer: SentencePiece BPE with byte fallback, in plain TypeScript.
 *
 * One {@link Tokenizer} class, loaded from any of the three files Llama checkpoints ship with:
 * - `tokenizer.model` — SentencePiece's `ModelProto` protobuf ({@link Tokenizer.fromSentencePiece}),
 * - `tokenizer.bin` — llama2.c's export of the same vocabulary and scores ({@link Tokenizer.fromLlama2c}),
 * - `tokenizer.json` — a Hugging Face `tokenizers` file with a BPE model ({@link Tokenizer.fromHuggingFace}).
 *
 * Encoding reproduces SentencePiece's `bpe_model.cc` exactly (checked id for id against the reference library on
 * the SST-2 prompts and on hard strings): the text is normalized (spaces → `▁`, a dummy `▁` prefix, optional
 * removal of extra spaces), split into Unicode code points (user-defined pieces are matched whole first and never
 * merged further), and then the adjacent pair whose concatenation is a vocabulary piece with the highest score is
 * merged, leftmost first on ties, until no pair is in the vocabulary. Symbols that are not vocabulary pieces become
 * their UTF-8 bytes as `<0xXX>` tokens (byte fallback) or `<unk>`. The merge loop uses a binary heap of candidate
 * pairs over a linked list of symbols, so a text of n characters costs O(n log n), and pairs are looked up by
 * integer ids precomputed at load time rather than by slicing strings.
 *
 * Why our own reader instead of an npm tokenizer package: the whole algorithm is a few hundred lines; we need no
 * WASM or native module (the library must bundle for a browser with `npm:esbuild`); and the three file formats all
 * describe the same algorithm family (BPE over code points with byte fallback), so one implementation serves all of
 * them — for `tokenizer.json` the merge priority is the rank in the `merges` list instead of the piece score.
 *
 * Not supported (each gives a clear error when a file needs it): SentencePiece unigram models, non-identity
 * SentencePiece normalizers (a precompiled charsmap such as `nmt_nfkc`), and byte-level BPE `tokenizer.json` files
 * (GPT-2 / Llama-3 style).
 *
 * @example
 * ```ts
 * import { Tokenizer } from "./tokenizer.ts";
 * const tok = await Tokenizer.load("../shared/models/llama2-tokenizer/tokenizer.model");
 * const ids = tok.encode("Hello world", { bos: true }); // [1, 15043, 3186]
 * console.log(tok.decode(ids)); // "Hello world"
 * ```
 * @module
 */
import { exists, isDirectory, readBytes } from "../core/platform.ts";
import { ModelType, parseSentencePieceModel, PieceType } from "./sentencepiece_proto.ts";

export { PieceType } from "./sentencepiece_proto.ts";

/** SentencePiece's whitespace symbol, U+2581 LOWER ONE EIGHTH BLOCK. */
export const SPACE_SYMBOL = "\u2581";

/** Options of {@link Tokenizer.encode}. */
export interface EncodeOptions {
  /** Prepend the beginning-of-sequence id (default false). */
  bos?: boolean;
  /** Append the end-of-sequence id (default false). */
  eos?: boolean;
}

/**
 * Everything that defines a tokenizer: the vocabulary and the normalization rules. The three loaders build one of
 * these; build it yourself for a hand-made vocabulary.
 */
export interface TokenizerSpec {
  /** Piece text per id; `▁` stands for a space. */
  pieces: string[];
  /** Merge score per id (higher merges first); ignored for pairs listed in `merges`. Default 0. */
  scores?: ArrayLike<number>;
  /** {@link PieceType} per id. Default NORMAL. */
  types?: ArrayLike<number>;
  /** Beginning-of-sequence id, -1 when none. Default -1. */
  bosId?: number;
  /** End-of-sequence id, -1 when none. Default -1. */
  eosId?: number;
  /** Padding id, -1 when none. Default -1. */
  padId?: number;
  /** Unknown-piece id, -1 when none. Default -1. */
  unkId?: number;
  /** Map pieces not in the vocabulary to `<0xXX>` byte pieces. Default true when the vocabulary has byte pieces. */
  byteFallback?: boolean;
  /** Prepend `▁` to non-empty text (SentencePiece `add_dummy_prefix`). Default true. */
  addDummyPrefix?: boolean;
  /** Drop leading/trailing spaces and collapse runs of spaces (SentencePiece `remove_extra_whitespaces`). Default false. */
  removeExtraWhitespaces?: boolean;
  /** Replace ' ' by `▁` (SentencePiece `escape_whitespaces`). Default true. */
  escapeWhitespaces?: boolean;
  /** What an unknown id decodes to. Default " ⁇ ". */
  unkSurface?: string;
  /**
   * Merge rules in priority order (Hugging Face `merges`): when given, only these pairs merge and a lower index
   * merges first; scores are ignored.
   */
  merges?: [string, string][];
  /** A text pipeline replacing SentencePiece's normalization (used by the `tokenizer.json` reader). */
  pipeline?: TextPipeline;
}

/**
 * How raw text becomes the words that BPE runs on, for pipelines other than SentencePiece's own normalizer
 * (Hugging Face `added_tokens` + `normalizer` + `pre_tokenizer`).
 */
export interface TextPipeline {
  /** Strings matched in the raw text before anything else and emitted as one id each (added tokens). */
  atomic: { content: string; id: number; lstrip: boolean; rstrip: boolean }[];
  /** Normalizes one text segment between atomic tokens; `first` is true for the segment at the start of the text. */
  normalize(segment: string, first: boolean): string;
  /** Splits a normalized segment into the words BPE runs on separately. */
  split(normalized: string): string[];
  /** When true, a word that is itself a vocabulary piece is emitted without merging (HF `ignore_merges`). */
  ignoreMerges?: boolean;
  /** When true, consecutive unknown pieces become one `<unk>` (HF `fuse_unk`). */
  fuseUnk?: boolean;
}

/** Options of {@link Tokenizer.fromLlama2c}: what the `.bin` file does not record. */
export interface Llama2cTokenizerOptions {
  /** Read only this many tokens (llama2.c takes the count from the model header). Default: all in the file. */
  vocabSize?: number;
  /** Default 0. */
  unkId?: number;
  /** Default 1. */
  bosId?: number;
  /** Default 2. */
  eosId?: number;
  /** Default true (Llama and llama2.c models). */
  addDummyPrefix?: boolean;
  /** Default false (Llama-2; llama2.c's own encoder never removes spaces). */
  removeExtraWhitespaces?: boolean;
}

/** A streaming decoder made by {@link Tokenizer.decodeStream}. */
export interface DecodeStream {
  /** Feeds one id; returns the text it completes (may be "" while a UTF-8 character is split across byte tokens). */
  push(id: number): string;
  /** Ends the stream: returns what is left (an incomplete UTF-8 sequence becomes U+FFFD per byte). */
  flush(): string;
}

const WORD_CACHE_SIZE = 1 << 16; // words whose ids are remembered (cleared when full)
const ERASED = -2; // symbol id of a symbol merged into its left neighbour
const UNKNOWN_CHAR = -1; // symbol id of a code point that is not a piece

const BYTE_PIECE = /^<0x([0-9A-Fa-f]{2})>$/;

/**
 * A SentencePiece-compatible BPE tokenizer (Llama, Llama-2, llama2.c models).
 *
 * @example
 * ```ts
 * import { Tokenizer } from "./tokenizer.ts";
 * const tok = Tokenizer.fromSentencePiece(await Deno.readFile("tokenizer.model"));
 * tok.encode("it 's a charming journey", { bos: true }); // [1, 372, 525, 29879, 263, 1373, 4056, 16342]
 * tok.decode([1, 15043, 3186]); // "Hello world"
 * ```
 */
export class Tokenizer {
  /** Number of ids (pieces) in the vocabulary. */
  readonly vocabSize: number;
  /** Beginning-of-sequence id (`<s>`), -1 when the vocabulary has none. */
  readonly bosId: number;
  /** End-of-sequence id (`</s>`), -1 when none. */
  readonly eosId: number;
  /** Padding id, -1 when none (Llama-2 has none: pad with `eosId` or any id and mask it out). */
  readonly padId: number;
  /** Unknown-piece id, -1 when none. */
  readonly unkId: number;

  private readonly pieces: string[];
  private readonly scores: Float32Array;
  private readonly types: Uint8Array;
  private readonly byteFallback: boolean;
  private readonly addDummyPrefix: boolean;
  private readonly removeExtraWhitespaces: boolean;
  private readonly escapeWhitespaces: boolean;
  private readonly unkSurface: string;
  private readonly pipeline?: TextPipeline;

  /** Every piece → id (first occurrence wins), for {@link pieceToId}. */
  private readonly allIndex = new Map<string, number>();
  /** Pieces that BPE may produce (NORMAL, USER_DEFINED, UNUSED) → id: SentencePiece's `pieces_`. */
  private readonly mergeable = new Map<string, number>();
  /** Reserved pieces (CONTROL, UNKNOWN, BYTE) → id: SentencePiece's `reserved_id_map_`, consulted first. */
  private readonly reserved = new Map<string, number>();
  /** Code point → symbol id: a single-character piece, or an extra id ≥ vocabSize for a character that only
   * occurs inside longer pieces (so pairs with it can still be looked up by number). */
  private readonly charIds = new Map<number, number>();
  /** Number of symbol ids (vocabSize + extra character ids): the stride of pair keys. */
  private readonly symbolCount: number;
  /** Merge rules: (left symbol, right symbol) → merged id and priority, in an open-addressing hash table. */
  private readonly pairs: PairTable;
  /** Byte value → id of its `<0xXX>` piece, -1 when missing. */
  private readonly byteIds = new Int32Array(256).fill(-1);
  /** Id → byte value for BYTE pieces, -1 otherwise. */
  private readonly byteValue: Int16Array;
  /** USER_DEFINED pieces by first UTF-16 unit, longest first (matched whole before BPE). */
  private readonly userDefined = new Map<number, { text: string; id: number }[]>();
  private readonly hasUnused: boolean;
  /** True when BPE never merges across the start of a word (see {@link bpeWords}), so words can be cached. */
  private readonly wordsIndependent: boolean;
  private readonly wordCache = new Map<string, number[]>();

  // Scratch buffers of the merge loop, grown on demand and reused across calls.
  private symId = new Int32Array(64);
  private symStart = new Int32Array(64);
  private symEnd = new Int32Array(64);
  private symPrev = new Int32Array(64);
  private symNext = new Int32Array(64);
  private symFrozen = new Uint8Array(64);
  private candLeft = new Int32Array(256);
  private candRight = new Int32Array(256);
  private candLeftId = new Int32Array(256);
  private candRightId = new Int32Array(256);
  private candMerge = new Int32Array(256);
  private heapKey = new Float64Array(256);
  private heapCand = new Int32Array(256);
  private heapSize = 0;
  private candCount = 0;

  /**
   * Builds a tokenizer from a vocabulary and its rules. Most code uses {@link Tokenizer.load} or one of the
   * `from*` readers instead.
   *
   * @example
   * ```ts
   * import { PieceType, Tokenizer } from "./tokenizer.ts";
   * const tok = new Tokenizer({
   *   pieces: ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "▁ab"],
   *   scores: [0, 0, 0, 0, 0, 0, -1, -2],
   *   types: [PieceType.UNKNOWN, PieceType.CONTROL, PieceType.CONTROL, 1, 1, 1, 1, 1],
   *   unkId: 0, bosId: 1, eosId: 2,
   * });
   * tok.encode("ab"); // [7]
   * ```
   */
  constructor(spec: TokenizerSpec) {
    const n = spec.pieces.length;
    if (n === 0) throw new Error("Tokenizer: the vocabulary is empty");
    this.vocabSize = n;
    this.pieces = spec.pieces.slice();
    this.scores = new Float32Array(n);
    if (spec.scores) this.scores.set(Array.from(spec.scores));
    this.types = new Uint8Array(n).fill(PieceType.NORMAL);
    if (spec.types) this.types.set(Array.from(spec.types));
    const checkId = (name: string, id: number | undefined) => {
      const v = id ?? -1;
      if (!Number.isInteger(v) || v < -1 || v >= n) {
        throw new Error(`Tokenizer: ${name} ${v} is outside the vocabulary (0..${n - 1}, or -1 for none)`);
      }
      return v;
    };
    this.bosId = checkId("bosId", spec.bosId);
    this.eosId = checkId("eosId", spec.eosId);
    this.padId = checkId("padId", spec.padId);
    this.unkId = checkId("unkId", spec.unkId);
    this.addDummyPrefix = spec.addDummyPrefix ?? true;
    this.removeExtraWhitespaces = spec.removeExtraWhitespaces ?? false;
    this.escapeWhitespaces = spec.escapeWhitespaces ?? true;
    this.unkSurface = spec.unkSurface ?? " \u2047 ";
    this.pipeline = spec.pipeline;

    this.byteValue = new Int16Array(n).fill(-1);
    let hasBytes = false, hasUnused = false;
    for (let id = 0; id < n; id++) {
      const piece = this.pieces[id], type = this.types[id];
      if (!this.allIndex.has(piece)) this.allIndex.set(piece, id);
      if (type === PieceType.NORMAL || type === PieceType.USER_DEFINED || type === PieceType.UNUSED) {
        if (!this.mergeable.has(piece)) this.mergeable.set(piece, id);
        if (type === PieceType.UNUSED) hasUnused = true;
        if (type === PieceType.USER_DEFINED && piece.length > 0) {
          const key = piece.charCodeAt(0);
          const list = this.userDefined.get(key) ?? [];
          list.push({ text: piece, id });
          list.sort((a, b) => b.text.length - a.text.length);
          this.userDefined.set(key, list);
        }
      } else {
        if (!this.reserved.has(piece)) this.reserved.set(piece, id);
        if (type === PieceType.BYTE) {
          const m = BYTE_PIECE.exec(piece);
          if (!m) throw new Error(`Tokenizer: piece ${id} has type BYTE but is "${piece}", not <0xXX>`);
          const b = parseInt(m[1], 16);
          this.byteValue[id] = b;
          if (this.byteIds[b] < 0) this.byteIds[b] = id;
          hasBytes = true;
        }
      }
      if (type === PieceType.UNKNOWN && this.unkId < 0) this.unkId = id;
    }
    this.hasUnused = hasUnused;
    this.wordsIndependent = this.userDefined.size === 0 && this.mergeable.has(SPACE_SYMBOL) &&
      ![...this.mergeable.keys()].some((p) => /[^\u2581]\u2581/u.test(p));
    this.byteFallback = spec.byteFallback ?? hasBytes;

    // Symbol ids of single characters; characters found only inside longer pieces get extra ids.
    let extra = n;
    for (const [piece, id] of this.mergeable) {
      if (isOneCodePoint(piece)) this.charIds.set(piece.codePointAt(0)!, id);
    }
    for (const piece of this.mergeable.keys()) {
      for (const ch of piece) {
        const cp = ch.codePointAt(0)!;
        if (!this.charIds.has(cp)) this.charIds.set(cp, extra++);
      }
    }
    this.symbolCount = extra;
    const symbolOf = (s: string): number | undefined => {
      const id = this.mergeable.get(s);
      if (id !== undefined) return id;
      return isOneCodePoint(s) ? this.charIds.get(s.codePointAt(0)!) : undefined;
    };
    const rules: number[] = []; // left, right, merged, priority, ...
    const addPair = (left: number, right: number, merged: number, priority: number) => {
      rules.push(left, right, merged, priority);
    };
    if (spec.merges) {
      // Hugging Face: only listed pairs merge, lower rank first.
      spec.merges.forEach(([a, b], rank) => {
        const left = symbolOf(a), right = symbolOf(b), merged = this.mergeable.get(a + b);
        if (left !== undefined && right !== undefined && merged !== undefined) addPair(left, right, merged, -rank);
      });
    } else {
      // SentencePiece: any split of a piece into two symbols merges into it, with the piece's score.
      for (const [piece, id] of this.mergeable) {
        for (let at = 1; at < piece.length; at++) {
          if (isLowSurrogate(piece.charCodeAt(at)) && isHighSurrogate(piece.charCodeAt(at - 1))) continue;
          const left = symbolOf(piece.slice(0, at)), right = symbolOf(piece.slice(at));
          if (left !== undefined && right !== undefined) addPair(left, right, id, this.scores[id]);
        }
      }
    }
    this.pairs = new PairTable(rules);
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Loaders

  /**
   * Loads a tokenizer file, choosing the reader by name: `*.model` (SentencePiece), `*.bin` (llama2.c),
   * `*.json` (Hugging Face). A directory is searched for `tokenizer.model`, `tokenizer.json`, then `tokenizer.bin`.
   * `opts` only applies to `.bin` files, which do not record the special ids or the normalization.
   *
   * @example
   * ```ts
   * import { Tokenizer } from "./tokenizer.ts";
   * const tok = await Tokenizer.load("../shared/models/stories260K/tok512.model");
   * console.log(tok.vocabSize); // 512
   * ```
   */
  static async load(path: string, opts: Llama2cTokenizerOptions = {}): Promise<Tokenizer> {
    let file = path;
    if (await isDirectory(path)) {
      const names = ["tokenizer.model", "tokenizer.json", "tokenizer.bin"];
      const found: string[] = [];
      for (const name of names) if (await exists(`${path.replace(/\/+$/, "")}/${name}`)) found.push(name);
      if (found.length === 0) {
        throw new Error(`No tokenizer in directory ${path}: expected one of ${names.join(", ")}`);
      }
      file = `${path.replace(/\/+$/, "")}/${found[0]}`;
    }
    const lower = file.toLowerCase();
    const bytes = await readBytes(file);
    if (lower.endsWith(".model")) return Tokenizer.fromSentencePiece(bytes, file);
    if (lower.endsWith(".bin")) return Tokenizer.fromLlama2c(bytes, opts, file);
    if (lower.endsWith(".json")) return Tokenizer.fromHuggingFace(new TextDecoder().decode(bytes), file);
    throw new Error(
      `Unknown tokenizer format for ${file}: expected a SentencePiece .model, a llama2.c tokenizer .bin, or a ` +
        `Hugging Face tokenizer .json (the reader is chosen by the file extension)`,
    );
  }

  /**
   * Reads a SentencePiece `tokenizer.model` (BPE models only).
   *
   * @param bytes the file contents
   * @param what a name for error messages
   * @example
   * ```ts
   * import { Tokenizer } from "./tokenizer.ts";
   * const tok = Tokenizer.fromSentencePiece(await Deno.readFile("tokenizer.model"));
   * console.log(tok.vocabSize, tok.bosId, tok.eosId, tok.padId); // 32000 1 2 -1
   * ```
   */
  static fromSentencePiece(bytes: Uint8Array, what = "tokenizer.model"): Tokenizer {
    const model = parseSentencePieceModel(bytes, what);
    const { trainerSpec: t, normalizerSpec: ns } = model;
    if (t.modelType !== ModelType.BPE) {
      const name = Object.entries(ModelType).find(([, v]) => v === t.modelType)?.[0] ?? String(t.modelType);
      throw new Error(`${what}: SentencePiece model type ${name} is not supported; only BPE models (Llama) are`);
    }
    if (ns.precompiledCharsmap.length > 0) {
      throw new Error(
        `${what}: the SentencePiece normalizer "${ns.name}" needs its precompiled character map, which is not ` +
          `supported; only the identity normalizer (Llama's) is`,
      );
    }
    const pieceCount = model.pieces.length;
    const idOrNone = (id: number) => (id >= 0 && id < pieceCount ? id : -1);
    return new Tokenizer({
      pieces: model.pieces.map((p) => p.piece),
      scores: model.pieces.map((p) => p.score),
      types: model.pieces.map((p) => p.type),
      bosId: idOrNone(t.bosId),
      eosId: idOrNone(t.eosId),
      padId: idOrNone(t.padId),
      unkId: idOrNone(t.unkId),
      byteFallback: t.byteFallback,
      addDummyPrefix: ns.addDummyPrefix,
      removeExtraWhitespaces: ns.removeExtraWhitespaces,
      escapeWhitespaces: ns.escapeWhitespaces,
      unkSurface: t.unkSurface,
    });
  }

  /**
   * Reads llama2.c's `tokenizer.bin`: int32 `max_token_length`, then per token f32 score, i32 byte length, bytes.
   * llama2.c wrote `▁` as ' ' and `<s>`/`</s>` as "\n<s>\n"/"\n</s>\n"; both are undone here. Ids 0, 1, 2 are
   * `<unk>`, `<s>`, `</s>` unless `opts` says otherwise, and `<0xXX>` pieces are byte pieces.
   *
   * @example
   * ```ts
   * import { Tokenizer } from "./tokenizer.ts";
   * const tok = Tokenizer.fromLlama2c(await Deno.readFile("tok512.bin"));
   * console.log(tok.vocabSize); // 512
   * ```
   */
  static fromLlama2c(bytes: Uint8Array, opts: Llama2cTokenizerOptions = {}, what = "tokenizer.bin"): Tokenizer {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const truncated = (pos: number, i: number): never => {
      throw new Error(
        `${what}: truncated llama2.c tokenizer (token ${i} runs past the end of the file at byte ${pos})`,
      );
    };
    if (bytes.length < 4) truncated(bytes.length, 0);
    const maxLen = view.getInt32(0, true);
    if (maxLen <= 0 || maxLen > 1 << 16) {
      throw new Error(`${what}: not a llama2.c tokenizer (max_token_length is ${maxLen})`);
    }
    const unkId = opts.unkId ?? 0, bosId = opts.bosId ?? 1, eosId = opts.eosId ?? 2;
    const pieces: string[] = [], scores: number[] = [], types: number[] = [];
    const dec = new TextDecoder("utf-8", { ignoreBOM: true });
    let pos = 4;
    while (pos < bytes.length && (opts.vocabSize === undefined || pieces.length < opts.vocabSize)) {
      const i = pieces.length;
      if (pos + 8 > bytes.length) truncated(pos, i);
      const score = view.getFloat32(pos, true), len = view.getInt32(pos + 4, true);
      pos += 8;
      if (len < 0 || len > maxLen) {
        throw new Error(`${what}: token ${i} has length ${len}, outside 0..${maxLen}: not a llama2.c tokenizer`);
      }
      if (pos + len > bytes.length) truncated(pos, i);
      let piece = dec.decode(bytes.subarray(pos, pos + len));
      pos += len;
      let type: number = PieceType.NORMAL;
      if (i === unkId) type = PieceType.UNKNOWN;
      else if (i === bosId || i === eosId) {
        type = PieceType.CONTROL;
        piece = piece.trim();
      } else if (BYTE_PIECE.test(piece)) type = PieceType.BYTE;
      else piece = piece.replaceAll(" ", SPACE_SYMBOL);
      pieces.push(piece);
      scores.push(score);
      types.push(type);
    }
    if (opts.vocabSize !== undefined && pieces.length < opts.vocabSize) {
      throw new Error(`${what}: has ${pieces.length} tokens, fewer than the ${opts.vocabSize} asked for`);
    }
    const n = pieces.length;
    return new Tokenizer({
      pieces,
      scores,
      types,
      unkId: unkId < n ? unkId : -1,
      bosId: bosId < n ? bosId : -1,
      eosId: eosId < n ? eosId : -1,
      addDummyPrefix: opts.addDummyPrefix ?? true,
      removeExtraWhitespaces: opts.removeExtraWhitespaces ?? false,
    });
  }

  /**
   * Reads a Hugging Face `tokenizer.json` whose model is BPE over characters with byte fallback (Llama, Mistral,
   * TinyLlama). Supported: the `Prepend`/`Replace`/`NFC`/`NFKC`/`Lowercase`/`Strip` normalizers (also inside a
   * `Sequence`), the `Metaspace` pre-tokenizer, `added_tokens` (matched whole in the raw text before normalizing,
   * as HF does), `byte_fallback`, `fuse_unk`, `ignore_merges`, and merges as "a b" strings or [a, b] pairs. Merge
   * priority is the rank in the merges list.
   *
   * @example
   * ```ts
   * import { Tokenizer } from "./tokenizer.ts";
   * const tok = Tokenizer.fromHuggingFace(await Deno.readTextFile("tokenizer.json"));
   * tok.encode("Hello", { bos: true });
   * ```
   */
  static fromHuggingFace(json: string, what = "tokenizer.json"): Tokenizer {
    return fromHuggingFaceJson(json, what);
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Encoding

  /**
   * Text → ids, exactly as SentencePiece encodes it.
   *
   * @example
   * ```ts
   * import { Tokenizer } from "./tokenizer.ts";
   * const tok = await Tokenizer.load("tokenizer.model");
   * tok.encode("Hello world"); // [15043, 3186]
   * tok.encode("Hello world", { bos: true, eos: true }); // [1, 15043, 3186, 2]
   * ```
   */
  encode(text: string, opts: EncodeOptions = {}): number[] {
    if (typeof text !== "string") throw new TypeError(`encode: expected a string, got ${typeof text}`);
    const out: number[] = [];
    if (opts.bos) {
      if (this.bosId < 0) throw new Error("encode: this tokenizer has no BOS token, so { bos: true } cannot be used");
      out.push(this.bosId);
    }
    if (this.pipeline) this.encodeWithPipeline(text, this.pipeline, out);
    else {
      const normalized = this.normalize(text);
      if (normalized.length > 0) this.bpeWords(normalized, out, true);
    }
    if (opts.eos) {
      if (this.eosId < 0) throw new Error("encode: this tokenizer has no EOS token, so { eos: true } cannot be used");
      out.push(this.eosId);
    }
    return out;
  }

  /**
   * SentencePiece's normalization with the identity rule: optional removal of extra spaces, spaces → `▁`, and the
   * dummy `▁` prefix on non-empty text. Lone UTF-16 surrogates become U+FFFD (SentencePiece replaces invalid
   * UTF-8 the same way).
   *
   * @example
   * ```ts
   * import { Tokenizer } from "./tokenizer.ts";
   * const tok = await Tokenizer.load("tokenizer.model");
   * tok.normalize("Hello  world"); // "▁Hello▁▁world"
   * ```
   */
  normalize(text: string): string {
    let s = toWellFormed(text);
    if (s.length === 0) return "";
    if (this.removeExtraWhitespaces) {
      s = s.replace(/^ +/, "").replace(/ {2,}/g, " ");
      if (s.length === 0) return "";
    }
    if (this.escapeWhitespaces) s = s.replaceAll(" ", SPACE_SYMBOL);
    if (this.addDummyPrefix) s = (this.escapeWhitespaces ? SPACE_SYMBOL : " ") + s;
    if (this.removeExtraWhitespaces) {
      const space = this.escapeWhitespaces ? SPACE_SYMBOL : " ";
      let end = s.length;
      while (end > 0 && s.startsWith(space, end - space.length)) end -= space.length;
      s = s.slice(0, end);
    }
    return s;
  }

  private encodeWithPipeline(text: string, p: TextPipeline, out: number[]): void {
    const s = toWellFormed(text);
    // Split the raw text around added tokens (leftmost match, longest first on equal starts).
    let pos = 0, segStart = 0;
    const emitSegment = (from: number, to: number) => {
      if (to <= from) return;
      const normalized = p.normalize(s.slice(from, to), from === 0);
      for (const word of p.split(normalized)) {
        if (word.length === 0) continue;
        const id = p.ignoreMerges ? this.mergeable.get(word) : undefined;
        if (id !== undefined) out.push(id);
        else this.bpeWords(word, out, p.fuseUnk ?? true);
      }
    };
    const atomic = p.atomic;
    while (pos < s.length && atomic.length > 0) {
      let best: TextPipeline["atomic"][number] | undefined, bestAt = -1;
      for (const a of atomic) {
        if (a.content.length === 0) continue;
        const at = s.indexOf(a.content, pos);
        if (at < 0) continue;
        if (bestAt < 0 || at < bestAt || (at === bestAt && a.content.length > best!.content.length)) {
          best = a;
          bestAt = at;
        }
      }
      if (!best) break;
      let segEnd = bestAt, next = bestAt + best.content.length;
      if (best.lstrip) { while (segEnd > segStart && /\s/.test(s[segEnd - 1])) segEnd--; }
      if (best.rstrip) { while (next < s.length && /\s/.test(s[next])) next++; }
      emitSegment(segStart, segEnd);
      out.push(best.id);
      pos = segStart = next;
    }
    emitSegment(segStart, s.length);
  }

  /** Grows the scratch buffers to hold `n` symbols. */
  private reserve(n: number): void {
    if (this.symId.length >= n) return;
    const size = Math.max(n, this.symId.length * 2);
    this.symId = new Int32Array(size);
    this.symStart = new Int32Array(size);
    this.symEnd = new Int32Array(size);
    this.symPrev = new Int32Array(size);
    this.symNext = new Int32Array(size);
    this.symFrozen = new Uint8Array(size);
  }

  /** Adds the candidate merge of adjacent symbols `left`, `right` when their pair is a rule. */
  private tryPair(left: number, right: number, rev: Map<number, [number, number]> | undefined): void {
    if (this.symFrozen[left] || this.symFrozen[right]) return;
    const a = this.symId[left], b = this.symId[right];
    if (a < 0 || b < 0) return;
    const m = this.pairs.find(a, b);
    if (m < 0) return;
    const c = this.candCount++;
    if (c >= this.candLeft.length) this.growCandidates();
    this.candLeft[c] = left;
    this.candRight[c] = right;
    this.candLeftId[c] = a;
    this.candRightId[c] = b;
    const merged = this.pairs.merged[m];
    this.candMerge[c] = merged;
    // SentencePiece splits UNUSED pieces back into the pair they were made from (its `rev_merge`).
    if (rev && this.types[merged] === PieceType.UNUSED) rev.set(merged, [a, b]);
    // Heap key: the rule's rank (0 = highest priority), then the leftmost pair (SentencePiece's
    // `SymbolPairComparator`); both fit exactly in one double.
    this.heapPush(this.pairs.rank[m] * 4294967296 + left, c);
  }

  private growCandidates(): void {
    const size = this.candLeft.length * 2;
    const grow = <T extends Int32Array | Float64Array>(a: T, make: (n: number) => T): T => {
      const b = make(size);
      b.set(a as never);
      return b;
    };
    this.candLeft = grow(this.candLeft, (k) => new Int32Array(k));
    this.candRight = grow(this.candRight, (k) => new Int32Array(k));
    this.candLeftId = grow(this.candLeftId, (k) => new Int32Array(k));
    this.candRightId = grow(this.candRightId, (k) => new Int32Array(k));
    this.candMerge = grow(this.candMerge, (k) => new Int32Array(k));
    this.heapKey = grow(this.heapKey, (k) => new Float64Array(k));
    this.heapCand = grow(this.heapCand, (k) => new Int32Array(k));
  }

  /** Binary min-heap of candidates by key. */
  private heapPush(key: number, c: number): void {
    const keys = this.heapKey, cands = this.heapCand;
    let i = this.heapSize++;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (keys[parent] <= key) break;
      keys[i] = keys[parent];
      cands[i] = cands[parent];
      i = parent;
    }
    keys[i] = key;
    cands[i] = c;
  }

  private heapPop(): number {
    const keys = this.heapKey, cands = this.heapCand;
    const top = cands[0];
    const size = --this.heapSize;
    const lastKey = keys[size], lastCand = cands[size];
    let i = 0;
    while (true) {
      let child = 2 * i + 1;
      if (child >= size) break;
      if (child + 1 < size && keys[child + 1] < keys[child]) child++;
      if (keys[child] >= lastKey) break;
      keys[i] = keys[child];
      cands[i] = cands[child];
      i = child;
    }
    keys[i] = lastKey;
    cands[i] = lastCand;
    return top;
  }

  /**
   * BPE over all of `s`, word by word when that gives the same result. A merge joins two adjacent symbols into a
   * vocabulary piece; when no piece has a `▁` right after another character (true of Llama's vocabularies, whose
   * pieces only start with `▁`), no merge ever crosses a position where a `▁` follows another character. The
   * text then falls apart into independent words at those positions, and each word's ids can be cached: SST-2
   * prompts repeat the template and most words, which makes encoding several times faster.
   */
  private bpeWords(s: string, out: number[], fuseUnk: boolean): void {
    if (!this.wordsIndependent) {
      this.bpe(s, 0, s.length, out, fuseUnk);
      return;
    }
    const cache = this.wordCache;
    let start = 0;
    for (let i = 1; i <= s.length; i++) {
      if (i < s.length && !(s.charCodeAt(i) === 0x2581 && s.charCodeAt(i - 1) !== 0x2581)) continue;
      const word = s.slice(start, i);
      let ids = cache.get(word);
      if (ids === undefined) {
        ids = [];
        this.bpe(s, start, i, ids, fuseUnk);
        if (cache.size >= WORD_CACHE_SIZE) cache.clear();
        if (word.length <= 64) cache.set(word, ids);
      }
      for (let k = 0; k < ids.length; k++) out.push(ids[k]);
      start = i;
    }
  }

  /** BPE over `s[start, end)`, appending ids to `out`. */
  private bpe(s: string, start: number, end: number, out: number[], fuseUnk: boolean): void {
    this.reserve(end - start);
    const { symId, symStart, symEnd, symPrev, symNext, symFrozen } = this;
    // 1. Split into symbols: user-defined pieces whole (frozen), otherwise one code point each.
    let n = 0;
    for (let i = start; i < end;) {
      let id = UNKNOWN_CHAR, len = 1, frozen = 0;
      const c = s.charCodeAt(i);
      const candidates = this.userDefined.size > 0 ? this.userDefined.get(c) : undefined;
      if (candidates) {
        for (const u of candidates) {
          if (u.text.length <= end - i && s.startsWith(u.text, i)) {
            id = u.id;
            len = u.text.length;
            frozen = 1;
            break;
          }
        }
      }
      if (!frozen) {
        let cp = c;
        if (c >= 0xd800 && c < 0xdc00 && i + 1 < end) {
          const d = s.charCodeAt(i + 1);
          if (d >= 0xdc00 && d < 0xe000) {
            cp = 0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00);
            len = 2;
          }
        }
        id = this.charIds.get(cp) ?? UNKNOWN_CHAR;
      }
      symId[n] = id;
      symStart[n] = i;
      symEnd[n] = i + len;
      symFrozen[n] = frozen;
      symPrev[n] = n - 1;
      symNext[n] = n + 1;
      n++;
      i += len;
    }
    if (n === 0) return;
    symNext[n - 1] = -1;

    // 2. Merge the best adjacent pair until none is a rule.
    const rev = this.hasUnused ? new Map<number, [number, number]>() : undefined;
    this.heapSize = 0;
    this.candCount = 0;
    for (let i = 0; i + 1 < n; i++) this.tryPair(i, i + 1, rev);
    while (this.heapSize > 0) {
      const c = this.heapPop();
      const left = this.candLeft[c], right = this.candRight[c];
      // Stale candidate: one side has been merged away or grown since it was queued.
      if (this.symId[left] !== this.candLeftId[c] || this.symId[right] !== this.candRightId[c]) continue;
      this.symId[left] = this.candMerge[c];
      this.symEnd[left] = this.symEnd[right];
      const after = this.symNext[right];
      this.symNext[left] = after;
      if (after >= 0) this.symPrev[after] = left;
      this.symId[right] = ERASED;
      const before = this.symPrev[left];
      if (before >= 0) this.tryPair(before, left, rev);
      if (after >= 0) this.tryPair(left, after, rev);
    }

    // 3. Emit ids; symbols that are not pieces fall back to bytes or <unk>.
    let prevUnk = false;
    for (let i = 0; i >= 0; i = this.symNext[i]) {
      const id = this.symId[i];
      if (id >= 0 && id < this.vocabSize) {
        if (rev && this.types[id] === PieceType.UNUSED) this.resegment(id, rev, out);
        else out.push(id);
        prevUnk = false;
        continue;
      }
      const text = s.slice(this.symStart[i], this.symEnd[i]);
      const reservedId = this.reserved.get(text);
      if (reservedId !== undefined && this.types[reservedId] !== PieceType.UNKNOWN) {
        out.push(reservedId);
        prevUnk = false;
      } else if (this.byteFallback && this.pushBytes(text, out)) {
        prevUnk = false;
      } else {
        if (this.unkId < 0) {
          throw new Error(`encode: "${text}" is not in the vocabulary and the tokenizer has no <unk> piece`);
        }
        if (!(prevUnk && fuseUnk)) out.push(this.unkId);
        prevUnk = true;
      }
    }
  }

  /** Appends the `<0xXX>` ids of the UTF-8 bytes of `text`; false (nothing appended) when a byte piece is missing. */
  private pushBytes(text: string, out: number[]): boolean {
    const bytes = utf8Encoder.encode(text);
    for (const b of bytes) if (this.byteIds[b] < 0) return false;
    for (const b of bytes) out.push(this.byteIds[b]);
    return true;
  }

  private resegment(id: number, rev: Map<number, [number, number]>, out: number[]): void {
    const split = this.types[id] === PieceType.UNUSED ? rev.get(id) : undefined;
    if (!split) {
      out.push(id);
      return;
    }
    for (const part of split) {
      if (part < this.vocabSize) this.resegment(part, rev, out);
      else this.pushBytes(this.charOfExtraId(part), out) || out.push(this.unkId);
    }
  }

  private charOfExtraId(symbol: number): string {
    for (const [cp, id] of this.charIds) if (id === symbol) return String.fromCodePoint(cp);
    return "";
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Decoding

  /**
   * Ids → text, as SentencePiece decodes: control tokens (BOS, EOS, pad) are skipped, byte tokens are joined and
   * read as UTF-8 (an invalid byte becomes U+FFFD), `▁` becomes a space, and the space of the dummy prefix is
   * dropped from the first piece.
   *
   * @throws RangeError when an id is not an integer in 0..vocabSize-1
   * @example
   * ```ts
   * import { Tokenizer } from "./tokenizer.ts";
   * const tok = await Tokenizer.load("tokenizer.model");
   * tok.decode([1, 15043, 3186, 2]); // "Hello world"
   * ```
   */
  decode(ids: ArrayLike<number>): string {
    const stream = this.decoder();
    let text = "";
    for (let i = 0; i < ids.length; i++) text += stream.pushAt(ids[i], i);
    return text + stream.flush();
  }

  /**
   * A streaming decoder for generation: `push(id)` returns the text the id adds, so printing each result shows
   * the same text as {@link decode} of all ids so far. Byte tokens that split a UTF-8 character return "" until
   * the character is complete.
   *
   * @example
   * ```ts
   * import { Tokenizer } from "./tokenizer.ts";
   * const tok = await Tokenizer.load("tokenizer.model");
   * const stream = tok.decodeStream();
   * let text = "";
   * for (const id of tok.encode("naïve 😀")) text += stream.push(id);
   * text += stream.flush(); // "naïve 😀"
   * ```
   */
  decodeStream(): DecodeStream {
    const { push, flush } = this.decoder();
    return { push, flush };
  }

  private decoder(): DecodeStream & { pushAt(id: number, index: number): string } {
    // State of SentencePiece's decoder: pending byte pieces, whether any text was produced, and whether the
    // leading `▁` of the dummy prefix may still be dropped.
    const pending: number[] = [];
    let producedText = false, bosWsSeen = false, isBosWs = true;
    let count = 0;
    const stripPrefix = this.addDummyPrefix || this.removeExtraWhitespaces;
    const emit = (s: string) => {
      if (s.length > 0) producedText = true;
      return s;
    };
    const pushAt = (id: number, index: number): string => {
      count++;
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
        throw new RangeError(
          `decode: id ${id} at position ${index} is out of range: the vocabulary has ${this.vocabSize} ids ` +
            `(0..${this.vocabSize - 1})`,
        );
      }
      const byte = this.byteValue[id];
      if (byte >= 0) {
        pending.push(byte);
        return emit(drainUtf8(pending, false));
      }
      let text = emit(drainUtf8(pending, true));
      if (bosWsSeen || producedText) isBosWs = false;
      const type = this.types[id];
      if (type === PieceType.CONTROL) {
        bosWsSeen = false;
        return text;
      }
      if (type === PieceType.UNKNOWN) {
        bosWsSeen = false;
        return text + emit(this.unkSurface);
      }
      let piece = this.pieces[id];
      bosWsSeen = false;
      if (isBosWs && stripPrefix && piece.startsWith(SPACE_SYMBOL)) {
        piece = piece.slice(SPACE_SYMBOL.length);
        bosWsSeen = true;
      }
      text += emit(piece.replaceAll(SPACE_SYMBOL, " "));
      return text;
    };
    return {
      push: (id: number) => pushAt(id, count),
      pushAt,
      flush: () => emit(drainUtf8(pending, true)),
    };
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Vocabulary

  /**
   * The piece of an id, e.g. `▁Hello` or `<0x0A>`.
   *
   * @example
   * ```ts
   * import { Tokenizer } from "./tokenizer.ts";
   * const tok = await Tokenizer.load("tokenizer.model");
   * tok.idToPiece(15043); // "▁Hello"
   * ```
   */
  idToPiece(id: number): string {
    if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
      throw new RangeError(`idToPiece: id ${id} is out of range (0..${this.vocabSize - 1})`);
    }
    return this.pieces[id];
  }

  /**
   * The id of a piece, or -1 when the vocabulary has no such piece.
   *
   * @example
   * ```ts
   * import { Tokenizer } from "./tokenizer.ts";
   * const tok = await Tokenizer.load("tokenizer.model");
   * tok.pieceToId("▁Hello"); // 15043
   * ```
   */
  pieceToId(piece: string): number {
    return this.allIndex.get(piece) ?? -1;
  }

  /**
   * The score of an id (SentencePiece merge priority; 0 for tokenizers read from `tokenizer.json`).
   *
   * @example
   * ```ts
   * import { Tokenizer } from "./tokenizer.ts";
   * const tok = await Tokenizer.load("tokenizer.model");
   * tok.score(tok.pieceToId("▁t")); // -1
   * ```
   */
  score(id: number): number {
    this.idToPiece(id);
    return this.scores[id];
  }

  /**
   * The {@link PieceType} of an id.
   *
   * @example
   * ```ts
   * import { PieceType, Tokenizer } from "./tokenizer.ts";
   * const tok = await Tokenizer.load("tokenizer.model");
   * tok.pieceType(tok.bosId) === PieceType.CONTROL; // true
   * ```
   */
  pieceType(id: number): number {
    this.idToPiece(id);
    return this.types[id];
  }
}

/**
 * Merge rules keyed by a pair of symbol ids, in typed arrays with linear probing: several times faster than a
 * `Map` with numeric keys on the hot path of encoding. When two rules name the same pair, the first one wins.
 */
class PairTable {
  readonly left: Int32Array;
  readonly right: Int32Array;
  readonly merged: Int32Array;
  readonly priority: Float64Array;
  /** Rank of each rule's priority: 0 for the highest; equal priorities share a rank. */
  readonly rank: Float64Array;
  private readonly mask: number;

  /** @param rules flat (left, right, merged, priority) quadruples, highest-priority duplicates first */
  constructor(rules: number[]) {
    let capacity = 16;
    while (capacity < rules.length / 2) capacity *= 2; // load factor <= 1/2
    this.mask = capacity - 1;
    this.left = new Int32Array(capacity).fill(-1);
    this.right = new Int32Array(capacity);
    this.merged = new Int32Array(capacity);
    this.priority = new Float64Array(capacity);
    for (let r = 0; r < rules.length; r += 4) {
      const a = rules[r], b = rules[r + 1];
      let slot = this.hash(a, b);
      while (this.left[slot] >= 0 && !(this.left[slot] === a && this.right[slot] === b)) slot = (slot + 1) & this.mask;
      if (this.left[slot] >= 0) continue;
      this.left[slot] = a;
      this.right[slot] = b;
      this.merged[slot] = rules[r + 2];
      this.priority[slot] = rules[r + 3];
    }
    const used = Array.from({ length: capacity }, (_, i) => i).filter((i) => this.left[i] >= 0);
    used.sort((x, y) => this.priority[y] - this.priority[x]);
    this.rank = new Float64Array(capacity);
    let rank = 0;
    used.forEach((slot, k) => {
      if (k > 0 && this.priority[slot] !== this.priority[used[k - 1]]) rank++;
      this.rank[slot] = rank;
    });
  }

  private hash(a: number, b: number): number {
    let h = Math.imul(a, 0x9e3779b1) ^ Math.imul(b + 0x7f4a7c15, 0x85ebca77);
    h ^= h >>> 15;
    return h & this.mask;
  }

  /** The slot of rule (a, b), or -1 when there is none. */
  find(a: number, b: number): number {
    let slot = this.hash(a, b);
    while (true) {
      const l = this.left[slot];
      if (l < 0) return -1;
      if (l === a && this.right[slot] === b) return slot;
      slot = (slot + 1) & this.mask;
    }
  }
}

// -----------------------------------------------------------------------------------------------------------------
// UTF-8 helpers

const utf8Encoder = new TextEncoder();

function isHighSurrogate(c: number): boolean {
  return c >= 0xd800 && c < 0xdc00;
}

function isLowSurrogate(c: number): boolean {
  return c >= 0xdc00 && c < 0xe000;
}

/** True when `s` is exactly one Unicode code point. */
function isOneCodePoint(s: string): boolean {
  return s.length === 1 || (s.length === 2 && isHighSurrogate(s.charCodeAt(0)) && isLowSurrogate(s.charCodeAt(1)));
}

function toWellFormed(s: string): string {
  // deno-lint-ignore no-explicit-any
  const f = (s as any).toWellFormed;
  return typeof f === "function" ? f.call(s) : s;
}

/**
 * Length of the UTF-8 sequence at `bytes[i]`: > 0 for a valid character, -1 when the first byte cannot start a
 * valid character (SentencePiece then emits U+FFFD for that one byte), 0 when the bytes so far are a valid prefix
 * but the sequence is incomplete.
 */
function utf8SequenceLength(bytes: number[], i: number): number {
  const b0 = bytes[i];
  if (b0 < 0x80) return 1;
  let len: number, lo = 0x80, hi = 0xbf;
  if (b0 >= 0xc2 && b0 <= 0xdf) len = 2;
  else if (b0 >= 0xe0 && b0 <= 0xef) {
    len = 3;
    if (b0 === 0xe0) lo = 0xa0; // no overlong forms
    if (b0 === 0xed) hi = 0x9f; // no surrogates
  } else if (b0 >= 0xf0 && b0 <= 0xf4) {
    len = 4;
    if (b0 === 0xf0) lo = 0x90;
    if (b0 === 0xf4) hi = 0x8f; // nothing above U+10FFFF
  } else return -1;
  for (let k = 1; k < len; k++) {
    if (i + k >= bytes.length) return 0;
    const b = bytes[i + k];
    if (k === 1 ? b < lo || b > hi : b < 0x80 || b > 0xbf) return -1;
  }
  return len;
}

/**
 * Decodes the complete characters at the front of `pending` and removes them. With `final`, an incomplete tail
 * also becomes U+FFFD per byte; without it, the tail stays for the next byte.
 */
function drainUtf8(pending: number[], final: boolean): string {
  if (pending.length === 0) return "";
  let out = "", i = 0;
  while (i < pending.length) {
    const len = utf8SequenceLength(pending, i);
    if (len === 0 && !final) break;
    if (len <= 0) {
      out += "\uFFFD";
      i += 1;
      continue;
    }
    let cp: number;
    const b0 = pending[i];
    if (len === 1) cp = b0;
    else if (len === 2) cp = ((b0 & 0x1f) << 6) | (pending[i + 1] & 0x3f);
    else if (len === 3) cp = ((b0 & 0x0f) << 12) | ((pending[i + 1] & 0x3f) << 6) | (pending[i + 2] & 0x3f);
    else {
      cp = ((b0 & 0x07) << 18) | ((pending[i + 1] & 0x3f) << 12) | ((pending[i + 2] & 0x3f) << 6) |
        (pending[i + 3] & 0x3f);
    }
    out += String.fromCodePoint(cp);
    i += len;
  }
  pending.splice(0, i);
  return out;
}

// -----------------------------------------------------------------------------------------------------------------
// Hugging Face tokenizer.json

// deno-lint-ignore no-explicit-any
type Json = any;

function fromHuggingFaceJson(json: string, what: string): Tokenizer {
  let root: Json;
  try {
    root = JSON.parse(json);
  } catch (e) {
    throw new Error(`${what}: not valid JSON (${(e as Error).message})`);
  }
  const model = root?.model;
  if (!model || typeof model !== "object" || typeof model.vocab !== "object" || model.vocab === null) {
    throw new Error(`${what}: not a Hugging Face tokenizer.json (no "model.vocab")`);
  }
  if (model.type !== undefined && model.type !== "BPE") {
    throw new Error(`${what}: model type ${model.type} is not supported; only BPE (Llama-style) tokenizers are`);
  }
  if (model.continuing_subword_prefix || model.end_of_word_suffix) {
    throw new Error(`${what}: BPE with continuing_subword_prefix / end_of_word_suffix is not supported`);
  }
  const pretok = root.pre_tokenizer;
  if (JSON.stringify(pretok ?? null).includes('"ByteLevel"')) {
    throw new Error(
      `${what}: byte-level BPE (GPT-2 / Llama-3 style) is not supported; only SentencePiece-style BPE is`,
    );
  }

  // Vocabulary: model.vocab plus added tokens.
  const pieces: string[] = [];
  const setPiece = (piece: string, id: number) => {
    if (!Number.isInteger(id) || id < 0 || id > 10_000_000) throw new Error(`${what}: invalid id ${id} for "${piece}"`);
    pieces[id] = piece;
  };
  for (const [piece, id] of Object.entries(model.vocab as Record<string, number>)) setPiece(piece, id);
  const added: { id: number; content: string; special: boolean; lstrip: boolean; rstrip: boolean }[] = [];
  for (const t of (root.added_tokens ?? []) as Json[]) {
    if (typeof t?.content !== "string" || typeof t?.id !== "number") {
      throw new Error(`${what}: malformed entry in added_tokens: ${JSON.stringify(t)}`);
    }
    setPiece(t.content, t.id);
    added.push({ id: t.id, content: t.content, special: !!t.special, lstrip: !!t.lstrip, rstrip: !!t.rstrip });
  }
  for (let i = 0; i < pieces.length; i++) {
    if (pieces[i] === undefined) {
      throw new Error(`${what}: the vocabulary has no token with id ${i} (ids must be 0..n-1)`);
    }
  }

  const byteFallback = !!model.byte_fallback;
  const unkToken: string | undefined = model.unk_token ?? undefined;
  const types = new Array<number>(pieces.length).fill(PieceType.NORMAL);
  if (byteFallback) pieces.forEach((p, i) => BYTE_PIECE.test(p) && (types[i] = PieceType.BYTE));
  for (const a of added) types[a.id] = a.special ? PieceType.CONTROL : PieceType.USER_DEFINED;
  const findId = (...names: string[]) => {
    for (const name of names) {
      const id = pieces.indexOf(name);
      if (id >= 0) return id;
    }
    return -1;
  };
  const unkId = unkToken !== undefined ? pieces.indexOf(unkToken) : -1;
  if (unkId >= 0) types[unkId] = PieceType.UNKNOWN;

  // BOS: the first special token of the post-processor's single template, else a conventional name.
  let bosId = -1;
  const single = root.post_processor?.single;
  if (Array.isArray(single) && single[0]?.SpecialToken) bosId = pieces.indexOf(single[0].SpecialToken.id);
  if (bosId < 0) bosId = findId("<s>", "<bos>", "<|begin_of_text|>");
  const eosId = findId("</s>", "<eos>", "<|end_of_text|>");
  const padId = findId("<pad>", "[PAD]");

  const merges: [string, string][] = ((model.merges ?? []) as Json[]).map((m, i) => {
    if (typeof m === "string") {
      const at = m.indexOf(" ", 1);
      if (at < 0) throw new Error(`${what}: merge ${i} "${m}" is not two tokens separated by a space`);
      return [m.slice(0, at), m.slice(at + 1)];
    }
    if (Array.isArray(m) && m.length === 2) return [String(m[0]), String(m[1])];
    throw new Error(`${what}: merge ${i} is neither "a b" nor ["a", "b"]: ${JSON.stringify(m)}`);
  });

  const normalizers = flattenSteps(root.normalizer, "normalizers");
  const preTokenizers = flattenSteps(pretok, "pretokenizers");
  let addDummyPrefix = false;
  const normSteps: ((s: string, first: boolean) => string)[] = [];
  for (const n of normalizers) {
    switch (n.type) {
      case "Prepend":
        addDummyPrefix = true;
        normSteps.push((s) => (s.length > 0 ? n.prepend + s : s));
        break;
      case "Replace": {
        const pattern = n.pattern?.String !== undefined ? n.pattern.String : new RegExp(n.pattern?.Regex, "gu");
        normSteps.push((s) => s.replaceAll(pattern, n.content));
        break;
      }
      case "NFC":
      case "NFD":
      case "NFKC":
      case "NFKD":
        normSteps.push((s) => s.normalize(n.type));
        break;
      case "Lowercase":
        normSteps.push((s) => s.toLowerCase());
        break;
      case "Strip":
        normSteps.push((s) => {
          if (n.strip_left ?? true) s = s.replace(/^\s+/u, "");
          if (n.strip_right ?? true) s = s.replace(/\s+$/u, "");
          return s;
        });
        break;
      default:
        throw new Error(`${what}: normalizer ${n.type} is not supported`);
    }
  }
  let split = (s: string): string[] => [s];
  for (const p of preTokenizers) {
    if (p.type !== "Metaspace") throw new Error(`${what}: pre-tokenizer ${p.type} is not supported`);
    const replacement: string = p.replacement ?? SPACE_SYMBOL;
    const scheme: string = p.prepend_scheme ?? (p.add_prefix_space === false ? "never" : "always");
    if (scheme !== "never") addDummyPrefix = true;
    normSteps.push((s, first) => {
      s = s.replaceAll(" ", replacement);
      const prepend = scheme === "always" || (scheme === "first" && first);
      return prepend && s.length > 0 && !s.startsWith(replacement) ? replacement + s : s;
    });
    if (p.split ?? true) {
      // Split before every replacement character, keeping it with the word that follows (MergedWithNext).
      split = (s) => s.split(new RegExp(`(?=${escapeRegExp(replacement)})`, "u")).filter((w) => w.length > 0);
    }
  }

  const pipeline: TextPipeline = {
    atomic: added.map((a) => ({ content: a.content, id: a.id, lstrip: a.lstrip, rstrip: a.rstrip })),
    normalize: (s, first) => normSteps.reduce((acc, f) => f(acc, first), s),
    split,
    ignoreMerges: !!model.ignore_merges,
    fuseUnk: !!model.fuse_unk,
  };
  return new Tokenizer({
    pieces,
    types,
    merges,
    bosId,
    eosId,
    padId,
    unkId,
    byteFallback,
    addDummyPrefix,
    pipeline,
  });
}

/** A normalizer/pre-tokenizer, or a `Sequence` of them, as a flat list. */
function flattenSteps(node: Json, key: string): Json[] {
  if (node === null || node === undefined) return [];
  if (node.type === "Sequence") return (node[key] ?? []).flatMap((n: Json) => flattenSteps(n, key));
  return [node];
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
