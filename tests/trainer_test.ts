/**
 * The Trainer: gradient accumulation, the step log and loss.csv, PEFT-format checkpoints with optimizer state, and
 * resuming: a run stopped after k steps and resumed gives the same parameters as an uninterrupted run.
 */
import { assert, assertEquals, assertRejects } from "@std/assert";
import { manualSeed } from "../core/random.ts";
import { LlamaForCausalLM, llamaPreset } from "../nn/mod.ts";
import { getPeftModel, type PeftModel, Trainer, type TrainerConfig } from "../peft/mod.ts";
import { normwise, setup } from "./helpers.ts";

await setup();

const cfg = { ...llamaPreset("tiny"), vocabSize: 64, hiddenSize: 32, intermediateSize: 64, numHiddenLayers: 1 };

function build(): PeftModel {
  const model = new LlamaForCausalLM(cfg, { dtype: "f32" });
  // Same base weights for every build: seed the draws.
  return getPeftModel(model, {
    r: 4,
    alpha: 8,
    dropout: 0,
    targetModules: ["q_proj", "v_proj"],
    initLoraWeights: false,
  });
}

function data(n: number): { inputIds: number[]; labels: number[] }[] {
  return Array.from({ length: n }, (_, i) => {
    const ids = [1, ...Array.from({ length: 5 + (i % 4) }, (_, t) => 3 + ((i * 7 + t * 5) % 60)), 2];
    return { inputIds: ids, labels: ids.map((v, t) => (t >= ids.length - 2 ? v : -100)) };
  });
}

const base = (outDir: string): TrainerConfig => ({
  outDir,
  batchSize: 2,
  gradAccum: 2,
  lr: 1e-2,
  warmupRatio: 0.25,
  padId: 0,
  seed: 3,
  progress: false,
});

async function params(m: PeftModel): Promise<Float32Array[]> {
  return await Promise.all(m.trainableParameters().map((p) => p.toArray() as Promise<Float32Array>));
}

Deno.test("trainer: loss falls, loss.csv has a row per step, and a resumed run equals an uninterrupted one", async () => {
  const dir = await Deno.makeTempDir();
  const examples = data(16); // 8 micro-batches = 4 optimizer steps
  manualSeed(1);
  const full = build();
  const r1 = await new Trainer(full, examples, base(`${dir}/full`)).train();
  assertEquals(r1.steps, 4);
  const csv = (await Deno.readTextFile(`${dir}/full/loss.csv`)).trim().split("\n");
  assertEquals(csv.length, 1 + 4);
  assert(r1.log[3].loss < r1.log[0].loss, `loss did not fall: ${r1.log.map((l) => l.loss)}`);
  for (
    const f of [
      "adapter/adapter_config.json",
      "adapter/adapter_model.safetensors",
      "last-checkpoint/optimizer.safetensors",
    ]
  ) {
    assert((await Deno.stat(`${dir}/full/${f}`)).isFile, f);
  }
  // Two steps, then resume for the other two from the checkpoint.
  manualSeed(1);
  const first = build();
  await new Trainer(first, examples, { ...base(`${dir}/part`), maxSteps: 2 }).train();
  first.dispose();
  manualSeed(1);
  const resumed = build();
  const r2 = await new Trainer(resumed, examples, { ...base(`${dir}/part`), resumeFrom: `${dir}/part/last-checkpoint` })
    .train();
  assertEquals(r2.steps, 4);
  const a = await params(full), b = await params(resumed);
  a.forEach((x, i) => {
    const e = normwise(b[i], x);
    assert(e < 1e-5, `parameter ${i} differs after resuming: ${e}`);
  });
  const rows = (await Deno.readTextFile(`${dir}/part/loss.csv`)).trim().split("\n");
  assertEquals(rows.length, 1 + 4, "the resumed run appends to loss.csv");
  await assertRejects(
    () => new Trainer(build(), examples, { ...base(`${dir}/x`), resumeFrom: `${dir}/nowhere` }).train(),
    Error,
    "not a checkpoint",
  );
  full.dispose();
  resumed.dispose();
  await Deno.remove(dir, { recursive: true });
});
