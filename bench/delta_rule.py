"""The gated delta rule of the hybrid `qwen35` targets alone (issue 7): the Pallas kernel
(`gated_delta_net.pool_recurrent_pallas`) at several value tiles and warp counts against XLA's scan, in the three
ways a step calls it — decode (1 token, state written and outputs emitted), verify (16 tokens, outputs only) and the
commit's replay (16 tokens, state only) — plus the chunked (WY) form that prefill chunks use.

On an H200 in session 10, one 27B 8-slot DFlash step spent 13.7 ms in 48 verify calls and 7.6 ms in 48 replays
(285 and 158 us per call) against 0.6 ms of attention: the per-call times here say which tiles to pick.
The state traffic per call (read, and written back when the state is written) is reported beside the time as the
floor a bandwidth-bound kernel would reach.

    python bench/delta_rule.py --slots 1,8 --configs 32x4,32x4p,32x4u,32x4o,32x4uo,16x2,16x2u,64x4,128x8
    python bench/delta_rule.py --slots 1 --heads 4 --dim 32 --configs 32x4 --interpret    # CPU smoke test
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

from bench.decode_step import time_loop  # noqa: E402
from pallas_kernels import gated_delta_net as gdn  # noqa: E402

T0 = time.monotonic()
SCHEDULES = {"p": "prefetch", "u": "unroll"}  # config suffix -> pool_recurrent_pallas(schedule=)
CALLS = {"decode": (1, True, True), "verify": (16, False, True), "replay": (16, True, False)}  # tokens, write, emit


def log(*a):
    print(f"[{time.monotonic() - T0:7.1f}s]", *a, flush=True)


def inputs(b: int, t: int, h: int, d: int, seed: int):
    """Delta-rule inputs as the model makes them: l2-normed q (scaled) and k, decays g < 0, beta in (0, 1), f32."""
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, t, h, d), jnp.float32)
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True) * d ** -0.5
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, h, d), jnp.float32)
    g = -0.1 * jnp.abs(jax.random.normal(ks[3], (b, t, h), jnp.float32))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h), jnp.float32))
    return q, k, v, g, beta


def time_call(fn, pool, args, iters: int) -> float:
    """Median us per call of fn(pool, *args) -> (pool, out), the pool fed back (donated) as the engine does."""
    held = {"pool": pool}

    def step():
        held["pool"], _ = fn(held["pool"], *args)
        return held["pool"]
    return time_loop(step, 1, iters)[0] * 1e3


def config_kwargs(text: str) -> dict:
    """'16x2us' -> pool_recurrent_pallas keyword arguments."""
    base = text.rstrip("puos")
    bv, nw = (int(v) for v in base.split("x"))
    flags = text[len(base):]
    return {"block_v": bv, "num_warps": nw, "one_pass": "o" in flags,
            "schedule": next((SCHEDULES[f] for f in flags if f in SCHEDULES), "loop"),
            "min_token_block": 1 if "s" in flags else gdn.MIN_TOKEN_BLOCK}


def check_bits(text: str, b: int, h: int, d: int, interpret: bool) -> bool:
    """What the engine's batch-invariant mode needs of a tile: a verify call's outputs and a replay's state in the
    bits of the same tokens decoded one at a time."""
    kw = config_kwargs(text) | {"interpret": interpret}
    run = jax.jit(lambda p, r, f, *x: gdn.pool_recurrent_pallas(p, r, f, *x, **kw))
    xs = inputs(b, 16, h, d, seed=5)
    rows, fresh = jnp.arange(b, dtype=jnp.int32), jnp.zeros((b,), jnp.int32)
    pool = jax.random.normal(jax.random.key(b), (b, h, d, d), jnp.float32) * 0.1
    s_all, o_all = run(pool, rows, fresh, *xs)
    p, outs = pool, []
    for i in range(16):
        p, o = run(p, rows, fresh, *(a[:, i:i + 1] for a in xs))
        outs.append(o)
    return bool(np.array_equal(np.asarray(o_all), np.asarray(jnp.concatenate(outs, axis=1)))
                and np.array_equal(np.asarray(s_all), np.asarray(p)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", default="1,8")
    ap.add_argument("--heads", type=int, default=48, help="value heads (Qwen3.6-27B: 48)")
    ap.add_argument("--dim", type=int, default=128, help="key = value head dim (Qwen3.6-27B: 128)")
    ap.add_argument("--calls", default="decode,verify,replay")
    ap.add_argument("--configs", default="32x4,32x4p,32x4u,32x4o,32x4uo",
                    help="BVxWARPS[p|u][o][s][,..] for the kernel; p: prefetch the next token's inputs, u: unrolled "
                         "tokens, o: one-pass reductions, s: one-token calls in one-token blocks")
    ap.add_argument("--bits", action="store_true",
                    help="per config, first check that a 16-token call has the bits of 16 one-token calls")
    ap.add_argument("--prefill", default="256", help="prompt chunk lengths for the chunked form ('' to skip)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = jax.devices()[0]
    log(f"jax {jax.__version__}, {dev.device_kind}; {a.heads} heads x {a.dim}")
    h, d = a.heads, a.dim
    rows = []

    def emit(rec):
        rec |= {"device": dev.device_kind, "heads": h, "dim": d, "date": time.strftime("%Y-%m-%d")}
        rows.append(rec)

    if a.bits:
        for text in (c for c in a.configs.split(",") if c):
            ok = check_bits(text, 8, h, d, a.interpret)
            log(f"bits {text}: a 16-token call {'equals' if ok else 'DIFFERS from'} 16 one-token calls")
            emit({"kind": "bits", "variant": f"pallas {text}", "equal": ok})
    for b in (int(s) for s in a.slots.split(",")):
        state_bytes = b * h * d * d * 4
        rows_idx = jnp.arange(1, b + 1, dtype=jnp.int32)  # row 0 is the engine's padding row
        fresh = jnp.zeros((b,), bool)
        for call in a.calls.split(","):
            t, write, emit_out = CALLS[call]
            args = (rows_idx, fresh, *inputs(b, t, h, d, seed=b * 31 + t))
            floor_us = state_bytes * (2 if write else 1) / 4.8e12 * 1e6
            variants = {"xla": jax.jit(lambda p, *x, w=write, e=emit_out: gdn.pool_recurrent_reference(
                p, *x, write=w, emit=e), donate_argnums=0)}
            for text in (c for c in a.configs.split(",") if c):
                kw = config_kwargs(text)
                if d % kw["block_v"]:
                    continue
                variants[f"pallas {text}"] = jax.jit(lambda p, *x, w=write, e=emit_out, kw=kw:
                                                     gdn.pool_recurrent_pallas(p, *x, write=w, emit=e,
                                                                               interpret=a.interpret, **kw),
                                                     donate_argnums=0)
            ref_out = None
            for name, fn in variants.items():
                pool = jax.random.normal(jax.random.key(b), (b + 1, h, d, d), jnp.float32) * 0.1
                try:
                    new_pool, out = fn(jnp.copy(pool), *args)
                    got = np.asarray(out if emit_out else new_pool[1:])
                    ref_out = got if ref_out is None else ref_out
                    err = float(np.max(np.abs(got - ref_out)))
                    us = time_call(fn, pool, args, a.iters)
                except Exception as e:  # a tile Triton cannot build: report it, go on
                    log(f"B={b} {call} {name}: FAILED {type(e).__name__}: {e}"[:300])
                    continue
                log(f"B={b:2d} {call:6s} T={t:2d} {name:14s} {us:9.1f} us  ({us / t:7.1f} us/token; state floor "
                    f"{floor_us:6.1f} us)  max|diff vs xla| {err:.1e}")
                emit({"kind": call, "B": b, "T": t, "variant": name, "us": us, "floor_us": floor_us, "err": err})
        for t in (int(s) for s in a.prefill.split(",") if s):
            q, k, v, g, beta = inputs(b, t, h, d, seed=t)
            s0 = jnp.zeros((b, h, d, d), jnp.float32)
            fn = jax.jit(gdn.chunked)
            us = time_call(fn, s0, (q, k, v, g, beta), max(1, a.iters // 4))
            log(f"B={b:2d} prefill T={t:4d} chunked (XLA) {us:9.1f} us  ({us / t:7.2f} us/token)")
            emit({"kind": "prefill", "B": b, "T": t, "variant": "chunked_xla", "us": us})
            kern = jax.jit(lambda s, *x: gdn.recurrent_pallas(s, *x, interpret=a.interpret))  # token by token
            us = time_call(kern, s0, (q, k, v, g, beta), max(1, a.iters // 4))
            log(f"B={b:2d} prefill T={t:4d} recurrent kernel {us:9.1f} us  ({us / t:7.2f} us/token)")
            emit({"kind": "prefill", "B": b, "T": t, "variant": "recurrent_pallas", "us": us})
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
