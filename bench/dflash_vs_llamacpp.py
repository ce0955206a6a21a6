"""Per-request DFlash acceptance, ours against llama.cpp's own DFlash (xllamacpp), on the same target GGUF, the same
drafter GGUF and the same templated prompt tokens, greedy, one slot. A large gap in accepted drafts means one of the two
implementations reads the drafter differently (tap ids, mask token, RoPE positions, context window, block size).

    python bench/dflash_vs_llamacpp.py -m TARGET.gguf -md DRAFTER.gguf --code 8 --chat 4 --max-tokens 64

Both sides verify exactly the drafts they propose, so per request: draft_n (drafted tokens), draft_n_accepted, and the
generated text. Greedy texts agree up to the first near-tie of the quantized target (tests/test_parity_llamacpp.py);
after a divergence the two runs see different contexts, so requests are reported with the length of their common
prefix, and the acceptance rates are compared over all requests and over the identical ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402

from converters.checkpoint import load_drafter, load_model  # noqa: E402
from dflash_jax.engine import Engine, EngineConfig  # noqa: E402
from dflash_jax.requests import Request, SamplingParams  # noqa: E402
from dflash_jax.train import data  # noqa: E402


def ours(loaded, drafter, prompts: list[list[int]], max_tokens: int, draft_max: int) -> list[dict]:
    cfg = EngineConfig(num_slots=1, ctx_size=2048, ctx_per_slot=2048, page_size=16, prefill_chunk=256,
                       dtype="float32", draft_max=draft_max, spec_policy="always")
    engine = Engine(loaded, cfg, drafter)
    engine.warmup(progress=False)
    engine.start()
    out = []
    try:
        for ids in prompts:
            req = Request(list(ids), SamplingParams(max_tokens=max_tokens))
            t0 = time.perf_counter()
            engine.submit(req)
            toks = []
            while True:
                e = req.events.get()
                if e.token_id is not None:
                    toks.append(e.token_id)
                if e.finish_reason is not None:
                    break
            out.append({"tokens": toks, "text": loaded.tokenizer.decode(toks), "draft_n": req.draft_n,
                        "draft_n_accepted": req.draft_n_accepted, "seconds": time.perf_counter() - t0})
    finally:
        engine.stop()
    return out


def llamacpp(model: str, drafter: str, prompts: list[list[int]], max_tokens: int, draft_max: int,
             threads: int) -> list[dict]:
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = model
    p.n_ctx = 2048
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.sampling.temp = 0.0
    p.sampling.top_k = 1
    p.speculative.types = [xlc.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_DFLASH]
    p.speculative.draft.mparams.path = drafter
    p.speculative.draft.n_max = draft_max
    server = xlc.Server(p)
    out = []
    try:
        for ids in prompts:
            t0 = time.perf_counter()
            r = server.handle_completions({"prompt": list(ids), "max_tokens": max_tokens, "temperature": 0,
                                           "cache_prompt": False})
            out.append({"text": r["choices"][0]["text"], "draft_n": r["timings"].get("draft_n", 0),
                        "draft_n_accepted": r["timings"].get("draft_n_accepted", 0),
                        "seconds": time.perf_counter() - t0})
    finally:
        del server
    return out


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-md", "--model-draft", required=True)
    ap.add_argument("--code", type=int, default=8, help="held-out HumanEval prompts")
    ap.add_argument("--chat", type=int, default=4, help="held-out chat prompts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--draft-max", type=int, default=None, help="default: the drafter's block size - 1")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (1 on a busy machine: its spinning "
                                                               "thread pool collapses when cores are oversubscribed)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    loaded = load_model(a.model, jnp.float32, weights="bf16")
    drafter = load_drafter(a.model_draft, loaded.config, jnp.float32)
    draft_max = a.draft_max or drafter.config.block_size - 1
    prompts = data.humaneval_prompts(None, "heldout")[:a.code] + \
        data.file_prompts(data.HELDOUT_CHAT_PROMPTS, "heldout")[:a.chat]
    encode = data.PromptEncoder(loaded)
    ids = [encode(p.messages) for p in prompts]
    mine = ours(loaded, drafter, ids, a.max_tokens, draft_max)
    ref = llamacpp(a.model, a.model_draft, ids, a.max_tokens, draft_max, a.threads)
    rows = []
    print(f"{'prompt':28s} {'ours acc/draft':>16s} {'llama.cpp acc/draft':>20s} {'same text':>10s}")
    for p, o, r in zip(prompts, mine, ref):
        same = o["text"] == r["text"]
        rows.append({"prompt": p.key, "ours": {k: o[k] for k in ("draft_n", "draft_n_accepted", "seconds")},
                     "llamacpp": {k: r[k] for k in ("draft_n", "draft_n_accepted", "seconds")}, "same_text": same,
                     "common_prefix_chars": common_prefix(o["text"], r["text"]), "chars": len(r["text"])})
        print(f"{p.key:28s} {o['draft_n_accepted']:>7d}/{o['draft_n']:<8d} {r['draft_n_accepted']:>10d}/"
              f"{r['draft_n']:<9d} {'yes' if same else 'no (' + str(rows[-1]['common_prefix_chars']) + ' chars)':>10s}")

    def rate(side, only_same=False):
        sel = [x[side] for x in rows if x["same_text"] or not only_same]
        d = sum(x["draft_n"] for x in sel)
        return sum(x["draft_n_accepted"] for x in sel) / d if d else float("nan")

    summary = {"requests": len(rows), "identical_texts": sum(x["same_text"] for x in rows), "draft_max": draft_max,
               "acceptance_rate": {"ours": rate("ours"), "llamacpp": rate("llamacpp")},
               "acceptance_rate_identical_texts": {"ours": rate("ours", True), "llamacpp": rate("llamacpp", True)}}
    print(json.dumps(summary, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
