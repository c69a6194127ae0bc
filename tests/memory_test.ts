/**
 * GPU memory accounting and deterministic release: exact live/peak/pooled bytes with size-class rounding,
 * `scope()` (sync, async, nested, `keep`), views sharing storage, graphs freed by `backward()` or by the end of
 * their scope, every op leaving nothing behind once its outputs are disposed, and a 50-step MLP training loop
 * whose live memory is constant.
 *
 * @module
 */
import { assert, assertEquals } from "@std/assert";
import {
  cat,
  emptyCache,
  getGpu,
  gt,
  keep,
  maximum,
  memoryStats,
  noGrad,
  randn,
  resetPeakMemory,
  scope,
  Tensor,
  tensor,
  where,
  zeros,
} from "../mod.ts";
import { sizeClass } from "../core/memory.ts";
import { byteSize, type DType } from "../core/dtype.ts";
import { freshSeed, randomArray, setup } from "./helpers.ts";

await setup();

const live = () => memoryStats().liveBytes;

/** Submits pending work so released buffers reach the pool's free lists. */
async function settle(): Promise<void> {
  await getGpu().sync();
}

Deno.test("sizeClass: at least the request, 256-byte steps, at most 1/16 above requests over 4 KiB", () => {
  const known: [number, number][] = [
    [1, 256],
    [256, 256],
    [257, 512],
    [4096, 4096],
    [4097, 4352],
    [65537, 69632],
    [1_000_000, 1_015_808],
  ];
  for (const [b, c] of known) assertEquals(sizeClass(b), c, `sizeClass(${b})`);
  const s = freshSeed();
  let x = s;
  for (let i = 0; i < 2000; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    const b = 1 + (x % (1 << (4 + (i % 24))));
    const c = sizeClass(b);
    assert(c >= b && c % 256 === 0, `sizeClass(${b}) = ${c}`);
    if (b > 4096) assert(c - b < b / 16, `sizeClass(${b}) = ${c} is more than 1/16 above`);
    else assert(c - b < 256, `sizeClass(${b}) = ${c}`);
  }
});

Deno.test("memoryStats: live, peak and pooled bytes are exact; views and dispose; resetPeakMemory", async () => {
  await settle();
  const start = memoryStats();
  const specs: [number[], DType][] = [[[1000], "f32"], [[1001], "f16"], [[3], "f16"], [[7, 13], "i32"], [
    [100_000],
    "u32",
  ], [[0], "f32"]];
  const expected = specs.map(([shape, dt]) => sizeClass(Math.max(byteSize(dt, shape.reduce((a, d) => a * d, 1)), 4)));
  resetPeakMemory();
  const ts: Tensor[] = [];
  let sum = 0;
  for (let i = 0; i < specs.length; i++) {
    ts.push(Tensor.empty(specs[i][0], specs[i][1]));
    sum += expected[i];
    assertEquals(live() - start.liveBytes, sum, `after allocating ${JSON.stringify(specs[i])}`);
    assertEquals(memoryStats().liveBuffers - start.liveBuffers, i + 1);
  }
  assertEquals(memoryStats().peakBytes, start.liveBytes + sum);
  // Views share storage: no new bytes; the storage is freed with its last handle.
  const r = ts[0].reshape(10, 100);
  const v = r.transpose();
  assertEquals(live() - start.liveBytes, sum);
  ts[0].dispose();
  r.dispose();
  assertEquals(live() - start.liveBytes, sum, "a view keeps the storage alive");
  v.dispose();
  assertEquals(live() - start.liveBytes, sum - expected[0]);
  for (const t of ts) t.dispose();
  assertEquals(live(), start.liveBytes, "back to the start");
  assertEquals(memoryStats().liveBuffers, start.liveBuffers);
  assertEquals(memoryStats().peakBytes, start.liveBytes + sum, "peak remembers the high-water mark");
  assertEquals(memoryStats().pooledBytes - start.pooledBytes, expected.reduce((a, b) => a + b, 0));
  resetPeakMemory();
  assertEquals(memoryStats().peakBytes, start.liveBytes);
  // A freed buffer is reused by the next request of its size class (once the work using it is submitted).
  await settle();
  const a = Tensor.empty([1000]);
  const buf = a.storage.buffer;
  a.dispose();
  await settle();
  const pooled = memoryStats().pooledBytes;
  const b = Tensor.empty([1020]); // 4080 bytes: the same 4096-byte class
  assertEquals(b.storage.buffer, buf, "reused from the pool");
  assertEquals(memoryStats().pooledBytes, pooled - 4096);
  b.dispose();
  await settle();
  emptyCache();
  assertEquals(memoryStats().pooledBytes, 0);
  assertEquals(live(), start.liveBytes);
});

