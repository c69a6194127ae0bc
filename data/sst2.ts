/**
 * SST-2 (Stanford Sentiment Treebank, binary) readers: GLUE's TSV files, JSON Lines and CSV.
 *
 * Every format gives the same rows: `{ sentence, label }` with label 1 = positive, 0 = negative. GLUE (and the
 * Hugging Face `glue/sst2` copy) end every sentence with a space; it is trimmed, so all formats agree. Errors
 * name the file and the 1-based line number of the offending row.
 *
 * @example
 * ```ts
 * import { loadSst2Split, resolveSst2Dir } from "./sst2.ts";
 * const dir = await resolveSst2Dir(); // --data flag, else $SST2_DIR, else ./data/sst2
 * const train = await loadSst2Split(dir, "train"); // 67,349 rows
 * console.log(train[0]); // { sentence: "hide new secretions from the parental units", label: 0 }
 * ```
 * @module
 */
import { env, exists, isDirectory, joinPath, listDir, readText } from "../core/platform.ts";

/** One SST-2 row. */
export interface Sst2Example {
  /** The sentence (lower-cased, PTB-tokenized in GLUE: `it 's`, `does n't`), trailing spaces trimmed. */
  sentence: string;
  /** 1 = positive, 0 = negative. */
  label: 0 | 1;
}

/** The file formats {@link readSst2} understands. */
export type Sst2Format = "tsv" | "jsonl" | "csv";

/** The split names of {@link loadSst2Split}. */
export type Sst2Split = "train" | "dev";

/**
 * The format of a file, from its extension (`.tsv`, `.jsonl` / `.json`, `.csv`).
 *
 * @example
 * ```ts
 * import { sst2FormatOf } from "./sst2.ts";
 * sst2FormatOf("data/sst2/dev.tsv"); // "tsv"
 * ```
 */
export function sst2FormatOf(path: string): Sst2Format {
  const lower = path.toLowerCase();
  if (lower.endsWith(".tsv")) return "tsv";
  if (lower.endsWith(".jsonl") || lower.endsWith(".json")) return "jsonl";
  if (lower.endsWith(".csv")) return "csv";
  throw new Error(`${path}: unknown SST-2 file format; expected a .tsv (GLUE), .jsonl or .csv file`);
}

/**
 * Reads an SST-2 file, choosing the parser by extension.
 *
 * @example
 * ```ts
 * import { readSst2 } from "./sst2.ts";
 * const dev = await readSst2("../shared/data/sst2/dev.tsv");
 * console.log(dev.length, dev[0]); // 872 { sentence: "it 's a charming and often affecting journey .", label: 1 }
 * ```
 */
export async function readSst2(path: string): Promise<Sst2Example[]> {
  const format = sst2FormatOf(path);
  return parseSst2(await readText(path), format, path);
}

/**
 * Parses SST-2 text that is already in memory (for browsers, or data fetched over the network).
 *
 * - `tsv`: GLUE layout, a header naming the `sentence` and `label` columns, one tab-separated row per line.
 * - `jsonl`: one JSON object per line with `sentence` (string) and `label` (0/1 or "0"/"1"); other keys are ignored.
 * - `csv`: RFC 4180 (quoted fields, `""` for a quote, line breaks inside quotes), a header with `sentence`, `label`.
 *
 * @param name the file name used in error messages
 * @example
 * ```ts
 * import { parseSst2 } from "./sst2.ts";
 * parseSst2('sentence,label\n"good, really",1\n', "csv"); // [{ sentence: "good, really", label: 1 }]
 * ```
 */
export function parseSst2(text: string, format: Sst2Format, name = `SST-2 ${format}`): Sst2Example[] {
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1); // byte-order mark
  if (format === "jsonl") return parseJsonl(text, name);
  const rows = format === "tsv" ? tsvRows(text) : csvRows(text, name);
  if (rows.length === 0) throw new Error(`${name}: the file is empty; expected a header "sentence${sep(format)}label"`);
  const [header, headerLine] = rows[0];
  const columns = header.map((h) => h.trim().toLowerCase());
  const si = columns.indexOf("sentence"), li = columns.indexOf("label");
  if (si < 0 || li < 0) {
    throw new Error(
      `${name}:${headerLine}: the header must name the columns "sentence" and "label", found ${
        JSON.stringify(header)
      }` +
        (li < 0 && si >= 0 ? " (GLUE's test.tsv has no labels and cannot be used)" : ""),
    );
  }
  const out: Sst2Example[] = [];
  for (let r = 1; r < rows.length; r++) {
    const [fields, line] = rows[r];
    if (fields.length === 1 && fields[0] === "") continue; // blank line
    if (fields.length !== columns.length) {
      throw new Error(
        `${name}:${line}: malformed row: expected ${columns.length} ${format === "tsv" ? "tab" : "comma"}-separated ` +
          `fields (${header.join(", ")}), found ${fields.length}`,
      );
    }
    out.push({ sentence: trimSentence(fields[si]), label: parseLabel(fields[li], name, line) });
  }
  return out;
}

function sep(format: Sst2Format): string {
  return format === "tsv" ? "\\t" : ",";
}

/** GLUE ends each sentence with a space: drop trailing spaces (only spaces, nothing else). */
function trimSentence(s: string): string {
  return s.replace(/ +$/, "");
}

function parseLabel(value: unknown, name: string, line: number): 0 | 1 {
  const v = typeof value === "string" ? value.trim() : value;
  if (v === 0 || v === "0") return 0;
  if (v === 1 || v === "1") return 1;
  throw new Error(
    `${name}:${line}: unknown label ${JSON.stringify(value)}; SST-2 labels are 0 (negative) or 1 (positive)`,
  );
}

