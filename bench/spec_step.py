"""Cost of one fused DFlash spec step (draft a block + verify it + accept + commit) against one plain decode step, on
random weights built on the device: the numbers behind the adaptive policy and the break-even acceptance length.

Targets: the dense shapes of bench/decode_step.py, and the qwen35 hybrid (Gated DeltaNet + gated full attention):
`qwen35-27b` is Qwen3.6-27B exactly, with the z-lab Qwen3.6-27B-DFlash drafter shape (converters/drafter_gguf.py
PRESETS["qwen3.6-27b"]: 5 layers, 32/8 heads x 128, taps 1,16,31,46,61); `qwen35-tiny` is a CPU smoke shape. No GGUF:
every weight leaf is drawn on the device (`--weights q8_0`: every projection int8 + f16 scales, the Q8_0 kernel).

Four jitted steps per slot count B, all through `dflash_jax.step_fns.CompiledSteps` exactly as the engine calls them:
  plain        one decode token per slot, no drafter loaded (plain serving)
  plain+ctx    one decode token per slot with the drafter loaded (the step also writes the token's tap features
               into the drafter's context cache, as the engine's plain step does when a drafter is present)
  plain_engine `plain` called as the engine calls it (host inputs, outputs fetched every step)
  plain_overlap `plain_engine` as the overlapping engine calls it: each step's outputs fetched after the next launch
  spec         the spec step for a block of T tokens per slot (T-1 drafts), verify causal at the slot's offset (a
               hybrid target verifies token by token and commits the accepted prefix of its recurrent state by replay)
A spec step yields tau tokens per slot (1 + accepted), a plain step 1, so DFlash wins when tau > spec / plain: that
ratio is the break-even acceptance length reported per B. Random drafts are (almost) never accepted, so the spec
step's throughput here is the tau = 1 floor, B / spec; at acceptance length tau it is tau * B / spec. For the 27B
hybrid each B is also set against llama.cpp on the same shape (`LLAMACPP_QWEN36_27B`), with the tau that DFlash needs
to reach twice llama.cpp's 8-slot throughput, and the device memory one slot costs.

    python bench/spec_step.py --target qwen3-8b --slots 1,8,16 --block 16 --out results.jsonl
    python bench/spec_step.py --target qwen35-27b --weights q8_0 --slots 1,2,4,8,16 --iters 5 --out q35.jsonl
    python bench/spec_step.py --target qwen35-27b --dry-run          # CPU: abstract weights, lower (no compile)
    python bench/spec_step.py --target tiny --slots 1,2 --iters 2 --block 4     # CPU smoke tests
    python bench/spec_step.py --target qwen35-tiny --weights q8_0 --slots 1,2 --iters 2 --block 4
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.decode_step import (PAGE_SIZE, SHAPES, WEIGHT_FORMATS, abstract_target, decode_inputs,  # noqa: E402
                               param_bytes, random_cache, random_model, random_module, slot_rows, time_loop)
from dflash_jax.config import DrafterConfig, HybridConfig, drafter_config_for  # noqa: E402
from dflash_jax.kv_cache import AttentionMeta, KVCache  # noqa: E402
from dflash_jax.models.drafter import FP8_CHOICES, Drafter, resolve_fp8, to_fp8  # noqa: E402
from dflash_jax.sampling import SamplingArrays  # noqa: E402
from dflash_jax.state_pool import make_cache, state_bytes_per_slot  # noqa: E402
from dflash_jax.profiling import device_profile  # noqa: E402
from dflash_jax.step_fns import CompiledSteps, SpecInputs  # noqa: E402
from pallas_kernels.q8_0_matmul_mgpu import engine_prescale  # noqa: E402

T0 = time.monotonic()
GB, GiB = 1e9, 2 ** 30
STEPS = ("plain", "plain_engine", "plain_overlap", "plain+ctx", "spec")

# llama.cpp on the same target shape (Qwen3.6-27B Q8_0, one H200): aggregate decode tok/s at B parallel slots.
LLAMACPP_QWEN36_27B = {1: 75.6, 2: 144.0, 4: 224.0, 8: 291.0, 16: 456.0}
PEER = {"qwen35-27b": LLAMACPP_QWEN36_27B}

# z-lab Qwen3.6-27B-DFlash: converters/drafter_gguf.py PRESETS["qwen3.6-27b"] (imported when gguf is installed;
# this copy serves a device image without it, and must stay equal to it).
DRAFTER_QWEN36_27B = DrafterConfig(num_layers=5, hidden_size=5120, intermediate_size=17408, num_heads=32,
                                   num_kv_heads=8, head_dim=128, rms_eps=1e-6, rope_theta=1e7, block_size=16,
                                   mask_token_id=248070, target_layer_ids=(1, 16, 31, 46, 61), max_position=262144)


def log(*a):
    print(f"[{time.monotonic() - T0:7.1f}s]", *a, flush=True)


def count(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def size(n: float) -> str:
    return f"{n / GB:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


def drafter_shape(target: str, cfg, num_layers: int, block: int) -> DrafterConfig:
    """The drafter benchmarked against `target`: the z-lab preset for Qwen3.6-27B, else the target's layer shape."""
    if target == "qwen35-27b":
        try:
            from converters.drafter_gguf import PRESETS
            dcfg = PRESETS["qwen3.6-27b"]
            assert dcfg == DRAFTER_QWEN36_27B, "bench/spec_step.py's copy of the drafter preset is out of date"
        except ImportError:
            dcfg = DRAFTER_QWEN36_27B
        return dataclasses.replace(dcfg, num_layers=num_layers, block_size=block)
    return drafter_config_for(cfg, num_layers, block, cfg.vocab_size - 1)


