"""embed-corpus: units that cover every row once, bad rows in the errors file, resumption
after a crash, and the same vectors in process, on Ray and from `provider.embed`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_embed.corpus import ERRORS_FILE, RUN_FILE, _Job, _start_run, input_shards, plan_spans, plan_units, read_span
from edge_embed.errors import CorpusError, InvalidInputError, ModelRunError

pa = pytest.importorskip("pyarrow", reason="embed-corpus needs pyarrow (the corpus extra)")
pq = pytest.importorskip("pyarrow.parquet")

JOB = _Job(output="unused", text_field="text", id_field="id", dimensions=None, truncate=True,
           model_id="m", precision="int8", sha256="0" * 64)


def passages(n: int, start: int = 0) -> list[str]:
    from edge_embed.export.probes import PROBE_CATEGORIES

    words = " ".join(PROBE_CATEGORIES["passage"]).split()
    return [" ".join(words[(7 * i) % 400 : (7 * i) % 400 + 5 + i % 40]) for i in range(start, start + n)]


def write_jsonl(path: Path, rows: list, blank_lines: bool = True) -> None:
    with open(path, "w") as f:
        if blank_lines:
            f.write("\n\n")
        for i, row in enumerate(rows):
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
            if blank_lines and i % 4 == 1:
                f.write("   \n")


def make_corpus(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """A JSONL and a Parquet shard with good rows and bad ones; (ids, texts) of the good
    rows in order, and the ids (or positions) of the bad ones."""
    folder.mkdir()
    texts = passages(45)
    rows = [{"id": f"j{i}", "text": t} for i, t in enumerate(texts[:30])]
    rows[5:5] = ["{not json", {"id": "empty", "text": "  "}, {"text": "no id"}, {"id": "num", "text": 7}, [1, 2]]
    write_jsonl(folder / "a.jsonl", rows)
    ids = [f"j{i}" for i in range(30)] + [f"p{i}" for i in range(15)]
    pq.write_table(pa.table({"id": ids[30:] + ["pnull"], "text": texts[30:] + [None]}), folder / "b.parquet",
                   row_group_size=4)
    bad = ["a.jsonl:row 5", "empty", "a.jsonl:row 7", "num", "a.jsonl:row 9", "pnull"]
    return ids, texts, bad


def read_output(folder: Path) -> tuple[list[str], np.ndarray, list[int]]:
    ids, vectors, tokens = [], [], []
    for shard in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(shard)
        ids += table["id"].to_pylist()
        tokens += table["tokens"].to_pylist()
        dim = table.schema.field("embedding").type.list_size
        vectors.append(np.asarray(table["embedding"].combine_chunks().flatten()).reshape(len(table), dim))
    return ids, np.vstack(vectors), tokens


# -- planning and reading, no model -------------------------------------------------------


def test_units_cover_every_row_once_in_order(tmp_path):
    ids, texts, bad = make_corpus(tmp_path / "in")
    shards = input_shards(tmp_path / "in")
    assert [p.name for p in shards] == ["a.jsonl", "b.parquet"]
    for rows_per_shard in (1, 3, 4, 7, 1000):
        units = plan_units(shards, rows_per_shard)
        assert all(0 < u.rows <= rows_per_shard for u in units)
        assert len({u.name for u in units}) == len(units)
        for spans in (plan_spans(units), plan_spans(units, at_least=len(units)), [[u] for u in units]):
            got, errors, seen = [], [], []
            for span in spans:
                for unit, rows in read_span(span, JOB):
                    seen.append(unit)
                    got += list(zip(rows.ids, rows.texts))
                    errors += rows.errors
            assert seen == units
            assert got == list(zip(ids, texts)), rows_per_shard
            assert [e[0] for e in errors] == bad
    reasons = dict(errors)
    assert "not a JSON object" in reasons["a.jsonl:row 5"] and reasons["empty"] == "'text' is empty"
    assert reasons["a.jsonl:row 7"] == "no 'id' field" and "is a int, not a string" in reasons["num"]
    assert reasons["pnull"] == "'text' is missing"


def test_bad_inputs_and_foreign_output_folders_are_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        input_shards(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="neither JSONL"):
        input_shards(tmp_path / "notes.txt")
    with pytest.raises(InvalidInputError, match="holds no .jsonl"):
        input_shards(tmp_path)
    run = {"model_id": "m", "sha256": "a", "rows": 3}
    _start_run(tmp_path / "out", run)
    _start_run(tmp_path / "out", run)  # the same run resumes
    with pytest.raises(CorpusError, match="different sha256"):
        _start_run(tmp_path / "out", {**run, "sha256": "b"})
    with pytest.raises(CorpusError, match="not empty"):
        _start_run(tmp_path, run)


@pytest.fixture
def parquet_rows_read(monkeypatch) -> list[int]:
    """[rows that every ParquetFile read in this process returned], tables and streamed batches alike."""
    count = [0]
    for name in ("read", "read_row_group", "read_row_groups"):
        def counted(self, *args, _read=getattr(pq.ParquetFile, name), **kwargs):
            table = _read(self, *args, **kwargs)
            count[0] += table.num_rows
            return table

        monkeypatch.setattr(pq.ParquetFile, name, counted)
    iter_batches = pq.ParquetFile.iter_batches

    def streamed(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            count[0] += batch.num_rows
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", streamed)
    return count


def one_row_group(path: Path, n: int) -> tuple[list[str], list[str]]:
    """A Parquet file of `n` rows as pyarrow writes it by default: one row group."""
    ids, texts = [f"r{i}" for i in range(n)], passages(n)
    pq.write_table(pa.table({"id": ids, "text": texts}), path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    return ids, texts


def test_a_parquet_shard_of_one_row_group_is_decoded_once_not_once_per_unit(tmp_path, parquet_rows_read):
    n = 3000
    ids, _ = one_row_group(tmp_path / "one.parquet", n)
    units = plan_units([tmp_path / "one.parquet"], 100)  # 30 units in one row group

    def read(spans) -> list[str]:
        parquet_rows_read[0] = 0
        return [i for span in spans for _, rows in read_span(span, JOB) for i in rows.ids]

    assert read(plan_spans(units)) == ids
    assert parquet_rows_read[0] == n  # was 30 x n: each unit decoded the whole row group
    pending = [u for k, u in enumerate(units) if k % 3]  # a rerun after every third unit was written
    assert read(plan_spans(pending)) == [i for u in pending for i in ids[u.start:u.start + u.rows]]
    assert parquet_rows_read[0] <= n
    spans = plan_spans(units, at_least=4)  # four Ray actors: each decodes the group up to its end
    assert len(spans) == 4 and [u for span in spans for u in span] == units
    assert read(spans) == ids and parquet_rows_read[0] <= (4 + 1) / 2 * n


def test_ray_without_the_extra_names_it(monkeypatch):
    from edge_embed.corpus import Unit, _run_on_ray
    from edge_embed.errors import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(BackendUnavailableError, match=r"pip install 'edge-embed\[ray\]'"):
        list(_run_on_ray(None, [Unit("a.jsonl", 0, 0, 0, 0, 1)], JOB, "local", None, 1, False, None))


# -- the real model, in process -----------------------------------------------------------


@pytest.mark.slow
def test_in_process_run_equals_provider_embed_and_lists_bad_rows(minilm_bundle, tmp_path):
    import edge_embed

    ids, texts, bad = make_corpus(tmp_path / "in")
    long_text = "word " * 400  # past MiniLM's 256 tokens
    write_jsonl(tmp_path / "in" / "c.jsonl", [{"id": "long", "text": long_text}, {"id": "fine", "text": "short"}])
    report = edge_embed.embed_corpus(minilm_bundle, tmp_path / "in", tmp_path / "out", precision="int8",
                                     truncate=False, rows_per_shard=8, threads=2, progress=False)
    assert (report.rows_in, report.rows_out, report.errors) == (53, 46, 7)
    out_ids, vectors, tokens = read_output(tmp_path / "out")
    assert out_ids == ids + ["fine"]
    schema = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet")))
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[384]"
    assert str(schema.field("id").type) == "string" and str(schema.field("tokens").type) == "int32"
    with edge_embed.load(minilm_bundle, precision="int8", threads=2) as provider:
        expected = provider.embed(texts + ["short"])
        assert tokens == provider.count_tokens(texts + ["short"])
        edge_embed.check_same_bundle(tmp_path / "out", provider)
    np.testing.assert_allclose(vectors, expected, atol=2e-6)
    errors = [json.loads(line) for line in (tmp_path / "out" / ERRORS_FILE).read_text().splitlines()]
    assert [e["id"] for e in errors] == bad + ["long"]
    assert "longer than" in errors[-1]["reason"]
    run = json.loads((tmp_path / "out" / RUN_FILE).read_text())
    assert run["complete"] and run["precision"] == "int8" and run["model_id"] == provider.manifest.model_id
    assert run["sha256"] == provider.bundle.variant("int8").sha256
    with edge_embed.load(minilm_bundle, precision="fp32", threads=2, parity_probes=0) as other:
        with pytest.raises(CorpusError, match="precision 'int8' \\(corpus\\) vs 'fp32'"):
            edge_embed.check_same_bundle(tmp_path / "out", other)


@pytest.mark.slow
def test_a_crash_halfway_then_a_rerun_gives_every_row_once(minilm_bundle, tmp_path):
    import edge_embed

    ids, _, _ = make_corpus(tmp_path / "in")

    def crash_on_third(unit):
        if unit.name == "part-00000-00002":
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        edge_embed.embed_corpus(minilm_bundle, tmp_path / "in", tmp_path / "out", precision="int8",
                                rows_per_shard=8, threads=2, progress=False, before_unit=crash_on_third)
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet")) == [
        "part-00000-00000.parquet", "part-00000-00001.parquet"]
    assert not (tmp_path / "out" / ERRORS_FILE).exists()
    with edge_embed.load(minilm_bundle, precision="int8", threads=2, parity_probes=0) as provider:
        with pytest.raises(CorpusError, match="incomplete"):
            edge_embed.check_same_bundle(tmp_path / "out", provider)
    (tmp_path / "out" / "part-00000-00003.parquet").write_bytes(b"half a file")  # a torn write is redone
    report = edge_embed.embed_corpus(minilm_bundle, tmp_path / "in", tmp_path / "out", precision="int8",
                                     rows_per_shard=8, threads=2, progress=False)
    assert report.units_skipped == 2 and report.rows_out + report.errors == report.rows_in == 51
    out_ids, _, _ = read_output(tmp_path / "out")
    assert out_ids == ids


@pytest.mark.slow
def test_cli_embeds_a_corpus_and_says_what_it_did(minilm_bundle, tmp_path):
    make_corpus(tmp_path / "in")
    cli = [sys.executable, "-m", "edge_embed.cli", "embed-corpus", str(tmp_path / "in"), str(tmp_path / "out"),
           "--bundle", str(minilm_bundle), "--precision", "int8", "--rows-per-shard", "20"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 0, done.stderr
    assert "45 of 51 rows embedded into 3 shards" in done.stdout and "6 errors" in done.stdout
    assert "embed-corpus: 51/51 rows (100%)" in done.stderr
    refused = subprocess.run(cli[:-2] + ["--actors", "2"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip() == "edge-embed: error: --actors, --cpus-per-actor and --ship-bundle need --ray"


@pytest.mark.slow
def test_one_row_group_is_read_once_per_run_and_resumes(minilm_bundle, tmp_path, parquet_rows_read):
    import edge_embed

    n = 240
    ids, texts = one_row_group(tmp_path / "one.parquet", n)

    def crash_on_eighth(unit):
        if unit.name == "part-00000-00007":
            raise RuntimeError("worker lost")

    run = dict(precision="int8", rows_per_shard=20, threads=2, progress=False)
    with pytest.raises(RuntimeError, match="worker lost"):
        edge_embed.embed_corpus(minilm_bundle, tmp_path / "one.parquet", tmp_path / "out", **run,
                                before_unit=crash_on_eighth)
    assert parquet_rows_read[0] <= n  # was 8 x n: each of the first 8 units decoded all 240 rows
    parquet_rows_read[0] = 0
    report = edge_embed.embed_corpus(minilm_bundle, tmp_path / "one.parquet", tmp_path / "out", **run)
    assert parquet_rows_read[0] <= n
    assert (report.units, report.units_skipped, report.rows_out, report.errors) == (12, 7, n, 0)
    out_ids, vectors, _ = read_output(tmp_path / "out")
    assert out_ids == ids
    with edge_embed.load(minilm_bundle, precision="int8", threads=2, parity_probes=0) as provider:
        np.testing.assert_allclose(vectors, provider.embed(texts), atol=2e-6)


def inject(monkeypatch, fault) -> None:
    """embed-corpus loads the real provider, then `fault(provider)` breaks part of it."""
    import edge_embed.corpus
    from edge_embed.loading import load as real

    def load(*args, **kwargs):
        provider = real(*args, **kwargs)
        fault(provider)
        return provider

    monkeypatch.setattr(edge_embed.corpus, "load", load)


def past_the_vocabulary(provider) -> None:
    """Rows holding the word "corrupt" get a token id past the vocabulary, so ONNX Runtime
    itself refuses them, every time, alone or in any batch."""
    tokenize = provider.tokenize

    def marked(texts, **kwargs):
        seqs = tokenize(texts, **kwargs)
        for text, seq in zip(texts, seqs):
            if "corrupt" in text.split():
                seq[1] = 10**7
        return seqs

    provider.tokenize = marked


@pytest.mark.slow
def test_rows_that_always_fail_are_errors_and_the_run_completes(minilm_bundle, tmp_path, monkeypatch):
    import edge_embed

    texts = passages(12)
    rows = [{"id": f"r{i}", "text": t + (" corrupt" if 4 <= i < 8 or i == 10 else "")} for i, t in enumerate(texts)]
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", rows, blank_lines=False)
    inject(monkeypatch, past_the_vocabulary)
    run = dict(precision="int8", rows_per_shard=4, threads=2, progress=False)
    report = edge_embed.embed_corpus(minilm_bundle, tmp_path / "in", tmp_path / "out", **run)
    assert (report.rows_in, report.rows_out, report.errors) == (12, 7, 5)
    assert pq.read_table(tmp_path / "out" / "part-00000-00001.parquet").num_rows == 0  # every row of it failed
    errors = [json.loads(line) for line in (tmp_path / "out" / ERRORS_FILE).read_text().splitlines()]
    assert [e["id"] for e in errors] == ["r4", "r5", "r6", "r7", "r10"]
    assert all("onnx backend failed on a batch of 1 x" in e["reason"] for e in errors)
    out_ids, vectors, _ = read_output(tmp_path / "out")
    assert out_ids == ["r0", "r1", "r2", "r3", "r8", "r9", "r11"]
    with edge_embed.load(minilm_bundle, precision="int8", threads=2, parity_probes=0) as provider:
        np.testing.assert_allclose(vectors, provider.embed([texts[i] for i in (0, 1, 2, 3, 8, 9, 11)]), atol=2e-6)
    again = edge_embed.embed_corpus(minilm_bundle, tmp_path / "in", tmp_path / "out", **run)
    assert again.units_skipped == 3 and (again.rows_out, again.errors) == (7, 5)


@pytest.mark.slow
def test_failures_that_are_not_the_rows_stop_the_run(minilm_bundle, tmp_path, monkeypatch):
    import edge_embed

    texts = passages(8)
    texts[5] = " ".join(passages(40)[20:24])  # one row far longer than the others
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)],
                blank_lines=False)
    run = dict(precision="int8", rows_per_shard=4, threads=2, progress=False)

    def lost_device(provider):
        def forward(seqs):
            raise RuntimeError("the device was lost")

        provider._forward = forward

    inject(monkeypatch, lost_device)
    with pytest.raises(CorpusError, match="then so did a known text, so the fault is not the rows'.*device was lost"):
        edge_embed.embed_corpus(minilm_bundle, tmp_path / "in", tmp_path / "lost", **run)
    assert not list((tmp_path / "lost").glob("part-*"))

    def short_of_memory(provider):
        forward = provider._forward

        def out_of_memory_when_long(seqs):
            if max(len(s) for s in seqs) > 60:
                raise MemoryError()
            return forward(seqs)

        provider._forward = out_of_memory_when_long

    inject(monkeypatch, short_of_memory)
    with pytest.raises(ModelRunError, match="ran out of memory on a batch of 1 x"):
        edge_embed.embed_corpus(minilm_bundle, tmp_path / "in", tmp_path / "memory", **run)
    assert [p.name for p in (tmp_path / "memory").glob("part-*")] == ["part-00000-00000.parquet"]


# -- Ray -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_ray_vectors_equal_in_process_ones_and_survive_a_worker_crash(minilm_bundle, tmp_path, local_ray):
    import edge_embed

    ids, _, _ = make_corpus(tmp_path / "in")
    edge_embed.embed_corpus(minilm_bundle, tmp_path / "in", tmp_path / "local", precision="int8",
                            rows_per_shard=8, threads=1, progress=False)

    def crash_on_fourth(unit):
        if unit.name == "part-00000-00003":
            raise RuntimeError("worker lost on a chosen shard")

    with pytest.raises(CorpusError, match="rerun does the rest. The cause: .*worker lost on a chosen shard"):
        edge_embed.embed_corpus(minilm_bundle, tmp_path / "in", tmp_path / "ray", precision="int8", rows_per_shard=8,
                                ray=True, actors=2, progress=False, before_unit=crash_on_fourth)
    assert not (tmp_path / "ray" / "part-00000-00003.parquet").exists()
    report = edge_embed.embed_corpus(minilm_bundle, tmp_path / "in", tmp_path / "ray", precision="int8",
                                     rows_per_shard=8, ray=True, actors=2, ship_bundle=True, progress=False)
    assert report.units_skipped >= 1 and report.rows_out == 45 and report.errors == 6
    local_ids, local_vectors, local_tokens = read_output(tmp_path / "local")
    ray_ids, ray_vectors, ray_tokens = read_output(tmp_path / "ray")
    assert ray_ids == local_ids == ids
    assert np.array_equal(ray_vectors, local_vectors) and ray_tokens == local_tokens
    assert (tmp_path / "ray" / ERRORS_FILE).read_bytes() == (tmp_path / "local" / ERRORS_FILE).read_bytes()
