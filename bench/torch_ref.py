#!/usr/bin/env python3
"""PyTorch (+ transformers + PEFT) reference numbers for webtune's benchmarks, one JSON line per case.

Runs on the GPU machine the same cases as bench/*.ts and prints one JSON object per line to stdout (and to --out
FILE when given); progress, per-suite timing and tracebacks go to stderr. The line schema is in bench/README.md:
    {"suite": str, "case": str, "impl": str, "ms": float, ...}  plus tflops / gbps / tokens_per_s / peak_gib
Lines without "ms" are "meta" (versions, device), "skipped" (with a reason) or "error" (with the message).

Suites (--suite, comma-separated; default all):
  matmul     square 1024..8192, the 7B LoRA shapes and the rank-16 thin products; fp32 (TF32 off), tf32, bf16, fp16
  ops        softmax, rmsNorm, crossEntropy at LLaMA sizes; fp32 and fp16
  llama      LLaMA-2-7B-shaped LlamaForCausalLM, random fp16 weights: prefill 8x64 and greedy decode (HF generate)
  lora_step  the same model + PEFT LoRA r=16 (q,v,o,gate,up,down): one AdamW training step on 8x64 tokens, with and
             without gradient checkpointing; greedy decode through the PEFT model, unmerged and merged
  quant      f16 Linear GEMM/GEMV at the 7B LoRA shapes (what our NF4 kernels are compared with), copy bandwidth;
             NF4 through bitsandbytes only when it imports

Run (GPU machine; the default run takes about 2 minutes and must stay under 4):
    PYTHONUNBUFFERED=1 python3 bench/torch_ref.py --out runs/torch_ref.jsonl
    python3 bench/torch_ref.py --suite matmul,ops --quick
Smoke test on a CPU (tiny shapes, 1 repeat; the llama/lora_step/quant suites report "skipped" without CUDA):
    /usr/bin/python3 bench/torch_ref.py --device cpu --quick --smoke --suite matmul,ops
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

SUITES = ["matmul", "ops", "llama", "lora_step", "quant"]

LLAMA_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
# --smoke on a GPU: the same code paths on a small model
LLAMA_SMOKE = dict(LLAMA_7B, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=1024)
LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 1024**3


def log(msg: str) -> None:
    print(f"[torch_ref] {msg}", file=sys.stderr, flush=True)


def set_tf32(enabled: bool) -> None:
    """TF32 on/off for cuBLAS; torch >= 2.9 refuses to mix its fp32_precision API with the legacy allow_tf32 flags."""
    matmul = torch.backends.cuda.matmul
    try:
        has_new_api = isinstance(getattr(matmul, "fp32_precision"), str)
    except (AttributeError, AssertionError):
        has_new_api = False
    if has_new_api:
        matmul.fp32_precision = "tf32" if enabled else "ieee"
    else:
        matmul.allow_tf32 = enabled


def module_version(name: str):
    try:
        mod = __import__(name)
        if getattr(mod, "__file__", None) is None:  # a namespace package, e.g. this repo's own peft/ folder
            return None
        return getattr(mod, "__version__", "unknown")
    except Exception as e:  # noqa: BLE001 - bitsandbytes may fail with errors other than ImportError
        return None if isinstance(e, ImportError) else f"import failed: {type(e).__name__}: {e}"


class Bench:
    """Shared state: device, timing policy, output."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.quick = args.quick
        self.smoke = args.smoke
        if self.smoke:
            self.repeats, self.target_ms, self.warmup = 1, 1.0, 1
        elif self.quick:
            self.repeats, self.target_ms, self.warmup = 3, 20.0, 2
        else:
            self.repeats, self.target_ms, self.warmup = 7, 50.0, 3
        self.out = open(args.out, "w") if args.out else None
        self.failures = 0

    # -- output ------------------------------------------------------------------------------------------------------
    def emit(self, rec: dict) -> None:
        if self.smoke:
            rec["smoke"] = True
        line = json.dumps(rec)
        print(line, flush=True)
        if self.out:
            self.out.write(line + "\n")
            self.out.flush()

    def skip(self, suite: str, case: str, impl: str, reason: str) -> None:
        self.emit({"suite": suite, "case": case, "impl": impl, "skipped": reason})

    def error(self, suite: str, case: str, impl: str, exc: BaseException) -> None:
        self.failures += 1
        log(f"ERROR in {suite}/{case}/{impl}:\n{traceback.format_exc()}")
        self.emit({"suite": suite, "case": case, "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:2000]})

    # -- timing --------------------------------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _run(self, fn, iters: int) -> float:
        """Milliseconds per call of fn, averaged over `iters` back-to-back calls (CUDA events on the GPU)."""
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters

    def time_op(self, fn) -> dict:
        """Warm up, pick an iteration count that fills ~target_ms, then the median of `repeats` timed batches."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        first = self._run(fn, 1)
        iters = max(1, min(1000, int(self.target_ms / max(first, 1e-3))))
        samples = [self._run(fn, iters) for _ in range(self.repeats)]
        return {"ms": statistics.median(samples), "ms_min": min(samples), "iters": iters, "repeats": len(samples)}

    def wall(self, fn) -> float:
        """Seconds for one call of fn, synchronised on both sides."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    # -- memory --------------------------------------------------------------------------------------------------
    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self):
        return torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else None


def rand(bench: Bench, *shape, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=bench.device, dtype=dtype)


DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ELEM = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


# ======================================================================================================================
# matmul
# ======================================================================================================================

# (M, K, N, A given transposed): C[M, N] = A[M, K] · B[K, N]
MATMUL_SHAPES = [
    (1024, 1024, 1024, False),
    (2048, 2048, 2048, False),
    (4096, 4096, 4096, False),
    (8192, 8192, 8192, False),
    (512, 4096, 4096, False),  # 7B q/k/v/o projection of 8x64 tokens
    (512, 4096, 11008, False),  # gate/up
    (512, 11008, 4096, False),  # down
    (512, 4096, 16, False),  # LoRA x·Aᵀ (rank 16)
    (512, 16, 4096, False),  # LoRA (x·Aᵀ)·Bᵀ
    (16, 512, 4096, True),  # LoRA weight gradient dA = (dY·B)ᵀ · X: A operand is a transposed [512, 16] tensor
]


def suite_matmul(bench: Bench) -> None:
    impls = ["fp32", "tf32", "bf16", "fp16"] if bench.cuda else ["fp32", "bf16"]
    for m, k, n, a_t in MATMUL_SHAPES:
        if bench.smoke:
            m, k, n = (max(16, d // 16) if d > 16 else d for d in (m, k, n))
        case = f"{m}x{k}x{n}" + ("-AT" if a_t else "")
        for impl in impls:
            dtype = DTYPES[impl]
            try:
                set_tf32(impl == "tf32")
                a = rand(bench, k, m, dtype=dtype, seed=1).t() if a_t else rand(bench, m, k, dtype=dtype, seed=1)
                b = rand(bench, k, n, dtype=dtype, seed=2)
                c = torch.empty(m, n, device=bench.device, dtype=dtype)
                t = bench.time_op(lambda: torch.matmul(a, b, out=c))
                sec = t["ms"] / 1e3
                moved = (m * k + k * n + m * n) * ELEM[dtype]
                rec = {"suite": "matmul", "case": case, "impl": f"torch-{impl}", **t,
                       "tflops": 2.0 * m * n * k / sec / 1e12, "gbps": moved / sec / 1e9,
                       "m": m, "k": k, "n": n, "dtype": str(dtype).replace("torch.", ""),
                       "a_layout": "transposed view of [K, M]" if a_t else "row-major [M, K]"}
                bench.emit(rec)
                del a, b, c
            except Exception as e:  # noqa: BLE001
                bench.error("matmul", case, f"torch-{impl}", e)
            finally:
                set_tf32(False)
        bench.free()


# ======================================================================================================================
# ops
# ======================================================================================================================


def rms_norm_plain(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rms_norm_hf(x, w, eps=1e-5):
    """transformers' LlamaRMSNorm: statistics in float32, result cast back, then the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def suite_ops(bench: Bench) -> None:
    s = 8 if bench.smoke else 1
    rows, vocab, hidden = 512 // s, 32000 // s, 4096 // s
    att = (8 // s or 1, 32 // s, 64, 64) if bench.smoke else (8, 32, 64, 64)
    dtypes = [("fp32", torch.float32), ("fp16", torch.float16)] if bench.cuda else [("fp32", torch.float32)]

    def run(case, impl, fn, moved, **extra):
        try:
            t = bench.time_op(fn)
            gbps = moved / (t["ms"] / 1e3) / 1e9
            bench.emit({"suite": "ops", "case": case, "impl": impl, **t, "gbps": gbps, **extra})
        except Exception as e:  # noqa: BLE001
            bench.error("ops", case, impl, e)

    for name, dt in dtypes:
        es = ELEM[dt]
        # softmax over the LM-head rows and over attention scores
        x = rand(bench, rows, vocab, dtype=dt, seed=3)
        run(f"softmax-{rows}x{vocab}", f"torch-{name}", lambda: torch.softmax(x, dim=-1), 2 * x.numel() * es)
        a = rand(bench, *att, dtype=dt, seed=4)
        run("softmax-" + "x".join(map(str, att)), f"torch-{name}", lambda: torch.softmax(a, dim=-1), 2 * a.numel() * es)
        # rmsNorm: plain composition; transformers' upcasting module; torch's fused op when it exists
        h = rand(bench, rows, hidden, dtype=dt, seed=5)
        w = (1 + 0.1 * rand(bench, hidden, seed=6)).to(dt)
        moved = (2 * h.numel() + hidden) * es
        case = f"rmsnorm-{rows}x{hidden}"
        run(case, f"torch-{name}", lambda: rms_norm_plain(h, w), moved, variant="x*rsqrt(mean(x^2)+eps)*w")
        if dt != torch.float32:
            run(case, f"torch-{name}-hf", lambda: rms_norm_hf(h, w), moved, variant="LlamaRMSNorm (fp32 statistics)")
        if hasattr(F, "rms_norm"):
            run(case, f"torch-{name}-F.rms_norm", lambda: F.rms_norm(h, (hidden,), w, 1e-5), moved)
        # cross-entropy with integer targets: forward, and forward + backward
        logits = rand(bench, rows, vocab, dtype=dt, seed=7)
        targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(8)).to(bench.device)
        run(f"cross-entropy-{rows}x{vocab}", f"torch-{name}", lambda: F.cross_entropy(logits, targets),
            logits.numel() * es + targets.numel() * 8)
        lg = logits.clone().requires_grad_(True)

        def fwd_bwd():
            lg.grad = None
            F.cross_entropy(lg, targets).backward()

        run(f"cross-entropy-fwd-bwd-{rows}x{vocab}", f"torch-{name}", fwd_bwd, 3 * lg.numel() * es)
        del x, a, h, w, logits, lg
        bench.free()


# ======================================================================================================================
# LLaMA-2-7B-shaped model (random fp16 weights)
# ======================================================================================================================


def llama_config(bench: Bench):
    from transformers import LlamaConfig

    return LlamaConfig(**(LLAMA_SMOKE if bench.smoke else LLAMA_7B))


def build_llama(bench: Bench, seed: int = 0):
    """LlamaForCausalLM with random fp16 weights, created directly on the GPU (transformers' own init runs there)."""
    from transformers import AutoModelForCausalLM

    config = llama_config(bench)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device(bench.device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16)
    p = next(model.parameters())
    if p.device.type != bench.device.type:
        log(f"WARNING: model built on {p.device}, moving to {bench.device} (slow: the device context was ignored)")
        model = model.to(bench.device)
    if any(q.dtype != torch.float16 for q in model.parameters()):
        log("WARNING: from_config ignored dtype=float16; converting")
        model = model.half()
    bench.sync()
    build_s = time.perf_counter() - t0
    n_params = sum(q.numel() for q in model.parameters())
    log(f"built {type(model).__name__}: {n_params / 1e9:.3f} B params, fp16, in {build_s:.1f} s, "
        f"attention {getattr(model.config, '_attn_implementation', '?')}")
    return model, build_s


def decode_case(bench: Bench, model, suite: str, case: str, impl: str, extra: dict) -> None:
    """Greedy HF generate, batch 1, 32-token prompt, 128 new tokens (min_new_tokens keeps EOS from stopping it)."""
    prompt_len, new = (32, 16) if bench.smoke else (32, 128)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(11)).to(bench.device)
    mask = torch.ones_like(prompt)

    def gen(n):
        return model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, num_beams=1, pad_token_id=0, use_cache=True)

    try:
        with torch.inference_mode():
            gen(4)  # warm-up
            bench.reset_peak()
            # unmerged PEFT decoding runs at ~12 tok/s: two repeats keep the whole run under 4 minutes
            reps = 1 if (bench.quick or bench.smoke) else (2 if "unmerged" in case else 3)
            times = []
            for _ in range(reps):
                out = [None]
                times.append(bench.wall(lambda: out.__setitem__(0, gen(new))))
                if out[0].shape[1] != prompt_len + new:
                    raise RuntimeError(f"generate returned {out[0].shape[1] - prompt_len} new tokens, expected {new}")
        sec = statistics.median(times)
        bench.emit({"suite": suite, "case": case, "impl": impl, "ms": sec * 1e3, "ms_per_token": sec * 1e3 / new,
                    "tokens_per_s": new / sec, "new_tokens": new, "prompt_tokens": prompt_len, "batch": 1,
                    "repeats": reps, "peak_gib": bench.peak_gib(), "note": "wall time of HF generate incl. prefill",
                    **extra})
    except Exception as e:  # noqa: BLE001
        bench.error(suite, case, impl, e)


def suite_llama(bench: Bench) -> None:
    if not bench.cuda:
        for case in ("7b-prefill-8x64", "7b-decode-b1"):
            bench.skip("llama", case, "torch-fp16", "needs CUDA")
        return
    model, build_s = build_llama(bench)
    model.eval()
    extra = {"build_s": build_s, "attn_implementation": getattr(model.config, "_attn_implementation", None),
             "params": sum(p.numel() for p in model.parameters())}
    bsz, seq = 8, 64
    ids = torch.randint(3, model.config.vocab_size, (bsz, seq), generator=torch.Generator().manual_seed(10))
    ids = ids.to(bench.device)
    case = "7b-prefill-8x64"
    try:
        bench.reset_peak()
        with torch.inference_mode():
            t = bench.time_op(lambda: model(input_ids=ids, use_cache=False))
        bench.emit({"suite": "llama", "case": case, "impl": "torch-fp16", **t,
                    "tokens_per_s": bsz * seq / (t["ms"] / 1e3), "peak_gib": bench.peak_gib(), **extra})
    except Exception as e:  # noqa: BLE001
        bench.error("llama", case, "torch-fp16", e)
    decode_case(bench, model, "llama", "7b-decode-b1", "torch-fp16", extra)
    del model
    bench.free()


# ======================================================================================================================
# LoRA training step (PEFT)
# ======================================================================================================================


def lora_step_case(bench: Bench, checkpointing: bool, then_decode: bool) -> None:
    from peft import LoraConfig, get_peft_model

    case = "7b-f16-lora-r16-8x64" + ("-gc" if checkpointing else "")
    impl = "torch-peft-fp16"
    model, build_s = build_llama(bench, seed=1)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, target_modules=list(LORA_TARGETS), bias="none",
                      task_type="CAUSAL_LM")
    pm = get_peft_model(model, lcfg)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    lora_dtype = str(params[0].dtype).replace("torch.", "")
    opt = torch.optim.AdamW(params, lr=5e-5)
    bsz, seq = 8, 64
    ids = torch.randint(3, model.config.vocab_size, (bsz, seq), generator=torch.Generator().manual_seed(12))
    ids = ids.to(bench.device)
    losses = []

    def step():
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())

    try:
        warm, steps = (1, 2) if bench.smoke else ((1, 3) if bench.quick else (3, 10))
        bench.reset_peak()
        for _ in range(warm):
            step()
        times = [bench.wall(step) for _ in range(steps)]
        sec = statistics.median(times)
        bench.emit({"suite": "lora_step", "case": case, "impl": impl, "ms": sec * 1e3, "step_s": sec,
                    "step_s_min": min(times), "tokens_per_s": bsz * seq / sec, "peak_gib": bench.peak_gib(),
                    "steps": steps, "warmup_steps": warm, "gradient_checkpointing": checkpointing,
                    "trainable_params": trainable, "lora_dtype": lora_dtype, "r": 16, "lora_alpha": 16,
                    "lora_dropout": 0.1, "targets": LORA_TARGETS, "optimizer": "torch.optim.AdamW lr 5e-5",
                    "loss_last": float(losses[-1].item()), "build_s": build_s})
    except Exception as e:  # noqa: BLE001
        bench.error("lora_step", case, impl, e)
    del opt, losses
    pm.zero_grad(set_to_none=True)
    if then_decode:
        pm.eval()
        pm.config.use_cache = True
        extra = {"r": 16, "targets": LORA_TARGETS, "lora_dtype": lora_dtype}
        decode_case(bench, pm, "lora_step", "7b-lora-decode-unmerged", "torch-peft-fp16", extra)
        try:
            merged = pm.merge_and_unload()
            merged.eval()
            decode_case(bench, merged, "lora_step", "7b-lora-decode-merged", "torch-peft-fp16", extra)
            del merged
        except Exception as e:  # noqa: BLE001
            bench.error("lora_step", "7b-lora-decode-merged", "torch-peft-fp16", e)
    del pm, model
    bench.free()


def suite_lora_step(bench: Bench) -> None:
    cases = ["7b-f16-lora-r16-8x64", "7b-f16-lora-r16-8x64-gc", "7b-lora-decode-unmerged", "7b-lora-decode-merged"]
    if not bench.cuda:
        for case in cases:
            bench.skip("lora_step", case, "torch-peft-fp16", "needs CUDA")
        return
    for checkpointing in (False, True):
        try:
            lora_step_case(bench, checkpointing, then_decode=not checkpointing)
        except Exception as e:  # noqa: BLE001 - e.g. the model could not be built: report, go on
            bench.error("lora_step", cases[1 if checkpointing else 0], "torch-peft-fp16", e)
            bench.free()
    bnb = module_version("bitsandbytes")
    if bnb is None or str(bnb).startswith("import failed"):
        bench.skip("lora_step", "7b-nf4-lora-r16-8x64", "torch-nf4", "bitsandbytes not installed"
                   if bnb is None else f"bitsandbytes {bnb}")
    else:
        bench.skip("lora_step", "7b-nf4-lora-r16-8x64", "torch-nf4",
                   f"bitsandbytes {bnb} is installed but torch_ref.py has no QLoRA step; add one to compare")


# ======================================================================================================================
# quant: f16 Linear at the LoRA shapes, GEMV for decoding, copy bandwidth, NF4 via bitsandbytes when present
# ======================================================================================================================

QUANT_SHAPES = [(512, 4096, 4096), (512, 4096, 11008), (512, 11008, 4096)]
GEMV_SHAPES = [(1, 4096, 4096), (1, 4096, 11008), (1, 11008, 4096)]


def suite_quant(bench: Bench) -> None:
    if not bench.cuda:
        for m, k, n in QUANT_SHAPES + GEMV_SHAPES:
            bench.skip("quant", f"{m}x{k}x{n}", "torch-fp16", "needs CUDA")
        bench.skip("quant", "copy-bw", "torch", "needs CUDA")
        return
    s = 16 if bench.smoke else 1
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as e:  # noqa: BLE001
        bnb = None
        bnb_reason = "bitsandbytes not installed" if isinstance(e, ImportError) else f"bitsandbytes: {e}"
    for m, k, n in QUANT_SHAPES + GEMV_SHAPES:
        k, n = k // s, n // s
        case = f"{m}x{k}x{n}"
        x = rand(bench, m, k, dtype=torch.float16, seed=20)
        w = (rand(bench, n, k, dtype=torch.float32, seed=21) * 0.02).half()  # nn.Linear layout [out, in]
        try:
            t = bench.time_op(lambda: F.linear(x, w))
            sec = t["ms"] / 1e3
            bench.emit({"suite": "quant", "case": case, "impl": "torch-fp16", **t,
                        "tflops": 2.0 * m * n * k / sec / 1e12, "gbps": (w.numel() + x.numel() + m * n) * 2 / sec / 1e9,
                        "m": m, "k": k, "n": n, "layout": "F.linear(x[M,K], W[N,K])"})
        except Exception as e:  # noqa: BLE001
            bench.error("quant", case, "torch-fp16", e)
        if bnb is None:
            bench.skip("quant", case, "torch-nf4", bnb_reason)
        else:
            try:
                qw, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                t = bench.time_op(lambda: bnb.matmul_4bit(x, qw.t(), quant_state=state))
                sec = t["ms"] / 1e3
                bench.emit({"suite": "quant", "case": case, "impl": "torch-nf4", **t,
                            "tflops": 2.0 * m * n * k / sec / 1e12, "m": m, "k": k, "n": n,
                            "gbps": (qw.numel() * qw.element_size() + (x.numel() + m * n) * 2) / sec / 1e9,
                            "bitsandbytes": bnb.__version__, "blocksize": 64, "double_quant": True})
            except Exception as e:  # noqa: BLE001
                bench.error("quant", case, "torch-nf4", e)
        del x, w
        bench.free()
    # device-to-device copy of a 1 GiB tensor; bytes counted = read + write
    nbytes = GIB // (64 if bench.smoke else 1)
    try:
        src = torch.empty(nbytes, dtype=torch.uint8, device=bench.device).fill_(7)
        dst = torch.empty_like(src)
        t = bench.time_op(lambda: dst.copy_(src))
        bench.emit({"suite": "quant", "case": "copy-bw", "impl": "torch", **t,
                    "gbps": 2 * nbytes / (t["ms"] / 1e3) / 1e9, "bytes": nbytes,
                    "note": "GB/s = (read + write) / time"})
        del src, dst
    except Exception as e:  # noqa: BLE001
        bench.error("quant", "copy-bw", "torch", e)
    bench.free()


# ======================================================================================================================
# main
# ======================================================================================================================

SUITE_FUNCS = {"matmul": suite_matmul, "ops": suite_ops, "llama": suite_llama, "lora_step": suite_lora_step,
               "quant": suite_quant}


def meta(bench: Bench) -> dict:
    now = datetime.datetime.now().isoformat(timespec="seconds")
    rec = {"suite": "meta", "case": "env", "impl": "torch", "date": now,
           "python": platform.python_version(), "torch": torch.__version__, "device": str(bench.device),
           "quick": bench.quick, "repeats": bench.repeats, "target_ms": bench.target_ms}
    for name in ("transformers", "peft", "bitsandbytes"):
        rec[name] = module_version(name)
    if bench.cuda:
        props = torch.cuda.get_device_properties(bench.device)
        rec.update({"gpu": props.name, "gpu_mem_gib": props.total_memory / GIB, "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version()})
        try:
            rec["fp16_reduced_precision_reduction"] = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        except Exception:  # noqa: BLE001
            pass
        rec.update(tf32_probe(bench))
    return rec


def tf32_probe(bench: Bench) -> dict:
    """Relative error of a 1024³ float32 matmul against float64 with TF32 off and on: proves the switch works
    (expect ~1e-6 off, ~1e-3 on)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(1024, 1024, generator=g, dtype=torch.float64)
    b = torch.randn(1024, 1024, generator=g, dtype=torch.float64)
    want = a @ b
    out = {}
    for name, enabled in (("fp32_matmul_rel_err", False), ("tf32_matmul_rel_err", True)):
        set_tf32(enabled)
        got = (a.float().to(bench.device) @ b.float().to(bench.device)).double().cpu()
        out[name] = ((got - want).abs().max() / want.abs().max()).item()
    set_tf32(False)
    if out["fp32_matmul_rel_err"] > 1e-5:
        log(f"WARNING: float32 matmul error {out['fp32_matmul_rel_err']:.2e} with TF32 off: TF32 is still on, "
            "so the torch-fp32 numbers are really TF32")
    return out


def parse_suites(text: str) -> list:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {unknown}; choose from {','.join(SUITES)}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", type=parse_suites, default=list(SUITES), help=f"comma list of {','.join(SUITES)}")
    ap.add_argument("--out", help="also write the JSON lines to this file")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and training steps")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and models, one repeat (testing the script)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    torch.manual_seed(0)
    set_tf32(False)
    bench = Bench(args)
    bench.emit(meta(bench))
    t_all = time.perf_counter()
    for name in args.suite:
        t0 = time.perf_counter()
        log(f"suite {name} ...")
        try:
            SUITE_FUNCS[name](bench)
        except Exception as e:  # noqa: BLE001 - one failing suite must not stop the others
            bench.error(name, "*", "*", e)
        finally:
            set_tf32(False)
            bench.free()
        log(f"suite {name} done in {time.perf_counter() - t0:.1f} s")
    total = time.perf_counter() - t_all
    log(f"all suites done in {total:.1f} s ({bench.failures} error line(s))")
    if total > 240 and not args.quick:
        log("WARNING: the default run took over 4 minutes; trim repeats (Bench.__init__) or decode lengths")
    if bench.out:
        bench.out.close()
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
