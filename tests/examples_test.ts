/**
 * Tests of the SST-2 examples: configuration (YAML + per-model overrides + CPU defaults + flags) and every error it
 * must explain in one line, the loss plot (valid XML, two labelled curves, axes, legend), the Table 2 layout, and
 * one tiny end-to-end run of sst2_compare's runner on the 2-layer `random:micro` preset (needs WEBTUNE_SHARED for
 * the tokenizer and SST-2; skipped otherwise).
 */
import { assert, assertEquals, assertRejects, assertStringIncludes } from "@std/assert";
import { emptyCache, memoryStats } from "../core/memory.ts";
import {
  ConfigError,
  EXAMPLE_PRESETS,
  knownKeys,
  llamaParameterCount,
  loadExperimentConfig,
  presetNames,
} from "../examples/sst2/config.ts";
import {
  lossSvg,
  movingAverage,
  niceTicks,
  resultsMarkdown,
  resultsTable,
  studyTable,
  studyTrainableParameters,
  TABLE2_HEADER,
} from "../examples/sst2/report.ts";
import { type RunMetrics, subset } from "../examples/sst2/run.ts";
import { runCompare } from "../examples/sst2_compare.ts";
import { llamaPreset } from "../nn/llama.ts";
import { rng } from "./helpers.ts";

const SHARED = Deno.env.get("WEBTUNE_SHARED");
const SST2_DIR = Deno.env.get("SST2_DIR") ?? (SHARED ? `${SHARED}/data/sst2` : undefined);
const freshSeed = () => crypto.getRandomValues(new Uint32Array(1))[0];
const CONFIGS = new URL("../examples/configs/", import.meta.url).pathname;

