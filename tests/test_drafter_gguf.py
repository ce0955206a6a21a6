"""DFlash drafter GGUF files: both schemas round-trip through our writer and loader, every way a file can be wrong is
one clear error, and an upstream-schema file from our writer loads and drafts in llama.cpp's own DFlash."""
from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest

from converters.drafter_gguf import (
    MASK_TOKEN_KEY,
    DrafterConfig,
    check_compatible,
    load_drafter_gguf,
    param_shapes,
    random_drafter_params,
    read_drafter_config,
    tensor_names,
    write_drafter_gguf,
)
from converters.gguf_file import GGUFError, open_gguf, read_fields, read_metadata
from converters.tensor_map import dequantize
from dflash_jax.config import ModelConfig

V = gguf.GGUFValueType

SMALL = DrafterConfig(num_layers=2, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=32,
                      rms_eps=1e-6, rope_theta=1e6, block_size=16, mask_token_id=100, target_layer_ids=(1, 3, 5),
                      max_position=4096)
SMALL_SWA = dataclasses.replace(SMALL, sliding_window=128, swa_layers=(True, False))
TARGET = ModelConfig(arch="qwen3", num_layers=8, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                     head_dim=16, vocab_size=512, rope_theta=1e6, rms_eps=1e-6, max_position=4096,
                     tie_embeddings=True, has_qkv_bias=False, has_qk_norm=True)


@pytest.fixture(scope="module")
def params():
    return random_drafter_params(SMALL, seed=0)


def _write(tmp_path, name, dcfg=SMALL, params=None, **kw):
    path = tmp_path / name
    write_drafter_gguf(path, dcfg, params if params is not None else random_drafter_params(dcfg, 0), **kw)
    return path


def _rewrite(src, dst, drop=(), replace=None, add_tensors=None, set_kv=None, drop_kv=()):
    """Copy a GGUF, dropping / replacing / adding tensors and metadata, to build broken files."""
    replace, add_tensors, set_kv = replace or {}, add_tensors or {}, set_kv or {}
    fields = read_fields(src, raw_strings=True)
    g = open_gguf(src)
    w = gguf.GGUFWriter(str(dst), g.arch)
    for key, f in fields.items():
        if key in ("general.architecture",) or key in drop_kv or key in set_kv:
            continue
        w.add_key_value(key, f.value, f.type, sub_type=f.sub_type)
    for key, (value, vtype, sub) in set_kv.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, info in g.tensors.items():
        if name not in drop:
            w.add_tensor(name, replace.get(name, dequantize(info)))
    for name, value in add_tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# --- config -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,needle", [
    ("hidden_size", 0, "DrafterConfig.hidden_size"),
    ("num_kv_heads", 3, "DrafterConfig.num_kv_heads"),
    ("head_dim", 31, "DrafterConfig.head_dim"),
    ("rms_eps", 0.0, "DrafterConfig.rms_eps"),
    ("rope_theta", float("nan"), "DrafterConfig.rope_theta"),
    ("block_size", 1, "DrafterConfig.block_size"),
    ("mask_token_id", -1, "DrafterConfig.mask_token_id"),
    ("target_layer_ids", (), "DrafterConfig.target_layer_ids"),
    ("target_layer_ids", (1, -1), "DrafterConfig.target_layer_ids"),
    ("sliding_window", 0, "DrafterConfig.sliding_window"),
    ("swa_layers", (True,), "DrafterConfig.swa_layers"),
])
def test_config_validation_names_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        dataclasses.replace(SMALL, **{field: value})


def test_config_normalizes_sequences():
    d = dataclasses.replace(SMALL, target_layer_ids=[1, 3, 5], swa_layers=[False, False])
    assert d == SMALL and d.target_layer_ids == (1, 3, 5) and d.swa_layers == ()
    with pytest.raises(ValueError, match="sliding_window is None"):
        dataclasses.replace(SMALL, swa_layers=(True, False))


