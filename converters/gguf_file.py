"""Opens a GGUF file (memory-mapped via the `gguf` package) and turns every way it can be broken into one clear error."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

GGUF_MAGIC = b"GGUF"

# Quant types we can dequantize; anything else is rejected at open time with this list in the message.
SUPPORTED_TYPES = {
    gguf.GGMLQuantizationType.F32,
    gguf.GGMLQuantizationType.F16,
    gguf.GGMLQuantizationType.BF16,
    gguf.GGMLQuantizationType.Q8_0,
    gguf.GGMLQuantizationType.Q4_0,
    gguf.GGMLQuantizationType.Q4_1,
    gguf.GGMLQuantizationType.Q5_0,
    gguf.GGMLQuantizationType.Q5_1,
    gguf.GGMLQuantizationType.Q4_K,
    gguf.GGMLQuantizationType.Q5_K,
    gguf.GGMLQuantizationType.Q6_K,
}


class GGUFError(ValueError):
    """A GGUF file is corrupt, truncated or unsupported. The message always starts with the file path."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols): GGUF's ne reversed, i.e. (out, in) for a weight
    qtype: gguf.GGMLQuantizationType
    raw: np.ndarray  # memory-mapped bytes (or typed view for F32/F16)

    @property
    def num_bytes(self) -> int:
        return int(self.raw.nbytes)


class GGUFFile:
    """Metadata and tensors of one GGUF file; tensors stay memory-mapped until dequantized."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise GGUFError(path, "no such file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(path, f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, IndexError, OSError, KeyError, TypeError) as e:  # gguf raises these on truncation
            raise GGUFError(path, f"corrupt or truncated GGUF ({type(e).__name__}: {e})") from e
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except (ValueError, IndexError) as e:
                raise GGUFError(path, f"unreadable metadata field {key!r}: {e}") from e
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            qtype = gguf.GGMLQuantizationType(t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorInfo(t.name, shape, qtype, t.data)
        self._check_sizes()

    def _check_sizes(self) -> None:
        file_size = os.path.getsize(self.path)
        for info in self.tensors.values():
            block, type_size = gguf.GGML_QUANT_SIZES[info.qtype]
            numel = int(np.prod(info.shape))
            expected = numel // block * type_size
            if info.raw.nbytes != expected:
                raise GGUFError(self.path, f"tensor {info.name!r} holds {info.raw.nbytes} bytes, "
                                           f"expected {expected} for {info.qtype.name} {info.shape} (truncated file?)")
        if file_size == 0:
            raise GGUFError(self.path, "empty file")

    @property
    def arch(self) -> str:
        return self.require("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(self.path, f"missing metadata key {key!r}")
        return self.metadata[key]

    def arch_key(self, suffix: str, default: Any = None, required: bool = False) -> Any:
        key = f"{self.arch}.{suffix}"
        return self.require(key) if required else self.get(key, default)

    def check_quant_types(self) -> None:
        bad = sorted({f"{t.name} ({t.qtype.name})" for t in self.tensors.values() if t.qtype not in SUPPORTED_TYPES})
        if bad:
            supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
            raise GGUFError(self.path, f"unsupported quant type in tensors {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                                       f"supported: {supported}")


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
