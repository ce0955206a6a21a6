"""Engine throughput without HTTP: aggregate generated tokens/s at several slot counts, optionally with a DFlash
drafter, and llama.cpp (xllamacpp) on the same GGUF for comparison.

    python bench/engine_throughput.py -m MODEL.gguf [-md DRAFTER.gguf [-md OTHER.gguf]] --slots 1,8 --max-tokens 64
        [--llamacpp] [--overlap on,off]   # the engine's host/device overlap (EngineConfig.overlap), both in one run
        [--batch-invariant on,off]        # EngineConfig.batch_invariant, both in one run

Several -md compare drafters in one run (same prompts, same plain baseline).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import faulthandler
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from converters.chat_template import ChatTemplate
from converters.checkpoint import load_drafter, load_model
from dflash_jax.engine import Engine, EngineConfig
from dflash_jax.requests import Request, SamplingParams
from dflash_jax.train.data import humaneval_prompts

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain how a hash map works.",
    "Write a bash one-liner that counts lines in all .py files.",
    "What is the capital of Japan? Answer in one sentence.",
    "Write a function in C that reverses a string in place.",
    "List five uses of a paperclip.",
    "Sort a list of dictionaries by a key in Python.",
    "Describe the water cycle for a ten-year-old.",
]


def engine_run(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    reqs = [Request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in prompts]
    t0 = time.perf_counter()
    for r in reqs:
        engine.submit(r)
    n = 0
    for r in reqs:
        while True:
            e = r.events.get()
            n += e.token_id is not None
            if e.finish_reason:
                break
    return time.perf_counter() - t0, n


def llamacpp_run(model: str, prompts: list[list[int]], slots: int, max_tokens: int) -> tuple[float, int]:
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = model
    p.n_parallel = slots
    p.n_ctx = 1024 * slots
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 2
    srv = xlc.Server(p)
    body = lambda ids: {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}  # noqa
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(slots) as pool:
        outs = list(pool.map(lambda ids: srv.handle_completions(body(ids)), prompts))
    return time.perf_counter() - t0, sum(o["usage"]["completion_tokens"] for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-md", "--model-draft", action="append", default=[], help="drafter GGUF; repeatable")
    ap.add_argument("--slots", default="1,8")
    ap.add_argument("--rounds", type=int, default=1, help="runs per variant, alternating, after every warm-up")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--llamacpp", action="store_true")
    ap.add_argument("--spec-policy", default="always,adaptive",
                    help="with -md: the DFlash policies to run (always = every step speculates; adaptive = the default)")
    ap.add_argument("--overlap", default="auto",
                    help="auto (on a GPU only), on, off, or a list like on,off: launch step k+1 before reading step k")
    ap.add_argument("--batch-invariant", default="auto",
                    help="auto, on, off, or a list like on,off: EngineConfig.batch_invariant, both in one run")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="-ub: fewer chunk buckets compile faster")
    ap.add_argument("--draft-short", default="0", help="EngineConfig.draft_short for the adaptive policy; a list "
                    "like 0,3 runs each")
    ap.add_argument("--prompts", default="chat", help="chat (the 8 built-in prompts) or code (HumanEval's held-out "
                    "stubs, as `dflash_jax.train eval` uses them)")
    ap.add_argument("--weights", default="auto", help="auto | bf16 | q8_0 (see converters.load_gguf)")
    ap.add_argument("--stacks-every", type=float, default=0,
                    help="seconds: print every thread's stack this often to stderr (where a run stalls)")
    a = ap.parse_args()
    if a.stacks_every:
        faulthandler.dump_traceback_later(a.stacks_every, repeat=True)
    lm = load_model(a.model, jnp.dtype(a.dtype), weights=a.weights)
    tpl = ChatTemplate(lm.chat_template)
    texts = PROMPTS if a.prompts == "chat" else [p.messages[0][1] for p in humaneval_prompts(split="heldout")]
    prompts = [lm.tokenizer.encode(tpl.render([{"role": "user", "content": p}])) for p in texts]
    drafters = [(Path(f).stem, load_drafter(f, lm.config, jnp.dtype(a.dtype))) for f in a.model_draft]
    device = jax.devices()[0].device_kind if jax.devices()[0].platform == "gpu" else platform.processor() or "cpu"
    print("| impl | device | slots | requests | tokens | seconds | tok/s |")
    print("|---|---|---|---|---|---|---|")
    for slots in map(int, a.slots.split(",")):
        work = (prompts * (2 * slots // len(prompts) + 1))[:2 * slots]
        variants = [("plain", None, "never", 0)] + [
            (f"dflash {pol}" + (f" short={short}" if pol == "adaptive" else "")
             + (f" [{stem}]" if len(drafters) > 1 else ""), d, pol, int(short))
            for stem, d in drafters for pol in a.spec_policy.split(",")
            for short in (a.draft_short.split(",") if pol == "adaptive" else ["0"])]
        onoff = {"on": True, "off": False}
        variants = [(f"{name} overlap={ov} invariant={inv}", d, pol, short, onoff.get(ov), onoff.get(inv))
                    for name, d, pol, short in variants for ov in a.overlap.split(",")
                    for inv in a.batch_invariant.split(",")]
        built = []
        for name, d, policy, short, overlap, invariant in variants:
            eng = Engine(lm, EngineConfig(num_slots=slots, ctx_size=1024 * slots, ctx_per_slot=1024,
                                          prefill_chunk=a.prefill_chunk, dtype=a.dtype, spec_policy=policy,
                                          draft_short=short, overlap=overlap, batch_invariant=invariant), d)
            t_warm = time.perf_counter()
            eng.warmup(progress=False)
            t_warm = time.perf_counter() - t_warm
            eng.start()
            engine_run(eng, work[:slots], 8)  # settle
            built.append((name, eng, d, policy, t_warm))
        # --rounds: every variant once per round, the order rotated each round (a process's later runs can be a few
        # % slower), each round's tok/s compared with the same round's plain run
        rates: dict[str, list[float]] = {name: [] for name, *_ in built}
        for r in range(a.rounds):
            for name, eng, d, policy, t_warm in built[r % len(built):] + built[:r % len(built)]:
                before = dict(eng.host_seconds)
                secs, n = engine_run(eng, work, a.max_tokens)
                rates[name].append(n / secs)
                host = {k: round(v - before[k], 2) for k, v in eng.host_seconds.items()}
                sp = eng.stats()["speculative"] if d else None
                tau = f" tau={sp['tau']} ({sp['num_drafts']} slot-steps speculated)" if d else ""
                rnd = f" round {r + 1}/{a.rounds}" if a.rounds > 1 else ""
                print(f"| dflash-jax {name}{tau}{rnd} | {device} | {slots} | {len(work)} | {n} | {secs:.2f} | "
                      f"{n / secs:.1f} | engine thread s: {host}, warm-up {t_warm:.1f} s", flush=True)
        for name, eng, d, policy, _ in built:
            eng.stop()
            if d and policy == "adaptive":
                print(f"  policy state [{name}]: {eng.stats()['speculative']}", flush=True)
            if a.rounds > 1:
                ratios = sorted(x / p for x, p in zip(rates[name], rates[built[0][0]]))
                print(f"  {name}: median {statistics.median(rates[name]):.1f} tok/s, per-round ratio to plain median "
                      f"x{statistics.median(ratios):.3f} (min x{ratios[0]:.3f}, max x{ratios[-1]:.3f})", flush=True)
        if a.llamacpp:
            secs, n = llamacpp_run(a.model, work, slots, a.max_tokens)
            print(f"| llama.cpp (xllamacpp) | cpu | {slots} | {len(work)} | {n} | {secs:.1f} | {n / secs:.1f} |")


if __name__ == "__main__":
    main()
