"""Rerankers served beside embedders: one pool, one memory budget, real bundles, real gRPC
and HTTP over loopback, and the CLI in a real process."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import grpc
import numpy as np
import pytest

import edge_embed
from edge_embed.client import EmbedClient
from edge_embed.errors import InvalidInputError
from edge_embed.memory import measure_footprint
from edge_embed.server import ServerConfig
from edge_embed.server.pool import pool_from_config
from edge_embed.server.pool import parse_model_sources
from edge_embed.v1 import embed_pb2 as pb

from .servers import running_server
from .test_http import post
from .test_rerank import DOCUMENTS, QUERY

pytestmark = pytest.mark.slow


@pytest.fixture
def footprints(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_EMBED_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def sources(qwen3_bundle, qwen3_reranker_bundle, cross_encoder_bundle, footprints):
    found = parse_model_sources((f"embedder={qwen3_bundle}@fp32", f"reranker={qwen3_reranker_bundle}@fp32",
                                 f"cross={cross_encoder_bundle}@int8"), None)
    for source in found:
        measure_footprint(source.path, source.precision)
    return found


def _rpc(target: str, method: str, request, response_type):
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/edge_embed.v1.EmbeddingService/{method}", request.SerializeToString,
                                   response_type.FromString)
        return call(request, timeout=60)


def test_grpc_and_http_rerank_equal_the_python_api(sources, qwen3_reranker_bundle, cross_encoder_bundle):
    with edge_embed.load(qwen3_reranker_bundle, precision="fp32") as reranker:
        expected = reranker.rerank(QUERY, DOCUMENTS)
        expected_tokens = [len(s) for s in reranker.tokenize_pairs(QUERY, DOCUMENTS)]
    with edge_embed.load(cross_encoder_bundle, precision="int8") as cross:
        expected_cross = cross.rerank(QUERY, DOCUMENTS, top_n=2)
    pool = pool_from_config(ServerConfig(memory_budget=2**40), sources)
    with running_server(pool, http_port=0) as (edge, target):
        with EmbedClient(target, timeout=60) as client:
            response = client.rerank(QUERY, DOCUMENTS, model="reranker", return_documents=True)
            assert [(r.index, r.score) for r in response.results] == \
                   [(r.index, pytest.approx(r.score, abs=1e-6)) for r in expected]
            assert [r.document for r in response.results] == [DOCUMENTS[r.index] for r in response.results]
            assert list(response.token_counts) == expected_tokens and response.model == "reranker"
            top = client.rerank(QUERY, DOCUMENTS, model="cross", top_n=2)
            assert [r.index for r in top.results] == [r.index for r in expected_cross]
            np.testing.assert_allclose([r.score for r in top.results], [r.score for r in expected_cross], atol=1e-6)
            assert client.embed(["an embedder beside the rerankers"], model="embedder").shape == (1, 64)
            tasks = {m.name: m.task for m in client.info().models}
            assert tasks == {"embedder": "embed", "reranker": "rerank", "cross": "rerank"}
            assert client.info(model="reranker").task == "rerank"

        status, _, body = post(edge.http_port, "/v1/rerank", json.dumps({
            "model": "reranker", "query": QUERY, "documents": [{"text": d} for d in DOCUMENTS], "top_n": 3,
            "return_documents": True}).encode())
        assert status == 200 and body["model"] == "reranker"
        assert [r["index"] for r in body["results"]] == [r.index for r in expected[:3]]
        np.testing.assert_allclose([r["relevance_score"] for r in body["results"]],
                                   [r.score for r in expected[:3]], atol=1e-6)
        assert [r["document"]["text"] for r in body["results"]] == [DOCUMENTS[r.index] for r in expected[:3]]
        assert body["usage"]["total_tokens"] == sum(expected_tokens)


def test_a_request_to_the_wrong_kind_of_model_is_failed_precondition_naming_both(sources):
    pool = pool_from_config(ServerConfig(memory_budget=2**40), sources)
    with running_server(pool, http_port=0) as (edge, target):
        with pytest.raises(grpc.RpcError) as info:
            _rpc(target, "Embed", pb.EmbedRequest(inputs=["text"], model="reranker"), pb.EmbedResponse)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "reranker is a reranker and cannot embed texts; send this request to an embedding model" \
               in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            _rpc(target, "Rerank", pb.RerankRequest(query=QUERY, documents=DOCUMENTS, model="embedder"),
                 pb.RerankResponse)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "embedder is an embedding model and cannot rerank documents; send this request to a reranker" \
               in info.value.details()
        # Refused before any load: the reranker was never loaded for the embedding request.
        assert {m.name: m.state for m in pool.status()}["reranker"].value == "unloaded"

        status, _, body = post(edge.http_port, "/v1/embeddings",
                               json.dumps({"model": "cross", "input": ["text"]}).encode())
        assert status == 400 and body["error"]["code"] == "FAILED_PRECONDITION"
        status, _, body = post(edge.http_port, "/v1/rerank",
                               json.dumps({"model": "embedder", "query": QUERY, "documents": DOCUMENTS}).encode())
        assert status == 400 and "cannot rerank documents" in body["error"]["message"]
        for bad, match in (({"query": QUERY}, "documents is required"),
                           ({"documents": DOCUMENTS}, "query is required"),
                           ({"query": QUERY, "documents": DOCUMENTS, "top_k": 2}, "unknown field"),
                           ({"query": QUERY, "documents": [3]}, "documents\\[0\\] must be a string"),
                           ({"query": QUERY, "documents": DOCUMENTS, "top_n": 0}, "top_n must be a positive"),
                           ({"query": "", "documents": DOCUMENTS}, "query is empty"),
                           ({"query": QUERY, "documents": []}, "documents is empty")):
            status, _, body = post(edge.http_port, "/v1/rerank", json.dumps({"model": "reranker", **bad}).encode())
            assert status == 400, (bad, body)
            assert body["error"]["code"] == "INVALID_ARGUMENT"
            assert re.search(match, body["error"]["message"]), (match, body)
        with pytest.raises(grpc.RpcError) as info:
            _rpc(target, "Rerank", pb.RerankRequest(query=QUERY, documents=["d"] * 3000, model="reranker"),
                 pb.RerankResponse)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "the limit is" in info.value.details()


def test_embedders_and_rerankers_take_turns_within_one_budget(sources):
    """A budget for the process and one model: each request loads its model and evicts the
    other kind, and every answer is right."""
    pool = pool_from_config(ServerConfig(memory_budget=2**40), sources[:2])
    with running_server(pool) as (edge, target):
        pool.budget_bytes = pool.committed_bytes + pool.charge_for("reranker")[0] // 2
        with EmbedClient(target, timeout=60, retries=10) as client:
            first = client.rerank(QUERY, DOCUMENTS, model="reranker")
            vector = client.embed(["text"], model="embedder")
            again = client.rerank(QUERY, DOCUMENTS, model="reranker")
            info = client.info()
        assert [r.index for r in again.results] == [r.index for r in first.results]
        assert vector.shape == (1, 64)
        by_name = {m.name: m for m in info.models}
        assert by_name["reranker"].loads == 2 and by_name["embedder"].evictions >= 1
        assert info.memory.committed_bytes <= info.memory.budget_bytes


def test_the_cli_reranks_in_process_and_through_a_server(qwen3_reranker_bundle, sources):
    argv = [sys.executable, "-m", "edge_embed.cli", "rerank", QUERY, *DOCUMENTS, "--top-n", "2"]
    local = subprocess.run([*argv, "--bundle", str(qwen3_reranker_bundle), "--precision", "fp32"],
                           capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    rows = [json.loads(line) for line in local.stdout.splitlines()]
    assert len(rows) == 2 and rows[0]["score"] >= rows[1]["score"]
    assert rows[0]["document"] == DOCUMENTS[rows[0]["index"]]
    pool = pool_from_config(ServerConfig(memory_budget=2**40), [sources[1]])
    with running_server(pool) as (edge, target):
        served = subprocess.run([*argv, "--server", target], capture_output=True, text=True, timeout=120)
    assert served.returncode == 0, served.stderr
    assert [r["index"] for r in map(json.loads, served.stdout.splitlines())] == [r["index"] for r in rows]
    missing = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert missing.returncode == InvalidInputError.exit_code and "--bundle or EDGE_EMBED_RERANKER" in missing.stderr
