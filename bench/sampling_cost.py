"""Cost of on-device sampling for R rows of a V-token vocabulary: `sampling.sample` (greedy, and full: temperature,
top-k/top-p/min-p candidate search, top logprobs) with the two-stage `sampling.top_k` against XLA's own
`lax.top_k`, and the top-k searches alone. Rows are what a step samples: slots for a decode, slots x block for a
verify. One process, every variant timed back to back, ratios against lax.top_k.

    python bench/sampling_cost.py --rows 1,8,16,64,128,256 --vocab 151936 --out sampling.jsonl
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dflash_jax import sampling
from dflash_jax.requests import SamplingParams

LLAMA_SERVER_DEFAULTS = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)


def timed(fn, *args, iters: int) -> float:
    """Median ms per call over 5 repeats of `iters` back-to-back calls."""
    jax.block_until_ready(fn(*args))
    means = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        means.append((time.perf_counter() - t) / iters * 1e3)
    return float(np.median(means))


def sample_with(topk_fn, full: bool):
    """sampling.sample traced with topk_fn as its top-k (the module attribute is read when the jit traces)."""
    def run(logits, params, positions):
        saved = sampling.top_k
        sampling.top_k = topk_fn
        try:
            return sampling.sample(logits, None, params, positions, full=full)
        finally:
            sampling.top_k = saved
    return jax.jit(run)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,8,16,64,128,256")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {dev.device_kind}")
    results = []
    for r in [int(x) for x in args.rows.split(",")]:
        key = jax.random.key(r)
        logits = jax.random.normal(key, (r, args.vocab), jnp.float32) * 4
        params = sampling.SamplingArrays.from_params([LLAMA_SERVER_DEFAULTS] * r, r, list(range(r)))
        positions = jnp.arange(r, dtype=jnp.int32)
        times = {}
        for k in (sampling.NUM_CANDIDATES, sampling.MAX_TOP_LOGPROBS):
            for name, fn in (("xla", jax.lax.top_k), ("two_stage", sampling.top_k)):
                times[f"top{k}_{name}"] = timed(jax.jit(partial(fn, k=k)), logits, iters=args.iters)
        times["sample_greedy"] = timed(sample_with(sampling.top_k, False), logits, params, positions,
                                       iters=args.iters)
        for name, fn in (("xla", jax.lax.top_k), ("two_stage", sampling.top_k)):
            times[f"sample_full_{name}"] = timed(sample_with(fn, True), logits, params, positions, iters=args.iters)
        a, b = sample_with(jax.lax.top_k, True)(logits, params, positions), \
            sample_with(sampling.top_k, True)(logits, params, positions)
        same = bool(np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
                    and np.array_equal(np.asarray(a.top_logprobs), np.asarray(b.top_logprobs)))
        row = {"device": dev.device_kind, "rows": r, "vocab": args.vocab, "ms": times, "same_output": same}
        results.append(row)
        print(f"rows {r:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in times.items())
              + f"  full two_stage/xla {times['sample_full_two_stage'] / times['sample_full_xla']:.3f}"
              + f"  same {same}", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
