"""The one error tree of edge-embed.

    EdgeEmbedError                 base; never raised itself
    ├── InvalidInputError          bad texts or options from a caller (also a ValueError)
    │   └── RequestTooLargeError   a request over the server's message size limit
    ├── RequestTimeoutError        a request body that did not arrive in time (HTTP 408)
    ├── ModelNotFoundError         a request names a model the server does not hold
    ├── UnauthenticatedError       a request without the server's bearer token
    ├── BundleError                a bundle is missing, malformed or fails its checksums
    ├── BackendUnavailableError    a requested backend or execution provider cannot run here
    ├── ExportError                the export pipeline could not produce a bundle
    │   └── GateError              a variant missed its fidelity gate; nothing was written
    ├── ModelNotReadyError         the requested model is loading or waits for memory; retry
    ├── ModelRunError              a model run failed (a backend error such as an allocation failure);
    │                              only that batch's requests fail; a retry may succeed
    ├── InputRunError              the model fails on one request's input while it runs others: the
    │                              same input fails again, so it is not retried
    ├── NonFiniteOutputError       the model produced NaN or infinity for one input; that request fails
    ├── WorkerStoppedError         the model worker failed repeatedly or hung; the server stops serving
    ├── CorpusError                a corpus job's output belongs to another run or bundle, or lost rows
    ├── WrongTaskError             an embedding request to a reranker, or a rerank request to an embedder
    └── OverloadedError            the server is at its queue, concurrency or memory limit; retry later
        └── MemoryBudgetError      the work cannot fit the memory budget even alone; do not retry

Each class carries the gRPC status code name, the HTTP status and the CLI exit code that
the two transports and the CLI use, and says whether waiting can cure it (`retry_after_ms`,
sent to gRPC clients as the `retry-after-ms` trailer and to HTTP clients as `Retry-After`
and `retry-after-ms` headers); `grpc_code_of`, `http_status_of` and `retry_after_ms_of` are
the only readers.
Exceptions from other libraries never travel past the backend boundary untranslated.
"""

from __future__ import annotations

__all__ = [
    "EdgeEmbedError",
    "InvalidInputError",
    "RequestTooLargeError",
    "RequestTimeoutError",
    "ModelNotFoundError",
    "UnauthenticatedError",
    "BundleError",
    "BackendUnavailableError",
    "ExportError",
    "GateError",
    "OverloadedError",
    "ModelNotReadyError",
    "MemoryBudgetError",
    "ModelRunError",
    "InputRunError",
    "NonFiniteOutputError",
    "WorkerStoppedError",
    "CorpusError",
    "WrongTaskError",
    "grpc_code_of",
    "http_status_of",
    "retry_after_ms_of",
]


class EdgeEmbedError(Exception):
    grpc_code = "INTERNAL"
    http_status = 500
    exit_code = 1
    retry_after_ms: int | None = None  # set where waiting is known to cure it (a full queue)

    def __init__(self, message: str = "", *, retry_after_ms: int | None = None):
        super().__init__(message)
        if retry_after_ms is not None:
            self.retry_after_ms = int(retry_after_ms)


class InvalidInputError(EdgeEmbedError, ValueError):
    grpc_code = "INVALID_ARGUMENT"
    http_status = 400
    exit_code = 2


class RequestTooLargeError(InvalidInputError):
    """A request body over `max_message_bytes`; refused before it is parsed."""

    http_status = 413


class RequestTimeoutError(EdgeEmbedError):
    """A request body that did not arrive within the server's body timeout."""

    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 408
    exit_code = 6


class ModelNotFoundError(EdgeEmbedError):
    grpc_code = "NOT_FOUND"
    http_status = 404
    exit_code = 2


class UnauthenticatedError(EdgeEmbedError):
    grpc_code = "UNAUTHENTICATED"
    http_status = 401
    exit_code = 7


class BundleError(EdgeEmbedError):
    grpc_code = "FAILED_PRECONDITION"
    http_status = 500  # the server's bundle, not the request, is at fault
    exit_code = 3


