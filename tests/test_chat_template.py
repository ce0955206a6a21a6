"""Chat template rendering: sandbox safety, HF semantics, and exact parity with llama.cpp's renderer (xllamacpp)."""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest

from converters.chat_template import ChatTemplate, ChatTemplateError, normalize_messages, normalize_tools
from converters.synthetic import PRESETS, read_gguf_kv, write_random_gguf

TEMPLATES = Path(__file__).parent / "data" / "templates"
MODELS = Path(os.environ.get("DFLASH_MODELS_DIR", "/work/models"))
SMOLLM2 = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
USER = [{"role": "user", "content": "hi"}]


def render(source: str, messages=USER, **kwargs) -> str:
    return ChatTemplate(source).render(messages, **kwargs)


# --- sandbox and error reporting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ '{0.__class__}'.format('a') }}",
    "{{ (messages | first).__class__ }}",
    "{{ messages.append({'role': 'x'}) }}",  # the environment is immutable: no mutating the caller's messages
    "{{ 'x' * 100000000000 }}",
    "{{ 9 ** 99999999 }}",
])
def test_sandbox_escape_raises(payload):
    with pytest.raises(ChatTemplateError, match="unsafe|exceeds"):
        render(payload)


def test_unsafe_access_fails_even_when_only_tested():
    # Plain Jinja sandboxes return an Undefined for unsafe attributes, so probing would render silently.
    with pytest.raises(ChatTemplateError, match="__class__"):
        render("{% if messages.__class__ %}yes{% endif %}")


def test_raise_exception_message_is_kept():
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate user/assistant"):
        render("{{ raise_exception('Conversation roles must alternate user/assistant') }}")


def test_syntax_error_raised_at_construction():
    with pytest.raises(ChatTemplateError, match="syntax error on line 2"):
        ChatTemplate("{% for m in messages %}\n{{ m.content }\n{% endfor %}")


@pytest.mark.parametrize("source", ["{{ 1 / 0 }}", "{{ 'a' + 1 }}", "{{ messages[5]['content'] | upper }}"])
def test_runtime_errors_become_chat_template_errors(source):
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        render(source)


def test_empty_template_rejected():
    with pytest.raises(ChatTemplateError, match="empty"):
        ChatTemplate("  \n")


# --- HF semantics ------------------------------------------------------------------------------------------------

def test_tojson_matches_hf():
    # HF's tojson: no HTML escaping, non-ASCII kept, indent and sort_keys supported.
    data = {"b": "<é & '日本'>", "a": [1, 2]}
    assert render("{{ x | tojson }}", x=data) == '{"b": "<é & \'日本\'>", "a": [1, 2]}'
    assert render("{{ x | tojson(indent=2, sort_keys=true) }}", x=data) == \
        '{\n  "a": [\n    1,\n    2\n  ],\n  "b": "<é & \'日本\'>"\n}'
    assert render("{{ x | tojson(ensure_ascii=true) }}", x="é") == '"\\u00e9"'


def test_trim_and_lstrip_blocks():
    source = "{% for m in messages %}\n    {% if true %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert render(source, messages=[{"content": "a"}, {"content": "b"}]) == "[a]\n[b]\n"


def test_loopcontrols_generation_tag_and_globals():
    assert render("{% for i in range(9) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "012"
    assert render("{% generation %}<{{ messages[0].content }}>{% endgeneration %}") == "<hi>"
    assert render("{{ strftime_now('%Y') | length }}") == "4"


def test_special_tokens_and_generation_prompt_flag():
    source = "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}{% if add_generation_prompt %}>{% endif %}"
    t = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    assert t.render(USER) == "<s>hi</s>>"
    assert t.render(USER, add_generation_prompt=False) == "<s>hi</s>"


def test_request_kwargs_override_server_defaults():
    t = ChatTemplate("{{ enable_thinking }}/{{ other }}", defaults={"enable_thinking": False, "other": 1})
    assert t.render(USER) == "False/1"
    assert t.render(USER, enable_thinking=True) == "True/1"
    assert t.render(USER) == "False/1"  # a request's kwargs do not leak into the next render


def test_reserved_kwargs_rejected():
    with pytest.raises(ChatTemplateError, match="add_generation_prompt"):
        ChatTemplate("x", defaults={"add_generation_prompt": False})
    with pytest.raises(ChatTemplateError, match="messages"):
        ChatTemplate("x").render(USER, messages=[])  # e.g. a request's chat_template_kwargs {"messages": ...}


def test_render_does_not_mutate_messages():
    source = (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text()
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>a"}]
    before = copy.deepcopy(messages)
    ChatTemplate(source).render(messages, add_generation_prompt=False)
    assert messages == before


# --- llama-server's message normalization ------------------------------------------------------------------------

def test_normalize_messages_like_llama_server():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}]},
        {"tool_call_id": "c1", "role": "tool", "content": "r", "name": "f"},
    ]
    assert normalize_messages(messages) == [
        {"role": "system", "content": "a\nb"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}, "id": "c1"}]},
        {"role": "tool", "content": "r", "name": "f", "tool_call_id": "c1"},
    ]
    assert list(normalize_messages(messages)[2]) == ["role", "content", "name", "tool_call_id"]


