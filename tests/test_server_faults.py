"""A real gRPC server under faults and overload: a FakeProvider that raises, hangs or
returns NaN, floods of big requests, and clients that go away."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_embed.batching import BatchLimits
from edge_embed.client import EmbedClient
from edge_embed.errors import (
    InputRunError,
    ModelRunError,
    NonFiniteOutputError,
    OverloadedError,
    WorkerStoppedError,
)
from edge_embed.server.batcher import TokenBudgetBatcher
from edge_embed.server.core import RequestMemory
from edge_embed.v1 import embed_pb2 as pb

from .fakes import FakeProvider
from .servers import running_server, settle

METHOD = "/edge_embed.v1.EmbeddingService/"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_for_health(target: str, status: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (now := health(target)) != status and time.monotonic() < deadline:
        time.sleep(0.02)
    return now


def expected(fake: FakeProvider, text: str) -> np.ndarray:
    v = FakeProvider.vector(fake.tokenize([text])[0])
    return v / np.linalg.norm(v)


def outcome(fn, *args, **kwargs) -> object:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc


def test_a_failing_batch_fails_only_the_request_that_breaks_it():
    """Eight requests share batches; one holds a text that makes the backend raise a
    foreign exception. Only that request fails, with INVALID_ARGUMENT (the same input fails
    again: no retry) and a request id, not the backend's words; the server serves on."""
    fake = FakeProvider(delay_s=0.05)
    texts = [f"request {i} words" for i in range(8)]
    texts[5] = "request 5 poison"
    with running_server(fake, max_wait_ms=30) as (edge, target):
        with EmbedClient(target, retries=0) as client, ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda t: outcome(client.embed, [t]), texts))
        assert max(len(b) for b in fake.batches) > 1  # they did share a batch
        for i, result in enumerate(results):
            if i == 5:
                assert isinstance(result, InputRunError), result
                assert "request " in str(result) and "choked" not in str(result)
            else:
                assert isinstance(result, np.ndarray), result
                assert np.allclose(result[0], expected(fake, texts[i]), atol=1e-6)
        assert health(target) == SERVING
        assert edge.pool.stopped is None
        with EmbedClient(target) as client:
            assert client.embed(["after the fault"]).shape == (1, 8)


def test_a_non_finite_vector_fails_only_its_owner_naming_the_input():
    fake = FakeProvider(delay_s=0.05)
    with running_server(fake, max_wait_ms=30) as (_, target):
        with EmbedClient(target, retries=0) as client, ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(outcome, client.embed, ["fine text", "this gives nan"]),
                       pool.submit(outcome, client.embed, ["a neighbour"]),
                       pool.submit(outcome, client.embed, ["another neighbour"])]
            bad, *good = [f.result() for f in futures]
        assert isinstance(bad, NonFiniteOutputError) and "FAILED_PRECONDITION" in str(bad)
        assert "non-finite vector for inputs[1]" in str(bad)
        for result in good:
            assert isinstance(result, np.ndarray) and np.isfinite(result).all()
        assert health(target) == SERVING


def test_repeated_failures_stop_the_worker_and_turn_health_off():
    """The model fails every batch, the canary too: each failure is the model's, retryable
    (UNAVAILABLE with a hint), and the third in a row stops the worker."""
    fake = FakeProvider()
    with running_server(fake, max_consecutive_failures=3, max_batch_size=1) as (edge, target):
        fake.fail_with = RuntimeError("device lost")
        with EmbedClient(target, retries=0) as client:
            for i in range(3):
                with pytest.raises(ModelRunError, match="may succeed on a retry") as info:
                    client.embed([f"x {i}"])
                assert info.value.retry_after_ms and "device lost" not in str(info.value)
            assert wait_for_health(target, NOT_SERVING) == NOT_SERVING
            with pytest.raises(WorkerStoppedError, match="failed 3 batches in a row"):
                client.embed(["after the worker stopped"])
        assert edge.pool.stopped is not None
        assert [s.state.value for s in edge.pool.status()] == ["stopped"]


