"""Host bookkeeping of slots: FIFO admission, pages, chunked-prefill planning, and turning sampled tokens into events.

Invariants: a slot owns its pages from admission to finish (reserved for prompt + max new tokens, so a running request
never waits for memory), sharing only the cached prefix pages it was admitted with (page_allocator), which it never
writes. A prompt's full pages are keyed when the chunk that writes them launches, a reply's at the request's end
(outside the batch-invariant mode); a match always leaves the prompt's last token to compute (its logits give the
first generated token). The host's view lags the device by the launched,
not yet retired steps: `num_cached` counts prompt chunks from their launch (from the cached prefix on) but generated
tokens from their retirement, and `inflight` bounds the tokens still to come from launched steps. The device's own
rows (step_fns.SlotRows) hold each slot's exact cache length and newest token, which is why decode steps never wait
for the host.
"""
from __future__ import annotations

import collections
import random
import threading
import time
from dataclasses import dataclass, field

from converters.detokenizer import IncrementalDetokenizer
from converters.tokenizer import Tokenizer
from dflash_jax.page_allocator import PageAllocator, PrefixStates, page_keys
from dflash_jax.requests import Request, TokenEvent


@dataclass
class Slot:
    id: int
    req: Request | None = None
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0
    max_new: int = 0
    detok: IncrementalDetokenizer | None = None
    text: str = ""  # generated text so far (for stop strings)
    emitted: int = 0  # characters of `text` already sent
    seed: int = 0
    inflight: int = 0  # tokens that launched, not yet retired steps may still produce (an upper bound)
    keyed: int = 0  # of the slot's full pages, how many are registered in the prefix cache
    generated: list[int] = field(default_factory=list)  # token ids sampled so far (keys of the generated pages)
    restore_row: int | None = None  # hybrid: the state-pool row whose prefix state this slot starts from

    @property
    def state(self) -> str:
        if self.req is None:
            return "idle"
        return "prefill" if self.num_cached < len(self.req.prompt_ids) else "decode"


@dataclass
class Plan:
    prefill: list[tuple[Slot, int]]  # (slot, chunk length)
    decode: list[Slot]


