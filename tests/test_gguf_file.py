"""converters.gguf_file's own GGUF parser: same metadata and tensor bytes as gguf.GGUFReader, fast, and every corrupt
file becomes a GGUFError that names it."""
from __future__ import annotations

import random
import re
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters.gguf_file import GGUFError, GGUFFile, GGUFValue, open_gguf, read_fields, read_metadata
from converters.synthetic import SyntheticSpec, write_random_gguf

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
QWEN_VOCAB = Path(__file__).resolve().parent / "data" / "vocab" / "ggml-vocab-qwen2.gguf"


# ---- identical to gguf.GGUFReader -----------------------------------------------------------------------------------

def assert_same_as_reader(path) -> GGUFFile:
    ours, ref = open_gguf(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        expected = field.contents()
        assert ours.metadata[key] == expected, key
        assert type(ours.metadata[key]) is type(expected), key
        if isinstance(expected, list) and expected:
            assert type(ours.metadata[key][0]) is type(expected[0]), key
        assert ours.fields[key].type == field.types[0], key
        if field.types[0] == V.ARRAY and expected:
            assert ours.fields[key].sub_type == field.types[-1], key
    assert ours.version == ref.fields["GGUF.version"].contents()
    assert (ours.alignment, ours.data_offset) == (ref.alignment, ref.data_offset)
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.qtype == t.tensor_type and info.shape == tuple(reversed(t.shape.tolist())), t.name
        assert info.raw.dtype == t.data.dtype and info.raw.shape == t.data.shape, t.name
        assert info.raw.tobytes() == t.data.tobytes(), t.name
        assert info.num_bytes == t.n_bytes, t.name
        assert isinstance(info.raw, np.memmap) and not info.raw.flags.writeable, t.name
    return ours


def test_smollm2_matches_gguf_reader(smollm2_path):
    g = assert_same_as_reader(smollm2_path)
    assert g.arch == "llama" and len(g.tensors) == 272
    assert {t.qtype for t in g.tensors.values()} >= {T.Q4_1, T.F32}
    info = g.tensors["blk.0.attn_q.weight"]
    deq = gguf.quants.dequantize(info.raw, info.qtype)
    assert deq.shape == info.shape and np.isfinite(deq).all()
    assert read_metadata(smollm2_path) == g.metadata


@pytest.mark.parametrize("qtype", ["q4_k", "q8_0", "bf16", "f16"])
def test_synthetic_file_matches_gguf_reader(tmp_path, qtype):
    spec = SyntheticSpec("qwen3", num_layers=1, hidden=256, ffn=512, num_heads=4, num_kv_heads=2, head_dim=64,
                         vocab_size=512, qtype=qtype)
    path = tmp_path / "m.gguf"
    write_random_gguf(path, spec, None, seed=1)
    g = assert_same_as_reader(path)
    ref = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name in ("blk.0.attn_q.weight", "token_embd.weight", "blk.0.attn_norm.weight"):
        info = g.tensors[name]
        ours = gguf.quants.dequantize(info.raw, info.qtype)
        assert ours.shape == info.shape
        np.testing.assert_array_equal(ours, gguf.quants.dequantize(ref[name].data, ref[name].tensor_type))


def test_read_fields_keeps_types_and_optionally_raw_bytes():
    fields = read_fields(QWEN_VOCAB)
    raw = read_fields(QWEN_VOCAB, raw_strings=True)
    tokens = fields["tokenizer.ggml.tokens"]
    assert isinstance(tokens, GGUFValue) and (tokens.type, tokens.sub_type) == (V.ARRAY, V.STRING)
    assert len(tokens.value) == 151936 and tokens.value[0] == "!"
    assert raw["tokenizer.ggml.tokens"].value == [t.encode() for t in tokens.value]
    assert raw["tokenizer.ggml.model"] == GGUFValue(b"gpt2", V.STRING, None)
    assert fields["tokenizer.ggml.token_type"].sub_type == V.INT32
    assert read_metadata(QWEN_VOCAB) == {k: v.value for k, v in fields.items()} == open_gguf(QWEN_VOCAB).metadata


def test_qwen_vocab_opens_fast():
    start = time.perf_counter()
    g = open_gguf(QWEN_VOCAB)
    elapsed = time.perf_counter() - start
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 151936 and not g.tensors
    assert elapsed < 3.0, f"opening took {elapsed:.2f}s"  # gguf.GGUFReader: ~20 s


# ---- corruption ---------------------------------------------------------------------------------------------------

def _small_gguf(path: Path, alignment: int | None = None) -> bytes:
    """A small valid file: every value kind, an F32 and a Q8_0 tensor. Returns its bytes."""
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint32("test.count", 7)
    w.add_float32("test.float", 0.5)
    w.add_bool("test.flag", True)
    w.add_string("test.text", "héllo")
    w.add_array("test.strings", ["a", "bc", "déf"])
    w.add_array("test.ints", [1, -2, 3])
    rng = np.random.default_rng(0)
    w.add_tensor("t.f32", rng.standard_normal((8, 32)).astype(np.float32))
    w.add_tensor("t.q8", gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), T.Q8_0),
                 raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture()
