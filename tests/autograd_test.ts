/**
 * The autograd tape: accumulation into `.grad`, tensors used more than once, inputs that do not require
 * gradients (no gradient and no kernel for them), `noGrad` (sync and async), `detach`, `zeroGrad`,
 * `backward(grad)`, clear errors (non-scalar backward, disposed tensors, mismatched shapes, bad reshapes), and a
 * 2,000-op chain.
 *
 * @module
 */
import { assert, assertEquals, assertRejects, assertThrows } from "@std/assert";
import { cat, getGpu, gt, isGradEnabled, keep, maximum, noGrad, scope, type Tensor, tensor, where } from "../mod.ts";
import { assertClose, freshSeed, randomArray, setup } from "./helpers.ts";

await setup();

/** Runs `fn` in a scope so everything it creates (except kept gradients) is freed. */
function scoped(fn: () => Promise<void>): () => Promise<void> {
  return () => scope(fn);
}

/** A fresh f32 leaf of `shape` with N(0, 1) values. */
function leaf(shape: number[], seed: number, requiresGrad = true): Tensor {
  return tensor(randomArray(shape.reduce((a, d) => a * d, 1), seed), shape, { requiresGrad });
}

async function values(t: Tensor | null): Promise<number[]> {
  assert(t !== null, "expected a gradient");
  return Array.from(await t.toArray());
}

Deno.test(
  "two backward() calls accumulate into .grad; zeroGrad() starts over",
  scoped(async () => {
    const s = freshSeed();
    const x = leaf([7, 13], s);
    const xv = await values(x);
    x.mul(3).sum().backward();
    assertEquals(await values(x.grad), new Array(91).fill(3));
    const g1 = x.grad;
    x.square().sum().backward(); // d/dx Σx² = 2x
    assertEquals(x.grad, g1, "accumulates into the same .grad tensor");
    assertClose(await values(x.grad), xv.map((v) => 3 + 2 * v), {
      rtol: 1e-6,
      relToMax: true,
      label: `3 + 2x (seed ${s})`,
    });
    x.zeroGrad();
    assertEquals(x.grad, null);
    x.mul(-1).sum().backward();
    assertEquals(await values(x.grad), new Array(91).fill(-1));
    x.zeroGrad();
  }),
);

Deno.test(
  "a tensor used twice sums its gradients: x·x, x + x, and two branches exp(x) + x²",
  scoped(async () => {
    const s = freshSeed();
    const x = leaf([7, 13], s);
    const xv = await values(x);
    x.mul(x).sum().backward();
    assertClose(await values(x.grad), xv.map((v) => 2 * v), { rtol: 1e-6, label: "d Σx·x" });
    x.zeroGrad();
    x.add(x).sum().backward();
    assertEquals(await values(x.grad), new Array(91).fill(2));
    x.zeroGrad();
    const h = x.mul(0.5); // an intermediate feeding two branches
    h.exp().add(h.square()).sum().backward(); // d/dx = 0.5·exp(x/2) + 0.5·x
    assertClose(await values(x.grad), xv.map((v) => 0.5 * Math.exp(v / 2) + 0.5 * v), {
      rtol: 1e-5,
      relToMax: true,
      label: `branches (seed ${s})`,
    });
    assertEquals(h.grad, null, "intermediate tensors get no .grad");
    x.zeroGrad();
  }),
);

Deno.test(
  "two leaves of the same shape get separate gradient tensors (add/sub return g to both)",
  scoped(async () => {
    const a = leaf([7, 13], freshSeed()), b = leaf([7, 13], freshSeed());
    a.add(b).sum().backward();
    assert(a.grad !== null && b.grad !== null && a.grad !== b.grad, "distinct .grad tensors");
    a.sub(b).mul(2).sum().backward(); // accumulating into a.grad must not change b.grad
    assertEquals(await values(a.grad), new Array(91).fill(3));
    assertEquals(await values(b.grad), new Array(91).fill(-1));
    a.zeroGrad();
    assertEquals(await values(b.grad), new Array(91).fill(-1), "b.grad survives a.zeroGrad()");
    b.zeroGrad();
    const c = leaf([5], freshSeed());
    c.add(1).sub(2).sum().backward(); // scalar operands: the rule passes g straight through
    assertEquals(await values(c.grad), [1, 1, 1, 1, 1]);
    c.zeroGrad();
  }),
);

/** Dispatches recorded by `fn`. */
function dispatches(fn: () => void): number {
  const gpu = getGpu();
  const before = gpu.dispatchCount;
  fn();
  return gpu.dispatchCount - before;
}

