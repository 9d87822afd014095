"""A real gRPC server over loopback: contract, batching, errors, auth, TLS, overload, death."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import edge_embed
from edge_embed.client import EmbedClient
from edge_embed.errors import (
    BackendUnavailableError,
    InvalidInputError,
    ModelNotFoundError,
    UnauthenticatedError,
)
from edge_embed.v1 import embed_pb2 as pb

from .fakes import FakeProvider
from .servers import running_server, settle

METHOD = "/edge_embed.v1.EmbeddingService/"


def health_status(target: str, **channel) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def raw_call(target: str, method: str, payload: bytes, timeout: float = 5.0):
    """Send bytes as they are, so malformed messages reach the server."""
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(METHOD + method, request_serializer=None, response_deserializer=None)
        return call(payload, timeout=timeout)


@pytest.mark.slow
def test_served_vectors_equal_in_process_ones_under_concurrency(minilm_bundle):
    from edge_embed.export.probes import probe_texts

    texts = probe_texts()[:96]
    provider = edge_embed.load(minilm_bundle, precision="int8")
    expected = provider.embed(texts)
    with running_server(provider, max_wait_ms=5) as (edge, target):
        with EmbedClient(target) as client:
            with ThreadPoolExecutor(16) as pool:
                got = list(pool.map(lambda t: client.embed([t])[0], texts))
            pair = client.embed_response(texts[:2])
            info = client.info()
    assert np.sum(np.array(got) * expected, axis=1).min() >= 0.99999  # each answer is its own text's
    assert list(pair.token_counts) == provider.count_tokens(texts[:2])
    assert pair.queue_ms >= 0 and pair.inference_ms > 0
    assert (info.model, info.dim, info.precision, info.backend) == (
        "sentence-transformers/all-MiniLM-L6-v2", 384, "int8", "onnx")
    assert info.execution_providers == ["CPUExecutionProvider"] and info.version == edge_embed.__version__
    assert info.batching.max_wait_ms == 5
    # INT8 batches like FP32: concurrent requests share model batches (the old per-tensor
    # INT8 ran one text per batch, a mean of exactly 1).
    samples = {s.name: s.value for s in edge.metrics.batch_size.collect()[0].samples}
    batches, texts_run = samples["edge_embed_batch_size_count"], samples["edge_embed_batch_size_sum"]
    assert texts_run >= len(texts) and texts_run / batches > 1.5, (texts_run, batches)


@pytest.mark.parametrize("stepped", [False, True])
def test_the_batcher_keeps_to_row_steps_where_the_runner_compiles_profiles(stepped):
    """A runner that compiles shape profiles (TensorRT) gets batches with a power-of-two
    row count that its profile for that width holds: 20-token texts under a 64-token
    budget run 2 at a time, not 3."""
    fake = FakeProvider(delay_s=0.05)
    fake.stepped_rows = stepped
    text = " ".join(f"w{i}" for i in range(20))
    with running_server(fake, max_wait_ms=20, max_batch_size=8, max_batch_tokens=64) as (_, target):
        with EmbedClient(target) as client, ThreadPoolExecutor(12) as pool:
            list(pool.map(lambda i: client.embed([f"{text} {i}"]), range(12)))
    rows = [len(b) for b in fake.batches[1:]]  # after the warm-up batch
    assert max(rows) == (2 if stepped else 3), rows


def test_batches_group_concurrent_requests():
    fake = FakeProvider(delay_s=0.05)
    with running_server(fake, max_wait_ms=20, max_batch_size=8) as (_, target):
        with EmbedClient(target) as client, ThreadPoolExecutor(24) as pool:
            vectors = list(pool.map(lambda i: client.embed([f"text number {i}"]), range(24)))
    warm = 1
    assert len(fake.batches) - warm < 24  # requests shared batches
    assert max(len(b) for b in fake.batches) <= 8
    for i, v in enumerate(vectors):
        expected = FakeProvider.vector(fake.tokenize([f"text number {i}"])[0])
        assert np.allclose(v[0], expected / np.linalg.norm(expected), atol=1e-6)


def test_options_dimensions_normalize_instruction():
    fake = FakeProvider()
    with running_server(fake) as (_, target), EmbedClient(target) as client:
        full = client.embed(["a b c"], normalize=False)
        short = client.embed(["a b c"], dimensions=4)
        query = client.embed(["a b c"], instruction="find")
        tokens = client.tokenize(["a b c"])
    assert np.allclose(full[0], FakeProvider.vector(fake.tokenize(["a b c"])[0]))
    assert short.shape == (1, 4) and np.isclose(np.linalg.norm(short), 1.0)
    assert not np.allclose(query[0, :4], short[0])
    assert len(tokens[0]) == 3


@pytest.mark.parametrize(
    ("request_fields", "error", "message"),
    [
        ({"inputs": []}, InvalidInputError, "inputs is empty"),
        ({"inputs": ["x"] * 9}, InvalidInputError, "inputs has 9 texts; the limit is 8"),
        ({"inputs": ["ok", "y" * 201]}, InvalidInputError, r"inputs\[1\] has 201 characters"),
        ({"inputs": ["ok", " "]}, InvalidInputError, r"inputs\[1\] is empty"),
        ({"inputs": ["w " * 80], "truncate": False}, InvalidInputError, r"inputs\[0\] is longer"),
        ({"inputs": ["x"], "dimensions": 3}, InvalidInputError, "dimensions: dimensions=3 is not allowed"),
        ({"inputs": ["x"], "model": "other"}, ModelNotFoundError, "model 'other' is not served here"),
    ],
)
def test_bad_requests_get_clear_errors(request_fields, error, message):
    with running_server(FakeProvider(), max_inputs=8, max_text_chars=200) as (_, target):
        with EmbedClient(target) as client:
            fields = {"dimensions": None, "truncate": True, "model": None, **request_fields}
            with pytest.raises(error, match=message):
                client.embed(fields.pop("inputs"), **fields)


def test_invalid_utf8_and_oversized_messages_are_invalid_argument():
    with running_server(FakeProvider(), max_message_bytes=2000) as (_, target):
        bad_utf8 = b"\x0a\x03\xff\xfe\xfd"  # field 1 (inputs), 3 bytes that are not UTF-8
        with pytest.raises(grpc.RpcError) as info:
            raw_call(target, "Embed", bad_utf8)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not parse" in info.value.details()
        big = pb.EmbedRequest(inputs=["word " * 500]).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            raw_call(target, "Embed", big)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the limit is 2000" in info.value.details()


def test_stream_answers_in_order_and_survives_a_bad_message():
    fake = FakeProvider()
    requests = [pb.EmbedRequest(inputs=[f"message {i}"], request_id=str(i)) for i in range(30)]
    requests[7] = pb.EmbedRequest(inputs=[], request_id="7")
    requests[12] = pb.EmbedRequest(inputs=["x"], dimensions=2, request_id="12")
    with running_server(fake) as (_, target), grpc.insecure_channel(target) as ch:
        stream = ch.stream_stream(METHOD + "EmbedStream", pb.EmbedRequest.SerializeToString,
                                  pb.EmbedStreamResponse.FromString)
        answers = list(stream(iter(requests), timeout=30))
    assert [a.request_id for a in answers] == [str(i) for i in range(30)]
    assert answers[7].error.code == "INVALID_ARGUMENT" and "inputs is empty" in answers[7].error.message
    assert answers[12].error.code == "INVALID_ARGUMENT"
    for i in set(range(30)) - {7, 12}:
        expected = FakeProvider.vector(fake.tokenize([f"message {i}"])[0])
        assert np.allclose(answers[i].response.embeddings[0].values, expected / np.linalg.norm(expected), atol=1e-6)


def test_bearer_token_guards_everything_but_health():
    with running_server(FakeProvider(), token="s3cret") as (_, target):
        with EmbedClient(target) as anonymous, pytest.raises(UnauthenticatedError):
            anonymous.embed(["x"])
        with EmbedClient(target, token="wrong") as wrong, pytest.raises(UnauthenticatedError):
            wrong.info()
        with EmbedClient(target, token="s3cret") as client:
            assert client.embed(["x"]).shape == (1, 8)
        assert health_status(target) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(target) as ch:
            stream = ch.stream_stream(METHOD + "EmbedStream", pb.EmbedRequest.SerializeToString,
                                      pb.EmbedStreamResponse.FromString)
            with pytest.raises(grpc.RpcError) as info:
                list(stream(iter([pb.EmbedRequest(inputs=["x"])]), timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tls_and_mutual_tls(certs):
    tls = {"tls_cert": certs / "server.pem", "tls_key": certs / "server.key"}
    with running_server(FakeProvider(), **tls) as (_, target):
        with EmbedClient(target, root_cert=certs / "ca.pem") as client:
            assert client.embed(["over tls"]).shape == (1, 8)
        with EmbedClient(target, timeout=2, retries=0) as plaintext, pytest.raises(BackendUnavailableError):
            plaintext.embed(["x"])
    with running_server(FakeProvider(), tls_client_ca=certs / "ca.pem", **tls) as (_, target):
        with EmbedClient(target, root_cert=certs / "ca.pem", client_cert=certs / "client.pem",
                         client_key=certs / "client.key") as client:
            assert client.embed(["mutual"]).shape == (1, 8)
        with EmbedClient(target, root_cert=certs / "ca.pem", timeout=2, retries=0) as no_cert:
            with pytest.raises(BackendUnavailableError):
                no_cert.embed(["x"])


def test_full_queue_rejects_with_a_retry_hint():
    """A request waits for queue room at most half the time to its deadline; one that
    cannot get in by then is refused with a hint, never left to time out."""
    fake = FakeProvider(delay_s=0.2)
    with running_server(fake, max_queue_tokens=12, max_batch_size=1, max_wait_ms=0) as (_, target):
        with grpc.insecure_channel(target) as ch:
            call = ch.unary_unary(METHOD + "Embed", pb.EmbedRequest.SerializeToString, pb.EmbedResponse.FromString)
            settled = settle([call.future(pb.EmbedRequest(inputs=[f"t {i}"]), timeout=3) for i in range(20)])
    outcomes = [code for code, _ in settled]
    for _, exc in settled:
        assert exc is None or (int(dict(exc.trailing_metadata())["retry-after-ms"]) > 0
                               and "retry after" in exc.details())
    assert "RESOURCE_EXHAUSTED" in outcomes and "OK" in outcomes
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}


def test_client_retries_overload_until_it_gets_through():
    fake = FakeProvider(delay_s=0.05)
    with running_server(fake, max_queue_tokens=11, max_batch_size=1, max_wait_ms=0) as (_, target):
        with EmbedClient(target, retries=50, timeout=30) as client, ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: client.embed([f"r {i}"]), range(6)))
    assert all(r.shape == (1, 8) for r in results)


def test_expired_requests_are_dropped_before_compute():
    fake = FakeProvider(delay_s=0.4)
    with running_server(fake, max_batch_size=1, max_wait_ms=0) as (_, target):
        with grpc.insecure_channel(target) as ch:
            call = ch.unary_unary(METHOD + "Embed", pb.EmbedRequest.SerializeToString, pb.EmbedResponse.FromString)
            slow = call.future(pb.EmbedRequest(inputs=["occupies the worker"]), timeout=10)
            time.sleep(0.1)
            with pytest.raises(grpc.RpcError) as info:
                call(pb.EmbedRequest(inputs=["gives up early"]), timeout=0.1)
            # Refused at once when the measured speed says it cannot make its deadline, else
            # dropped from the queue when the deadline passes: never computed either way.
            assert info.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
            slow.result()
            time.sleep(0.6)
    computed = [t for batch in fake.batches for t in batch]
    assert fake.tokenize(["gives up early"])[0].tolist() not in [list(t) for t in computed]


def test_thousands_of_malformed_requests_leave_the_server_correct():
    fake = FakeProvider()
    rng = random.Random(7)
    codes: dict[str, int] = {}
    with running_server(fake, max_inputs=16, max_text_chars=200, max_message_bytes=4096) as (_, target):
        with grpc.insecure_channel(target) as ch:
            methods = {m: ch.unary_unary(METHOD + m, None, None) for m in ("Embed", "Tokenize", "Info")}
            for i in range(2500):
                kind = rng.random()
                if kind < 0.4:
                    payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
                else:
                    req = pb.EmbedRequest(
                        inputs=["".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 300)))
                                for _ in range(rng.randint(0, 20))],
                        dimensions=rng.choice([0, 1, 4, 8, 9, 2**31]), instruction=rng.choice(["", "find", " "]),
                        model=rng.choice(["", "", "fake-model", "nope"]),
                    )
                    payload = req.SerializeToString()
                try:
                    methods[rng.choice(list(methods))](payload, timeout=5)
                    codes["OK"] = codes.get("OK", 0) + 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
        assert set(codes) <= {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}, codes
        assert codes.get("INVALID_ARGUMENT", 0) > 500
        with EmbedClient(target) as client:
            v = client.embed(["still correct"])
        expected = FakeProvider.vector(fake.tokenize(["still correct"])[0])
        assert np.allclose(v[0], expected / np.linalg.norm(expected), atol=1e-6)
        assert health_status(target) == health_pb2.HealthCheckResponse.SERVING


def test_metrics_endpoint():
    import urllib.request

    with running_server(FakeProvider(), metrics_port=0) as (edge, target):
        with EmbedClient(target) as client:
            client.embed(["a", "b"])
            with pytest.raises(InvalidInputError):
                client.embed([])
        body = urllib.request.urlopen(f"http://127.0.0.1:{edge.metrics_port}/metrics", timeout=5).read().decode()
    for name in ('edge_embed_requests_total{code="OK",method="Embed"} 1.0',
                 'edge_embed_requests_total{code="INVALID_ARGUMENT",method="Embed"} 1.0',
                 "edge_embed_batch_size_bucket", "edge_embed_batch_tokens_bucket", "edge_embed_queue_seconds_bucket",
                 "edge_embed_inference_seconds_bucket", "edge_embed_request_seconds_bucket",
                 "edge_embed_queue_depth", "process_resident_memory_bytes", "edge_embed_serving 1.0",
                 'edge_embed_model_info{backend="fake"'):
        assert name in body, name
