"""Ragged paged attention: per slot a run of q_len queries at the end of its kv_len cached keys, causal, GQA.

This file holds the plain `jax.numpy` reference that defines the semantics; faster kernels are checked against it.
Dimensions: B slots, T queries per slot, N query heads, K KV heads, G = N // K, H head dim, P pages, S page size,
M max pages per slot, C = M * S keys per slot.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                              q_lens: jax.Array, kv_lens: jax.Array, *, scale: float | None = None) -> jax.Array:
    """q (B, T, N, H); k/v_pages (P, S, K, H); page_table (B, M); q_lens, kv_lens (B,). Returns (B, T, N, H) in
    q.dtype; rows t >= q_len are zeros. Query t of slot b sits at position kv_len - q_len + t."""
    b, t, n, h = q.shape
    k_heads = k_pages.shape[2]
    g = n // k_heads
    scale = h ** -0.5 if scale is None else scale
    k = k_pages[page_table].reshape(b, -1, k_heads, h)  # (B, C, K, H)
    v = v_pages[page_table].reshape(b, -1, k_heads, h)
    qg = q.reshape(b, t, k_heads, g, h)
    s = jnp.einsum("btkgh,bckh->bkgtc", qg, k, preferred_element_type=jnp.float32) * scale
    q_pos = (kv_lens - q_lens)[:, None] + jnp.arange(t)[None, :]  # (B, T)
    k_pos = jnp.arange(k.shape[1])[None, :]  # (1, C)
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] < kv_lens[:, None, None])  # (B, T, C)
    mask &= (jnp.arange(t)[None, :] < q_lens[:, None])[:, :, None]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgtc,bckh->btkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)
