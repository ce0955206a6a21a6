"""One request's life on the server side: submit to the engine, relay its token events as SSE or one JSON body."""
from __future__ import annotations

import asyncio
import json
import queue
import time
from typing import AsyncIterator

from dflash_jax.requests import Request, TokenEvent
from serve import schemas
from serve.schemas import ApiError

DISCONNECT_POLL_S = 0.5  # how often a non-streaming handler checks whether its client is still there


class EventStream(queue.Queue):
    """req.events for the engine (a plain queue.Queue to it) that also wakes the asyncio task reading it, so no
    thread per request sits blocked in get()."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._loop = loop
        self._ready = asyncio.Event()

    def _put(self, item) -> None:  # runs under the queue's lock for put() and put_nowait() alike
        super()._put(item)
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:
            pass  # the loop has closed: nobody is reading any more

    async def next(self, timeout: float | None = None) -> TokenEvent | None:
        """The next event, or None after `timeout` seconds without one."""
        while True:
            try:
                return self.get_nowait()
            except queue.Empty:
                pass
            self._ready.clear()
            try:  # an item put between the first check and clear() has already fired set(); don't sleep past it
                return self.get_nowait()
            except queue.Empty:
                pass
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return None


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def start_request(state, engine, body, prompt_ids: list[int]) -> Request:
    """Validate lengths, clamp max_tokens and submit. A max_tokens beyond the slot's context is clamped to what fits
    (llama-server's behaviour: such a request ends with finish_reason "length"), not refused."""
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise ApiError(400, "the prompt is empty", param="prompt")
    room = state.slot_ctx - n_prompt
    if room < 1:
        raise ApiError(400, f"the prompt has {n_prompt} tokens, but a request may use at most {state.slot_ctx} "
                            f"tokens of context (prompt + completion) on this server", code="context_length_exceeded")
    wanted = body.requested_max_tokens()
    max_tokens = room if wanted is None else min(wanted, room)
    try:
        params = schemas.sampling_params(body, max_tokens, engine.tokenizer.vocab_size)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    req = Request(prompt_ids, params, events=EventStream(asyncio.get_running_loop()))
    try:
        engine.submit(req)
    except ValueError as e:
        raise ApiError(400, str(e), code="context_length_exceeded") from None
    except RuntimeError as e:  # the engine is draining for shutdown
        raise ApiError(503, str(e), "unavailable_error", "shutting_down") from None
    state.metrics.prompt_tokens.inc(n_prompt)
    return req


def abandon(state, req: Request) -> None:
    """The client is gone: free the slot (the engine does so within a step) and count the request as cancelled."""
    req.cancel()
    state.metrics.observe_finished(req, "cancelled")


async def _events(state, req: Request, http_request=None) -> AsyncIterator[TokenEvent]:
    """The request's events up to and including the final one; with http_request, stop (and cancel) early when that
    client disconnects."""
    metrics, last = state.metrics, None
    next_check = time.monotonic() + DISCONNECT_POLL_S
    while True:
        ev = await req.events.next(DISCONNECT_POLL_S if http_request is not None else None)
        # Checked by the clock, not only on timeouts: a busy engine delivers tokens faster than any timeout.
        if http_request is not None and time.monotonic() >= next_check:
            next_check = time.monotonic() + DISCONNECT_POLL_S
            if await http_request.is_disconnected():
                abandon(state, req)
                return
        if ev is None:
            continue
        if ev.token_id is not None:
            now = time.monotonic()
            if last is not None:
                metrics.itl.observe(now - last)
            last = now
        yield ev
        if ev.finish_reason:
            metrics.observe_finished(req, ev.finish_reason)
            return


class Logprobs:
    """Formats per-token logprobs in the chat shape (list of entries) or the legacy completions shape (parallel
    lists), either for one streamed token or accumulated for a whole response."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self.entries: list[dict] = []
        self.legacy = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.offset = 0

    def _piece(self, token_id: int) -> tuple[str, bytes]:
        return self.tokenizer.decode([token_id]), self.tokenizer.token_bytes(token_id)

    def add(self, ev: TokenEvent) -> dict | list:
        """Record one token; returns just this token's logprobs (what a streamed chunk carries)."""
        text, raw = self._piece(ev.token_id)
        top = [(*self._piece(t), lp) for t, lp in (ev.top_logprobs or [])]
        if self.chat:
            entry = schemas.chat_logprob_entry(text, raw, ev.logprob, top)
            self.entries.append(entry)
            return [entry]
        one = {"tokens": [text], "token_logprobs": [ev.logprob], "top_logprobs": [{t: lp for t, _, lp in top}],
               "text_offset": [self.offset]}
        for key, values in one.items():
            self.legacy[key].extend(values)
        self.offset += len(text)
        return one

    def result(self):
        return self.entries if self.chat else self.legacy


def _error_message(ev: TokenEvent) -> str:
    return f"generation failed: {ev.text}" if ev.text else "generation failed inside the engine"


async def stream_events(state, req: Request, env: schemas.Envelope, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI SSE chunks (EventStreamResponse cancels the request if they stop early)."""
    lp = Logprobs(state.engine.tokenizer, env.chat) if req.params.logprobs else None
    extra = {"usage": None} if include_usage else {}  # OpenAI sends usage: null on every chunk but the last
    if env.chat:
        yield sse({**env.chunk("", role=True), **extra})
    async for ev in _events(state, req):
        if ev.finish_reason == "error":
            yield sse(schemas.error_body(_error_message(ev), "server_error"))
            break
        token_lp = lp.add(ev) if lp is not None and ev.token_id is not None else None
        if ev.text or token_lp is not None:
            yield sse({**env.chunk(ev.text, logprobs=token_lp), **extra})
        if ev.finish_reason:
            final = env.chunk(None if env.chat else "", finish_reason=ev.finish_reason)
            if not include_usage:
                final["timings"] = schemas.timings(req)  # llama-server puts timings on the last chunk
            yield sse({**final, **extra})
            if include_usage:
                yield sse(env.usage_chunk(req))
    yield "data: [DONE]\n\n"


async def collect_events(http_request, state, req: Request, env: schemas.Envelope) -> dict:
    lp = Logprobs(state.engine.tokenizer, env.chat) if req.params.logprobs else None
    texts, finish = [], None
    try:
        async for ev in _events(state, req, http_request):
            if ev.finish_reason == "error":
                raise ApiError(500, _error_message(ev), "server_error")
            if lp is not None and ev.token_id is not None:
                lp.add(ev)
            texts.append(ev.text)
            finish = ev.finish_reason
    finally:
        if finish is None and not req.cancelled.is_set():
            abandon(state, req)  # the handler itself was cancelled: free the slot
    return env.final("".join(texts), finish or "cancelled", req, lp.result() if lp is not None else None)
