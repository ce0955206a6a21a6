"""A target GGUF that cannot be served fails at load with one clear error naming the file and the problem."""
from __future__ import annotations

import dataclasses

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from converters.gguf_file import GGUFError, open_gguf
from converters.load_gguf import load_gguf
from converters.synthetic import PRESETS, write_random_gguf


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "qwen3-tiny.gguf"
    write_random_gguf(str(path), dataclasses.replace(PRESETS["qwen3-tiny"], vocab_size=320), None, seed=1)
    return path


def rewrite(src, dst, arch=None, drop=(), reshape=None, retype=None):
    """Copy a GGUF with changes: another architecture name, tensors dropped, one tensor's rows cut, one tensor
    re-labelled as another quant type (with bytes of the right size)."""
    g = open_gguf(src)
    w = gguf.GGUFWriter(str(dst), arch or g.arch)
    for key, f in g.fields.items():
        if key != "general.architecture":
            w.add_key_value(key.replace(f"{g.arch}.", f"{arch}.") if arch else key, f.value, f.type, f.sub_type)
    for name, info in g.tensors.items():
        if name in drop:
            continue
        raw, qtype = np.asarray(info.raw), info.qtype
        if reshape == name:
            raw = raw[:-1]
        if retype and retype[0] == name:
            qtype = retype[1]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((info.shape[0], info.shape[1] // block * size), np.uint8)
        w.add_tensor(name, raw, raw_shape=raw.shape if raw.dtype == np.uint8 else None, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_good_file_loads(good):
    cfg, _, _ = load_gguf(str(good), jnp.float32, progress=False)
    assert cfg.arch == "qwen3" and cfg.head_dim == 64


@pytest.mark.parametrize("change,message", [
    (dict(arch="mamba2"), "unknown architecture 'mamba2'; supported: llama, qwen2, qwen3"),
    (dict(drop=("blk.1.ffn_up.weight",)), r"missing tensors \['blk.1.ffn_up.weight'\]"),
    (dict(reshape="blk.0.attn_k.weight"), r"tensor 'blk.0.attn_k.weight' has shape \(127, 128\), expected \(128, 128\)"),
    (dict(retype=("blk.0.ffn_gate.weight", gguf.GGMLQuantizationType.IQ4_NL)),
     r"unsupported quant type in tensors \['blk.0.ffn_gate.weight \(IQ4_NL\)'\]; supported: BF16, F16, F32"),
])
def test_bad_file_names_file_and_problem(good, tmp_path, change, message):
    bad = rewrite(good, tmp_path / "bad.gguf", **change)
    with pytest.raises(GGUFError, match=message) as e:
        load_gguf(str(bad), jnp.float32, progress=False)
    assert str(e.value).startswith(str(bad))


def test_truncated_and_wrong_magic(good, tmp_path):
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match=str(cut)):
        load_gguf(str(cut), jnp.float32, progress=False)
    magic = tmp_path / "magic.gguf"
    magic.write_bytes(b"GGML" + data[4:])
    with pytest.raises(GGUFError, match="magic"):
        load_gguf(str(magic), jnp.float32, progress=False)
