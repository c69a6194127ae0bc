/**
 * A stand-in for `@std/cli`'s `parseArgs`, built on `node:util`'s `parseArgs`.
 *
 * `deno.json` maps `@std/cli` here because JSR is unreachable from our build machines; the call shape is the
 * subset of `@std/cli` this project uses (`string`, `boolean`, `default`, `alias`), so switching to the real
 * package is a one-line change in `deno.json`. Unlike `@std/cli` it rejects unknown flags with a clear error.
 *
 * @example
 * ```ts
 * import { parseArgs } from "@std/cli";
 * const flags = parseArgs(["--lr", "1e-3", "--fast"], { string: ["lr"], boolean: ["fast"] });
 * // flags.lr === "1e-3", flags.fast === true, flags._ is []
 * ```
 * @module
 */
import { parseArgs as nodeParseArgs } from "node:util";

/** Options of {@linkcode parseArgs}, as in `@std/cli`. */
export interface ParseOptions {
  /** Flags that take a value. */
  string?: string[];
  /** Flags that are switches. */
  boolean?: string[];
  /** Default values by flag name. */
  default?: Record<string, string | boolean>;
  /** Short or alternative names: `{ h: "help" }`. */
  alias?: Record<string, string>;
}

/** The parsed flags: each flag by its name, and the positional arguments in `_`. */
export type Args = { _: string[]; [flag: string]: string | boolean | string[] | undefined };

/** Parses command-line flags (`--name value`, `--name=value`, `--switch`, `--no-switch`). */
export function parseArgs(args: string[], options: ParseOptions = {}): Args {
  const spec: Record<string, { type: "string" | "boolean"; short?: string }> = {};
  for (const name of options.string ?? []) spec[name] = { type: "string" };
  for (const name of options.boolean ?? []) spec[name] = { type: "boolean" };
  for (const [short, long] of Object.entries(options.alias ?? {})) {
    if (spec[long] && short.length === 1) spec[long].short = short;
  }
  // `--no-x` for boolean flags, as @std/cli allows.
  const rewritten = args.map((a) => {
    const m = /^--no-(.+)$/.exec(a);
    return m && options.boolean?.includes(m[1]) ? `--${m[1]}=false` : a;
  });
  const negated = new Set<string>();
  const cleaned: string[] = [];
  for (const a of rewritten) {
    const m = /^--(.+)=false$/.exec(a);
    if (m && options.boolean?.includes(m[1])) negated.add(m[1]);
    else cleaned.push(a);
  }
  let parsed;
  try {
    parsed = nodeParseArgs({ args: cleaned, options: spec, allowPositionals: true, strict: true });
  } catch (e) {
    const known = Object.keys(spec).map((n) => `--${n}`).join(", ");
    throw new Error(`${(e as Error).message.split("\n")[0]}. Known flags: ${known}`);
  }
  const out: Args = { _: parsed.positionals, ...(options.default ?? {}) };
  for (const [k, v] of Object.entries(parsed.values)) out[k] = v as string | boolean;
  for (const k of negated) out[k] = false;
  return out;
}
