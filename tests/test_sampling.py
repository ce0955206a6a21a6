"""sampling.top_k (two-stage) against lax.top_k, and the candidate filter against a sort of the whole row."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dflash_jax import sampling
from dflash_jax.sampling import MAX_TOP_LOGPROBS, NUM_CANDIDATES, SamplingArrays, filter_logits, top_k

top_k_jit = jax.jit(top_k, static_argnums=1)


def hard_rows(rng, rows: int, v: int) -> np.ndarray:
    """Rows that stress the chunk selection: ties everywhere, half -inf, the top entries packed into a few chunks,
    a flat row, and plain noise."""
    x = rng.standard_normal((rows, v)).astype(np.float32) * 3
    x[0] = np.round(x[0])  # few distinct values: ties across chunk boundaries
    x[1, rng.choice(v, v // 2, replace=False)] = -np.inf
    n = min(3 * NUM_CANDIDATES, v - 100)
    x[2, 100:100 + n] = 40 + rng.standard_normal(n)  # the best entries in consecutive chunks
    x[3] = 1.0  # one value
    x[4, -7:] = 60.0  # the best entries in the padded last chunk
    return x


@pytest.mark.parametrize("v", [151936, 49152, 7919, 300])
@pytest.mark.parametrize("k", [NUM_CANDIDATES, MAX_TOP_LOGPROBS, 1])
def test_top_k_equals_lax_top_k(v, k):
    rng = np.random.default_rng(v + k)
    x = hard_rows(rng, 7, v)
    vals, idx = (np.asarray(a) for a in top_k_jit(jnp.asarray(x), k))
    ref_vals, ref_idx = (np.asarray(a) for a in jax.lax.top_k(jnp.asarray(x), k))
    np.testing.assert_array_equal(vals, ref_vals)
    np.testing.assert_array_equal(np.take_along_axis(x, idx, axis=1), vals)
    # ties resolve toward lower indices, as lax.top_k's do
    np.testing.assert_array_equal(idx, ref_idx)


def params(rows, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    f = lambda val, dt=np.float32: np.full((rows,), val, dt)  # noqa: E731
    return SamplingArrays(f(temperature), f(top_k, np.int32), f(top_p), f(min_p), f(0.0), f(0.0),
                          np.arange(rows, dtype=np.uint32))


def kept_by_sorting(row: np.ndarray, temperature, k, p, min_p) -> np.ndarray:
    """The tokens top-k / top-p / min-p keep, from a full sort of the row (the definition the filter follows)."""
    scaled = row / max(temperature, 1e-6)
    order = np.argsort(-scaled, kind="stable")
    keep = np.ones(row.shape, bool)
    if k > 0:
        keep &= scaled >= scaled[order[k - 1]]
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    cum = np.cumsum(probs[order])
    n = int(np.sum(cum < p)) + 1
    if p < 1.0 and n <= NUM_CANDIDATES:
        keep &= scaled >= scaled[order[n - 1]]
    if min_p > 0:
        keep &= probs >= min_p * probs.max() * (1 - 1e-6)
    return keep


@pytest.mark.parametrize("setting", [dict(top_k=40), dict(top_p=0.9), dict(min_p=0.05), dict(top_k=3, top_p=0.5),
                                     dict(top_k=NUM_CANDIDATES), dict(temperature=0.3, top_p=0.95)])
def test_filter_keeps_what_a_full_sort_keeps(setting):
    rng = np.random.default_rng(7)
    v = 151936
    logits = rng.standard_normal((4, v)).astype(np.float32) * 2.5
    logits[1, 1000:1030] += 9.0  # a peaked row
    p = params(4, **setting)
    out = np.asarray(jax.jit(filter_logits)(jnp.asarray(logits), p))
    for r in range(4):
        want = kept_by_sorting(logits[r], p.temperature[r], p.top_k[r], p.top_p[r], p.min_p[r])
        got = np.isfinite(out[r])
        assert got.sum() > 0
        # min_p compares in log space on device: allow a disagreement exactly at its boundary only
        diff = np.flatnonzero(got != want)
        assert len(diff) <= (1 if setting.get("min_p") else 0), (r, diff[:5], got.sum(), want.sum())


def test_full_sample_uses_the_two_stage_search_and_draws_from_kept_tokens():
    """The sampler's draws stay inside the kept set and its top logprobs are the row's exact top 20."""
    rng = np.random.default_rng(3)
    v, rows = 151936, 6
    logits = jnp.asarray(rng.standard_normal((rows, v)).astype(np.float32) * 3)
    p = params(rows, temperature=0.8, top_k=5)
    out = jax.jit(sampling.sample, static_argnames="full")(logits, None, p, jnp.arange(rows), full=True)
    top5 = np.asarray(jax.lax.top_k(logits, 5)[1])
    assert all(t in top5[r] for r, t in enumerate(np.asarray(out.tokens)))
    ref_lp, ref_ids = jax.lax.top_k(jax.nn.log_softmax(logits), MAX_TOP_LOGPROBS)
    np.testing.assert_array_equal(np.asarray(out.top_ids), np.asarray(ref_ids))
    np.testing.assert_allclose(np.asarray(out.top_logprobs), np.asarray(ref_lp), rtol=1e-5, atol=1e-5)


def test_argmax_is_the_first_maximum():
    rng = np.random.default_rng(11)
    x = np.round(rng.standard_normal((6, 3, 4099)).astype(np.float32) * 2)  # ties: the first index must win
    x[0, 0] = -np.inf
    x[1, 2, -1] = 100.0
    np.testing.assert_array_equal(np.asarray(jax.jit(sampling.argmax)(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_draws_are_jax_random_categorical():
    """The sampler's draw is jax.random.categorical's (Gumbel noise, then the argmax), so seeded outputs keep their
    tokens."""
    rng = np.random.default_rng(5)
    rows, v = 5, 3000
    logits = jnp.asarray(rng.standard_normal((rows, v)).astype(np.float32) * 3)
    p = params(rows, temperature=1.0)
    out = jax.jit(sampling.sample, static_argnames="full")(logits, None, p, jnp.arange(rows), full=True)
    keys = jax.vmap(lambda s, pos: jax.random.fold_in(jax.random.key(s), pos))(p.seed, jnp.arange(rows))
    want = jax.vmap(jax.random.categorical)(keys, filter_logits(logits, p))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(want))
