/**
 * Reading and writing Hugging Face safetensors files.
 *
 * The format: an 8-byte little-endian u64 `N`, then `N` bytes of UTF-8 JSON, then the data area. The JSON maps
 * each tensor name to `{ dtype, shape, data_offsets: [begin, end] }` (offsets into the data area, row-major,
 * little-endian), plus an optional `"__metadata__"` map of strings to strings.
 *
 * Reading from a path touches only the bytes asked for: the header alone, or one tensor's byte range (converted in
 * chunks when a conversion is asked for), so a 7B shard never sits in memory twice. Reading from bytes (a browser
 * `fetch`, say) works the same way. Writing produces exactly the bytes the Python `safetensors` library writes for
 * the same tensors: tensors ordered by descending dtype then by name, header padded with spaces to 8 bytes.
 *
 * @example
 * ```ts
 * import { loadSafetensors, readSafetensorsHeader, readTensorData, saveSafetensors } from "./safetensors.ts";
 * await saveSafetensors("/tmp/w.safetensors", {
 *   "w": { dtype: "F32", shape: [2, 2], data: new Float32Array([1, 2, 3, 4]) },
 * }, { format: "pt" });
 * const header = await readSafetensorsHeader("/tmp/w.safetensors");
 * const w = await readTensorData("/tmp/w.safetensors", header.entries[0], { as: "f16" }); // Uint16Array of f16 bits
 * const all = await loadSafetensors("/tmp/w.safetensors"); // Map { "w" => { dtype: "F32", shape: [2, 2], data } }
 * ```
 * @module
 */

import { bf16ArrayToF16, bf16ArrayToF32, f16ArrayToF32, f32ArrayToF16, f32ToF16Bits } from "./half.ts";
import { fileSize, readRange, writeBytes } from "./platform.ts";

/** Element types of the safetensors format that webtune reads and writes. */
export type SafetensorsDtype =
  | "F64"
  | "F32"
  | "F16"
  | "BF16"
  | "I64"
  | "I32"
  | "I16"
  | "I8"
  | "U64"
  | "U32"
  | "U16"
  | "U8"
  | "BOOL"
  | "F8_E5M2"
  | "F8_E4M3"
  | "F8_E8M0"
  | "F8_E4M3FNUZ"
  | "F8_E5M2FNUZ";

/** The typed arrays tensor data comes in. Float16 and bfloat16 travel as their raw bits in a `Uint16Array`. */
export type TensorData =
  | Float64Array
  | Float32Array
  | Uint16Array
  | BigInt64Array
  | BigUint64Array
  | Int32Array
  | Uint32Array
  | Int16Array
  | Int8Array
  | Uint8Array;

/** One tensor's entry in a header. `begin`/`end` are absolute byte offsets in the file (end exclusive). */
export interface SafetensorsEntry {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  begin: number;
  end: number;
}

/** A parsed safetensors header. */
export interface SafetensorsHeader {
  /** Where it came from (a path, or a description of the bytes), for messages. */
  source: string;
  /** `N`: the length of the JSON header in bytes, padding included. */
  headerLength: number;
  /** Absolute offset of the data area (`8 + N`). */
  dataStart: number;
  /** Size of the whole file in bytes. */
  fileSize: number;
  /** The tensors, in file order (by offset). */
  entries: SafetensorsEntry[];
  /** The same entries, by name. */
  byName: Map<string, SafetensorsEntry>;
  /** The `__metadata__` map; `{}` when the file has none. */
  metadata: Record<string, string>;
}

/** What `readTensorData` returns: a float32 array, float16 bits, int32, or the file's own element type. */
export type ReadAs = "f32" | "f16" | "i32" | "native";

/** Options for `readTensorData` and `loadSafetensors`. */
export interface ReadOptions {
  /**
   * `"f32"` → Float32Array (from any numeric dtype), `"f16"` → Uint16Array of float16 bits (correctly rounded from
   * F32/F64/BF16/integers), `"i32"` → Int32Array (from integer dtypes; I64/U64/U32 values outside the int32 range
   * throw), `"native"` (default) → the typed array of the file's dtype (see `nativeArrayName`).
   */
  as?: ReadAs;
  /**
   * Reading from bytes, a result that needs no conversion is a view into those bytes when its offset is aligned
   * (no copy). `copy: true` always returns fresh memory. Reads from a path always return fresh memory.
   */
  copy?: boolean;
  /** Reading a file with a conversion, the bytes read per step (default 64 MiB): bounds the temporary memory. */
  chunkBytes?: number;
}

