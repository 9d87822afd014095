"""ColQwen3, the multi-vector task: a tiny random-weight Qwen3-VL with Tomoro's projection head
(`embedding_proj_layer`, 320 dims), exported by the real pipeline, run by ONNX Runtime,
compared with the transformers model's own forward through the checkpoint's head on the whole
prompt as Qwen's tokenizer reads it, token by token, and by MaxSim."""

from __future__ import annotations

import base64
import json
import random

import grpc
import numpy as np
import pytest

import edge_embed
from edge_embed.client import EmbedClient
from edge_embed.errors import InvalidInputError, WrongTaskError
from edge_embed.images import Image
from edge_embed.manifest import Manifest
from edge_embed.parity import maxsim
from edge_embed.v1 import embed_pb2 as pb
from edge_embed.v1 import embed_pb2_grpc

from .conftest import skimage_photo
from .servers import running_server
from .test_http import post
from .test_image_serving import _malformed, _seed_images, grpc_code, http_code
from .vl_reference import whole_prompt_hidden

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

        ids, hidden = whole_prompt_hidden(self.model, self.tokenizer, self.processor, self.bounds, prompt, images)
        with torch.no_grad():
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


# -- over the wire ------------------------------------------------------------------------------


def _http(port: int, route: str, payload: dict) -> tuple[int, dict]:
    status, _, body = post(port, route, json.dumps(payload).encode())
    return status, body


def test_token_matrices_over_grpc_and_http_equal_in_process_bit_for_bit(fp32):
    page = skimage_photo("page.png").read_bytes()
    items = [Image.open(page), "a text page about scanners", [Image.open(page), "with a caption"]]
    local = fp32.embed_multi(items)
    local_q = fp32.embed_multi(["which page?"], kind="query")
    with running_server(fp32, http_port=0) as (edge, target):
        with EmbedClient(target) as client:
            over = client.embed_multi(items)
            assert all(np.array_equal(a, b) for a, b in zip(over, local)) and len(over) == 3
            half = client.embed_multi(items, matrix_dtype="float16")
            assert all(h.dtype == np.float16 and np.array_equal(h, a.astype(np.float16)) for h, a in zip(half, local))
            (q,) = client.embed_multi(["which page?"], input_type="query")
            assert np.array_equal(q, local_q[0])
            response = client.rerank("which page?", items)
            expected = fp32.rerank("which page?", items)
            assert [(r.index, r.score) for r in response.results] == [(r.index, r.score) for r in expected]
            assert list(response.token_counts) == [len(m) for m in local]
            with pytest.raises(InvalidInputError, match="takes no instruction"):
                client.embed(["a"], instruction="Represent")
            with pytest.raises(InvalidInputError, match="input_type must be query or document"):
                client.embed_multi(["a"], input_type="passage")
            with pytest.raises(InvalidInputError, match="neither dimensions"):
                client.embed(["a"], dimensions=64)
        image_part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                         + base64.b64encode(page).decode()}}
        http_items = [image_part, "a text page about scanners", [image_part, {"type": "text", "text": "with a caption"}]]
        status, body = _http(edge.http_port, "/v1/embeddings", {"input": http_items})
        assert status == 200, body
        assert all(np.array_equal(np.array(d["embedding"], dtype=np.float32), m) for d, m in zip(body["data"], local))
        status, body = _http(edge.http_port, "/v1/embeddings", {"input": ["which page?"], "input_type": "query",
                                                                "encoding_format": "base64"})
        assert status == 200, body
        (row,) = body["data"]
        assert row["shape"] == list(local_q[0].shape) and row["dtype"] == "float32"
        decoded = np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4").reshape(row["shape"])
        assert np.array_equal(decoded, local_q[0])
        status, body = _http(edge.http_port, "/v1/rerank", {"query": "which page?", "documents": http_items})
        assert status == 200, body
        assert [(r["index"], r["relevance_score"]) for r in body["results"]] == [(r.index, r.score) for r in expected]


