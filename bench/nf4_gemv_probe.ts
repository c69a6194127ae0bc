/**
 * NF4 GEMV probe (suite "quant-probe"): what limits the decoding GEMV (bench/NOTES.md has the findings).
 *
 * - Per case (1×K×N, f16 x, block 64, double quantization), the chooser's GEMV as generated and with one part
 *   removed or rewritten: the code lookups (`no-lut`: the index converted to f32 as the value), the absmax
 *   (`no-scale`), the loads of x (`no-x`), all three, and `shift-mask` (the nibble extraction written as shift and
 *   mask instead of `extractBits`); next to kernels that only move bytes: `read-only` (threads xor the packed
 *   weights, 16 bytes per load) and `copy-same-bytes`. GB/s counts the GEMV's bytes (4.13 bits per weight, x, y).
 * - `micro-45M`: 45 M random packed weights (the 11008 × 4096 case) read by grid-stride threads, each doing one
 *   kind of per-weight decode: nothing (`xor`), the nibble extraction alone (`extract-int`), the 16-entry f32 code
 *   table (`lut-f32`, and `lut-f32-u8` with nibbles split by `unpack4xU8`), byte-pair tables of `vec2<f16>` with 1,
 *   8, 16 or 32 copies (`pair-cN-u8`, one packed f16 multiply-add per pair) or of `vec2<f32>` (`pairf32-cN-u8`),
 *   and a 32-copy table's fill alone (`init-only-c32`). `gweights` = weights decoded per second.
 *
 * The probes' results are wrong on purpose and not checked; the real kernel is checked by bench/quant.ts.
 *
 * Run: `deno run -A bench/nf4_gemv_probe.ts [--json FILE] [--quick]`
 * @module
 */
import { fromArray, init, Tensor } from "../mod.ts";
import { randn } from "../core/creation.ts";
import { getGpu, type KernelSource } from "../core/gpu.ts";
import { gridFor, rowGrid, UniformWriter } from "../core/kernels/common.ts";
import { nf4GemvKernel } from "../core/kernels/nf4.ts";
import { NF4_CODE } from "../quant/codes.ts";
import { NF4_GEMV_CONFIG, nf4Tensors, quantizeNf4Gpu } from "../quant/nf4.ts";
import { benchFlags, BenchLog, copyBandwidth, metaLine, timeGpu } from "./common.ts";

const flags = benchFlags(Deno.args);
await init();
const gpu = getGpu();
const log = new BenchLog(flags.json);
await log.emit(metaLine("quant-probe", flags));

