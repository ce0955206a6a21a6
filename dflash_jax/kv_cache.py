"""Paged KV cache (one page pool shared by all slots) and the per-step attention metadata that indexes it.

Dimensions: B slots, T tokens per slot this step, L layers, P pages in the pool, S page size, K KV heads, H head dim,
M max pages per slot.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention import write_rows

# Page 0 is never handed to a slot: page-table padding points at it (such reads are masked) and writes to it are
# dropped (`write_kv`), so it stays zeros and can't corrupt anyone's cache.
TRASH_PAGE = 0


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    k: list[jax.Array]  # L x (P, S, K, H)
    v: list[jax.Array]  # L x (P, S, K, H)

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @classmethod
    def create(cls, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
               dtype) -> "KVCache":
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        return cls(k=[jnp.zeros(shape, dtype) for _ in range(num_layers)],
                   v=[jnp.zeros(shape, dtype) for _ in range(num_layers)])


@jax.tree_util.register_dataclass
@dataclass
class AttentionMeta:
    """Which tokens this step computes and where their keys live. Slot b's token t (t < q_lens[b]) sits at
    absolute position kv_lens[b] - q_lens[b] + t and attends causally to positions < its own + 1."""

    q_lens: jax.Array  # (B,) int32: valid tokens of each slot in this step; 0 = padded slot
    kv_lens: jax.Array  # (B,) int32: cached length of each slot after this step's writes
    page_table: jax.Array  # (B, M) int32: page ids of each slot, in position order
    # (B,) int32: row of each slot in per-slot state (hybrid models' recurrent state pool); None = row b is slot b.
    slot_ids: jax.Array | None = None


def token_positions(meta: AttentionMeta, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Absolute positions (B, T) and validity mask (B, T) of the step's tokens."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)[None, :]
    start = (meta.kv_lens - meta.q_lens)[:, None]
    return start + t, t < meta.q_lens[:, None]


def cache_rows(meta: AttentionMeta, positions: jax.Array, valid: jax.Array, page_size: int) -> jax.Array:
    """Row of each token (B, T) in a page pool viewed as (P*S, K, H), or -1 where it is not written: padded tokens,
    and tokens whose page is the trash page (a verify block running past a slot's pages).

    Why not write them to the trash page: a padded prefill chunk or a training batch sends thousands of tokens to the
    same trash element, and XLA's GPU scatter serializes on such duplicates (366 ms for one layer of a 16 x 768
    training batch on an H200). What remains is unique (every live slot owns its pages), so writes need no atomics."""
    logical = positions // page_size
    valid = valid & (logical < meta.page_table.shape[1])
    page_idx = jnp.take_along_axis(meta.page_table, jnp.clip(logical, 0, meta.page_table.shape[1] - 1), axis=1)
    valid = valid & (page_idx != TRASH_PAGE)
    return jnp.where(valid, page_idx * page_size + positions % page_size, -1)


def write_kv(pages: jax.Array, new: jax.Array, meta: AttentionMeta, positions: jax.Array,
             valid: jax.Array) -> jax.Array:
    """Scatter new (B, T, K, H) into pages (P, S, K, H) at the tokens' positions; tokens `cache_rows` leaves out are
    dropped."""
    return write_rows(pages, new, cache_rows(meta, positions, valid, pages.shape[1]))
