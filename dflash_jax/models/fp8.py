"""FP8 (e4m3) products for the drafter: weights stored as float8_e4m3fn with one f32 scale per output row, inputs
quantized per row on the fly, both operands on the tensor cores' fp8 path (Hopper: cuBLASLt, half the bytes of bf16).

Drafts only propose tokens; the target verifies them with its own weights, so a coarser drafter can cost acceptance
but never changes output. What it saves is the drafter's share of a spec step's weight stream (the Qwen3-8B shape:
the drafter head alone re-reads the 1.24 GB bf16 LM head every step).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448: e4m3fn has no infinity, a larger value would become NaN


def _row_scale(a: jax.Array) -> jax.Array:
    """max |a| over the last axis / FP8_MAX, 1 for all-zero rows (f32, the last axis kept as 1)."""
    amax = jnp.max(jnp.abs(a.astype(jnp.float32)), axis=-1, keepdims=True)
    return jnp.where(amax > 0, amax / FP8_MAX, 1.0)


def _to_fp8(a: jax.Array, scale: jax.Array) -> jax.Array:
    return jnp.clip(a.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(FP8)


def quantize_rows(weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(N, K) float weight -> (N, K) float8_e4m3fn values and (N,) f32 scales: row n is about values[n] * scales[n]
    (round to nearest, 3 mantissa bits), its largest entry mapped to 448."""
    scale = _row_scale(weight)
    return _to_fp8(weight, scale), scale[:, 0]


def fp8_linear(x: jax.Array, values: jax.Array, scales: jax.Array) -> jax.Array:
    """x (..., K) @ (values * scales[:, None])^T with x quantized per row to e4m3 too -> (..., N) in x.dtype; f32
    accumulation of exact fp8 products, so any backend computes the same sums up to their order."""
    sx = _row_scale(x)
    y = lax.dot_general(_to_fp8(x, sx), values, (((x.ndim - 1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
    return (y * sx * scales).astype(x.dtype)


def fp8_linear_reference(x: jax.Array, values: jax.Array, scales: jax.Array) -> jax.Array:
    """The same product in f32 from dequantized operands (the definition `fp8_linear` is tested against)."""
    sx = _row_scale(x)
    xd = _to_fp8(x, sx).astype(jnp.float32) * sx
    wd = values.astype(jnp.float32) * scales[:, None]
    return jnp.einsum("...k,nk->...n", xd, wd, precision=lax.Precision.HIGHEST).astype(x.dtype)
