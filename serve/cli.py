"""Command-line flags of `python -m serve`, spelled like llama-server's where the concept is the same."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
from pathlib import Path

DEFAULT_MAX_BODY = 8 << 20  # bytes; a chat request larger than this is almost certainly abuse, not a prompt


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description="OpenAI-compatible server for GGUF models (JAX).")
    p.add_argument("-m", "--model", help="GGUF file or converted model directory (default: SmolLM2-135M-Instruct, "
                                         "fetched on first use)")
    p.add_argument("--alias", help="model name reported by /v1/models and in responses (default: file stem)")
    p.add_argument("-np", "--parallel", "--slots", dest="slots", type=_positive, default=8,
                   help="number of sequences decoded together (default: 8)")
    p.add_argument("-c", "--ctx-size", dest="ctx_size", type=_positive, default=8192,
                   help="KV-cache tokens shared by all slots (default: 8192)")
    p.add_argument("--ctx-per-slot", type=_positive, default=None,
                   help="per-slot context cap (default: ctx-size / slots)")
    p.add_argument("-ub", "--ubatch-size", dest="ubatch_size", type=_positive, default=256,
                   help="prefill chunk in tokens (default: 256)")
    p.add_argument("--ubatch-buckets", type=_positive_list, default=None,
                   help="prefill chunk sizes compiled at start, ascending, the last equal to -ub, e.g. '256' "
                        "(fewer compiles, more padding; default: factor-4 steps from 16 up to -ub)")
    p.add_argument("--page-size", type=_positive, default=None, help="KV-cache page size in tokens")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--weights", choices=("auto", "q8_0", "bf16"), default="auto",
                   help="weight format on the device: q8_0 keeps a GGUF's Q8_0 tensors as int8 + per-32 scales, "
                        "exactly as stored (other quant types are dequantized to --dtype); bf16 dequantizes every "
                        "tensor to --dtype (default auto = bf16 until the Q8_0 kernel is measured faster on a GPU)")
    p.add_argument("--compile-cache-dir", default=None,
                   help="persistent JAX compilation cache directory (default ~/.cache/dflash-jax/xla; Mosaic kernel "
                        "lowerings go to its mosaic/ subdirectory)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on API requests")
    p.add_argument("--jinja", action="store_true", default=True,
                   help="use the model's Jinja chat template (always on; accepted for llama-server compatibility)")
    p.add_argument("--chat-template-kwargs", type=_json_object, default={},
                   help="JSON object of template variables, e.g. '{\"enable_thinking\": false}'")
    p.add_argument("--metrics", action="store_true", default=True,
                   help="serve Prometheus metrics on /metrics (always on; accepted for compatibility)")
    p.add_argument("--max-body-bytes", type=_positive, default=DEFAULT_MAX_BODY,
                   help=f"largest accepted request body (default: {DEFAULT_MAX_BODY})")
    p.add_argument("-md", "--model-draft", default=None, help="draft model for speculative decoding")
    p.add_argument("--spec-type", choices=("none", "dflash"), default=None,
                   help="speculative decoding method (default: dflash when -md is given)")
    p.add_argument("--draft-max", type=_positive, default=None, help="tokens drafted per step (default: 15)")
    p.add_argument("--draft-short", type=int, default=None,
                   help="drafts per block where a full block does not pay (adaptive policy; default 0: off; "
                   "an experiment, see BENCHMARKS.md)")
    p.add_argument("--draft-vocab", type=_positive, default=None,
                   help="draft from the first N token ids only (default: the whole vocabulary): the drafter reads N "
                   "rows of the LM head per step; output is unchanged, acceptance may drop")
    p.add_argument("--draft-fp8", choices=("auto", "off", "head", "all"), default=None,
                   help="the drafter's products in fp8 e4m3: its LM head (a copy in fp8) or all of them (default "
                   "auto: the head on GPUs with fp8 tensor cores, bf16/f16); output is unchanged, acceptance may drop")
    p.add_argument("-cd", "--ctx-size-draft", type=_positive, default=None,
                   help="recent context positions the drafter attends to")
    p.add_argument("--spec-policy", choices=("adaptive", "always", "never"), default=None,
                   help="when to speculate: adaptive (when measured to pay off; default), always, never")
    p.add_argument("--batch-invariant", choices=("auto", "on", "off"), default="auto",
                   help="compute every row of a step independently of how many rows share it, so DFlash output and "
                        "a request's output among other requests are the same bits as plain decoding alone "
                        "(default auto: on for GPU bf16/f16, where XLA's products round by row count)")
    p.add_argument("--no-cache-prompt", dest="cache_prompt", action="store_false", default=True,
                   help="do not reuse the KV pages of earlier prompts' shared prefixes (prefix caching is on by "
                        "default for dense models; a request can opt out with \"cache_prompt\": false)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def model_alias(args: argparse.Namespace, model_path: str | Path) -> str:
    if args.alias:
        return args.alias
    path = Path(model_path)
    return path.stem if path.suffix == ".gguf" else path.name


def engine_config_kwargs(args: argparse.Namespace, config_cls, platform: str) -> dict:
    """EngineConfig keyword arguments from the flags; flags the engine has no field for fail loudly, not silently."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    wanted = {"num_slots": (args.slots, "-np"), "ctx_size": (args.ctx_size, "-c"),
              "prefill_chunk": (args.ubatch_size, "-ub"), "chunk_sizes": (args.ubatch_buckets, "--ubatch-buckets"),
              "dtype": (dtype, "--dtype"),
              "ctx_per_slot": (args.ctx_per_slot, "--ctx-per-slot"), "page_size": (args.page_size, "--page-size"),
              "compile_cache_dir": (args.compile_cache_dir, "--compile-cache-dir"),
              "draft_max": (args.draft_max, "--draft-max"), "ctx_size_draft": (args.ctx_size_draft, "-cd"),
              "draft_short": (args.draft_short, "--draft-short"), "draft_vocab": (args.draft_vocab, "--draft-vocab"),
              "draft_fp8": (args.draft_fp8, "--draft-fp8"),
              "spec_policy": (args.spec_policy, "--spec-policy"),
              "batch_invariant": ({"on": True, "off": False}.get(args.batch_invariant), "--batch-invariant"),
              "prefix_cache": (None if args.cache_prompt else False, "--no-cache-prompt")}
    kwargs = {}
    for name, (value, flag) in wanted.items():
        if value is None:
            continue
        if name not in names:
            raise SystemExit(f"error: {flag} is not supported yet by this engine (EngineConfig has no {name!r})")
        kwargs[name] = value
    return kwargs


# The drafter shipped for the embedded default model: used when neither -m nor -md is given.
DEFAULT_DRAFTER = Path(__file__).resolve().parent.parent / "dflash_jax" / "assets" / "smollm2-135m-dflash.gguf"


def speculative(args: argparse.Namespace, engine_cls) -> bool:
    """Whether to load the draft model: -md given (or the default model with its shipped drafter) and --spec-type
    not 'none' (dflash is the one method)."""
    if not args.model and not args.model_draft and args.spec_type != "none" and DEFAULT_DRAFTER.exists():
        args.model_draft = str(DEFAULT_DRAFTER)
    if args.spec_type == "dflash" and not args.model_draft:
        raise SystemExit("error: --spec-type dflash needs a draft model (-md/--model-draft)")
    if not args.model_draft or args.spec_type == "none":
        return False
    if "drafter" not in inspect.signature(engine_cls).parameters:
        raise SystemExit("error: -md/--model-draft is not supported yet by this engine")
    return True
