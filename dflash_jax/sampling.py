"""On-device sampling for a batch of slots, each with its own parameters: logit bias, penalties, temperature, top-k/p,
min-p, seed.

Dimensions: B slots, V vocab, C candidates considered for top-k/top-p thresholds.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from dflash_jax.requests import MAX_LOGIT_BIAS
from pallas_kernels.invariance import log_softmax, logsumexp

# top-k and top-p thresholds are found among the C best tokens. A nucleus wider than C (top_p near 1 on a flat
# distribution) keeps the whole vocabulary instead: slightly more permissive than an exact sort, never less.
NUM_CANDIDATES = 256
MAX_TOP_LOGPROBS = 20


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """lax.top_k over the last axis of (R, V): the same values (indices the same unless values tie), from sorts of
    a few thousand entries per row instead of V. XLA's GPU top-k sorts the whole row for k > 16: at a 152k
    vocabulary that was ~0.5 ms of an 8-slot 8B step and grows with rows (a verify samples slots x block rows).

    Exact: split the row into chunks and keep the k chunks with the largest maxima. Their maxima are k entries at
    or above the k-th largest of those maxima, so the row's k-th largest value v is too, and every entry above v
    lies in a chunk whose maximum is above it: one of the kept chunks. The top k of the kept chunks is the row's."""
    rows, v = x.shape
    chunk = max(1, int(np.sqrt(v / k)))  # the two sorts, of v / chunk maxima and k * chunk entries, balanced
    groups = -(-v // chunk)
    if groups <= 2 * k:
        return jax.lax.top_k(x, k)
    xc = jnp.pad(x, ((0, 0), (0, groups * chunk - v)), constant_values=-jnp.inf).reshape(rows, groups, chunk)
    _, kept = jax.lax.top_k(jnp.max(xc, axis=-1), k)
    kept = jnp.sort(kept, axis=-1)  # chunks in row order, so that ties resolve toward lower indices as lax.top_k's
    cand = jnp.take_along_axis(xc, kept[:, :, None], axis=1).reshape(rows, k * chunk)
    vals, pos = jax.lax.top_k(cand, k)
    return vals, jnp.take_along_axis(kept, pos // chunk, axis=1) * chunk + pos % chunk


@jax.tree_util.register_dataclass
@dataclass
class SamplingArrays:
    temperature: jax.Array  # (B,) f32, 0 = greedy
    top_k: jax.Array  # (B,) i32, 0 = off
    top_p: jax.Array  # (B,) f32
    min_p: jax.Array  # (B,) f32
    presence_penalty: jax.Array  # (B,) f32
    frequency_penalty: jax.Array  # (B,) f32
    seed: jax.Array  # (B,) u32
    # logit_bias as (token, bias) pairs padded with (0, 0.0); None: no row has any (tools that build these arrays)
    bias_ids: jax.Array | None = None  # (B, MAX_LOGIT_BIAS) i32
    bias_values: jax.Array | None = None  # (B, MAX_LOGIT_BIAS) f32

    @classmethod
    def from_params(cls, params: list, rows: int, default_seeds: list[int]) -> "SamplingArrays":
        """params: SamplingParams per live slot (padded with greedy rows up to `rows`)."""
        def col(name, dtype, fill):
            vals = [getattr(p, name) for p in params] + [fill] * (rows - len(params))
            return np.asarray(vals, dtype)
        seeds = [p.seed if p.seed is not None else s for p, s in zip(params, default_seeds)]
        bias_ids = np.zeros((rows, MAX_LOGIT_BIAS), np.int32)
        bias_values = np.zeros((rows, MAX_LOGIT_BIAS), np.float32)
        for i, p in enumerate(params):
            if p.logit_bias:
                ids, vals = zip(*p.logit_bias)
                bias_ids[i, :len(ids)], bias_values[i, :len(vals)] = ids, vals
        return cls(col("temperature", np.float32, 0.0), col("top_k", np.int32, 0), col("top_p", np.float32, 1.0),
                   col("min_p", np.float32, 0.0), col("presence_penalty", np.float32, 0.0),
                   col("frequency_penalty", np.float32, 0.0),
                   np.asarray([s & 0xFFFFFFFF for s in seeds] + [0] * (rows - len(params)), np.uint32),
                   bias_ids, bias_values)


@jax.tree_util.register_dataclass
@dataclass
class SampleOutput:
    tokens: jax.Array  # (B,) i32
    logprobs: jax.Array  # (B,) f32: model log-probability of the chosen token (before penalties/temperature)
    top_ids: jax.Array  # (B, MAX_TOP_LOGPROBS) i32
    top_logprobs: jax.Array  # (B, MAX_TOP_LOGPROBS) f32


def apply_logit_bias(logits: jax.Array, p: SamplingArrays) -> jax.Array:
    """OpenAI's logit_bias: each row's bias added to its tokens' logits (padding pairs add 0 to token 0)."""
    if p.bias_ids is None:
        return logits
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, p.bias_ids].add(p.bias_values)


def apply_penalties(logits: jax.Array, counts: jax.Array, p: SamplingArrays) -> jax.Array:
    """OpenAI semantics over the tokens generated so far: counts (B, V) of each token in the output."""
    c = counts.astype(jnp.float32)
    return logits - p.presence_penalty[:, None] * (c > 0) - p.frequency_penalty[:, None] * c


def argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first index of the maximum), as int32. On the CPU as a max and a min of
    indices: XLA's CPU argmax (a two-operand reduction) took 0.92 ms for 8 x 49152 logits against 0.20 ms for the
    two plain reductions, and a DFlash step takes it over slots x block rows of the vocabulary. Rows holding NaN
    give their last index there."""
    if jax.default_backend() != "cpu":
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    v = x.shape[-1]
    hit = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1), v - 1)


def filter_logits(logits: jax.Array, p: SamplingArrays) -> jax.Array:
    """Temperature-scaled logits with everything outside top-k / top-p / min-p set to -inf."""
    scaled = logits / jnp.maximum(p.temperature, 1e-6)[:, None]
    cand, _ = top_k(scaled, NUM_CANDIDATES)  # (B, C) descending
    k = jnp.clip(jnp.where(p.top_k > 0, p.top_k, NUM_CANDIDATES), 1, NUM_CANDIDATES)
    kth = jnp.take_along_axis(cand, (k - 1)[:, None], axis=1)[:, 0]
    kth = jnp.where(p.top_k > 0, kth, -jnp.inf)
    log_z = logsumexp(scaled)
    cum = jnp.cumsum(jnp.exp(cand - log_z), axis=-1)  # (B, C)
    # Smallest prefix whose mass reaches top_p; its last member is the threshold.
    n_keep = jnp.sum(cum < p.top_p[:, None], axis=-1) + 1
    reached = n_keep <= NUM_CANDIDATES
    pth = jnp.take_along_axis(cand, (jnp.minimum(n_keep, NUM_CANDIDATES) - 1)[:, None], axis=1)[:, 0]
    pth = jnp.where((p.top_p < 1.0) & reached, pth, -jnp.inf)
    mth = jnp.where(p.min_p > 0, cand[:, 0] + jnp.log(jnp.maximum(p.min_p, 1e-30)), -jnp.inf)
    threshold = jnp.maximum(jnp.maximum(kth, pth), mth)
    return jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)


def needs_full(params: list) -> bool:
    """Whether a batch needs `sample(..., full=True)`: some row draws at random, asks for top logprobs or has a
    logit bias."""
    return any(p.temperature > 0 or (p.logprobs and p.top_logprobs > 0) or p.logit_bias for p in params)


def sample(logits: jax.Array, counts: jax.Array | None, p: SamplingArrays, positions: jax.Array,
           full: bool = True) -> SampleOutput:
    """logits (B, V) f32 of the next token; positions (B,) the position being sampled (keys the per-slot RNG, so a
    seeded request draws the same tokens whatever batch it shares, and speculative decoding draws what plain decoding
    draws). counts None: no penalties (speculating slots never carry any). The logit bias, like the penalties, shapes
    the choice but not the reported logprobs, which stay the model's.

    full=False (static) is the greedy batch: no logit bias, no candidate search (top-k over the vocabulary), no
    random draw, no top-logprobs search (zeros). Those cost ~0.1 ms per row at a 152k vocabulary on a GPU, which for
    a 16-slot x 16-token verify is more than the target's forward pass. The host picks the variant per batch
    (`needs_full`): a lax.cond on the device would block the dispatching host thread until its predicate is known
    (XLA's GPU conditional), which cost 1.6 ms of a 5.3 ms one-slot 8B step and undid the engine's host/device
    overlap."""
    logprobs = log_softmax(logits)
    penalized = logits if counts is None else apply_penalties(logits, counts, p)
    if full:
        penalized = apply_logit_bias(penalized, p)
    tokens = argmax(penalized)
    b = logits.shape[0]
    top_ids = jnp.zeros((b, MAX_TOP_LOGPROBS), jnp.int32)
    top_lp = jnp.zeros((b, MAX_TOP_LOGPROBS), logprobs.dtype)
    if full:
        keys = jax.vmap(lambda s, pos: jax.random.fold_in(jax.random.key(s), pos))(p.seed, positions)
        # jax.random.categorical's own draw (Gumbel noise per row, then the argmax) with the argmax above
        noise = jax.vmap(lambda k: jax.random.gumbel(k, penalized.shape[-1:], penalized.dtype))(keys)
        drawn = argmax(filter_logits(penalized, p) + noise)
        tokens = jnp.where(p.temperature > 0, drawn, tokens)
        top_lp, top_ids = top_k(logprobs, MAX_TOP_LOGPROBS)
        top_ids = top_ids.astype(jnp.int32)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=1)[:, 0]
    return SampleOutput(tokens, chosen, top_ids, top_lp)
