"""INT8 recipes side by side in one run: speed one at a time and in batches, and whether a
text's vector depends on its batch neighbours.

From a bundle's FP32 graph this builds, in a temporary folder, ONNX Runtime's dynamic
per-tensor INT8 (one activation scale per batch tensor: the old default) and weight-only
MatMulNBits 8-bit, and compares them with the bundle's FP32 and INT8 variants (the
per-token recipe the pipeline ships) and its INT4 variant where it has one. Columns, in
tokens/s: queries one at a time, queries in batches of 32, passages in batches of 8;
then the worst cosine between a text
alone and in a batch of 32 mixed lengths, and the cosine to the PyTorch reference (the
bundle's golden vectors). Names the CPU and its int8 ISA. Prints a table, writes JSON.

    python bench/int8_batching.py --bundle PATH [--threads 2] [--seconds 2.5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def cpu() -> dict:
    flags: set[str] = set()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx512_vnni", "avx_vnni", "avx512bw", "avx2", "asimddp", "i8mm", "sve") if f in flags]
    return {"cpu": name, "int8_isa": isa, "machine": platform.machine()}


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle with fp32 and int8 variants")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.5, help="seconds per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8_batching.json")
    args = parser.parse_args()

    import onnxruntime as ort

    from edge_embed.bundle import load_bundle
    from edge_embed.export.probes import PROBE_CATEGORIES
    from edge_embed.export.quantize import quantize_dynamic_int8, quantize_weight_only_int8
    from edge_embed.parity import alone_vs_batch_cos, batch_probe_indices
    from edge_embed.tokenization import BundleTokenizer, model_inputs

    bundle = load_bundle(args.bundle)
    manifest = bundle.manifest
    tokenizer = BundleTokenizer(bundle.tokenizer_path, manifest)
    queries = tokenizer.encode(list(PROBE_CATEGORIES["query"]))
    golden_texts, reference = bundle.golden()
    golden = tokenizer.encode(golden_texts)
    passages = sorted(golden, key=len)[-64:]
    work = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    fp32 = args.bundle / manifest.variants["fp32"].file
    per_tensor, nbits = work / "per-tensor.onnx", work / "nbits8.onnx"
    quantize_dynamic_int8(fp32, per_tensor, per_channel=True, reduce_range=False)
    quantize_weight_only_int8(fp32, nbits)
    contenders = {
        "FP32": fp32,
        "INT8 per-token (default)": args.bundle / manifest.variants["int8"].file,
        "INT8 dynamic per-tensor (old default)": per_tensor,
        "MatMulNBits 8-bit weight-only": nbits,
    }
    if "int4" in manifest.variants:
        contenders["INT4 MatMulNBits (shipped int4)"] = args.bundle / manifest.variants["int4"].file

    def session(path: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(s, seqs):
        return s.run([manifest.graph_output], model_inputs(seqs, manifest))[0]

    def tokens_per_s(s, batches) -> float:
        n = tokens = 0
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            batch = batches[n % len(batches)]
            run(s, batch)
            tokens += sum(len(x) for x in batch)
            n += 1
        return tokens / (time.perf_counter() - start)

    one = [[q] for q in queries]
    q32 = [queries[i:i + 32] for i in range(0, max(1, len(queries) - 31), 32)]
    p8 = [passages[i:i + 8] for i in range(0, len(passages), 8)]
    sessions = {name: session(path) for name, path in contenders.items()}
    speeds: dict[str, list] = {name: [] for name in contenders}
    for _ in range(args.repeat):  # interleaved rounds: a noisy neighbour hits every contender alike
        for name, s in sessions.items():
            speeds[name].append((tokens_per_s(s, one), tokens_per_s(s, q32), tokens_per_s(s, p8)))
    picked = [golden[i] for i in batch_probe_indices([len(x) for x in golden])]
    rows = []
    for name, s in sessions.items():
        median = np.median(np.array(speeds[name]), axis=0)
        alone = np.vstack([run(s, [x]) for x in picked])
        each = np.vstack([run(s, [x]) for x in golden])
        cos = np.sum(unit(each) * unit(reference), axis=1)
        rows.append({
            "variant": name, "one_at_a_time": round(float(median[0])), "queries_x32": round(float(median[1])),
            "passages_x8": round(float(median[2])),
            "alone_vs_batch_cos_min": alone_vs_batch_cos(alone, run(s, picked)),
            "cos_to_pytorch_mean": round(float(cos.mean()), 4), "cos_to_pytorch_min": round(float(cos.min()), 4),
            "file_mb": round(contenders[name].stat().st_size / 1e6, 1),
        })
    base = rows[0]
    for row in rows:
        row["ratio_vs_fp32"] = "/".join(f"{row[k] / base[k]:.2f}" for k in ("one_at_a_time", "queries_x32",
                                                                             "passages_x8"))
    machine = cpu()
    print(f"{manifest.model_id}, {args.threads} threads, tokens/s, median of {args.repeat} interleaved rounds; "
          f"{machine['cpu']} ({', '.join(machine['int8_isa']) or 'no int8 dot-product ISA flags'})")
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for row in rows:
        print("  ".join(str(row[k]).ljust(w) for k, w in zip(keys, widths)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "threads": args.threads, "model": manifest.model_id,
                                    "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
