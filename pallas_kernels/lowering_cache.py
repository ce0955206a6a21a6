"""Mosaic GPU kernels lowered once per process, not once per step program.

JAX caches a kernel's lowering only within one program, so an engine's warm-up lowers the same Mosaic kernels again
for every bucket that holds them: a bucket's greedy and full variants, and the decode buckets of 1, 2, 4 and 8 slots
(all padded to 8 rows) run the same products. On the dev CPU the Mosaic lowerings were ~0.3 s per kernel, most of
what a 27B bucket's lowering had left once its layers lowered once (BENCHMARKS.md, session 12).

The cache wraps `jax._src.pallas.mosaic_gpu.lowering.lower_unpipelined_jaxpr_to_module` (the `plgpu.kernel` path,
a private API): keyed by the kernel's printed jaxpr, its argument shapes, grid and compiler parameters; a hit parses
the cached module's bytecode into the program being lowered. Kernels whose jaxpr closes over constants are not
cached (their values are not in the printed jaxpr). `install()` does nothing when that function is missing (another
JAX version) or $DFLASH_KERNEL_LOWERING_CACHE=0."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import threading

from pallas_kernels.invariance import env_flag

stats = {"hits": 0, "misses": 0, "uncached": 0}
_cache: dict = {}
_lock = threading.Lock()
_off = threading.local()


@contextlib.contextmanager
def bypassed():
    """Lower without the cache on this thread (tests compare against it)."""
    _off.on = True
    try:
        yield
    finally:
        _off.on = False


def _key(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params):
    if jax_mesh is not None or jaxpr.constvars:
        return None
    return (str(jaxpr), repr(gpu_mesh), tuple(map(str, in_shapes)), tuple(map(str, out_shapes)), repr(params))


def install() -> bool:
    """Wrap the Mosaic GPU lowering with the process-wide cache; True when it is (or already was) in place."""
    if env_flag("DFLASH_KERNEL_LOWERING_CACHE") is False:
        return False
    try:
        from jax._src.pallas.mosaic_gpu import lowering  # noqa: PLC0415
        from jax._src.lib.mlir import ir  # noqa: PLC0415
    except ImportError:
        return False
    original = getattr(lowering, "lower_unpipelined_jaxpr_to_module", None)
    if original is None or not dataclasses.is_dataclass(getattr(lowering, "LoweringResult", None)):
        return False
    if getattr(original, "dflash_cached", False):
        return True

    @functools.wraps(original)
    def cached(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params, **kw):
        key = None if getattr(_off, "on", False) else _key(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params)
        if key is None:
            stats["uncached"] += 1
            return original(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params, **kw)
        with _lock:
            hit = _cache.get(key)
        if hit is None:
            result = original(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params, **kw)
            buf = io.BytesIO()
            result.module.operation.write_bytecode(buf)
            with _lock:  # bytes, not the module: that would keep the whole first program's MLIR context alive
                _cache[key] = (dataclasses.replace(result, module=None), buf.getvalue())
                stats["misses"] += 1
            return result
        result, bytecode = hit
        with _lock:
            stats["hits"] += 1
        # A module of this program's context: the cached one belongs to the program that first lowered it.
        return dataclasses.replace(result, module=ir.Module.parse(bytecode, context=ir.Context.current))

    cached.dflash_cached = True
    lowering.lower_unpipelined_jaxpr_to_module = cached
    return True
