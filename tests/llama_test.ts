/**
 * LLaMA parity with transformers (fixture made by tests/fixtures/make_llama_fixtures.py on the H200 machine:
 * a tiny random model with GQA, bf16 weights, RoPE theta 500000 and an untied head), stories260K greedy text
 * against llama2.c's, and the loaders' error messages.
 */
import { assert, assertEquals, assertRejects, assertThrows } from "@std/assert";
import { fromArray, memoryStats, noGrad, scope } from "../mod.ts";
import { Tokenizer } from "../data/tokenizer.ts";
import { fromPretrained, generate, llamaConfigFromHF, LlamaForCausalLM, llamaPreset, loadLlama2c } from "../nn/mod.ts";
import { assertClose, loadFixture, normwise, setup, SHARED } from "./helpers.ts";

await setup();
const FIX = new URL("./fixtures/data/llama_tiny/", import.meta.url).pathname;
const { get, rows: ids2d } = await loadFixture(`${FIX}reference.safetensors`);

Deno.test("llama: config.json with rope_parameters, GQA and an untied head is read", async () => {
  const cfg = llamaConfigFromHF(JSON.parse(await Deno.readTextFile(`${FIX}config.json`)));
  assertEquals([cfg.ropeTheta, cfg.numKeyValueHeads, cfg.numAttentionHeads, cfg.tieWordEmbeddings], [
    500000,
    2,
    4,
    false,
  ]);
  assertThrows(() => llamaConfigFromHF({ model_type: "mistral" }), Error, "Unsupported model_type");
});

Deno.test("llama: logits, loss and every weight gradient match transformers on a right-padded batch", async () => {
  const model = await fromPretrained(FIX, { dtype: "f32" });
  model.requiresGrad_(true);
  const mask = get("attention_mask");
  const [B, T] = mask.shape;
  const V = model.config.vocabSize;
  const { logits, loss } = scope(() => {
    const out = model.forward(ids2d("input_ids"), {
      attentionMask: ids2d("attention_mask"),
      labels: ids2d("labels"),
      positionIds: ids2d("position_ids"),
    });
    out.loss!.backward();
    return { logits: out.logits, loss: out.loss!.detach() };
  });
  const m = mask.data as Int32Array;
  const got = await logits.toArray();
  const want = get("logits").data as Float32Array;
  const err = normwise(got, want, (i) => m[Math.floor(i / V)] === 1);
  assert(err < 1e-4, `logits normwise relative error ${err.toExponential(2)} ≥ 1e-4`);
  const l = await loss.item();
  const wantLoss = (get("loss").data as Float32Array)[0];
  assert(Math.abs(l - wantLoss) / Math.abs(wantLoss) < 1e-5, `loss ${l} vs ${wantLoss}`);
  let checked = 0;
  for (const [name, p] of model.namedParameters()) {
    const g = get(`grad.${name}`);
    assert(g, `fixture lacks grad.${name}`);
    assert(p.grad, `no gradient for ${name}`);
    const e = normwise(await p.grad.toArray(), g.data as Float32Array);
    assert(e < 1e-3, `${name}: gradient normwise relative error ${e.toExponential(2)} ≥ 1e-3`);
    checked++;
  }
  assertEquals(checked, 21);
  assertEquals(B * T, m.length);
  logits.dispose();
  loss.dispose();
  model.dispose();
});

Deno.test("llama: logitsPositions computes the head at chosen positions with the same loss", async () => {
  const model = await fromPretrained(FIX, { dtype: "f32" });
  const labels = ids2d("labels");
  const T = labels[0].length;
  const positions: number[] = [];
  labels.forEach((row, b) => row.forEach((_, t) => t < T - 1 && row[t + 1] !== -100 && positions.push(b * T + t)));
  const out = noGrad(() =>
    model.forward(ids2d("input_ids"), {
      attentionMask: ids2d("attention_mask"),
      labels,
      logitsPositions: positions,
    })
  );
  assertEquals(out.logits.shape, [positions.length, 256]);
  const l = await out.loss!.item();
  const wantLoss = (get("loss").data as Float32Array)[0];
  assert(Math.abs(l - wantLoss) / wantLoss < 1e-5, `loss ${l} vs ${wantLoss}`);
  const all = get("logits").data as Float32Array;
  const got = await out.logits.toArray();
  const want = new Float32Array(positions.flatMap((p) => Array.from(all.subarray(p * 256, (p + 1) * 256))));
  assertClose(got, want, { rtol: 1e-4, relToMax: true, label: "picked logits" });
  model.dispose();
});

