"""Ragged paged attention for decode and verify as a Mosaic GPU kernel (Hopper: TMA copies of whole pages, `wgmma`).

Semantics of `paged_attention_reference` for query runs whose T*G rows fit one 64-row tile (decode: T = 1; verify:
T = 16 with up to 4 query heads per KV head); prefill chunks stay on the portable kernel. Dimensions as in
`ragged_paged_attention`: B slots, T queries per slot, N query heads, K KV heads, G = N // K, H head dim, P pages,
S page size, M max pages per slot.

A program takes one (slot, KV head, key split). Its T*G query rows (padded to 64, the wgmma M side) are copied once
into shared memory: for a verify run (T a multiple of 8) straight from q, one TMA copy per query head (rows g-major),
its partial written back the same way, so no XLA transpose surrounds the kernel; for decode, rows t-major from a
free reshape. The split's pages stream through an `emit_pipeline` of TMA copies, `pages_per_step` pages of K and of
V per step, each page found through the page table (read from GMEM inside the index map). Per page: S = Q K^T
(64 x S, f32) on the tensor cores, the masks of `ragged_paged_attention` (rows past q_len, keys outside
[lo_t, hi_t)), an online softmax in the exp2 domain, and P V with P as the register operand. The pipeline's
length is the split's visible pages, so a short context reads only its own pages. Outputs are the split partials
(acc, m, l), merged in `jax.numpy` as the portable kernel's are.

Runs on the GPU (sm_90) compiled and anywhere in Mosaic GPU's interpret mode (`interpret=True`, CPU tests; there P
is staged through shared memory, since the interpreter's wgmma reads refs only).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.ragged_paged_attention import _LOG2E, _MASK, _merge, _num_sms, _paged_meta

__all__ = ["ragged_paged_attention_mgpu", "mgpu_partials", "pick_splits", "pick_tiles", "supports_mgpu", "ROWS"]

ROWS = 64  # query rows per program: wgmma's M side


def supports_mgpu(t: int, n: int, kv_heads: int, head_dim: int, page_size: int, dtype) -> bool:
    """True for query runs of one 64-row tile (T*G <= 64), head dims 64/128/256, pages of a multiple of 16 keys (a
    bf16 wgmma takes 16 keys at a time), 16-bit inputs."""
    return (t * (n // kv_heads) <= ROWS and head_dim in (64, 128, 256) and page_size % 16 == 0
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def _kernel_call(meta, page_table, q, k_pages, v_pages, *, group: int, splits: int, pages_per_step: int,
                 stages: int, scale_log2: float, direct: bool, interpret: bool,
                 table_tile: tuple[int, int] | None = None, max_pages: int | None = None):
    """q either (B, K, 64, H), rows t-major and padded (`folded`), or q itself (B, T, N, H) with T a multiple of 8
    (`direct`): then the tile's rows are g-major (row r: head g = r // T, query t = r % T), each head's T rows one TMA
    copy straight from q, and the partial acc goes straight to (NS, B, T, N, H), so neither needs an XLA transpose.
    table_tile (R, C): page_table is (B, NS, R, C), each split's entries in row-major order (`split_tables`); a
    program copies its (R, C) tile to shared memory once, and the pipeline's index maps read the entries there
    instead of waiting on a global load before every page copy. Else page_table is (B, M).
    Returns acc (B, K, NS, 64, H) or (NS, B, T, N, H), and m, l (B, K, NS, 64) in the tile's row order."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415  (GPU/interpret only)

    kv_heads = k_pages.shape[2]
    b, h = q.shape[0], q.shape[3]
    t_run = q.shape[1] if direct else None
    num_pages, page_size = k_pages.shape[:2]
    max_pages = max_pages or page_table.shape[1]  # the slot's capacity in pages (the table may be padded)
    pps = pages_per_step
    step_keys = pps * page_size
    steps_per_split = _per_split(max_pages, splits, pps) // pps  # as `split_tables` lays the table out
    swizzle = min(128, h * 2)
    transforms = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))
    # P V contracts over a page's 16 keys, and a wgmma's K step is B's swizzle width: V pages use a 32-byte swizzle.
    v_transforms = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))
    p_transforms = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))

    def kernel(meta_gmem, pt_gmem, q_gmem, k_gmem, v_gmem, o_gmem, m_gmem, l_gmem, q_smem, o_smem, m_smem, l_smem,
               q_barrier, pt_smem=None, pt_barrier=None, p_smem=None):
        bi, ki, si = lax.axis_index("b"), lax.axis_index("k"), lax.axis_index("s")
        q_len, hi_fixed, hi_rel = meta_gmem[bi, 0], meta_gmem[bi, 1], meta_gmem[bi, 2]
        lo_fixed, lo_rel = meta_gmem[bi, 3], meta_gmem[bi, 4]
        if direct:
            for g in range(group):
                plgpu.copy_gmem_to_smem(q_gmem.at[bi, :, ki * group + g], q_smem.at[pl.ds(g * t_run, t_run)],
                                        q_barrier)
        else:
            plgpu.copy_gmem_to_smem(q_gmem.at[bi, ki], q_smem, q_barrier)
        table_base = si * steps_per_split * pps  # the split's first page-table entry
        if pt_smem is not None:
            plgpu.copy_gmem_to_smem(pt_gmem.at[bi, si], pt_smem, pt_barrier)

        # The tile's key range (rows are ordered by t; hi and lo grow with t), in pipeline steps of this split.
        hi_tile = jnp.where(q_len > 0, jnp.minimum(hi_fixed, q_len - 1 + hi_rel), 0)
        lo_tile = jnp.maximum(jnp.maximum(lo_fixed, lo_rel), 0)
        first = jnp.maximum(lo_tile // step_keys, si * steps_per_split)
        last = jnp.minimum((hi_tile + step_keys - 1) // step_keys, (si + 1) * steps_per_split)
        num_steps = jnp.maximum(last - first, 0)

        def page_index(i):
            def index_map(j):
                slot = jnp.minimum((first + j) * pps + i, max_pages - 1)
                if pt_smem is None:
                    entry = pt_gmem[bi, slot]
                else:
                    local = jnp.minimum(jnp.maximum(slot - table_base, 0), steps_per_split * pps - 1)
                    entry = pt_smem[local // table_tile[1], local % table_tile[1]]
                page = jnp.minimum(jnp.maximum(entry, 0), num_pages - 1)
                return page, 0, ki, 0
            return index_map

        wgmma_layout = plgpu.Layout.WGMMA
        rows = plgpu.broadcasted_iota(jnp.int32, (ROWS, page_size), 0, layout=wgmma_layout)
        cols = plgpu.broadcasted_iota(jnp.int32, (ROWS, page_size), 1, layout=wgmma_layout)
        t = rows % t_run if direct else rows // group
        hi_t = jnp.minimum(hi_fixed, t + hi_rel)
        lo_t = jnp.maximum(jnp.maximum(lo_fixed, t + lo_rel), 0)
        row_ok = (t < q_len) & (rows < t_run * group) if direct else t < q_len  # direct: unfilled rows past G*T
        plgpu.barrier_wait(q_barrier)
        if pt_barrier is not None:
            plgpu.barrier_wait(pt_barrier)

        def step(indices, *refs):
            *refs, carry = refs
            k_refs, v_refs = refs[:pps], refs[pps:]
            acc, m, l = carry
            base = (first + indices[0]) * step_keys
            def qk(*acc_refs):  # all the step's pages issued together, waited for once
                for acc_ref, k_ref in zip(acc_refs, k_refs):
                    plgpu.wgmma(acc_ref, q_smem, k_ref.T)
                plgpu.wgmma_wait(0)
                return [acc_ref[...] for acc_ref in acc_refs]
            raw = pl.run_scoped(qk, *[plgpu.ACC((ROWS, page_size), jnp.float32)] * pps)
            scores = []
            for i, s in enumerate(raw):
                kpos = base + i * page_size + cols
                valid = (kpos < hi_t) & (kpos >= lo_t) & row_ok
                scores.append((s * scale_log2, valid))
            m_new = m
            for s, valid in scores:
                m_new = jnp.maximum(m_new, jnp.where(valid, s, _MASK).max(axis=1))
            corr = jnp.exp2(m - m_new)
            l = l * corr
            acc = acc * lax.broadcast_in_dim(corr, acc.shape, [0])
            probs = []
            for s, valid in scores:
                p = jnp.where(valid, jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0])), 0.0)
                l = l + p.sum(axis=1)
                probs.append(p.astype(q.dtype))

            operands = probs
            if p_smem is not None:  # the interpreter's wgmma reads its operands from refs only
                for i, p in enumerate(probs):
                    p_smem[i] = p
                plgpu.commit_smem()
                operands = [p_smem.at[i] for i in range(pps)]

            def pv(acc_ref):
                for i, operand in enumerate(operands):
                    plgpu.wgmma(acc_ref, operand, v_refs[i])
                plgpu.wgmma_wait(0)
                return acc_ref[...]
            acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, h), jnp.float32))
            return acc, m_new, l

        zeros = plgpu.layout_cast(jnp.zeros((ROWS, h), jnp.float32), wgmma_layout)
        m0 = plgpu.layout_cast(jnp.full((ROWS,), _MASK, jnp.float32), wgmma_layout.reduce(1))
        l0 = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), wgmma_layout.reduce(1))
        def spec(i, tr):
            return plgpu.BlockSpec((None, page_size, None, h), page_index(i), transforms=tr)
        acc, m, l = plgpu.emit_pipeline(
            step, grid=(num_steps,), max_concurrent_steps=stages, init_carry=(zeros, m0, l0),
            in_specs=[spec(i, transforms) for i in range(pps)] + [spec(i, v_transforms) for i in range(pps)],
        )(*[k_gmem] * pps, *[v_gmem] * pps)

        o_smem[...] = acc
        m_smem[...] = m
        l_smem[...] = l
        plgpu.commit_smem()
        if direct:
            for g in range(group):
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(g * t_run, t_run)], o_gmem.at[si, bi, :, ki * group + g])
        else:
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[bi, ki, si])
        plgpu.copy_smem_to_gmem(m_smem, m_gmem.at[bi, ki, si])
        plgpu.copy_smem_to_gmem(l_smem, l_gmem.at[bi, ki, si])
        plgpu.wait_smem_to_gmem(0)

    scratch = dict(q_smem=plgpu.SMEM((ROWS, h), q.dtype, transforms=transforms),
                   o_smem=plgpu.SMEM((ROWS, h), jnp.float32), m_smem=plgpu.SMEM((ROWS,), jnp.float32),
                   l_smem=plgpu.SMEM((ROWS,), jnp.float32),
                   q_barrier=plgpu.Barrier(num_arrivals=group if direct else 1))
    if table_tile:
        scratch["pt_smem"] = plgpu.SMEM(table_tile, jnp.int32)
        scratch["pt_barrier"] = plgpu.Barrier(num_arrivals=1)
    if interpret:
        scratch["p_smem"] = plgpu.SMEM((pps, ROWS, page_size), q.dtype, transforms=p_transforms)
    acc_shape = (splits, b, t_run, kv_heads * group, h) if direct else (b, kv_heads, splits, ROWS, h)
    out_type = (jax.ShapeDtypeStruct(acc_shape, jnp.float32),
                jax.ShapeDtypeStruct((b, kv_heads, splits, ROWS), jnp.float32),
                jax.ShapeDtypeStruct((b, kv_heads, splits, ROWS), jnp.float32))
    f = plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=(b, kv_heads, splits),
                     grid_names=("b", "k", "s"), interpret=plgpu.InterpretGPUParams() if interpret else None)
    return f(meta, page_table, q, k_pages, v_pages)


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "pages_per_step", "stages", "interpret",
                                             "table_in_smem"))
