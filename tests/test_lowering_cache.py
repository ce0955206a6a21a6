"""The process-wide cache of Mosaic GPU kernel lowerings (pallas_kernels/lowering_cache.py), through the real CUDA
lowering on any host: a program that holds an already-lowered kernel gets the kernel a fresh lowering would give."""
import re

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax.experimental.mosaic import gpu as mgpu

from pallas_kernels import lowering_cache
from pallas_kernels.q8_0_matmul_mgpu import pick_q8_mgpu_config, q8_0_matmul_mgpu

_MODULE = re.compile(r'module = "((?:[^"\\]|\\[0-9A-Fa-f]{2})*)"')
_HASH = re.compile(r'kernel_hash = "(?:[^"\\]|\\[0-9A-Fa-f]{2})*"')


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
        data = re.sub(rb"\\([0-9A-Fa-f]{2})", lambda g: bytes([int(g.group(1), 16)]), match.group(1).encode())
        ctx = mlir.make_ir_context()
        mgpu.dialect.register_dialect(ctx)
        ctx.allow_unregistered_dialects = True  # the serialized form's versioned dialect
        asm = ir.Module.parse(data, context=ctx).operation.get_asm(enable_debug_info=False)
        out.append(re.sub(r'mosaic_gpu.dump_basename = "[^"]*"', "", asm))
    return out


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
