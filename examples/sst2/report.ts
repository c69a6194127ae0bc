/**
 * The experiment's report: `results.json` (every run's metrics and the study's numbers), `results.md` (a table laid
 * out like the study's Table 2, a details table, and the study's own table for reference) and `loss.svg` (the
 * training-loss curves against optimizer steps, smoothed with a moving window, like the study's Figure 1). The SVG
 * is written by hand: no dependencies, readable at a glance.
 *
 * @example
 * ```ts
 * import { writeReport } from "./report.ts";
 * const markdown = await writeReport("runs/sst2_compare", [loraMetrics, qloraMetrics]);
 * console.log(markdown);
 * ```
 * @module
 */
import { joinPath, makeDir, writeText } from "../../core/platform.ts";
import { llamaPreset } from "../../nn/llama.ts";
import { fmtCount } from "./config.ts";
import type { RunMetrics } from "./run.ts";

/** One row of the study's Table 2 (Llama-2-7B on SST-2). */
export interface StudyRow {
  /** Row label. */
  method: string;
  /** Dev accuracy, fraction. */
  accuracy: number;
  /** Dev F1, fraction. */
  f1: number;
  /** Peak VRAM as reported, GB. */
  peakGb: number;
  /** Training time, minutes. */
  trainMinutes: number;
  /** Inference speed, tokens/s. */
  tokensPerSecond: number;
}

/** The study's Table 2 ("Качество и эффективность моделей на SST-2 (dev)"). */
export const STUDY_TABLE2: readonly StudyRow[] = [
  { method: "LoRA (7B)", accuracy: 0.9541, f1: 0.9541, peakGb: 16.6, trainMinutes: 31.53, tokensPerSecond: 28.51 },
  { method: "QLoRA (7B)", accuracy: 0.9599, f1: 0.9599, peakGb: 13.4, trainMinutes: 65.17, tokensPerSecond: 26.75 },
];

/** The study's LoRA modules and rank, for the trainable-parameter count it implies but does not report. */
const STUDY_TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/** LoRA parameters of rank `r` on the study's six modules of Llama-2-7B: Σ r · (in + out) over the layers. */
export function studyTrainableParameters(r = 16): number {
  const c = llamaPreset("llama-2-7b");
  const h = c.hiddenSize, i = c.intermediateSize;
  const shapes: Record<string, [number, number]> = {
    q_proj: [h, h],
    v_proj: [h, h],
    o_proj: [h, h],
    gate_proj: [h, i],
    up_proj: [h, i],
    down_proj: [i, h],
  };
  return c.numHiddenLayers * STUDY_TARGETS.reduce((a, m) => a + r * (shapes[m][0] + shapes[m][1]), 0);
}

/** NF4 with double quantization: 4 bits + an 8-bit absmax per 64 weights + an f32 scale per 256 absmax values. */
export const NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256);

// ---------------------------------------------------------------------------------------------------------------
// Formatting.

function pct(x: number): string {
  return `${(100 * x).toFixed(2)}%`;
}

