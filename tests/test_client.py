"""EmbedClient and AsyncEmbedClient over loopback gRPC: errors come back as the class the
server named, only what the server says can wait is retried, the async client does what
the blocking one does, and SERVICE_CONFIG gives stock gRPC clients the same retries."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from edge_embed import client as client_module
from edge_embed.client import ERROR_TRAILER, SERVICE_CONFIG, AsyncEmbedClient, EmbedClient
from edge_embed.errors import (
    BackendUnavailableError,
    BundleError,
    CorpusError,
    EdgeEmbedError,
    ExportError,
    MemoryBudgetError,
    ModelNotFoundError,
    ModelNotReadyError,
    ModelRunError,
    NonFiniteOutputError,
    OverloadedError,
    RequestTooLargeError,
    WorkerStoppedError,
    WrongTaskError,
)
from edge_embed.v1 import embed_pb2 as pb

from .fakes import FakeProvider
from .servers import running_server

SERVICE = "edge_embed.v1.EmbeddingService"
UNAVAILABLE, EXHAUSTED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@dataclasses.dataclass(frozen=True)
class Fail:
    """A scripted answer: abort with this status, details and trailers."""

    code: grpc.StatusCode
    trailers: tuple[tuple[str, str], ...] = ()
    details: str = "scripted failure"


def named(cls: type, code: grpc.StatusCode, hint_ms: int | None = None) -> Fail:
    """The answer a server gives for an error of class `cls`, with the two hint trailers."""
    trailers = [(ERROR_TRAILER, cls.__name__)]
    if hint_ms is not None:
        trailers += [("retry-after-ms", str(hint_ms)), ("grpc-retry-pushback-ms", str(hint_ms))]
    return Fail(code, tuple(trailers))


@contextlib.contextmanager
def scripted_server(*answers, health_status: dict[str, int] | None = None):
    """Yield (attempts, target) for a grpc.aio server that answers every edge_embed.v1 call
    with the next of `answers` (the last repeats): a Fail, or a response message. `attempts`
    collects the time each call arrived. `health_status` registers grpc.health.v1 names."""
    attempts: list[float] = []

    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        attempts.append(time.monotonic())
        scripted = answers[min(len(attempts), len(answers)) - 1]
        if isinstance(scripted, Fail):
            await context.abort(scripted.code, scripted.details, trailing_metadata=scripted.trailers)
        return scripted.SerializeToString()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(answer)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {name: handler for name in ("Embed", "Tokenize", "Info", "Rerank")}),))
        if health_status is not None:
            servicer = health.aio.HealthServicer()
            for name, status in health_status.items():
                await servicer.set(name, status)
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield attempts, f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def embed(kind: str, target: str, texts=("a text",), **options):
    """`embed` through the blocking or the asyncio client: vectors, or the error raised."""
    try:
        if kind == "sync":
            with EmbedClient(target, **options) as client:
                return client.embed(list(texts))

        async def run():
            async with AsyncEmbedClient(target, **options) as client:
                return await client.embed(list(texts))

        return asyncio.run(run())
    except EdgeEmbedError as exc:
        return exc


CLIENTS = pytest.mark.parametrize("kind", ["sync", "async"])


@CLIENTS
@pytest.mark.parametrize(("answer", "expected"), [
    (named(WrongTaskError, PRECONDITION), WrongTaskError),
    (named(NonFiniteOutputError, PRECONDITION), NonFiniteOutputError),
    (named(CorpusError, PRECONDITION), CorpusError),
    (named(BundleError, PRECONDITION), BundleError),
    (named(ModelRunError, UNAVAILABLE), ModelRunError),
    (named(MemoryBudgetError, EXHAUSTED), MemoryBudgetError),
    (named(RequestTooLargeError, grpc.StatusCode.INVALID_ARGUMENT), RequestTooLargeError),
    # GateError needs fields no trailer carries: the nearest class that takes a message.
    (Fail(grpc.StatusCode.INTERNAL, ((ERROR_TRAILER, "GateError"),)), ExportError),
    # An older server sends no trailer: the status code decides, as before.
    (Fail(PRECONDITION), BundleError),
    # Only the error classes of edge_embed.errors: never a function, a builtin, any name.
    (Fail(PRECONDITION, ((ERROR_TRAILER, "grpc_code_of"),)), BundleError),
    (Fail(PRECONDITION, ((ERROR_TRAILER, "SystemExit"),)), BundleError),
    (Fail(PRECONDITION, ((ERROR_TRAILER, "os.system"),)), BundleError),
    (Fail(grpc.StatusCode.INTERNAL, ((ERROR_TRAILER, "ErrorOfANewerServer"),)), EdgeEmbedError),
])
def test_the_error_trailer_picks_the_exact_class(kind, answer, expected):
    with scripted_server(answer) as (attempts, target):
        error = embed(kind, target, retries=3)
    assert type(error) is expected, error
    assert str(error) == f"{answer.code.name}: scripted failure"
    assert len(attempts) == 1  # none of these says waiting helps


@CLIENTS
def test_the_servers_wait_travels_with_the_error(kind):
    with scripted_server(named(OverloadedError, EXHAUSTED, hint_ms=40)) as (_, target):
        assert embed(kind, target, retries=0).retry_after_ms == 40
    only_grpcs = Fail(EXHAUSTED, ((ERROR_TRAILER, "OverloadedError"), ("grpc-retry-pushback-ms", "60")))
    with scripted_server(only_grpcs) as (_, target):
        assert embed(kind, target, retries=0).retry_after_ms == 60
    # A class whose waits usually help, sent without a hint: the server's word, not the class's.
    with scripted_server(named(ModelNotReadyError, UNAVAILABLE)) as (_, target):
        error = embed(kind, target, retries=0)
    assert type(error) is ModelNotReadyError and error.retry_after_ms is None


@CLIENTS
@pytest.mark.parametrize(("answer", "attempts_made"), [
    # A per-request model failure, or what only a restart cures: no hint, no retry.
    (named(ModelRunError, UNAVAILABLE), 1),
    (named(BackendUnavailableError, UNAVAILABLE), 1),
    (named(NonFiniteOutputError, PRECONDITION), 1),
    (named(MemoryBudgetError, EXHAUSTED), 1),
    (Fail(EXHAUSTED), 1),  # an older server's "too big for the budget"
    (Fail(UNAVAILABLE, (("grpc-retry-pushback-ms", "-1"),)), 1),  # gRPC's "do not retry"
    # What the server says a wait cures, and a transport failure (nobody named an error).
    (named(OverloadedError, EXHAUSTED, hint_ms=30), 3),
    (named(WorkerStoppedError, UNAVAILABLE, hint_ms=30), 3),
    (Fail(UNAVAILABLE, (("grpc-retry-pushback-ms", "30"),)), 3),
    (Fail(UNAVAILABLE), 3),
])
def test_only_what_the_server_says_can_wait_is_retried(kind, answer, attempts_made):
    with scripted_server(answer) as (attempts, target):
        error = embed(kind, target, retries=2, timeout=10)
    assert isinstance(error, EdgeEmbedError) and len(attempts) == attempts_made, (error, attempts)
    hint = dict(answer.trailers).get("grpc-retry-pushback-ms", "")
    if hint.isdigit():
        gaps = np.diff(attempts)
        assert gaps.min() >= int(hint) / 1000 * 0.9, gaps


@CLIENTS
def test_a_retried_call_gets_its_answer(kind):
    answers = (named(OverloadedError, EXHAUSTED, hint_ms=20), Fail(UNAVAILABLE),
               pb.EmbedResponse(embeddings=[pb.Embedding(values=[0.6, 0.8])], dimensions=2))
    with scripted_server(*answers) as (attempts, target):
        vectors = embed(kind, target, retries=2)
    assert len(attempts) == 3
    np.testing.assert_allclose(vectors, [[0.6, 0.8]])


@CLIENTS
def test_a_hint_past_the_deadline_fails_at_once(kind):
    with scripted_server(named(OverloadedError, EXHAUSTED, hint_ms=5000)) as (attempts, target):
        started = time.monotonic()
        error = embed(kind, target, retries=5, timeout=1)
    assert type(error) is OverloadedError and len(attempts) == 1 and time.monotonic() - started < 1


@CLIENTS
def test_grpc_retries_never_multiply_the_clients_own(kind, monkeypatch):
    """Even with a retry policy on its channel (gRPC would try 4 times per call), the
    client's loop is the only one that retries: `retries=2` is 3 attempts, not 12."""
    channel = client_module._Options.channel

    def with_service_config(self, grpc_module):
        self.options = [*self.options, ("grpc.service_config", SERVICE_CONFIG)]
        return channel(self, grpc_module)

    monkeypatch.setattr(client_module._Options, "channel", with_service_config)
    with scripted_server(named(WorkerStoppedError, UNAVAILABLE, hint_ms=5)) as (attempts, target):
        error = embed(kind, target, retries=2)
    assert type(error) is WorkerStoppedError and len(attempts) == 3


