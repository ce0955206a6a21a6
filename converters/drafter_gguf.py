"""DFlash drafter GGUF files: read and write both schemas, with the drafter's config and HF-style parameter paths.

Two schemas exist (DESIGN.md section 5):

* fork (`general.architecture = "dflash-draft"`, beellama / spiritbuun files): metadata under `dflash-draft.*`,
  `dflash-draft.dflash.{block_size, mask_token_id, target_layer_ids, n_target_features}` with the target layer ids
  stored as HF ids; tensors `dflash_fc`, `dflash_hidden_norm`, `output_norm`, per layer `post_attention_norm`.
* upstream llama.cpp (`general.architecture = "dflash"`): metadata under `dflash.*`; `dflash.block_size`;
  `dflash.target_layers` = HF ids + 1, because llama.cpp taps the *input* of target layer j (its graphs record
  `t_layer_inp[il] = inpL` at the top of layer il, i.e. the output of layer j-1 = HF hidden_states[j]); the mask
  token is the tokenizer's `tokenizer.ggml.mask_token_id`; tensors `fc`, `enc.output_norm` (= hidden_norm),
  `output_norm`, per layer `ffn_norm` (= post-attention norm). Note: in upstream, a tensor named
  `blk.i.post_attention_norm` would be a Gemma-style norm on the attention *output*, so a fork file's tensors must
  never be reused under the upstream arch unchanged.

Both store the layer tensors in HF layout (NeoX / rotate-half RoPE; no llama-style q/k permutation), so loading is a
rename plus dequantization. `target_layer_ids` in `DrafterConfig` are always HF ids: "output of layer i" =
HF `hidden_states[i + 1]`.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import gguf
import numpy as np

from converters.gguf_file import GGUFError, GGUFFile, open_gguf, read_fields
from converters.tensor_map import dequantize
from dflash_jax.config import DrafterConfig  # noqa: F401  (re-exported: loaders and writers speak it)

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType

FORK_ARCH = "dflash-draft"
UPSTREAM_ARCH = "dflash"
SCHEMAS = {"fork": FORK_ARCH, "upstream": UPSTREAM_ARCH}
MASK_TOKEN_KEY = gguf.Keys.Tokenizer.MASK_ID  # "tokenizer.ggml.mask_token_id": where upstream keeps the mask id

# Types the writer can produce for 2D weights (gguf.quants has quantizers for these); norms are always F32.
WRITE_QTYPES = {t.name.lower(): t for t in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)}
_FILE_TYPES = {
    T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16, T.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, T.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    T.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
}
DEFAULT_BLOCK_SIZE = 16  # llama.cpp's default when dflash.block_size is absent


# --- names and shapes -------------------------------------------------------------------------------------------

# (fork suffix, upstream suffix, parameter sub-path) per layer tensor.
_LAYER_TENSORS = (
    ("attn_norm", "attn_norm", ("input_layernorm", "weight")),
    ("attn_q", "attn_q", ("self_attn", "q_proj", "weight")),
    ("attn_k", "attn_k", ("self_attn", "k_proj", "weight")),
    ("attn_v", "attn_v", ("self_attn", "v_proj", "weight")),
    ("attn_output", "attn_output", ("self_attn", "o_proj", "weight")),
    ("attn_q_norm", "attn_q_norm", ("self_attn", "q_norm", "weight")),
    ("attn_k_norm", "attn_k_norm", ("self_attn", "k_norm", "weight")),
    ("post_attention_norm", "ffn_norm", ("post_attention_layernorm", "weight")),
    ("ffn_gate", "ffn_gate", ("mlp", "gate_proj", "weight")),
    ("ffn_up", "ffn_up", ("mlp", "up_proj", "weight")),
    ("ffn_down", "ffn_down", ("mlp", "down_proj", "weight")),
)
_GLOBAL_TENSORS = (  # (fork name, upstream name, parameter path)
    ("dflash_fc.weight", "fc.weight", ("fc", "weight")),
    ("dflash_hidden_norm.weight", "enc.output_norm.weight", ("hidden_norm", "weight")),
    ("output_norm.weight", "output_norm.weight", ("norm", "weight")),
)


def param_shapes(dcfg: DrafterConfig) -> dict[tuple, tuple[int, ...]]:
    """Every parameter of the drafter: path -> numpy shape ((out, in) for projections, like HF Linear weights)."""
    h, f, hd = dcfg.hidden_size, dcfg.intermediate_size, dcfg.head_dim
    qd, kd = dcfg.num_heads * hd, dcfg.num_kv_heads * hd
    out: dict[tuple, tuple[int, ...]] = {
        ("fc", "weight"): (h, dcfg.n_target_features),
        ("hidden_norm", "weight"): (h,),
        ("norm", "weight"): (h,),
    }
    layer = {
        ("input_layernorm", "weight"): (h,),
        ("self_attn", "q_proj", "weight"): (qd, h),
        ("self_attn", "k_proj", "weight"): (kd, h),
        ("self_attn", "v_proj", "weight"): (kd, h),
        ("self_attn", "o_proj", "weight"): (h, qd),
        ("self_attn", "q_norm", "weight"): (hd,),
        ("self_attn", "k_norm", "weight"): (hd,),
        ("post_attention_layernorm", "weight"): (h,),
        ("mlp", "gate_proj", "weight"): (f, h),
        ("mlp", "up_proj", "weight"): (f, h),
        ("mlp", "down_proj", "weight"): (h, f),
    }
    for i in range(dcfg.num_layers):
        for sub, shape in layer.items():
            out[("layers", i) + sub] = shape
    return out


def tensor_names(schema: str, dcfg: DrafterConfig) -> dict[str, tuple]:
    """GGUF tensor name -> parameter path, for every tensor a drafter file of `schema` holds."""
    _check_schema(schema)
    fork = schema == "fork"
    out = {(fn if fork else un): path for fn, un, path in _GLOBAL_TENSORS}
    for i in range(dcfg.num_layers):
        for fs, us, sub in _LAYER_TENSORS:
            out[f"blk.{i}.{fs if fork else us}.weight"] = ("layers", i) + sub
    return out


def _check_schema(schema: str) -> None:
    if schema not in SCHEMAS:
        raise ValueError(f"schema {schema!r} is not known; use one of {', '.join(SCHEMAS)}")


# --- reading ----------------------------------------------------------------------------------------------------

class _Meta:
    """Typed access to one file's metadata; every problem is a GGUFError naming the file and the key."""

    def __init__(self, g: GGUFFile, arch: str):
        self.g, self.arch = g, arch

    def fail(self, problem: str):
        raise GGUFError(self.g.path, problem)

    def raw(self, key: str) -> Any:
        return self.g.metadata.get(key)

    def int(self, key: str, default: int | None = None, full: bool = False) -> int:
        k = key if full else f"{self.arch}.{key}"
        v = self.g.metadata.get(k)
        if v is None:
            if default is None:
                self.fail(f"missing metadata key {k!r}")
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(f"metadata key {k!r} must be an integer, found {v!r}")
        return v

    def float(self, key: str, default: float | None = None) -> float | None:
        k = f"{self.arch}.{key}"
        v = self.g.metadata.get(k)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(f"metadata key {k!r} must be a number, found {v!r}")
        if self.g.fields[k].type == V.FLOAT32:
            # the shortest decimal that is this float32 (1e-06, not 9.99999997e-07): configs written from decimal
            # values read back equal
            return float(str(np.float32(v)))
        return float(v)

    def int_list(self, key: str) -> list[int]:
        v = self.g.metadata.get(key)
        if v is None:
            self.fail(f"missing metadata key {key!r}")
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            self.fail(f"metadata key {key!r} must be a non-empty array of integers, found {v!r}")
        return v


