"""Qwen3.5 / Qwen3.6 hybrid decoder (GGUF arch `qwen35`) in Flax NNX, following llama.cpp's `src/models/qwen35.cpp`:
Gated DeltaNet layers with per-slot recurrent state, and every `full_attention_interval`-th layer gated full
attention over the paged KV cache.

Dimensions: B slots, T tokens per slot, D hidden, N query heads, K KV heads, H head dim, C conv channels (q, k, v),
Hk / Hv key / value heads of the delta rule, Dh their head dim, R state rows.
Weights keep the HF (out, in) layout; V heads stay in the GGUF's tiled order (value head j reads key head j % Hk).
Linears that read one input are fused as in the dense decoder (`dense.FUSED`): attention q (query + gate) / k / v,
the delta net's four input projections, the MLP's gate / up.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from dflash_jax.config import HybridConfig
from dflash_jax.kv_cache import AttentionMeta, token_positions, write_kv
from dflash_jax.models.dense import MLP, DecoderEnds, Linear, RMSNorm, SharedInput, _sub, rope
from dflash_jax.models.layer_calls import per_trace
from dflash_jax.state_pool import HybridCache
from pallas_kernels import gated_delta_net as gdn
from pallas_kernels.invariance import row_sum
from pallas_kernels.ragged_paged_attention import ragged_paged_attention


def partial_rope(x: jax.Array, positions: jax.Array, theta: float, rope_dims: int) -> jax.Array:
    """Multi-section RoPE for text: every section sees the same position, so it is NeoX RoPE on the first rope_dims
    dims (frequencies over rope_dims, not the head dim); the other dims pass through."""
    return jnp.concatenate([rope(x[..., :rope_dims], positions, theta), x[..., rope_dims:]], axis=-1)


class GatedAttention(SharedInput, nnx.Module):
    def __init__(self, cfg: HybridConfig, dtype, q8: frozenset[str] = frozenset()):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q_proj per head: [query (H), output gate (H)]
        self._init_group("qkv_proj", d, (2 * n * h, k * h, k * h), dtype, q8)
        self.o_proj = Linear(n * h, d, dtype, q8_0="o_proj" in q8)
        self.q_norm = RMSNorm(h, cfg.rms_eps, dtype)
        self.k_norm = RMSNorm(h, cfg.rms_eps, dtype)
        self.cfg = cfg

    def __call__(self, x, positions, valid, meta: AttentionMeta, k_pages, v_pages):
        cfg = self.cfg
        b, t, _ = x.shape
        qg, k, v = self._project("qkv_proj", x)
        qg = qg.reshape(b, t, cfg.num_heads, 2 * cfg.head_dim)
        q, gate = qg[..., :cfg.head_dim], qg[..., cfg.head_dim:]
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q = partial_rope(self.q_norm(q), positions, cfg.rope_theta, cfg.rope_dims)
        k = partial_rope(self.k_norm(k), positions, cfg.rope_theta, cfg.rope_dims)
        k_pages = write_kv(k_pages, k, meta, positions, valid)
        v_pages = write_kv(v_pages, v, meta, positions, valid)
        o = ragged_paged_attention(q, k_pages, v_pages, meta.page_table, meta.q_lens, meta.kv_lens)
        o = o * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(o.dtype)
        return self.o_proj(o.reshape(b, t, -1)), k_pages, v_pages


def _l2norm(x, eps):
    # llama.cpp's GDN l2 norm: x / sqrt(sum(x^2) + eps) (an rms_norm with eps / n, rescaled).
    return x * jax.lax.rsqrt(row_sum(x * x, keepdims=True) + eps)


class GatedDeltaNet(SharedInput, nnx.Module):
    def __init__(self, cfg: HybridConfig, dtype, q8: frozenset[str] = frozenset()):
        d, hv = cfg.hidden_size, cfg.ssm_v_heads
        self._init_group("in_proj", d, (cfg.conv_dim, cfg.ssm_value_dim, hv, hv), dtype, q8)  # qkv, z, b, a
        self.conv1d = nnx.Param(jnp.zeros((cfg.conv_dim, cfg.conv_kernel), dtype))  # (C, kernel)
        self.dt_bias = nnx.Param(jnp.zeros((hv,), dtype))
        self.A = nnx.Param(jnp.zeros((hv,), dtype))  # = -exp(A_log), as the GGUF stores it
        self.norm = RMSNorm(cfg.ssm_head_dim, cfg.rms_eps, dtype)
        self.out_proj = Linear(cfg.ssm_value_dim, d, dtype, q8_0="out_proj" in q8)
        self.cfg = cfg

    def project(self, x):
        """The input projections (qkv, z, b, a), f32. qkv (B, T, C) is the raw conv input: what the conv state keeps,
        and what a replay rebuilds it from."""
        return [y.astype(jnp.float32) for y in self._project("in_proj", x)]

    def rule_inputs(self, qkv, b_in, a_in, conv_state, valid):
        """(q, k, v, g, beta) of the delta rule for each token; padded tokens get g = beta = 0 (no-ops)."""
        cfg = self.cfg
        b, t, _ = qkv.shape
        y, _ = gdn.causal_conv(conv_state, qkv, self.conv1d[...].astype(jnp.float32), jnp.zeros((b,), jnp.int32))
        y = jax.nn.silu(y)
        kd, dh = cfg.ssm_key_dim, cfg.ssm_head_dim
        rep = cfg.ssm_v_heads // cfg.ssm_k_heads
        q = _l2norm(y[..., :kd].reshape(b, t, cfg.ssm_k_heads, dh), cfg.rms_eps)
        k = _l2norm(y[..., kd:2 * kd].reshape(b, t, cfg.ssm_k_heads, dh), cfg.rms_eps)
        q = jnp.tile(q, (1, 1, rep, 1)) * dh ** -0.5  # (B, T, Hv, Dh), tiled: value head j <- key head j % Hk
        k = jnp.tile(k, (1, 1, rep, 1))
        v = y[..., 2 * kd:].reshape(b, t, cfg.ssm_v_heads, dh)
        beta = jax.nn.sigmoid(b_in)
        a = a_in + self.dt_bias[...].astype(jnp.float32)
        g = jax.nn.softplus(a) * self.A[...].astype(jnp.float32)
        mask = valid[..., None]
        return q, k, v, jnp.where(mask, g, 0.0), jnp.where(mask, beta, 0.0)

    def output(self, o, z, dtype):
        """Gated RMSNorm with z (B, T, Hv * Dh) f32, then the output projection. o (B, T, Hv, Dh) f32."""
        b, t = o.shape[:2]
        o = self.norm(o) * jax.nn.silu(z.reshape(o.shape))
        return self.out_proj(o.reshape(b, t, -1).astype(dtype))


class HybridLayer(nnx.Module):
    def __init__(self, cfg: HybridConfig, layer: int, dtype, q8: frozenset[str] = frozenset()):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        recurrent = cfg.is_recurrent(layer)
        self.linear_attn = GatedDeltaNet(cfg, dtype, _sub(q8, "linear_attn")) if recurrent else None
        self.self_attn = None if recurrent else GatedAttention(cfg, dtype, _sub(q8, "self_attn"))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        self.mlp = MLP(cfg, dtype, _sub(q8, "mlp"))


@jax.tree_util.register_dataclass
@dataclass
class PendingState:
    """What a verify leaves for the commit: per recurrent layer, the block's conv inputs and delta-rule inputs."""

    qkv: list[jax.Array]  # recurrent layers x (B, T, C) f32
    k: list[jax.Array]  # recurrent layers x (B, T, Hv, Dh)
    v: list[jax.Array]  # recurrent layers x (B, T, Hv, Dh)
    g: list[jax.Array]  # recurrent layers x (B, T, Hv)
    beta: list[jax.Array]  # recurrent layers x (B, T, Hv)


