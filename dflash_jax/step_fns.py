"""The jitted device steps: a plain step (prefill chunk or one decode token per slot), the fused DFlash step
(draft a block, verify it with the target, accept, commit) for every speculating slot at once, and a draft-only
step (the adaptive policy's probe of the acceptance length while it decodes plainly).

Every step leaves each slot's newest token and cache length on the device (`SlotRows`), and a decoding row can
take them from there (`chained`) instead of from the host: the engine launches step k+1 before it has read step k's
output, so the host's bookkeeping of step k overlaps the device's work on step k+1.

Dimensions: B slots in the bucket, T tokens per slot (block size in the spec step), V vocab, D hidden,
R = num_slots + 1 rows of per-slot device state (the last row belongs to padding).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from dflash_jax.kv_cache import AttentionMeta, KVCache, token_positions
from dflash_jax.sampling import SampleOutput, SamplingArrays, argmax, sample
from dflash_jax.speculative import accept_lengths
from pallas_kernels.invariance import batch_invariant, prefill_phase
from pallas_kernels.invariance import q8_prescale as q8_prescale_ctx  # the name q8_prescale is CompiledSteps' argument


@jax.tree_util.register_dataclass
@dataclass
class SlotRows:
    """Per-slot device state, one row per slot plus the padding row."""
    counts: jax.Array  # (R, V) i32: tokens generated so far (penalties)
    last: jax.Array  # (R,) i32: the newest sampled token, not yet in the cache
    cached: jax.Array  # (R,) i32: tokens in the KV cache

    @classmethod
    def create(cls, num_rows: int, vocab_size: int) -> "SlotRows":
        return cls(jnp.zeros((num_rows, vocab_size), jnp.int32), jnp.zeros((num_rows,), jnp.int32),
                   jnp.zeros((num_rows,), jnp.int32))


@jax.tree_util.register_dataclass
@dataclass
class StepInputs:
    tokens: jax.Array  # (B, T) i32
    meta: AttentionMeta
    slot_ids: jax.Array  # (B,) i32, padding rows point at the last row of `rows`
    is_first: jax.Array  # (B,) bool: first chunk of a new request (its penalty counts restart)
    sampling: SamplingArrays
    # (B,) bool: decode rows whose token and cache length come from SlotRows (tokens[:, 0] and kv_lens ignored)
    chained: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclass
class SpecInputs:
    last_tokens: jax.Array  # (B,) i32: each slot's newest token, not yet in the cache
    meta: AttentionMeta  # q_lens = T for live rows (0 for padding), kv_lens = cached length + T
    sampling: SamplingArrays
    injected: jax.Array  # (B, T-1) i32: drafts to verify instead of the drafter's, where use_injected
    use_injected: jax.Array  # (B,) bool
    chained: jax.Array | None = None  # (B,) bool: last token and cached length come from SlotRows


@jax.tree_util.register_dataclass
@dataclass
class SpecOutput:
    tokens: jax.Array  # (B, T) i32: target choice at each block position; the first accepted+1 are emitted
    accepted: jax.Array  # (B,) i32: drafts accepted (0 .. T-1)
    logprobs: jax.Array  # (B, T) f32
    top_ids: jax.Array  # (B, T, MAX_TOP_LOGPROBS) i32
    top_logprobs: jax.Array  # (B, T, MAX_TOP_LOGPROBS) f32
    drafts: jax.Array  # (B, T-1) i32: the drafts verified (not fetched by the engine)


def _chain(rows: SlotRows, slot_ids: jax.Array, chained: jax.Array | None, first: jax.Array,
           meta: AttentionMeta) -> tuple[jax.Array, AttentionMeta]:
    """The first token and kv lengths of each row: from the host, or from the device rows where chained."""
    if chained is None:
        return first, meta
    first = jnp.where(chained, rows.last[slot_ids], first)
    kv_lens = jnp.where(chained, rows.cached[slot_ids] + meta.q_lens, meta.kv_lens)
    return first, dataclasses.replace(meta, kv_lens=kv_lens)


def _model_step(graphdef: nnx.GraphDef, drafter_graphdef, taps: tuple[int, ...], state: nnx.State, drafter_state,
               cache: KVCache, dcache: KVCache | None, rows: SlotRows, inputs: StepInputs,
               full: bool = True) -> tuple[KVCache, KVCache | None, SlotRows, SampleOutput]:
    """Prefill chunk or plain decode. With a drafter, the tap features of every token written here also go into the
    drafter's context cache. full: static, see `sampling.sample`."""
    first, meta = _chain(rows, inputs.slot_ids, inputs.chained, inputs.tokens[:, 0], inputs.meta)
    inputs = dataclasses.replace(inputs, tokens=inputs.tokens.at[:, 0].set(first), meta=meta)
    model = nnx.merge(graphdef, state)
    hidden, cache, feats = model(inputs.tokens, inputs.meta, cache, taps)
    if drafter_graphdef is not None:
        drafter = nnx.merge(drafter_graphdef, drafter_state)
        positions, valid = token_positions(inputs.meta, inputs.tokens.shape[1])
        dcache = drafter.write_context(feats, inputs.meta, positions, valid, dcache)
    last = jnp.maximum(inputs.meta.q_lens - 1, 0)
    h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # (B, D)
    logits = model.logits(h_last)
    sid = inputs.slot_ids
    counts = jnp.where(inputs.is_first[:, None], 0, rows.counts[sid])  # (B, V)
    out = sample(logits, counts, inputs.sampling, positions=inputs.meta.kv_lens, full=full)
    counts = counts.at[jnp.arange(counts.shape[0]), out.tokens].add(1)
    rows = SlotRows(rows.counts.at[sid].set(counts), rows.last.at[sid].set(out.tokens),
                    rows.cached.at[sid].set(inputs.meta.kv_lens))
    return cache, dcache, rows, out


