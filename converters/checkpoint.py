"""Converted model directories (orbax params + config + tokenizer + chat template) and one loader for GGUF or directory.

A converted directory skips GGUF parsing and dequantization, so it loads much faster than the GGUF it came from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from converters.drafter_gguf import check_compatible, load_drafter_gguf
from converters.load_gguf import abstract_model, fill_model, load_gguf
from converters.tokenizer import Tokenizer
from dflash_jax.config import HybridConfig, ModelConfig
from dflash_jax.models.dense import DenseDecoder
from dflash_jax.models.drafter import Drafter
from dflash_jax.spec_state import LoadedDrafter

CONFIG_FILE = "config.json"
TEMPLATE_FILE = "chat_template.jinja"
PARAMS_DIR = "params"
# Parameter layout of the directory: 2 = linears sharing an input fused (dflash_jax/models/dense.py FUSED), 1 (no key)
# = one Linear per GGUF tensor. Older layouts are refused with a clear message rather than an orbax structure error.
LAYOUT = 2


@dataclass
class LoadedModel:
    config: ModelConfig
    model: DenseDecoder
    tokenizer: Tokenizer
    chat_template: str | None  # jinja source, None when the file has none
    source: str


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    cfg, model, g = load_gguf(str(gguf_path), jnp.dtype(dtype), weights="bf16")  # directories hold float params
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps({"model": json.loads(cfg.to_json()), "dtype": str(jnp.dtype(dtype)),
                                                   "source": str(gguf_path), "layout": LAYOUT}, indent=2))
    Tokenizer.from_metadata(g.metadata, source=g.path).save(out_dir)
    template = g.get("tokenizer.chat_template")
    if template:
        (out_dir / TEMPLATE_FILE).write_text(template)
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out_dir / PARAMS_DIR, state.to_pure_dict(), force=True)
    return out_dir


def load_checkpoint(directory: Path, dtype=None) -> LoadedModel:
    directory = Path(directory).absolute()
    meta = json.loads((directory / CONFIG_FILE).read_text())
    if meta.get("layout", 1) != LAYOUT:
        raise ValueError(f"{directory} holds parameter layout {meta.get('layout', 1)} (this version reads {LAYOUT}: "
                         f"q/k/v and gate/up fused); convert its GGUF again")
    cfg_cls = HybridConfig if meta["model"]["arch"] in HybridConfig.ARCHS else ModelConfig
    cfg = cfg_cls(**meta["model"])
    stored = jnp.dtype(meta["dtype"])
    graphdef, state = nnx.split(abstract_model(cfg, stored))
    with ocp.StandardCheckpointer() as ckpt:
        pure = ckpt.restore(directory / PARAMS_DIR, state.to_pure_dict())
    if dtype is not None and jnp.dtype(dtype) != stored:
        pure = jax.tree.map(lambda a: a.astype(dtype), pure)
        graphdef, state = nnx.split(abstract_model(cfg, jnp.dtype(dtype)))
    state.replace_by_pure_dict(pure)
    template_path = directory / TEMPLATE_FILE
    return LoadedModel(cfg, nnx.merge(graphdef, state), Tokenizer.load(directory),
                       template_path.read_text() if template_path.exists() else None, str(directory))


def load_model(path: str | Path, dtype=jnp.bfloat16, weights: str = "auto") -> LoadedModel:
    """A GGUF file or a directory written by `convert_gguf`. weights: 'auto' (= bf16 for now, see `resolve_weights`), 'q8_0' keeps a GGUF's Q8_0 projections as
    int8 + scales (see `load_gguf`), 'bf16' dequantizes everything to `dtype`; directories hold float weights."""
    path = Path(path)
    if path.is_dir():
        return load_checkpoint(path, dtype)
    cfg, model, g = load_gguf(str(path), dtype, weights=weights)
    return LoadedModel(cfg, model, Tokenizer.from_metadata(g.metadata, source=g.path),
                       g.get("tokenizer.chat_template"), str(path))


def load_drafter(path: str | Path, target_cfg: ModelConfig, dtype=jnp.bfloat16) -> LoadedDrafter:
    """A DFlash drafter GGUF (fork or upstream schema), checked against its target before anything is served."""
    dcfg, params = load_drafter_gguf(str(path), np.float32)
    check_compatible(dcfg, target_cfg, str(path))
    arrays = ((key, jnp.asarray(value.astype(jnp.dtype(dtype)))) for key, value in params.items())
    return LoadedDrafter(dcfg, fill_model(dcfg, jnp.dtype(dtype), arrays, Drafter), str(path))
