"""Prefix caching: the allocator's held / idle / free pages and their keys, and engines that reuse an earlier prompt's
pages giving what they give without reusing them (plain and DFlash), under eviction pressure too."""
from __future__ import annotations

import numpy as np
import pytest

from dflash_jax.engine import Engine, EngineConfig
from dflash_jax.page_allocator import PageAllocator, page_keys
from dflash_jax.requests import Request, SamplingParams
from dflash_jax.spec_state import LoadedDrafter
from tests.test_dflash import BLOCK, TINY_DRAFTER, VOCAB, _reference, random_drafter, tiny_target
from tests.test_engine import run, serving


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_target(tmp_path_factory)


def test_page_keys_name_the_whole_prefix():
    a = list(range(3, 35))
    b = a[:16] + [99] + a[17:]  # differs in the third page of 8
    ka, kb = page_keys(a, 8, 4), page_keys(b, 8, 4)
    assert len(ka) == 4 and len(set(ka)) == 4
    assert ka[:2] == kb[:2] and ka[2] != kb[2] and ka[3] != kb[3]  # page 4's tokens agree, its prefix does not
    assert page_keys(a[8:16] + a[8:16], 8, 2)[1] != page_keys(a, 8, 2)[1]  # same page tokens, other prefix
    assert page_keys(a, 8, 0) == []


def test_allocator_holds_idles_and_evicts_prefix_pages():
    a = PageAllocator(7)  # 6 real pages
    keys = page_keys(list(range(40)), 8, 4)
    pages = a.alloc(4)
    for p, k in zip(pages, keys):
        a.register(p, k)
    assert a.match(keys) == pages and a.num_free == 2 and a.num_cached == 4
    a.free(pages[::-1])  # as a finished slot frees them: the deepest page becomes the least recently used
    assert a.num_free == 6 and a.match(keys) == pages

    other = page_keys(list(range(8)) + [1] * 32, 8, 4)  # shares the first page only
    assert a.match(other) == pages[:1] and a.match(page_keys([5] * 8, 8, 1)) == []
    a.take(pages[:2])  # two idle pages held again: they no longer count as free
    assert a.num_idle(pages) == 2 and a.num_free == 4
    a.register(pages[0], other[0])  # already keyed: unchanged
    assert a.match(other) == pages[:1]

    got = a.alloc(3)  # 2 free pages, then the least recently used idle one: the chain's tail (page 4)
    assert pages[3] in got and a.match(keys) == pages[:3] and a.num_free == 1
    with pytest.raises(MemoryError):
        a.alloc(2)
    dup = got[0]
    a.register(dup, keys[0])  # a key another page holds: the new page stays unkeyed
    a.free(got)
    assert a.num_free == 4 and a.match(keys) == pages[:3]
    a.free(pages[:2])
    with pytest.raises(AssertionError):
        a.free(pages[:1])
    assert a.num_free == 6 and a.num_cached == 3 and a.match(keys) == pages[:3]


@pytest.fixture(scope="module")
def engines(target):
    """The same small engine with and without the prefix cache (2 slots, 8-token pages, 16-token chunks)."""
    made = []
    for prefix_cache in (True, False):
        eng = Engine(target, EngineConfig(num_slots=2, ctx_size=1024, ctx_per_slot=128, page_size=8,
                                          prefill_chunk=16, prefix_cache=prefix_cache))
        eng.warmup(progress=False)
        eng.start()
        made.append(eng)
    yield made
    for eng in made:
        eng.stop()


def _greedy(prompt, max_new, **kw):
    return Request(prompt, SamplingParams(max_tokens=max_new, ignore_eos=True), **kw)


