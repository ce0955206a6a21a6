"""Random but valid GGML quant blocks (layouts of ggml-common.h / gguf-py `quants.py`) for synthetic weights."""
from __future__ import annotations

import gguf
import numpy as np

T = gguf.GGMLQuantizationType

# Types whose blocks are built here; F32/F16/BF16 are plain casts.
QUANT_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K)
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
SUPPORTED = FLOAT_TYPES + QUANT_TYPES

# Ranges of the integer sub-block scales of the K-quants. Kept small so the fp16 super-block scale `d` stays a
# normal fp16 number (not subnormal) for weight stds down to ~0.005.
_K4_SCALES = (8, 40)     # Q4_K: 6-bit scale per 32 weights
_K5_SCALES = (4, 20)     # Q5_K
_K6_SCALES = (2, 8)      # Q6_K: |int8 scale| per 16 weights; the sign is random


def _random_bytes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    # The bit generator's raw output: ~10x faster than Generator.bytes, which matters for 8B-sized files.
    n = shape[0] * shape[1]
    raw = rng.bit_generator.random_raw(-(-n // 8))
    return raw.view(np.uint8)[:n].reshape(shape)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """(n,) float -> (n, 2) uint8 little-endian fp16."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(-1, 2)


def _uniform_int_moment2(lo: int, hi: int) -> float:
    """E[s^2] for s uniform on the integers lo..hi."""
    s = np.arange(lo, hi + 1, dtype=np.float64)
    return float(np.mean(s * s))


def _var_uniform_int(levels: int) -> float:
    """Variance of a uniform integer on 0..levels-1."""
    return (levels * levels - 1) / 12.0


def _block_d(rng: np.random.Generator, n: int, base: float, random_sign: bool) -> np.ndarray:
    # Per-block jitter in [0.75, 1.25] so blocks differ; E[u^2] = 1 + 0.5^2/12 is divided out by the callers' `base`.
    d = base * rng.uniform(0.75, 1.25, size=n)
    if random_sign:
        # A negative d is valid (ggml's own quantizer writes d = max / -8) and cancels the -0.5 mean of the
        # asymmetric integer ranges of Q8_0/Q4_0/Q5_0.
        d *= rng.choice(np.array([-1.0, 1.0]), size=n)
    return d


_JITTER_M2 = 1.0 + 0.25 / 12.0


def pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and 8 six-bit mins per block, (n, 8) each, into the 12-byte Q4_K/Q5_K `scales` field.

    Inverse of ggml's get_scale_min_k4: bytes 0-3 hold sc[0:4] (low 6 bits) plus the top 2 bits of sc[4:8];
    bytes 4-7 the same for m; bytes 8-11 the low nibbles of sc[4:8] and m[4:8].
    """
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    if np.any(sc > 63) or np.any(m > 63):
        raise ValueError("K-quant scales and mins must fit in 6 bits (0..63)")
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return out


def _legacy_blocks(qtype: T, n: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Q8_0/Q4_0/Q4_1/Q5_0/Q5_1: random quant bits; fp16 d (and m) set so the values have std `scale`, mean 0."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = _random_bytes(rng, (n, type_size))
    levels = {T.Q8_0: 256, T.Q4_0: 16, T.Q4_1: 16, T.Q5_0: 32, T.Q5_1: 32}[qtype]
    base = scale / np.sqrt(_var_uniform_int(levels) * _JITTER_M2)
    has_min = qtype in (T.Q4_1, T.Q5_1)
    d = _block_d(rng, n, base, random_sign=not has_min)
    blocks[:, 0:2] = _fp16_bytes(d)
    if has_min:
        # value = d*q + m with q uniform on 0..levels-1: m = -d*(levels-1)/2 centres it. Round d first so the
        # centring uses the stored fp16 value.
        d16 = d.astype(np.float16).astype(np.float64)
        blocks[:, 2:4] = _fp16_bytes(-d16 * (levels - 1) / 2.0)
    return blocks


def _k_blocks(qtype: T, n: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Q4_K/Q5_K: value = d*sc_j*q - dmin*m_j per 32-weight sub-block j; mins chosen to centre q."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = _random_bytes(rng, (n, type_size))
    levels, (lo, hi) = (16, _K4_SCALES) if qtype == T.Q4_K else (32, _K5_SCALES)
    base = scale / np.sqrt(_var_uniform_int(levels) * _uniform_int_moment2(lo, hi) * _JITTER_M2)
    d = _block_d(rng, n, base, random_sign=False)
    sc = rng.integers(lo, hi + 1, size=(n, 8))
    # With dmin = d*(levels-1)/2 and m_j = sc_j the sub-block is d*sc_j*(q - (levels-1)/2), i.e. zero-mean;
    # a small jitter on m_j keeps the mins random (their means cancel over blocks).
    m = np.clip(sc + rng.integers(-2, 3, size=(n, 8)), 0, 63)
    blocks[:, 0:2] = _fp16_bytes(d)
    blocks[:, 2:4] = _fp16_bytes(d * (levels - 1) / 2.0)
    blocks[:, 4:16] = pack_k_scales(sc, m)
    return blocks


def _q6_k_blocks(n: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Q6_K: ql[128] qh[64] int8 scales[16] d(fp16); value = d*scale_j*(q - 32), q six bits."""
    _, type_size = gguf.GGML_QUANT_SIZES[T.Q6_K]
    blocks = _random_bytes(rng, (n, type_size))
    lo, hi = _K6_SCALES
    base = scale / np.sqrt(_var_uniform_int(64) * _uniform_int_moment2(lo, hi) * _JITTER_M2)
    # Random signs on the sub-block scales cancel the -0.5 mean of (q - 32).
    sc = rng.integers(lo, hi + 1, size=(n, 16)) * rng.choice(np.array([-1, 1]), size=(n, 16))
    blocks[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    blocks[:, 208:210] = _fp16_bytes(_block_d(rng, n, base, random_sign=False))
    return blocks


def random_float_bytes(qtype: T, shape: tuple[int, ...], rng: np.random.Generator, scale: float,
                       mean: float = 0.0) -> np.ndarray:
    """Gaussian values (mean, std `scale`) stored as F32/F16/BF16 bytes, (rows, row_bytes) uint8."""
    x = rng.standard_normal(int(np.prod(shape)), dtype=np.float32)
    x *= np.float32(scale)  # in place: the 8B embedding alone is 2.5 GB in f32
    x += np.float32(mean)
    if qtype == T.F32:
        data = x
    elif qtype == T.F16:
        data = x.astype(np.float16)
    elif qtype == T.BF16:
        # Round to nearest even on the upper 16 bits, as ggml's fp32->bf16 does (gguf.quants is ~10x slower).
        u = x.view(np.uint32)
        data = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    else:
        raise ValueError(f"{qtype.name} is not a float type")
    return np.ascontiguousarray(data).view(np.uint8).reshape(shape[0] if len(shape) > 1 else 1, -1)


def random_quant_bytes(qtype: T, shape: tuple[int, int], rng: np.random.Generator, scale: float) -> np.ndarray:
    """Random weights of std ~`scale` and mean ~0 for a (rows, cols) tensor, as (rows, row_bytes) uint8.

    Every block is valid: finite fp16 scales, 6-bit K-quant scales packed as ggml unpacks them.
    """
    qtype = T(qtype)
    if qtype not in SUPPORTED:
        raise ValueError(f"cannot make random {qtype.name} data; supported: {', '.join(t.name for t in SUPPORTED)}")
    if qtype in FLOAT_TYPES:
        return random_float_bytes(qtype, shape, rng, scale)
    rows, cols = shape
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block_size:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block_size} values, got shape {shape}")
    n = rows * cols // block_size
    if qtype in (T.Q4_K, T.Q5_K):
        blocks = _k_blocks(qtype, n, rng, scale)
    elif qtype == T.Q6_K:
        blocks = _q6_k_blocks(n, rng, scale)
    else:
        blocks = _legacy_blocks(qtype, n, rng, scale)
    return blocks.reshape(rows, cols // block_size * type_size)
