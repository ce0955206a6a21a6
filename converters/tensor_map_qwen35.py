"""GGUF tensor names of a `qwen35` hybrid -> HF-named parameter paths of dflash_jax.models.hybrid, with shapes.

Layout as llama.cpp's qwen35 loader creates it: `attn_q` packs query and output gate per head, `ssm_a` already holds
-exp(A_log), norms already include the +1 offset, V heads are in tiled order. All taken as stored.
"""
from __future__ import annotations

from dflash_jax.config import HybridConfig

_COMMON = {
    "attn_norm.weight": ("input_layernorm", "weight"),
    "post_attention_norm.weight": ("post_attention_layernorm", "weight"),
    "ffn_gate.weight": ("mlp", "gate_proj", "weight"),
    "ffn_up.weight": ("mlp", "up_proj", "weight"),
    "ffn_down.weight": ("mlp", "down_proj", "weight"),
}
_ATTENTION = {
    "attn_q.weight": ("self_attn", "q_proj", "weight"),
    "attn_k.weight": ("self_attn", "k_proj", "weight"),
    "attn_v.weight": ("self_attn", "v_proj", "weight"),
    "attn_output.weight": ("self_attn", "o_proj", "weight"),
    "attn_q_norm.weight": ("self_attn", "q_norm", "weight"),
    "attn_k_norm.weight": ("self_attn", "k_norm", "weight"),
}
_DELTA_NET = {
    "attn_qkv.weight": ("linear_attn", "in_proj_qkv", "weight"),
    "attn_gate.weight": ("linear_attn", "in_proj_z", "weight"),
    "ssm_beta.weight": ("linear_attn", "in_proj_b", "weight"),
    "ssm_alpha.weight": ("linear_attn", "in_proj_a", "weight"),
    "ssm_conv1d.weight": ("linear_attn", "conv1d"),
    "ssm_dt.bias": ("linear_attn", "dt_bias"),
    "ssm_a": ("linear_attn", "A"),
    "ssm_norm.weight": ("linear_attn", "norm", "weight"),
    "ssm_out.weight": ("linear_attn", "out_proj", "weight"),
}


def expected_tensors(cfg: HybridConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """GGUF name -> (parameter path, numpy shape) of every tensor the config needs."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kd, hv, vd = cfg.num_heads * h, cfg.num_kv_heads * h, cfg.ssm_v_heads, cfg.ssm_value_dim
    out = {
        "token_embd.weight": (("embed_tokens",), (cfg.vocab_size, d)),
        "output_norm.weight": (("norm", "weight"), (d,)),
    }
    if not cfg.tie_embeddings:
        out["output.weight"] = (("lm_head", "weight"), (cfg.vocab_size, d))
    common = {"attn_norm.weight": (d,), "post_attention_norm.weight": (d,), "ffn_gate.weight": (f, d),
              "ffn_up.weight": (f, d), "ffn_down.weight": (d, f)}
    attention = {"attn_q.weight": (2 * qd, d), "attn_k.weight": (kd, d), "attn_v.weight": (kd, d),
                 "attn_output.weight": (d, qd), "attn_q_norm.weight": (h,), "attn_k_norm.weight": (h,)}
    delta_net = {"attn_qkv.weight": (cfg.conv_dim, d), "attn_gate.weight": (vd, d), "ssm_beta.weight": (hv, d),
                 "ssm_alpha.weight": (hv, d), "ssm_conv1d.weight": (cfg.conv_dim, cfg.conv_kernel),
                 "ssm_dt.bias": (hv,), "ssm_a": (hv,), "ssm_norm.weight": (cfg.ssm_head_dim,),
                 "ssm_out.weight": (d, vd)}
    names = _COMMON | _ATTENTION | _DELTA_NET
    for i in range(cfg.num_layers):
        shapes = common | (delta_net if cfg.is_recurrent(i) else attention)
        for suffix, shape in shapes.items():
            out[f"blk.{i}.{suffix}"] = (("layers", i) + names[suffix], shape)
    return out
