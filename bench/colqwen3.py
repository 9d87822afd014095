"""ColQwen3 at Qwen3-VL-2B's shape on this CPU: `edge-embed bench` over its FP32, INT8 and INT4
variants, each in its own process (queries and pages: token matrices), side by side.

The model: Qwen3-VL-2B's whole vision tower (24 layers of 1024, DeepStack after 5, 11, 17),
`--layers` of the decoder's 28 layers at full width (2048; past 3 the FP32 decoder graph
passes protobuf's 2 GB and keeps its weights in a data file beside it), the 151,936-row
token embedding, and ColQwen's projection of every token to 320 dims; random weights (speed
and memory do not depend on the values), Qwen's real tokenizer. Exported by the real pipeline. INT8: the decoder per token; INT4: the decoder's
MatMuls weight-only 4-bit (W4A16's CPU form; activations in float); the vision tower stays
FP32 in both. Random weights leave a query's pages at nearly equal MaxSim, so the ranking
floors are set to 0 here, to measure speed and memory; the figures the export measured
(token cosine, MaxSim difference, Kendall tau, top-1) are printed beside them.

`--layers 28` is the whole model (its export takes about 12 minutes and 16 GB on 2 cores);
with a few layers the vision tower and the vocabulary table weigh as much as the decoder, so
INT4's share of FP32's memory is far above a whole model's: the script also states the ratio
the registry's rule gives at 28 layers.

    python bench/colqwen3.py [--layers 28] [--threads 2] [--steps 10] [--json bench/results/colqwen3.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

DIM = 320


def build_source(dest: Path, layers: int) -> Path:
    """The 2B-shaped Qwen3-VL (bench/image_embed.py's) plus a ColQwen head in its own file."""
    import torch
    from safetensors.torch import save_file

    from image_embed import build_vl_source

    head = dest / "embedding_proj_layer.safetensors"
    if head.is_file():
        return dest
    build_vl_source(dest, layers)
    generator = torch.Generator().manual_seed(7)
    save_file({"embedding_proj_layer.weight": torch.randn(DIM, 2048, generator=generator) * 0.02,
               "embedding_proj_layer.bias": torch.zeros(DIM)}, str(head), metadata={"format": "pt"})
    index = dest / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"].update({"embedding_proj_layer.weight": head.name, "embedding_proj_layer.bias": head.name})
        index.write_text(json.dumps(data))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28, help="decoder layers at full width (of 28)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--text-samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=16, help="pages (the golden probe images) per run")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "results" / "colqwen3-work")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "colqwen3.json")
    args = parser.parse_args()

    from edge_embed.bench import BenchSettings, bench_bundle, format_table
    from edge_embed.export import Gates, export
    from edge_embed.manifest import Manifest
    from edge_embed.registry import find_model, estimate

    source = build_source(args.work / f"colqwen3-2b-{args.layers}l-source", args.layers)
    bundle = args.work / f"colqwen3-2b-{args.layers}l-bundle"
    if not (bundle / "manifest.json").is_file():
        export(source, bundle, "fp32,int8,int4", model_id=f"colqwen3-2b-shape-{args.layers}l",
               gates=Gates(rank_kendall_tau_mean=0.0, rank_top1_agreement=0.0))
    manifest = Manifest.read(bundle / "manifest.json")
    settings = BenchSettings(warmup=args.warmup, steps=args.steps, text_samples=args.text_samples,
                             batch_size=args.batch_size, images=args.images, threads=args.threads)
    report = bench_bundle(bundle, ["fp32", "int8", "int4"], settings, progress=lambda line: print(line, flush=True))
    print(format_table(report))
    rows = {r["variant"]: r for r in report["rows"]}
    fp32 = rows["fp32"]
    summary = {}
    for precision, row in rows.items():
        if "error" in row:
            continue
        speed = {w["kind"]: w["items_per_s"] / next(f["items_per_s"] for f in fp32["workloads"] if f["kind"] == w["kind"])
                 for w in row["workloads"]}
        parity = manifest.variants[precision].parity
        summary[precision] = {
            "peak_rss_vs_fp32": round(row["peak_rss_bytes"] / fp32["peak_rss_bytes"], 3),
            "speed_vs_fp32": {k: round(v, 3) for k, v in speed.items()},
            "bytes": manifest.variants[precision].bytes,
            "token_cos_min": parity.cos_min, "maxsim_rel_diff_max": parity.maxsim_rel_diff_max,
            "kendall_tau_mean": parity.kendall_tau_mean, "top1_agreement": parity.top1_agreement,
        }
    spec = find_model("qwen3-vl-embedding-2b")
    whole = {p: estimate(spec, p).memory for p in ("fp32", "int8", "int4")}
    report["summary"] = summary
    report["registry_at_28_layers"] = {p: round(whole[p] / whole["fp32"], 3) for p in whole}
    report["model"] = {"decoder_layers": args.layers, "of": 28, "weights": "random", "dim": DIM}
    print(f"\ncolqwen3 at qwen3-vl-2b's shape ({args.layers} of 28 decoder layers, full vision tower, random "
          f"weights); {report['device']['cpu']}, {report['device']['cpus']} cpus, ISA {' '.join(report['device']['isa'])}")
    print(f"{'variant':<8}{'RSS x fp32':>12}{'queries x':>11}{'pages x':>10}{'MB':>9}{'tok cos min':>13}"
          f"{'MaxSim rel':>12}{'tau':>7}{'top-1':>7}")
    for precision, s in summary.items():
        print(f"{precision:<8}{s['peak_rss_vs_fp32']:>12.3f}{s['speed_vs_fp32'].get('queries', 0):>11.2f}"
              f"{s['speed_vs_fp32'].get('pages', 0):>10.2f}{s['bytes'] / 1e6:>9.0f}{s['token_cos_min']:>13.5f}"
              f"{s['maxsim_rel_diff_max']:>12.2e}{s['kendall_tau_mean']:>7.3f}{s['top1_agreement']:>7.3f}")
    print(f"registry rule at 28 layers (whole model): int8 {report['registry_at_28_layers']['int8']:.2f}x, "
          f"int4 {report['registry_at_28_layers']['int4']:.2f}x fp32's memory")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
