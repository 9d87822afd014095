from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MatrixDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MATRIX_DTYPE_FLOAT32: _ClassVar[MatrixDtype]
    MATRIX_DTYPE_FLOAT16: _ClassVar[MatrixDtype]

class VectorFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VECTOR_FORMAT_FLOATS: _ClassVar[VectorFormat]
    VECTOR_FORMAT_PACKED: _ClassVar[VectorFormat]
MATRIX_DTYPE_FLOAT32: MatrixDtype
MATRIX_DTYPE_FLOAT16: MatrixDtype
VECTOR_FORMAT_FLOATS: VectorFormat
VECTOR_FORMAT_PACKED: VectorFormat

class EmbedRequest(_message.Message):
    __slots__ = ("inputs", "instruction", "dimensions", "normalize", "truncate", "model", "request_id", "vector_format", "items", "input_type", "matrix_dtype")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FORMAT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    MATRIX_DTYPE_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    instruction: str
    dimensions: int
    normalize: bool
    truncate: bool
    model: str
    request_id: str
    vector_format: VectorFormat
    items: _containers.RepeatedCompositeFieldContainer[Input]
    input_type: str
    matrix_dtype: MatrixDtype
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., instruction: _Optional[str] = ..., dimensions: _Optional[int] = ..., normalize: _Optional[bool] = ..., truncate: _Optional[bool] = ..., model: _Optional[str] = ..., request_id: _Optional[str] = ..., vector_format: _Optional[_Union[VectorFormat, str]] = ..., items: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., input_type: _Optional[str] = ..., matrix_dtype: _Optional[_Union[MatrixDtype, str]] = ...) -> None: ...

class TokenMatrix(_message.Message):
    __slots__ = ("rows", "dim", "dtype", "data")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    rows: int
    dim: int
    dtype: str
    data: bytes
    def __init__(self, rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("text", "image", "parts")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    parts: Parts
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ..., parts: _Optional[_Union[Parts, _Mapping]] = ...) -> None: ...

