"""The hybrid model's device cache: paged KV for the full-attention layers and, beside it, a per-slot pool of
Gated DeltaNet recurrent state (conv window + delta-rule state), one row per slot, indexed by slot id.

Dimensions: R state rows (slots + one row that padding writes into), P pages, S page size, K KV heads, H head dim,
W conv kernel - 1, C conv channels, Hv value heads, Dk key dim, Dv value dim.
A row needs no reset between requests: a step whose tokens start at position 0 reads zeros instead of the row.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from dflash_jax.config import HybridConfig, ModelConfig
from dflash_jax.kv_cache import KVCache


@jax.tree_util.register_dataclass
@dataclass
class HybridCache(KVCache):
    """KVCache's pages (k, v: one entry per attention layer) plus the recurrent layers' state rows."""
    conv: list[jax.Array]  # recurrent layers x (R, W, C) f32: the last W inputs of the causal conv
    ssm: list[jax.Array]  # recurrent layers x (R, Hv, Dk, Dv) f32: the delta-rule state

    @classmethod
    def create(cls, cfg: HybridConfig, num_pages: int, page_size: int, num_rows: int,  # type: ignore[override]
               dtype) -> "HybridCache":
        kv = KVCache.create(cfg.num_kv_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, dtype)
        # State stays f32 whatever the KV dtype: it integrates every token of the request, so rounding accumulates.
        n = len(cfg.recurrent_layers)
        conv = [jnp.zeros((num_rows, cfg.conv_kernel - 1, cfg.conv_dim), jnp.float32) for _ in range(n)]
        ssm = [jnp.zeros((num_rows, cfg.ssm_v_heads, cfg.ssm_head_dim, cfg.ssm_head_dim), jnp.float32)
               for _ in range(n)]
        return cls(k=kv.k, v=kv.v, conv=conv, ssm=ssm)


@functools.partial(jax.jit, donate_argnums=0)
def copy_state_row(cache: HybridCache, src: jax.Array, dst: jax.Array) -> HybridCache:
    """Row src's conv windows and delta-rule states into row dst (a prefix's state kept, or restored into a slot)."""
    return dataclasses.replace(cache, conv=[c.at[dst].set(c[src]) for c in cache.conv],
                               ssm=[s.at[dst].set(s[src]) for s in cache.ssm])


def state_bytes_per_slot(cfg: HybridConfig) -> int:
    n = len(cfg.recurrent_layers)
    return 4 * n * ((cfg.conv_kernel - 1) * cfg.conv_dim + cfg.ssm_v_heads * cfg.ssm_head_dim ** 2)


def make_cache(cfg: ModelConfig, num_pages: int, page_size: int, num_rows: int, dtype) -> KVCache | HybridCache:
    """The target's cache: plain paged KV for dense models, KV + state pool (num_rows rows) for hybrids."""
    if isinstance(cfg, HybridConfig):
        return HybridCache.create(cfg, num_pages, page_size, num_rows, dtype)
    return KVCache.create(cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, dtype)
