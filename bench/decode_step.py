"""Plain decode (T=1, no speculation) step time of the engine's jitted step on random weights built on the device.

No GGUF: the model is `abstract_model(cfg)` split into (graphdef, state) and every leaf is drawn with jax.random
on the device (one small jit per distinct shape), so the weights never touch host memory. For each slot count B
the paged KV cache holds `--ctx` cached tokens per slot (pages allocated, random content); the step writes token
ctx+1 of every slot and attends over it, exactly as Engine._decode does.

Variants, each timed with a warm-up and then `--iters` steps:
  full      `model_step` (forward, final norm, logits, sampling, penalty counts) with device-resident inputs,
            dispatched back to back and synchronised once at the end: the device step time, unless the host needs
            longer to dispatch a call (compare `host dispatch`; --profile gives the GPU time itself).
  engine    the same compiled `model_step`, called the way Engine._run does it: numpy inputs (host->device each step)
            and a device_get of the sampled outputs every step (host sync per step).
  fwd_logits  forward + logits + argmax (no sampling, no counts).
  fwd       forward only (returns the last hidden row).
  fast      the same computation as `full`, jitted with the GraphDef closed over and the state as a flat list of
            arrays (no static-argument hashing of the GraphDef, no nnx.State flattening per call).
  fast_engine  `fast` called as `engine` is (numpy inputs, outputs fetched every step).
  fast_greedy  `fast` as a greedy batch compiles it (--greedy; sampling.needs_full false: argmax, no candidate
            search, no top logprobs), which is what llama.cpp's batched benchmarks time.
Every timing also reports the host time per call spent dispatching; --profile traces chosen (B, variant) pairs with
jax.profiler and sums the GPU kernel time per step.

Roofline: t_floor = bytes / copy bandwidth, copy bandwidth measured here (x * s over a 4 GiB bf16 array, bytes
read + written; a read-only reduction is reported beside it; --bandwidth-only adds f32 and PyTorch's copy_, which
reached 4.3 TB/s on an H200 where the bf16 `x * s` kernel reached 3.0). Two byte counts are given: all parameter
bytes (the usual weight-streaming roofline) and the bytes one decode step must read (parameters minus the
embedding table when untied, since decode gathers only B rows of it, plus the KV cache actually attended:
B * (ctx+1) tokens).

    python bench/decode_step.py --models qwen3-8b,smollm2-135m --slots 1,2,4,8,16 --out results.jsonl
    python bench/decode_step.py --models tiny --slots 1,2 --iters 3      # CPU smoke test
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import inspect
import json
import os
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dflash_jax.config import HybridConfig, ModelConfig  # noqa: E402
from dflash_jax.kv_cache import AttentionMeta  # noqa: E402
from dflash_jax.models.dense import DenseDecoder, Linear  # noqa: E402
from dflash_jax.models.hybrid import HybridDecoder  # noqa: E402
from dflash_jax.profiling import device_profile  # noqa: E402
from dflash_jax.sampling import SamplingArrays  # noqa: E402
from dflash_jax.state_pool import make_cache  # noqa: E402
from dflash_jax.step_fns import StepInputs, model_step  # noqa: E402
from pallas_kernels.weight_matmul import Q8_BLOCK  # noqa: E402

PAGE_SIZE = 16
WEIGHT_FORMATS = ("bf16", "q8_0")  # as converters.load_gguf.resolve_weights: float weights, or every projection Q8_0

SHAPES = {
    "qwen3-8b": ModelConfig(arch="qwen3", num_layers=36, hidden_size=4096, intermediate_size=12288, num_heads=32,
                            num_kv_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6, rms_eps=1e-6,
                            max_position=40960, tie_embeddings=False, has_qkv_bias=False, has_qk_norm=True),
    "smollm2-135m": ModelConfig(arch="llama", num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9,
                                num_kv_heads=3, head_dim=64, vocab_size=49152, rope_theta=1e5, rms_eps=1e-5,
                                max_position=8192, tie_embeddings=True, has_qkv_bias=False, has_qk_norm=False),
    "tiny": ModelConfig(arch="qwen3", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                        num_kv_heads=2, head_dim=16, vocab_size=512, rope_theta=1e6, rms_eps=1e-6,
                        max_position=4096, tie_embeddings=False, has_qkv_bias=False, has_qk_norm=True),
    # Qwen3.6-27B (converters/synthetic_qwen35.py PRESETS["qwen35-27b"] as HybridConfig.from_gguf reads it): 48 Gated
    # DeltaNet layers + 16 gated full-attention layers (every 4th), untied 248320-row vocab.
    "qwen35-27b": HybridConfig(arch="qwen35", num_layers=64, hidden_size=5120, intermediate_size=17408,
                               num_heads=24, num_kv_heads=4, head_dim=256, vocab_size=248320, rope_theta=1e7,
                               rms_eps=1e-6, max_position=262144, tie_embeddings=False, has_qkv_bias=False,
                               has_qk_norm=True, rope_dims=64, full_attention_interval=4, conv_kernel=4,
                               ssm_k_heads=16, ssm_v_heads=48, ssm_head_dim=128, num_mtp_layers=1),
    # PRESETS["qwen35-tiny"] (attention at layers 3 and 7, 2 key heads tiled to 4 value heads): CPU smoke tests.
    "qwen35-tiny": HybridConfig(arch="qwen35", num_layers=8, hidden_size=128, intermediate_size=256, num_heads=4,
                                num_kv_heads=2, head_dim=64, vocab_size=512, rope_theta=1e7, rms_eps=1e-6,
                                max_position=4096, tie_embeddings=False, has_qkv_bias=False, has_qk_norm=True,
                                rope_dims=16, full_attention_interval=4, conv_kernel=4, ssm_k_heads=2,
                                ssm_v_heads=4, ssm_head_dim=32),
}

T0 = time.monotonic()


def log(*a):
    print(f"[{time.monotonic() - T0:7.1f}s]", *a, flush=True)


# --- model and cache built on the device -----------------------------------------------------------------------------

def abstract_model(cfg: ModelConfig, dtype, q8_linears: frozenset[str] = frozenset()):
    """The target with shapes only (no memory), as converters.load_gguf.abstract_model (which imports gguf)."""
    cls = HybridDecoder if isinstance(cfg, HybridConfig) else DenseDecoder
    return nnx.eval_shape(lambda: cls(cfg, dtype, q8_linears=q8_linears))


def linear_paths(module) -> frozenset[str]:
    """Dotted paths of every Linear of a module ('layers.3.mlp.down_proj', 'lm_head'); a fused Linear (models/dense.py
    FUSED, where this checkout has it) also names its parts, which is what decides that it holds Q8_0."""
    try:
        from dflash_jax.models.dense import FUSED
    except ImportError:
        FUSED = {}
    out = set()
    for path, node in nnx.iter_graph(module):
        if isinstance(node, Linear):
            name = ".".join(str(p) for p in path)
            out.add(name)
            out.update(f"{name[:-len(str(path[-1]))]}{part}" for part in FUSED.get(str(path[-1]), ()))
    return frozenset(out)


def abstract_target(cfg: ModelConfig, dtype, weights: str = "bf16"):
    """weights 'q8_0': every projection (every Linear, the LM head included) int8 + f16 scales, as a Q8_0 GGUF loads
    with --weights q8_0; the untied embedding stays `dtype` (only looked up). 'bf16': every weight in `dtype`."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    model = abstract_model(cfg, dtype)
    if weights == "bf16":
        return model
    model = abstract_model(cfg, dtype, linear_paths(model))
    floats = [path for path, node in nnx.iter_graph(model) if isinstance(node, Linear) and not node.is_q8_0]
    assert not floats, f"q8_0 target still has float linears: {floats[:4]}"
    return model


