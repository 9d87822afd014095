"""Bulk embedding of a corpus with one bundle, in process or on a Ray cluster.

An index built elsewhere is queried on a device, so its vectors must come from the very
bundle and numerics the device runs: the job runs that bundle through the same provider
and records which bundle it was (`check_same_bundle` refuses a mix later).

The corpus is cut into units of at most `rows_per_shard` rows (a slice of one input
shard). Each unit becomes one output shard, written under a temporary name and renamed,
so a shard is either whole or absent; a rerun skips units whose shard is complete. The
same unit function runs in process and in every Ray actor, so both give the same vectors.

OUTPUT holds:
    corpus.json                  the bundle (model id, precision, sha256), fields, inputs, totals
    part-IIIII-PPPPP.parquet     id (string), embedding (fixed-size list of float32), tokens (int32)
    part-IIIII-PPPPP.errors.jsonl rows of that unit that could not be embedded: id, reason
    errors.jsonl                 every error row, gathered when the run completes
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendUnavailableError, CorpusError, EdgeEmbedError, InvalidInputError

__all__ = ["embed_corpus", "check_same_bundle", "CorpusReport", "Unit", "RUN_FILE", "ERRORS_FILE"]

log = logging.getLogger(__name__)

RUN_FILE = "corpus.json"
ERRORS_FILE = "errors.jsonl"
DEFAULT_ROWS_PER_SHARD = 10_000
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_PARQUET_SUFFIXES = (".parquet",)
_META = b"edge_embed"  # key of the run facts in each shard's Parquet metadata


@dataclass(frozen=True)
class Unit:
    """One slice of one input shard: the unit of work, of output and of resumption."""

    source: str  # the input shard
    shard: int  # its position among the sorted input shards
    part: int  # this slice's position within it
    start: int  # JSONL: byte offset of the first line; Parquet: first row
    first_row: int  # row number of the first row within the shard (for error ids)
    rows: int  # rows in the slice (JSONL: non-blank lines, malformed ones included)

    @property
    def name(self) -> str:
        return f"part-{self.shard:05d}-{self.part:05d}"


@dataclass(frozen=True)
class CorpusReport:
    """What a run did: rows in must equal rows out plus error rows."""

    output: Path
    rows_in: int
    rows_out: int
    errors: int
    units: int
    units_skipped: int  # complete from an earlier run
    seconds: float
    model_id: str
    precision: str
    sha256: str


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs besides the provider; plain data, so Ray can ship it."""

    output: str
    text_field: str
    id_field: str
    dimensions: int | None
    truncate: bool
    model_id: str
    precision: str
    sha256: str


# -- input -------------------------------------------------------------------------------


