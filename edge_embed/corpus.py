"""Bulk embedding of a corpus with one bundle, in process or on a Ray cluster.

An index built elsewhere is queried on a device, so its vectors must come from the very
bundle and numerics the device runs: the job runs that bundle through the same provider
and records which bundle it was (`check_same_bundle` refuses a mix later).

The corpus is cut into units of at most `rows_per_shard` rows (a slice of one input
shard). Each unit becomes one output shard, written under a temporary name and renamed,
so a shard is either whole or absent; a rerun skips units whose shard is complete. Units
are read in spans: the units of a Parquet shard that share a row group are read in one
pass over it, so a shard written as one big row group is decoded once, not once per unit.
The same span function runs in process and in every Ray actor, so both give the same
vectors. The job talks to the model only through the `ModelRunner` contract.

A row that fails on its own (no id, an empty text, too long with truncation off, a model
run that fails or gives a non-finite vector for it alone) goes to the errors file and its
unit completes without it. What is not a row's fault (a row out of memory even alone, a
stopped worker, a model that no longer embeds a known text, I/O) stops the job; a rerun
resumes it.

OUTPUT holds:
    corpus.json                  the bundle (model id, precision, sha256), fields, inputs, totals
    part-IIIII-PPPPP.parquet     id (string), embedding (fixed-size list of float32), tokens (int32);
                                 a multi-vector model's embedding is a list of token vectors (each a
                                 fixed-size list of float32): tokens x dim x 4 bytes a row
    (with an image field, a row is its image, its text, or both: an image path relative to
    its JSONL file, or image bytes in a Parquet binary column)
    part-IIIII-PPPPP.errors.jsonl rows of that unit that could not be embedded: id, reason
    errors.jsonl                 every error row, gathered when the run completes
"""

from __future__ import annotations

import bisect
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

from .batching import BatchLimits, plan_batches
from .bundle import load_bundle
from .errors import BackendUnavailableError, CorpusError, EdgeEmbedError, InvalidInputError, WorkerStoppedError
from .loading import load, planned_precision
from .provider import ModelRunner, ProviderInfo, wrong_task

__all__ = ["embed_corpus", "check_same_bundle", "CorpusReport", "Unit", "RUN_FILE", "ERRORS_FILE"]

log = logging.getLogger(__name__)

RUN_FILE = "corpus.json"
ERRORS_FILE = "errors.jsonl"
DEFAULT_ROWS_PER_SHARD = 10_000
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_PARQUET_SUFFIXES = (".parquet",)
_META = b"edge_embed"  # key of the run facts in each shard's Parquet metadata
_READ_BATCH_ROWS = 4096  # the most rows per Arrow batch while streaming a Parquet span
# Embedded after rows failed alone: if the model cannot embed this either, the rows are not to blame.
_KNOWN_TEXT = "A short, plain sentence that any text model can embed."


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
    image_field: str | None = None
    multivector: bool = False


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


def _is_parquet(source: str | Path) -> bool:
    return Path(source).suffix.lower() in _PARQUET_SUFFIXES


def _row_group_starts(meta: Any) -> list[int]:
    """The first row of each row group of a Parquet file's metadata, then its row count."""
    starts = [0]
    for group in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(group).num_rows)
    return starts


