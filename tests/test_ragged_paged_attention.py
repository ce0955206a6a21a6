"""Ragged paged attention kernel (pallas_kernels/ragged_paged_attention.py) against the jnp references.

CPU: the Pallas kernel in interpret mode on small shapes. GPU (marked `gpu`): the compiled Triton-lowered kernel.
Every kernel call runs with `poison=True`: the kernel's outputs are aliased to NaN-filled buffers, so an element the
kernel fails to write shows up as NaN. Stale pages (beyond each slot's kv_len) hold NaN too, so a kernel that reads
keys it must not see fails.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.paged_attention import (drafter_attention_chunked, drafter_attention_reference,  # noqa: E402
                                            paged_attention_chunked,
                                            paged_attention_reference)
from pallas_kernels.ragged_paged_attention import (  # noqa: E402
    default_impl,
    drafter_attention,
    drafter_attention_pallas,
    ragged_paged_attention,
    ragged_paged_attention_pallas,
)

ATOL = RTOL = 2e-2  # bf16 outputs; kernel and reference round p differently


def make_case(seed, *, q_lens, kv_lens, t, n, k, h, page_size, max_pages, stale_nan=True, dtype=jnp.bfloat16):
    """Random q and a shuffled page pool. Unused table entries point at random pages; every pool position that no
    slot may see (beyond its kv_len, or in no slot's table) is NaN when stale_nan. Returns the inputs and a clean
    pool copy (NaN -> 0) for the reference."""
    rng = np.random.default_rng(seed)
    b = len(q_lens)
    num_pages = b * max_pages + 3
    perm = rng.permutation(num_pages)
    page_table = perm[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    kp = rng.standard_normal((num_pages, page_size, k, h)).astype(np.float32)
    vp = rng.standard_normal((num_pages, page_size, k, h)).astype(np.float32)
    if stale_nan:
        live = np.zeros((num_pages, page_size), bool)
        for i, kv in enumerate(kv_lens):
            for pos in range(kv):
                live[page_table[i, pos // page_size], pos % page_size] = True
        kp[~live] = np.nan
        vp[~live] = np.nan
    for i, kv in enumerate(kv_lens):  # entries past the slot's pages: garbage ids into the shared pool
        used = -(-kv // page_size)
        page_table[i, used:] = rng.integers(0, num_pages, max_pages - used)
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    return dict(
        q=jnp.asarray(q, dtype), k_pages=jnp.asarray(kp, dtype), v_pages=jnp.asarray(vp, dtype),
        page_table=jnp.asarray(page_table), q_lens=jnp.asarray(q_lens, jnp.int32),
        kv_lens=jnp.asarray(kv_lens, jnp.int32),
    ), (jnp.asarray(np.nan_to_num(kp, nan=0.0), dtype), jnp.asarray(np.nan_to_num(vp, nan=0.0), dtype))


def check_paged(args, clean, out):
    ref = paged_attention_reference(args["q"], clean[0], clean[1], args["page_table"], args["q_lens"],
                                    args["kv_lens"])
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    assert out.shape == ref.shape
    assert not np.isnan(out).any(), "NaN in output (unwritten element or stale page read)"
    q_lens = np.asarray(args["q_lens"])
    for i, ql in enumerate(q_lens):
        assert (out[i, ql:] == 0).all(), f"slot {i}: rows t >= q_len={ql} not zero"
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)


# (name, q_lens, kv_lens, T, N, K, H, page_size, max_pages, kernel kwargs)
CASES = [
    # decode, GQA 4, kv_len not a page multiple, kv_len = q_len = 1, a padded slot; flash-decoding splits
    ("decode_g4_h64", [1, 1, 0, 1], [37, 1, 0, 64], 1, 8, 2, 64, 16, 5, {}),
    # verify (q_len 16), GQA 1, kv_len = q_len, a short run (q_len < T), padded slot; forced 3 splits
    ("verify_g1_h128", [16, 16, 7, 0], [16, 45, 30, 0], 16, 2, 2, 128, 8, 8, dict(num_splits=3)),
    # verify with GQA 8 -> 128 rows in one tile
    ("verify_g8_h64", [16, 16], [100, 16], 16, 8, 1, 64, 16, 8, {}),
    # prefill chunk (q_len 32), GQA 8: 256 rows in 4 row tiles of 64, one split (normalised output written directly)
    ("chunk_g8_h64", [32, 32, 20, 0], [32, 77, 20, 0], 32, 8, 1, 64, 16, 6, dict(rows=64)),
    # prefill chunk, GQA 4, head dim 128, several row tiles with causal limits inside them
    ("chunk_g4_h128", [32, 9], [50, 9], 32, 8, 2, 128, 16, 4, dict(rows=32, num_splits=1)),
    # head dim 256 (Qwen3.6 full attention), GQA 2
    ("verify_g2_h256", [4, 2, 0], [40, 2, 0], 4, 4, 2, 256, 16, 3, {}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_interpret_matches_reference(case):
    _, q_lens, kv_lens, t, n, k, h, s, m, kw = case
    args, clean = make_case(zlib.crc32(case[0].encode()), q_lens=q_lens, kv_lens=kv_lens, t=t, n=n, k=k, h=h,
                            page_size=s, max_pages=m)
    out = ragged_paged_attention_pallas(**args, interpret=True, poison=True, **kw)
    check_paged(args, clean, out)


def test_dispatcher():
    args, clean = make_case(1, q_lens=[1, 0], kv_lens=[20, 0], t=1, n=4, k=2, h=64, page_size=16, max_pages=2,
                            stale_nan=False)
    ref = paged_attention_reference(**args)
    if jax.default_backend() != "gpu":
        assert default_impl() == "chunked"  # at most one chunk of pages: the reference itself
        np.testing.assert_array_equal(np.asarray(ragged_paged_attention(**args)), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(ragged_paged_attention(**args, impl="reference")), np.asarray(ref))
    check_paged(args, clean, ragged_paged_attention(**args, impl="interpret"))
    with pytest.raises(ValueError):
        ragged_paged_attention(**args, impl="nope")


def test_dispatcher_env_override(monkeypatch):
    monkeypatch.setenv("DFLASH_ATTENTION_IMPL", "reference")
    assert default_impl() == "reference"
    monkeypatch.setenv("DFLASH_ATTENTION_IMPL", "pallas")
    assert default_impl() == "pallas"


def make_drafter_case(seed, ctx_lens, t, n, k, h, page_size, max_pages):
    args, clean = make_case(seed, q_lens=[t] * len(ctx_lens), kv_lens=ctx_lens, t=t, n=n, k=k, h=h,
                            page_size=page_size, max_pages=max_pages)
    rng = np.random.default_rng(seed + 1)
    b = len(ctx_lens)
    kb = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.bfloat16)
    vb = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.bfloat16)
    return (args["q"], kb, vb, args["k_pages"], args["v_pages"], args["page_table"], args["kv_lens"]), clean


@pytest.mark.parametrize("block_in_kernel", [False, True], ids=["block_jnp", "block_in_kernel"])
@pytest.mark.parametrize("windows", [(None, None), (24, 6)], ids=["full", "ctx24_causal6"])
def test_drafter_interpret_matches_reference(windows, block_in_kernel):
    ctx_window, causal_window = windows
    args, clean = make_drafter_case(7, [45, 3, 0], t=8, n=8, k=2, h=64, page_size=16, max_pages=4)
    q, kb, vb, _, _, pt, cl = args
    out = drafter_attention_pallas(*args, ctx_window, causal_window, interpret=True, poison=True, num_splits=2,
                                   block_in_kernel=block_in_kernel)
    ref = drafter_attention_reference(q, kb, vb, clean[0], clean[1], pt, cl, ctx_window, causal_window)
    out = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, np.asarray(ref.astype(jnp.float32)), atol=ATOL, rtol=RTOL)
    clean_args = (q, kb, vb, clean[0], clean[1], pt, cl)
    np.testing.assert_array_equal(
        np.asarray(drafter_attention(*clean_args, ctx_window, causal_window, impl="reference"), np.float32),
        np.asarray(ref, np.float32))


# ---- GPU: the compiled (Triton-lowered) kernel -------------------------------------------------------------------

GPU_CASES = CASES + [
    # engine-sized: Qwen3-8B heads (32 q / 8 kv, H 128), 16-token pages, a few thousand keys, ragged lengths
    ("decode_qwen3_8b", [1, 1, 1, 0, 1, 1, 1, 1], [3000, 1, 4096, 0, 17, 2049, 512, 4095], 1, 32, 8, 128, 16, 256,
     {}),
    ("verify_qwen3_8b", [16, 16, 3, 0], [3000, 16, 4096, 0], 16, 32, 8, 128, 16, 256, {}),
    ("chunk_qwen3_8b", [256, 100], [1000, 100], 256, 32, 8, 128, 16, 64, {}),
    ("verify_h256_g4", [16, 16], [2000, 16], 16, 16, 4, 256, 16, 128, {}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_kernel_gpu_matches_reference(case):
    _, q_lens, kv_lens, t, n, k, h, s, m, kw = case
    args, clean = make_case(zlib.crc32(case[0].encode()), q_lens=q_lens, kv_lens=kv_lens, t=t, n=n, k=k, h=h,
                            page_size=s, max_pages=m)
    check_paged(args, clean, ragged_paged_attention_pallas(**args, poison=True, **kw))
    check_paged(args, clean, ragged_paged_attention(**args))  # auto -> pallas on GPU
    assert default_impl() == "pallas"


@pytest.mark.gpu
@pytest.mark.parametrize("block_in_kernel", [False, True], ids=["block_jnp", "block_in_kernel"])
@pytest.mark.parametrize("windows", [(None, None), (24, 6), (1024, None)], ids=["full", "ctx24_causal6", "ctx1024"])
def test_drafter_gpu_matches_reference(windows, block_in_kernel):
    ctx_window, causal_window = windows
    args, clean = make_drafter_case(11, [3000, 3, 0, 45], t=16, n=32, k=8, h=128, page_size=16, max_pages=200)
    q, kb, vb, _, _, pt, cl = args
    out = drafter_attention_pallas(*args, ctx_window, causal_window, poison=True, block_in_kernel=block_in_kernel)
    ref = drafter_attention_reference(q, kb, vb, clean[0], clean[1], pt, cl, ctx_window, causal_window)
    out = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, np.asarray(ref.astype(jnp.float32)), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("chunk_pages", [1, 3])
def test_chunked_matches_reference(case, chunk_pages):
    """The CPU path: pages a chunk at a time while any slot has keys left, stale (NaN) pool entries beyond every
    slot's keys where the loop runs (a table of one chunk is the reference's, which reads them), padded slots,
    verify and prefill runs."""
    _, q_lens, kv_lens, t, n, k, h, s, m, _ = case
    args, clean = make_case(zlib.crc32(case[0].encode()) + chunk_pages, q_lens=q_lens, kv_lens=kv_lens, t=t, n=n,
                            k=k, h=h, page_size=s, max_pages=m, dtype=jnp.float32, stale_nan=m > chunk_pages)
    check_paged(args, clean, paged_attention_chunked(**args, chunk_pages=chunk_pages))


def test_chunked_wide_table_and_dispatch():
    """A table far wider than the longest slot (a one-slot server's 8192-token cap): the same result as the
    reference, through the CPU dispatcher."""
    args, clean = make_case(5, q_lens=[1, 3, 0], kv_lens=[20, 9, 0], t=3, n=4, k=2, h=32, page_size=4, max_pages=64,
                            dtype=jnp.float32)
    if jax.default_backend() != "gpu":
        check_paged(args, clean, ragged_paged_attention(**args))
    check_paged(args, clean, ragged_paged_attention(**args, impl="chunked"))


@pytest.mark.parametrize("windows", [(None, None), (24, 6), (40, None)], ids=["full", "ctx24_causal6", "ctx40"])
@pytest.mark.parametrize("chunk_pages", [1, 2])
def test_drafter_chunked_matches_reference(windows, chunk_pages):
    ctx_window, causal_window = windows
    args, clean = make_drafter_case(7 + chunk_pages, [45, 3, 0, 20], t=8, n=8, k=2, h=64, page_size=16,
                                    max_pages=4)
    q, kb, vb, _, _, pt, cl = args
    out = drafter_attention_chunked(*args, ctx_window, causal_window, chunk_pages=chunk_pages)
    ref = drafter_attention_reference(q, kb, vb, clean[0], clean[1], pt, cl, ctx_window, causal_window)
    out = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(out).any()  # stale (NaN) pages past every slot's context are never used
    np.testing.assert_allclose(out, np.asarray(ref.astype(jnp.float32)), atol=ATOL, rtol=RTOL)
    if jax.default_backend() != "gpu":  # the CPU dispatcher takes it
        np.testing.assert_array_equal(np.asarray(drafter_attention(*args, ctx_window, causal_window), np.float32),
                                      np.asarray(drafter_attention_chunked(*args, ctx_window, causal_window),
                                                 np.float32))


@pytest.mark.parametrize("t,windows", [(16, (None, None)), (3, (None, 2)), (5, (40, None))])
def test_drafter_block_in_kernel_block_sizes(t, windows):
    """The in-kernel block split at other block sizes (T = its key width, T < 16 padded, odd T), the kernel's own
    split count, and a slot with no context yet: same as the reference."""
    ctx_window, causal_window = windows
    args, clean = make_drafter_case(3, [0, 70, 17], t=t, n=4, k=2, h=64, page_size=8, max_pages=10)
    q, kb, vb, _, _, pt, cl = args
    out = drafter_attention_pallas(*args, ctx_window, causal_window, interpret=True, poison=True,
                                   block_in_kernel=True)
    ref = drafter_attention_reference(q, kb, vb, clean[0], clean[1], pt, cl, ctx_window, causal_window)
    out = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, np.asarray(ref.astype(jnp.float32)), atol=ATOL, rtol=RTOL)
