"""Residual add and RMSNorm in one pass: s = x + a (in x's dtype), y = s / rms(s) * weight.

At decode every layer has two residual adds, each followed by a norm of its sum, and XLA runs each site as two or
three ~1.5 us kernels (the add; the norm's reduction and its scaling, split where the row is a single token): with
the gaps between them ~0.6 ms of a 5 ms Qwen3-8B step on an H200 (20 kernels per layer at one slot,
bench/notes_gpu.md session 18); in the batch-invariant mode the norm's fixed-order sum adds more. The kernel reads
x and a once and writes both outputs, one program per row: each row's statistics are summed in a fixed order
whatever the row count, which is what the batch-invariant mode needs (`use_kernel` says where it runs).

`add_rms_norm_reference` defines the semantics (`x + a` then `rms_norm_reference`, which `dense.rms_norm` jits
and `dense.RMSNorm.add` runs where the kernel is not used); the kernel is checked against it on fresh random inputs
(tests/test_add_rms_norm.py). The kernel needs a power-of-two width (Triton blocks).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.invariance import env_flag, fold_sum, is_batch_invariant


def rms_norm_reference(x: jax.Array, weight: jax.Array, eps: float, invariant: bool = False) -> jax.Array:
    """x / rms(x) * weight with the statistics in f32 whatever the storage dtype, as llama.cpp does; in the
    batch-invariant mode summed in a fixed order (`fold_sum`)."""
    xf = x.astype(jnp.float32)
    if invariant:
        ms = fold_sum(xf * xf, keepdims=True) / x.shape[-1]
    else:
        ms = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(ms + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def add_rms_norm_reference(x: jax.Array, a: jax.Array, weight: jax.Array, eps: float,
                           invariant: bool = False) -> tuple[jax.Array, jax.Array]:
    """(x + a, rms_norm(x + a)), the sum in x.dtype."""
    s = x + a.astype(x.dtype)
    return s, rms_norm_reference(s, weight, eps, invariant)


def _kernel(x_ref, a_ref, w_ref, s_ref, y_ref, *, eps: float):
    s = (x_ref[...].astype(jnp.float32) + a_ref[...].astype(jnp.float32)).astype(s_ref.dtype)
    s_ref[...] = s
    sf = s.astype(jnp.float32)
    ms = jnp.sum(sf * sf, axis=-1, keepdims=True) / sf.shape[-1]
    y_ref[...] = (sf * jax.lax.rsqrt(ms + eps) * w_ref[...].astype(jnp.float32)).astype(y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_rms_norm_pallas(x: jax.Array, a: jax.Array, weight: jax.Array, eps: float,
                        interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The kernel on x, a (..., D) and weight (D,): one program per row."""
    shape, d = x.shape, x.shape[-1]
    rows = x.reshape(-1, d)
    m = rows.shape[0]
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415  (GPU only)
        compiler_params = pl_triton.CompilerParams(num_warps=4 if d <= 4096 else 8, num_stages=1)
    row = pl.BlockSpec((1, d), lambda i: (i, 0))
    s, y = pl.pallas_call(
        functools.partial(_kernel, eps=eps), grid=(m,),
        in_specs=[row, row, pl.BlockSpec((1, d), lambda i: (0, 0))], out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((m, d), x.dtype)] * 2, interpret=interpret,
        compiler_params=compiler_params)(rows, a.reshape(-1, d).astype(x.dtype), weight.reshape(1, d))
    return s.reshape(shape), y.reshape(shape)


def use_kernel(d: int) -> bool:
    """Whether `dense.RMSNorm.add` takes the kernel for width d: on a GPU with a power-of-two width in the
    batch-invariant mode, where it replaces the norm's fixed-order sum (`fold_sum`, several kernels): the 8-slot
    Qwen3-8B plain step 5.675 -> 5.532 ms, spec step 10.431 -> 10.273 (H200, session 18). Outside that mode XLA's
    own kernels are as fast (4.964 vs 4.973 ms at 8 slots, 4.901 vs 4.911 at one), so they stay. $DFLASH_FUSED_NORM
    =1 or 0 forces it on or off on a GPU; =interpret runs the kernel in interpret mode anywhere (tests only)."""
    env = os.environ.get("DFLASH_FUSED_NORM", "").strip().lower()
    if env == "interpret":
        return True
    if d & (d - 1) or jax.default_backend() != "gpu":
        return False
    forced = env_flag("DFLASH_FUSED_NORM")
    return forced if forced is not None else is_batch_invariant()
