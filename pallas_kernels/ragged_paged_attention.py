"""Ragged paged attention as a portable Pallas kernel (Triton lowering on GPUs, `interpret=True` on CPU), and a
dispatcher that picks it or the `jax.numpy` reference.

Semantics are those of `paged_attention_reference` / `drafter_attention_reference` in `paged_attention.py`.
Dimensions: B slots, T queries per slot, N query heads, K KV heads, G = N // K, H head dim, P pages, S page size,
M max pages per slot.

Kernel layout. GQA is folded into the matrix M dimension: for one (slot, KV head) the G query heads of that KV head
times the T queries form T*G rows (row r is query t = r // G, head g = r % G); a program takes a tile of R rows, so
the K/V block it loads serves all of them. A tile's rows are gathered from q in its own (B, T, N, H) layout and its
results scattered back in that layout: a transpose to (B, K, T*G, H) and back would cost four XLA kernels per layer
(about 0.55 ms of an 8-slot verify step on the 8B shape). Rows of the last tile beyond T*G are masked; their stores
point at a few spare rows past the end of the output, distinct per lane, because the interpreter's masked scatter
writes the old value back and a duplicate index would race with the real row.

The program walks the slot's keys in blocks of BK with an online softmax (flash attention, f32 accumulation, exp2
domain). Keys are gathered through the page table inside the kernel: for a key block the page ids are loaded from
the table (a gather of BK int32, cached), then the K/V rows are gathered from the page pool viewed as (P*S*K, H) (one
contiguous H-row per key). Only the blocks at the edges of a tile's visible range are masked; the blocks every valid
row sees whole run without masks. Grid (B, K, row tiles, splits): with splits > 1 (flash decoding, for decode/verify
where B*K programs would not fill the GPU) each program takes a static share of the key blocks and writes
unnormalised partials (acc, m, l) that are merged in `jax.numpy`.

Each row t of a slot sees keys in [lo_t, hi_t) with
    hi_t = min(hi_fixed, t + hi_rel),  lo_t = max(lo_fixed, t + lo_rel, 0),  and only rows t < q_len are valid.
Causal paged attention: hi_fixed = kv_len, hi_rel = kv_len - q_len + 1, lo = 0.
Drafter context part: hi_fixed = ctx_len, lo_fixed = ctx_len - ctx_window, lo_rel = ctx_len - causal_window + 1.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.invariance import env_flag, is_batch_invariant, ordered_sum
from pallas_kernels.paged_attention import (drafter_attention_chunked, drafter_attention_reference,
                                            paged_attention_chunked, paged_attention_reference)

_MASK = -0.7 * float(np.finfo(np.float32).max)  # finite "minus infinity": exp2(_MASK - _MASK) stays defined
_BIG = 1 << 30
_LOG2E = math.log2(math.e)

__all__ = ["ragged_paged_attention", "drafter_attention", "ragged_paged_attention_pallas",
           "drafter_attention_pallas", "default_impl"]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _triton_load():
    from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415  (portable path only)
    return pl_triton.load


def _triton_store():
    from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415
    return pl_triton.store


def _rpa_kernel(meta_ref, pt_ref, q_ref, k_ref, v_ref, *out_refs, group: int, page_size: int, kv_heads: int,
                rows: int, block_k: int, blocks_per_split: int, num_pages: int, max_pages: int, scale_log2: float,
                split_out: bool, poisoned: bool, q_tokens: int, out_rows: int, ctx_splits: int, block_keys: int,
                block_window: int | None):
    load = _triton_load()
    store = _triton_store()
    if block_keys:  # the drafter's own block keys, (B*T*K, H) each, come after the pool
        kb_ref, vb_ref, *out_refs = out_refs
    if poisoned:  # the aliased poison inputs come first among the outputs' refs; ignore them
        out_refs = out_refs[len(out_refs) // 2:]
    bi = pl.program_id(0)
    kvh = pl.program_id(1)
    qb = pl.program_id(2)
    split = pl.program_id(3)
    q_len = meta_ref[0]
    hi_fixed, hi_rel = meta_ref[1], meta_ref[2]
    lo_fixed, lo_rel = meta_ref[3], meta_ref[4]

    r = qb * rows + lax.broadcasted_iota(jnp.int32, (rows,), 0)
    t = r // group
    row_ok = t < q_len
    in_q = t < q_tokens  # lanes of the last tile past T*G hold no row
    # the row's index in q viewed as (B*T*N, H); spare lanes get distinct rows past the end (stores only)
    q_row = (bi * q_tokens + jnp.minimum(t, q_tokens - 1)) * (kv_heads * group) + kvh * group + r % group
    spare = kv_heads * group * q_tokens * pl.num_programs(0) + r - q_tokens * group
    o_row = jnp.where(in_q, q_row, spare)
    hi_t = jnp.minimum(hi_fixed, t + hi_rel)
    lo_t = jnp.maximum(jnp.maximum(lo_fixed, t + lo_rel), 0)

    # The tile's key range: rows are ordered by t and hi/lo grow with t.
    t_first = (qb * rows) // group
    t_last = jnp.minimum((qb * rows + rows - 1) // group, q_len - 1)
    hi_tile = jnp.where(t_last >= t_first, jnp.minimum(hi_fixed, t_last + hi_rel), 0)
    lo_tile = jnp.maximum(jnp.maximum(lo_fixed, t_first + lo_rel), 0)
    blk_lo = jnp.maximum(lo_tile // block_k, split * blocks_per_split)
    blk_hi = jnp.minimum((hi_tile + block_k - 1) // block_k, (split + 1) * blocks_per_split)

    head_dim = q_ref.shape[-1]
    cols = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
    row_mask = jnp.broadcast_to(in_q[:, None], (rows, head_dim))
    q = load(q_ref.at[q_row[:, None], cols], mask=row_mask, other=0.0)  # (R, H) in the input dtype
    kk = lax.broadcasted_iota(jnp.int32, (block_k,), 0)

    # Blocks that every valid row of the tile sees whole need no masks: all of a long context but its edges. The
    # two bodies run the same arithmetic on visible keys (the masks only select), so a block gives the same bits
    # whichever body takes it, as the batch-invariant mode needs.
    full_lo = jnp.maximum(jnp.maximum(lo_fixed, t_last + lo_rel), 0)
    full_hi = jnp.minimum(hi_fixed, t_first + hi_rel)
    mid_lo = jnp.minimum(jnp.maximum((full_lo + block_k - 1) // block_k, blk_lo), blk_hi)
    mid_hi = jnp.minimum(jnp.maximum(full_hi // block_k, mid_lo), blk_hi)

    def attend(carry, kb, vb, valid):
        """One key block's online-softmax update of (acc, m, l); valid (R, keys), or None: every key visible to
        every row (no masks: the same arithmetic on visible keys, so a block's bits do not depend on the path)."""
        acc, m, l = carry
        s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale_log2
        if valid is None:
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.exp2(s - m_new[:, None])
        else:
            m_new = jnp.maximum(m, jnp.max(jnp.where(valid, s, _MASK), axis=1))
            p = jnp.where(valid, jnp.exp2(s - m_new[:, None]), 0.0)
        corr = jnp.exp2(m - m_new)
        l_new = corr * l + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(vb.dtype), vb, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return corr[:, None] * acc + pv, m_new, l_new

    def block(j, carry, masked: bool):
        kpos = j * block_k + kk  # (BK,) key positions of this block
        page_slot = jnp.minimum(kpos // page_size, max_pages - 1)
        pages = load(pt_ref.at[page_slot])  # (BK,) page id of each key
        pages = jnp.minimum(jnp.maximum(pages, 0), num_pages - 1)
        krow = ((pages * page_size + kpos % page_size) * kv_heads + kvh)[:, None]  # (BK, 1) rows of the (P*S*K, H) pool
        if not masked:
            return attend(carry, load(k_ref.at[krow, cols]), load(v_ref.at[krow, cols]), None)
        kin = (kpos >= lo_tile) & (kpos < hi_tile)
        kmask = jnp.broadcast_to(kin[:, None], (block_k, head_dim))
        kb = load(k_ref.at[krow, cols], mask=kmask, other=0.0)  # (BK, H)
        vb = load(v_ref.at[krow, cols], mask=kmask, other=0.0)
        valid = (kpos[None, :] < hi_t[:, None]) & (kpos[None, :] >= lo_t[:, None]) & row_ok[:, None]
        return attend(carry, kb, vb, valid)

    edge = functools.partial(block, masked=True)
    acc0 = jnp.zeros((rows, head_dim), jnp.float32)
    m0 = jnp.full((rows,), _MASK, jnp.float32)
    l0 = jnp.zeros((rows,), jnp.float32)
    carry = lax.fori_loop(blk_lo, mid_lo, edge, (acc0, m0, l0))
    carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(block, masked=False), carry)
    carry = lax.fori_loop(mid_hi, blk_hi, edge, carry)
    if block_keys:
        # One more split, after the context's (their key blocks end before it): the T block keys, which every query
        # of the block sees (a causal window: those at most block_window - 1 positions before it, none after).
        width = max(16, _next_pow2(block_keys))  # a tensor-core product wants 16 keys at least
        c = lax.broadcasted_iota(jnp.int32, (width,), 0)

        def in_block(_, carry):
            krow = ((bi * q_tokens + jnp.minimum(c, q_tokens - 1)) * kv_heads + kvh)[:, None]
            kmask = jnp.broadcast_to((c < block_keys)[:, None], (width, head_dim))
            kb = load(kb_ref.at[krow, cols], mask=kmask, other=0.0)
            vb = load(vb_ref.at[krow, cols], mask=kmask, other=0.0)
            valid = (c[None, :] < block_keys) & row_ok[:, None]
            if block_window is not None:
                delta = t[:, None] - c[None, :]
                valid &= (delta >= 0) & (delta < block_window)
            return attend(carry, kb, vb, valid)

        carry = lax.fori_loop(0, (split == ctx_splits).astype(jnp.int32), in_block, carry)
    acc, m, l = carry
    # rows past q_len took part in the unmasked blocks: give them what masking everywhere gives (nothing seen)
    acc = jnp.where(row_ok[:, None], acc, 0.0)
    m = jnp.where(row_ok, m, _MASK)
    l = jnp.where(row_ok, l, 0.0)

    if split_out:  # partials (NS * out_rows, H) and (NS * out_rows,): split s owns rows [s*out_rows, (s+1)*out_rows)
        o_ref, m_ref, l_ref = out_refs
        dst = split * out_rows + o_row
        store(o_ref.at[dst[:, None], cols], acc, mask=row_mask)
        store(m_ref.at[dst], m, mask=in_q)
        store(l_ref.at[dst], l, mask=in_q)
    else:
        (o_ref,) = out_refs
        has = l > 0.0
        out = jnp.where(has[:, None], acc / jnp.where(has, l, 1.0)[:, None], 0.0)
        store(o_ref.at[o_row[:, None], cols], out.astype(o_ref.dtype), mask=row_mask)


def _pick_tiles(rows_total: int, head_dim: int, rows: int | None, block_k: int | None):
    if rows is None:
        cap = 64 if head_dim > 128 else 128
        rows = min(max(16, _next_pow2(rows_total)), cap)
    if block_k is None:
        block_k = 32 if head_dim > 128 else 64
    return rows, block_k


def _num_sms() -> int:
    """Streaming multiprocessors of the default device (split heuristic); a small number off GPU (interpret mode)."""
    d = jax.devices()[0]
    if d.platform != "gpu":
        return 2
    return int(getattr(d, "core_count", 0) or 132)


def split_blocks() -> int:
    """Fewest key blocks per flash-decoding split: one, so a slot gets as many splits as key blocks up to
    `_auto_splits`' count. Each split walks its blocks one dependent load after another, so at short contexts few
    long splits wait on latency. H200, Qwen3-8B bf16 at 512 keys, against four blocks: decode (<= 16 rows) one-slot
    step 4.858 -> 4.709 ms, 8 slots 4.929 -> 4.882; verify tiles (session 23) one-slot spec step 6.053 -> 5.848,
    8 slots 7.867 -> 7.814. $DFLASH_RPA_SPLIT_BLOCKS overrides."""
    env = os.environ.get("DFLASH_RPA_SPLIT_BLOCKS", "").strip()
    if env:
        return max(1, int(env))
    return 1


def _auto_splits(units: int, rows_total: int) -> int:
    """Flash-decoding splits for `units` (slot, KV head, row tile) programs. A decode tile (a few rows) streams keys
    and wants about four programs per SM. A verify tile (T*G rows, 64 at Qwen3-8B's 16 x 4) does two products per
    key block and fits about two per SM, so its split count is rounded down to one full wave: on an H200 at 32K keys
    and 8 slots (64 units), verify ran at 79-80 % of copy bandwidth with 4 or 8 splits (one or two full waves) and at
    54-64 % with 5 or 9 (a wave and a bit)."""
    sms = _num_sms()
    if rows_total <= 16:
        return max(1, -(-4 * sms // units))
    return max(2, 2 * sms // units)


def _rpa_call(q, k_pages, v_pages, page_table, meta, *, scale, split_out, num_splits, rows, block_k, num_warps,
              num_stages, interpret, poison, k_block=None, v_block=None, block_window=None):
    """Core pallas_call. q (B, T, N, H). meta (B, 8) int32: q_len, hi_fixed, hi_rel, lo_fixed, lo_rel.
    Returns out (B, T, N, H) in q.dtype (split_out=False) or partials acc (NS, B*T*N, H), m, l (NS, B*T*N) in f32
    (exp2 domain), rows in q's order. k_block / v_block (B, T, K, H): the drafter's block keys, one more split after
    the context's (split_out only), seen by every query of the block or within `block_window` before it."""
    b, t, n, h = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    max_pages = page_table.shape[1]
    group = n // kv_heads
    rows_total = t * group
    rows, block_k = _pick_tiles(rows_total, h, rows, block_k)
    n_qb = -(-rows_total // rows)
    q_rows = b * t * n
    out_rows = q_rows + n_qb * rows - rows_total  # spare rows for the masked lanes of a last, partial tile
    ctx_blocks = -(-(max_pages * page_size) // block_k)
    if num_splits is None:
        if not split_out:
            num_splits = 1
        else:
            units = b * kv_heads * n_qb
            want = _auto_splits(units, rows_total)
            num_splits = max(1, min(want, ctx_blocks // split_blocks() or 1))
    if not split_out:
        assert num_splits == 1 and k_block is None, "normalised output needs one split"
    blocks_per_split = -(-ctx_blocks // num_splits)
    ctx_splits, block_keys = num_splits, 0
    if k_block is not None:
        num_splits, block_keys = num_splits + 1, t

    q_flat = q.reshape(q_rows, h)
    k_flat = k_pages.reshape(num_pages * page_size * kv_heads, h)
    v_flat = v_pages.reshape(num_pages * page_size * kv_heads, h)

    grid = (b, kv_heads, n_qb, num_splits)
    whole = lambda bi, ki, qi, si: (0, 0)  # noqa: E731  (rows are gathered/scattered in the kernel)
    whole1 = lambda bi, ki, qi, si: (0,)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, 8), lambda bi, ki, qi, si: (bi, 0)),
        pl.BlockSpec((None, max_pages), lambda bi, ki, qi, si: (bi, 0)),
        pl.BlockSpec(q_flat.shape, whole),
        pl.BlockSpec(k_flat.shape, whole),
        pl.BlockSpec(v_flat.shape, whole),
    ]
    if split_out:
        out_shape = [jax.ShapeDtypeStruct((num_splits * out_rows, h), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits * out_rows,), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits * out_rows,), jnp.float32)]
        out_specs = [pl.BlockSpec(out_shape[0].shape, whole), pl.BlockSpec(out_shape[1].shape, whole1),
                     pl.BlockSpec(out_shape[2].shape, whole1)]
    else:
        out_shape = [jax.ShapeDtypeStruct((out_rows, h), q.dtype)]
        out_specs = [pl.BlockSpec(out_shape[0].shape, whole)]
    args = [meta, page_table.astype(jnp.int32), q_flat, k_flat, v_flat]
    if block_keys:
        for blk in (k_block, v_block):
            args.append(blk.astype(q.dtype).reshape(b * t * kv_heads, h))
            in_specs.append(pl.BlockSpec(args[-1].shape, whole))
    aliases = {}
    if poison:  # test hook: outputs start as NaN (int outputs none here), so unwritten elements show
        poisons = [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
        for i, (p_arr, spec) in enumerate(zip(poisons, out_specs)):
            aliases[len(args)] = i
            args.append(p_arr)
            in_specs.append(spec)
    kernel = functools.partial(
        _rpa_kernel, group=group, page_size=page_size, kv_heads=kv_heads, rows=rows, block_k=block_k,
        blocks_per_split=blocks_per_split, num_pages=num_pages, max_pages=max_pages,
        scale_log2=float(scale) * _LOG2E, split_out=split_out, poisoned=bool(poison), q_tokens=t,
        out_rows=out_rows, ctx_splits=ctx_splits, block_keys=block_keys, block_window=block_window)
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415
        if num_warps is None:
            num_warps = 4 if rows <= 64 else 8
        compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages or 2)
    outs = pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          input_output_aliases=aliases, interpret=interpret, compiler_params=compiler_params,
                          name="ragged_paged_attention")(*args)
    if not split_out:
        return outs[0][:q_rows].reshape(b, t, n, h)
    acc, m, l = outs
    return (acc.reshape(num_splits, out_rows, h)[:, :q_rows], m.reshape(num_splits, out_rows)[:, :q_rows],
            l.reshape(num_splits, out_rows)[:, :q_rows])


def _merge(acc, m, l, ordered: bool = False):
    """Merge split partials along axis 0: acc (NS, R, H), m/l (NS, R) -> (R, H) f32, zeros where no key was
    visible. ordered: sum the splits in a fixed order (batch-invariant mode)."""
    m_all = jnp.max(m, axis=0, keepdims=True)
    w = jnp.exp2(m - m_all)
    total = ordered_sum if ordered else functools.partial(jnp.sum, axis=0)
    num = total(w[..., None] * acc)
    den = total(w * l)
    has = den > 0.0
    return jnp.where(has[..., None], num / jnp.where(has, den, 1.0)[..., None], 0.0)


def _paged_meta(q_lens, kv_lens, max_keys):
    q_lens = q_lens.astype(jnp.int32)
    kv_lens = kv_lens.astype(jnp.int32)
    z = jnp.zeros_like(q_lens)
    # keys of a slot never lie beyond its page-table capacity (the reference can't see them either)
    hi_fixed = jnp.minimum(kv_lens, max_keys)
    return jnp.stack([q_lens, hi_fixed, kv_lens - q_lens + 1, z, z - _BIG, z, z, z], axis=1)


INVARIANT_ROWS = 16  # query rows per program in the batch-invariant mode, whatever T is


def invariant_splits(max_keys: int, block_k: int) -> int:
    """Key splits of the batch-invariant mode: fixed by the slot's key capacity alone (never by B or T), each split a
    whole number of key blocks, at least four of them."""
    return max(1, min(16, -(-max_keys // block_k) // 4))


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "rows", "block_k", "num_warps", "num_stages",
                                             "interpret", "poison", "invariant"))
def ragged_paged_attention_pallas(q, k_pages, v_pages, page_table, q_lens, kv_lens, *, scale=None,
                                  num_splits=None, rows=None, block_k=None, num_warps=None, num_stages=None,
                                  interpret=False, poison=False, invariant=False):
    """The Pallas kernel for `paged_attention_reference`'s semantics. q (B, T, N, H); k/v_pages (P, S, K, H);
    page_table (B, M); q_lens, kv_lens (B,). Returns (B, T, N, H) in q.dtype; rows t >= q_len are zeros.
    num_splits=None picks flash-decoding splits for short query runs (T*G rows fit one tile) and one split (direct
    normalised output) for prefill chunks. invariant: every query row's result independent of B and T
    (`pallas_kernels.invariance`): fixed row tiles and key splits, split partials summed in a fixed order. A row's
    keys are then visited in the same blocks in the same order whatever tile it shares, and blocks masked for it leave
    its running max, sum and accumulator exactly unchanged."""
    b, t, n, h = q.shape
    kv_heads = k_pages.shape[2]
    scale = h ** -0.5 if scale is None else scale
    max_keys = page_table.shape[1] * k_pages.shape[1]
    meta = _paged_meta(q_lens, kv_lens, max_keys)
    if invariant:
        rows = INVARIANT_ROWS
        _, block_k = _pick_tiles(rows, h, rows, block_k)
        num_splits = invariant_splits(max_keys, block_k)
        outs = _rpa_call(q, k_pages, v_pages, page_table, meta, scale=scale, split_out=True, num_splits=num_splits,
                         rows=rows, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                         interpret=interpret, poison=poison)
        return _merge(*outs, ordered=True).astype(q.dtype).reshape(b, t, n, h)
    rows_r, _ = _pick_tiles(t * (n // kv_heads), h, rows, block_k)
    if num_splits is None:
        split_out = t * (n // kv_heads) <= rows_r  # decode / verify: one row tile per (slot, KV head)
    else:
        split_out = num_splits > 1
    outs = _rpa_call(q, k_pages, v_pages, page_table, meta, scale=scale, split_out=split_out,
                     num_splits=num_splits if split_out else 1, rows=rows, block_k=block_k, num_warps=num_warps,
                     num_stages=num_stages, interpret=interpret, poison=poison)
    if split_out:
        return _merge(*outs).astype(q.dtype).reshape(b, t, n, h)
    return outs


def block_in_kernel_setting() -> bool:
    """The drafter's in-block keys as one more split of the Pallas kernel instead of ~10 XLA kernels a layer
    (einsums, softmax pieces, transposes, concatenations: ~27 us a drafter layer in the 8-slot Qwen3-8B spec step's
    profile). On unless $DFLASH_DRAFTER_BLOCK_IN_KERNEL=0: H200, session 24, 8-slot spec step 7.456 -> 7.381 ms,
    1 slot 5.892 -> 5.851."""
    return env_flag("DFLASH_DRAFTER_BLOCK_IN_KERNEL") is not False


@functools.partial(jax.jit, static_argnames=("ctx_window", "causal_window", "scale", "num_splits", "rows",
                                             "block_k", "num_warps", "num_stages", "interpret", "poison", "mgpu",
                                             "block_in_kernel"))
def drafter_attention_pallas(q, k_block, v_block, k_pages, v_pages, page_table, ctx_lens, ctx_window=None,
                             causal_window=None, *, scale=None, num_splits=None, rows=None, block_k=None,
                             num_warps=None, num_stages=None, interpret=False, poison=False, mgpu=False,
                             block_in_kernel=False):
    """`drafter_attention_reference`'s semantics: the paged context part runs in the Pallas kernel (split partials;
    mgpu: the Mosaic GPU kernel's), the T x T in-block part in jax.numpy, merged by log-sum-exp; block_in_kernel
    (not with mgpu): the in-block part as one more split of the Pallas kernel."""
    b, t, n, h = q.shape
    kv_heads = k_pages.shape[2]
    group = n // kv_heads
    scale = h ** -0.5 if scale is None else scale
    ctx_lens = ctx_lens.astype(jnp.int32)
    z = jnp.zeros_like(ctx_lens)
    max_keys = page_table.shape[1] * k_pages.shape[1]
    lo_fixed = z if ctx_window is None else ctx_lens - ctx_window
    lo_rel = z - _BIG if causal_window is None else ctx_lens - causal_window + 1
    # a causal window also hides context keys "after" the query: none, since all context keys precede the block
    meta = jnp.stack([z + t, jnp.minimum(ctx_lens, max_keys), z + _BIG, lo_fixed, lo_rel, z, z, z], axis=1)
    if mgpu:
        from pallas_kernels import ragged_paged_attention_mgpu as ma  # noqa: PLC0415
        pps, stages = ma.pick_tiles(h, k_pages.shape[1])
        splits = num_splits or ma.pick_splits(b, kv_heads, page_table.shape[1], pps)
        acc, m, l = ma.mgpu_partials(q, k_pages, v_pages, page_table, meta, scale=scale, num_splits=splits,
                                     pages_per_step=pps, stages=stages, interpret=interpret)
    elif block_in_kernel:
        acc, m, l = _rpa_call(q, k_pages, v_pages, page_table, meta, scale=scale, split_out=True,
                              num_splits=num_splits, rows=rows, block_k=block_k, num_warps=num_warps,
                              num_stages=num_stages, interpret=interpret, poison=poison, k_block=k_block,
                              v_block=v_block, block_window=causal_window)
        return _merge(acc, m, l).astype(q.dtype).reshape(b, t, n, h)
    else:
        acc, m, l = _rpa_call(q, k_pages, v_pages, page_table, meta, scale=scale, split_out=True,
                              num_splits=num_splits, rows=rows, block_k=block_k, num_warps=num_warps,
                              num_stages=num_stages, interpret=interpret, poison=poison)
    # In-block part in q's own layout: (B, T, K, G, T keys), same exp2 domain.
    qg = q.reshape(b, t, kv_heads, group, h)
    s = jnp.einsum("btkgh,bckh->btkgc", qg, k_block.astype(q.dtype), preferred_element_type=jnp.float32)
    s = s * (scale * _LOG2E)
    if causal_window is not None:
        delta = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
        vis = ((delta >= 0) & (delta < causal_window))[None, :, None, None, :]
        s = jnp.where(vis, s, _MASK)
    else:
        vis = None
    mb = jnp.max(s, axis=-1)
    pb = jnp.exp2(s - mb[..., None])
    if vis is not None:
        pb = jnp.where(vis, pb, 0.0)
    lb = jnp.sum(pb, axis=-1)
    ob = jnp.einsum("btkgc,bckh->btkgh", pb.astype(v_block.dtype), v_block.astype(q.dtype),
                    preferred_element_type=jnp.float32)
    rows_all = b * t * n
    acc = jnp.concatenate([acc, ob.reshape(1, rows_all, h)], axis=0)
    m = jnp.concatenate([m, mb.reshape(1, rows_all)], axis=0)
    l = jnp.concatenate([l, lb.reshape(1, rows_all)], axis=0)
    return _merge(acc, m, l).astype(q.dtype).reshape(b, t, n, h)


def default_impl() -> str:
    """'pallas' on a GPU backend, else 'chunked' (`paged_attention_chunked`: the reference's semantics at a cost
    that follows the cached length); $DFLASH_ATTENTION_IMPL (reference|chunked|pallas|interpret|mgpu|
    mgpu_interpret) overrides. 'mgpu' (Hopper): the Mosaic GPU kernel of `ragged_paged_attention_mgpu` for decode and
    verify runs, the portable kernel for prefill chunks."""
    env = os.environ.get("DFLASH_ATTENTION_IMPL", "").strip().lower()
    if env and env != "auto":
        return env
    return "pallas" if jax.default_backend() == "gpu" else "chunked"


def _resolve(impl: str) -> str:
    impl = default_impl() if impl == "auto" else impl
    if impl not in ("reference", "chunked", "pallas", "interpret", "mgpu", "mgpu_interpret"):
        raise ValueError(f"unknown attention impl {impl!r}")
    return impl


def _mgpu_takes(impl: str, q, k_pages) -> bool:
    """Whether the Mosaic GPU kernel runs this call (impl mgpu and a decode/verify-sized query run)."""
    if not impl.startswith("mgpu"):
        return False
    from pallas_kernels.ragged_paged_attention_mgpu import supports_mgpu  # noqa: PLC0415
    _, t, n, h = q.shape
    return supports_mgpu(t, n, k_pages.shape[2], h, k_pages.shape[1], q.dtype)


def ragged_paged_attention(q, k_pages, v_pages, page_table, q_lens, kv_lens, *, impl: str = "auto",
                           scale: float | None = None):
    """Drop-in for `paged_attention_reference` (same arguments and result). impl: 'auto' (`default_impl`),
    'reference', 'chunked', 'pallas', 'interpret' (the kernel in Pallas interpret mode: CPU tests only, slow)."""
    impl = _resolve(impl)
    if impl == "reference":
        return paged_attention_reference(q, k_pages, v_pages, page_table, q_lens, kv_lens, scale=scale)
    if impl == "chunked":
        return paged_attention_chunked(q, k_pages, v_pages, page_table, q_lens, kv_lens, scale=scale)
    if _mgpu_takes(impl, q, k_pages):
        from pallas_kernels.ragged_paged_attention_mgpu import ragged_paged_attention_mgpu  # noqa: PLC0415
        return ragged_paged_attention_mgpu(q, k_pages, v_pages, page_table, q_lens, kv_lens, scale=scale,
                                           invariant=is_batch_invariant(), interpret=impl == "mgpu_interpret")
    return ragged_paged_attention_pallas(q, k_pages, v_pages, page_table, q_lens, kv_lens, scale=scale,
                                         interpret=impl.endswith("interpret"), invariant=is_batch_invariant())


def drafter_attention(q, k_block, v_block, k_pages, v_pages, page_table, ctx_lens, ctx_window=None,
                      causal_window=None, *, impl: str = "auto", scale: float | None = None):
    """Drop-in for `drafter_attention_reference`, dispatched like `ragged_paged_attention`."""
    impl = _resolve(impl)
    if impl in ("reference", "chunked"):
        fn = drafter_attention_reference if impl == "reference" else drafter_attention_chunked
        return fn(q, k_block, v_block, k_pages, v_pages, page_table, ctx_lens, ctx_window, causal_window, scale=scale)
    mgpu = _mgpu_takes(impl, q, k_pages)
    return drafter_attention_pallas(q, k_block, v_block, k_pages, v_pages, page_table, ctx_lens, ctx_window,
                                    causal_window, scale=scale, interpret=impl.endswith("interpret"), mgpu=mgpu,
                                    block_in_kernel=not mgpu and block_in_kernel_setting())