/** A tensor held in memory: its dtype (describing `data`), shape and data. */
export interface LoadedTensor {
  dtype: SafetensorsDtype;
  shape: number[];
  data: TensorData;
}

/** A tensor to write. `data` is the dtype's native typed array (I64 also takes an Int32Array, sign-extended). */
export interface TensorToSave {
  dtype: SafetensorsDtype;
  shape: readonly number[];
  data: TensorData;
}

/** The largest header the reference implementation accepts (100 MB). */
export const MAX_HEADER_BYTES = 100_000_000;

// ---------------------------------------------------------------------------------------------------------------
// Dtypes
// ---------------------------------------------------------------------------------------------------------------

interface DtypeInfo {
  /** Bytes per element. */
  size: number;
  /** Position in the reference implementation's `Dtype` enum: files list tensors by descending rank, then name. */
  rank: number;
  /** The typed array holding the raw elements. */
  native: string;
  kind: "float" | "int" | "raw";
}

const DTYPES: Record<SafetensorsDtype, DtypeInfo> = {
  BOOL: { size: 1, rank: 0, native: "Uint8Array", kind: "int" },
  U8: { size: 1, rank: 4, native: "Uint8Array", kind: "int" },
  I8: { size: 1, rank: 5, native: "Int8Array", kind: "int" },
  F8_E5M2: { size: 1, rank: 6, native: "Uint8Array", kind: "raw" },
  F8_E4M3: { size: 1, rank: 7, native: "Uint8Array", kind: "raw" },
  F8_E8M0: { size: 1, rank: 8, native: "Uint8Array", kind: "raw" },
  F8_E4M3FNUZ: { size: 1, rank: 9, native: "Uint8Array", kind: "raw" },
  F8_E5M2FNUZ: { size: 1, rank: 10, native: "Uint8Array", kind: "raw" },
  I16: { size: 2, rank: 11, native: "Int16Array", kind: "int" },
  U16: { size: 2, rank: 12, native: "Uint16Array", kind: "int" },
  F16: { size: 2, rank: 13, native: "Uint16Array", kind: "float" },
  BF16: { size: 2, rank: 14, native: "Uint16Array", kind: "float" },
  I32: { size: 4, rank: 15, native: "Int32Array", kind: "int" },
  U32: { size: 4, rank: 16, native: "Uint32Array", kind: "int" },
  F32: { size: 4, rank: 17, native: "Float32Array", kind: "float" },
  F64: { size: 8, rank: 19, native: "Float64Array", kind: "float" },
  I64: { size: 8, rank: 20, native: "BigInt64Array", kind: "int" },
  U64: { size: 8, rank: 21, native: "BigUint64Array", kind: "int" },
};

/** Dtypes the format defines that webtune cannot hold (sub-byte or complex elements). */
const UNSUPPORTED_DTYPES = ["F4", "F6_E2M3", "F6_E3M2", "C64"];

type ArrayCtor = { new (buffer: ArrayBufferLike, byteOffset: number, length: number): TensorData };
const CTORS: Record<string, ArrayCtor> = {
  Float64Array,
  Float32Array,
  Uint16Array,
  BigInt64Array,
  BigUint64Array,
  Int32Array,
  Uint32Array,
  Int16Array,
  Int8Array,
  Uint8Array,
};

function dtypeInfo(dtype: string, where: string): DtypeInfo {
  const info = Object.hasOwn(DTYPES, dtype) ? DTYPES[dtype as SafetensorsDtype] : undefined;
  if (info) return info;
  if (UNSUPPORTED_DTYPES.includes(dtype)) {
    throw new Error(`${where}: dtype ${dtype} is valid safetensors but webtune cannot hold it`);
  }
  throw new Error(`${where}: unknown dtype ${JSON.stringify(dtype)} (known: ${Object.keys(DTYPES).join(", ")})`);
}

/**
 * Bytes per element of a safetensors dtype.
 *
 * @example
 * ```ts
 * import { dtypeSize } from "./safetensors.ts";
 * dtypeSize("BF16"); // 2
 * ```
 */
export function dtypeSize(dtype: SafetensorsDtype): number {
  return dtypeInfo(dtype, "dtypeSize").size;
}

/**
 * The name of the typed array that holds a dtype's elements as stored (what `as: "native"` returns).
 *
 * @example
 * ```ts
 * import { nativeArrayName } from "./safetensors.ts";
 * nativeArrayName("BF16"); // "Uint16Array" (raw bfloat16 bits)
 * nativeArrayName("I64"); // "BigInt64Array"
 * ```
 */
