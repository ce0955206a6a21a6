"""Q8_0 products for a handful of rows (a decode step's few slots) without tensor cores: a Triton-lowered Pallas
kernel that streams the (N, K) int8 weight once, widens it in registers and multiplies every x row with f32 FMAs.

Why beside `q8_0_matmul_mgpu`: at one row the Mosaic kernel runs a 64-row `wgmma` per 32-input block with seven of
its eight columns padding, converts each tile to bf16 first and waits on the tensor core every step; a decode step
needs none of that, only the weight bytes in flight. Here a program owns `block_n` output rows of one K split and
walks its inputs `blocks` Q8_0 blocks at a time: load a (BN, blocks, 32) int8 tile (32 contiguous bytes per block,
coalesced along K), convert to f32, multiply by x's (blocks, 32) slice, sum each block's 32 products, scale by the
block's f16 scale and accumulate. The K splits' f32 partials (splits, M, N) are summed in a fixed order outside.

Arithmetic: y = sum_b d_b * (sum_j q_bj * x_bj) in f32 with x as given (bf16 activations widened exactly): the exact
Q8_0 product of x up to summation order, as `q8_0_matmul_mgpu`'s exact variant computes it, but in another order
(not bit-equal to it), so the batch-invariant mode never dispatches here (`use_gemv`).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.invariance import in_prefill, is_batch_invariant, ordered_sum

__all__ = ["GemvConfig", "pick_gemv_config", "q8_0_gemv", "q8_0_gemv_reference", "supports_gemv", "use_gemv",
           "MAX_ROWS"]

_BLOCK = 32
MAX_ROWS = 8  # each row adds a (BN, blocks) f32 accumulator and a product pass over the widened tile


@dataclass(frozen=True)
class GemvConfig:
    """block_n weight rows per program, blocks Q8_0 blocks (32 inputs each) per loop step, num_splits K splits,
    num_warps / num_stages for Triton (stages: loop iterations whose loads are in flight)."""
    block_n: int
    blocks: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 3


def supports_gemv(m: int, k: int, n: int) -> bool:
    return 0 < m <= MAX_ROWS and k % _BLOCK == 0 and n % 8 == 0


def gemv_max_rows() -> int:
    """Rows up to which decode products take this kernel ($DFLASH_Q8_GEMV_ROWS; 0 turns it off)."""
    return int(os.environ.get("DFLASH_Q8_GEMV_ROWS", "0") or 0)


def use_gemv(m: int, k: int, n: int) -> bool:
    """Outside the batch-invariant mode and prefill, decode products of at most `gemv_max_rows()` rows."""
    return (m <= gemv_max_rows() and supports_gemv(m, k, n) and not is_batch_invariant() and not in_prefill())


def _pow2_divisor(x: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and x % (d * 2) == 0:
        d *= 2
    return d


def pick_gemv_config(m: int, k: int, n: int, num_sms: int | None = None, *, block_n: int | None = None,
                     blocks: int | None = None, num_splits: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None) -> GemvConfig:
    """Given values kept. BN 16 (a 16 x 256 int8 tile is 4 KB: 32 bytes per thread at 4 warps), 8 blocks per step,
    and the fewest power-of-two K splits that give every SM `_PROGRAMS_PER_SM` programs while each split keeps at
    least 4 steps."""
    from pallas_kernels.weight_matmul import _num_sms  # noqa: PLC0415
    num_sms = num_sms or _num_sms()
    nblk = k // _BLOCK
    block_n = block_n or _pow2_divisor(n, 16)
    blocks = blocks or _pow2_divisor(nblk, 8)
    if num_splits is None:
        num_splits = 1
        while ((n // block_n) * num_splits < _PROGRAMS_PER_SM * num_sms and nblk % (num_splits * 2 * blocks) == 0
               and nblk // (num_splits * 2 * blocks) >= 4):
            num_splits *= 2
    return GemvConfig(block_n, blocks, num_splits, num_warps or 4, num_stages or 3)


_PROGRAMS_PER_SM = 4


def _kernel(x_ref, q_ref, s_ref, o_ref, *, m: int, cfg: GemvConfig, steps: int):
    """x_ref (M, K/32, 32); q_ref (N, K/32, 32) int8; s_ref (K/32, N) f16; o_ref (splits, M, N) f32."""
    from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415
    ni, si = pl.program_id(0), pl.program_id(1)
    bn, nb = cfg.block_n, cfg.blocks
    rows = pl.ds(ni * bn, bn)
    first = si * steps * nb

    def body(i, accs):
        b0 = first + i * nb
        q = pl_triton.load(q_ref.at[rows, pl.ds(b0, nb), :], eviction_policy="evict_first").astype(jnp.float32)
        d = s_ref[pl.ds(b0, nb), rows].astype(jnp.float32).T  # (BN, blocks)
        out = []
        for r in range(m):
            xr = x_ref[r, pl.ds(b0, nb), :].astype(jnp.float32)  # (blocks, 32)
            out.append(accs[r] + jnp.sum(q * xr[None], axis=2) * d)
        return tuple(out)

    accs = lax.fori_loop(0, steps, body, tuple(jnp.zeros((bn, nb), jnp.float32) for _ in range(m)))
    for r in range(m):
        o_ref[si, r, rows] = jnp.sum(accs[r], axis=1)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def q8_0_gemv(x: jax.Array, qt: jax.Array, scales: jax.Array, *, config: GemvConfig | None = None,
              interpret: bool = False, out_dtype=None) -> jax.Array:
    """x (..., K) @ dequant(qt, scales) -> (..., N) for at most `MAX_ROWS` rows: qt (N, K) int8 (the Mosaic
    kernel's layout), scales (K / 32, N). f32 accumulation; out_dtype defaults to x.dtype."""
    n, k = qt.shape
    if x.shape[-1] != k or scales.shape != (k // _BLOCK, n) or qt.dtype != jnp.int8:
        raise ValueError(f"Q8_0 product: x {x.shape}, weight {qt.shape} {qt.dtype}, scales {scales.shape}; "
                         f"expected x (..., {k}), int8 weight (N, K), scales ({k // _BLOCK}, {n})")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not supports_gemv(m, k, n):
        raise ValueError(f"Q8_0 GEMV does not take M={m} K={k} N={n}; see supports_gemv()")
    cfg = config or pick_gemv_config(m, k, n)
    nblk = k // _BLOCK
    if n % cfg.block_n or nblk % (cfg.blocks * cfg.num_splits):
        raise ValueError(f"{cfg} does not tile K={k} N={n}")
    steps = nblk // cfg.blocks // cfg.num_splits
    out_shape = jax.ShapeDtypeStruct((cfg.num_splits, m, n), jnp.float32)
    whole = lambda shape: pl.BlockSpec(shape, lambda ni, si: (0,) * len(shape))  # noqa: E731  (indexed in-kernel)
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415
        compiler_params = pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    x3 = x2.reshape(m, nblk, _BLOCK)
    q3 = qt.reshape(n, nblk, _BLOCK)
    partials = pl.pallas_call(
        functools.partial(_kernel, m=m, cfg=cfg, steps=steps), grid=(n // cfg.block_n, cfg.num_splits),
        in_specs=[whole(x3.shape), whole(q3.shape), whole(scales.shape)], out_specs=whole(out_shape.shape),
        out_shape=out_shape, interpret=interpret, compiler_params=compiler_params, name="q8_0_gemv")(x3, q3, scales)
    return ordered_sum(partials).astype(out_dtype or x.dtype).reshape(*lead, n)


def q8_0_gemv_reference(x: jax.Array, qt: jax.Array, scales: jax.Array) -> jax.Array:
    """The same sums in `jax.numpy`, f32: per-block products of x and the int8 values, scaled by the block's f16
    scale and summed (x (..., K), qt (N, K), scales (K / 32, N) -> (..., N) f32)."""
    n, k = qt.shape
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], k // _BLOCK, _BLOCK)
    qb = qt.astype(jnp.float32).reshape(n, k // _BLOCK, _BLOCK)
    per_block = jnp.einsum("...bj,nbj->...nb", xb, qb, precision=lax.Precision.HIGHEST)
    return jnp.einsum("...nb,bn->...n", per_block, scales.astype(jnp.float32), precision=lax.Precision.HIGHEST)
