/**
 * The browser bundle: `scripts/bundle.ts` writes one ES module with esbuild; importing it and running an op through
 * it must work (it carries its own copy of the library state, so it initialises its own GPU device).
 */
import { assertEquals, assertGreater } from "@std/assert";
import { bundle } from "../scripts/bundle.ts";

Deno.test("bundle: builds one ESM file that runs an op on the GPU", async () => {
  const dir = await Deno.makeTempDir();
  const out = `${dir}/webtune.js`;
  const { bytes } = await bundle(out);
  assertGreater(bytes, 10_000);
  const source = await Deno.readTextFile(out);
  assertEquals(/\bDeno\.(readFile|open|env)\b/.test(source.replace(/deno\??\.\w+/g, "")), false);
  const lib = await import(`file://${out}`);
  await lib.init();
  const y = lib.tensor([1, 2, 3]).mul(2).add(1);
  assertEquals(Array.from(await y.toArray()), [3, 5, 7]);
  await Deno.remove(dir, { recursive: true });
});
