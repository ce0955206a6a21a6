"""DFlash state held by the engine: the drafter's weights and context cache, acceptance counters, and the adaptive
policy that decides, per slot-count bucket, whether a speculative step beats a plain one.

Policy: a plain step yields 1 token per slot; a spec step yields tau = mean(accepted + 1). Speculate when tau_low *
cost(plain, b) > cost(spec, b): the costs are the medians of the last SERVED_WINDOW served iterations of each kind
in bucket b once both kinds have SERVED_MIN of them, before that the warm-up's bare steps (never one of each: a
served cost set against a warm-up one was biased by 1.2-1.6x either way); tau is a running average of measured
blocks (shrunk towards 1 while few are measured) and tau_low that less one standard error. The first block is a real
spec step of one slot (tau is still an optimistic prior). While not speculating, every PROBE_EVERY-th decode step
probes tau with a shadow draft: one slot's drafts from a draft-only step (no verify), compared with the tokens plain
decoding then gives that slot, which is the accepted length a spec step would have had (acceptance compares drafts
with the target's own choices). A probe costs a draft step, not a verify; it is spread over more steps (up to
PROBE_MAX_EVERY) if it would still cost more than PROBE_OVERHEAD of plain throughput. Slots with presence/frequency
penalties decode plainly (their penalty counts change inside a block).

Short blocks (`draft_short` drafts, adaptive policy, off by default): where the full block does not pay, a block of
draft_short + 1 may (a verify of fewer rows costs less, and the first drafts carry most of the acceptance: SmolLM2's
shipped drafter accepts 0.73, 0.53, 0.35 at positions 1-3 on held-out code and tau 3.34 over 16). It keeps its own
tau and costs: every measured block and probe gives it an exact sample, min(accepted, draft_short) + 1, since
acceptance is a prefix. A short block gives the full block's tau only a lower bound where all its drafts were
accepted; that sample is taken as it is, so the estimate errs towards the short block.
"""
from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np
from flax import nnx

from dflash_jax.buckets import bucket_for
from dflash_jax.kv_cache import KVCache
from dflash_jax.models.drafter import draft_head_rows, for_serving, resolve_fp8, to_fp8

PROBE_EVERY = 4  # the shortest interval: a probe is a draft step (cheap beside a verify), and tau needs samples
PROBE_MAX_EVERY = 256
PROBE_OVERHEAD = 0.02  # probes may cost at most this fraction of plain decoding's throughput
EMA = 0.1
SERVED_WINDOW = 32  # iterations per (kind, bucket) whose median is the served cost
SERVED_MIN = 4
TAU_EMA = 0.05  # tau's running average: ~40 blocks, a standard error of ~0.4 for single blocks of spread 2.5
TAU_PSEUDO_STEPS = 2
# The first measurement of tau: a real 1-slot block where it costs at most this many plain steps of 1 slot (GPUs:
# 1.3-1.5), else a shadow probe (the dev CPU's SmolLM2: 2.9, and that one block was most of the adaptive engine's
# 4-7 % loss to plain decoding in a 64-token run).
FIRST_BLOCK_MAX_RATIO = 2.0


@dataclass
class Shadow:
    """A probe in flight: the drafts for the tokens of `req` from index `base` on, checked as they are decoded."""
    req: object  # dflash_jax.requests.Request
    base: int  # index (in the request's generated tokens) of the token the first draft guesses
    drafts: np.ndarray | None = None  # set when the draft step is retired


@dataclass
class LoadedDrafter:
    config: object  # converters.drafter_gguf.DrafterConfig
    model: nnx.Module  # dflash_jax.models.drafter.Drafter
    source: str = ""