def _draft(model, drafter, mask_token_id: int, ctx_window: int | None, last_tokens: jax.Array, cached: jax.Array,
           page_table: jax.Array, dcache: KVCache, t: int) -> jax.Array:
    """(B, T-1) drafts: [last token, MASK ...] through the drafter, the target's LM head (or the drafter's draft
    vocabulary head), argmax (even when sampling: independently sampled block positions ruin acceptance)."""
    b = last_tokens.shape[0]
    block = jnp.concatenate([last_tokens[:, None], jnp.full((b, t - 1), mask_token_id, jnp.int32)], axis=1)
    h = drafter(jnp.take(model.embed_tokens[...], block, axis=0), cached, page_table, dcache, ctx_window)
    if drafter.draft_head is not None:  # the drafter's own head: a draft vocabulary's, or an fp8 copy (`for_serving`)
        return jnp.take(drafter.draft_ids[...], argmax(drafter.draft_head(h[:, 1:]).astype(jnp.float32)))
    return argmax(model.logits(h[:, 1:]))


def _draft_step(graphdef: nnx.GraphDef, drafter_graphdef, mask_token_id: int, ctx_window: int | None,
                state: nnx.State, drafter_state, dcache: KVCache, rows: SlotRows, inputs: SpecInputs) -> jax.Array:
    """The drafts a spec step would verify for these rows, and nothing else: the adaptive policy's shadow probe
    compares them with the tokens plain decoding then produces (`spec_state.Shadow`). Reads, writes nothing."""
    last, meta = _chain(rows, inputs.meta.slot_ids, inputs.chained, inputs.last_tokens, inputs.meta)
    return _draft(nnx.merge(graphdef, state), nnx.merge(drafter_graphdef, drafter_state), mask_token_id, ctx_window,
                  last, meta.kv_lens - meta.q_lens, meta.page_table, dcache, inputs.injected.shape[1] + 1)


def _spec_step(graphdef: nnx.GraphDef, drafter_graphdef, taps: tuple[int, ...], mask_token_id: int,
              ctx_window: int | None, state: nnx.State, drafter_state, cache: KVCache, dcache: KVCache,
              rows: SlotRows, inputs: SpecInputs, full: bool = True) -> tuple[KVCache, KVCache, SlotRows, SpecOutput]:
    last, meta = _chain(rows, inputs.meta.slot_ids, inputs.chained, inputs.last_tokens, inputs.meta)
    inputs = dataclasses.replace(inputs, last_tokens=last, meta=meta)
    model = nnx.merge(graphdef, state)
    drafter = nnx.merge(drafter_graphdef, drafter_state)
    b, t = inputs.injected.shape[0], inputs.injected.shape[1] + 1
    cached = inputs.meta.kv_lens - inputs.meta.q_lens  # (B,) committed length; the block starts there

    drafts = _draft(model, drafter, mask_token_id, ctx_window, inputs.last_tokens, cached, inputs.meta.page_table,
                    dcache, t)
    drafts = jnp.where(inputs.use_injected[:, None], inputs.injected, drafts)

    # Verify: the target over [last, d_1 .. d_{T-1}] at positions cached .. cached + T - 1, causal. A hybrid target
    # leaves its recurrent state untouched here and returns the block's delta-rule inputs for the commit below.
    verify_tokens = jnp.concatenate([inputs.last_tokens[:, None], drafts], axis=1)
    is_hybrid = getattr(model, "is_hybrid", False)
    if is_hybrid:
        hidden, cache, feats, pending = model.verify(verify_tokens, inputs.meta, cache, taps)
    else:
        hidden, cache, feats = model(verify_tokens, inputs.meta, cache, taps)
    logits = model.logits(hidden)  # (B, T, V)
    per_pos = jax.tree.map(lambda a: jnp.repeat(a, t, axis=0), inputs.sampling)
    positions = (cached[:, None] + 1 + jnp.arange(t)[None, :]).reshape(-1)  # position of each chosen token
    out = sample(logits.reshape(b * t, -1), None, per_pos, positions, full=full)
    choice = out.tokens.reshape(b, t)
    accepted = accept_lengths(drafts, choice)
    if is_hybrid:  # rollback = commit exactly last + accepted drafts, by replay, per slot, inside this jit
        cache = model.commit(cache, pending, inputs.meta, accepted + 1)

    # Commit: the drafter's context gains the features of the tokens now in the cache (last + accepted drafts).
    tok_pos, valid = token_positions(inputs.meta, t)
    valid &= jnp.arange(t)[None, :] <= accepted[:, None]
    dcache = drafter.write_context(feats, inputs.meta, tok_pos, valid, dcache)
    sid = inputs.meta.slot_ids
    live = inputs.meta.q_lens > 0
    nxt = jnp.take_along_axis(choice, accepted[:, None], axis=1)[:, 0]
    rows = dataclasses.replace(rows, last=rows.last.at[sid].set(nxt),
                               cached=rows.cached.at[sid].set(jnp.where(live, cached + accepted + 1, cached)))
    k = out.top_ids.shape[-1]
    return cache, dcache, rows, SpecOutput(choice, accepted, out.logprobs.reshape(b, t), out.top_ids.reshape(b, t, k),
                                           out.top_logprobs.reshape(b, t, k), drafts)


