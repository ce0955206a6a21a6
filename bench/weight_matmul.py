"""Weight-streaming products y = x @ W at decode / verify sizes: XLA bf16, XLA int8 (Q8_0 dequantized in XLA), and the
Pallas kernels of pallas_kernels/weight_matmul.py (bf16 and Q8_0), for Qwen3-8B and Qwen3.6-27B layer shapes.

Each timed call runs R copies of one weight shape back to back in one jit (R copies >= --bytes of weights, far past
L2), so every weight byte comes from HBM; time = median over repeats of the call, divided by R. Bandwidth counts the
weight bytes (bf16: 2 B/weight; Q8_0: 1 B + 2 B per 32) plus x and y, against the copy bandwidth measured in the same
process (x * s over a 4 GiB bf16 array, s a runtime scalar, bytes read + written).

    python3 bench/weight_matmul.py --models qwen3-8b,qwen3.6-27b --ms 1,8,16,64,128 --out results.jsonl
    python3 bench/weight_matmul.py --models "" --sweep 4096:4096:1 --configs-q8 64x256x4x3,... (tile search)
    python3 bench/weight_matmul.py --profile ...     # GPU busy time per product (a profiler trace) instead
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dflash_jax.profiling import gpu_busy  # noqa: E402
from pallas_kernels.weight_matmul import (  # noqa: E402
    Q8_BLOCK,
    TileConfig,
    matmul_pallas,
    pick_config,
    q8_0_matmul_pallas,
    q8_0_matmul_reference,
)
from pallas_kernels.weight_matmul_mgpu import MgpuConfig, matmul_mgpu, pick_mgpu_config  # noqa: E402
from pallas_kernels.q8_0_matmul_mgpu import Q8MgpuConfig, pick_q8_mgpu_config, q8_0_matmul_mgpu  # noqa: E402

# (name, K in, N out) of every projection of one layer; the 27B's Gated DeltaNet beta/alpha (5120 -> 48) are left
# out: 0.5 MB each, launch-bound whatever the kernel.
SHAPES = {
    "qwen3-8b": [("q_proj/o_proj", 4096, 4096), ("k_proj/v_proj", 4096, 1024), ("gate/up", 4096, 12288),
                 ("down", 12288, 4096)],
    "qwen3.6-27b": [("attn q+gate", 5120, 12288), ("attn k/v", 5120, 1024), ("attn o / gdn out", 6144, 5120),
                    ("gdn qkv", 5120, 10240), ("gdn z", 5120, 6144), ("gate/up", 5120, 17408),
                    ("down", 17408, 5120)],
}
# How many times each shape occurs per layer (8B) or per 4 layers (27B: 1 full attention + 3 Gated DeltaNet).
COUNTS = {
    "qwen3-8b": {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate/up": 2, "down": 1},
    "qwen3.6-27b": {"attn q+gate": 1, "attn k/v": 2, "attn o / gdn out": 4, "gdn qkv": 3, "gdn z": 3, "gate/up": 8,
                    "down": 4},
}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def timed(fn, args, repeats: int, inner: int) -> float:
    """Median seconds of one call over `repeats` runs of `inner` back-to-back calls (after one warm call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / inner)
    return float(np.median(times))


def copy_bandwidth() -> float:
    x = jnp.ones((1 << (20 if INTERPRET else 31),), jnp.bfloat16)  # 4 GiB
    f = jax.jit(lambda a, s: a * s)
    sec = timed(f, (x, jnp.bfloat16(1.0)), 5, 5)
    return 2 * x.nbytes / sec / 1e9


