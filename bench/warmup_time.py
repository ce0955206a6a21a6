"""Engine start-up: seconds to compile every step bucket, with the buckets compiled in parallel threads or in a row,
with a cold or a warm persistent compilation cache.

    python bench/warmup_time.py -m MODEL.gguf [-md DRAFTER.gguf] --slots 8 --workers 8 --cache-dir DIR
        [--batch-invariant on|off] [--dtype bfloat16] [--prefill-chunk 64]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from converters.checkpoint import load_drafter, load_model
from dflash_jax.engine import Engine, EngineConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-md", "--model-draft", default=None)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--cache-dir", required=True, help="persistent compilation cache (empty = cold start)")
    ap.add_argument("--batch-invariant", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill-chunk", type=int, default=64)
    a = ap.parse_args()
    lm = load_model(a.model, jnp.dtype(a.dtype))
    d = load_drafter(a.model_draft, lm.config, jnp.dtype(a.dtype)) if a.model_draft else None
    cfg = EngineConfig(num_slots=a.slots, ctx_size=1024 * a.slots, ctx_per_slot=1024, prefill_chunk=a.prefill_chunk,
                       dtype=a.dtype, compile_workers=a.workers, compile_cache_dir=a.cache_dir,
                       batch_invariant={"on": True, "off": False}.get(a.batch_invariant))
    eng = Engine(lm, cfg, d)
    t0 = time.perf_counter()
    eng.warmup(progress=False)
    secs = time.perf_counter() - t0
    buckets = len(cfg.slot_buckets) * (len(cfg.chunk_buckets) + 2 + (2 if d else 0))
    print(f"| {jax.devices()[0].device_kind} | {a.slots} | {'dflash' if d else 'plain'} | {buckets} | "
          f"{eng.batch_invariant} | {a.workers} | {secs:.1f} | {eng.warmup_seconds} |", flush=True)


if __name__ == "__main__":
    main()
