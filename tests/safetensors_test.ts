// Tests for core/half.ts (float16 / bfloat16 conversions) and core/safetensors.ts (the safetensors format).
//
// The float conversions are checked against float64 reference implementations written here (exhaustively where
// the input is 16 bits wide, on fresh random float32 inputs otherwise). The writer is checked byte for byte
// against files laid out by hand from the format's rules (and against the reference library's own test vectors).

import { assert, assertEquals, assertRejects, assertStringIncludes, assertThrows } from "@std/assert";
import {
  bf16ArrayToF16,
  bf16ArrayToF32,
  bf16BitsToF32,
  f16ArrayToBf16,
  f16ArrayToF32,
  f16BitsToF32,
  f32ArrayToBf16,
  f32ArrayToF16,
  f32ToBf16Bits,
  f32ToF16Bits,
  roundToF16,
} from "../core/half.ts";
import {
  getEntry,
  loadSafetensors,
  MAX_HEADER_BYTES,
  parseSafetensorsHeader,
  readSafetensorsHeader,
  readTensorData,
  type SafetensorsDtype,
  saveSafetensors,
  serializeSafetensors,
  type TensorData,
  type TensorToSave,
} from "../core/safetensors.ts";

// ---------------------------------------------------------------------------------------------------------------
// Float64 references
// ---------------------------------------------------------------------------------------------------------------

/** floor(log2(a)) for a finite a > 0, exact. */
function exponentOf(a: number): number {
  let e = Math.floor(Math.log2(a));
  while (2 ** e > a) e--;
  while (2 ** (e + 1) <= a) e++;
  return e;
}

/** Rounds a/ulp to an integer, ties to even (the division by a power of two is exact). */
function roundHalfEven(q: number): number {
  const f = Math.floor(q), r = q - f;
  return r > 0.5 || (r === 0.5 && f % 2 === 1) ? f + 1 : f;
}

/**
 * Reference: any finite or infinite number → binary format bits with `man` mantissa bits and exponent bias `bias`,
 * round to nearest even; -1 for NaN (callers check NaN separately).
 */
function refBits(x: number, man: number, bias: number, expBits: number): number {
  if (Number.isNaN(x)) return -1;
  const sign = x < 0 || Object.is(x, -0) ? 1 << (man + expBits) : 0;
  const inf = ((1 << expBits) - 1) << man;
  const a = Math.abs(x);
  if (a === Infinity) return sign | inf;
  if (a === 0) return sign;
  const minExp = 1 - bias;
  const e = Math.max(exponentOf(a), minExp);
  const ulp = 2 ** (e - man);
  const q = roundHalfEven(a / ulp);
  if (q * ulp >= 2 ** (bias + 1)) return sign | inf; // rounded past the largest finite value
  if (q < 2 ** man) return sign | q; // subnormal (e === minExp)
  return sign | (((e + bias) << man) + (q - 2 ** man)); // q === 2^(man+1) carries into the exponent: still right
}
const refF16 = (x: number) => refBits(x, 10, 15, 5);
const refBf16 = (x: number) => refBits(x, 7, 127, 8);

/** Reference decoding of float16 bits. */
function refF16Value(h: number): number {
  const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp === 0x1f) return man ? NaN : sign * Infinity;
  return exp === 0 ? sign * man * 2 ** -24 : sign * 2 ** (exp - 15) * (1 + man / 1024);
}

/** Reference decoding of bfloat16 bits. */
function refBf16Value(b: number): number {
  const sign = b & 0x8000 ? -1 : 1, exp = (b >> 7) & 0xff, man = b & 0x7f;
  if (exp === 0xff) return man ? NaN : sign * Infinity;
  return exp === 0 ? sign * man * 2 ** -133 : sign * 2 ** (exp - 127) * (1 + man / 128);
}

const isF16NaN = (h: number) => (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;
const isBf16NaN = (b: number) => (b & 0x7f80) === 0x7f80 && (b & 0x7f) !== 0;

function randomU32(n: number): Uint32Array {
  const out = new Uint32Array(n);
  for (let i = 0; i < n; i += 16384) crypto.getRandomValues(out.subarray(i, Math.min(n, i + 16384)));
  return out;
}

function randomBytes(n: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i += 65536) crypto.getRandomValues(out.subarray(i, Math.min(n, i + 65536)));
  return out;
}

