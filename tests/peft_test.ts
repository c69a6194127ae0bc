/**
 * PEFT parity (fixture made by tests/fixtures/make_peft_fixtures.py with HF PEFT on the H200 machine): an adapter
 * saved by PEFT loads here and gives PEFT's logits, loss and LoRA gradients, merged logits and rsLoRA scaling;
 * our saved adapters round-trip; config validation; gradient checkpointing gives the same gradients with less
 * peak memory.
 */
import { assert, assertEquals, assertRejects, assertThrows } from "@std/assert";
import { memoryStats, noGrad, resetPeakMemory, scope } from "../mod.ts";
import { loadSafetensors } from "../core/safetensors.ts";
import { fromPretrained, LlamaForCausalLM, llamaPreset } from "../nn/mod.ts";
import { getPeftModel, loadAdapter, loraConfig, saveAdapter } from "../peft/mod.ts";
import { loadFixture, normwise, setup } from "./helpers.ts";

await setup();
const BASE = new URL("./fixtures/data/llama_tiny/", import.meta.url).pathname;
const FIX = new URL("./fixtures/data/peft_tiny/", import.meta.url).pathname;
const { get, rows: ids2d } = await loadFixture(`${FIX}reference.safetensors`);
const mask = get("attention_mask").data as Int32Array;
const V = 256;

async function logitsError(logits: { toArray(): Promise<ArrayLike<number>> }, key: string): Promise<number> {
  return normwise(await logits.toArray(), get(key).data as Float32Array, (i) => mask[Math.floor(i / V)] === 1);
}

const batch = () => ({
  attentionMask: ids2d("attention_mask"),
  labels: ids2d("labels"),
  positionIds: ids2d("position_ids"),
});

Deno.test("peft: PEFT's adapter gives PEFT's logits, loss and every LoRA gradient; merge gives merged logits", async () => {
  const peft = await loadAdapter(await fromPretrained(BASE, { dtype: "f32" }), `${FIX}adapter`);
  assertEquals(peft.peftConfig.scaling, 2);
  const out = scope(() => {
    const o = peft.forward(ids2d("input_ids"), batch());
    o.loss!.backward();
    return { logits: o.logits, loss: o.loss!.detach() };
  });
  const e = await logitsError(out.logits, "logits");
  assert(e < 1e-4, `logits error ${e.toExponential(2)}`);
  const loss = await out.loss.item(), want = (get("loss").data as Float32Array)[0];
  assert(Math.abs(loss - want) / want < 1e-5, `loss ${loss} vs ${want}`);
  let n = 0;
  for (const [name, p] of peft.namedParameters()) {
    if (!p.requiresGrad) {
      assertEquals(p.grad, null, `${name} is frozen but got a gradient`);
      continue;
    }
    const g = get(`grad.${name}`);
    assert(g, `no reference gradient for ${name}`);
    const err = normwise(await p.grad!.toArray(), g.data as Float32Array);
    assert(err < 1e-3, `${name}: gradient error ${err.toExponential(2)}`);
    n++;
  }
  assertEquals(n, 28);
  peft.merge();
  const merged = noGrad(() => peft.forward(ids2d("input_ids"), batch()).logits);
  const em = await logitsError(merged, "merged_logits");
  assert(em < 1e-4, `merged logits error ${em.toExponential(2)}`);
  peft.unmerge();
  const again = noGrad(() => peft.forward(ids2d("input_ids"), batch()).logits);
  assert(await logitsError(again, "logits") < 1e-4, "unmerge restores the adapter's logits");
  const base = noGrad(() => peft.disableAdapters(() => peft.forward(ids2d("input_ids"), batch()).logits));
  assert(await logitsError(base, "logits") > 1e-2, "disableAdapters gives the base model's (different) logits");
  for (const t of [out.logits, out.loss, merged, again, base]) t.dispose();
  peft.dispose();
});

Deno.test("peft: rsLoRA adapter scales by alpha/√r and matches PEFT", async () => {
  const peft = await loadAdapter(await fromPretrained(BASE, { dtype: "f32" }), `${FIX}adapter_rslora`);
  assert(Math.abs(peft.peftConfig.scaling - 16 / Math.sqrt(8)) < 1e-12);
  const logits = noGrad(() => peft.forward(ids2d("input_ids"), batch()).logits);
  const e = await logitsError(logits, "rslora_logits");
  assert(e < 1e-4, `rsLoRA logits error ${e.toExponential(2)}`);
  logits.dispose();
  peft.dispose();
});