def input_shards(path: str | Path) -> list[Path]:
    """A JSONL or Parquet file, or a folder of them (sorted; hidden files ignored)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in _JSONL_SUFFIXES + _PARQUET_SUFFIXES:
            raise InvalidInputError(f"{path} is neither JSONL (.jsonl, .ndjson, .json) nor Parquet (.parquet)")
        return [path]
    if not path.is_dir():
        raise InvalidInputError(f"input {path} does not exist")
    shards = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_"))
                    and p.suffix.lower() in _JSONL_SUFFIXES + _PARQUET_SUFFIXES)
    if not shards:
        raise InvalidInputError(f"input folder {path} holds no .jsonl, .ndjson, .json or .parquet files")
    return shards


def plan_units(shards: Sequence[Path], rows_per_shard: int) -> list[Unit]:
    """Cut every input shard into units; reads JSONL line ends and Parquet metadata only."""
    if rows_per_shard < 1:
        raise InvalidInputError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    units: list[Unit] = []
    for index, shard in enumerate(shards):
        if shard.suffix.lower() in _PARQUET_SUFFIXES:
            rows = _parquet_file(shard).metadata.num_rows
            units += [Unit(str(shard), index, part, start, start, min(rows_per_shard, rows - start))
                      for part, start in enumerate(range(0, rows, rows_per_shard))]
            continue
        offset, row, start, first, part = 0, 0, 0, 0, 0
        with open(shard, "rb") as f:
            for line in f:
                if line.strip():
                    if row - first == rows_per_shard:
                        units.append(Unit(str(shard), index, part, start, first, rows_per_shard))
                        start, first, part = offset, row, part + 1
                    row += 1
                elif row == first:
                    start = offset + len(line)  # a unit starts at its first non-blank line
                offset += len(line)
        if row > first:
            units.append(Unit(str(shard), index, part, start, first, row - first))
    return units


def _parquet_file(path: Path | str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types for a bad file
        raise InvalidInputError(f"{path} is not a readable Parquet file: {exc}") from exc


def _read_unit(unit: Unit, job: _Job) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """(ids, texts, errors) of a unit's rows; rows that cannot be embedded become errors."""
    ids: list[str] = []
    texts: list[str] = []
    errors: list[tuple[str, str]] = []
    name = Path(unit.source).name

    def take(row_id: Any, text: Any, where: str) -> None:
        if row_id is None or (isinstance(row_id, str) and not row_id.strip()):
            errors.append((where, f"no {job.id_field!r} field"))
        elif not isinstance(text, str):
            errors.append((str(row_id), f"{job.text_field!r} is missing" if text is None
                           else f"{job.text_field!r} is a {type(text).__name__}, not a string"))
        elif not text.strip():
            errors.append((str(row_id), f"{job.text_field!r} is empty"))
        else:
            ids.append(str(row_id))
            texts.append(text)

    if Path(unit.source).suffix.lower() in _PARQUET_SUFFIXES:
        for offset, (row_id, text) in enumerate(_parquet_rows(unit, job)):
            take(row_id, text, f"{name}:row {unit.first_row + offset}")
        return ids, texts, errors
    with open(unit.source, "rb") as f:
        f.seek(unit.start)
        row = unit.first_row
        while row < unit.first_row + unit.rows:
            line = f.readline()
            if not line:
                raise CorpusError(f"{unit.source} ended before row {row}: it changed since the run was planned")
            if not line.strip():
                continue
            where = f"{name}:row {row}"
            row += 1
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                errors.append((where, f"not a JSON object: {exc}"))
                continue
            if not isinstance(record, dict):
                errors.append((where, f"not a JSON object but a {type(record).__name__}"))
                continue
            take(record.get(job.id_field), record.get(job.text_field), where)
    return ids, texts, errors


def _parquet_rows(unit: Unit, job: _Job) -> Iterator[tuple[Any, Any]]:
    """The unit's (id, text) pairs, reading only the row groups that hold them."""
    pf = _parquet_file(unit.source)
    names = set(pf.schema_arrow.names)
    for field in (job.id_field, job.text_field):
        if field not in names:
            raise InvalidInputError(f"{unit.source} has no column {field!r} (it has: {', '.join(sorted(names))})")
    first = 0
    end = unit.start + unit.rows
    for group in range(pf.metadata.num_row_groups):
        size = pf.metadata.row_group(group).num_rows
        if first + size > unit.start and first < end:
            table = pf.read_row_group(group, columns=[job.id_field, job.text_field])
            lo, hi = max(unit.start - first, 0), min(end - first, size)
            part = table.slice(lo, hi - lo)
            yield from zip(part.column(job.id_field).to_pylist(), part.column(job.text_field).to_pylist())
        first += size
        if first >= end:
            break


# -- one unit: read, embed, write ----------------------------------------------------------


def run_unit(provider: Any, unit: Unit, job: _Job) -> dict[str, Any]:
    """Embed one unit and write its shard atomically; returns its counts.

    Rows that cannot be embedded (no id, empty text, over the token limit with truncation
    off, a non-finite vector) go to the unit's errors file; the others keep their order.
    """
    ids, texts, errors = _read_unit(unit, job)
    seqs = _tokenize_rows(provider, ids, texts, errors, job)
    kept = [i for i, s in enumerate(seqs) if s is not None]
    width = provider.manifest.check_dimensions(job.dimensions)
    vectors = _embed_rows(provider, [seqs[i] for i in kept], [ids[i] for i in kept], width, errors)
    ok = [i for i, v in zip(kept, vectors) if v is not None]
    matrix = np.stack([v for v in vectors if v is not None]) if ok else np.empty((0, width), np.float32)
    out = Path(job.output)
    if errors:
        _write_atomically(out / f"{unit.name}.errors.jsonl", "".join(
            json.dumps({"id": i, "reason": r}) + "\n" for i, r in errors).encode())
    facts = {"unit": dataclasses.asdict(unit), "rows_in": unit.rows, "rows_out": len(ok), "errors": len(errors),
             "model_id": job.model_id, "precision": job.precision, "sha256": job.sha256, "dimensions": width}
    if len(ok) + len(errors) != unit.rows:
        raise CorpusError(f"{unit.name}: {unit.rows} rows in but {len(ok)} embedded and {len(errors)} errors")
    _write_shard(out / f"{unit.name}.parquet", [ids[i] for i in ok], matrix,
                 [len(seqs[i]) for i in ok], facts)
    return {"name": unit.name, "rows_in": unit.rows, "rows_out": len(ok), "errors": len(errors)}