def xla_q8(x, q, s):
    """XLA's own product on Q8_0 weights: the kernel's dequantization (f32 d * q rounded to bf16), then a bf16 dot."""
    k, n = q.shape
    w = (q.astype(jnp.float32).reshape(k // Q8_BLOCK, Q8_BLOCK, n) * s.astype(jnp.float32)[:, None, :])
    w = w.reshape(k, n).astype(x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


INTERPRET = os.environ.get("BENCH_INTERPRET") == "1"  # CPU dry run of this script (tiny --bytes, slow)
PROFILE = {"on": False}  # --profile: time by the GPU's busy time in a trace, not the wall clock
VARIANTS = {
    "xla_bf16": ("bf16", lambda x, w: jnp.einsum("mk,nk->mn", x, w)),
    "xla_q8_0": ("q8_0", xla_q8),
    "pallas_bf16": ("bf16", lambda x, w, cfg=None: matmul_pallas(x, w, config=cfg, interpret=INTERPRET)),
    "pallas_q8_0": ("q8_0", lambda x, q, s, cfg=None: q8_0_matmul_pallas(x, q, s, config=cfg,
                                                                           interpret=INTERPRET)),
    "mgpu_bf16": ("bf16", lambda x, w, cfg=None: matmul_mgpu(x, w, config=cfg, interpret=INTERPRET)),
    # two compute warpgroups and a memory warpgroup (BN 128) where N has 128-row tiles
    "mgpu_bf16_ws": ("bf16", lambda x, w, cfg=None: matmul_mgpu(x, w, config=cfg or pick_mgpu_config(
        x.shape[0], x.shape[1], w.shape[0], warpgroups=2 if w.shape[0] % 128 == 0 else 1), interpret=INTERPRET)),
    # Q8_0 with the weight laid out (N, K), as the Mosaic kernel takes it
    "mgpu_q8_0": ("q8_0_nk", lambda x, q, s, cfg=None: q8_0_matmul_mgpu(x, q, s, config=cfg, interpret=INTERPRET)),
    # the pre-scaled variant ($DFLASH_Q8_PRESCALE): bf16 weights' numerics, one accumulator
    "mgpu_q8_0p": ("q8_0_nk", lambda x, q, s, cfg=None: q8_0_matmul_mgpu(
        x, q, s, config=cfg or pick_q8_mgpu_config(x.shape[0], x.shape[1], q.shape[0], prescale=True),
        interpret=INTERPRET)),
}


def make_weights(fmt: str, k: int, n: int, copies: int, key):
    keys = jax.random.split(key, copies)
    if fmt == "bf16":
        gen = jax.jit(lambda kk: (jax.random.normal(kk, (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16))
        return [(gen(kk),) for kk in keys], 2 * k * n
    qshape = (n, k) if fmt == "q8_0_nk" else (k, n)
    gen = jax.jit(lambda kk: (jax.random.randint(kk, qshape, -127, 128, jnp.int32).astype(jnp.int8),
                              jax.random.uniform(kk, (k // Q8_BLOCK, n), jnp.float32, 1e-3, 3e-3).astype(jnp.float16)))
    return [gen(kk) for kk in keys], k * n + 2 * k * n // Q8_BLOCK


def bench_shape(variant: str, m: int, k: int, n: int, target_bytes: float, cfg: TileConfig | None = None):
    fmt, fn = VARIANTS[variant]
    per = 2 * k * n if fmt == "bf16" else k * n * (1 + 2 / Q8_BLOCK)
    copies = min(16, max(2, int(np.ceil(target_bytes / per))))  # 16 x the smallest (8 MB) is still 2.5x L2
    ws, wbytes = make_weights(fmt, k, n, copies, jax.random.PRNGKey(k * 7 + n))
    x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.float32).astype(jnp.bfloat16)
    call = (lambda xx, *w: fn(xx, *w, cfg=cfg)) if cfg is not None else fn
    f = jax.jit(lambda xx, wl: [call(xx, *w) for w in wl])
    if PROFILE["on"]:
        sec = gpu_busy(f, (x, ws), 3, "/tmp/weight_matmul_profile") / copies
    else:
        sec = timed(f, (x, ws), 3, 3) / copies
    moved = wbytes + 2 * m * (k + n)
    del ws
    return sec, moved


def check_kernels() -> dict[str, float]:
    """Max |pallas - reference| / std(reference) per kernel over a partial-tile shape: only checked kernels are
    timed. A kernel that fails to build counts as broken (inf), so the XLA baselines still run."""
    rng = np.random.default_rng(0)
    k, n = (256, 96) if INTERPRET else (4096, 1000)
    q = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    s = jnp.asarray(rng.uniform(1e-3, 3e-3, (k // Q8_BLOCK, n)), jnp.float16)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.bfloat16)
    errs = {"pallas_q8_0": 0.0, "pallas_bf16": 0.0, "mgpu_bf16": 0.0, "mgpu_bf16_ws": 0.0, "mgpu_q8_0": 0.0,
            "mgpu_q8_0p": 0.0}
    w_even = w[:n // 64 * 64]  # the Mosaic kernels take N % 64 == 0
    w_128 = jnp.asarray(rng.standard_normal((max(128, n // 128 * 128), k)) * 0.02, jnp.bfloat16)  # 128-row tiles
    q_nk, s_even = q[:, :n // 64 * 64].T, s[:, :n // 64 * 64]
    for m in (1, 16, 256):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        pairs = {"pallas_q8_0": (lambda: q8_0_matmul_pallas(x, q, s, interpret=INTERPRET),
                                 lambda: q8_0_matmul_reference(x, q, s)),
                 "pallas_bf16": (lambda: matmul_pallas(x, w, interpret=INTERPRET),
                                 lambda: jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32)),
                 "mgpu_bf16": (lambda: matmul_mgpu(x, w_even, interpret=INTERPRET),
                               lambda: jnp.einsum("mk,nk->mn", x, w_even, preferred_element_type=jnp.float32)),
                 "mgpu_bf16_ws": (lambda: VARIANTS["mgpu_bf16_ws"][1](x, w_128),
                                  lambda: jnp.einsum("mk,nk->mn", x, w_128, preferred_element_type=jnp.float32)),
                 "mgpu_q8_0": (lambda: q8_0_matmul_mgpu(x, q_nk, s_even, interpret=INTERPRET),
                               # exact Q8_0 weights (the kernel does not round them to bf16 as the reference does)
                               lambda: q8_0_matmul_reference(x.astype(jnp.float32), q_nk.T, s_even)),
                 "mgpu_q8_0p": (lambda: VARIANTS["mgpu_q8_0p"][1](x, q_nk, s_even),
                                lambda: q8_0_matmul_reference(x, q_nk.T, s_even))}
        for name, (fn, ref_fn) in pairs.items():
            try:
                got = np.asarray(fn().astype(jnp.float32))
            except Exception as e:  # report the build error, keep benchmarking the rest
                log(f"{name} M={m}: FAILED {type(e).__name__}: {e}"[:600])
                errs[name] = float("inf")
                continue
            ref = np.asarray(ref_fn().astype(jnp.float32))
            errs[name] = max(errs[name], float(np.max(np.abs(got - ref)) / np.std(ref)))
    return errs


def parse_config(text: str, m: int, k: int, n: int, quantized: bool) -> TileConfig:
    """'BNxBKxWARPSxSTAGES': those tiles, BM and splits as pick_config derives them."""
    bn, bk, nw, ns = (int(v) for v in text.split("x"))
    return pick_config(m, k, n, quantized, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-8b,qwen3.6-27b")
    ap.add_argument("--ms", default="1,8,16,64,128")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--bytes", type=float, default=0.75e9, help="weight bytes per timed call")
    ap.add_argument("--sweep", default="", help="'K:N:M[,..]' shapes to try --configs on (Pallas variants)")
    ap.add_argument("--configs-q8", default="", help="BNxBKxWARPSxSTAGES[,..] for --sweep, Q8_0 kernel")
    ap.add_argument("--configs-bf16", default="", help="BNxBKxWARPSxSTAGES[,..] for --sweep, bf16 kernel")
    ap.add_argument("--configs-mgpu", default="",
                    help="BNxBKxSPLITSxSTAGES[xWARPGROUPS][,..] for --sweep, Mosaic GPU kernel")
    ap.add_argument("--configs-mgpu-q8", default="",
                    help="BNxSPLITS[xSTAGES[xBLOCKS]][p][w][,..] for --sweep, Mosaic GPU Q8_0 kernel (p: pre-scaled, "
                         "w: 128-byte swizzled rows, needs 4 blocks per step)")
    ap.add_argument("--plan", default="", help="'MODEL:M,M:VARIANT,VARIANT;...' (overrides --models/--ms/--variants)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new measurements after this")
    ap.add_argument("--profile", action="store_true",
                    help="time each product by the GPU's busy time in a jax.profiler trace, not the wall clock (the "
                    "small products' wall clock is mostly launch overhead: session 25)")
    ap.add_argument("--out", default=None, help="JSONL results file")
    a = ap.parse_args(argv)
    PROFILE["on"] = a.profile
    dev = jax.devices()[0]
    log(f"jax {jax.__version__}, device {dev.device_kind} ({dev.platform}), {getattr(dev, 'core_count', '?')} SMs")
    out = open(a.out, "a") if a.out else None

    def emit(rec):
        rec |= {"card": dev.device_kind, "date": time.strftime("%Y-%m-%d"),
                "timing": "gpu busy" if a.profile else "wall clock"}
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()

    broken = set()
    for variant, err in check_kernels().items():
        log(f"check {variant}: max |pallas - reference| / std(reference) = {err:.2e} over M in 1, 16, 256")
        if not err < 2e-2:  # NaN too
            broken.add(variant)
            log(f"{variant} disagrees with its reference: not benchmarked")
    copy = copy_bandwidth()
    log(f"copy bandwidth {copy:.0f} GB/s (read + write)")
    emit({"kind": "copy", "gbps": copy})

    plans = [p.split(":") for p in a.plan.split(";") if p] if a.plan else [
        (model, a.ms, a.variants) for model in a.models.split(",") if model]
    for model, ms, variants in plans:
        variants = [v for v in variants.split(",") if v not in broken]
        for m in (int(v) for v in ms.split(",")):
            totals = {v: [0.0, 0.0] for v in variants}
            for name, k, n in SHAPES[model]:
                row = []
                for variant in variants:
                    if time.time() - T0 > a.budget_s:
                        log("budget reached; stopping")
                        return
                    sec, moved = bench_shape(variant, m, k, n, a.bytes)
                    gbps = moved / sec / 1e9
                    row.append(f"{variant} {sec * 1e6:7.1f} us {gbps:5.0f} GB/s {100 * gbps / copy:4.0f}%")
                    totals[variant][0] += COUNTS[model][name] * sec
                    totals[variant][1] += COUNTS[model][name] * moved
                    emit({"kind": "shape", "model": model, "shape": name, "k": k, "n": n, "m": m,
                          "variant": variant, "us": sec * 1e6, "gbps": gbps, "pct_copy": 100 * gbps / copy})
                log(f"{model} M={m:3d} {name:17s} K={k:5d} N={n:5d} | " + " | ".join(row))
            for variant, (sec, moved) in totals.items():
                gbps = moved / sec / 1e9
                log(f"{model} M={m:3d} LAYER {variant:12s} {sec * 1e3:7.3f} ms {gbps:5.0f} GB/s "
                    f"{100 * gbps / copy:4.0f}% of copy")
                emit({"kind": "layer", "model": model, "m": m, "variant": variant, "ms": sec * 1e3, "gbps": gbps,
                      "pct_copy": 100 * gbps / copy})

    if a.sweep:
        for item in a.sweep.split(","):
            k, n, m = (int(v) for v in item.split(":"))
            for variant, texts in (("pallas_q8_0", a.configs_q8), ("pallas_bf16", a.configs_bf16),
                                   ("mgpu_bf16", a.configs_mgpu), ("mgpu_q8_0", a.configs_mgpu_q8)):
                # a config ending in 'p' is the pre-scaled Q8_0 variant; 'auto' is the picker's exact one
                quantized = variant.endswith("q8_0")
                if not texts:
                    continue
                for text in ["auto"] + [c for c in texts.split(",") if c]:
                    if time.time() - T0 > a.budget_s:
                        return
                    try:
                        if variant == "mgpu_bf16":
                            cfg = (pick_mgpu_config(m, k, n) if text == "auto"
                                   else MgpuConfig(*(int(v) for v in text.split("x"))))
                        elif variant == "mgpu_q8_0":
                            parts = [int(v) for v in text.rstrip("pw").split("x")] if text != "auto" else []
                            # BNxSPLITS: the picker's stages and blocks per step for that tile and split count;
                            # suffix p: pre-scaled, w: 128-byte swizzled weight rows (4 blocks per step)
                            pre, wide = "p" in text, text.endswith("w")
                            cfg = (pick_q8_mgpu_config(m, k, n, block_n=parts[0], num_splits=parts[1],
                                                       prescale=pre) if len(parts) == 2
                                   else Q8MgpuConfig(*parts, prescale=pre) if parts
                                   else pick_q8_mgpu_config(m, k, n))
                            if parts:
                                cfg = dataclasses.replace(cfg, swizzle=128 if wide else 32)
                        else:
                            cfg = (pick_config(m, k, n, quantized) if text == "auto"
                                   else parse_config(text, m, k, n, quantized))
                    except ValueError as e:
                        log(f"sweep {variant} {text}: {e}")
                        continue
                    try:
                        sec, moved = bench_shape(variant, m, k, n, a.bytes, cfg)
                    except Exception as e:  # a config Triton cannot build: report it and go on with the sweep
                        log(f"sweep {variant} K={k} N={n} M={m} {text}: FAILED {type(e).__name__}: {e}"[:300])
                        continue
                    gbps = moved / sec / 1e9
                    log(f"sweep {variant:12s} K={k:5d} N={n:5d} M={m:3d} {text:14s} {cfg}  {sec * 1e6:8.1f} us  "
                        f"{gbps:6.0f} GB/s  {100 * gbps / copy:5.1f} %")
                    emit({"kind": "sweep", "variant": variant, "k": k, "n": n, "m": m, "config": text,
                          "tiles": list(dataclasses.astuple(cfg)), "us": sec * 1e6, "gbps": gbps})


if __name__ == "__main__":
    main()
