"""Tile / variant search for the Q8_0 weight-streaming kernel (pallas_kernels/weight_matmul.py), timed side by side
with XLA's bf16 product and the default (v2, kernel="wscale") kernel in one process, against the copy bandwidth measured there.

Each point (K, N, M) times every listed config: a config is 'BM.BN.BK.DB.WARPS.STAGES.SPLITS.CONVERT.SWAP[.KERNEL]'
('-' keeps pick_config's value; CONVERT asm|cast; SWAP 0|1; KERNEL mma|fma|wscale). Every config is checked against the f32 reference on
the same data before it is timed (max error beyond bf16 output rounding < 2e-2 std(ref), else reported and
skipped).

    python3 bench/q8_experiments.py --points "4096:4096:1=auto,-.64.-.-.-.-.-.-.-;..." --out r.jsonl
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

from bench.weight_matmul import copy_bandwidth, make_weights, timed  # noqa: E402
from pallas_kernels.weight_matmul import Q8_BLOCK, matmul_pallas, pick_config, q8_0_matmul_pallas, q8_0_matmul_reference  # noqa: E402

T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def parse(text, m, k, n):
    if text == "auto":
        return pick_config(m, k, n, True)
    f = text.split(".")
    g = lambda i: None if f[i] == "-" else int(f[i])  # noqa: E731
    return pick_config(m, k, n, True, block_m=g(0), block_n=g(1), block_k=g(2), dot_blocks=g(3), num_warps=g(4),
                       num_stages=g(5), num_splits=g(6), convert="asm" if f[7] == "-" else f[7],
                       swap=f[8] == "1", kernel=f[9] if len(f) > 9 else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", required=True, help="'K:N:M=cfg,cfg;...'")
    ap.add_argument("--bytes", type=float, default=3e8)
    ap.add_argument("--baselines", default="xla_bf16,v2")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = jax.devices()[0]
    log(f"jax {jax.__version__}, {dev.device_kind}, {getattr(dev, 'core_count', '?')} SMs")
    out = open(a.out, "a") if a.out else None

    def emit(rec):
        if out:
            out.write(json.dumps(rec | {"card": dev.device_kind}) + "\n")
            out.flush()

    copy = copy_bandwidth()
    log(f"copy bandwidth (XLA x*s, read+write) {copy:.0f} GB/s")
    emit({"kind": "copy", "gbps": copy})
    v2 = "v2" in a.baselines  # the default kernel ('wscale', v2's scheme and tiles)
    rng = np.random.default_rng(0)
    for point in a.points.split(";"):
        if not point:
            continue
        shape, cfgs = point.split("=")
        k, n, m = (int(v) for v in shape.split(":"))
        per = k * n * (1 + 2 / Q8_BLOCK)
        copies = min(16, max(2, int(np.ceil(a.bytes / per))))
        ws, wbytes = make_weights("q8_0", k, n, copies, jax.random.PRNGKey(k * 7 + n))
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        moved = wbytes + 2 * m * (k + n)
        ref = np.asarray(q8_0_matmul_reference(x, *ws[0]).astype(jnp.float32))
        sd = float(np.std(ref))
        res = {}

        def run(label, fn, check=True):
            if time.time() - T0 > a.budget_s:
                return
            try:
                if check:
                    got = np.asarray(fn(x, *ws[0]).astype(jnp.float32))
                    # beyond the bf16 output's own rounding (half an ulp, 2^-8 relative): a large M x N reaches
                    # 2.5 % of std from rounding alone, which is not a wrong kernel
                    err = float(np.max(np.abs(got - ref) - 2.0 ** -8 * np.abs(ref)) / sd)
                    if not err < 2e-2:
                        log(f"K={k} N={n} M={m} {label}: WRONG err {err:.3e}")
                        emit({"kind": "wrong", "k": k, "n": n, "m": m, "label": label, "err": err})
                        return
                else:
                    err = float("nan")
                f = jax.jit(lambda xx, wl: [fn(xx, *w) for w in wl])
                sec = timed(f, (x, ws), 3, 3) / copies
            except Exception as e:  # noqa: BLE001
                log(f"K={k} N={n} M={m} {label}: FAILED {type(e).__name__}: {str(e)[:400]}")
                return
            gbps = moved / sec / 1e9
            res[label] = sec
            log(f"K={k:5d} N={n:5d} M={m:3d} {label:40s} {sec * 1e6:7.1f} us {gbps:5.0f} GB/s {100 * gbps / copy:5.1f} %"
                f"  err {err:.1e}")
            emit({"kind": "point", "k": k, "n": n, "m": m, "label": label, "us": sec * 1e6, "gbps": gbps,
                  "pct_copy": 100 * gbps / copy, "err": err})

        if "xla_bf16" in a.baselines:
            wb, bbytes = make_weights("bf16", k, n, copies, jax.random.PRNGKey(1))
            fb = jax.jit(lambda xx, wl: [jnp.einsum("mk,nk->mn", xx, w[0]) for w in wl])
            sec = timed(fb, (x, wb), 3, 3) / copies
            gbps = (bbytes + 2 * m * (k + n)) / sec / 1e9
            log(f"K={k:5d} N={n:5d} M={m:3d} {'xla_bf16':40s} {sec * 1e6:7.1f} us {gbps:5.0f} GB/s "
                f"{100 * gbps / copy:5.1f} % (bf16 bytes)")
            emit({"kind": "point", "k": k, "n": n, "m": m, "label": "xla_bf16", "us": sec * 1e6, "gbps": gbps,
                  "pct_copy": 100 * gbps / copy})
            if "pallas_bf16" in a.baselines:
                fpb = jax.jit(lambda xx, wl: [matmul_pallas(xx, w[0]) for w in wl])
                sec = timed(fpb, (x, wb), 3, 3) / copies
                gbps = (bbytes + 2 * m * (k + n)) / sec / 1e9
                log(f"K={k:5d} N={n:5d} M={m:3d} {'pallas_bf16':40s} {sec * 1e6:7.1f} us {gbps:5.0f} GB/s "
                    f"{100 * gbps / copy:5.1f} % (bf16 bytes)")
                emit({"kind": "point", "k": k, "n": n, "m": m, "label": "pallas_bf16", "us": sec * 1e6,
                      "gbps": gbps, "pct_copy": 100 * gbps / copy})
            del wb
        if v2:
            v2cfg = pick_config(m, k, n, True, kernel="wscale")
            run("v2", lambda xx, q, s: q8_0_matmul_pallas(xx, q, s, config=v2cfg), check=False)
        for text in cfgs.split(","):
            cfg = parse(text, m, k, n)
            run(f"{text}", lambda xx, q, s, cfg=cfg: q8_0_matmul_pallas(xx, q, s, config=cfg))
        if any(kk != "v2" for kk in res):
            best = min((v, kk) for kk, v in res.items() if kk != "v2")
            log(f"K={k:5d} N={n:5d} M={m:3d} BEST {best[1]} {best[0] * 1e6:.1f} us "
                f"{moved / best[0] / 1e9 / copy * 100:.1f} %  cfg {parse(best[1], m, k, n)}")
        del ws


if __name__ == "__main__":
    main()
