"""GGUF tensor names -> HF-named parameter paths of the dense decoder, with shape checks and dequantization."""
from __future__ import annotations

import gguf
import numpy as np

from converters.gguf_file import GGUFError, GGUFFile, TensorInfo
from dflash_jax.config import HybridConfig, ModelConfig
from dflash_jax.models.dense import FUSED, _sub, fuses

_LAYER_MAP = {
    "attn_norm.weight": ("input_layernorm", "weight"),
    "attn_q.weight": ("self_attn", "q_proj", "weight"),
    "attn_k.weight": ("self_attn", "k_proj", "weight"),
    "attn_v.weight": ("self_attn", "v_proj", "weight"),
    "attn_output.weight": ("self_attn", "o_proj", "weight"),
    "attn_q.bias": ("self_attn", "q_proj", "bias"),
    "attn_k.bias": ("self_attn", "k_proj", "bias"),
    "attn_v.bias": ("self_attn", "v_proj", "bias"),
    "attn_q_norm.weight": ("self_attn", "q_norm", "weight"),
    "attn_k_norm.weight": ("self_attn", "k_norm", "weight"),
    "ffn_norm.weight": ("post_attention_layernorm", "weight"),
    "ffn_gate.weight": ("mlp", "gate_proj", "weight"),
    "ffn_up.weight": ("mlp", "up_proj", "weight"),
    "ffn_down.weight": ("mlp", "down_proj", "weight"),
}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """GGUF name -> (parameter path, numpy shape) of every tensor the config needs."""
    if isinstance(cfg, HybridConfig):
        from converters.tensor_map_qwen35 import expected_tensors as hybrid_tensors
        return hybrid_tensors(cfg)
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qd, kd = cfg.num_heads * h, cfg.num_kv_heads * h
    out = {
        "token_embd.weight": (("embed_tokens",), (cfg.vocab_size, d)),
        "output_norm.weight": (("norm", "weight"), (d,)),
    }
    if not cfg.tie_embeddings:
        out["output.weight"] = (("lm_head", "weight"), (cfg.vocab_size, d))
    shapes = {
        "attn_norm.weight": (d,), "attn_q.weight": (qd, d), "attn_k.weight": (kd, d), "attn_v.weight": (kd, d),
        "attn_output.weight": (d, qd), "ffn_norm.weight": (d,), "ffn_gate.weight": (f, d), "ffn_up.weight": (f, d),
        "ffn_down.weight": (d, f),
    }
    if cfg.has_qkv_bias:
        shapes |= {"attn_q.bias": (qd,), "attn_k.bias": (kd,), "attn_v.bias": (kd,)}
    if cfg.has_qk_norm:
        shapes |= {"attn_q_norm.weight": (h,), "attn_k_norm.weight": (h,)}
    for i in range(cfg.num_layers):
        for suffix, shape in shapes.items():
            out[f"blk.{i}.{suffix}"] = (("layers", i) + _LAYER_MAP[suffix], shape)
    return out


def check_tensors(g: GGUFFile, cfg: ModelConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Every expected tensor present with its shape, nothing left over; all problems reported together."""
    expected = expected_tensors(cfg)
    problems = []
    missing = sorted(set(expected) - set(g.tensors))
    extra = sorted(n for n in set(g.tensors) - set(expected) - {"rope_freqs.weight"} if not cfg.skips_tensor(n))
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for name, (_, shape) in expected.items():
        if name in g.tensors and g.tensors[name].shape != shape:
            problems.append(f"tensor {name!r} has shape {g.tensors[name].shape}, expected {shape}")
    if problems:
        raise GGUFError(g.path, "; ".join(problems))
    g.check_quant_types()
    return expected


def dequantize(info: TensorInfo) -> np.ndarray:
    """Raw GGUF tensor -> float32 numpy array in numpy (rows, cols) order."""
    return np.asarray(gguf.quants.dequantize(info.raw, info.qtype), dtype=np.float32).reshape(info.shape)


def unpermute_llama_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's two rotary halves for its pairwise RoPE; undo it so the HF
    rotate-half RoPE applies."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q8_0_blocks(info: TensorInfo) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 tensor's raw blocks (ggml `block_q8_0`: f16 d, then 32 int8 q; value = d * q) -> values (rows, cols)
    int8 and scales (rows, cols / 32) f16, bit for bit as stored."""
    if info.qtype != gguf.GGMLQuantizationType.Q8_0 or len(info.shape) != 2:
        raise ValueError(f"{info.name}: expected a 2D Q8_0 tensor, got {info.qtype.name} {info.shape}")
    rows, cols = info.shape
    blocks = np.asarray(info.raw, dtype=np.uint8).reshape(rows, cols // 32, 34)
    scales = np.ascontiguousarray(blocks[:, :, :2]).view("<f2").reshape(rows, cols // 32)
    values = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, cols)
    return values, scales


def q8_0_linears(g: GGUFFile, cfg: ModelConfig, expected) -> dict[str, str]:
    """GGUF name -> dotted path of the Linear that keeps it as Q8_0, for every Q8_0 projection weight. An untied
    embedding is only looked up, never multiplied, so it stays float; a tied one also becomes the Q8_0 `lm_head`."""
    out = {}
    for name, (path, shape) in expected.items():
        if len(shape) != 2 or g.tensors[name].qtype != gguf.GGMLQuantizationType.Q8_0:
            continue
        if name == "token_embd.weight":
            if cfg.tie_embeddings:
                out[name] = "lm_head"
            continue
        out[name] = ".".join(str(p) for p in path[:-1])
    return out


_GROUP_OF = {part: fused for fused, parts in FUSED.items() for part in parts}


def fused_path(path: tuple, q8_linears: frozenset[str]) -> tuple[tuple, int]:
    """A parameter path as `expected_tensors` names it (HF names, one Linear per GGUF tensor) -> the path the model
    has and the part's index in it: a part of a `FUSED` group moves into the group's Linear (parts concatenated
    along the output axis in `FUSED` order) when the group fuses, i.e. when all or none of its parts are in
    q8_linears (dotted Linear paths, as the model gets them)."""
    group = _GROUP_OF.get(path[-2]) if len(path) >= 2 else None
    if group is None or not fuses(group, _sub(q8_linears, ".".join(str(p) for p in path[:-2]))):
        return path, 0
    return path[:-2] + (group, path[-1]), FUSED[group].index(path[-2])


def load_q8_0(g: GGUFFile, cfg: ModelConfig, name: str, layout: str = "kn") -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 projection as pallas_kernels.weight_matmul wants it: values int8 (in, out), or (out, in) as GGUF stores
    them with layout 'nk' (`weight_matmul.q8_0_layout`); scales (in / 32, out) f16."""
    values, scales = q8_0_blocks(g.tensors[name])
    if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = cfg.num_heads if "attn_q" in name else cfg.num_kv_heads
        values, scales = unpermute_llama_qk(values, heads), unpermute_llama_qk(scales, heads)
    return np.ascontiguousarray(values if layout == "nk" else values.T), np.ascontiguousarray(scales.T)


def load_tensor(g: GGUFFile, cfg: ModelConfig, name: str) -> np.ndarray:
    w = dequantize(g.tensors[name])
    if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        w = unpermute_llama_qk(w, cfg.num_heads if "attn_q" in name else cfg.num_kv_heads)
    return w