/** Bytes as GiB with two decimals, or MiB below 1 GiB. */
export function fmtMemory(bytes: number): string {
  return bytes >= 2 ** 30 ? `${(bytes / 2 ** 30).toFixed(2)} GiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

/** Seconds as "31.5 min" (or "42.0 s" under a minute). */
export function fmtMinutes(seconds: number): string {
  return seconds >= 60 ? `${(seconds / 60).toFixed(1)} min` : `${seconds.toFixed(1)} s`;
}

function fmtRate(tps: number): string {
  return tps >= 100 ? `${tps.toFixed(0)} tok/s` : `${tps.toFixed(1)} tok/s`;
}

/** The header of the Table 2 layout (shared by our table and the study's). */
export const TABLE2_HEADER = [
  "Method",
  "Accuracy",
  "F1",
  "Peak GPU memory",
  "Training time",
  "Inference speed",
  "Trainable params",
  "Bits / base param",
] as const;

function mdTable(header: readonly string[], rows: string[][], align: ("l" | "r")[]): string {
  const sep = align.map((a) => (a === "r" ? "---:" : "---"));
  return [header, sep, ...rows].map((r) => `| ${r.join(" | ")} |`).join("\n");
}

/**
 * Our runs in the study's Table 2 layout, plus trainable parameters and bits per base parameter. Accuracy of a
 * large model with random weights is shown as "n/a" (it would mean nothing).
 *
 * @example
 * ```ts
 * console.log(resultsTable([lora, qlora]));
 * ```
 */
export function resultsTable(runs: RunMetrics[]): string {
  const rows = runs.map((m) => {
    const e = m.eval;
    const acc = !e ? "—" : m.accuracyMeaningful ? pct(e.accuracy) : "n/a¹";
    const f1 = !e ? "—" : m.accuracyMeaningful ? pct(e.f1) : "n/a¹";
    const p = m.parameters;
    return [
      m.label,
      acc,
      f1,
      fmtMemory(m.train.peakBytes),
      fmtMinutes(m.train.trainSeconds),
      m.inference ? fmtRate(m.inference.tokensPerSecond) : "—",
      `${p.trainable.toLocaleString("en-US")} (${p.trainablePercent.toFixed(2)}%)`,
      m.bitsPerBaseParameter.toFixed(3),
    ];
  });
  return mdTable(TABLE2_HEADER, rows, ["l", "r", "r", "r", "r", "r", "r", "r"]);
}

/**
 * The study's Table 2 in the same layout; trainable parameters and bits per base parameter are computed from its
 * settings (it does not report them).
 *
 * @example
 * ```ts
 * console.log(studyTable());
 * ```
 */
export function studyTable(): string {
  const trainable = studyTrainableParameters(16);
  const all = 6_738_415_616 + trainable; // Llama-2-7B + adapters, counted as PEFT prints them
  const rows = STUDY_TABLE2.map((s, i) => [
    s.method,
    pct(s.accuracy),
    pct(s.f1),
    `${s.peakGb.toFixed(1)} GB`,
    `${s.trainMinutes.toFixed(1)} min`,
    fmtRate(s.tokensPerSecond),
    `${trainable.toLocaleString("en-US")}² (${((100 * trainable) / all).toFixed(2)}%)`,
    i === 0 ? "16²" : `${NF4_DQ_BITS.toFixed(3)}²`,
  ]);
  return mdTable(TABLE2_HEADER, rows, ["l", "r", "r", "r", "r", "r", "r", "r"]);
}

/** Steps, step time, throughput, the other accuracy measures, and memory of the weights. */
export function detailsTable(runs: RunMetrics[]): string {
  const header = [
    "Method",
    "Steps",
    "s / step",
    "Train tok/s",
    "Macro-F1",
    "Unparseable",
    "Log-prob accuracy",
    "Majority-class accuracy",
    "Eval generation",
    "Weights + adapters",
  ];
  const rows = runs.map((m) => {
    const e = m.eval;
    const meaningful = (s: string) => (m.accuracyMeaningful ? s : "n/a¹");
    return [
      m.label,
      String(m.train.steps),
      m.train.secondsPerStep.toFixed(3),
      m.train.tokensPerSecond.toFixed(0),
      e ? meaningful(pct(e.f1Macro)) : "—",
      e ? `${e.unparseable} / ${e.n}` : "—",
      e ? meaningful(pct(e.logprobAccuracy)) : "—",
      e ? pct(e.majorityAccuracy) : "—",
      e ? `${fmtRate(e.tokensPerSecond)} (batch ${String((m.config.eval as { batch_size: number }).batch_size)})` : "—",
      fmtMemory(m.modelBytes),
    ];
  });
  return mdTable(header, rows, ["l", ...header.slice(1).map(() => "r" as const)]);
}

/**
 * The whole Markdown report: our table, details, notes, and the study's table for reference.
 *
 * @example
 * ```ts
 * await Deno.writeTextFile("results.md", resultsMarkdown([lora, qlora]));
 * ```
 */
export function resultsMarkdown(runs: RunMetrics[], skipped: { method: string; reason: string }[] = []): string {
  const first = runs[0];
  const lines: string[] = [];
  const names = [...runs.map((r) => r.label), ...skipped.map((s) => s.method)].join(" vs ");
  lines.push(`## ${names} on SST-2 — this run`, "");
  if (first) {
    const cfg = first.config as { train: { seed: number; batch_size: number; grad_accum: number } };
    lines.push(
      `Model \`${first.model}\` (${fmtCount(first.modelParameters)} parameters${
        first.modelKind === "random" ? ", random weights" : ""
      }); ${first.data.trainExamples.toLocaleString("en-US")} training sentences, effective batch ` +
        `${cfg.train.batch_size} × ${cfg.train.grad_accum}, seed ${cfg.train.seed}` +
        `${
          runs.length > 1 ? " (the same data order for every method)" : ""
        }; ${first.data.devExamples} dev sentences; ${first.device}${first.cpuAdapter ? " (CPU adapter)" : ""}; ` +
        `${first.startedAt.slice(0, 10)}.`,
      "",
      resultsTable(runs),
      "",
      "Accuracy and F1 (positive class): greedy generation of the answer, unparseable answers counted wrong. Peak GPU " +
        "memory: `memoryStats().peakBytes` during training, weights included. Training time: the training loop's " +
        "wall time, evaluation excluded (one untimed forward + backward compiles the kernels first). Inference speed: batch-1 greedy decoding of 32 tokens with the KV cache, " +
        "adapters unmerged. Bits / base param: storage of the base's linear layers (LM head excluded). " +
        "Majority-class accuracy: always answering the evaluated sentences' more frequent label, the level to beat.",
      "",
      detailsTable(runs),
      "",
    );
  }
  for (const s of skipped) lines.push(`- ${s.method} was not run: ${s.reason}`);
  // Notes every run shares are printed once; the others carry the run's label.
  const shared = runs.length > 1 ? runs[0].notes.filter((n) => runs.every((r) => r.notes.includes(n))) : [];
  const notes = [
    ...shared,
    ...runs.flatMap((r) =>
      r.notes.filter((n) => !shared.includes(n)).map((n) => (runs.length > 1 ? `${r.label}: ${n}` : n))
    ),
  ];
  if (runs.some((r) => !r.accuracyMeaningful)) {
    notes.unshift("¹ Random weights of a large model: accuracy is not meaningful and is not shown.");
  }
  if (notes.length > 0 || skipped.length > 0) lines.push(...notes.map((n) => `- ${n}`), "");
  lines.push(
    "## The study (Table 2: Llama-2-7B, all 67,349 training sentences, the 872-sentence dev set)",
    "",
    studyTable(),
    "",
    "² Not reported by the study; computed from its settings (r = 16, alpha = 16 on q, v, o, gate, up, down of " +
      "Llama-2-7B; NF4 with double quantization: 4 + 8/64 + 32/(64·256) bits). The study's QLoRA section also says " +
      "r = 8, which would halve its adapters.",
    "",
  );
  return lines.join("\n");
}

