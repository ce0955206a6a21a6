"""The q/k norm + RoPE + KV-write kernel (pallas_kernels/qk_rope_write.py) against its jnp reference, and dense
models whose attention runs it equal to the same models without it. CPU: the kernel in Pallas interpret mode. GPU
(marked `gpu`): the compiled kernel at the Qwen3-8B head layout, and a row's bits not depending on the row count."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from converters.checkpoint import load_model  # noqa: E402
from converters.synthetic import PRESETS, write_random_gguf  # noqa: E402
from dflash_jax.kv_cache import AttentionMeta, cache_rows, token_positions, write_kv  # noqa: E402
from dflash_jax.state_pool import make_cache  # noqa: E402
from pallas_kernels.qk_rope_write import (heads_per_program, qk_rope_write_pallas,  # noqa: E402
                                          qk_rope_write_reference, rope_tables, use_kernel)

EPS = 1e-6


def _case(rows, heads, kv_heads, h, dtype, norm, seed, pages=9, page_size=4):
    rng = np.random.default_rng(seed)
    qkv = jnp.asarray(rng.standard_normal((rows, (heads + 2 * kv_heads) * h)) * 2, dtype)
    q_w = jnp.asarray(1 + 0.2 * rng.standard_normal(h), dtype) if norm else None
    k_w = jnp.asarray(1 + 0.2 * rng.standard_normal(h), dtype) if norm else None
    cos, sin = rope_tables(jnp.asarray(rng.integers(0, 5000, rows)), h, 1e6)
    # distinct cache rows, some tokens not written at all
    dest = rng.permutation(pages * page_size)[:rows].astype(np.int32)
    dest[rng.random(rows) < 0.3] = -1
    k_pages = jnp.asarray(rng.standard_normal((pages, page_size, kv_heads, h)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((pages, page_size, kv_heads, h)), dtype)
    return qkv, q_w, k_w, cos, sin, jnp.asarray(dest), k_pages, v_pages


def _check(got, want, dtype, untouched_equal=True):
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("rows,heads,kv_heads,h", [(1, 4, 2, 64), (5, 3, 1, 32), (17, 9, 3, 64), (8, 32, 8, 128)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("norm", [True, False])
def test_kernel_matches_reference_interpret(rows, heads, kv_heads, h, dtype, norm):
    case = _case(rows, heads, kv_heads, h, dtype, norm, seed=rows * 7 + heads)
    want = qk_rope_write_reference(*case, num_heads=heads, eps=EPS)
    got = qk_rope_write_pallas(*[jnp.array(a) if a is not None else None for a in case], num_heads=heads, eps=EPS,
                               interpret=True)
    assert got[0].shape == (rows, heads, h) and got[0].dtype == dtype
    _check(got, want, dtype)
    # rows not written keep their old values exactly; written rows differ from them
    dest = np.asarray(case[5])
    flat_old = np.asarray(case[6], np.float32).reshape(-1, kv_heads, h)
    flat_new = np.asarray(got[1], np.float32).reshape(-1, kv_heads, h)
    kept = np.setdiff1d(np.arange(flat_old.shape[0]), dest[dest >= 0])
    np.testing.assert_array_equal(flat_new[kept], flat_old[kept])
    assert (dest >= 0).sum() == 0 or not np.array_equal(flat_new[dest[dest >= 0]], flat_old[dest[dest >= 0]])


def test_reference_is_what_write_kv_and_rope_do():
    """The reference's cache rows are `write_kv`'s positions: same pages either way."""
    b, t, kv_heads, h, page_size = 2, 5, 2, 32, 4
    meta = AttentionMeta(q_lens=jnp.asarray([5, 2]), kv_lens=jnp.asarray([7, 2]),
                         page_table=jnp.asarray([[3, 1, 0], [2, 0, 0]], jnp.int32))
    positions, valid = token_positions(meta, t)
    rng = np.random.default_rng(1)
    pages = jnp.asarray(rng.standard_normal((5, page_size, kv_heads, h)), jnp.float32)
    new = jnp.asarray(rng.standard_normal((b, t, kv_heads, h)), jnp.float32)
    rows = cache_rows(meta, positions, valid, page_size)
    assert np.asarray(rows).tolist() == [[14, 15, 4, 5, 6], [8, 9, -1, -1, -1]]
    qkv = jnp.concatenate([jnp.zeros((b * t, 2 * h)), new.reshape(b * t, -1), new.reshape(b * t, -1)], axis=-1)
    cos, sin = jnp.ones((b * t, h // 2)), jnp.zeros((b * t, h // 2))  # no rotation: k is written as given
    _, k_ref, v_ref = qk_rope_write_reference(qkv, None, None, cos, sin, rows.reshape(-1), pages, pages,
                                              num_heads=2, eps=EPS)
    np.testing.assert_array_equal(np.asarray(k_ref), np.asarray(write_kv(pages, new, meta, positions, valid)))
    np.testing.assert_array_equal(np.asarray(v_ref), np.asarray(k_ref))


def test_heads_per_program_divides_both_head_counts():
    assert [heads_per_program(n, k) for n, k in [(32, 8), (64, 4), (4, 2), (9, 3), (40, 8)]] == [8, 4, 2, 1, 8]


def test_use_kernel_follows_env_and_head_dim(monkeypatch):
    monkeypatch.setenv("DFLASH_FUSED_QK", "interpret")
    assert use_kernel(96) == "interpret"
    monkeypatch.setenv("DFLASH_FUSED_QK", "0")
    assert use_kernel(128) is None
    monkeypatch.delenv("DFLASH_FUSED_QK")
    assert use_kernel(128) == ("gpu" if jax.default_backend() == "gpu" else None)
    assert use_kernel(96) is None  # not a power of two: no Triton block


def _forward(model, tokens, lens, kv_lens):
    """One step over `tokens` (B, T) with q_lens `lens` ending at `kv_lens`, in a fresh jit (what the layers dispatch
    to is read at trace time). Returns the hidden states and the written caches."""
    b = tokens.shape[0]
    cache = make_cache(model.cfg, 1 + b * 4, 16, b, jnp.float32)
    meta = AttentionMeta(q_lens=jnp.asarray(lens), kv_lens=jnp.asarray(kv_lens),
                         page_table=jnp.asarray(1 + np.arange(b * 4, dtype=np.int32).reshape(b, 4)))
    graphdef, state = nnx.split(model)
    hidden, cache, _ = jax.jit(lambda st: nnx.merge(graphdef, st)(jnp.asarray(tokens), meta, cache))(state)
    return np.asarray(hidden), [np.asarray(c) for c in cache.k + cache.v]


@pytest.mark.parametrize("preset", ["qwen3-tiny", "llama-tiny"])
def test_model_with_kernel_equals_without(tmp_path, monkeypatch, preset):
    path = tmp_path / f"{preset}.gguf"
    write_random_gguf(str(path), dataclasses.replace(PRESETS[preset], num_layers=2, vocab_size=320), None, seed=5)
    model = load_model(str(path), jnp.float32).model
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 320, size=(3, 9)).astype(np.int32)
    lens, kv_lens = np.array([9, 4, 0], np.int32), np.array([9, 30, 0], np.int32)  # a prefill, a chunk, a padded slot
    monkeypatch.setenv("DFLASH_FUSED_QK", "0")
    hidden, caches = _forward(model, tokens, lens, kv_lens)
    monkeypatch.setenv("DFLASH_FUSED_QK", "interpret")
    hidden_k, caches_k = _forward(model, tokens, lens, kv_lens)
    rows = np.arange(9)[None, :] < lens[:, None]  # padded query rows are not compared
    np.testing.assert_allclose(hidden_k[rows], hidden[rows], rtol=1e-5, atol=1e-5)
    for c_k, c in zip(caches_k, caches):
        np.testing.assert_allclose(c_k, c, rtol=1e-5, atol=1e-5)
        assert np.abs(c).sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("rows", [1, 8, 128, 300])
def test_kernel_on_gpu_matches_reference_and_keeps_row_bits(rows):
    case = _case(rows, 32, 8, 128, jnp.bfloat16, True, seed=rows, pages=80, page_size=16)
    want = qk_rope_write_reference(*case, num_heads=32, eps=EPS)
    got = qk_rope_write_pallas(*[jnp.array(a) for a in case], num_heads=32, eps=EPS)
    _check(got, want, jnp.bfloat16)
    # the first row alone: the same bits as among all rows
    one = [a[:1] if i in (0, 3, 4, 5) else jnp.array(a) for i, a in enumerate(case)]
    q1 = qk_rope_write_pallas(*one, num_heads=32, eps=EPS)[0]
    np.testing.assert_array_equal(np.asarray(q1[0], np.float32), np.asarray(got[0][0], np.float32))
