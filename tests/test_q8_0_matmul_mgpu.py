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
    DECODE_SPLIT_K,
    Q8MgpuConfig,
    pick_q8_mgpu_config,
    q8_0_matmul_mgpu,
    supports_q8,
)
from pallas_kernels.invariance import batch_invariant, prefill_phase  # noqa: E402
from pallas_kernels.weight_matmul import q8_0_matmul_reference  # noqa: E402

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


@pytest.mark.parametrize("m,blocks", [(m, 2) for m in MS] + [(3, 1), (1, 4), (8, 4), (128, 4)])
def test_q8_mgpu_matches_gguf_interpret(m, blocks):
    """4 blocks per step: the 128-byte swizzled weight rows, loaded whole and cut into blocks in registers."""
    k, n = 256, 128  # 8 Q8_0 blocks: 2 splits of 2 steps of 2 blocks (or 4 steps of 1, 1 step of 4); 2 tiles of 64
    x, q, s, deq = _inputs(m, k, n, seed=m)
    cfg = Q8MgpuConfig(64, 2, 2 if blocks < 4 else 1, blocks, swizzle=128 if blocks == 4 else 32)
    got = np.asarray(q8_0_matmul_mgpu(x, q, s, config=cfg, interpret=True, out_dtype=jnp.float32))
    ref = _reference(x, deq)
    assert got.shape == (m, n) and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("m,block_n", [(6, 64), (24, 128)])
