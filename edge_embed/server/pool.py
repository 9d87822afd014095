"""Several bundles in one server within a memory budget: load on first use, evict LRU.

The budget covers the whole process: `base` (the RSS measured when the pool starts, with
the runtimes imported) plus every resident model's cost. A model's cost is its stored
measurement when there is one (edge_embed.memory), else the registry rule's estimate,
and after each load the RSS growth measured here replaces the estimate. To admit a
model the pool evicts the least recently used idle ones; pinned models and models with
requests in flight are never evicted, so no request of an evicted model is dropped. A
model that cannot fit even alone is refused with RESOURCE_EXHAUSTED and the figures.

A request for a model that is loading (or waiting for memory) waits up to its deadline,
capped by `load_wait_s`, then gets UNAVAILABLE with a `retry-after-ms` hint.

Two locks: `_admit` guards the ledger (evicting, charging) and is held only for such
decisions, never while a load waits for memory, so a small load that fits goes ahead of
a big one waiting; `_loading` runs one load at a time, so each load's RSS growth is its own.

`BundlePolicy` is how `edge-embed serve` prices and loads bundles on this device (stored
footprints or the registry's estimate; each load's measured growth stored for next time).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bundle import MANIFEST_FILE
from ..errors import BundleError, InvalidInputError, MemoryBudgetError, ModelNotFoundError, ModelNotReadyError
from ..manifest import PRECISIONS, Manifest
from ..memory import peak_rss_bytes, release_free_memory, reset_peak_rss, rss_bytes
from ..provider import ModelRunner, ProviderInfo
from .batcher import TokenBudgetBatcher

if TYPE_CHECKING:
    from .config import ServerConfig

__all__ = ["ModelSource", "ModelState", "ModelStatus", "PooledModel", "ModelPool", "parse_model_sources",
           "BundlePolicy", "pool_from_config", "default_memory_budget"]

log = logging.getLogger("edge_embed.server.pool")


class ModelState(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    EVICTING = "evicting"
    EVICTED = "evicted"
    FAILED = "failed"
    STOPPED = "stopped"  # its worker failed repeatedly or hung: the process must restart


UNLOADED, LOADING, LOADED, EVICTING, EVICTED, FAILED, STOPPED = ModelState


@dataclass(frozen=True, kw_only=True)
class ModelStatus:
    """One model's place in the pool at one moment, as Info and metrics report it."""

    name: str
    state: ModelState
    pinned: bool
    path: str
    model_id: str
    precision: str
    charged_bytes: int
    charged_from: str
    resident_measured_bytes: int | None
    inflight: int
    loads: int
    evictions: int
    requests: int
    error: str | None
    parity_cos_min: float | None
    parity_ok: bool | None
    task: str = "embed"
_MiB = 1024**2
# gRPC buffers, executor threads and allocator slack that grow after the pool starts.
_PROCESS_SLACK_BYTES = 32 * _MiB
_RETRY_FAILED_S = 30.0  # a model whose load failed answers with that error this long before a retry


@dataclass(frozen=True)
class ModelSource:
    """One servable model: a name requests use, a bundle directory, a precision, and its
    manifest as read when the source was named (requests may name it by its model id)."""

    name: str
    path: Path
    precision: str = "auto"
    manifest: Manifest | None = field(default=None, compare=False, repr=False)


def _split_precision(text: str) -> tuple[str, str | None]:
    """'PATH@PRECISION' -> (PATH, PRECISION) when what follows the last '@' is a precision
    name; otherwise the whole text is a path (paths may hold '@')."""
    path, at, chosen = text.rpartition("@")
    if at and (chosen in PRECISIONS or chosen == "auto"):
        return path, chosen
    return text, None


