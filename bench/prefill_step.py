"""Prefill cost and time to first token on random weights (issue 3): one request's prompt fed in `-ub`-sized chunks
through the engine's plain step, as the engine does when that request is alone, at several chunk sizes, with the
batch-invariant mode on (the GPU bf16 default) and off.

For chunk size C and a P-token prompt the step runs P / C times (chunk j sees the j*C tokens before it through the
paged cache; the last chunk also samples the first token). TTFT here is the device time of those steps, issued back
to back: the floor under the server's TTFT, which adds tokenization, scheduling and HTTP. Prefill tokens/s = P / TTFT.
A rough FLOP count (2 * params * P, attention not counted) gives the fraction of a dense bf16 peak that is reached.

    python bench/prefill_step.py --target qwen3-8b --prompt 512 --chunks 64,128,256,512 --modes off,on
    python bench/prefill_step.py --target qwen35-27b --weights q8_0 --prompt 512 --chunks 256,512 --modes off,on
    python bench/prefill_step.py --target tiny --prompt 64 --chunks 16,32 --iters 1     # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.decode_step import PAGE_SIZE, SHAPES, WEIGHT_FORMATS, random_cache, random_model, slot_rows  # noqa: E402
from dflash_jax.kv_cache import AttentionMeta  # noqa: E402
from dflash_jax.sampling import SamplingArrays  # noqa: E402
from dflash_jax.step_fns import CompiledSteps, StepInputs  # noqa: E402

T0 = time.monotonic()
H100_H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's dense bf16 tensor-core peak for both SXM cards


def log(*a):
    print(f"[{time.monotonic() - T0:7.1f}s]", *a, flush=True)


def chunk_inputs(cfg, b: int, chunk: int, offset: int, pages_per_slot: int, seed: int) -> StepInputs:
    """One prefill chunk per slot: tokens [offset, offset + chunk) of each slot's prompt, greedy sampling."""
    rng = np.random.default_rng(seed)
    page_table = (1 + np.arange(b)[:, None] * pages_per_slot + np.arange(pages_per_slot)[None, :]).astype(np.int32)
    meta = AttentionMeta(q_lens=np.full((b,), chunk, np.int32), kv_lens=np.full((b,), offset + chunk, np.int32),
                         page_table=page_table, slot_ids=np.arange(b, dtype=np.int32))
    zeros_f, zeros_i = np.zeros((b,), np.float32), np.zeros((b,), np.int32)
    sampling = SamplingArrays(temperature=zeros_f, top_k=zeros_i, top_p=np.ones((b,), np.float32), min_p=zeros_f,
                              presence_penalty=zeros_f, frequency_penalty=zeros_f,
                              seed=np.arange(b, dtype=np.uint32))
    tokens = rng.integers(0, cfg.vocab_size, (b, chunk), dtype=np.int32)
    return StepInputs(tokens, meta, np.arange(b, dtype=np.int32), np.full((b,), offset == 0), sampling)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen3-8b", choices=sorted(SHAPES))
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--chunks", default="64,128,256,512")
    ap.add_argument("--slots", type=int, default=1, help="slots prefilling at once (each its own prompt)")
    ap.add_argument("--modes", default="off,on", help="batch-invariant mode: off, on, on-large (prefill tiles)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--weights", default="bf16", choices=WEIGHT_FORMATS,
                    help="q8_0: every projection int8 + f16 scales")
    ap.add_argument("--iters", type=int, default=5, help="whole prompts timed per measurement (median)")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cfg = SHAPES[a.target]
    dtype = jnp.dtype(a.dtype)
    dev = jax.devices()[0]
    log(f"jax {jax.__version__}, {dev.device_kind}; target {a.target} ({a.weights}), prompt {a.prompt}, "
        f"{a.slots} slot(s)")
    graphdef, state, nbytes = random_model(cfg, dtype, weights=a.weights)
    params = nbytes["params"]
    pages = -(-(a.prompt + 1) // PAGE_SIZE)
    b = a.slots
    results = []
    for mode in a.modes.split(","):
        # on-large: the invariant mode with prefill steps in their own tiles ($DFLASH_PREFILL_TILES=large)
        os.environ["DFLASH_PREFILL_TILES"] = "large" if mode == "on-large" else "same"
        steps = CompiledSteps(graphdef, state, invariant=mode.startswith("on"))
        for chunk in (int(c) for c in a.chunks.split(",")):
            if time.monotonic() - T0 > a.budget_s:
                log("budget reached")
                break
            if a.prompt % chunk:
                log(f"chunk {chunk} does not divide the prompt {a.prompt}: skipped")
                continue
            inputs = [jax.device_put(chunk_inputs(cfg, b, chunk, off, pages, seed=off))
                      for off in range(0, a.prompt, chunk)]
            h = {"cache": random_cache(cfg, 1 + b * pages, dtype), "rows": slot_rows(b + 1, cfg.vocab_size)}

            def prompt():
                out = None
                for x in inputs:
                    h["cache"], _, h["rows"], out = steps.model_step(h["cache"], None, h["rows"], x, False)
                return out.tokens

            t = time.monotonic()
            jax.block_until_ready(prompt())
            first = time.monotonic() - t
            times = []
            for _ in range(a.iters):
                t = time.perf_counter()
                jax.block_until_ready(prompt())
                times.append(time.perf_counter() - t)
            ttft = float(np.median(times))
            tok_s = b * a.prompt / ttft
            tflops = 2 * params * b * a.prompt / ttft / 1e12
            row = {"target": a.target, "weights": a.weights, "device": dev.device_kind, "mode": mode, "chunk": chunk,
                   "slots": b, "prompt": a.prompt, "ttft_ms": ttft * 1e3, "step_ms": ttft * 1e3 * chunk / a.prompt,
                   "tok_s": tok_s, "tflops": tflops, "first_call_s": first}
            results.append(row)
            log(f"invariant {mode:8s} chunk {chunk:4d}: TTFT {ttft * 1e3:8.2f} ms ({a.prompt // chunk} steps of "
                f"{row['step_ms']:.2f} ms), {tok_s:9.0f} prompt tok/s, ~{tflops:.0f} TFLOPS "
                f"({100 * tflops / H100_H200_BF16_DENSE_TFLOPS:.0f} % of dense bf16 peak); first call {first:.1f} s")
    if a.out:
        with open(a.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