def _check_unsupported(m: _Meta, head_dim: int) -> None:
    """Metadata that changes the drafter's math in ways this project's drafter does not implement: fail loudly."""
    a = m.arch
    act = m.raw(f"{a}.hidden_activation")
    if act not in (None, "silu"):
        m.fail(f"{a}.hidden_activation = {act!r} is not supported (only SwiGLU with silu)")
    if m.raw(f"{a}.attention.causal") is True or m.raw("dflash.attention.causal") is True:
        m.fail("causal block attention (attention.causal = true) is not supported; DFlash drafters here attend "
               "bidirectionally inside the block")
    scale = m.float("attention.scale", 0.0)
    if scale and not math.isclose(scale, 1.0 / math.sqrt(head_dim), rel_tol=1e-6):
        m.fail(f"{a}.attention.scale = {scale} differs from 1/sqrt(head_dim) = {1 / math.sqrt(head_dim):.6g}; "
               f"custom attention scales are not supported")
    for key in ("attention.value_scale", "embedding_scale"):
        v = m.float(key, 0.0)
        if v not in (0.0, 1.0):
            m.fail(f"{a}.{key} = {v} is not supported")
    rope_dims = m.int("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        m.fail(f"{a}.rope.dimension_count = {rope_dims} < head_dim {head_dim}: partial RoPE is not supported")
    factor = m.float("rope.scaling.factor", 1.0)
    rtype = m.raw(f"{a}.rope.scaling.type")
    if factor not in (0.0, 1.0) and rtype not in ("none",):
        m.fail(f"{a}.rope.scaling ({rtype or 'linear'}, factor {factor}) is not supported")
    sections = m.raw(f"{a}.rope.dimension_sections")
    if sections and list(sections)[1:] != [0] * (len(sections) - 1):
        m.fail(f"{a}.rope.dimension_sections = {sections}: multi-section M-RoPE is not supported (degenerate "
               f"[n/2, 0, 0, 0] sections, i.e. plain RoPE on the temporal position, are)")
    value_len = m.int("attention.value_length", head_dim)
    if value_len != head_dim:
        m.fail(f"{a}.attention.value_length {value_len} != key_length {head_dim} is not supported")


def _config_from_metadata(g: GGUFFile, schema: str) -> DrafterConfig:
    m = _Meta(g, SCHEMAS[schema])
    a = m.arch
    hidden = m.int("embedding_length")
    num_heads = m.int("attention.head_count")
    head_dim = m.int("attention.key_length", hidden // num_heads if num_heads else 1)
    _check_unsupported(m, head_dim)
    if schema == "fork":
        ids = m.int_list(f"{a}.dflash.target_layer_ids")
        mask = m.int(f"{a}.dflash.mask_token_id", full=True)
        block = m.int("dflash.block_size", DEFAULT_BLOCK_SIZE)
    else:
        stored = m.int_list(f"{a}.target_layers")
        if min(stored) < 1:
            m.fail(f"{a}.target_layers = {stored}: llama.cpp stores (HF layer id + 1), the input of target layer j; "
                   f"0 (the token embeddings) cannot be a DFlash tap")
        ids = [j - 1 for j in stored]
        mask = m.int(MASK_TOKEN_KEY, full=True) if MASK_TOKEN_KEY in g.metadata else None
        if mask is None:
            m.fail(f"missing metadata key {MASK_TOKEN_KEY!r}: an upstream DFlash drafter keeps its mask token id "
                   f"there (llama.cpp reads it with llama_vocab_mask)")
        block = m.int("block_size", DEFAULT_BLOCK_SIZE)
    window = m.int("attention.sliding_window", 0)
    pattern = m.raw(f"{a}.attention.sliding_window_pattern")
    if window > 0:
        # llama.cpp accepts the pattern as bools or as 0/1 integers
        if not isinstance(pattern, list) or not all(x in (0, 1) for x in pattern):
            m.fail(f"{a}.attention.sliding_window = {window} needs {a}.attention.sliding_window_pattern, an array of "
                   f"one bool per layer; found {pattern!r}")
    elif pattern:
        m.fail(f"{a}.attention.sliding_window_pattern is set but {a}.attention.sliding_window is missing or 0")
    features = m.g.metadata.get(f"{a}.dflash.n_target_features")
    try:
        dcfg = DrafterConfig(
            num_layers=m.int("block_count"),
            hidden_size=hidden,
            intermediate_size=m.int("feed_forward_length"),
            num_heads=num_heads,
            num_kv_heads=m.int("attention.head_count_kv", num_heads),
            head_dim=head_dim,
            rms_eps=m.float("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=m.float("rope.freq_base", 10000.0),
            block_size=block,
            mask_token_id=mask,
            target_layer_ids=tuple(ids),
            sliding_window=window or None,
            swa_layers=tuple(pattern) if window > 0 else (),
            max_position=m.int("context_length", 32768),
        )
    except ValueError as e:
        raise GGUFError(g.path, f"invalid drafter metadata: {e}") from e
    if features is not None and features != dcfg.n_target_features:
        m.fail(f"{a}.dflash.n_target_features = {features} != {len(ids)} taps x hidden {hidden} = "
               f"{dcfg.n_target_features}")
    return dcfg


def drafter_schema(g: GGUFFile) -> str:
    arch = g.get("general.architecture")
    for schema, name in SCHEMAS.items():
        if arch == name:
            return schema
    raise GGUFError(g.path, f"not a DFlash drafter: general.architecture is {arch!r}, expected "
                            f"{FORK_ARCH!r} (fork schema) or {UPSTREAM_ARCH!r} (upstream llama.cpp schema)")


def _list(names: list[str], n: int = 8) -> str:
    return f"{names[:n]}{f' ... ({len(names)} in all)' if len(names) > n else ''}"


def read_drafter_config(path: str | os.PathLike) -> tuple[DrafterConfig, str]:
    """(config, schema) of a drafter file, from its metadata alone."""
    g = open_gguf(path)
    schema = drafter_schema(g)
    return _config_from_metadata(g, schema), schema


def load_drafter_gguf(path: str | os.PathLike, dtype=np.float32) -> tuple[DrafterConfig, dict[tuple, np.ndarray]]:
    """A drafter file of either schema -> (config, {parameter path: numpy array of `dtype`}).

    Arrays are dequantized, in HF (out, in) layout. Every tensor of the file must be one the drafter uses, with the
    shape the metadata implies; missing, unexpected and misshapen tensors are reported together in one GGUFError.
    """
    g = open_gguf(path)
    schema = drafter_schema(g)
    dcfg = _config_from_metadata(g, schema)
    names = tensor_names(schema, dcfg)
    shapes = param_shapes(dcfg)
    problems = []
    missing = sorted(set(names) - set(g.tensors))
    extra = sorted(set(g.tensors) - set(names))
    if missing:
        problems.append(f"missing tensors {_list(missing)}")
    if extra:
        hint = ""
        if any(n in ("token_embd.weight", "output.weight", "d2t") for n in extra):
            hint = " (drafters with their own embedding / LM head / reduced vocab are not supported)"
        elif any(n.startswith(("markov_", "selector_", "dspark_")) or "_conv_" in n for n in extra):
            hint = " (DSpark / DFlash2 heads are not supported)"
        problems.append(f"unexpected tensors {_list(extra)}{hint}")
    for name, p in names.items():
        if name in g.tensors and g.tensors[name].shape != shapes[p]:
            problems.append(f"tensor {name!r} has shape {g.tensors[name].shape}, expected {shapes[p]}")
    if problems:
        raise GGUFError(g.path, f"{schema}-schema DFlash drafter ({dcfg.num_layers} layers, hidden "
                                f"{dcfg.hidden_size}): " + "; ".join(problems))
    g.check_quant_types()
    np_dtype = np.dtype(dtype)
    params = {p: dequantize(g.tensors[name]).astype(np_dtype) for name, p in names.items()}
    return dcfg, params


def check_compatible(dcfg: DrafterConfig, target_cfg, path: str | os.PathLike) -> None:
    """The drafter at `path` can run on the target `target_cfg` (a dflash_jax.config.ModelConfig); else GGUFError."""
    t = target_cfg
    problems = []
    if dcfg.hidden_size != t.hidden_size:
        problems.append(f"drafter hidden size {dcfg.hidden_size} != target hidden size {t.hidden_size} (the drafter "
                        f"uses the target's embeddings and LM head)")
    bad = [i for i in dcfg.target_layer_ids if i >= t.num_layers]
    if bad:
        problems.append(f"drafter target_layer_ids {list(dcfg.target_layer_ids)} name layers {bad} but the target "
                        f"has only {t.num_layers} layers (HF ids 0..{t.num_layers - 1})")
    if dcfg.mask_token_id >= t.vocab_size:
        problems.append(f"drafter mask_token_id {dcfg.mask_token_id} is outside the target vocabulary "
                        f"({t.vocab_size} tokens)")
    if problems:
        raise GGUFError(path, f"drafter does not fit the target ({t.arch}, {t.num_layers} layers, hidden "
                              f"{t.hidden_size}, vocab {t.vocab_size}): " + "; ".join(problems))


# --- writing ----------------------------------------------------------------------------------------------------

def _check_params(dcfg: DrafterConfig, params: dict[tuple, np.ndarray]) -> None:
    shapes = param_shapes(dcfg)
    problems = []
    missing = [p for p in shapes if p not in params]
    extra = [p for p in params if p not in shapes]
    if missing:
        problems.append(f"missing parameters {missing[:6]}")
    if extra:
        problems.append(f"unexpected parameters {extra[:6]}")
    for p, shape in shapes.items():
        if p in params and tuple(np.shape(params[p])) != shape:
            problems.append(f"parameter {p} has shape {tuple(np.shape(params[p]))}, expected {shape}")
    if problems:
        raise ValueError("drafter parameters do not match the config: " + "; ".join(problems))


def _tokenizer_kv(source: str | os.PathLike) -> dict[str, Any]:
    fields = read_fields(source, raw_strings=True)
    kv = {k: v for k, v in fields.items() if k.startswith("tokenizer.") and k != MASK_TOKEN_KEY}
    if "tokenizer.ggml.tokens" not in kv:
        raise GGUFError(source, "no tokenizer.ggml.tokens: not a tokenizer source for the drafter")
    return kv


def write_drafter_gguf(path: str | os.PathLike, dcfg: DrafterConfig, params: dict[tuple, np.ndarray],
                       schema: str = "upstream", tokenizer_source: str | os.PathLike | None = None,
                       qtype: str = "f32") -> None:
    """Write a drafter GGUF in `schema` ("upstream": what llama.cpp loads; "fork": the dflash-draft files).

    tokenizer_source: a GGUF (normally the target) whose `tokenizer.*` metadata is copied; llama.cpp needs it to
    load a drafter and checks it against the target's vocabulary. The mask token id goes to
    `tokenizer.ggml.mask_token_id` (upstream) or `dflash-draft.dflash.mask_token_id` (fork).
    qtype: type of the 2D weights; norms stay F32.
    """
    _check_schema(schema)
    if qtype not in WRITE_QTYPES:
        raise ValueError(f"qtype {qtype!r} is not supported; use one of {', '.join(WRITE_QTYPES)}")
    _check_params(dcfg, params)
    wt = WRITE_QTYPES[qtype]
    block = gguf.GGML_QUANT_SIZES[wt][0]
    shapes = param_shapes(dcfg)
    bad = [f"{p} {s}" for p, s in shapes.items() if len(s) == 2 and s[1] % block]
    if bad:
        raise ValueError(f"{qtype} packs rows in blocks of {block}; these rows do not divide: {', '.join(bad[:4])}")
    tok = _tokenizer_kv(tokenizer_source) if tokenizer_source is not None else {}
    if tok:
        n_tokens = len(tok["tokenizer.ggml.tokens"].value)
        if dcfg.mask_token_id >= n_tokens:
            raise ValueError(f"mask_token_id {dcfg.mask_token_id} is outside the vocabulary of {tokenizer_source} "
                             f"({n_tokens} tokens)")

    arch = SCHEMAS[schema]
    tmp = f"{os.fspath(path)}.partial"
    w = gguf.GGUFWriter(tmp, arch)
    try:
        _add_metadata(w, dcfg, schema, tok, wt)
        for name, p in tensor_names(schema, dcfg).items():
            x = np.ascontiguousarray(np.asarray(params[p], dtype=np.float32))
            if x.ndim == 1 or wt == T.F32:
                w.add_tensor(name, x)
            elif wt == T.F16:
                w.add_tensor(name, x.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(x, wt), raw_dtype=wt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    except BaseException:
        w.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    w.close()
    os.replace(tmp, path)


def _add_metadata(w: gguf.GGUFWriter, dcfg: DrafterConfig, schema: str, tok: dict[str, Any], wt: T) -> None:
    arch = SCHEMAS[schema]
    w.add_type("model")
    w.add_name(f"DFlash drafter ({schema} schema)")
    w.add_context_length(dcfg.max_position)
    w.add_embedding_length(dcfg.hidden_size)
    w.add_block_count(dcfg.num_layers)
    w.add_feed_forward_length(dcfg.intermediate_size)
    w.add_head_count(dcfg.num_heads)
    w.add_head_count_kv(dcfg.num_kv_heads)
    w.add_key_length(dcfg.head_dim)
    w.add_value_length(dcfg.head_dim)
    w.add_layer_norm_rms_eps(dcfg.rms_eps)
    w.add_rope_freq_base(dcfg.rope_theta)
    if schema == "upstream":
        w.add_uint32(f"{arch}.block_size", dcfg.block_size)
        w.add_key_value(f"{arch}.target_layers", [i + 1 for i in dcfg.target_layer_ids], V.ARRAY,
                        sub_type=V.INT32)
        w.add_uint32(MASK_TOKEN_KEY, dcfg.mask_token_id)
    else:
        w.add_uint32(f"{arch}.dflash.block_size", dcfg.block_size)
        w.add_uint32(f"{arch}.dflash.mask_token_id", dcfg.mask_token_id)
        w.add_key_value(f"{arch}.dflash.target_layer_ids", list(dcfg.target_layer_ids), V.ARRAY,
                        sub_type=V.INT32)
        w.add_uint32(f"{arch}.dflash.n_target_features", dcfg.n_target_features)
    if dcfg.sliding_window is not None:
        # llama.cpp requires the per-layer pattern whenever the window is set
        w.add_uint32(f"{arch}.attention.sliding_window", dcfg.sliding_window)
        pattern = list(dcfg.swa_layers) or [False] * dcfg.num_layers
        w.add_key_value(f"{arch}.attention.sliding_window_pattern", pattern, V.ARRAY, sub_type=V.BOOL)
    for key, field in tok.items():
        w.add_key_value(key, field.value, field.type, sub_type=field.sub_type)
    w.add_file_type(int(_FILE_TYPES[wt]))
    if wt not in (T.F32, T.F16, T.BF16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_drafter_header(path: str | os.PathLike, dcfg: DrafterConfig, schema: str = "upstream",
                         qtype: str = "q8_0") -> None:
    """A drafter file with real metadata and tensor infos whose data region is a hole (a sparse file of zeros):
    checks configs and shapes of full-size drafters (e.g. 27B-class, ~2 GB in Q8_0) without writing weights."""
    _check_schema(schema)
    wt = WRITE_QTYPES[qtype]
    shapes = param_shapes(dcfg)
    w = gguf.GGUFWriter(os.fspath(path), SCHEMAS[schema])
    _add_metadata(w, dcfg, schema, {}, wt)
    data_bytes = 0
    for name, p in tensor_names(schema, dcfg).items():
        t = wt if len(shapes[p]) == 2 else T.F32
        b, ts = gguf.GGML_QUANT_SIZES[t]
        n = int(np.prod(shapes[p])) // b * ts
        w.add_tensor_info(name, shapes[p], np.dtype(np.float32), n, raw_dtype=t)
        data_bytes += -(-n // w.data_alignment) * w.data_alignment
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    header = os.path.getsize(path)
    os.truncate(path, -(-header // w.data_alignment) * w.data_alignment + data_bytes)


def random_drafter_params(dcfg: DrafterConfig, seed: int, scale: float | None = None) -> dict[tuple, np.ndarray]:
    """Random float32 drafter weights: projections N(0, scale or 1/sqrt(fan_in)), norm gains 1 + 0.1 N(0, 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for p, shape in param_shapes(dcfg).items():
        if len(shape) == 1:
            out[p] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            std = scale if scale is not None else 1.0 / math.sqrt(shape[1])
            out[p] = (std * rng.standard_normal(shape)).astype(np.float32)
    return out


PRESETS = {
    # z-lab Qwen3.6-27B-DFlash (DESIGN.md section 5): taps of a 64-layer target, mask = Qwen3.5/3.6's unused row.
    "qwen3.6-27b": DrafterConfig(num_layers=5, hidden_size=5120, intermediate_size=17408, num_heads=32,
                                 num_kv_heads=8, head_dim=128, rms_eps=1e-6, rope_theta=1e7, block_size=16,
                                 mask_token_id=248070, target_layer_ids=(1, 16, 31, 46, 61), max_position=262144),
}


def main(argv: list[str] | None = None) -> None:
    import argparse  # noqa: PLC0415
    import sys  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m converters.drafter_gguf",
                                 description="Write a random-weight DFlash drafter GGUF of a preset shape.")
    ap.add_argument("out")
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--schema", default="upstream", choices=sorted(SCHEMAS))
    ap.add_argument("--qtype", default="q8_0", choices=sorted(WRITE_QTYPES))
    ap.add_argument("--tokenizer-source", default=None, help="target GGUF whose tokenizer llama.cpp will check")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    dcfg = PRESETS[a.preset]
    write_drafter_gguf(a.out, dcfg, random_drafter_params(dcfg, a.seed), a.schema, a.tokenizer_source, a.qtype)
    print(f"wrote {a.out}: {os.path.getsize(a.out):,} bytes ({a.schema} schema, {dcfg.num_layers} layers, "
          f"hidden {dcfg.hidden_size}, {a.qtype})", file=sys.stderr)


if __name__ == "__main__":
    main()
