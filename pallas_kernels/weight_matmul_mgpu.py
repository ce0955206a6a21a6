"""Weight-streaming products `y = x @ W.T` for few rows as a Mosaic GPU kernel (Hopper: TMA copies into shared
memory, `wgmma` on the tensor cores), for float weights (N, K) — the layout `pallas_kernels.weight_matmul` keeps.

Decode and verify multiply 1..256 rows by a weight of millions of entries, so the product's speed is how fast the
weight streams from HBM. The kernel computes the product transposed, y^T = W x^T ("swap AB"): a weight tile of
BN rows is the tensor core's M side (a multiple of 64), the few rows of x are its N side (M rounded up to 8, at most
256), so no tensor-core work is wasted on padding rows and the accumulator stays small (BN x M8 f32).

Grid (N / BN, splits): a CTA streams its (BN, K / splits) slice of the weight through a `max_concurrent_steps`-deep
TMA pipeline (each weight byte read once), multiplies each (BN, BK) tile by the matching (BK, M8) slice of x (tiny,
L2-resident), and writes an f32 partial (BN, M8). The partials of the K splits are summed in a fixed order
(`ordered_sum`), so the result does not depend on scheduling; split-K exists because few rows give few tiles
(Qwen3-8B's q_proj: 32 tiles of 128 for 132 SMs).

Runs on the GPU (sm_90) compiled and anywhere in Mosaic GPU's interpret mode (`interpret=True`, CPU tests).
Shapes it does not take (`supports` is False: N not a multiple of 64, K not a multiple of 64, more than 256 rows)
go to the portable kernel or XLA through the dispatcher in `weight_matmul`.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.invariance import ordered_sum
from pallas_kernels.weight_matmul import _num_sms

__all__ = ["MgpuConfig", "pick_mgpu_config", "invariant_mgpu_config", "matmul_mgpu", "supports", "MAX_ROWS"]

MAX_ROWS = 256  # wgmma's N side
_SWIZZLE = 128  # bytes: 64 bf16 per swizzled row, the widest (fastest) TMA/wgmma layout


@dataclass(frozen=True)
class MgpuConfig:
    """block_n weight rows (a multiple of 64) x block_k inputs per pipeline step (a multiple of 64), num_splits
    K splits, stages = TMA copies in flight per CTA; warpgroups 2: warp-specialized (a memory warpgroup issues the
    copies, two compute warpgroups take block_n / 2 weight rows each and share the x tile)."""
    block_n: int
    block_k: int
    num_splits: int
    stages: int
    warpgroups: int = 1


def _rows(m: int) -> int:
    return max(8, -(-m // 8) * 8)


def supports(m: int, k: int, n: int, dtype=jnp.bfloat16) -> bool:
    """True when the kernel takes an (M, K) x (N, K)^T product: 16-bit weights, N and K multiples of 64, M <= 256."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and 0 < m <= MAX_ROWS
            and n % 64 == 0 and k % 64 == 0)


def ws_setting() -> bool:
    """$DFLASH_MGPU_WS=1: the warp-specialized tiles (warpgroups 2) wherever N has 128-row tiles. Off by default:
    on an H200 a Qwen3-8B layer at 128 rows took 0.308 ms with them, 0.380 with one warpgroup and 0.241 in XLA
    (session 18)."""
    return os.environ.get("DFLASH_MGPU_WS", "").strip() == "1"


_SMEM_BUDGET = 220 * 1024  # of the 227 KiB an H100/H200 CTA may use


def _epi(mp: int) -> int:
    """Accumulator columns written out per copy: the largest multiple of 8 up to 64 that divides the rows."""
    return next(e for e in range(min(mp, 64), 0, -8) if mp % e == 0)


def _max_stages(mp: int, block_n: int, block_k: int, itemsize: int = 2) -> int:
    per_stage = (block_n + mp) * block_k * itemsize
    return (_SMEM_BUDGET - block_n * _epi(mp) * 4) // per_stage