model_step = jax.jit(_model_step, static_argnums=(0, 1, 2), static_argnames=("full",), donate_argnums=(5, 6, 7))
spec_step = jax.jit(_spec_step, static_argnums=(0, 1, 2, 3, 4), static_argnames=("full",), donate_argnums=(7, 8, 9))


# H200, Qwen3-8B bf16 with a 5-layer drafter (session 23, one process per setting): with XLA's Triton products off,
# spec steps of 4 x 16 = 64 verify rows took 6.685-6.788 ms against 6.986, of 8 x 16 rows 7.511-7.697 against
# 7.720-7.747 (cuBLAS streams those rows faster); the 1-slot spec step (16 rows) lost (6.217 against 5.859 ms) and so
# did plain steps (8 slots 4.979 against 4.752). Without autotuning too (cuBLAS's own heuristic picks: session 25, two
# rounds, tok/s at tau 1 at 4 / 8 / 16 slots 617-619 / 1114-1116 / 1616-1619 -> 630-632 / 1129-1133 / 1613-1614): the
# 8-slot step's down_proj took a 64x64 tile with the residual add in its epilogue and no split-K reduce, the LM heads
# wider tiles, 563 -> 519 kernels a step; compiles skip the autotuner too.
WIDE_VERIFY_ROWS = 64
WIDE_SPEC_OPTIONS = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0}


def _parse_options(text: str) -> dict:
    opts = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        low = value.strip().lower()
        opts[name.strip()] = low == "true" if low in ("true", "false") else int(low) if low.lstrip("-").isdigit() \
            else value.strip()
    return opts


def step_compiler_options(kind: str = "plain", rows: int = 0, invariant: bool = False) -> dict | None:
    """XLA options for one step kind: spec steps of at least `WIDE_VERIFY_ROWS` verify rows (slots x block) on a
    GPU outside the batch-invariant mode (whose products are kernels, not XLA's) run without XLA's Triton products and
    without autotuning (`WIDE_SPEC_OPTIONS`).
    $DFLASH_XLA_STEP_OPTIONS ("name=value,...": true/false and integers parsed) replaces the choice for every step,
    $DFLASH_WIDE_SPEC_OPTIONS for the wide spec steps alone (A/B runs)."""
    text = os.environ.get("DFLASH_XLA_STEP_OPTIONS", "").strip()
    if text:
        return _parse_options(text)
    wide = kind == "spec" and rows >= WIDE_VERIFY_ROWS and not invariant and jax.default_backend() == "gpu"
    if not wide:
        return None
    text = os.environ.get("DFLASH_WIDE_SPEC_OPTIONS", "").strip()
    return _parse_options(text) if text else dict(WIDE_SPEC_OPTIONS)


