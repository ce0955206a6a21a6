"""The batch-invariant mode (pallas_kernels/invariance.py): a row's result is bit for bit the same whatever rows share
its launch. Products at M = 1 against the same rows inside M = 3 .. 256; attention for one decode query against the
same query inside a 16-token verify run, alone and among other slots; the model's logits for a verified block against
the same tokens decoded one per step beside other slots; and the engine: DFlash in bf16 equals plain decoding.

CPU: the kernels in Pallas interpret mode (each tile's product has the same shape whatever M is, so the CPU is
invariant there too). GPU (marked `gpu`): the compiled kernels, where the tiles XLA/cuBLAS would pick follow M.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.invariance import (  # noqa: E402
    batch_invariant,
    fold_sum,
    is_batch_invariant,
    log_softmax,
    logsumexp,
    ordered_sum,
    prefill_phase,
    q8_prescale,
)
from pallas_kernels.ragged_paged_attention import ragged_paged_attention  # noqa: E402
from pallas_kernels.weight_matmul import invariant_config, linear, q8_0_linear  # noqa: E402
from tests.test_ragged_paged_attention import make_case  # noqa: E402

IMPLS = [pytest.param("interpret", id="interpret"), pytest.param("pallas", id="gpu", marks=pytest.mark.gpu),
         pytest.param("mgpu", id="gpu-mgpu", marks=pytest.mark.gpu)]


def _use(monkeypatch, impl: str, *names: str) -> None:
    """Point the kernels at impl: 'mgpu' = the Mosaic GPU product (Hopper) with the portable kernels for the rest;
    'mgpu-all' = the Mosaic GPU product and attention."""
    mosaic = {"mgpu": ("DFLASH_MATMUL_IMPL",), "mgpu-all": ("DFLASH_MATMUL_IMPL", "DFLASH_ATTENTION_IMPL")}
    for var in names:
        if impl in mosaic:
            monkeypatch.setenv(var, "mgpu" if var in mosaic[impl] else "pallas")
        else:
            monkeypatch.setenv(var, impl)


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_mode_is_per_thread_and_scoped(monkeypatch):
    monkeypatch.delenv("DFLASH_BATCH_INVARIANT", raising=False)
    assert not is_batch_invariant()
    with batch_invariant():
        assert is_batch_invariant()
        with batch_invariant(False):
            assert not is_batch_invariant()
        assert is_batch_invariant()
    assert not is_batch_invariant()
    monkeypatch.setenv("DFLASH_BATCH_INVARIANT", "1")
    assert is_batch_invariant()


def test_ordered_sum_is_a_left_to_right_chain():
    # 1e8 + 1 - 1e8 in f32: left to right gives 0 (1e8 + 1 rounds to 1e8), a pairwise tree (1e8 + (1 - 1e8)) also 0,
    # but (1e8 - 1e8) + 1 = 1: the chain must follow the given order.
    x = jnp.asarray([[1e8], [1.0], [-1e8]], jnp.float32)
    assert float(ordered_sum(x)[0]) == 0.0
    assert float(ordered_sum(x[jnp.asarray([0, 2, 1])])[0]) == 1.0


@pytest.mark.parametrize("d", [1, 2, 5, 576, 49152])
def test_fold_sum_is_a_sum_and_row_invariant(d):
    rng = np.random.default_rng(d)
    x = jnp.asarray(rng.standard_normal((64, d)), jnp.float32)
    fold = jax.jit(fold_sum)
    full = fold(x)
    np.testing.assert_allclose(np.asarray(full), np.asarray(x, np.float64).sum(-1), rtol=1e-5, atol=1e-3)
    for m in (1, 3, 16):
        assert _same_bits(fold(x[:m]), full[:m])


def test_norm_and_log_softmax_rows_do_not_depend_on_row_count():
    from dflash_jax.models.dense import RMSNorm

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((64, 576)), jnp.bfloat16)
    logits = jnp.asarray(rng.standard_normal((64, 512)) * 4, jnp.float32)
    norm = RMSNorm(576, 1e-5, jnp.bfloat16)

    @jax.jit
    def f(x, logits):
        with batch_invariant():
            return norm(x), log_softmax(logits), logsumexp(logits)

    full = f(x, logits)
    for m in (1, 3, 16):
        part = f(x[:m], logits[:m])
        assert all(_same_bits(a, b[:m]) for a, b in zip(part, full)), f"M={m}"
    np.testing.assert_allclose(np.asarray(full[1]), np.asarray(jax.nn.log_softmax(logits)), atol=1e-5)


def test_invariant_tiles_do_not_depend_on_rows():
    for quantized in (False, True):
        cfg = invariant_config(4096, 12288, quantized)
        assert cfg.block_m == 64 and cfg.num_splits >= 1
        assert cfg == invariant_config(4096, 12288, quantized)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("quantized", [False, True, "nk", "nk-pre"], ids=["bf16", "q8_0", "q8_0-nk", "q8_0-nk-pre"])
def test_product_rows_do_not_depend_on_row_count(impl, quantized):
    """quantized 'nk': Q8_0 values stored (N, K) for the Mosaic GPU Q8_0 kernel (GPU only); 'nk-pre': an engine
    that chose its pre-scaled variant (`invariance.q8_prescale`), 256-row pieces."""
    if str(quantized).startswith("nk") and impl != "mgpu":
        pytest.skip("the (N, K) Q8_0 layout is the Mosaic GPU kernel's")
    k, n = (352, 200) if impl == "interpret" else (4096, 1024) if impl == "mgpu" else (4096, 1000)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, k)), jnp.bfloat16)
    if quantized:
        q = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
        s = jnp.asarray(rng.uniform(1e-3, 2e-2, (k // 32, n)), jnp.float16)
        layout = "nk" if str(quantized).startswith("nk") else "kn"
        q = q.T if layout == "nk" else q
        product = lambda a: q8_0_linear(a, q, s, impl=impl, layout=layout)  # noqa: E731
    else:
        w = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.bfloat16)
        product = lambda a: linear(a, w, impl=impl)  # noqa: E731
    with batch_invariant(), q8_prescale(True if quantized == "nk-pre" else None):
        ms = (1, 3, 17, 64, 256) if impl == "interpret" else (1, 3, 8, 16, 64, 128, 256)
        full = {m: product(x[:m]) for m in ms}
        one = jnp.concatenate([product(x[i:i + 1]) for i in range(5)])
    for m in ms:
        assert _same_bits(full[m][: min(m, 5)], one[: min(m, 5)]), f"rows differ at M={m}"
        assert _same_bits(full[m], full[256][:m]), f"M={m} is not a prefix of M=256"


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_tiles_rows_do_not_depend_on_row_count(impl, monkeypatch):
    """Prefill steps' float products take their own fixed tiles (128 rows, no K
    split); a row still comes out in the same bits for every row count, and differs from the decode tiles only in
    summation order."""
    monkeypatch.setenv("DFLASH_PREFILL_TILES", "large")
    k, n = (352, 200) if impl == "interpret" else (4096, 1000)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((300, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.bfloat16)
    with batch_invariant(), prefill_phase():
        ms = (1, 17, 130, 300)
        full = {m: linear(x[:m], w, impl=impl) for m in ms}
    for m in ms:
        assert _same_bits(full[m], full[300][:m]), f"M={m} is not a prefix of M=300"
    want = np.asarray(x.astype(jnp.float32) @ w.astype(jnp.float32).T)
    np.testing.assert_allclose(np.asarray(full[300], np.float32), want, atol=2e-2 * np.abs(want).max())
    import jax  # noqa: PLC0415

    def traced(prefill: bool) -> str:
        with batch_invariant(), prefill_phase(prefill):
            return str(jax.make_jaxpr(lambda a: linear(a, w, impl=impl))(x))
    assert traced(True) != traced(False)  # the prefill tiles were used
    monkeypatch.setenv("DFLASH_PREFILL_TILES", "same")
    assert traced(True) == traced(False)


@pytest.mark.parametrize("impl", IMPLS[:2] + [pytest.param("mgpu_interpret", id="mgpu-interpret"),
                                              pytest.param("mgpu", id="gpu-mgpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("group", [1, 3])
def test_attention_query_does_not_depend_on_run_or_batch(impl, group):
    """The verify run's query t sees exactly the keys a decode query at that position sees; each must come out in the
    same bits, and the same again with the slot placed among other slots of other lengths."""
    t, h, kv_heads, page_size, max_pages = 16, 64, 2, 16, 12
    kv_len = 150  # not a page multiple; the run's keys are the last 16
    args, _ = make_case(3, q_lens=[t, 5, 1], kv_lens=[kv_len, 40, 180], t=t, n=kv_heads * group, k=kv_heads, h=h,
                        page_size=page_size, max_pages=max_pages, stale_nan=False)
    with batch_invariant():
        run = ragged_paged_attention(args["q"][:1], args["k_pages"], args["v_pages"], args["page_table"][:1],
                                     args["q_lens"][:1], args["kv_lens"][:1], impl=impl)
        batched = ragged_paged_attention(args["q"], args["k_pages"], args["v_pages"], args["page_table"],
                                         args["q_lens"], args["kv_lens"], impl=impl)
        assert _same_bits(batched[:1], run)
        for j in (0, 1, 7, 15):
            one = ragged_paged_attention(args["q"][:1, j:j + 1], args["k_pages"], args["v_pages"],
                                         args["page_table"][:1], jnp.asarray([1]),
                                         jnp.asarray([kv_len - t + j + 1]), impl=impl)
            assert _same_bits(one[0, 0], run[0, j]), f"query {j} differs from its decode twin"
    assert not np.isnan(np.asarray(run.astype(jnp.float32))).any()


def _verify_equals_decode_steps(model, seed: int) -> None:
    """Prefill three slots, verify a 16-token block for slot 0 alone, then decode the same 16 tokens one per step
    with the other two slots decoding beside it: each verify row's logits must be the decode step's, bit for bit.
    The model's `verify` (hybrid targets) or its plain forward (dense) runs the block."""
    from flax import nnx

    from dflash_jax.kv_cache import AttentionMeta
    from dflash_jax.state_pool import make_cache

    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames="verify")
    def logits(state, tokens, meta, cache, verify=False):
        with batch_invariant():
            m = nnx.merge(graphdef, state)
            if verify and hasattr(m, "verify"):
                hidden, cache, _, _ = m.verify(tokens, meta, cache)
            else:
                hidden, cache, _ = m(tokens, meta, cache)
            return m.logits(hidden), cache

    rng = np.random.default_rng(seed)
    vocab, page_size, pages = model.cfg.vocab_size, 8, 8
    lens = np.array([20, 5, 33], np.int32)
    table = jnp.asarray(1 + np.arange(3 * pages, dtype=np.int32).reshape(3, pages))
    slots = jnp.arange(3, dtype=jnp.int32)
    meta = lambda q, kv, b=3: AttentionMeta(jnp.asarray(q), jnp.asarray(kv), table[:b], slots[:b])  # noqa: E731
    cache = make_cache(model.cfg, 1 + 3 * pages, page_size, 4, jnp.bfloat16)
    prompt = rng.integers(3, vocab - 1, (3, 40)).astype(np.int32)
    _, cache = logits(state, jnp.asarray(prompt), meta(lens, lens), cache)
    block = rng.integers(3, vocab - 1, 16).astype(np.int32)
    run, _ = logits(state, jnp.asarray(block[None]), meta([16], [20 + 16], 1), cache, verify=True)
    for j in range(16):
        toks = np.concatenate([[block[j]], rng.integers(3, vocab - 1, 2)]).astype(np.int32)[:, None]
        step, cache = logits(state, jnp.asarray(toks), meta(np.ones(3, np.int32), lens + j + 1), cache)
        assert _same_bits(step[0, 0], run[0, j]), f"verify row {j} differs from its decode step"


