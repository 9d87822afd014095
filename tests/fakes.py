"""A FakeProvider for server mechanics: deterministic vectors, controllable speed and failures.

It never stands in for a real backend in a test that claims numerical truth.
"""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np

from edge_embed.errors import InvalidInputError
from edge_embed.manifest import Manifest
from edge_embed.provider import BundleEmbedder, ProviderInfo
from edge_embed.tokenization import check_texts

FAKE_MANIFEST = Manifest(
    model_id="fake-model", revision=None, architecture="qwen3", pooling="last_token", padding_side="left",
    append_eos=False, eos_token_id=0, pad_token_id=0, max_length=64, dim=8, matryoshka_min_dim=4,
    instruction_template="Instruct: {instruction}\nQuery:{text}", default_instruction="find",
    graph_inputs=("input_ids", "attention_mask"),
)


class FakeProvider:
    """Words -> ids by CRC32; a vector is a fixed function of the ids; `delay_s` per batch."""

    def __init__(self, delay_s: float = 0.0, fail_with: BaseException | None = None):
        self.manifest = FAKE_MANIFEST
        self.delay_s = delay_s
        self.fail_with = fail_with
        self.batches: list[list[tuple[int, ...]]] = []
        self.lock = threading.Lock()

    @property
    def info(self) -> ProviderInfo:
        return ProviderInfo(model_id="fake-model", dim=8, matryoshka_min_dim=4, max_length=64, precision="fp32",
                            backend="fake", execution_providers=("FakeExecutionProvider",), threads=1,
                            instruction_aware=True)

    def tokenize(self, texts, *, instruction=None, truncate=True, field="texts"):
        texts = check_texts(texts, field)
        if instruction:
            texts = [f"Instruct: {instruction}\nQuery:{t}" for t in texts]
        seqs = []
        for i, text in enumerate(texts):
            ids = [zlib.crc32(w.encode()) % 1000 + 1 for w in text.split()]
            if len(ids) > self.manifest.max_length:
                if not truncate:
                    raise InvalidInputError(f"{field}[{i}] is longer than the model's 64 tokens and truncate is false")
                ids = ids[: self.manifest.max_length]
            seqs.append(np.array(ids, dtype=np.int64))
        return seqs

    def embed_token_ids(self, seqs):
        with self.lock:
            self.batches.append([tuple(s.tolist()) for s in seqs])
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        return np.stack([self.vector(s) for s in seqs])

    @staticmethod
    def vector(seq) -> np.ndarray:
        rng = np.random.default_rng(int(sum((i + 1) * int(t) for i, t in enumerate(seq))) % (2**32))
        return rng.standard_normal(8).astype(np.float32)

    finish = staticmethod(BundleEmbedder.finish)

    def seen_texts(self) -> int:
        return sum(len(b) for b in self.batches)
