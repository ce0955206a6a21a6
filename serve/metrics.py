"""Prometheus metrics on a private registry (so several apps in one process, e.g. in tests, never collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from dflash_jax.requests import Request

disable_created_metrics()  # the *_created series double the output and no dashboard reads them (vLLM does the same)

# vLLM-style "prefix:name" names, so dashboards built for vLLM need only the prefix changed.
PREFIX = "dflash:"
# Known routes only: labelling by raw path would let any client mint unbounded label values.
ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/slots",
                       "/chat/completions", "/completions", "/models"})
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                    2.5, 5.0, 10.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2, 102.4)


class Metrics:
    def __init__(self) -> None:
        self.draft_width = 0  # tokens per draft round; set once the engine (and its drafter) is loaded
        self._spec_stats: dict | None = None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.prompt_tokens_cached = Counter(PREFIX + "prompt_tokens_cached",
                                            "Prompt tokens taken from the prefix cache (not computed)", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter(PREFIX + "request_success", "Finished generations by finish reason",
                                ["finished_reason"], registry=r)
        self.queue_len = Gauge(PREFIX + "num_requests_waiting", "Requests waiting for a free slot", registry=r)
        self.busy_slots = Gauge(PREFIX + "num_requests_running", "Slots busy with a request", registry=r)
        self.num_slots = Gauge(PREFIX + "num_slots", "Configured slots", registry=r)
        self.kv_usage = Gauge(PREFIX + "kv_cache_usage_perc", "Fraction of KV-cache pages held by running "
                              "requests (cached prefix pages nobody holds count as free)", registry=r)
        self.kv_cached = Gauge(PREFIX + "prefix_cache_pages", "KV-cache pages holding a cached prompt prefix",
                               registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Gap between consecutive tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_TTFT_BUCKETS, registry=r)
        self.spec_drafts = Counter(PREFIX + "spec_decode_num_drafts", "Speculative draft rounds", registry=r)
        self.spec_draft_tokens = Counter(PREFIX + "spec_decode_num_draft_tokens", "Drafted tokens", registry=r)
        self.spec_accepted = Counter(PREFIX + "spec_decode_num_accepted_tokens", "Accepted draft tokens",
                                     registry=r)
        r.register(_PerPosition(self))

    def observe_finished(self, req: Request, finish_reason: str) -> None:
        self.finished.labels(finished_reason=finish_reason).inc()
        self.generation_tokens.inc(req.num_generated)
        self.prompt_tokens_cached.inc(req.num_cached_prompt)
        if req.first_token_time is not None:
            self.ttft.observe(max(req.first_token_time - req.created, 0.0))
        if req.finish_time is not None:
            self.e2e.observe(max(req.finish_time - req.created, 0.0))
        if self.draft_width:  # every draft round proposes draft_width tokens for the request
            self.spec_drafts.inc(req.draft_n // self.draft_width)
        self.spec_draft_tokens.inc(req.draft_n)
        self.spec_accepted.inc(req.draft_n_accepted)

    def render(self, stats: dict | None) -> tuple[bytes, str]:
        if stats:  # gauges are sampled at scrape time instead of being updated on every engine step
            self.queue_len.set(stats.get("queue_len", 0))
            self.busy_slots.set(stats.get("busy_slots", 0))
            self.num_slots.set(stats.get("num_slots", 0))
            if stats.get("num_pages"):
                self.kv_usage.set(1 - stats["num_pages_free"] / stats["num_pages"])
            self.kv_cached.set(stats.get("num_pages_cached", 0))
            self._spec_stats = stats.get("speculative")
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _PerPosition(Collector):
    """vLLM's accepted_tokens_per_pos: how often the draft at position k was accepted. Only the engine sees
    positions, so this is copied from its stats at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        family = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                     "Accepted draft tokens by position in the draft", labels=["position"])
        for pos, n in enumerate((self.metrics._spec_stats or {}).get("accepted_per_pos", [])):
            family.add_metric([str(pos)], n)
        yield family


class CountRequests:
    """ASGI middleware counting responses by endpoint and status, whichever route or error handler produced them."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint=endpoint, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