@pytest.mark.parametrize("impl", IMPLS)
def test_model_verify_rows_equal_decode_steps_bit_for_bit(bf16_target, impl, monkeypatch):
    """The target's logits for 16 tokens verified in one run (one slot alone) against the same 16 tokens decoded one
    per step with two other slots decoding beside it: every row the same bits."""
    _use(monkeypatch, impl, "DFLASH_MATMUL_IMPL", "DFLASH_ATTENTION_IMPL")
    _verify_equals_decode_steps(bf16_target.model, seed=4)


@pytest.mark.parametrize("impl", IMPLS)
def test_hybrid_verify_rows_equal_decode_steps_bit_for_bit(impl, monkeypatch, tmp_path):
    """The same for the hybrid (qwen35) target: its verify runs the delta rule token by token like decode; with the
    l2 norms of q and k as `fold_sum`s, a 16-token verify of one slot equals 16 decode steps beside two other slots."""
    from converters.checkpoint import load_model
    from converters.synthetic import PRESETS, write_random_gguf

    _use(monkeypatch, impl, "DFLASH_MATMUL_IMPL", "DFLASH_ATTENTION_IMPL", "DFLASH_GDN_IMPL")
    path = tmp_path / "qwen35-tiny.gguf"
    write_random_gguf(str(path), dataclasses.replace(PRESETS["qwen35-tiny"], num_layers=4, vocab_size=512,
                                                     tied_embeddings=True), None, seed=3)
    _verify_equals_decode_steps(load_model(str(path), jnp.bfloat16).model, seed=6)


