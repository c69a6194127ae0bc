/**
 * Side-by-side Markdown table of our benchmark lines and PyTorch's (bench/torch_ref.py), with ratios.
 *
 * For each of our result lines (suite "matmul"; by default the chooser's run, with `--best` the fastest correct
 * run including sweep variants) it finds torch's fp32 (TF32 off) and fp16 lines for the same case name and prints
 * ours/torch. The fp16 reference for `-linear` impls and one-row (GEMV) cases is F.linear from torch_ref's "quant"
 * suite when present (the same [N, K] weight layout), else the "matmul" suite's torch.matmul. GEMV and copy cases
 * compare GB/s, the rest TFLOP/s.
 *
 * Run: `deno run -A bench/compare.ts OURS.jsonl TORCH.jsonl [--best] [--suite matmul]`
 * @module
 */
import { parseArgs } from "@std/cli";
import { readText } from "../core/platform.ts";
import { fmtNum } from "./common.ts";

type Line = Record<string, unknown> & { suite: string; case: string; impl: string };

/** Parses a JSON-lines text, skipping blank and malformed lines. */
export function parseLines(text: string): Line[] {
  const out: Line[] = [];
  for (const raw of text.split("\n")) {
    const s = raw.trim();
    if (!s.startsWith("{")) continue;
    try {
      const v = JSON.parse(s);
      if (v && typeof v.suite === "string") out.push(v as Line);
    } catch {
      // a line cut off by a timeout: ignore
    }
  }
  return out;
}

const num = (v: unknown): number | undefined => (typeof v === "number" && Number.isFinite(v) ? v : undefined);

/** GB/s for one-row products and copies, TFLOP/s for the rest. */
function metricOf(l: Line): "gbps" | "tflops" {
  return l.case === "copy-bw" || /^1x/.test(l.case) ? "gbps" : "tflops";
}

/** Our lines to show: the chooser's run per (case, impl), or the fastest correct one with `best`. */
export function pickOurs(lines: Line[], suite: string, best: boolean): Line[] {
  const keyed = new Map<string, Line>();
  for (const l of lines) {
    if (l.suite !== suite || num(l.ms) === undefined || l.ok === false) continue;
    if (!best && l.sweep) continue;
    const key = `${l.case}|${l.impl}`;
    const prev = keyed.get(key);
    const m = metricOf(l);
    if (!prev || (best && (num(l[m]) ?? 0) > (num(prev[m]) ?? 0))) keyed.set(key, l);
  }
  return [...keyed.values()];
}

/** Torch's line for a case and impl, preferring the listed suites in order. */
function torchLine(torch: Line[], kase: string, impl: string, suites: string[]): Line | undefined {
  for (const s of suites) {
    const l = torch.find((t) => t.suite === s && t.case === kase && t.impl === impl && num(t.ms) !== undefined);
    if (l) return l;
  }
  return undefined;
}

/** The Markdown table. */
export function compareTable(ours: Line[], torch: Line[]): string {
  const head = "| case | ours | unit | ours | torch fp32 | ours/fp32 | torch fp16 | ours/fp16 | our plan |\n" +
    "|---|---|---|---:|---:|---:|---:|---:|---|";
  const rows = ours.map((o) => {
    const m = metricOf(o);
    const v = num(o[m]);
    const linear = o.impl.includes("linear") || /^1x/.test(o.case);
    const copy = o.case === "copy-bw";
    const t32 = copy ? undefined : torchLine(torch, o.case, "torch-fp32", ["matmul"]);
    const t16 = copy
      ? torchLine(torch, o.case, "torch", ["quant", "matmul"])
      : torchLine(torch, o.case, "torch-fp16", linear ? ["quant", "matmul"] : ["matmul", "quant"]);
    const cell = (t?: Line) => {
      const tv = t ? num(t[m]) : undefined;
      return tv === undefined ? ["—", "—"] : [fmtNum(tv), v === undefined ? "—" : fmtNum(v / tv)];
    };
    const [a, ar] = cell(t32), [b, br] = cell(t16);
    const t16name = t16 && t16.suite !== "matmul" ? ` (${t16.suite})` : "";
    return `| ${o.case} | ${o.impl} | ${m === "gbps" ? "GB/s" : "TFLOP/s"} | ${
      v === undefined ? "—" : fmtNum(v)
    } | ${a} | ${ar} | ${b}${t16name} | ${br} | ${String(o.plan ?? "")} |`;
  });
  return [head, ...rows].join("\n");
}

if (import.meta.main) {
  const f = parseArgs(Deno.args, { boolean: ["best", "help"], string: ["suite"] });
  const [oursPath, torchPath] = f._;
  if (f.help || !oursPath || !torchPath) {
    console.log("usage: deno run -A bench/compare.ts OURS.jsonl TORCH.jsonl [--best] [--suite matmul]");
  } else {
    const ours = parseLines(await readText(oursPath));
    const torch = parseLines(await readText(torchPath));
    const metas = [...ours, ...torch].filter((l) => l.suite === "meta");
    for (const m of metas) {
      const d = m.impl === "torch"
        ? `torch ${m.torch} on ${m.gpu ?? m.device}, ${m.date}`
        : `webtune (${m.deno ? `Deno ${m.deno}` : "?"}) on ${m.device}, ${m.date}`;
      console.log(`- ${d}`);
    }
    console.log("");
    console.log(compareTable(pickOurs(ours, (f.suite as string) ?? "matmul", !!f.best), torch));
  }
}