def test_engine_reuses_a_prompt_prefix_and_matches_the_uncached_engine(engines, target):
    cached, uncached = engines
    rng = np.random.default_rng(11)
    shared = rng.integers(3, VOCAB - 1, size=40).tolist()  # 5 full pages
    prompts = [shared + rng.integers(3, VOCAB - 1, size=5).tolist(),  # A
               shared + rng.integers(3, VOCAB - 1, size=7).tolist(),  # B: A's first 5 pages
               None,  # A again
               shared + rng.integers(3, VOCAB - 1, size=8).tolist()]  # C: 48 tokens, page-aligned
    prompts[2] = prompts[0]
    want_cached = [0, 40, 40, 40]  # never the prompt's last token: its logits are the first output
    before = cached.stats()["prompt_tokens_cached"]
    reqs = []
    for prompt in prompts:  # one after another, so each finds the pages of those before it
        reqs.append(_greedy(prompt, 12))
        run(cached, [reqs[-1]])
    assert [r.num_cached_prompt for r in reqs] == want_cached
    assert cached.stats()["prompt_tokens_cached"] - before == sum(want_cached)

    with_cache = [run(cached, [_greedy(p, 12)])[0][0] for p in prompts]
    without = [run(uncached, [_greedy(p, 12)])[0][0] for p in prompts]
    assert with_cache == without == _reference(target, prompts, [12] * 4)

    # penalties count a request's own tokens from its first computed chunk on, not the slot's previous request's
    penalized = [Request(prompts[3], SamplingParams(max_tokens=16, ignore_eos=True, presence_penalty=1.5,
                                                     frequency_penalty=1.0)) for _ in range(2)]
    assert run(cached, penalized[:1])[0][0] == run(uncached, penalized[1:])[0][0]
    assert penalized[0].num_cached_prompt == 40

    opt_out = _greedy(prompts[1], 12, cache_prompt=False)
    assert run(cached, [opt_out])[0][0] == without[1] and opt_out.num_cached_prompt == 0
    same = _greedy(prompts[1], 12)
    run(uncached, [same])
    assert same.num_cached_prompt == 0 and uncached.stats()["num_pages_cached"] == 0


def test_a_chats_next_turn_reuses_the_reply_pages(engines, target):
    """Turn 2's prompt is turn 1's prompt, its reply and new tokens: every full page that turn 1 fed (all but its
    last sampled token) comes from the cache, and the output is the uncached engine's and the reference's. The
    invariant mode keys prompt pages only (its bits are those of prefill-written pages)."""
    cached, uncached = engines
    rng = np.random.default_rng(31)
    first = rng.integers(3, VOCAB - 1, size=21).tolist()
    reply = run(cached, [_greedy(first, 30)])[0][0]
    second = first + reply + rng.integers(3, VOCAB - 1, size=6).tolist()  # 57 tokens
    req = _greedy(second, 12)
    out = run(cached, [req])[0][0]
    assert req.num_cached_prompt == (21 + 30 - 1) // 8 * 8 == 48  # pages 0-5; page 6 holds the unfed token 50
    assert out == run(uncached, [_greedy(second, 12)])[0][0] == _reference(target, [second], [12])[0]
    assert Engine(target, EngineConfig(num_slots=1, ctx_size=64, ctx_per_slot=64, page_size=8,
                                       batch_invariant=True)).scheduler.cache_generated is False


def test_requests_arriving_together_prefill_a_shared_prefix_once(engines, target):
    """Three prompts with one 40-token prefix, submitted at once to two free slots: the second waits for the first's
    prefill and takes its pages instead of computing them beside it; the third gets a slot later and the pages too."""
    cached, uncached = engines
    rng = np.random.default_rng(23)
    shared = rng.integers(3, VOCAB - 1, size=40).tolist()
    prompts = [shared + rng.integers(3, VOCAB - 1, size=k).tolist() for k in (3, 6, 1)]
    reqs = [_greedy(p, 10) for p in prompts]
    outs = [o[0] for o in run(cached, reqs)]
    assert [r.num_cached_prompt for r in reqs] == [0, 40, 40]
    assert outs == [o[0] for o in run(uncached, [_greedy(p, 10) for p in prompts])]


def test_a_request_waiting_for_a_prefix_lets_others_start(engines, target):
    """A and B share a prefix, C does not; all three arrive at once at two free slots: A starts, B waits for A's
    pages, C takes the second slot meanwhile instead of queueing behind B."""
    cached, uncached = engines
    rng = np.random.default_rng(29)
    shared = rng.integers(3, VOCAB - 1, size=48).tolist()
    prompts = [shared + [7, 8], shared + [9], rng.integers(3, VOCAB - 1, size=20).tolist()]
    reqs = [_greedy(p, 10) for p in prompts]
    outs = [o[0] for o in run(cached, reqs)]
    assert [r.num_cached_prompt for r in reqs] == [0, 48, 0]
    assert reqs[2].start_time < reqs[1].start_time
    assert outs == [o[0] for o in run(uncached, [_greedy(p, 10) for p in prompts])]


