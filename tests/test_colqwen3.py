"""ColQwen3, the multi-vector task: a tiny random-weight Qwen3-VL with Tomoro's projection head
(`embedding_proj_layer`, 320 dims), exported by the real pipeline, run by ONNX Runtime,
compared with the transformers model's own forward through the checkpoint's head on the whole
prompt as Qwen's tokenizer reads it, token by token, and by MaxSim."""

from __future__ import annotations

import numpy as np
import pytest

import edge_embed
from edge_embed.errors import InvalidInputError, WrongTaskError
from edge_embed.images import Image
from edge_embed.manifest import Manifest
from edge_embed.parity import maxsim

from .conftest import skimage_photo

pytestmark = pytest.mark.slow

QUERY = "Query: {}" + "<|endoftext|>" * 10 + "\n"
PAGE = "<|im_start|>user\n{}Describe the image.<|im_end|><|endoftext|>"


def _body(parts: list, tokens: list[int]) -> str:
    tokens, body = list(tokens), ""
    for part in parts:
        body += part if isinstance(part, str) else "<|vision_start|>" + "<|image_pad|>" * tokens.pop(0) + "<|vision_end|>"
    return body


class _Reference:
    """The model's own forward on the whole prompt, its last hidden states through the
    checkpoint's projection, each token's vector L2-normalized (ColQwen's definition)."""

    def __init__(self, source, bounds: dict):
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer
        from transformers import AutoImageProcessor, AutoModel

        self.tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
        self.model = AutoModel.from_pretrained(str(source)).eval()
        (weights,) = source.glob("*.safetensors")
        tensors = load_file(str(weights))
        self.head = torch.nn.Linear(64, 320)
        with torch.no_grad():
            self.head.weight.copy_(tensors["embedding_proj_layer.weight"])
            self.head.bias.copy_(tensors["embedding_proj_layer.bias"])
        self.processor = AutoImageProcessor.from_pretrained(str(source), use_fast=False)
        self.bounds = bounds

    def __call__(self, prompt: str, images: list[Image]) -> tuple[list[int], np.ndarray]:
        import torch

        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        extra = {}
        if images:
            extra = dict(self.processor(images=[im.rgb() for im in images], return_tensors="pt", size=self.bounds))
        t = torch.tensor([ids])
        image_id = self.tokenizer.token_to_id("<|image_pad|>")
        with torch.no_grad():
            hidden = self.model(input_ids=t, attention_mask=torch.ones_like(t), mm_token_type_ids=(t == image_id).int(),
                                **extra).last_hidden_state[0]
            tokens = self.head(hidden)
            return ids, (tokens / tokens.norm(dim=-1, keepdim=True)).numpy()


@pytest.fixture(scope="module")
def reference(colqwen3_source, colqwen3_bundle):
    spec = Manifest.read(colqwen3_bundle / "manifest.json").image
    return _Reference(colqwen3_source, {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels})


@pytest.fixture(scope="module")
def fp32(colqwen3_bundle):
    return edge_embed.load(colqwen3_bundle, precision="fp32")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_fp32_token_vectors_and_maxsim_equal_the_reference_on_the_whole_prompt(fp32, reference):
    """Queries and pages the export never saw (a scanned page, a text image, a photo with a
    caption, a text page): the token ids equal Qwen's tokenizer on the whole prompt, every
    token's vector the reference's at cos >= 0.99999, and MaxSim within 1e-4 relative."""
    page, text = Image.open(skimage_photo("page.png")), Image.open(skimage_photo("text.png"))
    coffee = Image.open(skimage_photo("coffee.png"))
    queries = ["which page talks about the scanner's resolution?", '"quoted" (query) with punctuation: ok']
    pages = [page, text, [coffee, "a cup of coffee on a saucer"], "a page of plain text about scanners"]
    ours_q = fp32.embed_multi(queries, kind="query")
    ours_p = fp32.embed_multi(pages)
    encoded_p = fp32.tokenize_multi(pages)
    ref_q, ref_p = [], []
    for q, ours, seq in zip(queries, ours_q, fp32.tokenize_multi(queries, kind="query")):
        ids, vectors = reference(QUERY.format(q), [])
        assert seq.ids.tolist() == ids
        assert ours.shape == (len(ids), 320) and _cos(ours, vectors).min() >= 0.99999
        ref_q.append(vectors)
    for item, ours, seq in zip(pages, ours_p, encoded_p):
        parts = item if isinstance(item, list) else [item]
        ids, vectors = reference(PAGE.format(_body(parts, [im.tokens for im in seq.images])),
                                 [p for p in parts if isinstance(p, Image)])
        assert seq.ids.tolist() == ids
        assert ours.shape == (len(ids), 320) and _cos(ours, vectors).min() >= 0.99999
        assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
        ref_p.append(vectors)
    for q, rq in zip(ours_q, ref_q):
        expected = maxsim(rq, ref_p)
        assert np.abs(maxsim(q, ours_p) - expected).max() <= 1e-4 * np.abs(expected).max()