/** Fresh random float32 inputs that exercise every rounding path of a narrowing to float16 / bfloat16. */
function interestingF32(): Float32Array {
  const n = 1 << 17;
  const bits = randomU32(6 * n);
  for (let i = 0; i < n; i++) {
    // [0, n): any bit pattern. [n, 2n): exponents around float16's range (2^-27 .. 2^17), random mantissas.
    const r = bits[n + i];
    bits[n + i] = (r & 0x807fffff) | ((100 + (r >>> 23) % 45) << 23);
    // [2n, 3n): exact float16 ties, [3n, 4n) and [4n, 5n): one float32 ulp either side of them.
    const h = bits[2 * n + i] & 0x7fff;
    const base = h >= 0x7c00 ? 0x7bff : h; // a finite float16
    const exp = base >> 10;
    const halfUlp = (exp === 0 ? 2 ** -24 : 2 ** (exp - 25)) / 2;
    const tie = Math.fround((refF16Value(base) + halfUlp) * (bits[2 * n + i] & 0x8000 ? -1 : 1));
    const t = new Float32Array([tie]);
    const tb = new Uint32Array(t.buffer)[0];
    bits[2 * n + i] = tb;
    bits[3 * n + i] = tb + 1;
    bits[4 * n + i] = tb - 1;
    // [5n, 6n): exact bfloat16 ties (bit 15 set, the 15 bits below clear).
    bits[5 * n + i] = (bits[5 * n + i] & 0xffff0000) | 0x8000;
  }
  return new Float32Array(bits.buffer);
}

// ---------------------------------------------------------------------------------------------------------------
// half.ts
// ---------------------------------------------------------------------------------------------------------------

Deno.test("every float16 bit pattern decodes exactly and round-trips through float32 bit for bit", () => {
  const all = new Uint16Array(65536).map((_, i) => i);
  const f32 = f16ArrayToF32(all);
  const back = f32ArrayToF16(f32);
  for (let h = 0; h < 65536; h++) {
    const want = refF16Value(h);
    if (Number.isNaN(want)) {
      assert(Number.isNaN(f32[h]) && Number.isNaN(f16BitsToF32(h)), `0x${h.toString(16)} should decode to NaN`);
    } else {
      assert(Object.is(f32[h], want), `0x${h.toString(16)}: bulk gave ${f32[h]}, want ${want}`);
      assert(Object.is(f16BitsToF32(h), want), `0x${h.toString(16)}: scalar gave ${f16BitsToF32(h)}`);
      assertEquals(f32ToF16Bits(want), h, `scalar re-encoding of 0x${h.toString(16)}`);
      assert(Object.is(roundToF16(want), want));
    }
    assertEquals(back[h], h, `0x${h.toString(16)} did not survive f16 → f32 → f16`);
  }
});

Deno.test("float32 → float16 rounds to nearest even like a float64 reference (random inputs, ties, neighbours)", () => {
  const x = interestingF32();
  const bulk = f32ArrayToF16(x);
  const dst = new Uint16Array(x.length + 3);
  assert(f32ArrayToF16(x, dst) === dst, "writes into and returns dst");
  const xb = new Uint32Array(x.buffer);
  const hasF16Round = typeof (Math as { f16round?: unknown }).f16round === "function";
  let ties = 0;
  for (let i = 0; i < x.length; i++) {
    const v = x[i], got = bulk[i];
    assertEquals(dst[i], got);
    if (Number.isNaN(v)) {
      assert(isF16NaN(got), `NaN 0x${xb[i].toString(16)} became 0x${got.toString(16)}`);
      assertEquals(got & 0x8000, (xb[i] >>> 16) & 0x8000, "NaN sign");
      const payload = (xb[i] >>> 13) & 0x3ff;
      if (payload !== 0) assertEquals(got & 0x3ff, payload, "NaN payload's top bits");
      continue;
    }
    const want = refF16(v);
    if (got !== want) throw new Error(`f32ArrayToF16(${v}) = 0x${got.toString(16)}, want 0x${want.toString(16)}`);
    const scalar = f32ToF16Bits(v);
    if (scalar !== want) throw new Error(`f32ToF16Bits(${v}) = 0x${scalar.toString(16)}, want 0x${want.toString(16)}`);
    if (hasF16Round) assert(Object.is(roundToF16(v), (Math as unknown as { f16round(x: number): number }).f16round(v)));
    if ((xb[i] & 0x1fff) === 0x1000) ties++;
  }
  assert(ties > 10000, `the inputs should hold many exact ties (got ${ties})`);
});

Deno.test("f32ToF16Bits rounds a float64 once (no double rounding through float32)", () => {
  // 1 + 2^-11 is a tie between 1 and 1 + 2^-10; a hair above it must round up. Through float32 it would not.
  const hair = 2 ** -40 * (1 + Math.random());
  assertEquals(f32ToF16Bits(1 + 2 ** -11 + hair), 0x3c01);
  assertEquals(f32ToF16Bits(1 + 2 ** -11), 0x3c00);
  assertEquals(f32ToF16Bits(-(1 + 3 * 2 ** -11)), 0xbc02); // tie between 0x3c01 and 0x3c02: to even
  assertEquals(f32ToF16Bits(65519.99), 0x7bff);
  assertEquals(f32ToF16Bits(65520), 0x7c00);
  assertEquals(f32ToF16Bits(-1e10), 0xfc00);
  assertEquals(f32ToF16Bits(2 ** -25), 0x0000); // tie between 0 and the smallest subnormal: to even
  assertEquals(f32ToF16Bits(-(2 ** -25) * (1 + hair)), 0x8001);
  assertEquals(f32ToF16Bits(-0), 0x8000);
  assert(isF16NaN(f32ToF16Bits(NaN)));
});

