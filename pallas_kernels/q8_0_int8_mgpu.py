"""Q8_0 weight products with int8 activations (llama.cpp's arithmetic for Q8_0 on CUDA and CPU): each row of x is
quantized per 32 inputs to int8 with one scale (GGUF's Q8_1 activation blocks: d = amax / 127, q = round(x / d)),
the weight's int8 values meet x's int8 values in an s8 x s8 -> s32 `wgmma` with both operands read straight from
shared memory, and each 32-input block's exact integer sum is scaled by d_w * d_x in f32.

Why: the bf16 Mosaic kernel (`q8_0_matmul_mgpu`) widens every int8 weight tile to bf16 in registers before its
`wgmma`; at few rows that widening, not the weight stream, bounds it (39-44 % of copy bandwidth per 8B layer at
M <= 16 on an H200). Here nothing is widened: the int8 tiles go from the TMA pipeline to the tensor cores as they
arrive, and only the (BN, M) block sums pass through registers.

Numerics: a block's integer sum is exact, so a row's result depends only on that row and the fixed split/block order
(the batch-invariant mode needs nothing more). Against bf16 x times exact Q8_0 weights the error is x's int8
rounding, up to amax / 254 per input — llama.cpp's own `vec_dot_q8_0_q8_1` does the same rounding (it keeps d in
f16; so does `quantize_rows`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.invariance import ordered_sum
from pallas_kernels.q8_0_matmul_mgpu import Q8MgpuConfig, pick_q8_mgpu_config, supports_q8
from pallas_kernels.weight_matmul_mgpu import _epi, _rows, store_partial

__all__ = ["quantize_rows", "q8_0_int8_reference", "q8_0_int8_matmul_mgpu"]

_BLOCK = 32


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (M, K) -> int8 values (M, K) and f32 scales (K / 32, M) (the f16-rounded d of each row's 32-input block,
    transposed so that a pipeline step's scales are one contiguous row). q = round(x / d) with d = amax / 127 in f32,
    as llama.cpp's quantize_q8_1 computes it; an all-zero block has q = 0."""
    m, k = x.shape
    xb = x.astype(jnp.float32).reshape(m, k // _BLOCK, _BLOCK)
    d = jnp.max(jnp.abs(xb), axis=-1) / 127.0
    inv = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
    q = jnp.round(xb * inv[..., None]).astype(jnp.int8).reshape(m, k)
    return q, d.astype(jnp.float16).astype(jnp.float32).T


def q8_0_int8_reference(x: jax.Array, qt: jax.Array, scales: jax.Array) -> jax.Array:
    """The kernel's result in `jax.numpy`: x (M, K), qt (N, K) int8, scales (K / 32, N) -> (M, N) f32."""
    m, k = x.shape
    n = qt.shape[0]
    xq, xd = quantize_rows(x)
    sums = jnp.einsum("mbi,nbi->mnb", xq.reshape(m, k // _BLOCK, _BLOCK).astype(jnp.int32),
                      qt.reshape(n, k // _BLOCK, _BLOCK).astype(jnp.int32))
    return jnp.sum(sums.astype(jnp.float32) * xd.T[:, None, :] * scales.astype(jnp.float32).T[None], axis=-1)


def _kernel_call(xq, xd, qt, scales, cfg: Q8MgpuConfig, interpret: bool):
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415  (GPU/interpret only)

    mp, k = xq.shape
    n = qt.shape[0]
    bn, splits, nb = cfg.block_n, cfg.num_splits, cfg.blocks
    bk = nb * _BLOCK
    steps = k // bk // splits
    int8_transforms = (plgpu.TilingTransform((8, _BLOCK)), plgpu.SwizzleTransform(_BLOCK))  # 32 int8 = 32 bytes

    def kernel(xq_gmem, xd_gmem, q_gmem, s_gmem, o_gmem, o_smem):
        ni, si = lax.axis_index("n"), lax.axis_index("s")

        def step(_, q_smem, x_smem, s_smem, d_smem, total):
            def block_products(*acc_refs):  # one s32 accumulator per block: exact sums, scaled after the wait
                for j, acc_ref in enumerate(acc_refs):
                    cols = pl.ds(j * _BLOCK, _BLOCK)
                    plgpu.wgmma(acc_ref, q_smem.at[:, cols], x_smem.at[:, cols].T)
                plgpu.wgmma_wait(0)
                return [acc_ref[...] for acc_ref in acc_refs]

            parts = pl.run_scoped(block_products, *[plgpu.ACC((bn, mp), jnp.int32)] * nb)
            for j, part in enumerate(parts):
                sw = plgpu.load(s_smem.at[j], layout=plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
                sx = plgpu.load(d_smem.at[j], layout=plgpu.Layout.WGMMA.reduce(0))
                total = total + part.astype(jnp.float32) * sw[:, None] * sx[None, :]
            return total

        in_specs = [plgpu.BlockSpec((bn, bk), lambda kk: (ni, si * steps + kk), transforms=int8_transforms),
                    plgpu.BlockSpec((mp, bk), lambda kk: (0, si * steps + kk), transforms=int8_transforms),
                    plgpu.BlockSpec((nb, bn), lambda kk: (si * steps + kk, ni)),
                    plgpu.BlockSpec((nb, mp), lambda kk: (si * steps + kk, 0))]
        zeros = plgpu.layout_cast(jnp.zeros((bn, mp), jnp.float32), plgpu.Layout.WGMMA)
        total = plgpu.emit_pipeline(step, grid=(steps,), max_concurrent_steps=cfg.stages, init_carry=zeros,
                                    in_specs=in_specs)(q_gmem, xq_gmem, s_gmem, xd_gmem)
        store_partial(total, o_smem, o_gmem, si, ni)

    f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32),
                     scratch_types=dict(o_smem=plgpu.SMEM((bn, _epi(mp)), jnp.float32)),
                     grid=(n // bn, splits), grid_names=("n", "s"),
                     interpret=plgpu.InterpretGPUParams() if interpret else None)
    return f(xq, xd, qt, scales)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def q8_0_int8_matmul_mgpu(x: jax.Array, qt: jax.Array, scales: jax.Array, *, config: Q8MgpuConfig | None = None,
                          interpret: bool = False, out_dtype=None) -> jax.Array:
    """x (..., K) @ Q8_0 weight -> (..., N) with x quantized per 32 inputs to int8 (see the module docstring):
    qt (N, K) int8, scales (K / 32, N) f16, f32 block sums; out_dtype defaults to x.dtype."""
    n, k = qt.shape
    if x.shape[-1] != k or scales.shape != (k // _BLOCK, n) or qt.dtype != jnp.int8:
        raise ValueError(f"Q8_0 int8 product: x {x.shape}, weight {qt.shape} {qt.dtype}, scales {scales.shape}; "
                         f"expected x (..., {k}), int8 weight (N, K), scales ({k // _BLOCK}, {n})")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not supports_q8(m, k, n):
        raise ValueError(f"Mosaic GPU Q8_0 int8 product does not take M={m} K={k} N={n}; see supports_q8()")
    cfg = config or pick_q8_mgpu_config(m, k, n)
    if n % cfg.block_n or (k // _BLOCK) % (cfg.blocks * cfg.num_splits):
        raise ValueError(f"{cfg} does not tile K={k} N={n}")
    mp = _rows(m)
    xq, xd = quantize_rows(jnp.pad(x2, ((0, mp - m), (0, 0))))
    partials = _kernel_call(xq, xd, qt, scales.astype(jnp.float16), cfg, interpret)  # (splits, N, M8) f32
    y = ordered_sum(partials)[:, :m].T
    return y.astype(out_dtype or x.dtype).reshape(*lead, n)
