"""Issue 8: the Q8_0 GEMV kernel (`pallas_kernels/q8_0_gemv.py`, FMAs, no tensor cores) against the Mosaic Q8_0 product
at decode rows, Qwen3-8B shapes (fused qkv, o, fused gate+up, down, LM head). Checks each GEMV tile against its
reference first, then times every (shape, M, variant) in one process:

    python bench/q8_gemv.py --ms 1,2,4,8 --configs auto,16x8x0x4x3,32x8x0x4x3 [--budget-s 300] [--out F.jsonl]

A config is BN x blocks x splits x warps x stages (splits 0: the picker's). GB/s counts weight and scale bytes.
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

from bench.weight_matmul import copy_bandwidth, log, make_weights, timed  # noqa: E402
from pallas_kernels.q8_0_gemv import GemvConfig, pick_gemv_config, q8_0_gemv, q8_0_gemv_reference  # noqa: E402
from pallas_kernels.q8_0_matmul_mgpu import q8_0_matmul_mgpu  # noqa: E402

SHAPES = [("qkv", 4096, 6144, 1), ("o", 4096, 4096, 1), ("gate+up", 4096, 24576, 1), ("down", 12288, 4096, 1),
          ("lm_head", 4096, 151936, 0)]  # (name, K, N, per layer: 1, or once per step: 0)
LAYERS = 36


def parse(text: str, m: int, k: int, n: int) -> GemvConfig:
    if text == "auto":
        return pick_gemv_config(m, k, n)
    bn, nb, sp, w, st = (int(v) for v in text.split("x"))
    return pick_gemv_config(m, k, n, block_n=bn, blocks=nb, num_splits=sp or None, num_warps=w, num_stages=st)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,2,4,8")
    ap.add_argument("--configs", default="auto")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    t0 = time.time()
    ms = [int(v) for v in a.ms.split(",")]
    configs = a.configs.split(",")
    shapes = [s for s in SHAPES if s[0] in a.shapes.split(",")]
    copy = copy_bandwidth()
    log(f"{jax.devices()[0].device_kind}: copy {copy:.0f} GB/s")
    out = open(a.out, "a") if a.out else None
    rng = np.random.default_rng(0)
    totals: dict[tuple[int, str], float] = {}
    for name, k, n, per_layer in shapes:
        per = k * n * (1 + 2 / 32)
        copies = min(16, max(2, int(np.ceil(1.2e9 / per))))
        ws, wbytes = make_weights("q8_0_nk", k, n, copies, jax.random.PRNGKey(k + n))
        for m in ms:
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            ref = q8_0_gemv_reference(x, *ws[0])
            scale = float(jnp.std(ref))
            variants = {"mgpu": lambda xx, q, s: q8_0_matmul_mgpu(xx, q, s)}
            for c in configs:
                cfg = parse(c, m, k, n)
                variants[f"gemv {c}"] = lambda xx, q, s, cfg=cfg: q8_0_gemv(xx, q, s, config=cfg)
            for vname, fn in variants.items():
                if time.time() - t0 > a.budget_s:
                    log("budget spent")
                    break
                try:
                    err = float(jnp.max(jnp.abs(fn(x, *ws[0]).astype(jnp.float32) - ref))) / scale
                    f = jax.jit(lambda xx, wl, fn=fn: [fn(xx, *w) for w in wl])
                    sec = timed(f, (x, ws), 3, 3) / copies
                except Exception as e:  # noqa: BLE001  (a tile that does not build is reported, not fatal)
                    log(f"{name} M={m} {vname}: FAILED {type(e).__name__}: {str(e)[:200]}")
                    continue
                gbs = wbytes / sec / 1e9
                weight = LAYERS if per_layer else 1
                totals[(m, vname)] = totals.get((m, vname), 0.0) + sec * weight
                log(f"{name:8s} K={k:5d} N={n:6d} M={m} {vname:22s} {sec * 1e6:8.1f} us {gbs:6.0f} GB/s "
                    f"{100 * gbs / copy:5.1f}% of copy  err {err:.1e}")
                if out:
                    out.write(json.dumps(dict(shape=name, k=k, n=n, m=m, variant=vname, us=sec * 1e6, GBps=gbs,
                                              copy_GBps=copy, err=err, device=jax.devices()[0].device_kind)) + "\n")
        del ws
    for (m, vname), sec in sorted(totals.items()):
        log(f"step products M={m} {vname:22s} {sec * 1e3:.3f} ms ({len(shapes)} shapes)")


if __name__ == "__main__":
    main()