Deno.test("every bfloat16 bit pattern round-trips through float32; float32 → bfloat16 matches the reference", () => {
  const all = new Uint16Array(65536).map((_, i) => i);
  const f32 = bf16ArrayToF32(all);
  const back = f32ArrayToBf16(f32);
  for (let b = 0; b < 65536; b++) {
    const want = refBf16Value(b);
    if (Number.isNaN(want)) assert(Number.isNaN(f32[b]));
    else {
      assert(Object.is(f32[b], want), `bf16 0x${b.toString(16)} decoded to ${f32[b]}, want ${want}`);
      assert(Object.is(bf16BitsToF32(b), want));
    }
    assertEquals(back[b], b, `bf16 0x${b.toString(16)} did not survive bf16 → f32 → bf16`);
  }
  const x = interestingF32();
  const xb = new Uint32Array(x.buffer);
  const got = f32ArrayToBf16(x);
  for (let i = 0; i < x.length; i++) {
    if (Number.isNaN(x[i])) {
      assert(isBf16NaN(got[i]), `NaN 0x${xb[i].toString(16)} became 0x${got[i].toString(16)}`);
      assertEquals(got[i] & 0x8000, (xb[i] >>> 16) & 0x8000);
      continue;
    }
    const want = refBf16(x[i]);
    if (got[i] !== want) {
      throw new Error(`f32ArrayToBf16(${x[i]}) = 0x${got[i].toString(16)}, want 0x${want.toString(16)}`);
    }
    assertEquals(f32ToBf16Bits(x[i]), want);
  }
});

Deno.test("bfloat16 → float16 and float16 → bfloat16 are correctly rounded for every bit pattern", () => {
  const all = new Uint16Array(65536).map((_, i) => i);
  const toF16 = bf16ArrayToF16(all);
  const toBf16 = f16ArrayToBf16(all);
  for (let i = 0; i < 65536; i++) {
    const vb = refBf16Value(i);
    if (Number.isNaN(vb)) assert(isF16NaN(toF16[i]), `bf16 NaN 0x${i.toString(16)} → 0x${toF16[i].toString(16)}`);
    else assertEquals(toF16[i], refF16(vb), `bf16 0x${i.toString(16)} (${vb}) → f16`);
    const vh = refF16Value(i);
    if (Number.isNaN(vh)) assert(isBf16NaN(toBf16[i]));
    else assertEquals(toBf16[i], refBf16(vh), `f16 0x${i.toString(16)} (${vh}) → bf16`);
  }
});

Deno.test("bulk conversions honour dst and reject one that is too small", () => {
  const n = 5 + Math.floor(Math.random() * 50);
  const src = new Float32Array(n).map(() => (Math.random() - 0.5) * 100);
  const big = new Float32Array(n + 4);
  const out = f16ArrayToF32(f32ArrayToF16(src), big);
  assert(out === big);
  for (let i = 0; i < n; i++) assertEquals(big[i], roundToF16(src[i]));
  assertThrows(() => f32ArrayToF16(src, new Uint16Array(n - 1)), RangeError, "destination");
  assertThrows(() => bf16ArrayToF32(new Uint16Array(n), new Float32Array(1)), RangeError);
});

// ---------------------------------------------------------------------------------------------------------------
// safetensors: helpers
// ---------------------------------------------------------------------------------------------------------------

const ALL_DTYPES: SafetensorsDtype[] = [
  "F64",
  "F32",
  "F16",
  "BF16",
  "I64",
  "I32",
  "I16",
  "I8",
  "U64",
  "U32",
  "U16",
  "U8",
  "BOOL",
];
const SIZES: Record<string, number> = { F64: 8, I64: 8, U64: 8, F32: 4, I32: 4, U32: 4 };
const sizeOf = (d: string) => SIZES[d] ?? (["F16", "BF16", "I16", "U16"].includes(d) ? 2 : 1);
const CTOR: Record<string, { new (b: ArrayBuffer): TensorData }> = {
  F64: Float64Array,
  F32: Float32Array,
  F16: Uint16Array,
  BF16: Uint16Array,
  I64: BigInt64Array,
  I32: Int32Array,
  I16: Int16Array,
  I8: Int8Array,
  U64: BigUint64Array,
  U32: Uint32Array,
  U16: Uint16Array,
  U8: Uint8Array,
  BOOL: Uint8Array,
};

function randomShape(): number[] {
  const shapes = [[], [1], [0], [0, 3], [7], [3, 5], [2, 3, 5], [1, 13, 1], [11, 3]];
  const s = shapes[Math.floor(Math.random() * shapes.length)];
  return s.map((d) => (d <= 1 ? d : d + Math.floor(Math.random() * 4)));
}

