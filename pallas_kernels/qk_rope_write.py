"""What an attention layer does between its q/k/v product and attention, in one kernel: split the fused product's
row into heads, RMS-normalise q and k per head (Qwen3's q_norm / k_norm; optional), rotate them (NeoX RoPE), and
write k and v into the paged KV cache in place.

XLA runs this as six kernels per layer at one slot (q-norm statistics, q rope, k-norm statistics with the v row, k
rope, two cache updates): ~13 us of a ~113 us Qwen3-8B Q8_0 layer on an H200, one of them a 6 us single-block
reduction (bench/notes_gpu.md session 21, `decode_step.py --hlo-dir`); at 8 slots the same work becomes a transpose
fusion of 8.4 us. Here one program takes up to `HEADS_PER_PROGRAM` heads of one token row: q heads, or KV heads
(their k and v rows). Each row's arithmetic is the same whatever the row count, so the batch-invariant mode holds.

`qk_rope_write_reference` defines the semantics: what `dense.Attention` does without it (`rms_norm_reference` in
the storage dtype, `rope` in f32 rounded back, `kv_cache.write_kv`'s `write_rows`); the kernel is checked against it
on fresh random inputs (tests/test_qk_rope_write.py). The head dim must be a power of two (Triton blocks); head
counts are free.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.add_rms_norm import rms_norm_reference
from pallas_kernels.invariance import env_flag
from pallas_kernels.paged_attention import write_rows


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin (..., H/2) f32 of NeoX RoPE at integer positions (...)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate halves of x (..., heads, H) by cos/sin (..., H/2) in f32, rounded back to x.dtype."""
    h = x.shape[-1]
    cos, sin = cos[..., None, :], sin[..., None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : h // 2], xf[..., h // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def qk_rope_write_reference(qkv, q_w, k_w, cos, sin, dest, k_pages, v_pages, *, num_heads: int, eps: float,
                            invariant: bool = False):
    """qkv (R, (N + 2K) H) -> (q (R, N, H) normed and rotated, k_pages, v_pages with row r's k and v at flat cache
    row dest[r] of (P*S); dest < 0: not written). q_w / k_w (H,) or None (no q/k norm); cos/sin (R, H/2) f32."""
    kv_heads, h = k_pages.shape[-2:]
    r = qkv.shape[0]
    q = qkv[:, : num_heads * h].reshape(r, num_heads, h)
    k = qkv[:, num_heads * h: (num_heads + kv_heads) * h].reshape(r, kv_heads, h)
    v = qkv[:, (num_heads + kv_heads) * h:].reshape(r, kv_heads, h)
    if q_w is not None:
        q = rms_norm_reference(q, q_w, eps, invariant)
        k = rms_norm_reference(k, k_w, eps, invariant)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, write_rows(k_pages, k, dest), write_rows(v_pages, v, dest)


# Heads a program takes (a power of two: Triton blocks). H200, session 24: 128 rows x 40 one-head programs took
# 4.9 us a call in the 8-slot Qwen3-8B spec step, 8 heads 0.07 ms less a step; the 1- and 8-row steps the same
# within noise (Q8_0 one slot 3.539 / 3.540 ms). One count for every row count: a row's bits must not depend on how
# many rows share the call (batch-invariant mode).
HEADS_PER_PROGRAM = 8


def heads_per_program(num_heads: int, kv_heads: int, most: int = HEADS_PER_PROGRAM) -> int:
    """The largest power of two <= most dividing both head counts:
    every program's heads are all q or all KV heads, so no lane is masked for lying past the heads (a masked lane's
    address would repeat a live one's, which the interpreter's masked store, a read-modify-write scatter, does not
    keep apart)."""
    hb = most
    while num_heads % hb or kv_heads % hb:
        hb //= 2
    return hb


