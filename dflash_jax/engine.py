"""The serving engine: owns the device state (weights, paged KV cache, penalty counts) and runs the step loop.

One iteration: admit queued requests -> plan -> launch one prefill step (a chunk for every slot still reading its
prompt) and one decode step (one token for every generating slot, or a DFlash block), each padded to a bucket ->
retire the previous iteration's launches (fetch sampled tokens -> events). Launching before retiring keeps the device
busy while the host does its bookkeeping; decode rows read their input token and cache length from the device.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from converters.checkpoint import LoadedModel
from dflash_jax.buckets import bucket_for, power_of_two_buckets
from dflash_jax.kv_cache import TRASH_PAGE, AttentionMeta
from dflash_jax.config import HybridConfig
from dflash_jax.models.drafter import FP8_CHOICES
from dflash_jax.page_allocator import PageAllocator, PrefixStates
from dflash_jax.requests import Request
from dflash_jax.sampling import SamplingArrays, needs_full
from dflash_jax.scheduler import Scheduler, Slot
from dflash_jax.spec_state import LoadedDrafter, SpecState
from dflash_jax.state_pool import copy_state_row, make_cache
from dflash_jax.step_fns import CompiledSteps, SlotRows, SpecInputs, StepInputs
from pallas_kernels import lowering_cache
from pallas_kernels.invariance import env_setting
from pallas_kernels.q8_0_matmul_mgpu import engine_prescale


@dataclass(frozen=True)
class EngineConfig:
    num_slots: int = 8
    ctx_size: int = 8192  # KV tokens shared by all slots (llama-server -c with --kv-unified)
    ctx_per_slot: int | None = None  # cap per request; default ctx_size // num_slots... at least 256
    page_size: int = 16
    prefill_chunk: int = 256  # -ub: tokens of one slot's prompt per prefill step
    # Prefill token buckets, ascending, ending at prefill_chunk; None: factor-4 steps up to it. Fewer buckets, fewer
    # compiles (a 27B warm-up takes ~16 s per bucket on an H200 host) at the cost of padding short chunks.
    chunk_sizes: tuple[int, ...] | None = None
    dtype: str = "float32"
    compile_cache_dir: str | None = None
    draft_max: int = 15  # drafts per block (block = draft_max + 1, at most the drafter's trained block size)
    # --draft-short: drafts per block where the full block does not pay (adaptive policy; 0: off). Its spec buckets
    # compile beside the full block's. Off by default: on the dev CPU (SmolLM2, 8 slots) it turned code prompts'
    # 0.90x of plain into 1.05x, but on chat prompts its decision rode on noisy served costs (0.70x once, 0.965x in a
    # repeat; BENCHMARKS.md, session 17).
    draft_short: int = 0
    ctx_size_draft: int | None = None  # -cd: how many recent context features the drafter attends to
    # --draft-vocab: draft from the first N token ids only (0: the whole vocabulary); the drafter then reads N rows
    # of the LM head per step instead of all (models.drafter.for_serving). Output is unchanged; acceptance may drop.
    draft_vocab: int = 0
    # --draft-fp8: the drafter's products in fp8 e4m3 with a scale per row (models.fp8): "head" its LM head (a copy
    # of the draft vocabulary's or the whole head's rows), "all" every drafter product too; "off" as loaded; "auto"
    # the head on GPUs with fp8 tensor cores in bf16/f16, else off (models.drafter.resolve_fp8). Output is unchanged
    # (the target verifies); acceptance may drop a little. H200 numbers: BENCHMARKS.md.
    draft_fp8: str = "auto"
    spec_policy: str = "adaptive"  # adaptive | always | never (with a drafter)
    # Launch step k+1 before reading step k's output, so host work hides behind the device's. None = on a GPU only:
    # on a CPU the host and the "device" share the cores, and overlapping lost 10 % at 8 slots (BENCHMARKS.md).
    overlap: bool | None = None
    # Every row's arithmetic independent of how many rows share a step (pallas_kernels.invariance), so DFlash's
    # verify rows and plain decoding's single rows, and a request alone or among others, give the same bits.
    # None = $DFLASH_BATCH_INVARIANT if set, else on for a GPU in bf16/f16 (f32 products differ far below a near
    # tie; on a CPU the kernels would be interpreted).
    batch_invariant: bool | None = None
    # Q8_0 decode and verify rows in the invariant mode: pre-scaled (bf16 weights' numerics, fast from 64 rows) or
    # exact (fast below). None: `engine_prescale(num_slots x (draft_max + 1))`, with or without a drafter, so a
    # DFlash server and a plain one with the same flags give the same bits. $DFLASH_Q8_PRESCALE overrides.
    q8_prescale: bool | None = None
    compile_workers: int | None = None  # threads compiling step buckets at warm-up (None: min(8, CPUs))
    # Reuse the KV (and drafter context) pages of earlier prompts' full pages (page_allocator). Hybrid targets also
    # need the recurrent state after the prefix: `prefix_states` rows of the state pool keep it where prefill chunks
    # end on a page boundary (None: one per slot; 0: no prefix caching for hybrids).
    prefix_cache: bool = True
    prefix_states: int | None = None
    # Also key a finished request's full pages past its prompt (its reply), so a chat's next turn computes only its
    # new tokens. Decode or verify steps wrote them, not the prefill that would compute them again, so a cached turn
    # differs in the last bits from an uncached one: None = on unless batch_invariant is (its promise is those bits).
    cache_generated: bool | None = None

    def __post_init__(self):
        if self.num_slots < 1:
            raise ValueError(f"EngineConfig.num_slots must be >= 1, got {self.num_slots}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"EngineConfig.page_size must be a power of two, got {self.page_size}")
        if self.prefill_chunk < 1:
            raise ValueError(f"EngineConfig.prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.chunk_sizes is not None and (
                not self.chunk_sizes or list(self.chunk_sizes) != sorted(set(self.chunk_sizes))
                or self.chunk_sizes[0] < 1 or self.chunk_sizes[-1] != self.prefill_chunk):
            raise ValueError(f"EngineConfig.chunk_sizes must ascend from >= 1 to prefill_chunk "
                             f"{self.prefill_chunk}, got {self.chunk_sizes}")
        if self.prefix_states is not None and self.prefix_states < 0:
            raise ValueError(f"EngineConfig.prefix_states must be >= 0, got {self.prefix_states}")
        if self.draft_max < 1:
            raise ValueError(f"EngineConfig.draft_max must be >= 1, got {self.draft_max}")
        if self.draft_vocab < 0:
            raise ValueError(f"EngineConfig.draft_vocab must be >= 0, got {self.draft_vocab}")
        if self.draft_fp8 not in FP8_CHOICES:
            raise ValueError(f"EngineConfig.draft_fp8 must be one of {', '.join(FP8_CHOICES)}, got {self.draft_fp8!r}")
        if self.draft_short < 0:
            raise ValueError(f"EngineConfig.draft_short must be >= 0, got {self.draft_short}")
        if self.spec_policy not in ("adaptive", "always", "never"):
            raise ValueError(f"EngineConfig.spec_policy must be adaptive, always or never, got {self.spec_policy!r}")
        if self.per_slot > self.ctx_size:
            raise ValueError(f"EngineConfig.ctx_per_slot {self.per_slot} exceeds ctx_size {self.ctx_size}")

    @property
    def per_slot(self) -> int:
        if self.ctx_per_slot is not None:
            return self.ctx_per_slot
        return max(self.ctx_size // self.num_slots, min(self.ctx_size, 256))

    @property
    def slot_buckets(self) -> tuple[int, ...]:
        return power_of_two_buckets(self.num_slots)

    @property
    def chunk_buckets(self) -> tuple[int, ...]:
        if self.chunk_sizes is not None:
            return tuple(self.chunk_sizes)
        # Factor-4 steps: few compiles, at most 4x padding of a short chunk.
        sizes, s = [], min(16, self.prefill_chunk)
        while s < self.prefill_chunk:
            sizes.append(s)
            s *= 4
        return tuple(sizes + [self.prefill_chunk])


def enable_compile_cache(directory: str | None) -> str:
    """JAX's persistent compilation cache in `directory` (default ~/.cache/dflash-jax/xla); returns it."""
    directory = directory or os.path.join(os.path.expanduser("~"), ".cache", "dflash-jax", "xla")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return directory


