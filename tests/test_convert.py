"""`python -m converters convert`: the orbax directory loads back to the same model, tokenizer and template."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.checkpoint import load_model
from converters.synthetic import PRESETS, write_random_gguf
from dflash_jax.reference_decode import greedy_generate


def test_convert_round_trip(tmp_path):
    src = tmp_path / "qwen3-tiny.gguf"
    write_random_gguf(str(src), PRESETS["qwen3-tiny"], "tests/data/vocab/ggml-vocab-qwen2.gguf", seed=5,
                      chat_template="{{ messages[0]['content'] }}")
    out = tmp_path / "converted"
    r = subprocess.run([sys.executable, "-m", "converters", "convert", str(src), "-o", str(out), "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = load_model(src, jnp.float32), load_model(out, jnp.float32)
    assert a.config == b.config
    assert a.chat_template == b.chat_template == "{{ messages[0]['content'] }}"
    text = "def f(x): return x ** 2  # ünïcödé"
    assert a.tokenizer.encode(text) == b.tokenizer.encode(text)
    flat_a = jax.tree_util.tree_flatten_with_path(nnx.state(a.model).to_pure_dict())[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(nnx.state(b.model).to_pure_dict())[0])
    assert len(flat_a) == len(flat_b) > 10
    for path, x in flat_a:
        assert np.array_equal(np.asarray(x), np.asarray(flat_b[path])), path
    prompt = [a.tokenizer.encode("hello world")]
    assert greedy_generate(a.model, prompt, 8)[0] == greedy_generate(b.model, prompt, 8)[0]
    # A directory converted before q/k/v and gate/up were fused (no "layout" key) is refused with a clear message.
    meta = json.loads((out / "config.json").read_text())
    del meta["layout"]
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="convert its GGUF again"):
        load_model(out, jnp.float32)


def test_convert_bad_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    r = subprocess.run([sys.executable, "-m", "converters", "convert", str(bad), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and str(bad) in r.stderr and "magic" in r.stderr
