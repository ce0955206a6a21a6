"""Frozen-target features for training: one causal forward of the target over whole sequences, returning the residual
stream after each tap layer (the serving step's `feats`), through the same DenseDecoder the engine runs.

Dimensions: B sequences, L sequence length, F = taps x hidden.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dflash_jax.kv_cache import AttentionMeta, KVCache

PAGE_SIZE = 64


def tap_features(target, tokens: jax.Array, lengths: jax.Array, taps: tuple[int, ...],
                 with_hidden: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """tokens (B, L) i32, lengths (B,) -> tap features (B, L, F), constant (no gradient); with_hidden also returns the
    target's final-normed hidden (B, L, D) (its logits at every position, for distillation). The sequences get a
    throwaway paged KV cache of their own (page 0 is the trash page), so this is exactly a prefill of each one."""
    cfg = target.cfg
    b, seq_len = tokens.shape
    pages = -(-seq_len // PAGE_SIZE)
    cache = KVCache.create(cfg.num_layers, 1 + b * pages, PAGE_SIZE, cfg.num_kv_heads, cfg.head_dim,
                           target.embed_tokens[...].dtype)
    page_table = 1 + jnp.arange(b * pages, dtype=jnp.int32).reshape(b, pages)
    lengths = lengths.astype(jnp.int32)
    meta = AttentionMeta(q_lens=lengths, kv_lens=lengths, page_table=page_table)
    hidden, _, feats = target(tokens, meta, cache, tuple(taps))
    if with_hidden:
        return jax.lax.stop_gradient(feats), jax.lax.stop_gradient(hidden)
    return jax.lax.stop_gradient(feats)


def pad_batch(seqs: list[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (and cut at seq_len) token sequences -> tokens (B, L) i32, lengths (B,) i32."""
    tokens = np.zeros((len(seqs), seq_len), np.int32)
    lengths = np.zeros((len(seqs),), np.int32)
    for i, s in enumerate(seqs):
        n = min(len(s), seq_len)
        tokens[i, :n] = s[:n]
        lengths[i] = n
    return tokens, lengths


class FeatureCache:
    """Tap features of every training sequence, computed once (the target is frozen) and kept on disk as float16:
    features.npy (total tokens, F) plus index.json (per-sequence offsets). Resumable: progress is recorded per batch.
    Worth it where the target's forward dominates a step (CPU); on a GPU the step recomputes them instead."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        meta = json.loads((self.dir / "index.json").read_text())
        self.offsets, self.lengths = meta["offsets"], meta["lengths"]
        self.feats = np.load(self.dir / "features.npy", mmap_mode="r")

    def get(self, i: int) -> np.ndarray:
        return self.feats[self.offsets[i]:self.offsets[i] + self.lengths[i]]

    @staticmethod
    def build(target, seqs: list[np.ndarray], taps: tuple[int, ...], directory: str | Path, batch_tokens: int = 4096,
              progress: bool = True) -> "FeatureCache":
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lengths = [len(s) for s in seqs]
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()
        width = len(taps) * target.cfg.hidden_size
        index = {"offsets": offsets, "lengths": lengths, "taps": list(taps), "done": []}
        path = directory / "features.npy"
        if (directory / "index.json").exists():
            old = json.loads((directory / "index.json").read_text())
            if old["lengths"] == lengths and old["taps"] == list(taps):
                index["done"] = old["done"]
        if not index["done"] or not path.exists():
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(max(sum(lengths), 1), width)).flush()
        out = np.load(path, mmap_mode="r+")
        graphdef, state = nnx.split(target)
        fwd = jax.jit(lambda st, t, n: tap_features(nnx.merge(graphdef, st), t, n, tuple(taps)))
        order = sorted(range(len(seqs)), key=lambda i: lengths[i])
        done = set(index["done"])
        batches, cur = [], []
        for i in order:  # similar lengths together; padded to a multiple of 64 (few compiled shapes)
            if cur and (len(cur) + 1) * _round_up(lengths[i]) > batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        for batch in tqdm(batches, desc="target features", disable=not progress, unit="batch"):
            if all(i in done for i in batch):
                continue
            seq_len = _round_up(max(lengths[i] for i in batch))
            tokens, lens = pad_batch([seqs[i] for i in batch], seq_len)
            f = np.asarray(jax.device_get(fwd(state, jnp.asarray(tokens), jnp.asarray(lens)))).astype(np.float16)
            for row, i in enumerate(batch):
                out[offsets[i]:offsets[i] + lengths[i]] = f[row, :lengths[i]]
            out.flush()
            done.update(batch)
            index["done"] = sorted(done)
            (directory / "index.json").write_text(json.dumps(index))
        (directory / "index.json").write_text(json.dumps(index))
        return FeatureCache(directory)


def _round_up(n: int, m: int = 64) -> int:
    return -(-n // m) * m