@dataclass
class _Launch:
    kind: str  # prefill | decode | spec | draft (a shadow probe's drafts)
    rows: list  # (slot, its request at launch, whether this row yields tokens) per live row, in batch order
    out: tuple  # device outputs, fetched at retirement
    t_launch: float
    block: int = 1  # tokens per row (a spec step's block)


class Engine:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig, drafter: LoadedDrafter | None = None):
        self.cfg = cfg
        self.model_cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        self.cache_dir = enable_compile_cache(cfg.compile_cache_dir)
        self.graphdef, self.state = nnx.split(loaded.model)
        mc = loaded.config
        self.pages_per_slot = -(-cfg.per_slot // cfg.page_size)
        num_pages = 1 + -(-cfg.ctx_size // cfg.page_size)
        # Hybrid targets also get one recurrent-state row per slot, plus the row padding writes into.
        hybrid = isinstance(mc, HybridConfig)
        n_states = 0  # state rows kept after cached prefixes (hybrid targets)
        if hybrid and cfg.prefix_cache:
            n_states = cfg.num_slots if cfg.prefix_states is None else cfg.prefix_states
        self.cache = make_cache(mc, num_pages, cfg.page_size, cfg.num_slots + 1 + n_states, jnp.dtype(cfg.dtype))
        self.rows = SlotRows.create(cfg.num_slots + 1, mc.vocab_size)
        if drafter is not None and cfg.draft_vocab > mc.vocab_size:
            raise ValueError(f"--draft-vocab {cfg.draft_vocab} exceeds the target's vocabulary of {mc.vocab_size}")
        self.spec = (SpecState(drafter, cfg, num_pages, jnp.dtype(cfg.dtype), loaded.model) if drafter is not None
                     else None)
        sp = self.spec
        auto = jax.default_backend() == "gpu" and jnp.dtype(cfg.dtype) != jnp.float32
        self.batch_invariant = next(v for v in (cfg.batch_invariant, env_setting(), auto) if v is not None)
        self.q8_prescale = cfg.q8_prescale if cfg.q8_prescale is not None else engine_prescale(
            cfg.num_slots * (cfg.draft_max + 1))
        self.steps = CompiledSteps(self.graphdef, self.state, sp and sp.graphdef, sp and sp.state,
                                   sp.taps if sp else (), sp.mask_token_id if sp else 0, sp and sp.ctx_window,
                                   invariant=self.batch_invariant, q8_prescale=self.q8_prescale)
        self.prefix_cache = cfg.prefix_cache and (not hybrid or n_states > 0)
        prefix_states = PrefixStates(range(cfg.num_slots + 1, cfg.num_slots + 1 + n_states)) if n_states else None
        self.scheduler = Scheduler(cfg.num_slots, PageAllocator(num_pages), cfg.page_size, cfg.per_slot,
                                   cfg.prefill_chunk, loaded.tokenizer, self.prefix_cache,
                                   cache_generated=(cfg.cache_generated if cfg.cache_generated is not None
                                                    else not self.batch_invariant), prefix_states=prefix_states)
        self.max_prompt_len = cfg.per_slot - 1
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._draining = False
        self._wake = threading.Event()
        self.overlap = cfg.overlap if cfg.overlap is not None else jax.default_backend() == "gpu"
        self._dispatchers = {"plain": self._dispatch, "spec": self._dispatch_spec, "draft": self._dispatch_draft}
        self._inflight: list[_Launch] = []  # launched, not yet retired (at most one iteration's worth)
        self._last_retire = 0.0
        self._iter_end: float | None = None  # when the last busy iteration ended (None after idling)
        # Where the engine thread's time goes: dispatching steps, blocked on their outputs, turning them into events.
        self.host_seconds = {"launch": 0.0, "fetch_wait": 0.0, "commit": 0.0}
        self.num_steps = 0
        self.num_probes = 0  # shadow probes launched: the next probe's slot (see step)
        self.warmup_seconds: dict[str, float] = {}
        self.error: str | None = None  # set when the step loop died; the server's /health reports it

    # --- public ----------------------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if self._draining:
            raise RuntimeError("the engine is shutting down")
        self.scheduler.submit(req)
        self._wake.set()

    def stats(self) -> dict:
        stats = self.scheduler.stats()
        stats["host_seconds"] = {k: round(v, 3) for k, v in self.host_seconds.items()}
        stats["batch_invariant"] = self.batch_invariant
        stats["q8_prescale"] = self.q8_prescale
        if self.spec:
            stats["speculative"] = self.spec.stats()
        return stats

    def warmup(self, progress: bool = True) -> None:
        """Compile every (slots, tokens) bucket and run it once, so serving never compiles. Buckets are lowered one
        by one (tracing is Python) and each is compiled ahead of time in compile_workers threads as soon as it is
        lowered (XLA compiles without the GIL: on an H100 one bucket of SmolLM2 with its Pallas kernels took ~10 s,
        so an 8-slot DFlash engine's 24 buckets took 4 minutes in a row); the steps then call those executables.
        warmup_seconds: 'lower' (compiles running beside it), 'compile' (the wait for the rest), 'first_run'.
        Mosaic GPU kernels that several buckets hold are lowered once (`lowering_cache`), and kept beside the
        compilation cache so that a restart lowers none of them."""
        lowering_cache.install(os.path.join(self.cache_dir, "mosaic"))
        # Prefill chunks always sample fully; decode and spec steps have a greedy and a full variant each. The
        # longest compiles are lowered first (spec, then prefill, then decode; larger first), so that they run beside
        # the other buckets' lowering instead of after it.
        slots = sorted(self.cfg.slot_buckets, reverse=True)
        sp = self.spec
        buckets = [("spec", self._spec_inputs([], b, blk), full) for blk in (sp.blocks if sp else ()) for b in slots
                   for full in (False, True)]
        buckets += [("plain", self._inputs([], b, t), True) for t in sorted(self.cfg.chunk_buckets, reverse=True)
                    for b in slots]
        buckets += [("plain", self._inputs([], b, 1), full) for b in slots for full in (False, True)]
        if sp and sp.policy == "adaptive":
            buckets.append(("draft", self._spec_inputs([], 1), False))  # the shadow probe
        workers = self.cfg.compile_workers or min(8, os.cpu_count() or 1)
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            # Each bucket compiles while the next ones lower (27B, H200: 171 s of lowering, then 141 s of compiling)
            jobs = {pool.submit(self.steps.lower(kind, self.cache, sp and sp.cache, self.rows, inputs, full)
                                .compile): i
                    for i, (kind, inputs, full) in enumerate(tqdm(buckets, desc="lowering step buckets",
                                                                      disable=not progress, unit="bucket"))}
            t1 = time.perf_counter()
            for job in tqdm(concurrent.futures.as_completed(jobs), total=len(jobs), disable=not progress,
                            desc=f"compiling step buckets ({workers} threads)", unit="bucket"):
                kind, inputs, full = buckets[jobs[job]]
                self.steps.add_compiled(kind, inputs, full, job.result())
        t2 = time.perf_counter()
        for kind, inputs, full in buckets:
            jax.device_get(self._dispatchers[kind](inputs, full))
        if self.scheduler.prefix_states is not None:  # the padding row onto itself: compiled, nothing changed
            self._copy_state(self.cfg.num_slots, self.cfg.num_slots)
        self.warmup_seconds = {"lower": round(t1 - t0, 1), "compile": round(t2 - t1, 1),
                               "first_run": round(time.perf_counter() - t2, 1)}
        if self.spec:
            self.spec.measure_costs(self)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dflash-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        self._draining = True
        if not drain:
            for slot in self.scheduler.slots:
                if slot.req is not None:
                    slot.req.cancel()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._busy() and (deadline is None or time.monotonic() < deadline):
            self._wake.set()
            time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    # --- loop ------------------------------------------------------------------------------------------------
    def _busy(self) -> bool:
        s = self.scheduler
        return bool(s.queue) or bool(self._inflight) or any(slot.req is not None for slot in s.slots)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._busy():
                self._iter_end = None
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - the donated device state is gone: fail every request loudly
                self.error = f"{type(e).__name__}: {e}"
                self._draining = True
                self.scheduler.fail_all(self.error)
                raise

    def step(self) -> None:
        """One iteration: launch this iteration's steps, then retire the previous iteration's (their outputs are
        ready or nearly so; the device is busy with the new launches meanwhile). Without overlap (or while a test
        injects drafts computed from the host's view) each launch is retired at once."""
        s = self.scheduler
        s.admit()
        for slot in s.slots:  # before any launch: a row claimed for a new prefix state later is read first
            if slot.restore_row is not None:
                self._copy_state(slot.restore_row, slot.id)
                slot.restore_row = None
        plan = s.plan()
        launched = []
        if plan.prefill:
            launched.append(self._launch_prefill(plan.prefill))
        if plan.decode:
            eligible = [sl for sl in plan.decode if self.spec and self.spec.eligible(sl)]
            k, block = self.spec.choose(len(eligible)) if eligible else (0, 1)
            # a partial speculation (k < eligible) rotates over the slots step by step
            start = self.num_steps % len(eligible) if eligible else 0
            speculating = eligible if k == len(eligible) else (eligible[start:] + eligible[:start])[:k]
            plain = [sl for sl in plan.decode if sl not in speculating]
            if speculating:
                launched.append(self._launch_spec(speculating, block))
            elif eligible and self.spec.shadow_due(len(eligible), self.num_steps):
                # the probe's drafts guess the tokens after the slot's newest one, which the launches in flight
                # (plain: one token each) have yet to report; a slot with a block in flight is skipped. Probes take
                # the slots in turn by their own count: every PROBE_EVERY (a power of two) steps, a rotation by the
                # step number sampled one slot of 8 only (one request's tau, 5.1 where the 8 requests' mean was 2.6)
                turn = self.num_probes % len(eligible)
                probe = next((sl for sl in eligible[turn:] + eligible[:turn] if sl.inflight <= 1), None)
                if probe is not None:
                    self.num_probes += 1
                    launched.append(self._launch_draft(probe))
            if plain:
                launched.append(self._launch_decode(plain))
        overlap = self.overlap and not (self.spec and self.spec.injector)
        for launch in self._inflight + ([] if overlap else launched):
            self._retire(launch)
        self._inflight = launched if overlap else []
        self.num_steps += 1
        self._record_iteration(launched)

    def _record_iteration(self, launched: list) -> None:
        """An iteration's wall time is what a decode or spec step costs in serving: host work (launch, commit)
        included, which the device's own time leaves out when the host is the bottleneck (SmolLM2 on an H200).
        Only iterations of one step kind count (with overlap, steady runs of them), and plain steps that carry a
        shadow probe (what a probe really costs: on a CPU the two steps share the cores)."""
        now = time.perf_counter()
        kinds = tuple(launch.kind for launch in launched)
        if self.spec and self._iter_end is not None and kinds in (("decode",), ("spec",), ("draft", "decode")):
            kind = {"decode": "plain", "draft": "probe"}.get(kinds[0]) or self.spec.spec_kind(launched[0].block)
            self.spec.record_iteration(kind, len(launched[-1].rows), now - self._iter_end)
        self._iter_end = now

    def _launch_prefill(self, chunks: list[tuple[Slot, int]]) -> _Launch:
        b = bucket_for(len(chunks), self.cfg.slot_buckets)
        t = bucket_for(max(n for _, n in chunks), self.cfg.chunk_buckets)
        rows, final = [], []
        for slot, n in chunks:
            start = slot.num_cached
            rows.append((slot, slot.req.prompt_ids[start:start + n], start + n, start == slot.req.num_cached_prompt))
            slot.num_cached += n  # prefill is deterministic: the host advances at launch
            self.scheduler.key_written_pages(slot)
            final.append(slot.num_cached == len(slot.req.prompt_ids))
            slot.inflight += final[-1]
        launch = self._launch("prefill", [c[0] for c in chunks], final, self._inputs(rows, b, t), full=True)
        states, ps = self.scheduler.prefix_states, self.cfg.page_size
        if states is not None:  # keep the state after a chunk that ends on a page
            for slot, _ in chunks:
                pages, keys = slot.num_cached // ps, slot.req.prefix_keys
                row = states.claim(keys[pages - 1]) if slot.num_cached % ps == 0 and 0 < pages <= len(keys) else None
                if row is not None:
                    self._copy_state(slot.id, row)
        return launch

    def _copy_state(self, src: int, dst: int) -> None:
        self.cache = copy_state_row(self.cache, np.int32(src), np.int32(dst))

    def _launch_decode(self, slots: list[Slot]) -> _Launch:
        b = bucket_for(len(slots), self.cfg.slot_buckets)
        for slot in slots:
            slot.inflight += 1
        # the token and kv length come from the device rows (chained); the host's values here are placeholders
        rows = [(slot, [0], 0, False) for slot in slots]
        return self._launch("decode", slots, [True] * len(slots), self._inputs(rows, b, 1, chained=True),
                            needs_full([sl.req.params for sl in slots]))

    def _launch_spec(self, slots: list[Slot], block: int) -> _Launch:
        b = bucket_for(len(slots), self.cfg.slot_buckets)
        for slot in slots:
            slot.inflight += block
        return self._launch("spec", slots, [True] * len(slots), self._spec_inputs(slots, b, block),
                            needs_full([sl.req.params for sl in slots]), block)

    def _launch_draft(self, slot: Slot) -> _Launch:
        self.spec.open_shadow(slot.req, slot.req.num_generated + slot.inflight)
        return self._launch("draft", [slot], [False], self._spec_inputs([slot], 1), False)

    def _launch(self, kind: str, slots: list[Slot], emits: list[bool], inputs, full: bool, block: int = 1) -> _Launch:
        t0 = time.perf_counter()
        out = self._dispatchers["plain" if kind in ("prefill", "decode") else kind](inputs, full)
        self.host_seconds["launch"] += time.perf_counter() - t0
        return _Launch(kind, [(sl, sl.req, e) for sl, e in zip(slots, emits)], out, t0, block)

    def _retire(self, launch: _Launch) -> None:
        """Fetch a launch's outputs and turn them into events. Rows whose request finished (stop string, EOS,
        cancel) after the launch are dropped: their tokens were computed for nothing, into pages the device
        overwrites before anyone reads them, since later launches run after this one."""
        t0 = time.perf_counter()
        host = jax.device_get(launch.out)
        now = time.perf_counter()
        self.host_seconds["fetch_wait"] += now - t0
        seconds = now - max(launch.t_launch, self._last_retire)
        self._last_retire = now
        n = len(launch.rows)
        if launch.kind == "spec":
            self.spec.record_step(host[1][:n], launch.block)
        elif launch.kind == "draft":
            self.spec.shadow_drafts(launch.rows[0][1], host, seconds)
        done = time.monotonic()
        for i, (slot, req, emits) in enumerate(launch.rows):
            if slot.req is not req or not emits:
                continue
            if launch.kind == "spec":
                slot.inflight -= launch.block
                self._commit_spec(slot, host, i, launch.block)
                continue
            slot.inflight -= 1
            if launch.kind == "prefill":
                req.prompt_done_time = done
            else:
                slot.num_cached += 1
            self._commit(slot, host, i)
        self.host_seconds["commit"] += time.perf_counter() - now

    def _commit_spec(self, slot: Slot, host, i: int, block: int) -> None:
        tokens, accepted, logprobs, top_ids, top_lps = host
        n = int(accepted[i])
        req = slot.req
        req.draft_n += block - 1
        req.draft_n_accepted += n
        slot.num_cached += n + 1  # the last token and the accepted drafts are now in the cache
        for k in range(n + 1):
            self.spec.observe(req, req.num_generated, int(tokens[i, k]))
            self.scheduler.on_token(slot, int(tokens[i, k]), float(logprobs[i, k]),
                                    list(zip(top_ids[i, k].tolist(), top_lps[i, k].tolist())))
            if slot.req is None:  # stop / EOS / max_tokens inside the accepted run: cut exactly there
                break

    def _commit(self, slot: Slot, host, i: int) -> None:
        tokens, logprobs, top_ids, top_lps = host
        top = list(zip(top_ids[i].tolist(), top_lps[i].tolist()))
        if self.spec:
            self.spec.observe(slot.req, slot.req.num_generated, int(tokens[i]))
        self.scheduler.on_token(slot, int(tokens[i]), float(logprobs[i]), top)

    def _inputs(self, rows: list, b: int, t: int, chained: bool = False) -> StepInputs:
        """rows: (slot, tokens to feed, kv length after, is first chunk), padded to b rows of t tokens."""
        tokens = np.zeros((b, t), np.int32)
        q_lens = np.zeros((b,), np.int32)
        kv_lens = np.zeros((b,), np.int32)
        page_table = np.full((b, self.pages_per_slot), TRASH_PAGE, np.int32)
        slot_ids = np.full((b,), self.cfg.num_slots, np.int32)
        is_first = np.zeros((b,), bool)
        chain = np.zeros((b,), bool)
        for i, (slot, toks, kv_len, first) in enumerate(rows):
            tokens[i, :len(toks)] = toks
            q_lens[i], kv_lens[i], slot_ids[i], is_first[i], chain[i] = len(toks), kv_len, slot.id, first, chained
            page_table[i, :len(slot.pages)] = slot.pages
        sampling = SamplingArrays.from_params([s.req.params for s, *_ in rows], b, [s.seed for s, *_ in rows])
        meta = AttentionMeta(q_lens=q_lens, kv_lens=kv_lens, page_table=page_table, slot_ids=slot_ids)
        return StepInputs(tokens, meta, slot_ids, is_first, sampling, chain)

    def _spec_inputs(self, slots: list[Slot], b: int, block: int | None = None) -> SpecInputs:
        t = block or self.spec.block
        last = np.zeros((b,), np.int32)
        q_lens = np.zeros((b,), np.int32)
        kv_lens = np.zeros((b,), np.int32)
        page_table = np.full((b, self.pages_per_slot), TRASH_PAGE, np.int32)
        injected = np.zeros((b, t - 1), np.int32)
        use_injected = np.zeros((b,), bool)
        slot_ids = np.full((b,), self.cfg.num_slots, np.int32)
        chained = np.zeros((b,), bool)
        for i, slot in enumerate(slots):
            q_lens[i], slot_ids[i], chained[i] = t, slot.id, True  # last token and cached length: on the device
            page_table[i, :len(slot.pages)] = slot.pages
            forced = self.spec.injector(slot) if self.spec.injector else None
            if forced is not None:
                injected[i], use_injected[i] = forced[:t - 1], True
        sampling = SamplingArrays.from_params([s.req.params for s in slots], b, [s.seed for s in slots])
        return SpecInputs(last, AttentionMeta(q_lens, kv_lens, page_table, slot_ids), sampling, injected,
                          use_injected, chained)

    def _dispatch(self, inputs: StepInputs, full: bool):
        sp = self.spec
        self.cache, dcache, self.rows, out = self.steps.model_step(self.cache, sp and sp.cache, self.rows, inputs,
                                                                   full)
        if sp:
            sp.cache = dcache
        return out.tokens, out.logprobs, out.top_ids, out.top_logprobs

    def _dispatch_draft(self, inputs: SpecInputs, full: bool = False):
        """full: unused (drafts are argmax), kept so that every dispatcher takes the same arguments."""
        return self.steps.draft_step(self.cache, self.spec.cache, self.rows, inputs)

    def _dispatch_spec(self, inputs: SpecInputs, full: bool):
        sp = self.spec
        self.cache, sp.cache, self.rows, out = self.steps.spec_step(self.cache, sp.cache, self.rows, inputs, full)
        return out.tokens, out.accepted, out.logprobs, out.top_ids, out.top_logprobs