def test_a_success_between_failures_keeps_the_worker():
    fake = FakeProvider()
    with running_server(fake, max_consecutive_failures=2, max_batch_size=1) as (edge, target):
        with EmbedClient(target, retries=0) as client:
            for i in range(4):
                assert isinstance(outcome(client.embed, [f"poison {i}"]), InputRunError)
                assert client.embed([f"fine {i}"]).shape == (1, 8)
        assert health(target) == SERVING and edge.pool.stopped is None


def test_a_hung_run_turns_health_off_fails_pending_and_starves_the_watchdog(tmp_path):
    from edge_embed.server.app import _watchdog
    from edge_embed.server.systemd import Notifier

    from .test_serve_process import NotifySocket

    fake = FakeProvider()
    fake.hang.set()
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        with running_server(fake, run_timeout_s=0.5) as (edge, target):
            loop = edge.pool.models["fake-model"].batcher._task.get_loop()
            notifier = Notifier({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "100000"})
            dog = asyncio.run_coroutine_threadsafe(_watchdog(notifier, edge, 0.05), loop)
            assert notify.wait_for("WATCHDOG=1", 2)
            with EmbedClient(target, retries=0, timeout=10) as client, ThreadPoolExecutor(3) as pool:
                started = time.monotonic()
                hung = pool.submit(outcome, client.embed, ["this will hang"])
                time.sleep(0.1)
                waiting = pool.submit(outcome, client.embed, ["queued behind it"])
                results = [hung.result(), waiting.result()]
                took = time.monotonic() - started
            for result in results:
                assert isinstance(result, WorkerStoppedError), result
                assert "did not finish within the run timeout of 0.5 s" in str(result)
            assert took < 3
            assert wait_for_health(target, NOT_SERVING) == NOT_SERVING
            assert edge.pool.hung
            notify.wait_for("drain what was sent before", 0.3)
            notify.lines.clear()
            notify.wait_for("WATCHDOG=1", 0.5)
            assert "WATCHDOG=1" not in notify.lines  # systemd will restart the process
            dog.cancel()
    finally:
        fake.hang.clear()  # let the stuck thread end, so the test server can stop
        notify.sock.close()


def test_a_cancelled_stream_cancels_its_messages_in_flight():
    fake = FakeProvider(delay_s=0.1)
    with running_server(fake, max_batch_size=1) as (edge, target):
        batcher = edge.pool.models["fake-model"].batcher
        warm_up = fake.seen_texts()  # the warm-up's texts, run before the stream
        with grpc.insecure_channel(target) as ch:
            stream = ch.stream_stream(METHOD + "EmbedStream", pb.EmbedRequest.SerializeToString,
                                      pb.EmbedStreamResponse.FromString)
            sent = threading.Event()

            def requests():
                for i in range(40):
                    yield pb.EmbedRequest(inputs=[f"stream message {i}"], request_id=str(i))
                sent.set()
                time.sleep(30)  # keep the stream open, as a live client would

            call = stream(requests(), timeout=60)
            first = next(call)
            assert first.request_id == "0"
            assert sent.wait(5)
            call.cancel()
        deadline = time.monotonic() + 5
        while (batcher.depth or batcher.queued_tokens) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert batcher.depth == 0 and batcher.queued_tokens == 0
        computed = fake.seen_texts() - warm_up
        time.sleep(0.5)
        assert fake.seen_texts() - warm_up <= computed + 1  # nothing more runs for the cancelled messages
        assert computed < 40
        assert edge.service.memory.held == 0
        with EmbedClient(target) as client:
            assert client.embed(["still serving"]).shape == (1, 8)