class Scheduler:
    def __init__(self, num_slots: int, allocator: PageAllocator, page_size: int, ctx_per_slot: int,
                 prefill_chunk: int, tokenizer: Tokenizer, prefix_cache: bool = True, cache_generated: bool = False,
                 prefix_states: PrefixStates | None = None):
        self.slots = [Slot(i) for i in range(num_slots)]
        self.queue: collections.deque[Request] = collections.deque()
        self.lock = threading.Lock()
        self.allocator = allocator
        self.page_size = page_size
        self.ctx_per_slot = ctx_per_slot
        self.prefill_chunk = prefill_chunk
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.cache_generated = prefix_cache and cache_generated and prefix_states is None
        self.prefix_states = prefix_states  # hybrid targets: a prefix is usable up to the deepest kept state
        self.cached_tokens = 0  # prompt tokens served from the prefix cache since start
        self._rng = random.Random(0)

    # --- admission -------------------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        if len(req.prompt_ids) >= self.ctx_per_slot:
            raise ValueError(f"the prompt has {len(req.prompt_ids)} tokens; the context per slot holds "
                             f"{self.ctx_per_slot} (prompt plus at least one generated token)")
        with self.lock:
            self.queue.append(req)

    def admit(self) -> None:
        """Queued requests into free slots, in arrival order. Memory is strictly FIFO: a request that does not get
        its pages stops admission, so nobody overtakes it. A request whose prefix another slot is still prefilling
        is passed over until that slot's pages are keyed (`_prefilling`); requests behind it may start first."""
        with self.lock:
            free = [slot for slot in self.slots if slot.req is None]
            i = 0
            while free and i < len(self.queue):
                req = self.queue[i]
                if req.cancelled.is_set():
                    del self.queue[i]
                    req.events.put(TokenEvent(None, "", finish_reason="cancelled"))
                    continue
                n_prompt, ps = len(req.prompt_ids), self.page_size
                max_new = min(req.params.max_tokens, self.ctx_per_slot - n_prompt)
                need = -(-(n_prompt + max_new) // ps)
                if req.prefix_keys is None:  # once per request: a waiting one is looked at every step
                    req.prefix_keys = page_keys(req.prompt_ids, ps, n_prompt // ps) if self.prefix_cache else []
                usable = req.prefix_keys[:(n_prompt - 1) // ps] if req.cache_prompt else []
                hits = self.allocator.match(usable)
                if self.prefix_states is not None:
                    hits = hits[:self.prefix_states.deepest(usable, len(hits))]
                if need - len(hits) > self.allocator.num_free - self.allocator.num_idle(hits):
                    return
                if self._prefilling(usable, len(hits)):
                    i += 1
                    continue
                del self.queue[i]
                slot = free.pop(0)
                self._start(slot, req, hits, need, max_new)
                if hits and self.prefix_states is not None:
                    slot.restore_row = self.prefix_states.take(usable[len(hits) - 1])

    def _start(self, slot: Slot, req: Request, hits: list[int], need: int, max_new: int) -> None:
        self.allocator.take(hits)
        slot.pages = hits + self.allocator.alloc(need - len(hits))
        slot.req, slot.num_cached, slot.keyed = req, len(hits) * self.page_size, len(hits)
        req.num_cached_prompt = slot.num_cached
        self.cached_tokens += slot.num_cached
        slot.max_new, slot.text, slot.emitted, slot.inflight, slot.generated = max_new, "", 0, 0, []
        slot.detok = IncrementalDetokenizer(self.tokenizer, skip_special=True)
        slot.seed = req.params.seed if req.params.seed is not None else self._rng.getrandbits(32)
        req.start_time = time.monotonic()

    def _prefilling(self, keys: list[bytes], hits: int) -> bool:
        """Whether a slot in prefill will key page `hits` of this prefix (chained keys: equal there, equal before).
        Waiting for it beats computing the same pages beside it: n choices of one prompt, or a burst of requests
        with one system prompt, then prefill it once (vLLM's behaviour), and a prefill step is no longer n times
        the work."""
        return hits < len(keys) and any(
            slot.req is not None and slot.state == "prefill" and hits < len(slot.req.prefix_keys)
            and slot.req.prefix_keys[hits] == keys[hits] for slot in self.slots)

    def key_written_pages(self, slot: Slot) -> None:
        """Register the prompt's full pages that launched prefill chunks have written."""
        keys = slot.req.prefix_keys
        done = min(slot.num_cached // self.page_size, len(keys))
        for i in range(slot.keyed, done):
            self.allocator.register(slot.pages[i], keys[i])
        slot.keyed = max(slot.keyed, done)

    def _key_generated_pages(self, slot: Slot) -> None:
        """At a request's end, register its full pages past the prompt: a chat's next turn (the same prompt, this
        reply, a new user turn) then computes only the new tokens, as llama-server's slot reuse does. Only positions
        below the last sampled token's are final (that token was never fed; launched steps write from there on)."""
        req, ps = slot.req, self.page_size
        if len(slot.generated) < 2 or slot.num_cached < len(req.prompt_ids):
            return
        done, keyed = min((len(req.prompt_ids) + len(slot.generated) - 1) // ps, len(slot.pages)), slot.keyed
        # the chain goes on from the last keyed prompt page (keyed <= len(prefix_keys))
        keys = page_keys(req.prompt_ids + slot.generated, ps, done, keyed, req.prefix_keys[keyed - 1] if keyed else b"")
        for page, key in zip(slot.pages[keyed:done], keys):
            self.allocator.register(page, key)

    # --- planning --------------------------------------------------------------------------------------------
    def plan(self) -> Plan:
        prefill, decode = [], []
        for slot in self.slots:
            if slot.req is None:
                continue
            if slot.req.cancelled.is_set():
                self.finish(slot, "cancelled")
            elif slot.state == "prefill":
                prefill.append((slot, min(self.prefill_chunk, len(slot.req.prompt_ids) - slot.num_cached)))
            elif slot.req.num_generated + slot.inflight < slot.max_new:
                decode.append(slot)  # else launched steps may already finish it: wait for their outputs
        return Plan(prefill, decode)

    # --- commit ----------------------------------------------------------------------------------------------
    def on_token(self, slot: Slot, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        """A token sampled for `slot` (after its prompt or after a decode step)."""
        req = slot.req
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
        req.num_generated += 1
        slot.generated.append(token)
        p = req.params
        lp = logprob if p.logprobs else None
        tops = top[:p.top_logprobs] if p.logprobs and p.top_logprobs else None
        if token in self.tokenizer.eog_ids and not p.ignore_eos:
            return self.finish(slot, "stop", TokenEvent(token, self._drain(slot, final=True), lp, tops))
        slot.text += slot.detok.push(token)
        for stop in p.stop:
            cut = slot.text.find(stop, max(0, slot.emitted - len(stop) + 1))
            if cut >= 0:
                slot.text = slot.text[:cut]
                return self.finish(slot, "stop", TokenEvent(token, self._drain(slot, final=True), lp, tops))
        if req.num_generated >= slot.max_new:
            slot.text += slot.detok.flush()
            return self.finish(slot, "length", TokenEvent(token, self._drain(slot, final=True), lp, tops))
        req.events.put(TokenEvent(token, self._drain(slot, final=False), lp, tops))

    def _drain(self, slot: Slot, final: bool) -> str:
        """New text that can be sent: everything on the last event, else all but a possible stop-string prefix."""
        end = len(slot.text)
        if not final:
            for stop in slot.req.params.stop:
                for k in range(min(len(stop) - 1, end - slot.emitted), 0, -1):
                    if slot.text.endswith(stop[:k]):
                        end = min(end, len(slot.text) - k)
                        break
        out, slot.emitted = slot.text[slot.emitted:end], max(slot.emitted, end)
        return out

    def finish(self, slot: Slot, reason: str, event: TokenEvent | None = None) -> None:
        req = slot.req
        req.finish_time = time.monotonic()
        event = event or TokenEvent(None, "")
        event.finish_reason = reason
        if self.cache_generated and reason != "error":
            self._key_generated_pages(slot)
        self.allocator.free(slot.pages[::-1])  # the deepest prefix pages become the first evicted
        slot.req, slot.pages, slot.detok, slot.inflight, slot.keyed, slot.generated = None, [], None, 0, 0, []
        req.events.put(event)

    def fail_all(self, message: str) -> None:
        with self.lock:
            queued, self.queue = list(self.queue), collections.deque()
        for req in queued:
            req.events.put(TokenEvent(None, message, finish_reason="error"))
        for slot in self.slots:
            if slot.req is not None:
                self.finish(slot, "error", TokenEvent(None, message))

    def stats(self) -> dict:
        with self.lock:
            return self._stats()

    def _stats(self) -> dict:
        slots = [(s, s.req) for s in self.slots]  # one read of each slot's request: the engine thread may clear it
        return {
            "num_slots": len(self.slots),
            "busy_slots": sum(req is not None for _, req in slots),
            "queue_len": len(self.queue),
            "num_pages": self.allocator.num_pages - 1,  # the trash page is never handed out
            "num_pages_free": self.allocator.num_free,
            "num_pages_cached": self.allocator.num_cached,
            "prompt_tokens_cached": self.cached_tokens,
            "slots": [{"id": s.id, "busy": req is not None,
                       "state": "idle" if req is None else ("prefill" if s.num_cached < len(req.prompt_ids)
                                                            else "decode"),
                       "request_id": req.id if req else None,
                       "n_prompt": len(req.prompt_ids) if req else 0,
                       "n_prompt_cached": req.num_cached_prompt if req else 0,
                       "n_generated": req.num_generated if req else 0,
                       "draft_n": req.draft_n if req else 0,
                       "draft_n_accepted": req.draft_n_accepted if req else 0} for s, req in slots],
        }