class Parts(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[Part]
    def __init__(self, parts: _Optional[_Iterable[_Union[Part, _Mapping]]] = ...) -> None: ...

class Part(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "token_counts", "model", "dimensions", "queue_ms", "inference_ms", "packed", "matrices")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    MATRICES_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    model: str
    dimensions: int
    queue_ms: float
    inference_ms: float
    packed: bytes
    matrices: _containers.RepeatedCompositeFieldContainer[TokenMatrix]
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., token_counts: _Optional[_Iterable[int]] = ..., model: _Optional[str] = ..., dimensions: _Optional[int] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., packed: _Optional[bytes] = ..., matrices: _Optional[_Iterable[_Union[TokenMatrix, _Mapping]]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class EmbedStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: EmbedResponse
    error: StreamError
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[EmbedResponse, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("query", "documents", "instruction", "top_n", "model", "return_documents", "query_item", "document_items")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RETURN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    QUERY_ITEM_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ITEMS_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    instruction: str
    top_n: int
    model: str
    return_documents: bool
    query_item: Input
    document_items: _containers.RepeatedCompositeFieldContainer[Input]
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., instruction: _Optional[str] = ..., top_n: _Optional[int] = ..., model: _Optional[str] = ..., return_documents: _Optional[bool] = ..., query_item: _Optional[_Union[Input, _Mapping]] = ..., document_items: _Optional[_Iterable[_Union[Input, _Mapping]]] = ...) -> None: ...

class RerankResult(_message.Message):
    __slots__ = ("index", "score", "document", "document_item")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ITEM_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    document: str
    document_item: Input
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., document: _Optional[str] = ..., document_item: _Optional[_Union[Input, _Mapping]] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("results", "token_counts", "model", "queue_ms", "inference_ms")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RerankResult]
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    model: str
    queue_ms: float
    inference_ms: float
    def __init__(self, results: _Optional[_Iterable[_Union[RerankResult, _Mapping]]] = ..., token_counts: _Optional[_Iterable[int]] = ..., model: _Optional[str] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("inputs", "instruction", "model")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    instruction: str
    model: str
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., instruction: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("tokens", "token_counts")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenIds]
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ..., token_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class BatchingLimits(_message.Message):
    __slots__ = ("max_batch_tokens", "max_batch_size", "max_wait_ms", "max_inputs_per_request", "max_text_chars", "max_queue_tokens", "max_concurrent_rpcs", "run_timeout_s", "max_instruction_chars", "max_batch_ms")
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_RPCS_FIELD_NUMBER: _ClassVar[int]
    RUN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_INSTRUCTION_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_MS_FIELD_NUMBER: _ClassVar[int]
    max_batch_tokens: int
    max_batch_size: int
    max_wait_ms: float
    max_inputs_per_request: int
    max_text_chars: int
    max_queue_tokens: int
    max_concurrent_rpcs: int
    run_timeout_s: float
    max_instruction_chars: int
    max_batch_ms: float
    def __init__(self, max_batch_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_wait_ms: _Optional[float] = ..., max_inputs_per_request: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., max_queue_tokens: _Optional[int] = ..., max_concurrent_rpcs: _Optional[int] = ..., run_timeout_s: _Optional[float] = ..., max_instruction_chars: _Optional[int] = ..., max_batch_ms: _Optional[float] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "dim", "min_dim", "max_length", "precision", "backend", "execution_providers", "instruction_aware", "default_instruction", "batching", "version", "models", "memory", "task", "modalities")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MIN_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_AWARE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    model: str
    dim: int
    min_dim: int
    max_length: int
    precision: str
    backend: str
    execution_providers: _containers.RepeatedScalarFieldContainer[str]
    instruction_aware: bool
    default_instruction: str
    batching: BatchingLimits
    version: str
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    memory: MemoryBudget
    task: str
    modalities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., dim: _Optional[int] = ..., min_dim: _Optional[int] = ..., max_length: _Optional[int] = ..., precision: _Optional[str] = ..., backend: _Optional[str] = ..., execution_providers: _Optional[_Iterable[str]] = ..., instruction_aware: _Optional[bool] = ..., default_instruction: _Optional[str] = ..., batching: _Optional[_Union[BatchingLimits, _Mapping]] = ..., version: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., memory: _Optional[_Union[MemoryBudget, _Mapping]] = ..., task: _Optional[str] = ..., modalities: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "model_id", "state", "pinned", "precision", "charged_bytes", "charged_from", "resident_measured_bytes", "loads", "evictions", "requests", "parity_cos_min", "parity_ok", "error", "task")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    CHARGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHARGED_FROM_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_MEASURED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PARITY_COS_MIN_FIELD_NUMBER: _ClassVar[int]
    PARITY_OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_id: str
    state: str
    pinned: bool
    precision: str
    charged_bytes: int
    charged_from: str
    resident_measured_bytes: int
    loads: int
    evictions: int
    requests: int
    parity_cos_min: float
    parity_ok: bool
    error: str
    task: str
    def __init__(self, name: _Optional[str] = ..., model_id: _Optional[str] = ..., state: _Optional[str] = ..., pinned: _Optional[bool] = ..., precision: _Optional[str] = ..., charged_bytes: _Optional[int] = ..., charged_from: _Optional[str] = ..., resident_measured_bytes: _Optional[int] = ..., loads: _Optional[int] = ..., evictions: _Optional[int] = ..., requests: _Optional[int] = ..., parity_cos_min: _Optional[float] = ..., parity_ok: _Optional[bool] = ..., error: _Optional[str] = ..., task: _Optional[str] = ...) -> None: ...

class MemoryBudget(_message.Message):
    __slots__ = ("budget_bytes", "committed_bytes", "base_bytes", "rss_bytes", "requests_bytes")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BASE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    committed_bytes: int
    base_bytes: int
    rss_bytes: int
    requests_bytes: int
    def __init__(self, budget_bytes: _Optional[int] = ..., committed_bytes: _Optional[int] = ..., base_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., requests_bytes: _Optional[int] = ...) -> None: ...
