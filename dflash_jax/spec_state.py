"""DFlash state held by the engine: the drafter's weights and context cache, acceptance counters, and the adaptive
policy that decides, per slot-count bucket, whether a speculative step beats a plain one.

Policy: a plain step yields 1 token per slot; a spec step yields tau = mean(accepted + 1). Speculate when
tau * cost(plain, b) > cost(spec, b), with step costs measured at warm-up and refined by running averages, and tau a
running average of recent spec steps (shrunk towards 1 while few are measured). While not speculating, every
PROBE_EVERY-th decode step speculates anyway so tau keeps tracking the traffic, more rarely (up to PROBE_MAX_EVERY)
the more a probe loses, so that probing costs at most PROBE_OVERHEAD of plain throughput; a probe speculates one slot
only. Slots with presence/frequency penalties decode plainly (their penalty counts change inside a block).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np
from flax import nnx

from dflash_jax.buckets import bucket_for
from dflash_jax.kv_cache import KVCache

PROBE_EVERY = 16
PROBE_MAX_EVERY = 16 * PROBE_EVERY
PROBE_OVERHEAD = 0.02  # probes may cost at most this fraction of plain decoding's throughput
EMA = 0.1
TAU_PSEUDO_STEPS = 2


@dataclass
class LoadedDrafter:
    config: object  # converters.drafter_gguf.DrafterConfig
    model: nnx.Module  # dflash_jax.models.drafter.Drafter
    source: str = ""


class SpecState:
    def __init__(self, drafter: LoadedDrafter, engine_cfg, num_pages: int, dtype):
        dc = drafter.config
        self.config = dc
        self.block = min(engine_cfg.draft_max + 1, dc.block_size)
        self.taps = tuple(dc.target_layer_ids)
        self.mask_token_id = int(dc.mask_token_id)
        self.ctx_window = engine_cfg.ctx_size_draft
        self.graphdef, self.state = nnx.split(drafter.model)
        self.cache = KVCache.create(dc.num_layers, num_pages, engine_cfg.page_size, dc.num_kv_heads, dc.head_dim,
                                    dtype)
        self.policy = engine_cfg.spec_policy
        self.slot_buckets = engine_cfg.slot_buckets
        self.cost_plain: dict[int, float] = {}
        self.cost_spec: dict[int, float] = {}
        self.tau = (1 + self.block) / 2  # optimistic prior: replaced by the first spec step's measurement
        self.num_spec_steps = 0
        self.injector: Callable | None = None  # tests: slot -> forced drafts (list of block-1 ids) or None
        # Counters (vLLM's spec_decode_* names in /metrics).
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted = 0
        self.accepted_per_pos = np.zeros(self.block - 1, np.int64)

    def eligible(self, slot) -> bool:
        p = slot.req.params
        return self.policy != "never" and p.presence_penalty == 0 and p.frequency_penalty == 0

    def _costs(self, num_slots: int) -> tuple[float | None, float | None]:
        b = bucket_for(num_slots, self.slot_buckets)
        return self.cost_plain.get(b), self.cost_spec.get(b)

    def _pays(self, num_slots: int) -> bool:
        """A spec step yields more per second than a plain one (assumed while the bucket's costs are unmeasured)."""
        plain, spec = self._costs(num_slots)
        return plain is None or spec is None or self.tau * plain > spec

    def worth_it(self, num_slots: int, step: int) -> bool:
        if self.policy == "always" or self._pays(num_slots):
            return True
        return step % self.probe_every(num_slots) == 0

    def probe_every(self, num_slots: int) -> int:
        """Decode steps between probes: PROBE_EVERY doubled until a probe's loss, spread over the interval, is at
        most PROBE_OVERHEAD of plain decoding. A probe speculates one slot (a bucket-1 spec step, launched beside the
        others' plain step) and yields tau - 1 extra tokens: in units of the bucket's plain step it loses
        spec(1) / plain(n) - (tau - 1) / n, or spec(1) / plain(1) - tau at one slot."""
        plain_n, _ = self._costs(num_slots)
        plain_1, spec_1 = self._costs(1)
        if plain_n is None or spec_1 is None:
            return PROBE_EVERY
        if num_slots == 1:
            loss = spec_1 / plain_1 - self.tau
        else:
            loss = spec_1 / plain_n - (self.tau - 1) / num_slots
        every = PROBE_EVERY
        while every < PROBE_MAX_EVERY and loss / every > PROBE_OVERHEAD:
            every *= 2
        return every

    def num_to_speculate(self, num_slots: int, step: int) -> int:
        """How many of `num_slots` eligible slots speculate this step: all where DFlash pays; one slot for a probe,
        which keeps tau current at the price of a 1-slot spec step rather than a full-bucket one."""
        if self.policy == "always":
            return num_slots
        if not self.worth_it(num_slots, step):
            return 0
        # Before any spec step tau is still the prior: learn it from one slot first.
        return num_slots if self.num_spec_steps > 0 and self._pays(num_slots) else 1

    def record_step(self, num_slots: int, seconds: float, accepted: np.ndarray) -> None:
        b = bucket_for(num_slots, self.slot_buckets)
        self.cost_spec[b] = seconds if b not in self.cost_spec else (1 - EMA) * self.cost_spec[b] + EMA * seconds
        self.num_spec_steps += 1
        # The optimistic prior is gone after one measurement; from then on a running mean that starts with
        # TAU_PSEUDO_STEPS pseudo-steps of tau = 1 (one step's tau ranges over 1..block, and a lucky first block of
        # 7 made a CPU engine speculate for 19 steps at a loss), turning into an EMA after 1/EMA steps.
        x = float(np.mean(accepted + 1))
        if self.num_spec_steps == 1:
            self.tau = (x + TAU_PSEUDO_STEPS) / (1 + TAU_PSEUDO_STEPS)
        else:
            alpha = max(EMA, 1.0 / (self.num_spec_steps + TAU_PSEUDO_STEPS))
            self.tau = (1 - alpha) * self.tau + alpha * x
        self.num_drafts += len(accepted)
        self.num_draft_tokens += len(accepted) * (self.block - 1)
        self.num_accepted += int(np.sum(accepted))
        for a in accepted:
            self.accepted_per_pos[:int(a)] += 1

    def record_plain(self, num_slots: int, seconds: float) -> None:
        b = bucket_for(num_slots, self.slot_buckets)
        self.cost_plain[b] = seconds if b not in self.cost_plain else (1 - EMA) * self.cost_plain[b] + EMA * seconds

    def measure_costs(self, engine, repeats: int = 3) -> None:
        """Time a compiled plain and spec step of every bucket (padding rows only: same shapes, same work), the way
        the engine runs them: one at a time when it reads each step before launching the next, else as a burst of
        launches read at the end (with overlap a step's cost in serving is the interval between retirements, which
        hides dispatch and the device->host read; timing synchronous steps instead charged both to the plain step
        the policy compares against, and an H200 at 8 slots kept speculating at tau 1.25, 4 % below plain)."""
        burst = repeats if engine.overlap else 1
        for b in self.slot_buckets:
            for kind in ("plain", "spec"):
                inputs = engine._inputs([], b, 1) if kind == "plain" else engine._spec_inputs([], b)
                dispatch = engine._dispatch if kind == "plain" else engine._dispatch_spec
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    outs = [dispatch(inputs, False) for _ in range(burst)]
                    jax.device_get(outs)
                    best = min(best, (time.perf_counter() - t0) / burst)
                (self.cost_plain if kind == "plain" else self.cost_spec)[b] = best

    def stats(self) -> dict:
        return {"block": self.block, "tau": round(self.tau, 3), "policy": self.policy,
                "num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted, "accepted_per_pos": self.accepted_per_pos.tolist(),
                "cost_plain_ms": {b: round(c * 1e3, 2) for b, c in self.cost_plain.items()},
                "cost_spec_ms": {b: round(c * 1e3, 2) for b, c in self.cost_spec.items()}}
