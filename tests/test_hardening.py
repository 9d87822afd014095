"""The gRPC server against the lock-out, self-restart and hang defects: auth before memory,
health never refused for load, poisoned inputs that never stop the worker, a hung run
that ends the process, admission by real tokens, one batching policy, request ids."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_embed.batching import BatchLimits, padded_share, plan_batches
from edge_embed.client import EmbedClient
from edge_embed.errors import InputRunError, InvalidInputError
from edge_embed.server import ServerConfig, create_server
from edge_embed.server.batcher import Ticket, TokenBudgetBatcher
from edge_embed.v1 import embed_pb2 as pb

from .conftest import REPO
from .fakes import FakeProvider, word_id
from .servers import running_server, settle, wait_until
from .test_serve_process import free_port

METHOD = "/edge_embed.v1.EmbeddingService/"
SERVING = health_pb2.HealthCheckResponse.SERVING


def health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def embed_call(channel: grpc.Channel):
    return channel.unary_unary(METHOD + "Embed", pb.EmbedRequest.SerializeToString, pb.EmbedResponse.FromString)


def trailers(exc: grpc.RpcError) -> dict[str, str]:
    return dict(exc.trailing_metadata() or ())


# -- auth ---------------------------------------------------------------------------------


def test_unauthenticated_calls_are_refused_before_any_memory_is_held():
    """40 unauthenticated 1 MB calls used to leave their request memory held for good, until
    every authenticated call was RESOURCE_EXHAUSTED: a refused call is never parsed now."""
    with running_server(FakeProvider(), token="s3cret") as (edge, target):
        edge.pool.budget_bytes = edge.pool.committed_bytes + 20_000_000  # room for three such calls
        big = pb.EmbedRequest(inputs=["word " * 40_000] * 5)  # 1 MB
        with grpc.insecure_channel(target) as ch:
            outcomes = settle([embed_call(ch).future(big, timeout=20, metadata=(("authorization", "Bearer nope"),))
                               for _ in range(40)])
        assert {code for code, _ in outcomes} == {"UNAUTHENTICATED"}
        assert edge.service.memory.held == 0
        with EmbedClient(target, token="s3cret", retries=0) as client:
            assert client.embed(["let in"]).shape == (1, 8)
        assert edge.service.memory.held == 0


def test_the_bearer_scheme_is_case_insensitive():
    with running_server(FakeProvider(), token="s3cret") as (_, target):
        with grpc.insecure_channel(target) as ch:
            for value in ("bearer s3cret", "BEARER s3cret", "Bearer  s3cret "):
                reply = embed_call(ch)(pb.EmbedRequest(inputs=["x"]), timeout=5, metadata=(("authorization", value),))
                assert len(reply.embeddings) == 1
            with pytest.raises(grpc.RpcError) as info:
                embed_call(ch)(pb.EmbedRequest(inputs=["x"]), timeout=5, metadata=(("authorization", "Basic s3cret"),))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_empty_token_is_refused_not_taken_as_no_auth():
    for token in ("", "  "):
        with pytest.raises(InvalidInputError, match="token is empty"):
            ServerConfig(token=token)
        with pytest.raises(InvalidInputError, match="token is empty"):
            ServerConfig.from_sources({"token": token}, env={})
    assert ServerConfig.from_sources({}, env={"EDGE_EMBED_TOKEN": ""}).token is None  # unset in an env file


def test_listening_beyond_loopback_without_token_or_tls_is_warned(caplog):
    assert not ServerConfig(host="127.0.0.1").open_to_network
    assert not ServerConfig(host="0.0.0.0", token="t").open_to_network

    async def start_and_stop():
        edge, _ = await create_server(ServerConfig(host="0.0.0.0", port=0), FakeProvider())
        await edge.stop(0)

    with caplog.at_level(logging.WARNING, logger="edge_embed.server"):
        asyncio.run(start_and_stop())
    assert any("neither a bearer token nor TLS" in r.getMessage() for r in caplog.records)


# -- self-inflicted restarts -------------------------------------------------------------


def test_health_and_info_answer_while_every_model_slot_is_busy():
    """Probes must pass when the pod is busiest: the limit is on model requests only."""
    fake = FakeProvider()
    fake.hang.set()
    with running_server(fake, max_concurrent_rpcs=2) as (edge, target):
        try:
            with grpc.insecure_channel(target) as ch:
                stuck = [embed_call(ch).future(pb.EmbedRequest(inputs=["hang"]), timeout=30) for _ in range(2)]
                assert wait_until(lambda: edge.service.inflight == 2)
                for _ in range(3):
                    assert health(target) == SERVING
                info = ch.unary_unary(METHOD + "Info", pb.InfoRequest.SerializeToString, pb.InfoResponse.FromString)
                assert info(pb.InfoRequest(), timeout=5).model == "fake-model"
                with pytest.raises(grpc.RpcError) as refused:
                    embed_call(ch)(pb.EmbedRequest(inputs=["one more"]), timeout=5)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                hint = trailers(refused.value)
                assert int(hint["retry-after-ms"]) > 0 and hint["grpc-retry-pushback-ms"] == hint["retry-after-ms"]
                assert hint["edge-embed-error"] == "OverloadedError"
                fake.hang.clear()
                assert [code for code, _ in settle(stuck)] == ["OK", "OK"]
        finally:
            fake.hang.clear()


def test_a_poisoned_input_and_the_clients_retries_never_stop_the_worker():
    """A failure pinned on one input is INVALID_ARGUMENT, so the client does not retry it,
    and it never counts toward stopping the worker (here after 2 failures in a row)."""
    fake = FakeProvider()
    with running_server(fake, max_consecutive_failures=2) as (edge, target):
        with EmbedClient(target, retries=3) as client:
            for i in range(4):
                with pytest.raises(InputRunError, match=r"request [0-9a-f]+\); the same input fails again"):
                    client.embed([f"poison number {i}"])
            assert client.embed(["still fine"]).shape == (1, 8)
        poisoned = [b for b in fake.batches if any(word_id("poison") in seq for seq in b)]
        assert len(poisoned) == 4  # one run per call: nothing retried
        assert health(target) == SERVING and edge.pool.stopped is None


def test_serve_exits_at_once_after_a_hung_run():
    """A run stuck past the run timeout: the process leaves for a restart within seconds,
    instead of waiting forever for the stuck thread at interpreter shutdown."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.hung_server", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        target = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if health(target) == SERVING:
                    break
            except grpc.RpcError:
                time.sleep(0.1)
        with grpc.insecure_channel(target) as ch:
            future = embed_call(ch).future(pb.EmbedRequest(inputs=["hang"]), timeout=30)
            sent = time.monotonic()
            code = proc.wait(timeout=15)
            took = time.monotonic() - sent
            with pytest.raises(grpc.RpcError):
                future.result()
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate(timeout=10)[0]
    assert code == 1, output
    assert took < 1.0 + 4.0, (took, output)  # the run timeout, then a few watcher ticks
    assert "exiting for a restart" in output


