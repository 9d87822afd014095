"""The model pool: several real bundles in one server within a memory budget.

Real bundles (MiniLM FP32 and INT8 from one export, the tiny Qwen3) behind a real gRPC
server; budgets are set from the pool's own charges so exactly the intended models fit.
The ledger's locks, model-id lookup and metrics are also tested over fake models (FakeProvider
loads with fixed charges, hand-written manifests), where the test controls every step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_embed.bundle import MANIFEST_FILE
from edge_embed.client import EmbedClient
from edge_embed.errors import BundleError, ModelNotFoundError, ModelNotReadyError, OverloadedError
from edge_embed.memory import measure_footprint, peak_rss_bytes
from edge_embed.provider import ProviderInfo
from edge_embed.server import ServerConfig
from edge_embed.server.config import parse_bytes
from edge_embed.server.pool import ModelPool, ModelSource, parse_model_sources, pool_from_config
from edge_embed.v1 import embed_pb2 as pb

from .fakes import FAKE_MANIFEST, FakeProvider, word_id
from .servers import on_server_loop, running_server
from .test_serve_process import free_port

TEXT = ["edge devices have a few gigabytes of memory shared by everything"]


@pytest.fixture
def footprints(tmp_path, monkeypatch):
    """A private EDGE_EMBED_CACHE, so stored measurements start empty for each test."""
    monkeypatch.setenv("EDGE_EMBED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def three(minilm_bundle, qwen3_bundle, footprints) -> list[ModelSource]:
    """Three models, each measured first (as `edge-embed check` does), so charges are stable."""
    sources = parse_model_sources(
        (f"minilm-fp32={minilm_bundle}@fp32", f"minilm-int8={minilm_bundle}@int8", f"qwen3={qwen3_bundle}@fp32"),
        None,
    )
    for source in sources:
        measure_footprint(source.path, source.precision)
    return sources


def _pool(sources, budget: int | None = None, **config):
    cfg = ServerConfig(memory_budget=budget or 2**40, **config)
    return pool_from_config(cfg, sources), cfg


def _info(target: str) -> pb.InfoResponse:
    with EmbedClient(target) as client:
        return client.info()


def _states(target: str) -> dict[str, str]:
    return {m.name: m.state for m in _info(target).models}


def _embed(target: str, model: str, texts=TEXT, timeout: float = 60.0, retries: int = 0) -> np.ndarray:
    with EmbedClient(target, timeout=timeout, retries=retries) as client:
        return client.embed(texts, model=model)


def test_sizes_parse_and_bad_ones_say_how():
    assert parse_bytes("1500MB") == 1_500_000_000
    assert parse_bytes("2GiB") == 2 * 1024**3
    assert parse_bytes("512 M") == 512_000_000
    assert parse_bytes("1073741824") == 1024**3
    for bad in ("", "lots", "-1GB", "2XB", "0"):
        with pytest.raises(ValueError, match="not a size"):
            parse_bytes(bad)


def test_model_sources_name_paths_and_precisions(minilm_bundle, qwen3_bundle, tmp_path):
    sources = parse_model_sources((str(minilm_bundle), f"q={qwen3_bundle}@int8"), None)
    assert [(s.name, s.precision) for s in sources] == [("sentence-transformers/all-MiniLM-L6-v2", "auto"),
                                                        ("q", "int8")]
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "small").symlink_to(qwen3_bundle)
    (folder / "not-a-bundle").mkdir()
    assert [s.name for s in parse_model_sources((), folder)] == ["small"]
    with pytest.raises(ValueError, match="named 'x'"):
        parse_model_sources((f"x={minilm_bundle}", f"x={qwen3_bundle}"), None)
    with pytest.raises(Exception, match="not a bundle directory"):
        parse_model_sources((str(tmp_path),), None)


def test_models_load_on_first_use_and_the_least_recently_used_is_evicted(three, footprints):
    """Budget: any two of the three fit, all three do not. The third evicts the LRU one."""
    pool, _ = _pool(three)
    with running_server(pool) as (edge, target):
        # The default (first) model loads at start; the others on first use.
        assert _states(target) == {"minilm-fp32": "loaded", "minilm-int8": "unloaded", "qwen3": "unloaded"}
        # Set once minilm-fp32's load was measured here: it fits beside either other model,
        # never beside both (half the smaller charge of slack for charges measured at load).
        others = sorted(pool.charge_for(name)[0] for name in ("minilm-int8", "qwen3"))
        budget = pool.budget_bytes = pool.committed_bytes + others[1] + others[0] // 2
        fp32 = _embed(target, "minilm-fp32")
        int8 = _embed(target, "minilm-int8")
        assert _states(target) == {"minilm-fp32": "loaded", "minilm-int8": "loaded", "qwen3": "unloaded"}
        assert float(fp32[0] @ int8[0]) > 0.97  # two precisions of one model, really loaded
        _embed(target, "qwen3")  # does not fit beside both: minilm-fp32 is least recently used
        assert _states(target) == {"minilm-fp32": "evicted", "minilm-int8": "loaded", "qwen3": "loaded"}
        again = _embed(target, "minilm-fp32")  # reloads; now minilm-int8 is the LRU one
        assert _states(target) == {"minilm-fp32": "loaded", "minilm-int8": "evicted", "qwen3": "loaded"}
        assert np.allclose(again, fp32, atol=1e-6)

        info = _info(target)
        assert info.memory.committed_bytes <= info.memory.budget_bytes == budget
        by_name = {m.name: m for m in info.models}
        assert (by_name["minilm-fp32"].loads, by_name["minilm-fp32"].evictions) == (2, 1)
        assert by_name["minilm-int8"].evictions == 1 and by_name["qwen3"].loads == 1
        assert by_name["minilm-fp32"].resident_measured_bytes > 50_000_000  # an 87 MB graph, measured
        assert by_name["minilm-fp32"].parity_ok and by_name["minilm-fp32"].parity_cos_min > 0.9999
        evictions = edge.metrics.model_evictions.labels("minilm-fp32")._value.get()
        assert evictions == 1
        assert edge.metrics.model_requests.labels("qwen3")._value.get() == 1


def test_pinned_models_stay_and_busy_models_are_not_evicted(three, footprints):
    pool, _ = _pool(three, None, pin=("minilm-fp32",), load_wait_s=0.3)
    long_texts = ["a long passage about memory budgets on small devices " * 20] * 256
    with running_server(pool, max_inputs=256) as (edge, target):
        # Set once the pinned model's load was measured here: room for it and one more model,
        # never two more (the slack absorbs a charge that grows when its load is measured).
        others = sorted(pool.charge_for(name)[0] for name in ("minilm-int8", "qwen3"))
        pool.budget_bytes = pool.committed_bytes + others[1] + others[0] // 2
        _embed(target, "minilm-int8", retries=20)  # loads take longer than load_wait_s: retry on the hint
        results: dict[str, object] = {}

        def busy() -> None:
            try:
                results["busy"] = _embed(target, "minilm-int8", long_texts, timeout=120)
            except Exception as exc:  # noqa: BLE001 - recorded for the assertion below
                results["busy"] = exc

        worker = threading.Thread(target=busy)
        worker.start()
        deadline = time.monotonic() + 10
        while edge.pool.models["minilm-int8"].inflight == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        # qwen3 needs minilm-int8's memory, which is busy: wait 0.3 s, then UNAVAILABLE with a hint.
        with pytest.raises(ModelNotReadyError, match="UNAVAILABLE.*busy or pinned"):
            _embed(target, "qwen3")
        worker.join(120)
        assert isinstance(results["busy"], np.ndarray) and results["busy"].shape == (256, 384)
        _embed(target, "qwen3", retries=20)  # now minilm-int8 is idle and goes; the pinned model stays
        assert _states(target) == {"minilm-fp32": "loaded", "minilm-int8": "evicted", "qwen3": "loaded"}


def test_a_model_too_big_for_the_budget_is_refused_with_the_figures(three, footprints):
    probe, _ = _pool(three)
    budget = probe.base_bytes + probe.charge_for("minilm-int8")[0] + 1_000_000
    sources = [three[1], three[0]]  # minilm-int8 is the default and fits; minilm-fp32 never can
    pool, _ = _pool(sources, budget)
    with running_server(pool, memory_budget=budget) as (edge, target):
        with pytest.raises(OverloadedError, match=r"RESOURCE_EXHAUSTED.*minilm-fp32.*over the memory budget"):
            _embed(target, "minilm-fp32", retries=3)  # no retry hint: the client does not retry
        assert _states(target) == {"minilm-int8": "loaded", "minilm-fp32": "unloaded"}
        assert _embed(target, "minilm-int8").shape == (1, 384)

    # Pinned models count as never leaving: beside a pinned qwen3 the FP32 model cannot fit.
    pool, _ = _pool([three[2], three[1], three[0]], None, pin=("qwen3",))
    with running_server(pool) as (edge, target):
        # The budget, set once qwen3's load was measured here: minilm-fp32 would fit alone,
        # minilm-int8 fits beside the pinned qwen3, minilm-fp32 does not.
        pool.budget_bytes = pool.committed_bytes + pool.charge_for("minilm-fp32")[0] - 1_000_000
        assert _embed(target, "minilm-int8").shape == (1, 384)
        with pytest.raises(OverloadedError, match="beside the pinned qwen3"):
            _embed(target, "minilm-fp32")


def test_requests_wait_for_a_loading_model_and_info_never_loads(three, footprints):
    pool, _ = _pool(three)
    with running_server(pool) as (edge, target):
        assert _info(target).models[1].state == "unloaded"
        with EmbedClient(target) as client:
            info = client.info(model="minilm-int8")
        assert info.model == "minilm-int8" and info.dim == 384 and info.precision == ""
        assert _states(target)["minilm-int8"] == "unloaded"

        # Eight concurrent first requests share one load.
        with EmbedClient(target, timeout=60) as client:
            threads = [threading.Thread(target=client.embed, args=(TEXT,), kwargs={"model": "minilm-int8"})
                       for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        status = {m.name: m for m in _info(target).models}["minilm-int8"]
        assert status.loads == 1 and status.requests == 8 and status.state == "loaded"


@pytest.mark.slow
def test_serve_process_rss_stays_under_the_budget(minilm_bundle, qwen3_bundle, tmp_path):
    """`edge-embed serve` with three bundles and a budget for two: the kernel's peak RSS of
    the server process stays under the budget through loads, evictions and reloads."""
    env = {**os.environ, "EDGE_EMBED_CACHE": str(tmp_path / "cache")}
    specs = [f"minilm-fp32={minilm_bundle}@fp32", f"minilm-int8={minilm_bundle}@int8", f"qwen3={qwen3_bundle}@fp32"]

    def serve(budget: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        argv = [sys.executable, "-m", "edge_embed.cli", "serve", "--port", str(port), "--memory-budget", budget]
        for spec in specs:
            argv += ["--bundle", spec]
        proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        target = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                _info(target)
                return proc, target
            except Exception:  # noqa: BLE001 - not up yet
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        proc.kill()
        raise AssertionError("server did not start")

    # First run, roomy: learn each model's charge (measured loads are stored in the cache).
    proc, target = serve("20GB")
    try:
        for name in ("minilm-fp32", "minilm-int8", "qwen3"):
            _embed(target, name)
        info = _info(target)
        charges = sorted(m.charged_bytes for m in info.models)
        base = info.memory.base_bytes
    finally:
        proc.terminate()
        proc.communicate(timeout=30)

    budget = base + charges[2] + charges[1] + charges[0] // 2
    proc, target = serve(str(budget))
    try:
        # Texts at the token limit, 16 per request: batches fill the 4096-token budget.
        full = [" ".join(["memory"] * 600)] * 16
        for name in ("minilm-int8", "qwen3", "minilm-fp32", "minilm-int8", "qwen3", "minilm-fp32"):
            _embed(target, name, full)
        info = _info(target)
        states = {m.name: m.state for m in info.models}
        assert sorted(states.values()) == ["evicted", "loaded", "loaded"], states
        assert sum(m.evictions for m in info.models) >= 2
        peak = peak_rss_bytes(proc.pid)
        print(f"budget {budget / 1e6:.0f} MB, peak RSS {peak / 1e6:.0f} MB, charges {charges}, base {base}")
        assert peak is not None and peak <= budget, (peak, budget)
        assert info.memory.committed_bytes <= budget
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "evicting" in out


def test_config_takes_models_and_budget_from_flags_then_environment():
    env = {"EDGE_EMBED_BUNDLE": "a=/m/a@int8, /m/b", "EDGE_EMBED_MEMORY_BUDGET": "2GiB",
           "EDGE_EMBED_PIN": "a", "EDGE_EMBED_LOAD_WAIT_S": "5"}
    config = ServerConfig.from_sources({}, env)
    assert config.bundle == ("a=/m/a@int8", "/m/b") and config.pin == ("a",)
    assert config.memory_budget == 2 * 1024**3 and config.load_wait_s == 5.0
    flagged = ServerConfig.from_sources({"bundle": ("/x",), "memory_budget": 10**9}, env)
    assert flagged.bundle == ("/x",) and flagged.memory_budget == 10**9
    with pytest.raises(ValueError, match="not a size"):
        ServerConfig.from_sources({}, {"EDGE_EMBED_MEMORY_BUDGET": "lots"})


def test_a_broken_bundle_fails_alone_and_says_why(qwen3_bundle, minilm_bundle, tampered, footprints):
    broken = tampered(qwen3_bundle)
    data = bytearray((broken / "model.fp32.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "model.fp32.onnx").write_bytes(bytes(data))
    sources = parse_model_sources((f"good={minilm_bundle}@int8", f"bad={broken}@fp32"), None)
    pool, _ = _pool(sources)
    with running_server(pool) as (edge, target):
        for _ in range(2):  # the first load fails; the second request gets the recorded error
            with pytest.raises(BundleError, match="FAILED_PRECONDITION.*checksum"):
                _embed(target, "bad")
        status = {m.name: m for m in _info(target).models}
        assert status["bad"].state == "failed" and "checksum" in status["bad"].error
        assert status["bad"].loads == 0 and status["bad"].requests == 2
        assert _embed(target, "good").shape == (1, 384)


def test_two_models_that_never_fit_together_do_not_thrash(minilm_bundle, footprints):
    """Budget for one of two models; 3 rounds of 5 + 5 concurrent calls. A finished load
    belongs to the calls that waited for it, so every call is answered and the models
    swap a few times, not hundreds."""
    sources = parse_model_sources((f"a={minilm_bundle}@int8", f"b={minilm_bundle}@fp32"), None)
    for source in sources:
        measure_footprint(source.path, source.precision)
    pool, _ = _pool(sources)
    with running_server(pool, max_inputs=64) as (edge, target):
        charges = sorted(pool.charge_for(name)[0] for name in ("a", "b"))
        pool.budget_bytes = pool.base_bytes + charges[1] + charges[0] // 2  # either fits, never both
        results: list[object] = []
        lock = threading.Lock()

        def call(name: str, i: int) -> None:
            try:
                vectors = _embed(target, name, [f"round text {i} for {name}"] * 4, timeout=60)
                outcome = vectors.shape
            except Exception as exc:  # noqa: BLE001 - recorded for the assertion below
                outcome = exc
            with lock:
                results.append(outcome)

        for round_ in range(3):
            threads = [threading.Thread(target=call, args=(name, 10 * round_ + i)) for name in ("a", "b")
                       for i in range(5)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        loads = {m.name: m.loads for m in _info(target).models}
    assert results == [(4, 384)] * 30, [r for r in results if not isinstance(r, tuple)]
    assert sum(loads.values()) <= 8, loads


# -- pool mechanics over fake models ------------------------------------------------------
# Hand-written manifest folders and FakeProvider loads with fixed charges: the ledger, its
# locks and the metrics, without exporting anything.

_UNIT = 100_000_000  # bytes: one unit of the fake models' charges


class _NamedFake(FakeProvider):
    """A FakeProvider reporting its bundle's model id; `close` waits for `closing` when given
    (an eviction's release step that takes as long as the test says)."""

    def __init__(self, model_id: str, closing: threading.Event | None = None):
        super().__init__()
        self.model_id, self.closing = model_id, closing

    @property
    def info(self) -> ProviderInfo:
        return dataclasses.replace(super().info, model_id=self.model_id)

    def close(self) -> None:
        if self.closing is not None:
            assert self.closing.wait(20), "the test never let the eviction finish"
        super().close()


class _FakeLoads:
    """Loader and charges of a fake pool: one runner per load, recorded by model name."""

    def __init__(self, costs: dict[str, int], ids: dict[str, str]):
        self.costs, self.ids = costs, ids
        self.runners: dict[str, list[_NamedFake]] = {name: [] for name in costs}
        self.closing: dict[str, threading.Event] = {}

    def load(self, source: ModelSource) -> _NamedFake:
        runner = _NamedFake(self.ids[source.name], self.closing.get(source.name))
        self.runners[source.name].append(runner)
        return runner

    def cost_of(self, source: ModelSource) -> tuple[int, str]:
        return self.costs[source.name], "fixed by the test"


def _fake_bundle(folder: Path, model_id: str) -> Path:
    folder.mkdir(parents=True)
    dataclasses.replace(FAKE_MANIFEST, model_id=model_id).write(folder / MANIFEST_FILE)
    return folder


def _fake_pool(tmp_path: Path, costs: dict[str, int], room: int, ids: dict[str, str] | None = None,
               **options) -> tuple[ModelPool, _FakeLoads]:
    """Models named as in `costs` (the first is the default), model ids "org/<name>" unless
    `ids` says otherwise, and a budget of `room` bytes beside the process."""
    ids = {name: f"org/{name}" for name in costs} | (ids or {})
    specs = tuple(f"{name}={_fake_bundle(tmp_path / name, ids[name])}" for name in costs)
    loads = _FakeLoads(costs, ids)
    pool = ModelPool(parse_model_sources(specs, None), budget_bytes=2**62, loader=loads.load,
                     cost_of=loads.cost_of, **options)
    pool.budget_bytes = pool.base_bytes + room
    return pool, loads


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the pool"
        time.sleep(0.005)


def _in_thread(call, *args, **kwargs) -> tuple[threading.Thread, dict[str, object]]:
    """Run `call` in a thread; the dict gets its result or exception under "out"."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["out"] = call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            box["out"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def _info_models(edge) -> set[str]:
    """The model ids edge_embed_model_info shows as served."""
    return {dict(labels)["model"] for (name, labels), value in _samples(edge).items()
            if name == "edge_embed_model_info" and value == 1}


def _samples(edge) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What a scrape of the server's registry says: (name, sorted labels) -> value."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(edge.metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_model_is_found_by_its_model_id_before_any_load(tmp_path):
    """The manifest is read when sources are parsed: a request may name a model by its model
    id before anything loaded it (or read its manifest), even once the file is gone."""
    pool, loads = _fake_pool(tmp_path, {"a": _UNIT, "b": _UNIT}, room=4 * _UNIT)
    (tmp_path / "b" / MANIFEST_FILE).unlink()  # only what parsing read can name it now
    assert pool.find("org/b") is pool.models["b"]
    assert pool.models["b"].source.manifest.model_id == "org/b"
    with running_server(pool) as (edge, target):
        assert _states(target) == {"a": "loaded", "b": "unloaded"}
        with EmbedClient(target) as client:
            assert client.info(model="org/b").model == "b"
        assert _states(target)["b"] == "unloaded"  # Info never loads
        assert _embed(target, "org/b").shape == (1, 8)
        assert _states(target) == {"a": "loaded", "b": "loaded"}
    assert len(loads.runners["b"]) == 1


def test_paths_holding_at_signs_are_paths_and_only_a_precision_follows_the_last(tmp_path):
    bundle = _fake_bundle(tmp_path / "models@v2" / "minilm", "org/minilm")
    plain, = parse_model_sources((str(bundle),), None)
    assert (plain.name, plain.path, plain.precision) == ("org/minilm", bundle, "auto")
    named, = parse_model_sources((f"m={bundle}@int8",), None, precision="fp32")
    assert (named.name, named.path, named.precision) == ("m", bundle, "int8")
    tagged = _fake_bundle(tmp_path / "bundle@v3", "org/tagged")  # '@' in the last part of the path
    assert [(s.path, s.precision) for s in parse_model_sources((str(tagged), f"t={tagged}@fp16"), None)] == [
        (tagged, "auto"), (tagged, "fp16")]
    with pytest.raises(BundleError, match="not a bundle directory"):
        parse_model_sources((f"{bundle}@int9",), None)  # no precision: the whole text is a path


def test_an_oversize_run_evicts_under_the_ledger_lock(tmp_path):
    """A request for the model an oversize run is evicting waits for that eviction to end:
    its load is never charged beside the model's old self, then zeroed by the eviction."""
    pool, loads = _fake_pool(tmp_path, {"a": _UNIT, "v": _UNIT}, room=7 * _UNIT // 2,
                             oversize_bytes=lambda model, rows, width: 2 * _UNIT)
    gate = loads.closing["v"] = threading.Event()
    entered, leave = threading.Event(), threading.Event()

    async def long_text_on_a() -> None:
        async with pool.use("a"), pool.oversize_run(pool.models["a"], 1, 10_000):
            entered.set()
            while not leave.is_set():
                await asyncio.sleep(0.005)

    with running_server(pool) as (edge, target):
        _embed(target, "v")
        v = pool.models["v"]
        run = on_server_loop(edge, long_text_on_a())
        try:
            _wait_for(lambda: v.state.value == "evicting")  # v's runner is being closed
            thread, box = _in_thread(_embed, target, "v", timeout=20)
            _wait_for(lambda: v.inflight == 1)
            time.sleep(0.3)
            assert (v.state.value, len(loads.runners["v"])) == ("evicting", 1)  # no load during the eviction
            gate.set()
            assert entered.wait(5)
            time.sleep(0.1)
            assert v.state.value == "evicted" and "busy or pinned" in (v.waiting_for or "")
        finally:
            gate.set()
            leave.set()
        run.result(10)
        thread.join(20)
        assert isinstance(box["out"], np.ndarray), box["out"]
        assert (v.state.value, v.cost, v.loads, v.evictions) == ("loaded", _UNIT, 2, 1)
        assert loads.runners["v"][0].closed and v.runner is loads.runners["v"][1]
        assert pool.committed_bytes == pool.base_bytes + 2 * _UNIT


def test_a_load_waiting_for_memory_does_not_hold_back_one_that_fits(tmp_path):
    """A big model waits for a busy model's memory; a small one that fits loads at once."""
    pool, loads = _fake_pool(tmp_path, {"a": 2 * _UNIT, "big": 4 * _UNIT, "small": _UNIT // 2}, room=5 * _UNIT,
                             load_wait_s=10)
    with running_server(pool) as (edge, target):
        loads.runners["a"][0].hang.set()
        busy, busy_out = _in_thread(_embed, target, "a", ["hang"], timeout=20)
        _wait_for(lambda: [(word_id("hang"),)] in loads.runners["a"][0].batches)  # its batch runs, hung
        big, big_out = _in_thread(_embed, target, "big", timeout=20)
        _wait_for(lambda: pool.models["big"].waiting_for is not None)
        started = time.monotonic()
        try:
            assert _embed(target, "small", timeout=3).shape == (1, 8)
            took = time.monotonic() - started
            assert pool.models["big"].state.value == "unloaded" and not big_out
        finally:
            loads.runners["a"][0].hang.clear()
        busy.join(20)
        big.join(20)
        assert isinstance(busy_out["out"], np.ndarray) and isinstance(big_out["out"], np.ndarray), (busy_out, big_out)
        assert _states(target) == {"a": "evicted", "big": "loaded", "small": "evicted"}
    assert took < 1.0, took


def test_metrics_follow_models_queues_and_refusals(tmp_path):
    """Through a scrape of the server's registry: model_info goes with an evicted model,
    queue depth is per model and read live, refusals are counted by cause."""
    pool, loads = _fake_pool(tmp_path, {"a": 2 * _UNIT, "b": 2 * _UNIT, "huge": 10 * _UNIT}, room=3 * _UNIT)
    with running_server(pool) as (edge, target):
        def depth(model: str) -> float:
            return _samples(edge)[("edge_embed_queue_depth", (("model", model),))]

        assert _info_models(edge) == {"org/a"}
        _embed(target, "b")  # only one fits: a is evicted
        assert _states(target) == {"a": "evicted", "b": "loaded", "huge": "unloaded"}
        assert _info_models(edge) == {"org/b"}

        loads.runners["b"][0].hang.set()
        thread, box = _in_thread(_embed, target, "b", ["hang"], timeout=20)
        try:
            _wait_for(lambda: depth("b") == 1)
            assert depth("a") == 0 and depth("huge") == 0
        finally:
            loads.runners["b"][0].hang.clear()
        thread.join(20)
        assert isinstance(box["out"], np.ndarray), box["out"]
        assert depth("b") == 0

        with pytest.raises(OverloadedError, match="over the memory budget"):
            _embed(target, "huge")
        assert _samples(edge)[("edge_embed_refusals_total", (("cause", "memory_budget"),))] == 1
        assert _states(target)["huge"] == "unloaded"


def test_two_names_for_one_model_id_are_told_apart(tmp_path):
    """Two names for one model (and precision): the model id names neither, and evicting
    one leaves the other's model_info series in place."""
    pool, _ = _fake_pool(tmp_path, {"x1": _UNIT, "x2": _UNIT, "y": _UNIT}, room=5 * _UNIT // 2,
                         ids={"x1": "org/x", "x2": "org/x"})
    with pytest.raises(ModelNotFoundError, match=r"org/x.* 2 models here \(x1, x2\): name one"):
        pool.find("org/x")
    with running_server(pool) as (edge, target):
        _embed(target, "x2")
        _embed(target, "y")  # x1 is least recently used and goes; x2 reports the same info
        assert _states(target) == {"x1": "evicted", "x2": "loaded", "y": "loaded"}
        assert _info_models(edge) == {"org/x", "org/y"}
