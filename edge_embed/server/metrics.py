"""Prometheus metrics of one server, in a registry of its own (tests run several servers)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        self.requests = Counter("edge_embed_requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self.refusals = Counter("edge_embed_refusals", "requests refused for load, by the limit that refused them "
                                "(queue, memory, memory_budget, concurrency, deadline, bodies)", ["cause"],
                                registry=r)
        self.batch_real_tokens = Counter("edge_embed_batch_real_tokens", "tokens of texts run by the model",
                                         registry=r)
        self.batch_padded_tokens = Counter("edge_embed_batch_padded_tokens",
                                           "token slots the model computed (texts x batch width)", registry=r)
        self.batch_size = Histogram("edge_embed_batch_size", "texts per model batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_tokens = Histogram("edge_embed_batch_tokens", "padded tokens per model batch", registry=r,
                                      buckets=(16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384))
        self.queue_seconds = Histogram("edge_embed_queue_seconds", "time from arrival to batch start",
                                       registry=r, buckets=_LATENCY_BUCKETS)
        self.inference_seconds = Histogram("edge_embed_inference_seconds", "model time per batch",
                                           registry=r, buckets=_LATENCY_BUCKETS)
        self.total_seconds = Histogram("edge_embed_request_seconds", "Embed time inside the server",
                                       registry=r, buckets=_LATENCY_BUCKETS)
        self.model_load_seconds = Gauge("edge_embed_model_load_seconds", "time to load the model", registry=r)
        self.serving = Gauge("edge_embed_serving", "1 when health is SERVING", registry=r)
        self.model_info = Gauge("edge_embed_model_info", "the model being served", ["model", "precision", "backend",
                                "execution_provider"], registry=r)

        self.model_requests = Counter("edge_embed_model_requests", "requests per model", ["model"], registry=r)
        self.model_loads = Counter("edge_embed_model_loads", "model loads", ["model"], registry=r)
        self.model_evictions = Counter("edge_embed_model_evictions", "models evicted to make room", ["model"],
                                       registry=r)
        self.model_resident_bytes = Gauge("edge_embed_model_resident_bytes",
                                          "bytes charged to the budget per resident model", ["model"], registry=r)
        self.model_load_seconds_by_model = Gauge("edge_embed_model_last_load_seconds", "time of the last load",
                                                 ["model"], registry=r)
        self.memory_budget_bytes = Gauge("edge_embed_memory_budget_bytes", "the process memory budget", registry=r)
        self.memory_committed_bytes = Gauge("edge_embed_memory_committed_bytes",
                                            "process base plus the resident models' charges", registry=r)

    def observe_load(self, model, seconds: float, pool) -> None:
        self.model_loads.labels(model.name).inc()
        self.model_load_seconds_by_model.labels(model.name).set(seconds)
        self.model_resident_bytes.labels(model.name).set(model.cost)
        self.model_info.labels(*_info_labels(model.info)).set(1)
        self.observe_pool(pool)

    def observe_eviction(self, model, pool, info) -> None:
        """`info`: the evicted model's ProviderInfo, whose model_info series goes with it
        unless another resident model reports the same one (two names for one bundle)."""
        self.model_evictions.labels(model.name).inc()
        self.model_resident_bytes.labels(model.name).set(0)
        if info is not None:
            labels = _info_labels(info)
            shared = any(m is not model and m.resident and m.info is not None and _info_labels(m.info) == labels
                         for m in pool.models.values())
            if not shared:
                with contextlib.suppress(KeyError):
                    self.model_info.remove(*labels)
        self.observe_pool(pool)

    def observe_pool(self, pool) -> None:
        self.memory_budget_bytes.set(pool.budget_bytes)
        self.memory_committed_bytes.set(pool.committed_bytes)
        if not getattr(self, "_queues_watched", False):
            self.registry.register(_QueueCollector(pool))
            self._queues_watched = True

    def observe_batch(self, texts: int, padded: int, real: int, inference_s: float) -> None:
        self.batch_size.observe(texts)
        self.batch_tokens.observe(padded)
        self.batch_padded_tokens.inc(padded)
        self.batch_real_tokens.inc(real)
        self.inference_seconds.observe(inference_s)

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics; returns the bound port (0 picks a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()


def _info_labels(info) -> tuple[str, str, str, str]:
    """The edge_embed_model_info labels of a loaded model's ProviderInfo."""
    return info.model_id, info.precision, info.backend, info.execution_providers[0]


class _QueueCollector:
    """Each model's queue, read when scraped: requests waiting or partly computed, and tokens."""

    def __init__(self, pool) -> None:
        self._pool = pool

    def describe(self):
        return []

    def collect(self):
        depth = GaugeMetricFamily("edge_embed_queue_depth", "requests queued or partly computed, per model",
                                  labels=["model"])
        tokens = GaugeMetricFamily("edge_embed_queue_tokens", "tokens queued per model", labels=["model"])
        for model in list(self._pool.models.values()):
            batcher = model.batcher
            depth.add_metric([model.name], batcher.depth if batcher is not None else 0)
            tokens.add_metric([model.name], batcher.queued_tokens if batcher is not None else 0)
        yield depth
        yield tokens