def test_prefix_pages_are_evicted_under_pressure_and_outputs_stay_right(target):
    """An 18-page pool: every request takes 7 pages (48 prompt + 8 new tokens), so keyed pages of earlier prompts
    must be evicted for later ones; two slots run at once; nothing is lost or mixed up."""
    with serving(Engine(target, EngineConfig(num_slots=2, ctx_size=144, ctx_per_slot=64, page_size=8,
                                             prefill_chunk=16))) as eng:
        rng = np.random.default_rng(5)
        prompts = [rng.integers(3, VOCAB - 1, size=48).tolist() for _ in range(6)]
        outs = [o[0] for o in run(eng, [_greedy(p, 8) for p in prompts])]
        assert outs == _reference(target, prompts, [8] * 6)
        stats = eng.stats()
        assert stats["num_pages_free"] == 18 and 0 < stats["num_pages_cached"] <= 18
        last, first = _greedy(prompts[-1], 8), _greedy(prompts[0], 8)
        assert [o[0] for o in run(eng, [last])] == outs[-1:] and last.num_cached_prompt == 40
        assert [o[0] for o in run(eng, [first])] == outs[:1] and first.num_cached_prompt < 40  # evicted


@pytest.mark.parametrize("dflash", [False, True])
def test_chats_over_a_small_pool_with_eviction_stay_right(target, dflash):
    """Three chats of three turns, each round's turns submitted together to two slots over a 20-page pool: replies
    and prompts are keyed, matched, shared and evicted while other turns run; every turn's output is the
    reference's, plain or speculating. The second turns find every page the first turns fed."""
    spec = dict(draft_max=BLOCK - 1, spec_policy="always") if dflash else {}
    drafter = LoadedDrafter(TINY_DRAFTER, random_drafter(TINY_DRAFTER, 1)) if dflash else None
    with serving(Engine(target, EngineConfig(num_slots=2, ctx_size=160, ctx_per_slot=80, page_size=8,
                                             prefill_chunk=16, **spec), drafter)) as eng:
        rng = np.random.default_rng(41)
        chats = [rng.integers(3, VOCAB - 1, size=k).tolist() for k in (13, 22, 9)]
        cached = []
        for turn in range(3):
            reqs = [_greedy(c, 12 + 4 * i) for i, c in enumerate(chats)]
            outs = [o[0] for o in run(eng, reqs)]
            assert outs == _reference(target, chats, [r.params.max_tokens for r in reqs]), turn
            cached.append([r.num_cached_prompt for r in reqs])
            chats = [c + o + rng.integers(3, VOCAB - 1, size=5).tolist() for c, o in zip(chats, outs)]
        assert cached[1] == [(13 + 12 - 1) // 8 * 8, (22 + 16 - 1) // 8 * 8, (9 + 20 - 1) // 8 * 8]
        assert eng.stats()["num_pages_free"] == 20


def test_dflash_with_a_cached_prefix_equals_plain_decoding(target):
    """The drafter's context features of the shared pages come from the first prompt's prefill too."""
    with serving(Engine(target, EngineConfig(num_slots=2, ctx_size=1024, ctx_per_slot=128, page_size=8,
                                             prefill_chunk=16, draft_max=BLOCK - 1, spec_policy="always"),
                        LoadedDrafter(TINY_DRAFTER, random_drafter(TINY_DRAFTER, 0)))) as eng:
        rng = np.random.default_rng(3)
        shared = rng.integers(3, VOCAB - 1, size=33).tolist()
        prompts = [shared + rng.integers(3, VOCAB - 1, size=k).tolist() for k in (4, 9, 2)]
        reqs = [_greedy(p, 20) for p in prompts]
        outs = [run(eng, [r])[0][0] for r in reqs]
        assert [r.num_cached_prompt for r in reqs] == [0, 32, 32]
        assert sum(r.draft_n for r in reqs[1:]) > 0  # the cached requests speculated
        assert outs == _reference(target, prompts, [20] * 3)
        turn = prompts[0] + outs[0] + [5, 6, 7]  # the next turn over the first reply's pages and context features
        req = _greedy(turn, 20)
        assert run(eng, [req])[0][0] == _reference(target, [turn], [20])[0] and req.num_cached_prompt == 56
