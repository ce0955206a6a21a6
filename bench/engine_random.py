"""Serving traffic on random weights (issue 7): the engine `python -m serve` runs (scheduler, paged cache, chunked
prefill, step buckets, host/device overlap; no HTTP) under N concurrent requests, with and without a random DFlash
drafter, for any shape of bench/decode_step.py — Qwen3.6-27B's hybrid included — built on the device, no GGUF.

One engine per mode with `--slots` slots (warmed up once, as the server does); each concurrency level then sends
`2 x N` requests of random `--prompt` tokens, `--max-tokens` generated each (ignore_eos), at most N in flight: the
traffic of N clients against `python -m serve --slots S`. A random drafter is (almost) never right, so DFlash runs
here at tau ~ 1 with every step speculating (`spec_policy=always`): its tokens/s is the floor, and the break-even
acceptance length at N is (plain tok/s) / (DFlash tok/s) x tau. `--modes adaptive` runs the default policy with
that drafter instead: it should decode plainly and lose only its probes against `plain`. Memory per slot: KV pages,
recurrent state, drafter context, penalty row, from the engine's own buffers.

    python bench/engine_random.py --target qwen35-27b --weights q8_0 --slots 16 --concurrency 1,2,4,8,16
    python bench/engine_random.py --target qwen35-tiny --slots 2 --concurrency 1,2 --prompt 24 --max-tokens 8   # CPU
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.decode_step import SHAPES, random_model, random_module  # noqa: E402
from bench.spec_step import drafter_shape  # noqa: E402
from converters.checkpoint import LoadedModel  # noqa: E402
from converters.synthetic import tokenizer_metadata  # noqa: E402
from converters.tokenizer import Tokenizer  # noqa: E402
from dflash_jax.engine import Engine, EngineConfig  # noqa: E402
from dflash_jax.models.drafter import Drafter  # noqa: E402
from dflash_jax.requests import Request, SamplingParams  # noqa: E402
from dflash_jax.spec_state import LoadedDrafter  # noqa: E402

T0 = time.monotonic()
GiB = 2 ** 30


def log(*a):
    print(f"[{time.monotonic() - T0:7.1f}s]", *a, flush=True)


def random_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE padded with unused tokens to the model's vocabulary, so every random id detokenizes."""
    kv, _ = tokenizer_metadata(None, vocab_size, None)

    def plain(value):
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value
    return Tokenizer.from_metadata({k: plain(v[0]) for k, v in kv.items()}, source="random")


SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)


def device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_in_use")


