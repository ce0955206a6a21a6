"""qwen35 hybrid (Gated DeltaNet + gated attention): the delta-rule forms agree, the GGUF layout loads, and our jitted
model matches llama.cpp (xllamacpp) on the same random-weight F32 file, greedy token for token."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.checkpoint import load_model
from converters.gguf_file import GGUFError
from converters.synthetic import PRESETS, write_random_gguf
from dflash_jax.config import HybridConfig
from dflash_jax.reference_decode import greedy_generate
from pallas_kernels import gated_delta_net as gdn
from tests.llamacpp_ref import LlamaCpp, align

QWEN2_VOCAB = "tests/data/vocab/ggml-vocab-qwen2.gguf"
NEW_TOKENS = 24
# With f32 weights and an f32 KV cache the remaining differences are float rounding (~1e-4 per logprob); a greedy
# split is only acceptable where llama.cpp's own top-2 gap is below this.
F32_TIE = 0.02
LONG = ("The history of the river valley is a history of floods, of the farms that learned to live with them and of "
        "the towns that did not. ") * 18  # ~500 tokens: several delta-rule chunks of 64 before the first decode


def _rule_inputs(rng, b, t, h, d):
    def n(*s):
        return jnp.asarray(rng.normal(size=s).astype(np.float32))
    q, k = n(b, t, h, d), n(b, t, h, d)
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True) * d ** -0.5
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    g = -0.1 * jnp.abs(n(b, t, h))
    return q, k, n(b, t, h, d), g, jax.nn.sigmoid(n(b, t, h)), 0.1 * n(b, h, d, d)


@pytest.mark.parametrize("t,chunk", [(1, 64), (37, 64), (150, 64), (150, 16)])
def test_chunked_equals_recurrent(t, chunk):
    q, k, v, g, beta, s0 = _rule_inputs(np.random.default_rng(t), 2, t, 3, 16)
    s_rec, o_rec = gdn.recurrent(s0, q, k, v, g, beta)
    s_ch, o_ch = gdn.chunked(s0, q, k, v, g, beta, chunk=chunk)
    np.testing.assert_allclose(o_ch, o_rec, atol=2e-6)
    np.testing.assert_allclose(s_ch, s_rec, atol=2e-6)


@pytest.mark.parametrize("t,dh,block_v", [(1, 32, 32), (5, 32, 16), (16, 64, 32)])
def test_recurrent_kernel_interpret(t, dh, block_v):
    """The Pallas recurrent kernel (interpret mode) against the scan; T = 5 pads to 8 with no-op tokens."""
    q, k, v, g, beta, s0 = _rule_inputs(np.random.default_rng(t), 2, t, 3, dh)
    s_ref, o_ref = gdn.recurrent(s0, q, k, v, g, beta)
    s_k, o_k = gdn.recurrent_pallas(s0, q, k, v, g, beta, block_v=block_v, interpret=True)
    np.testing.assert_allclose(o_k, o_ref, atol=1e-6)
    np.testing.assert_allclose(s_k, s_ref, atol=1e-6)


@pytest.mark.parametrize("schedule,one_pass", [("prefetch", False), ("unroll", False), ("loop", True),
                                               ("unroll", True)])
def test_kernel_schedules_agree_interpret(schedule, one_pass):
    """The token-loop schedules run the loop's arithmetic, the one-pass form the same map rounded differently: decode,
    verify and replay agree with the default. (Bits are checked on the GPU: the interpreter's XLA fuses the
    straight-line and the looped forms differently.)"""
    q, k, v, g, beta, _ = _rule_inputs(np.random.default_rng(3), 2, 7, 2, 32)
    pool = jnp.asarray(np.random.default_rng(4).normal(size=(3, 2, 32, 32)).astype(np.float32))
    rows, fresh = jnp.array([2, 1]), jnp.array([False, True])
    for write, emit in ((True, True), (False, True), (True, False)):
        want, got = (gdn.pool_recurrent_pallas(pool, rows, fresh, q, k, v, g, beta, write=write, emit=emit,
                                               interpret=True, schedule=sch, one_pass=op)
                     for sch, op in (("loop", False), (schedule, one_pass)))
        for a, b in zip(want, got):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_allclose(b, a, atol=2e-6)


@pytest.mark.parametrize("write,emit", [(True, True), (False, True), (True, False)])
def test_pool_kernel_updates_only_its_rows(write, emit):
    """Decode (write + emit), verify (emit) and replay (write) on the state pool in place: rows read and written
    through `rows`, zeros for fresh rows, every other row (other slots) bit for bit untouched."""
    q, k, v, g, beta, _ = _rule_inputs(np.random.default_rng(1), 3, 5, 2, 32)
    pool = jnp.asarray(np.random.default_rng(2).normal(size=(5, 2, 32, 32)).astype(np.float32))
    rows, fresh = jnp.array([3, 0, 4]), jnp.array([False, True, False])
    p_ref, o_ref = gdn.pool_recurrent(pool, rows, fresh, q, k, v, g, beta, write=write, emit=emit, impl="reference")
    p_k, o_k = gdn.pool_recurrent(pool, rows, fresh, q, k, v, g, beta, write=write, emit=emit, impl="interpret")
    np.testing.assert_allclose(p_k, p_ref, atol=1e-6)
    np.testing.assert_array_equal(p_k[jnp.array([1, 2])], pool[jnp.array([1, 2])])
    if emit:
        np.testing.assert_allclose(o_k, o_ref, atol=1e-6)
    want, _ = gdn.recurrent(jnp.zeros_like(pool[:1]), q[1:2], k[1:2], v[1:2], g[1:2], beta[1:2])
    if write:
        np.testing.assert_allclose(p_k[0], want[0], atol=1e-6)  # slot 1 started fresh in row 0
    else:
        np.testing.assert_array_equal(p_k, pool)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16])
def test_recurrent_kernel_gpu(t):
    """The compiled kernel at the Qwen3.6-27B delta-rule shape (48 value heads of 128) against the scan (what made it
    the GPU default), and under each token-loop schedule a T-token call in the bits of T one-token calls."""
    q, k, v, g, beta, s0 = _rule_inputs(np.random.default_rng(t), 8, t, 48, 128)
    with jax.default_matmul_precision("float32"):  # no TF32 in the reference's einsums
        s_ref, o_ref = gdn.recurrent(s0, q, k, v, g, beta)
    s_k, o_k = gdn.recurrent_pallas(s0, q, k, v, g, beta)
    np.testing.assert_allclose(o_k, o_ref, atol=1e-5)
    np.testing.assert_allclose(s_k, s_ref, atol=1e-5)
    rows, fresh = jnp.arange(8, dtype=jnp.int32), jnp.zeros((8,), jnp.int32)
    for schedule, one_pass in (("loop", False), ("prefetch", False), ("unroll", False), ("loop", True),
                               ("unroll", True)):  # each: a T-token call in the bits of T one-token calls
        run = functools.partial(gdn.pool_recurrent_pallas, schedule=schedule, one_pass=one_pass)
        s_o, o_o = run(s0, rows, fresh, q, k, v, g, beta)
        np.testing.assert_allclose(o_o, o_k, atol=1e-5)
        np.testing.assert_allclose(s_o, s_k, atol=1e-5)
        p_step, outs = s0, []
        for i in range(t):
            p_step, o = run(p_step, rows, fresh, *(a[:, i:i + 1] for a in (q, k, v, g, beta)))
            outs.append(o)
        assert np.array_equal(np.asarray(o_o), np.asarray(jnp.concatenate(outs, axis=1))), (schedule, one_pass)
        assert np.array_equal(np.asarray(s_o), np.asarray(p_step)), (schedule, one_pass)


def test_replay_commits_exactly_the_prefix():
    q, k, v, g, beta, s0 = _rule_inputs(np.random.default_rng(0), 3, 16, 2, 8)
    steps = jnp.array([1, 7, 16])
    got = gdn.replay(s0, k, v, g, beta, steps)
    for i, n in enumerate(steps.tolist()):
        want, _ = gdn.recurrent(s0[i:i + 1], q[i:i + 1, :n], k[i:i + 1, :n], v[i:i + 1, :n], g[i:i + 1, :n],
                                beta[i:i + 1, :n])
        np.testing.assert_array_equal(got[i], want[0])


def test_conv_window_keeps_the_last_committed_inputs():
    state = jnp.arange(6, dtype=jnp.float32).reshape(1, 3, 2) + 100  # rows 100.., the previous inputs
    x = jnp.arange(10, dtype=jnp.float32).reshape(1, 5, 2)
    np.testing.assert_array_equal(gdn.conv_window(state, x, jnp.array([0])), state)
    np.testing.assert_array_equal(gdn.conv_window(state, x, jnp.array([2]))[0], [[104, 105], [0, 1], [2, 3]])
    np.testing.assert_array_equal(gdn.conv_window(state, x, jnp.array([5]))[0], x[0, 2:])


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("q35") / "qwen35-tiny.gguf"
    write_random_gguf(str(path), dataclasses.replace(PRESETS["qwen35-tiny"], tied_embeddings=True), QWEN2_VOCAB,
                      seed=3)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(str(tiny_path), jnp.float32)


def test_config_from_metadata(tiny):
    cfg = tiny.config
    assert isinstance(cfg, HybridConfig)
    assert cfg.attention_layers == (3, 7) and cfg.recurrent_layers == (0, 1, 2, 4, 5, 6)
    assert (cfg.rope_dims, cfg.head_dim, cfg.ssm_k_heads, cfg.ssm_v_heads, cfg.ssm_head_dim, cfg.conv_dim) == \
        (16, 64, 2, 4, 32, 256)
    assert cfg.num_kv_layers == 2


def test_missing_tensor_names_the_file(tmp_path, monkeypatch):
    from converters import synthetic

    plan = synthetic.tensor_plan
    monkeypatch.setattr(synthetic, "tensor_plan",
                        lambda *a, **kw: [t for t in plan(*a, **kw) if t.name != "blk.1.ssm_a"])
    out = tmp_path / "broken-qwen35.gguf"
    write_random_gguf(str(out), dataclasses.replace(PRESETS["qwen35-tiny"], vocab_size=512), None)
    with pytest.raises(GGUFError, match=r"broken-qwen35\.gguf.*blk\.1\.ssm_a"):
        load_model(str(out), jnp.float32)


def test_matches_llamacpp(tiny, tiny_path):
    lm = tiny
    raw = ['def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
           "Once upon a time, in a small village by the sea,", LONG]
    prompts = [lm.tokenizer.encode(r) for r in raw]
    assert len(prompts[-1]) > 400
    ours, our_logprobs = greedy_generate(lm.model, prompts, NEW_TOKENS)
    ref = LlamaCpp(str(tiny_path), n_ctx=1024)
    diffs, agreed_total = [], 0
    for i, prompt in enumerate(prompts):
        _, pieces = ref.greedy(prompt, NEW_TOKENS)
        agreed, d, first_bad = align(ours[i], our_logprobs[i], lm.tokenizer.token_bytes, pieces)
        diffs += d
        agreed_total += agreed
        print(f"prompt {i} ({len(prompt)} tokens): {agreed}/{len(pieces)} pieces agree")
        assert first_bad is None or first_bad.margin < F32_TIE, (
            f"prompt {i}: diverged after {agreed} pieces where llama.cpp's top-2 gap was {first_bad.margin:.4f}")
    print(f"|top-1 logprob diff|: mean {np.mean(diffs):.2e}, max {np.max(diffs):.2e} over {len(diffs)} tokens")
    assert agreed_total >= 2 * NEW_TOKENS  # not a string of immediate near-tie splits
    assert np.mean(diffs) < 1e-3 and np.max(diffs) < 1e-2


def test_converted_directory_round_trip(tiny, tiny_path, tmp_path):
    from converters.checkpoint import convert_gguf

    out = convert_gguf(tiny_path, tmp_path / "converted", dtype="float32")
    back = load_model(out, jnp.float32)
    assert back.config == tiny.config and isinstance(back.model, type(tiny.model))
    flat = dict(jax.tree_util.tree_flatten_with_path(nnx.state(tiny.model).to_pure_dict())[0])
    flat_back = jax.tree_util.tree_flatten_with_path(nnx.state(back.model).to_pure_dict())[0]
    assert len(flat_back) == len(flat) > 50
    for path, x in flat_back:
        assert np.array_equal(np.asarray(x), np.asarray(flat[path])), path


def test_q8_0_weights_stay_q8_0_and_equal_dequantized(tmp_path):
    """A Q8_0 hybrid keeps its projections as int8 + scales (the GPU format), and computes what the same weights
    dequantized to f32 compute. (Against llama.cpp, its F32 rewrite of this file agrees token for token, measured;
    llama.cpp on the Q8_0 file itself also rounds activations to 8 bits, which random hybrids amplify.)"""
    path = tmp_path / "qwen35-q8.gguf"
    spec = dataclasses.replace(PRESETS["qwen35-tiny"], num_layers=4, vocab_size=512, tied_embeddings=True,
                               qtype="q8_0")
    write_random_gguf(str(path), spec, None, seed=4)
    q8 = load_model(str(path), jnp.float32, weights="q8_0")
    f32 = load_model(str(path), jnp.float32, weights="bf16")
    assert q8.model.layers[0].linear_attn.in_proj.qweight[...].dtype == jnp.int8
    assert q8.model.layers[3].self_attn.qkv_proj.qweight[...].dtype == jnp.int8
    prompts = [list(range(3, 40)), [7, 9, 11]]
    tq, lq = greedy_generate(q8.model, prompts, 8)
    tf, lf = greedy_generate(f32.model, prompts, 8)
    assert tq == tf
    np.testing.assert_allclose(lq, lf, atol=1e-3)


def test_mtp_block_and_layer_pattern_as_converted_files_have_them(tmp_path):
    """Real Qwen3.5/3.6 GGUFs carry the MTP block after the trunk (block_count = trunk + 1, nextn_predict_layers)
    and the attention.recurrent_layers pattern: the trunk loads, the MTP block is left in the file, and greedy
    decoding still matches llama.cpp."""
    path = tmp_path / "qwen35-mtp.gguf"
    spec = dataclasses.replace(PRESETS["qwen35-tiny"], num_layers=4, tied_embeddings=True, mtp_layers=1,
                               recurrent_layers_key=True)
    write_random_gguf(str(path), spec, QWEN2_VOCAB, seed=5)
    lm = load_model(str(path), jnp.float32)
    cfg = lm.config
    assert (cfg.num_layers, cfg.num_mtp_layers, cfg.attention_layers) == (4, 1, (3,))
    assert cfg.recurrent_pattern == (True, True, True, False)
    prompt = lm.tokenizer.encode("The three laws of thermodynamics are")
    ours, our_logprobs = greedy_generate(lm.model, [prompt], 16)
    _, pieces = LlamaCpp(str(path), n_ctx=256).greedy(prompt, 16)
    agreed, diffs, first_bad = align(ours[0], our_logprobs[0], lm.tokenizer.token_bytes, pieces)
    assert first_bad is None or first_bad.margin < F32_TIE, f"diverged after {agreed} pieces"
    assert agreed >= 8 and max(diffs) < 1e-2


@pytest.mark.parametrize("impl", ["mgpu_interpret", pytest.param("mgpu", marks=pytest.mark.gpu)])
def test_q8_0_mosaic_layout_pads_ragged_outputs(tmp_path, monkeypatch, impl):
    """With the Mosaic Q8_0 products the fused in_proj, whose output (q k v, z, b, a) is not a multiple of the
    kernel's 64-wide tiles, is stored with zero rows up to one, and the layer computes what the (in, out) load
    computes through the reference product."""
    from pallas_kernels.weight_matmul import Q8_NK_ALIGN

    path = tmp_path / "qwen35-q8.gguf"
    spec = dataclasses.replace(PRESETS["qwen35-tiny"], num_layers=4, vocab_size=512, tied_embeddings=True,
                               qtype="q8_0")
    write_random_gguf(str(path), spec, None, seed=5)
    monkeypatch.setenv("DFLASH_MATMUL_IMPL", "reference")
    kn = load_model(str(path), jnp.float32, weights="q8_0").model.layers[0].linear_attn.in_proj
    monkeypatch.setenv("DFLASH_MATMUL_IMPL", impl)
    nk = load_model(str(path), jnp.float32, weights="q8_0").model.layers[0].linear_attn.in_proj
    n = kn.qweight.shape[1]
    assert n % Q8_NK_ALIGN and nk.qweight.shape == (-(-n // Q8_NK_ALIGN) * Q8_NK_ALIGN, kn.qweight.shape[0])
    np.testing.assert_array_equal(np.asarray(nk.qweight[...][:n]), np.asarray(kn.qweight[...]).T)
    assert not np.asarray(nk.qweight[...][n:]).any() and not np.asarray(nk.scales[...][:, n:]).any()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, kn.qweight.shape[0])), jnp.float32)
    got = np.asarray(nk(x))
    monkeypatch.setenv("DFLASH_MATMUL_IMPL", "reference")
    want = np.asarray(kn(x))
    assert got.shape == want.shape == (5, n)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