def parse_model_sources(specs: tuple[str, ...], models_dir: Path | None, precision: str = "auto") -> list[ModelSource]:
    """`[NAME=]PATH[@PRECISION]` entries, then every bundle folder under `models_dir`.

    Without NAME a model is named by its manifest's model id; folders under
    `models_dir` are named by the folder.
    """
    sources: list[ModelSource] = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or "/" in name or "\\" in name:  # '=' inside a path is no NAME=
            name, rest = "", spec
        path_text, chosen = _split_precision(rest)
        path = Path(path_text).expanduser()
        if not (path / MANIFEST_FILE).is_file():
            raise BundleError(f"--bundle {spec!r}: {path} is not a bundle directory (no {MANIFEST_FILE})")
        manifest = Manifest.read(path / MANIFEST_FILE)
        sources.append(ModelSource(name or manifest.model_id, path, chosen or precision, manifest))
    if models_dir is not None:
        if not models_dir.is_dir():
            raise BundleError(f"models folder {models_dir} does not exist")
        found = sorted(p for p in models_dir.iterdir() if (p / MANIFEST_FILE).is_file())
        if not found:
            raise BundleError(f"models folder {models_dir} holds no bundle (no */{MANIFEST_FILE})")
        sources.extend(ModelSource(p.name, p, precision, Manifest.read(p / MANIFEST_FILE)) for p in found)
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidInputError(f"two models are named {', '.join(map(repr, duplicates))}: name them with NAME=PATH")
    return sources


class PooledModel:
    """One model's place in the pool; `runner` and `batcher` exist while loaded."""

    def __init__(self, source: ModelSource, pinned: bool):
        self.source = source
        self.name = source.name
        self.pinned = pinned
        self.state = UNLOADED
        self.runner: ModelRunner | None = None
        self.batcher: TokenBudgetBatcher | None = None
        self.info: ProviderInfo | None = None  # of the last load
        self.manifest: Manifest | None = source.manifest
        self.cost = 0  # bytes charged against the budget while resident
        self.cost_source = "estimate"
        self.resident_measured: int | None = None
        self.inflight = 0  # requests holding or waiting for this model: it is not evicted under them
        self.last_used = 0.0
        self.loads = 0
        self.evictions = 0
        self.requests = 0
        self.error: str | None = None
        self.waiting_for: str | None = None  # why a load is held back, for callers that time out
        self.failure: tuple[float, Exception] | None = None  # (when, why) the last load failed
        self.loading: asyncio.Task | None = None
        self.owned = True  # False for a runner the caller loaded: the caller closes it

    @property
    def resident(self) -> bool:
        return self.state in (LOADED, EVICTING, STOPPED)

    @property
    def model_id(self) -> str:
        """What the model says it is: from its last load, else its manifest if read."""
        if self.info is not None:
            return self.info.model_id
        return self.manifest.model_id if self.manifest is not None else ""

    @property
    def task(self) -> str:
        """"embed" or "rerank"; "" for a model whose manifest cannot be read."""
        if self.info is not None:
            return self.info.task
        try:
            return self.source_manifest().task
        except BundleError:
            return ""

    def known_model_id(self) -> str:
        """The model id, reading the manifest if nothing has yet ('' when it cannot be read)."""
        try:
            return self.model_id or self.source_manifest().model_id
        except BundleError:
            return ""

    def source_manifest(self) -> Manifest:
        """The bundle's manifest, read without loading the model."""
        if self.manifest is None:
            self.manifest = Manifest.read(self.source.path / MANIFEST_FILE)
        return self.manifest


def _load_done(model: PooledModel, task: asyncio.Task) -> None:
    model.loading = None
    model.waiting_for = None
    if not task.cancelled():
        task.exception()  # every waiter got it; a load nobody waits for any more is logged in _load


