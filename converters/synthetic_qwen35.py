"""Random-weight `qwen35` (Qwen3.5 / Qwen3.6 hybrid) GGUF layout: Gated DeltaNet layers plus every
`full_attention_interval`-th layer gated full attention, with tensors and metadata exactly as llama.cpp's
`src/models/qwen35.cpp` loads them (V heads already in the converter's tiled order, norms with the +1 folded in).
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

T = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Qwen35Spec:
    num_layers: int
    hidden: int
    ffn: int
    num_heads: int  # full-attention query heads
    num_kv_heads: int
    head_dim: int
    rope_dims: int  # rotary dims of each head (the rest pass through)
    rope_sections: tuple[int, int, int, int]  # multi-section RoPE; text uses one position for all sections
    ssm_k_heads: int  # ssm.group_count
    ssm_v_heads: int  # ssm.time_step_rank
    ssm_head_dim: int  # ssm.state_size: key and value head dim
    conv_kernel: int = 4
    full_attention_interval: int = 4
    vocab_size: int | None = None
    rope_theta: float = 1e7
    rms_eps: float = 1e-6
    context_length: int = 4096
    tied_embeddings: bool = False
    qtype: str = "f32"
    # As convert_hf_to_gguf writes real Qwen3.5/3.6 files: the MTP (next-token) block appended after the trunk
    # (block_count = trunk + mtp_layers), and the per-layer `attention.recurrent_layers` pattern from HF layer_types.
    mtp_layers: int = 0
    recurrent_layers_key: bool = False
    arch: str = "qwen35"

    def __post_init__(self):
        for field in ("num_layers", "hidden", "ffn", "num_heads", "num_kv_heads", "head_dim", "rope_dims",
                      "ssm_k_heads", "ssm_v_heads", "ssm_head_dim", "conv_kernel", "full_attention_interval"):
            if getattr(self, field) <= 0:
                raise ValueError(f"Qwen35Spec.{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"Qwen35Spec.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.ssm_v_heads % self.ssm_k_heads:
            raise ValueError(f"Qwen35Spec.ssm_v_heads ({self.ssm_v_heads}) must be a multiple of "
                             f"ssm_k_heads ({self.ssm_k_heads})")
        if self.rope_dims > self.head_dim or self.rope_dims % 2:
            raise ValueError(f"Qwen35Spec.rope_dims must be even and <= head_dim, got {self.rope_dims}")
        if sum(self.rope_sections) * 2 > self.rope_dims:
            raise ValueError(f"Qwen35Spec.rope_sections {self.rope_sections} cover more than rope_dims/2 pairs")

    def is_recurrent(self, layer: int) -> bool:
        return (layer + 1) % self.full_attention_interval != 0


PRESETS: dict[str, Qwen35Spec] = {
    # 8 layers: attention at 3 and 7. 2 key heads broadcast to 4 value heads, so the tiled V-head order matters.
    "qwen35-tiny": Qwen35Spec(num_layers=8, hidden=128, ffn=256, num_heads=4, num_kv_heads=2, head_dim=64,
                              rope_dims=16, rope_sections=(3, 3, 2, 0), ssm_k_heads=2, ssm_v_heads=4,
                              ssm_head_dim=32),
    # Qwen3.6-27B (DESIGN.md section 6), with its MTP block and layer pattern as the HF converter writes them.
    "qwen35-27b": Qwen35Spec(num_layers=64, hidden=5120, ffn=17408, num_heads=24, num_kv_heads=4, head_dim=256,
                             rope_dims=64, rope_sections=(11, 11, 10, 0), ssm_k_heads=16, ssm_v_heads=48,
                             ssm_head_dim=128, vocab_size=248320, context_length=262144, mtp_layers=1,
                             recurrent_layers_key=True),
}


def tensor_plan(spec: Qwen35Spec, vocab_size: int, weight_scale: float | None, planned, qtypes,
                attn_out_gain: float, ffn_down_gain: float, logit_std: float) -> list:
    """Every tensor llama.cpp's qwen35 loader creates, in (out, in) numpy order. `planned` is synthetic.PlannedTensor.

    Recurrent decay must stay a decay: ssm_a = -exp(A_log) is drawn around -0.1 (always negative), and dt_bias around
    -1, so exp(g) ~ 0.97 per token: state that outlives a prefill chunk, never growth.
    """
    wt = qtypes[spec.qtype]
    d, h = spec.hidden, spec.head_dim
    q_dim, kv_dim = spec.num_heads * h, spec.num_kv_heads * h
    key_dim, value_dim = spec.ssm_k_heads * spec.ssm_head_dim, spec.ssm_v_heads * spec.ssm_head_dim
    conv_dim = 2 * key_dim + value_dim

    def proj(name, out_dim, in_dim, gain=1.0):
        return planned(name, (out_dim, in_dim), wt, weight_scale or gain / np.sqrt(in_dim))

    def f32(name, shape, std, mean=0.0):
        return planned(name, shape, T.F32, std, mean)

    out_std = logit_std / np.sqrt(d)
    plan = [planned("token_embd.weight", (vocab_size, d), wt, out_std if spec.tied_embeddings else 1.0)]
    for i in range(spec.num_layers):
        p = f"blk.{i}."
        plan.append(f32(p + "attn_norm.weight", (d,), 0.1, 1.0))
        if spec.is_recurrent(i):
            plan += [proj(p + "attn_qkv.weight", conv_dim, d), proj(p + "attn_gate.weight", value_dim, d),
                     f32(p + "ssm_conv1d.weight", (conv_dim, spec.conv_kernel), 0.5),
                     f32(p + "ssm_dt.bias", (spec.ssm_v_heads,), 0.3, -1.0),
                     f32(p + "ssm_a", (spec.ssm_v_heads,), 0.02, -0.1),
                     proj(p + "ssm_beta.weight", spec.ssm_v_heads, d),
                     proj(p + "ssm_alpha.weight", spec.ssm_v_heads, d),
                     f32(p + "ssm_norm.weight", (spec.ssm_head_dim,), 0.1, 1.0),
                     proj(p + "ssm_out.weight", d, value_dim, attn_out_gain)]
        else:
            plan += [proj(p + "attn_q.weight", 2 * q_dim, d), proj(p + "attn_k.weight", kv_dim, d),
                     proj(p + "attn_v.weight", kv_dim, d),
                     f32(p + "attn_q_norm.weight", (h,), 0.1, 1.0), f32(p + "attn_k_norm.weight", (h,), 0.1, 1.0),
                     proj(p + "attn_output.weight", d, q_dim, attn_out_gain)]
        plan += [f32(p + "post_attention_norm.weight", (d,), 0.1, 1.0),
                 proj(p + "ffn_gate.weight", spec.ffn, d), proj(p + "ffn_up.weight", spec.ffn, d),
                 proj(p + "ffn_down.weight", d, spec.ffn, ffn_down_gain)]
    for i in range(spec.num_layers, spec.num_layers + spec.mtp_layers):
        # llama.cpp's load_block_mtp: a full-attention block plus the nextn projections (not run by the trunk).
        p = f"blk.{i}."
        plan += [f32(p + "attn_norm.weight", (d,), 0.1, 1.0),
                 proj(p + "attn_q.weight", 2 * q_dim, d), proj(p + "attn_k.weight", kv_dim, d),
                 proj(p + "attn_v.weight", kv_dim, d),
                 f32(p + "attn_q_norm.weight", (h,), 0.1, 1.0), f32(p + "attn_k_norm.weight", (h,), 0.1, 1.0),
                 proj(p + "attn_output.weight", d, q_dim, attn_out_gain),
                 f32(p + "post_attention_norm.weight", (d,), 0.1, 1.0),
                 proj(p + "ffn_gate.weight", spec.ffn, d), proj(p + "ffn_up.weight", spec.ffn, d),
                 proj(p + "ffn_down.weight", d, spec.ffn, ffn_down_gain),
                 proj(p + "nextn.eh_proj.weight", d, 2 * d), f32(p + "nextn.enorm.weight", (d,), 0.1, 1.0),
                 f32(p + "nextn.hnorm.weight", (d,), 0.1, 1.0)]
    plan.append(f32("output_norm.weight", (d,), 0.1, 1.0))
    if not spec.tied_embeddings:
        plan.append(planned("output.weight", (vocab_size, d), wt, out_std))
    return plan


def add_metadata(w: gguf.GGUFWriter, spec: Qwen35Spec) -> None:
    """The keys llama.cpp's qwen35 loader reads (names as convert_hf_to_gguf writes them)."""
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.hidden)
    w.add_block_count(spec.num_layers + spec.mtp_layers)
    if spec.mtp_layers:
        w.add_nextn_predict_layers(spec.mtp_layers)
    if spec.recurrent_layers_key:
        # (the gguf package here predates GGUFWriter.add_recurrent_layers; same key and type)
        w.add_array(f"{spec.arch}.attention.recurrent_layers",
                    [spec.is_recurrent(i) for i in range(spec.num_layers)] + [False] * spec.mtp_layers)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.rope_dims)
    w.add_rope_dimension_sections(list(spec.rope_sections))
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_ssm_conv_kernel(spec.conv_kernel)
    w.add_ssm_state_size(spec.ssm_head_dim)
    w.add_ssm_group_count(spec.ssm_k_heads)
    w.add_ssm_time_step_rank(spec.ssm_v_heads)
    w.add_ssm_inner_size(spec.ssm_v_heads * spec.ssm_head_dim)
    w.add_full_attention_interval(spec.full_attention_interval)