class SpecState:
    def __init__(self, drafter: LoadedDrafter, engine_cfg, num_pages: int, dtype, target=None):
        """target: the target model, whose LM head rows the drafter's own head takes (a draft vocabulary,
        `engine_cfg.draft_vocab`, or an fp8 copy, `engine_cfg.draft_fp8`)."""
        dc = drafter.config
        self.config = dc
        self.block = min(engine_cfg.draft_max + 1, dc.block_size)
        short = engine_cfg.draft_short + 1
        self.short = short if engine_cfg.spec_policy == "adaptive" and 1 < short < self.block else 0
        self.blocks = (self.block,) + ((self.short,) if self.short else ())
        self.taps = tuple(dc.target_layer_ids)
        self.mask_token_id = int(dc.mask_token_id)
        self.ctx_window = engine_cfg.ctx_size_draft
        head, fp8 = None, resolve_fp8(engine_cfg.draft_fp8, dtype)
        if engine_cfg.draft_vocab or fp8 != "off":  # the drafter's own head (an fp8 one: a copy)
            if target is None:
                raise ValueError("a draft vocabulary (--draft-vocab) or an fp8 drafter (--draft-fp8) needs the "
                                 "target model's LM head")
            n = engine_cfg.draft_vocab or target.embed_tokens[...].shape[0]
            ids = np.arange(n, dtype=np.int32)  # tokenizer order: BPE merges, ~frequency
            head = (ids, draft_head_rows(target, ids))
        self.draft_vocab, self.draft_fp8 = engine_cfg.draft_vocab, fp8
        self.graphdef, self.state = nnx.split(to_fp8(for_serving(drafter.model, head), fp8))
        self.cache = KVCache.create(dc.num_layers, num_pages, engine_cfg.page_size, dc.num_kv_heads, dc.head_dim,
                                    dtype)
        self.policy = engine_cfg.spec_policy
        self.slot_buckets = engine_cfg.slot_buckets
        self.cost_plain: dict[int, float] = {}  # the warm-up's bare steps, per bucket
        self.cost_spec: dict[int, float] = {}
        self.cost_short: dict[int, float] = {}
        # Served iterations (launch to retirement of one decode-only or spec-only iteration, host work included):
        # serving costs more than bare steps (8 slots, 2 CPU cores: plain 95 -> 115 ms, spec 370 -> 448 ms; a
        # host-bound H200 engine: plain 1.9 -> 2.8 ms), and a median shrugs off the stalled iteration (a garbage
        # collection, an iteration that also retired a prefill).
        self.served: dict[tuple[str, int], collections.deque] = {}
        self.served_cost: dict[tuple[str, int], float] = {}  # their medians, kept current (read every step)
        self.tau = (1 + self.block) / 2  # optimistic prior: replaced by the first spec step's measurement
        self.num_spec_steps = 0
        self.num_tau_samples = 0  # spec steps and resolved shadow probes
        self.tau_var = 0.0  # the running variance of the blocks' (accepted + 1)
        self.short_est = ((1 + self.short) / 2, 0.0, 0)  # the short block's (tau, variance, samples)
        self.num_short_steps = 0
        self.shadow: Shadow | None = None
        self.num_shadow_probes = 0
        self.cost_draft: float | None = None  # a 1-slot draft-only step
        self.injector: Callable | None = None  # tests: slot -> forced drafts (list of block-1 ids) or None
        # Counters (vLLM's spec_decode_* names in /metrics).
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted = 0
        self.accepted_per_pos = np.zeros(self.block - 1, np.int64)

    def eligible(self, slot) -> bool:
        p = slot.req.params
        return self.policy != "never" and p.presence_penalty == 0 and p.frequency_penalty == 0

    def _served(self, kind: str, b: int) -> float | None:
        return self.served_cost.get((kind, b))

    def spec_kind(self, block: int) -> str:
        """The served-cost kind of a spec step of this block: 'spec' (full) or 'short'."""
        return "spec" if block == self.block else "short"

    def _costs(self, num_slots: int, kind: str = "spec") -> tuple[float | None, float | None]:
        """(plain, spec) cost of a step of this bucket: both served, else both from warm-up (None: unmeasured)."""
        b = bucket_for(num_slots, self.slot_buckets)
        plain, spec = self._served("plain", b), self._served(kind, b)
        if plain is not None and spec is not None:
            return plain, spec
        return self.cost_plain.get(b), (self.cost_short if kind == "short" else self.cost_spec).get(b)

    def spec_ratio(self, num_slots: int, kind: str = "spec") -> float | None:
        """A spec step's cost in plain steps of its bucket: the break-even tau."""
        plain, spec = self._costs(num_slots, kind)
        return None if plain is None or spec is None else spec / plain

    def _pays(self, num_slots: int, kind: str = "spec") -> bool:
        """A spec step yields more per second than a plain one (assumed while the bucket's costs are unmeasured)."""
        ratio = self.spec_ratio(num_slots, kind)
        low = self.tau_low() if kind == "spec" else _tau_low(*self.short_est)
        return ratio is None or low > ratio

    def record_iteration(self, kind: str, num_slots: int, seconds: float) -> None:
        """A served iteration that ran only a decode step ('plain') or only a spec step ('spec') of num_slots."""
        key = (kind, bucket_for(num_slots, self.slot_buckets))
        q = self.served.setdefault(key, collections.deque(maxlen=SERVED_WINDOW))
        q.append(seconds)
        if len(q) >= SERVED_MIN:
            self.served_cost[key] = statistics.median(q)

    def tau_low(self) -> float:
        """tau less one standard error of its running mean: a spec step taken where it does not pay costs several
        plain steps, so noise in tau must not switch speculation on (SmolLM2 on 2 CPU cores, 8 slots: a mean of 3.67
        from 10 blocks crossed the break-even of 3.65; that spec step's 8 blocks averaged 2.25). While tau is the
        prior, the prior."""
        return _tau_low(self.tau, self.tau_var, self.num_tau_samples)

    def probe_every(self, num_slots: int) -> int:
        """Decode steps between shadow probes: PROBE_EVERY doubled until a probe's cost, spread over the interval, is
        at most PROBE_OVERHEAD of plain decoding. The cost: the 1-slot draft step's own time, or where more, what
        served plain iterations carrying a probe take beyond those without (SmolLM2, 8 slots, 2 CPU cores: 114.5 ms
        against 94.3, the draft step's own 20.2 ms: a probe every 16 steps, 1.3 % of plain throughput)."""
        b = bucket_for(num_slots, self.slot_buckets)
        plain_n = self._served("plain", b) or self.cost_plain.get(b)
        if plain_n is None or self.cost_draft is None:
            return PROBE_EVERY
        probe_n = self._served("probe", b)
        extra = probe_n - plain_n if probe_n is not None and self._served("plain", b) else 0.0
        loss = max(self.cost_draft, extra) / plain_n
        every = PROBE_EVERY
        while every < PROBE_MAX_EVERY and loss / every > PROBE_OVERHEAD:
            every *= 2
        return every

    def num_to_speculate(self, num_slots: int) -> int:
        """How many of `num_slots` eligible slots speculate this step: all where DFlash pays, none where it does
        not (`shadow_due` then probes); one while tau is still the prior (a real block, to learn it)."""
        return self.choose(num_slots)[0]

    def choose(self, num_slots: int) -> tuple[int, int]:
        """(slots that speculate, their block): the full block where it pays, else the short one where that pays,
        else none (`num_to_speculate`). While tau is the prior: one slot's block where a 1-slot block costs at most
        FIRST_BLOCK_MAX_RATIO plain steps, else none (the engine's shadow probes then measure tau)."""
        if self.policy == "always":
            return num_slots, self.block
        if self._pays(num_slots):
            if self.num_tau_samples > 0:
                return num_slots, self.block
            first = self.spec_ratio(1)  # tau is the prior: learn it from one real block only where one is cheap
            return (1 if first is None or first <= FIRST_BLOCK_MAX_RATIO else 0), self.block
        if self.short and self.num_tau_samples > 0 and self._pays(num_slots, "short"):
            return num_slots, self.short
        return 0, self.block

    def shadow_due(self, num_slots: int, step: int) -> bool:
        """Whether this plain step of `num_slots` eligible slots should carry a shadow probe."""
        sh = self.shadow
        if sh is not None and sh.req.finish_time is None:
            return False  # one probe at a time; a finished request's open probe is dropped
        self.shadow = None
        return self.policy == "adaptive" and step % self.probe_every(num_slots) == 0

    def open_shadow(self, req, base: int) -> None:
        self.shadow = Shadow(req, base)

    def shadow_drafts(self, req, drafts: np.ndarray, seconds: float) -> None:
        """A draft step was retired: its drafts (for `req`) and its cost."""
        if self.shadow is not None and self.shadow.req is req:
            self.shadow.drafts = np.asarray(drafts).reshape(-1)
        self.cost_draft = seconds if self.cost_draft is None else (1 - EMA) * self.cost_draft + EMA * seconds

    def observe(self, req, index: int, token: int) -> None:
        """The token at `index` of `req`'s output was decoded (plainly or in a block): resolve the open shadow probe
        on that request at its first wrong draft, or once every draft was right."""
        sh = self.shadow
        if sh is None or sh.req is not req or sh.drafts is None or index < sh.base:
            return
        j = index - sh.base
        if j >= len(sh.drafts) or token != sh.drafts[j]:
            self._resolve(min(j, len(sh.drafts)))
        elif j == len(sh.drafts) - 1:
            self._resolve(len(sh.drafts))

    def _resolve(self, accepted: int) -> None:
        self.shadow = None
        self.num_shadow_probes += 1
        self._record_tau(np.array([accepted]))

    def record_step(self, accepted: np.ndarray, block: int | None = None) -> None:
        """A spec step (of `block`, default the full one) was retired: the accepted drafts of each of its slots."""
        block = block or self.block
        self.num_spec_steps += 1
        self.num_short_steps += block != self.block
        self._record_tau(accepted)
        self.num_drafts += len(accepted)
        self.num_draft_tokens += len(accepted) * (block - 1)
        self.num_accepted += int(np.sum(accepted))
        for a in accepted:
            self.accepted_per_pos[:int(a)] += 1

    def _record_tau(self, accepted: np.ndarray) -> None:
        """The optimistic prior is gone after one measurement; from then on a running mean that starts with
        TAU_PSEUDO_STEPS pseudo-steps of tau = 1 (one step's tau ranges over 1..block, and a lucky first block of 7
        made a CPU engine speculate for 19 steps at a loss), turning into an EMA after 1/TAU_EMA measurements. The
        short block's tau takes each sample cut at its own length."""
        self.tau, self.tau_var, self.num_tau_samples = _tau_update(self.tau, self.tau_var, self.num_tau_samples,
                                                                   float(np.mean(accepted + 1)))
        if self.short:
            cut = np.minimum(accepted, self.short - 1)
            self.short_est = _tau_update(*self.short_est, float(np.mean(cut + 1)))

    def measure_costs(self, engine, repeats: int = 3) -> None:
        """Time a compiled plain and spec step of every bucket (padding rows only: same shapes, same work), the way
        the engine runs them: one at a time when it reads each step before launching the next, else as a burst of
        launches read at the end (with overlap a step's cost in serving is the interval between retirements, which
        hides dispatch and the device->host read; timing synchronous steps instead charged both to the plain step
        the policy compares against, and an H200 at 8 slots kept speculating at tau 1.25, 4 % below plain)."""
        burst = repeats if engine.overlap else 1

        def best(dispatch, inputs) -> float:
            t = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.device_get([dispatch(inputs, False) for _ in range(burst)])
                t = min(t, (time.perf_counter() - t0) / burst)
            return t

        for b in self.slot_buckets:
            self.cost_plain[b] = best(engine._dispatch, engine._inputs([], b, 1))
            self.cost_spec[b] = best(engine._dispatch_spec, engine._spec_inputs([], b))
            if self.short:
                self.cost_short[b] = best(engine._dispatch_spec, engine._spec_inputs([], b, self.short))
        if self.policy == "adaptive":
            self.cost_draft = best(engine._dispatch_draft, engine._spec_inputs([], 1))

    def stats(self) -> dict:
        return {"block": self.block, "tau": round(self.tau, 3), "tau_low": round(float(self.tau_low()), 3),
                "policy": self.policy, "draft_vocab": self.draft_vocab or None,
                "draft_fp8": self.draft_fp8,
                "num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted, "accepted_per_pos": self.accepted_per_pos.tolist(),
                "num_shadow_probes": self.num_shadow_probes,
                "cost_draft_ms": None if self.cost_draft is None else round(self.cost_draft * 1e3, 2),
                "cost_plain_ms": {b: round(c * 1e3, 2) for b, c in self.cost_plain.items()},
                "cost_spec_ms": {b: round(c * 1e3, 2) for b, c in self.cost_spec.items()},
                "served_plain_ms": {b: round(c * 1e3, 2) for (k, b), c in self.served_cost.items() if k == "plain"},
                "served_spec_ms": {b: round(c * 1e3, 2) for (k, b), c in self.served_cost.items() if k == "spec"},
                "served_probe_ms": {b: round(c * 1e3, 2) for (k, b), c in self.served_cost.items() if k == "probe"},
                **({"short_block": self.short, "short_tau": round(self.short_est[0], 3),
                    "short_tau_low": round(float(_tau_low(*self.short_est)), 3),
                    "num_short_steps": self.num_short_steps,
                    "cost_short_ms": {b: round(c * 1e3, 2) for b, c in self.cost_short.items()},
                    "served_short_ms": {b: round(c * 1e3, 2) for (k, b), c in self.served_cost.items()
                                        if k == "short"},
                    "short_over_plain": {b: round(self.spec_ratio(b, "short"), 2) for b in self.slot_buckets
                                         if self.spec_ratio(b, "short") is not None}} if self.short else {}),
                "spec_over_plain": {b: round(self.spec_ratio(b), 2) for b in self.slot_buckets
                                    if self.spec_ratio(b) is not None}}


def _tau_update(tau: float, var: float, n: int, x: float) -> tuple[float, float, int]:
    """One measured block (x = accepted + 1, or a mean over a step's slots) into a running (tau, variance, samples)
    (`SpecState._record_tau`)."""
    n += 1
    if n == 1:
        tau = (x + TAU_PSEUDO_STEPS) / (1 + TAU_PSEUDO_STEPS)
        return tau, ((x - tau) ** 2 + TAU_PSEUDO_STEPS * (1 - tau) ** 2) / (1 + TAU_PSEUDO_STEPS), n
    alpha = max(TAU_EMA, 1.0 / (n + TAU_PSEUDO_STEPS))
    d = x - tau
    return tau + alpha * d, (1 - alpha) * (var + alpha * d * d), n  # the exponentially weighted variance


def _tau_low(tau: float, var: float, n: int) -> float:
    """tau less one standard error (`SpecState.tau_low`); the prior itself while nothing is measured."""
    if n == 0:
        return tau
    n_eff = min(n + TAU_PSEUDO_STEPS, (2 - TAU_EMA) / TAU_EMA)  # an EMA's effective samples
    return tau - np.sqrt(var / n_eff)