class ModelPool:
    """The models a server holds, loaded and evicted within `budget_bytes`."""

    def __init__(
        self,
        sources: list[ModelSource],
        *,
        budget_bytes: int,
        loader: Callable[[ModelSource], ModelRunner],
        cost_of: Callable[[ModelSource], tuple[int, str]],
        pinned: tuple[str, ...] = (),
        load_wait_s: float = 60.0,
        after_load: Callable[[PooledModel, int, int | None], int | None] | None = None,
        oversize_bytes: Callable[[PooledModel, int, int], int] | None = None,
    ):
        if not sources:
            raise InvalidInputError("the pool needs at least one model")
        unknown = sorted(set(pinned) - {s.name for s in sources})
        if unknown:
            raise InvalidInputError(f"--pin names unknown models {unknown}; known: {[s.name for s in sources]}")
        self.models = {s.name: PooledModel(s, s.name in pinned or len(sources) == 1) for s in sources}
        self.default = sources[0].name
        self.budget_bytes = budget_bytes
        self.load_wait_s = load_wait_s
        self._loader = loader
        self._cost_fn = cost_of
        self._after_load = after_load
        self._oversize_bytes = oversize_bytes
        self._make_batcher: Callable[[PooledModel], TokenBudgetBatcher] | None = None
        self.metrics: Any = None
        self.base_bytes = (rss_bytes() or 0) + _PROCESS_SLACK_BYTES
        self._admit = asyncio.Lock()  # the ledger: evictions and charges
        self._loading = asyncio.Lock()  # one load at a time
        self._released = asyncio.Condition()  # memory or a model may have come free

    # -- figures ----------------------------------------------------------------------

    @property
    def committed_bytes(self) -> int:
        return self.base_bytes + sum(m.cost for m in self.models.values() if m.resident or m.state == LOADING)

    def charge_for(self, name: str) -> tuple[int, str]:
        """(bytes, where the figure comes from) that admitting this model would charge now."""
        return self._cost_fn(self.models[name].source)

    @property
    def stopped(self) -> BaseException | None:
        """The error of a model worker that stopped (failed repeatedly or hung), if any."""
        for m in self.models.values():
            if m.batcher is not None and m.batcher.stopped is not None:
                return m.batcher.stopped
        return None

    @property
    def hung(self) -> bool:
        """Whether a model run is stuck past its timeout (its thread can never be joined)."""
        return any(m.batcher is not None and (m.batcher.hung or m.batcher.overdue()) for m in self.models.values())

    def find(self, name: str) -> PooledModel:
        """By name, or by model id when exactly one model has it; '' is the default model."""
        if not name:
            return self.models[self.default]
        if name in self.models:
            return self.models[name]
        by_id = [m for m in self.models.values() if m.known_model_id() == name]
        if len(by_id) == 1:
            return by_id[0]
        if by_id:
            raise ModelNotFoundError(f"model id {name!r} is that of {len(by_id)} models here "
                                     f"({', '.join(sorted(m.name for m in by_id))}): name one of them")
        raise ModelNotFoundError(f"model {name!r} is not served here; this server has {sorted(self.models)}")

    # -- lifecycle --------------------------------------------------------------------

    def bind(self, make_batcher: Callable[[PooledModel], TokenBudgetBatcher], metrics: Any = None) -> None:
        """Attach the server's batcher factory and metrics (the server owns both)."""
        self._make_batcher, self.metrics = make_batcher, metrics

    async def start(self) -> None:
        """Load the pinned models (or the default one) before the server says SERVING."""
        first = [m for m in self.models.values() if m.pinned] or [self.models[self.default]]
        for model in first:
            await self._ensure_loaded(model, None, wait_s=None)

    def adopt(self, name: str, runner: ModelRunner) -> None:
        """Take an already loaded runner as a pinned model (a server built around one)."""
        model = self.models[name]
        model.runner, model.info = runner, runner.info
        model.batcher = self._make_batcher(model)
        model.batcher.start()
        model.state, model.loads, model.last_used = LOADED, 1, time.monotonic()
        model.cost, model.cost_source, model.owned = 0, "outside the pool", False

    async def close(self) -> None:
        """Let loads in progress finish (their threads cannot be interrupted), then unload all."""
        loading = [m.loading for m in self.models.values() if m.loading is not None]
        if loading:
            await asyncio.gather(*loading, return_exceptions=True)
        for model in self.models.values():
            if model.batcher is not None:
                await model.batcher.stop()
            if model.runner is not None and model.owned:
                model.runner.close()

    @contextlib.asynccontextmanager
    async def use(self, name: str, deadline: float | None = None) -> AsyncIterator[PooledModel]:
        """A loaded model for one request; it cannot be evicted until the request is done."""
        model = self.find(name)
        model.requests += 1
        if self.metrics is not None:
            self.metrics.model_requests.labels(model.name).inc()
        # Counted before waiting for a load: the load's waiters own the model it brings in,
        # so the next queued load cannot evict it before they run (no ping-pong).
        model.inflight += 1
        try:
            if model.state != LOADED:
                wait = self.load_wait_s if deadline is None else min(self.load_wait_s, deadline - time.monotonic())
                await self._ensure_loaded(model, deadline, wait_s=max(0.0, wait))
            model.last_used = time.monotonic()
            yield model
        finally:
            model.inflight -= 1
            model.last_used = time.monotonic()
            async with self._released:
                self._released.notify_all()

    async def _ensure_loaded(self, model: PooledModel, deadline: float | None, wait_s: float | None) -> None:
        while model.state != LOADED:
            if model.state == STOPPED:
                raise model.batcher.stopped
            failure = model.failure
            if model.loading is None and failure is not None and time.monotonic() - failure[0] < _RETRY_FAILED_S:
                raise failure[1]  # a broken bundle is not reloaded for every request
            if model.loading is None:
                model.loading = asyncio.ensure_future(self._load(model))
                model.loading.add_done_callback(lambda task, m=model: _load_done(m, task))
            task = model.loading
            try:
                await asyncio.wait_for(asyncio.shield(task), wait_s)
            except asyncio.TimeoutError:
                doing = model.waiting_for or model.state.value
                raise ModelNotReadyError(f"model {model.name!r} is not ready after {wait_s:.1f} s: {doing}") from None

    def mark_stopped(self, model: PooledModel) -> None:
        """Its worker failed repeatedly or hung: requests get UNAVAILABLE until a restart."""
        model.state, model.error = STOPPED, str(model.batcher.stopped if model.batcher else "stopped")

    @contextlib.asynccontextmanager
    async def oversize_run(self, model: PooledModel, rows: int, width: int) -> AsyncIterator[None]:
        """Charge the extra activations of a batch past the token budget (a text longer than
        it runs alone) for the length of that run; evict idle models to make room, or refuse."""
        extra = self._oversize_bytes(model, rows, width) if self._oversize_bytes is not None else 0
        if extra > 0:
            async with self._admit:
                while self.committed_bytes + extra > self.budget_bytes and (victim := self._victim(model)):
                    await self._evict(victim)
                if self.committed_bytes + extra > self.budget_bytes:
                    raise MemoryBudgetError(
                        f"a text of {width:,} tokens needs {extra / 1e6:,.0f} MB of activations beyond a batch at "
                        f"the token budget; with {self.committed_bytes / 1e6:,.0f} MB committed that is over the "
                        f"memory budget of {self.budget_bytes / 1e6:,.0f} MB (send it with truncate, or shorter)")
                model.cost += extra
        try:
            yield
        finally:
            model.cost -= extra
            await self._notify_released()

    # -- admission, loading, eviction -------------------------------------------------

    def _victim(self, exclude: PooledModel) -> PooledModel | None:
        idle = [m for m in self.models.values()
                if m.state == LOADED and not m.pinned and m.inflight == 0 and m is not exclude]
        return min(idle, key=lambda m: m.last_used) if idle else None

    def _check_fits_at_all(self, model: PooledModel, cost: int) -> None:
        """Refuse (no retry) a model that cannot fit even with every evictable model gone."""
        if self.base_bytes + cost > self.budget_bytes:
            raise MemoryBudgetError(
                f"model {model.name!r} needs {cost / 1e6:,.0f} MB ({model.cost_source}) and the process "
                f"{self.base_bytes / 1e6:,.0f} MB: {(self.base_bytes + cost) / 1e6:,.0f} MB is over the memory "
                f"budget of {self.budget_bytes / 1e6:,.0f} MB even with every other model evicted"
            )
        pinned = [m for m in self.models.values() if m.pinned and m.resident and m is not model]
        pinned_bytes = sum(m.cost for m in pinned)
        if self.base_bytes + pinned_bytes + cost > self.budget_bytes:
            raise MemoryBudgetError(
                f"model {model.name!r} needs {cost / 1e6:,.0f} MB ({model.cost_source}); beside the pinned "
                f"{', '.join(m.name for m in pinned)} ({pinned_bytes / 1e6:,.0f} MB) and the process "
                f"({self.base_bytes / 1e6:,.0f} MB) that is over the memory budget of "
                f"{self.budget_bytes / 1e6:,.0f} MB"
            )

    async def _charge(self, model: PooledModel, cost: int) -> bool:
        """Under the ledger lock: evict idle models until `cost` fits, then charge it (the
        model turns LOADING). False when busy or pinned models hold the room."""
        async with self._admit:
            self._check_fits_at_all(model, cost)
            while self.committed_bytes + cost > self.budget_bytes and (victim := self._victim(model)) is not None:
                await self._evict(victim)
            if self.committed_bytes + cost > self.budget_bytes:
                held = ", ".join(f"{m.name} ({'pinned' if m.pinned else f'{m.inflight} in flight'})"
                                 for m in self.models.values() if m.resident)
                model.waiting_for = (f"it needs {cost / 1e6:,.0f} MB and the budget is held by busy or pinned "
                                     f"models: {held}")
                return False
            model.state, model.error, model.cost, model.waiting_for = LOADING, None, cost, None
            return True

    async def _notify_released(self) -> None:
        async with self._released:
            self._released.notify_all()

    async def _load(self, model: PooledModel) -> None:
        """Charge the model (waiting, without holding the ledger, while busy or pinned
        models hold the room), then load it, one load at a time."""
        if model.state == LOADED:
            return
        cost, model.cost_source = self.charge_for(model.name)
        started = time.monotonic()
        while not await self._charge(model, cost):
            left = self.load_wait_s - (time.monotonic() - started)
            if left <= 0:
                raise ModelNotReadyError(f"model {model.name!r}: {model.waiting_for}")
            async with self._released:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._released.wait(), left)
        async with self._loading:
            await self._load_charged(model)

    async def _load_charged(self, model: PooledModel) -> None:
        log.info("loading %s from %s (%s MB charged, %s)", model.name, model.source.path,
                 f"{model.cost / 1e6:,.0f}", model.cost_source)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            runner, growth, peak = await loop.run_in_executor(None, self._load_measured, model.source)
        except Exception as exc:
            model.state, model.error, model.cost = FAILED, str(exc), 0
            model.failure = (time.monotonic(), exc)
            log.error("loading %s failed: %s", model.name, exc)
            await self._notify_released()
            raise
        model.failure = None
        model.runner, model.info = runner, runner.info
        model.source_manifest()
        model.resident_measured = growth
        if self._after_load is not None and growth is not None:
            measured = self._after_load(model, growth, peak)
            if measured is not None:
                model.cost, model.cost_source = max(model.cost, measured), "measured here"
        model.batcher = self._make_batcher(model)
        model.batcher.start()
        model.state, model.last_used = LOADED, time.monotonic()
        model.loads += 1
        if self.metrics is not None:
            self.metrics.observe_load(model, time.monotonic() - started, self)
        log.info("loaded %s in %.1f s; %s MB committed of %s MB", model.name, time.monotonic() - started,
                 f"{self.committed_bytes / 1e6:,.0f}", f"{self.budget_bytes / 1e6:,.0f}")
        # A load that measured bigger than charged may have pushed the pool over: settle now.
        async with self._admit:
            while self.committed_bytes > self.budget_bytes and (victim := self._victim(model)) is not None:
                await self._evict(victim)

    def _load_measured(self, source: ModelSource) -> tuple[ModelRunner, int | None, int | None]:
        before = rss_bytes()
        can_peak = reset_peak_rss()
        runner = self._loader(source)
        after, peak = rss_bytes(), peak_rss_bytes() if can_peak else None
        if before is None or after is None:
            return runner, None, None
        return runner, after - before, (peak - before) if peak is not None else None

    async def _evict(self, model: PooledModel) -> None:
        log.info("evicting %s (idle since %.1f s ago) to make room", model.name, time.monotonic() - model.last_used)
        model.state = EVICTING
        batcher, held, info = model.batcher, [model.runner], model.info
        model.batcher = model.runner = None
        if batcher is not None:
            await batcher.stop()
        del batcher

        def release() -> None:
            runner = held.pop()  # the last reference: the session is freed before the trim
            if runner is not None:
                runner.close()
            del runner
            gc.collect()
            release_free_memory()

        await asyncio.get_running_loop().run_in_executor(None, release)
        model.state, model.cost = EVICTED, 0
        model.evictions += 1
        if self.metrics is not None:
            self.metrics.observe_eviction(model, self, info)

    # -- reporting --------------------------------------------------------------------

    def status(self) -> list[ModelStatus]:
        out = []
        for m in self.models.values():
            parity = m.info.parity if m.info is not None else None
            out.append(ModelStatus(
                name=m.name, state=m.state, pinned=m.pinned, path=str(m.source.path),
                model_id=m.model_id,
                precision=m.info.precision if m.info is not None else m.source.precision,
                charged_bytes=m.cost, charged_from=m.cost_source, resident_measured_bytes=m.resident_measured,
                inflight=m.inflight, loads=m.loads, evictions=m.evictions, requests=m.requests, error=m.error,
                parity_cos_min=getattr(parity, "cos_min", None),
                parity_ok=m.info.parity_ok if m.info is not None else None,
                task=m.task,
            ))
        return out