def plan_spans(units: Sequence[Unit], at_least: int = 1) -> list[list[Unit]]:
    """Units in reading order, grouped so no row group is decoded once per unit.

    Consecutive units of one Parquet shard that share a row group form one span, read in
    one pass (units between them that are already complete are passed over); a JSONL
    unit, read by byte offset, is a span of its own. `at_least` (parallel workers) halves
    the longest spans until there are that many; each half then decodes its first row
    group from the group's start, so k workers on a one-group shard decode it about
    (k + 1) / 2 times, not once per unit.
    """
    spans: list[list[Unit]] = []
    starts: dict[str, list[int]] = {}
    previous: tuple[str, int] | None = None  # the source and last row group of the span before
    for unit in units:
        if not _is_parquet(unit.source):
            spans.append([unit])
            previous = None
            continue
        if unit.source not in starts:
            starts[unit.source] = _row_group_starts(_parquet_file(unit.source).metadata)
        bounds = starts[unit.source]
        first = bisect.bisect_right(bounds, unit.start) - 1
        if previous == (unit.source, first):
            spans[-1].append(unit)
        else:
            spans.append([unit])
        previous = (unit.source, bisect.bisect_right(bounds, unit.start + unit.rows - 1) - 1)
    while len(spans) < at_least:
        longest = max(range(len(spans)), key=lambda i: len(spans[i]), default=None)
        if longest is None or len(spans[longest]) < 2:
            break
        span = spans[longest]
        spans[longest:longest + 1] = [span[:len(span) // 2], span[len(span) // 2:]]
    return spans


class _Rows:
    """One unit's rows as read: (id, text) of those that can be embedded, (id, reason) of the others."""

    __slots__ = ("ids", "texts", "errors")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.texts: list[str] = []
        self.errors: list[tuple[str, str]] = []

    def take(self, row_id: Any, text: Any, where: str, job: _Job, image: Any = None, folder: Path | None = None) -> None:
        """One row: its text, or with an image field its image, its text or both."""
        if row_id is None or (isinstance(row_id, str) and not row_id.strip()):
            self.errors.append((where, f"no {job.id_field!r} field"))
            return
        row_id = str(row_id)
        if job.image_field is not None and image is not None:
            try:
                opened = _row_image(image, job.image_field, folder)
            except InvalidInputError as exc:
                self.errors.append((row_id, str(exc)))
                return
            if isinstance(text, str) and text.strip():
                self.ids.append(row_id)
                self.texts.append([opened, text])
            elif text is None:
                self.ids.append(row_id)
                self.texts.append(opened)
            else:
                self.errors.append((row_id, f"{job.text_field!r} is not a non-empty string"))
        elif not isinstance(text, str):
            missing = f"{job.text_field!r}" + (f" and {job.image_field!r} are" if job.image_field else " is")
            self.errors.append((row_id, f"{missing} missing" if text is None
                                else f"{job.text_field!r} is a {type(text).__name__}, not a string"))
        elif not text.strip():
            self.errors.append((row_id, f"{job.text_field!r} is empty"))
        else:
            self.ids.append(row_id)
            self.texts.append(text)


def _row_image(value: Any, field: str, folder: Path | None) -> Any:
    """A row's image, its header checked (nothing decoded yet): a path (relative to the
    JSONL file's folder) or the encoded bytes of a Parquet binary column."""
    from .images import Image

    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image.open(bytes(value), field=field)
    if isinstance(value, str) and value.strip():
        path = Path(value)
        if not path.is_absolute() and folder is not None:
            path = folder / path
        if not path.is_file():
            raise InvalidInputError(f"{field!r}: no image file at {path}")
        return Image.open(path, field=field)
    raise InvalidInputError(f"{field!r} must be an image path or image bytes, got {type(value).__name__}")


def read_span(span: Sequence[Unit], job: _Job) -> Iterator[tuple[Unit, _Rows]]:
    """Each unit of a span with its rows, in order; rows that cannot be embedded become errors."""
    name = Path(span[0].source).name
    if _is_parquet(span[0].source):
        for unit, records in _parquet_span(span, job):
            rows = _Rows()
            for offset, (row_id, text, image) in enumerate(records):
                rows.take(row_id, text, f"{name}:row {unit.first_row + offset}", job, image)
            yield unit, rows
        return
    for unit in span:
        yield unit, _jsonl_unit(unit, job)


def _jsonl_unit(unit: Unit, job: _Job) -> _Rows:
    rows = _Rows()
    name = Path(unit.source).name
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
                rows.errors.append((where, f"not a JSON object: {exc}"))
                continue
            if not isinstance(record, dict):
                rows.errors.append((where, f"not a JSON object but a {type(record).__name__}"))
                continue
            image = record.get(job.image_field) if job.image_field else None
            rows.take(record.get(job.id_field), record.get(job.text_field), where, job, image,
                      Path(unit.source).parent)
    return rows


def _parquet_span(span: Sequence[Unit], job: _Job) -> Iterator[tuple[Unit, list[tuple[Any, Any, Any]]]]:
    """Each unit's (id, text, image) rows (image None without an image field; text None
    where an image-only corpus has no text column), streaming the row groups that hold the
    span once."""
    source = span[0].source
    pf = _parquet_file(source)
    names = set(pf.schema_arrow.names)
    required = [job.id_field, job.image_field] if job.image_field else [job.id_field, job.text_field]
    for field in required:
        if field not in names:
            raise InvalidInputError(f"{source} has no column {field!r} (it has: {', '.join(sorted(names))})")
    columns = [c for c in dict.fromkeys([job.id_field, job.text_field, job.image_field]) if c in names]
    starts = _row_group_starts(pf.metadata)
    first = bisect.bisect_right(starts, span[0].start) - 1
    end = span[-1].start + span[-1].rows
    groups = [g for g in range(first, pf.metadata.num_row_groups) if starts[g] < end]
    # Batches no longer than a unit: a span that ends early in a row group decodes no further.
    batches = pf.iter_batches(batch_size=min(_READ_BATCH_ROWS, max(u.rows for u in span)), row_groups=groups,
                              columns=columns)
    held, held_start = None, starts[first]  # the batch last read and the shard row it starts at
    def column(part: Any, name: str | None) -> list[Any]:
        return part.column(name).to_pylist() if name in columns else [None] * part.num_rows

    for unit in span:
        pairs: list[tuple[Any, Any, Any]] = []
        row, stop = unit.start, unit.start + unit.rows
        while row < stop:
            if held is None or held_start + held.num_rows <= row:
                if held is not None:
                    held_start += held.num_rows
                held = next(batches, None)
                if held is None:
                    raise CorpusError(f"{source} ended before row {row}: it changed since the run was planned")
                continue
            part = held.slice(row - held_start, stop - row)
            pairs += zip(column(part, job.id_field), column(part, job.text_field), column(part, job.image_field))
            row += part.num_rows
        yield unit, pairs


# -- a span of units: read, embed, write -----------------------------------------------


def run_span(provider: ModelRunner, span: Sequence[Unit], job: _Job,
             before_unit: Callable[[Unit], None] | None = None) -> Iterator[dict[str, Any]]:
    """Read a span and embed and write each of its units in turn; yields each unit's counts."""
    for unit, rows in read_span(span, job):
        if before_unit is not None:
            before_unit(unit)
        yield run_unit(provider, unit, rows, job)


def run_unit(provider: ModelRunner, unit: Unit, rows: _Rows, job: _Job) -> dict[str, Any]:
    """Embed one unit's rows and write its shard atomically; returns its counts.

    Rows that cannot be embedded go to the unit's errors file; the others keep their order.
    """
    info = provider.info
    errors = list(rows.errors)
    seqs = _tokenize_rows(provider, rows.ids, rows.texts, errors, job)
    kept = [i for i, s in enumerate(seqs) if s is not None]
    width = info.check_dimensions(job.dimensions)
    vectors = _embed_rows(provider, info, [seqs[i] for i in kept], [rows.ids[i] for i in kept], width, errors,
                          job)
    ok = [i for i, v in zip(kept, vectors) if v is not None]
    if job.multivector:
        matrix: Any = [v for v in vectors if v is not None]
    else:
        matrix = np.stack([v for v in vectors if v is not None]) if ok else np.empty((0, width), np.float32)
    out = Path(job.output)
    if errors:
        _write_atomically(out / f"{unit.name}.errors.jsonl", "".join(
            json.dumps({"id": i, "reason": r}) + "\n" for i, r in errors).encode())
    facts = {"unit": dataclasses.asdict(unit), "rows_in": unit.rows, "rows_out": len(ok), "errors": len(errors),
             "model_id": job.model_id, "precision": job.precision, "sha256": job.sha256, "dimensions": width,
             **({"multivector": True} if job.multivector else {})}
    if len(ok) + len(errors) != unit.rows:
        raise CorpusError(f"{unit.name}: {unit.rows} rows in but {len(ok)} embedded and {len(errors)} errors")
    _write_shard(out / f"{unit.name}.parquet", [rows.ids[i] for i in ok], matrix,
                 [len(seqs[i]) for i in ok], facts)
    return {"name": unit.name, "rows_in": unit.rows, "rows_out": len(ok), "errors": len(errors)}


def _tokenize_rows(provider: ModelRunner, ids: list[str], texts: list[str], errors: list[tuple[str, str]],
                   job: _Job) -> list[np.ndarray | None]:
    """Token ids per row; a batch that fails is retried row by row so only bad rows drop."""
    if not texts:
        return []
    try:
        return list(_tokenize(provider, texts, job))
    except InvalidInputError:
        pass
    seqs: list[np.ndarray | None] = []
    for row_id, text in zip(ids, texts):
        try:
            seqs.append(_tokenize(provider, [text], job)[0])
        except InvalidInputError as exc:
            errors.append((row_id, str(exc).replace("texts[0] ", "the text ")))
            seqs.append(None)
    return seqs


def _tokenize(provider: ModelRunner, items: list[Any], job: _Job) -> list[Any]:
    """Rows as the model reads them: a multi-vector model reads them as documents."""
    if job.multivector:
        return provider.tokenize_multi(items, truncate=job.truncate)
    return provider.tokenize(items, truncate=job.truncate)


def _embed(provider: ModelRunner, info: ProviderInfo, seqs: Sequence[np.ndarray], width: int,
           job: _Job) -> np.ndarray | list[np.ndarray]:
    """Finished vectors of tokenized rows (a multi-vector model's token matrices), in
    batches planned as the provider's own `embed` plans them, so a corpus vector is the one a
    device computes for the same text."""
    limits = info.batch_limits(BatchLimits())
    plan = plan_batches([len(s) for s in seqs], limits.max_batch_tokens, limits.max_batch_size,
                        stepped_rows=limits.stepped_rows)
    if job.multivector:
        matrices: list[np.ndarray] = [np.empty(0)] * len(seqs)
        for batch in plan:
            for i, m in zip(batch, provider.run_multi_batch([seqs[i] for i in batch])):
                matrices[i] = m
        return matrices
    pooled = np.empty((len(seqs), info.dim), dtype=np.float32)
    for batch in plan:
        pooled[batch] = provider.run_batch([seqs[i] for i in batch])
    return provider.finish(pooled, width, True)


def _not_the_rows(exc: BaseException) -> bool:
    """Whether an error says nothing about the rows: a stopped worker, or out of memory."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (MemoryError, WorkerStoppedError)):
            return True
        seen = seen.__cause__
    return False


def _embed_rows(provider: ModelRunner, info: ProviderInfo, seqs: list[np.ndarray], ids: list[str], width: int,
                errors: list[tuple[str, str]], job: _Job) -> list[np.ndarray | None]:
    """Finished vectors per row. A failed batch (out of memory included) is rerun row by
    row, and a row that fails alone is an error row, once the model has shown it still
    embeds a known text; a model or machine that fails everything, or a row that runs out
    of memory alone, fails the unit instead, and a rerun retries it."""
    if not seqs:
        return []
    try:
        return list(_embed(provider, info, seqs, width, job))
    except EdgeEmbedError as exc:
        if isinstance(exc, WorkerStoppedError):
            raise
        log.warning("a batch of %d rows failed (%s); embedding them one by one", len(seqs), exc)
    vectors: list[np.ndarray | None] = []
    failures: list[tuple[str, str]] = []
    for row_id, seq in zip(ids, seqs):
        try:
            vectors.append(_embed(provider, info, [seq], width, job)[0])
        except EdgeEmbedError as exc:
            if _not_the_rows(exc):
                raise
            failures.append((row_id, str(exc)))
            vectors.append(None)
    if failures:
        try:
            _embed(provider, info, _tokenize(provider, [_KNOWN_TEXT], job), width, job)
        except EdgeEmbedError as exc:
            raise CorpusError(f"{len(failures)} rows failed, and then so did a known text, so the fault is not "
                              f"the rows'; the first row's error: {failures[0][1]}; the known text's: {exc}") from exc
    errors.extend(failures)
    return vectors


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard(path: Path, ids: list[str], vectors: np.ndarray | list[np.ndarray], tokens: list[int],
                 facts: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(vectors, list):  # a multi-vector model's: a list of token vectors per row
        dim = int(facts["dimensions"])
        flat = np.concatenate(vectors).astype(np.float32) if vectors else np.empty((0, dim), np.float32)
        tokens_of = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), dim)
        offsets = np.cumsum([0] + [len(v) for v in vectors]).astype(np.int32)
        embedding = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), tokens_of)
    else:
        dim = vectors.shape[1]
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).reshape(-1), pa.float32()),
                                                      dim)
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
    image_field: str | None = None,
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
    inject faults). Raises CorpusError when OUTPUT holds another run, rows go missing, or
    rows fail for a cause that is not theirs (the model then fails a known text too);
    running out of memory stops the run with ModelRunError. A rerun resumes either.
    """
    _need_pyarrow()
    started = time.monotonic()
    source = load_bundle(bundle)
    multivector = source.manifest.task == "multivector"
    if source.manifest.task != "embed" and not multivector:
        raise wrong_task(source.manifest.model_id, source.manifest.task, "embed")
    if image_field is not None and "image" not in source.manifest.modalities:
        raise InvalidInputError(f"{source.manifest.model_id} reads text only: image_field needs a bundle that reads "
                                "images")
    if multivector and dimensions is not None:
        raise InvalidInputError(f"{source.manifest.model_id} is a multi-vector model: its token vectors have one "
                                "width, so dimensions does not apply")
    chosen = planned_precision(source.manifest, precision)
    variant = source.variant(chosen)
    width = source.manifest.check_dimensions(dimensions)
    job = _Job(output=str(Path(output).resolve()), text_field=text_field, id_field=id_field,
               dimensions=dimensions, truncate=truncate, model_id=source.manifest.model_id,
               precision=chosen, sha256=variant.sha256, image_field=image_field, multivector=multivector)
    shards = input_shards(input)
    units = plan_units(shards, rows_per_shard)
    # (Keys a run of a text embedder leaves out, so that runs recorded before them still resume.)
    extra = {**({"multivector": True} if multivector else {}), **({"image_field": image_field} if image_field else {})}
    run = {"model_id": job.model_id, "precision": chosen, "sha256": variant.sha256, "dimensions": width, **extra,
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
        with load(source, precision=chosen, threads=threads) as provider:
            for span in plan_spans(pending):
                for result in run_span(provider, span, job, before_unit):
                    done[result["name"]] = result
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


def check_same_bundle(corpus: str | Path, provider: ModelRunner, dimensions: int | None = None) -> None:
    """Refuse (CorpusError) to query a corpus whose vectors another model file, precision
    or width made than the ones `provider` (a loaded provider) queries with."""
    record = Path(corpus) / RUN_FILE
    if not record.exists():
        raise CorpusError(f"{corpus} has no {RUN_FILE}: it is no edge-embed corpus")
    run = json.loads(record.read_text())
    if not run.get("complete"):
        raise CorpusError(f"the corpus in {corpus} is incomplete: run embed-corpus again to finish it")
    info = provider.info
    mine = {"model_id": info.model_id, "precision": info.precision, "sha256": info.sha256,
            "dimensions": info.check_dimensions(dimensions)}
    differs = [f"{k} {run.get(k)!r} (corpus) vs {v!r} (here)" for k, v in mine.items() if run.get(k) != v]
    if differs:
        raise CorpusError(f"the corpus in {corpus} does not match these queries: " + "; ".join(differs))


# -- Ray -------------------------------------------------------------------------------------


def _run_on_ray(source, pending: list[Unit], job: _Job, address, actors, cpus_per_actor, ship_bundle,
                before_unit) -> Iterator[dict]:
    """The pending units through a Ray Data actor pool: each actor loads the bundle once,
    checks its sha256, then reads, embeds and writes whole spans of units."""
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
    spans = plan_spans(pending, at_least=size)
    size = min(size, len(spans))
    shipped = ray.put(_bundle_files(source, job.precision)) if ship_bundle else None
    items = [{"units": json.dumps([dataclasses.asdict(u) for u in span])} for span in spans]
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
    others = {name for variant in source.manifest.variants.values() for name in variant.files}
    others -= set(source.manifest.variants[precision].files)
    return {p.name: p.read_bytes() for p in sorted(source.path.iterdir()) if p.is_file() and p.name not in others}


class _UnitWorker:
    """A Ray actor: one provider for its life, whole spans of units per call."""

    def __init__(self, bundle_path: str, shipped: Any, job: _Job, threads: int, before_unit):
        import tempfile

        if shipped is not None:  # the bundle's files, through the object store
            import ray

            self._dir = tempfile.TemporaryDirectory(prefix="edge-embed-bundle-")
            for name, data in ray.get(shipped).items():
                (Path(self._dir.name) / name).write_bytes(data)
            bundle_path = self._dir.name
        self.provider: ModelRunner = load(bundle_path, precision=job.precision, threads=threads)
        info = self.provider.info
        if info.sha256 != job.sha256 or info.model_id != job.model_id:
            raise CorpusError(f"the bundle at {bundle_path} on this worker is not the run's: sha256 "
                              f"{(info.sha256 or '?')[:12]}... vs {job.sha256[:12]}...")
        self.job = job
        self.before_unit = before_unit

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for units in batch["units"]:
            span = [Unit(**fields) for fields in json.loads(str(units))]
            results += run_span(self.provider, span, self.job, self.before_unit)
        return {k: np.array([r[k] for r in results]) for k in ("name", "rows_in", "rows_out", "errors")}


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