def random_model(cfg: ModelConfig, dtype, seed: int = 0, weights: str = "bf16"):
    return random_module(abstract_target(cfg, dtype, weights), seed)


def leaf_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def param_bytes(state) -> dict:
    """Bytes of a (possibly abstract) nnx.State: all leaves, the embedding table, and the weight count (Q8_0 scales
    not counted as weights)."""
    out = {"all": 0, "embed": 0, "params": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.to_pure_dict())[0]:
        n = int(np.prod(leaf.shape))
        nbytes = n * jnp.dtype(leaf.dtype).itemsize
        out["all"] += nbytes
        names = leaf_names(path)
        out["embed"] += nbytes if names[0] == "embed_tokens" else 0
        out["params"] += 0 if names[-1] == "scales" else n
    return out


def random_module(abstract_module, seed: int = 0):
    """(graphdef, state, bytes) of an abstract (eval_shape) module with every leaf drawn on the device: norms 1,
    biases 0, Gated DeltaNet's A (= -exp(A_log), a decay) -0.1, Q8_0 values uniform int8 in [-127, 127] with scales
    1 / (127 sqrt(fan_in)), the rest N(0, 0.02)."""
    graphdef, abstract = nnx.split(abstract_module)
    pure = abstract.to_pure_dict()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    # One small jit per distinct shape (a single jit drawing every leaf took minutes to compile on the GPU).
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    arrays = []
    for k, (path, leaf) in zip(keys, leaves):
        names = leaf_names(path)
        shape, dt = tuple(leaf.shape), jnp.dtype(leaf.dtype)
        if any("norm" in n for n in names):
            arrays.append(jnp.ones(shape, dt))
        elif names[-1] == "bias":
            arrays.append(jnp.zeros(shape, dt))
        elif names[-1] == "A":
            arrays.append(jnp.full(shape, -0.1, dt))
        elif names[-1] == "qweight":
            arrays.append(_int8(k, shape))
        elif jnp.issubdtype(dt, jnp.integer):  # token ids (a drafter's draft vocabulary): in order
            arrays.append(jnp.arange(int(np.prod(shape)), dtype=dt).reshape(shape))
        elif names[-1] == "scales":  # (in / 32, out): fan_in = in
            arrays.append(jnp.full(shape, 1.0 / (127 * np.sqrt(shape[0] * Q8_BLOCK)), dt))
        else:
            arrays.append(_normal(k, shape, dt, 0.02))
        jax.block_until_ready(arrays[-1])  # one leaf's temporaries at a time
    state = abstract
    state.replace_by_pure_dict(jax.tree_util.tree_unflatten(treedef, arrays))
    return graphdef, state, param_bytes(state)


