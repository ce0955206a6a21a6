"""DFlash is lossless: with every slot speculating, outputs equal plain decoding token for token (greedy) and draw for
draw (seeded sampling), with a random drafter and with injected drafts forcing long accepts and rejections."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.checkpoint import load_model
from converters.load_gguf import fill_model
from converters.synthetic import PRESETS, write_random_gguf
from dflash_jax.config import DrafterConfig
from dflash_jax.engine import Engine, EngineConfig
from dflash_jax.models.drafter import Drafter
from dflash_jax.reference_decode import greedy_generate
from dflash_jax.requests import Request, SamplingParams
from dflash_jax.spec_state import LoadedDrafter
from dflash_jax.speculative import accept_lengths
from tests.test_engine import run

BLOCK = 8
VOCAB = 512
TINY_DRAFTER = DrafterConfig(num_layers=1, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                             head_dim=32, rms_eps=1e-5, rope_theta=1e5, block_size=BLOCK, mask_token_id=VOCAB - 1,
                             target_layer_ids=(0, 1))


def random_drafter(dc: DrafterConfig, seed: int) -> Drafter:
    rng = np.random.default_rng(seed)
    _, state = nnx.split(nnx.eval_shape(lambda: Drafter(dc, jnp.float32)))
    arrays = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.to_pure_dict())[0]:
        key = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        base = 1.0 if len(leaf.shape) == 1 else 0.0  # norms around one
        arrays.append((key, jnp.asarray(base + rng.normal(0, 0.05, leaf.shape).astype(np.float32))))
    return fill_model(dc, jnp.float32, arrays, Drafter)


def tiny_target(tmp_path_factory):
    """The tiny random llama target of these tests (also used by tests/test_prefix_cache.py)."""
    path = tmp_path_factory.mktemp("tiny") / "llama-tiny.gguf"
    write_random_gguf(str(path), dataclasses.replace(PRESETS["llama-tiny"], vocab_size=VOCAB), None, seed=7)
    return load_model(str(path), jnp.float32)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_target(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(target):
    dc = TINY_DRAFTER
    eng = Engine(target, EngineConfig(num_slots=8, ctx_size=2048, ctx_per_slot=160, page_size=8, prefill_chunk=16,
                                      draft_max=BLOCK - 1, spec_policy="always", overlap=True),
                 LoadedDrafter(dc, random_drafter(dc, 0)))
    eng.warmup(progress=False)
    eng.start()
    yield eng
    eng.stop()


@pytest.mark.parametrize("drafts,choices,expected", [
    ([[1, 2, 3]], [[1, 2, 3, 4]], [3]),  # all accepted, bonus 4
    ([[1, 2, 3]], [[9, 2, 3, 4]], [0]),  # immediate rejection: only the bonus y_0
    ([[1, 2, 3]], [[1, 9, 3, 4]], [1]),  # a later match after a miss does not count
    ([[1, 2, 3], [0, 0, 0]], [[1, 2, 7, 7], [0, 0, 5, 5]], [2, 2]),  # per row, padding rows included
])
def test_accept_lengths(drafts, choices, expected):
    assert accept_lengths(jnp.asarray(drafts), jnp.asarray(choices)).tolist() == expected


def _workload(rng, n):
    lengths = [1, 5, 8, 9, 17, 33, 40, 3, 16, 2, 12, 25, 7, 30, 4, 11][:n]
    max_new = [20, 9, 31, 14, 25, 6, 18, 27, 11, 22, 15, 8, 19, 24, 13, 10][:n]
    return [rng.integers(3, VOCAB - 1, size=k).tolist() for k in lengths], max_new


def _reference(target, prompts, max_new):
    return [greedy_generate(target.model, [p], m)[0][0] for p, m in zip(prompts, max_new)]


@pytest.mark.parametrize("concurrent", [1, 2, 8, 16])
def test_random_drafter_equals_plain(engine, target, concurrent):
    rng = np.random.default_rng(concurrent)
    prompts, max_new = _workload(rng, concurrent)
    reqs = [Request(p, SamplingParams(max_tokens=m, ignore_eos=True)) for p, m in zip(prompts, max_new)]
    out = run(engine, reqs)
    assert [toks for toks, _, _ in out] == _reference(target, prompts, max_new)
    assert all(r.draft_n > 0 for r in reqs)


def _injected_workload(target, seed: int, n: int, error_at: int | None):
    """n greedy requests, their plain-decoding outputs, and an injector whose drafts are the target's own
    continuation, wrong at block position error_at (None: never)."""
    prompts, max_new = _workload(np.random.default_rng(seed), n)
    ref = _reference(target, prompts, max_new)
    reqs = [Request(p, SamplingParams(max_tokens=m, ignore_eos=True)) for p, m in zip(prompts, max_new)]
    by_id = {r.id: i for i, r in enumerate(reqs)}

    def inject(slot):
        cont = ref[by_id[slot.req.id]][slot.req.num_generated:][:BLOCK - 1]
        cont = cont + [VOCAB - 2] * (BLOCK - 1 - len(cont))
        if error_at is not None:
            cont[error_at] = (cont[error_at] + 1) % (VOCAB - 1)
        return cont

    return ref, reqs, inject


@pytest.mark.parametrize("error_at", [None, 0, 3, BLOCK - 2])
def test_injected_drafts_equal_plain(engine, target, error_at):
    """Drafts = the target's own continuation (long and full accepts), optionally wrong at one block position
    (rejection exactly there), for 8 slots that all finish their prompts before the first multi-slot decode."""
    ref, reqs, inject = _injected_workload(target, 100 + (error_at or 0), 8, error_at)
    engine.spec.injector = inject
    try:
        out = run(engine, reqs)
    finally:
        engine.spec.injector = None
    assert [toks for toks, _, _ in out] == ref
    accepted = sum(r.draft_n_accepted for r in reqs)
    generated = sum(len(t) for t, _, _ in out)
    if error_at is None:
        assert accepted >= generated - 2 * len(reqs) * BLOCK  # nearly everything came from accepted drafts
    else:
        assert all(r.draft_n_accepted <= r.draft_n * error_at / (BLOCK - 1) for r in reqs)


def plain_outputs(engine, prompts, params):
    """The requests run by an 'always' engine with speculation switched off: plain decoding's outputs."""
    engine.spec.policy = "never"
    try:
        return run(engine, [Request(p, sp) for p, sp in zip(prompts, params)])
    finally:
        engine.spec.policy = "always"


