"""The OpenAI-compatible HTTP API, over real loopback HTTP, with the real `openai` client."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import http.client
import json
import random
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

import edge_embed
from edge_embed.client import EmbedClient
from edge_embed.errors import InvalidInputError
from edge_embed.server import ServerConfig

from .fakes import FakeProvider
from .servers import on_server_loop, running_server, wait_until


_OPEN: list = []


def close_clients() -> None:
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture(autouse=True)
def _close_clients():
    """HTTP clients hold sockets; each test's are closed when it ends (TLS ones before their
    server stops, or the TLS goodbye outlives the test's event loop)."""
    yield
    close_clients()


def opened(client):
    _OPEN.append(client)
    return client


def openai_client(edge, *, token: str = "unused", scheme: str = "http", max_retries: int = 0,
                  **kwargs) -> openai.OpenAI:
    return opened(openai.OpenAI(base_url=f"{scheme}://127.0.0.1:{edge.http_port}/v1", api_key=token,
                                max_retries=max_retries, timeout=10, **kwargs))


def post(port: int, path: str, body: bytes, headers: dict | None = None, timeout: float = 10):
    """Send bytes as they are: (status, headers, parsed JSON body or raw bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        return _read(conn.getresponse())
    finally:
        conn.close()


def get(port: int, path: str, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        return _read(conn.getresponse())
    finally:
        conn.close()


def _read(response):
    raw = response.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def fake_unit(fake: FakeProvider, text: str, width: int = 8) -> np.ndarray:
    v = FakeProvider.vector(fake.tokenize([text])[0])[:width]
    return v / np.linalg.norm(v)


# -- the real client against the server's mechanics ------------------------------------


def test_openai_client_float_base64_and_default_give_the_same_vectors():
    fake = FakeProvider()
    texts = ["the cat sat", "on the mat"]
    with running_server(fake, http_port=0) as (edge, target):
        client = openai_client(edge)
        floats = client.embeddings.create(input=texts, model="fake-model", encoding_format="float")
        raw = client.embeddings.create(input=texts, model="fake-model", encoding_format="base64")
        default = client.embeddings.create(input=texts, model="fake-model")  # the client asks base64, decodes
        single = client.embeddings.create(input="the cat sat", model="fake-model")
        with EmbedClient(target) as grpc_client:
            over_grpc = grpc_client.embed(texts)
    as_float = np.array([d.embedding for d in floats.data], dtype=np.float32)
    as_base64 = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data])
    as_default = np.array([d.embedding for d in default.data], dtype=np.float32)
    assert np.array_equal(as_float, over_grpc) and np.array_equal(as_base64, over_grpc)
    assert np.array_equal(as_default, over_grpc)
    assert np.array_equal(np.array(single.data[0].embedding, dtype=np.float32), over_grpc[0])
    assert [d.index for d in floats.data] == [0, 1] and floats.model == "fake-model"
    tokens = sum(len(s) for s in fake.tokenize(texts))
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens


def test_dimensions_and_instruction_follow_the_grpc_semantics():
    fake = FakeProvider()
    with running_server(fake, http_port=0) as (edge, target):
        client = openai_client(edge)
        short = client.embeddings.create(input=["a b"], model="fake-model", dimensions=4, encoding_format="float")
        query = client.embeddings.create(input=["a b"], model="fake-model", encoding_format="float",
                                         extra_body={"instruction": "find"})
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            client.embeddings.create(input=["a b"], model="fake-model", dimensions=3)
        with EmbedClient(target) as grpc_client:
            assert np.array_equal(np.array(query.data[0].embedding, np.float32),
                                  grpc_client.embed(["a b"], instruction="find")[0])
    assert np.allclose(short.data[0].embedding, fake_unit(fake, "a b", 4), atol=1e-6)
    assert len(short.data[0].embedding) == 4


def test_errors_have_openai_shape_and_status():
    with running_server(FakeProvider(), http_port=0, token="s3cret") as (edge, _):
        good = openai_client(edge, token="s3cret")
        with pytest.raises(openai.NotFoundError) as missing:
            good.embeddings.create(input=["x"], model="text-embedding-3-small")
        assert "text-embedding-3-small" in missing.value.message and "fake-model" in missing.value.message
        assert missing.value.body["code"] == "NOT_FOUND"
        with pytest.raises(openai.AuthenticationError) as denied:
            openai_client(edge, token="wrong").embeddings.create(input=["x"], model="fake-model")
        assert denied.value.response.headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            openai_client(edge, token="wrong").models.list()
        with pytest.raises(openai.BadRequestError, match="token ids"):
            good.embeddings.create(input=[[1, 2, 3]], model="fake-model")
        with pytest.raises(openai.BadRequestError, match="empty"):
            good.embeddings.create(input=["  "], model="fake-model")
        with pytest.raises(openai.BadRequestError, match="input_type"):
            good.embeddings.create(input=["x"], model="fake-model", extra_body={"input_type": "query"})
        # Health needs no token (probes carry none); everything else does.
        assert get(edge.http_port, "/health")[0] == 200 and get(edge.http_port, "/ready")[0] == 200
        status, _, body = get(edge.http_port, "/v1/models")
        assert status == 401 and body["error"]["type"] == "authentication_error"
        models = good.models.list()
        assert [m.id for m in models.data] == ["fake-model"]
        status, _, body = get(edge.http_port, "/v2/embeddings", {"Authorization": "Bearer s3cret"})
        assert status == 404 and "/v1/embeddings" in body["error"]["message"]
        status, headers, body = get(edge.http_port, "/v1/embeddings", {"Authorization": "Bearer s3cret"})
        assert status == 405 and "POST" in headers["allow"] and body["error"]["code"] == "UNIMPLEMENTED"


def test_full_queue_answers_429_with_retry_after():
    fake = FakeProvider()
    fake.hang.set()
    with running_server(fake, http_port=0, max_queue_tokens=4, max_batch_size=1) as (edge, _):
        client = openai_client(edge)
        batcher = edge.pool.models["fake-model"].batcher
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(client.embeddings.create, input=["hang"], model="fake-model")
            deadline = time.monotonic() + 5
            while not _runs_hang(fake) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher.queued_tokens > 0  # the running request's tokens stay charged until it is done
            with pytest.raises(openai.RateLimitError) as refused:
                client.embeddings.create(input=["one two three four five"], model="fake-model")
            fake.hang.clear()
            assert len(stuck.result(10).data) == 1
    headers = refused.value.response.headers
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
    assert refused.value.body["code"] == "RESOURCE_EXHAUSTED" and "retry after" in refused.value.message
    # The client's own retries honour the hint and get through once the queue drains.
    with running_server(FakeProvider(delay_s=0.05), http_port=0, max_queue_tokens=4, max_batch_size=1) as (edge, _):
        patient = openai_client(edge, max_retries=100)
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: patient.embeddings.create(input=[f"w{i} a"], model="fake-model"),
                                    range(4)))
    assert all(len(r.data[0].embedding) == 8 for r in results)


def _runs_hang(fake: FakeProvider) -> bool:
    hang = fake.tokenize(["hang"])[0].tolist()
    return any(list(seq) == hang for batch in fake.batches for seq in batch)


def test_a_client_that_goes_away_leaves_the_queue():
    fake = FakeProvider()
    fake.hang.set()
    with running_server(fake, http_port=0, max_batch_size=1) as (edge, _):
        batcher = edge.pool.models["fake-model"].batcher
        with ThreadPoolExecutor(2) as pool:
            stuck = pool.submit(openai_client(edge).embeddings.create, input=["hang"], model="fake-model")
            deadline = time.monotonic() + 5
            while not _runs_hang(fake) and time.monotonic() < deadline:
                time.sleep(0.01)
            # The next batch is formed while one runs: this one fills it, so the next waits in the queue.
            filler = pool.submit(openai_client(edge).embeddings.create, input=["next in line"], model="fake-model")
            time.sleep(0.2)
            before = batcher.queued_tokens
            conn = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=10)
            conn.request("POST", "/v1/embeddings", body=json.dumps({"input": ["gone away"]}).encode(),
                         headers={"Content-Type": "application/json"})
            while batcher.queued_tokens == before and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher.queued_tokens > before  # queued behind the stuck run
            conn.close()
            while batcher.queued_tokens > before and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher.queued_tokens == before  # cancelled: its tokens left the queue
            fake.hang.clear()
            assert len(stuck.result(10).data) == 1 and len(filler.result(10).data) == 1
        time.sleep(0.2)
        cancelled = edge.metrics.requests.labels("HTTP /v1/embeddings", "CANCELLED")._value.get()
    gone = tuple(fake.tokenize(["gone away"])[0].tolist())
    assert all(gone not in batch for batch in fake.batches)  # never computed
    assert cancelled == 1


def test_http_and_grpc_requests_share_one_queue_and_batch():
    fake = FakeProvider(delay_s=0.05)
    with running_server(fake, http_port=0, max_wait_ms=150) as (edge, target):
        client = openai_client(edge)
        with EmbedClient(target) as grpc_client, ThreadPoolExecutor(2) as pool:
            over_http = pool.submit(client.embeddings.create, input=["from http"], model="fake-model")
            over_grpc = pool.submit(grpc_client.embed, ["from grpc"])
            over_http.result(10), over_grpc.result(10)
        requests = {s.labels["method"]: s.value for s in edge.metrics.requests.collect()[0].samples
                    if s.name.endswith("_total") and s.labels["code"] in ("200", "OK")}
    together = [b for b in fake.batches if len(b) == 2]
    assert together, fake.batches  # one batcher owns the queue: both transports share a run
    assert requests.get("HTTP /v1/embeddings") == 1 and requests.get("Embed") == 1


def test_tls_and_token_over_https(certs):
    import httpx2

    def trusting(client_cert: bool = False):
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        if client_cert:
            context.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
        return opened(httpx2.Client(verify=context))

    tls = {"tls_cert": certs / "server.pem", "tls_key": certs / "server.key"}
    with running_server(FakeProvider(), http_port=0, token="t0k", **tls) as (edge, _):
        client = openai_client(edge, token="t0k", scheme="https", http_client=trusting())
        assert len(client.embeddings.create(input=["over https"], model="fake-model").data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai_client(edge, scheme="https", http_client=trusting()).embeddings.create(input=["x"],
                                                                                         model="fake-model")
        with pytest.raises(openai.APIConnectionError):  # plain HTTP to a TLS port
            openai_client(edge, token="t0k").embeddings.create(input=["x"], model="fake-model")
        close_clients()
    with running_server(FakeProvider(), http_port=0, tls_client_ca=certs / "ca.pem", **tls) as (edge, _):
        client = openai_client(edge, scheme="https", http_client=trusting(client_cert=True))
        assert len(client.embeddings.create(input=["mutual"], model="fake-model").data) == 1
        with pytest.raises(openai.APIConnectionError):
            openai_client(edge, scheme="https", http_client=trusting()).embeddings.create(input=["x"],
                                                                                         model="fake-model")
        close_clients()


def test_drain_finishes_http_requests_in_flight_and_stops_listening():
    fake = FakeProvider(delay_s=0.5)
    with running_server(fake, http_port=0) as (edge, _):
        port = edge.http_port
        client = openai_client(edge)
        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(client.embeddings.create, input=["finishes during drain"], model="fake-model")
            time.sleep(0.2)
            assert get(port, "/ready")[0] == 200
            stopped = on_server_loop(edge, edge.stop(5.0))
            assert len(inflight.result(10).data) == 1
            stopped.result(10)
        with pytest.raises(OSError):  # drained: nothing listens any more
            get(port, "/health")


def test_ready_and_health_follow_a_stopped_worker():
    fake = FakeProvider()
    with running_server(fake, http_port=0, max_consecutive_failures=1) as (edge, _):
        port = edge.http_port
        assert get(port, "/ready")[0] == 200 and get(port, "/health")[0] == 200
        fake.fail_with = MemoryError("out of memory")
        status, _, body = post(port, "/v1/embeddings", json.dumps({"input": "fails"}).encode())
        assert status == 503 and body["error"]["code"] == "UNAVAILABLE"
        deadline = time.monotonic() + 5
        while get(port, "/ready")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(port, "/ready")[::2] == (503, {"status": "NOT_SERVING"})
        assert get(port, "/health")[0] == 503


def test_http_port_comes_from_the_environment():
    assert ServerConfig.from_sources({}, {"EDGE_EMBED_HTTP_PORT": "8080"}).http_port == 8080
    assert ServerConfig.from_sources({}, {}).http_port is None
    with pytest.raises(InvalidInputError, match="http_port"):
        ServerConfig(http_port=70000)


# -- malformed bodies --------------------------------------------------------------------


def _malformed_bodies(rng: random.Random, limit: int, max_inputs: int, max_chars: int) -> list[tuple[bytes, dict]]:
    """1,000 bodies, each wrong in one way a client or an attacker gets wrong, with random variations."""
    good = {"input": ["fine text"], "model": "fake-model"}
    wrong = {  # values each field must refuse
        "input": [None, True, 0, 1.5, "", "  ", [], {}, [None], [1.5], [[]], [True], ["ok", 3], "\ud800",
                  ["a\udfffb"], [""], ["a" * (max_chars + 1)], ["x"] * (max_inputs + 1), [[1, 2]], [7]],
        "model": [True, 0, [], {}, "nope", "x" * 300, "\ud800"],
        "dimensions": [True, 0, -1, 1.5, "8", [], 2**70, 3, 9],
        "encoding_format": ["float32", "", 1, True, [], {}],
        "user": [1, True, [], {}],
        "instruction": [1, True, [], {}, "\ud800"],
        "truncate": ["yes", 1, 0, [], {}],
    }

    def wrong_field() -> bytes:
        field = rng.choice(list(wrong))
        return json.dumps({**good, field: rng.choice(wrong[field])}).encode()

    def invalid_utf8() -> bytes:
        raw = json.dumps(good).encode()
        cut = rng.randint(0, len(raw))
        return raw[:cut] + bytes([rng.choice([0x80, 0xC0, 0xFF, 0xED])]) + raw[cut:]

    def deep() -> bytes:
        depth = rng.choice([100, 5000, 100_000])
        opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
        return ('{"input":' + opener * depth + '"x"' + closer * depth + "}").encode()

    def huge() -> bytes:
        return json.dumps({"input": ["word " * (limit // 4)], "model": "fake-model"}).encode()

    def broken_json() -> bytes:
        raw = json.dumps(good)
        return raw[: rng.randint(0, len(raw) - 1)].encode() + rng.choice([b"", b",", b"}}", b"NaN", b"\x00"])

    def not_an_object() -> bytes:
        return rng.choice([b"[]", b'"input"', b"42", b"null", b"true", b'[{"input": "x"}]', b"NaN", b"Infinity",
                           b'{"input": NaN}', b'{"input": ["x"], "dimensions": Infinity}', b"",
                           b'{"input": ["x"], "dimensions": ' + b"9" * 5000 + b"}"])

    def unknown_field() -> bytes:
        return json.dumps({**good, rng.choice(["input_type", "inputs", "normalize", "x" * 1000]): "query"}).encode()

    def random_bytes() -> bytes:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))

    makers = [wrong_field, wrong_field, invalid_utf8, deep, huge, broken_json, not_an_object, unknown_field,
              random_bytes]
    bodies = []
    for i in range(1000):
        maker = makers[i % len(makers)]
        if maker is random_bytes and rng.random() < 0.25:  # a compressed bomb: refused, never inflated
            bodies.append((gzip.compress(json.dumps({"input": ["x" * limit * 4]}).encode()),
                           {"Content-Encoding": "gzip"}))
        else:
            bodies.append((maker(), {}))
    return bodies


def test_a_thousand_malformed_bodies_get_only_4xx_and_the_server_stays_correct():
    fake = FakeProvider()
    limit = 64 * 1024
    rng = random.Random(11)
    bodies = _malformed_bodies(rng, limit, max_inputs=16, max_chars=200)
    statuses: dict[int, int] = {}
    with running_server(fake, http_port=0, max_message_bytes=limit, max_inputs=16, max_text_chars=200) as (edge, _):
        port = edge.http_port
        warm_up_batches = len(fake.batches)
        for body, headers in bodies:
            status, _, answer = post(port, "/v1/embeddings", body, headers)
            statuses[status] = statuses.get(status, 0) + 1
            assert 400 <= status < 500, (status, body[:200], answer)
            assert isinstance(answer, dict) and answer["error"]["message"], answer
        # Chunked bodies carry no length: aiohttp's own limit stops them.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/embeddings", body=iter([b'{"input": ["' + b"a" * limit, b'"]}']),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        assert conn.getresponse().status == 413
        conn.close()
        assert len(fake.batches) == warm_up_batches  # nothing malformed reached the model
        status, _, answer = post(port, "/v1/embeddings", json.dumps({"input": "still correct"}).encode())
        assert status == 200
        assert np.allclose(answer["data"][0]["embedding"], fake_unit(fake, "still correct"), atol=1e-6)
        assert get(port, "/ready")[0] == 200
        assert edge.service.memory.held == 0  # every reservation was released
    assert statuses.get(413, 0) >= 100 and statuses.get(400, 0) >= 500, statuses


# -- real models -------------------------------------------------------------------------


@pytest.mark.slow
def test_openai_client_vectors_equal_grpc_and_in_process_ones_for_a_real_model(minilm_bundle):
    from edge_embed.export.probes import probe_texts

    texts = probe_texts()[:24]
    provider = edge_embed.load(minilm_bundle, precision="int8")
    expected = provider.embed(texts)
    with running_server(provider, http_port=0, max_wait_ms=5) as (edge, target):
        client = openai_client(edge)
        with ThreadPoolExecutor(8) as pool:
            over_http = list(pool.map(
                lambda t: client.embeddings.create(input=t, model="sentence-transformers/all-MiniLM-L6-v2",
                                                   encoding_format="float"), texts))
        batch = client.embeddings.create(input=texts, model="sentence-transformers/all-MiniLM-L6-v2")
        with EmbedClient(target) as grpc_client:
            over_grpc = grpc_client.embed(texts)
    single = np.array([r.data[0].embedding for r in over_http], dtype=np.float32)
    batched = np.array([d.embedding for d in batch.data], dtype=np.float32)
    # Two requests of the same 24 texts may be cut into batches differently (a batch takes the
    # rows memory allows at that moment, with another batch in flight or not): per-token INT8
    # then agrees to float rounding, not to the bit.
    assert np.abs(batched - over_grpc).max() <= 1e-5
    assert np.sum(single * expected, axis=1).min() >= 0.99999 and np.sum(batched * expected, axis=1).min() >= 0.99999
    assert batch.usage.prompt_tokens == sum(provider.count_tokens(texts))


@pytest.mark.slow
def test_qwen3_queries_with_an_instruction_and_matryoshka_dims_over_http(qwen3_bundle):
    provider = edge_embed.load(qwen3_bundle, precision="fp32")
    instruction = provider.manifest.default_instruction
    texts = ["what is a jetson", "the cat sat on the mat"]
    with running_server(provider, http_port=0) as (edge, target):
        client = openai_client(edge)
        with EmbedClient(target) as grpc_client:
            for dims in (32, provider.info.dim):
                answer = client.embeddings.create(input=texts, model="tiny-qwen3", dimensions=dims,
                                                  extra_body={"instruction": instruction})
                got = np.array([d.embedding for d in answer.data], dtype=np.float32)
                assert got.shape == (2, dims)
                assert np.array_equal(got, grpc_client.embed(texts, instruction=instruction, dimensions=dims))
                local = provider.embed(texts, instruction=instruction, dimensions=dims)
                assert np.sum(got * local, axis=1).min() >= 0.99999
            documents = client.embeddings.create(input=texts, model="tiny-qwen3")
            assert np.array_equal(np.array([d.embedding for d in documents.data], np.float32),
                                  grpc_client.embed(texts))


# -- bodies that idle, deadlines, limits -------------------------------------------------


def start_body(port: int, *, chunked: bool, length: int = 5_000_000, sent: bytes = b"",
               headers: dict | None = None) -> socket.socket:
    """A POST /v1/embeddings whose headers arrive and whose body (after `sent`) never does:
    the client that idles, declaring a big Content-Length or a chunked body."""
    sock = opened(socket.create_connection(("127.0.0.1", port), timeout=10))
    framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(length)}
    lines = [f"{k}: {v}" for k, v in {"Host": "127.0.0.1", "Content-Type": "application/json", **framing,
                                         **(headers or {})}.items()]
    sock.sendall(("POST /v1/embeddings HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode())
    if sent:
        sock.sendall(b"%x\r\n%s\r\n" % (len(sent), sent) if chunked else sent)
    return sock


def answer_on(sock: socket.socket):
    """The response on a raw socket: (status, headers, parsed JSON body)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return _read(response)


