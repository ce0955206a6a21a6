"""Engine equivalences on a tiny random model: batched == alone, chunked prefill == one-shot, no compiles after warm-up,
seeded sampling independent of the batch, stop strings, cancellation, page bookkeeping."""
from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.checkpoint import load_model
from converters.synthetic import PRESETS, write_random_gguf
from dflash_jax.buckets import bucket_for, pad_rows, power_of_two_buckets
from dflash_jax.engine import Engine, EngineConfig
from dflash_jax.page_allocator import PageAllocator
from dflash_jax.reference_decode import greedy_generate
from dflash_jax.requests import Request, SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama-tiny.gguf"
    write_random_gguf(str(path), dataclasses.replace(PRESETS["llama-tiny"], vocab_size=512), None, seed=7)
    return load_model(str(path), jnp.float32)


@pytest.fixture(scope="module")
def engine(tiny):
    eng = Engine(tiny, EngineConfig(num_slots=4, ctx_size=1024, ctx_per_slot=128, page_size=8, prefill_chunk=16,
                                    overlap=True))  # the GPU default; other engines here run the CPU default (off)
    eng.warmup(progress=False)
    eng.start()
    yield eng
    eng.stop()


@contextlib.contextmanager
def serving(engine):
    """The engine warmed up and running for the block, stopped after it."""
    engine.warmup(progress=False)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def run(engine, reqs):
    for r in reqs:
        engine.submit(r)
    out = []
    for r in reqs:
        toks, text, reason = [], "", None
        while reason is None:
            e = r.events.get(timeout=120)
            if e.token_id is not None:
                toks.append(e.token_id)
            text += e.text
            reason = e.finish_reason
        out.append((toks, text, reason))
    return out


def prompts_for(rng, n, vocab):
    # Lengths around the page (8) and chunk (16) boundaries, and longer than one chunk.
    lengths = [1, 3, 7, 8, 9, 15, 16, 17, 33, 50][:n]
    return [rng.integers(3, vocab, size=k).tolist() for k in lengths]


def test_buckets():
    assert power_of_two_buckets(8) == (1, 2, 4, 8)
    assert power_of_two_buckets(6) == (1, 2, 4, 6)
    assert bucket_for(3, (1, 2, 4, 8)) == 4
    with pytest.raises(ValueError):
        bucket_for(9, (1, 2, 4, 8))
    assert pad_rows(np.ones((2, 3)), 4).shape == (4, 3)


def test_page_allocator_invariants():
    a = PageAllocator(10)
    got = a.alloc(4) + a.alloc(5)
    assert 0 not in got and len(set(got)) == 9 and a.num_free == 0
    with pytest.raises(MemoryError):
        a.alloc(1)
    a.free(got[:4])
    with pytest.raises(AssertionError):
        a.free(got[:1])
    a.free(got[4:])
    assert a.num_free == 9


def test_batched_equals_alone_and_chunked_prefill(engine, tiny):
    rng = np.random.default_rng(0)
    prompts = prompts_for(rng, 10, tiny.config.vocab_size)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (5, 9, 12, 3, 7, 10, 4, 8, 11, 6)]
    together = run(engine, [Request(p, sp) for p, sp in zip(prompts, params)])  # 10 requests over 4 slots
    for p, sp, (toks, _, reason) in zip(prompts, params, together):
        alone, _ = greedy_generate(tiny.model, [p], sp.max_tokens)  # one-shot prefill, no scheduler
        assert toks == alone[0]
        assert reason == "length"
    assert engine.stats()["busy_slots"] == 0
    assert engine.scheduler.allocator.num_free == engine.scheduler.allocator.num_pages - 1


def test_no_compiles_after_warmup(engine, tiny):
    compiles = []

    def listener(event, duration, **kwargs):
        if event.startswith("/jax/core/compile/"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(1)
        prompts = prompts_for(rng, 10, tiny.config.vocab_size)
        mixed = [SamplingParams(max_tokens=6, temperature=0.8, top_k=5, seed=3),
                 SamplingParams(max_tokens=4, top_p=0.5, temperature=1.0),
                 SamplingParams(max_tokens=5, min_p=0.2, temperature=1.2, presence_penalty=1.0),
                 SamplingParams(max_tokens=7, frequency_penalty=0.5, logprobs=True, top_logprobs=5),
                 SamplingParams(max_tokens=3, stop=("a",))]
        # the last three prompts again, queued behind the rest: they start from cached prefix pages
        repeats = [Request(p, mixed[0]) for p in prompts[-3:]]
        run(engine, [Request(p, mixed[i % len(mixed)]) for i, p in enumerate(prompts)] + repeats)
    finally:
        jax.monitoring.clear_event_listeners()
    assert compiles == [] and all(r.num_cached_prompt for r in repeats)
    # Warm-up's executables served every step: the jitted fallback never traced (it would have compiled twice).
    assert engine.steps._jitted["plain"]._cache_size() == 0


def test_seeded_sampling_independent_of_batch(engine, tiny):
    rng = np.random.default_rng(2)
    prompt = rng.integers(3, tiny.config.vocab_size, size=12).tolist()
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=1234, ignore_eos=True)
    alone = run(engine, [Request(prompt, sp)])[0][0]
    others = [Request(rng.integers(3, tiny.config.vocab_size, size=5).tolist(),
                      SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)) for _ in range(3)]
    crowd = run(engine, others[:2] + [Request(prompt, sp)] + others[2:])[2][0]
    assert alone == crowd
    different = run(engine, [Request(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=99,
                                                            ignore_eos=True))])[0][0]
    assert different != alone  # could collide only if the model were nearly deterministic


