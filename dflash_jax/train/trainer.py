"""Training loop of a DFlash drafter against a frozen target: AdamW (optax) with warmup + cosine and global-norm
clipping, bf16 compute over f32 master weights, resumable orbax checkpoints, a loss curve PNG.

Only the drafter's own weights train; the target (embedding, LM head, tap features) is frozen and shared.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from dflash_jax.config import DrafterConfig
from dflash_jax.models.drafter import Drafter
from dflash_jax.train.data import Dataset
from dflash_jax.train.features import FeatureCache, pad_batch, tap_features
from dflash_jax.train.loss import dflash_loss, sample_anchors

GAMMA_BY_BLOCK = {16: 7.0, 10: 5.0, 8: 4.0}  # DESIGN.md section 4
HISTORY_FILE = "history.json"
DRAFTER_CONFIG_FILE = "drafter_config.json"


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8  # sequences per step
    seq_len: int = 768  # sequences are cut here (one compiled shape)
    anchors_per_seq: int = 256  # blocks per sequence (at most the response length)
    gamma: float | None = None  # position-weight decay; None = DESIGN.md's value for the block size
    lr: float = 6e-4
    warmup_steps: int = 100
    num_steps: int = 2000  # cosine horizon; with time_budget_s, re-estimated from the measured step time
    time_budget_s: float | None = None  # stop (and set the cosine horizon) to fit this much wall time
    stop_after_s: float | None = None  # checkpoint and stop after this much wall time, horizon unchanged: a resumed
    # run continues the same schedule (one run spread over several time-limited jobs)
    min_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    compute_dtype: str = "float32"  # bfloat16 on GPU
    ce_chunk: int = 2048  # rows of (rows, vocab) logits alive at once
    vocab_subset: bool = False  # softmax over the tokens of the training responses only (cheaper LM head on CPU)
    feature_cache: str | None = None  # directory: compute the frozen target's tap features once, reuse every epoch
    distill: float = 0.0  # weight of the target's soft distribution against its sampled token (needs no cache)
    init_std: float = 0.02
    seed: int = 0
    val_seqs: int = 32  # held out from the data file for the validation loss / tau
    eval_every: int = 200
    ckpt_every: int = 500
    log_every: int = 10
    profile_steps: int = 0  # > 0: after step 3, trace this many steps with jax.profiler (profile.json, top kernels)

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "anchors_per_seq", "num_steps", "ce_chunk", "eval_every",
                     "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.clip_norm > 0):
            raise ValueError("TrainConfig: lr and clip_norm must be positive and min_lr_ratio in [0, 1]")
        if not 0 <= self.distill <= 1:
            raise ValueError(f"TrainConfig.distill must be in [0, 1], got {self.distill}")
        if self.distill and self.feature_cache:
            raise ValueError("TrainConfig: distill needs the target's hidden states, which the feature cache does "
                             "not keep; recompute features in the step (no feature_cache)")


def init_drafter_params(dcfg: DrafterConfig, seed: int, std: float = 0.02) -> tuple[nnx.GraphDef, nnx.State]:
    """HF-style init in float32: projections N(0, std), norm gains 1."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Drafter(dcfg, jnp.float32)))
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jnp.ones(x.shape, jnp.float32) if len(x.shape) == 1 else std * jax.random.normal(k, x.shape)
              for k, x in zip(keys, leaves)]
    return graphdef, jax.tree_util.tree_unflatten(treedef, leaves)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    return _optimizer(tc.clip_norm, tc.weight_decay, tc.lr)


@functools.lru_cache(maxsize=None)
def _optimizer(clip_norm: float, weight_decay: float, lr: float) -> optax.GradientTransformation:
    """Cached: the optimizer is a static argument of the jitted step, so equal configs must give the same object."""
    def build(learning_rate):
        return optax.chain(optax.clip_by_global_norm(clip_norm),
                           optax.adamw(learning_rate, b1=0.9, b2=0.95, weight_decay=weight_decay))
    return optax.inject_hyperparams(build)(learning_rate=lr)


def lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """Linear warmup to tc.lr, then cosine down to tc.lr * min_lr_ratio at `total`."""
    warm = min(tc.warmup_steps, max(total // 10, 1))
    if step < warm:
        return tc.lr * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(total - warm, 1))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass(frozen=True)
class StepStatic:
    """Hashable, trace-time constants of the jitted step."""
    target_graphdef: nnx.GraphDef
    drafter_graphdef: nnx.GraphDef
    taps: tuple[int, ...]
    mask_token_id: int
    block: int
    gamma: float
    ce_chunk: int
    compute_dtype: str
    distill: float = 0.0


def _loss(static: StepStatic, target_state, params, batch, vocab=None):
    """batch: (tokens, lengths, anchors, anchor_valid, cached tap features or None); vocab: (ids, index) or None."""
    target = nnx.merge(static.target_graphdef, target_state)
    tokens, lengths, anchors, valid, feats = batch
    hidden = None
    if feats is None and static.distill:
        feats, hidden = tap_features(target, tokens, lengths, static.taps, with_hidden=True)
    elif feats is None:
        feats = tap_features(target, tokens, lengths, static.taps)
    cdt = jnp.dtype(static.compute_dtype)
    drafter = nnx.merge(static.drafter_graphdef, jax.tree.map(lambda p: p.astype(cdt), params))
    vocab_ids, vocab_index = vocab if vocab is not None else (None, None)
    return dflash_loss(drafter, target, feats, tokens, lengths, anchors, valid, static.mask_token_id, static.block,
                       static.gamma, static.ce_chunk, vocab_ids, vocab_index, hidden, static.distill)


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 4))
def train_step(static: StepStatic, optimizer, target_state, params, opt_state, batch, lr, vocab=None):
    (_, metrics), grads = jax.value_and_grad(lambda p: _loss(static, target_state, p, batch, vocab),
                                             has_aux=True)(params)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return params, opt_state, metrics


@partial(jax.jit, static_argnums=(0,))
def eval_step(static: StepStatic, target_state, params, batch):
    return _loss(static, target_state, params, batch)[1]


class Batcher:
    """Shuffled epochs of fixed-size batches with random anchors; its numpy RNG state is checkpointed."""

    def __init__(self, seqs: list[tuple[np.ndarray, int]], indices: list[int], tc: TrainConfig, seed: int,
                 cache: FeatureCache | None = None):
        if len(indices) < 1:
            raise ValueError("no training sequences (each needs a prompt and at least 2 response tokens)")
        self.seqs, self.indices, self.tc, self.cache = seqs, indices, tc, cache
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    def next(self):
        while len(self.order) < self.tc.batch_size:
            self.order += [self.indices[i] for i in self.rng.permutation(len(self.indices))]
        idx, self.order = self.order[:self.tc.batch_size], self.order[self.tc.batch_size:]
        return make_batch(self.seqs, idx, self.tc, self.rng, self.cache)

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order}

    def restore(self, s: dict) -> None:
        self.rng.bit_generator.state = s["rng"]
        self.order = list(s["order"])


def make_batch(seqs: list[tuple[np.ndarray, int]], idx: list[int], tc: TrainConfig, rng: np.random.Generator,
               cache: FeatureCache | None = None):
    tokens, lengths = pad_batch([seqs[i][0] for i in idx], tc.seq_len)
    prompt_lens = np.array([seqs[i][1] for i in idx], np.int32)
    anchors, valid = sample_anchors(rng, prompt_lens, lengths, tc.anchors_per_seq)
    feats = None
    if cache is not None:
        width = cache.feats.shape[1]
        feats = np.zeros((len(idx), tc.seq_len, width), np.float16)
        for row, i in enumerate(idx):
            f = cache.get(i)[:tc.seq_len]
            feats[row, :len(f)] = f
    return tokens, lengths, anchors, valid, feats


def _device(batch):
    return tuple(None if x is None else jnp.asarray(x) for x in batch)


def vocab_subset(seqs: list[tuple[np.ndarray, int]], indices: list[int], vocab_size: int):
    """(ids (S,), index (V,)) of every token in the responses of the given sequences."""
    ids = np.unique(np.concatenate([seqs[i][0][seqs[i][1]:] for i in indices])).astype(np.int32)
    index = np.full((vocab_size,), -1, np.int32)
    index[ids] = np.arange(len(ids), dtype=np.int32)
    return jnp.asarray(ids), jnp.asarray(index)