/** A temporary data directory and tokenizer file (config resolution only checks that they exist). */
async function withFixture(fn: (args: string[], dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "webtune_examples_" });
  try {
    await Deno.writeTextFile(`${dir}/tokenizer.model`, "not read by config tests");
    await Deno.mkdir(`${dir}/sst2`);
    await fn(["--data", `${dir}/sst2`, "--tokenizer", `${dir}/tokenizer.model`], dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Asserts that loading fails with a one-line ConfigError containing every fragment. */
async function assertConfigError(argv: string[], method: "lora" | "qlora", ...fragments: string[]): Promise<void> {
  const err = await assertRejects(() => loadExperimentConfig(argv, { method }), ConfigError);
  for (const f of fragments) assertStringIncludes(err.message, f);
  assert(!err.message.includes("\n"), `error should be one line: ${err.message}`);
}

Deno.test("config: the YAML's study settings, the small-model learning rate, and the 7B preset's study lr", async () => {
  await withFixture(async (paths) => {
    // The default model is the bundled mini-llama, its YAML path taken relative to the YAML file.
    const mini = await loadExperimentConfig(paths, { method: "lora" });
    assert(mini.model.endsWith("examples/models/mini-llama"), mini.model);
    assertEquals(mini.modelSource.kind, "hf");
    assertEquals(mini.modelParameters, 2_261_568);
    assertEquals(mini.train.lr, 3e-3);
    assert(mini.notes.some((n) => n.includes("train.lr = 0.003")), mini.notes.join("; "));
    // The same directory named on the command line (relative to the working directory) gets the same settings.
    const cwdRelative = new URL("../examples/models/mini-llama", import.meta.url).pathname
      .replace(`${Deno.cwd()}/`, "");
    const viaFlag = await loadExperimentConfig([...paths, "--model", cwdRelative], { method: "lora" });
    assertEquals(viaFlag.train.lr, 3e-3);
    assert(viaFlag.notes.some((n) => n.startsWith("settings for ../models/mini-llama")), viaFlag.notes.join("; "));

    const tiny = await loadExperimentConfig([...paths, "--model", "random:tiny"], { method: "lora" });
    assertEquals(tiny.model, "random:tiny");
    assertEquals(tiny.lora, {
      r: 16,
      alpha: 16,
      dropout: 0.1,
      targetModules: ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    });
    assertEquals(tiny.train.lr, 1e-3); // small models: their own learning rate
    assertEquals([tiny.train.batchSize, tiny.train.gradAccum, tiny.train.epochs], [8, 4, 1]);
    assertEquals([tiny.train.warmupRatio, tiny.train.schedule], [0.05, "cosine"]);
    assertEquals([tiny.train.trainSamples, tiny.eval.samples], [null, null]);
    assertEquals(tiny.quantization, null);
    assert(tiny.notes.some((n) => n.includes("train.lr = 0.001")), tiny.notes.join("; "));

    const big = await loadExperimentConfig([...paths, "--model", "random:llama-2-7b"], { method: "lora" });
    assertEquals(big.train.lr, 5e-5);
    assertEquals(big.modelParameters, 6_738_415_616);

    const q = await loadExperimentConfig(paths, { method: "qlora" });
    assertEquals(q.quantization, { type: "nf4", blockSize: 64, doubleQuant: true });
    assertEquals(q.lora.r, 16); // "the same adapters", not the text's r = 8
    const yaml = await Deno.readTextFile(`${CONFIGS}sst2_qlora.yaml`);
    assertStringIncludes(yaml, "r = 8");
    assertEquals(q.out, "runs/sst2_qlora");
  });
});

Deno.test("config: flags override the YAML, the model overrides and the CPU defaults", async () => {
  await withFixture(async (paths, dir) => {
    const r = rng(freshSeed());
    const rank = 1 + Math.floor(r() * 64), lr = Number((r() * 1e-2).toPrecision(3)) + 1e-6;
    const seed = Math.floor(r() * 1e6), samples = 1 + Math.floor(r() * 1000);
    const cfg = await loadExperimentConfig([
      ...paths,
      "--rank",
      String(rank),
      "--alpha",
      "32",
      "--lr",
      String(lr),
      "--seed",
      String(seed),
      "--train-samples",
      String(samples),
      "--max-steps",
      "7",
      "--epochs",
      "2",
      "--batch-size",
      "3",
      "--grad-accum",
      "5",
      "--eval-samples",
      "all",
      "--gradient-checkpointing",
      "--out",
      `${dir}/out`,
    ], { method: "lora", cpu: true });
    assertEquals([cfg.lora.r, cfg.lora.alpha, cfg.train.lr, cfg.train.seed], [rank, 32, lr, seed]);
    assertEquals([cfg.train.trainSamples, cfg.train.maxSteps, cfg.train.epochs], [samples, 7, 2]);
    assertEquals([cfg.train.batchSize, cfg.train.gradAccum, cfg.eval.samples], [3, 5, null]);
    assertEquals([cfg.train.gradientCheckpointing, cfg.out], [true, `${dir}/out`]);
    // Every CPU default and the model's lr were overridden by flags, so no note claims them.
    assert(!cfg.notes.some((n) => n.startsWith("CPU adapter") || n.includes("train.lr")), cfg.notes.join("; "));

    // On a CPU adapter without flags: a subset, and a note saying what was chosen and why.
    const cpu = await loadExperimentConfig(paths, { method: "lora", cpu: true });
    assert(cpu.train.trainSamples !== null && cpu.train.trainSamples < 5000);
    assertEquals(cpu.eval.samples, null); // the whole dev set: the margin over the majority class is a few points
    const note = cpu.notes.find((n) => n.startsWith("CPU adapter"));
    assert(note && note.includes("train.train_samples") && note.includes("lavapipe"), cpu.notes.join("; "));
  });
});

Deno.test("config: LoRA and QLoRA get the same data settings, with or without the CPU defaults", async () => {
  await withFixture(async (paths) => {
    for (const cpu of [false, true]) {
      const [a, b] = await Promise.all(
        (["lora", "qlora"] as const).map((method) => loadExperimentConfig(paths, { method, cpu })),
      );
      const { lr: _a, ...ta } = a.train, { lr: _b, ...tb } = b.train;
      assertEquals(ta, tb);
      assertEquals([a.train.lr, a.eval], [b.train.lr, b.eval]);
    }
  });
  // The seeded subset is deterministic, differs between seeds, and has no duplicates.
  const items = Array.from({ length: 500 }, (_, i) => i);
  const seed = freshSeed();
  const s1 = subset(items, 50, seed);
  assertEquals(subset(items, 50, seed), s1);
  assertEquals(new Set(s1).size, 50);
  assert(JSON.stringify(subset(items, 50, seed + 1)) !== JSON.stringify(s1));
  assertEquals(subset(items, null, seed), items);
});

Deno.test("config: every mistake is a one-line error that says what to do", async () => {
  await withFixture(async (paths, dir) => {
    await assertConfigError([...paths, "--rank", "0"], "lora", "--rank 0", "positive integer");
    await assertConfigError([...paths, "--rank", "2.5"], "lora", "--rank 2.5", "integer");
    await assertConfigError([...paths, "--lr", "fast"], "lora", "--lr fast", "number");
    await assertConfigError([...paths, "--lr=-1e-4"], "lora", "--lr", "> 0");
    await assertConfigError([...paths, "--model", "random:gigantic"], "lora", "random:tiny", "random:llama-2-7b");
    await assertConfigError([...paths, "--model", `${dir}/nowhere`], "lora", "no such directory", "random:tiny");
    await assertConfigError([...paths, "--rnak", "3"], "lora", "--rnak", "Known flags", "--rank");
    await assertConfigError([...paths, "--train-samples", "0"], "lora", "--train-samples 0", "positive");
    const missing = `${dir}/no-sst2-here`;
    await assertConfigError(["--data", missing, "--tokenizer", `${dir}/tokenizer.model`], "lora", missing, "train.tsv");
    await assertConfigError(
      [...paths, "--config", `${CONFIGS}sst2_qlora.yaml`],
      "lora",
      "qlora",
      "examples/sst2_qlora.ts",
    );

    // The YAML's model path is relative to the YAML file: a copy elsewhere no longer finds it.
    const original = await Deno.readTextFile(`${CONFIGS}sst2_lora.yaml`);
    const bad = `${dir}/bad.yaml`;
    await Deno.writeTextFile(bad, original);
    const moved = `${dir.split("/").slice(0, -1).join("/")}/models/mini-llama`;
    await assertConfigError([...paths, "--config", bad], "lora", `--model ${moved}: no such directory`);
    // Unknown keys, nested and top-level, list the known ones (copies that point at the model by absolute path).
    const base = original.replace("model: ../models/mini-llama", `model: ${CONFIGS}../models/mini-llama`);
    await Deno.writeTextFile(bad, base.replace("  lr: 5.0e-5", "  lrate: 5.0e-5"));
    await assertConfigError([...paths, "--config", bad], "lora", 'unknown key "train.lrate"', "warmup_ratio", "lr");
    await Deno.writeTextFile(bad, `${base}\nlearning_rate: 1\n`);
    await assertConfigError([...paths, "--config", bad], "lora", '"learning_rate"', "models", "cpu", "train");
    await Deno.writeTextFile(
      bad,
      base.replace('"random:tiny":\n    train: { lr: 1.0e-3 }', '"random:tiny":\n    train: { rl: 1 }'),
    );
    await assertConfigError([...paths, "--config", bad], "lora", '"train.rl"', "grad_accum");
    await Deno.writeTextFile(bad, base.replace("  r: 16", "  r: 0"));
    await assertConfigError([...paths, "--config", bad], "lora", "lora.r = 0", "positive");
    await Deno.writeTextFile(bad, base.replace("dropout: 0.1", "dropout: 1.5"));
    await assertConfigError([...paths, "--config", bad], "lora", "dropout", "[0, 1)");
    await assertConfigError([...paths, "--config", `${dir}/absent.yaml`], "lora", "absent.yaml", "no such file");
  });
});

Deno.test("config: without WEBTUNE_SHARED the tokenizer is found in the shared folder that holds data/sst2", async () => {
  const dir = await Deno.makeTempDir({ prefix: "webtune-shared-" });
  const saved = Deno.env.get("WEBTUNE_SHARED");
  Deno.env.delete("WEBTUNE_SHARED");
  try {
    await Deno.mkdir(`${dir}/data/sst2`, { recursive: true });
    await Deno.mkdir(`${dir}/models/llama2-tokenizer`, { recursive: true });
    await Deno.writeTextFile(`${dir}/models/llama2-tokenizer/tokenizer.model`, "not read by config tests");
    const cfg = await loadExperimentConfig(["--data", `${dir}/data/sst2/`], { method: "lora" });
    assertEquals(cfg.tokenizer, `${dir}/models/llama2-tokenizer/tokenizer.model`);
    // Elsewhere, the error says what to pass.
    await Deno.mkdir(`${dir}/elsewhere`);
    await assertConfigError(["--data", `${dir}/elsewhere`], "lora", "no tokenizer", "--tokenizer", "WEBTUNE_SHARED");
  } finally {
    if (saved !== undefined) Deno.env.set("WEBTUNE_SHARED", saved);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("config: presets, and parameter counts that match the models' own", () => {
  assertEquals(presetNames().sort(), ["random:llama-2-7b", "random:micro", "random:tiny"]);
  assertEquals(llamaParameterCount(llamaPreset("llama-2-7b")), 6_738_415_616);
  const micro = EXAMPLE_PRESETS.micro;
  const h = micro.hiddenSize, i = micro.intermediateSize, v = micro.vocabSize;
  assertEquals(llamaParameterCount(micro), 2 * v * h + micro.numHiddenLayers * (4 * h * h + 3 * h * i + 2 * h) + h);
  assert(knownKeys().includes("train.gradient_checkpointing") && knownKeys().includes("quantization.block_size"));
  assertEquals(studyTrainableParameters(16), 32 * (3 * 16 * 8192 + 3 * 16 * (4096 + 11008)));
});

// ---------------------------------------------------------------------------------------------------------------
// Report.

/** Checks that `xml` is well formed (balanced tags, quoted attributes, one root); returns the element names. */
function checkXml(xml: string): string[] {
  const body = xml.replace(/^<\?xml[^?]*\?>\s*/, "");
  const tag = /<(\/?)([A-Za-z][\w:-]*)((?:\s+[\w:-]+="[^"<]*")*)\s*(\/?)>|<!--[\s\S]*?-->/g;
  const stack: string[] = [], names: string[] = [];
  let roots = 0, last = 0, m: RegExpExecArray | null;
  while ((m = tag.exec(body))) {
    const between = body.slice(last, m.index);
    assert(!/[<>]/.test(between), `stray markup near: ${between.slice(0, 40)}`);
    assert(!/&(?!amp;|lt;|gt;|quot;|apos;|#\d+;)/.test(between), `unescaped & near: ${between.slice(0, 40)}`);
    last = tag.lastIndex;
    if (m[0].startsWith("<!--")) continue;
    const [, close, name, , selfClose] = m;
    if (close) assertEquals(stack.pop(), name, `</${name}> closes the wrong element`);
    else {
      if (stack.length === 0) roots++;
      names.push(name);
      if (!selfClose) stack.push(name);
    }
  }
  assertEquals(stack, [], "unclosed elements");
  assertEquals(roots, 1, "one root element");
  assertEquals(body.slice(last).trim(), "");
  return names;
}

Deno.test("loss.svg: valid XML with two labelled smoothed curves, axes with ticks and titles, and a legend", () => {
  const r = rng(freshSeed());
  const n = 20 + Math.floor(r() * 200);
  const series = ["LoRA", "QLoRA"].map((label, k) => ({
    label,
    steps: Array.from({ length: n - 3 * k }, (_, i) => i + 1),
    losses: Array.from({ length: n - 3 * k }, (_, i) => 2.5 * Math.exp(-i / 40) + 0.3 * r() + 0.1 * k),
  }));
  const svg = lossSvg(series, { title: "Training loss <LoRA & QLoRA>" });
  const names = checkXml(svg);
  assertEquals(names[0], "svg");
  assertStringIncludes(svg, 'xmlns="http://www.w3.org/2000/svg"');
  assertStringIncludes(svg, "Training loss &lt;LoRA &amp; QLoRA&gt;");
  const curves = [...svg.matchAll(/<path class="curve" data-label="([^"]+)" d="([^"]+)"/g)];
  assertEquals(curves.map((c) => c[1]), ["LoRA", "QLoRA"]);
  const [W, H] = [760, 460];
  curves.forEach((c, k) => {
    const pts = c[2].split(" ").map((p) => p.slice(1).split(",").map(Number));
    assertEquals(pts.length, series[k].steps.length);
    for (const [x, y] of pts) assert(x >= 0 && x <= W && y >= 0 && y <= H, `point ${x},${y} outside the image`);
    for (let i = 1; i < pts.length; i++) assert(pts[i][0] > pts[i - 1][0], "x increases with the step");
  });
  assertEquals([...svg.matchAll(/<path class="raw"/g)].length, 2);
  assertStringIncludes(svg, 'class="x-axis"');
  assertStringIncludes(svg, 'class="y-axis"');
  assertStringIncludes(svg, ">Optimizer step</text>");
  assertStringIncludes(svg, "Training loss (moving average over");
  const legend = svg.slice(svg.indexOf('<g class="legend">'));
  assertStringIncludes(legend, "LoRA (final ");
  assertStringIncludes(legend, "QLoRA (final ");
  const tickLabels = svg.slice(svg.indexOf('<g class="tick-labels"'), svg.indexOf("</g>", svg.indexOf("tick-labels")));
  assert([...tickLabels.matchAll(/<text /g)].length >= 6, "ticks on both axes");
  // One run, one step: still a valid plot with a visible marker.
  const one = lossSvg([{ label: "LoRA", steps: [1], losses: [0.7] }]);
  checkXml(one);
  assertStringIncludes(one, "<circle");
});

Deno.test("movingAverage matches a direct trailing mean; niceTicks cover the range", () => {
  const r = rng(freshSeed());
  const values = Array.from({ length: 50 + Math.floor(r() * 50) }, () => r() * 10);
  const w = 1 + Math.floor(r() * 15);
  const got = movingAverage(values, w);
  values.forEach((_, i) => {
    const win = values.slice(Math.max(0, i - w + 1), i + 1);
    const want = win.reduce((a, b) => a + b, 0) / win.length;
    assert(Math.abs(got[i] - want) < 1e-9, `index ${i}: ${got[i]} vs ${want}`);
  });
  for (let k = 0; k < 20; k++) {
    const lo = (r() - 0.5) * 10 ** Math.floor(r() * 6), hi = lo + r() * 10 ** Math.floor(r() * 6 - 2) + 1e-6;
    const ticks = niceTicks(lo, hi);
    assert(ticks[0] <= lo && ticks[ticks.length - 1] >= hi, `[${ticks}] must cover [${lo}, ${hi}]`);
    assert(ticks.length >= 2 && ticks.length <= 12, `${ticks.length} ticks`);
    const top = 1 + Math.floor(r() * 10 ** Math.floor(r() * 5));
    const steps = niceTicks(0, top, 8, true);
    assert(steps.every(Number.isInteger) && steps[steps.length - 1] >= top, `[${steps}] for 0..${top}`);
  }
});

function fakeRun(method: "lora" | "qlora", r: () => number, meaningful = true): RunMetrics {
  const label = method === "lora" ? "LoRA" : "QLoRA";
  const losses = Array.from({ length: 5 }, () => r() * 3);
  return {
    method,
    label,
    model: "random:tiny",
    modelKind: "random",
    modelParameters: 9_192_576,
    accuracyMeaningful: meaningful,
    device: "test",
    cpuAdapter: true,
    config: { train: { seed: 42, batch_size: 8, grad_accum: 1 }, eval: { batch_size: 16 } },
    notes: [`note for ${label}`, "a note both runs share"],
    outDir: "/tmp/x",
    data: { trainExamples: 100, trainTokens: 3700, devExamples: 50 },
    parameters: { trainable: 147_456, all: 9_340_032, trainablePercent: 1.5787, line: "" },
    bitsPerBaseParameter: method === "lora" ? 16 : 4.127,
    memoryReport: {} as RunMetrics["memoryReport"],
    modelBytes: 18_000_000,
    train: {
      steps: 5,
      trainSeconds: 30 + r() * 1000,
      secondsPerStep: 6,
      tokensPerSecond: 40,
      peakBytes: r() * 2 ** 34,
      interrupted: false,
      losses,
    },
    eval: {
      n: 50,
      accuracy: r(),
      f1: r(),
      f1Macro: r(),
      unparseable: 3,
      logprobAccuracy: r(),
      logprobF1: r(),
      logprobF1Macro: r(),
      tokensPerSecond: 20 + r() * 10,
      majorityAccuracy: 0.5 + r() / 2,
      seconds: 20,
    },
    inference: { tokensPerSecond: 5 + r() * 30, newTokens: 32, prompt: "x" },
    wallSeconds: 100,
    startedAt: new Date().toISOString(),
  };
}

Deno.test("results.md: Table 2 layout for our runs and the study's, with n/a accuracy for random 7B weights", () => {
  const r = rng(freshSeed());
  const runs = [fakeRun("lora", r), fakeRun("qlora", r)];
  const table = resultsTable(runs).split("\n");
  assertEquals(table.length, 4);
  const cells = (line: string) => line.slice(2, -2).split(" | ");
  assertEquals(cells(table[0]), [...TABLE2_HEADER]);
  assertEquals(cells(table[1]), ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]);
  runs.forEach((run, i) => {
    const row = cells(table[2 + i]);
    assertEquals(row.length, TABLE2_HEADER.length);
    assertEquals(row[0], run.label);
    assertEquals(row[1], `${(100 * run.eval!.accuracy).toFixed(2)}%`);
    assertEquals(row[2], `${(100 * run.eval!.f1).toFixed(2)}%`);
    assert(/^\d+\.\d+ (GiB|MiB)$/.test(row[3]), row[3]);
    assert(/^\d+\.\d (min|s)$/.test(row[4]), row[4]);
    assertEquals(row[5], `${run.inference!.tokensPerSecond.toFixed(1)} tok/s`);
    assertEquals(row[6], "147,456 (1.58%)");
    assertEquals(row[7], run.bitsPerBaseParameter.toFixed(3));
  });
  const study = studyTable().split("\n");
  assertEquals(cells(study[0]), [...TABLE2_HEADER]);
  assertEquals(cells(study[2]).slice(0, 6), ["LoRA (7B)", "95.41%", "95.41%", "16.6 GB", "31.5 min", "28.5 tok/s"]);
  assertEquals(cells(study[3]).slice(0, 6), ["QLoRA (7B)", "95.99%", "95.99%", "13.4 GB", "65.2 min", "26.8 tok/s"]);

  const random7b = [fakeRun("lora", r, false), fakeRun("qlora", r, false)];
  const md = resultsMarkdown(random7b, []);
  assertEquals(cells(resultsTable(random7b).split("\n")[2]).slice(1, 3), ["n/a¹", "n/a¹"]);
  assertStringIncludes(md, "accuracy is not meaningful");
  assertStringIncludes(md, "## The study");
  assertStringIncludes(md, "- QLoRA: note for QLoRA");
  assertEquals(md.split("a note both runs share").length, 2, "a shared note is printed once");
  const skipped = resultsMarkdown([runs[0]], [{ method: "QLoRA", reason: "the LoRA run was interrupted" }]);
  assertStringIncludes(skipped, "QLoRA was not run: the LoRA run was interrupted");
});

// ---------------------------------------------------------------------------------------------------------------
// End to end.

Deno.test({
  name: "sst2_compare: a tiny run writes results.json, results.md, loss.svg, loss.csv and PEFT adapter files",
  ignore: !SHARED || !SST2_DIR,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    const out = await Deno.makeTempDir({ prefix: "webtune_compare_" });
    try {
      const seed = freshSeed() % 100000;
      const before = memoryStats().liveBytes;
      const result = await runCompare([
        "--model",
        "random:micro",
        "--data",
        SST2_DIR!,
        "--train-samples",
        "6",
        "--batch-size",
        "3",
        "--grad-accum",
        "1",
        "--max-steps",
        "2",
        "--eval-samples",
        "4",
        "--seed",
        String(seed),
        "--out",
        out,
      ], { verbose: false, run: { speedTokens: 4 } });
      for (const f of ["results.json", "results.md", "loss.svg"]) assert((await Deno.stat(`${out}/${f}`)).isFile, f);
      const ran = result.runs.map((r) => r.method);
      assertEquals(ran, ["lora", "qlora"]);
      assertEquals(result.skipped, []);
      for (const method of ran) {
        for (
          const f of ["loss.csv", "metrics.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
        ) {
          assert((await Deno.stat(`${out}/${method}/${f}`)).isFile, `${method}/${f}`);
        }
        const csv = (await Deno.readTextFile(`${out}/${method}/loss.csv`)).trim().split("\n");
        assertEquals(csv.length, 3); // header + 2 steps
        const adapterConfig = JSON.parse(await Deno.readTextFile(`${out}/${method}/adapter/adapter_config.json`));
        assertEquals([adapterConfig.peft_type, adapterConfig.r, adapterConfig.lora_alpha], ["LORA", 16, 16]);
      }
      const results = JSON.parse(await Deno.readTextFile(`${out}/results.json`));
      assertEquals(results.runs.length, ran.length);
      assert(results.sameSeedAndDataOrder);
      for (const run of results.runs as RunMetrics[]) {
        assertEquals(run.train.steps, 2);
        assert(run.train.losses.every(Number.isFinite) && run.train.losses[0] > 0);
        assert(run.train.peakBytes > 0 && run.eval!.n === 4 && run.inference!.newTokens === 4);
        assert(run.eval!.majorityAccuracy >= 0.5 && run.eval!.majorityAccuracy <= 1);
        assertEquals((run.config.train as { seed: number }).seed, seed);
      }
      const md = await Deno.readTextFile(`${out}/results.md`);
      assertStringIncludes(md, `| ${TABLE2_HEADER.join(" | ")} |`);
      assertStringIncludes(md, "| LoRA |");
      const svg = await Deno.readTextFile(`${out}/loss.svg`);
      checkXml(svg);
      assertEquals([...svg.matchAll(/<path class="curve"/g)].length, ran.length);

      // --resume continues each method from its last checkpoint: one more step, loss.csv appended.
      const args = ["--model", "random:micro", "--data", SST2_DIR!, "--train-samples", "6", "--batch-size", "3"];
      const more = [...args, "--grad-accum", "1", "--eval-samples", "4", "--seed", String(seed), "--out", out];
      const resumed = await runCompare([...more, "--max-steps", "3", "--resume"], {
        verbose: false,
        run: { speedTokens: 4 },
      });
      for (const run of resumed.runs) {
        assertEquals(run.train.steps, 3);
        const csv = (await Deno.readTextFile(`${out}/${run.method}/loss.csv`)).trim().split("\n");
        assertEquals(csv.map((l) => l.split(",")[0]), ["step", "1", "2", "3"]);
      }
      const fresh = `${out}/fresh`;
      await assertRejects(
        () => runCompare([...more.slice(0, -1), fresh, "--resume"], { verbose: false }),
        Error,
        "no checkpoint",
      );
      emptyCache();
      // Both models, their optimizer state and the matmul scratch were freed: what stays (RoPE tables) is a few KiB,
      // far below one model's weights and adapters (micro: 8.3 MiB).
      const left = memoryStats().liveBytes - before;
      assert(left < 256 * 1024, `${left} bytes still live`);
    } finally {
      await Deno.remove(out, { recursive: true });
    }
  },
});