# --- the engine's steps: every call to CompiledSteps is in these three functions --------------------------------------

def make_steps(graphdef, state, dgraphdef, dstate, dcfg: DrafterConfig) -> tuple[CompiledSteps, CompiledSteps]:
    """(steps with the drafter loaded, steps of plain serving without one)."""
    inv = INVARIANT["on"]
    pre = INVARIANT["q8_prescale"]
    return (CompiledSteps(graphdef, state, dgraphdef, dstate, dcfg.target_layer_ids, dcfg.mask_token_id, None,
                          invariant=inv, q8_prescale=pre),
            CompiledSteps(graphdef, state, invariant=inv, q8_prescale=pre))


# --batch-invariant: trace the steps in the batch-invariant mode, as the engine's auto does, with the Q8_0 numerics
# an engine of the largest --slots would choose (EngineConfig.q8_prescale)
INVARIANT = {"on": False, "q8_prescale": None}


# Greedy batches run the engine's greedy sampling variant (sampling.needs_full); --sampled the full one.
FULL_SAMPLING = {"full": False}


def plain_call(steps: CompiledSteps, h: dict, inputs, drafter: bool):
    """One plain step on the device state in h (cache, dcache, rows), updated in place; returns the sample output."""
    h["cache"], dcache, h["rows"], out = steps.model_step(h["cache"], h["dcache"] if drafter else None, h["rows"],
                                                          inputs, **FULL_SAMPLING)
    if drafter:
        h["dcache"] = dcache
    return out


_SPEC_TAKES_ROWS = "rows" in inspect.signature(CompiledSteps.spec_step).parameters


def spec_call(steps: CompiledSteps, h: dict, inputs):
    if _SPEC_TAKES_ROWS:
        h["cache"], h["dcache"], h["rows"], out = steps.spec_step(h["cache"], h["dcache"], h["rows"], inputs,
                                                                  **FULL_SAMPLING)
    else:
        h["cache"], h["dcache"], out = steps.spec_step(h["cache"], h["dcache"], inputs)
    return out


# --- inputs and sizes ------------------------------------------------------------------------------------------------

