"""Does a verified block give the same logits as decoding its tokens one per step, bit for bit? And what does the
batch-invariant mode (pallas_kernels/invariance.py) cost per step? One run compares the mode off and on.

    python bench/batch_invariance.py [-m MODEL.gguf | --preset smollm2-135m] [--dtype bfloat16] [--slots 1,8]

For each mode and slot count B: prefill B random prompts, verify a 16-token block for every slot in one step, then
decode the same tokens one per step (all B slots each step); count verify rows whose logits differ from their decode
step in any bit, and the largest difference. Then time one decode step and one 16-token verify step (median of 20).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.checkpoint import load_model
from converters.synthetic import PRESETS, write_random_gguf
from dflash_jax.kv_cache import AttentionMeta
from dflash_jax.state_pool import make_cache
from pallas_kernels.invariance import batch_invariant

BLOCK = 16


def make_forward(graphdef, invariant: bool, taps: tuple[int, ...] = ()):
    @jax.jit
    def forward(state, tokens, meta, cache):
        with batch_invariant(invariant):
            m = nnx.merge(graphdef, state)
            hidden, cache, feats = m(tokens, meta, cache, taps)
            if taps:
                return jnp.concatenate([feats, hidden], axis=-1), cache
            return m.logits(hidden), cache
    return forward


def ops_check() -> None:
    """Row-count invariance of the XLA-side reductions the model runs: RMSNorm statistics over D, log-softmax over V."""
    rng = np.random.default_rng(0)
    for name, d, fn in [("rmsnorm D=576", 576, lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True))),
                        ("rmsnorm D=4096", 4096, lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True))),
                        ("log_softmax V=49152", 49152, lambda x: jax.nn.log_softmax(x, -1))]:
        x = jnp.asarray(rng.standard_normal((256, d)), jnp.float32)
        f = jax.jit(fn)
        full = np.asarray(f(x))
        out = []
        for m in (1, 3, 16, 48, 128):
            out.append(f"M={m}: {int((np.asarray(f(x[:m])) != full[:m]).any(-1).sum())} rows differ")
        print(f"{name}: " + ", ".join(out), flush=True)


def layers_check(model, slots: int, invariant: bool, dtype) -> None:
    """The first layer whose residual stream differs between a verify row and its decode step."""
    n = model.cfg.num_layers
    r = run(model, slots, invariant, dtype, taps=tuple(range(n)), timing=False)
    print(f"slots {slots} invariant {invariant}: rows differing after each layer (last = final norm): "
          f"{r['per_layer']}", flush=True)


def timed(fn, *args, reps: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(model, slots: int, invariant: bool, dtype, seed: int = 0, taps: tuple[int, ...] = (),
        timing: bool = True) -> dict:
    graphdef, state = nnx.split(model)
    fwd = make_forward(graphdef, invariant, taps)
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    page_size, pages = 16, 16
    lens = rng.integers(40, 180, slots).astype(np.int32)
    table = jnp.asarray(1 + np.arange(slots * pages, dtype=np.int32).reshape(slots, pages))
    cache = make_cache(cfg, 1 + slots * pages, page_size, slots, dtype)
    prompt = rng.integers(3, cfg.vocab_size - 1, (slots, 192)).astype(np.int32)
    _, cache = fwd(state, jnp.asarray(prompt), AttentionMeta(jnp.asarray(lens), jnp.asarray(lens), table), cache)
    block = rng.integers(3, cfg.vocab_size - 1, (slots, BLOCK)).astype(np.int32)
    vmeta = AttentionMeta(jnp.full((slots,), BLOCK, jnp.int32), jnp.asarray(lens + BLOCK), table)
    verify, _ = fwd(state, jnp.asarray(block), vmeta, cache)
    verify = np.asarray(verify.astype(jnp.float32))
    rows_differ, max_diff = 0, 0.0
    d = model.cfg.hidden_size
    per_layer = np.zeros(verify.shape[-1] // d if taps else 1, np.int64)
    dcache = cache
    for j in range(BLOCK):
        dmeta = AttentionMeta(jnp.ones((slots,), jnp.int32), jnp.asarray(lens + j + 1), table)
        step, dcache = fwd(state, jnp.asarray(block[:, j:j + 1]), dmeta, dcache)
        step = np.asarray(step.astype(jnp.float32))[:, 0]
        differ = (step != verify[:, j]).any(axis=-1)
        if taps:
            per_layer += (step.reshape(slots, -1, d) != verify[:, j].reshape(slots, -1, d)).any(-1).sum(0)
        rows_differ += int(differ.sum())
        max_diff = max(max_diff, float(np.abs(step - verify[:, j]).max()))
    if not timing:
        return {"per_layer": per_layer.tolist()}
    dmeta = AttentionMeta(jnp.ones((slots,), jnp.int32), jnp.asarray(lens + 1), table)
    decode_ms = timed(lambda: fwd(state, jnp.asarray(block[:, :1]), dmeta, cache)[0])
    verify_ms = timed(lambda: fwd(state, jnp.asarray(block), vmeta, cache)[0])
    return {"slots": slots, "invariant": invariant, "rows_differ": f"{rows_differ}/{slots * BLOCK}",
            "max_logit_diff": max_diff, "decode_ms": round(decode_ms, 3), "verify_ms": round(verify_ms, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--preset", default="smollm2-135m", help="random-weight model when no -m")
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary of the random-weight model")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--slots", default="1,8")
    ap.add_argument("--diagnose", action="store_true",
                    help="also: row invariance of XLA's reductions, and the first layer where rows differ")
    a = ap.parse_args()
    dtype = jnp.dtype(a.dtype)
    path = a.model
    if path is None:
        path = tempfile.mktemp(suffix=".gguf")
        write_random_gguf(path, dataclasses.replace(PRESETS[a.preset], vocab_size=a.vocab), None, seed=0)
    model = load_model(path, dtype).model
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}; model {a.model or a.preset}; dtype {a.dtype}")
    if a.diagnose:
        ops_check()
        for slots in map(int, a.slots.split(",")):
            layers_check(model, slots, True, dtype)
    print("| slots | invariant | verify rows != decode | max logit diff | decode step ms | verify step ms |")
    print("|---|---|---|---|---|---|")
    for slots in map(int, a.slots.split(",")):
        for invariant in (False, True):
            r = run(model, slots, invariant, dtype)
            print(f"| {r['slots']} | {'on' if invariant else 'off'} | {r['rows_differ']} | {r['max_logit_diff']:.3g} |"
                  f" {r['decode_ms']} | {r['verify_ms']} |", flush=True)


if __name__ == "__main__":
    main()