def test_seeded_sampling_equals_plain(engine, target):
    """The target's choice at a position is keyed by (seed, position), so DFlash with sampling must draw exactly what
    plain sampling draws; a biased acceptance rule (e.g. accepting drafts the target did not sample) would not."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, VOCAB - 1, size=6).tolist() for _ in range(8)]
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True) for s in range(8)]
    spec = run(engine, [Request(p, sp) for p, sp in zip(prompts, params)])
    plain = plain_outputs(engine, prompts, params)
    assert [t for t, _, _ in spec] == [t for t, _, _ in plain]
    assert len({tuple(t) for t, _, _ in spec}) > 1


def test_logit_bias_with_dflash_equals_plain(engine, target):
    """The bias shapes the target's choice at every verified position as it does in plain decoding, so drafts the
    unbiased model would accept are rejected where the bias bans them: same tokens as plain decoding."""
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, VOCAB - 1, size=6).tolist() for _ in range(8)]
    unbiased = _reference(target, prompts, [16] * 8)
    params = [SamplingParams(max_tokens=16, ignore_eos=True,
                             logit_bias=tuple((t, -100.0) for t in sorted(set(u[:4]))) if i % 2 else ((7, 3.0),))
              for i, u in enumerate(unbiased)]
    reqs = [Request(p, sp) for p, sp in zip(prompts, params)]
    by_id = {r.id: u + [1] * BLOCK for r, u in zip(reqs, unbiased)}
    # Drafts: the unbiased continuation, right until the bias changes a choice.
    engine.spec.injector = lambda slot: by_id[slot.req.id][slot.req.num_generated:][:BLOCK - 1]
    try:
        spec = run(engine, reqs)
    finally:
        engine.spec.injector = None
    plain = plain_outputs(engine, prompts, params)
    assert [t for t, _, _ in spec] == [t for t, _, _ in plain]
    assert all(not set(t) & set(u[:4]) for (t, _, _), u in list(zip(spec, unbiased))[1::2])
    assert sum(r.draft_n_accepted for r in reqs) > 0


def test_stop_inside_accepted_run(engine, target):
    rng = np.random.default_rng(9)
    prompt = rng.integers(3, VOCAB - 1, size=10).tolist()
    ref = _reference(target, [prompt], [30])[0]
    engine.spec.injector = lambda slot: (ref[slot.req.num_generated:] + [1] * BLOCK)[:BLOCK - 1]
    try:
        toks, _, reason = run(engine, [Request(prompt, SamplingParams(max_tokens=11, ignore_eos=True))])[0]
    finally:
        engine.spec.injector = None
    assert toks == ref[:11] and reason == "length"


def test_drafter_gguf_runs_in_engine_and_equals_plain(target, tmp_path):
    """A drafter written by our upstream-schema writer loads through the serving loader and stays lossless."""
    from converters.checkpoint import load_drafter
    from converters.drafter_gguf import random_drafter_params, write_drafter_gguf

    dc = TINY_DRAFTER
    path = tmp_path / "drafter.gguf"
    write_drafter_gguf(str(path), dc, random_drafter_params(dc, seed=1), schema="upstream")
    drafter = load_drafter(path, target.config, jnp.float32)
    assert drafter.config == dc
    eng = Engine(target, EngineConfig(num_slots=2, ctx_size=512, ctx_per_slot=128, page_size=8, prefill_chunk=16,
                                      draft_max=BLOCK - 1, spec_policy="always"), drafter)
    eng.warmup(progress=False)
    eng.start()
    try:
        rng = np.random.default_rng(11)
        prompts, max_new = _workload(rng, 2)
        out = run(eng, [Request(p, SamplingParams(max_tokens=m, ignore_eos=True)) for p, m in zip(prompts, max_new)])
    finally:
        eng.stop()
    assert [t for t, _, _ in out] == _reference(target, prompts, max_new)


def test_mismatched_drafter_is_refused(target, tmp_path):
    from converters.checkpoint import load_drafter
    from converters.drafter_gguf import random_drafter_params, write_drafter_gguf
    from converters.gguf_file import GGUFError

    dc = DrafterConfig(num_layers=1, hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1, head_dim=32,
                       rms_eps=1e-5, rope_theta=1e5, block_size=BLOCK, mask_token_id=VOCAB - 1,
                       target_layer_ids=(0, 5))
    path = tmp_path / "bad.gguf"
    write_drafter_gguf(str(path), dc, random_drafter_params(dc, seed=1), schema="fork")
    with pytest.raises(GGUFError, match="hidden"):
        load_drafter(path, target.config, jnp.float32)


def test_no_compiles_with_dflash_on(engine, target):
    _assert_no_compiles(engine)


def test_no_compiles_with_the_adaptive_policy(target, monkeypatch):
    """The default policy mixes spec and plain launches in one iteration (probes speculate one slot beside the others'
    plain step) and switches per bucket: every combination must already be compiled. Its first block is forced (on a
    CPU a block costs too much to learn tau from one)."""
    monkeypatch.setattr("dflash_jax.spec_state.FIRST_BLOCK_MAX_RATIO", float("inf"))
    eng = Engine(target, EngineConfig(num_slots=8, ctx_size=2048, ctx_per_slot=160, page_size=8, prefill_chunk=16,
                                      draft_max=BLOCK - 1, spec_policy="adaptive", overlap=True),
                 LoadedDrafter(TINY_DRAFTER, random_drafter(TINY_DRAFTER, 0)))
    eng.warmup(progress=False)
    eng.start()
    try:
        _assert_no_compiles(eng)
        assert eng.stats()["speculative"]["num_drafts"] > 0  # the policy did speculate (its first steps at least)
    finally:
        eng.stop()


def _assert_no_compiles(engine):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event.startswith("/jax/core/compile/") else None)
    try:
        rng = np.random.default_rng(21)
        prompts, max_new = _workload(rng, 12)
        params = [SamplingParams(max_tokens=m, temperature=(0.7 if i % 3 == 0 else 0.0), seed=i, ignore_eos=True,
                                 presence_penalty=(0.5 if i % 4 == 1 else 0.0), logprobs=i % 2 == 0, top_logprobs=2)
                  for i, m in enumerate(max_new)]
        run(engine, [Request(p, sp) for p, sp in zip(prompts, params)])
    finally:
        jax.monitoring.clear_event_listeners()
    assert compiles == []
    # every step came from warm-up's executables, the wide spec steps' (step_fns.WIDE_VERIFY_ROWS) among them
    assert all(fn._cache_size() == 0 for fn in engine.steps._jitted.values())


def test_shipped_drafter_is_lossless_on_smollm2(smollm2_path):
    """The drafter shipped with the default model, on the real SmolLM2 weights it was trained for: greedy output with
    every step speculating equals plain decoding, and its drafts are accepted (it reads the target's features)."""
    from converters.checkpoint import load_drafter
    from serve.cli import DEFAULT_DRAFTER

    if not DEFAULT_DRAFTER.exists():
        pytest.skip("no shipped drafter in this checkout")
    from dflash_jax.train.data import PromptEncoder

    target = load_model(str(smollm2_path), jnp.float32)
    drafter = load_drafter(DEFAULT_DRAFTER, target.config, jnp.float32)
    encode = PromptEncoder(target)
    prompts = [encode((("user", "Write a Python function that returns the factorial of n."),)),
               encode((("user", "What is the capital of France?"),))]
    outs = {}
    for name, d in (("dflash", drafter), ("plain", None)):
        eng = Engine(target, EngineConfig(num_slots=2, ctx_size=1024, ctx_per_slot=512, page_size=16,
                                          prefill_chunk=64, draft_max=drafter.config.block_size - 1,
                                          spec_policy="always"), d)
        eng.start()
        try:
            outs[name] = run(eng, [Request(p, SamplingParams(max_tokens=32)) for p in prompts])
            stats = eng.stats()
        finally:
            eng.stop()
        if d is not None:
            assert stats["speculative"]["num_accepted_tokens"] > 0, stats["speculative"]
    assert [t for t, _, _ in outs["dflash"]] == [t for t, _, _ in outs["plain"]]


def _policy(**costs):
    from dflash_jax.spec_state import SpecState

    sp = SpecState.__new__(SpecState)
    sp.policy, sp.slot_buckets, sp.block, sp.draft_vocab, sp.draft_fp8 = "adaptive", (1, 2, 4, 8), 16, 0, "off"
    sp.cost_plain, sp.cost_spec, sp.cost_draft = costs.get("plain", {}), costs.get("spec", {}), costs.get("draft")
    sp.served, sp.served_cost = {}, {}
    sp.tau, sp.tau_var, sp.num_spec_steps, sp.num_tau_samples, sp.shadow, sp.num_shadow_probes = 1.0, 0.0, 0, 0, None, 0
    sp.num_drafts = sp.num_draft_tokens = sp.num_accepted = 0
    sp.accepted_per_pos = np.zeros(15, np.int64)
    sp.short, sp.blocks, sp.cost_short, sp.short_est, sp.num_short_steps = 0, (16,), costs.get("short", {}), None, 0
    if sp.cost_short:
        sp.short, sp.blocks, sp.short_est = 4, (16, 4), (2.5, 0.0, 0)
    return sp


def test_short_block_where_the_full_one_does_not_pay():
    """Where a full block costs more than its tau yields and a short one (fewer verify rows) does not, the engine
    speculates with the short one; its tau takes every block cut at its length (acceptance is a prefix); a short
    block's accepted drafts count as drafted tokens of that length."""
    sp = _policy(plain={8: 0.010}, spec={8: 0.060}, short={8: 0.018})
    for _ in range(40):  # full blocks: tau 4.125 (break-even 6); cut at 4: 3.125 (break-even 1.8)
        sp.record_step(np.array([2, 3, 0, 5, 1, 2, 9, 3]))
    assert sp.tau == pytest.approx(4.125, abs=0.2) and sp.short_est[0] == pytest.approx(3.125, abs=0.2)
    assert sp.choose(8) == (8, 4) and sp.num_to_speculate(8) == 8
    sp.cost_short[8] = 0.035  # 3.5 plain steps: neither pays
    assert sp.choose(8) == (0, 16)
    sp.cost_spec[8] = 0.030  # the full block pays (4.1 > 3) and comes first
    assert sp.choose(8) == (8, 16)
    drafted = sp.num_draft_tokens
    sp.record_step(np.array([3, 1]), block=4)
    assert sp.num_draft_tokens - drafted == 2 * 3 and sp.num_short_steps == 1
    stats = sp.stats()
    assert stats["short_block"] == 4 and stats["short_over_plain"] == {8: 3.5} and stats["num_short_steps"] == 1


def test_short_and_full_blocks_mixed_equal_plain_without_compiles(target, monkeypatch):
    """Steps alternating between the short block and the full one, for slots that join and leave, with drafts that
    are the target's own continuation (long accepts) but wrong at position 2: greedy output equals plain decoding,
    and both blocks' buckets were compiled at warm-up (the mixed-sampling workload compiles nothing)."""
    import itertools

    eng = Engine(target, EngineConfig(num_slots=8, ctx_size=2048, ctx_per_slot=160, page_size=8, prefill_chunk=16,
                                      draft_max=BLOCK - 1, draft_short=3, spec_policy="adaptive", overlap=True),
                 LoadedDrafter(TINY_DRAFTER, random_drafter(TINY_DRAFTER, 4)))
    eng.warmup(progress=False)
    sp = eng.spec
    assert sp.blocks == (BLOCK, 4)
    turn = itertools.count()
    monkeypatch.setattr(sp, "choose", lambda n: (n, sp.blocks[next(turn) % 2]))
    ref, reqs, inject = _injected_workload(target, 5, 12, error_at=2)
    eng.start()
    try:
        _assert_no_compiles(eng)
        sp.injector = inject
        drafts_before = sp.num_drafts
        out = run(eng, reqs)
    finally:
        sp.injector = None
        eng.stop()
    assert [toks for toks, _, _ in out] == ref
    assert 0 < sp.num_short_steps < sp.num_spec_steps
    # two drafts right per block, fewer only at the ends of requests
    assert sum(r.draft_n_accepted for r in reqs) >= sp.num_drafts - drafts_before


def test_adaptive_policy_decides_from_costs_and_tau():
    """Speculate while tau x plain > spec; otherwise decode plainly and probe tau with shadow drafts, more rarely the
    more a probe's draft step costs, so that probing costs at most PROBE_OVERHEAD of plain throughput."""
    from dflash_jax.spec_state import PROBE_EVERY, PROBE_MAX_EVERY, PROBE_OVERHEAD

    sp = _policy()
    sp.num_tau_samples = 3
    assert sp.num_to_speculate(3) == 3  # no costs measured yet for the bucket
    sp.cost_plain[4], sp.cost_spec[4] = 0.010, 0.018
    sp.tau = 2.0
    assert sp.num_to_speculate(3) == 3  # 2 x 10 ms > 18 ms
    sp.tau = 1.5  # 15 ms < 18 ms: plain, with a shadow probe every PROBE_EVERY steps (draft step unmeasured)
    assert sp.num_to_speculate(3) == 0
    assert [s for s in range(1, 4 * PROBE_EVERY + 1) if sp.shadow_due(4, s)] == [PROBE_EVERY * k for k in (1, 2, 3, 4)]
    sp.cost_draft = 0.0001  # a draft step at a hundredth of a plain step: 0.25 % of a plain step's throughput
    assert sp.probe_every(4) == PROBE_EVERY
    sp.cost_draft = 0.002  # at a fifth: 0.2 / 16 = 1.25 % < 2 % < 0.2 / 8
    assert sp.probe_every(4) == 16
    sp.cost_draft = 0.020  # costly drafter: 2 plain steps a probe
    every = sp.probe_every(4)
    assert every == 128 and 2 / every <= PROBE_OVERHEAD < 2 / (every // 2)
    sp.cost_draft = 1.0  # hopeless: still probe, at the longest interval
    assert sp.probe_every(4) == PROBE_MAX_EVERY
    # served iterations: plain steps carrying a probe took 6 ms more than those without, though the draft step alone
    # took 2 ms (a CPU's cores shared by both): the interval follows the 6 ms (0.6 / 32 < 2 % < 0.6 / 16)
    sp.cost_draft = 0.002
    for _ in range(4):
        sp.record_iteration("plain", 4, 0.010)
        sp.record_iteration("probe", 4, 0.016)
    assert sp.probe_every(4) == 32
    for _ in range(5):  # probes that look free never go below the draft step's own cost
        sp.record_iteration("probe", 4, 0.0)
    assert sp.probe_every(4) == 16
    sp.policy = "always"
    assert sp.num_to_speculate(4) == 4 and not sp.shadow_due(4, PROBE_MAX_EVERY)


def test_shadow_probe_measures_the_accepted_length():
    """A shadow probe's drafts are checked against the tokens decoded after them: the accepted length is the count
    of leading matches, as a spec step would have found; other requests' tokens, tokens before the drafts' first
    position, and a request that ends first do not count; one probe is open at a time."""
    from types import SimpleNamespace

    sp = _policy()
    req, other = SimpleNamespace(finish_time=None), SimpleNamespace(finish_time=None)
    sp.open_shadow(req, base=5)
    assert not sp.shadow_due(1, 16)  # still open
    sp.shadow_drafts(req, np.array([[7, 8, 9]]), 0.001)
    for index, token in [(4, 1), (5, 7), (5, 0)]:  # index 4 is before the drafts; the repeat of 5 is the other request
        sp.observe(other if token == 0 else req, index, token)
    sp.observe(req, 6, 8)
    assert sp.num_tau_samples == 0  # 7, 8 right so far
    sp.observe(req, 7, 3)  # third draft wrong: accepted 2, tau sample 3, shrunk towards 1 (first sample)
    assert sp.shadow is None and sp.num_shadow_probes == 1 and sp.tau == (3 + 2) / 3
    sp.open_shadow(req, base=0)
    sp.shadow_drafts(req, np.array([[4, 4, 4]]), 0.001)
    for i in range(3):
        sp.observe(req, i, 4)  # every draft right: accepted 3
    assert sp.shadow is None and sp.num_shadow_probes == 2 and sp.num_tau_samples == 2
    sp.open_shadow(req, base=0)
    req.finish_time = 1.0  # ended before the probe resolved: dropped, a new one may open
    assert sp.shadow_due(1, 16) and sp.shadow is None and sp.num_shadow_probes == 2
    assert sp.cost_draft == pytest.approx(0.001)


def test_one_lucky_block_does_not_switch_speculation_on():
    """tau starts as an optimistic prior (so the first block is tried), then is a running mean shrunk towards 1: one
    block of 7 accepted tokens where a spec step costs 4.85 plain steps must not make every step speculate."""
    sp = _policy(plain={1: 0.049}, spec={1: 0.2377})
    sp.tau = 8.5
    assert sp._pays(1)  # the prior: try it
    sp.record_step(np.array([6]))
    assert not sp._pays(1) and sp.tau == (7 + 2) / 3
    for _ in range(30):  # a drafter that really does accept ~5 tokens a block wins it back
        sp.record_step(np.array([5]))
    assert sp._pays(1)


def test_noisy_tau_does_not_switch_speculation_on():
    """The same mean tau (3.5, break-even 3.2) with a wide spread of blocks (1 and 6 tokens) keeps plain decoding, with
    a narrow one (3 and 4) speculates: the decision uses tau less one standard error."""
    for blocks, pays in (([0, 5], False), ([2, 3], True)):
        sp = _policy(plain={8: 0.1}, spec={8: 0.32})
        for i in range(60):
            sp.record_step(np.array([blocks[i % 2]] * 8))
        assert abs(sp.tau - 3.5) < 0.3 and sp._pays(8) == pays, (blocks, sp.tau, sp.tau_low())


def test_served_costs_replace_warm_up_costs_only_in_pairs():
    """The break-even is a spec step's cost over a plain step's, both from warm-up or both from serving (medians of
    served iterations), never one of each: a served plain cost (host work included) set against a bare warm-up spec
    cost made an H200 engine see 1.79 where serving paid 1.2, and decode plainly at tau 2.1."""
    from dflash_jax.spec_state import SERVED_MIN, SERVED_WINDOW

    sp = _policy(plain={8: 0.0019}, spec={8: 0.0034})
    sp.tau, sp.tau_var, sp.num_tau_samples = 1.6, 0.0, 50
    assert sp.spec_ratio(8) == pytest.approx(0.0034 / 0.0019) and not sp._pays(8)
    for _ in range(SERVED_WINDOW):
        sp.record_iteration("plain", 8, 0.0028)
    assert sp.spec_ratio(8) == pytest.approx(0.0034 / 0.0019)  # plain served, spec not yet: still warm-up's pair
    for i in range(SERVED_MIN):
        sp.record_iteration("spec", 7, 0.0034)
    assert sp.spec_ratio(8) == pytest.approx(0.0034 / 0.0028) and sp._pays(8)  # 1.21 < 1.6
    for _ in range(SERVED_MIN - 1):  # stalled iterations (fewer than half the window) do not move the median
        sp.record_iteration("plain", 8, 0.5)
    assert sp.spec_ratio(8) == pytest.approx(0.0034 / 0.0028)
    for _ in range(SERVED_WINDOW):  # a lasting change does, once it fills the window
        sp.record_iteration("spec", 8, 0.0056)
    assert sp.spec_ratio(8) == pytest.approx(2.0) and not sp._pays(8)
    assert sp.stats()["spec_over_plain"] == {8: 2.0} and sp.stats()["served_plain_ms"] == {8: 2.8}


def test_adaptive_engine_stops_speculating_when_it_loses(target):
    """A random drafter (acceptance ~0) on CPU, where a verify costs more than a plain step: after the first probes the
    engine decodes plainly, except rare probes; the output still equals plain decoding."""
    dc = TINY_DRAFTER
    eng = Engine(target, EngineConfig(num_slots=2, ctx_size=512, ctx_per_slot=256, page_size=8, prefill_chunk=16,
                                      draft_max=BLOCK - 1, spec_policy="adaptive"),
                 LoadedDrafter(dc, random_drafter(dc, 3)))
    eng.warmup(progress=False)
    eng.start()
    try:
        prompts = [[5, 6, 7, 8], [9, 10, 11]]
        out = run(eng, [Request(p, SamplingParams(max_tokens=150, ignore_eos=True)) for p in prompts])
        sp = eng.stats()["speculative"]
    finally:
        eng.stop()
    assert [t for t, _, _ in out] == _reference(target, prompts, [150, 150])
    costs = sp["cost_spec_ms"][2] / sp["cost_plain_ms"][2]
    if costs <= 1.2:
        pytest.skip(f"a spec step costs only {costs:.2f}x a plain step here; nothing to stop")
    # ~150 decode steps: the first spec step (one slot) replaces the optimistic prior with the measured tau (~1 for a
    # random drafter); from then on only shadow probes (draft steps, no verify) keep measuring it
    # (1-slot spec probes, before shadows: ~10 blocks). Probes come every 4th to 256th step, by the measured cost of
    # a draft step against a plain one: at least half the steps' worth at the interval the engine ended with.
    every = eng.spec.probe_every(2)
    assert sp["tau"] < 1.5 and sp["num_drafts"] <= 3, sp
    assert sp["num_shadow_probes"] >= max(1, 150 // every // 2), (every, sp)


def test_shadow_probes_take_every_slot_in_turn(target):
    """Probes come every PROBE_EVERY-th step (a power of two): with 4 slots decoding, choosing the probed slot by the
    step number probed one request only (its tau stood for all of them: 5.1 against a mean of 2.6 on SmolLM2's chat
    prompts). Every request must be probed, about equally often."""
    from dflash_jax.spec_state import PROBE_EVERY

    dc = TINY_DRAFTER
    eng = Engine(target, EngineConfig(num_slots=4, ctx_size=1024, ctx_per_slot=256, page_size=8, prefill_chunk=16,
                                      draft_max=BLOCK - 1, spec_policy="adaptive"),
                 LoadedDrafter(dc, random_drafter(dc, 3)))
    eng.warmup(progress=False)
    probed = []
    open_shadow = eng.spec.open_shadow
    eng.spec.open_shadow = lambda req, base: (probed.append(req), open_shadow(req, base))[1]  # records, then opens
    # the shortest interval whatever the draft step costs here (a tiny drafter costs about what its target does,
    # which stretches the interval to 64 steps: two probes in this run)
    eng.spec.probe_every = lambda num_slots: PROBE_EVERY
    eng.start()
    try:
        reqs = [Request([5 + i, 6, 7, 8], SamplingParams(max_tokens=150, ignore_eos=True)) for i in range(4)]
        out = run(eng, reqs)
    finally:
        eng.stop()
    assert [t for t, _, _ in out] == _reference(target, [r.prompt_ids for r in reqs], [150] * 4)
    if len(probed) < 8:
        pytest.skip(f"only {len(probed)} probes (the engine kept speculating)")
    counts = [sum(p is r for p in probed) for r in reqs]
    assert min(counts) >= len(probed) // 4 - 2, counts


def test_draft_step_gives_the_spec_steps_drafts(target):
    """The shadow probe's draft-only step drafts exactly what a spec step from the same state verifies (a live slot
    a few tokens into decoding, its last token and length read from the device rows)."""
    dc = TINY_DRAFTER
    eng = Engine(target, EngineConfig(num_slots=2, ctx_size=512, ctx_per_slot=256, page_size=8, prefill_chunk=16,
                                      draft_max=BLOCK - 1, spec_policy="adaptive", overlap=False),
                 LoadedDrafter(dc, random_drafter(dc, 5)))
    eng.warmup(progress=False)
    req = Request([5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=60, ignore_eos=True))
    eng.submit(req)
    while req.num_generated < 4:
        eng.step()
    slot = next(sl for sl in eng.scheduler.slots if sl.req is req)
    inputs = eng._spec_inputs([slot], 1)
    drafts = np.asarray(eng._dispatch_draft(inputs))
    eng.cache, eng.spec.cache, eng.rows, out = eng.steps.spec_step(eng.cache, eng.spec.cache, eng.rows, inputs, False)
    assert drafts.shape == (1, BLOCK - 1) and (drafts == np.asarray(out.drafts)).all()


def test_first_block_speculates_one_slot():
    """Before tau is measured at all, only one slot speculates: learning it must not cost a full-bucket spec step."""
    sp = _policy(plain={8: 0.010}, spec={8: 0.030})
    sp.tau = 4.5
    assert sp.num_to_speculate(8) == 1  # optimistic prior, nothing measured yet
    sp.num_tau_samples = 5
    assert sp.num_to_speculate(8) == 8  # 4.5 x 10 ms > 30 ms
    sp.tau = 1.2
    assert sp.num_to_speculate(8) == 0


def test_first_tau_comes_from_a_probe_where_a_block_is_costly():
    """Where one slot's block costs more than FIRST_BLOCK_MAX_RATIO plain steps (a CPU), the prior does not buy a
    real block: the engine decodes plainly and its first shadow probe measures tau; where it is cheap, one slot's
    block does."""
    from dflash_jax.spec_state import FIRST_BLOCK_MAX_RATIO

    sp = _policy(plain={1: 0.010, 8: 0.030}, spec={1: 0.029, 8: 0.140})
    sp.tau = 8.5
    assert sp.spec_ratio(1) > FIRST_BLOCK_MAX_RATIO and sp._pays(8)
    assert sp.num_to_speculate(8) == 0 and sp.shadow_due(8, 0)
    sp.cost_spec[1] = 0.015
    assert sp.num_to_speculate(8) == 1


def test_wide_verify_steps_get_their_own_xla_options(monkeypatch):
    """Spec steps of 4 x 16 verify rows or more compile without XLA's Triton products and autotuner on a GPU (cuBLAS
    streams them faster, step_fns.WIDE_VERIFY_ROWS); plain steps, narrow spec steps and the batch-invariant mode keep
    XLA's defaults; $DFLASH_XLA_STEP_OPTIONS replaces the choice for every step, $DFLASH_WIDE_SPEC_OPTIONS for the wide
    spec steps alone, with their values parsed."""
    from dflash_jax import step_fns
    monkeypatch.delenv("DFLASH_XLA_STEP_OPTIONS", raising=False)
    monkeypatch.delenv("DFLASH_WIDE_SPEC_OPTIONS", raising=False)
    assert step_fns.step_compiler_options("spec", 128) is None  # not a GPU here
    monkeypatch.setattr(step_fns.jax, "default_backend", lambda: "gpu")
    wide = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0}
    assert step_fns.step_compiler_options("spec", 128) == wide
    assert step_fns.step_compiler_options("spec", 256) == wide
    assert step_fns.step_compiler_options("spec", 64) == wide
    assert step_fns.step_compiler_options("spec", 32) is None
    assert step_fns.step_compiler_options("plain", 128) is None
    assert step_fns.step_compiler_options("spec", 128, invariant=True) is None
    monkeypatch.setenv("DFLASH_WIDE_SPEC_OPTIONS", "xla_gpu_enable_triton_gemm=false")
    assert step_fns.step_compiler_options("spec", 128) == {"xla_gpu_enable_triton_gemm": False}
    assert step_fns.step_compiler_options("plain", 128) is None
    monkeypatch.setenv("DFLASH_XLA_STEP_OPTIONS", "xla_gpu_enable_triton_gemm=true, xla_gpu_autotune_level=0,x=y")
    assert step_fns.step_compiler_options("plain") == {"xla_gpu_enable_triton_gemm": True,
                                                       "xla_gpu_autotune_level": 0, "x": "y"}


def test_serving_drafter_layout():
    """SpecState serves the drafter in its serving layout (`for_serving`: gate and up as one Linear, q/k/v as one,
    the context k/v projections of every layer as one more): same MLP outputs, same context K/V written to the cache
    and same block hidden states as the GGUF layout, converting twice is a no-op, and the engine's drafter is the
    converted one."""
    from dflash_jax.engine import EngineConfig
    from dflash_jax.kv_cache import AttentionMeta, KVCache
    from dflash_jax.models.drafter import for_serving
    from dflash_jax.spec_state import SpecState
    d = random_drafter(TINY_DRAFTER, 0)
    f = for_serving(d)
    x = jax.random.normal(jax.random.key(1), (2, 5, TINY_DRAFTER.hidden_size), jnp.float32)
    for a, b in zip(d.layers, f.layers):
        assert b.mlp.gate_proj is None and b.mlp.gate_up_proj is not None
        np.testing.assert_allclose(np.asarray(b.mlp(x)), np.asarray(a.mlp(x)), rtol=1e-6, atol=1e-6)
    assert for_serving(f) is f
    # context K/V: 2 slots x 5 tokens at positions 3.., pages of 8 (slot s on pages 2s, 2s+1); one row invalid
    c = TINY_DRAFTER
    feats = jax.random.normal(jax.random.key(2), (2, 5, len(c.target_layer_ids) * c.hidden_size), jnp.float32)
    positions = 3 + jnp.tile(jnp.arange(5, dtype=jnp.int32), (2, 1))
    valid = jnp.ones((2, 5), bool).at[1, 4].set(False)
    meta = AttentionMeta(q_lens=jnp.array([5, 5], jnp.int32), kv_lens=jnp.array([8, 8], jnp.int32),
                         page_table=jnp.array([[0, 1], [2, 3]], jnp.int32))
    cache = KVCache.create(c.num_layers, 5, 8, c.num_kv_heads, c.head_dim, jnp.float32)
    want = d.write_context(feats, meta, positions, valid, cache)
    got = f.write_context(feats, meta, positions, valid, cache)
    for a, b in zip(want.k + want.v, got.k + got.v):
        assert float(jnp.max(jnp.abs(a))) > 0
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    # the block forward (fused q/k/v) over that context: same hidden states
    assert all(b.self_attn.q_proj is None and b.self_attn.qkv_proj is not None for b in f.layers)
    blk = jax.random.normal(jax.random.key(3), (2, 4, c.hidden_size), jnp.float32)
    ctx_lens = jnp.array([8, 7], jnp.int32)
    h_want, h_got = d(blk, ctx_lens, meta.page_table, want), f(blk, ctx_lens, meta.page_table, got)
    assert float(jnp.max(jnp.abs(h_want))) > 0
    np.testing.assert_allclose(np.asarray(h_got), np.asarray(h_want), rtol=1e-5, atol=1e-5)
    st = SpecState(LoadedDrafter(TINY_DRAFTER, d), EngineConfig(num_slots=2, ctx_size=256, ctx_per_slot=128,
                                                                page_size=8, draft_max=BLOCK - 1), 40, jnp.float32)
    assert nnx.merge(st.graphdef, st.state).ctx_kv is not None


@pytest.mark.parametrize("layout", ["float", "kn", "nk"])
def test_draft_head_rows_give_the_whole_heads_logits_of_those_tokens(tmp_path, monkeypatch, layout):
    """A draft vocabulary's head (`draft_head_rows`) computes, for its tokens, the logits the target's whole head
    gives them: the tied float embedding, and a Q8_0 head in both stored layouts (the Mosaic kernel's (out, in)
    padded rows run here in its interpret mode)."""
    from dflash_jax.models.dense import Linear
    from dflash_jax.models.drafter import draft_head_rows

    monkeypatch.setenv("DFLASH_MATMUL_IMPL", "mgpu_interpret" if layout == "nk" else "reference")
    path = tmp_path / "llama-q8.gguf"
    write_random_gguf(str(path), dataclasses.replace(PRESETS["llama-tiny"], vocab_size=VOCAB, qtype="q8_0"), None,
                      seed=4)
    tgt = load_model(path, jnp.float32, weights="bf16" if layout == "float" else "q8_0").model
    ids = np.array([3, 0, 17, 200, VOCAB - 1, 64, 65, 9], np.int32)  # any order, the vocabulary's ends included
    rows = draft_head_rows(tgt, ids)
    q8 = "qweight" in rows
    assert q8 == (layout != "float") and (not q8 or tgt.lm_head.q8_layout == layout)
    head = Linear(tgt.embed_tokens.shape[1], len(ids), jnp.float32, q8_0=q8)
    graphdef, state = nnx.split(head)
    state.replace_by_pure_dict(rows)
    h = jnp.asarray(np.random.default_rng(0).standard_normal((3, tgt.embed_tokens.shape[1])), jnp.float32)
    got = np.asarray(nnx.merge(graphdef, state)(h), np.float32)
    want = np.asarray(tgt.logits(h))[:, ids]
    assert got.shape == want.shape and np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_draft_vocabulary_engine_equals_plain_without_compiles(target):
    """--draft-vocab N: the engine drafts through a head of the first N ids (`_draft` maps its argmax back: the test
    below), and output still equals plain decoding (verification uses the whole head), for concurrent requests with
    every slot speculating, with nothing compiled after warm-up."""
    dc, n = TINY_DRAFTER, VOCAB // 4
    with pytest.raises(ValueError, match="exceeds"):
        Engine(target, EngineConfig(num_slots=2, ctx_size=512, page_size=8, draft_max=BLOCK - 1,
                                    draft_vocab=VOCAB + 1), LoadedDrafter(dc, random_drafter(dc, 6)))
    eng = Engine(target, EngineConfig(num_slots=4, ctx_size=1024, ctx_per_slot=160, page_size=8, prefill_chunk=16,
                                      draft_max=BLOCK - 1, spec_policy="always", overlap=False, draft_vocab=n),
                 LoadedDrafter(dc, random_drafter(dc, 6)))
    served = nnx.merge(eng.spec.graphdef, eng.spec.state)  # the engine drafts through the draft vocabulary's head
    assert served.draft_head is not None and np.asarray(served.draft_ids[...]).tolist() == list(range(n))
    assert eng.stats()["speculative"]["draft_vocab"] == n
    serves_like_plain(eng, target, 11)


def serves_like_plain(eng, target, seed: int) -> None:
    """Warm `eng` up and serve four concurrent requests on it: their output is plain greedy decoding's, nothing
    compiles after warm-up, and every request drafted."""
    eng.warmup(progress=False)
    eng.start()
    try:
        prompts, max_new = _workload(np.random.default_rng(seed), 4)
        reqs = [Request(p, SamplingParams(max_tokens=m, ignore_eos=True)) for p, m in zip(prompts, max_new)]
        out = run(eng, reqs)
        _assert_no_compiles(eng)
    finally:
        eng.stop()
    assert [toks for toks, _, _ in out] == _reference(target, prompts, max_new)
    assert all(r.draft_n > 0 for r in reqs)


def test_draft_vocabulary_maps_its_argmax_back_to_token_ids(target):
    """The drafts of a draft vocabulary in any order are the argmax of the whole head's logits over those tokens,
    mapped back to their ids (an identity id map could hide a missing mapping)."""
    from dflash_jax.kv_cache import KVCache
    from dflash_jax.models.drafter import draft_head_rows, for_serving
    from dflash_jax.step_fns import _draft
    dc = TINY_DRAFTER
    d = random_drafter(dc, 8)
    ids = np.random.default_rng(2).permutation(VOCAB)[:VOCAB // 3].astype(np.int32)
    full, sub = for_serving(d), for_serving(d, (ids, draft_head_rows(target.model, ids)))
    b = 3
    last = jnp.array([5, 77, 300], jnp.int32)
    cached = jnp.zeros((b,), jnp.int32)
    page_table = jnp.zeros((b, 2), jnp.int32)
    dcache = KVCache.create(dc.num_layers, 4, 8, dc.num_kv_heads, dc.head_dim, jnp.float32)
    got = np.asarray(_draft(target.model, sub, dc.mask_token_id, None, last, cached, page_table, dcache, BLOCK))
    block = jnp.concatenate([last[:, None], jnp.full((b, BLOCK - 1), dc.mask_token_id, jnp.int32)], axis=1)
    h = full(jnp.take(target.model.embed_tokens[...], block, axis=0), cached, page_table, dcache)
    logits = np.asarray(target.model.logits(h[:, 1:]))
    want = ids[np.argmax(logits[..., ids], axis=-1)]
    assert got.shape == (b, BLOCK - 1) and np.isin(got, ids).all()
    np.testing.assert_array_equal(got, want)
