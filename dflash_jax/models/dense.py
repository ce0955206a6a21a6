"""Dense decoder (llama / qwen2 / qwen3 as flags) in Flax NNX over a paged KV cache, following the HF Llama/Qwen code.

Dimensions: B slots, T tokens per slot, D hidden, F intermediate, N query heads, K KV heads, H head dim, V vocab.
Float weights keep the HF (out, in) layout so GGUF rows map one to one; Q8_0 linears keep the GGUF blocks as int8 values
+ f16 scales in the layout of pallas_kernels/weight_matmul.py. Every product goes through that module's dispatcher.

Linears that read the same input are fused into one product (`FUSED`, as vLLM's QKVParallelLinear /
MergedColumnParallelLinear): at decode (M = slots) a small product is launch/tail bound (on an H200 a 4096x1024 k_proj
streams at 19 % of copy bandwidth, a 4096x4096 q_proj at 69 %), so q/k/v and gate/up go as one weight read each. The
parts are concatenated along the output axis at load (the Q8_0 blocks run along the input, so nothing is requantized);
a group fuses only when all its parts end up in one format, else its parts stay separate Linears.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash_jax.config import ModelConfig
from dflash_jax.kv_cache import AttentionMeta, KVCache, cache_rows, token_positions, write_kv
from dflash_jax.models.fp8 import FP8, fp8_linear
from dflash_jax.models.layer_calls import per_trace
from pallas_kernels.add_rms_norm import add_rms_norm_pallas, rms_norm_reference, use_kernel
from pallas_kernels.invariance import is_batch_invariant
from pallas_kernels.qk_rope_write import apply_rope, qk_rope_write_pallas, rope_tables
from pallas_kernels.qk_rope_write import use_kernel as use_qk_kernel
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.weight_matmul import (Q8_BLOCK, linear, q8_0_dequantize, q8_0_layout, q8_0_linear,
                                          q8_0_stored_out)


class Linear(nnx.Module):
    """y = x W^T (+ b). With q8_0 the weight is GGUF Q8_0, kept exactly as stored (no bf16 rounding of d * q); with
    fp8 (the drafter's `--draft-fp8`, `to_fp8`) e4m3 values and one scale per output row (`models.fp8`)."""

    def __init__(self, in_features: int, out_features: int, dtype, bias: bool = False, q8_0: bool = False,
                 fp8: bool = False):
        self.q8_layout = q8_0_layout() if q8_0 else None  # 'kn': qweight (in, out); 'nk': (out padded, in)
        self.out_features = out_features
        if q8_0:
            stored = q8_0_stored_out(out_features, self.q8_layout)
            shape = (stored, in_features) if self.q8_layout == "nk" else (in_features, out_features)
            self.qweight = nnx.Param(jnp.zeros(shape, jnp.int8))
            self.scales = nnx.Param(jnp.zeros((in_features // Q8_BLOCK, stored), jnp.float16))
        elif fp8:
            self.weight = nnx.Param(jnp.zeros((out_features, in_features), FP8))
            self.row_scales = nnx.Param(jnp.ones((out_features,), jnp.float32))
        else:
            self.weight = nnx.Param(jnp.zeros((out_features, in_features), dtype))  # (out, in)
        self.is_q8_0 = q8_0
        self.is_fp8 = fp8
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.is_q8_0:
            y = q8_0_linear(x, self.qweight[...], self.scales[...], layout=self.q8_layout)
            if y.shape[-1] != self.out_features:
                y = y[..., :self.out_features]
        elif self.is_fp8:
            y = fp8_linear(x, self.weight[...], self.row_scales[...])
        else:
            y = linear(x, self.weight[...])
        return y + self.bias[...] if self.bias is not None else y

    def float_weight(self) -> jax.Array:
        """(out, in) f32: the weight as the product uses it (Q8_0 blocks or fp8 rows dequantized)."""
        if self.is_fp8:
            return self.weight[...].astype(jnp.float32) * self.row_scales[...][:, None]
        if not self.is_q8_0:
            return self.weight[...].astype(jnp.float32)
        q, sc = self.qweight[...], self.scales[...]
        w = q8_0_dequantize(q.T, sc).T if self.q8_layout == "nk" else q8_0_dequantize(q, sc).T
        return w[:self.out_features]


# Fused Linear name -> the linears it holds, in output order. The names are unique across the target's modules, so the
# loader maps GGUF tensors with this table alone.
FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),  # dense and gated attention
    "gate_up_proj": ("gate_proj", "up_proj"),  # MLP
    "in_proj": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),  # gated delta net
}


def fuses(fused: str, q8: frozenset[str]) -> bool:
    """Whether group `fused` is one Linear, given the parts that hold Q8_0 weights: only when all or none do (a file
    may mix types, e.g. q in Q8_0 and v in Q6_K dequantized to float)."""
    return len({part in q8 for part in FUSED[fused]}) == 1


class SharedInput:
    """Mixin for a module whose linears of a `FUSED` group read one input: either the fused Linear (an attribute named
    after the group, the parts' attributes None) or the parts as separate Linears (the group's attribute None)."""

    def _init_group(self, fused: str, in_features: int, outs: tuple[int, ...], dtype, q8: frozenset[str],
                    bias: bool = False, fuse: bool = True) -> None:
        parts = FUSED[fused]
        one = fuse and fuses(fused, q8)
        setattr(self, fused, Linear(in_features, sum(outs), dtype, bias, q8_0=parts[0] in q8) if one else None)
        for part, out in zip(parts, outs):
            setattr(self, part, None if one else Linear(in_features, out, dtype, bias, q8_0=part in q8))
        setattr(self, fused + "_sizes", outs)  # static: where `_project` splits the fused output

    def _project(self, fused: str, x: jax.Array) -> list[jax.Array]:
        """The group's outputs, one per part, in `FUSED` order."""
        linear_ = getattr(self, fused)
        if linear_ is None:
            return [getattr(self, part)(x) for part in FUSED[fused]]
        ends = np.cumsum(getattr(self, fused + "_sizes"))[:-1].tolist()
        return jnp.split(linear_(x), ends, axis=-1)


def _sub(names: frozenset[str], prefix: str) -> frozenset[str]:
    """The names under `prefix.` with the prefix removed (which linears of a submodule are Q8_0)."""
    return frozenset(n[len(prefix) + 1:] for n in names if n.startswith(prefix + "."))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps, is_batch_invariant())

    def add(self, x: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x + a, this norm of x + a): one kernel where `add_rms_norm.use_kernel` (a GPU in the batch-invariant
        mode), else the add and `rms_norm` as before."""
        if use_kernel(x.shape[-1]):
            return add_rms_norm_pallas(x, a, self.weight[...], self.eps, interpret=jax.default_backend() != "gpu")
        x = x + a
        return x, self(x)


# One call per norm in a step's program (a 27B step has ~300): traced and lowered once per shape, not per layer.
rms_norm = jax.jit(rms_norm_reference, static_argnames=("eps", "invariant"))


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """NeoX-style rotary embedding (rotate halves) on x (B, T, heads, H) at positions (B, T)."""
    return apply_rope(x, *rope_tables(positions, x.shape[-1], theta))


class Attention(SharedInput, nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, q8: frozenset[str] = frozenset()):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self._init_group("qkv_proj", d, (n * h, k * h, k * h), dtype, q8, bias=cfg.has_qkv_bias)
        self.o_proj = Linear(n * h, d, dtype, q8_0="o_proj" in q8)
        self.q_norm = RMSNorm(h, cfg.rms_eps, dtype) if cfg.has_qk_norm else None
        self.k_norm = RMSNorm(h, cfg.rms_eps, dtype) if cfg.has_qk_norm else None
        self.cfg = cfg

    def __call__(self, x, positions, valid, meta: AttentionMeta, k_pages, v_pages):
        b, t, _ = x.shape
        q, k_pages, v_pages = self._qk_write(x, positions, valid, meta, k_pages, v_pages)
        o = ragged_paged_attention(q, k_pages, v_pages, meta.page_table, meta.q_lens, meta.kv_lens)
        return self.o_proj(o.reshape(b, t, -1)), k_pages, v_pages

    def _qk_write(self, x, positions, valid, meta: AttentionMeta, k_pages, v_pages):
        """q (B, T, N, H) normed and rotated, and the caches with this step's k and v written."""
        cfg = self.cfg
        b, t, _ = x.shape
        fused = use_qk_kernel(cfg.head_dim) if self.qkv_proj is not None else None
        if fused:  # norms, RoPE and the cache writes in one kernel (pallas_kernels/qk_rope_write.py says why)
            weights = (None, None) if self.q_norm is None else (self.q_norm.weight[...], self.k_norm.weight[...])
            cos, sin = rope_tables(positions.reshape(-1), cfg.head_dim, cfg.rope_theta)
            q, k_pages, v_pages = qk_rope_write_pallas(
                self.qkv_proj(x).reshape(b * t, -1), *weights, cos, sin,
                cache_rows(meta, positions, valid, k_pages.shape[1]).reshape(-1), k_pages, v_pages,
                num_heads=cfg.num_heads, eps=cfg.rms_eps, interpret=fused == "interpret")
            return q.reshape(b, t, cfg.num_heads, cfg.head_dim), k_pages, v_pages
        q, k, v = self._project("qkv_proj", x)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope(q, positions, cfg.rope_theta)
        k = rope(k, positions, cfg.rope_theta)
        return q, write_kv(k_pages, k, meta, positions, valid), write_kv(v_pages, v, meta, positions, valid)


