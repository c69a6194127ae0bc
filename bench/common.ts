/**
 * Shared benchmark utilities: flags, one JSON line per case (stdout, and `--json FILE`), GPU-timestamp timing
 * through `gpu.time` (warm-up, an iteration count that fills a target time, the median of repeats), a meta line
 * describing the machine, and plain-text tables for the end of a run.
 *
 * Line schema (shared with bench/torch_ref.py, see bench/README.md):
 * `{"suite", "case", "impl", "ms", "ms_min", "iters", "repeats", "tflops" | "gbps", ...}`; lines without "ms" are
 * "meta", "skipped" (with a reason) or "error" (with the message).
 *
 * @example
 * ```ts
 * import { BenchLog, benchFlags, timeGpu } from "./common.ts";
 * const flags = benchFlags(Deno.args);
 * const log = new BenchLog(flags.json);
 * const t = await timeGpu(() => record(), flags);
 * await log.emit({ suite: "matmul", case: "1024x1024x1024", impl: "webtune-f32", ...t });
 * ```
 * @module
 */
import { parseArgs } from "@std/cli";
import { appendText, writeText } from "../core/platform.ts";
import { getGpu } from "../core/gpu.ts";
import { gridFor } from "../core/kernels/common.ts";
import { Tensor } from "../core/tensor.ts";

/** Flags every benchmark understands. */
export interface BenchFlags {
  /** Also write the JSON lines to this file. */
  json?: string;
  /** Fewer repeats, shorter target time, and the largest shapes skipped. */
  quick: boolean;
  /** Time several kernel configurations per case (tuning). */
  sweep: boolean;
  /** Tiny shapes and one repeat (to test the script on a CPU driver). */
  smoke: boolean;
  /** Only cases whose name contains this text. */
  only?: string;
  /** Seconds after which optional work (sweep variants) is skipped. */
  budgetS: number;
  /** Median of this many timed batches. */
  repeats: number;
  /** Each timed batch runs about this long (ms). */
  targetMs: number;
  /** Untimed calls first. */
  warmup: number;
  /**
   * Then keep the GPU busy with the measured work for this long (ms, wall clock) before timing: an H200 idles at
   * 345 MHz and short kernels measured right after compiles and read-backs ran up to 5.7× slow (bench/NOTES.md).
   */
  warmupMs: number;
}

/** Parses the common flags: `--json FILE --quick --sweep --smoke --only TEXT --budget SECONDS`. */
export function benchFlags(args: string[]): BenchFlags {
  const f = parseArgs(args, {
    string: ["json", "only", "budget"],
    boolean: ["quick", "sweep", "smoke", "help"],
    alias: { h: "help" },
  });
  if (f.help) {
    console.log(
      "flags: --json FILE (also write JSON lines there)  --quick  --sweep (time several kernel configs per case)\n" +
        "       --smoke (tiny shapes)  --only TEXT (cases containing TEXT)  --budget SECONDS (stop optional work)",
    );
    throw new Error("help shown");
  }
  const quick = !!f.quick, smoke = !!f.smoke;
  return {
    json: f.json as string | undefined,
    quick,
    sweep: !!f.sweep,
    smoke,
    only: f.only as string | undefined,
    budgetS: f.budget ? Number(f.budget) : Infinity,
    repeats: smoke ? 1 : quick ? 3 : 5,
    targetMs: smoke ? 1 : quick ? 15 : 40,
    warmup: smoke ? 1 : 2,
    warmupMs: smoke ? 0 : quick ? 100 : 200,
  };
}

/** One timing result: median and minimum milliseconds per call. */
export interface Timing {
  /** Median over repeats of the mean time per call, ms. */
  ms: number;
  /** Fastest repeat, ms per call. */
  ms_min: number;
  /** Calls per timed batch. */
  iters: number;
  /** Timed batches. */
  repeats: number;
}

/** The median of a list of numbers. */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/**
 * GPU time per call of `record` (which records dispatches and returns): `warmup` untimed calls, untimed batches
 * for `warmupMs` of wall clock (so the GPU's clocks are up), one timed call to size the batch, then `repeats`
 * batches of `iters` calls each inside one timestamped compute pass. Returns the median.
 */
export async function timeGpu(
  record: () => void,
  opts: { repeats: number; targetMs: number; warmup: number; warmupMs?: number; maxIters?: number },
): Promise<Timing> {
  const gpu = getGpu();
  for (let i = 0; i < opts.warmup; i++) record();
  await gpu.sync();
  const d0 = gpu.dispatchCount;
  let first = await gpu.time(record);
  const perCall = Math.max(1, gpu.dispatchCount - d0);
  const cap = Math.max(1, Math.floor(4000 / perCall));
  const itersFor = (ms: number) =>
    Math.max(1, Math.min(cap, opts.maxIters ?? 1000, Math.round(opts.targetMs / Math.max(ms, 1e-3))));
  if (opts.warmupMs) {
    const t0 = performance.now(), n = itersFor(first);
    while (performance.now() - t0 < opts.warmupMs) {
      for (let i = 0; i < n; i++) record();
      await gpu.sync();
    }
    first = await gpu.time(record);
  }
  const iters = itersFor(first);
  const samples: number[] = [];
  for (let r = 0; r < opts.repeats; r++) {
    samples.push(
      await gpu.time(() => {
        for (let i = 0; i < iters; i++) record();
      }) / iters,
    );
  }
  return { ms: median(samples), ms_min: Math.min(...samples), iters, repeats: samples.length };
}

