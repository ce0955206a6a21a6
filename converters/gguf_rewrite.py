"""Rewrite a GGUF with every tensor dequantized to F32 (same weights, exact-arithmetic reference) or re-quantized to
Q8_0; metadata unchanged."""
from __future__ import annotations

import gguf
import numpy as np

from converters.gguf_file import open_gguf
from converters.tensor_map import dequantize


def write_f32_copy(src: str, dst: str) -> None:
    _rewrite(src, dst, gguf.LlamaFileType.ALL_F32, lambda info: (dequantize(info).astype(np.float32), None))


def write_q8_0_copy(src: str, dst: str) -> None:
    """Every weight matrix re-quantized to Q8_0 by gguf.quants (ggml's own rounding: d = max|w| / 127 per 32
    values), vectors kept F32: a Q8_0 model with the source's weights, as `llama-quantize` would write it."""
    def convert(info):
        w = dequantize(info).astype(np.float32)
        if w.ndim == 2 and w.shape[1] % 32 == 0:
            return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        return w, None

    _rewrite(src, dst, gguf.LlamaFileType.MOSTLY_Q8_0, convert)


def _rewrite(src: str, dst: str, file_type, convert) -> None:
    g = open_gguf(src)
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, g.arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    writer.add_file_type(file_type)
    for name, info in g.tensors.items():
        data, raw_dtype = convert(info)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
