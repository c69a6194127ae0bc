/**
 * QLoRA on SST-2 with the study's settings: the frozen base in NF4 with double quantization (block 64), and the same
 * LoRA adapters and training as examples/sst2_lora.ts (r = 16, alpha = 16, dropout 0.1 on q, v, o, gate, up, down;
 * AdamW lr 5e-5, batch 8 × accumulation 4, warm-up 5 %, cosine, one epoch; small models get their own lr: 1e-3, mini-llama 3e-3).
 *
 * ```sh
 * deno run -A examples/sst2_qlora.ts                                   # mini-llama, a CPU-sized subset on lavapipe
 * deno run -A examples/sst2_qlora.ts --model ./Llama-2-7b-hf           # the study's experiment
 * deno run -A examples/sst2_qlora.ts --model random:llama-2-7b --max-steps 50   # speed and memory only
 * ```
 *
 * Settings: examples/configs/sst2_qlora.yaml; flags override it (`--help` lists them). Writes loss.csv, the
 * adapter in PEFT's format (adapter/), last-checkpoint/, metrics.json, results.md/json and loss.svg into `--out`
 * (default runs/sst2_qlora).
 * @module
 */
import { cliMain, runSingle } from "./sst2/run.ts";

if (import.meta.main) await cliMain(() => runSingle("qlora", Deno.args));
