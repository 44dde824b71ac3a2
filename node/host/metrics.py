"""The host's ``/metrics`` (Prometheus text, prometheus_client) and ``/health``, on ``node serve --metrics-port``.

What a GPU owner graphs: per model, requests served, failed and refused,
completion tokens and micro-USD billed, requests in flight and queued
against the slots, whether it is taking orders, its asking price and
measured speed; and, for a host that verifies, the jobs it answered and the
fees it earned. Everything is read from the host's own counters at scrape
time (one collector, no second set of counters on the request path).

Not the control endpoint: that one changes the host (enable, disable) and
sits behind a token in a 0600 file; this one only reads, so a scraper needs
no secret. It binds to loopback unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = CONTENT_TYPE_LATEST


class HostMetrics:
    """A registry whose one collector turns ``status()`` (``HostService.status`` plus extras) into samples."""

    def __init__(self, status: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StatusCollector(status))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatusCollector:
    def __init__(self, status: Callable[[], dict]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        models = status["models"]
        requests = CounterMetricFamily("gpunexus_host_requests", "Orders by model and outcome (served, failed, refused)", labels=["model", "outcome"])
        tokens = CounterMetricFamily("gpunexus_host_tokens", "Completion tokens served, by model", labels=["model"])
        billed = CounterMetricFamily("gpunexus_host_billed_micro_usd", "Micro-USD billed in signed receipts, by model", labels=["model"])
        in_flight = GaugeMetricFamily("gpunexus_host_in_flight", "Orders being served or queued, by model", labels=["model"])
        queued = GaugeMetricFamily("gpunexus_host_queued", "Orders waiting for a slot, by model", labels=["model"])
        slots = GaugeMetricFamily("gpunexus_host_slots", "Orders served at once, by model", labels=["model"])
        enabled = GaugeMetricFamily("gpunexus_host_enabled", "1 while the model takes orders (host and model enabled)", labels=["model"])
        price = GaugeMetricFamily("gpunexus_host_price_micro_usd_per_mtok", "Asking price per million tokens, by model", labels=["model"])
        speed = GaugeMetricFamily("gpunexus_host_tokens_per_second", "Tokens/s announced in the offer (measured at start-up)", labels=["model"])
        for m in models:
            name = m["model"]
            for outcome in ("served", "failed", "refused"):
                requests.add_metric([name, outcome], m[outcome])
            tokens.add_metric([name], m["tokens_out"])
            billed.add_metric([name], m["billed_micro"])
            in_flight.add_metric([name], m["in_flight"])
            queued.add_metric([name], m["queued"])
            slots.add_metric([name], m["max_slots"])
            enabled.add_metric([name], 1 if m["enabled"] else 0)
            price.add_metric([name], m["price_micro_per_mtok"])
            speed.add_metric([name], m["tokens_per_s"])
        yield from (requests, tokens, billed, in_flight, queued, slots, enabled, price, speed)
        yield GaugeMetricFamily("gpunexus_host_uptime_seconds", "Seconds since the host started", value=status["uptime_s"])
        verifier = status.get("verifier")
        if verifier is not None:
            jobs = CounterMetricFamily("gpunexus_host_verifier_jobs", "Verification jobs answered, by the hub's judgement", labels=["verdict"])
            for verdict in ("passed", "failed", "refused"):
                jobs.add_metric([verdict], verifier[verdict])
            yield jobs
            yield CounterMetricFamily("gpunexus_host_verifier_fees_micro_usd", "Verifier fees the hub paid this host", value=verifier["fees_micro"])