export function nativeArrayName(dtype: SafetensorsDtype): string {
  return dtypeInfo(dtype, "nativeArrayName").native;
}

const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function requireLittleEndian(): void {
  if (!LITTLE_ENDIAN_HOST) throw new Error("safetensors I/O needs a little-endian host; this one is big-endian");
}

// ---------------------------------------------------------------------------------------------------------------
// Header
// ---------------------------------------------------------------------------------------------------------------

/** Reads and checks the 8-byte length prefix; returns N. */
function headerLengthOf(prefix: Uint8Array, size: number, source: string): number {
  if (size < 8) {
    throw new Error(`${source} is not a safetensors file: it is ${size} bytes long, shorter than the 8-byte prefix`);
  }
  const view = new DataView(prefix.buffer, prefix.byteOffset, 8);
  const lo = view.getUint32(0, true), hi = view.getUint32(4, true);
  const n = hi * 2 ** 32 + lo;
  if (hi !== 0 || n > MAX_HEADER_BYTES) {
    throw new Error(
      `${source} is not a valid safetensors file: its header length ${n} is absurd (the limit is ${MAX_HEADER_BYTES} ` +
        `bytes); the file is corrupt or of another format`,
    );
  }
  if (8 + n > size) {
    throw new Error(
      `${source} is truncated: its header says ${n} bytes of JSON follow the 8-byte prefix, but the file is only ` +
        `${size} bytes long`,
    );
  }
  return n;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function isCount(v: unknown): v is number {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
}

/**
 * Parses a safetensors header from the start of a file's bytes.
 *
 * `bytes` may be the whole file or just its first `8 + N` bytes; in the second case pass the real `fileSize` so
 * tensor offsets can be checked against it. Throws a clear error (naming `source`) when the file is truncated, the
 * header length is absurd, the JSON is invalid, a dtype is unknown, a shape disagrees with its byte range, or two
 * tensors overlap or one reaches past the end of the data.
 *
 * @example
 * ```ts
 * import { parseSafetensorsHeader, serializeSafetensors } from "./safetensors.ts";
 * const bytes = serializeSafetensors({ b: { dtype: "F16", shape: [3], data: new Uint16Array(3) } });
 * const h = parseSafetensorsHeader(bytes);
 * h.entries[0]; // { name: "b", dtype: "F16", shape: [3], begin: 64, end: 70 }
 * ```
 */
export function parseSafetensorsHeader(
  bytes: Uint8Array,
  opts: { source?: string; fileSize?: number } = {},
): SafetensorsHeader {
  const source = opts.source ?? `safetensors bytes (${bytes.length} bytes)`;
  const size = opts.fileSize ?? bytes.length;
  if (bytes.length < 8) headerLengthOf(bytes, bytes.length, source); // throws: too short
  const n = headerLengthOf(bytes, size, source);
  if (bytes.length < 8 + n) {
    throw new Error(`${source}: got ${bytes.length} bytes, but the header needs the first ${8 + n}`);
  }
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + n));
  } catch {
    throw new Error(`${source} is not a valid safetensors file: its header is not valid UTF-8`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    const start = text.length > 60 ? `${text.slice(0, 60)}…` : text;
    throw new Error(
      `${source} is not a valid safetensors file: its header is not valid JSON (${(e as Error).message}); ` +
        `it starts with ${JSON.stringify(start)}`,
    );
  }
  if (!isObject(json)) throw new Error(`${source}: the safetensors header is not a JSON object`);

  const dataStart = 8 + n;
  const dataLength = size - dataStart;
  const entries: SafetensorsEntry[] = [];
  let metadata: Record<string, string> = {};
  for (const [name, info] of Object.entries(json)) {
    if (name === "__metadata__") {
      metadata = parseMetadata(info, source);
      continue;
    }
    const where = `${source}: tensor ${JSON.stringify(name)}`;
    if (!isObject(info)) throw new Error(`${where}: its header entry is not an object`);
    if (typeof info.dtype !== "string") throw new Error(`${where}: its header entry has no dtype`);
    const dtype = info.dtype as SafetensorsDtype;
    const { size: itemSize } = dtypeInfo(dtype, where);
    const shape = info.shape;
    if (!Array.isArray(shape) || !shape.every(isCount)) {
      throw new Error(`${where}: shape ${JSON.stringify(shape)} is not a list of non-negative integers`);
    }
    const offsets = info.data_offsets;
    if (!Array.isArray(offsets) || offsets.length !== 2 || !isCount(offsets[0]) || !isCount(offsets[1])) {
      throw new Error(`${where}: data_offsets ${JSON.stringify(offsets)} is not a pair of non-negative integers`);
    }
    const [b, e] = offsets as [number, number];
    if (e < b) throw new Error(`${where}: data_offsets [${b}, ${e}] end before they begin`);
    const count = shape.reduce((p: number, d: number) => p * d, 1);
    const want = count * itemSize;
    if (!Number.isSafeInteger(want) || want !== e - b) {
      throw new Error(
        `${where}: shape [${shape}] of ${dtype} needs ${want} bytes, but data_offsets [${b}, ${e}] span ${e - b}`,
      );
    }
    if (e > dataLength) {
      throw new Error(
        `${where}: data_offsets [${b}, ${e}] reach past the end of the data area (${dataLength} bytes): ` +
          `the file is truncated or its header is corrupt`,
      );
    }
    entries.push({ name, dtype, shape: shape.slice(), begin: dataStart + b, end: dataStart + e });
  }
  entries.sort((x, y) => x.begin - y.begin || x.end - y.end);
  for (let i = 1; i < entries.length; i++) {
    const prev = entries[i - 1], cur = entries[i];
    if (cur.begin < prev.end && cur.begin < cur.end) {
      throw new Error(
        `${source}: tensors ${JSON.stringify(prev.name)} and ${JSON.stringify(cur.name)} overlap ` +
          `(data bytes ${prev.begin - dataStart}..${prev.end - dataStart} and ` +
          `${cur.begin - dataStart}..${cur.end - dataStart}): the header is corrupt`,
      );
    }
  }
  const byName = new Map(entries.map((en) => [en.name, en]));
  return { source, headerLength: n, dataStart, fileSize: size, entries, byName, metadata };
}