def default_memory_budget(memory_bytes: int | None) -> int:
    """The detected memory less a reserve for the OS and the apps beside us (the `check`
    headroom rule: a fifth); 4 GiB when the memory is unknown."""
    from ..check import HEADROOM

    return int(memory_bytes * HEADROOM) if memory_bytes else 4 * 1024**3


class BundlePolicy:
    """How `edge-embed serve` loads bundles and prices them on this device: a model is
    charged for the variant a load will really run here (FP16 on a GPU, INT8 on a CPU),
    from this device's stored footprint or else the registry's estimate; each load's
    measured RSS growth is stored as this device's figure."""

    def __init__(self, config: ServerConfig):
        from ..platform import snapshot_platform

        self.config = config
        self.platform = snapshot_platform()
        self.tokens = config.max_batch_tokens

    def cost_of(self, source: ModelSource) -> tuple[int, str]:
        from ..loading import planned_precision
        from ..memory import stored_footprint
        from ..registry import bundle_estimate

        manifest = source.manifest or Manifest.read(source.path / MANIFEST_FILE)
        precision = planned_precision(manifest, source.precision, self.config.backend, self.platform)
        memory, activations = bundle_estimate(manifest, source.path, precision, self.tokens)
        stored = stored_footprint(manifest.variants[precision].sha256, None, self.tokens)
        if stored is not None:
            return stored.total(activations), "measured on this device"
        return memory, "estimate"

    def load(self, source: ModelSource) -> ModelRunner:
        from ..loading import load

        c = self.config
        return load(source.path, precision=source.precision, backend=c.backend, threads=c.model_threads(),
                    limits=c.limits, platform=self.platform)

    def oversize_bytes(self, model: PooledModel, rows: int, width: int) -> int:
        """Activations of a batch past the token budget, beyond those charged at the budget."""
        from ..registry import bundle_estimate

        precision = model.info.precision
        _, at_budget = bundle_estimate(model.manifest, model.source.path, precision, self.tokens)
        _, needed = bundle_estimate(model.manifest, model.source.path, precision, rows * width)
        return max(0, needed - at_budget)

    def after_load(self, model: PooledModel, growth: int, peak: int | None) -> int:
        from ..memory import Footprint, store_footprint
        from ..registry import bundle_estimate

        info, manifest = model.info, model.manifest
        variant = manifest.variants[info.precision]
        _, activations = bundle_estimate(manifest, model.source.path, info.precision, self.tokens)
        footprint = store_footprint(Footprint(
            model_id=manifest.model_id, precision=info.precision, execution_provider=info.execution_providers[0],
            variant_sha256=variant.sha256, max_batch_tokens=self.tokens, resident=max(growth, 0),
            load_peak=max(peak if peak is not None else growth, 0), batch_peak=None, batch_shape=None,
            measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        ))
        return footprint.total(activations)


def pool_from_config(config: ServerConfig, sources: list[ModelSource]) -> ModelPool:
    """The pool `edge-embed serve` runs: real loads under a `BundlePolicy`, within the
    configured budget (or the detected memory less a fifth)."""
    from ..memory import import_runtimes

    policy = BundlePolicy(config)
    for source in sources:
        import_runtimes((source.manifest or Manifest.read(source.path / MANIFEST_FILE)).variants)
    budget = config.memory_budget or default_memory_budget(policy.platform.memory_bytes)
    return ModelPool(sources, budget_bytes=budget, loader=policy.load, cost_of=policy.cost_of, pinned=config.pin,
                     load_wait_s=config.load_wait_s, after_load=policy.after_load,
                     oversize_bytes=policy.oversize_bytes)
