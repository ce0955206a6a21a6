"""Training-data generation at accelerator speed: many prompts answered as one fixed-shape batch, with no scheduler.

The serving engine compiles one program per (slots, tokens) bucket it meets, which on a GPU costs more than the
generation itself for a few thousand short answers. Here every batch has the same shape (prompts padded to
`prompt_pad`, answers `max_tokens` long), so a whole data run compiles two programs: a prefill chunk and a decode loop
that runs all `max_tokens` steps on device. Sampling is the server's own (`dflash_jax.sampling.sample`, keyed by seed
and position), so a greedy row here is exactly what the server answers for that prompt.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dflash_jax.kv_cache import AttentionMeta, KVCache
from dflash_jax.sampling import SamplingArrays, sample


@dataclass(frozen=True)
class GenJob:
    prompt_ids: tuple[int, ...]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _prefill_chunk(graphdef, state, tokens, meta, cache, last_in_chunk):
    """One prompt chunk for every row; returns the logits at each row's last prompt token if it lies in this chunk."""
    model = nnx.merge(graphdef, state)
    hidden, cache, _ = model(tokens, meta, cache)
    idx = jnp.clip(last_in_chunk, 0, tokens.shape[1] - 1)
    last = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
    return model.logits(last).astype(jnp.float32), cache


@partial(jax.jit, static_argnums=(0, 6, 8), donate_argnums=(2,))
def _decode_loop(graphdef, state, cache, logits, lens, page_table, steps: int, params: SamplingArrays, full: bool):
    """`steps` tokens for every row, all on device: sample from logits, feed the token back, repeat. full=False: an
    all-greedy batch (no candidate search, which at hundreds of rows costs more than the model's forward pass)."""
    model = nnx.merge(graphdef, state)
    b = logits.shape[0]

    def body(i, carry):
        cache, logits, out = carry
        tok = sample(logits, None, params, lens + i, full=full).tokens
        out = out.at[:, i].set(tok)
        meta = AttentionMeta(q_lens=jnp.ones((b,), jnp.int32), kv_lens=lens + i + 1, page_table=page_table)
        hidden, cache, _ = model(tok[:, None], meta, cache)
        return cache, model.logits(hidden[:, 0]).astype(jnp.float32), out

    out = jnp.zeros((b, steps), jnp.int32)
    cache, _, out = jax.lax.fori_loop(0, steps, body, (cache, logits, out))
    return out, cache


def batch_generate(model, jobs: list[GenJob], max_tokens: int, eog_ids, batch: int = 256, prompt_pad: int = 512,
                   chunk: int = 256, page_size: int = 16, cache_dtype=None, progress: bool = True,
                   on_result=None) -> list[tuple[list[int], str]]:
    """Answer every job; returns (response_ids, finish) per job in order. A response ends at (and keeps) its first
    end-of-generation token (finish "stop"), else it is max_tokens long ("length"). Prompts longer than prompt_pad
    are rejected, not cut: a cut prompt would train on text the server never sees.

    Jobs run in the given order, `batch` at a time (a caller's priorities survive a run cut short, and a batch of
    greedy jobs skips the sampling search); on_result(job index, response_ids, finish) is called as each batch
    finishes, so a killed run keeps what it answered."""
    too_long = [i for i, j in enumerate(jobs) if not 0 < len(j.prompt_ids) <= prompt_pad]
    if too_long:
        raise ValueError(f"{len(too_long)} prompts are empty or longer than prompt_pad={prompt_pad} "
                         f"(first: job {too_long[0]}, {len(jobs[too_long[0]].prompt_ids)} tokens)")
    prompt_pad = -(-prompt_pad // chunk) * chunk
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    pages_per_row = -(-(prompt_pad + max_tokens) // page_size)
    page_table = jnp.asarray(1 + np.arange(batch * pages_per_row, dtype=np.int32).reshape(batch, pages_per_row))
    cache = KVCache.create(cfg.num_layers, 1 + batch * pages_per_row, page_size, cfg.num_kv_heads, cfg.head_dim,
                           cache_dtype or model.embed_tokens[...].dtype)
    eog = np.asarray(sorted(eog_ids), np.int32)
    t0, tokens_out = time.monotonic(), 0
    results: list[tuple[list[int], str]] = [([], "")] * len(jobs)
    bar = tqdm(total=len(jobs), desc="generating", unit="seq", disable=not progress)
    for start in range(0, len(jobs), batch):
        rows = list(range(start, min(start + batch, len(jobs))))
        n = len(rows)
        lens = np.ones((batch,), np.int32)  # padding rows: a 1-token prompt, never read
        tokens = np.zeros((batch, prompt_pad), np.int32)
        for r, i in enumerate(rows):
            ids = jobs[i].prompt_ids
            tokens[r, :len(ids)] = ids
            lens[r] = len(ids)
        logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
        for c0 in range(0, int(lens.max()), chunk):
            q = np.clip(lens - c0, 0, chunk).astype(np.int32)
            meta = AttentionMeta(q_lens=jnp.asarray(q), kv_lens=jnp.asarray(np.minimum(lens, c0 + chunk)),
                                 page_table=page_table)
            last = lens - 1 - c0
            chunk_logits, cache = _prefill_chunk(graphdef, state, jnp.asarray(tokens[:, c0:c0 + chunk]), meta, cache,
                                                 jnp.asarray(last))
            here = jnp.asarray((last >= 0) & (last < chunk))[:, None]
            logits = jnp.where(here, chunk_logits, logits)
        sel = [jobs[i] for i in rows] + [GenJob((0,))] * (batch - n)
        params = SamplingArrays(temperature=jnp.asarray([j.temperature for j in sel], jnp.float32),
                                top_k=jnp.zeros((batch,), jnp.int32),
                                top_p=jnp.asarray([j.top_p for j in sel], jnp.float32),
                                min_p=jnp.zeros((batch,), jnp.float32),
                                presence_penalty=jnp.zeros((batch,), jnp.float32),
                                frequency_penalty=jnp.zeros((batch,), jnp.float32),
                                seed=jnp.asarray([j.seed & 0xFFFFFFFF for j in sel], jnp.uint32))
        full = any(j.temperature > 0 for j in sel)
        out, cache = _decode_loop(graphdef, state, cache, logits, jnp.asarray(lens), page_table, max_tokens, params,
                                  full)
        out = np.asarray(out)
        for r, i in enumerate(rows):
            toks = out[r]
            stops = np.flatnonzero(np.isin(toks, eog))
            if stops.size:
                results[i] = (toks[:stops[0] + 1].tolist(), "stop")
            else:
                results[i] = (toks.tolist(), "length")
            tokens_out += len(results[i][0])
            if on_result is not None:
                on_result(i, *results[i])
        bar.update(n)
        if progress and not sys.stderr.isatty():  # a log file: one readable line per batch instead of \r updates
            el = time.monotonic() - t0
            print(f"batch {start // batch + 1}/{-(-len(jobs) // batch)}: {start + n} of {len(jobs)} answered, "
                  f"{tokens_out} tokens in {el:.0f} s ({tokens_out / max(el, 1e-9):.0f} tok/s)", flush=True)
    bar.close()
    return results
