"""DFlash block-diffusion drafter (z-lab DFlash, DESIGN.md section 4) in Flax NNX.

Qwen3-style layers at the target's hidden size. Context: the target's tap-layer features of committed tokens ->
`fc` -> `hidden_norm`, turned by every layer's own k/v projections into cached K/V (paged like the target's KV).
Queries come only from the block [last token, MASK x (T-1)], which attends to that context and to itself
bidirectionally. The target's embedding and LM head are shared, not copied.

Dimensions: B slots, T block size, D hidden, F tap features (K_taps * D), N/K heads, H head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash_jax.kv_cache import AttentionMeta, KVCache, write_kv
from dflash_jax.models.dense import MLP, Linear, RMSNorm, SharedInput, rope
from dflash_jax.models.fp8 import quantize_rows
from dflash_jax.models.layer_calls import per_trace
from pallas_kernels.ragged_paged_attention import drafter_attention
from pallas_kernels.weight_matmul import q8_0_layout, q8_0_stored_out


class DrafterAttention(SharedInput, nnx.Module):
    def __init__(self, cfg, dtype, sliding: bool, serving: bool = False):
        """serving: q/k/v as one `qkv_proj` (the context's k/v then come from the drafter's `ctx_kv`)."""
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self._init_group("qkv_proj", d, (n * h, k * h, k * h), dtype, frozenset(), fuse=serving)
        self.o_proj = Linear(n * h, d, dtype)
        self.q_norm = RMSNorm(h, cfg.rms_eps, dtype)
        self.k_norm = RMSNorm(h, cfg.rms_eps, dtype)
        self.cfg = cfg
        self.window = cfg.sliding_window if sliding else None

    def kv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, T, D) -> roped K and V (B, T, K, H) at absolute positions (B, T)."""
        return self.finish_kv(self.k_proj(x), self.v_proj(x), positions)

    def finish_kv(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The k and v projections' outputs (B, T, K * H) -> normed, roped K and V (B, T, K, H)."""
        b, t, _ = k.shape
        k = self.k_norm(k.reshape(b, t, self.cfg.num_kv_heads, self.cfg.head_dim))
        return rope(k, positions, self.cfg.rope_theta), v.reshape(b, t, self.cfg.num_kv_heads, self.cfg.head_dim)

    def __call__(self, x, positions, ctx_lens, page_table, k_pages, v_pages, ctx_window):
        b, t, _ = x.shape
        q, k, v = self._project("qkv_proj", x)
        q = rope(self.q_norm(q.reshape(b, t, self.cfg.num_heads, self.cfg.head_dim)), positions, self.cfg.rope_theta)
        k, v = self.finish_kv(k, v, positions)
        o = drafter_attention(q, k, v, k_pages, v_pages, page_table, ctx_lens, ctx_window,
                                        causal_window=self.window)
        return self.o_proj(o.reshape(b, t, -1))


class DrafterLayer(nnx.Module):
    def __init__(self, cfg, dtype, sliding: bool, serving: bool = False):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        self.self_attn = DrafterAttention(cfg, dtype, sliding, serving)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        # separate gate/up: the drafter's GGUF and trainer layout; fused for serving (`for_serving`)
        self.mlp = MLP(cfg, dtype, fuse=serving)

    def __call__(self, x, positions, ctx_lens, page_table, k_pages, v_pages, ctx_window):
        x = x + self.self_attn(self.input_layernorm(x), positions, ctx_lens, page_table, k_pages, v_pages,
                               ctx_window)
        return x + self.mlp(self.post_attention_layernorm(x))


class Drafter(nnx.Module):
    def __init__(self, cfg, dtype=jnp.bfloat16, serving: bool = False, draft_vocab: int = 0, head_q8: bool = False):
        """serving: the layout `for_serving` gives (gate/up and q/k/v fused; every layer's context k/v projections
        also as one `ctx_kv` Linear), else the GGUF / trainer layout. draft_vocab (serving only): the drafter's own
        head over that many of the target's tokens (`draft_head`, rows of the target's LM head, Q8_0 with head_q8)
        and their ids (`draft_ids`); 0: drafts come from the target's whole LM head."""
        self.cfg = cfg
        num_taps = len(cfg.target_layer_ids)
        self.fc = Linear(num_taps * cfg.hidden_size, cfg.hidden_size, dtype)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        swa = cfg.swa_layers or (False,) * cfg.num_layers
        self.layers = nnx.List([DrafterLayer(cfg, dtype, swa[i], serving) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, dtype)
        kv = 2 * cfg.num_kv_heads * cfg.head_dim
        self.ctx_kv = Linear(cfg.hidden_size, cfg.num_layers * kv, dtype) if serving else None
        restricted = serving and draft_vocab > 0
        self.draft_head = Linear(cfg.hidden_size, draft_vocab, dtype, q8_0=head_q8) if restricted else None
        self.draft_ids = nnx.Variable(jnp.zeros((draft_vocab,), jnp.int32)) if restricted else None

    def write_context(self, feats: jax.Array, meta: AttentionMeta, positions: jax.Array, valid: jax.Array,
                      cache: KVCache) -> KVCache:
        """Turn tap features (B, T, F) of tokens at `positions` into every layer's context K/V; invalid rows go to
        the trash page."""
        ctx = self.hidden_norm(self.fc(feats.astype(self.hidden_norm.weight[...].dtype)))
        parts = None
        if self.ctx_kv is not None:  # (B, T, L * 2 * K * H): layer i's k, then its v
            parts = jnp.split(self.ctx_kv(ctx), 2 * len(self.layers), axis=-1)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            k, v = attn.kv(ctx, positions) if parts is None else attn.finish_kv(*parts[2 * i:2 * i + 2], positions)
            ks.append(write_kv(cache.k[i], k, meta, positions, valid))
            vs.append(write_kv(cache.v[i], v, meta, positions, valid))
        return KVCache(k=ks, v=vs)

    def __call__(self, block_embeds: jax.Array, ctx_lens: jax.Array, page_table: jax.Array, cache: KVCache,
                 ctx_window: int | None = None) -> jax.Array:
        """block_embeds (B, T, D) at positions ctx_len .. ctx_len + T - 1 -> final-normed hidden (B, T, D)."""
        t = block_embeds.shape[1]
        positions = ctx_lens[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        x, call = block_embeds, per_trace(DrafterLayer.__call__, ("ctx_window",))
        for i, layer in enumerate(self.layers):
            x = call(layer, x, positions, ctx_lens, page_table, cache.k[i], cache.v[i], ctx_window=ctx_window)
        return self.norm(x)


def for_serving(drafter: Drafter, head: tuple[jax.Array, dict] | None = None) -> Drafter:
    """The same drafter in its serving layout (`Drafter(serving=True)`): each layer's gate and up as one Linear and
    its q/k/v as one (the target's layout), and every layer's context k/v projections also concatenated into `ctx_kv`.
    Measured on the 8-slot Qwen3-8B spec step (H200): gate and up ran as 10 products of 31.8 us where the target's
    fused product takes 55 us for both, and XLA's dot merger concatenated the context k/v weights (41 us, session 23)
    and each layer's q/k/v weights (26.5 us a layer, session 24) anew every step. The drafter itself when already in
    this layout.

    head: (ids, the pure state of a Linear over those rows of the target's LM head, `draft_head_rows`), a draft
    vocabulary (as FR-Spec's frequency-ranked subset, EAGLE-3's d2t map): drafts come from those tokens only, and
    each step reads that fraction of the head instead of all of it (the whole bf16 Qwen3-8B head is 318 us of an
    8-slot spec step on an H200). Verification still uses the whole head: output is unchanged, only acceptance can
    drop where the target's token lies outside the subset."""
    if drafter.ctx_kv is not None:
        if head is not None:
            raise ValueError("for_serving: the drafter is already in its serving layout; give the draft vocabulary "
                             "with the GGUF-layout drafter")
        return drafter
    pure = nnx.state(drafter).to_pure_dict()
    kv = []
    for layer in pure["layers"].values():
        gate, up = layer["mlp"].pop("gate_proj"), layer["mlp"].pop("up_proj")
        layer["mlp"]["gate_up_proj"] = {"weight": jnp.concatenate([gate["weight"], up["weight"]], axis=0)}
        att = layer["self_attn"]
        q, k, v = (att.pop(name)["weight"] for name in ("q_proj", "k_proj", "v_proj"))
        att["qkv_proj"] = {"weight": jnp.concatenate([q, k, v], axis=0)}
        kv += [k, v]
    pure["ctx_kv"] = {"weight": jnp.concatenate(kv, axis=0)}
    dtype = drafter.hidden_norm.weight[...].dtype
    n, q8 = 0, False
    if head is not None:
        ids, weights = head
        pure["draft_ids"], pure["draft_head"] = jnp.asarray(ids, jnp.int32), weights
        n, q8 = len(ids), "qweight" in weights
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Drafter(drafter.cfg, dtype, serving=True, draft_vocab=n,
                                                               head_q8=q8)))
    state.replace_by_pure_dict(pure)
    return nnx.merge(graphdef, state)


FP8_CHOICES = ("auto", "off", "head", "all")


def resolve_fp8(which: str, dtype) -> str:
    """'auto': the head in fp8 where the device has fp8 tensor cores (compute capability 8.9 and later) and the
    drafter runs in 16-bit floats, else off (a CPU emulates fp8 products). H200, Qwen3-8B with a 5-layer drafter:
    the bf16 head took 325 us of the 8-slot spec step, its fp8 copy 178 us (step 6.965 -> 6.777 ms); SmolLM2's
    held-out code tau 3.335 -> 3.322 (BENCHMARKS.md, session 25)."""
    if which != "auto":
        return which
    cc = str(getattr(jax.devices()[0], "compute_capability", "") or "0")
    major, _, minor = cc.partition(".")
    fp8_cores = jax.default_backend() == "gpu" and (int(major), int(minor or 0)) >= (8, 9)
    return "head" if fp8_cores and jnp.dtype(dtype).itemsize == 2 else "off"


def to_fp8(drafter: Drafter, which: str) -> Drafter:
    """The drafter with its products in fp8 (`models.fp8`: e4m3 values, a scale per output row; `--draft-fp8`):
    'head' the draft head alone (a draft vocabulary's, or one over every id: `for_serving` with the head rows),
    'all' every Linear; 'off' the drafter as it is ('auto': `resolve_fp8` first). Only acceptance can change,
    never output: the target verifies. H200 measurements: BENCHMARKS.md."""
    if which not in FP8_CHOICES:
        raise ValueError(f"--draft-fp8 must be one of {', '.join(FP8_CHOICES)}, got {which!r}")
    which = resolve_fp8(which, drafter.hidden_norm.weight[...].dtype)
    if which == "off":
        return drafter
    if drafter.draft_head is None:
        raise ValueError("--draft-fp8: the drafter has no head of its own; build it with for_serving(drafter, head)")
    quantize = nnx.jit(lambda lin: quantize_rows(lin.float_weight()))
    for path, lin in list(nnx.iter_graph(drafter)):
        if not isinstance(lin, Linear) or lin.is_fp8 or (which == "head" and path != ("draft_head",)):
            continue
        values, scales = quantize(lin)
        new = nnx.eval_shape(lambda: Linear(values.shape[1], lin.out_features, jnp.float32, fp8=True))
        new.weight, new.row_scales = nnx.Param(values), nnx.Param(scales)
        new.bias = lin.bias
        parent = drafter
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return drafter


def draft_head_rows(target, ids) -> dict:
    """The pure state of a `Linear` computing the logits of tokens `ids` only, from the target's LM head (the tied
    embedding, a float head, or a Q8_0 head's blocks as stored): the same rows, so each draft logit is the one the
    whole head gives for that token. Every id in order (an fp8 copy of the whole head) shares the head's own arrays
    instead of gathering a copy of them (1.24 GB for the Qwen3-8B head at start-up, then quantized and dropped)."""
    ids = np.asarray(ids)
    head = target.lm_head
    every = np.array_equal(ids, np.arange(target.embed_tokens[...].shape[0]))
    if head is None:
        emb = target.embed_tokens[...]
        return {"weight": emb if every else jnp.take(emb, ids, axis=0)}
    if not head.is_q8_0:
        return {"weight": head.weight[...] if every else jnp.take(head.weight[...], ids, axis=0)}
    layout = q8_0_layout()
    if layout != head.q8_layout:
        raise ValueError(f"draft vocabulary: the target's Q8_0 head is in layout {head.q8_layout!r}, this process "
                         f"builds {layout!r}")
    if every:
        return {"qweight": head.qweight[...], "scales": head.scales[...]}
    stored = q8_0_stored_out(len(ids), layout)
    scales = jnp.take(head.scales[...], ids, axis=1)
    scales = jnp.pad(scales, ((0, 0), (0, stored - len(ids))))
    if layout == "nk":  # qweight (out, in): rows past the ids are zeros, as the head's own padding
        q = jnp.pad(jnp.take(head.qweight[...], ids, axis=0), ((0, stored - len(ids)), (0, 0)))
    else:
        q = jnp.take(head.qweight[...], ids, axis=1)
    return {"qweight": q, "scales": scales}