Deno.test(
  "inputs with requiresGrad false get no .grad, and no gradient kernel runs for them",
  () =>
    scope(() => {
      const ops: [string, (a: Tensor, b: Tensor) => Tensor][] = [
        ["mul", (a, b) => a.mul(b)],
        ["div", (a, b) => a.div(b.abs().add(1))],
        ["add (broadcast)", (a, b) => a.add(b.sum(0))],
        ["sub (broadcast)", (a, b) => a.sub(b.sum(0))],
        ["maximum", (a, b) => maximum(a, b)],
        ["where", (a, b) => where(gt(a.detach(), 0), a, b)],
        ["cat", (a, b) => cat([a, b], 1)],
        ["matmul", (a, b) => a.matmul(b.transpose())],
      ];
      for (const [name, f] of ops) {
        const s = freshSeed();
        const a = leaf([7, 13], s), b = leaf([7, 13], s + 1, false);
        const onlyA = dispatches(() => f(a, b).sum().backward());
        assertEquals(b.grad, null, `${name}: b.grad`);
        assert(a.grad !== null, `${name}: a.grad`);
        a.zeroGrad();
        b.requiresGrad_(true);
        const both = dispatches(() => f(a, b).sum().backward());
        assert(b.grad !== null, `${name}: b.grad when required`);
        assert(onlyA < both, `${name}: ${onlyA} dispatches with only a requiring a gradient, ${both} with both`);
        a.zeroGrad();
        b.zeroGrad();
      }
      // No input requires a gradient: no graph at all.
      const c = leaf([3], 1, false);
      const y = c.mul(2).exp();
      assert(!y.requiresGrad && y.node === null);
      assertThrows(() => y.sum().backward(), Error, "does not require a gradient");
    }),
);

Deno.test(
  "noGrad records nothing, restores the mode after return and throw, and works with async functions",
  scoped(async () => {
    const x = leaf([7, 13], freshSeed());
    const y = noGrad(() => x.mul(2).exp());
    assertEquals(y.node, null);
    assert(!y.requiresGrad);
    assert(isGradEnabled());
    assertThrows(
      () =>
        noGrad(() => {
          throw new Error("boom");
        }),
      Error,
      "boom",
    );
    assert(isGradEnabled(), "restored after a throw");
    const pending = noGrad(async () => {
      await new Promise((r) => setTimeout(r, 5));
      assert(!isGradEnabled(), "still off after an await inside noGrad");
      const z = x.square().sum();
      await z.toArray();
      return z;
    });
    const z = await pending;
    assertEquals(z.node, null);
    assert(!z.requiresGrad);
    assert(isGradEnabled(), "restored after the async function settles");
    await assertRejects(
      () =>
        noGrad(async () => {
          await Promise.resolve();
          throw new Error("async boom");
        }),
      Error,
      "async boom",
    );
    assert(isGradEnabled(), "restored after an async rejection");
    const nested = noGrad(() => noGrad(() => x.add(1)).mul(x));
    assertEquals(nested.node, null);
    assert(x.add(1).node !== null, "recording again outside noGrad");
  }),
);

Deno.test(
  "detach() blocks the gradient; backward(grad) takes a given gradient; gradients of f16 leaves are f16",
  scoped(async () => {
    const s = freshSeed();
    const x = leaf([7, 13], s);
    const xv = await values(x);
    // y = x · stop(x): the gradient is stop(x) = x, not 2x.
    x.mul(x.detach()).sum().backward();
    assertClose(await values(x.grad), xv, { rtol: 1e-6, label: "detach" });
    x.zeroGrad();
    const g = randomArray(91, s + 1);
    x.mul(3).backward(tensor(g, [7, 13]));
    assertClose(await values(x.grad), Array.from(g, (v) => 3 * v), { rtol: 1e-6, label: "backward(grad)" });
    x.zeroGrad();
    const h = x.detach().to("f16").requiresGrad_();
    h.mul(2).sum().backward();
    assertEquals(h.grad!.dtype, "f16");
    assertEquals(await values(h.grad), new Array(91).fill(2));
    h.zeroGrad();
  }),
);