function parseMetadata(info: unknown, source: string): Record<string, string> {
  if (info === null) return {};
  if (!isObject(info)) throw new Error(`${source}: "__metadata__" in the header is not an object`);
  const out: Record<string, string> = {};
  // The format says string → string; other writers sometimes store numbers: keep those as their JSON text.
  for (const [k, v] of Object.entries(info)) out[k] = typeof v === "string" ? v : JSON.stringify(v);
  return out;
}

/**
 * Reads and parses the header of a safetensors file, reading only its first `8 + N` bytes.
 *
 * @example
 * ```ts
 * import { readSafetensorsHeader } from "./safetensors.ts";
 * const h = await readSafetensorsHeader("model.safetensors");
 * for (const e of h.entries) console.log(e.name, e.dtype, e.shape);
 * ```
 */
export async function readSafetensorsHeader(path: string): Promise<SafetensorsHeader> {
  const size = await fileSize(path);
  if (size === undefined) throw new Error(`No such file: ${path} (or it is not a regular file)`);
  const prefix = size >= 8 ? await readRange(path, 0, 8) : new Uint8Array(0);
  const n = headerLengthOf(prefix, size, path);
  const head = new Uint8Array(8 + n);
  head.set(prefix);
  head.set(await readRange(path, 8, n), 8);
  return parseSafetensorsHeader(head, { source: path, fileSize: size });
}

/**
 * Finds a tensor's entry by name; the error for a missing name lists a few names the file does have.
 *
 * @example
 * ```ts
 * import { getEntry, readSafetensorsHeader } from "./safetensors.ts";
 * const h = await readSafetensorsHeader("model.safetensors");
 * const e = getEntry(h, "model.embed_tokens.weight");
 * ```
 */
export function getEntry(header: SafetensorsHeader, name: string): SafetensorsEntry {
  const entry = header.byName.get(name);
  if (entry) return entry;
  const names = header.entries.map((e) => e.name);
  const wanted = JSON.stringify(name);
  if (names.length === 0) throw new Error(`${header.source} has no tensor named ${wanted}: it holds no tensors`);
  const near = names.filter((n) => n.includes(name) || name.includes(n));
  const shown = (near.length > 0 ? near : names).slice(0, 5).map((n) => JSON.stringify(n)).join(", ");
  const more = names.length > 5 ? `, … (${names.length} tensors in all)` : "";
  const label = near.length > 0 ? "similar names" : "it has";
  throw new Error(`${header.source} has no tensor named ${wanted}; ${label}: ${shown}${more}`);
}

// ---------------------------------------------------------------------------------------------------------------
// Reading tensor data
// ---------------------------------------------------------------------------------------------------------------

/** Bytes read from a file at a time when converting: bounded temporary memory for huge tensors. */
const CHUNK_BYTES = 64 << 20;