def test_q8_mgpu_default_tiles_and_leading_dims_interpret(m, block_n):
    """Picked tiles (64-row tiles up to 16 rows, else 128; one split on a small GPU), (B, T, K) activations and a
    bf16 output."""
    k, n = 128, 256
    x, q, s, deq = _inputs(m, k, n, seed=7)
    cfg = pick_q8_mgpu_config(m, k, n, num_sms=2)
    assert (cfg.block_n, cfg.num_splits, cfg.stages, cfg.blocks, cfg.swizzle) == (block_n, 1, 1, 4, 128)
    got = np.asarray(q8_0_matmul_mgpu(x.reshape(2, m // 2, k), q, s, config=cfg, interpret=True)
                     .astype(jnp.float32))
    ref = _reference(x, deq).reshape(2, m // 2, n)
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())  # bf16 output rounding


@pytest.mark.parametrize("m,block_n,prescale", [(1, 64, False), (8, 128, False), (64, 64, False),
                                                 (128, None, False), (256, 128, False), (1, None, True),
                                                 (128, 128, True)])
def test_q8_mgpu_lowers_for_cuda(m, block_n, prescale):
    """The GPU path (register operand, 4 blocks per step, up to 16 in flight) through Mosaic GPU's lowering at
    Qwen3-8B's down projection, without running it."""
    k, n = 12288, 4096
    cfg = pick_q8_mgpu_config(m, k, n, num_sms=132, block_n=block_n, prescale=prescale)
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), jnp.int8),
            jax.ShapeDtypeStruct((k // 32, n), jnp.float16))
    lowered = jax.jit(lambda x, q, s: q8_0_matmul_mgpu(x, q, s, config=cfg)).trace(*args).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("split_k", ["0", "2560", "1280"])
def test_q8_mgpu_split_count_follows_shape_not_rows(split_k, monkeypatch):
    """A row's summation order is its K split: the count must not change with M (the batch-invariant mode relies on
    it) for either variant, and no split may exceed the setting where the shape allows it; prefill steps keep the
    rule they were timed with unless their own setting says otherwise. 27B and 8B shapes."""
    shapes = [(5120, 12288), (5120, 1024), (6144, 5120), (5120, 10240), (5120, 17408), (17408, 5120), (4096, 12288),
              (12288, 4096), (4096, 1024)]
    monkeypatch.setenv("DFLASH_Q8_SPLIT_K", "0")
    old = {s: pick_q8_mgpu_config(256, *s, num_sms=132, prescale=True) for s in shapes}
    monkeypatch.setenv("DFLASH_Q8_SPLIT_K", split_k)
    for k, n in shapes:
        with batch_invariant(True):
            splits = {pick_q8_mgpu_config(m, k, n, num_sms=132, prescale=pre).num_splits
                      for m in (1, 2, 8, 16, 17, 64, 128, 256) for pre in (False, True)}
        assert len(splits) == 1, (k, n, splits)
        fixed = splits.pop()
        assert int(split_k) == 0 or k // fixed <= int(split_k)
        with batch_invariant(False):  # outside the mode, decode rows take the decode splits
            assert pick_q8_mgpu_config(17, k, n, num_sms=132).num_splits == fixed
            decode = {pick_q8_mgpu_config(m, k, n, num_sms=132).num_splits for m in (1, 8, 16)}
            assert len(decode) == 1 and k // decode.pop() <= DECODE_SPLIT_K, (k, n)
        with prefill_phase():
            assert pick_q8_mgpu_config(256, k, n, num_sms=132, prescale=True) == old[k, n]
            monkeypatch.setenv("DFLASH_Q8_PREFILL_SPLIT_K", split_k)
            cfg = pick_q8_mgpu_config(256, k, n, num_sms=132, prescale=True)
            assert int(split_k) == 0 or k // cfg.num_splits <= int(split_k)
            monkeypatch.delenv("DFLASH_Q8_PREFILL_SPLIT_K")


def test_q8_mgpu_picks_and_rejects():
    cfg = pick_q8_mgpu_config(1, 4096, 4096, num_sms=132)
    assert cfg.block_n == 64 and cfg.blocks == 4 and 64 * cfg.num_splits >= 132 and 32 % cfg.num_splits == 0
    assert pick_q8_mgpu_config(8, 4096, 24576, num_sms=132).block_n == 64
    assert pick_q8_mgpu_config(8, 4096, 24576, num_sms=132, prescale=True).block_n == 128
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
        with batch_invariant(True):
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


def test_q8_mgpu_prescaled_is_the_bf16_weight_product_interpret():
    """The pre-scaled variant ($DFLASH_Q8_PRESCALE): each weight rounded to bf16 after scaling, as
    `q8_0_matmul_reference` computes; 128-row tiles up to M = 128. (Row bits across M are a GPU test: the
    interpreter's products of bf16 weights sum in an order that follows the shape.)"""
    assert pick_q8_mgpu_config(128, 5120, 17408, num_sms=132, prescale=True).block_n == 128
    k, n = 256, 256
    x, q, s, _ = _inputs(128, k, n, seed=6)
    cfgs = {m: pick_q8_mgpu_config(m, k, n, num_sms=4, prescale=True) for m in (1, 64, 128)}
    assert all(c.prescale and c.block_n == 128 for c in cfgs.values())
    full = np.asarray(q8_0_matmul_mgpu(x, q, s, config=cfgs[128], interpret=True, out_dtype=jnp.float32))
    want = np.asarray(q8_0_matmul_reference(x, q.T, s).astype(jnp.float32))  # bf16 output: compare loosely
    np.testing.assert_allclose(full, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    exact = np.asarray(x, np.float32) @ np.asarray(q8_0_matmul_reference(jnp.eye(k, dtype=jnp.bfloat16), q.T, s),
                                                   np.float32)  # the bf16-rounded weights, f32 products
    np.testing.assert_allclose(full, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


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
@pytest.mark.parametrize("prescale", [False, True])
def test_q8_mgpu_row_independent_of_row_count_gpu(prescale):
    if not _is_hopper():
        pytest.skip("Mosaic GPU wgmma needs Hopper")
    for k, n in ((4096, 4096), (5120, 17408)):
        x, q, s, _ = _inputs(128, k, n, seed=1)
        with batch_invariant(True):  # outside the mode, up to 16 rows may take more K splits
            cfg = {m: pick_q8_mgpu_config(m, k, n, prescale=prescale) for m in (1, 8, 16, 40, 64, 128)}
        full = np.asarray(q8_0_matmul_mgpu(x, q, s, config=cfg[128], out_dtype=jnp.float32))  # each M its tiles
        if prescale:
            np.testing.assert_allclose(full, np.asarray(x, np.float32) @ np.asarray(
                q8_0_matmul_reference(jnp.eye(k, dtype=jnp.bfloat16), q.T, s), np.float32), rtol=1e-4,
                atol=1e-4 * np.abs(full).max())
        for m in (1, 8, 16, 40, 64):
            part = np.asarray(q8_0_matmul_mgpu(x[:m], q, s, config=cfg[m], out_dtype=jnp.float32))
            assert np.array_equal(part, full[:m]), f"rows differ at M={m}, K={k}, N={n}"


@pytest.mark.parametrize("prescale", ["0", "1"])
def test_q8_linear_runs_any_row_count_in_pieces_interpret(prescale, monkeypatch):
    """The layer's product over 300 rows: pieces of `piece_rows` (128, or 256 pre-scaled), each a row-independent
    call, together the product of the whole."""
    from pallas_kernels.q8_0_matmul_mgpu import piece_rows, use_prescale
    from pallas_kernels.weight_matmul import q8_0_linear

    monkeypatch.setenv("DFLASH_Q8_PRESCALE", prescale)
    assert piece_rows(use_prescale(300)) == (256 if prescale == "1" else 128)
    x, q, s, deq = _inputs(300, 128, 128, seed=9)
    got = np.asarray(q8_0_linear(x.reshape(3, 100, 128), q, s, impl="mgpu_interpret", layout="nk")
                     .astype(jnp.float32)).reshape(300, 128)
    ref = _reference(x, deq)
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def test_q8_prescale_choice(monkeypatch):
    """Pre-scaled where it wins (H200: from 64 rows, and every prefill step); in the batch-invariant mode decode
    rows follow the engine's one choice, never the row count; $DFLASH_Q8_PRESCALE overrides everything."""
    from pallas_kernels.invariance import batch_invariant, prefill_phase, q8_prescale
    from pallas_kernels.q8_0_matmul_mgpu import PRESCALE_MIN_ROWS, use_prescale

    monkeypatch.delenv("DFLASH_Q8_PRESCALE", raising=False)
    monkeypatch.delenv("DFLASH_BATCH_INVARIANT", raising=False)
    monkeypatch.delenv("DFLASH_PREFILL_TILES", raising=False)
    assert [use_prescale(m) for m in (1, 8, PRESCALE_MIN_ROWS - 1, PRESCALE_MIN_ROWS, 256)] == [0, 0, 0, 1, 1]
    with prefill_phase(True):
        assert use_prescale(1) and use_prescale(512)
    with batch_invariant(True):
        assert not use_prescale(128) and not use_prescale(1)
        with q8_prescale(True):
            assert use_prescale(1) and use_prescale(128)
            with prefill_phase(True):
                assert use_prescale(16)
        with q8_prescale(False), prefill_phase(True):
            assert use_prescale(16)
    monkeypatch.setenv("DFLASH_PREFILL_TILES", "same")
    with prefill_phase(True):
        assert not use_prescale(16) and use_prescale(PRESCALE_MIN_ROWS)
        with batch_invariant(True):
            assert not use_prescale(256)
    monkeypatch.setenv("DFLASH_Q8_PRESCALE", "0")
    with prefill_phase(True):
        assert not use_prescale(256)
    monkeypatch.setenv("DFLASH_Q8_PRESCALE", "on")
    assert use_prescale(1)


@pytest.mark.parametrize("m,prescale", [(1, False), (3, False), (5, True), (8, False)])
def test_q8_mgpu_unpadded_rows_interpret(m, prescale, monkeypatch):
    """$DFLASH_Q8_UNPADDED: x reaches the kernel with its own rows, the tile's rows past them read as zeros; the
    valid rows are bit for bit those of the padded call. Lowered for CUDA too at Qwen3-8B's down projection."""
    k, n = 256, 128
    x, q, s, _ = _inputs(m, k, n, seed=11)
    cfg = Q8MgpuConfig(64, 2, 2, 2, prescale=prescale)
    monkeypatch.delenv("DFLASH_Q8_UNPADDED", raising=False)
    padded = np.asarray(q8_0_matmul_mgpu(x, q, s, config=cfg, interpret=True, out_dtype=jnp.float32))
    monkeypatch.setenv("DFLASH_Q8_UNPADDED", "1")
    jax.clear_caches()  # the setting is read when the product is traced
    got = np.asarray(q8_0_matmul_mgpu(x, q, s, config=cfg, interpret=True, out_dtype=jnp.float32))
    np.testing.assert_array_equal(got, padded)
    kk, nn = 12288, 4096
    args = (jax.ShapeDtypeStruct((m, kk), jnp.bfloat16), jax.ShapeDtypeStruct((nn, kk), jnp.int8),
            jax.ShapeDtypeStruct((kk // 32, nn), jnp.float16))
    big = pick_q8_mgpu_config(m, kk, nn, num_sms=132, prescale=prescale)
    lowered = jax.jit(lambda a, b, c: q8_0_matmul_mgpu(a, b, c, config=big)).trace(*args).lower(
        lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "mosaic_gpu" in text and "stablehlo.pad" not in text