@partial(jax.jit, static_argnums=(1,))
def _int8(key, shape):
    return jax.random.randint(key, shape, -127, 128, jnp.int8)


@partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key, shape, dtype, scale):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_cache(cfg: ModelConfig, num_pages: int, dtype, seed: int = 1, num_rows: int = 1):
    """The target's cache (dflash_jax.state_pool.make_cache) with random content: KV pages N(0, 1); for a hybrid
    also `num_rows` rows of recurrent state (conv window and delta-rule state, f32) N(0, 0.01)."""
    abstract = jax.eval_shape(lambda: make_cache(cfg, num_pages, PAGE_SIZE, num_rows, dtype))
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree_util.tree_leaves(abstract))))
    fields = {}
    for f in dataclasses.fields(abstract):  # k, v (and conv, ssm): lists of arrays
        scale = 1.0 if f.name in ("k", "v") else 0.01
        fields[f.name] = [_normal(next(keys), tuple(x.shape), jnp.dtype(x.dtype), scale)
                          for x in getattr(abstract, f.name)]
    cache = type(abstract)(**fields)
    jax.block_until_ready(cache)
    return cache


def decode_inputs(cfg: ModelConfig, b: int, ctx: int, pages_per_slot: int, seed: int = 2) -> StepInputs:
    """Numpy inputs of one decode step, as Engine._inputs builds them: slot i feeds one token at position ctx."""
    rng = np.random.default_rng(seed)
    kv_len = ctx + 1
    assert -(-kv_len // PAGE_SIZE) <= pages_per_slot
    tokens = rng.integers(0, cfg.vocab_size, (b, 1), dtype=np.int32)
    page_table = (1 + np.arange(b)[:, None] * pages_per_slot + np.arange(pages_per_slot)[None, :]).astype(np.int32)
    meta = AttentionMeta(q_lens=np.ones((b,), np.int32), kv_lens=np.full((b,), kv_len, np.int32),
                         page_table=page_table, slot_ids=np.arange(b, dtype=np.int32))
    sampling = SamplingArrays(temperature=np.full((b,), 0.8, np.float32), top_k=np.full((b,), 40, np.int32),
                              top_p=np.full((b,), 0.95, np.float32), min_p=np.full((b,), 0.05, np.float32),
                              presence_penalty=np.zeros((b,), np.float32),
                              frequency_penalty=np.zeros((b,), np.float32),
                              seed=np.arange(b, dtype=np.uint32))
    return StepInputs(tokens, meta, np.arange(b, dtype=np.int32), np.zeros((b,), bool), sampling)


def slot_rows(num_rows: int, vocab_size: int):
    """The per-slot device rows the step carries: step_fns.SlotRows where this checkout has it, else the (R, V)
    penalty counts."""
    try:
        from dflash_jax.step_fns import SlotRows
    except ImportError:
        return jnp.zeros((num_rows, vocab_size), jnp.int32)
    return SlotRows.create(num_rows, vocab_size)


def call_model_step(graphdef, state, cache, counts, inputs, full: bool = True):
    """dflash_jax.step_fns.model_step without a drafter, whichever of its two signatures this checkout has."""
    if "drafter_graphdef" in MODEL_STEP_PARAMS:
        cache, _, counts, out = model_step(graphdef, None, (), state, None, cache, None, counts, inputs, full=full)
    else:
        cache, counts, out = model_step(graphdef, state, cache, counts, inputs)
    return cache, counts, out


def closed_model_step(graphdef, state, full: bool = True):
    """model_step with the GraphDef closed over instead of passed as a static argument, and the state passed as a
    flat list of arrays: the same computation, without jit hashing/comparing the GraphDef and flattening the
    nnx.State on every call. full=False: the greedy variant (no candidate search, no random draw, no top logprobs).
    Returns (fn(leaves, cache, counts, inputs), leaves)."""
    leaves, treedef = jax.tree_util.tree_flatten(state)

    @partial(jax.jit, donate_argnums=(1, 2))
    def step(leaves, cache, counts, inputs):
        return call_model_step(graphdef, jax.tree_util.tree_unflatten(treedef, leaves), cache, counts, inputs,
                               full)

    return step, leaves


MODEL_STEP_PARAMS = tuple(inspect.signature(getattr(model_step, "__wrapped__", model_step)).parameters)


# --- the variants without sampling -----------------------------------------------------------------------------------

@partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def fwd_step(graphdef, state, cache, inputs: StepInputs):
    model = nnx.merge(graphdef, state)
    hidden, cache, _ = model(inputs.tokens, inputs.meta, cache)
    last = jnp.maximum(inputs.meta.q_lens - 1, 0)
    return cache, jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


@partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def fwd_logits_step(graphdef, state, cache, inputs: StepInputs):
    model = nnx.merge(graphdef, state)
    hidden, cache, _ = model(inputs.tokens, inputs.meta, cache)
    last = jnp.maximum(inputs.meta.q_lens - 1, 0)
    logits = model.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])
    return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)


