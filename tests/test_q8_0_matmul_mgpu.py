"""The Mosaic GPU Q8_0 product (pallas_kernels/q8_0_matmul_mgpu.py) against weights quantized by gguf.quants.

CPU: Mosaic GPU's interpret mode on small shapes with several K splits, both tile widths and every row count the
engine uses (the interpreter's wgmma takes its operands from shared memory, so there the widened weight tile is
staged through it; on the GPU it is the register operand), and the real kernel lowered for CUDA at Qwen3-8B shapes
(Mosaic GPU's layout inference runs without a GPU). GPU (marked `gpu`, Hopper only): the compiled kernel at Qwen3-8B
shapes, and a row's bits not depending on how many rows share the product.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from converters.gguf_file import TensorInfo  # noqa: E402
from converters.tensor_map import q8_0_blocks  # noqa: E402
from pallas_kernels.q8_0_matmul_mgpu import (  # noqa: E402
    Q8MgpuConfig,
    pick_q8_mgpu_config,
    q8_0_matmul_mgpu,
    supports_q8,
)

Q8 = gguf.GGMLQuantizationType.Q8_0
MS = (1, 3, 8, 16, 64, 128, 256)


def _inputs(m: int, k: int, n: int, seed: int):
    """x (M, K) bf16; the weight (N, K) quantized by gguf.quants -> int8 (N, K), scales (K / 32, N) f16, and
    gguf.quants' dequantized float32 (N, K)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    w[0, :32] = 0.0  # an all-zero block: d = 0
    raw = gguf.quants.quantize(w, Q8)
    values, scales = q8_0_blocks(TensorInfo("w", (n, k), Q8, raw))
    deq = gguf.quants.dequantize(raw, Q8).reshape(n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    return x, jnp.asarray(values), jnp.asarray(scales.T.copy()), deq


def _reference(x, deq):
    return np.asarray(x, np.float64) @ deq.astype(np.float64).T


def _is_hopper() -> bool:
    return any(s in jax.devices()[0].device_kind for s in ("H100", "H200"))


@pytest.mark.parametrize("m,blocks", [(m, 2) for m in MS] + [(3, 1)])
def test_q8_mgpu_matches_gguf_interpret(m, blocks):
    k, n = 256, 128  # 8 Q8_0 blocks: 2 splits of 2 steps of 2 blocks (or 4 steps of 1); 2 tiles of 64 rows
    x, q, s, deq = _inputs(m, k, n, seed=m)
    got = np.asarray(q8_0_matmul_mgpu(x, q, s, config=Q8MgpuConfig(64, 2, 2, blocks), interpret=True,
                                      out_dtype=jnp.float32))
    ref = _reference(x, deq)
    assert got.shape == (m, n) and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_q8_mgpu_default_tiles_and_leading_dims_interpret():
    """Picked tiles (128-row tiles, one split on a small GPU), (B, T, K) activations and a bf16 output."""
    k, n = 128, 256
    x, q, s, deq = _inputs(6, k, n, seed=7)
    cfg = pick_q8_mgpu_config(6, k, n, num_sms=2)
    assert (cfg.block_n, cfg.num_splits, cfg.stages, cfg.blocks) == (128, 1, 1, 4)
    got = np.asarray(q8_0_matmul_mgpu(x.reshape(2, 3, k), q, s, config=cfg, interpret=True).astype(jnp.float32))
    ref = _reference(x, deq).reshape(2, 3, n)
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())  # bf16 output rounding