def spec_inputs(cfg, b: int, ctx: int, block: int, pages_per_slot: int, greedy: bool) -> SpecInputs:
    rng = np.random.default_rng(3)
    page_table = (1 + np.arange(b)[:, None] * pages_per_slot + np.arange(pages_per_slot)[None, :]).astype(np.int32)
    meta = AttentionMeta(q_lens=np.full((b,), block, np.int32), kv_lens=np.full((b,), ctx + block, np.int32),
                         page_table=page_table, slot_ids=np.arange(b, dtype=np.int32))
    temp = 0.0 if greedy else 0.8
    sampling = SamplingArrays(temperature=np.full((b,), temp, np.float32), top_k=np.zeros((b,), np.int32),
                              top_p=np.full((b,), 1.0 if greedy else 0.95, np.float32),
                              min_p=np.zeros((b,), np.float32), presence_penalty=np.zeros((b,), np.float32),
                              frequency_penalty=np.zeros((b,), np.float32), seed=np.arange(b, dtype=np.uint32))
    return SpecInputs(rng.integers(0, cfg.vocab_size, (b,), dtype=np.int32), meta, sampling,
                      np.zeros((b, block - 1), np.int32), np.zeros((b,), bool))


def per_slot_bytes(cfg, dcfg: DrafterConfig, pages_per_slot: int, ctx_tokens: int, dtype) -> dict:
    """Device memory one slot holds: the target's KV pages (attention layers only), the recurrent state (hybrid: conv
    window + delta-rule state of every Gated DeltaNet layer, f32), the drafter's context K/V pages, the penalty row."""
    item = jnp.dtype(dtype).itemsize
    kv_tok = 2 * cfg.num_kv_layers * cfg.num_kv_heads * cfg.head_dim * item
    dkv_tok = 2 * dcfg.num_layers * dcfg.num_kv_heads * dcfg.head_dim * item
    out = {"kv_token": kv_tok, "kv": pages_per_slot * PAGE_SIZE * kv_tok, "kv_used": ctx_tokens * kv_tok,
           "state": state_bytes_per_slot(cfg) if isinstance(cfg, HybridConfig) else 0,
           "drafter_ctx": pages_per_slot * PAGE_SIZE * dkv_tok, "counts": cfg.vocab_size * 4}
    out["total"] = out["kv"] + out["state"] + out["drafter_ctx"] + out["counts"]
    return out


def describe_slot(m: dict, cfg, dcfg, pages_per_slot: int) -> str:
    return (f"per slot: KV {m['kv'] / 2**20:.1f} MiB ({cfg.num_kv_layers} attention layers x K+V, {pages_per_slot} "
            f"pages of {PAGE_SIZE} = {pages_per_slot * PAGE_SIZE} tokens; {m['kv_token'] / 1024:.0f} KiB/token) + "
            f"recurrent state {m['state'] / 2**20:.1f} MiB + drafter context {m['drafter_ctx'] / 2**20:.1f} MiB "
            f"({dcfg.num_layers} layers) + counts {m['counts'] / 2**20:.2f} MiB = {m['total'] / 2**20:.1f} MiB")


