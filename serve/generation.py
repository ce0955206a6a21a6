"""One request's life on the server side: submit to the engine, relay its token events as SSE or one JSON body."""
from __future__ import annotations

import asyncio
import dataclasses
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


def start_request(state, engine, body, prompt_ids: list[int], index: int = 0) -> Request:
    """Validate lengths, clamp max_tokens and submit. A max_tokens beyond the slot's context is clamped to what fits
    (llama-server's behaviour: such a request ends with finish_reason "length"), not refused. index: which of the
    body's `n` choices this is (a seeded body's choice i draws with seed + i, so the choices differ)."""
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
    if index and params.seed is not None:
        params = dataclasses.replace(params, seed=params.seed + index)
    req = Request(prompt_ids, params, events=EventStream(asyncio.get_running_loop()), cache_prompt=body.cache_prompt)
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


async def _merged(state, reqs: list[Request]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) of every request as the events come."""
    events: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, req: Request) -> None:
        try:
            async for ev in _events(state, req):
                events.put_nowait((i, ev))
        finally:
            events.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        remaining = len(reqs)
        while remaining:
            i, ev = await events.get()
            if ev is None:
                remaining -= 1
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()


async def stream_events(state, reqs: list[Request], env: schemas.Envelope, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI SSE chunks, each choice's under its index (EventStreamResponse cancels the requests if they stop
    early)."""
    lps = [Logprobs(state.engine.tokenizer, env.chat) if r.params.logprobs else None for r in reqs]
    extra = {"usage": None} if include_usage else {}  # OpenAI sends usage: null on every chunk but the last
    if env.chat:
        for i in range(len(reqs)):
            yield sse({**env.chunk("", role=True, index=i), **extra})
    failed = False
    async for i, ev in _merged(state, reqs):
        if ev.finish_reason == "error":
            yield sse(schemas.error_body(_error_message(ev), "server_error"))
            failed = True
            break
        token_lp = lps[i].add(ev) if lps[i] is not None and ev.token_id is not None else None
        if ev.text or token_lp is not None:
            yield sse({**env.chunk(ev.text, logprobs=token_lp, index=i), **extra})
        if ev.finish_reason:
            final = env.chunk(None if env.chat else "", finish_reason=ev.finish_reason, index=i)
            if not include_usage:
                final["timings"] = schemas.timings(reqs[i])  # llama-server puts timings on the last chunk
            yield sse({**final, **extra})
    if include_usage and not failed:
        yield sse(env.usage_chunk(reqs))
    yield "data: [DONE]\n\n"


async def collect_events(http_request, state, reqs: list[Request], env: schemas.Envelope) -> dict:
    """The non-streamed body. Choices are read one after another; the later ones' events wait in their queues."""
    lps = [Logprobs(state.engine.tokenizer, env.chat) if r.params.logprobs else None for r in reqs]
    texts: list[list[str]] = [[] for _ in reqs]
    finish: list[str | None] = [None] * len(reqs)
    try:
        for i, req in enumerate(reqs):
            async for ev in _events(state, req, http_request):
                if ev.finish_reason == "error":
                    raise ApiError(500, _error_message(ev), "server_error")
                if lps[i] is not None and ev.token_id is not None:
                    lps[i].add(ev)
                texts[i].append(ev.text)
                finish[i] = ev.finish_reason
    finally:
        for req, reason in zip(reqs, finish):
            if reason is None and not req.cancelled.is_set():
                abandon(state, req)  # the handler itself was cancelled, or a choice failed: free the slots
    choices = [env.choice("".join(t), reason or "cancelled", lp.result() if lp is not None else None, i)
               for i, (t, reason, lp) in enumerate(zip(texts, finish, lps))]
    return env.final(choices, reqs)