def mgpu_partials(q, k_pages, v_pages, page_table, meta, *, scale: float, num_splits: int, pages_per_step: int = 4,
                  stages: int = 2, interpret: bool = False, table_in_smem: bool | None = False):
    """Split partials of the kernel for q (B, T, N, H) and `_paged_meta`-style meta (B, 8): acc (NS, B*T*N, H),
    m, l (NS, B*T*N) f32 in the exp2 domain, rows in q's order (as `ragged_paged_attention._rpa_call` returns).
    table_in_smem: each program copies its split's page-table entries to shared memory first (None: when they
    take at most `TABLE_SMEM_BYTES`). Off by default until it has run on a GPU (CPU-tested: interpret mode and
    the CUDA lowering)."""
    b, t, n, h = q.shape
    kv_heads = k_pages.shape[2]
    group = n // kv_heads
    if not supports_mgpu(t, n, kv_heads, h, k_pages.shape[1], q.dtype):
        raise ValueError(f"Mosaic GPU attention does not take T={t} N={n} K={kv_heads} H={h} "
                         f"page size {k_pages.shape[1]} {q.dtype}; see supports_mgpu()")
    rows = t * group
    direct = t % 8 == 0  # whole 8-row tiles per head (verify); decode's fold is a free reshape anyway
    if direct:
        qk = q
    else:
        qk = q.reshape(b, t, kv_heads, group, h).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, rows, h)
        qk = jnp.pad(qk, ((0, 0), (0, 0), (0, ROWS - rows), (0, 0)))
    page_table = page_table.astype(jnp.int32)
    max_pages = page_table.shape[1]
    tile = split_table_tile(max_pages, num_splits, pages_per_step)
    if table_in_smem is None:
        table_in_smem = tile[0] * tile[1] * 4 <= TABLE_SMEM_BYTES
    if table_in_smem:
        page_table = split_tables(page_table, num_splits, pages_per_step, tile)
    acc, m, l = _kernel_call(meta, page_table, qk, k_pages, v_pages, group=group,
                             splits=num_splits, pages_per_step=pages_per_step, stages=stages,
                             scale_log2=float(scale) * _LOG2E, direct=direct, interpret=interpret,
                             table_tile=tile if table_in_smem else None, max_pages=max_pages)

    def unfold(x):  # (B, K, NS, 64, ...) in the tile's row order -> (NS, B*T*N, ...) in q's
        x = x[:, :, :, :rows]
        if direct:  # rows g-major
            x = x.reshape(b, kv_heads, num_splits, group, t, *x.shape[4:]).swapaxes(3, 4)
        else:
            x = x.reshape(b, kv_heads, num_splits, t, group, *x.shape[4:])
        x = jnp.moveaxis(x, 2, 0).transpose(0, 1, 3, 2, 4, *range(5, x.ndim))
        return x.reshape(num_splits, b * t * n, *x.shape[5:])
    acc = acc.reshape(num_splits, b * t * n, h) if direct else unfold(acc)
    return acc, unfold(m), unfold(l)