Deno.test("llama: greedy generation (KV cache, left-padded batch and single prompt) equals transformers'", async () => {
  const model = await fromPretrained(FIX, { dtype: "f32" });
  const prompts = ids2d("gen_input_ids");
  const out = await generate(model, prompts, {
    maxNewTokens: 20,
    attentionMask: ids2d("gen_attention_mask"),
    eosTokenId: null,
    chunk: 7,
  });
  const want = ids2d("gen_output_ids").map((r) => r.slice(prompts[0].length));
  assertEquals(out.tokens, want);
  const single = ids2d("gen_single_input_ids");
  const one = await generate(model, single, { maxNewTokens: 20, eosTokenId: null });
  assertEquals(one.tokens[0], ids2d("gen_single_output_ids")[0].slice(single[0].length));
  model.dispose();
});

Deno.test("llama: a forward + backward inside scope() leaves no GPU memory behind", async () => {
  const model = await fromPretrained(FIX, { dtype: "f32" });
  model.requiresGrad_(true);
  const step = () =>
    scope(() => {
      const { loss } = model.forward(ids2d("input_ids"), {
        attentionMask: ids2d("attention_mask"),
        labels: ids2d("labels"),
      });
      loss!.backward();
      for (const p of model.parameters()) p.zeroGrad();
    });
  step();
  const before = memoryStats().liveBytes;
  step();
  step();
  assertEquals(memoryStats().liveBytes, before);
  model.dispose();
});

Deno.test("llama: clear errors for bad checkpoints and inputs", async () => {
  const dir = await Deno.makeTempDir();
  await assertRejects(() => fromPretrained(`${dir}/nope`), Error, "not found");
  await assertRejects(() => fromPretrained(dir), Error, "no config.json");
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify({ model_type: "gpt2" }));
  await assertRejects(() => fromPretrained(dir), Error, "Unsupported model_type");
  await Deno.copyFile(`${FIX}config.json`, `${dir}/config.json`);
  await assertRejects(() => fromPretrained(dir), Error, "no model.safetensors");
  const bytes = await Deno.readFile(`${FIX}model.safetensors`);
  await Deno.writeFile(`${dir}/model.safetensors`, bytes.subarray(0, bytes.length - 1000));
  await assertRejects(() => fromPretrained(dir), Error, "truncated");
  await Deno.remove(dir, { recursive: true });
  const model = new LlamaForCausalLM({
    ...llamaPreset("tiny"),
    vocabSize: 64,
    numHiddenLayers: 1,
    maxPositionEmbeddings: 8,
  });
  assertThrows(() => model.forward([[1, 64]]), Error, "outside the vocabulary");
  assertThrows(() => model.forward([new Array(9).fill(1)]), Error, "max_position_embeddings");
  assertThrows(() => llamaPreset("llama-9b"), Error, "Presets:");
  model.dispose();
});

Deno.test({
  name: "llama: stories260K greedy text from BOS matches llama2.c's reference",
  ignore: !SHARED,
  fn: async () => {
    const model = await loadLlama2c(`${SHARED}/models/stories260K/stories260K.bin`);
    const tok = await Tokenizer.load(`${SHARED}/models/stories260K/tok512.bin`);
    const out = await generate(model, [[1]], { maxNewTokens: 40 });
    const text = tok.decode(out.tokens[0]);
    const want = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.";
    assert(text.startsWith(want), `got: ${JSON.stringify(text)}`);
    await assertRejects(() => loadLlama2c(new Uint8Array(10)), Error, "too short");
    model.dispose();
  },
});

Deno.test("llama: stateDict round trip and loadStateDict errors", () => {
  const model = new LlamaForCausalLM({ ...llamaPreset("tiny"), vocabSize: 32, numHiddenLayers: 1 });
  const sd = model.stateDict();
  assert(sd.has("model.layers.0.self_attn.q_proj.weight") && sd.has("lm_head.weight"));
  const bad = new Map([["model.norm.weight", fromArray(new Float32Array(3), [3])]]);
  assertThrows(() => model.loadStateDict(bad, { strict: false }), Error, "mis-shaped");
  assertThrows(() => model.loadStateDict(new Map()), Error, "missing keys");
  bad.get("model.norm.weight")!.dispose();
  model.dispose();
});

Deno.test("module: setSubmodule replaces a list item and a nested layer", () => {
  const model = new LlamaForCausalLM({ ...llamaPreset("tiny"), vocabSize: 32, numHiddenLayers: 2 });
  const first = model.model.layers[0];
  model.setSubmodule("model.layers.0", model.model.layers[1]);
  assert(model.model.layers[0] === model.model.layers[1]);
  model.setSubmodule("model.layers.0", first);
  const q = first.self_attn.q_proj;
  model.setSubmodule("model.layers.0.self_attn.q_proj", first.self_attn.k_proj);
  assert(model.getSubmodule("model.layers.0.self_attn.q_proj") === first.self_attn.k_proj);
  model.setSubmodule("model.layers.0.self_attn.q_proj", q);
  assertThrows(() => model.setSubmodule("model.layers.7", first), Error, "No submodule");
  model.dispose();
});