Deno.test("clear errors: non-scalar backward, wrong grad shape, disposed tensors, shape mismatches", async () => {
  await scope(async () => {
    const x = leaf([7, 13], freshSeed());
    const y = x.mul(2);
    assertThrows(() => y.backward(), Error, "backward() on a tensor of shape [7, 13] needs a gradient");
    assertThrows(() => y.backward(tensor(new Float32Array(13), [13])), Error, "[13]");
    assertThrows(() => y.backward(tensor(new Float32Array(13), [13])), Error, "[7, 13]");
    assertThrows(() => x.add(tensor(new Float32Array(12), [12])), Error, "[7, 13] and [12]");
    assertThrows(() => x.reshape(10, 10), Error, "[7, 13]");
    assertThrows(() => x.reshape(10, 10), Error, "[10, 10]");
    const d = leaf([3, 5], 1);
    d.dispose();
    assert(d.disposed);
    const ops: [string, () => unknown][] = [
      ["add", () => d.add(1)],
      ["mul", () => d.mul(d)],
      ["exp", () => d.exp()],
      ["sum", () => d.sum()],
      ["max", () => d.max(0)],
      ["reshape", () => d.reshape(-1)],
      ["transpose", () => d.transpose()],
      ["slice", () => d.slice(0, 1)],
      ["softmax", () => d.softmax()],
      ["cat", () => cat([d, d])],
      ["matmul", () => d.matmul(x.slice(0, 0, 5))],
      ["backward", () => d.backward()],
    ];
    for (const [name, f] of ops) assertThrows(f, Error, "[3, 5] was already disposed", name);
    await assertRejects(() => d.toArray(), Error, "already disposed");
    d.dispose(); // idempotent
  });
});

Deno.test(
  "a chain of 2,000 ops runs forward and backward without overflowing the stack",
  scoped(async () => {
    const x = tensor([0.5, -1, 2], undefined, { requiresGrad: true });
    let y = x;
    for (let i = 0; i < 1000; i++) y = y.mul(1.0005).add(0.001);
    y.sum().backward();
    const want = Math.pow(Math.fround(1.0005), 1000);
    assertClose(await values(x.grad), [want, want, want], { rtol: 1e-4, label: "d(chain)/dx" });
    x.zeroGrad();
  }),
);

Deno.test(
  "a kept tensor's graph survives its scope: backward() after the scope works",
  scoped(async () => {
    const x = leaf([7, 13], freshSeed());
    const xv = await values(x);
    const box: { kept?: Tensor } = {};
    scope(() => {
      box.kept = keep(x.exp().mul(x).sum()); // saves exp(x) and x for backward
    });
    box.kept!.backward(); // d/dx Σ x·eˣ = (1 + x)·eˣ
    assertClose(await values(x.grad), xv.map((v) => (1 + v) * Math.exp(v)), {
      rtol: 1e-5,
      relToMax: true,
      label: "kept graph",
    });
    box.kept!.dispose();
    x.zeroGrad();
  }),
);

Deno.test("a second backward through an already-consumed graph is a clear error, not a wrong gradient", async () => {
  const { tensor } = await import("../mod.ts");
  const { assertThrows } = await import("@std/assert");
  const x = tensor([1, 2, 3], undefined, { requiresGrad: true });
  const h = x.mul(x);
  h.sum().backward();
  assertThrows(() => h.mul(3).sum().backward(), Error, "already used by an earlier backward()");
  x.zeroGrad();
});

Deno.test(
  "x·Wᵀ hands W a row-major gradient Gᵀ·X (computed in W's layout: no copy when it is accumulated)",
  scoped(async () => {
    const s = freshSeed();
    const [rows, inF, outF] = [9, 7, 6];
    const x = leaf([rows, inF], s, false), w = leaf([outF, inF], s + 1), g = randomArray(rows * outF, s + 2);
    const gpu = getGpu();
    const y = x.matmul(w.transpose()), seed = tensor(g, [rows, outF]);
    const kernels: string[] = [];
    const dispatch = gpu.dispatch;
    gpu.dispatch = (k, ...rest) => (kernels.push(k.name), dispatch.call(gpu, k, ...rest));
    try {
      y.backward(seed);
    } finally {
      gpu.dispatch = dispatch;
    }
    assert(w.grad !== null && w.grad.isContiguous && w.grad.offset === 0, "a row-major gradient");
    assert(kernels.length > 0 && kernels.every((n) => n.startsWith("gemm")), `kernels: ${kernels.join(", ")}`);
    const xv = await values(x), want: number[] = [];
    for (let o = 0; o < outF; o++) {
      for (let i = 0; i < inF; i++) {
        let acc = 0;
        for (let r = 0; r < rows; r++) acc += g[r * outF + o] * xv[r * inF + i];
        want.push(acc);
      }
    }
    assertClose(await values(w.grad), want, { rtol: 1e-5, relToMax: true, label: `dW (seed ${s})` });
    w.zeroGrad();
  }),
);
