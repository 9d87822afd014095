"""Bulk corpus embedding: in process against Ray Data with 1 and 2 actors, in one run.

A corpus of passages (deterministic, from the probe texts; 20,000 by default) in JSONL
shards, embedded with all-MiniLM-L6-v2 INT8 by `embed_corpus` into Parquet shards:

- in process, with all the machine's threads;
- on a local Ray instance: 1 actor x 1 CPU, 2 actors x 1 CPU, 1 actor x 2 CPUs;
- Ray's fixed costs: `ray.init` and the wall time of a one-row corpus (actor start, the
  bundle load with its boot parity check, one unit written).

Every Ray run's vectors are compared with the in-process ones (they must be equal).
Prints a table and writes JSON (bench/results/bulk_embed.json by default).

    python bench/bulk_embed.py [--rows 20000] [--bundle B]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from embed_throughput import _minilm_bundle, machine, print_table  # noqa: E402


def write_corpus(folder: Path, rows: int, shards: int = 4) -> None:
    """`rows` passages of 20-60 words in `shards` JSONL files."""
    from edge_embed.export.probes import PROBE_CATEGORIES

    words = " ".join(PROBE_CATEGORIES["passage"]).split()
    folder.mkdir()
    per = -(-rows // shards)
    for s in range(shards):
        with open(folder / f"shard-{s:02d}.jsonl", "w") as f:
            for i in range(s * per, min(rows, (s + 1) * per)):
                start, length = (13 * i) % (len(words) - 60), 20 + (7 * i) % 41
                f.write(json.dumps({"id": f"doc-{i}", "text": " ".join(words[start : start + length])}) + "\n")


def vectors_of(folder: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    parts = [pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))]
    return np.vstack([np.asarray(t["embedding"].combine_chunks().flatten()).reshape(len(t), -1) for t in parts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rows-per-shard", type=int, default=1_000)
    parser.add_argument("--bundle", type=Path, help="reuse an exported MiniLM bundle (fp32+int8)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bulk_embed.json")
    args = parser.parse_args()

    import ray

    from edge_embed import embed_corpus
    from edge_embed.platform import usable_cpu_count

    cpus = usable_cpu_count()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = _minilm_bundle(args, work)
        write_corpus(work / "corpus", args.rows)
        write_corpus(work / "one-row", 1, shards=1)

        def timed_run(name: str, out: str, **options) -> float:
            start = time.perf_counter()
            report = embed_corpus(bundle, work / ("one-row" if out.startswith("fixed") else "corpus"), work / out,
                                  precision="int8", rows_per_shard=args.rows_per_shard, progress=False, **options)
            seconds = time.perf_counter() - start
            rows.append({"contender": name, "rows": report.rows_in, "seconds": round(seconds, 2),
                         "rows_per_s": round(report.rows_in / seconds, 1)})
            return seconds

        timed_run(f"in process, {cpus} threads", "local", threads=cpus)
        reference = vectors_of(work / "local")
        start = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        init_s = time.perf_counter() - start
        fixed_s = timed_run("ray, fixed cost: a one-row corpus, 1 actor", "fixed", ray=True, actors=1)
        for actors, per_actor in ((1, 1), (2, 1), (1, 2)):
            if actors * per_actor > cpus:
                continue
            out = f"ray-{actors}x{per_actor}"
            timed_run(f"ray, {actors} actor(s) x {per_actor} CPU", out, ray=True, actors=actors,
                      cpus_per_actor=per_actor)
            if not np.array_equal(vectors_of(work / out), reference):
                raise SystemExit(f"{out}: vectors differ from the in-process run")
        ray.shutdown()

    base = rows[0]["rows_per_s"]
    for r in rows[1:]:
        if r["rows"] == args.rows:
            r["vs_in_process"] = round(r["rows_per_s"] / base, 2)
    print_table(rows)
    print(f"ray.init: {init_s:.1f} s; a one-row corpus on Ray: {fixed_s:.1f} s (actor start, bundle load and "
          "boot parity, one unit)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {**machine(), "cpus": cpus}, "rows": args.rows,
                                    "ray_init_s": round(init_s, 2), "ray_one_row_s": round(fixed_s, 2),
                                    "runs": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