def test_idle_bodies_hold_no_request_memory_and_grpc_is_served_meanwhile():
    with running_server(FakeProvider(), http_port=0) as (edge, target):
        edge.pool.budget_bytes = edge.pool.committed_bytes + 2_000_000  # room for small requests only
        idle = [start_body(edge.http_port, chunked=i % 2 == 1) for i in range(12)]  # 5 MB each, or chunked
        assert wait_until(lambda: edge.service.inflight == 12)
        time.sleep(0.1)
        held = edge.service.memory.held
        with EmbedClient(target, retries=0) as client:
            assert client.embed(["served while bodies idle"]).shape == (1, 8)
        assert 0 < held < 1_000_000, held  # charged as bytes arrive, not as declared
        assert edge.service.memory.held < 1_000_000
        for sock in idle:
            sock.close()
        assert wait_until(lambda: edge.service.inflight == 0 and edge.service.memory.held == 0)


def test_a_body_that_does_not_arrive_in_time_gets_408_and_gives_its_memory_back():
    with running_server(FakeProvider(), http_port=0, body_timeout_s=1) as (edge, _):
        port = edge.http_port
        for chunked in (False, True):
            start = time.monotonic()
            sock = start_body(port, chunked=chunked, sent=b'{"input": ["' + b"a" * 1000)
            status, headers, body = answer_on(sock)
            waited = time.monotonic() - start
            assert status == 408 and 0.9 <= waited < 3, (status, waited, body)
            assert body["error"]["code"] == "DEADLINE_EXCEEDED" and body["error"]["type"] == "invalid_request_error"
            assert "did not arrive within 1 s" in body["error"]["message"] and headers["x-request-id"]
            assert wait_until(lambda: edge.service.memory.held == 0 and edge.service.inflight == 0)
        status, _, answer = post(port, "/v1/embeddings", json.dumps({"input": "on time"}).encode())
        assert status == 200 and len(answer["data"][0]["embedding"]) == 8