def test_logit_bias_bans_and_forces_tokens_of_its_row_only(engine, tiny):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, tiny.config.vocab_size, size=k).tolist() for k in (7, 4, 11)]
    plain = [run(engine, [Request(p, SamplingParams(max_tokens=8, ignore_eos=True))])[0][0] for p in prompts]
    banned = tuple((t, -100.0) for t in sorted(set(plain[0])))  # every token greedy decoding chose
    forced = ((5, 100.0),)
    out = run(engine, [Request(prompts[0], SamplingParams(max_tokens=8, ignore_eos=True, logit_bias=banned)),
                       Request(prompts[1], SamplingParams(max_tokens=8, ignore_eos=True)),
                       Request(prompts[2], SamplingParams(max_tokens=8, ignore_eos=True, logit_bias=forced))])
    assert not set(out[0][0]) & set(plain[0])
    assert out[1][0] == plain[1]  # the unbiased row beside them decodes as it does alone
    assert out[2][0] == [5] * 8
    first = []
    for bias in (forced, ()):
        req = Request(prompts[1], SamplingParams(max_tokens=1, logprobs=True, ignore_eos=True, logit_bias=bias))
        engine.submit(req)
        e = req.events.get(timeout=120)
        first.append((e.token_id, e.logprob))
    (tok_b, lp_b), (tok, lp) = first
    assert tok_b == 5 != tok and lp_b < lp  # the reported logprob is the model's, not the biased one


def test_logprobs_and_filters(engine, tiny):
    rng = np.random.default_rng(3)
    prompt = rng.integers(3, tiny.config.vocab_size, size=6).tolist()
    greedy = run(engine, [Request(prompt, SamplingParams(max_tokens=6, ignore_eos=True))])[0][0]
    # top_k=1 and min_p=1 leave only the argmax: sampling must reproduce greedy.
    for sp in (SamplingParams(max_tokens=6, temperature=1.5, top_k=1, ignore_eos=True),
               SamplingParams(max_tokens=6, temperature=1.5, min_p=1.0, ignore_eos=True)):
        assert run(engine, [Request(prompt, sp)])[0][0] == greedy
    req = Request(prompt, SamplingParams(max_tokens=3, logprobs=True, top_logprobs=4, ignore_eos=True))
    engine.submit(req)
    e = req.events.get(timeout=60)
    assert e.logprob is not None and e.logprob <= 0 and len(e.top_logprobs) == 4
    assert e.top_logprobs[0][0] == e.token_id and abs(e.top_logprobs[0][1] - e.logprob) < 1e-5
    while e.finish_reason is None:
        e = req.events.get(timeout=60)


def test_stop_string_cuts_text(engine, tiny):
    rng = np.random.default_rng(4)
    prompt = rng.integers(3, tiny.config.vocab_size, size=9).tolist()
    toks, text, _ = run(engine, [Request(prompt, SamplingParams(max_tokens=20, ignore_eos=True))])[0]
    assert len(text) > 4
    stop = text[2:4]
    _, cut, reason = run(engine, [Request(prompt, SamplingParams(max_tokens=20, ignore_eos=True,
                                                                 stop=(stop,)))])[0]
    assert reason == "stop" and cut == text[:text.find(stop)]


def test_slot_reused_after_a_stop_while_a_step_is_in_flight(tiny):
    """With one slot, a stop string ends request A while the engine has already launched A's next step; B then takes
    the slot and the pages that step writes into. B must come out as if run alone."""
    eng = Engine(tiny, EngineConfig(num_slots=1, ctx_size=256, page_size=8, prefill_chunk=16, overlap=True))
    eng.warmup(progress=False)
    eng.start()
    try:
        rng = np.random.default_rng(5)
        pa, pb = (rng.integers(3, tiny.config.vocab_size, size=k).tolist() for k in (9, 20))
        _, text, _ = run(eng, [Request(pa, SamplingParams(max_tokens=20, ignore_eos=True))])[0]
        stop = text[2:4]
        (_, cut, reason), (toks_b, _, _) = run(eng, [
            Request(pa, SamplingParams(max_tokens=20, ignore_eos=True, stop=(stop,))),
            Request(pb, SamplingParams(max_tokens=12, ignore_eos=True))])
        assert reason == "stop" and cut == text[:text.find(stop)]
        assert toks_b == greedy_generate(tiny.model, [pb], 12)[0][0]
        assert eng.scheduler.allocator.num_free == eng.scheduler.allocator.num_pages - 1
    finally:
        eng.stop()


