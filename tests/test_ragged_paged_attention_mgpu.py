"""The Mosaic GPU ragged paged attention kernel (pallas_kernels/ragged_paged_attention_mgpu.py) against the jnp
reference, through the dispatcher (`impl="mgpu"`, `"mgpu_interpret"`).

CPU: Mosaic GPU's interpret mode on decode and verify runs (GQA 1, 2 and 4, kv_len not a page multiple, kv_len =
q_len, q_len < T, padded slots, head dims 64, 128 and 256), the drafter's context part, prefill chunks handed to the
portable kernel, and the kernel lowered for CUDA at Qwen3-8B sizes (Mosaic GPU's layout inference runs without a
GPU). The kernel copies whole pages, so a page's stale tail is read and masked, not skipped: the stale positions
hold 1e4 here (finite, so a masked probability of 0 times them is 0, and any leak into the softmax shows).
GPU (marked `gpu`, Hopper only): engine-sized cases, and a verify row equal bit for bit to the same query decoded
alone in the batch-invariant mode.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.invariance import batch_invariant  # noqa: E402
from pallas_kernels.paged_attention import drafter_attention_reference  # noqa: E402
from pallas_kernels.ragged_paged_attention import drafter_attention, ragged_paged_attention  # noqa: E402
from pallas_kernels.ragged_paged_attention_mgpu import (  # noqa: E402
    mgpu_partials,
    pick_splits,
    pick_tiles,
    ragged_paged_attention_mgpu,
    supports_mgpu,
)
from tests.test_ragged_paged_attention import check_paged, make_case, make_drafter_case  # noqa: E402

STALE = 1e4


def finite_stale(args: dict) -> dict:
    return {**args, "k_pages": jnp.where(jnp.isnan(args["k_pages"]), STALE, args["k_pages"]).astype(jnp.bfloat16),
            "v_pages": jnp.where(jnp.isnan(args["v_pages"]), STALE, args["v_pages"]).astype(jnp.bfloat16)}


# (name, q_lens, kv_lens, T, N, K, H, max_pages, kernel kwargs); 16-token pages
CASES = [
    ("decode_g4_h64", [1, 1, 0, 1], [37, 1, 0, 64], 1, 8, 2, 64, 5, dict(num_splits=2, pages_per_step=2)),
    ("verify_g1_h128", [16, 16, 7, 0], [16, 45, 30, 0], 16, 2, 2, 128, 4, dict(num_splits=3, pages_per_step=1)),
    ("verify_g4_h64", [16, 16], [100, 16], 16, 8, 2, 64, 8, dict(num_splits=2, pages_per_step=2)),
    ("verify_g2_h256", [4, 2, 0], [40, 2, 0], 4, 4, 2, 256, 3, dict(num_splits=1, pages_per_step=2)),
]


@pytest.mark.parametrize("table_in_smem", [False, True], ids=["table-gmem", "table-smem"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_mgpu_interpret_matches_reference(case, table_in_smem):
    """Both ways of finding pages: the page table read in global memory per copy, or each split's entries copied
    to shared memory first (CASES' max_pages / splits / pages_per_step leave ragged runs, so the table is padded)."""
    _, q_lens, kv_lens, t, n, k, h, m, kw = case
    args, clean = make_case(zlib.crc32(case[0].encode()), q_lens=q_lens, kv_lens=kv_lens, t=t, n=n, k=k, h=h,
                            page_size=16, max_pages=m)
    args = finite_stale(args)
    check_paged(args, clean, ragged_paged_attention_mgpu(**args, interpret=True, table_in_smem=table_in_smem, **kw))


def test_dispatcher_runs_mgpu_for_decode_and_verify_and_portable_for_chunks(monkeypatch):
    monkeypatch.setenv("DFLASH_ATTENTION_IMPL", "mgpu_interpret")
    args, clean = make_case(3, q_lens=[1, 1], kv_lens=[20, 33], t=1, n=4, k=2, h=64, page_size=16, max_pages=3)
    check_paged(finite_stale(args), clean, ragged_paged_attention(**finite_stale(args)))
    # 32 queries x 4 heads = 128 rows: more than one tile, so the portable kernel (interpreted) takes it
    assert not supports_mgpu(32, 8, 2, 64, 16, jnp.bfloat16)
    args, clean = make_case(4, q_lens=[32, 9], kv_lens=[50, 9], t=32, n=8, k=2, h=64, page_size=16, max_pages=4)
    check_paged(args, clean, ragged_paged_attention(**args))


def test_drafter_context_through_mgpu_interpret():
    args, clean = make_drafter_case(7, [45, 3, 0], t=8, n=8, k=2, h=64, page_size=16, max_pages=4)
    q, kb, vb, kp, vp, pt, cl = args
    kp, vp = (jnp.where(jnp.isnan(x), STALE, x).astype(jnp.bfloat16) for x in (kp, vp))
    for ctx_window, causal_window in ((None, None), (24, 6)):
        out = drafter_attention(q, kb, vb, kp, vp, pt, cl, ctx_window, causal_window, impl="mgpu_interpret")
        ref = drafter_attention_reference(q, kb, vb, clean[0], clean[1], pt, cl, ctx_window, causal_window)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)


