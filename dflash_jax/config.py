"""Model configuration of the dense decoder family (llama / qwen2 / qwen3), read from GGUF metadata."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_eps: float
    max_position: int
    tie_embeddings: bool
    has_qkv_bias: bool  # qwen2
    has_qk_norm: bool  # qwen3: per-head RMSNorm on q and k before RoPE

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"arch {self.arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size", "max_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls(**json.loads(text))

    @classmethod
    def from_gguf(cls, g) -> "ModelConfig":
        """`g` is a converters.gguf_file.GGUFFile; errors name the file."""
        from converters.gguf_file import GGUFError

        arch = g.arch
        if arch not in SUPPORTED_ARCHS:
            raise GGUFError(g.path, f"unknown architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        req = lambda key: int(g.arch_key(key, required=True))  # noqa: E731
        hidden = req("embedding_length")
        num_heads = req("attention.head_count")
        num_kv_heads = int(g.arch_key("attention.head_count_kv", num_heads))
        head_dim = int(g.arch_key("attention.key_length", hidden // num_heads))
        value_dim = int(g.arch_key("attention.value_length", head_dim))
        if value_dim != head_dim:
            raise GGUFError(g.path, f"attention.value_length {value_dim} != key_length {head_dim} is not supported")
        rope_dims = int(g.arch_key("rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise GGUFError(g.path, f"partial RoPE (rope.dimension_count {rope_dims} < head_dim {head_dim}) "
                                    f"is not supported for {arch}")
        scaling = g.arch_key("rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise GGUFError(g.path, f"rope scaling {scaling!r} is not supported")
        tokens = g.get("tokenizer.ggml.tokens")
        embd = g.tensors.get("token_embd.weight")
        vocab = g.arch_key("vocab_size") or (embd.shape[0] if embd is not None else len(tokens or ()))
        try:
            return cls(
                arch=arch,
                num_layers=req("block_count"),
                hidden_size=hidden,
                intermediate_size=req("feed_forward_length"),
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                vocab_size=int(vocab),
                rope_theta=float(g.arch_key("rope.freq_base", 10000.0)),
                rms_eps=float(g.arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
                max_position=int(g.arch_key("context_length", 4096)),
                tie_embeddings="output.weight" not in g.tensors,
                has_qkv_bias="blk.0.attn_q.bias" in g.tensors,
                has_qk_norm="blk.0.attn_q_norm.weight" in g.tensors,
            )
        except ValueError as e:
            raise GGUFError(g.path, str(e)) from e


@dataclass(frozen=True)
class DrafterConfig:
    """DFlash drafter: Qwen3-style layers at the target's hidden size (DESIGN.md section 4)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]  # HF ids: the output of target layer i (= HF hidden_states[i + 1])
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] = ()  # per layer: causal sliding-window attention inside the block
    max_position: int = 32768

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DrafterConfig.{name} must be positive, got {getattr(self, name)}")
        if self.block_size < 2:
            raise ValueError(f"DrafterConfig.block_size must be >= 2, got {self.block_size}")
        if not self.target_layer_ids or list(self.target_layer_ids) != sorted(set(self.target_layer_ids)):
            raise ValueError(f"DrafterConfig.target_layer_ids must be increasing and non-empty, "
                             f"got {self.target_layer_ids}")
        if self.swa_layers and len(self.swa_layers) != self.num_layers:
            raise ValueError(f"DrafterConfig.swa_layers has {len(self.swa_layers)} entries for "
                             f"{self.num_layers} layers")
        if any(self.swa_layers) and not self.sliding_window:
            raise ValueError("DrafterConfig.sliding_window is required when swa_layers marks a layer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DrafterConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads")
