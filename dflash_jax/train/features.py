"""Frozen-target features for training: one causal forward of the target over whole sequences, returning the residual
stream after each tap layer (the serving step's `feats`), through the same DenseDecoder the engine runs.

Dimensions: B sequences, L sequence length, F = taps x hidden.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dflash_jax.kv_cache import AttentionMeta, KVCache

PAGE_SIZE = 64


def tap_features(target, tokens: jax.Array, lengths: jax.Array, taps: tuple[int, ...]) -> jax.Array:
    """tokens (B, L) i32, lengths (B,) -> tap features (B, L, F), constant (no gradient). The sequences get a
    throwaway paged KV cache of their own (page 0 is the trash page), so this is exactly a prefill of each one."""
    cfg = target.cfg
    b, seq_len = tokens.shape
    pages = -(-seq_len // PAGE_SIZE)
    cache = KVCache.create(cfg.num_layers, 1 + b * pages, PAGE_SIZE, cfg.num_kv_heads, cfg.head_dim,
                           target.embed_tokens[...].dtype)
    page_table = 1 + jnp.arange(b * pages, dtype=jnp.int32).reshape(b, pages)
    lengths = lengths.astype(jnp.int32)
    meta = AttentionMeta(q_lens=lengths, kv_lens=lengths, page_table=page_table)
    _, _, feats = target(tokens, meta, cache, tuple(taps))
    return jax.lax.stop_gradient(feats)


def pad_batch(seqs: list[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (and cut at seq_len) token sequences -> tokens (B, L) i32, lengths (B,) i32."""
    tokens = np.zeros((len(seqs), seq_len), np.int32)
    lengths = np.zeros((len(seqs),), np.int32)
    for i, s in enumerate(seqs):
        n = min(len(s), seq_len)
        tokens[i, :n] = s[:n]
        lengths[i] = n
    return tokens, lengths
