"""Batch-invariant kernels: a mode in which every row of a product and every query of an attention call comes out bit
for bit the same however many other rows share the launch (vLLM's VLLM_BATCH_INVARIANT, SGLang's deterministic
inference).

Why DFlash needs it in bf16: a verify step runs B rows per slot where plain decoding runs one, and XLA's products
(cuBLAS) pick tiles and split-K by the row count, so the same token's logits differ in the last bf16 bit between the
two, and a near tie flips (H100, session 5: 10 of 21 greedy outputs identical in bf16, 21 of 21 in f32).

In the mode the dispatchers (`weight_matmul.linear` / `q8_0_linear`, `ragged_paged_attention`) use the Pallas kernels
with tiles, K splits and key splits fixed by the weight or context shape alone, and sum split partials in a fixed
order. It is read when a step is traced; `jax.jit` caches must not be shared between the two modes (the engine's
steps are jitted per engine). Without the Pallas kernels compiled (CPU) the mode needs the kernels in interpret mode
($DFLASH_MATMUL_IMPL / $DFLASH_ATTENTION_IMPL = interpret): tests only.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import jax
import jax.numpy as jnp

_local = threading.local()


def env_flag(name: str) -> bool | None:
    """$name: 1/on/true or 0/off/false; None when unset (or auto)."""
    v = os.environ.get(name, "").strip().lower()
    return True if v in ("1", "true", "on") else False if v in ("0", "false", "off") else None


def env_setting() -> bool | None:
    """$DFLASH_BATCH_INVARIANT as `env_flag` reads it."""
    return env_flag("DFLASH_BATCH_INVARIANT")


def is_batch_invariant() -> bool:
    """The mode in force on this thread (set by `batch_invariant`), else $DFLASH_BATCH_INVARIANT."""
    on = getattr(_local, "on", None)
    return on if on is not None else bool(env_setting())


@contextlib.contextmanager
def _thread_setting(name: str, value):
    prev = getattr(_local, name, None)
    setattr(_local, name, value)
    try:
        yield
    finally:
        setattr(_local, name, prev)


def batch_invariant(on: bool = True):
    """Trace under the mode (or explicitly without it) on this thread."""
    return _thread_setting("on", on)


def prefill_tiles_enabled() -> bool:
    """In the mode, float products of prefill steps use `weight_matmul.prefill_config` unless
    $DFLASH_PREFILL_TILES=same (the decode tiles). On an H200 (Qwen3-8B shape, one 512-token chunk) that makes the
    invariant prefill 18.7 ms instead of 26.3 (mode off: 13.3)."""
    return os.environ.get("DFLASH_PREFILL_TILES", "large").strip().lower() != "same"


def in_prefill() -> bool:
    """Whether the step being traced on this thread is a prefill step (set by `prefill_phase`)."""
    return bool(getattr(_local, "prefill", False))


def prefill_phase(on: bool = True):
    """Trace a prefill step: its rows need to agree only with other prefill steps' rows (a prompt token is never
    decoded, and DFlash and plain decoding share the prefill), so its products may use tiles of their own, fixed
    by the weight's shape alone like the decode tiles."""
    return _thread_setting("prefill", on)


def q8_prescale(on: bool | None):
    """Trace with an engine-wide choice of Q8_0 numerics for its decode and verify rows (True: the pre-scaled
    variant, bf16 weights' numerics; False: the exact block products; None: `q8_0_matmul_mgpu.use_prescale`'s
    per-call rule). One choice per engine keeps a row's numerics independent of the step it lands in."""
    return _thread_setting("q8_prescale", on)


def q8_prescale_choice() -> bool | None:
    """The choice set by `q8_prescale` on this thread, None when unset."""
    return getattr(_local, "q8_prescale", None)


# Both sums are jitted: a 27B step has ~220 row sums of ~13 folds and ~250 split sums; as one call each they trace
# and lower once per shape instead of adding ~10K slices and adds to every step's program (the same ops once
# inlined, so the same bits).
@functools.partial(jax.jit, static_argnames="axis")
def ordered_sum(parts, axis: int = 0):
    """Sum along `axis` as a left-to-right chain of adds: one fixed order whatever the other dimensions are (a
    reduction's order is the compiler's choice and may change with the shape)."""

    n = parts.shape[axis]
    total = jnp.take(parts, 0, axis=axis)
    for i in range(1, n):
        total = total + jnp.take(parts, i, axis=axis)
    return total


@functools.partial(jax.jit, static_argnames="keepdims")
def fold_sum(x, keepdims: bool = False):
    """Sum over the last axis by folding it in halves (pairwise), as elementwise adds of slices: each row's order
    is fixed by its length alone. XLA's own reductions pick a strategy by the whole shape (on a CPU, 1 or 3 rows of
    576 sum in another order than 16), which made RMSNorm statistics differ between a decode and a verify step."""

    while x.shape[-1] > 1:
        d = x.shape[-1]
        h = d // 2
        y = x[..., :h] + x[..., h:2 * h]
        if d % 2:
            y = jnp.concatenate([y[..., :1] + x[..., 2 * h:], y[..., 1:]], axis=-1)
        x = y
    return x if keepdims else x[..., 0]


def row_sum(x, keepdims: bool = False):
    """Sum over the last axis: `fold_sum` in the batch-invariant mode, else XLA's reduction."""

    return fold_sum(x, keepdims) if is_batch_invariant() else jnp.sum(x, axis=-1, keepdims=keepdims)


def logsumexp(x):
    """log(sum(exp(x))) over the last axis, keepdims; the sum a `fold_sum` in the batch-invariant mode."""

    if not is_batch_invariant():
        return jax.nn.logsumexp(x, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    return m + jnp.log(fold_sum(jnp.exp(x - m), keepdims=True))


def log_softmax(x):
    """log-softmax over the last axis whose normalizer is a `row_sum` (the max is exact in any order)."""

    if not is_batch_invariant():
        return jax.nn.log_softmax(x, axis=-1)
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    return shifted - jnp.log(fold_sum(jnp.exp(shifted), keepdims=True))
