"""Achieved HBM bandwidth of ragged paged attention: the Pallas kernel (pallas_kernels/ragged_paged_attention.py)
against the XLA reference (`paged_attention_reference` under jit), for decode (q_len 1) and verify (q_len 16).

Shapes: Qwen3-8B attention (32 query heads, 8 KV heads, head dim 128; override with --heads/--kv-heads/--head-dim),
bf16, 16-token pages shuffled across the pool, every slot full to `ctx` keys. Bytes per call = K and V of the
attended keys (B * ctx * K * H * 2 * 2) + q + output; bandwidth = bytes / time. Time: `--iters` calls dispatched
back to back, synchronised once (the device time per call), best of `--reps`. The copy bandwidth (x * 1 over a
2 GiB bf16 array, bytes read + written) is measured in the same process for the roofline.

    python bench/attention.py                                  # 8/32 slots x 4K/32K x q_len 1/16
    python bench/attention.py --slots 8 --ctx 131072 --no-ref  # kernel only
    python bench/attention.py --slots 2 --ctx 256 --iters 2 --interpret   # CPU smoke test (interpret mode)
    python bench/attention.py --slots 8,1 --ctx 512 --layers 36 --no-ref  # short contexts, as a step runs them

Short contexts: one call takes ~10 us on the GPU but ~60 us to dispatch from Python, so `--layers L` times L calls
on L different K/V pools inside one jitted function (a step's layers), reported per call. Even so, at 512 keys the
wall-clock times did not rank tiles (H200, session 24: 14-30 us a call in no order between repeats, against 4.8 us
and 14.3 us a call in a step's profile), so `--profile` reports the GPU's busy time instead (jax.profiler: the
union of kernel intervals, the kernel's partial merges included), per call:

    python bench/attention.py --slots 8,1 --ctx 512 --layers 36 --no-ref --profile
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

from dflash_jax.profiling import gpu_busy  # noqa: E402
from pallas_kernels.paged_attention import paged_attention_reference  # noqa: E402
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_pallas  # noqa: E402
from pallas_kernels.ragged_paged_attention_mgpu import (  # noqa: E402
    pick_tiles,
    ragged_paged_attention_mgpu,
    supports_mgpu,
)


def timeit(fn, args, iters, reps):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def copy_bandwidth(iters):
    x = jnp.ones((1 << 30,), jnp.bfloat16)  # 2 GiB
    f = jax.jit(lambda a: a * jnp.bfloat16(1))
    t = timeit(f, (x,), iters, 3)
    del x
    return 2 * 2 * (1 << 30) / t


def make_inputs(key, b, t, n, k, h, ctx, page_size):
    pages_per_slot = -(-ctx // page_size)
    num_pages = b * pages_per_slot
    kq, kk, kv, kp = jax.random.split(key, 4)
    k_pages = jax.random.normal(kk, (num_pages, page_size, k, h), jnp.bfloat16)
    v_pages = jax.random.normal(kv, (num_pages, page_size, k, h), jnp.bfloat16)
    page_table = jax.random.permutation(kp, num_pages).reshape(b, pages_per_slot).astype(jnp.int32)
    q = jax.random.normal(kq, (b, t, n, h), jnp.bfloat16)
    q_lens = jnp.full((b,), t, jnp.int32)
    kv_lens = jnp.full((b,), ctx, jnp.int32)
    return q, k_pages, v_pages, page_table, q_lens, kv_lens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", default="8,32")
    ap.add_argument("--ctx", default="4096,32768")
    ap.add_argument("--qlens", default="1,16")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--splits", default="", help="extra num_splits values to time for the kernel, e.g. 4,8,16")
    ap.add_argument("--tune", default="",
                    help="kernel variants to time, ';'-separated 'block_k,num_warps,num_stages,num_splits' (0 = default)")
    ap.add_argument("--mgpu", default="",
                    help="Mosaic GPU kernel variants, ';'-separated 'pages_per_step,stages,num_splits[,s|g|a]' "
                         "(0 = default; page table in shared memory / global memory (default) / shared when it "
                         "fits), e.g. '0,0,0,g;0,0,0,s' (decode/verify runs only; Hopper)")
    ap.add_argument("--no-ref", action="store_true", help="skip the XLA reference")
    ap.add_argument("--ref-max-bytes", type=float, default=6e9,
                    help="skip the reference where its gathered K/V copy would exceed this many bytes")
    ap.add_argument("--layers", type=int, default=1,
                    help="calls per jitted function, each on its own K/V pages (short contexts are dispatch-bound)")
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="time by the GPU's busy time in a jax.profiler trace (per call), not by the wall clock")
    ap.add_argument("--out", default="")
    a = ap.parse_args()

    dev = jax.devices()[0]
    card = getattr(dev, "device_kind", dev.platform)
    print(f"device: {card} ({dev.platform}), jax {jax.__version__}", flush=True)
    copy_bw = None if a.interpret else copy_bandwidth(a.iters)
    if copy_bw:
        print(f"copy bandwidth (read+write): {copy_bw / 1e12:.2f} TB/s", flush=True)

    ref_fn = jax.jit(paged_attention_reference)
    rows = []
    print("| slots | ctx | q_len | impl | time (us) | GB moved | TB/s | % of copy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for b in [int(x) for x in a.slots.split(",")]:
        for ctx in [int(x) for x in a.ctx.split(",")]:
            for t in [int(x) for x in a.qlens.split(",")]:
                args = make_inputs(jax.random.key(0), b, t, a.heads, a.kv_heads, a.head_dim, ctx, a.page_size)
                if a.layers > 1:  # (q, [k_pages], [v_pages], table, q_lens, kv_lens): one pool per layer
                    pools = [make_inputs(jax.random.key(i), b, t, a.heads, a.kv_heads, a.head_dim, ctx,
                                         a.page_size)[1:3] for i in range(a.layers)]
                    args = (args[0], [p[0] for p in pools], [p[1] for p in pools], *args[3:])
                nbytes = (b * ctx * a.kv_heads * a.head_dim * 2 * 2 + 2 * b * t * a.heads * a.head_dim * 2)
                impls = [("pallas", None)] + [(f"pallas splits={s}", int(s)) for s in a.splits.split(",") if s]
                for v in [v for v in a.tune.split(";") if v]:
                    bk, nw, ns, sp = (int(x) or None for x in v.split(","))
                    impls.append((f"pallas bk={bk} warps={nw} stages={ns} splits={sp}",
                                  dict(block_k=bk, num_warps=nw, num_stages=ns, num_splits=sp)))
                if supports_mgpu(t, a.heads, a.kv_heads, a.head_dim, a.page_size, jnp.bfloat16):
                    for v in [v for v in a.mgpu.split(";") if v]:
                        fields = v.split(",")
                        pps, st, sp = (int(x) or None for x in fields[:3])
                        table = {"s": True, "g": False, "a": None}[fields[3] if len(fields) > 3 else "g"]
                        auto_pps, auto_st = pick_tiles(a.head_dim, a.page_size)
                        label = {True: "smem", False: "gmem", None: "auto"}[table]
                        impls.append((f"mgpu pages/step={pps or auto_pps} stages={st or auto_st} "
                                      f"splits={sp or 'auto'} table={label}",
                                      ("mgpu", dict(pages_per_step=pps, stages=st, num_splits=sp,
                                                    table_in_smem=table))))
                gather_bytes = b * ctx * a.kv_heads * a.head_dim * 2 * 2
                if not a.no_ref and gather_bytes <= a.ref_max_bytes:
                    impls.append(("xla reference", "ref"))
                for name, opt in impls:
                    if opt == "ref":
                        fn = ref_fn
                    elif isinstance(opt, tuple):
                        fn = jax.jit(lambda *xs, _o=opt[1]: ragged_paged_attention_mgpu(
                            *xs, interpret=a.interpret, **_o))
                    elif isinstance(opt, dict):
                        fn = jax.jit(lambda *xs, _o=opt: ragged_paged_attention_pallas(
                            *xs, interpret=a.interpret, **_o))
                    else:
                        fn = jax.jit(lambda *xs, _s=opt: ragged_paged_attention_pallas(
                            *xs, num_splits=_s, interpret=a.interpret))
                    if a.layers > 1:
                        fn = jax.jit(lambda q, kps, vps, *rest, _f=fn: [_f(q, kp, vp, *rest)
                                                                        for kp, vp in zip(kps, vps)])
                    try:
                        dt = (gpu_busy(fn, args, a.iters, "/tmp/attention_bench_profile") if a.profile
                              else timeit(fn, args, a.iters, a.reps)) / a.layers
                    except Exception as e:  # noqa: BLE001  (report and go on: an OOM in the reference, say)
                        print(f"| {b} | {ctx} | {t} | {name} | failed: {type(e).__name__}: {str(e)[:200]} |",
                              flush=True)
                        continue
                    bw = nbytes / dt
                    pct = f"{100 * bw / copy_bw:.0f} %" if copy_bw else "-"
                    print(f"| {b} | {ctx} | {t} | {name} | {dt * 1e6:.1f} | {nbytes / 1e9:.3f} | "
                          f"{bw / 1e12:.2f} | {pct} |", flush=True)
                    rows.append(dict(card=card, slots=b, ctx=ctx, q_len=t, impl=name, seconds=dt, bytes=nbytes,
                                     tb_s=bw / 1e12, copy_tb_s=(copy_bw or 0) / 1e12))
                del args
    if a.out:
        with open(a.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
