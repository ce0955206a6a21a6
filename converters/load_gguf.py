"""GGUF file -> (ModelConfig, DenseDecoder with its weights on the default device), one tensor at a time."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from converters.gguf_file import GGUFFile, open_gguf
from converters.tensor_map import check_tensors, fused_path, load_q8_0, load_tensor, q8_0_linears
from dflash_jax.buckets import pad_rows
from dflash_jax.config import HybridConfig, ModelConfig
from dflash_jax.models.dense import DenseDecoder
from dflash_jax.models.hybrid import HybridDecoder
from pallas_kernels.weight_matmul import q8_0_layout, q8_0_stored_out


def model_class(cfg: ModelConfig):
    return HybridDecoder if isinstance(cfg, HybridConfig) else DenseDecoder


def abstract_model(cfg: ModelConfig, dtype) -> DenseDecoder:
    """The model with shapes only (no memory), to be filled from a checkpoint."""
    return nnx.eval_shape(lambda: model_class(cfg)(cfg, dtype))


def set_param(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def fill_model(cfg: ModelConfig, dtype, arrays, module_cls=DenseDecoder, **module_kwargs):
    """arrays: iterable of (param path, array); every parameter must be given exactly once."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: module_cls(cfg, dtype, **module_kwargs)))
    pure = state.to_pure_dict()
    seen = set()
    for path, value in arrays:
        set_param(pure, path, value)
        seen.add(path)
    flat_paths = {tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]}
    missing = [p for p in flat_paths if not isinstance(_get(pure, p), jax.Array)]
    assert not missing, f"parameters never loaded: {missing[:5]}"
    state.replace_by_pure_dict(pure)
    return nnx.merge(graphdef, state)


def _get(tree, path):
    for key in path:
        tree = tree[getattr(key, "key", getattr(key, "idx", key))]
    return tree


WEIGHT_FORMATS = ("auto", "q8_0", "bf16")


def resolve_weights(weights: str) -> str:
    """'auto' is 'bf16' (every tensor dequantized to the compute dtype) on every platform for now: on a CPU, XLA
    materializes the dequantized weight for every int8 product (SmolLM2 decode 4.6x slower with q8_0); on an H200
    the Mosaic Q8_0 product made the Qwen3.6-27B step as fast as bf16 at one slot (14.86 vs 14.88 ms) but not at 8
    (20.41 vs 16.86 ms; BENCHMARKS.md, session 9). 'q8_0' (half the weight memory) is opt-in."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    return "bf16" if weights == "auto" else weights


def load_gguf(path: str, dtype=jnp.bfloat16, progress: bool = True,
              weights: str = "auto") -> tuple[ModelConfig, DenseDecoder, GGUFFile]:
    """weights='q8_0' (opt-in, see `resolve_weights`) keeps every Q8_0 projection as int8 values + f16 scales, exactly as stored, so the
    model computes what llama.cpp's Q8_0 model computes; every other tensor, and every tensor with 'bf16', is
    dequantized to `dtype` (the name says what GPUs run; on CPU `dtype` is usually float32)."""
    weights = resolve_weights(weights)
    g = open_gguf(path)
    cfg = ModelConfig.from_gguf(g)
    expected = check_tensors(g, cfg)
    q8 = q8_0_linears(g, cfg, expected) if weights == "q8_0" else {}

    q8_paths = frozenset(q8.values())
    q8_layout = q8_0_layout()
    # GGUF tensors that make one parameter: a fused Linear's parts (in output order), else a tensor alone.
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for name, (param_path, _) in expected.items():
        path, part = fused_path(param_path, q8_paths)
        groups.setdefault(path, []).append((part, name))

    def tensor_arrays(name):
        """(model parameter path, numpy array, output axis) of everything GGUF tensor `name` fills."""
        out = []
        if name in q8:
            qweight, scales = load_q8_0(g, cfg, name, q8_layout)
            out_axis = 0 if q8_layout == "nk" else 1  # parts of a fused Linear stack along the output axis
            linear = tuple(int(p) if p.isdigit() else p for p in q8[name].split("."))
            out += [(fused_path(linear + ("qweight",), q8_paths)[0], qweight, out_axis),
                    (fused_path(linear + ("scales",), q8_paths)[0], scales, 1)]
            if name != "token_embd.weight":
                return out
        path = fused_path(expected[name][0], q8_paths)[0]
        return out + [(path, load_tensor(g, cfg, name).astype(np.dtype(dtype)), 0)]

    def arrays():
        # One tensor (or fused group) dequantized at a time keeps host memory bounded by the largest of them.
        with tqdm(total=len(expected), desc=f"loading {g.path.rsplit('/', 1)[-1]}", disable=not progress,
                  unit="tensor") as bar:
            for parts in groups.values():
                loaded = [tensor_arrays(name) for _, name in sorted(parts)]
                bar.update(len(parts))
                for j, (path, value, axis) in enumerate(loaded[0]):
                    if len(loaded) > 1:  # a fused Linear: every part gives the same leaves (one format)
                        value = np.concatenate([leaves[j][1] for leaves in loaded], axis=axis)
                    if path[-1] in ("qweight", "scales") and q8_layout == "nk":
                        # zero rows up to the Mosaic Q8_0 kernel's 64-wide output tiles
                        value = pad_rows(value, q8_0_stored_out(value.shape[axis], q8_layout), axis=axis)
                    yield path, jnp.asarray(value)

    return cfg, fill_model(cfg, dtype, arrays(), model_class(cfg), q8_linears=q8_paths), g