def test_one_chunk_bucket_serves_every_prompt_length(tiny):
    """chunk_sizes=(16,): every prefill chunk, 1 to 16 tokens, runs padded in the one 16-token bucket; outputs equal
    one-shot greedy decoding. Bad bucket lists are refused."""
    eng = Engine(tiny, EngineConfig(num_slots=2, ctx_size=256, page_size=8, prefill_chunk=16, chunk_sizes=(16,)))
    assert eng.cfg.chunk_buckets == (16,)
    eng.warmup(progress=False)
    eng.start()
    try:
        rng = np.random.default_rng(6)
        prompts = prompts_for(rng, 6, tiny.config.vocab_size)
        outs = run(eng, [Request(p, SamplingParams(max_tokens=5, ignore_eos=True)) for p in prompts])
        for p, (toks, _, _) in zip(prompts, outs):
            assert toks == greedy_generate(tiny.model, [p], 5)[0][0]
    finally:
        eng.stop()
    for bad in ((), (8,), (16, 4), (4, 4, 16), (0, 16)):
        with pytest.raises(ValueError, match="chunk_sizes"):
            EngineConfig(prefill_chunk=16, chunk_sizes=bad)
    with pytest.raises(ValueError, match="prefix_states"):
        EngineConfig(prefix_states=-1)


def test_serve_ubatch_buckets_flag():
    """--ubatch-buckets reaches EngineConfig.chunk_sizes; a list that does not end at -ub stops the server before
    it loads anything."""
    from serve.__main__ import main
    from serve.cli import engine_config_kwargs, parse_args

    kwargs = engine_config_kwargs(parse_args(["-ub", "128", "--ubatch-buckets", "32,128"]), EngineConfig, "cpu")
    assert EngineConfig(**kwargs).chunk_buckets == (32, 128)
    with pytest.raises(SystemExit, match="chunk_sizes"):
        main(["--ubatch-buckets", "64", "-ub", "256"])
    assert engine_config_kwargs(parse_args(["--draft-short", "0"]), EngineConfig, "cpu")["draft_short"] == 0
    with pytest.raises(SystemExit, match="draft_short"):
        main(["--draft-short", "-1"])
    assert engine_config_kwargs(parse_args(["--draft-vocab", "32000"]), EngineConfig, "cpu")["draft_vocab"] == 32000
    with pytest.raises(SystemExit):
        parse_args(["--draft-vocab", "0"])


def test_cancel_frees_slot(engine, tiny):
    req = Request([5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.submit(req)
    req.events.get(timeout=60)
    req.cancel()
    e = req.events.get(timeout=60)
    while e.finish_reason is None:
        e = req.events.get(timeout=60)
    assert e.finish_reason == "cancelled"
    assert engine.stats()["busy_slots"] == 0


def test_prompt_too_long_is_rejected(engine):
    with pytest.raises(ValueError, match="context per slot"):
        engine.submit(Request(list(range(3, 3 + 128)), SamplingParams()))


def test_q8_0_model_serves_like_its_dequantized_load(tmp_path):
    """A Q8_0 file served with its projections kept as int8 + scales gives the tokens of the same file dequantized at
    load (f32 here, where the Q8_0 product is exact), through the whole engine: scheduler, buckets, donated caches."""
    path = tmp_path / "llama-tiny-q8_0.gguf"
    write_random_gguf(str(path), dataclasses.replace(PRESETS["llama-tiny"], vocab_size=512, qtype="q8_0"), None,
                      seed=8)
    q8, dequantized = load_model(str(path), jnp.float32, weights="q8_0"), load_model(str(path), jnp.float32, weights="bf16")
    assert q8.model.layers[0].mlp.gate_up_proj.is_q8_0 and not dequantized.model.layers[0].mlp.gate_up_proj.is_q8_0
    eng = Engine(q8, EngineConfig(num_slots=2, ctx_size=256, ctx_per_slot=64, page_size=8, prefill_chunk=16))
    eng.warmup(progress=False)
    eng.start()
    try:
        prompts = prompts_for(np.random.default_rng(2), 3, 512)
        got = run(eng, [Request(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in prompts])
    finally:
        eng.stop()
    for p, (toks, _, _) in zip(prompts, got):
        assert toks == greedy_generate(dequantized.model, [p], 6)[0][0]
