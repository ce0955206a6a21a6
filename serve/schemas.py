"""OpenAI-shaped request models (strict pydantic) and the JSON bodies of responses, chunks, usage and timings."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dflash_jax.requests import MAX_LOGIT_BIAS, Request, SamplingParams

MAX_TOP_LOGPROBS = 20


class _Strict(BaseModel):
    # Strict: "0.5" for a float or 1.0 for an int is a client bug worth a 400, not something to guess about.
    # Unknown fields are ignored, as OpenAI clients send extras (user, metadata, ...) that change nothing here.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class Message(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None


class ResponseFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None  # token id (a JSON object key, so a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    cache_prompt: bool = True  # llama-server's: may reuse the KV of a cached prefix of this prompt

    def stop_tuple(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)  # an empty stop string would end every request at once

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def bias_pairs(self, vocab_size: int) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs, each checked (a 400 names the entry)."""
        bias = self.logit_bias or {}
        if len(bias) > MAX_LOGIT_BIAS:
            raise ApiError(400, f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", param="logit_bias")
        pairs = []
        for key, value in bias.items():
            tok = int(key) if key.strip().lstrip("-").isdigit() else None
            if tok is None or not 0 <= tok < vocab_size:
                raise ApiError(400, f"logit_bias key {key!r} is not a token id of this model's vocabulary of "
                                    f"{vocab_size}", param="logit_bias")
            if not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias[{key!r}] = {value} is outside [-100, 100]", param="logit_bias")
            pairs.append((tok, value))
        return tuple(pairs)


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_settings(self) -> tuple[bool, int]:
        return self.logprobs, (self.top_logprobs or 0) if self.logprobs else 0


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # legacy API: number of top alternatives
    echo: bool = False

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_settings(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


class TokenizeRequest(_Strict):
    """llama-server's /tokenize."""
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Strict):
    tokens: list[int]


def sampling_params(body: _Sampling, max_tokens: int, vocab_size: int) -> SamplingParams:
    want_logprobs, top = body.logprob_settings()
    return SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          seed=body.seed, max_tokens=max_tokens, stop=body.stop_tuple(), logprobs=want_logprobs,
                          top_logprobs=top, ignore_eos=body.ignore_eos, logit_bias=body.bias_pairs(vocab_size))


# ---- responses ------------------------------------------------------------------------------------------------------

class ApiError(Exception):
    """Raised anywhere in a handler; the app turns it into `error_body` JSON with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, code, param)


def error_body(message: str, type_: str = "invalid_request_error", code: str | int | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(req: Request, *more: Request) -> dict:
    """One prompt, and the completion tokens of every choice made from it (`n`)."""
    n_prompt, n_gen = len(req.prompt_ids), req.num_generated + sum(r.num_generated for r in more)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen,
            "prompt_tokens_details": {"cached_tokens": req.num_cached_prompt}}


def timings(req: Request) -> dict:
    """llama-server's timings block. Prompt time runs from admission to the end of prefill; generation time from the
    first sampled token to the last. As in llama-server, prompt_n counts the prompt tokens computed and cache_n those
    taken from the prefix cache."""
    n_prompt, n_gen = len(req.prompt_ids) - req.num_cached_prompt, req.num_generated
    prompt_end = req.prompt_done_time or req.first_token_time or req.finish_time or req.created
    prompt_ms = max(prompt_end - (req.start_time or req.created), 0.0) * 1e3
    gen_start = req.first_token_time or prompt_end
    predicted_ms = max((req.finish_time or time.monotonic()) - gen_start, 0.0) * 1e3
    return {"cache_n": req.num_cached_prompt, "prompt_n": n_prompt, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / n_prompt if n_prompt else 0.0,
            "prompt_per_second": n_prompt / prompt_ms * 1e3 if prompt_ms > 0 else 0.0,
            "predicted_n": n_gen, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / n_gen if n_gen else 0.0,
            "predicted_per_second": n_gen / predicted_ms * 1e3 if predicted_ms > 0 else 0.0,
            "draft_n": req.draft_n, "draft_n_accepted": req.draft_n_accepted}


def chat_logprob_entry(token: str, token_bytes: bytes, logprob: float, top: list[tuple[str, bytes, float]]) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token_bytes),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in top]}


class Envelope:
    """The fields shared by every body of one response (id, created, model) and the chunk/final-body builders."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.model = model

    def _base(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def chunk(self, text: str | None, finish_reason: str | None = None, logprobs: list | None = None,
              role: bool = False, index: int = 0) -> dict:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            lp = {"content": logprobs} if logprobs is not None else None
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            return self._base("chat.completion.chunk", [choice])
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return self._base("text_completion", [choice])

    def usage_chunk(self, reqs: list[Request]) -> dict:
        body = self._base("chat.completion.chunk" if self.chat else "text_completion", [])
        body.update(usage=usage(*reqs), timings=timings(reqs[0]))
        return body

    def choice(self, text: str, finish_reason: str, logprobs: Any = None, index: int = 0) -> dict:
        """One choice of a non-streamed body."""
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": {"content": logprobs} if logprobs is not None else None,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def final(self, choices: list[dict], reqs: list[Request]) -> dict:
        """The non-streamed body: every choice, usage over all of them, the first choice's timings."""
        body = self._base("chat.completion" if self.chat else "text_completion", choices)
        body.update(usage=usage(*reqs), timings=timings(reqs[0]))
        return body
