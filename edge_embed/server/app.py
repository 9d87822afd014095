"""Assembling and running the server: gRPC (health, reflection), the optional HTTP API,
auth, TLS, drain, systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..errors import BackendUnavailableError
from ..provider import ModelRunner
from ..vl import VLInput
from ..v1 import embed_pb2
from .batcher import TokenBudgetBatcher
from .config import ServerConfig
from .core import EmbeddingService
from .grpc_transport import SERVICE_NAME, ArrivalInterceptor, BearerTokenInterceptor, method_handlers
from .metrics import ServerMetrics
from .pool import ModelPool, ModelSource, PooledModel
from .systemd import Notifier

__all__ = ["EdgeServer", "create_server", "serve", "WARMUP_TEXTS", "warmup_token_ids"]

if TYPE_CHECKING:
    from .http import HttpTransport  # imports aiohttp: only when the HTTP API is on

log = logging.getLogger("edge_embed.server")
WARMUP_TEXTS = ["warm up", "edge-embed is getting ready to serve requests with a longer text"]
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class EdgeServer:
    """A running server and the parts a caller may need to observe or stop."""

    grpc_server: grpc.aio.Server
    service: EmbeddingService
    pool: ModelPool
    health: health.aio.HealthServicer
    metrics: ServerMetrics
    port: int
    metrics_port: int | None = None
    http: HttpTransport | None = None  # when the HTTP API is on
    serving: bool = False

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = _SERVING if serving else _NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self.metrics.serving.set(1 if serving else 0)

    def alive(self) -> bool:
        """No model worker has stopped or hung (a draining server is still alive)."""
        return self.pool.stopped is None and not self.pool.hung

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new requests on both transports, let in-flight ones finish (up to `grace`
        s), then stop the worker."""
        await self.set_serving(False)
        stops = [self.grpc_server.stop(grace)]
        if self.http is not None:
            stops.append(self.http.stop(grace))
        await asyncio.gather(*stops)
        await self.pool.close()
        self.service.close()
        self.metrics.close()


def warmup_token_ids(runner: ModelRunner) -> list:
    """Token ids of the warm-up batch: the first batch every model runs, and afterwards the
    canary that tells a failing input from a failing model."""
    if runner.info.task == "rerank":
        return runner.tokenize_pairs(WARMUP_TEXTS[0], WARMUP_TEXTS)
    if runner.info.task == "multivector":
        return runner.tokenize_multi(WARMUP_TEXTS, kind="query")
    return runner.tokenize(WARMUP_TEXTS)


def _calibration_batches(seqs: list, max_length: int) -> list[list]:
    """Batches of 8, 64 and 256 tokens made of the warm-up's ids: the batch cost model
    (fixed + per token) is fitted from the first request on, not after big batches ran."""
    if isinstance(seqs[0], VLInput):  # a vision-language model's chats: their ids, read as text
        ids = np.concatenate([s.ids for s in seqs])

        def make(row: np.ndarray) -> VLInput:
            return VLInput(row, np.zeros(len(row), dtype=np.int8))
    else:
        ids = np.concatenate(seqs)

        def make(row: np.ndarray) -> np.ndarray:
            return row
    return [[make(np.resize(ids, min(width, max_length)))] * rows for rows, width in ((1, 8), (2, 32), (4, 64))]


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None:
        return None
    pair = (config.tls_key.read_bytes(), config.tls_cert.read_bytes())
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


async def create_server(config: ServerConfig, models: ModelRunner | ModelPool, *,
                        warm_up: bool = True) -> tuple[EdgeServer, int]:
    """Build, warm up and start a server for one loaded runner or a ModelPool; port 0
    binds a free port.

    Health turns SERVING only after the pool's first models loaded and a warm-up batch
    went through each of them.
    """
    metrics = ServerMetrics()
    health_servicer = health.aio.HealthServicer()
    edge: EdgeServer | None = None
    loop = asyncio.get_running_loop()

    async def mark_stopped(model: PooledModel) -> None:
        model_pool.mark_stopped(model)
        if edge is not None:
            await edge.set_serving(False)

    def make_batcher(model: PooledModel) -> TokenBudgetBatcher:
        runner = model.runner
        return TokenBudgetBatcher(
            runner.run_multi_batch if runner.info.task == "multivector" else runner.run_batch,
            limits=runner.info.batch_limits(config.limits),
            max_wait_s=config.max_wait_ms / 1000,
            max_queue_tokens=config.queue_tokens,
            run_timeout_s=config.run_timeout_s,
            max_consecutive_failures=config.max_consecutive_failures,
            on_batch=metrics.observe_batch,
            on_stop=lambda error: loop.create_task(mark_stopped(model)),
            oversize=lambda rows, width: model_pool.oversize_run(model, rows, width),
            canary=warmup_token_ids(runner),
            max_batch_s=config.max_batch_ms / 1000,
        )

    if isinstance(models, ModelPool):
        model_pool = models
        model_pool.bind(make_batcher, metrics)
        await model_pool.start()
    else:  # one runner, loaded by the caller: a pool of one pinned model
        info = models.info
        model_pool = ModelPool([ModelSource(info.model_id, Path("."))], budget_bytes=2**62, loader=_no_loader,
                               cost_of=_no_cost)
        model_pool.bind(make_batcher, metrics)
        model_pool.adopt(info.model_id, models)
        metrics.model_info.labels(info.model_id, info.precision, info.backend, info.execution_providers[0]).set(1)
    pool = model_pool
    metrics.observe_pool(pool)
    service = EmbeddingService(pool, config, metrics)
    interceptors = [ArrivalInterceptor(service)] + ([BearerTokenInterceptor(config.token)] if config.token else [])
    transport_limit = config.max_message_bytes + 1024 * 1024  # our own check answers first, clearly
    # No server-wide maximum_concurrent_rpcs: it would refuse health checks when busy (and
    # the pod would be restarted when busiest); the service limits model requests itself.
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", transport_limit),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((method_handlers(service, config.max_message_bytes),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (embed_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name, health.SERVICE_NAME,
         reflection.SERVICE_NAME),
        server,
    )
    if config.open_to_network:
        log.warning("listening on %s with neither a bearer token nor TLS: anyone who can reach this host can "
                    "use the server (set --token, or --tls-cert and --tls-key)", config.host)
    address = f"{config.host}:{config.port}"
    credentials = _credentials(config)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    edge = EdgeServer(server, service, pool, health_servicer, metrics, port)
    await edge.set_serving(False)
    if warm_up:
        for model in pool.models.values():
            if model.batcher is not None:
                seqs = warmup_token_ids(model.runner)
                for batch in [seqs, *_calibration_batches(seqs, model.runner.info.max_length)]:
                    with model.batcher.admit(sum(len(s) for s in batch)) as ticket:
                        await ticket.submit(batch)
    await server.start()
    if config.http_port is not None:
        from .http import HttpTransport  # aiohttp is imported only when the HTTP API is on

        edge.http = HttpTransport(service, config, serving=lambda: edge.serving, alive=edge.alive)
        try:
            await edge.http.start(config.host, config.http_port)
        except OSError as exc:
            edge.http = None
            await edge.stop(None)
            raise BackendUnavailableError(f"cannot listen for HTTP on {config.host}:{config.http_port}: "
                                          f"{exc.strerror or exc}") from None
    if config.metrics_port is not None:
        edge.metrics_port = metrics.serve_http(config.host, config.metrics_port)
    await edge.set_serving(True)
    return edge, port


