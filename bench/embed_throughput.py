"""Embedding throughput and fidelity, side by side in one run.

Contenders on the same texts and threads: PyTorch eager (what a user runs today), plain
ONNX Runtime on optimum's kind of export with naive batches of 32, fastembed's pipeline on
that same graph (with the `bench` extra), and edge-embed FP32 / INT8.
Workloads: short queries (~14 tokens), passages (~130 tokens) and both mixed.
Prints a table and writes JSON (bench/results/embed_throughput.json by default).

    python bench/embed_throughput.py [--threads 2] [--repeat 3] [--qwen3-0.6b] [--graphs]

--graphs compares the graphs alone on identical fixed-shape token ids (MiniLM: the fused
bundle vs a plain TorchScript export at 32x16, 32x128, 8x256; Qwen3: a 4-layer model with
the 0.6B's layer shape vs torch eager at 1x16, 8x64, 4x256) and writes embed_graphs.json.

--qwen3-0.6b adds a Qwen3-Embedding-0.6B-shaped model (real config, random weights:
compute does not depend on values): export time and peak RSS (FP32 + INT8 + INT4), then
for torch eager and each precision the size, load time, serving RSS, P50 of one 20-token
query and tokens/s at 8x64, each in its own process. It needs ~8 GB of memory and many
minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def workloads() -> dict[str, list[str]]:
    """Deterministic texts built from the probe set: queries, passages, and the two mixed."""
    from edge_embed.export.probes import PROBE_CATEGORIES

    queries = [f"{q} {suffix}" for suffix in ("", "near me", "in 2024", "for beginners")
               for q in PROBE_CATEGORIES["query"]]
    words = " ".join(PROBE_CATEGORIES["passage"]).split()
    passages = [" ".join(words[i : i + 100]) for i in range(0, len(words) - 100, 23)][:160]
    mixed = [t for pair in zip(queries, passages) for t in pair] + queries[len(passages):]
    return {"queries": queries, "passages": passages, "mixed": mixed}


def timed_in_turns(fns: dict, texts: list[str], repeat: int) -> dict[str, tuple[float, np.ndarray]]:
    """Best seconds and the vectors of each contender; every round runs each contender
    once, so a noisy stretch of the shared machine hits all of them alike."""
    for fn in fns.values():
        fn(texts[:8])  # warm-up
    best: dict[str, tuple[float, np.ndarray]] = {}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            out = fn(texts)
            seconds = time.perf_counter() - start
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, out)
    return best


def naive_batches(n: int, size: int = 32) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def minilm_contenders(bundle: Path, threads: int, work: Path):
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    import edge_embed
    from conftest import minilm_source

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(minilm_source())
    model = AutoModel.from_pretrained(minilm_source()).eval()

    def pytorch(texts):
        out = []
        for idx in naive_batches(len(texts)):
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.inference_mode():
                hidden = model(**enc).last_hidden_state.numpy()
            out.append(mean_pool(hidden, enc["attention_mask"].numpy()))
        return np.vstack(out)

    plain_dir = work / "plain"
    plain_export(minilm_source(), plain_dir)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    plain = ort.InferenceSession(str(plain_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])

    def plain_ort(texts):
        out = []
        for idx in naive_batches(len(texts)):
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=256, return_tensors="np")
            hidden = plain.run(None, {n: enc[n].astype(np.int64) for n in ("input_ids", "attention_mask", "token_type_ids")})[0]
            out.append(mean_pool(hidden, enc["attention_mask"]))
        return np.vstack(out)

    fp32 = edge_embed.load(bundle, precision="fp32", threads=threads)
    int8 = edge_embed.load(bundle, precision="int8", threads=threads)
    lengths = lambda texts: [len(s) for s in fp32.tokenizer.encode(texts)]  # noqa: E731
    contenders = {
        "pytorch eager, batches of 32": (pytorch, "naive"),
        "onnxruntime plain export, batches of 32": (plain_ort, "naive"),
    }
    try:
        from fastembed import TextEmbedding
    except ImportError:
        print("fastembed is not installed (pip install -e '.[bench]'): its contender is left out", file=sys.stderr)
    else:
        # fastembed's own pipeline (tokenizer, batches of 256 padded to the longest) on the
        # optimum-style graph its hub copy of this model is, loaded from disk.
        fast = TextEmbedding(FASTEMBED_NAME, specific_model_path=str(plain_dir), threads=threads, local_files_only=True)
        contenders[FASTEMBED] = (lambda texts: np.stack(list(fast.embed(texts))), "fastembed")
    contenders["edge-embed fp32"] = (fp32.embed, fp32)
    contenders["edge-embed int8"] = (int8.embed, int8)
    return contenders, lengths


FASTEMBED = "fastembed, plain export"
FASTEMBED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
FASTEMBED_BATCH = 256  # TextEmbedding.embed's default batch size


def plain_export(source: Path, dest: Path) -> None:
    """The model as optimum exports it (TorchScript, eager attention, no offline fusion):
    dest/model.onnx with the tokenizer files beside it, the layout fastembed loads."""
    import shutil

    import torch
    from transformers import AutoModel

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "special_tokens_map.json"):
        shutil.copy(Path(source) / name, dest / name)
    model = AutoModel.from_pretrained(source, attn_implementation="eager").eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]

    class Plain(torch.nn.Module):  # last_hidden_state from inputs by name, as optimum's graph has them
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    sample = tuple(torch.ones((2, 8), dtype=torch.long) for _ in names)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(Plain().eval(), sample, str(dest / "model.onnx"), input_names=names,
                          output_names=["last_hidden_state"], opset_version=18, dynamo=False,
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})


def padded_share_of(plan, lengths: list[int]) -> float:
    from edge_embed.batching import padded_share, plan_batches

    if plan == "naive":
        return padded_share(lengths, naive_batches(len(lengths)))
    if plan == "fastembed":
        return padded_share(lengths, naive_batches(len(lengths), FASTEMBED_BATCH))
    limits = plan.limits
    return padded_share(lengths, plan_batches(lengths, limits.max_batch_tokens, limits.max_batch_size,
                                              stepped_rows=limits.stepped_rows))


def _minilm_bundle(args, work: Path) -> Path:
    """--bundle, or a fresh FP32 + INT8 export of the real MiniLM into `work`."""
    from conftest import MINILM_ID, minilm_source
    from edge_embed.export import export

    if args.bundle:
        return Path(args.bundle)
    export(minilm_source(), work / "minilm", "fp32,int8", model_id=MINILM_ID)
    return work / "minilm"


def _qwen3_06b_source(dest: Path, layers: int) -> int:
    """A model directory with Qwen3-Embedding-0.6B's real config (`layers` of its 28) and
    random weights: compute and memory do not depend on the values. Returns the FP32
    weight bytes."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from conftest import build_tiny_qwen3

    dest.mkdir()
    build_tiny_qwen3(dest)  # for its tokenizer files; the weights are replaced below
    config = Qwen3Config(vocab_size=151669, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                         max_position_embeddings=32768, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen3Model(config)
    model.save_pretrained(dest)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bench_minilm(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        contenders, lengths_of = minilm_contenders(_minilm_bundle(args, work), args.threads, work)
        for workload, texts in workloads().items():
            lengths = lengths_of(texts)
            timings = timed_in_turns({name: fn for name, (fn, _) in contenders.items()}, texts, args.repeat)
            reference = timings["pytorch eager, batches of 32"][1]
            for name, (_, plan) in contenders.items():
                seconds, vectors = timings[name]
                cos = np.sum(vectors * reference, axis=1)
                rows.append({
                    "model": "all-MiniLM-L6-v2", "workload": workload, "contender": name,
                    "texts": len(texts), "mean_tokens": round(float(np.mean(lengths)), 1),
                    "sentences_per_s": round(len(texts) / seconds, 1),
                    "real_tokens_per_s": round(sum(lengths) / seconds),
                    "padded_share": round(padded_share_of(plan, lengths), 3),
                    "cos_min_vs_pytorch": round(float(cos.min()), 5),
                    "cos_mean_vs_pytorch": round(float(cos.mean()), 5),
                })
    return rows


_EXPORT_CHILD = """
import os, sys, threading, time
from pathlib import Path
from edge_embed.export import Gates, export

def tree_rss():
    # This process and its children (the export's PyTorch stage runs in one), together.
    pids, total = [os.getpid()], 0
    while pids:
        pid = pids.pop()
        try:
            total += next(int(l.split()[1]) * 1024 for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS"))
            for task in os.listdir(f"/proc/{pid}/task"):
                pids += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except (OSError, StopIteration):
            pass
    return total

peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], tree_rss())
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
# Random weights: the gates would measure noise (weights no training shaped), so the first
# recipe ships; sizes, memory and speed do not depend on the values.
export(Path(sys.argv[1]), Path(sys.argv[2]), "fp32,int8,int4", model_id="qwen3-embedding-0.6b-shape",
       gates=Gates(int8_cos_mean=0, int8_cos_min=0, int4_cos_mean=0, int4_cos_min=0, batch_cos_min=0))
time.sleep(0.2)
print("RESULT", time.perf_counter() - start, peak[0])
"""

_SERVE_CHILD = """
import json, sys, time
import numpy as np
threads, kind = int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
query = rng.integers(1000, 100000, 20)
batch = [rng.integers(1000, 100000, 64) for _ in range(8)]
start = time.perf_counter()
if kind == "torch eager":
    import torch
    from transformers import AutoModel
    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    def run(seqs):
        ids = torch.from_numpy(np.stack(seqs))
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, -1]
else:
    import edge_embed
    provider = edge_embed.load(sys.argv[1], precision=kind, threads=threads)
    run = provider.run_batch
load_s = time.perf_counter() - start
run([query])
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
serving_rss = rss()
times = []
for _ in range(30):
    t = time.perf_counter(); run([query]); times.append(time.perf_counter() - t)
run(batch)
rounds = []
for _ in range(5):
    t = time.perf_counter(); run(batch); rounds.append(time.perf_counter() - t)
print("RESULT", json.dumps({"load_s": load_s, "serving_rss": serving_rss, "p50_ms": 1000 * float(np.median(times)),
                            "tok_s_8x64": 512 / float(np.median(rounds))}))
"""


def _child(code: str, *argv: str) -> str:
    import subprocess

    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return next(line for line in done.stdout.splitlines() if line.startswith("RESULT")).split(None, 1)[1]


def bench_qwen3_06b(args) -> list[dict]:
    """Qwen3-Embedding-0.6B at full size (28 layers, real config, random weights: compute
    and memory do not depend on the values), each step in its own process so its memory is
    its own: the export (FP32 + INT8 + INT4, time and peak RSS against the FP32 weight
    bytes), then per precision and for torch eager: bundle size, load time, serving RSS,
    P50 of one 20-token query and tokens/s at 8x64."""
    import edge_embed

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src, bundle = Path(tmp) / "src", Path(tmp) / "bundle"
        weight_bytes = _qwen3_06b_source(src, layers=28)
        export_s, export_peak = map(float, _child(_EXPORT_CHILD, str(src), str(bundle)).split())
        print(f"export: {export_s:.0f} s, peak RSS {export_peak / 1e9:.2f} GB = "
              f"{export_peak / weight_bytes:.2f}x the FP32 weights ({weight_bytes / 1e9:.2f} GB)")
        manifest = edge_embed.load_bundle(bundle).manifest
        for kind in () if args.export_only else ("torch eager", "fp32", "int8", "int4"):
            figures = json.loads(_child(_SERVE_CHILD, str(src if kind == "torch eager" else bundle),
                                        str(args.threads), kind))
            size = (sum(f.stat().st_size for f in src.glob("*.safetensors")) if kind == "torch eager"
                    else manifest.variants[kind].bytes)
            rows.append({
                "model": "qwen3-0.6b-shape", "contender": kind if kind == "torch eager" else f"edge-embed {kind}",
                "export_s": round(export_s), "export_peak_rss_gb": round(export_peak / 1e9, 2),
                "export_peak_vs_fp32_weights": round(export_peak / weight_bytes, 2),
                "size_mb": round(size / 1e6), "load_s": round(figures["load_s"], 2),
                "serving_rss_mb": round(figures["serving_rss"] / 1e6),
                "p50_20_token_query_ms": round(figures["p50_ms"], 1),
                "tokens_per_s_8x64": round(figures["tok_s_8x64"]),
            })
    return rows


def machine() -> dict:
    """The CPU and the ISA extensions ONNX Runtime's kernels choose between, for every figure."""
    info = {"python": platform.python_version(), "cpu": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split())
        info["isa"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    except (OSError, StopIteration):
        pass
    return info


def _interleaved(fns: dict, tokens: int, reps: int) -> dict[str, float]:
    """Tokens/s per contender: each run once to warm up, then `reps` rounds taking turns
    (so a noisy neighbour hits every contender alike); the median round counts."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: tokens / float(np.median(t)) for name, t in times.items()}


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(session, batch: int, width: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(1000, 20000, (batch, width)).astype(np.int64)
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
              "position_ids": np.tile(np.arange(width, dtype=np.int64), (batch, 1))}
    return {i.name: arrays[i.name] for i in session.get_inputs()}


def bench_graphs(args) -> list[dict]:
    """Identical fixed-shape token ids, the same threads, ORT_ENABLE_ALL: the graphs alone.

    MiniLM: edge-embed's fused FP32 and INT8 against a plain TorchScript export of the same
    model (optimum's exporter path, no offline fusion). Qwen3: a 4-layer model with the
    0.6B's layer shape and random weights, token ids fed directly, against torch eager.
    """
    import torch
    from transformers import AutoModel

    import edge_embed
    from conftest import minilm_source
    from edge_embed.export import export
    from edge_embed.export.quantize import quantize_int4, quantize_per_token_int8

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = _minilm_bundle(args, work)
        manifest = edge_embed.load_bundle(bundle).manifest
        plain_export(minilm_source(), work / "plain")
        sessions = {"plain TorchScript export (optimum's path)": _session(work / "plain" / "model.onnx", args.threads),
                    "edge-embed fp32 (fused)": _session(bundle / manifest.variants["fp32"].file, args.threads),
                    "edge-embed int8": _session(bundle / manifest.variants["int8"].file, args.threads)}
        for batch, width in ((32, 16), (32, 128), (8, 256)):
            fns = {name: (lambda s=s, f=_feeds(s, batch, width): s.run(None, f)) for name, s in sessions.items()}
            speed = _interleaved(fns, batch * width, args.repeat * 4)
            base = speed["plain TorchScript export (optimum's path)"]
            rows += [{"model": "all-MiniLM-L6-v2", "shape": f"{batch}x{width}", "contender": name,
                      "tokens_per_s": round(v), "vs_baseline": round(v / base, 2)} for name, v in speed.items()]
        del sessions

        src = work / "qwen3"
        _qwen3_06b_source(src, layers=4)
        export(src, work / "qwen3-bundle", "fp32", model_id="qwen3-4-layers")
        fp32 = work / "qwen3-bundle" / "model.fp32.onnx"
        quantize_per_token_int8(fp32, work / "int8.onnx")
        quantize_int4(fp32, work / "int4.onnx")
        eager = AutoModel.from_pretrained(src, dtype=torch.float32).eval()
        sessions = {"edge-embed fp32": _session(fp32, args.threads), "edge-embed int8": _session(work / "int8.onnx", args.threads),
                    "edge-embed int4": _session(work / "int4.onnx", args.threads)}
        for batch, width in ((1, 16), (8, 64), (4, 256)):
            feeds = {name: _feeds(s, batch, width) for name, s in sessions.items()}
            tensors = {k: torch.from_numpy(v) for k, v in feeds["edge-embed fp32"].items()}

            def torch_eager(t=tensors):
                with torch.inference_mode():
                    return eager(**t).last_hidden_state

            fns = {"torch eager": torch_eager,
                   **{name: (lambda s=s, f=feeds[name]: s.run(None, f)) for name, s in sessions.items()}}
            speed = _interleaved(fns, batch * width, args.repeat * 3)
            rows += [{"model": "qwen3-0.6b layer shape, 4 layers", "shape": f"{batch}x{width}", "contender": name,
                      "tokens_per_s": round(v), "vs_baseline": round(v / speed["torch eager"], 2)}
                     for name, v in speed.items()]
    return rows


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bundle", type=Path, help="reuse an exported MiniLM bundle (fp32+int8)")
    parser.add_argument("--qwen3-0.6b", dest="qwen3", action="store_true")
    parser.add_argument("--only-qwen3", action="store_true", help="skip the MiniLM contenders")
    parser.add_argument("--export-only", action="store_true", help="with --only-qwen3: the export figures alone")
    parser.add_argument("--graphs", action="store_true",
                        help="only the fixed-shape graph comparison (MiniLM vs a plain export, Qwen3 vs torch eager)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "embed_throughput.json")
    args = parser.parse_args()

    if args.graphs:
        rows = bench_graphs(args)
        print_table(rows)
        out = args.out.with_name("embed_graphs.json") if args.out.name == "embed_throughput.json" else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": {**machine(), "threads": args.threads}, "graphs": rows}, indent=2))
        print(f"wrote {out}")
        return
    rows = [] if args.only_qwen3 else bench_minilm(args)
    print_table(rows)
    summary = {}
    for workload in workloads() if rows else ():
        by = {r["contender"]: r["sentences_per_s"] for r in rows if r["workload"] == workload}
        summary[workload] = {
            "fp32_vs_plain_ort": round(by["edge-embed fp32"] / by["onnxruntime plain export, batches of 32"], 2),
            "int8_vs_fp32": round(by["edge-embed int8"] / by["edge-embed fp32"], 2),
            "fp32_vs_pytorch": round(by["edge-embed fp32"] / by["pytorch eager, batches of 32"], 2),
        }
        if FASTEMBED in by:
            summary[workload]["fp32_vs_fastembed"] = round(by["edge-embed fp32"] / by[FASTEMBED], 2)
            summary[workload]["int8_vs_fastembed"] = round(by["edge-embed int8"] / by[FASTEMBED], 2)
    print("ratios (sentences/s):", json.dumps(summary, indent=1))
    qwen_rows = bench_qwen3_06b(args) if args.qwen3 or args.only_qwen3 else []
    print_table(qwen_rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {**machine(), "threads": args.threads},
        "minilm": rows, "ratios": summary, "qwen3_0_6b": qwen_rows,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
