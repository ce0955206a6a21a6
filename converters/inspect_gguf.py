"""Summarises a GGUF file (architecture, hyperparameters, tokenizer, chat template, tensor types) as text or JSON."""
from __future__ import annotations

import json
import math
import os
from typing import Any

from converters.gguf_file import GGUFFile, open_gguf


def describe(g: GGUFFile, tensors: bool = False) -> dict[str, Any]:
    """Everything `inspect` reports, as a JSON-ready dict; with tensors=True also one entry per tensor."""
    arch = g.arch
    prefix = f"{arch}."
    tokens = g.get("tokenizer.ggml.tokens")

    def special(key: str) -> dict[str, Any] | None:
        idx = g.get(key)
        if idx is None:
            return None
        text = tokens[idx] if tokens is not None and 0 <= idx < len(tokens) else None
        return {"id": idx, "text": text}

    template = g.get("tokenizer.chat_template")
    by_type: dict[str, dict[str, Any]] = {}
    total_params = total_bytes = 0
    for t in g.tensors.values():
        numel = math.prod(t.shape)
        row = by_type.setdefault(t.qtype.name, {"type": t.qtype.name, "count": 0, "params": 0, "bytes": 0})
        row["count"] += 1
        row["params"] += numel
        row["bytes"] += t.num_bytes
        total_params += numel
        total_bytes += t.num_bytes
    info: dict[str, Any] = {
        "path": g.path,
        "file_size": os.path.getsize(g.path),
        "architecture": arch,
        "name": g.get("general.name"),
        "general": {k.removeprefix("general."): v for k, v in g.metadata.items()
                    if k.startswith("general.") and k != "general.architecture"},
        "hparams": {k.removeprefix(prefix): v for k, v in g.metadata.items() if k.startswith(prefix)},
        "tokenizer": {
            "model": g.get("tokenizer.ggml.model"),
            "pre": g.get("tokenizer.ggml.pre"),
            "vocab_size": len(tokens) if tokens is not None else g.get(f"{prefix}vocab_size"),
            "bos": special("tokenizer.ggml.bos_token_id"),
            "eos": special("tokenizer.ggml.eos_token_id"),
        },
        "chat_template": {"present": template is not None, "length": len(template) if template is not None else 0},
        "tensor_count": len(g.tensors),
        "tensor_types": sorted(by_type.values(), key=lambda r: -r["bytes"]),
        "total_params": total_params,
        "total_tensor_bytes": total_bytes,
    }
    if tensors:
        info["tensors"] = [{"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "bytes": t.num_bytes}
                           for t in g.tensors.values()]
    return info


def inspect_file(path: str | os.PathLike, tensors: bool = False) -> dict[str, Any]:
    return describe(open_gguf(path), tensors=tensors)


def to_json(info: dict[str, Any]) -> str:
    # Metadata values are plain Python (converters.gguf_file); the default only guards against numpy values.
    return json.dumps(info, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _short(v: Any, limit: int = 8) -> str:
    if isinstance(v, list) and len(v) > limit:
        return f"[{', '.join(map(repr, v[:limit]))}, ...] ({len(v)} items)"
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= 100 else s[:97] + "..."


def format_text(info: dict[str, Any]) -> str:
    lines = [
        f"file:          {info['path']} ({_human(info['file_size'])})",
        f"architecture:  {info['architecture']}",
        f"name:          {info['name']}",
        f"hyperparameters ({info['architecture']}.*):",
    ]
    width = max((len(k) for k in info["hparams"]), default=0)
    lines += [f"  {k:<{width}}  {_short(v)}" for k, v in info["hparams"].items()]
    tok = info["tokenizer"]
    lines.append("tokenizer:")
    lines.append(f"  model         {tok['model']}")
    lines.append(f"  pre           {tok['pre']}")
    lines.append(f"  vocab size    {tok['vocab_size']}")
    for key in ("bos", "eos"):
        s = tok[key]
        lines.append(f"  {key}           " + ("none" if s is None else f"{s['id']} {s['text']!r}"))
    ct = info["chat_template"]
    lines.append(f"chat template: {'present (' + str(ct['length']) + ' chars)' if ct['present'] else 'absent'}")
    lines.append(f"tensors:       {info['tensor_count']}")
    lines.append(f"  {'type':<8} {'count':>6} {'params':>14} {'bytes':>14}")
    for r in info["tensor_types"]:
        lines.append(f"  {r['type']:<8} {r['count']:>6} {r['params']:>14} {r['bytes']:>14}  {_human(r['bytes'])}")
    lines.append(f"  {'total':<8} {info['tensor_count']:>6} {info['total_params']:>14} "
                 f"{info['total_tensor_bytes']:>14}  {_human(info['total_tensor_bytes'])}")
    lines.append(f"parameters:    {info['total_params'] / 1e6:.1f} M ({info['total_params']})")
    if "tensors" in info:
        lines.append("tensor list:")
        width = max((len(t["name"]) for t in info["tensors"]), default=0)
        lines += [f"  {t['name']:<{width}}  {t['type']:<6} {tuple(t['shape'])}" for t in info["tensors"]]
    return "\n".join(lines)