# --- timing ----------------------------------------------------------------------------------------------------------

def memory_bandwidth(gib: float = 4.0, iters: int = 30, warmup: int = 5, more: bool = False) -> dict:
    """copy: y = x * s (bytes read + written); read: sum of x into f32 (bytes read), over a `gib` GiB bf16 array.
    more=True adds: the same on float32, and PyTorch's device-to-device copy_ when torch with CUDA is importable."""
    n = int(gib * 2**30) // 2
    x = _normal(jax.random.key(3), (n // 8192, 8192), jnp.bfloat16, 1.0)
    s = jnp.asarray(1.0, jnp.bfloat16)
    fns = {"copy": (jax.jit(lambda x, s: x * s), 2 * x.nbytes, (x, s)),
           "read": (jax.jit(lambda x, s: jnp.sum(x * s, axis=0, dtype=jnp.float32)), x.nbytes, (x, s))}
    if more:
        x32 = _normal(jax.random.key(4), (n // 16384, 8192), jnp.float32, 1.0)
        s32 = jnp.asarray(1.0, jnp.float32)
        fns["copy_f32"] = (jax.jit(lambda x, s: x * s), 2 * x32.nbytes, (x32, s32))
        fns["read_f32_rows"] = (jax.jit(lambda x, s: jnp.sum(x * s, axis=1)), x32.nbytes, (x32, s32))
    res = {}
    for name, (f, nbytes, a) in fns.items():
        for _ in range(warmup):
            f(*a).block_until_ready()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            f(*a).block_until_ready()
            times.append(time.perf_counter() - t)
        med = float(np.median(times))
        res[name] = {"bytes": nbytes, "median_s": med, "min_s": min(times), "GBps": nbytes / med / 1e9,
                     "GBps_best": nbytes / min(times) / 1e9}
    del x
    if more:
        try:
            import torch
            if torch.cuda.is_available():
                xt = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
                yt = torch.empty_like(xt)
                for _ in range(warmup):
                    yt.copy_(xt)
                torch.cuda.synchronize()
                ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iters)]
                for a, b in ev:
                    a.record()
                    yt.copy_(xt)
                    b.record()
                torch.cuda.synchronize()
                times = [a.elapsed_time(b) / 1e3 for a, b in ev]
                med = float(np.median(times))
                res["torch_copy"] = {"bytes": 2 * xt.nbytes, "median_s": med, "min_s": min(times),
                                     "GBps": 2 * xt.nbytes / med / 1e9, "GBps_best": 2 * xt.nbytes / min(times) / 1e9}
                del xt, yt
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            res["torch_copy"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return res


def time_loop(step, n_warm: int, iters: int, repeats: int = 5) -> tuple[float, list[float], float]:
    """step() runs one call and returns something to block on. Returns the median over `repeats` of the mean ms per
    step of `iters` back-to-back calls, the repeats, and the median host time per call spent dispatching (until the
    last call returned, before blocking): when it is close to the step time the loop is host-bound."""
    out = None
    for _ in range(n_warm):
        out = step()
    jax.block_until_ready(out)
    means, host = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            out = step()
        host.append((time.perf_counter() - t) / iters * 1e3)
        jax.block_until_ready(out)
        means.append((time.perf_counter() - t) / iters * 1e3)
    return float(np.median(means)), means, float(np.median(host))


def bench_model(name: str, args, results: list, deadline: float) -> None:
    cfg = SHAPES[name]
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    log(f"== {name}: building random {args.dtype} weights on {dev}")
    graphdef, state, nbytes = random_model(cfg, dtype, weights=args.weights)
    log(f"   {args.weights} params {nbytes['all'] / 1e9:.3f} GB (embedding table {nbytes['embed'] / 1e9:.3f} GB)")
    bw = None
    if args.copy_gib > 0:  # measured here, after the weights were drawn, so the card is out of its idle clocks
        bws = memory_bandwidth(args.copy_gib)
        bw = bws["copy"]
        log(f"   copy bandwidth {bws['copy']['GBps']:.1f} GB/s median ({bws['copy']['GBps_best']:.1f} best), "
            f"read bandwidth {bws['read']['GBps']:.1f} GB/s median ({bws['read']['GBps_best']:.1f} best), "
            f"over a {args.copy_gib} GiB bf16 array")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"model": name, "bandwidth": bws, "device": dev.device_kind}) + "\n")
    kv_token_bytes = 2 * cfg.num_kv_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
    slots = [int(s) for s in args.slots.split(",")]
    variants_for = {b: ["full", "engine", "fast", "fast_engine"] + (["fast_greedy"] if args.greedy else [])
                    for b in slots}
    for b in [int(s) for s in args.extra_slots.split(",") if s]:
        if b in variants_for:
            variants_for[b] += ["fwd_logits", "fwd"]
    pages_per_slot = max(-(-(args.ctx + 1) // PAGE_SIZE), args.per_slot // PAGE_SIZE)
    # One page pool for every B (slot i owns pages 1 + i*M .. (i+1)*M), so its shape never changes.
    fast_step, leaves = closed_model_step(graphdef, state)
    greedy_step, _ = closed_model_step(graphdef, state, full=False)
    profile = {(int(x.split(":")[0]), x.split(":")[1]) for x in args.profile.split(",") if x}
    holder = {"cache": random_cache(cfg, 1 + max(slots) * pages_per_slot, dtype, num_rows=1 + max(slots))}
    for b in slots:
        if time.monotonic() > deadline:
            log(f"   deadline reached: skipping B={b} and later")
            break
        holder["counts"] = slot_rows(b + 1, cfg.vocab_size)
        np_inputs = decode_inputs(cfg, b, args.ctx, pages_per_slot)
        dev_inputs = jax.device_put(np_inputs)

        def full(inp):
            holder["cache"], holder["counts"], out = call_model_step(graphdef, state, holder["cache"],
                                                                     holder["counts"], inp)
            return out.tokens

        def engine():  # as Engine._run: numpy inputs in, the sampled outputs fetched every step
            holder["cache"], holder["counts"], out = call_model_step(graphdef, state, holder["cache"],
                                                                     holder["counts"], np_inputs)
            return jax.device_get((out.tokens, out.logprobs, out.top_ids, out.top_logprobs))[0]

        def fwd(inp):
            holder["cache"], h = fwd_step(graphdef, state, holder["cache"], inp)
            return h

        def fwd_logits(inp):
            holder["cache"], tok = fwd_logits_step(graphdef, state, holder["cache"], inp)
            return tok

        def fast(inp):
            holder["cache"], holder["counts"], out = fast_step(leaves, holder["cache"], holder["counts"], inp)
            return out.tokens

        def fast_greedy(inp):
            holder["cache"], holder["counts"], out = greedy_step(leaves, holder["cache"], holder["counts"], inp)
            return out.tokens

        def fast_engine():
            holder["cache"], holder["counts"], out = fast_step(leaves, holder["cache"], holder["counts"], np_inputs)
            return jax.device_get((out.tokens, out.logprobs, out.top_ids, out.top_logprobs))[0]

        fns = {"full": lambda: full(dev_inputs), "fast": lambda: fast(dev_inputs), "fast_engine": fast_engine,
               "fast_greedy": lambda: fast_greedy(dev_inputs),
               "engine": engine, "fwd": lambda: fwd(dev_inputs),
               "fwd_logits": lambda: fwd_logits(dev_inputs)}
        if args.hlo_dir:  # the compiled steps, to name the fusions a profile shows
            os.makedirs(args.hlo_dir, exist_ok=True)
            for tag, fn in [("fast", fast_step)] + ([("fast_greedy", greedy_step)] if args.greedy else []):
                text = fn.lower(leaves, holder["cache"], holder["counts"], dev_inputs).compile().as_text()
                with gzip.open(os.path.join(args.hlo_dir, f"{name}_b{b}_{tag}.hlo.gz"), "wt") as f:
                    f.write(text)
        kv_read = b * (args.ctx + 1) * kv_token_bytes
        kv_gathered = b * pages_per_slot * PAGE_SIZE * kv_token_bytes
        for variant in variants_for[b]:
            if time.monotonic() > deadline:
                log(f"   deadline reached: skipping B={b} {variant}")
                break
            # bytes the step must read: params (less the embedding table when untied: decode gathers B rows of
            # it; less the LM head too for `fwd`) plus the attended KV
            step_bytes = nbytes["all"] - (0 if cfg.tie_embeddings else nbytes["embed"]) + kv_read
            if variant == "fwd" and not cfg.tie_embeddings:
                step_bytes -= nbytes["embed"]  # lm_head has the embedding table's shape
            t = time.monotonic()
            try:
                jax.block_until_ready(fns[variant]())  # compile (or cache hit) + first run
                compile_s = time.monotonic() - t
                ms, runs, host_ms = time_loop(fns[variant], args.warmup, args.iters)
            except Exception as e:  # noqa: BLE001 - report and go on
                log(f"   B={b} {variant}: FAILED {type(e).__name__}: {str(e)[:400]}")
                results.append({"model": name, "B": b, "variant": variant, "error": f"{type(e).__name__}: {e}"[:1000]})
                continue
            r = {"model": name, "device": dev.device_kind, "B": b, "variant": variant, "weights": args.weights,
                 "ctx": args.ctx, "pages_per_slot": pages_per_slot, "ms": ms, "ms_min": min(runs), "ms_runs": runs,
                 "host_dispatch_ms": host_ms, "tok_s": b / ms * 1e3, "compile_s": compile_s,
                 "param_GB": nbytes["all"] / 1e9,
                 "step_read_GB": step_bytes / 1e9, "kv_read_GB": kv_read / 1e9, "kv_gathered_GB": kv_gathered / 1e9}
            if bw:
                r["copy_GBps"] = bw["GBps"]
                r["floor_ms_params"] = nbytes["all"] / (bw["GBps"] * 1e9) * 1e3
                r["floor_ms_read"] = step_bytes / (bw["GBps"] * 1e9) * 1e3
                r["pct_roofline_params"] = 100 * r["floor_ms_params"] / ms
                r["pct_roofline_read"] = 100 * r["floor_ms_read"] / ms
            if (b, variant) in profile:
                try:
                    r["profile"] = prof = device_profile(fns[variant], 10, os.path.join(args.profile_dir, "trace"))
                    log(f"   B={b:2d} {variant:10s} profile: GPU busy {prof['busy_ms_per_step']:.3f} ms/step, span "
                        f"{prof['span_ms_per_step']:.3f} ms/step, {prof['kernels_per_step']:.0f} kernels/step; top:")
                    for k, ms_k, cnt in prof["top"][:15]:
                        log(f"        {ms_k:8.3f} ms  x{cnt:5.0f}  {k}")
                except Exception as e:  # noqa: BLE001
                    log(f"   B={b} {variant} profile FAILED {type(e).__name__}: {str(e)[:300]}")
            results.append(r)
            extra = (f"  floor(params) {r['floor_ms_params']:.3f} ms = {r['pct_roofline_params']:.1f}%"
                     f"  floor(read) {r['floor_ms_read']:.3f} ms = {r['pct_roofline_read']:.1f}%") if bw else ""
            log(f"   B={b:2d} {variant:10s} {ms:8.3f} ms/step {r['tok_s']:9.1f} tok/s  (first call {compile_s:.1f}s;"
                f" runs {', '.join(f'{x:.3f}' for x in runs)}; host dispatch {host_ms:.3f} ms/call){extra}")
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
        del dev_inputs
    del holder, state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="qwen3-8b,smollm2-135m")
    p.add_argument("--slots", default="1,2,4,8,16")
    p.add_argument("--extra-slots", default="1,16", help="slot counts that also time fwd_logits and fwd")
    p.add_argument("--ctx", type=int, default=512, help="cached tokens per slot before the step")
    p.add_argument("--per-slot", type=int, default=0,
                   help="page-table width in tokens (Engine: ctx_per_slot); default: just enough for ctx+1")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--weights", default="bf16", choices=WEIGHT_FORMATS,
                   help="q8_0: every projection int8 + f16 scales (the Q8_0 kernel), as --weights q8_0 loads a GGUF")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--copy-gib", type=float, default=4.0)
    p.add_argument("--budget-s", type=float, default=1e9, help="skip remaining measurements after this many seconds")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--compile-cache", default=None)
    p.add_argument("--profile", default="", help="B:variant pairs to trace with jax.profiler, e.g. 1:fast,16:fast")
    p.add_argument("--bandwidth-only", action="store_true",
                   help="only the bandwidth probes (JAX bf16/f32, PyTorch copy_ if importable), then exit")
    p.add_argument("--profile-dir", default="/tmp/decode_step_profile")
    p.add_argument("--greedy", action="store_true", help="also time fast_greedy (the greedy batch's variant)")
    p.add_argument("--hlo-dir", default="", help="write each B's compiled fast step (HLO text, gzipped) here")
    args = p.parse_args(argv)
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    deadline = T0 + args.budget_s
    dev = jax.devices()[0]
    log(f"jax {jax.__version__}, device {dev.device_kind} ({dev.platform})")
    if args.bandwidth_only:
        bws = memory_bandwidth(args.copy_gib, more=True)
        for k, v in bws.items():
            log(f"{k:14s} " + (f"{v['GBps']:8.1f} GB/s median ({v['GBps_best']:.1f} best), {v['bytes'] / 1e9:.2f} GB"
                               if "GBps" in v else v["error"]))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"bandwidth_only": bws, "device": dev.device_kind}) + "\n")
        return
    results: list = []
    for name in args.models.split(","):
        if time.monotonic() > deadline:
            log(f"deadline reached: skipping {name}")
            continue
        bench_model(name, args, results, deadline)
    log("summary (ms/step | tok/s | % of copy-bandwidth roofline on all params | on bytes read)")
    for r in results:
        if "error" in r:
            log(f"  {r['model']:13s} B={r['B']:2d} {r['variant']:10s} ERROR {r['error'][:120]}")
        else:
            pct = (f"{r['pct_roofline_params']:5.1f}% {r['pct_roofline_read']:5.1f}%" if "copy_GBps" in r else "")
            log(f"  {r['model']:13s} B={r['B']:2d} {r['variant']:11s} {r['ms']:8.3f} {r['tok_s']:9.1f} {pct}"
                f"  host {r['host_dispatch_ms']:.3f}")


if __name__ == "__main__":
    main()
