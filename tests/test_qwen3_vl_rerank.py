"""Qwen3-VL-Reranker: a tiny random-weight Qwen3VLForConditionalGeneration with Qwen's real
tokenizer, exported by the real pipeline, run by ONNX Runtime, compared with the reference
algorithm (QwenLM/Qwen3-VL-Embedding's qwen3_vl_reranker.py: the judge chat, the model's last
hidden state times W[yes] - W[no], a sigmoid) on the whole prompt as Qwen's tokenizer reads it."""

from __future__ import annotations

import base64
import json
import random
import re

import grpc
import onnx
import pytest

import edge_embed
from edge_embed.client import EmbedClient
from edge_embed.errors import InvalidInputError
from edge_embed.images import Image
from edge_embed.manifest import Manifest
from edge_embed.v1 import embed_pb2 as pb
from edge_embed.v1 import embed_pb2_grpc

from .conftest import skimage_photo
from .servers import running_server
from .test_http import post
from .test_image_serving import _malformed, _seed_images, grpc_code, http_code
from .vl_reference import whole_prompt_hidden

pytestmark = pytest.mark.slow

JUDGE = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
         "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
TAIL = "<|im_end|>\n<|im_start|>assistant\n"
DEFAULT = "Given a search query, retrieve relevant candidates that answer the query."


def _side(parts: list, tokens: list[int]) -> str:
    body = ""
    for part in parts:
        if isinstance(part, str):
            body += part
        else:
            body += "<|vision_start|>" + "<|image_pad|>" * tokens.pop(0) + "<|vision_end|>"
    return body


def _prompt(query: list, document: list, tokens: list[int], instruction: str = DEFAULT) -> str:
    """The chat as the reference's processor writes it (its content parts joined with nothing
    between them), images expanded to their visual tokens."""
    tokens = list(tokens)
    return (JUDGE + f"<Instruct>: {instruction}<Query>:" + _side(query, tokens) + "\n<Document>:"
            + _side(document, tokens) + TAIL)


class _Reference:
    """The reference scorer: the transformers model's forward on the whole prompt, one pair at
    a time, pixels from the model's own image processor."""

    def __init__(self, source, bounds: dict):
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoImageProcessor, Qwen3VLForConditionalGeneration

        self.tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
        full = Qwen3VLForConditionalGeneration.from_pretrained(str(source)).eval()
        yes, no = self.tokenizer.token_to_id("yes"), self.tokenizer.token_to_id("no")
        self.linear = torch.nn.Linear(full.config.text_config.hidden_size, 1, bias=False)
        with torch.no_grad():
            self.linear.weight[0] = full.lm_head.weight[yes] - full.lm_head.weight[no]
        self.model, self.bounds = full.model, bounds
        self.processor = AutoImageProcessor.from_pretrained(str(source), use_fast=False)

    def __call__(self, prompt: str, images: list[Image]) -> tuple[list[int], float]:
        import torch

        ids, hidden = whole_prompt_hidden(self.model, self.tokenizer, self.processor, self.bounds, prompt, images)
        with torch.no_grad():
            return ids, float(torch.sigmoid(self.linear(hidden[-1:]))[0, 0])


@pytest.fixture(scope="module")
def reference(qwen3_vl_reranker_source, qwen3_vl_reranker_bundle):
    spec = Manifest.read(qwen3_vl_reranker_bundle / "manifest.json").image
    return _Reference(qwen3_vl_reranker_source, {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels})


def _pairs():
    moon, coffee = Image.open(skimage_photo("moon.png")), Image.open(skimage_photo("coffee.png"))
    page = Image.open(skimage_photo("page.png"))
    return {
        "text": (["what is on the moon's surface?"], ["Craters, dust and rocks cover the lunar surface."]),
        "text query, image document": (["a cup of coffee"], [coffee]),
        "image query, text document": ([moon], ["a photo of the full moon"]),
        "mixed both sides": ([page, "find the paragraph about this"], ["a scanned page: ", page, " of printed text"]),
        "instruction": (["quote starting with punctuation"], ['"Hello," she said (twice).']),
    }


