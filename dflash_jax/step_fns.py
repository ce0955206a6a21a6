"""The jitted device step: model forward over a (slots x tokens) bucket, sampling of each slot's next token.

Dimensions: B slots in the bucket, T tokens per slot, V vocab, R = num_slots + 1 rows of per-slot device state
(the last row belongs to padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from dflash_jax.kv_cache import AttentionMeta, KVCache
from dflash_jax.sampling import SampleOutput, SamplingArrays, sample


@jax.tree_util.register_dataclass
@dataclass
class StepInputs:
    tokens: jax.Array  # (B, T) i32
    meta: AttentionMeta
    slot_ids: jax.Array  # (B,) i32, padding rows point at the last row of `counts`
    is_first: jax.Array  # (B,) bool: first chunk of a new request (its penalty counts restart)
    sampling: SamplingArrays


@partial(jax.jit, static_argnums=(0,), donate_argnums=(2, 3))
def model_step(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, counts: jax.Array,
               inputs: StepInputs) -> tuple[KVCache, jax.Array, SampleOutput]:
    """counts (R, V) i32: tokens generated so far per slot (for presence/frequency penalties)."""
    model = nnx.merge(graphdef, state)
    hidden, cache, _ = model(inputs.tokens, inputs.meta, cache)
    last = jnp.maximum(inputs.meta.q_lens - 1, 0)
    h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # (B, D)
    logits = model.logits(h_last)
    rows = jnp.where(inputs.is_first[:, None], 0, counts[inputs.slot_ids])  # (B, V)
    out = sample(logits, rows, inputs.sampling, positions=inputs.meta.kv_lens)
    rows = rows.at[jnp.arange(rows.shape[0]), out.tokens].add(1)
    counts = counts.at[inputs.slot_ids].set(rows)
    return cache, counts, out
