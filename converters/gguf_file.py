"""Opens a GGUF file with a direct parser of the format and turns every way it can be broken into one clear error.

The header, metadata and tensor infos are parsed straight from a read-only mmap; tensor data stays a read-only
`np.memmap` view per tensor. gguf.GGUFReader builds a numpy view for every array element instead and needs ~6 s for
SmolLM2's header and ~20 s for any file with the 151k-token Qwen vocabulary; this parser reads either in well under a
second. Tensor views have the dtypes and shapes GGUFReader's `tensor.data` has, so `gguf.quants.dequantize` works on
them unchanged.

Format (little-endian): magic "GGUF", u32 version (2 or 3), u64 tensor count, u64 KV count; KV pairs (string key,
u32 value type, value); tensor infos (string name, u32 n_dims, u64 dims[n_dims] fastest-varying first, u32 ggml type,
u64 offset); padding to `general.alignment` (default 32); tensor data, each tensor at data start + its offset.
Strings are a u64 byte length then UTF-8 bytes; arrays are a u32 element type, a u64 count, then the elements.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

import gguf
import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT  # 32
MAX_DIMS = 4  # GGML_MAX_DIMS; llama.cpp rejects tensor infos with more

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

V = gguf.GGUFValueType
T = gguf.GGMLQuantizationType
_SCALARS: dict[V, struct.Struct] = {
    V.UINT8: struct.Struct("<B"), V.INT8: struct.Struct("<b"), V.UINT16: struct.Struct("<H"),
    V.INT16: struct.Struct("<h"), V.UINT32: struct.Struct("<I"), V.INT32: struct.Struct("<i"),
    V.FLOAT32: struct.Struct("<f"), V.BOOL: struct.Struct("<?"), V.UINT64: struct.Struct("<Q"),
    V.INT64: struct.Struct("<q"), V.FLOAT64: struct.Struct("<d"),
}
_ARRAY_DTYPES: dict[V, np.dtype] = {t: np.dtype(s.format) for t, s in _SCALARS.items()}
_U32, _U64 = _SCALARS[V.UINT32], _SCALARS[V.UINT64]
_HEADER = struct.Struct("<4sIQQ")
_VALUE_TYPE_IDS = {int(t) for t in V}
_TENSOR_TYPE_IDS = {int(t) for t in T}
# Tensor types GGUFReader exposes as typed arrays of elements; every other type is uint8 (rows, bytes per row).
_ELEMENT_DTYPES: dict[T, np.dtype] = {
    T.F32: np.dtype(np.float32), T.F16: np.dtype(np.float16), T.F64: np.dtype(np.float64), T.I8: np.dtype(np.int8),
    T.I16: np.dtype(np.int16), T.I32: np.dtype(np.int32), T.I64: np.dtype(np.int64),
}
# Smallest possible encodings, to reject counts that cannot fit in the file before allocating anything for them.
_MIN_KV_BYTES = 8 + 4 + 1           # empty key, value type, one-byte scalar
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset


class GGUFError(ValueError):
    """A GGUF file is corrupt, truncated or unsupported. The message always starts with the file path."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class GGUFValue(NamedTuple):
    """One metadata value with its GGUF type, enough to write it back unchanged (GGUFWriter.add_key_value)."""

    value: Any  # str (bytes with raw_strings) | int | float | bool | list of those
    type: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None  # element type of an ARRAY


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols): GGUF's ne reversed, i.e. (out, in) for a weight
    qtype: gguf.GGMLQuantizationType
    raw: np.ndarray  # read-only memory-mapped data: F32/F16/... typed (shape), other types uint8 (rows, bytes/row)

    @property
    def num_bytes(self) -> int:
        return int(self.raw.nbytes)