def small(tmp_path) -> bytes:
    data = _small_gguf(tmp_path / "small.gguf")
    g = open_gguf(tmp_path / "small.gguf")  # the unbroken file is fine
    assert g.metadata["test.strings"] == ["a", "bc", "déf"] and g.metadata["test.text"] == "héllo"
    assert g.tensors["t.q8"].raw.shape == (4, 68) and g.tensors["t.f32"].raw.shape == (8, 32)
    return data


def _after(data: bytes, name: str) -> int:
    """Offset just after the (unique) length-prefixed string `name` in the header."""
    encoded = struct.pack("<Q", len(name.encode())) + name.encode()
    pos = data.index(encoded)
    assert data.find(encoded, pos + 1) == -1
    return pos + len(encoded)


def _patch(data: bytes, pos: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, pos, value)
    return bytes(b)


def _header_end(data: bytes) -> int:
    """End of the tensor infos (the last one is t.q8: name, n_dims, 2 dims, type, offset)."""
    return _after(data, "t.q8") + 4 + 16 + 4 + 8


def _cases(data: bytes) -> dict[str, tuple[bytes, str]]:
    kv_start = 24
    strings = _after(data, "test.strings")  # -> u32 ARRAY, u32 STRING, u64 count, items
    ints = _after(data, "test.ints")
    text = _after(data, "test.text")  # -> u32 STRING, u64 length, bytes
    q8 = _after(data, "t.q8")  # -> u32 n_dims, u64 dims[2], u32 type, u64 offset
    return {
        "magic": (b"GGML" + data[4:], "not a GGUF file"),
        "empty": (b"", "not a GGUF file"),
        "version 1": (_patch(data, 4, "<I", 1), "unsupported GGUF version 1"),
        "version 9": (_patch(data, 4, "<I", 9), "unsupported GGUF version 9"),
        "big-endian": (_patch(data, 4, ">I", 3), "big-endian"),
        "truncated header": (data[:13], "truncated"),
        "truncated kv": (data[:strings + 20], "truncated"),
        "truncated kv key": (data[:kv_start + 10], "truncated"),
        "truncated tensor info": (data[:q8 + 6], "truncated"),
        "truncated tensor data": (data[:-100], "truncated"),
        "huge kv count": (_patch(data, 16, "<Q", 1 << 62), "cannot fit"),
        "huge tensor count": (_patch(data, 8, "<Q", 1 << 62), "cannot fit"),
        "huge string length": (_patch(data, text + 4, "<Q", 1 << 62), "more than the whole file"),
        "huge key length": (_patch(data, kv_start, "<Q", (1 << 64) - 1), "more than the whole file"),
        "huge string array": (_patch(data, strings + 8, "<Q", 1 << 61), "cannot fit"),
        "huge int array": (_patch(data, ints + 8, "<Q", 1 << 61), "cannot fit"),
        "string item past end": (_patch(data, strings + 16, "<Q", len(data)), "runs past the end"),
        "unknown value type": (_patch(data, text, "<I", 99), "unknown value type 99"),
        "unknown array element type": (_patch(data, ints + 4, "<I", 77), "unknown value type 77"),
        "nested array": (_patch(data, ints + 4, "<I", int(V.ARRAY)), "array of arrays"),
        "bad utf-8": (data.replace("héllo".encode(), b"h\xff\xfello"), "not valid UTF-8"),
        "unknown tensor type": (_patch(data, q8 + 4 + 16, "<I", 99), "unknown tensor type id 99"),
        "too many dims": (_patch(data, q8, "<I", 9), "at most 4"),
        "row not a block multiple": (_patch(data, q8 + 4, "<Q", 40), "block size"),
        "tensor past end": (_patch(data, q8 + 4 + 16 + 4, "<Q", 1 << 40), "truncated"),
        "misaligned tensor": (_patch(data, q8 + 4 + 16 + 4, "<Q", 1030), "alignment"),
        "duplicate key": (data.replace(b"test.ints", b"test.flag"), "duplicate metadata key 'test.flag'"),
    }