class BackendUnavailableError(EdgeEmbedError):
    grpc_code = "UNAVAILABLE"
    http_status = 503
    exit_code = 4


class ExportError(EdgeEmbedError):
    exit_code = 5


class GateError(ExportError):
    """A variant's parity with the FP32 reference is below its gate."""

    def __init__(self, variant: str, figure: str, value: float, gate: float, worst_text: str, *,
                 above: bool = False):
        self.variant, self.figure, self.value, self.gate = variant, figure, value, gate
        self.worst_text, self.above = worst_text, above
        shown = worst_text if len(worst_text) <= 80 else worst_text[:77] + "..."
        super().__init__(
            f"{variant} variant failed its gate: {figure} {value:.5f} {'>' if above else '<'} {gate} "
            f"(worst text: {shown!r}); it was not written"
        )


class OverloadedError(EdgeEmbedError):
    """A refusal for load; `cause` names the limit (queue, memory, concurrency, deadline,
    bodies), counted by the server's refusal metric."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429
    exit_code = 6

    def __init__(self, message: str = "", *, retry_after_ms: int | None = None, cause: str = "other"):
        super().__init__(message, retry_after_ms=retry_after_ms)
        self.cause = cause


class ModelNotReadyError(EdgeEmbedError):
    grpc_code = "UNAVAILABLE"
    http_status = 503
    exit_code = 4
    retry_after_ms = 1000


class MemoryBudgetError(OverloadedError):
    """Eviction cannot help: the work is bigger than the budget left beside pinned models."""

    http_status = 413  # too big even alone: clients must not retry it as they retry 429

    def __init__(self, message: str = "", *, retry_after_ms: int | None = None, cause: str = "memory_budget"):
        super().__init__(message, retry_after_ms=retry_after_ms, cause=cause)


class ModelRunError(EdgeEmbedError):
    """The backend failed to run a batch. Transient causes (memory) are common: retry."""

    grpc_code = "UNAVAILABLE"
    http_status = 503
    exit_code = 4
    retry_after_ms = 200


class InputRunError(EdgeEmbedError):
    """The model failed on this request's input while other inputs ran (or a known-good
    batch ran right after): the input's fault, so the worker keeps serving and a retry of
    the same input would fail the same way."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 422
    exit_code = 2


class NonFiniteOutputError(EdgeEmbedError):
    """The model gave NaN or infinity for one input: a vector that must never be returned.

    A client's text can cause it (an FP16 overflow, say), so it is no INTERNAL error; a
    retry of the same input gets the same answer.
    """

    grpc_code = "FAILED_PRECONDITION"
    http_status = 422  # the same input fails the same way again
    exit_code = 1


class WorkerStoppedError(EdgeEmbedError):
    """A model worker that failed repeatedly or hung; a restart (the supervisor's) cures it."""

    grpc_code = "UNAVAILABLE"
    http_status = 503
    exit_code = 4
    retry_after_ms = 1000


class CorpusError(EdgeEmbedError):
    """A corpus job that must not go on: its output folder holds another run's shards, rows
    went missing, or vectors made by one bundle meet queries from another."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 409
    exit_code = 8


class WrongTaskError(EdgeEmbedError):
    """The model asked for does the other task: vectors from a reranker, scores from an embedder."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 400
    exit_code = 2


def grpc_code_of(exc: BaseException) -> str:
    """The gRPC status code name for any exception; a foreign one is a bug, so INTERNAL."""
    return exc.grpc_code if isinstance(exc, EdgeEmbedError) else "INTERNAL"


def http_status_of(exc: BaseException) -> int:
    """The HTTP status for any exception; a foreign one is a bug, so 500."""
    return exc.http_status if isinstance(exc, EdgeEmbedError) else 500


def retry_after_ms_of(exc: BaseException) -> int | None:
    """How long a client should wait before retrying, where waiting can help."""
    return exc.retry_after_ms if isinstance(exc, EdgeEmbedError) else None
