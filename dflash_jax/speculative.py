"""Speculative acceptance (pure functions): the longest prefix of drafts that the target itself would have chosen.

With greedy choices this is exact matching; with sampled target choices it is rejection sampling against a one-hot
draft distribution, which is lossless: every emitted token is the target's own sample given the emitted prefix.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def accept_lengths(drafts: jax.Array, choices: jax.Array) -> jax.Array:
    """drafts (B, T-1): d_1..d_{T-1}; choices (B, T): target choice y_0..y_{T-1} after [x, d_1..]. d_k is accepted
    while d_k == y_{k-1} for every earlier k. Returns accepted counts (B,) in 0..T-1; the slot then emits
    y_0 .. y_accepted (accepted drafts plus one bonus token)."""
    match = (drafts == choices[:, :-1]).astype(jnp.int32)
    return jnp.sum(jnp.cumprod(match, axis=1), axis=1).astype(jnp.int32)
