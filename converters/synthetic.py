"""Random-weight GGUF files in the exact tensor/metadata layout llama.cpp loads for llama, qwen2, qwen3 and qwen35
(hybrid, see converters.synthetic_qwen35) models."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from converters import synthetic_qwen35
from converters.gguf_file import GGUFValue, read_fields
from converters.quant_blocks import SUPPORTED as SUPPORTED_QTYPES
from converters.quant_blocks import random_float_bytes, random_quant_bytes

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType

ARCHS = ("llama", "qwen2", "qwen3")
QTYPES = {t.name.lower(): t for t in SUPPORTED_QTYPES}
FILE_TYPES = {  # general.file_type for a file whose 2D weights are all of one type
    T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16, T.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, T.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    T.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1, T.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    T.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S, T.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
}
# Logit std ~ LOGIT_STD: peaked next-token distributions, so greedy parity tests against llama.cpp are not decided
# by near-ties between top candidates.
LOGIT_STD = 10.0
# Gains on the two matrices that write the residual stream (times 1/sqrt(fan_in)). Layer outputs must outweigh the
# token's own embedding, or a tied-embedding model mostly predicts its input token again; and the per-token MLP must
# outweigh attention, whose averaging over positions otherwise collapses deep random models onto one repeated token.
ATTN_OUT_GAIN = 2.0
FFN_DOWN_GAIN = 8.0
_DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
DEFAULT_TOKENIZER = _DATA / "vocab" / "ggml-vocab-qwen2.gguf"  # Qwen2's vocabulary is also Qwen3's
QWEN3_TEMPLATE = _DATA / "templates" / "Qwen-Qwen3-0.6B.jinja"


@dataclass(frozen=True)
class SyntheticSpec:
    arch: str  # 'llama' | 'qwen2' | 'qwen3'
    num_layers: int
    hidden: int
    ffn: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int | None = None  # None = the tokenizer source's vocab
    rope_theta: float = 1e6
    rms_eps: float = 1e-6
    context_length: int = 4096
    tied_embeddings: bool = False
    qtype: str = "f32"  # type of every 2D weight; norms and biases are always F32

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r} not supported; supported: {', '.join(ARCHS)}")
        if self.qtype not in QTYPES:
            raise ValueError(f"qtype {self.qtype!r} not supported; supported: {', '.join(QTYPES)}")
        for field in ("num_layers", "hidden", "ffn", "num_heads", "num_kv_heads", "head_dim", "context_length"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")


PRESETS: dict[str, SyntheticSpec] = {
    # head_dim 64 with 4 heads != hidden 128 / 4: exercises qwen3.attention.key_length.
    "qwen3-tiny": SyntheticSpec("qwen3", num_layers=2, hidden=128, ffn=256, num_heads=4, num_kv_heads=2, head_dim=64),
    "llama-tiny": SyntheticSpec("llama", num_layers=2, hidden=128, ffn=256, num_heads=4, num_kv_heads=2, head_dim=32,
                                rope_theta=1e5, rms_eps=1e-5, tied_embeddings=True),
    "qwen2-tiny": SyntheticSpec("qwen2", num_layers=2, hidden=128, ffn=256, num_heads=4, num_kv_heads=2, head_dim=32,
                                tied_embeddings=True),
    # SmolLM2-135M-Instruct's shape (the embedded default model): device benchmarks without carrying its 98 MB GGUF.
    "smollm2-135m": SyntheticSpec("llama", num_layers=30, hidden=576, ffn=1536, num_heads=9, num_kv_heads=3,
                                  head_dim=64, vocab_size=49152, rope_theta=1e5, rms_eps=1e-5, context_length=8192,
                                  tied_embeddings=True),
    "qwen3-0.6b": SyntheticSpec("qwen3", num_layers=28, hidden=1024, ffn=3072, num_heads=16, num_kv_heads=8,
                                head_dim=128, vocab_size=151936, context_length=40960, tied_embeddings=True),
    "qwen3-8b": SyntheticSpec("qwen3", num_layers=36, hidden=4096, ffn=12288, num_heads=32, num_kv_heads=8,
                              head_dim=128, vocab_size=151936, context_length=40960),
    **synthetic_qwen35.PRESETS,
}


# --- tokenizer metadata -------------------------------------------------------------------------------------------

def read_gguf_kv(path: str | os.PathLike) -> dict[str, GGUFValue]:
    """All metadata of a GGUF as key -> (value, type, array element type); strings stay raw bytes, to copy verbatim.

    converters.gguf_file's direct parse of the KV section (gguf.GGUFReader would take ~20 s on a 151k-token
    vocabulary, which would dominate every test that writes a model). Broken files raise GGUFError (a ValueError).
    """
    return read_fields(path, raw_strings=True)


def _byte_level_tokenizer() -> dict[str, tuple[Any, V, V | None]]:
    """A minimal GPT-2 byte-level BPE (256 byte tokens, a few merges, ChatML specials) for files without a source."""
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    byte_chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "i n", "Ġ a", "e r"]
    tokens = specials + byte_chars + [m.replace(" ", "") for m in merges]
    types = [int(gguf.TokenType.CONTROL)] * len(specials) + [int(gguf.TokenType.NORMAL)] * (len(tokens) - len(specials))
    return {
        "tokenizer.ggml.model": (b"gpt2", V.STRING, None),
        "tokenizer.ggml.pre": (b"default", V.STRING, None),
        "tokenizer.ggml.tokens": ([t.encode() for t in tokens], V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": ([m.encode() for m in merges], V.ARRAY, V.STRING),
        "tokenizer.ggml.bos_token_id": (0, V.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, V.UINT32, None),
        "tokenizer.ggml.add_bos_token": (False, V.BOOL, None),
    }


def tokenizer_metadata(tokenizer_source: str | os.PathLike | None, vocab_size: int | None,
                       chat_template: str | None) -> tuple[dict[str, tuple[Any, V, V | None]], int]:
    """The `tokenizer.*` keys to write (copied verbatim from the source) and the model's vocab size.

    A larger vocab_size pads with UNUSED `[PADn]` tokens (as Qwen's own padded vocabularies do); a smaller one is an
    error, since merges and special-token ids may point past the cut.
    """
    if tokenizer_source is None:
        kv = _byte_level_tokenizer()
        if vocab_size is None:
            raise ValueError("vocab_size is required when there is no tokenizer_source")
    else:
        kv = {k: v for k, v in read_gguf_kv(tokenizer_source).items() if k.startswith("tokenizer.")}
        if "tokenizer.ggml.tokens" not in kv:
            raise ValueError(f"{tokenizer_source}: no tokenizer.ggml.tokens; not a tokenizer source")
    n_tokens = len(kv["tokenizer.ggml.tokens"][0])
    vocab_size = n_tokens if vocab_size is None else vocab_size
    if vocab_size < n_tokens:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {n_tokens} tokens "
                         f"(from {tokenizer_source or 'the built-in byte-level tokenizer'}); use >= {n_tokens}")
    if vocab_size > n_tokens:
        pad = range(n_tokens, vocab_size)
        per_token = {"tokenizer.ggml.tokens": [f"[PAD{i}]".encode() for i in pad],
                     "tokenizer.ggml.token_type": [int(gguf.TokenType.UNUSED)] * len(pad),
                     "tokenizer.ggml.scores": [0.0] * len(pad)}
        for key, extra in per_token.items():
            if key in kv:
                value, vtype, sub = kv[key]
                kv[key] = (list(value) + extra, vtype, sub)
    if chat_template is not None:
        kv["tokenizer.chat_template"] = (chat_template.encode(), V.STRING, None)
    return kv, vocab_size


# --- tensors ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy (out, in) order
    qtype: T
    std: float
    mean: float = 0.0


def tensor_plan(spec: SyntheticSpec, vocab_size: int, weight_scale: float | None = None) -> list[PlannedTensor]:
    """Every tensor llama.cpp loads for spec.arch, with its shape, type and the std of its random values.

    Projections get std 1/sqrt(fan_in) (unit-variance outputs for unit-RMS inputs, so activations stay O(1) through
    the layers), times ATTN_OUT_GAIN / FFN_DOWN_GAIN for the two that write the residual stream; the output matrix gets
    LOGIT_STD/sqrt(hidden); norms are 1 + 0.1*noise.
    """
    if spec.arch == "qwen35":
        return _check_blocks(spec, synthetic_qwen35.tensor_plan(spec, vocab_size, weight_scale, PlannedTensor, QTYPES,
                                                                ATTN_OUT_GAIN, FFN_DOWN_GAIN, LOGIT_STD))
    wt = QTYPES[spec.qtype]
    d, q_dim, kv_dim = spec.hidden, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim

    def proj(name: str, out_dim: int, in_dim: int, gain: float = 1.0) -> PlannedTensor:
        return PlannedTensor(name, (out_dim, in_dim), wt, weight_scale or gain / np.sqrt(in_dim))

    def norm(name: str, n: int) -> PlannedTensor:
        return PlannedTensor(name, (n,), T.F32, 0.1, 1.0)

    def bias(name: str, n: int) -> PlannedTensor:
        return PlannedTensor(name, (n,), T.F32, 0.1)

    out_std = LOGIT_STD / np.sqrt(d)
    plan = [PlannedTensor("token_embd.weight", (vocab_size, d), wt, out_std if spec.tied_embeddings else 1.0)]
    for i in range(spec.num_layers):
        p = f"blk.{i}."
        plan += [norm(p + "attn_norm.weight", d),
                 proj(p + "attn_q.weight", q_dim, d), proj(p + "attn_k.weight", kv_dim, d),
                 proj(p + "attn_v.weight", kv_dim, d)]
        if spec.arch == "qwen2":
            plan += [bias(p + "attn_q.bias", q_dim), bias(p + "attn_k.bias", kv_dim), bias(p + "attn_v.bias", kv_dim)]
        if spec.arch == "qwen3":
            plan += [norm(p + "attn_q_norm.weight", spec.head_dim), norm(p + "attn_k_norm.weight", spec.head_dim)]
        plan += [proj(p + "attn_output.weight", d, q_dim, ATTN_OUT_GAIN), norm(p + "ffn_norm.weight", d),
                 proj(p + "ffn_gate.weight", spec.ffn, d), proj(p + "ffn_up.weight", spec.ffn, d),
                 proj(p + "ffn_down.weight", d, spec.ffn, FFN_DOWN_GAIN)]
    plan.append(norm("output_norm.weight", d))
    if not spec.tied_embeddings:
        plan.append(PlannedTensor("output.weight", (vocab_size, d), wt, out_std))
    return _check_blocks(spec, plan)


def _check_blocks(spec, plan: list[PlannedTensor]) -> list[PlannedTensor]:
    block = gguf.GGML_QUANT_SIZES[QTYPES[spec.qtype]][0]
    bad = [f"{t.name} {t.shape}" for t in plan if len(t.shape) == 2 and t.shape[1] % block and t.qtype != T.F32]
    if bad:
        raise ValueError(f"{spec.qtype} packs rows in blocks of {block}; these rows do not divide: "
                         f"{', '.join(bad[:4])}")
    return plan


# Work item of the generator: bounds the temporaries and lets threads fill one big tensor in parallel (numpy's
# generators release the GIL). Each item has its own seed, so the bytes do not depend on the number of threads.
CHUNK_VALUES = 1 << 22


def random_tensor(t: PlannedTensor, seed: int, index: int, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """The bytes of tensor number `index` of a file, as (rows, row_bytes) uint8; deterministic in (seed, index)."""
    rows, cols = t.shape if len(t.shape) == 2 else (1, t.shape[0])
    step = max(1, CHUNK_VALUES // cols)
    block, type_size = gguf.GGML_QUANT_SIZES[t.qtype]
    out = np.empty((rows, cols // block * type_size), dtype=np.uint8)

    def fill(start: int) -> None:
        # SFC64: several times faster than the default PCG64 at raw bits; quality is ample for random weights.
        rng = np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, index, start])))
        shape = (min(step, rows - start), cols)
        if t.qtype in (T.F32, T.F16, T.BF16):
            out[start:start + shape[0]] = random_float_bytes(t.qtype, shape, rng, t.std, t.mean).reshape(shape[0], -1)
        else:
            out[start:start + shape[0]] = random_quant_bytes(t.qtype, shape, rng, t.std)

    starts = range(0, rows, step)
    if pool is None or len(starts) == 1:
        for start in starts:
            fill(start)
    else:
        list(pool.map(fill, starts))
    return out


# --- writer -------------------------------------------------------------------------------------------------------

def _add_arch_metadata(w: gguf.GGUFWriter, spec: SyntheticSpec, vocab_size: int) -> None:
    w.add_type("model")
    w.add_name(f"synthetic {spec.arch} (random weights)")
    if spec.arch == "qwen35":
        synthetic_qwen35.add_metadata(w, spec)
    else:
        _add_dense_hparams(w, spec, vocab_size)
    qtype = QTYPES[spec.qtype]
    w.add_file_type(int(FILE_TYPES[qtype]))
    if qtype not in (T.F32, T.F16, T.BF16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_dense_hparams(w: gguf.GGUFWriter, spec: SyntheticSpec, vocab_size: int) -> None:
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.hidden)
    w.add_block_count(spec.num_layers)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    # llama.cpp defaults head_dim to hidden/num_heads; qwen3's converter always writes it.
    if spec.arch == "qwen3" or spec.head_dim * spec.num_heads != spec.hidden:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    if spec.arch == "llama":  # as convert_hf_to_gguf writes them for llama
        w.add_vocab_size(vocab_size)
        w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_eps)


def write_random_gguf(out_path: str | os.PathLike, spec: SyntheticSpec, tokenizer_source: str | os.PathLike | None,
                      seed: int = 0, chat_template: str | None = None, weight_scale: float | None = None,
                      header_only: bool = False) -> None:
    """Write a random-weight GGUF for `spec` with the tokenizer (and chat template) of `tokenizer_source`.

    Tensors are generated and written one at a time, so peak RAM is about one tensor (2.5 GB for the 8B embedding
    in f32), generated by all cores.
    `weight_scale`, if given, replaces the 1/sqrt(fan_in) std of the projection matrices.
    `header_only`: metadata and tensor infos only, the data region left a hole (a sparse file of zeros), to check
    configs and tensor maps of full-size shapes (27B) without generating weights.
    """
    tok_kv, vocab_size = tokenizer_metadata(tokenizer_source, spec.vocab_size, chat_template)
    plan = tensor_plan(spec, vocab_size, weight_scale)
    # Written under a temporary name so that an interrupted run never leaves a truncated file at out_path.
    tmp_path = f"{os.fspath(out_path)}.partial"
    w = gguf.GGUFWriter(tmp_path, spec.arch)
    _add_arch_metadata(w, spec, vocab_size)
    for key, (value, vtype, sub) in tok_kv.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    for t in plan:
        block, type_size = gguf.GGML_QUANT_SIZES[t.qtype]
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), int(np.prod(t.shape)) // block * type_size,
                          raw_dtype=t.qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if header_only:
            w.close()
            align = w.data_alignment
            sizes = (int(np.prod(t.shape)) // gguf.GGML_QUANT_SIZES[t.qtype][0] * gguf.GGML_QUANT_SIZES[t.qtype][1]
                     for t in plan)
            data = sum(-(-n // align) * align for n in sizes)
            os.truncate(tmp_path, -(-os.path.getsize(tmp_path) // align) * align + data)
            os.replace(tmp_path, out_path)
            return
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for index, t in enumerate(plan):
                w.write_tensor_data(random_tensor(t, seed, index, pool))
    except BaseException:
        w.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    w.close()
    os.replace(tmp_path, out_path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m converters.synthetic", description=__doc__)
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--qtype", choices=sorted(QTYPES), help="type of the 2D weights (default: the preset's)")
    ap.add_argument("--tokenizer-source", default=None,
                    help=f"GGUF whose tokenizer.* metadata is copied (default: {DEFAULT_TOKENIZER} if present)")
    ap.add_argument("--chat-template", default=None,
                    help="file with a Jinja chat template to embed instead of the tokenizer source's "
                         f"(default for qwen3 presets: {QWEN3_TEMPLATE} if present)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    spec = PRESETS[a.preset]
    if a.qtype:
        spec = dataclasses.replace(spec, qtype=a.qtype)
    if a.layers:
        spec = dataclasses.replace(spec, num_layers=a.layers)
    tok = a.tokenizer_source or (DEFAULT_TOKENIZER if DEFAULT_TOKENIZER.is_file() else None)
    template_path = a.chat_template or (QWEN3_TEMPLATE if spec.arch == "qwen3" and QWEN3_TEMPLATE.is_file() else None)
    template = Path(template_path).read_text() if template_path else None
    write_random_gguf(a.out, spec, tok, seed=a.seed, chat_template=template)
    print(f"wrote {a.out}: {os.path.getsize(a.out):,} bytes ({spec.arch}, {spec.num_layers} layers, {spec.qtype})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