// ---------------------------------------------------------------------------------------------------------------
// loss.svg

/** A loss curve: optimizer steps (1-based) and their losses. */
export interface LossSeries {
  /** Legend label. */
  label: string;
  /** Step numbers. */
  steps: number[];
  /** Loss per step. */
  losses: number[];
}

/**
 * Trailing moving average (the Trainer's `loss_avg`): element i is the mean of the last `window` values up to i.
 *
 * @example
 * ```ts
 * movingAverage([1, 2, 3, 4], 2); // [1, 1.5, 2.5, 3.5]
 * ```
 */
export function movingAverage(values: number[], window: number): number[] {
  const w = Math.max(1, Math.floor(window));
  const out: number[] = [];
  let sum = 0;
  values.forEach((v, i) => {
    sum += v;
    if (i >= w) sum -= values[i - w];
    out.push(sum / Math.min(i + 1, w));
  });
  return out;
}

/** A smoothing window for `n` steps: about a tenth of the run, between 1 and 20 steps. */
export function smoothingWindow(n: number): number {
  return Math.max(1, Math.min(20, Math.round(n / 10)));
}

/**
 * "Nice" tick values (1, 2, 2.5, 5 × 10^k) covering [lo, hi] with about `count` ticks; whole numbers only when
 * `integer` (optimizer steps).
 *
 * @example
 * ```ts
 * niceTicks(0.13, 0.92); // [0, 0.2, 0.4, 0.6, 0.8, 1]
 * ```
 */