def test_stream_fuzz_gets_a_client_error_for_every_bad_message():
    fake = FakeProvider()
    rng = random.Random(3)

    def messages():
        for i in range(300):
            yield pb.EmbedRequest(
                inputs=[("".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 80))))
                        for _ in range(rng.randint(0, 5))],
                dimensions=rng.choice([0, 1, 4, 8, 9, 2**31]), instruction=rng.choice(["", "find", " "]),
                model=rng.choice(["", "fake-model", "nope"]), truncate=rng.choice([True, False]), request_id=str(i),
            ).SerializeToString() if rng.random() < 0.7 else bytes(rng.getrandbits(8) for _ in range(20))

    with running_server(fake, max_inputs=4, max_text_chars=60) as (_, target):
        with grpc.insecure_channel(target) as ch:
            stream = ch.stream_stream(METHOD + "EmbedStream", None, pb.EmbedStreamResponse.FromString)
            answers = list(stream(messages(), timeout=60))
        assert len(answers) == 300
        codes = {a.error.code for a in answers if a.HasField("error")}
        assert codes and codes <= {"INVALID_ARGUMENT", "NOT_FOUND"}, codes
        assert any(a.HasField("response") for a in answers)
        assert health(target) == SERVING


def test_small_requests_are_not_stuck_behind_big_ones():
    """A request of 200 texts takes 40 batches of 5; a one-text request sent after it rides
    the next batch instead of waiting for all of them."""
    fake = FakeProvider(delay_s=0.05)
    with running_server(fake, max_batch_size=5, max_inputs=256) as (_, target):
        with EmbedClient(target, retries=0, timeout=60) as client, ThreadPoolExecutor(2) as pool:
            big = pool.submit(client.embed, [f"big text number {i}" for i in range(200)])
            time.sleep(0.3)
            started = time.monotonic()
            small = client.embed(["small and urgent"])
            small_took = time.monotonic() - started
            assert not big.done()
            assert big.result().shape == (200, 8)
        assert small.shape == (1, 8) and small_took < 1.0, small_took


def test_big_requests_past_their_deadline_are_refused_fast_with_a_hint():
    fake = FakeProvider(delay_s=0.05)
    with running_server(fake, max_batch_size=4, max_inputs=256) as (_, target):
        with EmbedClient(target, retries=0, timeout=60) as client:
            client.embed([f"measure speed {i}" for i in range(8)])
        with grpc.insecure_channel(target) as ch:
            call = ch.unary_unary(METHOD + "Embed", pb.EmbedRequest.SerializeToString, pb.EmbedResponse.FromString)
            first = call.future(pb.EmbedRequest(inputs=[f"w{i} " * 30 for i in range(200)]), timeout=60)
            time.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                call(pb.EmbedRequest(inputs=[f"v{i} " * 30 for i in range(200)]), timeout=1.5)
            assert time.monotonic() - started < 1.0
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "past its deadline" in info.value.details()
            assert int(dict(info.value.trailing_metadata())["retry-after-ms"]) > 0
            first.cancel()


def test_admission_counts_tokens_before_tokenizing():
    """The queue limit is in tokens: one request of many long texts fills it; more are
    refused at once with a retry hint, and the queue never holds more than the limit plus
    the one request admitted into an empty queue."""
    fake = FakeProvider(delay_s=0.2)
    with running_server(fake, max_batch_size=8, max_inputs=64, max_queue_tokens=1000) as (edge, target):
        batcher = edge.pool.models["fake-model"].batcher
        peak = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                peak.append(batcher.queued_tokens)
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with grpc.insecure_channel(target) as ch:
            call = ch.unary_unary(METHOD + "Embed", pb.EmbedRequest.SerializeToString, pb.EmbedResponse.FromString)
            outcomes = settle([call.future(pb.EmbedRequest(inputs=["word " * 60] * 20), timeout=30)
                               for _ in range(6)])
        codes = [code for code, _ in outcomes]
        for _, exc in outcomes:
            assert exc is None or int(dict(exc.trailing_metadata())["retry-after-ms"]) > 0
        stop.set()
        watcher.join()
        assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes
        assert max(peak) <= 1000 + 20 * 64


