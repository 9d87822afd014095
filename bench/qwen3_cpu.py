"""Qwen3-Embedding on a CPU against the runtimes users would pick instead: PyTorch eager and
llama.cpp, on the same token ids and threads, in one run.

The model is Qwen3-Embedding-0.6B's real shape (hidden 1024, 16 query / 8 KV heads, MLP
3072, Qwen's tokenizer) with random weights and `--layers` of its 28 layers: compute and
memory do not depend on the values. Contenders, each in its own process so its peak RSS
is its own:
- torch eager FP32 (transformers' Qwen3Model, last token of last_hidden_state);
- edge-embed FP32 and INT8: the graphs the export ships (torch.onnx, fused norms; INT8
  per-token with 8-bit weights and SmoothQuant calibrated on the probe texts), run as the
  runtime runs them;
- llama.cpp F32, Q8_0 and Q4_K_M (the `bench` extra: llama-cpp-python and gguf), GGUF
  files made by llama.cpp's own converter from the same model directory, last-token pooling.
Shapes (texts x tokens): 1x16 (a query), 8x64, 4x256. For each: tokens/s (best of
`--repeat` rounds of `--seconds`), the ratio to torch eager, and per contender the cosine of
its pooled, L2-normalized vectors to torch FP32's on six real texts run one at a time, and
peak RSS. Names the CPU and its int8 kernels. Prints a table, writes JSON.

    python bench/qwen3_cpu.py [--layers 4] [--threads 2] [--seconds 1.5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

SHAPES = ((1, 16), (8, 64), (4, 256))
TEXTS = ["how do I reset a router", "Die Katze schläft auf dem Sofa.",
         "Qwen3 embeddings pool the hidden state of the last token after the final norm.",
         "什么是机器学习？", "def add(a, b):\n    return a + b",
         "A long passage about the history of the printing press, movable type and how books spread "
         "across Europe in the fifteenth and sixteenth centuries, changing science and religion."]

_CHILD = r"""
import json, sys, time
import numpy as np
kind, path, threads, seconds, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
job = json.loads(sys.stdin.read())
shapes, texts = [tuple(s) for s in job["shapes"]], job["texts"]
rng = np.random.default_rng(0)
batches = {s: [rng.integers(1000, 100000, s[1]).astype(np.int64) for _ in range(s[0])] for s in shapes}

if kind == "torch":
    import torch
    from transformers import AutoModel
    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    def pooled(seqs):
        ids = torch.from_numpy(np.stack(seqs))
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, -1].numpy()
elif kind.startswith("onnx"):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    for key, value in job.get("session_config", {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}  # older graphs also take position_ids
    def pooled(seqs):
        ids = np.stack(seqs)
        positions = np.tile(np.arange(ids.shape[1], dtype=np.int64), (len(seqs), 1))
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": positions}
        return session.run(None, {n: v for n, v in feeds.items() if n in names})[0]
else:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, embedding=True, n_threads=threads, n_threads_batch=threads,
                          n_ctx=2048, n_batch=2048, n_ubatch=2048, n_seq_max=16,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST, verbose=False)
    n_embd = llm.n_embd()
    def pooled(seqs):
        # The same token ids as the other contenders, one sequence id each, one decode.
        batch = llama_cpp.llama_batch_init(sum(len(s) for s in seqs), 0, len(seqs))
        k = 0
        for seq_id, seq in enumerate(seqs):
            for pos, token in enumerate(seq):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = int(token), pos, 1
                batch.seq_id[k][0], batch.logits[k] = seq_id, pos == len(seq) - 1
                k += 1
        batch.n_tokens = k
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        if llama_cpp.llama_decode(llm.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        out = np.array([np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(llm.ctx, i), (n_embd,))
                        for i in range(len(seqs))], dtype=np.float32)
        llama_cpp.llama_batch_free(batch)
        return out

vectors = np.vstack([pooled([np.asarray(t, dtype=np.int64)]) for t in texts])
timings = {}
for shape in shapes:
    seqs = batches[shape]
    pooled(seqs)
    best = float("inf")
    for _ in range(repeat):
        runs, start = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - start < seconds:
            pooled(seqs)
            runs += 1
        best = min(best, (time.perf_counter() - start) / runs)
    timings[f"{shape[0]}x{shape[1]}"] = best
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print("RESULT " + json.dumps({"timings": timings, "vectors": vectors.tolist(), "peak_rss": peak}))
"""


def cpu() -> dict:
    from edge_embed.platform import this_cpu

    name, kernels = this_cpu()
    return {"cpu": name, "int8_kernels": kernels}


def build_source(dest: Path, layers: int) -> None:
    from embed_throughput import _qwen3_06b_source

    if not (dest / "config.json").is_file():
        _qwen3_06b_source(dest, layers)


def build_graphs(src: Path, work: Path, threads: int) -> dict[str, tuple[Path, dict]]:
    """The FP32 and INT8 graphs as the export makes them (the same functions, without the
    gates: at 28 layers the probe corpus alone would take an hour on two cores)."""
    from edge_embed.batching import plan_batches
    from edge_embed.export.fusion import fuse_graph
    from edge_embed.export.graph import export_onnx, load_pooled_encoder
    from edge_embed.export.probes import probe_texts
    from edge_embed.export.quantize import activation_channel_max, quantize_per_token_int8
    from edge_embed.export.source import read_source
    from edge_embed.tokenization import BundleTokenizer, model_inputs

    fp32, int8 = work / "model.fp32.onnx", work / "model.int8.onnx"
    if not int8.is_file():
        source = read_source(src)
        tokenizer = BundleTokenizer(src / "tokenizer.json", source.manifest)
        seqs = tokenizer.encode(probe_texts()[::4])
        raw = work / "raw.onnx"
        model = load_pooled_encoder(source)
        export_onnx(model, source, raw, model_inputs(seqs[:2], source.manifest))
        del model
        fuse_graph(raw, fp32, family="qwen3", attention=False, num_heads=16, hidden_size=1024)
        batches = (model_inputs([seqs[i] for i in b], source.manifest)
                   for b in plan_batches([len(s) for s in seqs], 4096, 64))
        calibration = activation_channel_max(fp32, batches, threads)
        recipe = quantize_per_token_int8(fp32, int8, smoothing=calibration)
        (work / "int8.recipe.json").write_text(json.dumps({k: v for k, v in recipe.items()
                                                           if isinstance(v, (str, int, float, dict, list))}))
    config = json.loads((work / "int8.recipe.json").read_text()).get("session_config", {})
    return {"edge-embed FP32": (fp32, {}), "edge-embed INT8": (int8, config)}


def llama_cpp_converter(work: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py of the llama.cpp that llama-cpp-python was built
    from: the wheel does not install it, its source distribution ships it (with the gguf-py
    it expects), so that is downloaded once from the package index."""
    import importlib.metadata
    import tarfile

    version = importlib.metadata.version("llama-cpp-python")
    root = work / f"llama_cpp_python-{version}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(work)], check=True, capture_output=True)
        with tarfile.open(next(work.glob(f"llama_cpp_python-{version}.tar.gz"))) as archive:
            archive.extractall(work, filter="data")
    return script


