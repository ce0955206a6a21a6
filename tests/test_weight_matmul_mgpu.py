"""The Mosaic GPU weight-streaming product (pallas_kernels/weight_matmul_mgpu.py) against the jnp reference.

CPU: Mosaic GPU's interpret mode (TMA copies, barriers and wgmma simulated) on small shapes, with several K splits,
both tile widths and every row count the engine uses. GPU (marked `gpu`, Hopper only): the compiled kernel at
Qwen3-8B layer shapes, and one row's result not depending on how many rows share the product.
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.weight_matmul_mgpu import (  # noqa: E402
    MgpuConfig,
    invariant_mgpu_config,
    matmul_mgpu,
    pick_mgpu_config,
    supports,
)

MS = (1, 3, 8, 16, 64, 128, 250)


def _inputs(m: int, k: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.bfloat16)
    return x, w


def _reference(x, w):
    return np.asarray(jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32))


@pytest.mark.parametrize("m", MS)
def test_mgpu_matches_reference_interpret(m):
    k, n = 384, 192  # 6 K steps of 64 in 3 splits; N = 3 tiles of 64 or not a multiple of 128
    x, w = _inputs(m, k, n, seed=m)
    cfg = MgpuConfig(block_n=64, block_k=64, num_splits=3, stages=2)
    got = np.asarray(matmul_mgpu(x, w, config=cfg, interpret=True, out_dtype=jnp.float32))
    ref = _reference(x, w)
    assert got.shape == (m, n) and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("m", (1, 8, 64, 128, 250))
def test_warp_specialized_matches_reference_and_the_one_warpgroup_bits_interpret(m):
    """Two compute warpgroups (BN 128, half each) and a memory warpgroup: the reference's result, and bit for bit
    the one-warpgroup kernel's with the same BK and splits (only the rows per CTA differ, not a row's sums)."""
    k, n = 384, 256
    x, w = _inputs(m, k, n, seed=100 + m)
    ws = np.asarray(matmul_mgpu(x, w, config=MgpuConfig(128, 64, 3, 2, warpgroups=2), interpret=True,
                                out_dtype=jnp.float32))
    one = np.asarray(matmul_mgpu(x, w, config=MgpuConfig(64, 64, 3, 2), interpret=True, out_dtype=jnp.float32))
    ref = _reference(x, w)
    np.testing.assert_allclose(ws, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert np.array_equal(ws, one)


def test_warp_specialized_tiles_picked_only_when_asked(monkeypatch):
    """$DFLASH_MGPU_WS=1 picks warpgroups 2 (BN 128) where N has 128-row tiles; the invariant tiles keep their BK
    and splits (a row's sums) either way."""
    monkeypatch.delenv("DFLASH_MGPU_WS", raising=False)
    assert pick_mgpu_config(128, 4096, 12288, num_sms=132).warpgroups == 1
    before = invariant_mgpu_config(128, 4096, 12288, num_sms=132)
    monkeypatch.setenv("DFLASH_MGPU_WS", "1")
    cfg = pick_mgpu_config(128, 4096, 12288, num_sms=132)
    assert (cfg.warpgroups, cfg.block_n) == (2, 128)
    assert pick_mgpu_config(128, 4096, 832, num_sms=132).warpgroups == 1  # N = 832: no 128-row tiles
    after = invariant_mgpu_config(128, 4096, 12288, num_sms=132)
    assert (after.warpgroups, after.block_n) == (2, 128)
    assert (after.block_k, after.num_splits) == (before.block_k, before.num_splits)
    with pytest.raises(ValueError, match="does not tile"):
        x, w = _inputs(2, 128, 64, seed=0)
        matmul_mgpu(x, w, config=MgpuConfig(64, 64, 1, 2, warpgroups=2), interpret=True)


@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (16, 1536, 576), (130, 256, 256)])
def test_mgpu_default_tiles_interpret(m, k, n):
    """The picked tiles (BK 64 for SmolLM2's K = 576, BN 64 for N = 576 or more than 128 rows) and a bf16 output."""
    x, w = _inputs(m, k, n, seed=k + n)
    cfg = pick_mgpu_config(m, k, n, num_sms=8)
    assert k % (cfg.block_k * cfg.num_splits) == 0 and n % cfg.block_n == 0
    got = np.asarray(matmul_mgpu(x, w, config=cfg, interpret=True).astype(jnp.float32))
    ref = _reference(x, w)
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())  # bf16 output rounding


def test_mgpu_supports_and_rejects():
    assert supports(1, 4096, 4096) and supports(256, 576, 192)
    assert not supports(257, 4096, 4096)  # past wgmma's N side
    assert not supports(1, 4096, 1000)  # N not a multiple of 64
    assert not supports(1, 4096, 4096, jnp.float32)
    x, w = _inputs(2, 128, 100, seed=0)
    with pytest.raises(ValueError, match="does not take"):
        matmul_mgpu(x, w, interpret=True)
    with pytest.raises(ValueError, match="does not tile"):
        matmul_mgpu(x, w[:64], config=MgpuConfig(64, 128, 2, 2), interpret=True)


@pytest.mark.parametrize("m,invariant,ws", [(1, False, False), (16, False, False), (128, True, False),
                                            (256, True, False), (128, False, True), (64, True, True)])
