"""Plain batched greedy decoding with no scheduler: the yardstick that engine, DFlash and parity tests compare against."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash_jax.kv_cache import AttentionMeta
from dflash_jax.state_pool import make_cache


@partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _forward(graphdef, state, tokens, meta, cache):
    model = nnx.merge(graphdef, state)
    hidden, cache, _ = model(tokens, meta, cache)
    last = jnp.take_along_axis(hidden, jnp.maximum(meta.q_lens - 1, 0)[:, None, None], axis=1)[:, 0]  # (B, D)
    return jax.nn.log_softmax(model.logits(last)), cache


def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, page_size: int = 16,
                    cache_dtype=None) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy continuation of every prompt, all prompts as one batch. Returns (tokens, logprob of each token)."""
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    b = len(prompts)
    max_len = max(map(len, prompts)) + max_new_tokens
    pages_per_slot = -(-max_len // page_size)
    cache = make_cache(cfg, 1 + b * pages_per_slot, page_size, b, cache_dtype or model.embed_tokens[...].dtype)
    page_table = jnp.asarray(1 + np.arange(b * pages_per_slot, dtype=np.int32).reshape(b, pages_per_slot))
    t = max(map(len, prompts))
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lens = np.array([len(p) for p in prompts], np.int32)
    meta = AttentionMeta(q_lens=jnp.asarray(lens), kv_lens=jnp.asarray(lens), page_table=page_table)
    logp, cache = _forward(graphdef, state, jnp.asarray(tokens), meta, cache)
    out_tokens, out_logprobs = [[] for _ in range(b)], [[] for _ in range(b)]
    for _ in range(max_new_tokens):
        logp = np.asarray(logp)
        nxt = logp.argmax(-1).astype(np.int32)
        for i in range(b):
            out_tokens[i].append(int(nxt[i]))
            out_logprobs[i].append(float(logp[i, nxt[i]]))
        lens = lens + 1
        meta = AttentionMeta(q_lens=jnp.ones((b,), jnp.int32), kv_lens=jnp.asarray(lens), page_table=page_table)
        logp, cache = _forward(graphdef, state, jnp.asarray(nxt[:, None]), meta, cache)
    return out_tokens, out_logprobs