@pytest.mark.parametrize("m,block_n", [(1, 64), (8, 128), (64, 64), (128, None), (256, 128)])
def test_q8_mgpu_lowers_for_cuda(m, block_n):
    """The GPU path (register operand, 4 blocks per step, up to 16 in flight) through Mosaic GPU's lowering at
    Qwen3-8B's down projection, without running it."""
    k, n = 12288, 4096
    cfg = pick_q8_mgpu_config(m, k, n, num_sms=132, block_n=block_n)
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), jnp.int8),
            jax.ShapeDtypeStruct((k // 32, n), jnp.float16))
    lowered = jax.jit(lambda x, q, s: q8_0_matmul_mgpu(x, q, s, config=cfg)).trace(*args).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_q8_mgpu_picks_and_rejects():
    cfg = pick_q8_mgpu_config(1, 4096, 4096, num_sms=132)
    assert cfg.block_n == 64 and cfg.blocks == 4 and 64 * cfg.num_splits >= 132 and 32 % cfg.num_splits == 0
    assert pick_q8_mgpu_config(8, 4096, 24576, num_sms=132).block_n == 128
    assert supports_q8(256, 4096, 4096) and not supports_q8(257, 4096, 4096) and not supports_q8(1, 4096, 1000)
    x, q, s, _ = _inputs(2, 64, 128, seed=0)
    with pytest.raises(ValueError, match="expected"):
        q8_0_matmul_mgpu(x, q.T, s, interpret=True)  # the (K, N) layout of weight_matmul, not this kernel's
    x, q, s, _ = _inputs(2, 64, 64, seed=0)
    with pytest.raises(ValueError, match="does not tile"):
        q8_0_matmul_mgpu(x, q, s, config=Q8MgpuConfig(128, 1, 2), interpret=True)


def test_q8_mgpu_tiles_by_rows_keep_registers_and_row_bits_interpret():
    """Larger M takes fewer blocks per step, then 64-row tiles, so the accumulators stay in registers; the K splits
    stay those of M = 1, and a row comes out in the same bits under every M's tiles."""
    from pallas_kernels.q8_0_matmul_mgpu import _ACC_REG_BUDGET, _acc_regs

    for k, n in ((5120, 17408), (17408, 5120), (4096, 12288), (4096, 1024)):
        one = pick_q8_mgpu_config(1, k, n, num_sms=132)
        for m in (8, 16, 32, 64, 128):
            cfg = pick_q8_mgpu_config(m, k, n, num_sms=132)
            assert cfg.num_splits == one.num_splits and _acc_regs(cfg.block_n, m, cfg.blocks) <= _ACC_REG_BUDGET
    assert pick_q8_mgpu_config(128, 5120, 17408, num_sms=132).block_n == 64
    k, n = 256, 256
    x, q, s, deq = _inputs(128, k, n, seed=5)
    cfgs = {m: pick_q8_mgpu_config(m, k, n, num_sms=4) for m in (1, 64, 128)}
    assert len({(c.block_n, c.blocks) for c in cfgs.values()}) == 3
    full = np.asarray(q8_0_matmul_mgpu(x, q, s, config=cfgs[128], interpret=True, out_dtype=jnp.float32))
    np.testing.assert_allclose(full, _reference(x, deq), rtol=1e-5, atol=1e-5 * np.abs(full).max())
    for m in (1, 64):
        part = np.asarray(q8_0_matmul_mgpu(x[:m], q, s, config=cfgs[m], interpret=True, out_dtype=jnp.float32))
        assert np.array_equal(part, full[:m]), f"rows differ between the tiles of M={m} and M=128"


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 4096), (4096, 24576), (12288, 4096)])
def test_q8_mgpu_qwen3_8b_shapes_gpu(k, n):
    if not _is_hopper():
        pytest.skip("Mosaic GPU wgmma needs Hopper")
    for m in (1, 8, 16, 64, 128, 256):
        x, q, s, deq = _inputs(m, k, n, seed=m)
        got = np.asarray(q8_0_matmul_mgpu(x, q, s, out_dtype=jnp.float32))
        ref = _reference(x, deq)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.gpu
def test_q8_mgpu_row_independent_of_row_count_gpu():
    if not _is_hopper():
        pytest.skip("Mosaic GPU wgmma needs Hopper")
    for k, n in ((4096, 4096), (5120, 17408)):
        x, q, s, _ = _inputs(128, k, n, seed=1)
        full = np.asarray(q8_0_matmul_mgpu(x, q, s, out_dtype=jnp.float32))  # each M its own picked tiles
        for m in (1, 8, 16, 40, 64):
            part = np.asarray(q8_0_matmul_mgpu(x[:m], q, s, out_dtype=jnp.float32))
            assert np.array_equal(part, full[:m]), f"rows differ at M={m}, K={k}, N={n}"
