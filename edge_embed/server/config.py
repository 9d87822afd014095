"""Server configuration: one frozen dataclass, built with flag > EDGE_EMBED_* env > default."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..batching import BatchLimits
from ..errors import InvalidInputError

__all__ = ["ServerConfig", "ENV_PREFIX", "parse_bytes"]

_MiB = 1024**2

ENV_PREFIX = "EDGE_EMBED_"


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything `edge-embed serve` can be told; each field is also EDGE_EMBED_<NAME>."""

    bundle: tuple[str, ...] = ()  # [NAME=]PATH[@PRECISION]; the env form is comma-separated
    models_dir: Path | None = None
    memory_budget: int | None = None  # bytes for the whole process; None: detected memory less a fifth
    pin: tuple[str, ...] = ()
    load_wait_s: float = 60.0
    precision: str = "auto"
    backend: str = "auto"
    threads: int | None = None  # None: the usable cores less one (see model_threads)
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = None
    http_port: int | None = None  # the OpenAI-compatible HTTP API; None: off (see docs/server.md)
    max_batch_tokens: int = BatchLimits.max_batch_tokens
    max_batch_size: int = BatchLimits.max_batch_size
    max_wait_ms: float = 0.0
    # A batch's model time at most, at the measured speed (0: the token budget alone): a
    # request that arrives while a batch runs waits for about this long, not for a 4,096-token batch.
    max_batch_ms: float = 250.0
    max_queue_tokens: int | None = None  # tokens queued per model; None: 16 batches' worth
    max_concurrent_rpcs: int = 64  # model requests handled at once over both transports; health is never counted
    run_timeout_s: float = 120.0  # a model run longer than this means the worker hung
    max_consecutive_failures: int = 5  # batches failing in a row before the worker stops
    max_inputs: int = 2048  # OpenAI's own limit per request; admission by tokens guards the memory
    max_text_chars: int = 32_768
    max_instruction_chars: int = 4096  # checked before tokenizing: an instruction is copied into every text
    max_message_bytes: int = 8 * 1024 * 1024
    # An image's pixels, read from its header before it is decoded (one image is decoded at
    # a time, so this bounds what decoding holds: 4 bytes a pixel at most).
    max_image_pixels: int = 50_000_000
    body_timeout_s: float = 15.0  # an HTTP request body must arrive within this, else 408
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    grace_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_size", "max_inputs", "max_text_chars", "max_instruction_chars",
                     "max_message_bytes", "max_image_pixels",
                     "max_concurrent_rpcs", "max_consecutive_failures"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue_tokens is not None and self.max_queue_tokens < 1:
            raise InvalidInputError(f"max_queue_tokens must be at least 1, got {self.max_queue_tokens}")
        if self.max_wait_ms < 0 or self.max_batch_ms < 0 or self.grace_s < 0 or self.load_wait_s < 0:
            raise InvalidInputError("max_wait_ms, max_batch_ms, grace_s and load_wait_s must not be negative")
        if self.run_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise InvalidInputError("run_timeout_s and body_timeout_s must be positive")
        if self.token is not None and not self.token.strip():
            # `--token "$TOKEN"` with the variable unset must not serve without auth.
            raise InvalidInputError("the bearer token is empty: give a token, or leave the option out to serve "
                                    "without one")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise InvalidInputError(f"memory_budget must be positive, got {self.memory_budget}")
        for name in ("bundle", "pin"):
            if isinstance(getattr(self, name), (str, Path)):
                object.__setattr__(self, name, (str(getattr(self, name)),))
            else:
                object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise InvalidInputError(f"{name} {value} is not a TCP port")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInputError("TLS needs both tls_cert and tls_key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidInputError("mutual TLS (tls_client_ca) needs tls_cert and tls_key")

    @property
    def open_to_network(self) -> bool:
        """Whether it listens beyond loopback with neither a token nor TLS: anyone on the
        network may use it."""
        loopback = self.host in ("localhost", "::1") or self.host.startswith("127.")
        return not loopback and self.token is None and self.tls_cert is None

    @property
    def limits(self) -> BatchLimits:
        return BatchLimits(max_batch_tokens=self.max_batch_tokens, max_batch_size=self.max_batch_size)

    def model_threads(self) -> int:
        """Threads per model run: as set, else the usable cores less one, which the event
        loop and gRPC need (measured: two ONNX Runtime threads on two cores beside them
        serve fewer texts per second than one)."""
        from ..platform import usable_cpu_count

        return self.threads if self.threads is not None else max(1, usable_cpu_count() - 1)

    @property
    def queue_tokens(self) -> int:
        """The queued-token limit per model (admission happens against it before tokenizing)."""
        return self.max_queue_tokens if self.max_queue_tokens is not None else 16 * self.max_batch_tokens

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> ServerConfig:
        """Flags that are not None win, then EDGE_EMBED_<FIELD> variables, then defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if flags.get(field.name) is not None:
                values[field.name] = flags[field.name]
            elif (raw := env.get(ENV_PREFIX + field.name.upper())) not in (None, ""):
                values[field.name] = _convert(field.name, field.type, raw)
        return cls(**values)


def _convert(name: str, type_name: str, raw: str) -> Any:
    """An environment string as the field's type (annotations are strings here)."""
    if name == "memory_budget":
        try:
            return parse_bytes(raw)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{ENV_PREFIX}MEMORY_BUDGET: {exc}") from None
    try:
        if type_name.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
        if type_name.startswith("Path"):
            return Path(raw)
    except ValueError:
        raise InvalidInputError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {type_name.split()[0]}") from None
    return raw


def parse_bytes(text: str | int) -> int:
    """'2GiB', '1500MB', '512M', '1073741824' -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
             "kib": 1024, "mib": _MiB, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise InvalidInputError(f"{text!r} is not a size: use bytes or a unit such as 1500MB or 2GiB")
    return int(value * units[unit])