def test_at_most_half_the_request_slots_wait_for_bodies():
    with running_server(FakeProvider(), http_port=0, max_concurrent_rpcs=4, body_timeout_s=1) as (edge, target):
        port = edge.http_port
        slow = [start_body(port, chunked=False), start_body(port, chunked=True)]
        assert wait_until(lambda: edge.service.inflight == 2)
        start = time.monotonic()
        status, headers, body = answer_on(start_body(port, chunked=False, length=100))
        assert status == 429 and time.monotonic() - start < 1, (status, body)  # not after a body timeout
        assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "RESOURCE_EXHAUSTED"
        assert "bodies are arriving" in body["error"]["message"]
        with EmbedClient(target, retries=0) as client:  # the other half of the slots still run models
            assert client.embed(["served beside slow bodies"]).shape == (1, 8)
        assert [answer_on(sock)[0] for sock in slow] == [408, 408]
        status, _, answer = post(port, "/v1/embeddings", json.dumps({"input": "after the slow ones"}).encode())
        assert status == 200 and len(answer["data"][0]["embedding"]) == 8
        assert edge.metrics.refusals.labels("bodies")._value.get() == 1
        assert edge.service.memory.held == 0


def test_the_bearer_scheme_is_case_insensitive():
    with running_server(FakeProvider(), http_port=0, token="s3cret") as (edge, _):
        port = edge.http_port
        body = json.dumps({"input": "authorized"}).encode()
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            status, _, answer = post(port, "/v1/embeddings", body, {"Authorization": f"{scheme} s3cret"})
            assert status == 200 and len(answer["data"]) == 1, (scheme, answer)
            assert get(port, "/v1/models", {"Authorization": f"{scheme} s3cret"})[0] == 200
        for wrong in ("bearer wrong", "Bearer s3cret2", "Bearer S3CRET", "Basic s3cret", "s3cret", "bearer", None):
            status, headers, answer = post(port, "/v1/embeddings", body, {"Authorization": wrong} if wrong else {})
            assert status == 401 and headers["www-authenticate"] == "Bearer", wrong
            assert answer["error"]["type"] == "authentication_error"
        assert get(port, "/health")[0] == 200 and get(port, "/ready")[0] == 200