class MLP(SharedInput, nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, q8: frozenset[str] = frozenset(), fuse: bool = True):
        """fuse=False keeps gate_proj and up_proj separate whatever their formats (the drafter's parameter layout)."""
        f = cfg.intermediate_size
        self._init_group("gate_up_proj", cfg.hidden_size, (f, f), dtype, q8, fuse=fuse)
        self.down_proj = Linear(f, cfg.hidden_size, dtype, q8_0="down_proj" in q8)

    def __call__(self, x):
        gate, up = self._project("gate_up_proj", x)
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, q8: frozenset[str] = frozenset()):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        self.self_attn = Attention(cfg, dtype, _sub(q8, "self_attn"))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        self.mlp = MLP(cfg, dtype, _sub(q8, "mlp"))

    def __call__(self, x, pending, positions, valid, meta, k_pages, v_pages):
        """The residual stream x still lacks `pending`, the previous layer's MLP output (None in the first layer),
        so that each residual add runs with the norm after it (`RMSNorm.add`). Returns (x, this layer's MLP output
        to add, k_pages, v_pages)."""
        x, h = (x, self.input_layernorm(x)) if pending is None else self.input_layernorm.add(x, pending)
        a, k_pages, v_pages = self.self_attn(h, positions, valid, meta, k_pages, v_pages)
        x, h = self.post_attention_layernorm.add(x, a)
        return x, self.mlp(h), k_pages, v_pages