def _engine_logprobs(target, spec: bool, slots: int, inject_from=None, num_requests: int = 4):
    """Greedy tokens and logprobs of num_requests requests (prompts of 5 to 5 x num_requests tokens, submitted at
    once, so requests wait in the queue and join while others decode) on a bf16 engine in the batch-invariant mode.
    With spec, every slot
    speculates; inject_from (prompt -> plain tokens) feeds the plain continuation as drafts, with an error every
    fifth position, so verify rows at every block position are compared."""
    from dflash_jax.engine import Engine, EngineConfig
    from dflash_jax.requests import Request, SamplingParams
    from dflash_jax.spec_state import LoadedDrafter
    from tests.test_dflash import BLOCK, TINY_DRAFTER, random_drafter

    dc = dataclasses.replace(TINY_DRAFTER, hidden_size=target.config.hidden_size)
    drafter = LoadedDrafter(dc, random_drafter(dc, 0)) if spec else None
    eng = Engine(target, EngineConfig(num_slots=slots, ctx_size=2048, ctx_per_slot=128, page_size=8,
                                      prefill_chunk=16, dtype="bfloat16", draft_max=BLOCK - 1,
                                      spec_policy="always", batch_invariant=True), drafter)
    prompts = [[5 + i, 17, 3 * i + 1, 40, 2] * (i % 16 + 1) for i in range(num_requests)]
    if spec and inject_from is not None:
        ref = {tuple(p): toks for p, toks in zip(prompts, inject_from)}

        def inject(slot):
            cont = (ref[tuple(slot.req.prompt_ids)][slot.req.num_generated:] + [1] * BLOCK)[:BLOCK - 1]
            return [c if (slot.req.num_generated + i) % 5 != 4 else (c + 1) % 500 for i, c in enumerate(cont)]
        eng.spec.injector = inject
    eng.warmup(progress=False)
    eng.start()
    reqs = [Request(p, SamplingParams(max_tokens=20, ignore_eos=True, logprobs=True)) for p in prompts]
    toks, lps = [[] for _ in reqs], [[] for _ in reqs]
    try:
        for r in reqs:
            eng.submit(r)
        for i, r in enumerate(reqs):
            while True:
                e = r.events.get(timeout=600)
                if e.token_id is not None:
                    toks[i].append(e.token_id)
                    lps[i].append(e.logprob)
                if e.finish_reason:
                    break
    finally:
        eng.stop()
    return toks, lps


