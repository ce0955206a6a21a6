"""The one place where shapes are padded: slot-count and token-count buckets, so serving never compiles after warm-up."""
from __future__ import annotations

import numpy as np


def power_of_two_buckets(max_size: int, min_size: int = 1) -> tuple[int, ...]:
    """min_size, 2*min_size, ... up to and including max_size (max_size itself is always a bucket)."""
    sizes, s = [], min_size
    while s < max_size:
        sizes.append(s)
        s *= 2
    return tuple(sizes + [max_size])


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def pad_rows(a: np.ndarray, rows: int, fill=0, axis: int = 0) -> np.ndarray:
    """Pad `axis` (the first by default) of a to `rows` with `fill`."""
    if a.shape[axis] == rows:
        return a
    shape = list(a.shape)
    shape[axis] = rows - a.shape[axis]
    return np.concatenate([a, np.full(shape, fill, dtype=a.dtype)], axis=axis)
