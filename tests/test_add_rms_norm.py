"""The fused residual add + RMSNorm kernel (pallas_kernels/add_rms_norm.py) against its jnp reference, and a dense
model whose layers run it equal to the same model without it. CPU: the kernel in Pallas interpret mode. GPU (marked
`gpu`): the compiled kernel at the Qwen3-8B width, and a row's bits not depending on how many rows share the call."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from converters.checkpoint import load_model  # noqa: E402
from converters.synthetic import PRESETS, write_random_gguf  # noqa: E402
from dflash_jax.kv_cache import AttentionMeta  # noqa: E402
from dflash_jax.state_pool import make_cache  # noqa: E402
from pallas_kernels.add_rms_norm import add_rms_norm_pallas, add_rms_norm_reference, use_kernel  # noqa: E402
from pallas_kernels.invariance import batch_invariant  # noqa: E402


def _inputs(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape) * 3, dtype)
    a = jnp.asarray(rng.standard_normal(shape), dtype)
    w = jnp.asarray(1 + 0.1 * rng.standard_normal(shape[-1]), dtype)
    return x, a, w


@pytest.mark.parametrize("shape", [(1, 64), (3, 128), (2, 5, 256), (1, 1, 576)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_reference_interpret(shape, dtype):
    x, a, w = _inputs(shape, dtype, seed=sum(shape))
    s, y = add_rms_norm_pallas(x, a, w, 1e-6, interpret=True)
    s_ref, y_ref = add_rms_norm_reference(x, a, w, 1e-6)
    assert s.dtype == y.dtype == dtype and s.shape == y.shape == shape
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))  # the add is exact
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=tol, atol=tol)


def test_use_kernel_follows_env_and_width(monkeypatch):
    monkeypatch.setenv("DFLASH_FUSED_NORM", "interpret")
    assert use_kernel(576)
    monkeypatch.setenv("DFLASH_FUSED_NORM", "0")
    assert not use_kernel(4096)
    monkeypatch.delenv("DFLASH_FUSED_NORM")
    gpu = jax.default_backend() == "gpu"
    with batch_invariant(True):
        assert use_kernel(4096) == gpu
    with batch_invariant(False):
        assert not use_kernel(4096)  # XLA's own kernels are as fast outside the invariant mode
    assert not use_kernel(576)  # not a power of two: no Triton block


def _forward(model, tokens, lens, taps):
    """Prefill `tokens` (B, T) in a fresh jit (what the layers dispatch to is read at trace time)."""
    b = tokens.shape[0]
    cache = make_cache(model.cfg, 1 + b * 4, 16, b, jnp.float32)
    meta = AttentionMeta(q_lens=jnp.asarray(lens), kv_lens=jnp.asarray(lens),
                         page_table=jnp.asarray(1 + np.arange(b * 4, dtype=np.int32).reshape(b, 4)))
    graphdef, state = nnx.split(model)
    hidden, _, feats = jax.jit(lambda st: nnx.merge(graphdef, st)(jnp.asarray(tokens), meta, cache, taps))(state)
    return np.asarray(hidden), np.asarray(feats)


def test_model_with_fused_norms_equals_without(tmp_path, monkeypatch):
    path = tmp_path / "llama-tiny.gguf"
    write_random_gguf(str(path), dataclasses.replace(PRESETS["llama-tiny"], num_layers=3, vocab_size=320), None,
                      seed=3)
    model = load_model(str(path), jnp.float32).model
    rng = np.random.default_rng(0)
    tokens, lens, taps = rng.integers(3, 320, size=(2, 9)).astype(np.int32), np.array([9, 4], np.int32), (0, 2)
    monkeypatch.setenv("DFLASH_FUSED_NORM", "0")
    hidden, feats = _forward(model, tokens, lens, taps)
    monkeypatch.setenv("DFLASH_FUSED_NORM", "interpret")
    hidden_k, feats_k = _forward(model, tokens, lens, taps)
    rows = np.arange(9)[None, :] < lens[:, None]  # padded query rows are not compared
    np.testing.assert_allclose(hidden_k[rows], hidden[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats_k[rows], feats[rows], rtol=1e-5, atol=1e-5)
    assert feats.shape[-1] == 2 * model.cfg.hidden_size


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 128])
def test_kernel_matches_reference_gpu(m):
    x, a, w = _inputs((m, 4096), jnp.bfloat16, seed=m)
    s, y = add_rms_norm_pallas(x, a, w, 1e-6)
    s_ref, y_ref = add_rms_norm_reference(x, a, w, 1e-6)
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=1e-2, atol=1e-2)
    one = add_rms_norm_pallas(x[:1], a[:1], w, 1e-6)[1]  # the first row alone: the same bits
    np.testing.assert_array_equal(np.asarray(one, np.float32), np.asarray(y[:1], np.float32))