class _Parser:
    """Sequential reader over the mapped file; every problem raises GGUFError naming the file and the offset."""

    def __init__(self, path: str, buf, raw_strings: bool = False):
        self.path = path
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.raw_strings = raw_strings

    def fail(self, problem: str) -> None:
        raise GGUFError(self.path, problem)

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            self.fail(f"truncated file: {what} at offset {self.pos} needs {n} bytes, "
                      f"only {self.size - self.pos} left (file has {self.size} bytes)")

    def scalar(self, s: struct.Struct, what: str) -> Any:
        self.need(s.size, what)
        (v,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v

    def bytes_(self, what: str) -> bytes:
        at = self.pos
        n = self.scalar(_U64, f"length of {what}")
        left = self.size - self.pos
        if n > left:  # checked before slicing, so a corrupt length never sizes an allocation
            if n > self.size:
                self.fail(f"corrupt {what} at offset {at}: its length field says {n} bytes, more than the whole file "
                          f"({self.size} bytes)")
            self.fail(f"truncated file: {what} at offset {at} is {n} bytes long, only {left} bytes left "
                      f"(file has {self.size} bytes)")
        start = self.pos
        self.pos += n
        return self.buf[start:self.pos]

    def text(self, what: str) -> str:
        data = self.bytes_(what)
        try:
            return str(data, "utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} at offset {self.pos - len(data)} is not valid UTF-8 ({e.reason} at byte {e.start})")

    # ---- header ---------------------------------------------------------------------------------------------------

    def header(self) -> tuple[int, int, int]:
        magic = bytes(self.buf[:4])
        if magic != GGUF_MAGIC:
            self.fail("not a GGUF file (empty file)" if self.size == 0 else
                      f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        self.need(_HEADER.size, "GGUF header (magic, version, tensor count, KV count)")
        _, version, n_tensors, n_kv = _HEADER.unpack_from(self.buf, 0)
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in SUPPORTED_VERSIONS:
                self.fail(f"big-endian GGUF (version {swapped}) is not supported; only little-endian files are")
            hint = " (GGUF v1 is obsolete; re-convert the model)" if version == 1 else ""
            self.fail(f"unsupported GGUF version {version}{hint}; supported: "
                      f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
        self.pos = _HEADER.size
        left = self.size - self.pos
        if n_kv * _MIN_KV_BYTES > left:
            self.fail(f"truncated or corrupt header: {n_kv} metadata entries cannot fit in the {left} bytes after "
                      f"the header")
        if n_tensors * _MIN_TENSOR_INFO_BYTES > left:
            self.fail(f"truncated or corrupt header: {n_tensors} tensor infos cannot fit in the {left} bytes after "
                      f"the header")
        return version, n_tensors, n_kv

    # ---- metadata -------------------------------------------------------------------------------------------------

    def value_type(self, what: str) -> V:
        start = self.pos
        tid = self.scalar(_U32, f"value type of {what}")
        if tid not in _VALUE_TYPE_IDS:
            self.fail(f"{what} has unknown value type {tid} at offset {start} "
                      f"(known: {', '.join(f'{t.value}={t.name}' for t in V)})")
        return V(tid)

    def kv(self) -> tuple[str, GGUFValue]:
        key = self.text("metadata key")
        what = f"metadata key {key!r}"
        vtype = self.value_type(what)
        if vtype == V.STRING:
            value = self.bytes_(f"string value of {what}") if self.raw_strings else self.text(f"string value of {what}")
            return key, GGUFValue(value, vtype)
        if vtype != V.ARRAY:
            return key, GGUFValue(self.scalar(_SCALARS[vtype], f"{vtype.name} value of {what}"), vtype)
        sub = self.value_type(f"array element of {what}")
        count = self.scalar(_U64, f"array length of {what}")
        left = self.size - self.pos
        if sub == V.ARRAY:
            self.fail(f"{what} is an array of arrays, which is not supported")
        if sub == V.STRING:
            if count * 8 > left:
                self.fail(f"truncated or corrupt metadata: {what} declares {count} strings, which cannot fit in the "
                          f"{left} bytes left in the file")
            return key, GGUFValue(self.string_array(count, what), vtype, sub)
        dtype = _ARRAY_DTYPES[sub]
        if count * dtype.itemsize > left:
            self.fail(f"truncated or corrupt metadata: {what} declares {count} {sub.name} items, which cannot fit "
                      f"in the {left} bytes left in the file")
        value = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
        self.pos += count * dtype.itemsize
        return key, GGUFValue(value, vtype, sub)

    def string_array(self, count: int, what: str) -> list:
        # The hot loop for vocabularies (151k tokens + 151k merges): kept free of per-item method calls.
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out: list = [None] * count
        i = 0
        try:
            if self.raw_strings:
                for i in range(count):
                    end = pos + 8 + unpack(buf, pos)[0]
                    if end > size:
                        break
                    out[i] = buf[pos + 8:end]
                    pos = end
                else:
                    i = count
            else:
                for i in range(count):
                    end = pos + 8 + unpack(buf, pos)[0]
                    if end > size:
                        break
                    out[i] = str(buf[pos + 8:end], "utf-8")
                    pos = end
                else:
                    i = count
        except struct.error:
            pass  # length field itself past the end: reported below
        except UnicodeDecodeError as e:
            self.fail(f"item {i} of {what} at offset {pos + 8} is not valid UTF-8 ({e.reason} at byte {e.start})")
        if i < count:
            self.pos = pos
            self.fail(f"truncated file: item {i} of the {count} strings of {what} at offset {pos} runs past the end "
                      f"of the file ({size} bytes)")
        self.pos = pos
        return out

    def metadata(self, n_kv: int) -> dict[str, GGUFValue]:
        fields: dict[str, GGUFValue] = {}
        for _ in range(n_kv):
            start = self.pos
            key, value = self.kv()
            if key in fields:
                self.fail(f"duplicate metadata key {key!r} at offset {start}")
            fields[key] = value
        return fields

    # ---- tensor infos ---------------------------------------------------------------------------------------------

    def tensor_info(self) -> tuple[str, tuple[int, ...], T, int]:
        start = self.pos
        name = self.text("tensor name")
        what = f"tensor {name!r}"
        n_dims = self.scalar(_U32, f"dimension count of {what}")
        if n_dims > MAX_DIMS:
            self.fail(f"{what} has {n_dims} dimensions; GGML allows at most {MAX_DIMS} (corrupt tensor info at "
                      f"offset {start})")
        self.need(8 * n_dims, f"dimensions of {what}")
        ne = struct.unpack_from(f"<{n_dims}Q", self.buf, self.pos)
        self.pos += 8 * n_dims
        if any(d >= 1 << 63 for d in ne):
            self.fail(f"{what} has a negative dimension {list(ne)} (corrupt tensor info at offset {start})")
        type_pos = self.pos
        tid = self.scalar(_U32, f"type of {what}")
        if tid not in _TENSOR_TYPE_IDS:
            self.fail(f"{what} has unknown tensor type id {tid} at offset {type_pos} "
                      f"(not a ggml type known to gguf {_gguf_version()})")
        offset = self.scalar(_U64, f"data offset of {what}")
        return name, ne, T(tid), offset


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # noqa: BLE001 - only decorates a message
        return "(unknown version)"


def _alignment(p: _Parser, fields: dict[str, GGUFValue]) -> int:
    field = fields.get("general.alignment")
    if field is None:
        return DEFAULT_ALIGNMENT
    if field.type != V.UINT32:
        p.fail(f"general.alignment must be a UINT32, found {field.type.name}")
    align = field.value
    if align == 0 or align & (align - 1):
        p.fail(f"general.alignment must be a non-zero power of two, found {align}")
    return align


def _open_map(path: str) -> tuple[Any, Any]:
    """(file, read-only mmap) of path; an empty file maps to b'' (mmap refuses length 0)."""
    if not os.path.isfile(path):
        raise GGUFError(path, "no such file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise GGUFError(path, f"cannot open: {e.strerror or e}") from e
    try:
        if os.fstat(f.fileno()).st_size == 0:
            return f, b""
        return f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        f.close()
        raise GGUFError(path, f"cannot map file: {e}") from e


def read_fields(path: str | os.PathLike, raw_strings: bool = False) -> dict[str, GGUFValue]:
    """Header and metadata only (no tensor infos): key -> GGUFValue(value, type, sub_type).

    raw_strings=True keeps string values (and string array items) as the file's bytes, for copying them verbatim.
    """
    path = str(path)
    f, buf = _open_map(path)
    try:
        p = _Parser(path, buf, raw_strings)
        _version, _n_tensors, n_kv = p.header()
        return p.metadata(n_kv)
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()
        f.close()


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata key -> plain Python value (what GGUFFile(path).metadata holds), without the tensor infos."""
    return {k: v.value for k, v in read_fields(path).items()}


class GGUFFile:
    """Metadata and tensors of one GGUF file; tensors stay memory-mapped until dequantized."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        f, buf = _open_map(self.path)
        try:
            p = _Parser(self.path, buf)
            self.version, n_tensors, n_kv = p.header()
            self.fields: dict[str, GGUFValue] = p.metadata(n_kv)
            infos = []
            names = set()
            for _ in range(n_tensors):
                start = p.pos
                info = p.tensor_info()
                if info[0] in names:
                    p.fail(f"duplicate tensor name {info[0]!r} at offset {start}")
                names.add(info[0])
                infos.append(info)
            self.alignment = _alignment(p, self.fields)
            self.data_offset = -(-p.pos // self.alignment) * self.alignment
            file_size = p.size
        finally:
            if isinstance(buf, mmap.mmap):
                buf.close()
            f.close()
        self.metadata: dict[str, Any] = {k: v.value for k, v in self.fields.items()}
        self.tensors: dict[str, TensorInfo] = {}
        if not infos:
            return
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        for name, ne, qtype, offset in infos:
            self.tensors[name] = self._tensor(data, file_size, name, ne, qtype, offset)

    def _tensor(self, data: np.memmap, file_size: int, name: str, ne: tuple[int, ...], qtype: T,
                offset: int) -> TensorInfo:
        what = f"tensor {name!r}"
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        shape = tuple(reversed(ne))
        numel = 1
        for d in ne:
            numel *= d
        row = ne[0] if ne else 1
        if row % block:
            raise GGUFError(self.path, f"{what} ({qtype.name} {list(shape)}) has rows of {row} elements, not a "
                                       f"multiple of the {qtype.name} block size {block} (corrupt tensor info)")
        if offset % self.alignment:
            raise GGUFError(self.path, f"{what} has data offset {offset}, not a multiple of the alignment "
                                       f"{self.alignment} (corrupt tensor info)")
        n_bytes = numel // block * type_size
        start = self.data_offset + offset
        end = start + n_bytes
        if end > file_size:
            raise GGUFError(self.path, f"truncated file: {what} ({qtype.name} {list(shape)}) needs bytes "
                                       f"{start}..{end}, but the file has only {file_size} bytes")
        dtype = _ELEMENT_DTYPES.get(qtype)
        if dtype is None:  # quantized (and BF16): bytes, one row of blocks per row, as gguf.GGUFReader gives them
            dtype = np.dtype(np.uint8)
            view_shape = (*shape[:-1], shape[-1] // block * type_size) if shape else shape
        else:
            view_shape = shape
        raw = data[start:end].view(dtype).reshape(view_shape)
        return TensorInfo(name, shape, qtype, raw)

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