export function niceTicks(lo: number, hi: number, count = 6, integer = false): number[] {
  if (!(hi > lo)) {
    const d = integer ? 1 : Math.abs(lo) > 0 ? Math.abs(lo) * 0.05 : 1;
    return niceTicks(lo - d, lo + d, count, integer);
  }
  const raw = (hi - lo) / Math.max(1, count - 1);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const nice = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  const step = integer ? Math.max(1, Math.floor(nice)) : nice;
  const start = Math.floor(lo / step + 1e-9) * step;
  const ticks: number[] = [];
  for (let v = start; v <= hi + step * 1e-9 || ticks.length < 2; v += step) ticks.push(Number(v.toPrecision(12)));
  if (ticks[ticks.length - 1] < hi - step * 1e-9) ticks.push(Number((ticks[ticks.length - 1] + step).toPrecision(12)));
  return ticks;
}

function xmlEscape(s: string): string {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

/** A tick label with as many decimals as the tick step needs (0.25 → 2, 5 → 0). */
function fmtTick(v: number, step: number): string {
  let d = 0;
  while (d < 8 && Math.abs(Math.round(step * 10 ** d) - step * 10 ** d) > 1e-6) d++;
  return v.toFixed(d);
}

/** Colours (and dashes, for colour-blind readers and grey-scale prints) of successive curves. */
const STYLES = [
  { color: "#1f63b4", dash: "" },
  { color: "#d1461f", dash: "7 4" },
  { color: "#2a9d4b", dash: "2 3" },
  { color: "#7a4bb3", dash: "10 3 2 3" },
];

/** Options of {@linkcode lossSvg}. */
export interface LossSvgOptions {
  /** Moving-average window (default {@linkcode smoothingWindow} of the longest curve). */
  window?: number;
  /** Title above the plot. */
  title?: string;
  /** Width and height in pixels (default 760 × 460). */
  width?: number;
  /** Height in pixels. */
  height?: number;
}

/**
 * Training-loss curves as an SVG: each series smoothed with a trailing moving average (a solid or dashed line,
 * one colour per series) over its raw losses (a faint line), with axes, ticks, grid, axis titles and a legend.
 *
 * @example
 * ```ts
 * const svg = lossSvg([{ label: "LoRA", steps: [1, 2, 3], losses: [2.1, 1.7, 1.2] }], { title: "SST-2" });
 * await Deno.writeTextFile("loss.svg", svg);
 * ```
 */
export function lossSvg(series: LossSeries[], opts: LossSvgOptions = {}): string {
  const W = opts.width ?? 760, H = opts.height ?? 460;
  const m = { left: 78, right: 24, top: opts.title ? 50 : 24, bottom: 62 };
  const pw = W - m.left - m.right, ph = H - m.top - m.bottom;
  const longest = series.reduce((a, s) => Math.max(a, s.losses.length), 0);
  const window = opts.window ?? smoothingWindow(longest);
  const smooth = series.map((s) => movingAverage(s.losses, window));
  const finite = (v: number[]) => v.filter(Number.isFinite);
  const ys = smooth.flatMap(finite);
  const xs = series.flatMap((s) => s.steps);
  const xTicks = niceTicks(0, Math.max(1, ...xs), 8, true);
  const [yMin, yMax] = ys.length ? [Math.min(...ys), Math.max(...ys)] : [0, 1];
  const pad = (yMax - yMin) * 0.03; // keep curves off the frame
  // A loss is never negative: the axis starts at 0 at the lowest.
  const yTicks = niceTicks(yMin >= 0 ? Math.max(0, yMin - pad) : yMin - pad, yMax + pad, 6);
  const [x0, x1] = [xTicks[0], xTicks[xTicks.length - 1]];
  const [y0, y1] = [yTicks[0], yTicks[yTicks.length - 1]];
  const X = (v: number) => m.left + ((v - x0) / (x1 - x0)) * pw;
  const Y = (v: number) => m.top + ph - ((v - y0) / (y1 - y0)) * ph;
  const f = (v: number) => v.toFixed(1);
  const pathOf = (steps: number[], values: number[]) => {
    const pts = steps.map((s, i) => [s, values[i]]).filter(([, v]) => Number.isFinite(v));
    return pts.map(([s, v], i) => `${i === 0 ? "M" : "L"}${f(X(s))},${f(Y(v))}`).join(" ");
  };
  const out: string[] = [];
  out.push(
    `<?xml version="1.0" encoding="UTF-8"?>`,
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" ` +
      `font-family="Helvetica, Arial, sans-serif" font-size="13">`,
    `<title>${xmlEscape(opts.title ?? "Training loss")}</title>`,
    `<rect x="0" y="0" width="${W}" height="${H}" fill="#ffffff"/>`,
    `<defs><clipPath id="plot-area"><rect x="${m.left}" y="${m.top}" width="${pw}" height="${ph}"/></clipPath></defs>`,
  );
  if (opts.title) {
    out.push(
      `<text x="${W / 2}" y="28" text-anchor="middle" font-size="16" font-weight="bold">${
        xmlEscape(opts.title)
      }</text>`,
    );
  }
  // Grid and ticks.
  const xStep = xTicks.length > 1 ? xTicks[1] - xTicks[0] : 1, yStep = yTicks.length > 1 ? yTicks[1] - yTicks[0] : 1;
  out.push(`<g class="grid" stroke="#e3e3e3" stroke-width="1">`);
  for (const t of yTicks) out.push(`<line x1="${m.left}" y1="${f(Y(t))}" x2="${m.left + pw}" y2="${f(Y(t))}"/>`);
  for (const t of xTicks) out.push(`<line x1="${f(X(t))}" y1="${m.top}" x2="${f(X(t))}" y2="${m.top + ph}"/>`);
  out.push(`</g>`);
  out.push(`<g class="axes" stroke="#333333" stroke-width="1.2">`);
  out.push(`<line class="x-axis" x1="${m.left}" y1="${m.top + ph}" x2="${m.left + pw}" y2="${m.top + ph}"/>`);
  out.push(`<line class="y-axis" x1="${m.left}" y1="${m.top}" x2="${m.left}" y2="${m.top + ph}"/>`);
  for (const t of xTicks) out.push(`<line x1="${f(X(t))}" y1="${m.top + ph}" x2="${f(X(t))}" y2="${m.top + ph + 5}"/>`);
  for (const t of yTicks) out.push(`<line x1="${m.left - 5}" y1="${f(Y(t))}" x2="${m.left}" y2="${f(Y(t))}"/>`);
  out.push(`</g>`);
  out.push(`<g class="tick-labels" fill="#333333">`);
  for (const t of xTicks) {
    out.push(`<text x="${f(X(t))}" y="${m.top + ph + 20}" text-anchor="middle">${fmtTick(t, xStep)}</text>`);
  }
  for (const t of yTicks) {
    out.push(`<text x="${m.left - 9}" y="${f(Y(t) + 4.5)}" text-anchor="end">${fmtTick(t, yStep)}</text>`);
  }
  out.push(`</g>`);
  out.push(
    `<text class="axis-title" x="${m.left + pw / 2}" y="${
      H - 16
    }" text-anchor="middle" font-size="14">Optimizer step</text>`,
    `<text class="axis-title" transform="translate(20 ${
      m.top + ph / 2
    }) rotate(-90)" text-anchor="middle" font-size="14">` +
      `Training loss (moving average over ${window} step${window === 1 ? "" : "s"})</text>`,
  );
  // Curves: raw (faint) then smoothed.
  out.push(`<g clip-path="url(#plot-area)" fill="none" stroke-linejoin="round" stroke-linecap="round">`);
  series.forEach((s, i) => {
    const st = STYLES[i % STYLES.length];
    out.push(
      `<path class="raw" d="${
        pathOf(s.steps, s.losses)
      }" stroke="${st.color}" stroke-opacity="0.22" stroke-width="1"/>`,
    );
  });
  series.forEach((s, i) => {
    const st = STYLES[i % STYLES.length];
    const dash = st.dash ? ` stroke-dasharray="${st.dash}"` : "";
    out.push(
      `<path class="curve" data-label="${xmlEscape(s.label)}" d="${pathOf(s.steps, smooth[i])}" stroke="${st.color}" ` +
        `stroke-width="2.5"${dash}/>`,
    );
    if (s.steps.length <= 30) {
      s.steps.forEach((x, j) => {
        if (Number.isFinite(smooth[i][j])) {
          out.push(`<circle cx="${f(X(x))}" cy="${f(Y(smooth[i][j]))}" r="2.8" fill="${st.color}" stroke="none"/>`);
        }
      });
    }
  });
  out.push(`</g>`);
  // Legend: inside the plot, in the corner that covers the fewest curve points (top right for falling curves).
  const rowH = 22, legendW = 20 + 40 + 8 + Math.max(...series.map((s, i) => legendText(s, smooth, i).length), 4) * 7.2;
  const legendH = series.length * rowH + 12;
  const corners = [
    [m.left + pw - legendW - 10, m.top + 10],
    [m.left + 10, m.top + 10],
    [m.left + pw - legendW - 10, m.top + ph - legendH - 10],
    [m.left + 10, m.top + ph - legendH - 10],
  ];
  const covered = ([cx, cy]: number[]) =>
    series.reduce(
      (a, s, i) =>
        a + s.steps.filter((x, j) => {
          const px = X(x), py = Y(smooth[i][j]);
          return px >= cx - 6 && px <= cx + legendW + 6 && py >= cy - 6 && py <= cy + legendH + 6;
        }).length,
      0,
    );
  const [lx, ly] = corners.reduce((best, c) => (covered(c) < covered(best) ? c : best));
  out.push(`<g class="legend">`);
  out.push(
    `<rect x="${f(lx)}" y="${f(ly)}" width="${f(legendW)}" height="${legendH}" fill="#ffffff" ` +
      `fill-opacity="0.92" stroke="#999999" rx="4"/>`,
  );
  series.forEach((s, i) => {
    const st = STYLES[i % STYLES.length];
    const y = ly + 6 + rowH * i + rowH / 2;
    const dash = st.dash ? ` stroke-dasharray="${st.dash}"` : "";
    out.push(
      `<line x1="${f(lx + 10)}" y1="${f(y)}" x2="${f(lx + 50)}" y2="${
        f(y)
      }" stroke="${st.color}" stroke-width="2.5"${dash}/>`,
      `<text x="${f(lx + 58)}" y="${f(y + 4.5)}">${xmlEscape(legendText(s, smooth, i))}</text>`,
    );
  });
  out.push(`</g>`, `</svg>`, "");
  return out.join("\n");
}

/** "LoRA (final 0.412)": the label and the last smoothed loss. */
function legendText(s: LossSeries, smooth: number[][], i: number): string {
  const last = finiteLast(smooth[i]);
  return last === undefined ? s.label : `${s.label} (final ${last.toFixed(3)})`;
}

function finiteLast(v: number[]): number | undefined {
  for (let i = v.length - 1; i >= 0; i--) if (Number.isFinite(v[i])) return v[i];
  return undefined;
}

// ---------------------------------------------------------------------------------------------------------------

/**
 * Writes `results.json`, `results.md` and `loss.svg` into `outDir`; returns the Markdown.
 *
 * @example
 * ```ts
 * const md = await writeReport("runs/sst2_compare", [lora, qlora]);
 * ```
 */
export async function writeReport(
  outDir: string,
  runs: RunMetrics[],
  skipped: { method: string; reason: string }[] = [],
): Promise<string> {
  await makeDir(outDir);
  const first = runs[0];
  const seeds = new Set(runs.map((r) => (r.config.train as { seed: number }).seed));
  const results = {
    created: new Date().toISOString(),
    runs,
    skipped,
    sameSeedAndDataOrder: seeds.size <= 1 &&
      new Set(
          runs.map((r) =>
            JSON.stringify([r.data.trainExamples, (r.config.train as { batch_size: number }).batch_size])
          ),
        )
          .size <= 1,
    study: {
      table2: STUDY_TABLE2,
      trainableParametersR16: studyTrainableParameters(16),
      nf4DoubleQuantBits: NF4_DQ_BITS,
    },
  };
  await writeText(joinPath(outDir, "results.json"), JSON.stringify(results, null, 2) + "\n");
  const md = resultsMarkdown(runs, skipped);
  await writeText(joinPath(outDir, "results.md"), md);
  const modelName = first?.model.split("/").filter(Boolean).pop() ?? first?.model; // a directory's own name
  const title = first
    ? `Training loss on SST-2 — ${runs.map((r) => r.label).join(" vs ")} (${modelName})`
    : "Training loss on SST-2";
  const svg = lossSvg(
    runs.map((r) => ({ label: r.label, steps: r.train.losses.map((_, i) => i + 1), losses: r.train.losses })),
    { title },
  );
  await writeText(joinPath(outDir, "loss.svg"), svg);
  return md;
}
