"""--draft-fp8: the drafter's products in fp8 e4m3 with a scale per output row (dflash_jax/models/fp8.py). The product
against its dequantized reference and the float product, the drafter conversion, and the engine: output equal to plain
decoding with nothing compiled after warm-up."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dflash_jax.engine import Engine, EngineConfig
from dflash_jax.kv_cache import KVCache
from dflash_jax.models.dense import Linear
from dflash_jax.models.drafter import draft_head_rows, for_serving, to_fp8
from dflash_jax.models.fp8 import FP8, FP8_MAX, fp8_linear, fp8_linear_reference, quantize_rows
from dflash_jax.spec_state import LoadedDrafter
from tests.test_dflash import BLOCK, TINY_DRAFTER, VOCAB, random_drafter, serves_like_plain, tiny_target


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_target(tmp_path_factory)


def _rows(seed: int, n: int, k: int) -> np.ndarray:
    """Rows of very different magnitudes (a per-tensor scale would flush the small ones), one all zero."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, (n, k)) * np.exp(rng.uniform(-8, 4, (n, 1)))
    w[1] = 0.0
    return w.astype(np.float32)


def test_quantize_rows_keeps_every_row_to_e4m3_precision():
    w = _rows(0, 37, 96)
    values, scales = quantize_rows(jnp.asarray(w))
    assert values.dtype == FP8 and values.shape == w.shape and scales.shape == (37,)
    v = np.asarray(values.astype(jnp.float32))
    assert np.isfinite(v).all() and np.abs(v).max(axis=1)[np.arange(37) != 1].min() == FP8_MAX
    back = v * np.asarray(scales)[:, None]
    assert (back[1] == 0).all()
    # round to nearest with 3 mantissa bits: half a step, 2^-4 relative, down to e4m3's subnormals (2^-9 * scale)
    bound = np.maximum(np.abs(w) * 2.0 ** -4, np.asarray(scales)[:, None] * 2.0 ** -10)
    assert (np.abs(back - w) <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("m", [1, 5, 16])
def test_fp8_linear_equals_its_reference_and_stays_near_the_float_product(m):
    w = _rows(1, 200, 256)
    x = np.random.default_rng(m).normal(0, 3, (m, 256)).astype(np.float32)
    values, scales = quantize_rows(jnp.asarray(w))
    got = np.asarray(jax.jit(fp8_linear)(jnp.asarray(x), values, scales))
    ref = np.asarray(fp8_linear_reference(jnp.asarray(x), values, scales))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    exact = x @ w.T
    # each operand entry within 2^-4 relative (or half of e4m3's smallest subnormal step, 2^-10 of its row's scale),
    # so each output within about 2^-3 of the sum of its terms' magnitudes
    sx = np.abs(x).max(axis=1, keepdims=True) / FP8_MAX
    floor = 2.0 ** -9 * (np.abs(x).sum(1, keepdims=True) * np.asarray(scales)[None] + sx * np.abs(w).sum(1)[None])
    assert (np.abs(got - exact) <= 0.13 * (np.abs(x) @ np.abs(w).T) + floor).all()
    assert np.abs(got - exact).max() > 0  # it is an fp8 product
    assert got.dtype == np.float32 and got.shape == (m, 200)


def test_to_fp8_converts_what_it_is_asked_to_and_drafts_close_to_float():
    dc = TINY_DRAFTER
    d = random_drafter(dc, 3)
    head = jax.random.normal(jax.random.key(4), (VOCAB, dc.hidden_size), jnp.float32) * 0.05
    ids = np.arange(VOCAB, dtype=np.int32)

    def served(which):
        return to_fp8(for_serving(random_drafter(dc, 3), (ids, {"weight": head})), which)

    with pytest.raises(ValueError, match="one of auto, off, head, all"):
        to_fp8(for_serving(d, (ids, {"weight": head})), "fp4")
    with pytest.raises(ValueError, match="no head of its own"):
        to_fp8(for_serving(d), "head")
    kinds = {}
    for which in ("off", "head", "all"):
        m = served(which)
        kinds[which] = {path: lin.is_fp8 for path, lin in nnx.iter_graph(m) if isinstance(lin, Linear)}
    assert not any(kinds["off"].values()) and all(kinds["all"].values()) and len(kinds["all"]) >= 6
    assert [p for p, f in kinds["head"].items() if f] == [("draft_head",)]

    b, t = 2, BLOCK
    x = jax.random.normal(jax.random.key(5), (b, t, dc.hidden_size), jnp.float32)
    cached, page_table = jnp.zeros((b,), jnp.int32), jnp.zeros((b, 2), jnp.int32)
    dcache = KVCache.create(dc.num_layers, 4, 8, dc.num_kv_heads, dc.head_dim, jnp.float32)
    out = {w: served(w) for w in ("off", "all")}
    h = {w: np.asarray(m(x, cached, page_table, dcache)) for w, m in out.items()}
    rel = np.linalg.norm(h["all"] - h["off"]) / np.linalg.norm(h["off"])
    assert 0 < rel < 0.1, rel  # changed (the products are fp8) but close
    logits = {w: np.asarray(m.draft_head(jnp.asarray(h["off"]))) for w, m in out.items()}
    assert (np.argmax(logits["all"], -1) == np.argmax(logits["off"], -1)).mean() > 0.8


def test_fp8_head_from_a_q8_0_head_dequantizes_its_blocks(target):
    """A Q8_0 target head's rows become fp8 from their dequantized values (Linear.float_weight)."""
    lin = nnx.eval_shape(lambda: Linear(64, 96, jnp.float32, q8_0=True))
    rng = np.random.default_rng(6)
    lin.qweight = nnx.Param(jnp.asarray(rng.integers(-127, 128, lin.qweight.shape), jnp.int8))
    lin.scales = nnx.Param(jnp.asarray(rng.uniform(1e-3, 1e-2, lin.scales.shape), jnp.float16))
    w = np.asarray(lin.float_weight())
    x = jnp.asarray(rng.normal(0, 1, (3, 64)), jnp.float32)
    want = np.asarray(x) @ w.T  # a GPU's f32 product may round through TF32
    np.testing.assert_allclose(np.asarray(lin(x)), want, rtol=0, atol=1e-2 * np.abs(want).max())
    values, scales = quantize_rows(lin.float_weight())
    np.testing.assert_allclose(np.asarray(values.astype(jnp.float32)) * np.asarray(scales)[:, None], w,
                               rtol=2.0 ** -4, atol=1e-6)


@pytest.mark.parametrize("which,vocab", [("head", 0), ("all", VOCAB // 2)])
def test_fp8_drafter_engine_equals_plain_without_compiles(target, which, vocab):
    """--draft-fp8 head (a copy of every head row in fp8) or all (with a draft vocabulary too): output equals plain
    decoding for concurrent requests with every slot speculating, nothing compiled after warm-up."""
    dc = TINY_DRAFTER
    eng = Engine(target, EngineConfig(num_slots=4, ctx_size=1024, ctx_per_slot=160, page_size=8, prefill_chunk=16,
                                      draft_max=BLOCK - 1, spec_policy="always", overlap=False, draft_fp8=which,
                                      draft_vocab=vocab),
                 LoadedDrafter(dc, random_drafter(dc, 6)))
    served = nnx.merge(eng.spec.graphdef, eng.spec.state)
    assert served.draft_head.is_fp8 and served.draft_head.out_features == (vocab or VOCAB)
    assert served.layers[0].mlp.down_proj.is_fp8 == (which == "all")
    assert eng.stats()["speculative"]["draft_fp8"] == which
    serves_like_plain(eng, target, 12)


def test_auto_is_the_head_on_gpus_with_fp8_tensor_cores(monkeypatch):
    from types import SimpleNamespace

    from dflash_jax.models import drafter as drafter_mod
    if jax.default_backend() == "cpu":
        assert drafter_mod.resolve_fp8("auto", jnp.bfloat16) == "off"
    assert drafter_mod.resolve_fp8("all", jnp.float32) == "all"
    monkeypatch.setattr(drafter_mod.jax, "default_backend", lambda: "gpu")
    for cc, dtype, want in (("9.0", jnp.bfloat16, "head"), ("8.9", jnp.float16, "head"), ("10.0", jnp.bfloat16, "head"),
                            ("8.0", jnp.bfloat16, "off"), ("9.0", jnp.float32, "off")):
        monkeypatch.setattr(drafter_mod.jax, "devices", lambda cc=cc: [SimpleNamespace(compute_capability=cc)])
        assert drafter_mod.resolve_fp8("auto", dtype) == want, (cc, dtype)


def test_draft_fp8_config_and_flag():
    from serve.cli import engine_config_kwargs, parse_args
    with pytest.raises(ValueError, match="draft_fp8"):
        EngineConfig(draft_fp8="fp4")
    assert engine_config_kwargs(parse_args(["--draft-fp8", "all"]), EngineConfig, "cpu")["draft_fp8"] == "all"
    with pytest.raises(SystemExit):
        parse_args(["--draft-fp8", "fp4"])


def test_draft_head_rows_of_a_float_head_are_its_rows(target):
    """The fp8 head's source: `draft_head_rows` over every id is the target's head (the tied embedding here)."""
    rows = draft_head_rows(target.model, np.arange(VOCAB))
    head = target.model.lm_head
    want = target.model.embed_tokens[...] if head is None else head.weight[...]
    np.testing.assert_array_equal(np.asarray(rows["weight"]), np.asarray(want))
