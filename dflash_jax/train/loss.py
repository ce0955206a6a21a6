"""The DFlash training objective (DESIGN.md section 4, training paragraph; SpecForge-style): many anchored blocks per
sequence, attended with the same visibility the serving step gives them, and a decay-weighted cross-entropy.

A block anchored at position a is [x_a, MASK x (T-1)] at positions a .. a+T-1. Its queries see the context features of
positions strictly before a (the serving step has features only for committed tokens, and x_a is not yet committed)
and the T keys of their own block, bidirectionally; never another block. Block slot k (1..T-1) predicts the token at
a+k through the target's frozen LM head on the drafter's final norm.

Dimensions: B sequences, L sequence length, A anchors per sequence, T block size, D hidden, F tap features,
N/K query/KV heads, G = N/K, H head dim, V vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dflash_jax.models.dense import rope


def sample_anchors(rng: np.random.Generator, prompt_lens: np.ndarray, lengths: np.ndarray,
                   num_anchors: int) -> tuple[np.ndarray, np.ndarray]:
    """Random anchors inside each response: a in [prompt_len, length - 2] (the serving step's first block is anchored
    at the first generated token, and an anchor needs at least one label after it), without repetition.
    Returns anchors (B, A) int32 and valid (B, A) bool; a sequence with fewer candidates gets invalid padding."""
    b = len(lengths)
    anchors = np.zeros((b, num_anchors), np.int32)
    valid = np.zeros((b, num_anchors), bool)
    for i in range(b):
        lo, hi = int(prompt_lens[i]), int(lengths[i]) - 1  # candidates lo .. hi-1
        n = hi - lo
        if n <= 0:
            continue
        pick = lo + np.sort(rng.choice(n, size=min(n, num_anchors), replace=False))
        anchors[i, :len(pick)] = pick
        valid[i, :len(pick)] = True
    return anchors, valid


def block_labels(tokens: jax.Array, lengths: jax.Array, anchors: jax.Array, anchor_valid: jax.Array,
                 block: int) -> tuple[jax.Array, jax.Array]:
    """Slot k of the block anchored at a predicts tokens[a + k]. Returns labels (B, A, T-1) for k = 1..T-1 and their
    validity (inside the sequence, valid anchor)."""
    pos = anchors[:, :, None] + jnp.arange(1, block)[None, None, :]  # (B, A, T-1)
    labels = jnp.take_along_axis(tokens, jnp.clip(pos, 0, tokens.shape[1] - 1).reshape(tokens.shape[0], -1),
                                 axis=1).reshape(pos.shape)
    valid = (pos < lengths[:, None, None]) & anchor_valid[:, :, None]
    return labels, valid


def position_weights(block: int, gamma: float) -> jax.Array:
    """exp(-(k-1)/gamma) for slots k = 1..T-1: early slots decide acceptance, so they weigh most."""
    return jnp.exp(-jnp.arange(block - 1, dtype=jnp.float32) / gamma)


def context_visibility(anchors: jax.Array, seq_len: int) -> jax.Array:
    """(B, A, L): context position p is visible to the block anchored at a iff p < a (strictly: the anchor's own
    feature is not available when the serving step drafts)."""
    return jnp.arange(seq_len)[None, None, :] < anchors[:, :, None]


def block_attention(q: jax.Array, k_ctx: jax.Array, v_ctx: jax.Array, k_blk: jax.Array, v_blk: jax.Array,
                    ctx_visible: jax.Array) -> jax.Array:
    """q, k/v_blk (B, A, T, N|K, H): each block's queries and keys; k/v_ctx (B, L, K, H): context keys of the whole
    sequence; ctx_visible (B, A, L). One softmax over [visible context, own block]. Returns (B, A, T, N, H)."""
    b, a, t, n, h = q.shape
    kh = k_ctx.shape[2]
    qg = q.reshape(b, a, t, kh, n // kh, h)
    s_ctx = jnp.einsum("batkgh,bckh->bkgatc", qg, k_ctx, preferred_element_type=jnp.float32)
    s_blk = jnp.einsum("batkgh,bajkh->bkgatj", qg, k_blk, preferred_element_type=jnp.float32)
    s_ctx = jnp.where(ctx_visible[:, None, None, :, None, :], s_ctx, -jnp.inf)
    s = jnp.concatenate([s_ctx, s_blk], axis=-1) * h ** -0.5  # (B, K, G, A, T, L + T)
    p = jax.nn.softmax(s, axis=-1).astype(v_ctx.dtype)  # never empty: a query always sees its own block
    num_ctx = k_ctx.shape[1]
    out = (jnp.einsum("bkgatc,bckh->batkgh", p[..., :num_ctx], v_ctx, preferred_element_type=jnp.float32)
           + jnp.einsum("bkgatj,bajkh->batkgh", p[..., num_ctx:], v_blk, preferred_element_type=jnp.float32))
    return out.reshape(b, a, t, n, h).astype(q.dtype)


def drafter_blocks(drafter, embed: jax.Array, feats: jax.Array, tokens: jax.Array, anchors: jax.Array,
                   mask_token_id: int, block: int) -> jax.Array:
    """The drafter over every anchored block at once -> final-normed hidden (B, A, T, D).

    Mirrors dflash_jax.models.drafter exactly: context = hidden_norm(fc(taps)) turned into K/V by each layer's own
    k_proj (+k_norm, RoPE at the token's position) and v_proj, with no input norm; queries and block K/V from the
    input-normed block stream at positions a .. a+T-1."""
    cfg = drafter.cfg
    if cfg.swa_layers:
        raise NotImplementedError("training sliding-window drafter layers is not implemented")
    b, seq_len = tokens.shape
    a = anchors.shape[1]
    dtype = drafter.fc.weight[...].dtype
    ctx = drafter.hidden_norm(drafter.fc(feats.astype(dtype)))  # (B, L, D)
    ctx_pos = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (b, seq_len))
    blk_pos = (anchors[:, :, None] + jnp.arange(block, dtype=jnp.int32)).reshape(b, a * block)  # (B, A*T)
    first = jnp.take_along_axis(tokens, anchors, axis=1)  # (B, A): x_a
    blk_tokens = jnp.concatenate([first[:, :, None], jnp.full((b, a, block - 1), mask_token_id, jnp.int32)], axis=2)
    x = jnp.take(embed, blk_tokens.reshape(b, a * block), axis=0).astype(dtype)  # (B, A*T, D)
    visible = context_visibility(anchors, seq_len)
    for layer in drafter.layers:
        att = layer.self_attn
        k_ctx, v_ctx = att.kv(ctx, ctx_pos)  # (B, L, K, H)
        hs = layer.input_layernorm(x)
        q = att.q_norm(att.q_proj(hs).reshape(b, a * block, cfg.num_heads, cfg.head_dim))
        q = rope(q, blk_pos, cfg.rope_theta)
        k_blk, v_blk = att.kv(hs, blk_pos)
        split = lambda z: z.reshape(b, a, block, *z.shape[2:])  # noqa: E731
        o = block_attention(split(q), k_ctx, v_ctx, split(k_blk), split(v_blk), visible)
        x = x + att.o_proj(o.reshape(b, a * block, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return drafter.norm(x).reshape(b, a, block, -1)


def chunked_cross_entropy(hidden: jax.Array, labels: jax.Array, logits_fn, chunk: int,
                          teacher: jax.Array | None = None, distill: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Per-row loss and argmax-correctness of logits_fn(hidden) (R, D) -> (R, V) f32, `chunk` rows at a time and
    recomputed in the backward pass, so (R, V) logits never live in memory at once.

    The loss is the cross-entropy against `labels`, or with teacher (R, D) (the target's own hidden at the position
    that predicts each label) (1 - distill) * that + distill * the cross-entropy against the target's softmax: the
    target's whole distribution says more per row than its one sampled token."""
    r = hidden.shape[0]
    pad = -r % chunk
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    labels = jnp.pad(labels, (0, pad))
    if teacher is not None:  # None is an empty pytree: lax.map passes it through
        teacher = jnp.pad(teacher, ((0, pad), (0, 0))).reshape(-1, chunk, teacher.shape[1])

    @jax.checkpoint
    def one(args):
        h, y, t = args
        logits = logits_fn(h)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        loss = lse - picked
        if t is not None:
            p = jax.nn.softmax(jax.lax.stop_gradient(logits_fn(t)), axis=-1)
            soft = lse - jnp.sum(p * logits, axis=-1)
            loss = (1.0 - distill) * loss + distill * soft
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        return loss, correct

    ce, correct = jax.lax.map(one, (hidden.reshape(-1, chunk, hidden.shape[1]), labels.reshape(-1, chunk), teacher))
    return ce.reshape(-1)[:r], correct.reshape(-1)[:r]


def head_weight(target) -> jax.Array:
    """(V, D) rows of the target's LM head (the embedding when tied)."""
    return target.lm_head.weight[...] if target.lm_head is not None else target.embed_tokens[...]


def dflash_loss(drafter, target, feats: jax.Array, tokens: jax.Array, lengths: jax.Array, anchors: jax.Array,
                anchor_valid: jax.Array, mask_token_id: int, block: int, gamma: float, chunk: int = 2048,
                vocab_ids: jax.Array | None = None, vocab_index: jax.Array | None = None,
                target_hidden: jax.Array | None = None, distill: float = 0.0) -> tuple[jax.Array, dict]:
    """Weighted cross-entropy of all blocks, plus metrics: per-slot accuracy and the accepted length a greedy verify
    of these very blocks would give (exact for greedy target data: the sequence is then the target's own choice).

    vocab_ids (S,) / vocab_index (V,): optionally restrict the softmax to a candidate subset of the vocabulary (e.g.
    every token of the training responses) — a cheaper approximation of the full softmax when the LM head dominates
    the step (CPU training); vocab_index maps a token id to its row in vocab_ids, or -1 (such labels are dropped).

    target_hidden (B, L, D), the target's final-normed hidden, with distill > 0 mixes in distillation: slot k of the
    block at a also learns the target's distribution at a + k - 1 (what the target predicts for a + k)."""
    h = drafter_blocks(drafter, target.embed_tokens[...], feats, tokens, anchors, mask_token_id, block)
    labels, valid = block_labels(tokens, lengths, anchors, anchor_valid, block)
    if vocab_ids is None:
        logits_fn = target.logits
    else:
        head = jnp.take(head_weight(target), vocab_ids, axis=0)  # (S, D)
        logits_fn = lambda x: jnp.einsum("rd,vd->rv", x, head, preferred_element_type=jnp.float32)  # noqa: E731
        labels = vocab_index[labels]
        valid &= labels >= 0
        labels = jnp.maximum(labels, 0)
    d = h.shape[-1]
    teacher = None
    if target_hidden is not None and distill > 0:
        src = anchors[:, :, None] + jnp.arange(block - 1)[None, None, :]  # (B, A, T-1): a + k - 1
        src = jnp.clip(src, 0, tokens.shape[1] - 1).reshape(tokens.shape[0], -1)
        teacher = jnp.take_along_axis(target_hidden, src[:, :, None], axis=1).reshape(-1, d).astype(h.dtype)
    ce, correct = chunked_cross_entropy(h[:, :, 1:].reshape(-1, d), labels.reshape(-1), logits_fn, chunk,
                                        teacher, distill)
    ce, correct = ce.reshape(labels.shape), correct.reshape(labels.shape)
    w = position_weights(block, gamma)[None, None, :] * valid
    loss = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1e-6)
    validf = valid.astype(jnp.float32)
    acc_per_pos = jnp.sum(correct * validf, axis=(0, 1)) / jnp.maximum(jnp.sum(validf, axis=(0, 1)), 1.0)
    # accepted drafts = leading run of correct slots; a slot past the sequence end stops the run
    accepted = jnp.sum(jnp.cumprod(correct * validf, axis=-1), axis=-1)  # (B, A)
    n_blocks = jnp.maximum(jnp.sum(anchor_valid), 1)
    tau = jnp.sum((accepted + 1) * anchor_valid) / n_blocks
    return loss, {"loss": loss, "acc_per_pos": acc_per_pos, "tau": tau}
