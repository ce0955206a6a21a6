"""The engine on a qwen35 hybrid target: plain decoding over many slots equals one-shot greedy decoding (recurrent
state per slot, fresh for every new request), and DFlash stays lossless — the verify leaves the recurrent state alone
and the commit replays exactly the accepted prefix — with a random drafter and with injected drafts that are cut at
every block position."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from converters.checkpoint import load_model
from converters.synthetic import PRESETS, write_random_gguf
from dflash_jax.config import DrafterConfig
from dflash_jax.engine import Engine, EngineConfig
from dflash_jax.reference_decode import greedy_generate
from dflash_jax.requests import Request, SamplingParams
from dflash_jax.spec_state import LoadedDrafter
from tests.test_dflash import plain_outputs, random_drafter
from tests.test_engine import run, serving

BLOCK = 8
VOCAB = 512
# Lengths around the page (8) and prefill chunk (16) boundaries, up to three chunks.
LENGTHS = [1, 5, 8, 9, 16, 17, 33, 40, 3, 25]
MAX_NEW = [20, 9, 31, 14, 25, 6, 18, 27, 11, 22]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    # 4 layers: Gated DeltaNet at 0-2, gated attention at 3 (full_attention_interval 4).
    path = tmp_path_factory.mktemp("q35") / "qwen35-small.gguf"
    spec = dataclasses.replace(PRESETS["qwen35-tiny"], num_layers=4, vocab_size=VOCAB, tied_embeddings=True)
    write_random_gguf(str(path), spec, None, seed=11)
    return load_model(str(path), jnp.float32)


# A 1-layer drafter over the target's layers 1 and 2.
DRAFTER = DrafterConfig(num_layers=1, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                        head_dim=32, rms_eps=1e-6, rope_theta=1e7, block_size=BLOCK, mask_token_id=VOCAB - 1,
                        target_layer_ids=(1, 2))


@pytest.fixture(scope="module")
def engine(target):
    # The drafter drafts through an fp8 copy of the hybrid's (tied) head: the GPU default (`--draft-fp8 auto`) that
    # a CPU run would otherwise never take with a hybrid target.
    eng = Engine(target, EngineConfig(num_slots=8, ctx_size=2048, ctx_per_slot=160, page_size=8, prefill_chunk=16,
                                      draft_max=BLOCK - 1, spec_policy="always", overlap=True, draft_fp8="head"),
                 LoadedDrafter(DRAFTER, random_drafter(DRAFTER, 0)))
    eng.warmup(progress=False)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def workload(target):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, VOCAB - 1, size=k).tolist() for k in LENGTHS]
    # One batched one-shot prefill (chunked delta rule over the whole prompt) + token-by-token decode.
    ref, _ = greedy_generate(target.model, prompts, max(MAX_NEW))
    return prompts, [r[:m] for r, m in zip(ref, MAX_NEW)]


def _requests(prompts, n):
    return [Request(p, SamplingParams(max_tokens=m, ignore_eos=True)) for p, m in zip(prompts[:n], MAX_NEW[:n])]


def test_plain_decoding_equals_greedy(engine, workload):
    """10 requests over 8 slots (two slots get a second request: their state must start over), prompts prefilled in
    chunks of 16 that end mid-chunk, then decoded together; a prompt run again starts from its cached prefix."""
    prompts, ref = workload
    engine.spec.policy = "never"
    try:
        out = run(engine, _requests(prompts, 10))
        again = [Request(prompts[7], SamplingParams(max_tokens=MAX_NEW[7], ignore_eos=True))]
        alone = run(engine, again)
    finally:
        engine.spec.policy = "always"
    assert [t for t, _, _ in out] == ref
    assert alone[0][0] == ref[7]
    # the 40-token prompt again: its pages, and the recurrent state after its second chunk (8 state rows kept the
    # 8 states captured where the 10 prompts' chunks ended on a page)
    assert engine.prefix_cache and again[0].num_cached_prompt == 32


def test_a_cached_prefix_restores_the_recurrent_state(target):
    """Prompts sharing a 40-token prefix (chunks of 16, pages of 8): states are kept at 16 and 32, so a later prompt
    starts from the state after 32 tokens (its pages hold 40) or after 16 where only 16-31 are shared; two slots, 3
    state rows, so an older state is given up (LRU); every output equals the reference, DFlash too."""
    with serving(Engine(target, EngineConfig(num_slots=2, ctx_size=1024, ctx_per_slot=128, page_size=8,
                                             prefill_chunk=16, draft_max=BLOCK - 1, spec_policy="always",
                                             prefix_states=3),
                        LoadedDrafter(DRAFTER, random_drafter(DRAFTER, 0)))) as eng:
        rng = np.random.default_rng(17)
        shared = rng.integers(3, VOCAB - 1, size=40).tolist()
        prompts = [shared + [5, 6, 7], shared + [9] * 6, shared[:20] + [11] * 10, shared + [12]]
        reqs = [Request(p, SamplingParams(max_tokens=10, ignore_eos=True)) for p in prompts]
        outs = [run(eng, [r])[0][0] for r in reqs]
        assert [r.num_cached_prompt for r in reqs] == [0, 32, 16, 32]
        ref, _ = greedy_generate(target.model, prompts, 10)
        assert outs == [r[:10] for r in ref]


@pytest.mark.parametrize("concurrent", [1, 2, 8])
def test_random_drafter_equals_plain(engine, workload, concurrent):
    prompts, ref = workload
    reqs = _requests(prompts, concurrent)
    out = run(engine, reqs)
    assert [t for t, _, _ in out] == ref[:concurrent]
    assert all(r.draft_n > 0 for r in reqs)
    assert engine.stats()["speculative"]["draft_fp8"] == "head"


def test_injected_drafts_cut_at_every_position(engine, workload, monkeypatch):
    """Drafts = the target's own continuation, wrong at a block position that moves with the slot and the step, so
    every acceptance length 0 .. BLOCK-1 is committed by the replay, by 8 slots decoding together."""
    prompts, ref = workload
    reqs = _requests(prompts, 8)
    by_id = {r.id: i for i, r in enumerate(reqs)}
    calls = {}

    def inject(slot):
        n = calls[slot.req.id] = calls.get(slot.req.id, 0) + 1
        cont = ref[by_id[slot.req.id]][slot.req.num_generated:][:BLOCK - 1]
        cont = cont + [VOCAB - 2] * (BLOCK - 1 - len(cont))
        error_at = (n + slot.id) % BLOCK  # BLOCK - 1: no error, all drafts accepted
        if error_at < BLOCK - 1:
            cont[error_at] = (cont[error_at] + 1) % (VOCAB - 1)
        return cont

    seen = set()
    record = engine.spec.record_step
    monkeypatch.setattr(engine.spec, "record_step",
                        lambda acc, block=None: (seen.update(int(a) for a in acc), record(acc, block))[1])
    engine.spec.injector = inject
    try:
        out = run(engine, reqs)
    finally:
        engine.spec.injector = None
    assert [t for t, _, _ in out] == ref[:8]
    assert seen == set(range(BLOCK))


def test_seeded_sampling_equals_plain(engine, workload):
    """Choices keyed by (seed, position): DFlash must draw what plain decoding draws, so the replayed state after
    each step must be the state plain decoding reaches."""
    prompts, _ = workload
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True) for s in range(8)]
    spec = run(engine, [Request(p, sp) for p, sp in zip(prompts, params)])
    plain = plain_outputs(engine, prompts, params)
    assert [t for t, _, _ in spec] == [t for t, _, _ in plain]
    assert len({tuple(t) for t, _, _ in spec}) > 1


def test_no_compiles_after_warmup(engine, workload):
    import jax

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event.startswith("/jax/core/compile/") else None)
    try:
        prompts, _ = workload
        params = [SamplingParams(max_tokens=m, temperature=(0.7 if i % 3 == 0 else 0.0), seed=i, ignore_eos=True,
                                 presence_penalty=(0.5 if i % 4 == 1 else 0.0)) for i, m in enumerate(MAX_NEW)]
        run(engine, [Request(p, sp) for p, sp in zip(prompts, params)])
    finally:
        jax.monitoring.clear_event_listeners()
    assert compiles == []
