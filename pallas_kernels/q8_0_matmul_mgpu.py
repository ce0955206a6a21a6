"""Q8_0 weight-streaming products `y = x @ dequant(W)` for few rows as a Mosaic GPU kernel (Hopper): int8 weight
tiles go through a TMA pipeline, are widened to bf16 in registers and fed to `wgmma` as its register operand, and
each 32-wide block's partial product is scaled by the block's f16 scale in the accumulator's layout.

Same shape of computation as `weight_matmul_mgpu` ("swap AB": y^T = W x^T, the weight tile on the tensor core's M
side, the few rows of x on its N side, split K with partials summed in a fixed order), but a Q8_0 weight streams a
little over 1 byte per entry instead of 2. The weight must be laid out (N, K) here (a 64- or 128-row tile is then
K-contiguous, as a register operand must be); the scales stay (K / 32, N) as `weight_matmul` keeps them, so a
block's scales for a tile are one contiguous row. The block scaling needs one small product per 32-wide block: a
pipeline step is one block, and many steps stay in flight.

Arithmetic: x rounded to bf16 times the exact int8 values (|q| <= 127 is exact in bf16), f32 accumulation within a
block, the block's f16 scale applied in f32. That is the exact Q8_0 product of bf16 x up to summation order. It is
closer to it than `weight_matmul.q8_0_matmul_reference` with bf16 x, which rounds each dequantized weight to bf16.

Pre-scaled variant (`Q8MgpuConfig.prescale`, chosen by `use_prescale`, forced with $DFLASH_Q8_PRESCALE): each int8 tile
is multiplied by its scales in registers and rounded to bf16 before the product, the numerics of
`q8_0_matmul_reference` and of bf16 weights, so every block accumulates into one accumulator. That frees the
registers the per-block accumulators hold: 128-row tiles fit up to M = 128, where the exact variant must drop to
64-row tiles (and so streams x twice as often).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.invariance import (
    env_flag,
    in_prefill,
    is_batch_invariant,
    ordered_sum,
    prefill_tiles_enabled,
    q8_prescale_choice,
)
from pallas_kernels.weight_matmul import _num_sms
from pallas_kernels.weight_matmul_mgpu import (
    _SMEM_BUDGET,
    MAX_ROWS,
    _epi,
    _rows,
    env_int,
    fewest_splits,
    store_partial,
)

__all__ = ["Q8MgpuConfig", "pick_q8_mgpu_config", "q8_0_matmul_mgpu", "supports_q8", "MAX_ROWS", "piece_rows",
           "use_prescale", "engine_prescale"]

_BLOCK = 32  # Q8_0 block: one f16 scale per 32 consecutive inputs
_ACC_REG_BUDGET = 168  # of the 255 a thread may hold: the rest for the widened weight tile, scales and addresses


@dataclass(frozen=True)
class Q8MgpuConfig:
    """block_n weight rows per CTA (64 or 128), num_splits K splits, stages = pipeline steps in flight per CTA,
    blocks Q8_0 blocks per step (their products are issued together and waited for once), prescale: scale the
    weight tile before the product (bf16 weights' numerics, one accumulator) instead of each block's product;
    swizzle: bytes per swizzled row of the weight tile in shared memory (32: one block per tile column; 128: four
    blocks, wider TMA boxes, needs blocks = 4; `swizzle_for`)."""
    block_n: int
    num_splits: int
    stages: int
    blocks: int = 1
    prescale: bool = False
    swizzle: int = 32


PRESCALE_MIN_ROWS = 64  # H200, 27B layer: at M >= 64 pre-scaled wins (M=128 2.41 vs 3.48 ms), below it loses


def prescale_setting() -> bool | None:
    """$DFLASH_Q8_PRESCALE: 1/on/true or 0/off/false forces the variant for every Q8_0 product; None when unset
    (or auto)."""
    return env_flag("DFLASH_Q8_PRESCALE")


def use_prescale(m: int) -> bool:
    """Whether an M-row Q8_0 product runs pre-scaled. Prefill steps: always (their rows need to agree only with
    other prefill rows, and 256-row pieces with one accumulator beat the exact variant's 64-row tiles), unless
    $DFLASH_PREFILL_TILES=same (prefill then follows the decode rule). Decode and verify steps in the
    batch-invariant mode: the engine's choice (`invariance.q8_prescale`: a row must not change numerics with the row
    count), exact when none was made. Otherwise by M: pre-scaled from `PRESCALE_MIN_ROWS` rows, where the exact
    variant's per-block accumulators no longer fit in registers."""
    forced = prescale_setting()
    if forced is not None:
        return forced
    if in_prefill() and prefill_tiles_enabled():
        return True
    if is_batch_invariant():
        return bool(q8_prescale_choice())
    return m >= PRESCALE_MIN_ROWS


ENGINE_PRESCALE_ROWS = 128


def engine_prescale(verify_rows: int) -> bool:
    """An engine's one choice for its decode and verify rows (`invariance.q8_prescale`): pre-scaled when its
    largest verify step (slots x block, counted with or without a drafter: the bits must not depend on whether one
    is loaded) has `ENGINE_PRESCALE_ROWS` rows. Those steps dominate a busy DFlash engine; its plain and 1-slot steps
    then run slower (27B, H200: 8-slot plain 15.4 -> 19.2 ms, 1-slot verify 21.0 -> 24.7 ms, 8-slot verify 72.9 ->
    56.6 ms). Not from 64 rows: a 4-slot engine's verify gains ~8 % per layer there (2.49 -> 2.29 ms), less than its
    plain and 1-2 slot steps would lose."""
    return verify_rows >= ENGINE_PRESCALE_ROWS


def piece_rows(prescale: bool) -> int:
    """Rows per call that keep the accumulators in registers: 128 (at 256, BN 64 with one block per step would need
    256 registers for the block accumulator and the total), 256 pre-scaled (one accumulator)."""
    return MAX_ROWS if prescale else 128


def supports_q8(m: int, k: int, n: int) -> bool:
    """True when the kernel takes an (M, K) x Q8_0 (K, N) product: N a multiple of 64, K of 32, M <= 256."""
    return 0 < m <= MAX_ROWS and n % 64 == 0 and k % _BLOCK == 0


def _max_stages(mp: int, block_n: int, blocks: int = 1) -> int:
    per_stage = blocks * (block_n * _BLOCK + mp * _BLOCK * 2 + block_n * 2)
    return (_SMEM_BUDGET - block_n * min(mp, 64) * 4) // per_stage


def _acc_regs(block_n: int, mp: int, blocks: int, prescale: bool = False) -> int:
    """f32 registers per thread that one warpgroup (128 threads) holds for the step's block accumulators and the
    running total, each (block_n, mp); the pre-scaled variant holds one accumulator."""
    return (1 if prescale else blocks + 1) * block_n * mp // 128


# H200, 27B Q8_0 steps in the 8-slot engine's mode (bench/device/next.sh q8split): 0 (the fewest splits that give
# every SM one CTA) 19.87 / 46.88 ms plain / spec at 8 slots, 18.47 plain at 1; 2560: 16.82 / 44.27, 15.49;
# 1280: 16.80 / 48.17, 15.00. One warpgroup per SM cannot hide the widening and wgmma latency; more, shorter CTAs can.
SPLIT_K = 2560


def split_k_setting() -> int:
    """Most inputs per K split ($DFLASH_Q8_SPLIT_K overrides `SPLIT_K`; 0: the fewest splits that give every SM a
    CTA, with 128-row tiles where N has half an SM's worth, the rule before session 13)."""
    return env_int("DFLASH_Q8_SPLIT_K", SPLIT_K)


# H200, Qwen3-8B Q8_0 decode steps with 128-byte weight rows (session 20, mode off, one call): 1 / 8 slots 4.345 /
# 5.419 ms at 2560, 4.137 / 5.255 at 1536, 4.279 / 5.243 at 1024. More splits do not pay at verify rows: the 27B
# 8-slot spec step took 46.5 ms at 1536 against 42.3 at 2560 (plain 13.15 vs 13.34, 1 slot 11.87 vs 12.08).
DECODE_SPLIT_K = 1536


def decode_split_k_setting() -> int:
    """Most inputs per K split for up to 16 rows outside the batch-invariant mode, where the split count may follow
    M ($DFLASH_Q8_DECODE_SPLIT_K overrides `DECODE_SPLIT_K`; 0: `split_k_setting()`)."""
    return env_int("DFLASH_Q8_DECODE_SPLIT_K", DECODE_SPLIT_K) or split_k_setting()


def prefill_split_k_setting() -> int:
    """`split_k_setting` for prefill's 256-row pieces (they agree only with other prefill rows): 0, the old rule,
    unless $DFLASH_Q8_PREFILL_SPLIT_K says otherwise. 8 splits of the 27B down projection would write 42 MB of f32
    partials per 256 rows beside its 89 MB weight; not yet timed (bench/device/next.sh q8prefill)."""
    return env_int("DFLASH_Q8_PREFILL_SPLIT_K", 0)


def pick_q8_mgpu_config(m: int, k: int, n: int, num_sms: int | None = None, *, block_n: int | None = None,
                        num_splits: int | None = None, stages: int | None = None,
                        blocks: int | None = None, prescale: bool = False) -> Q8MgpuConfig:
    """Tiles for an (M, K) x (K, N) Q8_0 product (given values kept): BN 64 for up to 16 rows of the exact variant
    (more CTAs per SM), else 128 when N has at least half an SM's worth of 128-row tiles; 4 blocks per step where K
    allows (one wait per 128 inputs); the fewest K splits that give every SM a CTA and at most `split_k_setting()`
    inputs each; up to 16 blocks in flight (small copies need many to cover the memory latency), within shared
    memory.

    In the batch-invariant mode the split count is fixed by (K, N) alone, so a row's summation order never depends
    on M (BN and blocks per step do not change the order); outside it, up to 16 rows split K into
    `decode_split_k_setting()` pieces. Rows are the other side of every
    accumulator: from M ~ 32 up, 4 accumulators of (128, M) f32 would not fit in registers (at M = 128 on an H200 the
    27B verify's products spilled, 44 of a 72 ms step), so larger M takes fewer blocks per step, then BN 64, to stay
    within `_ACC_REG_BUDGET` registers per thread."""
    num_sms = num_sms or _num_sms()
    mp = _rows(m)
    decode = mp <= 16 and not is_batch_invariant() and not in_prefill()
    split_k = (prefill_split_k_setting() if in_prefill() and prefill_tiles_enabled()
               else decode_split_k_setting() if decode else split_k_setting())
    default_n = (64 if split_k and mp <= 16 and not prescale
                 else 128 if n % 128 == 0 and n // 128 >= num_sms // 2 else 64)
    default_blocks = next(b for b in (4, 2, 1) if (k // _BLOCK) % b == 0)
    if num_splits is None:
        # 64-row tiles counted whatever BN is picked: the split count must not follow M
        num_splits = fewest_splits(k, k // _BLOCK // default_blocks, n // (64 if split_k else default_n), num_sms,
                                   split_k)
    if block_n is None or blocks is None:
        fits = [(bn, nb) for bn in ([block_n] if block_n else [default_n, 64])
                for nb in ([blocks] if blocks else [b for b in (4, 2, 1) if b <= default_blocks])
                if _acc_regs(bn, mp, nb, prescale) <= _ACC_REG_BUDGET]
        block_n, blocks = fits[0] if fits else (block_n or 64, blocks or 1)
    steps = k // _BLOCK // blocks
    stages = stages or max(1, min(16 // blocks, _max_stages(mp, block_n, blocks), steps // num_splits))
    return Q8MgpuConfig(block_n, num_splits, stages, blocks, prescale, swizzle_for(blocks, prescale))


# H200, Qwen3-8B layer products (bench/q8_swizzle.py, session 19): exact variant, 4 blocks per step, 128-byte
# swizzled weight rows (one TMA box row = 4 blocks) against 32-byte ones: M=1 0.168 vs 0.181 ms (down 66 vs 48 % of
# copy), M=8 0.150 vs 0.166 (gate/up 65 vs 50 %). Pre-scaled: M=1 0.216 vs 0.227, M=8 0.220 vs 0.193 (worse), M=128
# 0.326 vs 0.350; mixed, so it keeps 32.
def swizzle_for(blocks: int, prescale: bool) -> int:
    """Bytes per swizzled weight row in shared memory: 128 (wide TMA boxes) for the exact variant with 4 blocks per
    step, else 32 ($DFLASH_Q8_SWIZZLE=32 forces 32, for A/B runs). Neither changes the arithmetic."""
    return 128 if blocks == 4 and not prescale and env_int("DFLASH_Q8_SWIZZLE", 128) == 128 else 32


def unpadded_setting() -> bool:
    """$DFLASH_Q8_UNPADDED=1: x goes to the kernel with its own M rows, and the pipeline's (M8, BK) x tiles read the
    rows past M as zeros (Mosaic GPU block specs fill out-of-bounds TMA reads with zeros), instead of a padded copy
    of x made by XLA before every product (`loop_pad_fusion`, ~1.4 us each, 4 a layer: ~0.2 ms of the 8B Q8_0
    one-slot step, session 22's HLO). Off until tested and timed on a GPU."""
    return env_flag("DFLASH_Q8_UNPADDED") is True


def _kernel_call(x, qt, scales, cfg: Q8MgpuConfig, interpret: bool):
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415  (GPU/interpret only)

    k = x.shape[1]
    mp = _rows(x.shape[0])  # x may have fewer rows (`unpadded_setting`): its tiles read zeros past them
    n = qt.shape[0]
    bn, splits, nb = cfg.block_n, cfg.num_splits, cfg.blocks
    bk = nb * _BLOCK
    steps = k // bk // splits
    epi = _epi(mp)
    # One 32-input block per tile column, so a block's slice of a step's tile is whole tiles of shared memory.
    wide = cfg.swizzle > _BLOCK
    q_transforms = (plgpu.TilingTransform((8, cfg.swizzle)), plgpu.SwizzleTransform(cfg.swizzle))  # int8: 1 byte
    x_transforms = (plgpu.TilingTransform((8, _BLOCK)), plgpu.SwizzleTransform(2 * _BLOCK))  # 32 bf16 = 64 bytes

    def wgmma(acc_ref, a, x_cols, a_smem):
        if a_smem is not None:  # the interpreter's wgmma reads its operands from refs only
            a_smem[...] = a
            plgpu.commit_smem()
            a = a_smem
        plgpu.wgmma(acc_ref, a, x_cols)
        if a_smem is not None:
            plgpu.wgmma_wait(0)

    def in_specs():
        ni, si = lax.axis_index("n"), lax.axis_index("s")
        return [plgpu.BlockSpec((bn, bk), lambda kk: (ni, si * steps + kk), transforms=q_transforms),
                plgpu.BlockSpec((mp, bk), lambda kk: (0, si * steps + kk), transforms=x_transforms),
                plgpu.BlockSpec((nb, bn), lambda kk: (si * steps + kk, ni))]

    def prescaled(x_gmem, q_gmem, s_gmem, o_gmem, o_smem, a_smem=None):
        ni, si = lax.axis_index("n"), lax.axis_index("s")

        def accumulate(acc_ref):
            def step(_, q_smem, x_smem, s_smem):
                tile = q_smem[...] if wide else None
                for j in range(nb):
                    cols = pl.ds(j * _BLOCK, _BLOCK)
                    scale = plgpu.load(s_smem.at[j], layout=plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
                    q = tile[:, j * _BLOCK:(j + 1) * _BLOCK] if wide else q_smem[:, cols]
                    a = (q.astype(jnp.float32) * scale[:, None]).astype(jnp.bfloat16)
                    wgmma(acc_ref, a, x_smem.at[:, cols].T, a_smem)
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(step, grid=(steps,), max_concurrent_steps=cfg.stages, in_specs=in_specs())(
                q_gmem, x_gmem, s_gmem)
            return acc_ref[...]

        store_partial(pl.run_scoped(accumulate, plgpu.ACC((bn, mp), jnp.float32)), o_smem, o_gmem, si, ni)

    def kernel(x_gmem, q_gmem, s_gmem, o_gmem, o_smem, a_smem=None):
        ni, si = lax.axis_index("n"), lax.axis_index("s")

        def step(_, q_smem, x_smem, s_smem, total):
            def block_products(*acc_refs):  # one accumulator per block: each is scaled by its own scales
                tile = q_smem[...] if wide else None  # a swizzled row holds several blocks: load it whole
                for j, acc_ref in enumerate(acc_refs):
                    cols = pl.ds(j * _BLOCK, _BLOCK)
                    q = tile[:, j * _BLOCK:(j + 1) * _BLOCK] if wide else q_smem[:, cols]
                    a = q.astype(jnp.bfloat16)  # (BN, 32): exact, |q| <= 127
                    wgmma(acc_ref, a, x_smem.at[:, cols].T, a_smem)
                plgpu.wgmma_wait(0)
                return [acc_ref[...] for acc_ref in acc_refs]

            parts = pl.run_scoped(block_products, *[plgpu.ACC((bn, mp), jnp.float32)] * nb)
            for j, part in enumerate(parts):
                scale = plgpu.load(s_smem.at[j], layout=plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
                total = total + part * scale[:, None]
            return total

        zeros = plgpu.layout_cast(jnp.zeros((bn, mp), jnp.float32), plgpu.Layout.WGMMA)
        total = plgpu.emit_pipeline(step, grid=(steps,), max_concurrent_steps=cfg.stages, init_carry=zeros,
                                    in_specs=in_specs())(q_gmem, x_gmem, s_gmem)
        store_partial(total, o_smem, o_gmem, si, ni)

    scratch = dict(a_smem=plgpu.SMEM((bn, _BLOCK), jnp.bfloat16, transforms=x_transforms)) if interpret else {}
    f = plgpu.kernel(prescaled if cfg.prescale else kernel, out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32),
                     scratch_types=dict(o_smem=plgpu.SMEM((bn, epi), jnp.float32), **scratch),
                     grid=(n // bn, splits), grid_names=("n", "s"),
                     interpret=plgpu.InterpretGPUParams() if interpret else None)
    return f(x, qt, scales)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def q8_0_matmul_mgpu(x: jax.Array, qt: jax.Array, scales: jax.Array, *, config: Q8MgpuConfig | None = None,
                     interpret: bool = False, out_dtype=None) -> jax.Array:
    """x (..., K) @ (q * scale) -> (..., N): qt (N, K) int8 (the transpose of `weight_matmul`'s (K, N) layout),
    scales (K / 32, N) f16. f32 accumulation; out_dtype defaults to x.dtype."""
    n, k = qt.shape
    if x.shape[-1] != k or scales.shape != (k // _BLOCK, n) or qt.dtype != jnp.int8:
        raise ValueError(f"Q8_0 product: x {x.shape}, weight {qt.shape} {qt.dtype}, scales {scales.shape}; "
                         f"expected x (..., {k}), int8 weight (N, K), scales ({k // _BLOCK}, {n})")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not supports_q8(m, k, n):
        raise ValueError(f"Mosaic GPU Q8_0 product does not take M={m} K={k} N={n}; see supports_q8()")
    cfg = config or pick_q8_mgpu_config(m, k, n)
    if n % cfg.block_n or (k // _BLOCK) % (cfg.blocks * cfg.num_splits) or cfg.swizzle > cfg.blocks * _BLOCK:
        raise ValueError(f"{cfg} does not tile K={k} N={n}")
    xb = x2.astype(jnp.bfloat16)
    if not unpadded_setting():
        xb = jnp.pad(xb, ((0, _rows(m) - m), (0, 0)))
    partials = _kernel_call(xb, qt, scales.astype(jnp.float16), cfg, interpret)  # (splits, N, M8) f32
    y = ordered_sum(partials)[:, :m].T
    return y.astype(out_dtype or x.dtype).reshape(*lead, n)
