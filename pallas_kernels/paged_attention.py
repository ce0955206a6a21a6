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


def drafter_attention_reference(q: jax.Array, k_block: jax.Array, v_block: jax.Array, k_pages: jax.Array,
                                v_pages: jax.Array, page_table: jax.Array, ctx_lens: jax.Array,
                                ctx_window: int | None = None, causal_window: int | None = None,
                                *, scale: float | None = None) -> jax.Array:
    """DFlash block attention. q, k/v_block (B, T, N|K, H): the block's queries and keys; every query sees context
    keys at positions [ctx_len - ctx_window, ctx_len) from the pages and all T block keys (bidirectional). With
    `causal_window` (sliding-window drafter layers) a query at block index t sees keys within that many positions
    before it and none after. Returns (B, T, N, H)."""
    b, t, n, h = q.shape
    k_heads = k_pages.shape[2]
    g = n // k_heads
    scale = h ** -0.5 if scale is None else scale
    k_ctx = k_pages[page_table].reshape(b, -1, k_heads, h)  # (B, C, K, H)
    v_ctx = v_pages[page_table].reshape(b, -1, k_heads, h)
    k = jnp.concatenate([k_ctx, k_block.astype(k_ctx.dtype)], axis=1)  # (B, C + T, K, H)
    v = jnp.concatenate([v_ctx, v_block.astype(v_ctx.dtype)], axis=1)
    c = k_ctx.shape[1]
    key_pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(c), (b, c)),
                               ctx_lens[:, None] + jnp.arange(t)[None, :]], axis=1)  # (B, C + T)
    q_pos = ctx_lens[:, None] + jnp.arange(t)[None, :]  # (B, T)
    is_ctx = jnp.arange(c + t)[None, :] < c
    visible = jnp.where(is_ctx, key_pos < ctx_lens[:, None], True)  # (B, C + T)
    if ctx_window is not None:
        visible &= jnp.where(is_ctx, key_pos >= ctx_lens[:, None] - ctx_window, True)
    mask = jnp.broadcast_to(visible[:, None, :], (b, t, c + t))
    if causal_window is not None:
        delta = q_pos[:, :, None] - key_pos[:, None, :]
        mask &= (delta >= 0) & (delta < causal_window)
    s = jnp.einsum("btkgh,bckh->bkgtc", q.reshape(b, t, k_heads, g, h), k,
                   preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)  # every query sees at least its own block key
    out = jnp.einsum("bkgtc,bckh->btkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)
