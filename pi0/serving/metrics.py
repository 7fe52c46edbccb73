"""Prometheus metrics of a policy server (prometheus_client), one registry per server: `GET /metrics`."""

from __future__ import annotations

from typing import Any

STAGES = ("queue", "preprocess", "vision", "prefix", "denoise", "postprocess")
OUTCOMES = ("ok", "bad_request", "internal_error", "dropped")
REFUSALS = ("limit", "budget", "errors")  # connections refused at the limit or the budget, or closed after bad requests
# seconds: from a tiny model's milliseconds to a full-size CPU forward
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """requests_total{outcome}, stage_seconds{stage} histograms, batch_rows histogram, connections,
    inflight_bytes, connections_refused_total{reason}, held_back_seconds_total, the process's memory
    (prometheus_client's process collector) and GPU memory."""

    def __init__(self, replica: str | None = None):
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            ProcessCollector,
        )

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, open fds
        labels = {"replica": replica} if replica else {}
        names = ["replica"] if replica else []
        self._labels = labels
        self.requests = Counter("pi0_requests", "Requests (rows) answered, by outcome", ["outcome", *names],
                                registry=self.registry)
        self.stage_seconds = Histogram("pi0_stage_seconds", "Seconds per request in each stage", ["stage", *names],
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("pi0_batch_rows", "Rows per model forward", names, registry=self.registry,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self.connections = Gauge("pi0_connections", "Open websocket connections", names, registry=self.registry)
        self.inflight_bytes = Gauge("pi0_inflight_bytes", "Bytes of the in-flight budget reserved by open connections", names,
                                    registry=self.registry)
        self.refusals = Counter("pi0_connections_refused", "Connections refused at --max-connections (limit) or the "
                                "in-flight budget (budget), or closed after --max-errors bad requests in a row (errors)",
                                ["reason", *names], registry=self.registry)
        self.held = Counter("pi0_held_back_seconds", "Seconds connections were held back after bad requests in a row",
                            names, registry=self.registry)
        gpu = Gauge("pi0_gpu_memory_bytes", "GPU memory allocated by torch (0 without a GPU)", names,
                    registry=self.registry)
        gpu_labelled = gpu.labels(**labels) if labels else gpu
        gpu_labelled.set_function(_gpu_bytes)
        for outcome in OUTCOMES:  # every series exists from the start, at 0
            self._l(self.requests, outcome=outcome)
        for stage in STAGES:
            self._l(self.stage_seconds, stage=stage)
        for reason in REFUSALS:
            self._l(self.refusals, reason=reason)

    def _l(self, metric: Any, **labels: str) -> Any:
        labels = {**labels, **self._labels}
        return metric.labels(**labels) if labels else metric

    def count(self, outcome: str, n: int = 1) -> None:
        self._l(self.requests, outcome=outcome).inc(n)

    def observe(self, stage: str, seconds: float) -> None:
        self._l(self.stage_seconds, stage=stage).observe(max(0.0, seconds))

    def refused(self, reason: str) -> None:
        self._l(self.refusals, reason=reason).inc()

    def held_back(self, seconds: float) -> None:
        self._l(self.held).inc(seconds)

    def batch(self, rows: int) -> None:
        self._l(self.batch_rows).observe(rows)

    def set_connections(self, n: int) -> None:
        self._l(self.connections).set(n)

    def set_inflight(self, n: int) -> None:
        self._l(self.inflight_bytes).set(n)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _gpu_bytes() -> float:
    import torch

    return float(torch.cuda.memory_allocated()) if torch.cuda.is_available() and torch.cuda.is_initialized() else 0.0
