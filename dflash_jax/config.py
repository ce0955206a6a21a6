"""Model configurations read from GGUF metadata: the dense decoder family (llama / qwen2 / qwen3) and the qwen35
hybrid (Gated DeltaNet + gated full attention)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen35")


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
    ARCHS: ClassVar[tuple[str, ...]] = ("llama", "qwen2", "qwen3")

    def __post_init__(self):
        if self.arch not in self.ARCHS:
            raise ValueError(f"arch {self.arch!r} is not supported by {type(self).__name__}; "
                             f"supported: {', '.join(self.ARCHS)}")
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

    @property
    def num_kv_layers(self) -> int:
        """Layers with a paged KV cache."""
        return self.num_layers

    def skips_tensor(self, name: str) -> bool:
        """A tensor of the file that the model deliberately does not load."""
        return False

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
        if arch in HybridConfig.ARCHS and cls is not HybridConfig:
            return HybridConfig.from_gguf(g)
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
class HybridConfig(ModelConfig):
    """qwen35: layers i with (i + 1) % full_attention_interval == 0 are gated full attention (query + sigmoid output
    gate packed per head in attn_q, q/k RMSNorm, partial multi-section RoPE); the others are Gated DeltaNet."""

    rope_dims: int = 0  # rotary dims per head; the rest pass through
    full_attention_interval: int = 4
    conv_kernel: int = 4
    ssm_k_heads: int = 1  # key heads, broadcast to value heads in tiled order (v head j uses key head j % k)
    ssm_v_heads: int = 1
    ssm_head_dim: int = 1  # key and value head dim (the delta-rule state is ssm_head_dim x ssm_head_dim)
    recurrent_pattern: tuple[bool, ...] = ()  # explicit per-layer pattern (attention.recurrent_layers); () = interval
    num_mtp_layers: int = 0  # MTP blocks stored after the trunk (nextn_predict_layers): kept in the file, not loaded
    ARCHS: ClassVar[tuple[str, ...]] = ("qwen35",)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "recurrent_pattern", tuple(bool(r) for r in self.recurrent_pattern))
        if self.recurrent_pattern and len(self.recurrent_pattern) != self.num_layers:
            raise ValueError(f"HybridConfig.recurrent_pattern has {len(self.recurrent_pattern)} flags for "
                             f"{self.num_layers} layers")
        if self.num_mtp_layers < 0:
            raise ValueError(f"HybridConfig.num_mtp_layers must be >= 0, got {self.num_mtp_layers}")
        for name in ("rope_dims", "full_attention_interval", "conv_kernel", "ssm_k_heads", "ssm_v_heads",
                     "ssm_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HybridConfig.{name} must be positive, got {getattr(self, name)}")
        if self.rope_dims > self.head_dim or self.rope_dims % 2:
            raise ValueError(f"HybridConfig.rope_dims must be even and <= head_dim {self.head_dim}, "
                             f"got {self.rope_dims}")
        if self.ssm_v_heads % self.ssm_k_heads:
            raise ValueError(f"HybridConfig.ssm_v_heads ({self.ssm_v_heads}) must be a multiple of "
                             f"ssm_k_heads ({self.ssm_k_heads})")
        if not self.attention_layers:
            raise ValueError(f"HybridConfig.full_attention_interval {self.full_attention_interval} leaves no "
                             f"attention layer in {self.num_layers}")

    def is_recurrent(self, layer: int) -> bool:
        if self.recurrent_pattern:
            return self.recurrent_pattern[layer]
        return (layer + 1) % self.full_attention_interval != 0

    def skips_tensor(self, name: str) -> bool:
        # The MTP block (a draft head of its own) sits in blk.{num_layers ...}: DFlash does not use it.
        parts = name.split(".")
        return (self.num_mtp_layers > 0 and parts[0] == "blk" and parts[1].isdigit()
                and self.num_layers <= int(parts[1]) < self.num_layers + self.num_mtp_layers)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if not self.is_recurrent(i))

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_recurrent(i))

    @property
    def num_kv_layers(self) -> int:
        return len(self.attention_layers)

    @property
    def ssm_key_dim(self) -> int:
        return self.ssm_k_heads * self.ssm_head_dim

    @property
    def ssm_value_dim(self) -> int:
        return self.ssm_v_heads * self.ssm_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: q, k and v, concatenated."""
        return 2 * self.ssm_key_dim + self.ssm_value_dim

    @classmethod
    def from_gguf(cls, g) -> "HybridConfig":
        from converters.gguf_file import GGUFError

        req = lambda key: int(g.arch_key(key, required=True))  # noqa: E731
        hidden, num_heads = req("embedding_length"), req("attention.head_count")
        head_dim = int(g.arch_key("attention.key_length", hidden // num_heads))
        if int(g.arch_key("attention.value_length", head_dim)) != head_dim:
            raise GGUFError(g.path, "attention.value_length != key_length is not supported")
        num_mtp = int(g.arch_key("nextn_predict_layers", 0))
        num_layers = req("block_count") - num_mtp
        pattern = g.arch_key("attention.recurrent_layers")
        if pattern is not None and len(pattern) < num_layers:
            raise GGUFError(g.path, f"attention.recurrent_layers has {len(pattern)} flags for {num_layers} layers")
        state = req("ssm.state_size")
        v_heads = req("ssm.time_step_rank")
        if req("ssm.inner_size") != state * v_heads:
            raise GGUFError(g.path, f"ssm.inner_size {req('ssm.inner_size')} != ssm.state_size {state} x "
                                    f"ssm.time_step_rank {v_heads}")
        scaling = g.arch_key("rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise GGUFError(g.path, f"rope scaling {scaling!r} is not supported")
        embd = g.tensors.get("token_embd.weight")
        vocab = g.arch_key("vocab_size") or (embd.shape[0] if embd is not None
                                             else len(g.get("tokenizer.ggml.tokens") or ()))
        try:
            return cls(
                arch=g.arch, num_layers=num_layers, hidden_size=hidden,
                intermediate_size=req("feed_forward_length"), num_heads=num_heads,
                num_kv_heads=int(g.arch_key("attention.head_count_kv", num_heads)), head_dim=head_dim,
                vocab_size=int(vocab), rope_theta=float(g.arch_key("rope.freq_base", 10000.0)),
                rms_eps=float(g.arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
                max_position=int(g.arch_key("context_length", 4096)),
                tie_embeddings="output.weight" not in g.tensors, has_qkv_bias=False, has_qk_norm=True,
                rope_dims=int(g.arch_key("rope.dimension_count", head_dim)),
                full_attention_interval=int(g.arch_key("full_attention_interval", 4)),
                conv_kernel=req("ssm.conv_kernel"), ssm_k_heads=req("ssm.group_count"), ssm_v_heads=v_heads,
                ssm_head_dim=state, num_mtp_layers=num_mtp,
                recurrent_pattern=tuple(bool(r) for r in pattern[:num_layers]) if pattern is not None else (),
            )
        except ValueError as e:
            raise GGUFError(g.path, str(e)) from e


@dataclass(frozen=True)
class DrafterConfig:
    """DFlash drafter: Qwen3-style layers at the target's hidden size (DESIGN.md sections 4, 5)."""

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
    target_layer_ids: tuple[int, ...]  # HF ids: "output of layer i" = HF hidden_states[i+1]
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] = ()  # per-layer sliding-window flag; empty = no sliding-window layer
    max_position: int = 32768

    def __post_init__(self):
        # Normalize sequences to tuples (lists from JSON / metadata) and an all-False pattern to the empty one, so
        # that equal drafters compare equal whichever way they were spelled.
        ids = tuple(int(i) for i in self.target_layer_ids)
        swa = tuple(bool(s) for s in self.swa_layers)
        object.__setattr__(self, "target_layer_ids", ids)
        object.__setattr__(self, "swa_layers", swa if any(swa) else ())
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "max_position"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"DrafterConfig.{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DrafterConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"DrafterConfig.num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"DrafterConfig.head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rms_eps", "rope_theta"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"DrafterConfig.{name} must be a positive finite number, got {v!r}")
        if not isinstance(self.block_size, (int, np.integer)) or self.block_size < 2:
            raise ValueError(f"DrafterConfig.block_size must be an integer >= 2 (the last token plus at least one "
                             f"mask), got {self.block_size!r}")
        if not isinstance(self.mask_token_id, (int, np.integer)) or self.mask_token_id < 0:
            raise ValueError(f"DrafterConfig.mask_token_id must be a non-negative integer, got {self.mask_token_id!r}")
        if not ids:
            raise ValueError("DrafterConfig.target_layer_ids must name at least one target layer")
        if min(ids) < 0:
            raise ValueError(f"DrafterConfig.target_layer_ids must be HF layer ids >= 0, got {list(ids)}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, (int, np.integer))
                                                or self.sliding_window <= 0):
            raise ValueError(f"DrafterConfig.sliding_window must be None or a positive integer, "
                             f"got {self.sliding_window!r}")
        if swa:
            if len(swa) != self.num_layers:
                raise ValueError(f"DrafterConfig.swa_layers must have one flag per layer ({self.num_layers}), "
                                 f"got {len(swa)}")
            if any(swa) and self.sliding_window is None:
                raise ValueError("DrafterConfig.swa_layers marks sliding-window layers but "
                                 "DrafterConfig.sliding_window is None")

    @property
    def num_taps(self) -> int:
        return len(self.target_layer_ids)

    @property
    def n_target_features(self) -> int:
        """Width of the concatenated taps, the input of `fc` (K * H)."""
        return self.num_taps * self.hidden_size

    def is_swa(self, layer: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[layer]


def default_taps(num_layers: int, num_taps: int = 5) -> tuple[int, ...]:
    """DESIGN.md: taps spread uniformly from layer 1 to L-3 (30 layers -> [1, 8, 14, 20, 27]); tiny targets tap all."""
    if num_layers < num_taps + 3:
        return tuple(range(num_layers))
    return tuple(int(round(x)) for x in np.linspace(1, num_layers - 3, num_taps))


def drafter_config_for(target: ModelConfig, num_layers: int, block_size: int, mask_token_id: int,
                       target_layer_ids: tuple[int, ...] | None = None,
                       intermediate_size: int | None = None) -> DrafterConfig:
    """A drafter shaped like the target's layers (same hidden size, heads, head dim, RoPE base)."""
    return DrafterConfig(num_layers=num_layers, hidden_size=target.hidden_size,
                         intermediate_size=intermediate_size or target.intermediate_size,
                         num_heads=target.num_heads, num_kv_heads=target.num_kv_heads, head_dim=target.head_dim,
                         rms_eps=target.rms_eps, rope_theta=target.rope_theta, block_size=block_size,
                         mask_token_id=mask_token_id,
                         target_layer_ids=tuple(target_layer_ids or default_taps(target.num_layers)),
                         max_position=target.max_position)