type Convert = (raw: Uint8Array, dst: TensorData, first: number) => void;

/** A typed-array view of aligned raw bytes. */
function viewAs(raw: Uint8Array, ctor: ArrayCtor, size: number): TensorData {
  return new ctor(raw.buffer, raw.byteOffset, raw.byteLength / size);
}

/** 64-bit integers seen as [low, high] int32 pairs (little-endian), to convert without BigInt. */
function int64Pairs(raw: Uint8Array): Int32Array {
  return new Int32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4);
}

function describe(e: SafetensorsEntry, source: string): string {
  return `${source}: tensor ${JSON.stringify(e.name)} (${e.dtype})`;
}

/** The conversion from a dtype's raw bytes into `as`'s array, or `undefined` when the native array is the answer. */
function converter(e: SafetensorsEntry, as: Exclude<ReadAs, "native">, source: string): Convert | undefined {
  const info = DTYPES[e.dtype];
  const ctor = CTORS[info.native];
  const where = describe(e, source);
  if (info.kind === "raw") {
    throw new Error(`${where}: webtune cannot convert ${e.dtype} to ${as}; read it with as: "native" (raw bytes)`);
  }
  if (as === "f32") {
    switch (e.dtype) {
      case "F32":
        return undefined;
      case "F16":
        return (raw, dst) => f16ArrayToF32(viewAs(raw, Uint16Array, 2) as Uint16Array, dst as Float32Array);
      case "BF16":
        return (raw, dst) => bf16ArrayToF32(viewAs(raw, Uint16Array, 2) as Uint16Array, dst as Float32Array);
      case "I64":
      case "U64":
        return (raw, dst) => {
          const p = int64Pairs(raw), out = dst as Float32Array, signed = e.dtype === "I64";
          for (let i = 0, n = p.length >> 1; i < n; i++) {
            out[i] = (signed ? p[2 * i + 1] : p[2 * i + 1] >>> 0) * 4294967296 + (p[2 * i] >>> 0);
          }
        };
      default: // F64 and the narrower integers: TypedArray.set converts each element, rounding to nearest even
        return (raw, dst) => (dst as Float32Array).set(viewAs(raw, ctor, info.size) as Float64Array);
    }
  }
  if (as === "f16") {
    switch (e.dtype) {
      case "F16":
        return undefined;
      case "F32":
        return (raw, dst) => f32ArrayToF16(viewAs(raw, Float32Array, 4) as Float32Array, dst as Uint16Array);
      case "BF16":
        return (raw, dst) => bf16ArrayToF16(viewAs(raw, Uint16Array, 2) as Uint16Array, dst as Uint16Array);
      case "I64":
      case "U64":
        return (raw, dst) => {
          const p = int64Pairs(raw), out = dst as Uint16Array, signed = e.dtype === "I64";
          for (let i = 0, n = p.length >> 1; i < n; i++) {
            out[i] = f32ToF16Bits((signed ? p[2 * i + 1] : p[2 * i + 1] >>> 0) * 4294967296 + (p[2 * i] >>> 0));
          }
        };
      default: // F64 and narrower integers: one correct rounding from the exact value
        return (raw, dst) => {
          const src = viewAs(raw, ctor, info.size) as Float64Array, out = dst as Uint16Array;
          for (let i = 0; i < src.length; i++) out[i] = f32ToF16Bits(src[i]);
        };
    }
  }
  // as === "i32"
  if (info.kind !== "int") {
    throw new Error(`${where}: as: "i32" reads integer tensors only; use "f32", "f16" or "native" for ${e.dtype}`);
  }
  switch (e.dtype) {
    case "I32":
      return undefined;
    case "U32":
      return (raw, dst, first) => {
        const src = viewAs(raw, Uint32Array, 4) as Uint32Array, out = dst as Int32Array;
        for (let i = 0; i < src.length; i++) {
          const v = src[i];
          if (v > 0x7fffffff) throw outOfInt32(where, first + i, BigInt(v));
          out[i] = v;
        }
      };
    case "I64":
    case "U64":
      return (raw, dst, first) => {
        // Fits in int32 exactly when the high word is the sign extension of the low one (0 for unsigned).
        const p = int64Pairs(raw), out = dst as Int32Array, signed = e.dtype === "I64";
        for (let i = 0, n = p.length >> 1; i < n; i++) {
          const lo = p[2 * i], hi = p[2 * i + 1];
          if (hi !== (signed ? lo >> 31 : 0) || (!signed && lo < 0)) {
            const v = signed
              ? new BigInt64Array(raw.buffer, raw.byteOffset + 8 * i, 1)[0]
              : new BigUint64Array(raw.buffer, raw.byteOffset + 8 * i, 1)[0];
            throw outOfInt32(where, first + i, v);
          }
          out[i] = lo;
        }
      };
    default: // BOOL, U8, I8, U16, I16: always fit
      return (raw, dst) => (dst as Int32Array).set(viewAs(raw, ctor, info.size) as Int16Array);
  }
}