def pick_mgpu_config(m: int, k: int, n: int, num_sms: int | None = None, *, block_n: int | None = None,
                     block_k: int | None = None, num_splits: int | None = None,
                     stages: int | None = None, warpgroups: int | None = None) -> MgpuConfig:
    """Tiles for an (M, K) x (K, N) product (given values kept, the rest derived). BN 128 when N has enough
    128-row tiles and the rows are few, else 64; BK the largest of 256/128/64 dividing K (fewer, larger copies
    streamed faster on an H200); splits: the fewest that give every SM a CTA (and, with $DFLASH_MGPU_SPLIT_K set,
    cover at most that many inputs each: the Q8_0 kernel gained 1.2x from several CTAs per SM, an experiment for
    the float one); stages: up to 4 that fit in shared memory; warpgroups 2 (BN 128) where `ws_setting` asks and N
    has 128-row tiles. Only BK and the splits change a row's arithmetic (the order of its K sums); BN, stages and
    warpgroups do not."""
    num_sms = num_sms or _num_sms()
    mp = _rows(m)
    if warpgroups is None:
        warpgroups = 2 if ws_setting() and n % 128 == 0 and (block_n or 128) % 128 == 0 else 1
    block_n = block_n or (128 if warpgroups == 2 or (n % 128 == 0 and n // 128 >= num_sms // 2 and mp <= 64)
                          else 64)
    if block_k is None:
        fits = [b for b in (256, 128, 64) if k % b == 0 and _max_stages(mp, block_n, b) >= 2]
        block_k = fits[0] if fits else 64
    k_steps = k // block_k
    if num_splits is None:
        num_splits = fewest_splits(k, k_steps, -(-n // block_n), num_sms, env_int("DFLASH_MGPU_SPLIT_K", 0))
    stages = stages or max(1, min(4, _max_stages(mp, block_n, block_k), k_steps // num_splits))
    return MgpuConfig(block_n, block_k, num_splits, stages, warpgroups)


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


def fewest_splits(k: int, steps: int, tiles: int, num_sms: int, max_inputs: int = 0) -> int:
    """The fewest K splits (divisors of the `steps` pipeline steps) that give every SM one of the `tiles` x splits
    CTAs and, when `max_inputs` is set, cover at most that many of the K inputs each; else the most."""
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    return next((d for d in divisors if tiles * d >= num_sms and (not max_inputs or k // d <= max_inputs)),
                divisors[-1])


def invariant_mgpu_config(m: int, k: int, n: int, num_sms: int | None = None) -> MgpuConfig:
    """The batch-invariant mode's tiles. BK 64 and the K splits are fixed by (K, N) alone, so a row's sums run in
    one order for every M (BN and stages do not change the arithmetic and follow M). BK 64 and splits giving about
    two CTAs per SM were the fastest at verify sizes on an H200 (4096 x 12288 at M = 128: 54.5 us against 73.1 us
    with BK 128 and one split; at M = 256: 75.9 against 146.2 us)."""
    num_sms = num_sms or _num_sms()
    block_k = 64
    k_steps = k // block_k
    tiles = -(-n // 64)
    # At most K/512 splits: the f32 partials of 128 rows then stay within the weight's own bytes.
    divisors = [d for d in range(1, k_steps + 1) if k_steps % d == 0 and d <= max(1, k // 512)]
    splits = next((d for d in divisors if tiles * d >= 2 * num_sms), divisors[-1])
    ws = ws_setting() and n % 128 == 0  # the same sums in the same order, only more rows per CTA
    block_n = 128 if ws else 64
    stages = max(1, min(4, _max_stages(_rows(m), block_n, block_k), k_steps // splits))
    return MgpuConfig(block_n, block_k, splits, stages, 2 if ws else 1)


def store_partial(acc, o_smem, o_gmem, si, ni) -> None:
    """A CTA's f32 partial (BN, M8) to o_gmem[si, ni-th BN rows], in column pieces through a small staging buffer
    (o_smem (BN, `_epi`)), so the pipeline keeps the shared memory."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    bn, mp = acc.shape
    epi = o_smem.shape[1]
    for j in range(mp // epi):
        if j:
            plgpu.wait_smem_to_gmem(0)
        o_smem[...] = acc[:, j * epi:(j + 1) * epi]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(ni * bn, bn), pl.ds(j * epi, epi)])
    plgpu.wait_smem_to_gmem(0)


def _transforms(plgpu, dtype):
    elems = _SWIZZLE // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(_SWIZZLE))


def _interpret_params(plgpu, interpret: bool):
    return plgpu.InterpretGPUParams() if interpret else None


def _kernel_call_ws(x, weight, cfg: MgpuConfig, interpret: bool):
    """The warp-specialized kernel (cfg.warpgroups == 2): thread 2 of each CTA only issues TMA copies (its own
    pipeline, `memory_registers`), threads 0 and 1 each multiply their half of the (BN, BK) weight tile by the
    shared (M8, BK) x tile, so one warpgroup's wgmma runs while the other waits, and the x tile is read from L2 once
    per BN weight rows instead of once per 64. Output and K splits as in `_kernel_call`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415

    mp, k = x.shape
    n = weight.shape[0]
    bn, bk, splits = cfg.block_n, cfg.block_k, cfg.num_splits
    half = bn // 2
    steps = k // bk // splits
    epi = _epi(mp)
    transforms = _transforms(plgpu, weight.dtype)

    def kernel(x_gmem, w_gmem, o_gmem):
        ni, si, wg = lax.axis_index("n"), lax.axis_index("s"), lax.axis_index("wg")
        ks = pl.ds(si * steps * bk, steps * bk)
        w_cta, x_cta = w_gmem.at[pl.ds(ni * bn, bn), ks], x_gmem.at[:, ks]

        def pipeline(body, context):
            return plgpu.emit_pipeline_warp_specialized(
                body, grid=(steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
                max_concurrent_steps=cfg.stages, compute_context=context,
                in_specs=[plgpu.BlockSpec((bn, bk), lambda kk: (0, kk), transforms=transforms),
                          plgpu.BlockSpec((mp, bk), lambda kk: (0, kk), transforms=transforms)])

        def ignore(*_, **__):
            return None

        @functools.partial(pl.run_scoped, allocations=pipeline(ignore, ignore).get_allocations(w_cta, x_cta),
                           o_smem=plgpu.SMEM((2, half, epi), jnp.float32), collective_axes="wg")
        def _scope(allocations, o_smem):
            def context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((half, mp), jnp.float32))
                def _acc_scope(acc_ref):
                    run_pipeline(acc_ref)
                    # this warpgroup's half is the (ni * 2 + wg)-th tile of `half` rows
                    store_partial(acc_ref[...], o_smem.at[wg], o_gmem, si, ni * 2 + wg)

            def body(_, w_smem, x_smem, acc_ref):
                plgpu.wgmma(acc_ref, w_smem.at[pl.ds(wg * half, half)], x_smem.T)
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(body, context)(w_cta, x_cta, allocations=allocations)

    f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32),
                     grid=(n // bn, splits), grid_names=("n", "s"), num_threads=3, thread_name="wg",
                     compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
                     interpret=_interpret_params(plgpu, interpret))
    return f(x, weight)


def _kernel_call(x, weight, cfg: MgpuConfig, interpret: bool):
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415  (GPU/interpret only)

    if cfg.warpgroups == 2:
        return _kernel_call_ws(x, weight, cfg, interpret)
    mp, k = x.shape
    n = weight.shape[0]
    bn, bk, splits = cfg.block_n, cfg.block_k, cfg.num_splits
    steps = k // bk // splits
    delay = 1 if min(steps, cfg.stages) > 1 else 0  # let one product run on while the next copy lands
    epi = _epi(mp)
    transforms = _transforms(plgpu, weight.dtype)

    def kernel(x_gmem, w_gmem, o_gmem, o_smem):
        ni, si = lax.axis_index("n"), lax.axis_index("s")

        def accumulate(acc_ref):
            def step(_, w_smem, x_smem):
                plgpu.wgmma(acc_ref, w_smem, x_smem.T)
                plgpu.wgmma_wait(delay)  # with delay 1 its buffers are held one more step by delay_release

            plgpu.emit_pipeline(
                step, grid=(steps,), max_concurrent_steps=max(cfg.stages, delay + 1),
                in_specs=[plgpu.BlockSpec((bn, bk), lambda kk: (ni, si * steps + kk), transforms=transforms,
                                          delay_release=delay),
                          plgpu.BlockSpec((mp, bk), lambda kk: (0, si * steps + kk), transforms=transforms,
                                          delay_release=delay)])(w_gmem, x_gmem)
            return acc_ref[...]

        store_partial(pl.run_scoped(accumulate, plgpu.ACC((bn, mp), jnp.float32)), o_smem, o_gmem, si, ni)

    f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32),
                     scratch_types=dict(o_smem=plgpu.SMEM((bn, epi), jnp.float32)),
                     grid=(n // bn, splits), grid_names=("n", "s"),
                     interpret=_interpret_params(plgpu, interpret))
    return f(x, weight)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def matmul_mgpu(x: jax.Array, weight: jax.Array, *, config: MgpuConfig | None = None, interpret: bool = False,
                out_dtype=None) -> jax.Array:
    """x (..., K) @ weight (N, K).T with f32 accumulation -> (..., N) in out_dtype (default x.dtype). x is cast to
    the weight's dtype (the tensor cores take one input type)."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} inputs, the weight {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not supports(m, k, n, weight.dtype):
        raise ValueError(f"Mosaic GPU product does not take M={m} K={k} N={n} {weight.dtype}; see supports()")
    cfg = config or pick_mgpu_config(m, k, n)
    if n % cfg.block_n or k % (cfg.block_k * cfg.num_splits) or cfg.block_n % (64 * cfg.warpgroups):
        raise ValueError(f"{cfg} does not tile K={k} N={n}")
    mp = _rows(m)
    xp = jnp.pad(x2.astype(weight.dtype), ((0, mp - m), (0, 0)))
    partials = _kernel_call(xp, weight, cfg, interpret)  # (splits, N, M8) f32
    y = ordered_sum(partials)[:, :m].T
    return y.astype(out_dtype or x.dtype).reshape(*lead, n)