@pytest.mark.parametrize("kind", list(_pairs()))
def test_fp32_scores_equal_the_reference_on_the_whole_prompt(qwen3_vl_reranker_bundle, reference, kind):
    """Pairs the export never saw: the token ids equal Qwen's tokenizer on the whole judge
    prompt (the parts joined as the processor joins them, so the text after "<Query>:" and
    "<Document>:" tokenizes with them), and the score the reference's within 2e-5."""
    query, document = _pairs()[kind]
    instruction = "Find the quoted speech." if kind == "instruction" else None
    provider = edge_embed.load(qwen3_vl_reranker_bundle, precision="fp32")
    q, d = (x if len(x) > 1 else x[0] for x in (query, document))
    (encoded,) = provider.tokenize_pairs(q, [d], instruction=instruction)
    prompt = _prompt(query, document, [im.tokens for im in encoded.images], instruction or DEFAULT)
    ids, expected = reference(prompt, [p for p in [*query, *document] if isinstance(p, Image)])
    assert encoded.ids.tolist() == ids
    (result,) = provider.rerank(q, [d], instruction=instruction)
    assert abs(result.score - expected) <= 2e-5, (result.score, expected)


def test_a_pair_scores_the_same_alone_and_in_a_batch(qwen3_vl_reranker_bundle):
    """Right padding: a document's score does not move with its batch neighbours (texts,
    images, mixes of other lengths), and the query's image runs once for all of them."""
    provider = edge_embed.load(qwen3_vl_reranker_bundle, precision="fp32")
    moon, coffee = Image.open(skimage_photo("moon.png")), Image.open(skimage_photo("coffee.png"))
    documents = ["short", coffee, ["the moon, photographed: ", moon], "a much longer document " * 30, moon]
    batched = {r.index: r.score for r in provider.rerank([moon, "which is this?"], documents)}
    for i, doc in enumerate(documents):
        (alone,) = provider.rerank([moon, "which is this?"], [doc])
        assert abs(alone.score - batched[i]) <= 1e-6
    scores = sorted(batched.values())
    assert scores[-1] - scores[0] > 0.01, "the tiny model's scores must spread for the order to mean anything"


def test_the_bundle_ships_one_row_of_the_lm_head_and_the_template_exactly(qwen3_vl_reranker_bundle):
    manifest = Manifest.read(qwen3_vl_reranker_bundle / "manifest.json")
    assert manifest.task == "rerank" and manifest.graph_output == "rerank_logit"
    assert manifest.padding_side == "right" and manifest.modalities == ("text", "image")
    chat = manifest.vl.template.replace("{content}", manifest.rerank.template)
    assert chat == JUDGE + "<Instruct>: {instruction}<Query>:{query}\n<Document>:{document}" + TAIL
    assert manifest.rerank.default_instruction == DEFAULT
    graph = onnx.load(str(qwen3_vl_reranker_bundle / "model.fp32.onnx"), load_external_data=False)
    vocab_rows = [i for i in graph.graph.initializer if 151_936 in i.dims]
    assert len(vocab_rows) == 1, "only the token embedding has a vocabulary-wide table; the LM head does not ship"
    assert [o.name for o in graph.graph.output] == ["rerank_logit"]
    for precision, variant in manifest.variants.items():
        assert variant.vision is not None
        assert variant.parity.kendall_tau_min is not None and variant.parity.batch_diff_max is not None
        if precision == "fp32":
            assert variant.parity.score_diff_max <= 2e-5
            assert variant.parity.kendall_tau_min == 1.0 and variant.parity.top1_agreement == 1.0


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_variant_passes_its_boot_check_on_the_golden_pairs(qwen3_vl_reranker_bundle, precision):
    """The golden pairs (texts and the images themselves) scored here against the export's
    FP32 reference, under the gate the variant shipped with."""
    provider = edge_embed.load(qwen3_vl_reranker_bundle, precision=precision)
    parity = provider.check_parity()
    assert provider.parity_passes()
    assert parity.probes >= 8
    info = provider.info
    assert info.task == "rerank" and info.modalities == ("text", "image") and info.instruction_aware


def test_long_documents_lose_their_end_and_bad_pairs_are_refused(qwen3_vl_reranker_bundle):
    provider = edge_embed.load(qwen3_vl_reranker_bundle, precision="fp32")
    limit = provider.manifest.max_length
    moon = Image.open(skimage_photo("moon.png"))
    long_doc = "lunar regolith " * limit
    (seq,) = provider.tokenize_pairs([moon, "craters"], [long_doc])
    assert len(seq) == limit
    (short,) = provider.tokenize_pairs([moon, "craters"], ["lunar regolith " * 10])
    assert seq.ids[: len(short) - 6].tolist() == short.ids[: len(short) - 6].tolist()  # the query is intact
    with pytest.raises(InvalidInputError, match="truncate is false"):
        provider.rerank("craters", [long_doc], truncate=False)
    with pytest.raises(InvalidInputError, match="query and the template"):
        provider.rerank("craters " * limit, ["a document"])
    for query, documents, message in [
        ("", ["a"], "query is empty"), ("q", [""], r"documents\[0\] is empty"), ("q", "a document", "list of"),
        ("q", [b"\x89PNG"], "must be a string"), ([], ["a"], "empty list"), ("q", [[moon, 3]], "must be a string"),
        ("q", ["a"], None),
    ]:
        if message is None:
            assert len(provider.rerank(query, documents)) == 1
            continue
        with pytest.raises(InvalidInputError, match=message):
            provider.rerank(query, documents)
    with pytest.raises(InvalidInputError, match="instruction"):
        provider.rerank("q", ["a"], instruction="  ")
    with pytest.raises(Exception, match="cannot embed"):
        provider.embed(["a"])


