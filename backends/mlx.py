"""MLX backend: the encoder's forward pass written in MLX, over the bundle's own weights.

The bundle's `model.mlx-*.safetensors` holds the Hugging Face state dict of the encoder
and `config.json` its Hugging Face config; this module rebuilds the BERT-family and Qwen3
forward passes from them, with the pooling the manifest names. For a Qwen3-VL embedder the
weights are its language model's and the backend runs the text path (texts through the chat
template; images need the ONNX variants, whose vision graph this backend does not have).
On Apple Silicon MLX runs on the GPU; the Linux CPU build (`mlx[cpu]`) runs the same code
for tests and export gates.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..batching import BatchLimits
from ..bundle import Bundle
from ..errors import BackendUnavailableError, BundleError
from ..manifest import ONNX_PRECISIONS, Manifest
from ..provider import BundleEmbedder
from ..tokenization import model_inputs
from ..vl import VLInput, text_feeds

__all__ = ["MlxEncoder", "MlxProvider", "SUPPORTED_ARCHITECTURES"]

CONFIG_FILE = "config.json"

# Added to the scores of masked keys. Finite, so that a query row with every key masked
# (a pad row under left padding) gets uniform weights instead of NaN, and small enough in
# magnitude that score + mask stays finite in float16 (whose range ends at 65504).
_MASKED = -30000.0

# MLX prefers the half-precision weights where it runs on a GPU; on a CPU they still halve
# the memory, and the manifest records their parity like any other variant's.
_AUTO_ORDER = ("mlx-fp16", "mlx-fp32")


@functools.cache
def _mlx_problem() -> str | None:
    install = 'pip install "mlx[cpu]"' if sys.platform.startswith("linux") else "pip install mlx"
    try:
        import mlx.core as mx

        mx.eval(mx.array([1.0, 2.0]) * 2)
    except ImportError as exc:
        return f"mlx cannot be imported ({exc}); install it with {install}"
    except Exception as exc:  # a broken install fails in native code with any exception type
        return f"mlx is installed but cannot run ({type(exc).__name__}: {exc}); reinstall it with {install}"
    return None


class _Tensors:
    """The safetensors state dict by Hugging Face name; a missing name is a BundleError.

    Projection matrices (every 2-D tensor but the embedding tables) are held transposed,
    [in, out], once `materialize` has run: MLX's CPU matmul is several times slower on a
    transposed operand, and on a GPU the layout costs nothing.
    """

    def __init__(self, path: Path):
        import mlx.core as mx

        try:
            self._arrays: dict[str, Any] = mx.load(str(path))
        except Exception as exc:  # mlx raises RuntimeError/ValueError for unreadable files
            raise BundleError(f"MLX cannot read the weights {path.name}: {exc}") from exc
        self._name = path.name
        table = "embed_tokens.weight" if "embed_tokens.weight" in self._arrays else "embeddings.word_embeddings.weight"
        self.dtype = self[table].dtype
        if not mx.issubdtype(self.dtype, mx.floating):
            raise BundleError(f"{path.name} holds {self.dtype} embeddings, not floating point")

    def __getitem__(self, name: str) -> Any:
        try:
            return self._arrays[name]
        except KeyError:
            raise BundleError(f"{self._name} has no tensor {name!r}, which config.json implies") from None

    def get(self, name: str) -> Any | None:
        return self._arrays.get(name)

    def require(self, names: list[str]) -> None:
        """Fail at load, naming what is missing, rather than at the first request."""
        missing = [n for n in names if n not in self._arrays]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise BundleError(f"{self._name} lacks tensors that config.json implies: {shown}")

    def linear(self, x: Any, name: str) -> Any:
        """The projection `name` (x @ W + b; no bias where the model has none)."""
        y = x @ self[f"{name}.weight"]
        bias = self.get(f"{name}.bias")
        return y if bias is None else y + bias

    def materialize(self) -> None:
        """Read every tensor now: cold-start cost up front, and arrays usable from any thread."""
        import mlx.core as mx

        for name in list(self._arrays):
            if name.startswith("pooler."):  # BERT's NSP head; pooling is the manifest's
                del self._arrays[name]
                continue
            array = self._arrays[name]
            if array.ndim == 2 and "embed" not in name:
                array = mx.contiguous(array.T)
            mx.eval(array)  # one tensor at a time, so the peak is the model plus one matrix
            self._arrays[name] = array


def _activation(name: str) -> Callable[[Any], Any]:
    import mlx.core as mx

    def gelu(x):
        return 0.5 * x * (1.0 + mx.erf(x * (1.0 / math.sqrt(2.0))))

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))

    def silu(x):
        return x * mx.sigmoid(x)

    table = {
        "gelu": gelu,
        "gelu_new": gelu_tanh,
        "gelu_pytorch_tanh": gelu_tanh,
        "relu": lambda x: mx.maximum(x, 0),
        "silu": silu,
        "swish": silu,
    }
    try:
        return table[name]
    except KeyError:
        raise BundleError(
            f"config.json asks for activation {name!r}; the MLX backend knows {', '.join(table)}"
        ) from None


def _heads(x: Any, count: int, size: int) -> Any:
    """[batch, seq, count * size] -> [batch, count, seq, size]."""
    batch, seq, _ = x.shape
    return x.reshape(batch, seq, count, size).transpose(0, 2, 1, 3)


def _merge_heads(x: Any) -> Any:
    """[batch, heads, seq, size] -> [batch, seq, heads * size]."""
    batch, heads, seq, size = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, seq, heads * size)


def _attend(q: Any, k: Any, v: Any, additive_mask: Any) -> Any:
    """Scaled dot-product attention; MLX's kernel takes grouped K/V as is and softmaxes in float32."""
    import mlx.core as mx

    return mx.fast.scaled_dot_product_attention(
        q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), mask=additive_mask
    )


