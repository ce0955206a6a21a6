"""Rewrite a GGUF with every tensor dequantized to F32, metadata unchanged: same weights, exact-arithmetic reference."""
from __future__ import annotations

import gguf
import numpy as np

from converters.gguf_file import open_gguf
from converters.tensor_map import dequantize


def write_f32_copy(src: str, dst: str) -> None:
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
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, info in g.tensors.items():
        writer.add_tensor(name, dequantize(info).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
