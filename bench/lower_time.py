"""Warm-up's Python half (issue 7): seconds to trace and lower one step bucket of a target for CUDA, on abstract
weights and caches, so it runs on any host (no GPU, no weights). An engine lowers every bucket in a row before the
last compiles finish; on an H200 host a 4-slot 27B DFlash engine spent 150.7 of its 178.7 s of warm-up lowering.

    python bench/lower_time.py --target qwen35-27b --weights q8_0 --slots 1,2,4,8 --steps plain,spec \
        --variants greedy,full --kernel-cache on|off

Kernels as on a GPU: Mosaic products and attention, the Triton delta rule (lowered for compute capability 9.0 when
the host has no GPU)."""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _k, _v in (("DFLASH_MATMUL_IMPL", "mgpu"), ("DFLASH_ATTENTION_IMPL", "mgpu"), ("DFLASH_GDN_IMPL", "pallas")):
    os.environ.setdefault(_k, _v)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench.decode_step import PAGE_SIZE, SHAPES, abstract_target, decode_inputs, slot_rows  # noqa: E402
from bench.prefill_step import chunk_inputs  # noqa: E402
from bench.spec_step import drafter_shape, spec_inputs  # noqa: E402
from dflash_jax.kv_cache import KVCache  # noqa: E402
from dflash_jax.models.drafter import Drafter  # noqa: E402
from dflash_jax.state_pool import make_cache  # noqa: E402
from dflash_jax.step_fns import CompiledSteps  # noqa: E402
from pallas_kernels import lowering_cache  # noqa: E402
from pallas_kernels.q8_0_matmul_mgpu import engine_prescale  # noqa: E402


def lower_without_gpu() -> None:
    """Pallas's Triton lowering asks the local GPU for its compute capability: answer for an H100/H200."""
    if jax.default_backend() == "gpu":
        return
    from jax._src.pallas.triton import gpu_info, pallas_call_registration  # noqa: PLC0415
    pallas_call_registration.gpu_info_lib.get_gpu_info = lambda: gpu_info.GpuInfo(
        gpu_version=None, arch_name="9.0", compute_capability=90)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen35-27b", choices=sorted(SHAPES))
    ap.add_argument("--weights", default="q8_0")
    ap.add_argument("--slots", default="8", help="slot buckets, e.g. 1,2,4,8 (one engine's decode and spec buckets)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--steps", default="plain,spec", help="plain (decode), spec, prefill (one chunk per slot)")
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk tokens")
    ap.add_argument("--variants", default="greedy", help="greedy,full: each step's two compiled variants")
    ap.add_argument("--kernel-cache", default="on", choices=("on", "off"),
                    help="pallas_kernels.lowering_cache: Mosaic kernels lowered once per process")
    ap.add_argument("--kernel-cache-dir", default=None,
                    help="keep the kernel lowerings on disk too (a second run then reads them: a server's restart)")
    a = ap.parse_args(argv)
    lower_without_gpu()
    if a.kernel_cache == "on":
        lowering_cache.install(a.kernel_cache_dir)
    cfg, dtype = SHAPES[a.target], jnp.bfloat16
    dcfg = drafter_shape(a.target, cfg, 5, a.block)
    graphdef, state = nnx.split(abstract_target(cfg, dtype, a.weights))
    dgraphdef, dstate = nnx.split(nnx.eval_shape(lambda: Drafter(dcfg, dtype, serving=True)))
    slots = [int(x) for x in a.slots.split(",")]
    pps = -(-(a.ctx + a.block + 1) // PAGE_SIZE)
    num_pages = 1 + max(slots) * pps
    cache = jax.eval_shape(lambda: make_cache(cfg, num_pages, PAGE_SIZE, max(slots) + 1, dtype))
    dcache = jax.eval_shape(lambda: KVCache.create(dcfg.num_layers, num_pages, PAGE_SIZE, dcfg.num_kv_heads,
                                                   dcfg.head_dim, dtype))
    rows = jax.eval_shape(lambda: slot_rows(max(slots) + 1, cfg.vocab_size))
    # One engine's steps: its Q8_0 choice comes from its largest verify, as in the engine
    steps = CompiledSteps(graphdef, state, dgraphdef, dstate, dcfg.target_layer_ids, dcfg.mask_token_id, None,
                          invariant=True, q8_prescale=engine_prescale(max(slots) * a.block))
    total = 0.0
    for b in slots:
        for name in a.steps.split(","):
            for variant in a.variants.split(","):
                kind, inputs = {"spec": lambda: ("spec", spec_inputs(cfg, b, a.ctx, a.block, pps, True)),
                                "plain": lambda: ("plain", decode_inputs(cfg, b, a.ctx, pps)),
                                "prefill": lambda: ("plain", chunk_inputs(cfg, b, a.chunk, 0, pps, 0))}[name]()
                fn = steps._jit(kind, inputs)
                t0 = time.perf_counter()
                traced = fn.trace(steps.leaves, steps.drafter_leaves, cache, dcache, rows, inputs, variant == "full")
                t1 = time.perf_counter()
                text = traced.lower(lowering_platforms=("cuda",)).as_text()
                t2 = time.perf_counter()
                total += t2 - t0
                print(f"{a.target} {a.weights} B={b} {name:5s} {variant:6s}: trace {t1 - t0:5.2f} s, lower "
                      f"{t2 - t1:5.2f} s ({len(text) / 1e6:.1f} MB of StableHLO; {jax.devices()[0].device_kind} "
                      f"host; kernel cache {a.kernel_cache} {lowering_cache.stats})", flush=True)
    print(f"total {total:.2f} s", flush=True)


if __name__ == "__main__":
    main()
