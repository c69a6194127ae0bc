#!/usr/bin/env bash
# The whole H200 benchmark run in one device call (the lead runs it from the repository root):
#
#   bash .gpu/run.sh bash bench/h200.sh          # .gpu/run.sh puts deno on PATH and points Vulkan at the NVIDIA driver
#
# Runs, in this order, each under its own timeout and going on when one fails or times out:
#   matmul.ts (no sweep) → ops.ts → quant.ts (if present) → llama.ts → lora_step.ts →
#   examples/sst2_compare.ts --model random:llama-2-7b --max-steps 50 → examples/sst2_compare.ts --model random:tiny
#   (full epoch) → torch_ref.py --suite ops,matmul --quick (only if time remains) → compare.ts + a summary.
#
# Time plan. The whole run must end within H200_BUDGET_S seconds (default 480 = 8 min, inside the device's
# 10-minute limit per call). Each step has a reserve (the least time worth giving it, kept free for it by the steps
# before it) and a cap. A step's timeout is min(cap, time left − the reserves of the steps after it − 15 s for the
# summary), so a step can use the time that earlier steps left over but never the later steps' reserves, and a step
# that would get under 15 s is skipped. Estimates for the H200 (from the H200 figures in ../shared/DESIGN.md and
# bench/NOTES.md, the PyTorch run in runs/torch_ref_h200.jsonl and the lavapipe runs; the webtune numbers of these
# scripts have not been measured there yet):
#   step     reserve  cap  estimate
#   matmul        30    75  ~40 s: ~30 cases up to 8192³ (its phase 1 alone; the CPU builds data + reference rows)
#   ops           10    40  ~10 s: 10 cases, 65 MB inputs checked on the CPU
#   quant         20    60  ~30 s: unknown (another engineer's script; its smoke run takes 3 s on lavapipe)
#   llama         20    60  ~20 s: 7B build ~3 s, prefill ~0.3 s × (warm-up + 5 batches of ~300 ms), decode
#                           16 + 3 × 128 tokens at ~12–20 ms/token (f16 GEMV ~2–3 TB/s, ~650 dispatches a token)
#   lora_step     50   140  ~65 s: f16 and NF4 each a build + 3 cases × 7 steps (2 warm-up + 5 timed) of ~0.5–0.8 s
#                           (~14 TFLOP a step at ~32 TFLOP/s for the GEMMs, bench/NOTES.md), then 2 f16 decodes
#   sst2_7b       60   240  ~240 s, more than it will get (~150 s): per method a 7B build, 50 steps × 4 micro-batches
#                           of ~0.35 s, evaluation on 872 sentences (~30 s); on a timeout its progress lines (s/step,
#                           peak memory) are still in log.txt
#   sst2_tiny    150   240  ~140 s: per method 2,105 steps × 4 micro-batches of ~500 dispatches (~6 ms) + evaluation
#   torch        (rest)  60  ~30 s with --quick (torch import, CUDA init, ops + matmul); runs only with 45 s left
#   summary       15        a few seconds
# With the default budget the first five steps should take ~3 min and leave ~5 min to the two SST-2 runs, which is
# likely too little for both: sst2_7b gets what sst2_tiny's reserve leaves (~150 s). Knobs: H200_SKIP="sst2_7b quant"
# (step names as above) drops steps; H200_BUDGET_S=570 gives the run more time; H200_SST2_7B_ARGS / H200_SST2_TINY_ARGS
# add flags to the example runs (e.g. "--eval-samples 64": random weights make the 7B accuracy meaningless anyway);
# H200_QUANT_ARGS adds flags to bench/quant.ts (e.g. "--sweep"); H200_CAP_<step>=S raises or lowers a step's cap.
#
# Output: the device returns at most 8 files from $OUT (at most 2 folders deep), so the raw outputs go to a work
# folder and $OUT gets: webtune.jsonl (every webtune benchmark line), torch.jsonl (if torch_ref ran), summary.txt
# (the tables printed at the end), log.txt (every step's full output), sst2_7b.tar.gz and sst2_tiny.tar.gz (the
# example's output folders without weights and optimizer state). The console shows a line per step and, at the
# very end, the summary (the device returns only the last 12,000 characters of output).
#
# Environment: XDG_RUNTIME_DIR=/tmp; WEBTUNE_SHARED=$PWD/.gpu/shared and SST2_DIR=$PWD/.gpu/shared/data/sst2 when
# those exist (carried by the lead), else SST2_DIR from the environment or .gpu/sst2. The torch columns of the
# summary come from this call's torch_ref run and from runs/torch_ref_h200.jsonl (git-ignored: carry it, or set
# TORCH_REF). H200_SMOKE=1 runs every step at toy sizes (to test this script on a CPU driver).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
[ -d "$ROOT/.gpu/shared" ] && export WEBTUNE_SHARED="$ROOT/.gpu/shared"
if [ -d "$ROOT/.gpu/shared/data/sst2" ]; then
  export SST2_DIR="$ROOT/.gpu/shared/data/sst2"
