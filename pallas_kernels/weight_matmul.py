"""Weight-streaming matrix products `y = x @ W` for few rows (decode: M = slots; verify: M = slots x block), as portable
Pallas kernels (Triton lowering on GPUs, `interpret=True` on CPU), with bf16/f32 weights or GGUF Q8_0 weights kept as
int8 + one f16 scale per 32 inputs, a `jax.numpy` reference beside each, and a dispatcher.

Weight layouts (no copy at call time; fixed at load):
- float: (N, K) = the HF / GGUF (out, in) layout the dense model stores.
- Q8_0: values (K, N) int8 and scales (K/32, N) f16 — GGUF's block `d * q[i]` (ggml-common.h `block_q8_0`) with the
  32 values of block b of output n at rows 32b..32b+31 of column n. Transposed from the file's (N, K/32) blocks once
  at load so a (BK, BN) tile is BK rows of BN contiguous bytes (coalesced) and its scales BK/32 contiguous rows.

Q8_0 semantics, by kernel (`TileConfig.kernel`):
- 'wscale' (the default, v2): the weight w = f32(d) * f32(q) (exactly gguf.quants' dequantized value), rounded to
  the activation dtype, times x with f32 accumulation (= `q8_0_matmul_reference`). With f32 activations (CPU) that is
  the exact f32 product of llama.cpp's weights; with bf16 activations (GPU) it is bit for bit the weight
  `--weights bf16` would load, so a Q8_0 model computes what the bf16 model computes while streaming half the bytes.
- 'mma' and 'fma' (opt-in: $DFLASH_Q8_KERNEL): y = sum_b d_b * (x_b . q_b) in f32, i.e. x times llama.cpp's weights
  never rounded (the int8 values are exact in bf16; the scale multiplies f32 partial sums, or the f32 weight in
  'fma'). More accurate than 'wscale' by up to 2^-9 of |x| . |w|, but not the same numbers: do not mix the two
  between decode and verify (DESIGN.md section 10), which is why no M-based dispatch picks them by default yet.
Dequantization happens in registers, tile by tile; the weight never exists in memory as floats.

Kernel layout. Grid (M tiles, N tiles, K splits); M tiles fastest so the programs that share a weight tile run
together and the second read hits L2. A program loops over its share of K in steps of BK, loads x (tiny, cached)
and (BK, BN) of weights (each weight byte read once from HBM), and writes an f32 partial (BM, BN) of its split;
the splits are summed in `jax.numpy` (a fixed order, so results do not depend on scheduling; XLA fuses the sum and the
cast into the consumer). Split-K exists because small M gives few (M, N) tiles: Qwen3-8B's q_proj at M=1 has 32
N tiles of 128 for 132 SMs.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.invariance import in_prefill, is_batch_invariant, ordered_sum, prefill_tiles_enabled

Q8_BLOCK = 32  # GGUF Q8_0: values per scale

__all__ = ["Q8_BLOCK", "q8_0_dequantize", "matmul_reference", "q8_0_matmul_reference", "matmul_pallas",
           "q8_0_matmul_pallas", "linear", "q8_0_linear", "default_impl", "TileConfig", "pick_config",
           "invariant_config"]


def _triton_ops():
    from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415  (portable path only)
    return pl_triton.load, pl_triton.store


# --- references -------------------------------------------------------------------------------------------------

def q8_0_dequantize(qweight: jax.Array, scales: jax.Array) -> jax.Array:
    """(K, N) int8 values, (K/32, N) scales -> (K, N) float32, the value gguf.quants.dequantize gives (transposed)."""
    k, n = qweight.shape
    assert k % Q8_BLOCK == 0 and scales.shape == (k // Q8_BLOCK, n), (qweight.shape, scales.shape)
    q = qweight.astype(jnp.float32).reshape(k // Q8_BLOCK, Q8_BLOCK, n)
    return (q * scales.astype(jnp.float32)[:, None, :]).reshape(k, n)


def matmul_reference(x: jax.Array, weight: jax.Array, out_dtype=None) -> jax.Array:
    """x (..., K), weight (N, K) -> (..., N) in out_dtype (default: the promoted input dtype)."""
    return jnp.einsum("...i,oi->...o", x, weight, preferred_element_type=out_dtype)


def q8_0_matmul_reference(x: jax.Array, qweight: jax.Array, scales: jax.Array) -> jax.Array:
    """x (..., K) @ dequant(qweight, scales).astype(x.dtype) (K, N), f32 accumulation -> (..., N) in x.dtype: the
    default kernel's semantics (see the module docstring; with f32 x, the exact product of llama.cpp's weights)."""
    w = q8_0_dequantize(qweight, scales).astype(x.dtype)
    y = jnp.einsum("...k,kn->...n", x, w, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


# --- tiles ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileConfig:
    """block_m x block_n output tile, block_k inputs per loop step, num_splits K splits. Q8_0 only: kernel 'wscale'
    (`_q8_wscale_kernel`, the default), 'mma' (`_q8_kernel`) or 'fma' (`_q8_fma_kernel`); convert 'asm' (int8 ->
    float by bit tricks in inline PTX) or 'cast' (the compiler's conversion); mma only: dot_blocks 32-input blocks
    per tensor-core product (its rows are dot_blocks x block_m) and swap (compute y^T = W^T x^T)."""
    block_m: int
    block_n: int
    block_k: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 2
    dot_blocks: int = 1
    convert: str = "cast"
    swap: bool = False
    kernel: str = "wscale"


def _num_sms() -> int:
    d = jax.devices()[0]
    if d.platform != "gpu":
        return 2
    return int(getattr(d, "core_count", 0) or 132)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def pick_config(m: int, k: int, n: int, quantized: bool, num_sms: int | None = None, *, block_m: int | None = None,
                block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None, dot_blocks: int | None = None, num_splits: int | None = None,
                convert: str | None = None, swap: bool = False, kernel: str | None = None) -> TileConfig:
    """Tiles for an (M, K) x (K, N) product (given values are kept; the rest derived). Float weights and the Q8_0
    'wscale' kernel (the default; $DFLASH_Q8_KERNEL=mma|fma picks another, read when a product is first traced): BM
    >= 16 (the tensor-core minimum; rows past M are masked). 'mma': BM = M rounded up to a power of two (at most 64)
    and dot_blocks = 16 / BM blocks of 32 inputs per product, so that its 16 rows (block x row) are mostly live.
    'fma': BM <= 4 rows per program. Splits so that about four (mma, fma: eight) programs per SM stream weights, each
    split walking >= 2 K steps to pipeline its loads, and the f32 partials (splits x M x N x 4 bytes, written and read
    again) stay under a quarter of the weight bytes."""
    num_sms = _num_sms() if num_sms is None else num_sms
    kernel = kernel or (os.environ.get("DFLASH_Q8_KERNEL", "").strip().lower() or "wscale")
    if quantized and kernel == "fma":
        block_m = block_m or min(_next_pow2(m), 4)
        block_n = block_n or 128
        block_k = block_k or 64
        dot_blocks = 1
        num_warps = num_warps or 8
        num_stages = num_stages or 3
    elif quantized and kernel == "wscale":  # v2's tiles
        block_m = block_m or min(max(16, _next_pow2(m)), 64)
        block_n = block_n or 128
        block_k = block_k or 128
        dot_blocks = 1
        num_warps = num_warps or (4 if block_m <= 32 else 8)
        num_stages = num_stages or 2
        convert = convert or "cast"
    elif quantized and kernel == "mma":
        # H100 search (BENCHMARKS.md, session 4): M=1 best near BK 256 over 8 blocks a product, 8-16 splits;
        # M=8 with 8 warps; M=16 with BK 128.
        block_m = block_m or min(_next_pow2(m), 64)
        block_n = block_n or 128
        block_k = block_k or (128 if block_m >= 16 else 256)
        dot_blocks = dot_blocks or max(1, min(block_k // Q8_BLOCK, 16 // block_m))
        num_warps = num_warps or (8 if block_m >= 8 else 4)
        num_stages = num_stages or 3
    elif quantized:
        raise ValueError(f"unknown Q8_0 kernel {kernel!r}; expected mma, fma or wscale")
    else:
        kernel = "dense"
        block_m = block_m or min(max(16, _next_pow2(m)), 64)
        block_n = block_n or 64
        block_k = block_k or 128
        dot_blocks = 1
        num_warps = num_warps or (4 if block_m <= 32 else 8)
        num_stages = num_stages or 2
    convert = convert or "asm"
    if quantized and block_k % (Q8_BLOCK * dot_blocks):
        raise ValueError(f"block_k {block_k} is not a multiple of 32 x dot_blocks ({dot_blocks})")
    tiles = -(-m // block_m) * -(-n // block_n)
    k_steps = -(-k // block_k)
    weight_bytes_per_k = 1 if quantized else 2
    per_sm = 8 if quantized and kernel in ("mma", "fma") else 4
    want = num_splits or min(-(-per_sm * num_sms // tiles), k_steps // 2 or 1, 16,
                             max(1, k * weight_bytes_per_k // (16 * m)))
    steps = -(-k_steps // max(1, want))
    num_splits = -(-k_steps // steps)  # every split gets work
    return TileConfig(block_m, block_n, block_k, num_splits, num_warps, num_stages, dot_blocks, convert, swap, kernel)


def invariant_config(k: int, n: int, quantized: bool) -> TileConfig:
    """Tiles for the batch-invariant mode (`pallas_kernels.invariance`): everything fixed by (K, N) alone, so a row's
    products and their order are the same for every M. 64-row tiles (one Hopper warpgroup product; decode at M=1
    is weight-bound either way) and the K splits M=1 would get; Q8_0 always in the 'wscale' kernel."""
    return pick_config(1, k, n, quantized, block_m=64, num_warps=4 if not quantized else 8,
                       kernel="wscale" if quantized else None)


# --- kernels ----------------------------------------------------------------------------------------------------

# int8 -> bf16 for 4 packed values without the (quarter-rate) integer-to-float unit: flip the sign bit (q + 128 as
# a byte), place each byte in the mantissa of 2^23 (f32 bits 0x4B0000uu = 8388608 + q + 128), subtract 8388736, and
# keep the high half of each f32 (exact: |q| <= 128 has at most 8 significant bits). Operands: $0, $1 the bf16 pairs
# (elements 0,1 and 2,3; element 0 in the low half), $2 the four int8 (element 0 in the low byte).
_S8_TO_BF16_PTX = """{
.reg .b32 u, m, f0, f1, f2, f3;
xor.b32 u, $2, 0x80808080;
mov.b32 m, 0x4B000000;
prmt.b32 f0, u, m, 0x7650;
prmt.b32 f1, u, m, 0x7651;
prmt.b32 f2, u, m, 0x7652;
prmt.b32 f3, u, m, 0x7653;
sub.f32 f0, f0, 0f4B000080;
sub.f32 f1, f1, 0f4B000080;
sub.f32 f2, f2, 0f4B000080;
sub.f32 f3, f3, 0f4B000080;
prmt.b32 $0, f0, f1, 0x7632;
prmt.b32 $1, f2, f3, 0x7632;
}"""


_S8_TO_F32_PTX = """{
.reg .b32 u, m;
xor.b32 u, $4, 0x80808080;
mov.b32 m, 0x4B000000;
prmt.b32 $0, u, m, 0x7650;
prmt.b32 $1, u, m, 0x7651;
prmt.b32 $2, u, m, 0x7652;
prmt.b32 $3, u, m, 0x7653;
sub.f32 $0, $0, 0f4B000080;
sub.f32 $1, $1, 0f4B000080;
sub.f32 $2, $2, 0f4B000080;
sub.f32 $3, $3, 0f4B000080;
}"""


def _int8_to_f32(q, convert: str, interpret: bool):
    """Exact int8 -> f32, by the same bit trick as `_S8_TO_BF16_PTX` (four values per instance)."""
    if convert == "asm" and not interpret:
        from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415
        [w] = pl_triton.elementwise_inline_asm(
            _S8_TO_F32_PTX, args=[q], constraints="=f,=f,=f,=f,r", pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(q.shape, jnp.float32)])
        return w
    return q.astype(jnp.float32)


def _int8_to(q, dtype, convert: str, interpret: bool):
    """Exact int8 -> dtype (every int8 is a bf16/f16/f32 value)."""
    if convert == "asm" and dtype == jnp.bfloat16 and not interpret:
        from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415
        [w] = pl_triton.elementwise_inline_asm(
            _S8_TO_BF16_PTX, args=[q], constraints="=r,=r,r", pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(q.shape, jnp.bfloat16)])
        return w
    return q.astype(dtype)


def _q8_kernel(x_ref, q_ref, s_ref, o_ref, *, m: int, k: int, n: int, cfg: TileConfig, steps: int,
               interp: bool):
    """One (BM, BN) output tile over one K split. Each tensor-core product covers D = dot_blocks blocks of 32 inputs
    with R = max(16, D x BM) rows: row r = b * BM + i holds x row i masked to block b's 32 inputs, so product row r
    is x_i . q_b for every output column, still unscaled. The int8 weights convert exactly to bf16 and go straight
    into the product; the f16 scales multiply the (R, BN) f32 partial (d[block b, n] on row r), and the rows of one
    x row are summed at the end. So y = sum_b d_b * (x_b . q_b) in f32: the exact products of llama.cpp's weights,
    with one f32 rounding per block, and no per-weight scale work."""
    load, store = _triton_ops()
    mi, ni, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm, bn, bk, nblk = cfg.block_m, cfg.block_n, cfg.block_k, cfg.dot_blocks
    kd = Q8_BLOCK * nblk  # inputs per product
    groups = bk // kd  # products per loop step
    r_rows = max(16, nblk * bm)
    iota = lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim)  # noqa: E731
    swap = cfg.swap

    # Row r of a product: block rb, x row xrow. Column vectors in the normal orientation, row vectors swapped.
    r = iota((1, r_rows), 1) if swap else iota((r_rows, 1), 0)
    rb, rm = r // bm, r % bm
    xrow = mi * bm + rm
    row_live = (rb < nblk) & (xrow < m)
    if swap:
        kk = iota((kd, 1), 0)  # x'^T is (kd, R)
        cols = ni * bn + iota((bn, 1), 0)  # (BN, 1)
        kq = iota((1, kd), 1)
    else:
        kk = iota((1, kd), 1)  # x' is (R, kd)
        cols = ni * bn + iota((1, bn), 1)  # (1, BN)
        kq = iota((kd, 1), 0)
    x_sel = row_live & (kk // Q8_BLOCK == rb)
    col_ok = cols < n
    nb_k = k // Q8_BLOCK
    blk_first = si * steps * (bk // Q8_BLOCK)

    def body(i, acc):
        for g in range(groups):
            blk0 = blk_first + i * (bk // Q8_BLOCK) + g * nblk  # first 32-block of this product
            k0 = blk0 * Q8_BLOCK
            xs = load(x_ref.at[xrow, k0 + kk], mask=x_sel & (k0 + kk < k), other=0.0)
            if swap:
                qs = load(q_ref.at[k0 + kq, cols], mask=(k0 + kq < k) & col_ok, other=0,
                          eviction_policy="evict_first")  # (BN, kd) int8: W^T
            else:
                qs = load(q_ref.at[k0 + kq, cols], mask=(k0 + kq < k) & col_ok, other=0,
                          eviction_policy="evict_first")  # (kd, BN) int8, streamed once
            ds = load(s_ref.at[blk0 + rb, cols], mask=row_live & (blk0 + rb < nb_k) & col_ok, other=0.0)
            w = _int8_to(qs, xs.dtype, cfg.convert, interp)
            if swap:  # (BN, kd) @ (kd, R)
                p = lax.dot_general(w, xs, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            else:  # (R, kd) @ (kd, BN)
                p = lax.dot_general(xs, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            acc = acc + p * ds.astype(jnp.float32)
        return acc

    acc_shape = (bn, r_rows) if swap else (r_rows, bn)
    acc = lax.fori_loop(0, steps, body, jnp.zeros(acc_shape, jnp.float32))
    out_cols = ni * bn + (iota((1, bn), 1) if not swap else iota((bn, 1), 0))
    if nblk == 1 and r_rows == bm:  # one row per x row: store as is
        rows = mi * bm + (iota((bm, 1), 0) if not swap else iota((1, bm), 1))
        store(o_ref.at[si * m + rows, out_cols], acc, mask=(rows < m) & (out_cols < n))
        return
    for i in range(bm):  # sum the block rows of x row i
        y = jnp.sum(jnp.where(rm == i, acc, 0.0), axis=1 if swap else 0, keepdims=True)
        row = mi * bm + i + jnp.zeros((1, 1), jnp.int32)
        store(o_ref.at[si * m + row, out_cols], y, mask=(row < m) & (out_cols < n))


def _q8_fma_kernel(x_ref, q_ref, s_ref, o_ref, *, m: int, k: int, n: int, cfg: TileConfig, steps: int,
                   interp: bool):
    """Few rows without tensor cores: each weight is dequantized once to f32 (exact: d * q), and every x row of the
    tile multiplies it in registers with f32 FMAs. No shared-memory staging, so many programs share an SM. The
    (nb, 32, BN) tile sums over its blocks in registers each step; the 32 rows are summed at the end."""
    load, store = _triton_ops()
    mi, ni, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    nb = bk // Q8_BLOCK
    iota = lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim)  # noqa: E731
    kidx = iota((nb, Q8_BLOCK, 1), 0) * Q8_BLOCK + iota((nb, Q8_BLOCK, 1), 1)
    sb = iota((nb, 1, 1), 0)
    cols = ni * bn + iota((1, 1, bn), 2)
    col_ok = cols < n
    nb_k = k // Q8_BLOCK
    blk_first = si * steps * nb

    def body(i, accs):
        blk0 = blk_first + i * nb
        k0 = blk0 * Q8_BLOCK
        k_ok = k0 + kidx < k
        qs = load(q_ref.at[k0 + kidx, cols], mask=k_ok & col_ok, other=0, eviction_policy="evict_first")
        ds = load(s_ref.at[blk0 + sb, cols], mask=(blk0 + sb < nb_k) & col_ok, other=0.0)
        w = _int8_to_f32(qs, cfg.convert, interp) * ds.astype(jnp.float32)  # (nb, 32, BN): d * q exactly
        out = []
        for r in range(bm):
            row = mi * bm + r
            xr = load(x_ref.at[row + jnp.zeros_like(kidx), k0 + kidx], mask=k_ok & (row < m), other=0.0)
            out.append(accs[r] + jnp.sum(w * xr.astype(jnp.float32), axis=0))
        return tuple(out)

    accs = lax.fori_loop(0, steps, body, tuple(jnp.zeros((Q8_BLOCK, bn), jnp.float32) for _ in range(bm)))
    out_cols = ni * bn + iota((1, bn), 1)
    for r in range(bm):
        row = mi * bm + r + jnp.zeros((1, 1), jnp.int32)
        store(o_ref.at[si * m + row, out_cols], jnp.sum(accs[r], axis=0, keepdims=True),
              mask=(row < m) & (out_cols < n))


def _q8_wscale_kernel(x_ref, q_ref, s_ref, o_ref, *, m: int, k: int, n: int, cfg: TileConfig, steps: int,
                      interp: bool):
    """Many rows: the (BK, BN) tile is dequantized to f32 (d * q exactly), rounded to x.dtype, and multiplied in one
    tensor-core product per step (v2's scheme). Rounding the weight to bf16 costs up to 2^-9 of each weight."""
    load, store = _triton_ops()
    mi, ni, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = mi * cfg.block_m + lax.broadcasted_iota(jnp.int32, (cfg.block_m, 1), 0)
    cols = ni * cfg.block_n + lax.broadcasted_iota(jnp.int32, (1, cfg.block_n), 1)
    k_row = lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
    k_col = lax.broadcasted_iota(jnp.int32, (cfg.block_k, 1), 0)
    row_ok, col_ok = rows < m, cols < n
    k_first = si * steps * cfg.block_k

    def body(i, acc):
        k0 = k_first + i * cfg.block_k
        xs = load(x_ref.at[rows, k0 + k_row], mask=row_ok & (k0 + k_row < k), other=0.0)
        w_mask = col_ok & (k0 + k_col < k)
        qs = load(q_ref.at[k0 + k_col, cols], mask=w_mask, other=0, eviction_policy="evict_first")
        sc = load(s_ref.at[(k0 + k_col) // Q8_BLOCK, cols], mask=w_mask, other=0.0)
        w = (_int8_to_f32(qs, cfg.convert, interp) * sc.astype(jnp.float32)).astype(xs.dtype)
        return acc + lax.dot_general(xs, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((cfg.block_m, cfg.block_n), jnp.float32))
    store(o_ref.at[si * m + rows, cols], acc, mask=row_ok & col_ok)


def _dense_kernel(x_ref, w_ref, o_ref, *, m: int, k: int, n: int, cfg: TileConfig, steps: int):
    load, store = _triton_ops()
    mi, ni, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = mi * cfg.block_m + lax.broadcasted_iota(jnp.int32, (cfg.block_m, 1), 0)  # (BM, 1)
    cols = ni * cfg.block_n + lax.broadcasted_iota(jnp.int32, (cfg.block_n, 1), 0)  # (BN, 1): rows of W (N, K)
    kk = lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
    row_ok, col_ok = rows < m, cols < n
    k_first = si * steps * cfg.block_k

    def body(i, acc):
        ks = k_first + i * cfg.block_k + kk  # (1, BK)
        k_ok = ks < k
        xs = load(x_ref.at[rows, ks], mask=row_ok & k_ok, other=0.0)  # (BM, BK)
        ws = load(w_ref.at[cols, ks], mask=col_ok & k_ok, other=0.0,
                  eviction_policy="evict_first")  # (BN, BK), streamed once
        return acc + lax.dot_general(xs, ws.astype(xs.dtype), (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((cfg.block_m, cfg.block_n), jnp.float32))
    out_cols = ni * cfg.block_n + lax.broadcasted_iota(jnp.int32, (1, cfg.block_n), 1)
    store(o_ref.at[si * m + rows, out_cols], acc, mask=row_ok & (out_cols < n))


def _call(kernel, x2, weights, m, k, n, cfg: TileConfig, interpret: bool, name: str, **kernel_args):
    steps_total = -(-k // cfg.block_k)
    steps = -(-steps_total // cfg.num_splits)
    grid = (-(-m // cfg.block_m), -(-n // cfg.block_n), cfg.num_splits)
    whole = lambda a: pl.BlockSpec(a.shape, lambda mi, ni, si: (0,) * a.ndim)  # noqa: E731  (indexed in-kernel)
    out_shape = jax.ShapeDtypeStruct((cfg.num_splits * m, n), jnp.float32)
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415
        compiler_params = pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    partials = pl.pallas_call(
        functools.partial(kernel, m=m, k=k, n=n, cfg=cfg, steps=steps, **kernel_args), grid=grid,
        in_specs=[whole(x2)] + [whole(w) for w in weights],
        out_specs=pl.BlockSpec(out_shape.shape, lambda mi, ni, si: (0, 0)), out_shape=out_shape,
        interpret=interpret, compiler_params=compiler_params, name=name)(x2, *weights)
    return ordered_sum(partials.reshape(cfg.num_splits, m, n))


def _check_x(x, k):
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} inputs, the weight {k}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got {x.dtype}")


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def q8_0_matmul_pallas(x: jax.Array, qweight: jax.Array, scales: jax.Array, *, config: TileConfig | None = None,
                       interpret: bool = False) -> jax.Array:
    """`q8_0_matmul_reference`'s product in the Pallas kernel. x (..., K) float; qweight (K, N) int8; scales
    (K/32, N) f16/f32. Returns (..., N) in x.dtype."""
    k, n = qweight.shape
    _check_x(x, k)
    if qweight.dtype != jnp.int8 or k % Q8_BLOCK or scales.shape != (k // Q8_BLOCK, n):
        raise ValueError(f"Q8_0 weight must be (K, N) int8 with K % 32 == 0 and (K/32, N) scales; got "
                         f"{qweight.shape} {qweight.dtype}, scales {scales.shape}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    cfg = config or pick_config(m, k, n, quantized=True)
    kernel = {"mma": _q8_kernel, "fma": _q8_fma_kernel, "wscale": _q8_wscale_kernel}[cfg.kernel]
    y = _call(kernel, x2, (qweight, scales), m, k, n, cfg, interpret, "q8_0_matmul", interp=interpret)
    return y.astype(x.dtype).reshape(*lead, n)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def matmul_pallas(x: jax.Array, weight: jax.Array, *, config: TileConfig | None = None, interpret: bool = False,
                  out_dtype=None) -> jax.Array:
    """x (..., K) @ weight.T for a float weight (N, K) in the Pallas kernel, f32 accumulation -> (..., N) in out_dtype
    (default x.dtype)."""
    n, k = weight.shape
    _check_x(x, k)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    cfg = config or pick_config(m, k, n, quantized=False)
    y = _call(_dense_kernel, x2, (weight,), m, k, n, cfg, interpret, "dense_matmul")
    return y.astype(out_dtype or x.dtype).reshape(*lead, n)


# --- dispatch ---------------------------------------------------------------------------------------------------

# Below this many weight elements the portable kernel stays the invariant mode's choice on Hopper too: SmolLM2's
# products (576 x 960 .. 1536) are launch-bound, and its 8-slot spec step took 2.18 ms with the Mosaic products
# against 1.84 ms with the portable ones (H200). Chosen by (K, N) alone, so a row's kernel never depends on M.
MGPU_MIN_WEIGHT_ELEMS = 4 * 1024 * 1024


def default_impl(quantized: bool = False, invariant: bool = False, weight_elems: int | None = None) -> str:
    """On a GPU: for Q8_0 weights the Mosaic GPU kernel on Hopper (`q8_0_matmul_mgpu`: 1.1-1.6x the portable
    kernel per Qwen3-8B / Qwen3.6-27B layer on an H200, session 9), else the portable Pallas kernel; XLA's own
    product ('reference') for float weights — on an H200 XLA's bf16 product streamed faster than the bf16 kernel
    (65 vs 55 % of copy bandwidth for a Qwen3-8B layer at M=1), while XLA's Q8_0 product (dequantized weights
    materialized) ran at 13 % (BENCHMARKS.md). In the batch-invariant mode (XLA's tiles follow M) fixed-tile
    kernels: on Hopper the Mosaic GPU product for float weights (`weight_matmul_mgpu`: a spec step of the Qwen3-8B
    shape in 10.7 ms against 12.5 ms with the portable kernel at 8 slots, 16.0 against 21.8 ms at 16; H200) for
    weights of at least `MGPU_MIN_WEIGHT_ELEMS` elements, else the portable Pallas kernel. Off GPU:
    the reference. $DFLASH_MATMUL_IMPL (reference|pallas|interpret|mgpu|mgpu_interpret) overrides all of these."""
    env = os.environ.get("DFLASH_MATMUL_IMPL", "").strip().lower()
    if env and env != "auto":
        return env
    if jax.default_backend() != "gpu":
        return "reference"
    if quantized and _is_hopper():
        return "mgpu"
    big = weight_elems is None or weight_elems >= MGPU_MIN_WEIGHT_ELEMS
    if invariant and big and _is_hopper():
        return "mgpu"
    return "pallas" if quantized or invariant else "reference"


def _rows_to_mgpu(x, weight) -> bool:
    """Float products of at least $DFLASH_MGPU_MIN_ROWS rows (a verify's slots x block) sent to the Mosaic kernel
    (outside the batch-invariant mode, Hopper; off by default). On an H200 the 8-slot Qwen3-8B spec step took 13.0
    ms with it (10.96 with $DFLASH_MGPU_WS=1) against XLA's 7.8 (session 18). Sending decode rows' big products
    (gate+up, down) there lost too (session 20: 1 / 8 slots 5.50 / 6.29 ms against XLA's 5.03 / 5.66), so XLA keeps
    them."""
    from pallas_kernels import weight_matmul_mgpu as mg  # noqa: PLC0415
    min_rows = mg.env_int("DFLASH_MGPU_MIN_ROWS", 0)
    return (0 < min_rows <= math.prod(x.shape[:-1]) and jax.default_backend() == "gpu" and _is_hopper()
            and mg.supports(1, weight.shape[1], weight.shape[0], weight.dtype))


def _is_hopper() -> bool:
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def _resolve(impl: str, quantized: bool, invariant: bool = False, weight_elems: int | None = None) -> str:
    impl = default_impl(quantized, invariant, weight_elems) if impl == "auto" else impl
    if impl not in ("reference", "pallas", "interpret", "mgpu", "mgpu_interpret"):
        raise ValueError(f"unknown matmul impl {impl!r}; expected auto, reference, pallas, interpret, mgpu or "
                         "mgpu_interpret")
    return impl


def q8_0_layout() -> str:
    """How Q8_0 Linears store their int8 values, decided when a model is built: 'nk' (N, K) when Q8_0 products run
    in the Mosaic GPU kernel (`$DFLASH_MATMUL_IMPL=mgpu|mgpu_interpret`; its register operand is a K-contiguous
    weight tile), else 'kn' (K, N), the portable kernel's layout. Scales are (K / 32, N) either way."""
    return "nk" if default_impl(quantized=True).startswith("mgpu") else "kn"


# The Mosaic Q8_0 kernel's output tiles are 64 wide: an 'nk' Linear whose output is not (a fused Qwen3.5/3.6
# in_proj: 10240 + 6144 + 48 + 48) keeps zero rows up to the next multiple, so its product still runs in the kernel
# rather than in a per-step transposed copy of the weight.
Q8_NK_ALIGN = 64


def q8_0_stored_out(out_features: int, layout: str) -> int:
    """Output rows a Q8_0 Linear stores in `layout`: padded to `Q8_NK_ALIGN` for 'nk', exact for 'kn'."""
    return -(-out_features // Q8_NK_ALIGN) * Q8_NK_ALIGN if layout == "nk" else out_features


def _in_row_pieces(x, n: int, rows: int, product):
    """product(piece (m, K)) -> (m, N) over any number of rows, `rows` at a time. The Mosaic kernels' rows do not
    depend on the rows beside them (tested bit for bit on the GPU), so pieces keep the batch-invariant mode's
    promise for prefill chunks too."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    outs = [product(x2[r:r + rows]) for r in range(0, x2.shape[0], rows)]
    y = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
    return y.reshape(*lead, n)


def _mgpu_rows(x, weight, invariant: bool, interpret: bool, out_dtype):
    """The Mosaic GPU product over any number of rows, in pieces of the 256 it takes at once."""
    from pallas_kernels import weight_matmul_mgpu as mg  # noqa: PLC0415
    n, k = weight.shape

    def product(piece):
        cfg = mg.invariant_mgpu_config(piece.shape[0], k, n) if invariant else None
        return mg.matmul_mgpu(piece, weight, config=cfg, interpret=interpret, out_dtype=out_dtype)
    return _in_row_pieces(x, n, mg.MAX_ROWS, product)


def prefill_config(k: int, n: int) -> TileConfig:
    """Batch-invariant tiles for prefill steps (the default; $DFLASH_PREFILL_TILES=same opts out): fixed by (K, N)
    alone like `invariant_config`, but for many rows: 128-row tiles and no K split (the decode tiles split K for
    M = 1, which at 512+ rows writes and re-reads f32 partials larger than the weight)."""
    return pick_config(128, k, n, False, block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3,
                       num_splits=1)


def linear(x: jax.Array, weight: jax.Array, *, impl: str = "auto", out_dtype=None) -> jax.Array:
    """x (..., K) @ weight (N, K).T. impl: 'auto' (`default_impl`), 'reference', 'pallas', 'interpret' (the kernel
    in Pallas interpret mode: CPU tests only, slow), 'mgpu' (the Mosaic GPU kernel, Hopper; shapes it does not take
    go to XLA, or to the portable kernel in the batch-invariant mode), 'mgpu_interpret'."""
    invariant = is_batch_invariant()
    auto = impl == "auto"
    impl = _resolve(impl, quantized=False, invariant=invariant, weight_elems=weight.size)
    if auto and impl == "reference" and not invariant and _rows_to_mgpu(x, weight):
        impl = "mgpu"
    if invariant and in_prefill() and prefill_tiles_enabled() and impl != "reference":
        return matmul_pallas(x, weight, config=prefill_config(weight.shape[1], weight.shape[0]),
                             interpret=impl.endswith("interpret"), out_dtype=out_dtype)
    if impl.startswith("mgpu"):
        from pallas_kernels import weight_matmul_mgpu as mg  # noqa: PLC0415
        n, k = weight.shape
        if mg.supports(1, k, n, weight.dtype):
            return _mgpu_rows(x, weight, invariant, impl == "mgpu_interpret", out_dtype)
        # Shapes it does not take: the portable kernel where invariance needs fixed tiles, else XLA's product.
        impl = ("interpret" if impl == "mgpu_interpret" else "pallas") if invariant else "reference"
    if impl == "reference":
        return matmul_reference(x, weight, out_dtype)
    config = invariant_config(weight.shape[1], weight.shape[0], quantized=False) if invariant else None
    return matmul_pallas(x, weight, config=config, interpret=impl == "interpret", out_dtype=out_dtype)


def q8_0_linear(x: jax.Array, qweight: jax.Array, scales: jax.Array, *, impl: str = "auto",
                layout: str = "kn") -> jax.Array:
    """x (..., K) @ dequant(qweight, scales) (K, N), dispatched like `linear`. layout 'nk': qweight is (N, K)
    (`q8_0_layout`), for the Mosaic GPU kernel; shapes it does not take run transposed in the portable kernel
    (batch-invariant mode) or XLA."""
    invariant = is_batch_invariant()
    impl = _resolve(impl, quantized=True, invariant=invariant)
    if layout == "nk":
        from pallas_kernels import q8_0_matmul_mgpu as mq  # noqa: PLC0415
        n, k = qweight.shape
        if impl.startswith("mgpu") and mq.supports_q8(1, k, n):
            pre = mq.use_prescale(math.prod(x.shape[:-1]))
            return _in_row_pieces(x, n, mq.piece_rows(pre), lambda piece: mq.q8_0_matmul_mgpu(
                piece, qweight, scales, config=mq.pick_q8_mgpu_config(piece.shape[0], k, n, prescale=pre),
                interpret=impl == "mgpu_interpret"))
        qweight = qweight.T
        impl = ("interpret" if impl == "mgpu_interpret" else "pallas") if invariant else "reference"
    elif impl.startswith("mgpu"):  # (K, N) values: the portable kernel
        impl = "interpret" if impl == "mgpu_interpret" else "pallas"
    if impl == "reference":
        return q8_0_matmul_reference(x, qweight, scales)
    config = invariant_config(*qweight.shape, quantized=True) if invariant else None
    return q8_0_matmul_pallas(x, qweight, scales, config=config, interpret=impl == "interpret")