@pytest.fixture(scope="module")
def bf16_target(tmp_path_factory):
    """Two layers of SmolLM2's width (576: on this CPU XLA sums 1 or 3 rows of 576 in another order than 16, so
    RMSNorm statistics must not be XLA's reduction), a small vocabulary."""
    from converters.checkpoint import load_model
    from converters.synthetic import SyntheticSpec, write_random_gguf
    from tests.test_dflash import VOCAB

    spec = SyntheticSpec("llama", num_layers=2, hidden=576, ffn=512, num_heads=9, num_kv_heads=3, head_dim=64,
                         vocab_size=VOCAB, rope_theta=1e5, rms_eps=1e-5, tied_embeddings=True)
    path = tmp_path_factory.mktemp("inv") / "smol-narrow.gguf"
    write_random_gguf(str(path), spec, None, seed=7)
    return load_model(str(path), jnp.bfloat16)


@pytest.mark.parametrize("impl,slots,inject", [
    pytest.param("interpret", 4, True, id="interpret-4-injected"),
    *[pytest.param("pallas", n, inj, id=f"gpu-{n}-{'injected' if inj else 'random'}", marks=pytest.mark.gpu)
      for n in (1, 2, 8, 16) for inj in (True, False)],
    pytest.param("mgpu", 8, False, id="gpu-mgpu-8-random", marks=pytest.mark.gpu),
    pytest.param("mgpu-all", 8, True, id="gpu-mgpu-all-8-injected", marks=pytest.mark.gpu),
    pytest.param("pallas-same", 8, False, id="gpu-prefill-same-tiles-8-random", marks=pytest.mark.gpu),
])
def test_dflash_equals_plain_in_bf16_with_every_slot_speculating(bf16_target, impl, slots, inject, monkeypatch):
    """Plain decoding one request at a time against DFlash with `slots` slots speculating, injected drafts (long
    accepts, a rejection every fifth position) or the random drafter (mostly immediate rejections): same tokens,
    same logprob bits. Prefill steps run in their own tiles (prompts prefilled alone on one side and several at once
    on the other); 'pallas-same': in the decode tiles ($DFLASH_PREFILL_TILES=same)."""
    monkeypatch.setenv("DFLASH_PREFILL_TILES", "large")
    if impl == "pallas-same":
        monkeypatch.setenv("DFLASH_PREFILL_TILES", "same")
        impl = "pallas"
    _use(monkeypatch, impl, "DFLASH_MATMUL_IMPL", "DFLASH_ATTENTION_IMPL")
    jax.clear_caches()
    n = max(4, 2 * slots) if impl != "interpret" else 4
    plain_toks, plain_lps = _engine_logprobs(bf16_target, spec=False, slots=1, num_requests=n)
    spec_toks, spec_lps = _engine_logprobs(bf16_target, spec=True, slots=slots, num_requests=n,
                                           inject_from=plain_toks if inject else None)
    assert spec_toks == plain_toks
    assert spec_lps == plain_lps  # exact floats: the same bits, not a tolerance


