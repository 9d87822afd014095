"""Assembling and running the gRPC server: health, reflection, auth, TLS, drain, systemd."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..v1 import embed_pb2
from .batcher import TokenBudgetBatcher
from .config import ServerConfig
from .metrics import ServerMetrics
from .service import SERVICE_NAME, BearerTokenInterceptor, EmbeddingService, method_handlers
from .systemd import Notifier

__all__ = ["EdgeServer", "create_server", "serve", "WARMUP_TEXTS"]

log = logging.getLogger("edge_embed.server")
WARMUP_TEXTS = ["warm up", "edge-embed is getting ready to serve requests with a longer text"]
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class EdgeServer:
    """A running server and the parts a caller may need to observe or stop."""

    grpc_server: grpc.aio.Server
    service: EmbeddingService
    batcher: TokenBudgetBatcher
    health: health.aio.HealthServicer
    metrics: ServerMetrics
    port: int
    metrics_port: int | None = None

    async def set_serving(self, serving: bool) -> None:
        status = _SERVING if serving else _NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        self.metrics.serving.set(1 if serving else 0)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let in-flight ones finish (up to `grace` s), then stop the worker."""
        await self.set_serving(False)
        await self.grpc_server.stop(grace)
        await self.batcher.stop()
        self.metrics.close()


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None:
        return None
    pair = (config.tls_key.read_bytes(), config.tls_cert.read_bytes())
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


async def create_server(config: ServerConfig, provider: Any, *, warm_up: bool = True) -> tuple[EdgeServer, int]:
    """Build, warm up and start a server for `provider`; port 0 binds a free port.

    Health turns SERVING only after a warm-up batch has gone through the model.
    """
    metrics = ServerMetrics()
    info = provider.info
    metrics.model_info.labels(info.model_id, info.precision, info.backend, info.execution_providers[0]).set(1)
    health_servicer = health.aio.HealthServicer()
    edge: EdgeServer | None = None

    async def mark_dead() -> None:
        if edge is not None:
            await edge.set_serving(False)

    loop = asyncio.get_running_loop()
    batcher = TokenBudgetBatcher(
        provider.embed_token_ids,
        max_batch_tokens=config.max_batch_tokens,
        max_batch_size=config.max_batch_size,
        max_wait_s=config.max_wait_ms / 1000,
        max_queue=config.max_queue,
        on_death=lambda exc: loop.create_task(mark_dead()),
        on_batch=metrics.observe_batch,
    )
    service = EmbeddingService(provider, config, batcher, metrics)
    interceptors = [BearerTokenInterceptor(config.token)] if config.token else []
    transport_limit = config.max_message_bytes + 1024 * 1024  # our own check answers first, clearly
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
    address = f"{config.host}:{config.port}"
    credentials = _credentials(config)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    edge = EdgeServer(server, service, batcher, health_servicer, metrics, port)
    await edge.set_serving(False)
    batcher.start()
    if warm_up:
        await batcher.submit(provider.tokenize(WARMUP_TEXTS))
    await server.start()
    if config.metrics_port is not None:
        edge.metrics_port = metrics.serve_http(config.host, config.metrics_port)
    await edge.set_serving(True)
    return edge, port


async def serve(config: ServerConfig, provider: Any, load_seconds: float = 0.0) -> None:
    """Run until SIGTERM/SIGINT, then drain: no accepted request goes unanswered."""
    notifier = Notifier()
    edge, port = await create_server(config, provider)
    edge.metrics.model_load_seconds.set(load_seconds)
    info = provider.info
    log.info("serving %s (%s, %s on %s) on %s:%d", info.model_id, info.precision, info.backend,
             info.execution_providers[0], config.host, port)
    notifier.notify("READY=1", f"STATUS=serving {info.model_id} on port {port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchdog = None
    if notifier.watchdog_interval_s:
        watchdog = loop.create_task(_watchdog(notifier, edge, notifier.watchdog_interval_s))
    dead = loop.create_task(_wait_dead(edge))
    await asyncio.wait([loop.create_task(stop.wait()), dead], return_when=asyncio.FIRST_COMPLETED)
    notifier.notify("STOPPING=1", "STATUS=draining")
    log.info("draining (grace %.0f s)", config.grace_s)
    started = time.monotonic()
    if watchdog:
        watchdog.cancel()
    await edge.stop(config.grace_s)
    log.info("stopped after %.2f s of drain", time.monotonic() - started)
    if edge.batcher.dead is not None:
        raise SystemExit(1)


async def _wait_dead(edge: EdgeServer) -> None:
    while edge.batcher.dead is None:
        await asyncio.sleep(0.5)


async def _watchdog(notifier: Notifier, edge: EdgeServer, interval_s: float) -> None:
    """Ping systemd only while the model worker is alive, so a hung worker gets restarted."""
    while True:
        if edge.batcher.dead is None:
            notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)
