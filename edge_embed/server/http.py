"""The OpenAI-compatible HTTP API: a peer adapter over the core (core.py), beside gRPC.

It runs on the gRPC server's event loop and calls the same `EmbeddingService`, so one
pool, one batcher per model, one set of limits and one memory budget serve both: an HTTP
request and a gRPC request can share a batch. Errors come from the one error tree, with
the HTTP status each class names and OpenAI's error body. aiohttp is imported only when
the HTTP port is on.

A body is charged to the request memory as its bytes arrive, never before, and must
arrive within `body_timeout_s` (else 408); at most half the concurrency slots may be
waiting for bodies, so idle clients can neither hold the memory budget nor every slot.

Routes: POST /v1/embeddings, POST /v1/rerank (the Cohere/Jina rerank shape that vLLM and
TEI clients speak), GET /v1/models (bearer token, as gRPC), GET /health and GET /ready
(open, as gRPC health checks).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import re
import ssl
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from aiohttp import web

from ..errors import (
    EdgeEmbedError,
    InvalidInputError,
    OverloadedError,
    RequestTimeoutError,
    RequestTooLargeError,
    UnauthenticatedError,
    http_status_of,
    retry_after_ms_of,
)
from .config import ServerConfig
from .core import (REQUEST_ID, EmbeddingService, EmbedInput, Reservation, bearer_matches, new_request_id,
                   public_message)

__all__ = ["HttpTransport"]

log = logging.getLogger(__name__)

# Every field /v1/embeddings reads. Any other field is refused: a client that sends, say,
# `input_type: "query"` to another server's API must not get document vectors silently.
EMBEDDINGS_FIELDS = ("input", "messages", "model", "dimensions", "encoding_format", "user", "instruction", "truncate",
                     "input_type")
RERANK_FIELDS = ("query", "documents", "model", "top_n", "return_documents", "instruction", "user")
_OPEN_PATHS = ("/health", "/ready")
_ROUTES = ("/v1/embeddings", "/v1/rerank", "/v1/models", "/health", "/ready")
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON "\ud800" escapes make strings that are not Unicode text
_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
_BUSY_RETRY_MS = 200
_MAX_MODEL_CHARS = 256
# Routes that run a model: each takes one of max_concurrent_rpcs, shared with gRPC.
_MODEL_ROUTES = ("/v1/embeddings", "/v1/rerank")
_TEXT_PARTS = ("text", "input_text")
_IMAGE_PARTS = ("image_url", "input_image")
_DATA_URI = re.compile(r"data:(image/[A-Za-z0-9.+-]+)?(;[^,;]*)*;base64,", re.ASCII)


def error_body(status: int, message: str, code: str) -> dict[str, Any]:
    """OpenAI's error shape; `code` is the gRPC status name, the same on both transports."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_json_bytes(payload), status=status, headers=headers, content_type="application/json")


def _error_response(exc: BaseException) -> web.Response:
    status, message = http_status_of(exc), public_message(exc)
    code = exc.grpc_code if isinstance(exc, EdgeEmbedError) else "INTERNAL"
    headers = {}
    hint = retry_after_ms_of(exc)
    if hint is not None:
        headers["Retry-After"] = str(max(1, math.ceil(hint / 1000)))  # whole seconds (RFC 9110)
        headers["retry-after-ms"] = str(int(hint))  # finer, read by the openai client
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return _json_response(error_body(status, message, code), status, headers)


def _reject_constant(name: str) -> Any:
    raise InvalidInputError(f"the body holds {name}, which is not JSON")