def _recurrent_layer(layer: HybridLayer, x, conv, ssm, rows, fresh, valid, q_lens, *, verify: bool):
    """A Gated DeltaNet layer and its MLP: prefill chunks (chunked delta rule) and decode (T = 1) advance the slot's
    conv window and state rows; a verify (token by token) leaves both as they were and returns the inputs the commit
    replays (qkv, k, v, g, beta), else None."""
    net = layer.linear_attn
    h = layer.input_layernorm(x)
    c0 = gdn.read_rows(conv, rows, fresh)
    qkv, z, b_in, a_in = net.project(h)
    q, k, v, g, beta = net.rule_inputs(qkv, b_in, a_in, c0, valid)
    if verify or x.shape[1] == 1:  # token by token, the state pool read (and for decode written) in place
        pool, o = gdn.pool_recurrent(ssm, rows, fresh, q, k, v, g, beta, write=not verify)
    else:
        s0 = gdn.read_rows(ssm, rows, fresh)
        s1, o = gdn.chunked(s0, q, k, v, g, beta)
        pool = ssm.at[rows].set(s1)
    if not verify:
        conv, ssm = conv.at[rows].set(gdn.conv_window(c0, qkv, q_lens)), pool
    x = x + net.output(o, z, h.dtype)
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x, conv, ssm, ((qkv, k, v, g, beta) if verify else None)


def _commit_layer(conv, ssm, rows, fresh, qkv, k, v, g, beta, num_steps):
    """One recurrent layer's commit: its rows' conv window and state advanced by the first num_steps verified tokens."""
    c0 = gdn.read_rows(conv, rows, fresh)
    conv = conv.at[rows].set(gdn.conv_window(c0, qkv, num_steps))
    return conv, gdn.pool_replay(ssm, rows, fresh, k, v, g, beta, num_steps)


