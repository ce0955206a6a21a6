"""Held-out evaluation of a drafter through the real serving path: the Engine with spec_policy="always" (every decode
step speculates) against the same Engine without a drafter, greedy, at a given number of slots.

Reports tau = mean(accepted + 1) per spec step, acceptance per block position, tokens/s with and without DFlash, the
per-request draft counts (to compare with llama.cpp's draft_n / draft_n_accepted), and whether the greedy texts of
the two runs are identical (DFlash must be lossless).
"""
from __future__ import annotations

import time

import numpy as np

from dflash_jax.engine import Engine, EngineConfig
from dflash_jax.requests import SamplingParams
from dflash_jax.train.data import PromptEncoder, run_requests


def run_engine(loaded, drafter, prompt_ids: list[list[int]], slots: int, max_tokens: int, dtype: str,
               ctx_per_slot: int = 1024, prefill_chunk: int = 256, progress: bool = False,
               draft: dict | None = None) -> dict:
    """Greedy completions of every prompt on a fresh, warmed-up engine; returns outputs, timing and spec counters.
    draft: more EngineConfig fields for the DFlash engine (draft_vocab, draft_fp8)."""
    block = drafter.config.block_size if drafter is not None else 16
    cfg = EngineConfig(num_slots=slots, ctx_size=slots * ctx_per_slot, ctx_per_slot=ctx_per_slot, page_size=16,
                       prefill_chunk=prefill_chunk, dtype=dtype, draft_max=block - 1,
                       spec_policy="always" if drafter is not None else "never",
                       **(draft or {}))
    engine = Engine(loaded, cfg, drafter)
    engine.warmup(progress=progress)
    engine.start()
    outs: dict[str, dict] = {}

    def on_done(key, ids, toks, finish):
        outs[key] = {"tokens": toks, "finish": finish}

    jobs = [(str(i), ids, SamplingParams(max_tokens=max_tokens)) for i, ids in enumerate(prompt_ids)]
    t0 = time.perf_counter()
    try:
        # group=1: refill a slot as soon as it frees (steady load, as a server sees it)
        run_requests(engine, jobs, on_done, group=1, progress=progress,
                     desc=f"{'dflash' if drafter else 'plain'} x{slots}")
        seconds = time.perf_counter() - t0
        stats = engine.stats()
    finally:
        engine.stop()
    n_tokens = sum(len(o["tokens"]) for o in outs.values())
    result = {"slots": slots, "seconds": round(seconds, 3), "tokens": n_tokens,
              "tokens_per_s": round(n_tokens / seconds, 2), "batch_invariant": stats["batch_invariant"],
              "outputs": [outs[str(i)]["tokens"] for i in range(len(prompt_ids))]}
    if drafter is not None:
        sp = stats["speculative"]
        n = max(sp["num_drafts"], 1)
        result.update(num_spec_steps=sp["num_drafts"], num_accepted=sp["num_accepted_tokens"],
                      tau=round(1 + sp["num_accepted_tokens"] / n, 3),
                      acceptance_per_pos=[round(a / n, 4) for a in sp["accepted_per_pos"]])
    return result


def evaluate(loaded, drafter, prompt_sets: dict[str, list], slots_list=(1, 8), max_tokens: int = 128,
             dtype: str = "float32", prefill_chunk: int = 256, progress: bool = True,
             draft: dict | None = None) -> dict:
    """prompt_sets: name -> list of data.Prompt. Returns {name: {slots: {dflash: ..., plain: ..., speedup,
    identical}}}. draft: the DFlash engines' EngineConfig draft fields (`run_engine`)."""
    encode = PromptEncoder(loaded)
    report: dict = {}
    for name, prompts in prompt_sets.items():
        ids = [encode(p.messages) for p in prompts]
        report[name] = {}
        for slots in slots_list:
            spec = run_engine(loaded, drafter, ids, slots, max_tokens, dtype, prefill_chunk=prefill_chunk,
                              progress=progress, draft=draft)
            plain = run_engine(loaded, None, ids, slots, max_tokens, dtype, prefill_chunk=prefill_chunk,
                               progress=progress)
            same = [a == b for a, b in zip(spec["outputs"], plain["outputs"])]
            diverge = sorted(first_difference(a, b) for a, b in zip(spec["outputs"], plain["outputs"]) if a != b)
            entry = {"dflash": {k: v for k, v in spec.items() if k != "outputs"},
                     "plain": {k: v for k, v in plain.items() if k != "outputs"},
                     "speedup": round(spec["tokens_per_s"] / plain["tokens_per_s"], 3),
                     "identical_outputs": f"{sum(same)}/{len(same)}",
                     "first_divergence": diverge,
                     "prompts": len(prompts)}
            report[name][slots] = entry
            if progress:
                print(f"[{name} slots={slots}] tau {spec['tau']:.3f}  accept/pos "
                      f"{np.round(spec['acceptance_per_pos'][:8], 3).tolist()}  "
                      f"tok/s dflash {spec['tokens_per_s']:.1f} plain {plain['tokens_per_s']:.1f} "
                      f"(x{entry['speedup']:.2f})  identical {entry['identical_outputs']}"
                      + (f" (others first differ at token {diverge})" if diverge else ""), flush=True)
    return report


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first token where two outputs differ (the shorter length if one is a prefix of the other).
    Where arithmetic is not bit-identical between the spec and plain steps (bf16 reductions whose order depends on
    the batch shape), a near-tie can flip one greedy choice; this says how far the outputs agreed."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))