def test_request_memory_is_admitted_against_the_budget_left():
    memory = RequestMemory(lambda: 1_000_000)
    first = memory.reserve(100_000)  # 6 copies and the overhead: about 0.67 MB
    with pytest.raises(OverloadedError, match="memory budget"):
        memory.reserve(100_000)
    first.release()
    first.release()  # a second release gives nothing back twice
    assert memory.held == 0
    alone = memory.reserve(10_000_000)  # alone it is always let in: it could never run otherwise
    with pytest.raises(OverloadedError):
        memory.reserve(1)
    alone.release()
    growing = memory.reserve(0)
    growing.grow(50_000)
    growing.grow(50_000)
    assert memory.held == growing.nbytes == 6 * 100_000 + 64 * 1024
    growing.release()
    assert memory.held == 0


def test_calls_still_arriving_count_against_request_memory(monkeypatch):
    """The transport holds every open call's message before it is parsed: arrivals are
    charged, a call that would not fit is refused at the door, a parse must fit beside the
    arrivals, and an arrival that never completes stops counting."""
    memory = RequestMemory(lambda: 1_000_000, arrival_bytes=300_000)
    first, second, third = memory.arrival(), memory.arrival(), memory.arrival()
    assert memory.arriving_bytes() == 900_000 and memory.door_refusal() is None  # room left: let in
    fourth = memory.arrival()
    refusal = memory.door_refusal()
    assert refusal is not None and "4 calls still arriving" in str(refusal) and refusal.retry_after_ms > 0
    fourth.done()
    first.done(100_000)
    first.done(100_000)  # a second done counts nothing twice
    assert memory.arriving_bytes() == 600_000
    held = memory.reserve(10_000)  # alone: let in
    with pytest.raises(OverloadedError, match="memory budget"):
        memory.reserve(50_000)  # 0.37 MB held + 0.6 MB arriving + 0.3 MB > 1 MB
    second.done(1_000)
    memory.reserve(50_000).release()  # fits beside the one arrival left
    import edge_embed.server.core as core
    monkeypatch.setattr(core, "_ARRIVAL_TTL_S", 0.0)
    assert memory.arriving_bytes() == 0 and memory.door_refusal() is None  # a client gone mid-message
    third.done(1_000)
    held.release()
    assert memory.held == 0