def test_openai_clients_may_send_2048_inputs_and_no_more():
    assert ServerConfig().max_inputs == 2048  # OpenAI's own limit per request
    fake = FakeProvider()
    texts = [f"text number {i}" for i in range(2048)]
    with running_server(fake, http_port=0) as (edge, _):
        client = openai_client(edge)
        answer = client.embeddings.create(input=texts, model="fake-model")
        with pytest.raises(openai.BadRequestError, match="2049 texts; the limit is 2048"):
            client.embeddings.create(input=[*texts, "one more"], model="fake-model")
    assert [d.index for d in answer.data] == list(range(2048))
    got = np.array([d.embedding for d in answer.data], dtype=np.float32)
    for i in (0, 1000, 2047):
        assert np.allclose(got[i], fake_unit(fake, texts[i]), atol=1e-6)


class LeakyProvider(FakeProvider):
    """A runner whose tokenizer fails as a bug would: a foreign exception naming a file."""

    def tokenize(self, texts, **kwargs):
        if any("explode" in t for t in texts):
            raise RuntimeError("/secret/path/model.onnx broke")
        return super().tokenize(texts, **kwargs)


def test_an_internal_error_gives_the_client_a_request_id_and_the_log_the_detail(caplog):
    with running_server(LeakyProvider(), http_port=0) as (edge, _):
        status, headers, body = post(edge.http_port, "/v1/embeddings", json.dumps({"input": ["explode"]}).encode())
        fine = post(edge.http_port, "/v1/embeddings", json.dumps({"input": ["fine"]}).encode())
    assert status == 500 and body["error"]["type"] == "server_error" and body["error"]["code"] == "INTERNAL"
    rid = headers["x-request-id"]
    assert f"request {rid}" in body["error"]["message"]
    assert "/secret" not in json.dumps(body) and "model.onnx" not in json.dumps(body)
    assert "/secret/path/model.onnx broke" in caplog.text and rid in caplog.text
    assert fine[0] == 200 and fine[1]["x-request-id"] not in ("", rid)