# --- round trips --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schema", ["upstream", "fork"])
@pytest.mark.parametrize("dcfg", [SMALL, SMALL_SWA], ids=["full", "swa"])
def test_round_trip(tmp_path, schema, dcfg):
    params = random_drafter_params(dcfg, seed=1)
    path = _write(tmp_path, f"{schema}.gguf", dcfg, params, schema=schema)
    cfg, loaded = load_drafter_gguf(path)
    assert cfg == dcfg
    assert read_drafter_config(path) == (dcfg, schema)
    assert loaded.keys() == params.keys() == param_shapes(dcfg).keys()
    for p, x in params.items():
        assert loaded[p].dtype == np.float32
        np.testing.assert_array_equal(loaded[p], x, err_msg=str(p))


def test_stored_tap_ids_and_mask_location(tmp_path, params):
    up = read_metadata(_write(tmp_path, "up.gguf", params=params, schema="upstream"))
    fork = read_metadata(_write(tmp_path, "fork.gguf", params=params, schema="fork"))
    assert up["general.architecture"] == "dflash" and fork["general.architecture"] == "dflash-draft"
    # upstream: input of layer j = output of layer j-1, so HF ids + 1; fork: HF ids as they are
    assert up["dflash.target_layers"] == [2, 4, 6]
    assert fork["dflash-draft.dflash.target_layer_ids"] == [1, 3, 5]
    assert up[MASK_TOKEN_KEY] == 100 and "dflash.mask_token_id" not in up
    assert fork["dflash-draft.dflash.mask_token_id"] == 100 and MASK_TOKEN_KEY not in fork
    assert up["dflash.block_size"] == fork["dflash-draft.dflash.block_size"] == 16
    assert fork["dflash-draft.dflash.n_target_features"] == 3 * 64
    assert set(open_gguf(tmp_path / "up.gguf").tensors) == set(tensor_names("upstream", SMALL))
    assert {"fc.weight", "enc.output_norm.weight", "blk.1.ffn_norm.weight"} <= set(tensor_names("upstream", SMALL))
    assert {"dflash_fc.weight", "dflash_hidden_norm.weight", "blk.1.post_attention_norm.weight"} <= set(
        tensor_names("fork", SMALL))


def test_fork_and_upstream_load_identically(tmp_path, params):
    a_cfg, a = load_drafter_gguf(_write(tmp_path, "up.gguf", params=params, schema="upstream"), np.float32)
    b_cfg, b = load_drafter_gguf(_write(tmp_path, "fork.gguf", params=params, schema="fork"), np.float32)
    assert a_cfg == b_cfg == SMALL
    for p in a:
        np.testing.assert_array_equal(a[p], b[p], err_msg=str(p))


def test_dtype_and_quantized_weights(tmp_path, params):
    import ml_dtypes

    _, bf = load_drafter_gguf(_write(tmp_path, "f32.gguf", params=params), ml_dtypes.bfloat16)
    assert all(x.dtype == ml_dtypes.bfloat16 for x in bf.values())
    _, q = load_drafter_gguf(_write(tmp_path, "q8.gguf", params=params, qtype="q8_0"))
    g = open_gguf(tmp_path / "q8.gguf")
    assert g.tensors["fc.weight"].qtype == gguf.GGMLQuantizationType.Q8_0
    assert g.tensors["blk.0.attn_k_norm.weight"].qtype == gguf.GGMLQuantizationType.F32
    for p, x in params.items():
        np.testing.assert_allclose(q[p], x, atol=0.02 * np.abs(x).max(), err_msg=str(p))
    with pytest.raises(ValueError, match="qtype 'q4_k'"):
        _write(tmp_path, "bad.gguf", params=params, qtype="q4_k")


def test_writer_checks_params(tmp_path, params):
    bad = dict(params)
    del bad[("layers", 1, "mlp", "up_proj", "weight")]
    bad[("fc", "weight")] = np.zeros((64, 128), np.float32)
    with pytest.raises(ValueError, match=r"missing parameters .*up_proj.*fc.*\(64, 128\), expected \(64, 192\)"):
        _write(tmp_path, "x.gguf", params=bad)
    with pytest.raises(ValueError, match="schema 'hf'"):
        _write(tmp_path, "x.gguf", params=params, schema="hf")


