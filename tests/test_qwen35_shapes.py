"""Qwen3.6-27B shapes without 27B weights: the target's config and tensor map from a header-only (sparse) qwen35
GGUF, its per-slot state size, and the Qwen3.6-27B-DFlash drafter from both drafter schemas — full shape from
metadata and tensor infos, and a scaled-down equivalent (same layer count, GQA ratio, taps, block and mask) loaded for
real, into the engine's Drafter module, against a 64-layer hybrid target."""
from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.checkpoint import load_drafter
from converters.drafter_gguf import PRESETS as DRAFTER_PRESETS
from converters.drafter_gguf import (check_compatible, load_drafter_gguf, param_shapes, random_drafter_params,
                                     read_drafter_config, tensor_names, write_drafter_gguf, write_drafter_header)
from converters.gguf_file import GGUFError, open_gguf
from converters.synthetic import PRESETS, write_random_gguf
from converters.tensor_map import check_tensors
from dflash_jax.config import DrafterConfig, HybridConfig
from dflash_jax.models.drafter import Drafter
from dflash_jax.state_pool import state_bytes_per_slot

TAPS = (1, 16, 31, 46, 61)  # 64 layers: uniform from 1 to L-3
DRAFTER_27B = DrafterConfig(num_layers=5, hidden_size=5120, intermediate_size=17408, num_heads=32, num_kv_heads=8,
                            head_dim=128, rms_eps=1e-6, rope_theta=1e7, block_size=16, mask_token_id=248070,
                            target_layer_ids=TAPS, max_position=262144)
assert DRAFTER_27B == DRAFTER_PRESETS["qwen3.6-27b"]  # what `python -m converters.drafter_gguf` writes for the GPU
MiB = 1 << 20


@pytest.fixture(scope="module")
def target_27b(tmp_path_factory):
    path = tmp_path_factory.mktemp("q35") / "qwen35-27b-header.gguf"
    write_random_gguf(str(path), dataclasses.replace(PRESETS["qwen35-27b"], qtype="q8_0"), None, header_only=True)
    return open_gguf(str(path))


def test_27b_target_config_and_tensor_map(target_27b):
    g = target_27b
    assert os.stat(g.path).st_blocks * 512 < 64 * MiB  # the 28 GB of Q8_0 weights are a hole
    cfg = HybridConfig.from_gguf(g)
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (64, 5120, 17408, 248320)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_dims, cfg.rope_theta) == (24, 4, 256, 64, 1e7)
    assert cfg.attention_layers == tuple(range(3, 64, 4)) and len(cfg.recurrent_layers) == 48
    assert cfg.num_mtp_layers == 1 and "blk.64.nextn.eh_proj.weight" in g.tensors  # kept in the file, not loaded
    assert (cfg.ssm_k_heads, cfg.ssm_v_heads, cfg.ssm_head_dim, cfg.conv_dim) == (16, 48, 128, 10240)
    expected = check_tensors(g, cfg)  # every tensor present with the shape our model wants, nothing left over
    assert expected["blk.3.attn_q.weight"][1] == (12288, 5120)  # query + gate, packed per head
    assert expected["blk.0.attn_qkv.weight"][1] == (10240, 5120)
    assert expected["blk.0.ssm_conv1d.weight"][1] == (10240, 4)
    # DESIGN.md section 6: 144 MiB of delta-rule state + 5.6 MiB of conv window per slot, 64 KiB of f16 KV per token.
    assert state_bytes_per_slot(cfg) == 144 * MiB + 48 * 3 * 10240 * 4
    assert cfg.num_kv_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2 == 64 * 1024


@pytest.mark.parametrize("schema", ["fork", "upstream"])
def test_27b_drafter_shape_from_metadata(target_27b, tmp_path, schema):
    path = tmp_path / f"dflash-27b-{schema}.gguf"
    write_drafter_header(str(path), DRAFTER_27B, schema)
    dcfg, got_schema = read_drafter_config(str(path))
    assert got_schema == schema and dcfg == DRAFTER_27B
    g = open_gguf(str(path))
    shapes = param_shapes(dcfg)
    assert {n: g.tensors[n].shape for n in g.tensors} == {n: shapes[p] for n, p in tensor_names(schema, dcfg).items()}
    assert g.tensors["dflash_fc.weight" if schema == "fork" else "fc.weight"].shape == (5120, 5 * 5120)
    check_compatible(dcfg, HybridConfig.from_gguf(target_27b), str(path))
    abstract = nnx.eval_shape(lambda: Drafter(dcfg, jnp.bfloat16))
    got = {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p): v.shape
           for p, v in nnx.to_flat_state(nnx.state(abstract))}
    assert got == shapes


def _scaled_target(num_layers: int) -> HybridConfig:
    return HybridConfig(arch="qwen35", num_layers=num_layers, hidden_size=64, intermediate_size=128, num_heads=4,
                        num_kv_heads=1, head_dim=32, vocab_size=248320, rope_theta=1e7, rms_eps=1e-6,
                        max_position=4096, tie_embeddings=False, has_qkv_bias=False, has_qk_norm=True, rope_dims=8,
                        ssm_k_heads=2, ssm_v_heads=4, ssm_head_dim=16)


@pytest.mark.parametrize("schema", ["fork", "upstream"])
def test_scaled_27b_drafter_loads(tmp_path, schema):
    """The 27B drafter's structure at hidden 64: 5 layers, 4:1 GQA, the 64-layer taps, block 16, mask 248070."""
    dc = dataclasses.replace(DRAFTER_27B, hidden_size=64, intermediate_size=224, num_heads=8, num_kv_heads=2,
                             head_dim=16)
    params = random_drafter_params(dc, seed=2)
    path = tmp_path / f"dflash-small-{schema}.gguf"
    write_drafter_gguf(str(path), dc, params, schema=schema)
    dcfg, loaded = load_drafter_gguf(str(path))
    assert dcfg == dc
    assert loaded.keys() == params.keys() and all(np.array_equal(loaded[k], params[k]) for k in params)
    drafter = load_drafter(path, _scaled_target(64), jnp.float32)
    np.testing.assert_array_equal(drafter.model.fc.weight[...], params[("fc", "weight")])
    with pytest.raises(GGUFError, match=r"dflash-small.*layers \[46, 61\]"):
        load_drafter(path, _scaled_target(40), jnp.float32)