def test_serve_flag_and_auto_choice(bf16_target, monkeypatch):
    """--batch-invariant on/off reaches EngineConfig; auto leaves the choice to the engine: $DFLASH_BATCH_INVARIANT if
    set, else on only for a GPU in bf16/f16 (here: a CPU, so off)."""
    from dflash_jax.engine import Engine, EngineConfig
    from serve.cli import engine_config_kwargs, parse_args

    kwargs = lambda flag: engine_config_kwargs(parse_args(["--batch-invariant", flag]), EngineConfig, "cpu")  # noqa
    assert kwargs("on")["batch_invariant"] is True and kwargs("off")["batch_invariant"] is False
    assert "batch_invariant" not in kwargs("auto")
    small = dict(num_slots=1, ctx_size=256, page_size=8, prefill_chunk=16, dtype="bfloat16")
    monkeypatch.delenv("DFLASH_BATCH_INVARIANT", raising=False)
    assert Engine(bf16_target, EngineConfig(**small)).batch_invariant is (jax.default_backend() == "gpu")
    monkeypatch.setenv("DFLASH_BATCH_INVARIANT", "1")
    assert Engine(bf16_target, EngineConfig(**small)).batch_invariant is True
    assert Engine(bf16_target, EngineConfig(**small, batch_invariant=False)).batch_invariant is False
    # The engine's one Q8_0 numerics (q8_0_matmul_mgpu.engine_prescale): by slots x block, with or without a drafter
    assert Engine(bf16_target, EngineConfig(**small)).q8_prescale is False  # 1 x 16 rows
    eight = dict(small, num_slots=8, ctx_size=512)
    assert Engine(bf16_target, EngineConfig(**eight)).stats()["q8_prescale"] is True  # 8 x 16
    assert Engine(bf16_target, EngineConfig(**eight, draft_max=7)).q8_prescale is False  # 8 x 8
    assert Engine(bf16_target, EngineConfig(**eight, q8_prescale=False)).q8_prescale is False
    assert Engine(bf16_target, EngineConfig(**dict(eight, num_slots=4))).q8_prescale is False  # 4 x 16