@pytest.mark.parametrize("case", [
    "magic", "empty", "version 1", "version 9", "big-endian", "truncated header", "truncated kv", "truncated kv key",
    "truncated tensor info", "truncated tensor data", "huge kv count", "huge tensor count", "huge string length",
    "huge key length", "huge string array", "huge int array", "string item past end", "unknown value type",
    "unknown array element type", "nested array", "bad utf-8", "unknown tensor type", "too many dims",
    "row not a block multiple", "tensor past end", "misaligned tensor", "duplicate key",
])
def test_corruption_raises_gguf_error_naming_the_file(tmp_path, small, case):
    data, problem = _cases(small)[case]
    path = tmp_path / f"{case.replace(' ', '_')}.gguf"
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(GGUFError) as err:
        open_gguf(path)
    assert time.perf_counter() - start < 1.0  # nothing sized by a corrupt count was allocated or looped over
    assert err.value.path == str(path) and str(err.value).startswith(f"{path}: ")
    assert problem in err.value.problem, err.value.problem
    assert isinstance(err.value, ValueError)


def test_duplicate_tensor_name(tmp_path):
    path = tmp_path / "dup.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("same", np.zeros((2, 32), np.float32))
    w.add_tensor("samf", np.zeros((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.write_bytes(path.read_bytes().replace(b"samf", b"same"))
    with pytest.raises(GGUFError, match=r"dup\.gguf: duplicate tensor name 'same'"):
        open_gguf(path)


def test_metadata_only_readers_report_header_problems(tmp_path, small):
    for case in ("magic", "truncated kv", "huge kv count", "unknown value type", "version 9"):
        data, problem = _cases(small)[case]
        path = tmp_path / "m.gguf"
        path.write_bytes(data)
        for reader in (read_metadata, read_fields):
            with pytest.raises(GGUFError, match=f"^{path}: ") as err:
                reader(path)
            assert problem in err.value.problem
    with pytest.raises(GGUFError, match="no such file"):
        read_metadata(tmp_path / "missing.gguf")
    with pytest.raises(GGUFError, match="no such file"):
        open_gguf(tmp_path / "missing.gguf")


def test_alignment(tmp_path):
    data = _small_gguf(tmp_path / "a64.gguf", alignment=64)
    g = assert_same_as_reader(tmp_path / "a64.gguf")
    assert g.alignment == 64 and g.data_offset % 64 == 0 and g.metadata["general.alignment"] == 64
    pos = _after(data, "general.alignment")
    for patch, problem in (((pos + 4, "<I", 48), "power of two"), ((pos + 4, "<I", 0), "power of two"),
                           ((pos, "<I", int(V.INT32)), "must be a UINT32")):
        (tmp_path / "bad.gguf").write_bytes(_patch(data, *patch))
        with pytest.raises(GGUFError, match=problem):
            open_gguf(tmp_path / "bad.gguf")


def test_every_truncation_is_a_gguf_error(tmp_path, small):
    path = tmp_path / "cut.gguf"
    path.write_bytes(small)
    g = open_gguf(path)
    data_end = g.data_offset + g.tensors["t.f32"].num_bytes + g.tensors["t.q8"].num_bytes  # then alignment padding
    assert data_end <= len(small)
    # Every cut inside the header and the first tensor bytes, then every 37th (each case costs a file write).
    for n in [*range(g.data_offset + 64), *range(g.data_offset + 64, data_end, 37)]:
        path.write_bytes(small[:n])
        with pytest.raises(GGUFError, match="^" + re.escape(str(path))):
            open_gguf(path)
    path.write_bytes(small[:data_end])  # only the trailing padding cut: still a complete file
    assert open_gguf(path).tensors["t.q8"].raw.tobytes() == g.tensors["t.q8"].raw.tobytes()


def test_random_header_damage_never_escapes_as_another_exception(tmp_path, small):
    rng = random.Random(0)
    path = tmp_path / "flip.gguf"
    end = _header_end(small)
    for _ in range(400):
        data = bytearray(small)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(4, end)] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            open_gguf(path)
        except GGUFError as e:
            assert e.path == str(path)