def traffic(engine: Engine, vocab: int, clients: int, requests: int, prompt: int, max_tokens: int,
            rng: np.random.Generator, sampling: dict | None = None) -> dict:
    """requests requests, at most `clients` in flight; each client sends its next request when one finishes."""
    todo = queue.Queue()
    for _ in range(requests):
        todo.put(rng.integers(0, vocab, prompt).tolist())
    ttfts, counts, decode_rates = [], [], []
    lock = threading.Lock()

    def client():
        while True:
            try:
                ids = todo.get_nowait()
            except queue.Empty:
                return
            req = Request(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **(sampling or {})))
            t0 = time.perf_counter()
            engine.submit(req)
            first, n = None, 0
            while True:
                e = req.events.get()
                if e.token_id is not None:
                    n += 1
                    first = first if first is not None else time.perf_counter() - t0
                if e.finish_reason:
                    break
            done = time.perf_counter() - t0
            with lock:
                ttfts.append(first)
                counts.append(n)
                if first is not None and n > 1 and done > first:
                    decode_rates.append((n - 1) / (done - first))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"seconds": wall, "tokens": sum(counts), "tok_s": sum(counts) / wall,
            "ttft_ms_p50": 1e3 * float(np.median([t for t in ttfts if t is not None])) if ttfts else None,
            # one request's tokens/s after its first token (its decode rate while sharing the engine)
            "decode_tok_s_p50": float(np.median(decode_rates)) if decode_rates else None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen35-27b", choices=sorted(SHAPES))
    ap.add_argument("--weights", default="bf16", choices=("bf16", "q8_0"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--slots", type=int, default=16, help="engine slots (python -m serve --slots)")
    ap.add_argument("--concurrency", default="1,2,4,8,16", help="clients in flight, each level in turn")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--chunk-buckets", default="", help="prefill chunk buckets, e.g. '256' (python -m serve "
                    "--ubatch-buckets; default: the engine's factor-4 steps)")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--drafter-layers", type=int, default=5)
    ap.add_argument("--sampled", action="store_true",
                    help="llama-server's default sampling (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05) "
                    "instead of greedy requests")
    ap.add_argument("--modes", default="plain,dflash", help="plain, dflash (every step speculates), adaptive")
    ap.add_argument("--batch-invariant", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cfg = SHAPES[a.target]
    dtype = jnp.dtype(a.dtype)
    dev = jax.devices()[0]
    log(f"jax {jax.__version__}, {dev.device_kind}; target {a.target} ({a.weights}), {a.slots} slots")
    graphdef, state, nbytes = random_model(cfg, dtype, weights=a.weights)
    lm = LoadedModel(cfg, nnx.merge(graphdef, state), random_tokenizer(cfg.vocab_size), None, f"random {a.target}")
    log(f"target: {nbytes['all'] / 1e9:.2f} GB; device memory in use {(device_bytes() or 0) / GiB:.2f} GiB")
    dcfg = drafter_shape(a.target, cfg, a.drafter_layers, a.block)
    per_slot = a.prompt + a.max_tokens + a.block + 1
    invariant = {"auto": None, "on": True, "off": False}[a.batch_invariant]
    levels = [int(c) for c in a.concurrency.split(",")]
    rows = {c: {"concurrency": c} for c in levels}
    for mode in a.modes.split(","):
        drafter = None
        if mode in ("dflash", "adaptive"):
            dgraphdef, dstate, _ = random_module(nnx.eval_shape(lambda: Drafter(dcfg, dtype)), seed=5)
            drafter = LoadedDrafter(dcfg, nnx.merge(dgraphdef, dstate), "random")
        before = device_bytes()
        engine = Engine(lm, EngineConfig(num_slots=a.slots, ctx_size=a.slots * per_slot, ctx_per_slot=per_slot,
                                         prefill_chunk=a.prefill_chunk, dtype=a.dtype, draft_max=a.block - 1,
                                         chunk_sizes=tuple(int(c) for c in a.chunk_buckets.split(",") if c) or None,
                                         spec_policy={"plain": "never", "dflash": "always"}.get(mode, mode),
                                         batch_invariant=invariant), drafter)
        after = device_bytes()
        t = time.perf_counter()
        engine.warmup(progress=False)
        warm = time.perf_counter() - t
        slot_mib = (after - before) / a.slots / 2 ** 20 if before is not None and after is not None else None
        log(f"{mode}: warm-up {warm:.1f} s ({engine.warmup_seconds}); engine buffers "
            f"{slot_mib and f'{slot_mib:.1f}'} MiB per slot (pages for {per_slot} tokens); batch-invariant "
            f"{engine.batch_invariant}")
        engine.start()
        rng = np.random.default_rng(0)
        traffic(engine, cfg.vocab_size, min(levels), min(levels), a.prompt, 4, rng)  # settle
        for c in levels:
            res = traffic(engine, cfg.vocab_size, c, c * a.requests_per_client, a.prompt, a.max_tokens, rng,
                          SAMPLED if a.sampled else None)
            if drafter:
                sp = engine.stats()["speculative"]
                res["tau"] = sp["tau"]
                res["blocks"], res["shadow_probes"] = sp["num_drafts"], sp["num_shadow_probes"]
            res["mib_per_slot"] = slot_mib
            res["warmup_s"] = warm
            res["warmup_split_s"] = engine.warmup_seconds
            rows[c][mode] = res
            log(f"{mode:6s} clients {c:3d}: {res['tokens']} tokens in {res['seconds']:.2f} s = {res['tok_s']:.1f} "
                f"tok/s, TTFT p50 {res['ttft_ms_p50']:.0f} ms, per-request decode p50 {res['decode_tok_s_p50']:.1f} "
                f"tok/s" + (f", tau {res['tau']}, {res['blocks']} blocks, "
                                                                  f"{res['shadow_probes']} shadow probes" if drafter
                                                                  else ""))
        engine.stop()
        del engine
    log("summary: clients | plain tok/s | DFlash tok/s (random drafter) | DFlash/plain | break-even tau | "
        "TTFT p50 plain / DFlash ms")
    for c in levels:
        p, d = rows[c].get("plain"), rows[c].get("dflash")
        if p and d:
            ratio = d["tok_s"] / p["tok_s"]
            log(f"  {c:3d} | {p['tok_s']:9.1f} | {d['tok_s']:9.1f} | {ratio:5.2f} | {d['tau'] / ratio:5.2f} | "
                f"{p['ttft_ms_p50']:.0f} / {d['ttft_ms_p50']:.0f}")
    for c in levels:  # the adaptive policy with a useless drafter: what having DFlash on costs
        p, ad = rows[c].get("plain"), rows[c].get("adaptive")
        if p and ad:
            log(f"  {c:3d} clients: adaptive / plain = {ad['tok_s'] / p['tok_s']:.3f}")
    if a.out:
        with open(a.out, "a") as f:
            for c in levels:
                f.write(json.dumps({"target": a.target, "weights": a.weights, "device": dev.device_kind,
                                    "slots": a.slots, "prompt": a.prompt, "max_tokens": a.max_tokens, **rows[c]})
                        + "\n")


if __name__ == "__main__":
    main()