/** A random tensor of `dtype`: random bytes (every bit pattern, NaNs included), 0/1 for BOOL. */
function randomTensor(dtype: SafetensorsDtype, shape = randomShape()): TensorToSave {
  const n = shape.reduce((p, d) => p * d, 1);
  const bytes = randomBytes(n * sizeOf(dtype));
  if (dtype === "BOOL") { for (let i = 0; i < n; i++) bytes[i] &= 1; }
  return { dtype, shape, data: new CTOR[dtype](bytes.buffer) };
}

const bytesOf = (a: TensorData) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

function assertSameBytes(a: TensorData, b: TensorData, what: string) {
  assertEquals(a.constructor.name, b.constructor.name, `${what}: array type`);
  assertEquals(bytesOf(a), bytesOf(b), `${what}: bytes`);
}

const u64le = (n: number) => {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(n), true);
  return b;
};

/** A file laid out by hand: prefix, the JSON text (padded with spaces to 8 bytes unless told not to), data. */
function handFile(json: string, data: ArrayLike<number> = [], opts: { pad?: boolean; length?: number } = {}) {
  let text = new TextEncoder().encode(json);
  if (opts.pad !== false) {
    const padded = new Uint8Array(Math.ceil(text.length / 8) * 8).fill(0x20);
    padded.set(text);
    text = padded;
  }
  const out = new Uint8Array(8 + text.length + data.length);
  out.set(u64le(opts.length ?? text.length));
  out.set(text, 8);
  out.set(data, 8 + text.length);
  return out;
}