# --- broken files -----------------------------------------------------------------------------------------------

def test_missing_extra_and_misshapen_tensors_reported_together(tmp_path, params):
    src = _write(tmp_path, "up.gguf", params=params)
    bad = _rewrite(src, tmp_path / "bad.gguf", drop=("blk.1.attn_v.weight",),
                   replace={"blk.0.ffn_down.weight": np.zeros((64, 80), np.float32)},
                   add_tensors={"blk.0.post_attention_norm.weight": np.ones(64, np.float32)})
    with pytest.raises(GGUFError) as e:
        load_drafter_gguf(bad)
    msg = str(e.value)
    assert msg.startswith(str(bad))
    assert "missing tensors ['blk.1.attn_v.weight']" in msg
    assert "unexpected tensors ['blk.0.post_attention_norm.weight']" in msg
    assert "'blk.0.ffn_down.weight' has shape (64, 80), expected (64, 96)" in msg


def test_fork_tensor_names_under_upstream_arch_rejected(tmp_path, params):
    """A fork file relabelled as upstream: every fork-only name is reported, nothing is silently misread."""
    src = _write(tmp_path, "fork.gguf", params=params, schema="fork")
    fields = read_fields(src, raw_strings=True)
    g = open_gguf(src)
    w = gguf.GGUFWriter(str(tmp_path / "relabel.gguf"), "dflash")
    w.add_uint32("dflash.embedding_length", 64)
    for key in ("block_count", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
                "attention.key_length"):
        w.add_uint32(f"dflash.{key}", fields[f"dflash-draft.{key}"].value)
    w.add_key_value("dflash.target_layers", [2, 4, 6], V.ARRAY, sub_type=V.INT32)
    w.add_uint32(MASK_TOKEN_KEY, 100)
    for name, info in g.tensors.items():
        w.add_tensor(name, dequantize(info))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"missing tensors \['blk.0.ffn_norm.weight'.*unexpected tensors "
                                        r"\['blk.0.post_attention_norm.weight'.*dflash_fc.weight"):
        load_drafter_gguf(tmp_path / "relabel.gguf")


@pytest.mark.parametrize("schema,drop_kv,set_kv,needle", [
    ("upstream", (MASK_TOKEN_KEY,), {}, "missing metadata key 'tokenizer.ggml.mask_token_id'"),
    ("upstream", ("dflash.target_layers",), {}, "missing metadata key 'dflash.target_layers'"),
    ("upstream", (), {"dflash.target_layers": ([0, 4, 6], V.ARRAY, V.INT32)}, "0 \\(the token embeddings\\)"),
    ("fork", ("dflash-draft.dflash.mask_token_id",), {}, "'dflash-draft.dflash.mask_token_id'"),
    ("fork", (), {"dflash-draft.dflash.n_target_features": (999, V.UINT32, None)}, "n_target_features = 999"),
    ("upstream", (), {"dflash.attention.causal": (True, V.BOOL, None)}, "causal block attention"),
    ("upstream", (), {"dflash.hidden_activation": ("gelu", V.STRING, None)}, "hidden_activation = 'gelu'"),
    ("upstream", (), {"dflash.rope.dimension_count": (16, V.UINT32, None)}, "partial RoPE"),
    ("upstream", (), {"dflash.attention.sliding_window": (64, V.UINT32, None)}, "sliding_window_pattern"),
    ("upstream", (), {"dflash.block_count": (3, V.UINT32, None)}, "3 layers.*missing tensors \\['blk.2.attn_k.weight'"),
])
def test_bad_metadata(tmp_path, params, schema, drop_kv, set_kv, needle):
    src = _write(tmp_path, "src.gguf", params=params, schema=schema)
    bad = _rewrite(src, tmp_path / "bad.gguf", drop_kv=drop_kv, set_kv=set_kv)
    with pytest.raises(GGUFError, match=needle):
        load_drafter_gguf(bad)


