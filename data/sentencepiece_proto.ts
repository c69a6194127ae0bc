/**
 * A reader for SentencePiece's `tokenizer.model` files: the `ModelProto` protobuf message of
 * `sentencepiece_model.proto`, decoded by hand so the library needs no protobuf dependency.
 *
 * Only the fields a BPE tokenizer needs are kept; every other field is skipped by its wire type, so models written
 * by newer SentencePiece versions (with fields this reader does not know) still load. Field numbers:
 *
 * | message | field (number) |
 * |---|---|
 * | `ModelProto` | `pieces` (1, repeated `SentencePiece`), `trainer_spec` (2), `normalizer_spec` (3), `self_test_data` (4), `denormalizer_spec` (5) |
 * | `SentencePiece` | `piece` (1, string), `score` (2, float), `type` (3, enum, default NORMAL) |
 * | `TrainerSpec` | `model_type` (3, default UNIGRAM), `vocab_size` (4), `byte_fallback` (35), `unk_id` (40, default 0), `bos_id` (41, default 1), `eos_id` (42, default 2), `pad_id` (43, default -1), `unk_surface` (44, default " ⁇ ") |
 * | `NormalizerSpec` | `name` (1), `precompiled_charsmap` (2, bytes), `add_dummy_prefix` (3, default true), `remove_extra_whitespaces` (4, default true), `escape_whitespaces` (5, default true) |
 *
 * @example
 * ```ts
 * import { parseSentencePieceModel } from "./sentencepiece_proto.ts";
 * const model = parseSentencePieceModel(await Deno.readFile("tokenizer.model"));
 * console.log(model.pieces.length, model.trainerSpec.modelType); // 32000 2 (BPE)
 * ```
 * @module
 */

/** `SentencePiece.Type` values. */
export const PieceType = {
  NORMAL: 1,
  UNKNOWN: 2,
  CONTROL: 3,
  USER_DEFINED: 4,
  UNUSED: 5,
  BYTE: 6,
} as const;

/** `TrainerSpec.ModelType` values. */
export const ModelType = { UNIGRAM: 1, BPE: 2, WORD: 3, CHAR: 4 } as const;

/** One vocabulary entry of a SentencePiece model. */
export interface SentencePieceEntry {
  /** The piece text, with `▁` (U+2581) standing for a space. */
  piece: string;
  /** Merge score (BPE: higher merges first) or log-probability (unigram). */
  score: number;
  /** A {@link PieceType} value. */
  type: number;
}

/** The trainer settings that matter when encoding. */
export interface TrainerSpec {
  /** A {@link ModelType} value. */
  modelType: number;
  vocabSize: number;
  byteFallback: boolean;
  unkId: number;
  bosId: number;
  eosId: number;
  padId: number;
  /** What `<unk>` decodes to (SentencePiece's default is " ⁇ "). */
  unkSurface: string;
}

/** The text normalization settings. */
export interface NormalizerSpec {
  /** Rule name, e.g. `identity` or `nmt_nfkc`. */
  name: string;
  /** The compiled normalization table; empty for the identity normalizer. */
  precompiledCharsmap: Uint8Array;
  addDummyPrefix: boolean;
  removeExtraWhitespaces: boolean;
  escapeWhitespaces: boolean;
}

/** A decoded `ModelProto`. */
export interface SentencePieceModel {
  pieces: SentencePieceEntry[];
  trainerSpec: TrainerSpec;
  normalizerSpec: NormalizerSpec;
}

/** Wire types of the protobuf encoding. */
const VARINT = 0, I64 = 1, LEN = 2, I32 = 5;

/** A cursor over protobuf bytes; every read checks the bounds so a truncated file fails with a clear message. */
class ProtoReader {
  pos: number;
  private view: DataView;
  constructor(readonly bytes: Uint8Array, start: number, readonly end: number, readonly what: string) {
    this.pos = start;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  private truncated(): never {
    throw new Error(
      `${this.what}: the SentencePiece model is truncated or not a SentencePiece model (ran past the end at byte ${this.pos})`,
    );
  }

  /** An unsigned varint as a JS number (exact up to 2^53; larger values only appear in fields we skip). */
  varint(): number {
    let result = 0, mul = 1;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.end) this.truncated();
      const b = this.bytes[this.pos++];
      result += (b & 0x7f) * mul;
      if (b < 0x80) return result;
      mul *= 128;
    }
    throw new Error(`${this.what}: malformed varint at byte ${this.pos}`);
  }

  /** An `int32` field: negative values are sign-extended to 64 bits on the wire, so keep only the low 32 bits. */
  int32(): number {
    let lo = 0;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.end) this.truncated();
      const b = this.bytes[this.pos++];
      if (i < 5) lo |= (b & 0x7f) << (7 * i);
      if (b < 0x80) return lo | 0;
    }
    throw new Error(`${this.what}: malformed varint at byte ${this.pos}`);
  }

  float(): number {
    if (this.pos + 4 > this.end) this.truncated();
    const v = this.view.getFloat32(this.pos, true);
    this.pos += 4;
    return v;
  }

  /** The bounds of a length-delimited field. */
  lengthDelimited(): [number, number] {
    const len = this.varint();
    const start = this.pos;
    if (start + len > this.end) this.truncated();
    this.pos = start + len;
    return [start, start + len];
  }

  string(): string {
    const [s, e] = this.lengthDelimited();
    return utf8.decode(this.bytes.subarray(s, e));
  }

  skip(wireType: number): void {
    if (wireType === VARINT) this.varint();
    else if (wireType === I64) this.pos += 8;
    else if (wireType === LEN) this.lengthDelimited();
    else if (wireType === I32) this.pos += 4;
    else throw new Error(`${this.what}: unsupported protobuf wire type ${wireType} at byte ${this.pos}`);
    if (this.pos > this.end) this.truncated();
  }
}