# -- fairness and cost on the request path ------------------------------------------------


def test_a_big_request_whose_real_size_fits_gets_in_under_steady_small_traffic():
    """The wire-size bound of 200 texts is about 10,000 tokens, over the queue limit of
    2,000, but their real count (1,600) fits: it must get in while small requests keep the
    queue from ever being empty (it used to be admitted only into an empty queue)."""
    fake = FakeProvider(delay_s=0.01)
    with running_server(fake, max_queue_tokens=2000, max_batch_size=8, max_inputs=512) as (edge, target):
        stop = threading.Event()
        small_codes: list[str] = []

        def small_traffic():
            with grpc.insecure_channel(target) as ch:
                while not stop.is_set():
                    small_codes.extend(code for code, _ in settle(
                        [embed_call(ch).future(pb.EmbedRequest(inputs=["a small one"]), timeout=10)]))

        threads = [threading.Thread(target=small_traffic) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            batcher = edge.pool.models["fake-model"].batcher
            assert wait_until(lambda: batcher.queued_tokens > 0)
            texts = [f"big text {i} has eight words in it" for i in range(200)]
            with grpc.insecure_channel(target) as ch:
                reply = embed_call(ch)(pb.EmbedRequest(inputs=texts), timeout=20)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert sum(reply.token_counts) == 1600 and len(reply.embeddings) == 200
        assert set(small_codes) == {"OK"}


def test_one_batching_policy_in_process_and_in_the_server():
    """A mixed-length request is cut into the same batches by the server's batcher as by
    the in-process planner, and its vectors come back in input order."""
    rng = np.random.default_rng(7)
    lengths = [int(n) for n in rng.integers(4, 160, size=128)]
    seqs = [np.full(n, i + 1, dtype=np.int64) for i, n in enumerate(lengths)]
    limits = BatchLimits(max_batch_tokens=2048, max_batch_size=32)
    batches: list[list[int]] = []

    def run(batch):
        batches.append([int(s[0]) - 1 for s in batch])
        return np.stack([np.full(4, float(s[0]), np.float32) for s in batch])

    async def scenario():
        batcher = TokenBudgetBatcher(run, limits=limits, max_wait_s=0.0, max_queue_tokens=100_000,
                                     run_timeout_s=5, max_consecutive_failures=2)
        batcher.start()
        with batcher.admit(sum(lengths)) as ticket:
            result = await ticket.submit(seqs)
        await batcher.stop()
        return result

    result = asyncio.run(scenario())
    planned = [sorted(b.tolist()) for b in plan_batches(lengths, limits.max_batch_tokens, limits.max_batch_size)]
    assert sorted(sorted(b) for b in batches) == sorted(planned)
    assert padded_share(lengths, batches) == pytest.approx(padded_share(lengths, planned))
    assert padded_share(lengths, batches) < 0.2
    assert np.array_equal(result.vectors[:, 0], np.arange(1, 129, dtype=np.float32))  # input order


def test_small_requests_overtake_a_big_one_between_batches():
    """The least-served request sets each batch's width: a one-text request sent while a
    big one of long texts is being computed runs in the very next batch."""
    fake = FakeProvider(delay_s=0.05)
    with running_server(fake, max_batch_size=4, max_inputs=512) as (edge, target):
        with grpc.insecure_channel(target) as ch:
            big = embed_call(ch).future(pb.EmbedRequest(inputs=[f"long text {i} " * 6 for i in range(80)]),
                                        timeout=30)
            assert wait_until(lambda: len(fake.batches) >= 2)
            started = time.monotonic()
            embed_call(ch)(pb.EmbedRequest(inputs=["tiny"]), timeout=10)
            took = time.monotonic() - started
            assert not big.done()
            big.result()
    assert took < 0.3, took


def test_metrics_count_padded_and_real_tokens_and_refusals():
    from prometheus_client import generate_latest

    with running_server(FakeProvider(), max_queue_tokens=4) as (edge, target):
        with EmbedClient(target, retries=0) as client:
            client.embed(["one two three", "four"])
        text = generate_latest(edge.metrics.registry).decode()
    real = float(re.search(r"^edge_embed_batch_real_tokens_total (\S+)", text, re.M).group(1))
    padded = float(re.search(r"^edge_embed_batch_padded_tokens_total (\S+)", text, re.M).group(1))
    assert real >= 4 and padded >= real
    assert 'edge_embed_queue_depth{model="fake-model"} 0.0' in text


def test_packed_vectors_equal_the_repeated_floats():
    texts = [f"text number {i}" for i in range(50)]
    with running_server(FakeProvider(), max_inputs=2048) as (_, target):
        with grpc.insecure_channel(target) as ch:
            floats = embed_call(ch)(pb.EmbedRequest(inputs=texts, dimensions=6), timeout=10)
            packed = embed_call(ch)(pb.EmbedRequest(inputs=texts, dimensions=6,
                                                    vector_format=pb.VECTOR_FORMAT_PACKED), timeout=10)
    assert not packed.embeddings and len(packed.packed) == 50 * 6 * 4
    unpacked = np.frombuffer(packed.packed, dtype="<f4").reshape(50, packed.dimensions)
    assert np.array_equal(unpacked, np.array([e.values for e in floats.embeddings], dtype=np.float32))


def test_openai_sized_requests_of_2048_inputs_are_accepted():
    texts = [f"chunk {i}" for i in range(2048)]
    with running_server(FakeProvider()) as (_, target):
        with EmbedClient(target, retries=0, timeout=30) as client:
            assert client.embed(texts).shape == (2048, 8)
            with pytest.raises(InvalidInputError, match="2049 texts; the limit is 2048"):
                client.embed(texts + ["one too many"])


# -- errors -------------------------------------------------------------------------------


class _BrokenTokenizer(FakeProvider):
    """A bug below the server: a foreign exception whose text holds a file path."""

    def tokenize(self, texts, **options):
        if any("break" in t for t in texts):
            raise RuntimeError("cannot open /srv/secret/models/model.int8.onnx")
        return super().tokenize(texts, **options)


def test_internal_errors_give_clients_a_request_id_and_the_log_the_detail(caplog):
    with caplog.at_level(logging.ERROR), running_server(_BrokenTokenizer()) as (_, target):
        with grpc.insecure_channel(target) as ch:
            with pytest.raises(grpc.RpcError) as info:
                embed_call(ch)(pb.EmbedRequest(inputs=["please break"]), timeout=5)
            stream = ch.stream_stream(METHOD + "EmbedStream", pb.EmbedRequest.SerializeToString,
                                      pb.EmbedStreamResponse.FromString)
            (answer,) = list(stream(iter([pb.EmbedRequest(inputs=["break it"], request_id="m1")]), timeout=5))
    exc = info.value
    assert exc.code() == grpc.StatusCode.INTERNAL
    assert "/srv/secret" not in exc.details() and "RuntimeError" not in exc.details()
    rid = trailers(exc)["request-id"]
    assert f"request {rid}" in exc.details()
    assert answer.error.code == "INTERNAL" and "/srv/secret" not in answer.error.message
    assert "request m1" in answer.error.message  # a stream message's id is the one its client gave
    logged = "\n".join(f"{r.getMessage()} {r.exc_info[1] if r.exc_info else ''}" for r in caplog.records)
    assert rid in logged and "/srv/secret/models/model.int8.onnx" in logged


def test_a_batch_not_yet_started_is_formed_again_when_a_request_arrives():
    """One batch runs and the next waits for the model thread; a one-text request that
    arrives meanwhile runs right after the running batch, not after the waiting one."""
    release = threading.Event()
    batches: list[list[int]] = []

    def run(batch):
        batches.append([int(s[0]) for s in batch])
        if len(batches) == 1:
            release.wait(5)
        return np.zeros((len(batch), 4), np.float32)

    async def scenario():
        batcher = TokenBudgetBatcher(run, limits=BatchLimits(max_batch_tokens=64, max_batch_size=2),
                                     max_wait_s=0.0, max_queue_tokens=100_000, run_timeout_s=10,
                                     max_consecutive_failures=2)
        batcher.start()
        big_seqs = [np.full(8, 1, np.int64) for _ in range(6)]
        with batcher.admit(48) as big_ticket:
            big = asyncio.ensure_future(big_ticket.submit(big_seqs))
            while batcher._not_started is None:  # the first batch runs, the second waits
                await asyncio.sleep(0.005)
            with batcher.admit(2) as small_ticket:
                small = asyncio.ensure_future(small_ticket.submit([np.full(2, 7, np.int64)]))
                await asyncio.sleep(0.05)
                release.set()
                await small
                await big
        await batcher.stop()

    asyncio.run(scenario())
    assert batches[0] == [1, 1] and batches[1] == [7], batches
    assert sum(len(b) for b in batches) == 7  # every text ran once: the taken-back batch ran later


def test_batches_are_cut_to_the_time_budget_by_the_measured_cost():
    """Where a batch costs 1 ms per token (1,000 tokens/s, no fixed cost), a 250 ms budget holds 250 tokens: texts of 100 tokens run two at a time, not
    forty. Where a batch costs the same whatever its size (a GPU's fixed cost), or with no
    budget, the token budget alone decides."""
    linear = [(4000, 4.0), (100, 0.1), (1000, 1.0), (300, 0.3)]
    constant = [(4000, 0.3), (100, 0.3), (1000, 0.3), (300, 0.3)]

    async def first_batch_rows(max_batch_s: float, costs: list[tuple[int, float]]) -> int:
        batcher = TokenBudgetBatcher(lambda seqs: None, limits=BatchLimits(max_batch_tokens=4096, max_batch_size=64),
                                     max_wait_s=0.0, max_queue_tokens=100_000, run_timeout_s=10,
                                     max_consecutive_failures=2, max_batch_s=max_batch_s)
        for tokens, seconds in costs:
            batcher.batch_cost.observe(tokens, seconds)
        ticket = Ticket(batcher, 4000, None, 0)
        ticket._queue([np.ones(100, np.int64) for _ in range(40)])
        ticket.future = asyncio.get_running_loop().create_future()
        batcher._active.append(ticket)
        return len(batcher._form_batch())

    assert asyncio.run(first_batch_rows(0.25, linear)) == 2
    assert asyncio.run(first_batch_rows(0.25, constant)) == 40
    assert asyncio.run(first_batch_rows(0.0, linear)) == 40


def test_an_unknown_vector_format_gets_the_repeated_floats_and_leaves_vectors_unchanged():
    """The new request field is hostile input too: any enum number a client sends parses
    (proto3 keeps unknown values); only PACKED packs, anything else answers floats."""
    texts = ["same text", "another"]
    with running_server(FakeProvider()) as (_, target):
        with grpc.insecure_channel(target) as ch:
            before = embed_call(ch)(pb.EmbedRequest(inputs=texts), timeout=5)
            for value in (2, 7, 2**31 - 1, -1):
                reply = embed_call(ch)(pb.EmbedRequest(inputs=texts, vector_format=value), timeout=5)
                assert not reply.packed
                assert [list(e.values) for e in reply.embeddings] == [list(e.values) for e in before.embeddings]