class CompiledSteps:
    """The two steps with everything static closed over, and weights passed as flat leaf lists: hashing a GraphDef
    and flattening an nnx.State on every call cost 3.5-6 ms of host time per step (measured on an H200 host)."""

    def __init__(self, graphdef, state, drafter_graphdef=None, drafter_state=None, taps=(), mask_token_id=0,
                 ctx_window=None, invariant: bool = False, q8_prescale: bool | None = None):
        """invariant: trace under the batch-invariant mode; q8_prescale: the Q8_0 numerics of decode and verify
        rows in it (pallas_kernels.invariance)."""
        self.leaves, treedef = jax.tree_util.tree_flatten(state)
        self.drafter_leaves, d_treedef = jax.tree_util.tree_flatten(drafter_state)

        def unflatten(leaves, d_leaves):
            return (jax.tree_util.tree_unflatten(treedef, leaves),
                    jax.tree_util.tree_unflatten(d_treedef, d_leaves))

        def plain(leaves, d_leaves, cache, dcache, rows, inputs, full):
            st, dst = unflatten(leaves, d_leaves)
            with batch_invariant(invariant), q8_prescale_ctx(q8_prescale), prefill_phase(inputs.tokens.shape[1] > 1):
                return _model_step(graphdef, drafter_graphdef, taps, st, dst, cache, dcache, rows, inputs, full)

        def spec(leaves, d_leaves, cache, dcache, rows, inputs, full):
            st, dst = unflatten(leaves, d_leaves)
            with batch_invariant(invariant), q8_prescale_ctx(q8_prescale):
                return _spec_step(graphdef, drafter_graphdef, taps, mask_token_id, ctx_window, st, dst, cache,
                                  dcache, rows, inputs, full)

        def draft(leaves, d_leaves, cache, dcache, rows, inputs, full):
            del cache, full  # same arguments as the others, so that one bucket table serves all three
            st, dst = unflatten(leaves, d_leaves)
            with batch_invariant(invariant), q8_prescale_ctx(q8_prescale):
                return _draft_step(graphdef, drafter_graphdef, mask_token_id, ctx_window, st, dst, dcache, rows,
                                   inputs)

        def jit(kind, fn, rows=0, **kw):
            return jax.jit(fn, static_argnums=(6,), compiler_options=step_compiler_options(kind, rows, invariant),
                           **kw)

        self._compiled: dict = {}  # (kind, full, shape, input tree) -> ahead-of-time compiled step
        self._jitted = {"plain": jit("plain", plain, donate_argnums=(2, 3, 4)),
                        "spec": jit("spec", spec, donate_argnums=(2, 3, 4)),
                        "spec_wide": jit("spec", spec, WIDE_VERIFY_ROWS, donate_argnums=(2, 3, 4)),
                        "draft": jit("draft", draft)}  # reads the caches only: nothing donated

    def _key(self, kind: str, inputs, full: bool):
        first = inputs.tokens if kind == "plain" else inputs.injected
        return kind, full, first.shape, jax.tree_util.tree_structure(inputs)

    def model_step(self, cache, dcache, rows: SlotRows, inputs: StepInputs, full: bool = True):
        """full=False: a greedy batch with no top logprobs (sampling.needs_full), a separately compiled variant."""
        return self._call("plain", cache, dcache, rows, inputs, full)

    def spec_step(self, cache, dcache, rows: SlotRows, inputs: SpecInputs, full: bool = True):
        return self._call("spec", cache, dcache, rows, inputs, full)

    def draft_step(self, cache, dcache, rows: SlotRows, inputs: SpecInputs):
        """(B, T-1) drafts for these rows; the caches and rows stay valid (nothing is donated)."""
        return self._call("draft", cache, dcache, rows, inputs, False)

    def _call(self, kind: str, cache, dcache, rows, inputs, full):
        """The ahead-of-time executable of this bucket; `jit` (which compiles, and which the zero-recompile tests
        count) for anything warm-up did not see, including arguments whose types differ from the bucket's: the
        executable rejects those before running, with the donated buffers intact."""
        fn = self._compiled.get(self._key(kind, inputs, full))
        if fn is not None:
            try:
                return fn(self.leaves, self.drafter_leaves, cache, dcache, rows, inputs)
            except TypeError:
                pass
        return self._jit(kind, inputs)(self.leaves, self.drafter_leaves, cache, dcache, rows, inputs, full)

    def _jit(self, kind: str, inputs):
        """The jitted step for these inputs: spec steps with `WIDE_VERIFY_ROWS` verify rows or more have their own
        (`step_compiler_options`)."""
        if kind == "spec" and inputs.injected.shape[0] * (inputs.injected.shape[1] + 1) >= WIDE_VERIFY_ROWS:
            return self._jitted["spec_wide"]
        return self._jitted[kind]

    def lower(self, kind: str, cache, dcache, rows: SlotRows, inputs, full: bool = True):
        """The step (plain, spec or draft) for these arguments traced and lowered, not compiled (nothing runs,
        nothing is donated)."""
        return self._jit(kind, inputs).lower(self.leaves, self.drafter_leaves, cache, dcache, rows, inputs, full)

    def add_compiled(self, kind: str, inputs, full: bool, compiled) -> None:
        """Serve calls with this bucket's shapes from an ahead-of-time compiled step (`lower(...).compile()`)."""
        self._compiled[self._key(kind, inputs, full)] = compiled
