"""Speed of training-data generation (`dflash_jax.train.batch_generate`): one fixed-shape batch of prompts answered
on device, greedy and sampled, with the device's top kernels; and the sampler alone at that batch size.

    python bench/batch_generate.py -m MODEL.gguf --data DATA.jsonl[.gz] --batch 512 --max-tokens 64 \
        [--variants greedy,sampled] [--profile] [--sample-only]

Prompts are the prompt_ids of a data file (`python -m dflash_jax.train data` output), so a random-weight model of
the same vocabulary (converters.synthetic --preset smollm2-135m) measures what the real one would.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from converters.checkpoint import load_model  # noqa: E402
from dflash_jax.profiling import device_profile  # noqa: E402
from dflash_jax.sampling import SamplingArrays, sample  # noqa: E402
from dflash_jax.train.batch_generate import GenJob, batch_generate  # noqa: E402


def read_prompts(path: str, n: int, max_len: int) -> list[tuple[int, ...]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        ids = [tuple(json.loads(line)["prompt_ids"]) for line in f if line.strip()]
    ids = [p for p in ids if len(p) <= max_len] or [(1, 2, 3)]
    return [ids[i % len(ids)] for i in range(n)]


def time_sampler(batch: int, vocab: int, iters: int = 20) -> dict:
    """ms per call of `sample` on (batch, vocab) logits, greedy variant vs full (temperature 0.8, top_p 1)."""
    logits = jax.random.normal(jax.random.key(0), (batch, vocab), jnp.float32) * 3
    pos = jnp.arange(batch, dtype=jnp.int32)
    out = {}
    for name, full, temp in (("greedy", False, 0.0), ("full", True, 0.8)):
        p = SamplingArrays(temperature=jnp.full((batch,), temp), top_k=jnp.zeros((batch,), jnp.int32),
                           top_p=jnp.ones((batch,)), min_p=jnp.zeros((batch,)),
                           presence_penalty=jnp.zeros((batch,)), frequency_penalty=jnp.zeros((batch,)),
                           seed=jnp.arange(batch, dtype=jnp.uint32))
        f = jax.jit(lambda lg, pp, ps, full=full: sample(lg, None, pp, ps, full=full).tokens)
        jax.block_until_ready(f(logits, p, pos))
        t0 = time.perf_counter()
        for _ in range(iters):
            r = f(logits, p, pos)
        jax.block_until_ready(r)
        out[name] = (time.perf_counter() - t0) * 1e3 / iters
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--data", required=True, help="a data .jsonl(.gz) whose prompt_ids are the prompts")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-pad", type=int, default=512)
    ap.add_argument("--variants", default="greedy,sampled")
    ap.add_argument("--profile", action="store_true", help="top device kernels of one timed batch")
    ap.add_argument("--sample-only", action="store_true")
    a = ap.parse_args()
    dev = jax.devices()[0]
    print(f"# {getattr(dev, 'device_kind', dev.platform)} | jax {jax.__version__} | {platform.node()}", flush=True)
    loaded = load_model(a.model, jnp.bfloat16 if dev.platform == "gpu" else jnp.float32, weights="bf16")
    print(f"sampler at batch {a.batch}: {time_sampler(a.batch, loaded.config.vocab_size)} ms/call", flush=True)
    if a.sample_only:
        return
    prompts = read_prompts(a.data, a.batch, a.prompt_pad)
    for variant in a.variants.split(","):
        temp = 0.0 if variant == "greedy" else 0.8
        jobs = [GenJob(p, temp, 1.0, i) for i, p in enumerate(prompts)]
        run = lambda: batch_generate(loaded.model, jobs, a.max_tokens, loaded.tokenizer.eog_ids,  # noqa: E731
                                     batch=a.batch, prompt_pad=a.prompt_pad, progress=False)
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = run()
        el = time.perf_counter() - t0
        toks = sum(len(t) for t, _ in out)
        print(f"{variant:8s} batch {a.batch} x {a.max_tokens} steps: {el:.2f} s = {el / a.max_tokens * 1e3:.1f} "
              f"ms/step, {toks / el:.0f} tok/s (first call {first:.1f} s)", flush=True)
        if a.profile:
            prof = device_profile(run, 1, os.path.join("/tmp", f"bg_prof_{variant}"))
            print(f"  device busy {prof['busy_ms_per_step']:.1f} ms per batch, {prof['kernels_per_step']:.0f} kernels")
            for name, ms, count in prof["top"][:12]:
                print(f"  {ms:9.2f} ms x{count:6.0f}  {name}")


if __name__ == "__main__":
    main()
