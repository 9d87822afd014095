"""Clients for the edge_embed.v1 gRPC API, sync and asyncio, with deadlines and retries.

Retries cover UNAVAILABLE and RESOURCE_EXHAUSTED only, and wait as long as the server's
`retry-after-ms` hint says (else an exponential backoff). Status codes come back as
the matching edge-embed errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from .errors import (
    BackendUnavailableError,
    BundleError,
    EdgeEmbedError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
    UnauthenticatedError,
)
from .v1 import embed_pb2 as pb

__all__ = ["EmbedClient", "AsyncEmbedClient"]

_METHOD = "/edge_embed.v1.EmbeddingService/"
_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: BackendUnavailableError,
    grpc.StatusCode.FAILED_PRECONDITION: BundleError,
}


def _credentials(root_cert: Path | None, client_cert: Path | None, client_key: Path | None):
    if root_cert is None and client_cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_cert.read_bytes() if root_cert else None,
        private_key=client_key.read_bytes() if client_key else None,
        certificate_chain=client_cert.read_bytes() if client_cert else None,
    )


def _request(texts, instruction, dimensions, normalize, truncate, model) -> pb.EmbedRequest:
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of strings, not a single string")
    return pb.EmbedRequest(
        inputs=list(texts), instruction=instruction or "", dimensions=dimensions or 0,
        normalize=normalize, truncate=truncate, model=model or "",
    )


def _vectors(response: pb.EmbedResponse) -> np.ndarray:
    if not response.embeddings:
        return np.zeros((0, response.dimensions), dtype=np.float32)
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


def _translate(exc: grpc.RpcError) -> EdgeEmbedError:
    cls = _ERRORS.get(exc.code(), EdgeEmbedError)
    return cls(f"{exc.code().name}: {exc.details()}")


def _hint_ms(exc: grpc.RpcError) -> int | None:
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after-ms" and value.isdigit():
            return int(value)
    return None


def _retryable(exc: grpc.RpcError) -> bool:
    """UNAVAILABLE, and RESOURCE_EXHAUSTED when the server says waiting helps (a full
    queue sends a hint; a model too big for the memory budget does not)."""
    code = exc.code()
    return code == grpc.StatusCode.UNAVAILABLE or (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED and _hint_ms(exc) is not None)


def _retry_delay(exc: grpc.RpcError, attempt: int) -> float:
    hint = _hint_ms(exc)
    return hint / 1000 if hint is not None else min(2.0, 0.05 * 2**attempt)


class _Options:
    def __init__(self, target, *, token, root_cert, client_cert, client_key, timeout, retries):
        self.target = target
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.credentials = _credentials(root_cert, client_cert, client_key)
        self.timeout = timeout
        self.retries = retries
        self.options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]

    def channel(self, grpc_module):
        """A channel of `grpc` or `grpc.aio`, secure when TLS options were given."""
        if self.credentials:
            return grpc_module.secure_channel(self.target, self.credentials, self.options)
        return grpc_module.insecure_channel(self.target, self.options)


def _stubs(channel) -> tuple:
    """(Embed, Info, Tokenize, Rerank) callables on a channel, sync or asyncio alike."""
    def stub(name: str, request, response):
        return channel.unary_unary(_METHOD + name, request.SerializeToString, response.FromString)

    return (stub("Embed", pb.EmbedRequest, pb.EmbedResponse), stub("Info", pb.InfoRequest, pb.InfoResponse),
            stub("Tokenize", pb.TokenizeRequest, pb.TokenizeResponse),
            stub("Rerank", pb.RerankRequest, pb.RerankResponse))


def _rerank_request(query: str, documents: Sequence[str], instruction: str | None, top_n: int | None,
                    return_documents: bool, model: str | None) -> pb.RerankRequest:
    return pb.RerankRequest(query=query, documents=list(documents), instruction=instruction or "",
                            top_n=top_n or 0, return_documents=return_documents, model=model or "")


class EmbedClient:
    """Blocking client. `with EmbedClient("host:port") as c: c.embed([...])`."""

    def __init__(self, target: str, *, token: str | None = None, root_cert: Path | None = None,
                 client_cert: Path | None = None, client_key: Path | None = None,
                 timeout: float = 10.0, retries: int = 3):
        self._o = _Options(target, token=token, root_cert=root_cert, client_cert=client_cert,
                           client_key=client_key, timeout=timeout, retries=retries)
        self._channel = self._o.channel(grpc)
        self._embed, self._info, self._tokenize, self._rerank = _stubs(self._channel)

    def _call(self, method, request):
        deadline = time.monotonic() + self._o.timeout
        for attempt in range(self._o.retries + 1):
            try:
                return method(request, timeout=max(0.001, deadline - time.monotonic()), metadata=self._o.metadata)
            except grpc.RpcError as exc:
                delay = _retry_delay(exc, attempt)
                if not _retryable(exc) or attempt == self._o.retries or time.monotonic() + delay >= deadline:
                    raise _translate(exc) from None
                time.sleep(delay)
        raise AssertionError("unreachable")

    def embed(self, texts: Sequence[str], *, instruction: str | None = None, dimensions: int | None = None,
              normalize: bool = True, truncate: bool = True, model: str | None = None) -> np.ndarray:
        return _vectors(self.embed_response(texts, instruction=instruction, dimensions=dimensions,
                                            normalize=normalize, truncate=truncate, model=model))

    def embed_response(self, texts: Sequence[str], **options) -> pb.EmbedResponse:
        """The full response: vectors, token counts, queue and inference times."""
        o = {"instruction": None, "dimensions": None, "normalize": True, "truncate": True, "model": None, **options}
        return self._call(self._embed, _request(texts, **o))

    def rerank(self, query: str, documents: Sequence[str], *, instruction: str | None = None,
               top_n: int | None = None, return_documents: bool = False,
               model: str | None = None) -> pb.RerankResponse:
        """Scores of `documents` for `query` from a reranker, best first (`top_n` of them)."""
        return self._call(self._rerank, _rerank_request(query, documents, instruction, top_n, return_documents, model))

    def tokenize(self, texts: Sequence[str], *, instruction: str | None = None) -> list[list[int]]:
        response = self._call(self._tokenize, pb.TokenizeRequest(inputs=list(texts), instruction=instruction or ""))
        return [list(t.ids) for t in response.tokens]

    def info(self, model: str | None = None) -> pb.InfoResponse:
        """The server's models and memory; top-level fields describe `model` (default: the default one)."""
        return self._call(self._info, pb.InfoRequest(model=model or ""))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEmbedClient:
    """asyncio client with the same options and retry rules as EmbedClient."""

    def __init__(self, target: str, *, token: str | None = None, root_cert: Path | None = None,
                 client_cert: Path | None = None, client_key: Path | None = None,
                 timeout: float = 10.0, retries: int = 3):
        self._o = _Options(target, token=token, root_cert=root_cert, client_cert=client_cert,
                           client_key=client_key, timeout=timeout, retries=retries)
        self._channel = self._o.channel(grpc.aio)
        self._embed, self._info, _, self._rerank = _stubs(self._channel)

    async def _call(self, method, request):
        deadline = time.monotonic() + self._o.timeout
        for attempt in range(self._o.retries + 1):
            try:
                return await method(request, timeout=max(0.001, deadline - time.monotonic()),
                                    metadata=self._o.metadata)
            except grpc.aio.AioRpcError as exc:
                delay = _retry_delay(exc, attempt)
                if not _retryable(exc) or attempt == self._o.retries or time.monotonic() + delay >= deadline:
                    raise _translate(exc) from None
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def embed(self, texts: Sequence[str], **options) -> np.ndarray:
        return _vectors(await self.embed_response(texts, **options))

    async def embed_response(self, texts: Sequence[str], **options) -> pb.EmbedResponse:
        o = {"instruction": None, "dimensions": None, "normalize": True, "truncate": True, "model": None, **options}
        return await self._call(self._embed, _request(texts, **o))

    async def rerank(self, query: str, documents: Sequence[str], *, instruction: str | None = None,
                     top_n: int | None = None, return_documents: bool = False,
                     model: str | None = None) -> pb.RerankResponse:
        return await self._call(self._rerank,
                                _rerank_request(query, documents, instruction, top_n, return_documents, model))

    async def info(self, model: str | None = None) -> pb.InfoResponse:
        return await self._call(self._info, pb.InfoRequest(model=model or ""))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncEmbedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
