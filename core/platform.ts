/**
 * Everything the library needs from the host beyond web APIs: files and environment variables.
 *
 * The rest of webtune uses only web APIs (WebGPU, typed arrays, `fetch`), so that `npm:esbuild` can bundle it for
 * a browser. In Deno these functions use `Deno.*`; in a browser they throw a clear error, and the loaders that
 * call them also accept bytes directly.
 *
 * @example
 * ```ts
 * import { env, readBytes } from "./platform.ts";
 * const dir = env("SST2_DIR") ?? "./data/sst2";
 * const bytes = await readBytes(`${dir}/dev.tsv`);
 * ```
 * @module
 */

// deno-lint-ignore no-explicit-any
const deno: any = (globalThis as any).Deno;

function needDeno(what: string): never {
  throw new Error(`${what} needs file-system access, which this runtime does not have: pass the bytes instead.`);
}

/** True when running under Deno (file system and environment available). */
export const hasFileSystem: boolean = typeof deno?.readFile === "function";

/** Reads an environment variable; `undefined` when unset or when the runtime has no environment. */
export function env(name: string): string | undefined {
  try {
    return deno?.env?.get(name) ?? undefined;
  } catch {
    return undefined; // permission denied: treat as unset
  }
}

/** Reads a whole file. Errors name the path. */
export async function readBytes(path: string): Promise<Uint8Array> {
  if (!hasFileSystem) needDeno(`reading ${path}`);
  try {
    return await deno.readFile(path);
  } catch (e) {
    throw fileError(e, path);
  }
}

/** Reads a whole text file (UTF-8). Errors name the path. */
export async function readText(path: string): Promise<string> {
  return new TextDecoder().decode(await readBytes(path));
}

/** Reads `length` bytes starting at `offset`; fails if the file is shorter. */
export async function readRange(path: string, offset: number, length: number): Promise<Uint8Array> {
  if (!hasFileSystem) needDeno(`reading ${path}`);
  let file;
  try {
    file = await deno.open(path, { read: true });
  } catch (e) {
    throw fileError(e, path);
  }
  try {
    await file.seek(offset, deno.SeekMode.Start);
    const out = new Uint8Array(length);
    let got = 0;
    while (got < length) {
      const n = await file.read(out.subarray(got));
      if (n === null) {
        throw new Error(
          `${path} is truncated: wanted bytes ${offset}..${offset + length}, file ends at ${offset + got}`,
        );
      }
      got += n;
    }
    return out;
  } finally {
    file.close();
  }
}

/** Size of a file in bytes, or `undefined` if it does not exist. */
export async function fileSize(path: string): Promise<number | undefined> {
  const info = await statOrUndefined(path);
  return info?.isFile ? info.size : undefined;
}

/** True when `path` exists and is a directory. */
export async function isDirectory(path: string): Promise<boolean> {
  return (await statOrUndefined(path))?.isDirectory ?? false;
}

/** True when `path` exists (file or directory). */
export async function exists(path: string): Promise<boolean> {
  return (await statOrUndefined(path)) !== undefined;
}

async function statOrUndefined(
  path: string,
): Promise<{ isFile: boolean; isDirectory: boolean; size: number } | undefined> {
  if (!hasFileSystem) needDeno(`looking at ${path}`);
  try {
    return await deno.stat(path);
  } catch (e) {
    if (e instanceof deno.errors.NotFound) return undefined;
    throw fileError(e, path);
  }
}

/** Names of the entries of a directory, sorted. */
export async function listDir(path: string): Promise<string[]> {
  if (!hasFileSystem) needDeno(`listing ${path}`);
  const names: string[] = [];
  try {
    for await (const e of deno.readDir(path)) names.push(e.name);
  } catch (e) {
    throw fileError(e, path);
  }
  return names.sort();
}

/** Writes a file atomically: to `path.tmp` first, then renamed, so an interrupted write never leaves half a file. */
export async function writeBytes(path: string, data: Uint8Array): Promise<void> {
  if (!hasFileSystem) needDeno(`writing ${path}`);
  const tmp = `${path}.tmp`;
  await deno.writeFile(tmp, data);
  await deno.rename(tmp, path);
}

/** Writes a UTF-8 text file atomically. */
export async function writeText(path: string, text: string): Promise<void> {
  await writeBytes(path, new TextEncoder().encode(text));
}

/** Appends UTF-8 text to a file, creating it when missing. */
export async function appendText(path: string, text: string): Promise<void> {
  if (!hasFileSystem) needDeno(`writing ${path}`);
  await deno.writeTextFile(path, text, { append: true });
}

/** Creates a directory and its parents; no error when it exists. */
export async function makeDir(path: string): Promise<void> {
  if (!hasFileSystem) needDeno(`creating ${path}`);
  await deno.mkdir(path, { recursive: true });
}

/** Joins path segments with `/`, dropping empty ones and duplicate separators. */
export function joinPath(...parts: string[]): string {
  return parts.filter((p) => p.length > 0).join("/").replace(/\/+/g, "/");
}

/** Writes a progress line in place on a terminal (carriage return), or as a plain line elsewhere. */
export function writeProgress(line: string, done = false): void {
  const text = new TextEncoder().encode(isTerminal() ? `\r\x1b[K${line}${done ? "\n" : ""}` : `${line}\n`);
  if (deno?.stdout?.writeSync) deno.stdout.writeSync(text);
  else console.log(line);
}

function isTerminal(): boolean {
  try {
    return deno?.stdout?.isTerminal?.() ?? false;
  } catch {
    return false;
  }
}

function fileError(e: unknown, path: string): Error {
  if (deno?.errors && e instanceof deno.errors.NotFound) return new Error(`No such file or directory: ${path}`);
  if (deno?.errors && e instanceof deno.errors.PermissionDenied) {
    return new Error(`Permission denied for ${path} (run deno with --allow-read / --allow-write, or -A)`);
  }
  return e instanceof Error && e.message.includes(path) ? e : new Error(`${path}: ${(e as Error)?.message ?? e}`);
}

/**
 * Calls `fn` on Ctrl-C (SIGINT) instead of exiting; returns a function that stops listening. A second Ctrl-C
 * exits at once. No-op where the runtime has no signals.
 */
export function onInterrupt(fn: () => void): () => void {
  if (!deno?.addSignalListener) return () => {};
  let count = 0;
  const handler = () => {
    if (++count > 1) deno.exit(130);
    fn();
  };
  try {
    deno.addSignalListener("SIGINT", handler);
  } catch {
    return () => {};
  }
  return () => deno.removeSignalListener("SIGINT", handler);
}