def test_normalize_rejects_bad_input():
    with pytest.raises(ChatTemplateError, match="not valid JSON"):
        normalize_messages([{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}])
    with pytest.raises(ChatTemplateError, match="image_url"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_normalize_tools():
    assert normalize_tools([]) is None and normalize_tools(None) is None
    assert normalize_tools([{"type": "function", "function": {"name": "f", "strict": True}}]) == [
        {"type": "function", "function": {"name": "f", "description": "", "parameters": {}}}]


# --- parity with llama.cpp ---------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city — in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CASES = {
    "system_user": {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}]},
    "user_unicode": {"messages": [{"role": "user", "content": "Héllo <b>&</b> 日本\n  indented"}]},
    "multi_turn": {"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]},
    "reasoning_field": {"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
        {"role": "user", "content": "And 3+3?"}]},
    "think_inline": {"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"}]},
    "tools": {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS},
    # The assistant turn after the last user query keeps its reasoning in Qwen3's template.
    "tool_call_with_reasoning": {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'}]},
    # OpenAI clients send arguments as a JSON string; llama-server parses it (normalize_messages does the same).
    "tool_call_string_args": {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21C"},
        {"role": "assistant", "content": "It is 21C."}, {"role": "user", "content": "Thanks"}]},
}


class LlamaCppRenderer:
    """llama-server (in process) with a template override; the rendered prompt comes back in `__verbose`."""

    def __init__(self, model: Path, template: str | None):
        xlc = pytest.importorskip("xllamacpp")
        p = xlc.CommonParams()
        p.model.path = str(model)
        p.n_ctx = 2048
        p.cpuparams.n_threads = 2
        p.cpuparams_batch.n_threads = 2
        p.warmup = False
        p.use_jinja = True
        p.verbosity = 10  # > 9 makes llama-server attach the prompt it built to each response
        if template is not None:
            p.chat_template = template
        self.server = xlc.Server(p)

    def render(self, case: dict, kwargs: dict | None) -> str:
        body = {"messages": copy.deepcopy(case["messages"]), "max_tokens": 1, "temperature": 0}
        if "tools" in case:
            body["tools"] = case["tools"]
        if kwargs is not None:
            body["chat_template_kwargs"] = kwargs
        response = self.server.handle_chat_completions(body)
        assert "__verbose" in response, response
        return response["__verbose"]["prompt"]


def _ours(template: ChatTemplate, case: dict, kwargs: dict | None) -> str:
    return template.render(normalize_messages(case["messages"]), add_generation_prompt=True,
                           tools=normalize_tools(case.get("tools")), **(kwargs or {}))


@pytest.fixture(scope="module")
def byte_vocab_model(tmp_path_factory) -> Path:
    # Any model loads the template; a 512-token byte-level vocabulary loads in a fraction of a second and
    # detokenizes the prompt losslessly.
    path = tmp_path_factory.mktemp("tmpl") / "tiny.gguf"
    write_random_gguf(path, dataclasses.replace(PRESETS["qwen3-tiny"], num_layers=1, vocab_size=512), None)
    return path


def _token_text(kv: dict, key: str) -> str:
    return kv["tokenizer.ggml.tokens"][0][kv[key][0]].decode()


def _template_source(name: str) -> str:
    if name == "SmolLM2 GGUF metadata":
        if not SMOLLM2.is_file():
            pytest.skip(f"{SMOLLM2} not present")
        return read_gguf_kv(SMOLLM2)["tokenizer.chat_template"][0].decode()
    return (TEMPLATES / name).read_text()


@pytest.mark.parametrize("template_name, kwargs_list", [
    ("Qwen-Qwen3-0.6B.jinja", [None, {"enable_thinking": False}, {"enable_thinking": True}]),
    ("Qwen-Qwen2.5-7B-Instruct.jinja", [None]),
    ("SmolLM2 GGUF metadata", [None]),  # uses no special-token variables, so any vocabulary renders it alike
    # Its default system prompt calls strftime_now; pin the date so a run across midnight cannot differ.
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", [{"date_string": "26 Jul 2024"}]),
])
def test_matches_llama_cpp(byte_vocab_model, template_name, kwargs_list):
    source = _template_source(template_name)
    kv = read_gguf_kv(byte_vocab_model)
    ours = ChatTemplate(source, _token_text(kv, "tokenizer.ggml.bos_token_id"),
                        _token_text(kv, "tokenizer.ggml.eos_token_id"))
    llama = LlamaCppRenderer(byte_vocab_model, source)
    mismatches = []
    for kwargs in kwargs_list:
        for name, case in CASES.items():
            expected = llama.render(case, kwargs)
            got = _ours(ours, case, kwargs)
            if got != expected:
                mismatches.append(f"{name} {kwargs}:\n  ours : {got!r}\n  llama: {expected!r}")
    assert not mismatches, "\n".join(mismatches)


def test_qwen3_thinking_modes_differ_as_documented(byte_vocab_model):
    source = (TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text()
    t = ChatTemplate(source, defaults={"enable_thinking": False})
    messages = CASES["system_user"]["messages"]
    assert t.render(messages).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert t.render(messages, enable_thinking=True).endswith("<|im_start|>assistant\n")
    # Earlier assistant turns lose their reasoning; the one after the last user query keeps it.
    assert "Add them." not in t.render(normalize_messages(CASES["reasoning_field"]["messages"]))
    assert "<think>\nNeed the tool.\n</think>" in t.render(
        normalize_messages(CASES["tool_call_with_reasoning"]["messages"]), tools=TOOLS)
