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


def write_rows(pages: jax.Array, new: jax.Array, rows: jax.Array) -> jax.Array:
    """Scatter new (..., K, H) into pages (P, S, K, H) viewed as (P*S, K, H) at `rows` (...); rows < 0 are dropped
    (their index is out of bounds)."""
    num_rows = pages.shape[0] * pages.shape[1]
    flat = pages.reshape(num_rows, *pages.shape[2:])
    idx = jnp.where(rows >= 0, rows, num_rows).reshape(-1)
    new = new.reshape(-1, *pages.shape[2:]).astype(pages.dtype)
    return flat.at[idx].set(new, mode="drop", unique_indices=True).reshape(pages.shape)


CHUNK_PAGES = 16  # pages per step of the chunked attention (the CPU path)


def _online_step(carry, qg, k, v, mask, scale):
    """One key block of an online softmax in f32: carry (m, l (B, K, G, T), acc (B, K, G, T, H)); k, v (B, C, K, H);
    mask (B, T, C) the visible keys."""
    m, l, acc = carry
    s = jnp.einsum("btkgh,bckh->bkgtc", qg, k.astype(jnp.float32)) * scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - safe[..., None])
    corr = jnp.exp(m - safe)
    return m_new, corr * l + jnp.sum(p, axis=-1), corr[..., None] * acc + jnp.einsum(
        "bkgtc,bckh->bkgth", p, v.astype(jnp.float32))


def _chunked(qg, k_pages, v_pages, page_table, ctx_hi, chunk_pages, key_mask, scale, carry):
    """Walk the table's pages `chunk_pages` at a time while any slot has keys below ctx_hi (B,): the cost follows
    the longest cached length, not the table's width. key_mask(key_pos (1, C)) -> (B, T, C) the visible keys.
    Keys at or past a slot's ctx_hi are also zeroed in v (a stale page may hold anything)."""
    b = qg.shape[0]
    k_heads, h = k_pages.shape[2:]
    page_size, max_pages = k_pages.shape[1], page_table.shape[1]
    width = -(-max_pages // chunk_pages) * chunk_pages
    table = jnp.pad(page_table, ((0, 0), (0, width - max_pages)))  # page 0: beyond every ctx_hi
    keys = chunk_pages * page_size
    steps = (jnp.minimum(jnp.max(ctx_hi), max_pages * page_size) + keys - 1) // keys

    def body(c):
        i, *rest = c
        pages = jax.lax.dynamic_slice_in_dim(table, i * chunk_pages, chunk_pages, axis=1)
        k = k_pages[pages].reshape(b, keys, k_heads, h)
        v = v_pages[pages].reshape(b, keys, k_heads, h)
        k_pos = i * keys + jnp.arange(keys)[None, :]
        v = jnp.where((k_pos < ctx_hi[:, None])[:, :, None, None], v.astype(jnp.float32), 0.0)
        return (i + 1, *_online_step(tuple(rest), qg, k, v, key_mask(k_pos), scale))

    _, *carry = jax.lax.while_loop(lambda c: c[0] < steps, body, (jnp.int32(0), *carry))
    return tuple(carry)


def _start(b, k_heads, g, t, h):
    return (jnp.full((b, k_heads, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, k_heads, g, t), jnp.float32),
            jnp.zeros((b, k_heads, g, t, h), jnp.float32))


def _finish(carry, shape, dtype):
    _, l, acc = carry
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # rows that see nothing: zeros, as the references give
    return out.transpose(0, 3, 1, 2, 4).reshape(shape).astype(dtype)


def paged_attention_chunked(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                            q_lens: jax.Array, kv_lens: jax.Array, *, scale: float | None = None,
                            chunk_pages: int = CHUNK_PAGES) -> jax.Array:
    """`paged_attention_reference`'s semantics at a cost that follows the longest cached length, not the page
    table's width (the CPU path). The reference gathers every page of the table: a one-slot CPU server of 8192
    tokens a slot gathers 512 pages a layer for a 512-token chat (SmolLM2 forward 239 ms against 34 ms at 33 pages).
    Here `chunk_pages` pages a step with an online softmax in f32 (flash attention); tables of at most one chunk take
    the reference itself. Same results up to f32 rounding."""
    b, t, n, h = q.shape
    k_heads = k_pages.shape[2]
    if page_table.shape[1] <= chunk_pages:
        return paged_attention_reference(q, k_pages, v_pages, page_table, q_lens, kv_lens, scale=scale)
    g = n // k_heads
    scale = h ** -0.5 if scale is None else scale
    q_pos = (kv_lens - q_lens)[:, None] + jnp.arange(t)[None, :]  # (B, T)
    row_ok = jnp.arange(t)[None, :] < q_lens[:, None]

    def key_mask(k_pos):
        mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] < kv_lens[:, None, None])
        return mask & row_ok[:, :, None]

    qg = q.reshape(b, t, k_heads, g, h).astype(jnp.float32)
    carry = _chunked(qg, k_pages, v_pages, page_table, jnp.where(q_lens > 0, kv_lens, 0), chunk_pages, key_mask,
                     scale, _start(b, k_heads, g, t, h))
    return _finish(carry, (b, t, n, h), q.dtype)


def drafter_attention_chunked(q: jax.Array, k_block: jax.Array, v_block: jax.Array, k_pages: jax.Array,
                              v_pages: jax.Array, page_table: jax.Array, ctx_lens: jax.Array,
                              ctx_window: int | None = None, causal_window: int | None = None,
                              *, scale: float | None = None, chunk_pages: int = CHUNK_PAGES) -> jax.Array:
    """`drafter_attention_reference`'s semantics the way `paged_attention_chunked` walks the context pages (only
    while a slot has context left), then the block's own keys."""
    b, t, n, h = q.shape
    k_heads = k_pages.shape[2]
    if page_table.shape[1] <= chunk_pages:
        return drafter_attention_reference(q, k_block, v_block, k_pages, v_pages, page_table, ctx_lens, ctx_window,
                                           causal_window, scale=scale)
    g = n // k_heads
    scale = h ** -0.5 if scale is None else scale
    q_pos = ctx_lens[:, None] + jnp.arange(t)[None, :]  # (B, T)

    def causal(mask, key_pos):
        if causal_window is None:
            return mask
        delta = q_pos[:, :, None] - key_pos[:, None, :]
        return mask & (delta >= 0) & (delta < causal_window)

    def ctx_mask(k_pos):
        vis = k_pos < ctx_lens[:, None]
        if ctx_window is not None:
            vis &= k_pos >= ctx_lens[:, None] - ctx_window
        return causal(jnp.broadcast_to(vis[:, None, :], (b, t, vis.shape[1])), k_pos)

    qg = q.reshape(b, t, k_heads, g, h).astype(jnp.float32)
    carry = _chunked(qg, k_pages, v_pages, page_table, ctx_lens, chunk_pages, ctx_mask, scale,
                     _start(b, k_heads, g, t, h))
    block_mask = causal(jnp.ones((b, t, t), bool), q_pos)
    carry = _online_step(carry, qg, k_block.astype(k_pages.dtype), v_block.astype(v_pages.dtype), block_mask, scale)
    return _finish(carry, (b, t, n, h), q.dtype)