/** Runs `fn` with GPU validation/internal/out-of-memory errors captured; returns the first error message or null. */
export async function captureGpuErrors(fn: () => void | Promise<void>): Promise<string | null> {
  const gpu = getGpu();
  const dev = gpu.device;
  dev.pushErrorScope("out-of-memory");
  dev.pushErrorScope("internal");
  dev.pushErrorScope("validation");
  let thrown: string | null = null;
  try {
    await fn();
    gpu.flush();
  } catch (e) {
    thrown = (e as Error).message;
  }
  const errs = [await dev.popErrorScope(), await dev.popErrorScope(), await dev.popErrorScope()];
  const e = errs.find((x) => x !== null);
  return e ? e.message : thrown;
}

/** Writes JSON lines to stdout and, when given, appends them to a file (created empty first). */
export class BenchLog {
  /** Every line emitted so far. */
  readonly lines: Record<string, unknown>[] = [];
  private ready: Promise<void>;
  private readonly path?: string;

  /** Starts a log; `path` (optional) is truncated. */
  constructor(path?: string) {
    this.path = path;
    this.ready = path ? writeText(path, "") : Promise.resolve();
  }

  /** Prints one line (rounding floats to 4 significant digits) and appends it to the file. */
  async emit(rec: Record<string, unknown>): Promise<void> {
    const clean: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(rec)) {
      clean[k] = typeof v === "number" && !Number.isInteger(v) && Number.isFinite(v) ? Number(v.toPrecision(4)) : v;
    }
    this.lines.push(clean);
    const line = JSON.stringify(clean);
    console.log(line);
    if (this.path) {
      await this.ready;
      this.ready = appendText(this.path, line + "\n");
      await this.ready;
    }
  }
}

/** The meta line: date, adapter, features, runtime. */
export function metaLine(suite: string, flags: BenchFlags): Record<string, unknown> {
  const gpu = getGpu();
  const d = (globalThis as { Deno?: { version?: { deno: string } } }).Deno;
  return {
    suite: "meta",
    case: "env",
    impl: "webtune",
    bench: suite,
    date: new Date().toISOString(),
    device: gpu.info.description,
    vendor: gpu.info.vendor,
    shader_f16: gpu.info.shaderF16,
    timestamps: gpu.info.timestampQuery,
    max_workgroup_storage: gpu.info.maxComputeWorkgroupStorageSize,
    deno: d?.version?.deno,
    quick: flags.quick,
    sweep: flags.sweep,
    repeats: flags.repeats,
    target_ms: flags.targetMs,
  };
}

/** Formats rows as an aligned plain-text table (first row is the header). */
export function textTable(rows: (string | number)[][]): string {
  const cells = rows.map((r) => r.map((c) => (typeof c === "number" ? fmtNum(c) : c)));
  const widths = cells[0].map((_, j) => Math.max(...cells.map((r) => (r[j] ?? "").length)));
  return cells.map((r) => r.map((c, j) => (c ?? "").padEnd(widths[j])).join("  ").trimEnd()).join("\n");
}

/** 3 significant digits, no exponent for ordinary magnitudes. */
export function fmtNum(x: number): string {
  if (!Number.isFinite(x)) return String(x);
  if (Math.abs(x) >= 100) return x.toFixed(0);
  if (Math.abs(x) >= 10) return x.toFixed(1);
  if (Math.abs(x) >= 1) return x.toFixed(2);
  return x.toPrecision(3);
}

/**
 * Device-to-device copy bandwidth with a plain vec4 WGSL copy of `bytes` bytes: the ceiling memory-bound kernels
 * (GEMV) are judged against. GB/s counts the bytes read plus the bytes written.
 *
 * @example
 * ```ts
 * const { timing, gbps } = await copyBandwidth(1 << 30, flags);
 * ```
 */
export async function copyBandwidth(
  bytes: number,
  opts: Parameters<typeof timeGpu>[1],
): Promise<{ timing: Timing; gbps: number }> {
  const gpu = getGpu();
  const src = Tensor.empty([bytes / 4], "f32"), dst = Tensor.empty([bytes / 4], "f32");
  const k = gpu.kernel({
    name: "copy_bw",
    code: `@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
  let i = gid.x + gid.y * nwg.x * 256u;
  if (i < ${bytes / 16}u) { dst[i] = src[i]; }
}`,
    bindings: ["read", "write"],
    uniforms: false,
  });
  const grid = gridFor(bytes / 16, 256);
  try {
    const timing = await timeGpu(() => gpu.dispatch(k, [src.storage.buffer, dst.storage.buffer], null, grid), opts);
    return { timing, gbps: (2 * bytes) / (timing.ms / 1e3) / 1e9 };
  } finally {
    src.dispose();
    dst.dispose();
  }
}