def test_maxsim_rerank_and_batches(fp32):
    """MaxSim from inputs or from matrices is the same; rerank orders by it; an input's
    vectors do not move with its batch neighbours."""
    page, moon = Image.open(skimage_photo("page.png")), Image.open(skimage_photo("moon.png"))
    pages = [page, "short", moon, ["the moon: ", moon], "a much longer text page " * 20]
    together = fp32.embed_multi(pages)
    for item, batched in zip(pages, together):
        (alone,) = fp32.embed_multi([item])
        assert np.abs(alone - batched).max() <= 1e-6
    query = "where is the moon?"
    scores = fp32.maxsim(query, pages)
    (q,) = fp32.embed_multi([query], kind="query")
    assert np.array_equal(fp32.maxsim(q, together), scores)
    results = fp32.rerank(query, pages, top_n=3, return_documents=True)
    assert [r.index for r in results] == list(np.argsort(-scores, kind="stable")[:3])
    assert results[0].score == pytest.approx(float(scores.max())) and results[0].document is pages[results[0].index]


def test_the_bundle_records_the_task_the_templates_and_the_gates(colqwen3_bundle):
    manifest = Manifest.read(colqwen3_bundle / "manifest.json")
    assert manifest.task == "multivector" and manifest.dim == 320 and manifest.pooling == "tokens"
    assert manifest.multivector.head == "embedding_proj_layer.weight"
    assert manifest.multivector.query_template == QUERY.format("{content}")
    assert manifest.multivector.document_template == PAGE.format("{content}")
    for precision, variant in manifest.variants.items():
        parity = variant.parity
        assert parity.queries >= 8 and parity.pages >= 20 and parity.tokens > 1000
        assert parity.batch_cos_min >= 0.99999
        if precision == "fp32":
            assert parity.cos_min >= 0.99999 and parity.maxsim_rel_diff_max <= 1e-4
            assert parity.kendall_tau_min == 1.0 and parity.top1_agreement == 1.0
        assert variant.recipe["gate"]["kendall_tau_mean"] > 0


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_variant_passes_its_boot_check(colqwen3_bundle, precision):
    provider = edge_embed.load(colqwen3_bundle, precision=precision)
    parity = provider.check_parity()
    assert provider.parity_passes() and parity.queries >= 8
    info = provider.info
    assert info.task == "multivector" and info.dim == 320 and not info.instruction_aware


def test_bad_input_is_refused_by_name(fp32):
    with pytest.raises(WrongTaskError, match="multi-vector model and cannot embed texts"):
        fp32.embed(["a"])
    with pytest.raises(InvalidInputError, match="kind must be"):
        fp32.embed_multi(["a"], kind="passage")
    with pytest.raises(InvalidInputError, match="takes no instruction"):
        fp32.rerank("q", ["a"], instruction="Find")
    with pytest.raises(InvalidInputError, match=r"items\[0\] is empty"):
        fp32.embed_multi([" "])
    with pytest.raises(InvalidInputError, match="list of inputs"):
        fp32.embed_multi("a page")
    with pytest.raises(InvalidInputError, match=r"token vectors \[tokens, 320\]"):
        fp32.maxsim(np.zeros((3, 64), np.float32), ["a"])
    with pytest.raises(InvalidInputError, match="non-finite"):
        fp32.maxsim(np.full((2, 320), np.nan, np.float32), ["a"])
    with pytest.raises(InvalidInputError, match=r"pages\[0\] must be token vectors"):
        fp32.maxsim("q", [np.zeros((0, 320), np.float32)])
    assert fp32.embed_multi([]) == []