def test_splits():
    assert pick_splits(8, 8, 2048, 4, num_sms=132) == 4  # 64 programs: two per SM
    assert pick_splits(32, 8, 2048, 4, num_sms=132) == 1
    assert pick_splits(1, 8, 2, 4, num_sms=132) == 1  # never more splits than pipeline steps
    assert pick_splits(8, 8, 2048, 4, invariant=True) == pick_splits(1, 1, 2048, 4, invariant=True) == 16


@pytest.mark.parametrize("table_in_smem", [False, True], ids=["table-gmem", "table-smem"])
@pytest.mark.parametrize("t,h", [(1, 128), (16, 128), (16, 64), (4, 256)])
def test_mgpu_lowers_for_cuda(t, h, table_in_smem):
    """The GPU path (P as the register operand, pages found through the page table in GMEM) through Mosaic GPU's
    lowering at 8 slots x 32K keys with the default tiles (shared memory checked), without running it."""
    pages_per_step, stages = pick_tiles(h, 16)
    b, n, k, page, max_pages = 8, 32 if h < 256 else 8, 8 if h < 256 else 4, 16, 2048
    pool = b * max_pages + 1
    args = (jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16), jax.ShapeDtypeStruct((pool, page, k, h), jnp.bfloat16),
            jax.ShapeDtypeStruct((pool, page, k, h), jnp.bfloat16), jax.ShapeDtypeStruct((b, max_pages), jnp.int32),
            jax.ShapeDtypeStruct((b, 8), jnp.int32))
    f = jax.jit(lambda *a: mgpu_partials(*a, scale=h ** -0.5, num_splits=4, pages_per_step=pages_per_step,
                                         stages=stages, table_in_smem=table_in_smem))
    assert "mosaic_gpu" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


# ---- GPU -------------------------------------------------------------------------------------------------------

def _hopper() -> bool:
    return any(s in jax.devices()[0].device_kind for s in ("H100", "H200"))


GPU_CASES = CASES + [
    ("decode_qwen3_8b", [1, 1, 1, 0, 1, 1, 1, 1], [3000, 1, 4096, 0, 17, 2049, 512, 4095], 1, 32, 8, 128, 256, {}),
    ("verify_qwen3_8b", [16, 16, 3, 0], [3000, 16, 4096, 0], 16, 32, 8, 128, 256, {}),
    ("verify_32k", [16] * 8, [32768] * 8, 16, 32, 8, 128, 2048, {}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_mgpu_gpu_matches_reference(case):
    if not _hopper():
        pytest.skip("Mosaic GPU wgmma needs Hopper")
    _, q_lens, kv_lens, t, n, k, h, m, kw = case
    args, clean = make_case(zlib.crc32(case[0].encode()), q_lens=q_lens, kv_lens=kv_lens, t=t, n=n, k=k, h=h,
                            page_size=16, max_pages=m)
    args = finite_stale(args)
    check_paged(args, clean, ragged_paged_attention_mgpu(**args, **kw))
    check_paged(args, clean, ragged_paged_attention(**args, impl="mgpu"))


@pytest.mark.gpu
def test_mgpu_verify_rows_equal_decode_rows_invariant_gpu():
    """In the batch-invariant mode a verify row (query t of a 16-token run) is bit for bit the same query decoded
    alone at its position."""
    if not _hopper():
        pytest.skip("Mosaic GPU wgmma needs Hopper")
    args, _ = make_case(5, q_lens=[16, 16], kv_lens=[3000, 700], t=16, n=32, k=8, h=128, page_size=16, max_pages=256,
                        stale_nan=False)
    with batch_invariant():
        verify = np.asarray(ragged_paged_attention(**args, impl="mgpu").astype(jnp.float32))
        for t in (0, 7, 15):
            one = dict(args, q=args["q"][:, t:t + 1], q_lens=jnp.ones((2,), jnp.int32),
                       kv_lens=args["kv_lens"] - 15 + t)
            dec = np.asarray(ragged_paged_attention(**one, impl="mgpu").astype(jnp.float32))
            assert np.array_equal(dec[:, 0], verify[:, t]), f"row t={t} differs"