def _tokenize_rows(provider, ids, texts, errors, job) -> list[np.ndarray | None]:
    """Token ids per row; a batch that fails is retried row by row so only bad rows drop."""
    if not texts:
        return []
    try:
        return list(provider.tokenize(texts, truncate=job.truncate))
    except InvalidInputError:
        pass
    seqs: list[np.ndarray | None] = []
    for row_id, text in zip(ids, texts):
        try:
            seqs.append(provider.tokenize([text], truncate=job.truncate)[0])
        except InvalidInputError as exc:
            errors.append((row_id, str(exc).replace("texts[0] ", "the text ")))
            seqs.append(None)
    return seqs


def _embed_rows(provider, seqs, ids, width, errors) -> list[np.ndarray | None]:
    """Finished vectors per row. A failed batch is rerun row by row; when every row fails,
    the cause is not the rows and the unit fails (a rerun retries it)."""
    if not seqs:
        return []
    try:
        return list(provider.finish(provider.embed_token_ids(seqs), width, True))
    except EdgeEmbedError as exc:
        log.warning("a batch of %d rows failed (%s); embedding them one by one", len(seqs), exc)
    vectors: list[np.ndarray | None] = []
    failures = []
    for row_id, seq in zip(ids, seqs):
        try:
            vectors.append(provider.finish(provider.embed_token_ids([seq]), width, True)[0])
        except EdgeEmbedError as exc:
            failures.append((row_id, str(exc)))
            vectors.append(None)
    if len(failures) == len(seqs):
        raise CorpusError(f"every row of a unit failed; the last: {failures[-1][1]}")
    errors.extend(failures)
    return vectors


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard(path: Path, ids: list[str], vectors: np.ndarray, tokens: list[int], facts: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = vectors.shape[1]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).reshape(-1), pa.float32()), dim)
    table = pa.table({"id": pa.array(ids, pa.string()), "embedding": embedding,
                      "tokens": pa.array(tokens, pa.int32())})
    table = table.replace_schema_metadata({_META: json.dumps(facts).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _complete(unit: Unit, job: _Job) -> dict[str, Any] | None:
    """The counts of a unit an earlier run finished, or None if it must be (re)done."""
    import pyarrow.parquet as pq

    out = Path(job.output)
    path = out / f"{unit.name}.parquet"
    if not path.exists():
        return None
    try:
        meta = pq.read_metadata(path)
        facts = json.loads((meta.metadata or {}).get(_META, b"{}"))
    except Exception:  # noqa: BLE001 - a damaged shard is simply redone
        return None
    if (facts.get("unit") != dataclasses.asdict(unit) or facts.get("sha256") != job.sha256
            or meta.num_rows != facts.get("rows_out") or facts["rows_out"] + facts["errors"] != unit.rows):
        return None
    if facts["errors"]:
        errors_path = out / f"{unit.name}.errors.jsonl"
        if not errors_path.exists() or errors_path.read_bytes().count(b"\n") != facts["errors"]:
            return None
    return {"name": unit.name, "rows_in": unit.rows, "rows_out": facts["rows_out"], "errors": facts["errors"]}


# -- the run -------------------------------------------------------------------------------


def embed_corpus(
    bundle: str | Path,
    input: str | Path,
    output: str | Path,
    *,
    text_field: str = "text",
    id_field: str = "id",
    precision: str = "auto",
    dimensions: int | None = None,
    truncate: bool = True,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    threads: int | None = None,
    ray: str | bool | None = None,
    actors: int | None = None,
    cpus_per_actor: int = 1,
    ship_bundle: bool = False,
    progress: bool = True,
    before_unit: Callable[[Unit], None] | None = None,
) -> CorpusReport:
    """Embed every row of INPUT with `bundle` into Parquet shards in OUTPUT; resumable.

    `ray`: None runs in this process; an address ("auto", "ray://host:10001") joins that
    cluster, "local" starts one here, True uses the Ray instance this process already
    started. On Ray, `actors` (default: the cluster's CPUs / `cpus_per_actor`) each load
    the bundle once and run with `cpus_per_actor` threads; the bundle reaches them by path
    (a filesystem every node sees, like INPUT and OUTPUT) or, with `ship_bundle`, through
    the object store. Every worker checks the model file's sha256 against this run's.
    `before_unit` is called in the worker before each unit (a hook to throttle or to
    inject faults). Raises CorpusError when OUTPUT holds another run, or rows go missing.
    """
    _need_pyarrow()
    from . import load_bundle, planned_precision

    started = time.monotonic()
    source = load_bundle(bundle)
    if source.manifest.task != "embed":
        from .provider import wrong_task

        raise wrong_task(source.manifest.model_id, source.manifest.task, "embed")
    chosen = planned_precision(source.manifest, precision)
    variant = source.variant(chosen)
    width = source.manifest.check_dimensions(dimensions)
    job = _Job(output=str(Path(output).resolve()), text_field=text_field, id_field=id_field,
               dimensions=dimensions, truncate=truncate, model_id=source.manifest.model_id,
               precision=chosen, sha256=variant.sha256)
    shards = input_shards(input)
    units = plan_units(shards, rows_per_shard)
    run = {"model_id": job.model_id, "precision": chosen, "sha256": variant.sha256, "dimensions": width,
           "text_field": text_field, "id_field": id_field, "truncate": truncate, "rows_per_shard": rows_per_shard,
           "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in shards],
           "rows": sum(u.rows for u in units)}
    _start_run(Path(job.output), run)
    done = {u.name: c for u in units if (c := _complete(u, job)) is not None}
    pending = [u for u in units if u.name not in done]
    bar = _Progress(run["rows"], sum(c["rows_in"] for c in done.values()), enabled=progress)
    if pending:
        log.info("embedding %d rows in %d shards with %s %s (%d shards already complete)",
                 sum(u.rows for u in pending), len(pending), job.model_id, chosen, len(done))
    if pending and ray is None:
        from . import load

        with load(source, precision=chosen, threads=threads) as provider:
            for unit in pending:
                if before_unit is not None:
                    before_unit(unit)
                result = run_unit(provider, unit, job)
                done[unit.name] = result
                bar.advance(result["rows_in"])
    elif pending:
        for result in _run_on_ray(source, pending, job, ray, actors, cpus_per_actor, ship_bundle, before_unit):
            done[result["name"]] = result
            bar.advance(result["rows_in"])
    bar.close()
    return _finish_run(Path(job.output), run, units, done, len(units) - len(pending), time.monotonic() - started)


def _need_pyarrow() -> None:
    import importlib

    try:
        importlib.import_module("pyarrow.parquet")
    except ImportError as exc:
        raise BackendUnavailableError(
            f"embed-corpus writes Parquet and needs pyarrow: pip install 'edge-embed[corpus]' ({exc})") from exc


def _start_run(output: Path, run: dict) -> None:
    """Create OUTPUT, or check that what it holds is an earlier attempt of this very run."""
    output.mkdir(parents=True, exist_ok=True)
    record = output / RUN_FILE
    if record.exists():
        before = json.loads(record.read_text())
        differs = [k for k in run if before.get(k) != run[k]]
        if differs:
            raise CorpusError(
                f"{output} holds a run with a different {', '.join(differs)}; resume only the same run, "
                "or write to a new folder")
        return
    if any(p for p in output.iterdir() if not p.name.startswith(".")):
        raise CorpusError(f"{output} is not empty and holds no {RUN_FILE}: write to a new or empty folder")
    _write_atomically(record, (json.dumps(run, indent=2) + "\n").encode())


def _finish_run(output: Path, run: dict, units: list[Unit], done: dict, skipped: int, seconds: float) -> CorpusReport:
    """Count rows in against rows out plus errors, gather the errors, record the totals."""
    missing = [u.name for u in units if u.name not in done]
    if missing:
        raise CorpusError(f"{len(missing)} shards were not written (first: {missing[0]}); run again to finish them")
    rows_in = sum(done[u.name]["rows_in"] for u in units)
    rows_out = sum(done[u.name]["rows_out"] for u in units)
    errors = sum(done[u.name]["errors"] for u in units)
    if rows_in != run["rows"] or rows_out + errors != rows_in:
        raise CorpusError(f"rows in {run['rows']:,}, rows out {rows_out:,} plus {errors:,} errors: rows were lost")
    gathered = b"".join((output / f"{u.name}.errors.jsonl").read_bytes() for u in units if done[u.name]["errors"])
    _write_atomically(output / ERRORS_FILE, gathered)
    totals = {**run, "complete": True, "rows_out": rows_out, "errors": errors, "shards": len(units)}
    _write_atomically(output / RUN_FILE, (json.dumps(totals, indent=2) + "\n").encode())
    if errors:
        log.warning("%d of %d rows could not be embedded; see %s", errors, rows_in, output / ERRORS_FILE)
    return CorpusReport(output=output, rows_in=rows_in, rows_out=rows_out, errors=errors, units=len(units),
                        units_skipped=skipped, seconds=seconds, model_id=run["model_id"],
                        precision=run["precision"], sha256=run["sha256"])


def check_same_bundle(corpus: str | Path, provider: Any, dimensions: int | None = None) -> None:
    """Refuse (CorpusError) to query a corpus whose vectors another model file, precision
    or width made than the ones `provider` (a loaded provider) queries with."""
    record = Path(corpus) / RUN_FILE
    if not record.exists():
        raise CorpusError(f"{corpus} has no {RUN_FILE}: it is no edge-embed corpus")
    run = json.loads(record.read_text())
    if not run.get("complete"):
        raise CorpusError(f"the corpus in {corpus} is incomplete: run embed-corpus again to finish it")
    mine = {"model_id": provider.manifest.model_id, "precision": provider.precision,
            "sha256": provider.bundle.variant(provider.precision).sha256,
            "dimensions": provider.manifest.check_dimensions(dimensions)}
    differs = [f"{k} {run.get(k)!r} (corpus) vs {v!r} (here)" for k, v in mine.items() if run.get(k) != v]
    if differs:
        raise CorpusError(f"the corpus in {corpus} does not match these queries: " + "; ".join(differs))


# -- Ray -------------------------------------------------------------------------------------


def _run_on_ray(source, pending: list[Unit], job: _Job, address, actors, cpus_per_actor, ship_bundle,
                before_unit) -> Iterator[dict]:
    """The pending units through a Ray Data actor pool: each actor loads the bundle once,
    checks its sha256, then reads, embeds and writes whole units."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise BackendUnavailableError(f"--ray needs Ray Data: pip install 'edge-embed[ray]' ({exc})") from exc
    for name in ("ray", "ray.data", "ray._private"):
        logging.getLogger(name).setLevel(logging.ERROR)  # Ray's own INFO and notices are not the user's
    if address is True and not ray.is_initialized():
        raise BackendUnavailableError("ray=True needs ray.init() first; or pass an address, or 'local'")
    started_here = False
    if not ray.is_initialized() and address is not True:
        ray.init(address=None if address == "local" else address, logging_level=logging.ERROR,
                 log_to_driver=False, include_dashboard=False)
        started_here = True
    try:
        yield from _map_units(ray, source, pending, job, actors, cpus_per_actor, ship_bundle, before_unit)
    finally:
        if started_here:
            ray.shutdown()


def _map_units(ray, source, pending: list[Unit], job: _Job, actors, cpus_per_actor, ship_bundle,
               before_unit) -> Iterator[dict]:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    if cpus_per_actor < 1 or cpus_per_actor > cluster_cpus:
        raise InvalidInputError(f"cpus_per_actor must be 1..{cluster_cpus} (the cluster's CPUs), got {cpus_per_actor}")
    size = actors or max(1, cluster_cpus // cpus_per_actor)
    size = min(size, len(pending))
    shipped = ray.put(_bundle_files(source, job.precision)) if ship_bundle else None
    items = [dataclasses.asdict(u) for u in pending]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _UnitWorker,
        fn_constructor_kwargs={"bundle_path": str(source.path), "shipped": shipped, "job": job,
                               "threads": cpus_per_actor, "before_unit": before_unit},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=cpus_per_actor,
    )
    try:
        for row in dataset.iter_rows():
            yield {"name": str(row["name"]), "rows_in": int(row["rows_in"]), "rows_out": int(row["rows_out"]),
                   "errors": int(row["errors"])}
    except (ray.exceptions.RayError, EdgeEmbedError) as exc:
        raise CorpusError(f"a Ray worker failed, so the run stopped; the shards it completed are kept and a "
                          f"rerun does the rest. The cause: {_root_cause(exc)}") from exc


def _root_cause(exc: BaseException) -> str:
    """The worker's own exception, as one line. Ray passes it back only as traceback
    text inside its wrappers: the last "SomeError: message" line that is not Ray's."""
    import re

    found = [m for m in re.finditer(r"^\s*(\w+(?:Error|Exception)): (.+)$", str(exc), re.MULTILINE)
             if not m.group(1).startswith(("Ray", "UserCode"))]
    return f"{found[-1].group(1)}: {found[-1].group(2).strip()}" if found else type(exc).__name__


def _bundle_files(source, precision: str) -> dict[str, bytes]:
    """The bundle as bytes for the object store, less the model files of other precisions."""
    others = set()
    for name, variant in source.manifest.variants.items():
        if name != precision:
            others |= {variant.file, *variant.external_data}
    mine = source.manifest.variants[precision]
    others -= {mine.file, *mine.external_data}
    return {p.name: p.read_bytes() for p in sorted(source.path.iterdir()) if p.is_file() and p.name not in others}


class _UnitWorker:
    """A Ray actor: one provider for its life, whole units per call."""

    def __init__(self, bundle_path: str, shipped: Any, job: _Job, threads: int, before_unit):
        import tempfile

        from . import load

        if shipped is not None:  # the bundle's files, through the object store
            import ray

            self._dir = tempfile.TemporaryDirectory(prefix="edge-embed-bundle-")
            for name, data in ray.get(shipped).items():
                (Path(self._dir.name) / name).write_bytes(data)
            bundle_path = self._dir.name
        self.provider = load(bundle_path, precision=job.precision, threads=threads)
        here = self.provider.bundle.variant(job.precision).sha256
        if here != job.sha256 or self.provider.manifest.model_id != job.model_id:
            raise CorpusError(f"the bundle at {bundle_path} on this worker is not the run's: sha256 {here[:12]}... "
                              f"vs {job.sha256[:12]}...")
        self.job = job
        self.before_unit = before_unit

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for i in range(len(batch["source"])):
            unit = Unit(**{f.name: _plain(batch[f.name][i]) for f in dataclasses.fields(Unit)})
            if self.before_unit is not None:
                self.before_unit(unit)
            results.append(run_unit(self.provider, unit, self.job))
        return {k: np.array([r[k] for r in results]) for k in ("name", "rows_in", "rows_out", "errors")}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


# -- progress --------------------------------------------------------------------------------


class _Progress:
    """rows done / total, rows/s and an ETA on stderr: redrawn in place on a terminal,
    a line every 10 s otherwise (logs, CI)."""

    def __init__(self, total: int, already: int, enabled: bool):
        self.total, self.done, self.enabled = total, already, enabled and total > 0
        self.started, self.start_done = time.monotonic(), already
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if self.enabled and (self.tty or now - self.last >= 10 or self.done == self.total):
            self.last = now
            speed = (self.done - self.start_done) / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / speed if speed > 0 else float("inf")
            line = (f"embed-corpus: {self.done:,}/{self.total:,} rows ({100 * self.done / self.total:.0f}%), "
                    f"{speed:,.0f} rows/s, ETA {_duration(eta)}")
            sys.stderr.write(("\r" + line.ljust(78)) if self.tty else line + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
