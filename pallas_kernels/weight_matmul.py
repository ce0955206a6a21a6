"""Weight-streaming matrix products `y = x @ W` for few rows (decode: M = slots; verify: M = slots x block), as portable
Pallas kernels (Triton lowering on GPUs, `interpret=True` on CPU), with bf16/f32 weights or GGUF Q8_0 weights kept as
int8 + one f16 scale per 32 inputs, a `jax.numpy` reference beside each, and a dispatcher.

Weight layouts (no copy at call time; fixed at load):
- float: (N, K) = the HF / GGUF (out, in) layout the dense model stores.
- Q8_0: values (K, N) int8 and scales (K/32, N) f16 — GGUF's block `d * q[i]` (ggml-common.h `block_q8_0`) with the
  32 values of block b of output n at rows 32b..32b+31 of column n. Transposed from the file's (N, K/32) blocks once
  at load so a (BK, BN) tile is BK rows of BN contiguous bytes (coalesced) and its scales BK/32 contiguous rows.

Q8_0 semantics: the weight w = f32(d) * f32(q) (exactly gguf.quants' dequantized value), rounded to the activation
dtype, times x with f32 accumulation. With f32 activations (CPU) that is the exact f32 product of llama.cpp's weights;
with bf16 activations (GPU) it is bit for bit the weight `--weights bf16` would load, so a Q8_0 model computes what
the bf16 model computes while streaming half the bytes. Dequantization happens in registers, tile by tile; the weight
never exists in memory as floats.

Kernel layout. Grid (M tiles, N tiles, K splits); M tiles fastest so the programs that share a weight tile run
together and the second read hits L2. A program loops over its share of K in steps of BK, loads (BM, BK) of x (tiny,
cached) and (BK, BN) of weights (each weight byte read once from HBM), and writes an f32 partial (BM, BN) of its split;
the splits are summed in `jax.numpy` (a fixed order, so results do not depend on scheduling; XLA fuses the sum and the
cast into the consumer). Split-K exists because small M gives few (M, N) tiles: Qwen3-8B's q_proj at M=1 has 32
N tiles of 128 for 132 SMs.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

Q8_BLOCK = 32  # GGUF Q8_0: values per scale

__all__ = ["Q8_BLOCK", "q8_0_dequantize", "matmul_reference", "q8_0_matmul_reference", "matmul_pallas",
           "q8_0_matmul_pallas", "linear", "q8_0_linear", "default_impl", "TileConfig", "pick_config"]


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
    """x (..., K) @ dequant(qweight, scales).astype(x.dtype) (K, N), f32 accumulation -> (..., N) in x.dtype."""
    w = q8_0_dequantize(qweight, scales).astype(x.dtype)
    y = jnp.einsum("...k,kn->...n", x, w, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


# --- tiles ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 2


def _num_sms() -> int:
    d = jax.devices()[0]
    if d.platform != "gpu":
        return 2
    return int(getattr(d, "core_count", 0) or 132)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def pick_config(m: int, k: int, n: int, quantized: bool, num_sms: int | None = None, *, block_n: int | None = None,
                block_k: int | None = None, num_warps: int | None = None, num_stages: int = 2) -> TileConfig:
    """Tiles for an (M, K) x (K, N) product (given tiles are kept; splits always derived). BM >= 16 (the tensor-core
    minimum; rows past M are masked). Splits so that about four programs per SM stream weights, each split walking
    >= 2 K steps to pipeline its loads, and the f32 partials (splits x M x N x 4 bytes, written and read again) stay
    under a quarter of the weight bytes."""
    num_sms = _num_sms() if num_sms is None else num_sms
    block_m = min(max(16, _next_pow2(m)), 64)
    block_n = block_n or (128 if quantized else 64)
    # Q8_0 at 128: the pipelined stage holds the int8 tile and its gathered f16 scales (3 B a weight), and two stages
    # of a 256-deep tile would nearly fill an SM's shared memory.
    block_k = block_k or 128
    tiles = -(-m // block_m) * -(-n // block_n)
    k_steps = -(-k // block_k)
    weight_bytes_per_k = 1 if quantized else 2
    want = min(-(-4 * num_sms // tiles), k_steps // 2 or 1, 16, max(1, k * weight_bytes_per_k // (16 * m)))
    steps = -(-k_steps // max(1, want))
    num_splits = -(-k_steps // steps)  # every split gets work
    num_warps = num_warps or (4 if block_m <= 32 else 8)
    return TileConfig(block_m, block_n, block_k, num_splits, num_warps, num_stages)


# --- kernels ----------------------------------------------------------------------------------------------------

def _q8_kernel(x_ref, q_ref, s_ref, o_ref, *, m: int, k: int, n: int, cfg: TileConfig, steps: int):
    load, store = _triton_ops()
    mi, ni, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = mi * cfg.block_m + lax.broadcasted_iota(jnp.int32, (cfg.block_m, 1), 0)  # (BM, 1)
    cols = ni * cfg.block_n + lax.broadcasted_iota(jnp.int32, (1, cfg.block_n), 1)  # (1, BN)
    k_row = lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)  # (1, BK)
    k_col = lax.broadcasted_iota(jnp.int32, (cfg.block_k, 1), 0)  # (BK, 1)
    row_ok, col_ok = rows < m, cols < n
    k_first = si * steps * cfg.block_k

    def body(i, acc):
        k0 = k_first + i * cfg.block_k
        x_mask = jnp.broadcast_to(row_ok & (k0 + k_row < k), (cfg.block_m, cfg.block_k))
        w_mask = jnp.broadcast_to(col_ok & (k0 + k_col < k), (cfg.block_k, cfg.block_n))
        xs = load(x_ref.at[rows, k0 + k_row], mask=x_mask, other=0.0)  # (BM, BK)
        qs = load(q_ref.at[k0 + k_col, cols], mask=w_mask, other=0,
                  eviction_policy="evict_first")  # (BK, BN) int8, streamed once
        # Each scale row serves 32 weight rows: these loads hit L1 after the first.
        sc = load(s_ref.at[(k0 + k_col) // Q8_BLOCK, cols], mask=w_mask, other=0.0)  # (BK, BN)
        w = (qs.astype(jnp.float32) * sc.astype(jnp.float32)).astype(xs.dtype)
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


def _call(kernel, x2, weights, m, k, n, cfg: TileConfig, interpret: bool, name: str):
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
        functools.partial(kernel, m=m, k=k, n=n, cfg=cfg, steps=steps), grid=grid,
        in_specs=[whole(x2)] + [whole(w) for w in weights],
        out_specs=pl.BlockSpec(out_shape.shape, lambda mi, ni, si: (0, 0)), out_shape=out_shape,
        interpret=interpret, compiler_params=compiler_params, name=name)(x2, *weights)
    return partials.reshape(cfg.num_splits, m, n).sum(axis=0)


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
    y = _call(_q8_kernel, x2, (qweight, scales), m, k, n, cfg, interpret, "q8_0_matmul")
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

def default_impl(quantized: bool = False) -> str:
    """On a GPU: the Pallas kernel for Q8_0 weights and XLA's own product ('reference') for float weights — on an
    H200 XLA's bf16 product streamed faster than the bf16 kernel (65 vs 55 % of copy bandwidth for a Qwen3-8B layer
    at M=1), while XLA's Q8_0 product (dequantized weights materialized) ran at 13 %, below the Q8_0 kernel
    (BENCHMARKS.md). Off GPU: the reference. $DFLASH_MATMUL_IMPL (reference|pallas|interpret) overrides both."""
    env = os.environ.get("DFLASH_MATMUL_IMPL", "").strip().lower()
    if env and env != "auto":
        return env
    if jax.default_backend() != "gpu":
        return "reference"
    return "pallas" if quantized else "reference"


def _resolve(impl: str, quantized: bool) -> str:
    impl = default_impl(quantized) if impl == "auto" else impl
    if impl not in ("reference", "pallas", "interpret"):
        raise ValueError(f"unknown matmul impl {impl!r}; expected auto, reference, pallas or interpret")
    return impl


def linear(x: jax.Array, weight: jax.Array, *, impl: str = "auto", out_dtype=None) -> jax.Array:
    """x (..., K) @ weight (N, K).T. impl: 'auto' (`default_impl`), 'reference', 'pallas', 'interpret' (the kernel
    in Pallas interpret mode: CPU tests only, slow)."""
    impl = _resolve(impl, quantized=False)
    if impl == "reference":
        return matmul_reference(x, weight, out_dtype)
    return matmul_pallas(x, weight, interpret=impl == "interpret", out_dtype=out_dtype)


def q8_0_linear(x: jax.Array, qweight: jax.Array, scales: jax.Array, *, impl: str = "auto") -> jax.Array:
    """x (..., K) @ dequant(qweight, scales) (K, N), dispatched like `linear`."""
    impl = _resolve(impl, quantized=True)
    if impl == "reference":
        return q8_0_matmul_reference(x, qweight, scales)
    return q8_0_matmul_pallas(x, qweight, scales, interpret=impl == "interpret")
