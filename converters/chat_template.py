"""Renders (untrusted) Jinja chat templates in a sandbox, the way HF transformers' apply_chat_template does."""
from __future__ import annotations

import json
import operator
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Set by render() itself; template kwargs (server defaults, or a request's `messages`) may not replace them.
RESERVED = frozenset({"messages", "add_generation_prompt", "tools"})
# Bounds on `*` and `**` in templates: a template is untrusted input, and "x" * 10**12 must fail, not eat the host.
MAX_REPEAT = 1 << 20
MAX_EXPONENT = 1 << 10
# Exceptions a buggy template can raise from plain Python operations (e.g. "a" + 1, {}["k"], 1 / 0).
_RUNTIME_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
                   RecursionError)


class ChatTemplateError(ValueError):
    """A chat template failed: syntax error, raise_exception(), an unsafe access, or a runtime error."""


class _GenerationTag(jinja2.ext.Extension):
    """Accepts HF's `{% generation %}...{% endgeneration %}` (assistant-mask markers) and renders the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    """HF's sandbox, except that an unsafe attribute access raises at once instead of yielding an Undefined
    (which would print as an empty string and let a probing template pass silently)."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                    raise SecurityError(f"sequence repetition to {len(seq) * n} items exceeds {MAX_REPEAT}")
            return operator.mul(left, right)
        if isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent {right} exceeds {MAX_EXPONENT}")
        return operator.pow(left, right)


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # HF's override: jinja2's own tojson HTML-escapes <, >, & and ' and takes no ensure_ascii.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile(source: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template plus the server-wide template kwargs; render() is pure and thread-safe."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", defaults: dict | None = None):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("chat template is empty")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.defaults = dict(defaults or {})
        self._check_reserved(self.defaults, "chat_template_kwargs (server default)")
        try:
            self._template = _compile(source)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {_describe(e)}") from e

    @staticmethod
    def _check_reserved(kwargs: dict, where: str) -> None:
        clash = sorted(RESERVED & kwargs.keys())
        if clash:
            raise ChatTemplateError(f"{where} may not set {', '.join(clash)}: pass them as request fields")

    def render(self, messages: list[dict], /, add_generation_prompt: bool = True, tools: list | None = None,
               **kwargs: Any) -> str:
        """The prompt text for `messages`; kwargs (per-request chat_template_kwargs) override the defaults."""
        self._check_reserved(kwargs, "chat_template_kwargs")
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **self.defaults, **kwargs,
                   "messages": messages, "add_generation_prompt": add_generation_prompt, "tools": tools}
        try:
            return self._template.render(**context)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {_describe(e)}") from e
        except _RUNTIME_ERRORS as e:
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e


def normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages -> the template input llama-server builds from them (checked against llama.cpp b11549).

    Content parts are joined with newlines and a null content becomes ""; tool-call arguments sent as JSON strings are
    parsed into objects (templates then `tojson` them); keys come in llama.cpp's order, since templates may dump whole
    messages.
    """
    out = []
    for i, m in enumerate(messages):
        msg = {"role": m["role"], "content": _text_content(m.get("content"), i)}
        for key in ("reasoning_content", "name", "tool_call_id"):
            if m.get(key) is not None:
                msg[key] = m[key]
        if m.get("tool_calls"):
            msg["tool_calls"] = [_tool_call(tc, i) for tc in m["tool_calls"]]
        out.append(msg)
    return out


def normalize_tools(tools: list[dict] | None) -> list[dict] | None:
    """OpenAI tool definitions -> llama-server's template input: no tools is None, and every function has a
    description and parameters (llama.cpp fills "" and {}; other fields such as `strict` are dropped)."""
    if not tools:
        return None
    out = []
    for t in tools:
        fn = t.get("function") or {}
        if "name" not in fn:
            raise ChatTemplateError(f"tool definition without a function name: {t!r}")
        out.append({"type": "function", "function": {"name": fn["name"], "description": fn.get("description", ""),
                                                     "parameters": fn.get("parameters", {})}})
    return out


def _text_content(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise ChatTemplateError(f"message {index}: content part of type {part.get('type')!r} is not supported "
                                    f"(text only)")
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_call(tc: dict, index: int) -> dict:
    fn = tc.get("function") or {}
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ChatTemplateError(f"message {index}: tool call arguments are not valid JSON: {e}") from e
    call = {"type": "function", "function": {"name": fn.get("name", ""), "arguments": args}}
    if tc.get("id") is not None:
        call["id"] = tc["id"]
    return call


def _describe(e: TemplateError) -> str:
    if isinstance(e, SecurityError):
        return f"unsafe operation blocked by the sandbox: {e}"
    if isinstance(e, jinja2.TemplateSyntaxError):
        return f"syntax error on line {e.lineno}: {e.message}"
    if type(e) is TemplateError:  # what raise_exception() raises
        return f"template raised an exception: {e.message}"
    return f"{type(e).__name__}: {e.message}"
