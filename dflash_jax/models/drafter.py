"""DFlash block-diffusion drafter (z-lab DFlash, DESIGN.md section 4) in Flax NNX.

Qwen3-style layers at the target's hidden size. Context: the target's tap-layer features of committed tokens ->
`fc` -> `hidden_norm`, turned by every layer's own k/v projections into cached K/V (paged like the target's KV).
Queries come only from the block [last token, MASK x (T-1)], which attends to that context and to itself
bidirectionally. The target's embedding and LM head are shared, not copied.

Dimensions: B slots, T block size, D hidden, F tap features (K_taps * D), N/K heads, H head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dflash_jax.kv_cache import AttentionMeta, KVCache, write_kv
from dflash_jax.models.dense import MLP, Linear, RMSNorm, rope
from dflash_jax.models.layer_calls import per_trace
from pallas_kernels.ragged_paged_attention import drafter_attention


class DrafterAttention(nnx.Module):
    def __init__(self, cfg, dtype, sliding: bool):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(d, n * h, dtype)
        self.k_proj = Linear(d, k * h, dtype)
        self.v_proj = Linear(d, k * h, dtype)
        self.o_proj = Linear(n * h, d, dtype)
        self.q_norm = RMSNorm(h, cfg.rms_eps, dtype)
        self.k_norm = RMSNorm(h, cfg.rms_eps, dtype)
        self.cfg = cfg
        self.window = cfg.sliding_window if sliding else None

    def kv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, T, D) -> roped K and V (B, T, K, H) at absolute positions (B, T)."""
        b, t, _ = x.shape
        k = self.k_norm(self.k_proj(x).reshape(b, t, self.cfg.num_kv_heads, self.cfg.head_dim))
        v = self.v_proj(x).reshape(b, t, self.cfg.num_kv_heads, self.cfg.head_dim)
        return rope(k, positions, self.cfg.rope_theta), v

    def __call__(self, x, positions, ctx_lens, page_table, k_pages, v_pages, ctx_window):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, t, self.cfg.num_heads, self.cfg.head_dim))
        q = rope(q, positions, self.cfg.rope_theta)
        k, v = self.kv(x, positions)
        o = drafter_attention(q, k, v, k_pages, v_pages, page_table, ctx_lens, ctx_window,
                                        causal_window=self.window)
        return self.o_proj(o.reshape(b, t, -1))


class DrafterLayer(nnx.Module):
    def __init__(self, cfg, dtype, sliding: bool, fuse_mlp: bool = False):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        self.self_attn = DrafterAttention(cfg, dtype, sliding)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        # separate gate/up: the drafter's GGUF and trainer layout; fused (`fuse_mlp`) for serving
        self.mlp = MLP(cfg, dtype, fuse=fuse_mlp)

    def __call__(self, x, positions, ctx_lens, page_table, k_pages, v_pages, ctx_window):
        x = x + self.self_attn(self.input_layernorm(x), positions, ctx_lens, page_table, k_pages, v_pages,
                               ctx_window)
        return x + self.mlp(self.post_attention_layernorm(x))


class Drafter(nnx.Module):
    def __init__(self, cfg, dtype=jnp.bfloat16, fuse_mlp: bool = False):
        self.cfg = cfg
        num_taps = len(cfg.target_layer_ids)
        self.fc = Linear(num_taps * cfg.hidden_size, cfg.hidden_size, dtype)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        swa = cfg.swa_layers or (False,) * cfg.num_layers
        self.layers = nnx.List([DrafterLayer(cfg, dtype, swa[i], fuse_mlp) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)

    def write_context(self, feats: jax.Array, meta: AttentionMeta, positions: jax.Array, valid: jax.Array,
                      cache: KVCache) -> KVCache:
        """Turn tap features (B, T, F) of tokens at `positions` into every layer's context K/V; invalid rows go to
        the trash page."""
        ctx = self.hidden_norm(self.fc(feats.astype(self.fc.weight[...].dtype)))
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.kv(ctx, positions)
            ks.append(write_kv(cache.k[i], k, meta, positions, valid))
            vs.append(write_kv(cache.v[i], v, meta, positions, valid))
        return KVCache(k=ks, v=vs)

    def __call__(self, block_embeds: jax.Array, ctx_lens: jax.Array, page_table: jax.Array, cache: KVCache,
                 ctx_window: int | None = None) -> jax.Array:
        """block_embeds (B, T, D) at positions ctx_len .. ctx_len + T - 1 -> final-normed hidden (B, T, D)."""
        t = block_embeds.shape[1]
        positions = ctx_lens[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        x, call = block_embeds, per_trace(DrafterLayer.__call__, ("ctx_window",))
        for i, layer in enumerate(self.layers):
            x = call(layer, x, positions, ctx_lens, page_table, cache.k[i], cache.v[i], ctx_window=ctx_window)
        return self.norm(x)


def fuse_mlp(drafter: Drafter) -> Drafter:
    """The same drafter with each layer's gate and up projections as one Linear (the target's `MLP` layout), for
    serving: one product reads both weights (the 8-slot Qwen3-8B spec step ran them as 10 products of 31.8 us, H200,
    session 23, where the target's fused product takes 55 us for both). The drafter itself when it is already fused
    or holds Q8_0 projections (a group fuses only as a whole)."""
    mlp = drafter.layers[0].mlp
    if mlp.gate_up_proj is not None or mlp.gate_proj.is_q8_0 or mlp.up_proj.is_q8_0:
        return drafter
    pure = nnx.state(drafter).to_pure_dict()
    for layer in pure["layers"].values():
        gate, up = layer["mlp"].pop("gate_proj"), layer["mlp"].pop("up_proj")
        layer["mlp"]["gate_up_proj"] = {"weight": jnp.concatenate([gate["weight"], up["weight"]], axis=0)}
    dtype = drafter.fc.weight[...].dtype
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Drafter(drafter.cfg, dtype, fuse_mlp=True)))
    state.replace_by_pure_dict(pure)
    return nnx.merge(graphdef, state)