/** Splits text into lines, accepting \n and \r\n; returns [fields, 1-based line number] per line. */
function tsvRows(text: string): [string[], number][] {
  const lines = text.split("\n");
  if (lines.length > 0 && lines[lines.length - 1] === "") lines.pop();
  return lines.map((l, i) => [(l.endsWith("\r") ? l.slice(0, -1) : l).split("\t"), i + 1]);
}

/** RFC 4180 records; each with the line number where it starts. */
function csvRows(text: string, name: string): [string[], number][] {
  const rows: [string[], number][] = [];
  let fields: string[] = [], field = "", started = false, line = 1, rowLine = 1, i = 0;
  const n = text.length;
  const endField = () => {
    fields.push(field);
    field = "";
    started = false;
  };
  while (i < n) {
    const c = text[i];
    if (c === '"' && !started) {
      // Quoted field: runs to the next lone quote; "" is a literal quote; line breaks are part of the field.
      const opened = line;
      started = true;
      i++;
      while (true) {
        if (i >= n) throw new Error(`${name}:${opened}: unterminated quoted field (a '"' is never closed)`);
        const d = text[i++];
        if (d === '"') {
          if (text[i] !== '"') break;
          i++;
        } else if (d === "\n") line++;
        field += d;
      }
      if (i < n && text[i] !== "," && text[i] !== "\n" && text[i] !== "\r") {
        throw new Error(`${name}:${line}: malformed row: unexpected text after a closing quote`);
      }
    } else if (c === ",") {
      endField();
      i++;
    } else if (c === "\n" || c === "\r") {
      endField();
      rows.push([fields, rowLine]);
      fields = [];
      i += c === "\r" && text[i + 1] === "\n" ? 2 : 1;
      rowLine = ++line;
    } else if (c === '"') {
      throw new Error(`${name}:${line}: malformed row: a '"' inside an unquoted field (quote the whole field)`);
    } else {
      field += c;
      started = true;
      i++;
    }
  }
  if (started || fields.length > 0) {
    endField();
    rows.push([fields, rowLine]);
  }
  return rows;
}

function parseJsonl(text: string, name: string): Sst2Example[] {
  const out: Sst2Example[] = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (line === "") continue;
    let row: unknown;
    try {
      row = JSON.parse(line);
    } catch (e) {
      throw new Error(`${name}:${i + 1}: malformed row: not valid JSON (${(e as Error).message})`);
    }
    if (typeof row !== "object" || row === null || typeof (row as { sentence?: unknown }).sentence !== "string") {
      throw new Error(`${name}:${i + 1}: malformed row: expected an object with a string "sentence" and a "label"`);
    }
    const r = row as { sentence: string; label?: unknown };
    if (r.label === undefined) throw new Error(`${name}:${i + 1}: malformed row: no "label"`);
    out.push({ sentence: trimSentence(r.sentence), label: parseLabel(r.label, name, i + 1) });
  }
  return out;
}

/**
 * The SST-2 directory: the `--data DIR` flag when given, else the `SST2_DIR` environment variable, else
 * `./data/sst2`. Fails with instructions when that directory does not exist.
 *
 * @example
 * ```ts
 * import { parseArgs } from "@std/cli";
 * import { resolveSst2Dir } from "./sst2.ts";
 * const args = parseArgs(Deno.args, { string: ["data"] });
 * const dir = await resolveSst2Dir(args.data as string | undefined);
 * ```
 */
export async function resolveSst2Dir(flag?: string): Promise<string> {
  const fromEnv = env("SST2_DIR");
  const dir = flag ?? fromEnv ?? "./data/sst2";
  const source = flag !== undefined
    ? "given by --data"
    : fromEnv !== undefined
    ? "given by the SST2_DIR environment variable"
    : "the default, as neither --data nor SST2_DIR is set";
  if (!(await isDirectory(dir))) {
    throw new Error(
      `SST-2 data directory ${dir} (${source}) does not exist. Put GLUE's SST-2 files train.tsv and dev.tsv ` +
        `(from glue_data/SST-2/) in ${dir}, or pass --data DIR or set the SST2_DIR environment variable to the ` +
        `directory that holds them.`,
    );
  }
  return dir;
}

/**
 * Loads one split from an SST-2 directory: `train` reads train.tsv / train.jsonl / train.csv; `dev` reads
 * dev.{tsv,jsonl,csv} or validation.{tsv,jsonl,csv} (the Hugging Face name), whichever exists first.
 *
 * @example
 * ```ts
 * import { loadSst2Split } from "./sst2.ts";
 * const dev = await loadSst2Split("../shared/data/sst2", "dev");
 * console.log(dev.filter((e) => e.label === 1).length); // 444
 * ```
 */
export async function loadSst2Split(dir: string, split: Sst2Split): Promise<Sst2Example[]> {
  if (split !== "train" && split !== "dev") {
    throw new Error(`Unknown SST-2 split "${split}": use "train" or "dev"`);
  }
  const stems = split === "train" ? ["train"] : ["dev", "validation"];
  const candidates = stems.flatMap((s) => ["tsv", "jsonl", "csv"].map((ext) => `${s}.${ext}`));
  for (const name of candidates) {
    const path = joinPath(dir, name);
    if (await exists(path)) return await readSst2(path);
  }
  const present = (await isDirectory(dir)) ? await listDir(dir) : undefined;
  throw new Error(
    `No SST-2 ${split} split in ${dir}: looked for ${candidates.join(", ")}; ` +
      (present === undefined
        ? "the directory does not exist."
        : `the directory holds ${present.length === 0 ? "nothing" : present.join(", ")}.`),
  );
}