def train(target, dcfg: DrafterConfig, dataset: Dataset, tc: TrainConfig, out_dir: str | Path,
          progress: bool = True, resume: bool = True, init_params: nnx.State | None = None) -> dict:
    """Train a drafter for `target` (a converters.checkpoint.LoadedModel) on `dataset`; checkpoints, history and the
    loss curve go to out_dir. init_params (e.g. a shipped drafter's weights) replaces the random init of a fresh run.
    Returns {"params": nnx.State (f32), "history": [...], "config": dcfg}."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DRAFTER_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(dcfg), indent=2))
    (out_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(tc), indent=2))
    cdt = jnp.dtype(tc.compute_dtype)
    t_graphdef, t_state = nnx.split(target.model)
    t_state = jax.tree.map(lambda a: a.astype(cdt) if jnp.issubdtype(a.dtype, jnp.floating) else a, t_state)
    d_graphdef, params = init_drafter_params(dcfg, tc.seed, tc.init_std)
    if init_params is not None:
        params = jax.tree.map(lambda _, got: jnp.asarray(got, jnp.float32), params, init_params)
    optimizer = make_optimizer(tc)
    opt_state = optimizer.init(params)
    gamma = tc.gamma or GAMMA_BY_BLOCK.get(dcfg.block_size, dcfg.block_size * 7 / 16)
    static = StepStatic(t_graphdef, d_graphdef, tuple(dcfg.target_layer_ids), int(dcfg.mask_token_id),
                        dcfg.block_size, float(gamma), tc.ce_chunk, str(cdt), float(tc.distill))

    seqs, train_idx, val_idx = dataset.split_for_training(tc.val_seqs, tc.seq_len, seed=tc.seed)
    cache = None
    if tc.feature_cache:
        cache = FeatureCache.build(target.model, [s for s, _ in seqs], static.taps, tc.feature_cache,
                                   progress=progress)
    vocab = vocab_subset(seqs, train_idx, target.config.vocab_size) if tc.vocab_subset else None
    if vocab is not None and progress:
        print(f"softmax over {len(vocab[0])} of {target.config.vocab_size} tokens (those of the training responses)")
    batcher = Batcher(seqs, train_idx, tc, tc.seed, cache)
    val_rng = np.random.default_rng(tc.seed + 1)
    val_batches = []
    for i in range(0, len(val_idx), tc.batch_size):
        chunk = val_idx[i:i + tc.batch_size]
        b = make_batch(seqs, chunk + [chunk[0]] * (tc.batch_size - len(chunk)), tc, val_rng, cache)
        b[3][len(chunk):] = False  # padding rows: no valid anchors, so they count in no metric
        val_batches.append(b)

    mgr = ocp.CheckpointManager(out_dir / "checkpoints",
                                options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    history: list[dict] = []
    step, total = 0, tc.num_steps
    if resume and mgr.latest_step() is not None:
        step = mgr.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt": opt_state})
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
        params, opt_state = restored["state"]["params"], restored["state"]["opt"]
        meta = restored["meta"]
        total, history = meta["total"], meta["history"]
        batcher.restore(meta["batcher"])
        if progress:
            print(f"resumed from step {step} of {total}")

    def save(s: int) -> None:
        mgr.save(s, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "opt": opt_state}),
                                            meta=ocp.args.JsonSave({"total": total, "history": history,
                                                                    "batcher": batcher.state()})), force=True)

    def validate(s: int) -> dict:
        if not val_batches:
            return {}
        ms = [jax.device_get(eval_step(static, t_state, params, _device(vb))) for vb in val_batches]
        return {"step": s, "val_loss": float(np.mean([m["loss"] for m in ms])),
                "val_tau": float(np.mean([m["tau"] for m in ms])),
                "val_acc_per_pos": np.mean([m["acc_per_pos"] for m in ms], axis=0).round(4).tolist()}

    start = time.monotonic()
    timed_from, timed_steps = None, 0
    bar = tqdm(total=total, initial=step, desc="training drafter", disable=not progress, unit="step")
    metrics = None

    def one_step():
        nonlocal params, opt_state, metrics, step
        params, opt_state, metrics = train_step(static, optimizer, t_state, params, opt_state,
                                                _device(batcher.next()), lr_at(step, total, tc), vocab)
        step += 1
        bar.update(1)
        return params

    if step == 0 and init_params is not None:  # where the warm start begins, for comparison
        v = validate(0)
        if v:
            history.append(v)
            if progress:
                tqdm.write(f"initial weights: val loss {v['val_loss']:.4f}, val tau {v['val_tau']:.3f}, "
                           f"acc/pos {v['val_acc_per_pos'][:6]}")
    while step < total:
        if tc.profile_steps and step == 3 and step + tc.profile_steps + 1 < total:
            profile_steps(one_step, tc.profile_steps, out_dir, progress)
        one_step()
        if step == 2:  # step 1 compiled; time from here
            jax.block_until_ready(params)
            timed_from = time.monotonic()
        if step % tc.log_every == 0 or step == total:
            m = jax.device_get(metrics)
            rec = {"step": step, "loss": float(m["loss"]), "tau": float(m["tau"]), "lr": lr_at(step - 1, total, tc),
                   "grad_norm": float(m["grad_norm"]), "acc1": float(m["acc_per_pos"][0]),
                   "elapsed_s": round(time.monotonic() - start, 2)}
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tau=f"{rec['tau']:.2f}", acc1=f"{rec['acc1']:.2f}")
            if progress and not sys.stderr.isatty():  # a log file: one readable line per log step
                print(json.dumps(rec), flush=True)
            if tc.time_budget_s and timed_from is not None:
                timed_steps = step - 2
                per_step = (time.monotonic() - timed_from) / max(timed_steps, 1)
                left = tc.time_budget_s - (time.monotonic() - start)
                new_total = step + max(int(left / per_step), 0)
                if new_total != total and step >= 20:
                    total = max(new_total, step)
                    bar.total = total
                    bar.refresh()
        if step % tc.eval_every == 0 or step == total:
            v = validate(step)
            if v:
                history.append(v)
                if progress:
                    tqdm.write(f"step {step}: val loss {v['val_loss']:.4f}, val tau {v['val_tau']:.3f}, "
                               f"acc/pos {v['val_acc_per_pos'][:6]}")
        stop = bool(tc.stop_after_s) and step < total and time.monotonic() - start >= tc.stop_after_s
        if step % tc.ckpt_every == 0 or step == total or stop:
            save(step)
        if stop:
            if progress:
                tqdm.write(f"stopped after {tc.stop_after_s:.0f} s at step {step} of {total}; rerun to resume")
            break
    bar.close()
    mgr.wait_until_finished()
    mgr.close()
    (out_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    try:
        plot_history(history, out_dir / "loss_curve.png")
    except ImportError as e:  # a bare accelerator host; `python -m dflash_jax.train plot RUN` draws it later
        print(f"loss curve not drawn ({e}); history is in {out_dir / HISTORY_FILE}")
    return {"params": params, "history": history, "config": dcfg, "graphdef": d_graphdef}


def profile_steps(step_fn, n: int, out_dir: Path, progress: bool) -> dict:
    """Wall and device time of n training steps (after one untraced warm step), the device's top kernels; saved as
    out_dir/profile.json. On a GPU this is the first thing to run when a step is slower than its FLOPs suggest."""
    from dflash_jax.profiling import device_profile

    t0 = time.monotonic()
    prof = device_profile(step_fn, n, str(out_dir / "profile"))
    prof["wall_ms_per_step"] = (time.monotonic() - t0) * 1e3 / (n + 1)
    (out_dir / "profile.json").write_text(json.dumps(prof, indent=1))
    if progress:
        tqdm.write(f"profile of {n} steps: wall {prof['wall_ms_per_step']:.1f} ms/step, device busy "
                   f"{prof['busy_ms_per_step']:.1f} ms/step, {prof['kernels_per_step']:.0f} kernels/step; top:")
        for name, ms, count in prof["top"][:15]:
            tqdm.write(f"  {ms:9.2f} ms x{count:6.0f}  {name}")
    return prof


def plot_history(history: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [h for h in history if "loss" in h]
    va = [h for h in history if "val_loss" in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([h["step"] for h in tr], [h["loss"] for h in tr], label="train", lw=0.8)
    if va:
        ax1.plot([h["step"] for h in va], [h["val_loss"] for h in va], "o-", label="held-out")
    ax1.set_xlabel("step")
    ax1.set_ylabel("weighted cross-entropy")
    ax1.set_yscale("log")
    ax1.legend()
    ax2.plot([h["step"] for h in tr], [h["tau"] for h in tr], label="train", lw=0.8)
    if va:
        ax2.plot([h["step"] for h in va], [h["val_tau"] for h in va], "o-", label="held-out")
    ax2.set_xlabel("step")
    ax2.set_ylabel("tau (teacher-forced accepted length + 1)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_trained(out_dir: str | Path) -> tuple[DrafterConfig, nnx.State]:
    """(config, f32 params) of the latest checkpoint in a training directory."""
    out_dir = Path(out_dir).absolute()
    dcfg = DrafterConfig(**json.loads((out_dir / DRAFTER_CONFIG_FILE).read_text()))
    _, params = init_drafter_params(dcfg, 0)
    tc = TrainConfig(**json.loads((out_dir / "train_config.json").read_text()))
    opt_state = make_optimizer(tc).init(params)
    with ocp.CheckpointManager(out_dir / "checkpoints") as mgr:
        step = mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {out_dir / 'checkpoints'}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt": opt_state})
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return dcfg, restored["state"]["params"]