def memory_in_use() -> dict | None:
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return {k: stats[k] for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


def peer_columns(target: str, b: int, plain_ms: float, spec_ms: float, block: int) -> dict:
    """Our throughput against llama.cpp's at the same B, and the acceptance length DFlash needs for 2x its 8-slot
    number (and for 2x its number at this B)."""
    peer = PEER.get(target)
    if not peer:
        return {}
    out = {"peer_tok_s": peer.get(b), "tau_for_2x_peer8": 2 * peer[8] * spec_ms / 1e3 / b}
    if b in peer:
        out.update(plain_over_peer=b / plain_ms * 1e3 / peer[b], spec_tau1_over_peer=b / spec_ms * 1e3 / peer[b],
                   tau_for_2x_peer=2 * peer[b] * spec_ms / 1e3 / b)
    out["reachable_2x_peer8"] = out["tau_for_2x_peer8"] <= block
    return out


# --- dry run: abstract arrays, lowered (not compiled) ----------------------------------------------------------------

def dry_run(a, cfg, dcfg, dtype, pages_per_slot: int, slots: list[int]) -> None:
    """Trace and lower the plain, plain+ctx and spec steps at B=1 on abstract weights and caches (no device memory),
    and print the parameter bytes of both weight formats and the memory the full run would need."""
    b = 1
    slot = per_slot_bytes(cfg, dcfg, pages_per_slot, a.ctx + a.block, dtype)
    dgraphdef, dstate = nnx.split(nnx.eval_shape(lambda: Drafter(dcfg, dtype, serving=True)))
    dbytes = param_bytes(dstate)
    log(f"drafter {dcfg.num_layers} layers: {count(dbytes['params'])} params, {size(dbytes['all'])}")
    log(describe_slot(slot, cfg, dcfg, pages_per_slot))
    states = {}
    for w in WEIGHT_FORMATS:
        graphdef, state = nnx.split(abstract_target(cfg, dtype, w))
        states[w] = graphdef, state
        nb = param_bytes(state)
        n = max(slots)
        total = nb["all"] + dbytes["all"] + n * slot["total"]
        log(f"target {w:5s}: {count(nb['params'])} params, {size(nb['all'])} (embedding "
            f"{size(nb['embed'])}); + drafter + {n} slots = {total / GB:.2f} GB = {total / GiB:.2f} GiB = "
            f"{100 * total / (78 * GiB):.0f}% of an H100 (78 GiB), {100 * total / (139 * GiB):.0f}% of an H200 "
            f"(139 GiB), before XLA temporaries (JAX preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION)")
    graphdef, state = states[a.weights]
    num_pages = 1 + b * pages_per_slot
    cache = jax.eval_shape(lambda: make_cache(cfg, num_pages, PAGE_SIZE, b + 1, dtype))
    dcache = jax.eval_shape(lambda: KVCache.create(dcfg.num_layers, num_pages, PAGE_SIZE, dcfg.num_kv_heads,
                                                   dcfg.head_dim, dtype))
    rows = jax.eval_shape(lambda: slot_rows(b + 1, cfg.vocab_size))
    plain_in = decode_inputs(cfg, b, a.ctx, pages_per_slot)
    spec_in = spec_inputs(cfg, b, a.ctx, a.block, pages_per_slot, True)

    def step(name):
        def fn(state, dstate, cache, dcache, rows, inputs):  # CompiledSteps built on traced weights, then called
            with_drafter, plain_only = make_steps(graphdef, state, dgraphdef, dstate, dcfg)
            h = {"cache": cache, "dcache": dcache, "rows": rows}
            if name == "spec":
                out = spec_call(with_drafter, h, inputs)
            else:
                out = plain_call(with_drafter if name == "plain+ctx" else plain_only, h, inputs, name == "plain+ctx")
            return h, out
        return fn

    for name, inputs in (("plain", plain_in), ("plain+ctx", plain_in), ("spec", spec_in)):
        t = time.monotonic()
        lowered = jax.jit(step(name)).lower(state, dstate, cache, dcache, rows, inputs)
        text = lowered.as_text()
        log(f"lowered {name:9s} B={b} ({a.weights}, block {a.block}) in {time.monotonic() - t:.1f} s: "
            f"{len(text) / 1e6:.1f} MB of StableHLO, {text.count('stablehlo.dot_general')} dot_general")


# --- the timed run ---------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="qwen3-8b", choices=sorted(SHAPES))
    p.add_argument("--weights", default="bf16", choices=WEIGHT_FORMATS,
                   help="q8_0: every target projection int8 + f16 scales (the drafter stays --dtype)")
    p.add_argument("--drafter-layers", type=int, default=5)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="the drafter's draft vocabulary: its own head over the first N token ids (0: the target's)")
    p.add_argument("--draft-fp8", default="auto", choices=FP8_CHOICES,
                   help="the drafter's products in fp8 (EngineConfig.draft_fp8): its head (over --draft-vocab ids or "
                   "all) or every product; auto as the engine (the head on fp8 GPUs in bf16)")
    p.add_argument("--slots", default="1,2,4,8,16")
    p.add_argument("--ctx", type=int, default=512, help="cached tokens per slot before the step")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", default=",".join(STEPS), help=f"which of {','.join(STEPS)} to time")
    p.add_argument("--sampled", action="store_true", help="temperature 0.8 / top-p 0.95 instead of greedy")
    p.add_argument("--xla-topk", action="store_true",
                   help="with --sampled: XLA's whole-row lax.top_k in place of sampling.top_k (session 21's baseline)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip what is left after this many seconds")
    p.add_argument("--compile-cache", default=None, help="persistent XLA compilation cache directory")
    p.add_argument("--gdn-impl", default=None, help="sets $DFLASH_GDN_IMPL (reference|pallas) before tracing")
    p.add_argument("--matmul-impl", default=None, help="sets $DFLASH_MATMUL_IMPL (reference|pallas|mgpu)")
    p.add_argument("--attention-impl", default=None, help="sets $DFLASH_ATTENTION_IMPL (reference|pallas|mgpu)")
    p.add_argument("--batch-invariant", action="store_true", help="steps in the batch-invariant mode")
    p.add_argument("--profile-top", type=int, default=40, help="kernels kept per profile in --out")
    p.add_argument("--profile", default="", help="B:step pairs to trace with jax.profiler, e.g. 8:plain,8:spec")
    p.add_argument("--dry-run", action="store_true",
                   help="abstract weights and caches: print sizes and lower the steps at B=1, no device memory")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    FULL_SAMPLING["full"] = a.sampled
    if a.xla_topk:
        from dflash_jax import sampling
        sampling.top_k = jax.lax.top_k
    INVARIANT["on"] = a.batch_invariant
    for flag, env in ((a.gdn_impl, "DFLASH_GDN_IMPL"), (a.matmul_impl, "DFLASH_MATMUL_IMPL"),
                      (a.attention_impl, "DFLASH_ATTENTION_IMPL")):
        if flag:
            os.environ[env] = flag
    if a.compile_cache:
        jax.config.update("jax_compilation_cache_dir", a.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    steps_wanted = [s for s in a.steps.split(",") if s]
    assert set(steps_wanted) <= set(STEPS), f"--steps: unknown {set(steps_wanted) - set(STEPS)}"
    cfg = SHAPES[a.target]
    dtype = jnp.dtype(a.dtype)
    dcfg = drafter_shape(a.target, cfg, a.drafter_layers, a.block)
    dev = jax.devices()[0]
    slots = [int(s) for s in a.slots.split(",")]
    INVARIANT["q8_prescale"] = engine_prescale(max(slots) * a.block)
    pages_per_slot = -(-(a.ctx + a.block + 1) // PAGE_SIZE)
    log(f"jax {jax.__version__}, {dev.device_kind}; target {a.target} ({a.weights}), drafter {dcfg}")
    if a.dry_run:
        dry_run(a, cfg, dcfg, dtype, pages_per_slot, slots)
        return
    deadline = T0 + a.budget_s
    graphdef, state, nbytes = random_model(cfg, dtype, weights=a.weights)
    log(f"target {a.weights}: {count(nbytes['params'])} params, {size(nbytes['all'])}; device memory "
        f"{memory_in_use()}")
    a.draft_fp8 = resolve_fp8(a.draft_fp8, dtype)
    fp8 = a.draft_fp8 != "off"  # an fp8 head is a copy: of the draft vocabulary's rows, or of every row
    dgraphdef, dstate, dbytes = random_module(nnx.eval_shape(lambda: Drafter(
        dcfg, dtype, serving=True, draft_vocab=a.draft_vocab or (cfg.vocab_size if fp8 else 0),
        head_q8=a.weights == "q8_0" and not fp8)), seed=5)
    if fp8:
        dgraphdef, dstate = nnx.split(to_fp8(nnx.merge(dgraphdef, dstate), a.draft_fp8))
        dbytes = param_bytes(dstate)
    log(f"drafter: {count(dbytes['params'])} params, {size(dbytes['all'])}")
    with_drafter, plain_only = make_steps(graphdef, state, dgraphdef, dstate, dcfg)
    slot = per_slot_bytes(cfg, dcfg, pages_per_slot, a.ctx + a.block, dtype)
    log(describe_slot(slot, cfg, dcfg, pages_per_slot))
    num_pages = 1 + max(slots) * pages_per_slot
    h = {"cache": random_cache(cfg, num_pages, dtype, num_rows=1 + max(slots)),
         "dcache": KVCache.create(dcfg.num_layers, num_pages, PAGE_SIZE, dcfg.num_kv_heads, dcfg.head_dim, dtype)}
    mem = memory_in_use()
    log(f"after setup ({max(slots)} slots x {pages_per_slot * PAGE_SIZE} tokens of pages): device memory {mem}"
        + (f" = {mem['bytes_in_use'] / GiB:.2f} GiB in use" if mem and "bytes_in_use" in mem else ""))
    results = []
    for b in slots:
        if time.monotonic() > deadline:
            log(f"deadline reached: skipping B={b} and later")
            break
        h["rows"] = slot_rows(b + 1, cfg.vocab_size)
        plain_in = jax.device_put(decode_inputs(cfg, b, a.ctx, pages_per_slot))
        if not a.sampled:
            plain_in.sampling.temperature = jnp.zeros((b,), jnp.float32)
        np_plain_in = jax.device_get(plain_in)
        spec_in = jax.device_put(spec_inputs(cfg, b, a.ctx, a.block, pages_per_slot, not a.sampled))

        def plain_engine():  # as Engine._run: host inputs in, the sampled outputs fetched every step
            out = plain_call(plain_only, h, np_plain_in, False)
            return jax.device_get((out.tokens, out.logprobs, out.top_ids, out.top_logprobs))[0]

        prev = {}

        def plain_overlap():  # as Engine with overlap: launch this step, then fetch the previous step's outputs
            out = plain_call(plain_only, h, np_plain_in, False)
            if "out" in prev:
                jax.device_get((prev["out"].tokens, prev["out"].logprobs, prev["out"].top_ids,
                                prev["out"].top_logprobs))
            prev["out"] = out
            return out.tokens

        fns = {"plain": lambda: plain_call(plain_only, h, plain_in, False).tokens, "plain_engine": plain_engine,
               "plain_overlap": plain_overlap,
               "plain+ctx": lambda: plain_call(with_drafter, h, plain_in, True).tokens,
               "spec": lambda: spec_call(with_drafter, h, spec_in).accepted}
        row = {"target": a.target, "weights": a.weights, "device": dev.device_kind, "B": b, "block": a.block,
               "ctx": a.ctx, "drafter_layers": dcfg.num_layers, "sampled": a.sampled,
               "draft_vocab": a.draft_vocab, "draft_fp8": a.draft_fp8,
               "gdn_impl": os.environ.get("DFLASH_GDN_IMPL", "auto"),
               "matmul_impl": os.environ.get("DFLASH_MATMUL_IMPL", "auto"), "batch_invariant": a.batch_invariant,
               "q8_prescale": INVARIANT["q8_prescale"],
               "attention_impl": os.environ.get("DFLASH_ATTENTION_IMPL", "auto"),
               "param_GB": nbytes["all"] / GB, "drafter_GB": dbytes["all"] / GB,
               "slot_bytes": slot}
        for name in steps_wanted:
            if time.monotonic() > deadline:
                log(f"deadline reached: skipping B={b} {name}")
                break
            t = time.monotonic()
            jax.block_until_ready(fns[name]())
            compile_s = time.monotonic() - t
            ms, runs, host = time_loop(fns[name], a.warmup, a.iters)
            row[name] = ms
            row[f"{name}_first_call_s"] = compile_s
            log(f"B={b:3d} {name:12s} {ms:9.3f} ms/step {b / ms * 1e3:9.1f} tok/s (runs "
                f"{', '.join(f'{x:.3f}' for x in runs)}; host {host:.3f} ms/call; first call {compile_s:.1f} s)")
            if f"{b}:{name}" in a.profile.split(","):
                prof = device_profile(fns[name], 10, f"/tmp/spec_step_profile_{b}_{name}", top_n=a.profile_top)
                row[f"{name}_profile"] = prof
                log(f"B={b:3d} {name} profile: GPU busy {prof['busy_ms_per_step']:.3f} ms/step, span "
                    f"{prof['span_ms_per_step']:.3f} ms/step, {prof['kernels_per_step']:.0f} kernels/step")
                for kname, kms, kcount in prof["top"][:25]:
                    log(f"    {kms:8.3f} ms {kcount:6.1f}x  {kname}")
        row["memory"] = memory_in_use()
        if "plain" in row and "spec" in row:  # random weights must still give finite log-probs
            lp = np.asarray(plain_call(plain_only, h, plain_in, False).logprobs)
            sout = spec_call(with_drafter, h, spec_in)
            row["finite"] = bool(np.isfinite(lp).all() and np.isfinite(np.asarray(sout.logprobs)).all())
            row["accepted_mean"] = float(np.mean(np.asarray(sout.accepted)))
            log(f"B={b:3d} log-probs finite: {row['finite']}; drafts accepted per spec step: "
                f"{row['accepted_mean']:.2f} (random drafter: tau ~ 1)")
        if "plain" in row:
            row["tok_s_plain"] = b / row["plain"] * 1e3
        if "spec" in row:
            row["tok_s_spec_tau1"] = b / row["spec"] * 1e3
        if "plain" in row and "spec" in row:
            row["spec_over_plain"] = ratio = row["spec"] / row["plain"]
            row.update(peer_columns(a.target, b, row["plain"], row["spec"], a.block))
            msg = (f"B={b:3d} spec/plain = {ratio:.2f}x -> DFlash wins when tau > {ratio:.2f} (of at most {a.block}); "
                   f"tok/s plain {row['tok_s_plain']:.1f}, DFlash at tau=1 {row['tok_s_spec_tau1']:.1f}")
            if row.get("peer_tok_s"):
                msg += (f"; llama.cpp {row['peer_tok_s']:.1f} tok/s: ours/peer plain {row['plain_over_peer']:.2f}x, "
                        f"DFlash tau=1 {row['spec_tau1_over_peer']:.2f}x, tau for 2x peer "
                        f"{row['tau_for_2x_peer']:.2f}")
            if "tau_for_2x_peer8" in row:
                msg += (f"; tau for 2x llama.cpp's 8-slot {2 * PEER[a.target][8]:.0f} tok/s: "
                        f"{row['tau_for_2x_peer8']:.2f}"
                        + ("" if row["reachable_2x_peer8"] else " (> block: unreachable)"))
            log(msg)
        results.append(row)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    summarize(results, a.target)


def summarize(results: list[dict], target: str) -> None:
    peer = PEER.get(target, {})
    log("summary: B | plain ms | spec ms | spec/plain (break-even tau) | tok/s plain | tok/s DFlash tau=1 | "
        "llama.cpp tok/s | plain/llama.cpp | tau for 2x llama.cpp at B | tau for 2x llama.cpp 8-slot | MiB/slot")
    for r in results:
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
        log(f"  B={r['B']:3d} | {f('plain', '8.3f')} | {f('spec', '8.3f')} | {f('spec_over_plain', '5.2f')} | "
            f"{f('tok_s_plain', '8.1f')} | {f('tok_s_spec_tau1', '8.1f')} | {peer.get(r['B'], '-')} | "
            f"{f('plain_over_peer', '5.2f')} | {f('tau_for_2x_peer', '6.2f')} | {f('tau_for_2x_peer8', '6.2f')} | "
            f"{r['slot_bytes']['total'] / 2**20:.1f}")


if __name__ == "__main__":
    main()