const config = NF4_GEMV_CONFIG; // the chooser's GEMV
const probes: [string, (code: string) => string][] = [
  ["as-generated", (c) => c],
  ["no-lut", (c) => c.replace(/nf4Lut\[(extractBits\([^()]*\))\]/g, "f32($1)")],
  ["no-scale", (c) => c.replace(/let s(\d) = absmaxAt\([^;]*;/g, "let s$1 = 1.0;")],
  ["no-x", (c) => c.replace(/let xv(\d) = A\[[^;]*;/g, "let xv$1 = vec4<u32>(lid, lid, lid, lid);")],
  ["shift-mask", (c) => c.replace(/extractBits\(([^(),]*), (\d+)u, 4u\)/g, "(($1 >> $2u) & 15u)")],
  ["no-lut-no-scale-no-x", (c) => probes[3][1](probes[2][1](probes[1][1](c)))],
];

for (const [K, N] of [[4096, 4096], [4096, 11008], [11008, 4096]]) {
  const name = `1x${K}x${N}`;
  const W = randn([N, K], { dtype: "f16", std: 0.02 });
  const x = randn([1, K], { dtype: "f16" });
  const q = quantizeNf4Gpu(W, { blockSize: 64, doubleQuant: true });
  W.dispose();
  const y = Tensor.empty([1, N], "f16");
  const n = q.nested!;
  const bytes = nf4Tensors(q).filter((t) => t !== n.map).reduce((s, t) => s + t.numel * 4, 0) + (K + N) * 2;
  const u = new UniformWriter(8).u(0, 1).u(1, N).u(2, K).u(3, K).u(4, x.offset).u(5, N).u(6, 0).u(7, 0);
  const bufs = [x.buffer, q.packed.buffer, n.quantized.buffer, n.scale.buffer, n.map.buffer, n.offset.buffer, y.buffer];
  const src = nf4GemvKernel({
    ...config,
    x: "f16",
    out: "f16",
    rows: 1,
    unit: 32,
    blockSize: 64,
    absmax: "double",
    code: NF4_CODE,
  });
  const emit = async (probe: string, run: () => void) => {
    const t = await timeGpu(run, { ...flags, maxIters: 1000 });
    await log.emit({ suite: "quant-probe", case: name, probe, ...t, gbps: bytes / (t.ms / 1e3) / 1e9 });
  };
  for (const [probe, edit] of probes) {
    const code = edit(src.code);
    if (probe !== "as-generated" && code === src.code) throw new Error(`probe ${probe} changed nothing`);
    const k = gpu.kernel({ ...src, name: `${src.name}_${probe}`, code });
    await emit(probe, () => gpu.dispatch(k, bufs, u.u32, rowGrid(Math.ceil(N / config.rowsPerGroup))));
  }
  // The same bytes, only read: each thread xors 16-byte loads (grid-stride) and writes one word.
  const words = q.packed.numel / 4, threads = Math.min(words, 132 * 2048);
  const out = Tensor.empty([threads], "f32");
  const read: KernelSource = {
    name: "read_only",
    code: `@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let t = gid.x + gid.y * nwg.x * 256u;
  if (t >= ${threads}u) { return; }
  var v = vec4<u32>();
  for (var i = t; i < ${words}u; i += ${threads}u) { v ^= src[i]; }
  dst[t] = v.x ^ v.y ^ v.z ^ v.w;
}`,
    bindings: ["read", "write"],
    uniforms: false,
  };
  const rk = gpu.kernel(read);
  await emit("read-only", () => gpu.dispatch(rk, [q.packed.buffer, out.buffer], null, gridFor(threads, 256)));
  const copy = await copyBandwidth(Math.ceil(q.packed.numel * 4 / 256) * 256, flags);
  await log.emit({ suite: "quant-probe", case: name, probe: "copy-same-bytes", ...copy.timing, gbps: copy.gbps });
  for (const t of [x, y, out, ...nf4Tensors(q)]) t.dispose();
}
// Micro-kernels over 45 M packed weights (the 11008 x 4096 case): each thread reads vec4<u32> words (grid-stride,
// coalesced) and does one kind of per-weight work, summed into its output so nothing is dead code.
{
  const weights = 11008 * 4096, vecs = weights / 32, threads = 132 * 4 * 256;
  const random = new Uint32Array(weights / 8);
  for (let i = 0; i < random.length; i++) random[i] = (Math.random() * 2 ** 32) >>> 0;
  const packed = fromArray(random, [random.length], { dtype: "u32" }), out = Tensor.empty([threads], "f32");
  const lutS = fromArray(NF4_CODE, [16]), pairS = Tensor.empty([512], "f16");
  const nib = (w: string, j: number) => `extractBits(${w}, ${(j >> 1) * 8 + ((j & 1) === 0 ? 4 : 0)}u, 4u)`;
  // Per word w (k = its place in the vec4, so each has its own accumulators): what one kind of decode costs.
  const pairs = (w: string) => `let b${w.slice(-2, -1)} = unpack4xU8(${w});`;
  const perWord: [string, number, (w: string, k: number) => string][] = [
    ["xor", 1, (w, k) => `bits${k} ^= ${w};`],
    ["extract-int", 1, (w, k) => Array.from({ length: 8 }, (_, j) => `bits${k} += ${nib(w, j)};`).join(" ")],
    ["lut-f32", 1, (w, k) => Array.from({ length: 8 }, (_, j) => `acc${k} += lut[${nib(w, j)}];`).join(" ")],
    [
      "lut-f32-u8",
      1,
      (w, k) =>
        `{ let lo = unpack4xU8(${w} & 0x0F0F0F0Fu); let hi = unpack4xU8((${w} >> 4u) & 0x0F0F0F0Fu); ` +
        `acc${k} += ((lut[hi.x] + lut[lo.x]) + (lut[hi.y] + lut[lo.y])) + ((lut[hi.z] + lut[lo.z]) + (lut[hi.w] + lut[lo.w])); }`,
    ],
    ...[1, 8, 16, 32].map((c): [string, number, (w: string, k: number) => string] => [
      `pair-c${c}-u8`,
      c,
      (w, k) => {
        const at = (q: string) => c === 1 ? `pair[b${k}.${q}]` : `pair[b${k}.${q} * ${c}u + (lid & ${c - 1}u)]`;
        return `{ ${pairs(w)} h${k} = fma(${at("x")}, xh0, fma(${at("y")}, xh1, fma(${at("z")}, xh0, ` +
          `fma(${at("w")}, xh1, h${k})))); }`;
      },
    ]),
    ["init-only-c32", 32, (w, k) => `bits${k} ^= ${w};`],
    // Tables in storage buffers (read through L1): no index clamp from the shader compiler, no workgroup fill.
    ["lut-f32-storage", 1, (w, k) => Array.from({ length: 8 }, (_, j) => `acc${k} += lutS[${nib(w, j)}];`).join(" ")],
    [
      "pair-f16-storage",
      1,
      (w, k) =>
        `{ ${pairs(w)} h${k} = fma(pairS[b${k}.x], xh0, fma(pairS[b${k}.y], xh1, fma(pairS[b${k}.z], xh0, ` +
        `fma(pairS[b${k}.w], xh1, h${k})))); }`,
    ],
    // The pair table in f32 (vec2<f32>, 8 bytes): 16 copies are conflict-free (a 64-bit access is served per half-warp).
    ...[8, 16].map((c): [string, number, (w: string, k: number) => string] => [
      `pairf32-c${c}-u8`,
      -c,
      (w, k) => {
        const at = (q: string) => `pairF[b${k}.${q} * ${c}u + (lid & ${c - 1}u)]`;
        return `{ ${pairs(w)} acc${k} += (dot(${at("x")}, xf0) + dot(${at("y")}, xf1)) + ` +
          `(dot(${at("z")}, xf0) + dot(${at("w")}, xf1)); }`;
      },
    ]),
  ];
  const cheap = ["pair-c32-u8-const-init", 32, perWord.find((p) => p[0] === "pair-c32-u8")![2]] as const;
  for (const [probe, c, body] of [...perWord, cheap]) {
    const code = `enable f16;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read> lutS: array<f32>;
@group(0) @binding(4) var<storage, read> pairS: array<vec2<f16>>;
var<workgroup> lut: array<f32, 16>;
var<workgroup> pair: array<vec2<f16>, ${256 * Math.max(c, 1)}>;
var<workgroup> pairF: array<vec2<f32>, ${256 * Math.max(-c, 1)}>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  if (lid < 16u) { lut[lid] = f32(lid) * 0.1 - 0.7; }
  for (var i = lid; i < ${256 * Math.max(-c, 0)}u; i += 256u) { pairF[i] = vec2<f32>(f32(i & 15u), f32(i >> 4u)); }
  for (var i = lid; i < ${256 * Math.max(c, 0)}u; i += 256u) {
    pair[i] = ${probe.endsWith("const-init") ? "vec2<f16>(0.5h, -0.25h)" : "vec2<f16>(f16(i & 15u), f16(i >> 4u))"};
  }
  workgroupBarrier();
  let t = gid.x;
  ${[0, 1, 2, 3].map((k) => `var acc${k} = 0.0; var bits${k} = 0u; var h${k} = vec2<f16>();`).join(" ")}
  let xh0 = vec2<f16>(f16(lid & 7u), 0.5h); let xh1 = vec2<f16>(0.25h, f16(lid & 3u));
  let xf0 = vec2<f32>(f32(lid & 7u), 0.5); let xf1 = vec2<f32>(0.25, f32(lid & 3u));
  for (var i = t; i < ${vecs}u; i += ${threads}u) {
    let v = src[i];
    ${[0, 1, 2, 3].map((k) => body(`v[${k}]`, k)).join("\n    ")}
  }
  let h = (h0 + h1) + (h2 + h3);
  dst[t] = (acc0 + acc1) + (acc2 + acc3) + f32((bits0 ^ bits1) ^ (bits2 ^ bits3)) + f32(h.x) + f32(h.y);
}`;
    const k = gpu.kernel({
      name: `micro_${probe}`,
      code,
      bindings: ["read", "write", "read", "read"],
      uniforms: false,
    });
    const bufs = [packed.buffer, out.buffer, lutS.buffer, pairS.buffer];
    const t = await timeGpu(() => gpu.dispatch(k, bufs, null, [threads / 256]), {
      ...flags,
      maxIters: 1000,
    });
    await log.emit({ suite: "quant-probe", case: "micro-45M", probe, ...t, gweights: weights / (t.ms / 1e3) / 1e9 });
  }
  for (const t of [packed, out, lutS, pairS]) t.dispose();
}
const bigBytes = Math.min(1 << 30, gpu.info.maxStorageBufferBindingSize);
const big = await copyBandwidth(bigBytes, flags);
await log.emit({
  suite: "quant-probe",
  case: "copy-big",
  probe: "copy",
  bytes: bigBytes,
  ...big.timing,
  gbps: big.gbps,
});