def test_a_refused_call_is_answered_without_its_message_being_read(monkeypatch):
    """A call refused at the door (here for a wrong token) is answered from its headers: the
    refusing handler's deserializer never sees the 2 MB message, and nothing counts as
    arriving or held."""
    import edge_embed.server.grpc_transport as transport

    read = []
    monkeypatch.setattr(transport, "_unparsed", lambda data: read.append(len(data)))
    with running_server(FakeProvider(), token="s3cret") as (edge, target):
        with grpc.insecure_channel(target) as ch:
            call = ch.unary_unary(METHOD + "Embed", pb.EmbedRequest.SerializeToString, pb.EmbedResponse.FromString)
            with pytest.raises(grpc.RpcError) as refused:
                call(pb.EmbedRequest(inputs=["word " * 400_000]), metadata=[("authorization", "Bearer wrong")],
                     timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert read == []
        assert edge.service.memory.arriving_bytes() == 0 and edge.service.memory.held == 0


def test_requests_beyond_the_memory_left_get_resource_exhausted():
    fake = FakeProvider(delay_s=0.3)
    with running_server(fake, max_inputs=256) as (edge, target):
        edge.pool.budget_bytes = edge.pool.committed_bytes + 3_000_000  # room for one big request
        with grpc.insecure_channel(target) as ch:
            call = ch.unary_unary(METHOD + "Embed", pb.EmbedRequest.SerializeToString, pb.EmbedResponse.FromString)
            big = pb.EmbedRequest(inputs=["word " * 1000] * 200)  # 1 MB
            outcomes = settle([call.future(big, timeout=30) for _ in range(4)])
        codes = [code for code, _ in outcomes]
        for _, exc in outcomes:
            assert exc is None or "memory budget" in exc.details()
        assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes
        assert edge.service.memory.held == 0


def test_a_text_past_the_token_budget_runs_alone_and_is_charged_at_its_length():
    fake = FakeProvider(max_length=512)
    with running_server(fake, max_batch_tokens=100, max_inputs=8) as (edge, target):
        model = edge.pool.models["fake-model"]
        charged = []
        edge.pool._oversize_bytes = lambda m, rows, width: charged.append((rows, width)) or 10_000
        with EmbedClient(target, retries=0) as client:
            vectors = client.embed(["long " * 300, "short one"])
        assert vectors.shape == (2, 8)
        assert (1, 300) in charged
        assert [len(b) for b in fake.batches if len(b[0]) == 300] == [1]  # alone
        assert model.cost == 0  # the extra charge is returned after the run
        edge.pool._oversize_bytes = lambda m, rows, width: 10**15
        edge.pool.budget_bytes = edge.pool.committed_bytes + 10**9
        with EmbedClient(target, retries=0) as client:
            with pytest.raises(OverloadedError, match="needs .* MB of activations"):
                client.embed(["long " * 300])
            assert client.embed(["short texts still run"]).shape == (1, 8)


def _started_batcher(run, *, max_batch_size: int, max_wait_s: float) -> TokenBudgetBatcher:
    """A batcher over `run` alone, outside any server; call inside a running loop."""
    batcher = TokenBudgetBatcher(run, limits=BatchLimits(max_batch_tokens=1000, max_batch_size=max_batch_size),
                                 max_wait_s=max_wait_s, max_queue_tokens=100_000, run_timeout_s=5,
                                 max_consecutive_failures=2)
    batcher.start()
    return batcher


async def _one_text(batcher: TokenBudgetBatcher, first: int):
    """One request of one two-token text whose first id is `first`."""
    with batcher.admit(2) as ticket:
        return await ticket.submit([np.array([first, 1])])


def test_batcher_splits_a_failed_batch_and_counts_whole_failures_only():
    calls = []

    def run(seqs):
        calls.append(len(seqs))
        if any(int(s[0]) == 13 for s in seqs):
            raise RuntimeError("bad row")
        return np.ones((len(seqs), 4), np.float32)

    async def scenario():
        batcher = _started_batcher(run, max_batch_size=16, max_wait_s=0.05)
        results = await asyncio.gather(*(_one_text(batcher, i) for i in range(10, 18)), return_exceptions=True)
        await batcher.stop()
        return batcher, results

    batcher, results = asyncio.run(scenario())
    # The rest of the batch ran, so the failure is pinned on the input: not retryable, not counted.
    assert [type(r).__name__ for r in results].count("InputRunError") == 1
    assert type(results[3]).__name__ == "InputRunError"
    assert batcher.stopped is None and batcher.consecutive_failures == 0
    assert calls[0] == 8 and len(calls) <= 1 + 2 * 3 + 1


def test_batcher_starts_the_next_batch_when_runs_end_back_to_back():
    """Runs that end in the same loop turn must still wake the batcher: with both pipeline
    slots just freed and texts queued, it may not sleep until some new request arrives."""

    def run(seqs):
        return np.ones((len(seqs), 4), np.float32)  # instant, so runs end back to back

    async def scenario():
        batcher = _started_batcher(run, max_batch_size=1, max_wait_s=0)
        try:
            for wave in range(50):
                done = await asyncio.wait_for(asyncio.gather(*(_one_text(batcher, i) for i in range(20))), 10)
                assert len(done) == 20, f"wave {wave}"
        finally:
            await batcher.stop()

    asyncio.run(scenario())