def build_ggufs(src: Path, work: Path) -> dict[str, Path]:
    """GGUF files from the same model directory, by llama.cpp's converter and quantizer;
    {} without the `bench` extra."""
    import os

    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp skipped: pip install -e '.[bench]' (llama-cpp-python, gguf)", file=sys.stderr)
        return {}
    files = {}
    # F16 is left out: on x86 without native half-precision compute it ran > 5x slower than F32.
    for kind in ("f32", "q8_0"):
        out = work / f"model.{kind}.gguf"
        if not out.is_file():
            converter = llama_cpp_converter(work)
            env = {**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")}
            done = subprocess.run([sys.executable, str(converter), str(src), "--outfile", str(out), "--outtype", kind],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"llama.cpp's converter failed: {done.stderr[-2000:]}")
        files[f"llama.cpp {kind.upper()}"] = out
    q4 = work / "model.q4_k_m.gguf"
    if not q4.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        if llama_cpp.llama_model_quantize(str(files["llama.cpp F32"]).encode(), str(q4).encode(), params) != 0:
            raise RuntimeError("llama.cpp could not quantize to Q4_K_M")

    files["llama.cpp Q4_K_M"] = q4
    return files


def run_contender(kind: str, path: Path, args, job: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, kind, str(path), str(args.threads), str(args.seconds),
                           str(args.repeat)], input=json.dumps(job), capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {path}: {done.stderr[-2000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="layers of the 28 (full width)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edge-embed" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "qwen3_cpu.json")
    args = parser.parse_args()

    from tokenizers import Tokenizer

    work = args.work / f"qwen3-0.6b-shape-{args.layers}-layers"
    src = work / "source"
    work.mkdir(parents=True, exist_ok=True)
    build_source(src, args.layers)
    graphs = build_graphs(src, work, args.threads)
    ggufs = build_ggufs(src, work)
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    texts = [tokenizer.encode(t).ids for t in TEXTS]  # EOS appended, as Qwen3-Embedding's tokenizer does
    job = {"shapes": SHAPES, "texts": texts}
    contenders = {"torch eager FP32": ("torch", src, {})}
    contenders.update({name: ("onnx", path, config) for name, (path, config) in graphs.items()})
    contenders.update({name: ("llama", path, {}) for name, path in ggufs.items()})
    results = {}
    for name, (kind, path, config) in contenders.items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_contender(kind, path, args, {**job, "session_config": config})
        results[name]["bytes"] = (sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir()
                                  else path.stat().st_size)

    def unit(v):
        v = np.asarray(v, dtype=np.float64)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    reference = unit(results["torch eager FP32"]["vectors"])
    eager = results["torch eager FP32"]["timings"]
    rows = []
    for name, r in results.items():
        cos = np.sum(unit(r["vectors"]) * reference, axis=1)
        row = {"contender": name, "file_mb": round(r["bytes"] / 1e6, 1), "peak_rss_mb": round(r["peak_rss"] / 1e6),
               "cos_min_vs_torch": round(float(cos.min()), 6)}
        for shape, seconds in r["timings"].items():
            rows_, width = map(int, shape.split("x"))
            row[f"tok_s_{shape}"] = round(rows_ * width / seconds)
            row[f"ms_{shape}"] = round(seconds * 1000, 2)
            row[f"vs_eager_{shape}"] = round(eager[shape] / seconds, 2)
        rows.append(row)
    machine = {**cpu(), "threads": args.threads, "layers": args.layers}
    print(f"Qwen3-Embedding-0.6B shape, {args.layers} of 28 layers, random weights; {machine['cpu']} "
          f"({machine['int8_kernels']} int8 kernels), {args.threads} threads")
    head = f"{'contender':<20} {'MB':>7} {'RSS MB':>7} {'cos':>9}" + "".join(
        f" {f'{r}x{w} tok/s (x eager)':>24}" for r, w in SHAPES)
    print(head)
    for row in rows:
        cells = "".join(f" {row[f'tok_s_{r}x{w}']:>14,} ({row[f'vs_eager_{r}x{w}']:>4.2f}x)  " for r, w in SHAPES)
        print(f"{row['contender']:<20} {row['file_mb']:>7} {row['peak_rss_mb']:>7} {row['cos_min_vs_torch']:>9.6f}"
              f"{cells}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