def test_not_a_drafter(smollm2_path):
    with pytest.raises(GGUFError, match="not a DFlash drafter: general.architecture is 'llama'"):
        load_drafter_gguf(smollm2_path)


# --- compatibility with the target ------------------------------------------------------------------------------

def test_check_compatible(tmp_path):
    check_compatible(SMALL, TARGET, "d.gguf")
    check_compatible(dataclasses.replace(SMALL, target_layer_ids=(7,), mask_token_id=511), TARGET, "d.gguf")
    cases = [
        (dataclasses.replace(SMALL, hidden_size=128), "drafter hidden size 128 != target hidden size 64"),
        (dataclasses.replace(SMALL, target_layer_ids=(1, 8)), "name layers [8] but the target has only 8 layers"),
        (dataclasses.replace(SMALL, mask_token_id=512), "mask_token_id 512 is outside the target vocabulary "
                                                        "(512 tokens)"),
    ]
    for dcfg, needle in cases:
        with pytest.raises(GGUFError) as e:
            check_compatible(dcfg, TARGET, tmp_path / "d.gguf")
        assert str(e.value).startswith(str(tmp_path / "d.gguf")) and needle in str(e.value)
        assert "target (qwen3, 8 layers, hidden 64, vocab 512)" in str(e.value)
    everything = dataclasses.replace(SMALL, hidden_size=128, target_layer_ids=(9,), mask_token_id=600)
    with pytest.raises(GGUFError, match="hidden size 128.*layers \\[9\\].*mask_token_id 600"):
        check_compatible(everything, TARGET, "d.gguf")


# --- llama.cpp's own DFlash runs our upstream file ----------------------------------------------------------------

SMOL_DRAFTER = DrafterConfig(num_layers=2, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                             head_dim=64, rms_eps=1e-5, rope_theta=100000.0, block_size=16, mask_token_id=49151,
                             target_layer_ids=(1, 8, 14, 20, 27), max_position=8192)


def test_llamacpp_runs_our_upstream_drafter(tmp_path, smollm2_path, capfd):
    xlc = pytest.importorskip("xllamacpp")
    target = open_gguf(smollm2_path)
    tcfg = ModelConfig.from_gguf(target)
    check_compatible(SMOL_DRAFTER, tcfg, "smol-drafter.gguf")
    drafter = _write(tmp_path, "smol-drafter.gguf", SMOL_DRAFTER, random_drafter_params(SMOL_DRAFTER, 3),
                     schema="upstream", tokenizer_source=smollm2_path)
    meta = read_metadata(drafter)
    assert meta["tokenizer.ggml.tokens"] == target.metadata["tokenizer.ggml.tokens"]
    assert meta[MASK_TOKEN_KEY] == 49151 and meta["dflash.target_layers"] == [2, 9, 15, 21, 28]

    def complete(speculative: bool) -> dict:
        p = xlc.CommonParams()
        p.model.path = str(smollm2_path)
        p.n_ctx = 256
        p.cpuparams.n_threads = 2
        p.cpuparams_batch.n_threads = 2
        p.sampling.temp = 0.0
        p.sampling.top_k = 1
        if speculative:
            p.speculative.types = [xlc.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_DFLASH]
            p.speculative.draft.mparams.path = str(drafter)
            p.speculative.draft.n_max = 15
        server = xlc.Server(p)
        try:
            return server.handle_completions({"prompt": "The three laws of thermodynamics are", "max_tokens": 12,
                                              "temperature": 0, "cache_prompt": False})
        finally:
            del server

    plain = complete(False)
    spec = complete(True)
    log = capfd.readouterr().err
    assert "block_size=16, mask_token_id=49151, n_extract=5" in log
    assert spec["timings"]["draft_n"] > 0, spec["timings"]
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
    assert len(plain["choices"][0]["text"]) > 10