class WideProvider(FakeProvider):
    """A 64-dim fake: a few hundred inputs make a response big enough to be built off the loop."""

    @property
    def info(self):
        return dataclasses.replace(super().info, dim=64)

    @staticmethod
    def vector(seq) -> np.ndarray:
        rng = np.random.default_rng(int(sum((i + 1) * int(t) for i, t in enumerate(seq))) % (2**32))
        return rng.standard_normal(64).astype(np.float32)


def test_a_big_response_is_the_grpc_answer_in_float_and_base64():
    from edge_embed.server.core import _INLINE_VALUES

    texts = [f"word{i} and word{i * 7}" for i in range(300)]
    assert len(texts) * 64 > _INLINE_VALUES
    with running_server(WideProvider(), http_port=0) as (edge, target):
        client = openai_client(edge)
        floats = client.embeddings.create(input=texts, model="fake-model", encoding_format="float")
        raw = client.embeddings.create(input=texts, model="fake-model", encoding_format="base64")
        with EmbedClient(target) as grpc_client:
            over_grpc = grpc_client.embed(texts)
    assert over_grpc.shape == (300, 64)
    as_float = np.array([d.embedding for d in floats.data], dtype=np.float32)
    as_base64 = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data])
    assert np.array_equal(as_float, over_grpc) and np.array_equal(as_base64, over_grpc)
    assert [d.index for d in raw.data] == list(range(300))
