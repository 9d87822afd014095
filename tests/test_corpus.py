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

from edge_embed.corpus import ERRORS_FILE, RUN_FILE, _Job, _read_unit, _start_run, input_shards, plan_units
from edge_embed.errors import CorpusError, InvalidInputError

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
        vectors.append(np.asarray(table["embedding"].combine_chunks().flatten()).reshape(len(table), -1))
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
        got, errors = [], []
        for unit in units:
            unit_ids, unit_texts, unit_errors = _read_unit(unit, JOB)
            got += list(zip(unit_ids, unit_texts))
            errors += unit_errors
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