function outOfInt32(where: string, index: number, value: bigint): Error {
  return new RangeError(
    `${where} holds ${value} at element ${index}, outside the int32 range; read it with as: "native" instead`,
  );
}

/** The array `as` produces for `n` elements of `dtype`. */
function targetArray(as: ReadAs, dtype: SafetensorsDtype, n: number): TensorData {
  switch (as) {
    case "f32":
      return new Float32Array(n);
    case "f16":
      return new Uint16Array(n);
    case "i32":
      return new Int32Array(n);
    default:
      return new CTORS[DTYPES[dtype].native](new ArrayBuffer(n * DTYPES[dtype].size), 0, n);
  }
}

/** `raw` realigned if its offset does not suit the element size (typed arrays need aligned views). */
function aligned(raw: Uint8Array, size: number): Uint8Array {
  return raw.byteOffset % size === 0 ? raw : raw.slice();
}

/**
 * Reads one tensor's data, converting it on the way (see `ReadOptions.as`).
 *
 * `source` is a file path (only the tensor's byte range is read; conversions read it in 64 MiB chunks) or the
 * file's bytes. `entry` is an entry of that file's header, or a tensor name (then the header is read first).
 *
 * @example
 * ```ts
 * import { readSafetensorsHeader, readTensorData } from "./safetensors.ts";
 * const h = await readSafetensorsHeader("model.safetensors");
 * const w = await readTensorData("model.safetensors", h.byName.get("lm_head.weight")!, { as: "f32" });
 * const ids = await readTensorData("model.safetensors", "position_ids", { as: "i32" }); // throws if out of range
 * ```
 */
export async function readTensorData(
  source: string | Uint8Array,
  entry: SafetensorsEntry | string,
  opts: ReadOptions & { as: "f32" },
): Promise<Float32Array>;
export async function readTensorData(
  source: string | Uint8Array,
  entry: SafetensorsEntry | string,
  opts: ReadOptions & { as: "f16" },
): Promise<Uint16Array>;
export async function readTensorData(
  source: string | Uint8Array,
  entry: SafetensorsEntry | string,
  opts: ReadOptions & { as: "i32" },
): Promise<Int32Array>;
export async function readTensorData(
  source: string | Uint8Array,
  entry: SafetensorsEntry | string,
  opts?: ReadOptions,
): Promise<TensorData>;
export async function readTensorData(
  source: string | Uint8Array,
  entry: SafetensorsEntry | string,
  opts: ReadOptions = {},
): Promise<TensorData> {
  requireLittleEndian();
  if (typeof entry === "string") {
    const header = typeof source === "string" ? await readSafetensorsHeader(source) : parseSafetensorsHeader(source);
    entry = getEntry(header, entry);
  }
  return typeof source === "string" ? await readFromFile(source, entry, opts) : readFromBytes(source, entry, opts);
}

function readFromBytes(bytes: Uint8Array, e: SafetensorsEntry, opts: ReadOptions): TensorData {
  const as = opts.as ?? "native";
  const info = dtypeInfo(e.dtype, describe(e, "safetensors bytes"));
  if (e.end > bytes.length) {
    throw new Error(
      `safetensors bytes (${bytes.length} bytes) end before tensor ${JSON.stringify(e.name)} ` +
        `(bytes ${e.begin}..${e.end}): truncated, or the entry belongs to another file`,
    );
  }
  const raw = bytes.subarray(e.begin, e.end);
  const convert = as === "native" ? undefined : converter(e, as, "safetensors bytes");
  if (!convert) {
    const own = opts.copy ? raw.slice() : aligned(raw, info.size);
    return viewAs(own, CTORS[info.native], info.size);
  }
  const dst = targetArray(as, e.dtype, raw.length / info.size);
  convert(aligned(raw, info.size), dst, 0);
  return dst;
}

