"""The one error tree of edge-embed.

    EdgeEmbedError                 base; never raised itself
    ├── InvalidInputError          bad texts or options from a caller (also a ValueError)
    ├── ModelNotFoundError         a request names a model the server does not hold
    ├── UnauthenticatedError       a request without the server's bearer token
    ├── BundleError                a bundle is missing, malformed or fails its checksums
    ├── BackendUnavailableError    a requested backend or execution provider cannot run here
    ├── ExportError                the export pipeline could not produce a bundle
    │   └── GateError              a variant missed its fidelity gate; nothing was written
    ├── ModelNotReadyError         the requested model is loading or waits for memory; retry
    └── OverloadedError            the server queue is full; retry later
        └── MemoryBudgetError      a model cannot fit the memory budget even alone; do not retry

Each class carries the gRPC status code name and the CLI exit code that the server and
the CLI use; no other place maps errors.
"""

from __future__ import annotations

__all__ = [
    "EdgeEmbedError",
    "InvalidInputError",
    "ModelNotFoundError",
    "UnauthenticatedError",
    "BundleError",
    "BackendUnavailableError",
    "ExportError",
    "GateError",
    "OverloadedError",
    "ModelNotReadyError",
    "MemoryBudgetError",
]


class EdgeEmbedError(Exception):
    grpc_code = "INTERNAL"
    exit_code = 1
    retry_after_ms: int | None = None  # set where waiting is known to cure it (a full queue)


class InvalidInputError(EdgeEmbedError, ValueError):
    grpc_code = "INVALID_ARGUMENT"
    exit_code = 2


class ModelNotFoundError(EdgeEmbedError):
    grpc_code = "NOT_FOUND"
    exit_code = 2


class UnauthenticatedError(EdgeEmbedError):
    grpc_code = "UNAUTHENTICATED"
    exit_code = 7


class BundleError(EdgeEmbedError):
    grpc_code = "FAILED_PRECONDITION"
    exit_code = 3


class BackendUnavailableError(EdgeEmbedError):
    grpc_code = "UNAVAILABLE"
    exit_code = 4


class ExportError(EdgeEmbedError):
    exit_code = 5


class GateError(ExportError):
    """A variant's parity with the FP32 reference is below its gate."""

    def __init__(self, variant: str, figure: str, value: float, gate: float, worst_text: str):
        self.variant, self.figure, self.value, self.gate = variant, figure, value, gate
        self.worst_text = worst_text
        shown = worst_text if len(worst_text) <= 80 else worst_text[:77] + "..."
        super().__init__(
            f"{variant} variant failed its gate: {figure} {value:.5f} < {gate} "
            f"(worst text: {shown!r}); it was not written"
        )


class OverloadedError(EdgeEmbedError):
    grpc_code = "RESOURCE_EXHAUSTED"
    exit_code = 6


class ModelNotReadyError(EdgeEmbedError):
    grpc_code = "UNAVAILABLE"
    exit_code = 4

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class MemoryBudgetError(OverloadedError):
    """Eviction cannot help: the model is bigger than the budget left beside pinned ones."""