def _attention_layer(layer: HybridLayer, x, positions, valid, meta: AttentionMeta, k_pages, v_pages):
    a, k_pages, v_pages = layer.self_attn(layer.input_layernorm(x), positions, valid, meta, k_pages, v_pages)
    x = x + a
    return x + layer.mlp(layer.post_attention_layernorm(x)), k_pages, v_pages


class HybridDecoder(DecoderEnds, nnx.Module):
    is_hybrid = True

    def __init__(self, cfg: HybridConfig, dtype=jnp.bfloat16, q8_linears: frozenset[str] = frozenset()):
        """q8_linears: dotted paths of the Linear layers that keep GGUF Q8_0 weights, as in DenseDecoder."""
        self.cfg = cfg
        self._init_ends(cfg, dtype, q8_linears)
        self.layers = nnx.List([HybridLayer(cfg, i, dtype, _sub(q8_linears, f"layers.{i}"))
                                for i in range(cfg.num_layers)])

    def __call__(self, tokens: jax.Array, meta: AttentionMeta, cache: HybridCache,
                 tap_layers: tuple[int, ...] = ()) -> tuple[jax.Array, HybridCache, jax.Array | None]:
        """Prefill chunk (chunked delta rule) or decode (T = 1, recurrent); commits the recurrent state of the
        valid tokens. Same contract as DenseDecoder.__call__."""
        hidden, cache, feats, _ = self._forward(tokens, meta, cache, tap_layers, verify=False)
        return hidden, cache, feats

    def verify(self, tokens, meta, cache, tap_layers=()):
        """A speculative block: KV written, recurrent state left as it was, token by token (the decode form, so that
        verify and decode logits agree); returns what `commit` needs to advance the state by the accepted prefix."""
        return self._forward(tokens, meta, cache, tap_layers, verify=True)

    def commit(self, cache: HybridCache, pending: PendingState, meta: AttentionMeta,
               num_steps: jax.Array) -> HybridCache:
        """Advance each slot's recurrent state by exactly its first num_steps (B,) verified tokens: a fixed-length
        masked replay of the delta rule, and the conv window rebuilt from the committed inputs."""
        rows, fresh = self._rows(meta, num_steps.shape[0])
        conv, ssm = list(cache.conv), list(cache.ssm)
        commit = jax.jit(_commit_layer)  # per trace, like the layers: 48 identical commits trace and lower once
        for r in range(len(conv)):
            conv[r], ssm[r] = commit(conv[r], ssm[r], rows, fresh, pending.qkv[r], pending.k[r], pending.v[r],
                                     pending.g[r], pending.beta[r], num_steps)
        return HybridCache(k=cache.k, v=cache.v, conv=conv, ssm=ssm)

    @staticmethod
    def _rows(meta: AttentionMeta, b: int):
        rows = meta.slot_ids if meta.slot_ids is not None else jnp.arange(b, dtype=jnp.int32)
        # A block starting at position 0 is a new request: it starts from zero state, whatever the row held.
        return rows, (meta.kv_lens - meta.q_lens) == 0

    def _forward(self, tokens, meta, cache: HybridCache, tap_layers, verify: bool):
        b, t = tokens.shape
        positions, valid = token_positions(meta, t)
        rows, fresh = self._rows(meta, b)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)
        k_pages, v_pages, conv, ssm = list(cache.k), list(cache.v), list(cache.conv), list(cache.ssm)
        pending = PendingState([], [], [], [], [])
        taps, a_i, r_i = {}, 0, 0
        recurrent_call, attention_call = per_trace(_recurrent_layer, ("verify",)), per_trace(_attention_layer)
        # Unrolled on purpose, as in the dense decoder: a scan with the cache as carry copies it every step.
        for i, layer in enumerate(self.layers):
            if layer.linear_attn is not None:
                x, conv[r_i], ssm[r_i], inputs = recurrent_call(layer, x, conv[r_i], ssm[r_i], rows, fresh, valid,
                                                                meta.q_lens, verify=verify)
                if verify:
                    for field, value in zip(("qkv", "k", "v", "g", "beta"), inputs):
                        getattr(pending, field).append(value)
                r_i += 1
            else:
                x, k_pages[a_i], v_pages[a_i] = attention_call(layer, x, positions, valid, meta, k_pages[a_i],
                                                               v_pages[a_i])
                a_i += 1
            if i in tap_layers:
                taps[i] = x
        feats = jnp.concatenate([taps[i] for i in tap_layers], axis=-1) if tap_layers else None
        return self.norm(x), HybridCache(k=k_pages, v=v_pages, conv=conv, ssm=ssm), feats, pending