async function readFromFile(path: string, e: SafetensorsEntry, opts: ReadOptions): Promise<TensorData> {
  const as = opts.as ?? "native";
  const info = dtypeInfo(e.dtype, describe(e, path));
  const bytes = e.end - e.begin, n = bytes / info.size;
  const convert = as === "native" ? undefined : converter(e, as, path);
  try {
    if (!convert) {
      const raw = bytes > 0 ? await readRange(path, e.begin, bytes) : new Uint8Array(0);
      return viewAs(raw, CTORS[info.native], info.size);
    }
    const dst = targetArray(as, e.dtype, n);
    const perChunk = Math.max(1, Math.floor((opts.chunkBytes ?? CHUNK_BYTES) / info.size));
    for (let first = 0; first < n; first += perChunk) {
      const count = Math.min(perChunk, n - first);
      const raw = await readRange(path, e.begin + first * info.size, count * info.size);
      convert(raw, dst.subarray(first, first + count), first);
    }
    return dst;
  } catch (err) {
    const msg = (err as Error).message ?? String(err);
    if (msg.includes(JSON.stringify(e.name))) throw err;
    throw new Error(`${msg} (reading tensor ${JSON.stringify(e.name)})`, { cause: err });
  }
}

/**
 * Reads every tensor (or those `names` selects) into memory, in file order.
 *
 * Each result's `dtype` describes its `data`: `"F32"` for `as: "f32"`, `"F16"` for `"f16"`, `"I32"` for `"i32"`,
 * the file's dtype for `"native"` (the default), so the map can be handed straight back to `saveSafetensors`.
 *
 * @example
 * ```ts
 * import { loadSafetensors } from "./safetensors.ts";
 * const tensors = await loadSafetensors("adapter_model.safetensors", { as: "f32" });
 * for (const [name, t] of tensors) console.log(name, t.shape, t.data.length);
 * ```
 */
