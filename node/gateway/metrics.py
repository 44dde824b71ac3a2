"""The gateway's ``/metrics``, in Prometheus' text format (prometheus_client).

What an operator graphs: requests by route and HTTP status, errors by their
OpenAI code (mid-stream SSE errors included, which no status shows), prompt
and completion tokens by model, time to first token and time between tokens
by model, and the hosts in the offer book by model (read at scrape time).

One registry per gateway, not the library's global one, so several gateways
in one process (the tests, ``gpunexus demo``) do not share counters.
Time to first token and inter-token time are observed once per response
(the inter-token figure is its mean, first token to last): a host coalesces
tokens that were ready together, so the gateway sees no finer clock than its
frames anyway, and the relay's hot path pays one clock read per delta
rather than a histogram update.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self, hosts_by_model: Callable[[], dict[str, int]], allowances: Callable[[], dict[str, int]] = dict) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gpunexus_gateway_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=self.registry)
        self.errors = Counter("gpunexus_gateway_errors", "Errors answered (JSON or mid-stream SSE), by OpenAI error code", ["code"], registry=self.registry)
        self.tokens = Counter("gpunexus_gateway_tokens", "Tokens served, by model and kind (prompt or completion)", ["model", "kind"], registry=self.registry)
        self.ttft = Histogram("gpunexus_gateway_time_to_first_token_seconds", "From request body read to the first token relayed", ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("gpunexus_gateway_inter_token_seconds", "Mean time between tokens of a response, first to last", ["model"], buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(_HostsCollector(hosts_by_model, allowances))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def error(self, code: str | None, status: int) -> None:
        self.errors.labels(code or str(status)).inc()

    def usage(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens.labels(model, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(model, "completion").inc(completion_tokens)

    def stream_clock(self, model: str) -> StreamClock:
        return StreamClock(self.ttft.labels(model), self.inter_token.labels(model))


class StreamClock:
    """Times one response: when its first delta came, its last, and the tokens after the first delta."""

    __slots__ = ("_after_first", "_first", "_inter", "_last", "_ttft", "start")

    def __init__(self, ttft, inter) -> None:
        self._ttft, self._inter = ttft, inter
        self._first = self._last = 0.0
        self._after_first = -1
        self.start = time.perf_counter()

    def delta(self, tokens: int) -> None:
        self._last = time.perf_counter()
        if self._after_first < 0:
            self._first, self._after_first = self._last, 0
        else:
            self._after_first += tokens

    def finish(self) -> None:
        """Observe the response (nothing if no token came)."""
        if self._after_first < 0:
            return
        self._ttft.observe(self._first - self.start)
        if self._after_first:
            self._inter.observe((self._last - self._first) / self._after_first)


class _HostsCollector:
    """Read when scraped: ``gpunexus_gateway_hosts{model}`` (live offers in the book) and
    ``gpunexus_gateway_allowance_micro_usd{key}`` (what each hub allowance can still promise)."""

    def __init__(self, hosts_by_model: Callable[[], dict[str, int]], allowances: Callable[[], dict[str, int]]) -> None:
        self._hosts = hosts_by_model
        self._allowances = allowances

    def collect(self):
        family = GaugeMetricFamily("gpunexus_gateway_hosts", "Hosts with a live offer in the book, by model", labels=["model"])
        for model, count in sorted(self._hosts().items()):
            family.add_metric([model], count)
        yield family
        balances = self._allowances()
        if balances:
            allowance = GaugeMetricFamily("gpunexus_gateway_allowance_micro_usd",
                                          "What the hub allowance can still promise (budget less receipts queued and requests in flight), by API key id",
                                          labels=["key"])
            for key, micro in sorted(balances.items()):
                allowance.add_metric([key], micro)
            yield allowance


class RequestCounter:
    """ASGI middleware: counts every HTTP response by route and status (unknown paths as "other")."""

    def __init__(self, app, metrics: GatewayMetrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in self.routes else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