const utf8 = new TextDecoder("utf-8", { ignoreBOM: true });

/**
 * Decodes a SentencePiece `tokenizer.model` file. Fields not listed in the module table are skipped.
 *
 * @param bytes the file contents
 * @param what a name for error messages (usually the path)
 * @throws when the bytes are truncated or are not a protobuf `ModelProto` with pieces
 *
 * @example
 * ```ts
 * import { parseSentencePieceModel } from "./sentencepiece_proto.ts";
 * const { pieces, normalizerSpec } = parseSentencePieceModel(await Deno.readFile("tok512.model"));
 * console.log(pieces[1].piece, normalizerSpec.addDummyPrefix); // "<s>" true
 * ```
 */
export function parseSentencePieceModel(bytes: Uint8Array, what = "tokenizer.model"): SentencePieceModel {
  const r = new ProtoReader(bytes, 0, bytes.length, what);
  const pieces: SentencePieceEntry[] = [];
  const trainerSpec: TrainerSpec = {
    modelType: ModelType.UNIGRAM,
    vocabSize: 8000,
    byteFallback: false,
    unkId: 0,
    bosId: 1,
    eosId: 2,
    padId: -1,
    unkSurface: " \u2047 ",
  };
  const normalizerSpec: NormalizerSpec = {
    name: "",
    precompiledCharsmap: new Uint8Array(0),
    addDummyPrefix: true,
    removeExtraWhitespaces: true,
    escapeWhitespaces: true,
  };
  while (r.pos < r.end) {
    const tag = r.varint();
    const field = Math.floor(tag / 8), wire = tag & 7;
    if (field === 1 && wire === LEN) pieces.push(readPiece(r));
    else if (field === 2 && wire === LEN) readTrainerSpec(r, trainerSpec);
    else if (field === 3 && wire === LEN) readNormalizerSpec(r, normalizerSpec);
    else if (field === 0) throw new Error(`${what}: not a SentencePiece model (invalid protobuf tag at byte ${r.pos})`);
    else r.skip(wire);
  }
  if (pieces.length === 0) throw new Error(`${what}: not a SentencePiece model (it has no pieces)`);
  return { pieces, trainerSpec, normalizerSpec };
}

function readPiece(r: ProtoReader): SentencePieceEntry {
  const [start, end] = r.lengthDelimited();
  const after = r.pos;
  const m = new ProtoReader(r.bytes, start, end, r.what);
  const entry: SentencePieceEntry = { piece: "", score: 0, type: PieceType.NORMAL };
  while (m.pos < m.end) {
    const tag = m.varint();
    const field = Math.floor(tag / 8), wire = tag & 7;
    if (field === 1 && wire === LEN) entry.piece = m.string();
    else if (field === 2 && wire === I32) entry.score = m.float();
    else if (field === 3 && wire === VARINT) entry.type = m.int32();
    else m.skip(wire);
  }
  r.pos = after;
  return entry;
}

function readTrainerSpec(r: ProtoReader, spec: TrainerSpec): void {
  const [start, end] = r.lengthDelimited();
  const after = r.pos;
  const m = new ProtoReader(r.bytes, start, end, r.what);
  while (m.pos < m.end) {
    const tag = m.varint();
    const field = Math.floor(tag / 8), wire = tag & 7;
    if (wire === VARINT && field === 3) spec.modelType = m.int32();
    else if (wire === VARINT && field === 4) spec.vocabSize = m.int32();
    else if (wire === VARINT && field === 35) spec.byteFallback = m.varint() !== 0;
    else if (wire === VARINT && field === 40) spec.unkId = m.int32();
    else if (wire === VARINT && field === 41) spec.bosId = m.int32();
    else if (wire === VARINT && field === 42) spec.eosId = m.int32();
    else if (wire === VARINT && field === 43) spec.padId = m.int32();
    else if (wire === LEN && field === 44) spec.unkSurface = m.string();
    else m.skip(wire);
  }
  r.pos = after;
}

function readNormalizerSpec(r: ProtoReader, spec: NormalizerSpec): void {
  const [start, end] = r.lengthDelimited();
  const after = r.pos;
  const m = new ProtoReader(r.bytes, start, end, r.what);
  while (m.pos < m.end) {
    const tag = m.varint();
    const field = Math.floor(tag / 8), wire = tag & 7;
    if (wire === LEN && field === 1) spec.name = m.string();
    else if (wire === LEN && field === 2) {
      const [s, e] = m.lengthDelimited();
      spec.precompiledCharsmap = m.bytes.slice(s, e);
    } else if (wire === VARINT && field === 3) spec.addDummyPrefix = m.varint() !== 0;
    else if (wire === VARINT && field === 4) spec.removeExtraWhitespaces = m.varint() !== 0;
    else if (wire === VARINT && field === 5) spec.escapeWhitespaces = m.varint() !== 0;
    else m.skip(wire);
  }
  r.pos = after;
}
