"""Trained drafter -> a drafter GGUF (upstream llama.cpp schema by default, what `-md` and llama.cpp load) and a
converted directory (config JSON + orbax params) that loads without GGUF parsing."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from converters.drafter_gguf import random_drafter_params, write_drafter_gguf
from converters.load_gguf import fill_model
from dflash_jax.config import DrafterConfig
from dflash_jax.models.drafter import Drafter
from dflash_jax.spec_state import LoadedDrafter

CONFIG_FILE = "drafter_config.json"
PARAMS_DIR = "params"


def params_to_numpy(params: nnx.State) -> dict[tuple, np.ndarray]:
    """nnx.State -> {parameter path: float32 array}, the paths converters.drafter_gguf speaks."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params.to_pure_dict())[0]:
        key = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        out[key] = np.asarray(jax.device_get(leaf), np.float32)
    return out


def export_gguf(dcfg: DrafterConfig, params: nnx.State, path: str | Path, tokenizer_source: str | Path | None,
                qtype: str = "q8_0", schema: str = "upstream") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_drafter_gguf(str(path), dcfg, params_to_numpy(params), schema=schema,
                       tokenizer_source=str(tokenizer_source) if tokenizer_source else None, qtype=qtype)
    return path


def export_dir(dcfg: DrafterConfig, params: nnx.State, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(dcfg), indent=2))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out_dir / PARAMS_DIR, jax.tree.map(np.asarray, params.to_pure_dict()), force=True)
    return out_dir


def load_dir(out_dir: str | Path, dtype=jnp.float32) -> LoadedDrafter:
    """A directory written by export_dir -> LoadedDrafter for the engine."""
    out_dir = Path(out_dir).absolute()
    dcfg = DrafterConfig(**json.loads((out_dir / CONFIG_FILE).read_text()))
    _, state = nnx.split(nnx.eval_shape(lambda: Drafter(dcfg, jnp.float32)))
    with ocp.StandardCheckpointer() as ckpt:
        pure = ckpt.restore(out_dir / PARAMS_DIR, state.to_pure_dict())
    arrays = [(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p), jnp.asarray(v, dtype))
              for p, v in jax.tree_util.tree_flatten_with_path(pure)[0]]
    return LoadedDrafter(dcfg, fill_model(dcfg, jnp.dtype(dtype), arrays, Drafter), str(out_dir))


def to_loaded(dcfg: DrafterConfig, params: nnx.State, dtype=jnp.float32) -> LoadedDrafter:
    """Trained params straight into the engine's drafter (no file)."""
    arrays = [(k, jnp.asarray(v, dtype)) for k, v in params_to_numpy(params).items()]
    return LoadedDrafter(dcfg, fill_model(dcfg, jnp.dtype(dtype), arrays, Drafter), "<trained>")


def grow_layers(loaded: LoadedDrafter, num_layers: int, seed: int = 0) -> LoadedDrafter:
    """The drafter with random layers appended whose attention and MLP output projections are zero: each new layer
    adds nothing to the residual stream until training moves those projections, so the grown drafter starts as the
    same function with more capacity (a trained drafter need not be thrown away to get deeper)."""
    old = loaded.config
    if num_layers <= old.num_layers:
        raise ValueError(f"grow_layers: {loaded.source} already has {old.num_layers} layers; asked for {num_layers}")
    cfg = dataclasses.replace(old, num_layers=num_layers,
                              swa_layers=old.swa_layers + (False,) * (num_layers - old.num_layers) if old.swa_layers
                              else ())
    params = random_drafter_params(cfg, seed)
    params.update(params_to_numpy(nnx.state(loaded.model)))
    for i in range(old.num_layers, num_layers):
        for sub in (("self_attn", "o_proj", "weight"), ("mlp", "down_proj", "weight")):
            params[("layers", i) + sub] = np.zeros_like(params[("layers", i) + sub])
    dtype = jnp.dtype(loaded.model.fc.weight[...].dtype)
    arrays = [(k, jnp.asarray(v, dtype)) for k, v in params.items()]
    return LoadedDrafter(cfg, fill_model(cfg, dtype, arrays, Drafter), f"{loaded.source} grown to {num_layers} layers")