class DecoderEnds:
    """What every decoder has around its layers: the token embedding, the final norm and the LM head (the embedding
    itself when tied, unless the head is Q8_0)."""

    def _init_ends(self, cfg, dtype, q8_linears: frozenset[str]) -> None:
        self.embed_tokens = nnx.Param(jnp.zeros((cfg.vocab_size, cfg.hidden_size), dtype))  # (V, D)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        head_q8 = "lm_head" in q8_linears
        self.lm_head = (None if cfg.tie_embeddings and not head_q8
                        else Linear(cfg.hidden_size, cfg.vocab_size, dtype, q8_0=head_q8))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """(..., D) -> (..., V) float32."""
        if self.lm_head is not None:
            return self.lm_head(hidden).astype(jnp.float32)
        return linear(hidden, self.embed_tokens[...], out_dtype=jnp.float32)


class DenseDecoder(DecoderEnds, nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype=jnp.bfloat16, q8_linears: frozenset[str] = frozenset()):
        """q8_linears: dotted paths of the Linear layers that hold Q8_0 weights ('layers.3.mlp.up_proj', 'lm_head').
        A tied model with a Q8_0 embedding gets an `lm_head` holding those Q8_0 blocks, so its logits are Q8_0
        products, while `embed_tokens` keeps the dequantized rows for the lookup (decode reads only B rows of it)."""
        self.cfg = cfg
        self._init_ends(cfg, dtype, q8_linears)
        self.layers = nnx.List([DecoderLayer(cfg, dtype, _sub(q8_linears, f"layers.{i}"))
                                for i in range(cfg.num_layers)])

    def __call__(self, tokens: jax.Array, meta: AttentionMeta, cache: KVCache,
                 tap_layers: tuple[int, ...] = ()) -> tuple[jax.Array, KVCache, jax.Array | None]:
        """tokens (B, T) -> final-normed hidden (B, T, D), updated cache, and the residual stream after each layer in
        `tap_layers` concatenated (B, T, len(tap_layers) * D) — the DFlash drafter's context features."""
        positions, valid = token_positions(meta, tokens.shape[1])
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)
        new_k, new_v, taps, pending = [], [], {}, None
        call = per_trace(DecoderLayer.__call__)
        # Unrolled on purpose: a scan over stacked layers with the cache as carry copies the cache every step.
        for i, layer in enumerate(self.layers):
            x, pending, k_pages, v_pages = call(layer, x, pending, positions, valid, meta, cache.k[i], cache.v[i])
            new_k.append(k_pages)
            new_v.append(v_pages)
            if i in tap_layers:
                taps[i] = x + pending
        feats = jnp.concatenate([taps[i] for i in tap_layers], axis=-1) if tap_layers else None
        return self.norm.add(x, pending)[1], KVCache(k=new_k, v=new_v), feats