@pytest.mark.parametrize("impl", [pytest.param("interpret", id="interpret"),
                                  pytest.param("pallas", id="gpu", marks=pytest.mark.gpu),
                                  pytest.param("mgpu", id="gpu-mgpu", marks=pytest.mark.gpu)])
def test_cached_prefix_gives_the_uncached_bits(bf16_target, impl, monkeypatch):
    """A prompt that starts from another prompt's cached pages gives the tokens and logprob bits it gives computed
    in full: its chunks start at another offset (the page after the cached prefix) and attend to pages that
    another request's prefill wrote, which the batch-invariant mode makes the same bits."""
    from dflash_jax.engine import Engine, EngineConfig
    from dflash_jax.requests import Request, SamplingParams

    monkeypatch.setenv("DFLASH_PREFILL_TILES", "large")
    _use(monkeypatch, impl, "DFLASH_MATMUL_IMPL", "DFLASH_ATTENTION_IMPL")
    jax.clear_caches()
    shared = [(7 * i) % 400 + 3 for i in range(37)]
    prompts = [shared + [11, 12, 13], shared + list(range(21, 30)), shared[:30] + [5]]
    results = {}
    for cache in (True, False):
        eng = Engine(bf16_target, EngineConfig(num_slots=2, ctx_size=1024, ctx_per_slot=128, page_size=8,
                                               prefill_chunk=16, dtype="bfloat16", batch_invariant=True,
                                               prefix_cache=cache))
        eng.warmup(progress=False)
        eng.start()
        got = []
        try:
            for p in prompts:  # one at a time: each finds the pages of those before it
                req = Request(p, SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True))
                eng.submit(req)
                events = [req.events.get(timeout=600)]
                while not events[-1].finish_reason:
                    events.append(req.events.get(timeout=600))
                got.append(([e.token_id for e in events if e.token_id is not None],
                            [e.logprob for e in events if e.token_id is not None], req.num_cached_prompt))
        finally:
            eng.stop()
        results[cache] = got
    assert [c for *_, c in results[True]] == [0, 32, 24] and [c for *_, c in results[False]] == [0, 0, 0]
    assert [r[:2] for r in results[True]] == [r[:2] for r in results[False]]  # exact floats