def _optional(payload: dict, name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidInputError(f"{name} must be {what}, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _texts(value: Any) -> list[str]:
    """`input` as a list of texts; token ids are refused with a hint, since the model's own
    tokenizer must make them."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list):
        texts = value
    elif value is None:
        raise InvalidInputError("input is required: a string or an array of strings")
    else:
        raise InvalidInputError(f"input must be a string or an array of strings, got {_json_type(value)}")
    for i, text in enumerate(texts):
        if isinstance(text, str):
            if _SURROGATE.search(text):
                raise InvalidInputError(f"input[{i}] holds an unpaired surrogate (\\ud800-\\udfff): not valid text")
            continue
        if isinstance(text, (int, list)) and not isinstance(text, bool):
            raise InvalidInputError(
                "input holds token ids; edge-embed tokenizes with the model's own tokenizer, so send text "
                "(LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False))")
        raise InvalidInputError(f"input[{i}] must be a string, got {_json_type(text)}")
    return texts


class _ImageRef:
    """An image part's data URI, kept encoded until the request is admitted."""

    __slots__ = ("uri", "field")

    def __init__(self, uri: str, field: str):
        self.uri, self.field = uri, field

    def open(self, service: EmbeddingService) -> Any:
        match = _DATA_URI.match(self.uri)
        try:
            data = base64.b64decode(self.uri[match.end():], validate=True)
        except ValueError:
            raise InvalidInputError(f"{self.field} is not valid base64 after its data: prefix") from None
        return service.open_image(data, self.field)


def _image_uri(part: dict, field: str) -> _ImageRef:
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise InvalidInputError(f'{field}.image_url must be {{"url": "data:image/...;base64,..."}} or that string')
    if not _DATA_URI.match(url[:256]):
        if url[:8].lower().startswith(("http://", "https://")):
            raise InvalidInputError(f"{field}: this server does not fetch image URLs; send the image inline as "
                                    "a data URI (data:image/png;base64,...)")
        raise InvalidInputError(f"{field}.image_url must be a base64 data URI (data:image/png;base64,...)")
    return _ImageRef(url, f"{field}.image_url")


def _part(part: Any, field: str) -> str | _ImageRef:
    """One OpenAI content part: {"type": "text", "text": ...} or {"type": "image_url", ...}."""
    if not isinstance(part, dict):
        raise InvalidInputError(f"{field} must be a string or a content part object, got {_json_type(part)}")
    kind = part.get("type")
    if kind in _TEXT_PARTS:
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidInputError(f"{field}.text must be a string, got {_json_type(text)}")
        if _SURROGATE.search(text):
            raise InvalidInputError(f"{field}.text holds an unpaired surrogate (\\ud800-\\udfff): not valid text")
        return text
    if kind in _IMAGE_PARTS:
        return _image_uri(part, field)
    raise InvalidInputError(f"{field}.type must be one of {', '.join((*_TEXT_PARTS, *_IMAGE_PARTS))}, got "
                            f"{str(kind)[:40]!r}")


def _typed_input(value: Any, field: str) -> str | _ImageRef | list[str | _ImageRef]:
    """An `input` item that is a content part, or a list of them (one input of its parts,
    in order; a list of one part is that part)."""
    if isinstance(value, dict):
        return _part(value, field)
    if not value:
        raise InvalidInputError(f"{field} is an empty list of content parts")
    parts = [_part(p, f"{field}[{j}]") for j, p in enumerate(value)]
    return parts[0] if len(parts) == 1 else parts


def _messages(value: Any) -> list[str | _ImageRef | list[str | _ImageRef]]:
    """vLLM's chat form: the user messages' content, in order, as one input."""
    if not isinstance(value, list) or not value:
        raise InvalidInputError("messages must be a non-empty array of chat messages")
    parts: list[str | _ImageRef] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ("user", "system"):
            raise InvalidInputError(f'messages[{i}] must be a {{"role": "user", "content": ...}} object')
        if message["role"] != "user":
            raise InvalidInputError(f"messages[{i}]: a system message is the model's instruction; send it as "
                                    "`instruction`")
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list) and content:
            parts += [_part(p, f"messages[{i}].content[{j}]") for j, p in enumerate(content)]
        else:
            raise InvalidInputError(f"messages[{i}].content must be a string or an array of content parts")
    return [parts[0] if len(parts) == 1 else parts]


def _inputs(payload: dict) -> tuple[list[Any], int]:
    """`input` (or `messages`) as a list of inputs, images still encoded, and how many
    images they hold."""
    if "messages" in payload:
        if "input" in payload:
            raise InvalidInputError("send input or messages, not both")
        items = _messages(payload["messages"])
    else:
        value = payload.get("input")
        if isinstance(value, list) and any(isinstance(v, (dict, list)) and not _token_ids(v) for v in value):
            items = [_plain_text(v, f"input[{i}]") if isinstance(v, str) else _typed_input(v, f"input[{i}]")
                     for i, v in enumerate(value)]
        else:
            items = _texts(value)
    images = sum(1 for item in items for p in (item if isinstance(item, list) else [item]) if isinstance(p, _ImageRef))
    return items, images


def _plain_text(text: str, field: str) -> str:
    if _SURROGATE.search(text):
        raise InvalidInputError(f"{field} holds an unpaired surrogate (\\ud800-\\udfff): not valid text")
    return text


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def _opened(items: list[Any], service: EmbeddingService) -> list[EmbedInput]:
    """Images decoded from their data URIs and their headers checked (nothing decoded yet)."""
    def one(p: Any) -> Any:
        return p.open(service) if isinstance(p, _ImageRef) else p

    return [[one(p) for p in item] if isinstance(item, list) else one(item) for item in items]


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string, got {_json_type(value)}")
    if _SURROGATE.search(value):
        raise InvalidInputError(f"{name} holds an unpaired surrogate (\\ud800-\\udfff): not valid text")
    return value


def _rerank_input(value: Any, field: str) -> str | _ImageRef | list[str | _ImageRef]:
    """A rerank query or document: a string, {"text": string} (Cohere's shape), or, for a
    reranker that reads images, a content part, a list of them, or {"content": [parts]}
    (vLLM's multimodal score shape)."""
    if isinstance(value, str):
        return _plain_text(value, field)
    if isinstance(value, dict) and "type" not in value:
        if set(value) == {"text"}:
            return _text(value["text"], f"{field}.text")
        if set(value) == {"content"} and isinstance(value["content"], list):
            return _typed_input(value["content"], f"{field}.content")
        raise InvalidInputError(f'{field} must be a string, {{"text": string}}, a content part, an array of content '
                                f'parts or {{"content": [parts]}}')
    if isinstance(value, (dict, list)):
        return _typed_input(value, field)
    raise InvalidInputError(f"{field} must be a string, a content part or an array of them, got {_json_type(value)}")


def _documents(value: Any) -> list[str | _ImageRef | list[str | _ImageRef]]:
    """`documents`: texts (strings, or objects with a `text` field: Cohere's shape), and for a
    reranker that reads images, content parts or lists of them."""
    if not isinstance(value, list):
        raise InvalidInputError(f"documents must be an array, got {_json_type(value)}"
                                if value is not None else "documents is required: an array of strings")
    return [_rerank_input(item, f"documents[{i}]") for i, item in enumerate(value)]


def _images_in(items: list[Any]) -> int:
    return sum(1 for item in items for p in (item if isinstance(item, list) else [item]) if isinstance(p, _ImageRef))


def _check_fields(payload: Any, route: str, fields: tuple[str, ...]) -> dict:
    if not isinstance(payload, dict):
        raise InvalidInputError(f"the body must be a JSON object, got {_json_type(payload)}")
    unknown = sorted(set(payload) - set(fields))
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise InvalidInputError(f"unknown field(s) {shown}; {route} takes {', '.join(fields)}")
    return payload


def _model_name(payload: dict) -> str:
    model = _optional(payload, "model", str, "a string") or ""
    if len(model) > _MAX_MODEL_CHARS:
        raise InvalidInputError(f"model is {len(model)} characters; no model name is over {_MAX_MODEL_CHARS}")
    return model


class HttpTransport:
    """The aiohttp application and its listening socket, bound to one EmbeddingService."""

    def __init__(self, service: EmbeddingService, config: ServerConfig, *, serving: Callable[[], bool],
                 alive: Callable[[], bool]):
        self.service, self.config = service, config
        self._serving, self._alive = serving, alive
        self._token = config.token.encode() if config.token else None
        self._reading = 0  # requests whose body is arriving
        self._max_reading = max(1, config.max_concurrent_rpcs // 2)
        self._created = int(time.time())
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        app = web.Application(middlewares=[self._boundary], client_max_size=config.max_message_bytes)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/rerank", self._rerank)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        self.app = app

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port); returns the bound port."""
        # Compressed bodies are refused rather than inflated past the size limit; the access
        # log would put every request on the console; a client that goes away cancels its
        # request (it leaves the queue); idle keep-alive connections close after 75 s
        # (aiohttp's default is an hour), so idle clients cannot pile up file descriptors; an
        # answer given before the body was read (408, 413, 401) reads what is still coming
        # for 2 s, not aiohttp's 10, so an idle body's connection cannot hold a drain.
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None, auto_decompress=False,
                               handler_cancellation=True, shutdown_timeout=self.config.grace_s,
                               keepalive_timeout=75.0, lingering_time=2.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=self._ssl_context(), reuse_port=False)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening, then give in-flight requests up to the drain grace."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            if grace is not None:
                runner._shutdown_timeout = grace  # noqa: SLF001 - aiohttp takes it at construction only
            await runner.cleanup()

    def _ssl_context(self) -> ssl.SSLContext | None:
        c = self.config
        if c.tls_cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(c.tls_cert), str(c.tls_key))
        if c.tls_client_ca is not None:
            context.load_verify_locations(cafile=str(c.tls_client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    # -- the boundary: auth, concurrency, errors, metrics ------------------------------

    @web.middleware
    async def _boundary(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        path = request.path if request.path in _ROUTES else "other"
        method = f"HTTP {path}"
        REQUEST_ID.set(new_request_id())
        try:
            if path not in _OPEN_PATHS:
                self._authenticate(request)
            if path in _MODEL_ROUTES:
                with self.service.slot():
                    response = await handler(request)
            else:
                response = await handler(request)
        except asyncio.CancelledError:  # the client went away
            self.service.metrics.requests.labels(method, "CANCELLED").inc()
            raise
        except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method
            response = self._http_exception(exc)
        except Exception as exc:  # noqa: BLE001 - every error becomes an answer, never a crash
            self.service.refused(exc)
            response = _error_response(exc)
        response.headers["x-request-id"] = REQUEST_ID.get()
        self.service.metrics.requests.labels(method, str(response.status)).inc()
        return response

    def _authenticate(self, request: web.Request) -> None:
        if self._token is None:
            return
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not bearer_matches(given, self._token):
            raise UnauthenticatedError("missing or wrong bearer token (header 'Authorization: Bearer <token>')")

    @staticmethod
    def _http_exception(exc: web.HTTPException) -> web.Response:
        if exc.status == 413:
            error: EdgeEmbedError = RequestTooLargeError(f"the request body is over the limit: {exc.text}")
            return _error_response(error)
        codes = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}
        message = {404: f"no such route; this server has {', '.join(_ROUTES)}",
                   405: "method not allowed on this route"}.get(exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _json_response(error_body(exc.status, message, codes.get(exc.status, "INVALID_ARGUMENT")),
                              exc.status, headers)

    # -- routes -----------------------------------------------------------------------

    async def _read_body(self, request: web.Request, reservation: Reservation) -> bytes:
        """The body, charged to the request memory chunk by chunk as it arrives, within
        the size limit and `body_timeout_s`."""
        limit = self.config.max_message_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise RequestTooLargeError(f"the request is {declared} bytes; the limit is {limit}")
        if self._reading >= self._max_reading:
            raise OverloadedError(
                f"{self._reading} request bodies are arriving; the limit is {self._max_reading}: retry after "
                f"{_BUSY_RETRY_MS} ms", retry_after_ms=_BUSY_RETRY_MS, cause="bodies")
        chunks: list[bytes] = []

        async def receive() -> None:
            total = 0
            async for chunk in request.content.iter_any():
                total += len(chunk)
                if total > limit:
                    raise RequestTooLargeError(f"the request body is over the limit of {limit} bytes")
                reservation.grow(len(chunk))
                chunks.append(chunk)

        self._reading += 1
        try:
            await asyncio.wait_for(receive(), self.config.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"the request body did not arrive within {self.config.body_timeout_s:g} s "
                                      f"({sum(map(len, chunks))} bytes came)") from None
        finally:
            self._reading -= 1
        return b"".join(chunks)

    async def _read_json(self, request: web.Request, reservation: Reservation) -> tuple[Any, int]:
        """The body as JSON, within the size limit; returns it and its size on the wire."""
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise InvalidInputError(f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed")
        body = await self._read_body(request, reservation)
        nbytes = len(body)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"the body is not UTF-8: {exc}") from None
        del body
        try:
            return json.loads(text, parse_constant=_reject_constant), nbytes
        except RecursionError:
            raise InvalidInputError("the body's JSON is nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
            if isinstance(exc, EdgeEmbedError):
                raise
            raise InvalidInputError(f"the body is not valid JSON: {exc}") from None

    @contextlib.asynccontextmanager
    async def _body(self, request: web.Request, route: str, fields: tuple[str, ...]):
        """The JSON object of a request, its size on the wire, and the request memory it
        holds (charged as the body arrives, released when the request is answered)."""
        reservation = self.service.memory.reserve(0)
        try:
            # Popped, not named: a handler's `del payload` must free the body's strings.
            parsed = list(await self._read_json(request, reservation))
            nbytes = parsed.pop()
            yield _check_fields(parsed.pop(), route, fields), nbytes
        finally:
            reservation.release()

    async def _embeddings(self, request: web.Request) -> web.Response:
        async with self._body(request, "/v1/embeddings", EMBEDDINGS_FIELDS) as (payload, nbytes):
            items, images = _inputs(payload)
            model = _model_name(payload)
            dimensions = _optional(payload, "dimensions", int, "a positive integer")
            if dimensions is not None and dimensions < 1:
                raise InvalidInputError(f"dimensions must be a positive integer, got {dimensions}")
            encoding = _optional(payload, "encoding_format", str, '"float" or "base64"')
            encoding = "float" if encoding is None else encoding
            if encoding not in ("float", "base64"):
                raise InvalidInputError(f'encoding_format must be "float" or "base64", got {encoding[:40]!r}')
            _optional(payload, "user", str, "a string")
            instruction = _optional(payload, "instruction", str, "a string") or ""
            if _SURROGATE.search(instruction):
                raise InvalidInputError("instruction holds an unpaired surrogate (\\ud800-\\udfff): not valid text")
            truncate = _optional(payload, "truncate", bool, "a boolean")
            input_type = _optional(payload, "input_type", str, '"query" or "document"')
            field = "messages" if "messages" in payload else "input"
            del payload
            done = await self.service.embed_texts(
                model, len(items), nbytes, lambda: _opened(items, self.service), instruction=instruction,
                dimensions=dimensions, truncate=True if truncate is None else truncate, field=field,
                images=images, input_type=input_type,
                # The vectors and their JSON text: up to ~16 characters a float, or 4/3 bytes of base64 per byte.
                answer_bytes_per_value=4 + (6 if encoding == "base64" else 18))
        try:
            return await self._embeddings_response(done, encoding)
        finally:
            done.release()

    async def _embeddings_response(self, done: Any, encoding: str) -> web.Response:
        tokens = sum(done.token_counts)
        multi = done.vectors.dtype == object
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}

        def item(i: int, v: np.ndarray) -> dict[str, Any]:
            """One input's answer: a vector, or a multi-vector model's [tokens, dim] matrix in
            base64 with its shape and dtype."""
            out: dict[str, Any] = {"object": "embedding", "index": i}
            if encoding == "base64":  # little-endian float32, as OpenAI sends it
                out["embedding"] = base64.b64encode(v.astype("<f4", copy=False).tobytes()).decode("ascii")
                if multi:
                    out.update(shape=list(v.shape), dtype="float32")
            else:
                out["embedding"] = v.tolist()  # float32 values; their repr reads back exactly
            return out

        def build() -> bytes:
            if multi and encoding == "float":
                # 2-D arrays (vLLM's pooling shape), written row by row: a page's hundreds of
                # thousands of values never live as Python floats all at once.
                data = ",".join(
                    f'{{"object":"embedding","index":{i},"embedding":['
                    + ",".join(_json_bytes(row.tolist()).decode() for row in v) + "]}"
                    for i, v in enumerate(done.vectors))
                return (f'{{"object":"list","data":[{data}],"model":{_json_bytes(done.model).decode()},'
                        f'"usage":{_json_bytes(usage).decode()}}}').encode()
            return _json_bytes({"object": "list", "data": [item(i, v) for i, v in enumerate(done.vectors)],
                                "model": done.model, "usage": usage})

        body = await self.service.shape(sum(v.size for v in done.vectors) if multi else done.vectors.size, build)
        return web.Response(body=body, content_type="application/json")

    async def _rerank(self, request: web.Request) -> web.Response:
        async with self._body(request, "/v1/rerank", RERANK_FIELDS) as (payload, nbytes):
            if "query" not in payload:
                raise InvalidInputError("query is required: a string")
            query = _rerank_input(payload["query"], "query")
            documents = _documents(payload.get("documents"))
            model = _model_name(payload)
            top_n = _optional(payload, "top_n", int, "a positive integer")
            return_documents = bool(_optional(payload, "return_documents", bool, "a boolean"))
            instruction = _text(payload.get("instruction") or "", "instruction")
            _optional(payload, "user", str, "a string")
            # A document that is not a text comes back as it was sent.
            sent = payload["documents"] if return_documents else None
            del payload
            done = await self.service.rerank_documents(
                model, _opened([query], self.service)[0], len(documents), nbytes,
                lambda: _opened(documents, self.service), instruction=instruction, top_n=top_n,
                return_documents=return_documents, images=_images_in(documents))
        results = []
        for r in done.results:
            row: dict[str, Any] = {"index": r.index, "relevance_score": r.score}
            if return_documents:
                document = documents[r.index]
                row["document"] = {"text": document} if isinstance(document, str) else sent[r.index]
            results.append(row)
        tokens = sum(done.token_counts)
        return _json_response({"model": done.model, "results": results,
                               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": s.name, "object": "model", "created": self._created, "owned_by": "edge-embed",
                 "model_id": s.model_id, "state": s.state.value, "precision": s.precision, "task": s.task}
                for s in self.service.pool.status()]
        return _json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        """Liveness: the process answers and no model worker has stopped (draining is alive)."""
        alive = self._alive()
        return _json_response({"status": "ok" if alive else "stopped"}, 200 if alive else 503)

    async def _ready(self, request: web.Request) -> web.Response:
        """Readiness: gRPC health is SERVING (warmed up, not draining, no worker stopped)."""
        serving = self._serving()
        return _json_response({"status": "SERVING" if serving else "NOT_SERVING"}, 200 if serving else 503)