def test_mgpu_lowers_for_cuda(m, invariant, ws, monkeypatch):
    """The compiled path through Mosaic GPU's lowering (layout inference included) at Qwen3-8B's down projection,
    with the default, the batch-invariant and the warp-specialized tiles, without running it."""
    k, n = 12288, 4096
    monkeypatch.setenv("DFLASH_MGPU_WS", "1" if ws else "0")
    cfg = invariant_mgpu_config(m, k, n, num_sms=132) if invariant else pick_mgpu_config(m, k, n, num_sms=132)
    assert cfg.warpgroups == (2 if ws else 1)
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), jnp.bfloat16))
    lowered = jax.jit(lambda x, w: matmul_mgpu(x, w, config=cfg)).trace(*args).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 1024), (4096, 12288), (12288, 4096)])
def test_mgpu_qwen3_8b_shapes_gpu(k, n):
    if jax.devices()[0].device_kind.find("H100") < 0 and jax.devices()[0].device_kind.find("H200") < 0:
        pytest.skip("Mosaic GPU wgmma needs Hopper")
    for m in (1, 8, 16, 64, 128, 256):
        x, w = _inputs(m, k, n, seed=m)
        ref = _reference(x, w)
        for warpgroups in (1, 2):
            cfg = pick_mgpu_config(m, k, n, warpgroups=warpgroups)
            got = np.asarray(matmul_mgpu(x, w, config=cfg, out_dtype=jnp.float32))
            np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max(), err_msg=str(cfg))


@pytest.mark.gpu
def test_mgpu_row_independent_of_row_count_gpu():
    """With the same tiles, row i of a product is bit for bit the same whether 1 or 256 rows share it (the
    batch-invariant mode relies on this)."""
    if jax.devices()[0].device_kind.find("H100") < 0 and jax.devices()[0].device_kind.find("H200") < 0:
        pytest.skip("Mosaic GPU wgmma needs Hopper")
    k, n = 4096, 4096
    x, w = _inputs(256, k, n, seed=1)
    cfg = MgpuConfig(block_n=64, block_k=128, num_splits=4, stages=2)  # 256 rows: 2 stages fit
    full = np.asarray(matmul_mgpu(x, w, config=cfg, out_dtype=jnp.float32))
    for m in (1, 8, 16, 128):
        part = np.asarray(matmul_mgpu(x[:m], w, config=cfg, out_dtype=jnp.float32))
        assert np.array_equal(part, full[:m]), f"rows differ at M={m}"


@pytest.mark.parametrize("invariant", [False, True])
def test_linear_dispatch_runs_more_rows_than_one_product_in_pieces(invariant):
    """`linear(impl='mgpu')` takes any row count (pieces of 256 rows) and any shape (others go to XLA, or to the
    portable kernel in the batch-invariant mode)."""
    from pallas_kernels.invariance import batch_invariant
    from pallas_kernels.weight_matmul import linear

    x, w = _inputs(300, 128, 64, seed=3)
    with batch_invariant(invariant):
        got = np.asarray(linear(x.reshape(3, 100, 128), w, impl="mgpu_interpret", out_dtype=jnp.float32))
        odd = np.asarray(linear(x[:5], w[:40], impl="mgpu_interpret", out_dtype=jnp.float32))
    ref = _reference(x, w)
    np.testing.assert_allclose(got.reshape(300, 64), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(odd, _reference(x[:5], w[:40]), rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 1024), (12288, 4096), (4096, 151936), (576, 1536)])
def test_invariant_tiles_fix_the_sum_order_by_shape_alone(k, n):
    """BK and the K splits set a row's order of sums: in the batch-invariant mode they follow (K, N) only, and the
    tiles that follow M (BN, stages) always fit shared memory, up to 256 rows."""
    from pallas_kernels.weight_matmul_mgpu import _max_stages, _rows

    cfgs = [invariant_mgpu_config(m, k, n, num_sms=132) for m in (1, 3, 8, 16, 64, 128, 256)]
    assert len({(c.block_k, c.num_splits) for c in cfgs}) == 1
    assert all(k % (c.block_k * c.num_splits) == 0 for c in cfgs)
    for m, c in zip((1, 3, 8, 16, 64, 128, 256), cfgs):
        assert 1 <= c.stages <= max(1, _max_stages(_rows(m), c.block_n, c.block_k))


@pytest.mark.gpu
def test_verify_rows_go_to_mosaic_when_asked_gpu(monkeypatch):
    """$DFLASH_MGPU_MIN_ROWS=64 outside the invariant mode: a 128-row product compiles to the Mosaic kernel (two
    warpgroups with $DFLASH_MGPU_WS=1) and matches the reference; an 8-row product stays in XLA."""
    if jax.devices()[0].device_kind.find("H100") < 0 and jax.devices()[0].device_kind.find("H200") < 0:
        pytest.skip("Mosaic GPU wgmma needs Hopper")
    from pallas_kernels.invariance import batch_invariant
    from pallas_kernels.weight_matmul import linear

    monkeypatch.setenv("DFLASH_MGPU_MIN_ROWS", "64")
    monkeypatch.setenv("DFLASH_MGPU_WS", "1")
    monkeypatch.delenv("DFLASH_MATMUL_IMPL", raising=False)
    k, n = 4096, 6144
    with batch_invariant(False):
        for m, mosaic in ((128, True), (8, False)):
            x, w = _inputs(m, k, n, seed=m)
            f = jax.jit(lambda a, b: linear(a, b, out_dtype=jnp.float32))
            assert ("mosaic_gpu" in f.lower(x, w).as_text()) == mosaic, m
            ref = _reference(x, w)
            np.testing.assert_allclose(np.asarray(f(x, w)), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
