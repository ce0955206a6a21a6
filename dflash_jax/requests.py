"""What a client asks the engine for, and what the engine sends back token by token (host-side, thread-safe)."""
from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

_ids = itertools.count()
MAX_LOGIT_BIAS = 300  # logit_bias entries per request, OpenAI's limit


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0  # at most engine.MAX_TOP_LOGPROBS
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)

    def __post_init__(self):
        checks = {
            "temperature": self.temperature >= 0, "top_k": self.top_k >= 0, "top_p": 0 < self.top_p <= 1,
            "min_p": 0 <= self.min_p <= 1, "presence_penalty": -2 <= self.presence_penalty <= 2,
            "frequency_penalty": -2 <= self.frequency_penalty <= 2, "max_tokens": self.max_tokens >= 1,
            "top_logprobs": 0 <= self.top_logprobs <= 20,
            "logit_bias": len(self.logit_bias) <= MAX_LOGIT_BIAS
            and all(t >= 0 and -100 <= v <= 100 for t, v in self.logit_bias),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}: {getattr(self, name)!r}")


@dataclass
class TokenEvent:
    token_id: int | None  # None on the final event of a request that ended without a new token
    text: str  # newly completed text (never a partial UTF-8 character; stop strings already cut)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the last event


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    events: "queue.Queue[TokenEvent]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    cache_prompt: bool = True  # may reuse cached prefix pages (llama-server's cache_prompt)
    prefix_keys: list[bytes] | None = None  # the keys of the prompt's full pages (page_allocator), set at admission
    # Filled by the engine, read by the server for usage/timings:
    num_generated: int = 0
    num_cached_prompt: int = 0  # prompt tokens taken from the prefix cache (not computed)
    start_time: float | None = None  # admitted into a slot (queue wait ends)
    first_token_time: float | None = None
    prompt_done_time: float | None = None
    finish_time: float | None = None
    draft_n: int = 0
    draft_n_accepted: int = 0

    def cancel(self) -> None:
        self.cancelled.set()
