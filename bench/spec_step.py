"""Cost of one fused DFlash spec step (draft a block + verify it + accept + commit) against one plain decode step, on
random weights built on the device: the numbers behind the adaptive policy and the break-even acceptance length.

Three jitted steps per slot count B, all through `dflash_jax.step_fns.CompiledSteps` exactly as the engine calls them:
  plain        one decode token per slot, no drafter loaded (plain serving)
  plain+ctx    one decode token per slot with the drafter loaded (the step also writes the token's tap features
               into the drafter's context cache, as the engine's plain step does when a drafter is present)
  plain_engine `plain` called as the engine calls it (host inputs, outputs fetched every step)
  spec         the spec step for a block of T tokens per slot (T-1 drafts), verify causal at the slot's offset
A spec step yields tau tokens per slot (1 + accepted), a plain step 1, so DFlash wins when tau > spec / plain: that
ratio is the break-even acceptance length reported per B.

    python bench/spec_step.py --target qwen3-8b --slots 1,8,16 --block 16 --out results.jsonl
    python bench/spec_step.py --target tiny --slots 1,2 --iters 2 --block 4     # CPU smoke test
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
from flax import nnx  # noqa: E402

from bench.decode_step import PAGE_SIZE, SHAPES, decode_inputs, random_cache, random_model, random_module, time_loop  # noqa: E402,E501
from dflash_jax.config import drafter_config_for  # noqa: E402
from dflash_jax.kv_cache import AttentionMeta, KVCache  # noqa: E402
from dflash_jax.models.drafter import Drafter  # noqa: E402
from dflash_jax.sampling import SamplingArrays  # noqa: E402
from dflash_jax.step_fns import CompiledSteps, SpecInputs  # noqa: E402

T0 = time.monotonic()


def log(*a):
    print(f"[{time.monotonic() - T0:7.1f}s]", *a, flush=True)


def spec_inputs(cfg, b: int, ctx: int, block: int, pages_per_slot: int, greedy: bool) -> SpecInputs:
    rng = np.random.default_rng(3)
    page_table = (1 + np.arange(b)[:, None] * pages_per_slot + np.arange(pages_per_slot)[None, :]).astype(np.int32)
    meta = AttentionMeta(q_lens=np.full((b,), block, np.int32), kv_lens=np.full((b,), ctx + block, np.int32),
                         page_table=page_table)
    temp = 0.0 if greedy else 0.8
    sampling = SamplingArrays(temperature=np.full((b,), temp, np.float32), top_k=np.zeros((b,), np.int32),
                              top_p=np.full((b,), 1.0 if greedy else 0.95, np.float32),
                              min_p=np.zeros((b,), np.float32), presence_penalty=np.zeros((b,), np.float32),
                              frequency_penalty=np.zeros((b,), np.float32), seed=np.arange(b, dtype=np.uint32),
                              top_n=np.zeros((b,), np.int32))
    return SpecInputs(rng.integers(0, cfg.vocab_size, (b,), dtype=np.int32), meta, sampling,
                      np.zeros((b, block - 1), np.int32), np.zeros((b,), bool))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="qwen3-8b", choices=sorted(SHAPES))
    p.add_argument("--drafter-layers", type=int, default=5)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--slots", default="1,8,16")
    p.add_argument("--ctx", type=int, default=512, help="cached tokens per slot before the step")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sampled", action="store_true", help="temperature 0.8 / top-p 0.95 instead of greedy")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    cfg = SHAPES[a.target]
    dtype = jnp.dtype(a.dtype)
    # the z-lab DFlash drafter shape for a Qwen3 target: the target's attention/MLP shape, default taps
    dcfg = drafter_config_for(cfg, a.drafter_layers, a.block, cfg.vocab_size - 1)
    dev = jax.devices()[0]
    log(f"jax {jax.__version__}, {dev.device_kind}; target {a.target}, drafter {dcfg}")
    graphdef, state, nbytes = random_model(cfg, dtype)
    dgraphdef, dstate, dbytes = random_module(nnx.eval_shape(lambda: Drafter(dcfg, dtype)), seed=5)
    log(f"params: target {nbytes['all'] / 1e9:.3f} GB, drafter {dbytes['all'] / 1e9:.3f} GB")
    with_drafter = CompiledSteps(graphdef, state, dgraphdef, dstate, dcfg.target_layer_ids, dcfg.mask_token_id, None)
    plain_only = CompiledSteps(graphdef, state)
    slots = [int(s) for s in a.slots.split(",")]
    pages_per_slot = -(-(a.ctx + a.block + 1) // PAGE_SIZE)
    num_pages = 1 + max(slots) * pages_per_slot
    h = {"cache": random_cache(cfg, num_pages, dtype)}
    h["dcache"] = KVCache.create(dcfg.num_layers, num_pages, PAGE_SIZE, dcfg.num_kv_heads, dcfg.head_dim, dtype)
    results = []
    for b in slots:
        h["counts"] = jnp.zeros((b + 1, cfg.vocab_size), jnp.int32)
        plain_in = jax.device_put(decode_inputs(cfg, b, a.ctx, pages_per_slot))
        if not a.sampled:
            plain_in.sampling.temperature = jnp.zeros((b,), jnp.float32)
        spec_in = jax.device_put(spec_inputs(cfg, b, a.ctx, a.block, pages_per_slot, not a.sampled))

        def plain():
            h["cache"], _, h["counts"], out = plain_only.model_step(h["cache"], None, h["counts"], plain_in)
            return out.tokens

        np_plain_in = jax.device_get(plain_in)

        def plain_engine():  # as Engine._run: host inputs in, the sampled outputs fetched every step
            h["cache"], _, h["counts"], out = plain_only.model_step(h["cache"], None, h["counts"], np_plain_in)
            return jax.device_get((out.tokens, out.logprobs, out.top_ids, out.top_logprobs))[0]

        def plain_ctx():
            h["cache"], h["dcache"], h["counts"], out = with_drafter.model_step(h["cache"], h["dcache"], h["counts"],
                                                                                plain_in)
            return out.tokens

        def spec():
            h["cache"], h["dcache"], out = with_drafter.spec_step(h["cache"], h["dcache"], spec_in)
            return out.accepted

        row = {"target": a.target, "device": dev.device_kind, "B": b, "block": a.block, "ctx": a.ctx,
               "drafter_layers": a.drafter_layers, "sampled": a.sampled}
        for name, fn in (("plain", plain), ("plain_engine", plain_engine), ("plain+ctx", plain_ctx), ("spec", spec)):
            t = time.monotonic()
            jax.block_until_ready(fn())
            compile_s = time.monotonic() - t
            ms, runs, host = time_loop(fn, a.warmup, a.iters)
            row[name] = ms
            log(f"B={b:3d} {name:10s} {ms:8.3f} ms/step (runs {', '.join(f'{x:.3f}' for x in runs)}; host "
                f"{host:.3f} ms/call; first call {compile_s:.1f} s)")
        row["spec_over_plain"] = ratio = row["spec"] / row["plain"]
        log(f"B={b:3d} spec/plain = {ratio:.2f}x -> DFlash wins when tau > {ratio:.2f} (of at most {a.block})")
        results.append(row)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
