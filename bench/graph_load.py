"""What loading one ONNX graph costs in memory: each graph of a bundle alone in a fresh
process, peak RSS (VmHWM) once ONNX Runtime's session is built, side by side with
- the same graph written inline (one protobuf; only where it fits protobuf's 2 GB), for
  graphs the bundle stores with a data file: mapped against parsed;
- each FP32 vision graph converted to FP16 (edge-embed's converter), stored the same way:
  what 16 bits cost on this CPU.

Backs the load figures in docs/export.md and docs/images.md. The default bundle is the one
`python bench/colqwen3.py` exports (ColQwen3 at Qwen3-VL-2B's shape, 28 decoder layers).

    python bench/graph_load.py [--bundle DIR] [--threads 2] [--json bench/results/graph_load.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_CHILD = r"""
import sys
import onnxruntime as ort

options = ort.SessionOptions()
options.intra_op_num_threads = int(sys.argv[2])
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) * 1024)
"""
_PROTOBUF_LIMIT = 2 * 1024**3


def _peak(graph: Path, threads: int) -> int:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(graph), str(threads)], capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"loading {graph.name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return int(done.stdout)


def _size(graph: Path) -> int:
    from edge_embed.export.onnx_files import data_files

    return sum((graph.parent / name).stat().st_size for name in (graph.name, *data_files(graph)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path,
                        default=REPO / "bench" / "results" / "colqwen3-work" / "colqwen3-2b-28l-bundle")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "graph_load.json")
    args = parser.parse_args()

    import onnx

    from edge_embed.bench import device_facts
    from edge_embed.export.onnx_files import data_files
    from edge_embed.export.quantize import to_fp16
    from edge_embed.manifest import Manifest

    manifest = Manifest.read(args.bundle / "manifest.json")
    graphs = {v.file: None for v in manifest.variants.values()}
    graphs.update({v.vision.file: v.vision.precision for v in manifest.variants.values() if v.vision is not None})
    rows = []
    with tempfile.TemporaryDirectory(prefix="graph-load-", dir=args.bundle.parent) as scratch:
        for name, vision_precision in graphs.items():
            graph = args.bundle / name
            stored = "data file" if data_files(graph) else "inline"
            row = {"graph": name, "bytes": _size(graph), "stored": stored,
                   "peak_rss_bytes": _peak(graph, args.threads)}
            print(f"{name}: {row['bytes'] / 1e9:.2f} GB ({stored}) loads at {row['peak_rss_bytes'] / 1e9:.2f} GB",
                  flush=True)
            if stored == "data file" and row["bytes"] < _PROTOBUF_LIMIT:
                inline = Path(scratch) / name
                onnx.save(onnx.load(str(graph)), str(inline))
                row["inline_peak_rss_bytes"] = _peak(inline, args.threads)
                inline.unlink()
                print(f"  written inline: loads at {row['inline_peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
            if vision_precision == "fp32":
                half = Path(scratch) / name.replace("fp32", "fp16-converted")
                to_fp16(graph, half)
                row["fp16_bytes"] = _size(half)
                row["fp16_peak_rss_bytes"] = _peak(half, args.threads)
                print(f"  converted to FP16: {row['fp16_bytes'] / 1e9:.2f} GB, loads at "
                      f"{row['fp16_peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
            rows.append(row)
    facts = device_facts()
    print(f"\n{manifest.model_id}; {facts['cpu']}, {facts['cpus']} cpus, ISA {' '.join(facts['isa'])}, "
          f"{args.threads} threads")
    print(f"{'graph':<22}{'GB':>7}{'stored':>11}{'loaded GB':>11}{'inline GB':>11}{'fp16 GB':>9}")
    for row in rows:
        def gb(key: str) -> str:
            return f"{row[key] / 1e9:.2f}" if key in row else "-"

        print(f"{row['graph']:<22}{gb('bytes'):>7}{row['stored']:>11}{gb('peak_rss_bytes'):>11}"
              f"{gb('inline_peak_rss_bytes'):>11}{gb('fp16_peak_rss_bytes'):>9}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"bundle": str(args.bundle), "device": facts, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