Deno.test("scope frees everything but what it returns (sync, async, nested) and kept tensors", async () => {
  const base = live();
  const made: Tensor[] = [];
  const out = scope(() => {
    const a = randn([33, 65]);
    const b = a.mul(2).exp();
    made.push(a, b);
    return { y: b.sum(1), list: [b.slice(0, 1, 3)] };
  });
  assert(made.every((t) => t.disposed), "intermediates disposed");
  assert(!out.y.disposed && !out.list[0].disposed);
  assertEquals(Array.from(await out.y.toArray()).length, 33);
  out.y.dispose();
  out.list[0].dispose();
  assertEquals(live(), base, "sync scope");

  const r = await scope(async () => {
    const a = randn([7, 13]);
    await a.toArray();
    const b = a.add(1);
    made.push(a);
    await settle();
    return b;
  });
  assert(made[2].disposed && !r.disposed);
  r.dispose();
  assertEquals(live(), base, "async scope");

  // Nested scopes hand returned tensors to the parent, which frees them unless it returns them too.
  const box: { inner?: Tensor; kept?: Tensor } = {};
  const none = scope(() => {
    const inner = scope(() => randn([13]).mul(3));
    assert(!inner.disposed, "returned from the inner scope");
    box.inner = inner;
    box.kept = keep(inner.add(1)); // keep(): survives every enclosing scope
    return null;
  });
  assertEquals(none, null);
  assert(box.inner!.disposed, "freed by the outer scope");
  assert(!box.kept!.disposed, "kept");
  box.kept!.dispose();
  const passed = scope(() => scope(() => zeros([7]))); // returned through both scopes
  assert(!passed.disposed);
  passed.dispose();
  // A throwing function still frees what it made.
  try {
    scope(() => {
      randn([100]);
      throw new Error("boom");
    });
  } catch (e) {
    assertEquals((e as Error).message, "boom");
  }
  assertEquals(live(), base, "nested, kept, thrown");
});

Deno.test("a graph's saved tensors are freed by backward(), or by the scope end when backward never runs", async () => {
  await settle();
  const s = freshSeed();
  const x = tensor(randomArray(33 * 65, s), [33, 65], { requiresGrad: true });
  const base = live();
  // Outside any scope: dispose every handle; only the graph's saved aliases remain until backward frees them.
  const e = x.exp(), m = e.mul(x), sm = m.softmax(0), mx = sm.max(1), loss = mx.sum();
  for (const t of [e, m, sm, mx]) t.dispose();
  assert(live() > base, "the graph holds saved tensors");
  loss.backward();
  loss.dispose();
  assertEquals(live(), base + sizeClass(33 * 65 * 4), "only x.grad is left");
  x.zeroGrad();
  assertEquals(live(), base);
  // Inside a scope without backward: the scope releases the graph.
  scope(() => {
    x.exp().mul(x).softmax().logSoftmax(0).square().mean();
  });
  assertEquals(live(), base, "scope end releases the unused graph");
  // A returned loss keeps its graph; backward then frees it.
  const l = scope(() => x.tanh().mul(x).sum());
  assert(live() > base);
  l.backward();
  l.dispose();
  x.zeroGrad();
  assertEquals(live(), base);
  x.dispose();
});