def test_a_fuzz_of_hostile_multivector_requests_gets_only_clear_refusals(fp32):
    rng = random.Random(31)
    seeds = _seed_images()
    known = [Image.open(skimage_photo("page.png")), "a text page"]
    before = fp32.embed_multi(known)
    codes: dict[str, int] = {}
    with running_server(fp32, http_port=0, max_image_pixels=4_000_000) as (edge, target):
        stub = embed_pb2_grpc.EmbeddingServiceStub(grpc.insecure_channel(target))
        for case in range(300):
            bad = _malformed(rng, seeds)
            kind = rng.randrange(6)
            if case % 2:
                request = [
                    pb.EmbedRequest(items=[pb.Input(image=bad)], input_type=rng.choice(["", "query", "document"])),
                    pb.EmbedRequest(inputs=["a"], input_type=rng.choice(["passage", "QUERY", "x" * 300])),
                    pb.EmbedRequest(inputs=["a"], matrix_dtype=rng.choice([1, 7, 255])),
                    pb.EmbedRequest(inputs=["a"], dimensions=rng.choice([1, 64, 320, 10_000])),
                    pb.EmbedRequest(items=[pb.Input(parts=pb.Parts(parts=[pb.Part(text="a"), pb.Part(image=bad)]))]),
                    pb.EmbedRequest(inputs=["a"], instruction="x", normalize=False),
                ][kind]
                code = grpc_code(lambda: stub.Embed(request, timeout=30))
            else:
                payload = [
                    {"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                   + base64.b64encode(bad).decode()}}]},
                    {"input": ["a"], "input_type": rng.choice(["passage", 3, None, ["query"]])},
                    {"input": ["a"], "encoding_format": rng.choice(["float16", "base64", 1])},
                    {"input": ["a"], "dimensions": rng.choice([1, 320, -5, "a"])},
                    {"input": [[{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:,"}}]]},
                    {"input": ["a"], "instruction": "x"},
                ][kind]
                status, body = _http(edge.http_port, "/v1/embeddings", payload)
                code = http_code(status, body)
            codes[code] = codes.get(code, 0) + 1
        with EmbedClient(target) as client:
            after = client.embed_multi(known)
    assert set(codes) <= {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, codes
    assert codes.get("INVALID_ARGUMENT", 0) >= 200, codes
    assert all(np.array_equal(a, b) for a, b in zip(after, before))


# -- a corpus of pages --------------------------------------------------------------------------


def test_embed_corpus_writes_multivector_shards_and_resumes(fp32, colqwen3_bundle, tmp_path):
    """Pages by path (relative to the JSONL file) and by bytes (Parquet), texts, and both:
    each row's token vectors equal embed_multi's bit for bit; bad rows are listed; a rerun
    after a lost shard redoes only that shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from edge_embed.corpus import ERRORS_FILE, embed_corpus

    folder = tmp_path / "pages"
    (folder / "scans").mkdir(parents=True)
    (folder / "scans" / "page.png").write_bytes(skimage_photo("page.png").read_bytes())
    (folder / "scans" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    rows = [{"id": "scan", "image": "scans/page.png"}, {"id": "text", "text": "a text page about scanners"},
            {"id": "both", "image": "scans/page.png", "text": "with a caption"},
            {"id": "missing", "image": "scans/nope.png"}, {"id": "broken", "image": "scans/broken.png"},
            {"id": "empty"}, {"id": "abs", "image": str(skimage_photo("text.png"))}]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "index"
    report = embed_corpus(colqwen3_bundle, folder / "corpus.jsonl", out, image_field="image", precision="fp32",
                          rows_per_shard=3, progress=False)
    assert (report.rows_in, report.rows_out, report.errors) == (7, 4, 3)
    page = Image.open(skimage_photo("page.png"))
    expected = dict(zip(["scan", "text", "both", "abs"], fp32.embed_multi(
        [page, "a text page about scanners", [page, "with a caption"], Image.open(skimage_photo("text.png"))])))
    got = {}
    for shard in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(shard)
        for row_id, vectors, tokens in zip(*(table.column(c).to_pylist() for c in ("id", "embedding", "tokens"))):
            got[row_id] = np.array(vectors, dtype=np.float32)
            assert tokens == len(vectors)
    assert set(got) == set(expected)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    errors = {json.loads(line)["id"]: json.loads(line)["reason"] for line in (out / ERRORS_FILE).read_text().splitlines()}
    assert set(errors) == {"missing", "broken", "empty"} and "no image file" in errors["missing"]
    (out / "part-00000-00001.parquet").unlink()
    again = embed_corpus(colqwen3_bundle, folder / "corpus.jsonl", out, image_field="image", precision="fp32",
                         rows_per_shard=3, progress=False)
    assert again.units_skipped == again.units - 1 and again.rows_out == 4
    parquet = tmp_path / "pages.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "image": [skimage_photo("page.png").read_bytes(), b"not an image"]}),
                   parquet)
    report = embed_corpus(colqwen3_bundle, parquet, tmp_path / "index2", image_field="image", precision="fp32",
                          progress=False)
    assert (report.rows_out, report.errors) == (1, 1)
    (table,) = [pq.read_table(p) for p in (tmp_path / "index2").glob("part-*.parquet")]
    assert np.array_equal(np.array(table.column("embedding").to_pylist()[0], dtype=np.float32), expected["scan"])
    with pytest.raises(InvalidInputError, match="dimensions does not apply"):
        embed_corpus(colqwen3_bundle, parquet, tmp_path / "index3", image_field="image", dimensions=64, progress=False)


def test_bench_measures_queries_and_pages(colqwen3_bundle, tmp_path):
    from .test_cli import run

    out = tmp_path / "report.json"
    done = run("bench", "--bundle", str(colqwen3_bundle), "--precision", "fp32,int8", "--warmup", "0", "--steps", "2",
               "--text-samples", "8", "--images", "4", "--batch-size", "4", "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["task"] == "multivector"
    for row in report["rows"]:
        assert [(w["kind"], w["items"]) for w in row["workloads"]] == [("queries", 8), ("pages", 8)]
        assert row["parity"]["maxsim_rel_diff_max"] is not None and row["peak_rss_bytes"] > 0


def test_int4_that_loses_the_maxsim_ranking_is_not_written(colqwen3_source, tmp_path):
    """Random weights leave near-ties that 4-bit blocks swap: under the default ranking
    gate (Kendall tau mean 0.9, top-1 0.9) every block size misses, and nothing is written."""
    from edge_embed.errors import GateError
    from edge_embed.export import export

    with pytest.raises(GateError, match="int4 variant failed its gate: (kendall_tau_mean|top1_agreement)"):
        export(colqwen3_source, tmp_path / "bundle", "fp32,int4", model_id="tiny-colqwen3")
    assert not (tmp_path / "bundle").exists()


def test_a_multivector_answer_is_charged_to_the_request_memory_until_sent(fp32):
    """A page's answer is a thousand vectors: it is charged before it is built (JSON floats
    at ~22 bytes a value, gRPC float16 at 8) and released once sent."""
    page = skimage_photo("page.png").read_bytes()
    with running_server(fp32, http_port=0) as (edge, target):
        memory = edge.service.memory
        charged: list[int] = []
        take = memory.take

        def recording_take(reservation, nbytes):
            charged.append(nbytes)
            return take(reservation, nbytes)

        memory.take = recording_take
        (expected,) = fp32.embed_multi([Image.open(page)])
        status, body = _http(edge.http_port, "/v1/embeddings", {"input": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(page).decode()}}]})
        assert status == 200 and np.array_equal(np.array(body["data"][0]["embedding"], np.float32), expected)
        assert expected.size * 22 in charged
        with EmbedClient(target) as client:
            client.embed_multi([Image.open(page)], matrix_dtype="float16")
        assert expected.size * 8 in charged
        assert memory.held == 0


def test_cli_embed_prints_token_matrices(fp32, colqwen3_bundle):
    from .test_cli import run

    done = run("embed", "--bundle", str(colqwen3_bundle), "--precision", "fp32", "--image", str(skimage_photo("page.png")), "a text page")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    expected = fp32.embed_multi([Image.open(skimage_photo("page.png")), "a text page"])
    assert [r["tokens"] for r in rows] == [len(m) for m in expected]
    assert all(np.abs(np.array(r["embedding"]) - m).max() < 1e-6 for r, m in zip(rows, expected))
    done = run("embed", "--bundle", str(colqwen3_bundle), "--precision", "fp32", "--query", "which page?")
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert row["tokens"] == len(fp32.embed_multi(["which page?"], kind="query")[0])
    done = run("embed", "--bundle", str(colqwen3_bundle), "--dimensions", "64", "a")
    assert done.returncode == 2 and "multi-vector model takes no" in done.stderr


def test_graphs_past_2_gb_keep_their_weights_in_data_files_the_bundle_verifies(fp32, colqwen3_bundle, tmp_path,
                                                                                 monkeypatch):
    """A 2B model's FP32 decoder is 7 GB: past protobuf's 2 GB its weights travel in a data
    file beside the graph, listed and hashed by the manifest. The tiny bundle's FP32 graphs
    written that way (the limit lowered) load, verify and give the same vectors bit for bit;
    a changed byte in a data file is refused at load."""
    import shutil

    import onnx

    from edge_embed.errors import BundleError
    from edge_embed.export import onnx_files
    from edge_embed.export.writing import finish_bundle, image_variant
    from edge_embed.parity import Gates

    work = tmp_path / "bundle"
    shutil.copytree(colqwen3_bundle, work)
    manifest = Manifest.read(work / "manifest.json")
    old = manifest.variants["fp32"]
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_BYTES", 1024)
    for name in (old.file, old.vision.file):
        onnx_files.save_graph(onnx.load(str(work / name)), work / name)
    variant = image_variant("fp32", work / old.file, old.recipe, old.parity, work / old.vision.file,
                            old.vision.recipe, old.vision.parity, old.vision.precision,
                            Gates.recorded("fp32", old.recipe), vision_gate="fp32", task="multivector")
    data, vision_data = old.file + ".data", old.vision.file + ".data"
    assert variant.external_data == (data,) and variant.vision.external_data == (vision_data,)
    written = finish_bundle(work, manifest, list(manifest.files), {**manifest.variants, "fp32": variant})
    assert {data, vision_data} <= set(written.files)
    assert written.variants["fp32"].files == (old.file, old.vision.file, data, vision_data)
    assert Manifest.read(work / "manifest.json").variants["fp32"].vision.external_data == (vision_data,)

    moved = edge_embed.load(work, precision="fp32")
    items = [Image.open(skimage_photo("page.png")), ["the moon: ", Image.open(skimage_photo("moon.png"))], "a page"]
    for ours, theirs in zip(moved.embed_multi(items), fp32.embed_multi(items)):
        assert np.array_equal(ours, theirs)
    (q_moved,), (q_kept,) = moved.embed_multi(["where?"], kind="query"), fp32.embed_multi(["where?"], kind="query")
    assert np.array_equal(q_moved, q_kept)
    moved.close()

    for name in (data, vision_data):
        blob = bytearray((work / name).read_bytes())
        blob[len(blob) // 2] ^= 1
        saved = (work / name).read_bytes()
        (work / name).write_bytes(bytes(blob))
        with pytest.raises(BundleError, match="external data.*fails its checksum"):
            edge_embed.load(work, precision="fp32")
        (work / name).write_bytes(saved)
