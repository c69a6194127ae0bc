/**
 * Bundles the library for browsers: `deno task bundle` writes `dist/webtune.js`, one ES module. The library uses
 * only web APIs outside `core/platform.ts`, whose Deno calls are guarded, so the bundle runs wherever WebGPU does.
 *
 * @example
 * ```sh
 * deno task bundle            # → dist/webtune.js
 * deno run -A scripts/bundle.ts --out /tmp/webtune.js --minify
 * ```
 * @module
 */
import * as esbuild from "esbuild";
import { parseArgs } from "@std/cli";

/** Builds the bundle; returns its path and size in bytes. */
export async function bundle(out = "dist/webtune.js", minify = false): Promise<{ out: string; bytes: number }> {
  const root = new URL("..", import.meta.url).pathname;
  const result = await esbuild.build({
    entryPoints: [`${root}mod.ts`],
    bundle: true,
    format: "esm",
    platform: "browser",
    target: "es2022",
    outfile: out,
    minify,
    metafile: true,
    logLevel: "warning",
  });
  await esbuild.stop();
  const bytes = Object.values(result.metafile!.outputs).reduce((a, o) => a + o.bytes, 0);
  return { out, bytes };
}

if (import.meta.main) {
  const flags = parseArgs(Deno.args, { string: ["out"], boolean: ["minify"], default: { out: "dist/webtune.js" } });
  const { out, bytes } = await bundle(flags.out as string, flags.minify as boolean);
  console.log(`wrote ${out} (${(bytes / 1024).toFixed(0)} KiB)`);
}