export async function loadSafetensors(
  source: string | Uint8Array,
  opts: ReadOptions & { names?: readonly string[] | ((name: string) => boolean) } = {},
): Promise<Map<string, LoadedTensor>> {
  const header = typeof source === "string" ? await readSafetensorsHeader(source) : parseSafetensorsHeader(source);
  const as = opts.as ?? "native";
  const pick = opts.names;
  let entries: SafetensorsEntry[];
  if (pick === undefined) entries = header.entries;
  else if (typeof pick === "function") entries = header.entries.filter((e) => pick(e.name));
  else {
    const wanted = new Set(pick.map((name) => getEntry(header, name).name)); // throws for a missing name
    entries = header.entries.filter((e) => wanted.has(e.name));
  }
  const out = new Map<string, LoadedTensor>();
  for (const e of entries) {
    const data = await readTensorData(source, e, opts);
    const dtype: SafetensorsDtype = as === "f32" ? "F32" : as === "f16" ? "F16" : as === "i32" ? "I32" : e.dtype;
    out.set(e.name, { dtype, shape: e.shape.slice(), data });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------------------------

const encoder = new TextEncoder();

/** Orders byte strings the way Rust orders `String`s (UTF-8 bytes), which differs from JS's UTF-16 order. */
function compareBytes(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
}

function checkName(name: string, what: string): void {
  if (!name.isWellFormed()) throw new Error(`${what} ${JSON.stringify(name)} is not valid Unicode (lone surrogate)`);
}

/** The bytes of one tensor as the file stores them (I64 from an Int32Array is sign-extended here). */
function tensorBytes(name: string, t: TensorToSave): Uint8Array {
  const where = `tensor ${JSON.stringify(name)}`;
  if (!isObject(t)) throw new Error(`${where}: expected { dtype, shape, data }`);
  const info = dtypeInfo(t.dtype, where);
  if (!Array.isArray(t.shape) || !t.shape.every(isCount)) {
    throw new Error(`${where}: shape ${JSON.stringify(t.shape)} is not a list of non-negative integers`);
  }
  const count = t.shape.reduce((p, d) => p * d, 1);
  const data = t.data;
  const typeName = data?.constructor?.name ?? typeof data;
  if (t.dtype === "I64" && data instanceof Int32Array) {
    if (data.length !== count) throw lengthError(where, t, data.length, count);
    const wide = new BigInt64Array(count);
    const pairs = new Int32Array(wide.buffer);
    for (let i = 0; i < count; i++) {
      pairs[2 * i] = data[i];
      pairs[2 * i + 1] = data[i] >> 31;
    }
    return new Uint8Array(wide.buffer);
  }
  if (!(data instanceof CTORS[info.native])) {
    const hint = t.dtype === "F16"
      ? " (float16 bits: convert with f32ArrayToF16)"
      : t.dtype === "BF16"
      ? " (bfloat16 bits: convert with f32ArrayToBf16)"
      : "";
    throw new Error(`${where}: dtype ${t.dtype} needs a ${info.native}${hint}, got ${typeName}`);
  }
  if (data.length !== count) throw lengthError(where, t, data.length, count);
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

function lengthError(where: string, t: TensorToSave, got: number, want: number): Error {
  return new Error(`${where}: shape [${t.shape}] has ${want} elements but data has ${got}`);
}

/**
 * Serializes tensors to safetensors bytes, byte for byte what the Python `safetensors` library writes: tensors
 * ordered by descending dtype (U64, I64, F64, F32, U32, I32, BF16, F16, U16, I16, I8, U8, BOOL) then by name, the
 * compact JSON header padded with spaces to a multiple of 8 bytes. `__metadata__` comes first, its keys sorted
 * (Python's order there is a hash map's, i.e. arbitrary), and only when `metadata` is given.
 *
 * @example
 * ```ts
 * import { serializeSafetensors } from "./safetensors.ts";
 * const bytes = serializeSafetensors({ w: { dtype: "F32", shape: [2], data: new Float32Array([1, 2]) } }, {
 *   format: "pt",
 * });
 * ```
 */
export function serializeSafetensors(
  tensors: Record<string, TensorToSave> | Map<string, TensorToSave>,
  metadata?: Record<string, string>,
): Uint8Array {
  requireLittleEndian();
  const list = tensors instanceof Map ? [...tensors] : Object.entries(tensors);
  const items = list.map(([name, t]) => {
    checkName(name, "tensor name");
    if (name === "__metadata__") throw new Error(`"__metadata__" is reserved and cannot name a tensor`);
    return { name, key: encoder.encode(name), t, bytes: tensorBytes(name, t), rank: DTYPES[t.dtype].rank };
  });
  items.sort((a, b) => b.rank - a.rank || compareBytes(a.key, b.key));

  const parts: string[] = [];
  if (metadata !== undefined) {
    const keys = Object.keys(metadata).map((k) => ({ k, key: encoder.encode(k) }));
    keys.sort((a, b) => compareBytes(a.key, b.key));
    const fields = keys.map(({ k }) => {
      const v = metadata[k];
      checkName(k, "metadata key");
      if (typeof v !== "string") {
        throw new Error(
          `metadata ${JSON.stringify(k)} must be a string (safetensors metadata maps strings to strings)`,
        );
      }
      checkName(v, `metadata value of ${JSON.stringify(k)}`);
      return `${JSON.stringify(k)}:${JSON.stringify(v)}`;
    });
    parts.push(`"__metadata__":{${fields.join(",")}}`);
  }
  let offset = 0;
  for (const { name, t, bytes } of items) {
    const begin = offset, end = offset + bytes.length;
    parts.push(
      `${JSON.stringify(name)}:{"dtype":"${t.dtype}","shape":[${t.shape.join(",")}],"data_offsets":[${begin},${end}]}`,
    );
    offset = end;
  }
  const json = encoder.encode(`{${parts.join(",")}}`);
  const n = Math.ceil(json.length / 8) * 8;
  if (n > MAX_HEADER_BYTES) throw new Error(`the safetensors header would be ${n} bytes, over the 100 MB limit`);

  const out = new Uint8Array(8 + n + offset);
  const view = new DataView(out.buffer);
  view.setUint32(0, n, true); // u64 little-endian; n < 2^32, so the high word stays 0
  out.set(json, 8);
  out.fill(0x20, 8 + json.length, 8 + n); // pad with spaces so the data area starts 8-byte aligned
  let at = 8 + n;
  for (const { bytes } of items) {
    out.set(bytes, at);
    at += bytes.length;
  }
  return out;
}

/**
 * Serializes tensors (see `serializeSafetensors`) and, when `path` is given, writes the file atomically.
 * Returns the bytes either way.
 *
 * @example
 * ```ts
 * import { saveSafetensors } from "./safetensors.ts";
 * import { f32ArrayToF16 } from "./half.ts";
 * await saveSafetensors("out/adapter_model.safetensors", {
 *   "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": {
 *     dtype: "F16",
 *     shape: [8, 4096],
 *     data: f32ArrayToF16(new Float32Array(8 * 4096)),
 *   },
 * }, { format: "pt" });
 * ```
 */
export async function saveSafetensors(
  path: string | null,
  tensors: Record<string, TensorToSave> | Map<string, TensorToSave>,
  metadata?: Record<string, string>,
): Promise<Uint8Array> {
  const bytes = serializeSafetensors(tensors, metadata);
  if (path !== null) await writeBytes(path, bytes);
  return bytes;
}
