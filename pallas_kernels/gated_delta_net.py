"""Gated delta rule (Yang et al., "Gated Delta Networks", 2024; the Qwen3-Next / Qwen3.5 linear attention) in pure jnp:
the recurrent form (decode, verify, and the replay that commits a verified prefix) and the chunked parallel form
(prefill chunks), both from a given state; and the recurrent form on a per-slot state pool (`pool_recurrent`,
`pool_replay`) as a Pallas kernel (Triton lowering on GPUs, `interpret=True` on CPU) or its jnp reference.

Per value head, with the state S (Dk, Dv), log decay g, write strength beta, unit-norm k and q scaled by 1/sqrt(Dk):
    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - k_t^T exp(g_t) S_{t-1}))^T,    o_t = S_t^T q_t
A token with g = 0 and beta = 0 leaves S unchanged, which is how padding is masked.

Dimensions: B rows, T tokens, H value heads, Dk key dim, Dv value dim, C chunk.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

CHUNK = 64  # as llama.cpp's chunked form; any size gives the same result up to rounding


def recurrent_step(state, q, k, v, g, beta):
    """One token. state (B, H, Dk, Dv) f32; q, k (B, H, Dk); v (B, H, Dv); g, beta (B, H) -> (state, o (B, H, Dv))."""
    state = state * jnp.exp(g)[..., None, None]
    kv_mem = jnp.einsum("bhkv,bhk->bhv", state, k)
    delta = (v - kv_mem) * beta[..., None]
    state = state + jnp.einsum("bhk,bhv->bhkv", k, delta)
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(state, q, k, v, g, beta):
    """Token by token over T: q, k (B, T, H, Dk); v (B, T, H, Dv); g, beta (B, T, H) -> (state, o (B, T, H, Dv))."""
    def body(s, xs):
        return recurrent_step(s, *xs)

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta))
    state, o = jax.lax.scan(body, state, xs)
    return state, jnp.moveaxis(o, 0, 1)


def _only_first(num_steps, g, beta):
    """Tokens from num_steps (B,) on become no-ops (g = 0, beta = 0)."""
    keep = (jnp.arange(g.shape[1])[None, :] < num_steps[:, None])[..., None]  # (B, T, 1)
    return jnp.where(keep, g, 0.0), jnp.where(keep, beta, 0.0)


def replay(state, k, v, g, beta, num_steps):
    """The state after the first num_steps (B,) tokens only. A fixed-length masked scan, so one compiled step
    serves every acceptance length."""
    g, beta = _only_first(num_steps, g, beta)
    state, _ = recurrent(state, jnp.zeros_like(k), k, v, g, beta)
    return state


def pool_replay(pool, rows, fresh, k, v, g, beta, num_steps, *, impl: str = "auto"):
    """`replay` on the state pool: rows[b] advanced by exactly its first num_steps[b] tokens, in place."""
    g, beta = _only_first(num_steps, g, beta)
    pool, _ = pool_recurrent(pool, rows, fresh, jnp.zeros_like(k), k, v, g, beta, emit=False, impl=impl)
    return pool


def chunked(state, q, k, v, g, beta, chunk: int = CHUNK):
    """The same map as `recurrent`, computed chunk by chunk: inside a chunk the delta rule's triangular system is
    solved at once (WY form), across chunks the state is carried. Tokens past T pad with g = beta = 0 (no-ops)."""
    b, t, h, dk = k.shape
    c = min(chunk, t)
    pad = -t % c
    if pad:
        q, k, v, g, beta = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (q, k, v, g, beta))
    n = (t + pad) // c

    def split(a):  # (B, T, H, ...) -> (N, B, H, C, ...)
        a = a.reshape(b, n, c, h, *a.shape[3:])
        return jnp.moveaxis(jnp.moveaxis(a, 1, 0), 2, 3)

    qs, ks, vs, gs, bs = (split(a) for a in (q, k, v, g, beta))
    lower = jnp.tril(jnp.ones((c, c), bool))
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    eye = jnp.eye(c, dtype=k.dtype)

    def body(s, xs):
        qc, kc, vc, gc, bc = xs  # (B, H, C, D) / (B, H, C)
        gcum = jnp.cumsum(gc, axis=-1)  # (B, H, C)
        diff = gcum[..., :, None] - gcum[..., None, :]
        decay = jnp.where(lower, jnp.exp(jnp.where(lower, diff, 0.0)), 0.0)  # (B, H, C, C): exp(G_i - G_j), j <= i
        kb = kc * bc[..., None]
        # (I + L) W = I with L strictly lower: each token's write corrected for the chunk's earlier writes.
        lmat = jnp.where(strict, jnp.einsum("bhik,bhjk->bhij", kb, kc) * decay, 0.0)
        tmat = jax.lax.linalg.triangular_solve(eye + lmat, jnp.broadcast_to(eye, lmat.shape), left_side=True,
                                               lower=True, unit_diagonal=True)
        u = jnp.einsum("bhij,bhjv->bhiv", tmat, vc * bc[..., None])
        w = jnp.einsum("bhij,bhjk->bhik", tmat, kb * jnp.exp(gcum)[..., None])
        v_new = u - jnp.einsum("bhik,bhkv->bhiv", w, s)
        attn = jnp.where(lower, jnp.einsum("bhik,bhjk->bhij", qc, kc) * decay, 0.0)
        o = jnp.einsum("bhik,bhkv->bhiv", qc * jnp.exp(gcum)[..., None], s) + jnp.einsum("bhij,bhjv->bhiv", attn,
                                                                                         v_new)
        g_last = gcum[..., -1]
        k_decayed = kc * jnp.exp(g_last[..., None] - gcum)[..., None]
        s = s * jnp.exp(g_last)[..., None, None] + jnp.einsum("bhik,bhiv->bhkv", k_decayed, v_new)
        return s, o

    state, o = jax.lax.scan(body, state, (qs, ks, vs, gs, bs))  # o (N, B, H, C, Dv)
    o = jnp.moveaxis(jnp.moveaxis(o, 0, 1), 3, 2).reshape(b, n * c, h, -1)
    return state, o[:, :t]


def causal_conv(conv_state, x, weight, num_valid):
    """Depthwise causal conv over [last K-1 inputs, x] (llama.cpp's ssm_conv), without the activation.

    conv_state (B, K-1, C); x (B, T, C); weight (C, K); num_valid (B,) -> (y (B, T, C), new conv state (B, K-1, C):
    the last K-1 inputs up to and including token num_valid - 1)."""
    full = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)  # (B, K-1+T, C)
    t = x.shape[1]
    y = sum(full[:, j:j + t] * weight[:, j] for j in range(weight.shape[1]))
    return y, conv_window(conv_state, x, num_valid)


def conv_window(conv_state, x, num_valid):
    """The conv state after the first num_valid (B,) tokens of x: the last K-1 inputs of [conv_state, x[:num_valid]]."""
    full = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)
    idx = num_valid[:, None] + jnp.arange(conv_state.shape[1])[None, :]  # (B, K-1) rows of `full`
    return jnp.take_along_axis(full, idx[..., None], axis=1)


# --- Pallas kernel: the recurrent form (decode, verify, replay) ---------------------------------------------------
#
# Value columns of the state are independent in the delta rule (S[:, j] only meets v[j] and o[j]), so a program
# owns one (row, head, value tile): S tile (Dk, BV) stays in registers for all T tokens, read once and written once,
# where the XLA scan reads and writes the whole state every token. Grid (B, H, Dv / BV); T padded to a power of two
# with no-op tokens (g = beta = 0), as Triton wants power-of-two blocks.

def _recurrent_kernel(rows_ref, fresh_ref, pool_ref, q_ref, k_ref, v_ref, g_ref, b_ref, *out_refs, num_tokens: int,
                      block_v: int, write: bool, emit: bool, schedule: str, one_pass: bool):
    # The state tile is read from (and written back to) the slot's row of the pool in place: no gather or scatter of
    # whole states around the kernel. q, k arrive as (Dk, Tp): a token's key is a column load, no transposes.
    cols = pl.ds(pl.program_id(2) * block_v, block_v)
    row, head = rows_ref[0], pl.program_id(1)
    s0 = pool_ref[row, head, :, cols].astype(jnp.float32)  # (Dk, BV)
    s0 = jnp.where(fresh_ref[0] != 0, 0.0, s0)  # a request's first block starts from zero state
    o_ref = out_refs[-1] if emit else None

    def load(t):  # token t's inputs: none depends on the state
        k = k_ref[:, pl.ds(t, 1)].astype(jnp.float32)  # (Dk, 1)
        v = v_ref[pl.ds(t, 1), :].astype(jnp.float32)  # (1, BV)
        decay = jnp.exp(g_ref[pl.ds(t, 1)].astype(jnp.float32))[:, None]  # (1, 1)
        beta = b_ref[pl.ds(t, 1)].astype(jnp.float32)[:, None]
        return k, v, decay, beta, (q_ref[:, pl.ds(t, 1)].astype(jnp.float32) if emit else None)

    def advance(t, s, k, v, decay, beta, q):
        if one_pass:  # both reductions read the state before the token's update: one pass, the chain one shorter
            delta = (v - jnp.sum(s * k, axis=0, keepdims=True) * decay) * beta
            if emit:
                kq = jnp.sum(k * q, axis=0, keepdims=True)  # (1, 1): state-free
                o = jnp.sum(s * q, axis=0, keepdims=True) * decay + delta * kq
                o_ref[pl.ds(t, 1), :] = o.astype(o_ref.dtype)
            return s * decay + k * delta
        s = s * decay
        delta = (v - jnp.sum(s * k, axis=0, keepdims=True)) * beta  # (1, BV)
        s = s + k * delta
        if emit:
            o_ref[pl.ds(t, 1), :] = jnp.sum(s * q, axis=0, keepdims=True).astype(o_ref.dtype)
        return s

    if schedule == "unroll":  # straight-line code: every token's loads can be issued before the first token's math
        s = s0
        for t in range(num_tokens):
            s = advance(t, s, *load(t))
    elif schedule == "prefetch":  # token t + 1's loads issued before token t's arithmetic
        def body(t, carry):
            s, cur = carry[0], carry[1:]
            nxt = load(jnp.minimum(t + 1, num_tokens - 1))
            return (advance(t, s, *cur), *nxt)
        s = jax.lax.fori_loop(0, num_tokens, body, (s0, *load(0)))[0]
    else:
        s = jax.lax.fori_loop(0, num_tokens, lambda t, s: advance(t, s, *load(t)), s0)
    if write:
        out_refs[0][row, head, :, cols] = s


# Value columns per program and warps: 32 x 2 (bench/delta_rule.py, H200, 27B shape, 48 heads of 128, session 12;
# 32 x 4 before session 11, 16 x 2 in it), us per call at 8 slots, 32x2 / 16x2 / 32x4: decode 47.2 / 67.8 / 47.5,
# verify of 16 tokens 164.7 / 184.9 / 309.9, replay 105.0 / 117.0 / 175.6; at 1 slot decode 67.1 / 51.8 / 57.8.
# One tile for every batch: a row's bits must not depend on how many slots share the call.
BLOCK_V, NUM_WARPS = 32, 2
# Token blocks of at least 2: with one token a key column is contiguous, Triton then lays it (and the state product it
# feeds) out differently, and a decode call's reductions round unlike a verify call's (H200, 16 x 2 tiles, session 12:
# a 16-token call missed the bits of 16 one-token calls in one-token blocks, matched them in blocks of 2).
MIN_TOKEN_BLOCK = 2


# Jitted so that a step's 48 identical calls (one per recurrent layer of Qwen3.6-27B) trace and lower one kernel: the
# Triton lowering took 2.2 of a 27B decode bucket's 7.5 s of lowering when each call lowered its own (dev CPU).
@functools.partial(jax.jit, static_argnames=("write", "emit", "block_v", "interpret", "num_warps", "schedule",
                                             "one_pass", "min_token_block"))
def pool_recurrent_pallas(pool, rows, fresh, q, k, v, g, beta, *, write: bool = True, emit: bool = True,
                          block_v: int | None = None, interpret: bool = False, num_warps: int = NUM_WARPS,
                          schedule: str = "loop", one_pass: bool = False, min_token_block: int = MIN_TOKEN_BLOCK):
    """`pool_recurrent` as one Pallas kernel: grid (B, H, Dv / BV), the pool aliased to the updated pool.

    schedule: how the token loop meets the latency of its per-token loads (k, v, q, g, beta do not depend on the
    state, only the arithmetic is serial): 'loop' (a loop, each token's loads then its math), 'prefetch' (token
    t + 1's loads during token t's math), 'unroll' (straight-line code for all T tokens; verify and replay blocks
    are 16). The same arithmetic in every schedule, so the same bits; on an H200 neither beat 'loop' at 8 slots
    (BENCHMARKS.md, session 11).

    one_pass: a token's output as decay * (S q) + delta * (k . q) from the state before its update, so both of its
    reductions over Dk read the same state in one pass (the default reduces the updated state again). Different
    rounding, the same for decode, verify and replay; slower than the default on an H200 (session 11)."""
    if schedule not in ("loop", "prefetch", "unroll"):
        raise ValueError(f"unknown schedule {schedule!r}: loop, prefetch or unroll")
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    tp = max(min_token_block, 1 << max(0, (t - 1).bit_length()))
    bv = block_v or min(dv, BLOCK_V)
    if dv % bv or dk & (dk - 1) or bv & (bv - 1):
        raise ValueError(f"gated delta rule kernel needs power-of-two Dk and value tiles dividing Dv; got Dk {dk}, "
                         f"Dv {dv}, block_v {bv}")

    def heads_first(a):  # (B, T, H, ...) -> (B, H, Tp, ...), padded tokens are no-ops
        a = jnp.moveaxis(a, 2, 1)
        return jnp.pad(a, [(0, 0), (0, 0), (0, tp - t)] + [(0, 0)] * (a.ndim - 3)) if tp != t else a

    qh, kh, vh, gh, bh = (heads_first(a) for a in (q, k, v, g, beta))
    qh, kh = jnp.swapaxes(qh, 2, 3), jnp.swapaxes(kh, 2, 3)  # (B, H, Dk, Tp)
    tok = lambda bi, hi, j: (bi, hi, 0, 0)  # noqa: E731
    whole = pl.BlockSpec(pool.shape, lambda bi, hi, j: (0, 0, 0, 0))
    in_specs = [
        pl.BlockSpec((1,), lambda bi, hi, j: (bi,)),
        pl.BlockSpec((1,), lambda bi, hi, j: (bi,)),
        whole,
        pl.BlockSpec((None, None, dk, tp), tok),
        pl.BlockSpec((None, None, dk, tp), tok),
        pl.BlockSpec((None, None, tp, bv), lambda bi, hi, j: (bi, hi, 0, j)),
        pl.BlockSpec((None, None, tp), lambda bi, hi, j: (bi, hi, 0)),
        pl.BlockSpec((None, None, tp), lambda bi, hi, j: (bi, hi, 0)),
    ]
    out_specs, out_shape = [], []
    if write:
        out_specs.append(whole)
        out_shape.append(jax.ShapeDtypeStruct(pool.shape, pool.dtype))
    if emit:
        out_specs.append(pl.BlockSpec((None, None, tp, bv), lambda bi, hi, j: (bi, hi, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, tp, dv), v.dtype))
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415
        compiler_params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)
    outs = pl.pallas_call(
        functools.partial(_recurrent_kernel, num_tokens=t, block_v=bv, write=write, emit=emit, schedule=schedule,
                          one_pass=one_pass),
        grid=(b, h, dv // bv),
        in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, input_output_aliases={2: 0} if write else {},
        interpret=interpret, compiler_params=compiler_params, name="gated_delta_rule_recurrent",
    )(rows.astype(jnp.int32), fresh.astype(jnp.int32), pool, qh, kh, vh, gh, bh)
    new_pool = outs[0] if write else pool
    o = jnp.moveaxis(outs[-1][:, :, :t], 1, 2) if emit else None
    return new_pool, o


def recurrent_pallas(state, q, k, v, g, beta, *, block_v: int | None = None, interpret: bool = False,
                     num_warps: int = NUM_WARPS):
    """Same map as `recurrent` (same arguments and results), as one Pallas kernel (the pool form, row b = state b)."""
    b = k.shape[0]
    rows = jnp.arange(b, dtype=jnp.int32)
    return pool_recurrent_pallas(state.astype(jnp.float32), rows, jnp.zeros((b,), jnp.int32), q, k, v, g, beta,
                                 block_v=block_v, interpret=interpret, num_warps=num_warps)


def read_rows(pool, rows, fresh):
    """Rows `rows` of a per-slot pool (state or conv window), zeros where `fresh` (a request's first block)."""
    return jnp.where(fresh.reshape(-1, *(1,) * (pool.ndim - 1)), 0.0, pool[rows])


def pool_recurrent_reference(pool, rows, fresh, q, k, v, g, beta, *, write: bool = True, emit: bool = True):
    s0 = read_rows(pool, rows, fresh)
    s1, o = recurrent(s0, q, k, v, g, beta)
    return (pool.at[rows].set(s1) if write else pool), (o if emit else None)


def default_impl() -> str:
    """'pallas' on a GPU backend, else 'reference'; $DFLASH_GDN_IMPL (reference|pallas|interpret) overrides. On an
    H200 the kernel makes the Qwen3.6-27B (Q8_0) DFlash step 21.6 ms against the XLA scan's 37.5 ms at one slot
    (plain decode 14.6 vs 14.4 ms), see BENCHMARKS.md, session 10."""
    env = os.environ.get("DFLASH_GDN_IMPL", "").strip().lower()
    if env and env != "auto":
        return env
    return "pallas" if jax.default_backend() == "gpu" else "reference"


def _resolve(impl: str) -> str:
    impl = default_impl() if impl == "auto" else impl
    if impl not in ("reference", "pallas", "interpret"):
        raise ValueError(f"unknown gated delta rule impl {impl!r}")
    return impl


def pool_recurrent(pool, rows, fresh, q, k, v, g, beta, *, write: bool = True, emit: bool = True,
                   impl: str = "auto"):
    """The recurrent form on a per-slot state pool: row rows[b] (zeros where fresh[b]) advanced by row b's tokens.

    pool (R, H, Dk, Dv) f32; rows, fresh (B,). Returns (the pool with the advanced rows written back if `write`,
    else unchanged; o (B, T, H, Dv) if `emit`, else None). Decode writes and emits, a verify only emits, the commit's
    replay only writes. Rows must be distinct except rows that nobody reads (padding)."""
    impl = _resolve(impl)
    if impl == "reference":
        return pool_recurrent_reference(pool, rows, fresh, q, k, v, g, beta, write=write, emit=emit)
    return pool_recurrent_pallas(pool, rows, fresh, q, k, v, g, beta, write=write, emit=emit,
                                 interpret=impl == "interpret")
