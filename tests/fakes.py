"""A FakeProvider for server mechanics: deterministic vectors, controllable speed and faults.

It implements the server's ModelRunner contract and nothing else. It never stands in for
a real backend in a test that claims numerical truth.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib

import numpy as np

from edge_embed.errors import InvalidInputError
from edge_embed.manifest import Manifest
from edge_embed.provider import ProviderInfo, finish_vectors, wrong_task
from edge_embed.tokenization import check_texts

FAKE_MANIFEST = Manifest(
    model_id="fake-model", revision=None, architecture="qwen3", pooling="last_token", padding_side="left",
    append_eos=False, eos_token_id=0, pad_token_id=0, max_length=64, dim=8, matryoshka_min_dim=4,
    instruction_template="Instruct: {instruction}\nQuery:{text}", default_instruction="find",
    graph_inputs=("input_ids", "attention_mask"),
)


_FAULT_WORDS = {"poison": 1001, "nan": 1002, "hang": 1003}  # never a hash of another word


def word_id(word: str) -> int:
    return _FAULT_WORDS.get(word) or zlib.crc32(word.encode()) % 1000 + 1


class FakeProvider:
    """Words -> ids by CRC32; a vector is a fixed function of the ids; `delay_s` per batch.

    Faults: `fail_with` fails every batch; a batch holding the word `poison` raises a
    foreign RuntimeError (as a backend bug would); the word `nan` gives that text a NaN
    vector; while `hang` is set, a batch holding the word `hang` blocks until it clears.
    """

    def __init__(self, delay_s: float = 0.0, fail_with: BaseException | None = None, max_length: int = 64):
        self.manifest = dataclasses.replace(FAKE_MANIFEST, max_length=max_length)
        self.delay_s = delay_s
        self.fail_with = fail_with
        self.batches: list[list[tuple[int, ...]]] = []
        self.lock = threading.Lock()
        self.hang = threading.Event()
        self.closed = False
        self.stepped_rows = False  # as a TensorRT runner reports it

    @property
    def info(self) -> ProviderInfo:
        return ProviderInfo(model_id="fake-model", dim=8, matryoshka_min_dim=4, max_length=self.manifest.max_length,
                            precision="fp32", backend="fake", execution_providers=("FakeExecutionProvider",),
                            threads=1, instruction_aware=True, default_instruction="find",
                            stepped_rows=self.stepped_rows)

    def tokenize(self, texts, *, instruction=None, truncate=True, field="texts"):
        texts = check_texts(texts, field)
        if instruction:
            texts = [f"Instruct: {instruction}\nQuery:{t}" for t in texts]
        seqs = []
        for i, text in enumerate(texts):
            ids = [word_id(w) for w in text.split()]
            if len(ids) > self.manifest.max_length:
                if not truncate:
                    raise InvalidInputError(f"{field}[{i}] is longer than the model's {self.manifest.max_length} "
                                            "tokens and truncate is false")
                ids = ids[: self.manifest.max_length]
            seqs.append(np.array(ids, dtype=np.int64))
        return seqs

    def run_batch(self, seqs):
        with self.lock:
            self.batches.append([tuple(s.tolist()) for s in seqs])
        if self.delay_s:
            time.sleep(self.delay_s)
        words = {int(t) for s in seqs for t in s}
        if word_id("hang") in words:
            while self.hang.is_set():
                time.sleep(0.01)
        if self.fail_with is not None:
            raise self.fail_with
        if word_id("poison") in words:
            raise RuntimeError("the fake backend choked on a poisoned text")
        vectors = np.stack([self.vector(s) for s in seqs])
        for row, s in enumerate(seqs):
            if word_id("nan") in s.tolist():
                vectors[row, 3] = np.nan
        return vectors

    @staticmethod
    def vector(seq) -> np.ndarray:
        rng = np.random.default_rng(int(sum((i + 1) * int(t) for i, t in enumerate(seq))) % (2**32))
        return rng.standard_normal(8).astype(np.float32)

    def finish(self, pooled, width, normalize, *, field="texts"):
        return finish_vectors(pooled, width, normalize, field=field, what="the fake model")

    def tokenize_pairs(self, query, documents, *, instruction=None, truncate=True, field="documents"):
        raise wrong_task("fake-model", "embed", "rerank")

    def finish_scores(self, logits, *, field="documents"):
        raise wrong_task("fake-model", "embed", "rerank")

    def close(self) -> None:
        self.closed = True

    def seen_texts(self) -> int:
        return sum(len(b) for b in self.batches)
