"""Mosaic GPU kernels lowered once per process, not once per step program.

JAX caches a kernel's lowering only within one program, so an engine's warm-up lowers the same Mosaic kernels again
for every bucket that holds them: a bucket's greedy and full variants, and the decode buckets of 1, 2, 4 and 8 slots
(all padded to 8 rows) run the same products. On the dev CPU the Mosaic lowerings were ~0.3 s per kernel, most of
what a 27B bucket's lowering had left once its layers lowered once (BENCHMARKS.md, session 12).

The cache wraps `jax._src.pallas.mosaic_gpu.lowering.lower_unpipelined_jaxpr_to_module` (the `plgpu.kernel` path,
a private API): keyed by the kernel's printed jaxpr, its argument shapes, grid and compiler parameters; a hit parses
the cached module's bytecode into the program being lowered. Kernels whose jaxpr closes over constants are not
cached (their values are not in the printed jaxpr). `install()` does nothing when that function is missing (another
JAX version) or $DFLASH_KERNEL_LOWERING_CACHE=0.

`install(directory)` also keeps the lowerings on disk, one file per kernel named by a hash of its key and the
jax/jaxlib versions, so a restarted server lowers none of its kernels again: JAX's persistent compilation cache
skips XLA's compile on a restart but not the lowering it keys on, and the Mosaic kernels were most of that."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import tempfile
import threading

from pallas_kernels.invariance import env_flag

stats = {"hits": 0, "misses": 0, "uncached": 0, "disk_hits": 0}  # disk hits are hits too
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


_FORMAT = 1  # of the files below; part of their names
_disk = {"dir": None}


def _file(key) -> str | None:
    if _disk["dir"] is None:
        return None
    import jax  # noqa: PLC0415
    from jax._src.lib import version_str  # noqa: PLC0415

    # Mosaic GPU's own switches ($MOSAIC_GPU_*) may change what it emits, and are not in the key within a process
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("MOSAIC_GPU"))
    digest = hashlib.sha256(repr((_FORMAT, jax.__version__, version_str, env, key)).encode()).hexdigest()
    return os.path.join(_disk["dir"], digest[:40] + ".mosaic")


def _shape(kind: str, shape, dtype):
    import jax  # noqa: PLC0415

    return {"ShapedArray": jax.core.ShapedArray, "ShapeDtypeStruct": jax.ShapeDtypeStruct}[kind](tuple(shape), dtype)


def _shapes(shapes) -> list | None:
    """Abstract arrays as JSON, or None when one is more than its type, shape and dtype rebuild (a sharding other
    than the default one, a weak type): such a lowering stays in memory only."""
    out = [[type(x).__name__, list(x.shape), str(x.dtype)] for x in shapes]
    try:
        same = all(_shape(*o) == x for o, x in zip(out, shapes))
    except (KeyError, TypeError):
        return None
    return out if same else None


def _save(path: str, result, bytecode: bytes) -> None:
    """One file: the result's fields as a JSON line, then the module's bytecode. Written whole or not at all."""
    outs, scratch = _shapes(result.new_out_shapes), _shapes(result.gmem_scratch_shapes)
    if result.profiler_spec is not None or outs is None or scratch is None:
        return
    meta = {"grid": list(result.grid), "block": list(result.block), "new_out_shapes": outs,
            "gmem_scratch_shapes": scratch}
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(meta).encode() + b"\n" + bytecode)
        os.replace(tmp, path)
    except OSError:  # a read-only or full disk costs the next start its lowering, nothing else
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _load(path: str, result_type):
    """(result fields, bytecode) from a `_save` file, or None when it is absent or unreadable."""
    try:
        with open(path, "rb") as f:
            head, bytecode = f.read().split(b"\n", 1)
        meta = json.loads(head)
        shapes = {k: tuple(_shape(*o) for o in meta[k]) for k in ("new_out_shapes", "gmem_scratch_shapes")}
        result = result_type(module=None, grid=tuple(meta["grid"]), block=tuple(meta["block"]), profiler_spec=None,
                             **shapes)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return result, bytecode


def install(directory: str | None = None) -> bool:
    """Wrap the Mosaic GPU lowering with the process-wide cache; True when it is (or already was) in place. With a
    directory, lowerings are also read from and written to it."""
    if env_flag("DFLASH_KERNEL_LOWERING_CACHE") is False:
        return False
    if directory:
        _disk["dir"] = directory
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
        path = _file(key) if hit is None else None
        if path is not None and os.path.exists(path):
            loaded = _load(path, lowering.LoweringResult)
            try:  # bytes a crash or another jaxlib left behind are lowered again, not fatal
                module = loaded and ir.Module.parse(loaded[1], context=ir.Context.current)
            except Exception:  # noqa: BLE001  (MLIR raises its own error types for bad bytecode)
                module = None
            if module is not None:
                with _lock:
                    _cache[key] = loaded
                    stats["disk_hits"] += 1
                    stats["hits"] += 1
                return dataclasses.replace(loaded[0], module=module)
        if hit is None:
            result = original(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params, **kw)
            buf = io.BytesIO()
            result.module.operation.write_bytecode(buf)
            with _lock:  # bytes, not the module: that would keep the whole first program's MLIR context alive
                _cache[key] = (dataclasses.replace(result, module=None), buf.getvalue())
                stats["misses"] += 1
            if path is not None:
                _save(path, result, buf.getvalue())
            return result
        result, bytecode = hit
        with _lock:
            stats["hits"] += 1
        # A module of this program's context: the cached one belongs to the program that first lowered it.
        return dataclasses.replace(result, module=ir.Module.parse(bytecode, context=ir.Context.current))

    cached.dflash_cached = True
    lowering.lower_unpipelined_jaxpr_to_module = cached
    return True