def test_the_service_config_retries_stock_grpc_clients_as_the_client_does():
    """A plain grpc channel given SERVICE_CONFIG: hinted errors wait the pushback, transport
    failures back off, a negative pushback and other codes are not retried."""
    config = json.loads(SERVICE_CONFIG)
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": SERVICE}]
    retries = inspect.signature(EmbedClient).parameters["retries"].default
    assert method["retryPolicy"]["maxAttempts"] == retries + 1
    assert set(method["retryPolicy"]["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}

    def stock_call(answer: Fail) -> list[float]:
        with scripted_server(answer) as (attempts, target):
            with grpc.insecure_channel(target, options=[("grpc.service_config", SERVICE_CONFIG)]) as channel:
                call = channel.unary_unary(f"/{SERVICE}/Embed")
                with pytest.raises(grpc.RpcError) as failed:
                    call(pb.EmbedRequest(inputs=["x"]).SerializeToString(), timeout=10)
            assert failed.value.code() == answer.code
            return list(attempts)

    hinted = stock_call(named(OverloadedError, EXHAUSTED, hint_ms=150))
    assert len(hinted) == retries + 1 and np.diff(hinted).min() >= 0.14
    assert len(stock_call(Fail(UNAVAILABLE))) == retries + 1
    assert len(stock_call(Fail(UNAVAILABLE, (("grpc-retry-pushback-ms", "-1"),)))) == 1
    assert len(stock_call(named(WrongTaskError, PRECONDITION))) == 1


def test_the_async_client_tokenizes_as_the_blocking_one():
    fake = FakeProvider()
    texts = ["the cat sat", "on the mat"]
    with running_server(fake) as (_, target):
        with EmbedClient(target) as client:
            blocking = client.tokenize(texts, instruction="find", model="fake-model")

        async def run():
            async with AsyncEmbedClient(target) as client:
                ids = await client.tokenize(texts, instruction="find")
                with pytest.raises(ModelNotFoundError, match="not served here"):
                    await client.tokenize(texts, model="nope")
                return ids

        asynchronous = asyncio.run(run())
    assert asynchronous == blocking == [s.tolist() for s in fake.tokenize(texts, instruction="find")]


class FakeReranker(FakeProvider):
    """The fake as a reranker: a pair is its query's and its document's words, and its
    score the first value of that text's vector."""

    @property
    def info(self):
        return dataclasses.replace(super().info, task="rerank")

    def tokenize_pairs(self, query, documents, *, instruction=None, truncate=True, field="documents"):
        return self.tokenize([f"{query} {d}" for d in documents], truncate=truncate, field=field)

    def finish_scores(self, logits, *, field="documents"):
        return np.asarray(logits[:, 0], dtype=np.float32)


def test_a_real_server_names_the_wrong_task_error():
    with running_server(FakeReranker()) as (_, target):
        with EmbedClient(target) as client:
            assert len(client.rerank("query", ["one document", "another"]).results) == 2
            for call in (lambda: client.embed(["text"]), lambda: client.tokenize(["text"])):
                with pytest.raises(WrongTaskError, match="fake-model is a reranker and cannot embed texts") as raised:
                    call()
                assert raised.value.exit_code == 2 and raised.value.retry_after_ms is None
        error = embed("async", target)
    assert type(error) is WrongTaskError and str(error).startswith("FAILED_PRECONDITION: ")