elif [ -z "${SST2_DIR:-}" ] && [ -d "$ROOT/.gpu/sst2" ]; then
  export SST2_DIR="$ROOT/.gpu/sst2"
fi
export PYTHONUNBUFFERED=1

OUT=${OUT:-$ROOT/runs/h200-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
W=$(mktemp -d /tmp/webtune-h200.XXXXXX)
BUDGET=${H200_BUDGET_S:-480}
SMOKE=${H200_SMOKE:-0}
H200_SKIP=${H200_SKIP:-}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
SUMMARY_RESERVE=15
STATUS="$W/status.tsv"
: >"$STATUS"

# reserved seconds of the steps still to come (in this order: matmul ops quant llama lora_step sst2_7b sst2_tiny);
# a skipped step reserves nothing
STEPS=(matmul ops quant llama lora_step sst2_7b sst2_tiny)
RESERVES=(30 10 20 20 50 60 150)
skipped() { [[ " ${H200_SKIP//,/ } " == *" $1 "* ]]; }
REST_RESERVE=0
for i in "${!STEPS[@]}"; do skipped "${STEPS[$i]}" || REST_RESERVE=$((REST_RESERVE + RESERVES[i])); done

elapsed() { echo $(($(date +%s) - START)); }

# step NAME RESERVE CAP COMMAND... — runs COMMAND with a timeout, output to $W/NAME.log; records the outcome.
step() {
  local name=$1 reserve=$2 cap=$3
  shift 3
  # H200_CAP_<name> overrides a step's cap (e.g. H200_CAP_quant=200 for a sweep)
  local capvar="H200_CAP_$name"
  cap=${!capvar:-$cap}
  if skipped "$name"; then
    printf '%s\tskipped\t0\tH200_SKIP\n' "$name" >>"$STATUS"
    echo "[h200 $(elapsed)s] $name: skipped (H200_SKIP)"
    return
  fi
  REST_RESERVE=$((REST_RESERVE - reserve))
  local left=$((DEADLINE - $(date +%s) - REST_RESERVE - SUMMARY_RESERVE))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$STATUS"
    echo "[h200 $(elapsed)s] $name: skipped (only ${limit}s left for it)"
    return
  fi
  # @BUDGET@ in the command becomes the time a benchmark may start new cases in (it skips the rest with a line)
  local budget=$((limit - (limit / 5 > 10 ? limit / 5 : 10)))
  local args=("${@//@BUDGET@/$budget}")
  echo "[h200 $(elapsed)s] $name: start (timeout ${limit}s): ${args[*]}"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 "$limit" "${args[@]}" >"$W/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status="failed($rc)" ;;
  esac
  local dt=$(($(date +%s) - t0))
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$limit" >>"$STATUS"
  echo "[h200 $(elapsed)s] $name: $status after ${dt}s"
  # the last lines of progress, shortened (the full log is in $OUT/log.txt)
  tr '\r' '\n' <"$W/$name.log" | grep -v -e '^\s*$' -e XDG_RUNTIME_DIR | tail -n 2 | cut -c1-220 | sed 's/^/    /'
}

echo "[h200] $(date -u +%FT%TZ) budget ${BUDGET}s, out $OUT, work $W"
echo "[h200] deno $(deno --version 2>/dev/null | head -n1 | cut -d' ' -f2); GPU: $(nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || echo '?')"
echo "[h200] WEBTUNE_SHARED=${WEBTUNE_SHARED:-unset} SST2_DIR=${SST2_DIR:-unset}"

if [ "$SMOKE" = 1 ]; then
  TINY=(--smoke)
  LLAMA=(--preset tiny --smoke)
  LORA=(--preset tiny --smoke --warmup 1 --steps 1)
  SST2_7B=(--model random:micro --max-steps 2 --train-samples 32 --eval-samples 8)
  SST2_TINY=(--model random:micro --max-steps 2 --train-samples 32 --eval-samples 8)
else
  TINY=()
  LLAMA=()
  LORA=(--warmup 2 --steps 5)
  SST2_7B=(--model random:llama-2-7b --max-steps 50)
  SST2_TINY=(--model random:tiny)
fi
# shellcheck disable=SC2206 # word splitting of the extra flags is intended
SST2_7B+=(${H200_SST2_7B_ARGS:-})
# shellcheck disable=SC2206
SST2_TINY+=(${H200_SST2_TINY_ARGS:-})
# shellcheck disable=SC2206
TINY_QUANT=(${TINY[@]+"${TINY[@]}"} ${H200_QUANT_ARGS:-})

# 1. matmul (no sweep) ~40 s
step matmul 30 75 deno run -A bench/matmul.ts --json "$W/matmul.jsonl" ${TINY[@]+"${TINY[@]}"}
# 2. ops ~10 s
step ops 10 40 deno run -A bench/ops.ts --json "$W/ops.jsonl" --budget @BUDGET@ ${TINY[@]+"${TINY[@]}"}
# 3. quant (if present) ~30 s
if [ -f bench/quant.ts ]; then
  step quant 20 60 deno run -A bench/quant.ts --json "$W/quant.jsonl" --budget @BUDGET@ ${TINY_QUANT[@]+"${TINY_QUANT[@]}"}
else
  REST_RESERVE=$((REST_RESERVE - 20))
  printf 'quant\tabsent\t0\t0\n' >>"$STATUS"
  echo "[h200 $(elapsed)s] quant: bench/quant.ts does not exist, skipped"
fi
# 4. llama: 7B prefill and decode ~20 s
step llama 20 60 deno run -A bench/llama.ts --json "$W/llama.jsonl" --budget @BUDGET@ ${LLAMA[@]+"${LLAMA[@]}"}
# 5. lora_step: f16 and NF4 bases, with/without checkpointing, answer-only, decode through the adapter ~65 s
step lora_step 50 140 deno run -A bench/lora_step.ts --json "$W/lora_step.jsonl" --budget @BUDGET@ ${LORA[@]+"${LORA[@]}"}
# 6. the SST-2 comparison at 7B scale (random weights: speed and memory only)
step sst2_7b 60 240 deno run -A examples/sst2_compare.ts ${SST2_7B[@]+"${SST2_7B[@]}"} --out "$W/sst2_7b"
# 7. the SST-2 comparison with the tiny preset, a full epoch
step sst2_tiny 150 240 deno run -A examples/sst2_compare.ts ${SST2_TINY[@]+"${SST2_TINY[@]}"} --out "$W/sst2_tiny"
# 8. PyTorch in the same call, only with time to spare (runs/torch_ref_h200.jsonl holds an earlier full run)
left=$((DEADLINE - $(date +%s) - SUMMARY_RESERVE))
if [ "$left" -ge 45 ] && [ "$SMOKE" != 1 ]; then
  step torch 0 60 python3 bench/torch_ref.py --suite ops,matmul --quick --out "$W/torch.jsonl"
else
  printf 'torch\tskipped\t0\t%s\n' "$left" >>"$STATUS"
  echo "[h200 $(elapsed)s] torch: skipped ($([ "$SMOKE" = 1 ] && echo "smoke run" || echo "${left}s left, needs 45"))"
fi

# ---- collect ------------------------------------------------------------------------------------------------------
cat "$W"/matmul.jsonl "$W"/ops.jsonl "$W"/quant.jsonl "$W"/llama.jsonl "$W"/lora_step.jsonl >"$OUT/webtune.jsonl" 2>/dev/null
[ -s "$W/torch.jsonl" ] && cp "$W/torch.jsonl" "$OUT/torch.jsonl"
# the earlier full PyTorch run: runs/ is git-ignored, so it travels only when carried (or copied into .gpu/)
TORCH_REF=${TORCH_REF:-}
for f in runs/torch_ref_h200.jsonl .gpu/torch_ref_h200.jsonl .gpu/shared/torch_ref_h200.jsonl; do
  [ -z "$TORCH_REF" ] && [ -s "$f" ] && TORCH_REF=$f
done
cat "$W/torch.jsonl" ${TORCH_REF:+"$TORCH_REF"} >"$W/torch_all.jsonl" 2>/dev/null
[ -s "$W/torch_all.jsonl" ] || echo "[h200] no PyTorch reference lines (carry runs/torch_ref_h200.jsonl): torch columns stay empty"
for name in matmul ops quant llama lora_step sst2_7b sst2_tiny torch; do
  [ -f "$W/$name.log" ] && { echo "===== $name"; tr '\r' '\n' <"$W/$name.log" | grep -v -e '^\s*$' -e XDG_RUNTIME_DIR; }
done | tail -c 15000000 >"$OUT/log.txt"
for name in sst2_7b sst2_tiny; do
  if [ -d "$W/$name" ]; then
    (cd "$W" && find "$name" -type f ! -name '*.safetensors' ! -name 'trainer_state.json' -size -8M -print0 |
      tar -czf "$OUT/$name.tar.gz" --null -T -)
  fi
done

# ---- summary (printed last: the device returns only the end of the output) -----------------------------------------
cat >"$W/summary.ts" <<'EOF'
// Compact side-by-side tables of the webtune lines against torch_ref's, from the files named in the environment.
type Line = Record<string, unknown> & { suite: string; case: string; impl: string };
const read = (p: string): Line[] => {
  try {
    return Deno.readTextFileSync(p).split("\n").flatMap((s) => {
      try {
        const v = JSON.parse(s);
        return v && typeof v.suite === "string" ? [v as Line] : [];
      } catch {
        return [];
      }
    });
  } catch {
    return [];
  }
};
const W = Deno.env.get("W")!;
const ours = ["matmul", "ops", "quant", "llama", "lora_step"].flatMap((s) => read(`${W}/${s}.jsonl`));
const torch = read(`${W}/torch_all.jsonl`);
const num = (v: unknown) => (typeof v === "number" && Number.isFinite(v) ? v : undefined);
const f = (v: unknown, d = 3) => {
  const x = num(v);
  if (x === undefined) return "—";
  const a = Math.abs(x);
  return a >= 100 ? x.toFixed(0) : a >= 10 ? x.toFixed(1) : a >= 1 ? x.toFixed(2) : x.toPrecision(d);
};
const table = (rows: string[][]) => {
  const w = rows[0].map((_, j) => Math.max(...rows.map((r) => (r[j] ?? "").length)));
  return rows.map((r) => r.map((c, j) => c.padEnd(w[j])).join("  ").trimEnd()).join("\n");
};
const bestTorch = (suite: string, kase: string, prefix: string) =>
  torch.filter((t) => t.suite === suite && t.case === kase && t.impl.startsWith(prefix) && num(t.ms) !== undefined)
    .sort((a, b) => (a.ms as number) - (b.ms as number))[0];
const out: string[] = [];
const problems = ours.filter((l) => l.error || l.ok === false).map((l) =>
  `  ${l.suite}/${l.case}/${l.impl}: ${l.error ? String(l.error).slice(0, 160) : `wrong result (err ${f(l.err)})`}`
);
const skipped = ours.filter((l) => l.skipped).map((l) => `  ${l.suite}/${l.case}/${l.impl}: ${l.skipped}`);

const opsRows = [["ops case", "impl", "ms", "GB/s", "torch best", "torch ms", "speed vs torch"]];
for (const l of ours.filter((l) => l.suite === "ops" && num(l.ms) !== undefined)) {
  const t = bestTorch("ops", l.case, l.impl.endsWith("f16") ? "torch-fp16" : "torch-fp32");
  opsRows.push([l.case, l.impl, f(l.ms), f(l.gbps), t?.impl ?? "—", f(t?.ms), t ? f((t.ms as number) / (l.ms as number)) : "—"]);
}
if (opsRows.length > 1) out.push(table(opsRows));

const quantRows = [["quant case", "impl", "ms", "TFLOP/s", "GB/s", "torch-fp16 ms", "speed vs torch"]];
for (const l of ours.filter((l) => l.suite === "quant" && num(l.ms) !== undefined)) {
  const t = bestTorch("quant", l.case, "torch-fp16") ?? bestTorch("quant", l.case, "torch");
  quantRows.push([l.case, l.impl, f(l.ms), f(l.tflops), f(l.gbps), f(t?.ms), t ? f((t.ms as number) / (l.ms as number)) : "—"]);
}
if (quantRows.length > 1) out.push(table(quantRows));

const modelRows = [["model case", "impl", "ms", "tok/s", "peak GiB", "+load GiB", "torch ms", "torch tok/s", "torch GiB", "speed vs torch"]];
for (const l of ours.filter((l) => (l.suite === "llama" || l.suite === "lora_step") && num(l.ms) !== undefined)) {
  const t = bestTorch(l.suite, l.case, "torch");
  modelRows.push([
    l.case, l.impl, f(l.ms), f(l.tokens_per_s), f(l.peak_gib), f(l.peak_with_load_gib), f(t?.ms), f(t?.tokens_per_s),
    f(t?.peak_gib), t ? f((t.ms as number) / (l.ms as number)) : "—",
  ]);
}
if (modelRows.length > 1) out.push(table(modelRows));
if (skipped.length) out.push("skipped:\n" + skipped.slice(0, 12).join("\n"));
if (problems.length) {
  const more = problems.length > 12 ? `\n  … ${problems.length - 12} more in webtune.jsonl` : "";
  out.push("errors / wrong results:\n" + problems.slice(0, 12).join("\n") + more);
}
const status = Deno.readTextFileSync(`${W}/status.tsv`).trim().split("\n").map((r) => r.split("\t"));
out.push(table([["step", "status", "seconds", "timeout"], ...status]));
console.log(out.join("\n\n"));
EOF
{
  if [ -f bench/compare.ts ] && [ -s "$W/matmul.jsonl" ]; then
    echo "== matmul: webtune vs torch (bench/compare.ts)"
    # (without its last column, the kernel plan, which is in webtune.jsonl: the device returns only 12,000 characters)
    timeout 30 deno run -A bench/compare.ts "$W/matmul.jsonl" "$W/torch_all.jsonl" 2>&1 | grep -v XDG_RUNTIME_DIR |
      sed -E 's/\| [^|]* \|$/|/; s/\| our plan \|$/|/; s/\|---\|$/|/' 
    echo
  fi
  for name in sst2_7b sst2_tiny; do
    if [ -f "$W/$name/results.md" ]; then
      echo "== $name: the tables of results.md for this run (the whole file is in $name.tar.gz)"
      sed -n '/^## The study/q; /^|/p' "$W/$name/results.md"
      echo
    fi
  done
  echo "== webtune vs torch: ops, quant, llama, lora_step (speed vs torch = torch ms / our ms; > 1 means faster)"
  W="$W" timeout 30 deno run -A "$W/summary.ts" 2>&1 | grep -v XDG_RUNTIME_DIR
  echo "[h200] finished in $(elapsed)s of ${BUDGET}s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} | tee "$OUT/summary.txt"