def _kernel(qkv_ref, qw_ref, kw_ref, cos_ref, sin_ref, dest_ref, k_in, v_in, q_ref, k_ref, v_ref, *,
            num_heads: int, kv_heads: int, head_dim: int, eps: float, norm: bool, heads: int):
    from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415  (Triton lowering or its interpreter)
    del k_in, v_in  # aliased to k_ref / v_ref
    load, store = pl_triton.load, pl_triton.store
    row, g = pl.program_id(0), pl.program_id(1)
    half = head_dim // 2
    lo = lax.broadcasted_iota(jnp.int32, (1, half), 1)
    # heads g*heads .. g*heads + heads - 1 of the row's q heads then k heads (each (heads, half) tile row one head);
    # the row's head j starts at column j * H, KV head j - N's v row K heads later
    j = g * heads + lax.broadcasted_iota(jnp.int32, (heads, 1), 0)
    is_q = j < num_heads
    col = j * head_dim
    x1 = load(qkv_ref.at[row, col + lo]).astype(jnp.float32)
    x2 = load(qkv_ref.at[row, col + half + lo]).astype(jnp.float32)
    dtype = qkv_ref.dtype
    if norm:
        w1 = jnp.where(is_q, load(qw_ref.at[lo]), load(kw_ref.at[lo])).astype(jnp.float32)
        w2 = jnp.where(is_q, load(qw_ref.at[half + lo]), load(kw_ref.at[half + lo])).astype(jnp.float32)
        ss = jnp.sum(x1 * x1, axis=1, keepdims=True) + jnp.sum(x2 * x2, axis=1, keepdims=True)
        inv = lax.rsqrt(ss / head_dim + eps)
        x1 = (x1 * inv * w1).astype(dtype).astype(jnp.float32)  # the norm's output is stored in the model dtype
        x2 = (x2 * inv * w2).astype(dtype).astype(jnp.float32)
    cos, sin = load(cos_ref.at[row, lo]), load(sin_ref.at[row, lo])
    y1 = (x1 * cos - x2 * sin).astype(dtype)
    y2 = (x2 * cos + x1 * sin).astype(dtype)

    q_mask = jnp.broadcast_to(is_q, (heads, half))
    q_col = jnp.minimum(j, num_heads - 1) * head_dim  # q_ref viewed as (R, N * H)
    store(q_ref.at[row, q_col + lo], y1, mask=q_mask)
    store(q_ref.at[row, q_col + half + lo], y2, mask=q_mask)

    dest = dest_ref[row]
    kv_mask = jnp.broadcast_to(~is_q & (dest >= 0), (heads, half))
    kvh = jnp.clip(j - num_heads, 0, kv_heads - 1)
    at = jnp.maximum(dest, 0) * kv_heads + kvh  # the row of the cache viewed as (P*S*K, H)
    store(k_ref.at[at, lo], y1.astype(k_ref.dtype), mask=kv_mask)
    store(k_ref.at[at, half + lo], y2.astype(k_ref.dtype), mask=kv_mask)
    v_col = (num_heads + kv_heads + kvh) * head_dim
    v1 = load(qkv_ref.at[row, v_col + lo], mask=kv_mask, other=0)
    v2 = load(qkv_ref.at[row, v_col + half + lo], mask=kv_mask, other=0)
    store(v_ref.at[at, lo], v1.astype(v_ref.dtype), mask=kv_mask)
    store(v_ref.at[at, half + lo], v2.astype(v_ref.dtype), mask=kv_mask)


@functools.partial(jax.jit, static_argnames=("num_heads", "eps", "interpret", "most_heads"), donate_argnums=(6, 7))
def qk_rope_write_pallas(qkv, q_w, k_w, cos, sin, dest, k_pages, v_pages, *, num_heads: int, eps: float,
                         interpret: bool = False, most_heads: int | None = None):
    """The kernel, same arguments and results as `qk_rope_write_reference`; k_pages and v_pages are updated in
    place (donated). Grid (R, (N + K) / heads), heads = `heads_per_program` of most_heads, else $DFLASH_QK_HEADS,
    else `HEADS_PER_PROGRAM`: program (r, g) takes row r's q heads, then KV heads, from head g * heads."""
    pages, page_size, kv_heads, h = k_pages.shape
    most = most_heads or int(os.environ.get("DFLASH_QK_HEADS", "") or HEADS_PER_PROGRAM)
    heads = heads_per_program(num_heads, kv_heads, most)
    r = qkv.shape[0]
    norm = q_w is not None
    if not norm:
        q_w = k_w = jnp.zeros((h,), qkv.dtype)
    k_flat = k_pages.reshape(pages * page_size * kv_heads, h)
    v_flat = v_pages.reshape(pages * page_size * kv_heads, h)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))  # noqa: E731  (indexed in the kernel)
    args = [qkv, q_w, k_w, cos, sin, dest.astype(jnp.int32), k_flat, v_flat]
    out_shape = [jax.ShapeDtypeStruct((r, num_heads * h), qkv.dtype),
                 jax.ShapeDtypeStruct(k_flat.shape, k_flat.dtype), jax.ShapeDtypeStruct(v_flat.shape, v_flat.dtype)]
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415  (GPU only)
        compiler_params = pl_triton.CompilerParams(num_warps=max(1, heads // 4), num_stages=1)
    q, k_flat, v_flat = pl.pallas_call(
        functools.partial(_kernel, num_heads=num_heads, kv_heads=kv_heads, head_dim=h, eps=eps, norm=norm,
                          heads=heads),
        grid=(r, (num_heads + kv_heads) // heads), in_specs=[whole(a.shape) for a in args],
        out_specs=[whole(s.shape) for s in out_shape], out_shape=out_shape, input_output_aliases={6: 1, 7: 2},
        interpret=interpret, compiler_params=compiler_params, name="qk_rope_write")(*args)
    return q.reshape(r, num_heads, h), k_flat.reshape(k_pages.shape), v_flat.reshape(v_pages.shape)


def use_kernel(head_dim: int) -> str | None:
    """How `dense.Attention` runs this step: "gpu" (the compiled kernel), "interpret" (tests), or None (the
    reference, XLA's kernels). On a GPU by default with a power-of-two head dim; $DFLASH_FUSED_QK=0 or 1 forces it
    off or on there, =interpret runs the kernel in interpret mode anywhere."""
    env = os.environ.get("DFLASH_FUSED_QK", "").strip().lower()
    if env == "interpret":
        return "interpret"
    if head_dim & (head_dim - 1) or jax.default_backend() != "gpu":
        return None
    forced = env_flag("DFLASH_FUSED_QK")
    return "gpu" if forced is None or forced else None