async function withTempDir(fn: (dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "webtune_st_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// safetensors: golden bytes
// ---------------------------------------------------------------------------------------------------------------

Deno.test("golden: a mixed-dtype dict serializes to exactly the bytes of the Python library", () => {
  // Laid out by the format's rules: tensors sorted by descending dtype (I64 > F32 > BF16 > F16 > BOOL), then by
  // name; offsets contiguous from 0; __metadata__ first; compact JSON; 386 bytes of JSON + 6 spaces = 392.
  const json = '{"__metadata__":{"format":"pt"},' +
    '"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},' +
    '"emb.0":{"dtype":"F32","shape":[1],"data_offsets":[16,20]},' +
    '"weight":{"dtype":"F32","shape":[2,3],"data_offsets":[20,44]},' +
    '"scale":{"dtype":"BF16","shape":[1],"data_offsets":[44,46]},' +
    '"bias":{"dtype":"F16","shape":[3],"data_offsets":[46,52]},' +
    '"mask":{"dtype":"BOOL","shape":[3],"data_offsets":[52,55]}}';
  assertEquals(json.length, 386);
  const expected = new Uint8Array([
    ...[0x88, 0x01, 0, 0, 0, 0, 0, 0], // 392 = 0x188, u64 little-endian
    ...new TextEncoder().encode(json),
    ...[0x20, 0x20, 0x20, 0x20, 0x20, 0x20],
    ...[5, 0, 0, 0, 0, 0, 0, 0, 0xf9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // ids: 5, -7
    ...[0, 0, 0x80, 0x3f], // emb.0: 1.0
    ...[0, 0, 0, 0x3f, 0, 0, 0x80, 0xbf, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0x50, 0x40, 0, 0, 0, 0xbe], // weight
    ...[0x80, 0x3f], // scale: bf16 1.0
    ...[0x00, 0x3c, 0x00, 0xc0, 0x55, 0x35], // bias: f16 1, -2, 0.333
    ...[1, 0, 1], // mask
  ]);
  const tensors: Record<string, TensorToSave> = {
    weight: { dtype: "F32", shape: [2, 3], data: new Float32Array([0.5, -1, 2, 0, 3.25, -0.125]) },
    bias: { dtype: "F16", shape: [3], data: new Uint16Array([0x3c00, 0xc000, 0x3555]) },
    mask: { dtype: "BOOL", shape: [3], data: new Uint8Array([1, 0, 1]) },
    scale: { dtype: "BF16", shape: [1], data: new Uint16Array([0x3f80]) },
    "emb.0": { dtype: "F32", shape: [1], data: new Float32Array([1]) },
    ids: { dtype: "I64", shape: [2], data: new BigInt64Array([5n, -7n]) },
  };
  assertEquals(serializeSafetensors(tensors, { format: "pt" }), expected);
  // The insertion order of the input does not matter; I64 given as Int32Array is widened.
  const reversed = Object.fromEntries(Object.entries(tensors).reverse());
  reversed.ids = { dtype: "I64", shape: [2], data: new Int32Array([5, -7]) };
  assertEquals(serializeSafetensors(reversed, { format: "pt" }), expected);

  const h = parseSafetensorsHeader(expected);
  assertEquals(h.headerLength, 392);
  assertEquals(h.metadata, { format: "pt" });
  assertEquals(h.entries.map((e) => e.name), ["ids", "emb.0", "weight", "scale", "bias", "mask"]);
  assertEquals(getEntry(h, "weight"), { name: "weight", dtype: "F32", shape: [2, 3], begin: 420, end: 444 });
});

Deno.test("golden: the reference library's own test vectors", () => {
  const data = new Float32Array([0, 1, 2, 3, 4, 5]);
  // safetensors tensor.rs test_serialization: "attn.0", F32 [1, 2, 3]; the JSON is exactly 64 bytes (no padding).
  assertEquals(
    serializeSafetensors({ "attn.0": { dtype: "F32", shape: [1, 2, 3], data } }),
    new Uint8Array([
      ...[64, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 46, 48, 34, 58, 123, 34, 100, 116, 121, 112, 101, 34],
      ...[58, 34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34, 58, 91, 49, 44, 50, 44, 51, 93, 44, 34, 100],
      ...[97, 116, 97, 95, 111, 102, 102, 115, 101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125, 0, 0, 0, 0],
      ...[0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64],
    ]),
  );
  // test_serialization_forced_alignement: "attn0", F32 [1, 1, 2, 3]; 65 bytes of JSON + 7 spaces.
  assertEquals(
    serializeSafetensors({ attn0: { dtype: "F32", shape: [1, 1, 2, 3], data } }),
    new Uint8Array([
      ...[72, 0, 0, 0, 0, 0, 0, 0, 123, 34, 97, 116, 116, 110, 48, 34, 58, 123, 34, 100, 116, 121, 112, 101, 34, 58],
      ...[34, 70, 51, 50, 34, 44, 34, 115, 104, 97, 112, 101, 34, 58, 91, 49, 44, 49, 44, 50, 44, 51, 93, 44, 34],
      ...[100, 97, 116, 97, 95, 111, 102, 102, 115, 101, 116, 115, 34, 58, 91, 48, 44, 50, 52, 93, 125, 125],
      ...[32, 32, 32, 32, 32, 32, 32, 0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0],
      ...[160, 64],
    ]),
  );
  // test_empty: no tensors, with and without metadata.
  assertEquals(serializeSafetensors({}), new Uint8Array([8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32]));
  assertEquals(
    serializeSafetensors({}, { framework: "pt" }),
    new Uint8Array([
      ...[40, 0, 0, 0, 0, 0, 0, 0, 123, 34, 95, 95, 109, 101, 116, 97, 100, 97, 116, 97, 95, 95, 34, 58, 123, 34],
      ...[102, 114, 97, 109, 101, 119, 111, 114, 107, 34, 58, 34, 112, 116, 34, 125, 125, 32, 32, 32, 32, 32],
    ]),
  );
  assertEquals(parseSafetensorsHeader(serializeSafetensors({}, { framework: "pt" })).metadata, { framework: "pt" });
});

Deno.test("golden: names sort by UTF-8 bytes (not UTF-16), every dtype in the reference's order, JSON escapes", () => {
  const z = (dtype: SafetensorsDtype): TensorToSave => ({
    dtype,
    shape: [],
    data: new CTOR[dtype](new ArrayBuffer(sizeOf(dtype))),
  });
  // U+FFFF sorts before U+1F600 in UTF-8 (EF.. < F0..) but after it in UTF-16 (FFFF > D83D).
  const names = ["\u{1F600}", "\uffff", "é", "Z", 'q"\n\u0001'];
  const input: Record<string, TensorToSave> = {};
  for (const n of names) input[n] = z("F32");
  for (const d of ALL_DTYPES) if (d !== "F32") input[d.toLowerCase()] = z(d);
  const bytes = serializeSafetensors(input);
  const h = parseSafetensorsHeader(bytes);
  assertEquals(h.entries.map((e) => e.name), [
    "u64",
    "i64",
    "f64",
    "Z",
    'q"\n\u0001',
    "é",
    "\uffff",
    "\u{1F600}",
    "u32",
    "i32",
    "bf16",
    "f16",
    "u16",
    "i16",
    "i8",
    "u8",
    "bool",
  ]);
  const text = new TextDecoder().decode(bytes.subarray(8, 8 + h.headerLength));
  assertStringIncludes(text, '"q\\"\\n\\u0001":{"dtype":"F32","shape":[],"data_offsets":[28,32]}');
});

// ---------------------------------------------------------------------------------------------------------------
// safetensors: round trips and conversions
// ---------------------------------------------------------------------------------------------------------------

Deno.test("write → read round trips every dtype bit for bit, from bytes and from a file", async () => {
  const tensors: Record<string, TensorToSave> = {};
  for (const d of ALL_DTYPES) {
    tensors[`layer.${d}.weight`] = randomTensor(d);
    tensors[`${d}.b`] = randomTensor(d, [3, 1, 5]);
  }
  const metadata = { format: "pt", note: `random ${Math.random()}` };
  await withTempDir(async (dir) => {
    const path = `${dir}/t.safetensors`;
    const bytes = await saveSafetensors(path, tensors, metadata);
    assertEquals(await Deno.readFile(path), bytes);
    assertEquals(bytes.length % 1, 0);
    const header = await readSafetensorsHeader(path);
    assertEquals(header.metadata, metadata);
    assertEquals(header.fileSize, bytes.length);
    assertEquals(header.dataStart % 8, 0);
    assertEquals(header.entries.length, Object.keys(tensors).length);
    for (const src of [path, bytes]) {
      const loaded = await loadSafetensors(src);
      assertEquals([...loaded.keys()].sort(), Object.keys(tensors).sort());
      for (const [name, t] of Object.entries(tensors)) {
        const got = loaded.get(name)!;
        assertEquals(got.dtype, t.dtype);
        assertEquals(got.shape, [...t.shape]);
        assertSameBytes(got.data, t.data, `${name} from ${typeof src === "string" ? "file" : "bytes"}`);
        assertSameBytes(await readTensorData(src, name), t.data, `${name} by name`);
      }
    }
    // What was loaded saves back to the same bytes.
    assertEquals(serializeSafetensors(await loadSafetensors(path), metadata), bytes);
  });
});

Deno.test("as: f32 / f16 / i32 convert every dtype correctly", async () => {
  const tensors: Record<string, TensorToSave> = {};
  for (const d of ALL_DTYPES) tensors[d] = randomTensor(d, [37]);
  const bytes = serializeSafetensors(tensors);
  for (const d of ALL_DTYPES) {
    const src = tensors[d].data;
    const exact = (i: number): number => {
      if (d === "F16") return refF16Value((src as Uint16Array)[i]);
      if (d === "BF16") return refBf16Value((src as Uint16Array)[i]);
      return Number(src[i]); // Number(bigint) rounds to the nearest double, as a float64 reference should
    };
    const f32 = await readTensorData(bytes, d, { as: "f32" });
    const f16 = await readTensorData(bytes, d, { as: "f16" });
    assert(f32 instanceof Float32Array && f16 instanceof Uint16Array);
    for (let i = 0; i < 37; i++) {
      const v = exact(i);
      if (Number.isNaN(v)) {
        assert(Number.isNaN(f32[i]) && isF16NaN(f16[i]), `${d}[${i}] NaN`);
        continue;
      }
      assert(Object.is(f32[i], Math.fround(v)), `${d}[${i}]: as f32 gave ${f32[i]}, want ${Math.fround(v)}`);
      assertEquals(f16[i], refF16(v), `${d}[${i}] = ${v}: as f16`);
    }
    if (["F64", "F32", "F16", "BF16"].includes(d)) {
      await assertRejects(() => readTensorData(bytes, d, { as: "i32" }), Error, "integer tensors only");
    } else if (["I64", "U64", "U32"].includes(d)) {
      await assertRejects(() => readTensorData(bytes, d, { as: "i32" }), RangeError, "outside the int32 range");
    } else {
      const i32 = await readTensorData(bytes, d, { as: "i32" });
      assert(i32 instanceof Int32Array);
      for (let i = 0; i < 37; i++) assertEquals(i32[i], Number(src[i]));
    }
  }
  // In-range wide integers convert; the first out-of-range element is named.
  const ints = new BigInt64Array(50).map(() => BigInt(Math.floor((Math.random() - 0.5) * 2 ** 32)));
  ints[7] = -(2n ** 31n);
  ints[8] = 2n ** 31n - 1n;
  const wide = serializeSafetensors({
    i: { dtype: "I64", shape: [50], data: ints },
    u: { dtype: "U64", shape: [2], data: new BigUint64Array([0n, 2n ** 31n - 1n]) },
    v: { dtype: "U32", shape: [2], data: new Uint32Array([0, 2 ** 31 - 1]) },
  });
  assertEquals(await readTensorData(wide, "i", { as: "i32" }), Int32Array.from(ints, Number));
  assertEquals(await readTensorData(wide, "u", { as: "i32" }), new Int32Array([0, 2 ** 31 - 1]));
  assertEquals(await readTensorData(wide, "v", { as: "i32" }), new Int32Array([0, 2 ** 31 - 1]));
  ints[11] = 2n ** 31n;
  const bad = serializeSafetensors({ i: { dtype: "I64", shape: [50], data: ints } });
  await assertRejects(() => readTensorData(bad, "i", { as: "i32" }), RangeError, "2147483648 at element 11");
  for (const v of [2n ** 31n, 2n ** 32n - 1n, 2n ** 32n]) {
    const u = serializeSafetensors({ u: { dtype: "U64", shape: [2], data: new BigUint64Array([1n, v]) } });
    await assertRejects(() => readTensorData(u, "u", { as: "i32" }), RangeError, `${v} at element 1`);
  }
});

Deno.test("as: f16 from F64 rounds once; loadSafetensors reports the dtype of what it returns", async () => {
  const hair = 2 ** -40 * (1 + Math.random());
  const bytes = serializeSafetensors({
    d: { dtype: "F64", shape: [2], data: new Float64Array([1 + 2 ** -11 + hair, -(1 + 2 ** -11 - hair)]) },
    n: { dtype: "I32", shape: [1], data: new Int32Array([7]) },
  });
  assertEquals(await readTensorData(bytes, "d", { as: "f16" }), new Uint16Array([0x3c01, 0xbc00]));
  const m = await loadSafetensors(bytes, { as: "f32" });
  assertEquals(m.get("d")!.dtype, "F32");
  assertEquals(m.get("n")!.dtype, "F32");
  assertEquals(m.get("n")!.data, new Float32Array([7]));
  const h = await loadSafetensors(bytes, { as: "f16", names: ["n"] });
  assertEquals([...h.keys()], ["n"]);
  assertEquals(h.get("n"), { dtype: "F16", shape: [1], data: new Uint16Array([0x4700]) });
  const f = await loadSafetensors(bytes, { names: (name) => name.startsWith("d") });
  assertEquals([...f.keys()], ["d"]);
});

Deno.test("reading from bytes: zero-copy views when aligned, copies on request or when misaligned", async () => {
  const t = randomTensor("F32", [5, 3]);
  const file = serializeSafetensors({ a: { dtype: "U8", shape: [3], data: new Uint8Array([1, 2, 3]) }, t });
  const view = await readTensorData(file, "t");
  assert(view.buffer === file.buffer, "aligned native read shares the file's memory");
  const copy = await readTensorData(file, "t", { copy: true });
  assert(copy.buffer !== file.buffer);
  assertSameBytes(copy, t.data, "copy");
  // The same file placed at an odd offset inside a larger buffer: still readable, values intact.
  const shift = 1 + Math.floor(Math.random() * 3);
  const host = new Uint8Array(file.length + shift);
  host.set(file, shift);
  const odd = host.subarray(shift);
  assertSameBytes(await readTensorData(odd, "t"), t.data, "misaligned native");
  assertEquals(await readTensorData(odd, "t", { as: "f16" }), f32ArrayToF16(t.data as Float32Array));
});

Deno.test("a file read touches only the tensor's byte range, and converts in chunks", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/ranges.safetensors`;
    const n = 1001;
    const a = randomTensor("BF16", [n]);
    const big = new BigInt64Array(n).map((_, i) => BigInt(i - 500));
    big[777] = 1n << 40n;
    const bytes = await saveSafetensors(path, {
      a, // BF16 sorts after I64, so "a" is the last tensor
      b: { dtype: "I64", shape: [n], data: big },
    });
    const header = await readSafetensorsHeader(path);
    const ea = getEntry(header, "a"), eb = getEntry(header, "b");
    assert(eb.end === ea.begin && ea.end === bytes.length);

    // Chunked conversion equals the whole-array conversion, whatever the chunk size.
    const whole = bf16ArrayToF32(a.data as Uint16Array);
    for (const chunkBytes of [2, 34, 1000, 1 << 20]) {
      assertEquals(await readTensorData(path, ea, { as: "f32", chunkBytes }), whole);
      assertEquals(await readTensorData(path, ea, { as: "f16", chunkBytes }), bf16ArrayToF16(a.data as Uint16Array));
    }
    const err = await assertRejects(() => readTensorData(path, eb, { as: "i32", chunkBytes: 64 }), RangeError);
    assertStringIncludes(err.message, "1099511627776 at element 777");
    assertStringIncludes(err.message, path);

    // Cut the file inside "a": "b" (before it) still reads; "a" fails naming the file and the tensor.
    await Deno.truncate(path, ea.begin + 10);
    assertSameBytes(await readTensorData(path, eb), big, "b after truncation");
    const cut = await assertRejects(() => readTensorData(path, ea), Error, "truncated");
    assertStringIncludes(cut.message, path);
    assertStringIncludes(cut.message, '"a"');
    await assertRejects(() => readSafetensorsHeader(path), Error, "reach past the end of the data area");

    // Scribbling over "a"'s bytes does not disturb "b".
    const f = await Deno.open(path, { write: true });
    await f.seek(ea.begin, Deno.SeekMode.Start);
    await f.write(randomBytes(10));
    f.close();
    assertSameBytes(await readTensorData(path, eb), big, "b after scribbling on a");
  });
});

Deno.test("headers from other writers: any key order, gaps, numeric metadata, no padding", () => {
  // Offsets out of name order, a 4-byte gap, metadata with a number, no padding: all accepted; file order kept.
  const data = [1, 2, 3, 4, 9, 9, 9, 9, 0, 0, 0x80, 0x3f];
  const json = '{"z":{"dtype":"U8","shape":[2,2],"data_offsets":[0,4]},' +
    '"a":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},"__metadata__":{"step":12,"s":"x"}}';
  const file = handFile(json, data, { pad: false });
  const h = parseSafetensorsHeader(file, { source: "other.safetensors" });
  assertEquals(h.entries.map((e) => [e.name, e.begin - h.dataStart, e.end - h.dataStart]), [["z", 0, 4], ["a", 8, 12]]);
  assertEquals(h.metadata, { step: "12", s: "x" });
  assertEquals(h.source, "other.safetensors");
});

// ---------------------------------------------------------------------------------------------------------------
// safetensors: errors
// ---------------------------------------------------------------------------------------------------------------

Deno.test("clear errors for broken files, each naming the file", async () => {
  await withTempDir(async (dir) => {
    const good = serializeSafetensors({ w: { dtype: "F32", shape: [2], data: new Float32Array([1, 2]) } });
    const cases: [string, Uint8Array, string][] = [
      ["tiny", new Uint8Array([1, 2, 3]), "shorter than the 8-byte prefix"],
      ["cut_header", good.subarray(0, 30), "is truncated: its header says"],
      ["absurd", handFile("{}", [], { length: MAX_HEADER_BYTES + 8 }), "absurd"],
      [
        "absurd_hi",
        (() => {
          const f = handFile("{}");
          f[5] = 1;
          return f;
        })(),
        "absurd",
      ],
      ["longer_than_file", handFile("{}", [], { length: 4096 }), "is truncated"],
      ["bad_json", handFile('{"w":{"dtype":"F32",'), "not valid JSON"],
      ["not_object", handFile("[1,2]"), "not a JSON object"],
      [
        "bad_utf8",
        (() => {
          const f = handFile('{"xx":1}');
          f[10] = 0xff;
          return f;
        })(),
        "not valid UTF-8",
      ],
      ["outside", handFile('{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', new Uint8Array(8)), "reach past"],
      [
        "overlap",
        handFile(
          '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
          new Uint8Array(12),
        ),
        "overlap",
      ],
      [
        "shape",
        handFile('{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', new Uint8Array(8)),
        "needs 12 bytes, but data_offsets [0, 8] span 8",
      ],
      ["dtype", handFile('{"w":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}}', new Uint8Array(8)), "unknown dtype"],
      ["c64", handFile('{"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', new Uint8Array(8)), "cannot hold"],
      ["offsets", handFile('{"w":{"dtype":"U8","shape":[2],"data_offsets":[2]}}', new Uint8Array(8)), "data_offsets"],
      ["negative", handFile('{"w":{"dtype":"U8","shape":[-2],"data_offsets":[0,2]}}', new Uint8Array(8)), "shape"],
      ["reversed", handFile('{"w":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}}', new Uint8Array(8)), "end before"],
    ];
    for (const [i, [name, bytes, message]] of cases.entries()) {
      // Neutral file names, so a message can only match through its own words.
      const path = `${dir}/file${i}.safetensors`;
      await Deno.writeFile(path, bytes);
      const e1 = await assertRejects(() => readSafetensorsHeader(path), Error, message, name);
      assertStringIncludes(e1.message, path, `${name}: the message names the file`);
      const e2 = assertThrows(() => parseSafetensorsHeader(bytes, { source: `bytes${i}` }), Error, message, name);
      assertStringIncludes(e2.message, `bytes${i}`);
      await assertRejects(() => loadSafetensors(path), Error, message, name);
    }
    await assertRejects(() => readSafetensorsHeader(`${dir}/missing.safetensors`), Error, "No such file");
  });
});

Deno.test("a missing tensor name lists names the file does have", async () => {
  const tensors: Record<string, TensorToSave> = {};
  for (let i = 0; i < 8; i++) tensors[`model.layers.${i}.mlp.up_proj.weight`] = randomTensor("F16", [2, 2]);
  await withTempDir(async (dir) => {
    const path = `${dir}/m.safetensors`;
    await saveSafetensors(path, tensors);
    const e = await assertRejects(() => readTensorData(path, "up_proj.weight"), Error, "has no tensor named");
    assertStringIncludes(e.message, path);
    assertStringIncludes(e.message, "model.layers.0.mlp.up_proj.weight");
    assertStringIncludes(e.message, "8 tensors in all");
    const e2 = await assertRejects(() => loadSafetensors(path, { names: ["lm_head.weight"] }), Error, path);
    assertStringIncludes(e2.message, '"lm_head.weight"');
  });
});

Deno.test("clear errors for bad input to the writer", () => {
  const f = new Float32Array(4);
  assertThrows(
    () => serializeSafetensors({ w: { dtype: "F16", shape: [4], data: f } }),
    Error,
    "dtype F16 needs a Uint16Array (float16 bits: convert with f32ArrayToF16), got Float32Array",
  );
  assertThrows(() => serializeSafetensors({ w: { dtype: "F32", shape: [5], data: f } }), Error, "has 5 elements but");
  assertThrows(() => serializeSafetensors({ w: { dtype: "F32", shape: [2.5], data: f } }), Error, "shape");
  assertThrows(
    () => serializeSafetensors({ w: { dtype: "Q4" as SafetensorsDtype, shape: [4], data: f } }),
    Error,
    "unknown dtype",
  );
  assertThrows(() => serializeSafetensors({ __metadata__: { dtype: "F32", shape: [4], data: f } }), Error, "reserved");
  assertThrows(
    () => serializeSafetensors({}, { epoch: 3 } as unknown as Record<string, string>),
    Error,
    "must be a string",
  );
  assertThrows(
    () => serializeSafetensors({ ["bad\ud800"]: { dtype: "F32", shape: [4], data: f } }),
    Error,
    "surrogate",
  );
});