Deno.test("every op leaves nothing behind once its outputs (and gradients) are disposed, outside any scope", async () => {
  // Each case is one op on prepared leaves, so any buffer still live afterwards was leaked by the op itself
  // (a scope would hide such a leak by disposing everything it tracked).
  const s = freshSeed();
  const leaf = (shape: number[], k: number, positive = false) =>
    tensor(randomArray(shape.reduce((a, d) => a * d, 1), s + k).map((v) => (positive ? Math.abs(v) + 0.5 : v)), shape, {
      requiresGrad: true,
    });
  const x = leaf([7, 13], 0, true), y = leaf([7, 13], 1), r13 = leaf([13], 2), c71 = leaf([7, 1], 3);
  const r113 = leaf([1, 13], 4);
  // Non-contiguous leaves: transposed views made without a graph, then marked as requiring gradients.
  const xt = noGrad(() => leaf([13, 7], 5).transpose()).requiresGrad_();
  const wt = noGrad(() => leaf([5, 13], 6).transpose()).requiresGrad_();
  const h = noGrad(() => leaf([7, 13], 7).to("f16")).requiresGrad_();
  const mask = noGrad(() => gt(y, 0));
  const inputs = [x, y, r13, c71, r113, xt, wt, h];
  const ops: [string, () => Tensor][] = [
    ["add [7,13]+[13]", () => x.add(r13)],
    ["sub", () => x.sub(y)],
    ["mul [7,1]·[1,13]", () => c71.mul(r113)],
    ["div scalar", () => x.div(3)],
    ["div strided", () => y.div(xt)],
    ...(["neg", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "relu", "gelu", "abs", "square"] as const)
      .map((op): [string, () => Tensor] => [op, () => x[op]()]),
    ["pow", () => xt.pow(3)],
    ["maximum", () => maximum(x, y)],
    ["where", () => where(mask, x, y)],
    ["sum of a transpose", () => xt.sum(0)],
    ["mean of a transpose", () => xt.mean([0, 1], true)],
    ["max of a transpose", () => xt.max(0)],
    ["softmax axis 0", () => x.softmax(0)],
    ["softmax of a transpose", () => xt.softmax()],
    ["logSoftmax axis 0", () => xt.logSoftmax(0)],
    ["reshape of a transpose", () => xt.reshape(-1)],
    ["view", () => x.view(13, 7)],
    ["permute", () => xt.permute(1, 0)],
    ["contiguous", () => xt.contiguous()],
    ["slice", () => x.slice(1, 2, -2)],
    ["expand", () => c71.expand(7, 13)],
    ["unsqueeze", () => x.unsqueeze(1)],
    ["squeeze", () => r113.squeeze(0)],
    ["cat", () => cat([x, xt], 1)],
    ["cat f16", () => cat([h, h], 0)],
    ["cast f32→f16", () => x.to("f16")],
    ["cast f16→f32", () => h.to("f32")],
    ["matmul", () => x.matmul(wt)],
  ];
  await settle();
  const base = live();
  for (const [name, f] of ops) {
    const out = noGrad(f);
    out.dispose();
    assertEquals(live(), base, `${name}: forward without a graph`);
    const o = f();
    const g = tensor(randomArray(o.numel, s + 9), [...o.shape], { dtype: o.dtype === "f16" ? "f16" : "f32" });
    o.backward(g);
    o.dispose();
    g.dispose();
    for (const t of inputs) t.zeroGrad();
    assertEquals(live(), base, `${name}: forward and backward`);
  }
  for (const t of [...inputs, mask]) t.dispose();
});

Deno.test("a 50-step MLP training loop (matmul, add, relu, mean of squares, SGD under noGrad) has constant live bytes", async () => {
  const s = freshSeed();
  const x = randn([33, 5], { seed: s });
  const target = randn([33, 1], { seed: s + 1 });
  let params = [
    randn([5, 17], { seed: s + 2, std: 0.5 }),
    zeros([17]),
    randn([17, 1], { seed: s + 3, std: 0.5 }),
    zeros([1]),
  ].map((p) => p.requiresGrad_());
  const lr = 0.05;
  const liveAt: number[] = [], peakAt: number[] = [], losses: number[] = [];
  for (let step = 1; step <= 50; step++) {
    resetPeakMemory();
    const loss = scope(() => {
      const [w1, b1, w2, b2] = params;
      const h = x.matmul(w1).add(b1).relu();
      const l = h.matmul(w2).add(b2).sub(target).square().mean();
      l.backward();
      // SGD: replace each parameter by p − lr·g, computed without recording a graph.
      params = noGrad(() =>
        params.map((p) => {
          const next = keep(p.sub(p.grad!.mul(lr))).requiresGrad_();
          p.zeroGrad();
          p.dispose();
          return next;
        })
      );
      return l.detach();
    });
    losses.push(await loss.item());
    loss.dispose();
    liveAt.push(live());
    peakAt.push(memoryStats().peakBytes);
  }
  for (let step = 5; step <= 50; step++) {
    assertEquals(liveAt[step - 1], liveAt[4], `live bytes at step ${step} vs step 5`);
    assertEquals(peakAt[step - 1], peakAt[4], `peak bytes of step ${step} vs step 5`);
  }
  assert(losses[49] < losses[0], `the loss decreases: ${losses[0]} → ${losses[49]} (seed ${s})`);
  for (const p of params) p.dispose();
  x.dispose();
  target.dispose();
});
