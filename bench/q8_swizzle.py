"""Issue 8: does the Mosaic Q8_0 product stream faster with 128-byte swizzled weight tiles (wide TMA boxes) than with
32-byte ones (one Q8_0 block per tile column, the default)? Checks each variant against its reference, then times the
Qwen3-8B layer products per (variant, swizzle) in one process:

    python bench/q8_swizzle.py --ms 1,8,128 [--out F.jsonl]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.weight_matmul import COUNTS, SHAPES, bench_shape, copy_bandwidth, log  # noqa: E402
from pallas_kernels.q8_0_matmul_mgpu import pick_q8_mgpu_config, q8_0_matmul_mgpu  # noqa: E402
from pallas_kernels.weight_matmul import q8_0_matmul_reference  # noqa: E402


def config(m, k, n, prescale, swizzle):
    cfg = pick_q8_mgpu_config(m, k, n, prescale=prescale)
    if swizzle == 128:
        cfg = pick_q8_mgpu_config(m, k, n, prescale=prescale, block_n=cfg.block_n, blocks=4)
    return dataclasses.replace(cfg, swizzle=swizzle)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1,8,128")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = open(a.out, "a") if a.out else None
    rng = np.random.default_rng(0)
    k, n = 4096, 1024
    q = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
    s = jnp.asarray(rng.uniform(1e-3, 3e-3, (k // 32, n)), jnp.float16)
    variants = [(p, sw) for p in (False, True) for sw in (32, 128)]
    ok = []
    for pre, sw in variants:
        err = 0.0
        try:
            for m in (1, 8, 128):
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
                got = q8_0_matmul_mgpu(x, q, s, config=config(m, k, n, pre, sw), out_dtype=jnp.float32)
                ref = q8_0_matmul_reference(x if pre else x.astype(jnp.float32), q.T, s).astype(jnp.float32)
                err = max(err, float(jnp.max(jnp.abs(got - ref)) / jnp.std(ref)))
        except Exception as e:  # report and go on: the other variants still run
            log(f"prescale={pre} swizzle={sw}: FAILED {type(e).__name__}: {e}"[:400])
            continue
        log(f"check prescale={pre} swizzle={sw}: max err / std {err:.2e}")
        if err < 2e-2:
            ok.append((pre, sw))
    copy = copy_bandwidth()
    log(f"copy bandwidth {copy:.0f} GB/s (read + write)")
    for m in (int(v) for v in a.ms.split(",")):
        for pre, sw in ok:
            tot_s = tot_b = 0.0
            for name, kk, nn in SHAPES["qwen3-8b"]:
                sec, moved = bench_shape("mgpu_q8_0", m, kk, nn, 0.75e9, config(m, kk, nn, pre, sw))
                tot_s += COUNTS["qwen3-8b"][name] * sec
                tot_b += COUNTS["qwen3-8b"][name] * moved
                log(f"M={m:3d} prescale={pre:d} swizzle={sw:3d} {name:14s} {sec * 1e6:7.1f} us "
                    f"{100 * moved / sec / 1e9 / copy:4.0f}% of copy")
            log(f"M={m:3d} prescale={pre:d} swizzle={sw:3d} LAYER {tot_s * 1e3:.3f} ms "
                f"{100 * tot_b / tot_s / 1e9 / copy:4.0f}% of copy")
            if out:
                out.write(json.dumps({"m": m, "prescale": pre, "swizzle": sw, "layer_ms": tot_s * 1e3,
                                      "card": jax.devices()[0].device_kind}) + "\n")


if __name__ == "__main__":
    main()
