"""The process-wide cache of Mosaic GPU kernel lowerings (pallas_kernels/lowering_cache.py), through the real CUDA
lowering on any host: a program that holds an already-lowered kernel gets the kernel a fresh lowering would give."""
import re

import jax
import pytest
import jax.numpy as jnp
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax.experimental.mosaic import gpu as mgpu

from pallas_kernels import lowering_cache
from pallas_kernels.q8_0_matmul_mgpu import pick_q8_mgpu_config, q8_0_matmul_mgpu

# MLIR prints a string attribute's bytes as themselves, \\XX (hex) or \\\\ (a backslash)
_ESCAPE = r'(?:[^"\\]|\\[0-9A-Fa-f]{2}|\\\\)'
_MODULE = re.compile(r'module = "(' + _ESCAPE + r'*)"')
_HASH = re.compile(r'kernel_hash = "' + _ESCAPE + r'*"')


def _lower(fn, m, k=4096, n=4096):
    cfg = pick_q8_mgpu_config(m, k, n, num_sms=132)
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), jnp.int8),
            jax.ShapeDtypeStruct((k // 32, n), jnp.float16))
    return jax.jit(lambda x, q, s: fn(q8_0_matmul_mgpu(x, q, s, config=cfg))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()


def _kernels(text: str) -> list[str]:
    """The Mosaic kernels in a program's custom calls, printed without locations and without the per-process
    counter that names their dump files."""
    out = []
    for match in _MODULE.finditer(text):
        data = re.sub(rb"\\([0-9A-Fa-f]{2}|\\)",
                      lambda g: b"\\" if g.group(1) == b"\\" else bytes([int(g.group(1), 16)]),
                      match.group(1).encode())
        ctx = mlir.make_ir_context()
        mgpu.dialect.register_dialect(ctx)
        ctx.allow_unregistered_dialects = True  # the serialized form's versioned dialect
        asm = ir.Module.parse(data, context=ctx).operation.get_asm(enable_debug_info=False)
        out.append(re.sub(r'mosaic_gpu.dump_basename = "[^"]*"', "", asm))
    return out


@pytest.fixture(autouse=True)
def _memory_only(monkeypatch):
    """An engine warmed up earlier in this process points the cache at the user's directory, where earlier runs
    left kernels (lowered by other processes, so with other source locations): each test here starts with an empty
    cache and no directory (the disk tests set their own)."""
    monkeypatch.setitem(lowering_cache._disk, "dir", None)
    monkeypatch.setattr(lowering_cache, "_cache", {})


def test_second_program_reuses_the_kernel_and_lowers_the_same():
    assert lowering_cache.install()
    _lower(jnp.tanh, 8)  # the kernel lowered (or already cached by an earlier test)
    hits = lowering_cache.stats["hits"]
    cached = _lower(jnp.sin, 8)  # another program, the same kernel
    assert lowering_cache.stats["hits"] == hits + 1
    with lowering_cache.bypassed():
        fresh = _lower(jnp.sin, 8)
    kernels = _kernels(cached)
    assert len(kernels) == 1 and kernels == _kernels(fresh)
    # Outside the kernel's bytes (and their hash) the two programs are the same text.
    assert _HASH.sub("", _MODULE.sub("", cached)) == _HASH.sub("", _MODULE.sub("", fresh))


def test_other_shapes_miss():
    assert lowering_cache.install()
    misses = lowering_cache.stats["misses"]
    small, wide = _lower(jnp.tanh, 8, k=2048), _lower(jnp.tanh, 8, k=2048, n=8192)
    assert lowering_cache.stats["misses"] == misses + 2
    assert _kernels(small) != _kernels(wide) != _kernels(_lower(jnp.tanh, 8))


_POPULATE = """
import sys
import jax, jax.numpy as jnp
from pallas_kernels import lowering_cache
from pallas_kernels.q8_0_matmul_mgpu import pick_q8_mgpu_config, q8_0_matmul_mgpu
assert lowering_cache.install(sys.argv[1])
m, k, n = 16, 1536, 2048
cfg = pick_q8_mgpu_config(m, k, n, num_sms=132)
args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), jnp.int8),
        jax.ShapeDtypeStruct((k // 32, n), jnp.float16))
jax.jit(lambda x, q, s: jnp.tanh(q8_0_matmul_mgpu(x, q, s, config=cfg))).trace(*args).lower(
    lowering_platforms=("cuda",))
assert lowering_cache.stats["misses"] == 1, lowering_cache.stats
"""


def test_a_restarted_process_reads_the_lowering_from_disk(tmp_path, monkeypatch):
    """Another process lowers a kernel into the directory; this one then reads it from there (the key is stable
    across processes) and gets what a fresh lowering gives. A corrupt file is lowered again and rewritten."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", _POPULATE, str(tmp_path)], check=True, cwd=root,
                   env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root})
    files = list(tmp_path.glob("*.mosaic"))
    assert len(files) == 1
    monkeypatch.setitem(lowering_cache._disk, "dir", str(tmp_path))
    monkeypatch.setattr(lowering_cache, "_cache", {})
    assert lowering_cache.install()
    disk = lowering_cache.stats["disk_hits"]
    cached = _lower(jnp.tanh, 16, k=1536, n=2048)
    assert lowering_cache.stats["disk_hits"] == disk + 1
    with lowering_cache.bypassed():
        fresh = _lower(jnp.tanh, 16, k=1536, n=2048)
    assert len(_kernels(cached)) == 1 and _kernels(cached) == _kernels(fresh)

    good = files[0].read_bytes()
    for bad in (b"not a lowering", good.split(b"\n", 1)[0] + b"\nnot bytecode"):
        files[0].write_bytes(bad)
        monkeypatch.setattr(lowering_cache, "_cache", {})
        misses = lowering_cache.stats["misses"]
        assert _kernels(_lower(jnp.tanh, 16, k=1536, n=2048)) == _kernels(fresh)
        assert lowering_cache.stats["misses"] == misses + 1 and files[0].read_bytes() != bad


def test_an_unwritable_directory_costs_only_the_disk_copy(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    monkeypatch.setitem(lowering_cache._disk, "dir", str(blocker / "mosaic"))  # under a file: cannot be created
    monkeypatch.setattr(lowering_cache, "_cache", {})
    assert lowering_cache.install()
    misses = lowering_cache.stats["misses"]
    assert len(_kernels(_lower(jnp.tanh, 8, k=2048))) == 1
    assert lowering_cache.stats["misses"] == misses + 1 and not list(tmp_path.glob("**/*.mosaic"))