def _additive_mask(allowed: np.ndarray, dtype: Any) -> Any:
    """0 where a query may see a key, _MASKED elsewhere, in the compute dtype (MLX's rule)."""
    import mlx.core as mx

    return mx.where(mx.array(allowed), 0.0, _MASKED).astype(dtype)


def _config_value(config: dict[str, Any], key: str) -> Any:
    value = config.get(key)
    if value is None:
        raise BundleError(f"config.json has no {key!r}, which the MLX backend needs")
    return value


class _Bert:
    """BERT and RoBERTa-style encoders: post-LayerNorm blocks over learned absolute positions."""

    def __init__(self, config: dict[str, Any], tensors: _Tensors):
        kind = config.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise BundleError(f"config.json asks for {kind!r} position embeddings; the MLX backend has only absolute")
        self.heads = int(_config_value(config, "num_attention_heads"))
        self.head_dim = int(_config_value(config, "hidden_size")) // self.heads
        self.layers = int(_config_value(config, "num_hidden_layers"))
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.act = _activation(config.get("hidden_act", "gelu"))
        # RoBERTa numbers real tokens from pad_token_id + 1 and gives pads pad_token_id.
        self.roberta_pad = None if config["model_type"] == "bert" else int(config.get("pad_token_id", 1))
        self.t = tensors
        per_layer = [
            f"{part}.{kind}"
            for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                         "output.dense", "output.LayerNorm")
            for kind in ("weight", "bias")
        ]
        tensors.require(
            [f"embeddings.{e}.weight" for e in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
            + ["embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
            + [f"encoder.layer.{i}.{n}" for i in range(self.layers) for n in per_layer]
        )

    def _norm(self, x: Any, name: str) -> Any:
        import mlx.core as mx

        return mx.fast.layer_norm(x, self.t[f"{name}.weight"], self.t[f"{name}.bias"], self.eps)

    def __call__(self, feeds: dict[str, np.ndarray]) -> Any:
        import mlx.core as mx

        t = self.t
        ids = feeds["input_ids"]
        if self.roberta_pad is None:
            positions = np.arange(ids.shape[1])[None, :]
        else:
            real = (ids != self.roberta_pad).astype(np.int32)
            positions = np.cumsum(real, axis=1) * real + self.roberta_pad
        token_types = feeds.get("token_type_ids", np.zeros((1, 1), dtype=np.int64))
        x = (t["embeddings.word_embeddings.weight"][mx.array(ids.astype(np.int32))]
             + t["embeddings.position_embeddings.weight"][mx.array(positions.astype(np.int32))]
             + t["embeddings.token_type_embeddings.weight"][mx.array(token_types.astype(np.int32))])
        x = self._norm(x, "embeddings.LayerNorm")
        additive = _additive_mask(feeds["attention_mask"][:, None, None, :] > 0, x.dtype)
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q, k, v = (_heads(t.linear(x, f"{p}attention.self.{n}"), self.heads, self.head_dim)
                       for n in ("query", "key", "value"))
            attended = t.linear(_merge_heads(_attend(q, k, v, additive)), f"{p}attention.output.dense")
            x = self._norm(x + attended, f"{p}attention.output.LayerNorm")
            ffn = t.linear(self.act(t.linear(x, f"{p}intermediate.dense")), f"{p}output.dense")
            x = self._norm(x + ffn, f"{p}output.LayerNorm")
        return x


class _Qwen3:
    """Qwen3: pre-RMSNorm causal blocks, grouped-query attention with per-head q/k norms and RoPE."""

    def __init__(self, config: dict[str, Any], tensors: _Tensors):
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise BundleError(f"config.json asks for a {act!r} MLP; Qwen3 in the MLX backend is SiLU-gated")
        if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or ()):
            raise BundleError("config.json asks for sliding-window attention, which the MLX backend does not implement")
        # transformers 5 writes rope_parameters; older configs have rope_theta and rope_scaling.
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise BundleError(f"config.json asks for {rope_type!r} RoPE scaling; the MLX backend has only the default")
        theta = rope.get("rope_theta", config.get("rope_theta"))
        if theta is None:
            raise BundleError("config.json has no rope_theta (neither top-level nor under rope_parameters)")
        hidden = int(_config_value(config, "hidden_size"))
        self.heads = int(_config_value(config, "num_attention_heads"))
        self.kv_heads = int(config.get("num_key_value_heads") or self.heads)
        self.head_dim = int(config.get("head_dim") or hidden // self.heads)
        if self.heads % self.kv_heads:
            raise BundleError(f"config.json: {self.heads} attention heads do not group into {self.kv_heads} KV heads")
        self.layers = int(_config_value(config, "num_hidden_layers"))
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        # float32 throughout, as the reference implementation computes its rotary tables.
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float32) / np.float32(self.head_dim)
        self.inv_freq = (np.float32(1.0) / np.float32(theta) ** exponents).astype(np.float32)
        self.t = tensors
        per_layer = (
            [f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
            + [f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
            + ["input_layernorm.weight", "post_attention_layernorm.weight"]
        )
        tensors.require(
            ["embed_tokens.weight", "norm.weight"]
            + [f"layers.{i}.{n}" for i in range(self.layers) for n in per_layer]
        )

    def _rotary(self, positions: np.ndarray, dtype: Any) -> tuple[Any, Any]:
        """cos and sin tables [batch, 1, seq, head_dim] for the rotate-half convention."""
        import mlx.core as mx

        angles = positions[..., None].astype(np.float32) * self.inv_freq
        angles = np.concatenate([angles, angles], axis=-1)[:, None]
        return mx.array(np.cos(angles)).astype(dtype), mx.array(np.sin(angles)).astype(dtype)

    @staticmethod
    def _rotate(x: Any, cos: Any, sin: Any) -> Any:
        import mlx.core as mx

        half = x.shape[-1] // 2
        turned = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + turned * sin

    def _norm(self, x: Any, name: str) -> Any:
        import mlx.core as mx

        return mx.fast.rms_norm(x, self.t[name], self.eps)

    def __call__(self, feeds: dict[str, np.ndarray]) -> Any:
        import mlx.core as mx

        t = self.t
        mask = feeds["attention_mask"]
        positions = feeds.get("position_ids")
        if positions is None:
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        x = t["embed_tokens.weight"][mx.array(feeds["input_ids"].astype(np.int32))]
        cos, sin = self._rotary(positions, x.dtype)
        seq = mask.shape[1]
        causal = np.tril(np.ones((seq, seq), dtype=bool))
        additive = _additive_mask(causal[None, None] & (mask[:, None, None, :] > 0), x.dtype)
        for i in range(self.layers):
            p = f"layers.{i}."
            h = self._norm(x, f"{p}input_layernorm.weight")
            # q_norm / k_norm act per head, before the rotation.
            q = self._norm(_heads(t.linear(h, f"{p}self_attn.q_proj"), self.heads, self.head_dim),
                           f"{p}self_attn.q_norm.weight")
            k = self._norm(_heads(t.linear(h, f"{p}self_attn.k_proj"), self.kv_heads, self.head_dim),
                           f"{p}self_attn.k_norm.weight")
            v = _heads(t.linear(h, f"{p}self_attn.v_proj"), self.kv_heads, self.head_dim)
            attended = _attend(self._rotate(q, cos, sin), self._rotate(k, cos, sin), v, additive)
            x = x + t.linear(_merge_heads(attended), f"{p}self_attn.o_proj")
            h = self._norm(x, f"{p}post_attention_layernorm.weight")
            gate = t.linear(h, f"{p}mlp.gate_proj")
            x = x + t.linear(gate * mx.sigmoid(gate) * t.linear(h, f"{p}mlp.up_proj"), f"{p}mlp.down_proj")
        return self._norm(x, "norm.weight")


_ARCHITECTURES: dict[str, type] = {"bert": _Bert, "roberta": _Bert, "xlm-roberta": _Bert, "qwen3": _Qwen3}
# Vision-language models whose language model the encoder runs (their text path), and as
# which architecture: without images Qwen3-VL's M-RoPE is 1-D RoPE, so its decoder is Qwen3.
_TEXT_PATHS = {"qwen3_vl": "qwen3"}
# config.json model_type values the encoder can run (the export can refuse others early).
SUPPORTED_ARCHITECTURES = (*_ARCHITECTURES, *_TEXT_PATHS)


def _pool(hidden: Any, mask: np.ndarray, pooling: str) -> Any:
    """The manifest's pooling, in float32, exactly as the exported graph does it."""
    import mlx.core as mx

    hidden = hidden.astype(mx.float32)
    if pooling == "mean":
        weights = mx.array(mask.astype(np.float32))[..., None]
        return (hidden * weights).sum(axis=1) / mx.maximum(weights.sum(axis=1), 1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    # last_token: the highest position whose mask is 1, right for either padding side.
    last = (mask * np.arange(mask.shape[1])).argmax(axis=1)
    return hidden[mx.arange(hidden.shape[0]), mx.array(last.astype(np.int32))]


class MlxEncoder:
    """Pure-MLX forward pass of the bundle's encoder (BERT-family or Qwen3), pooled as the manifest says."""

    def __init__(self, config_path: Path, weights_path: Path, manifest: Manifest):
        reason = _mlx_problem()
        if reason:
            raise BackendUnavailableError(reason)
        config_path = Path(config_path)
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BundleError(
                f"{config_path} is missing: the MLX backend builds the encoder from the model's "
                "config.json (re-export the bundle with this edge-embed)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{config_path} cannot be read as JSON: {exc}") from exc
        arch = config.get("model_type")
        if arch in _TEXT_PATHS:
            config, arch = config.get("text_config") or {}, _TEXT_PATHS[arch]
        if arch not in _ARCHITECTURES:
            raise BundleError(
                f"the MLX backend runs {', '.join(SUPPORTED_ARCHITECTURES)} models, not {arch!r}; "
                "use backend='onnx' for this model"
            )
        hidden = config.get("hidden_size")
        if hidden != manifest.dim:
            raise BundleError(f"config.json says hidden_size {hidden} but the manifest says dim {manifest.dim}")
        tensors = _Tensors(Path(weights_path))
        self._model = _ARCHITECTURES[arch](config, tensors)
        tensors.materialize()
        self.dtype = tensors.dtype
        self._pooling = manifest.pooling
        # MLX evaluates a graph on the stream it was built on, and its default stream
        # belongs to the thread that made it: each calling thread gets a stream of its own.
        self._streams = threading.local()
        self._lock = threading.Lock()

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import mlx.core as mx

        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = mx.new_stream(mx.default_device())
        mask = feeds["attention_mask"]
        with self._lock, mx.stream(stream):
            pooled = _pool(self._model(feeds), mask, self._pooling)
            mx.eval(pooled)
            return np.array(pooled, dtype=np.float32)


class MlxProvider(BundleEmbedder):
    """Runs a bundle's MLX weights with the pure-MLX encoder, on MLX's default device."""

    backend_name = "mlx"

    @staticmethod
    def unavailable_reason() -> str | None:
        return _mlx_problem()

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "auto",
        *,
        threads: int | None = None,
        limits: BatchLimits = BatchLimits(),
    ):
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailableError(reason)
        import mlx.core as mx

        precision = self._choose_precision(bundle, precision)
        super().__init__(bundle, precision, threads=threads, limits=limits)
        weights = bundle.verify_variant(precision)
        # MLX's CPU build sizes its own pools; the count is recorded for info and metrics.
        self._encoder = MlxEncoder(bundle.path / CONFIG_FILE, weights, self.manifest)
        device = mx.default_device()
        self._device = "gpu" if device.type == mx.DeviceType.gpu else "cpu"

    @staticmethod
    def auto_precision(variants, providers: tuple[str, ...] = (), int8_kernels: str | None = None) -> str | None:
        """The MLX variant precision="auto" runs; None if the bundle has none."""
        return next((candidate for candidate in _AUTO_ORDER if candidate in variants), None)

    @staticmethod
    def _choose_precision(bundle: Bundle, precision: str) -> str:
        if precision == "auto":
            chosen = MlxProvider.auto_precision(bundle.manifest.variants)
            if chosen is not None:
                return chosen
            have = ", ".join(bundle.manifest.variants) or "none"
            raise BundleError(
                f"bundle {bundle.path} has no MLX variant (it has: {have}); export it with "
                "mlx-fp16 or mlx-fp32, or load it with backend='onnx'"
            )
        if precision in ONNX_PRECISIONS:
            raise BundleError(f"{precision} is an ONNX variant; load it with backend='onnx'")
        bundle.variant(precision)  # raises BundleError naming what the bundle has
        return precision

    @property
    def execution_providers(self) -> tuple[str, ...]:
        return (f"mlx:{self._device}",)

    def _forward(self, seqs: list[np.ndarray]) -> np.ndarray:
        return self._encoder(model_inputs(seqs, self.manifest))

    def _forward_vl(self, seqs: list[VLInput]) -> np.ndarray:
        """A vision-language embedder's texts: tokenize refuses its images, before any batch
        forms, so one request's image never fails its batch neighbours."""
        return self._encoder(text_feeds(seqs, self.manifest))

    def close(self) -> None:
        self._encoder = None