_SMEM_BUDGET = 220 * 1024
TABLE_SMEM_BYTES = 16 * 1024  # page-table bytes a program keeps in shared memory (4096 pages: 64K keys a split)


def _per_split(max_pages: int, splits: int, pages_per_step: int) -> int:
    """Page-table entries one split covers (whole pipeline steps)."""
    return -(-(-(-max_pages // pages_per_step)) // splits) * pages_per_step


def split_table_tile(max_pages: int, splits: int, pages_per_step: int) -> tuple[int, int]:
    """(R, C): a split's entries as one TMA tile (at most 256 along each dimension, rows of 16-byte multiples)."""
    per_split = _per_split(max_pages, splits, pages_per_step)
    cols = min(128, -(-per_split // 4) * 4)
    return -(-per_split // cols), cols


def split_tables(page_table, splits: int, pages_per_step: int, tile: tuple[int, int]):
    """(B, M) -> (B, NS, R, C): split s's entries from s * per_split on, zero-padded (padding is never visible)."""
    b, max_pages = page_table.shape
    per_split = _per_split(max_pages, splits, pages_per_step)
    pt = jnp.pad(page_table, ((0, 0), (0, splits * per_split - max_pages))).reshape(b, splits, per_split)
    pt = jnp.pad(pt, ((0, 0), (0, 0), (0, tile[0] * tile[1] - per_split)))
    return pt.reshape(b, splits, *tile)


def pick_tiles(head_dim: int, page_size: int) -> tuple[int, int]:
    """(pages_per_step, stages) that fit shared memory: 2 pages a step (1 at head dim 256), up to 3 steps in
    flight, beside the query tile and the f32 output staging tile. On an H200 (8-32 slots, 32K-128K keys) 2 pages x
    3 stages streamed at 63-70 % of copy bandwidth, 1 x 4 at 57-62 %, 4 x 2 at 42-47 % (BENCHMARKS.md, session 9)."""
    pps = 2 if head_dim <= 128 else 1
    fixed = ROWS * head_dim * (2 + 4) + 2 * ROWS * 4
    per_stage = pps * 2 * page_size * head_dim * 2
    return pps, max(1, min(3, (_SMEM_BUDGET - fixed) // per_stage))


def pick_splits(batch: int, kv_heads: int, max_pages: int, pages_per_step: int, invariant: bool = False,
                num_sms: int | None = None) -> int:
    """Key splits: about two programs per SM, at most one per pipeline step of the slot's capacity. In the
    batch-invariant mode fixed by the capacity alone (each split at least 4 steps), never by B or T."""
    steps = -(-max_pages // pages_per_step)
    if invariant:
        return max(1, min(16, steps // 4))
    return max(1, min(max(1, 2 * (num_sms or _num_sms()) // (batch * kv_heads)), steps))


def ragged_paged_attention_mgpu(q, k_pages, v_pages, page_table, q_lens, kv_lens, *, scale=None,
                                num_splits: int | None = None, pages_per_step: int | None = None,
                                stages: int | None = None, invariant: bool = False, interpret: bool = False,
                                table_in_smem: bool | None = False):
    """`paged_attention_reference`'s semantics for decode / verify runs (`supports_mgpu`). Returns (B, T, N, H).
    invariant: splits fixed by the slot's capacity and summed in a fixed order (the batch-invariant mode)."""
    b, t, n, h = q.shape
    scale = h ** -0.5 if scale is None else scale
    meta = _paged_meta(q_lens, kv_lens, page_table.shape[1] * k_pages.shape[1])
    auto_pps, auto_stages = pick_tiles(h, k_pages.shape[1])
    pages_per_step, stages = pages_per_step or auto_pps, stages or auto_stages
    splits = num_splits or pick_splits(b, k_pages.shape[2], page_table.shape[1], pages_per_step, invariant)
    acc, m, l = mgpu_partials(q, k_pages, v_pages, page_table, meta, scale=scale, num_splits=splits,
                              pages_per_step=pages_per_step, stages=stages, interpret=interpret,
                              table_in_smem=table_in_smem)
    return _merge(acc, m, l, ordered=invariant).astype(q.dtype).reshape(b, t, n, h)