Deno.test("peft: saveAdapter → loadAdapter round trip (PEFT file layout, with and without .default)", async () => {
  const peft = await loadAdapter(await fromPretrained(BASE, { dtype: "f32" }), `${FIX}adapter`);
  const dir = await Deno.makeTempDir();
  await saveAdapter(peft, dir);
  const cfg = JSON.parse(await Deno.readTextFile(`${dir}/adapter_config.json`));
  assertEquals([cfg.peft_type, cfg.r, cfg.lora_alpha, cfg.task_type, cfg.bias, cfg.use_rslora], [
    "LORA",
    4,
    8,
    "CAUSAL_LM",
    "none",
    false,
  ]);
  const saved = await loadSafetensors(`${dir}/adapter_model.safetensors`);
  const theirs = await loadSafetensors(`${FIX}adapter/adapter_model.safetensors`);
  assertEquals([...saved.keys()].sort(), [...theirs.keys()].sort());
  for (const [k, t] of theirs) {
    assertEquals(Array.from(saved.get(k)!.data as Float32Array), Array.from(t.data as Float32Array), k);
  }
  // PEFT's in-memory names (".default") load too.
  const { saveSafetensors } = await import("../core/safetensors.ts");
  const withDefault = Object.fromEntries(
    [...theirs].map((
      [k, t],
    ) => [k.replace(/\.weight$/, ".default.weight"), { dtype: "F32" as const, shape: t.shape, data: t.data }]),
  );
  await saveSafetensors(`${dir}/adapter_model.safetensors`, withDefault);
  const again = await loadAdapter(await fromPretrained(BASE, { dtype: "f32" }), dir);
  const logits = noGrad(() => again.forward(ids2d("input_ids"), batch()).logits);
  assert(await logitsError(logits, "logits") < 1e-4);
  await Deno.remove(`${dir}/adapter_model.safetensors`);
  await assertRejects(() => loadAdapter(again, dir), Error, "no adapter_model.safetensors");
  logits.dispose();
  peft.dispose();
  again.dispose();
  await Deno.remove(dir, { recursive: true });
});

Deno.test("peft: config validation and trainable-parameter count like PEFT", () => {
  assertThrows(() => loraConfig({ r: 0, targetModules: ["q_proj"] }), Error, "positive integer");
  assertThrows(() => loraConfig({ r: 4, dropout: 1, targetModules: ["q_proj"] }), Error, "[0, 1)");
  const model = new LlamaForCausalLM({ ...llamaPreset("tiny"), vocabSize: 64, numHiddenLayers: 2 });
  assertThrows(() => getPeftModel(model, { r: 4, targetModules: ["qkv_proj"] }), Error, "Available: q_proj");
  const peft = getPeftModel(model, { r: 4, alpha: 8, targetModules: ["q_proj", "v_proj"] });
  const { trainable, all } = peft.parameterCounts();
  assertEquals(trainable, 2 * 2 * (128 * 4 + 4 * 128));
  const line = peft.printTrainableParameters();
  assertEquals(
    line,
    `trainable params: ${trainable.toLocaleString("en-US")} || all params: ${
      all.toLocaleString("en-US")
    } || trainable%: ${(100 * trainable / all).toFixed(4)}`,
  );
  peft.dispose();
});

Deno.test("peft: 7B-shaped count prints PEFT's line for r=8 on q,v", () => {
  // Counting only: a config-level check that needs no GPU memory for 7B.
  const cfg = llamaPreset("llama-2-7b");
  const per = (i: number, o: number) => i * o;
  const layer = 4 * per(4096, 4096) + 3 * per(4096, 11008) + 2 * 4096;
  const base = cfg.numHiddenLayers * layer + 2 * 32000 * 4096 + 4096;
  const lora = cfg.numHiddenLayers * 2 * (4096 * 8 + 8 * 4096);
  assertEquals(lora, 4_194_304);
  assertEquals(base + lora, 6_742_609_920);
});

Deno.test("peft: gradient checkpointing gives identical gradients and lower peak memory (4 layers)", async () => {
  const cfg = { ...llamaPreset("tiny"), vocabSize: 96, hiddenSize: 64, intermediateSize: 192, numHiddenLayers: 4 };
  const model = new LlamaForCausalLM(cfg);
  const peft = getPeftModel(model, {
    r: 4,
    alpha: 8,
    dropout: 0.1,
    targetModules: ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    initLoraWeights: false,
  });
  const ids = Array.from({ length: 4 }, (_, b) => Array.from({ length: 24 }, (_, t) => (b * 31 + t * 7) % 96));
  const run = async (on: boolean) => {
    peft.gradientCheckpointing(on);
    const { manualSeed } = await import("../core/random.ts");
    manualSeed(7);
    resetPeakMemory();
    const base = memoryStats().liveBytes;
    scope(() => {
      const { loss } = peft.forward(ids, { labels: ids });
      loss!.backward();
    });
    const peak = memoryStats().peakBytes - base;
    const grads = await Promise.all(peft.trainableParameters().map((p) => p.grad!.toArray()));
    for (const p of peft.trainableParameters()) p.zeroGrad();
    return { peak, grads };
  };
  const plain = await run(false);
  const ckpt = await run(true);
  plain.grads.forEach((g, i) => {
    const e = normwise(ckpt.grads[i], g);
    assert(e < 1e-6, `parameter ${i}: checkpointed gradient differs by ${e.toExponential(2)}`);
  });
  assert(ckpt.peak < plain.peak, `peak with checkpointing ${ckpt.peak} ≥ without ${plain.peak}`);
  peft.dispose();
});