async def serve(config: ServerConfig, models: ModelPool) -> None:
    """Run until SIGTERM/SIGINT, then drain: no accepted request goes unanswered.

    A model worker that stops (repeated failures, or a run past the run timeout) ends the
    process with exit code 1 for the supervisor to restart; systemd's watchdog is fed only
    while no run is overdue. A hung run's thread can be neither interrupted nor joined, so
    whenever one is hung the process leaves at once (`os._exit`), never through an
    interpreter shutdown that would wait for that thread forever.
    """
    notifier = Notifier()
    started = time.monotonic()
    edge, port = await create_server(config, models)
    edge.metrics.model_load_seconds.set(time.monotonic() - started)
    pool = edge.pool
    for model in pool.models.values():
        if model.info is not None:
            info = model.info
            log.info("serving %s (%s, %s on %s) on %s:%d", model.name, info.precision, info.backend,
                     info.execution_providers[0], config.host, port)
    if edge.http_port is not None:
        scheme = "https" if config.tls_cert is not None else "http"
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", scheme, config.host, edge.http_port)
    if len(pool.models) > 1:
        log.info("%d models, memory budget %s MB, %s MB committed", len(pool.models),
                 f"{pool.budget_bytes / 1e6:,.0f}", f"{pool.committed_bytes / 1e6:,.0f}")
    notifier.notify("READY=1", f"STATUS=serving {', '.join(pool.models)} on port {port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchdog = None
    if notifier.watchdog_interval_s:
        watchdog = loop.create_task(_watchdog(notifier, edge, notifier.watchdog_interval_s))
    stopped = loop.create_task(_wait_stopped(edge))
    await asyncio.wait([loop.create_task(stop.wait()), stopped], return_when=asyncio.FIRST_COMPLETED)
    notifier.notify("STOPPING=1", "STATUS=draining")
    if watchdog:
        watchdog.cancel()
    if pool.hung:
        _exit_now(pool.stopped or "a model run is past the run timeout")
    log.info("draining (grace %.0f s)", config.grace_s)
    started = time.monotonic()
    # A run that hangs while draining must not hold the exit past the grace.
    drain = loop.create_task(edge.stop(config.grace_s))
    done, _ = await asyncio.wait([drain, loop.create_task(_wait_hung(edge))], timeout=config.grace_s + 5,
                                 return_when=asyncio.FIRST_COMPLETED)
    if drain not in done or pool.hung:
        _exit_now(pool.stopped or f"the drain did not finish within {config.grace_s:g} s")
    log.info("stopped after %.2f s of drain", time.monotonic() - started)
    if pool.stopped is not None:
        log.error("exiting for a restart: %s", pool.stopped)
        raise SystemExit(1)


def _exit_now(reason: object) -> None:
    """Leave without joining threads: a hung model thread would keep the process alive."""
    log.error("exiting for a restart: %s", reason)
    logging.shutdown()
    os._exit(1)


async def _wait_stopped(edge: EdgeServer) -> None:
    while edge.pool.stopped is None and not edge.pool.hung:
        await asyncio.sleep(0.25)


async def _wait_hung(edge: EdgeServer) -> None:
    while not edge.pool.hung:
        await asyncio.sleep(0.25)


async def _watchdog(notifier: Notifier, edge: EdgeServer, interval_s: float) -> None:
    """Ping systemd only while every model worker is alive and no run is overdue."""
    while True:
        if edge.pool.stopped is None and not edge.pool.hung:
            notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)


def _no_loader(source: ModelSource) -> ModelRunner:
    raise AssertionError(f"{source.name} was adopted loaded; it is never loaded here")


def _no_cost(source: ModelSource) -> tuple[int, str]:
    return 0, "outside the pool"