# -- over the wire ------------------------------------------------------------------------------


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _http_rerank(port: int, payload: dict) -> tuple[int, dict]:
    status, _, body = post(port, "/v1/rerank", json.dumps(payload).encode())
    return status, body


def test_image_pairs_over_grpc_and_http_equal_in_process_bit_for_bit(qwen3_vl_reranker_bundle, qwen3_reranker_bundle):
    provider = edge_embed.load(qwen3_vl_reranker_bundle, precision="fp32")
    moon, coffee = skimage_photo("moon.png").read_bytes(), skimage_photo("coffee.png").read_bytes()
    query = [Image.open(moon), "which photo shows this?"]
    documents = ["a photo of the full moon", Image.open(coffee), ["the moon: ", Image.open(moon)]]
    local = provider.rerank(query, documents)
    with running_server(provider, http_port=0) as (edge, target):
        with EmbedClient(target) as client:
            response = client.rerank(query, documents, return_documents=True)
            assert [(r.index, r.score) for r in response.results] == [(r.index, r.score) for r in local]
            assert response.results[[r.index for r in response.results].index(1)].document_item.image == coffee
            text = client.rerank("the moon", ["a photo of the full moon", "coffee"])
            assert [r.score for r in text.results] == [r.score for r in provider.rerank("the moon", [
                "a photo of the full moon", "coffee"])]
            assert list(client.info().modalities) == ["text", "image"]
        moon_part = {"type": "image_url", "image_url": {"url": _data_uri(moon)}}
        coffee_part = {"type": "image_url", "image_url": {"url": _data_uri(coffee)}}
        sent = ["a photo of the full moon", coffee_part, {"content": [{"type": "text", "text": "the moon: "}, moon_part]}]
        status, body = _http_rerank(edge.http_port, {"query": [moon_part, {"type": "text", "text": "which photo shows this?"}],
                                                     "documents": sent, "return_documents": True})
        assert status == 200, body
        assert [(r["index"], r["relevance_score"]) for r in body["results"]] == [(r.index, r.score) for r in local]
        assert {r["index"]: r["document"] for r in body["results"]} == {
            0: {"text": sent[0]}, 1: coffee_part, 2: sent[2]}
        for payload, why in [
            ({"query": {"content": []}, "documents": ["a"]}, "empty list of content parts"),
            ({"query": "q", "documents": [{"text": "a", "x": 1}]}, r"documents\[0\] must be"),
            ({"query": "q", "documents": [7]}, r"documents\[0\] must be a string"),
            ({"query": "q", "documents": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
             "does not fetch image URLs"),
            ({"query": "q", "documents": [[]]}, "empty list of content parts"),
        ]:
            status, body = _http_rerank(edge.http_port, payload)
            assert status == 400 and re.search(why, body["error"]["message"]), body
    text_reranker = edge_embed.load(qwen3_reranker_bundle, precision="fp32")
    with running_server(text_reranker) as (edge, target), EmbedClient(target) as client:
        with pytest.raises(edge_embed.InvalidInputError, match="holds images, and .* reads text only"):
            client.rerank("q", ["a", Image.open(coffee)])
        with pytest.raises(edge_embed.InvalidInputError, match="query holds images"):
            client.rerank(Image.open(coffee), ["a"])


def _hostile_rerank(rng: random.Random, seeds: list[bytes]) -> tuple[pb.RerankRequest, dict]:
    """One hostile rerank request for each transport: malformed images in the query or the
    documents, empty or mistyped parts, both forms of a field at once, over-long texts."""
    bad = _malformed(rng, seeds)
    kind = rng.randrange(8)
    good_image = seeds[0]
    if kind == 0:
        request = pb.RerankRequest(query_item=pb.Input(image=bad), documents=["a"])
        payload = {"query": {"type": "image_url", "image_url": {"url": _data_uri(bad)}}, "documents": ["a"]}
    elif kind == 1:
        request = pb.RerankRequest(query="q", document_items=[pb.Input(text="a"), pb.Input(image=bad)])
        payload = {"query": "q", "documents": ["a", {"type": "image_url", "image_url": {"url": _data_uri(bad)}}]}
    elif kind == 2:
        request = pb.RerankRequest(query="q", document_items=[pb.Input(parts=pb.Parts(parts=[pb.Part()]))])
        payload = {"query": "q", "documents": [{"content": [{"type": "nope"}]}]}
    elif kind == 3:
        request = pb.RerankRequest(query="q", query_item=pb.Input(text="q"), documents=["a"])
        payload = {"query": {"content": "not a list"}, "documents": ["a"]}
    elif kind == 4:
        request = pb.RerankRequest(query="q", documents=["a"], document_items=[pb.Input(image=good_image)])
        payload = {"query": [], "documents": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}
    elif kind == 5:
        request = pb.RerankRequest(query_item=pb.Input(parts=pb.Parts()), documents=["a"])
        payload = {"query": "q", "documents": [[{"type": "text", "text": 5}]]}
    elif kind == 6:
        request = pb.RerankRequest(query_item=pb.Input(), documents=["x" * rng.choice([1, 300_000])])
        payload = {"query": "q" * 300_000, "documents": [{"content": [{"type": "image_url", "image_url": {}}]}]}
    else:
        request = pb.RerankRequest(query="q", document_items=[pb.Input(image=bad)] * rng.randrange(1, 4),
                                   top_n=rng.choice([0, 1, 5]))
        payload = {"query": "q", "documents": [{"type": "image_url", "image_url": {"url": _data_uri(bad)}}] * 2,
                   "top_n": rng.choice([0, -1, 2, "x"])}
    return request, payload


def test_a_fuzz_of_hostile_rerank_fields_gets_only_clear_refusals_over_both_transports(qwen3_vl_reranker_bundle):
    provider = edge_embed.load(qwen3_vl_reranker_bundle, precision="fp32")
    rng = random.Random(26)
    seeds = _seed_images()
    known = ([Image.open(skimage_photo("moon.png")), "which?"], ["a moon", Image.open(skimage_photo("coffee.png"))])
    before = [(r.index, r.score) for r in provider.rerank(*known)]
    codes: dict[str, int] = {}
    with running_server(provider, http_port=0, max_image_pixels=4_000_000) as (edge, target):
        stub = embed_pb2_grpc.EmbeddingServiceStub(grpc.insecure_channel(target))
        for case in range(400):
            request, payload = _hostile_rerank(rng, seeds)
            if case % 2:
                code = grpc_code(lambda: stub.Rerank(request, timeout=30))
            else:
                status, body = _http_rerank(edge.http_port, payload)
                code = http_code(status, body)
            codes[code] = codes.get(code, 0) + 1
        with EmbedClient(target) as client:
            after = [(r.index, r.score) for r in client.rerank(*known).results]
    assert set(codes) <= {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, codes
    assert codes.get("INVALID_ARGUMENT", 0) >= 300, codes
    assert after == before


def test_bench_measures_the_image_pairs(qwen3_vl_reranker_bundle, tmp_path):
    """`edge-embed bench` on the golden pairs, their images read and preprocessed per batch."""
    from .test_cli import run

    out = tmp_path / "report.json"
    done = run("bench", "--bundle", str(qwen3_vl_reranker_bundle), "--precision", "fp32,int8", "--warmup", "0",
               "--steps", "2", "--text-samples", "12", "--batch-size", "6", "--json", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32", "int8"]
    for row in rows:
        (pairs,) = row["workloads"]
        assert (pairs["kind"], pairs["items"]) == ("pairs", 12) and pairs["items_per_s"] > 0


def test_cli_rerank_takes_image_documents_and_a_query_image(qwen3_vl_reranker_bundle):
    from .test_cli import run

    moon, coffee = skimage_photo("moon.png"), skimage_photo("coffee.png")
    done = run("rerank", "--bundle", str(qwen3_vl_reranker_bundle), "--precision", "fp32", "--image-document", str(moon), "--query-image",
               str(coffee), "which photo?", "a cup of coffee", "the moon")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    provider = edge_embed.load(qwen3_vl_reranker_bundle, precision="fp32")
    expected = provider.rerank([Image.open(coffee), "which photo?"], [Image.open(moon), "a cup of coffee", "the moon"])
    assert [(r["index"], r["score"]) for r in rows] == [(e.index, round(e.score, 7)) for e in expected]
    assert {r["index"]: r["document"] for r in rows}[0] == f"image:{moon}"
