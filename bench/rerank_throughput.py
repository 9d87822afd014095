"""Reranking throughput, side by side in one run: torch eager vs edge-embed FP32 and INT8.

Two models with random weights (compute does not depend on the values):
- a Qwen3-Reranker-0.6B-shaped causal LM (its real layer shape and 151,669-token
  vocabulary, `--qwen3-layers` of its 28 layers), scored as Qwen3-Reranker's own code
  scores: the prompt template, left padding, P(yes) against P(no) at the last token;
- an ms-marco-MiniLM-L-6-shaped BERT cross-encoder (6 layers, 384 wide, one logit), with
  MiniLM's real tokenizer.

Workloads: one query against 20 and against 100 documents (a retriever's top hits: short
sentences and long passages mixed). Torch eager scores the same token ids in batches of
32 in request order, as sentence-transformers' CrossEncoder.predict does by default (Qwen3
left-padded with the logits of the last position only, the cheapest way its code runs);
edge-embed runs `provider.rerank` (token-budget batches sorted by length). Contenders take
turns in every round; the best round counts. Prints a table and writes JSON
(bench/results/rerank_throughput.json by default).

    python bench/rerank_throughput.py [--threads 2] [--repeat 5] [--qwen3-layers 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from embed_throughput import machine  # noqa: E402

QUERY = "how do I reset my home wifi router when pages stop loading"


def documents(count: int) -> list[str]:
    """`count` documents cycling through sentences and passages of the probe set."""
    from edge_embed.export.probes import PROBE_CATEGORIES

    pool = [t for pair in zip(PROBE_CATEGORIES["sentence"], PROBE_CATEGORIES["passage"] * 5) for t in pair]
    return [pool[i % len(pool)] for i in range(count)]


def qwen3_reranker_source(dest: Path, layers: int) -> None:
    """Qwen3-Reranker-0.6B's config (`layers` of its 28, tied embeddings) with random weights,
    and the small trained tokenizer of the tests (ids stay in its range; the vocabulary
    table still has the real 151,669 rows)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from conftest import build_tiny_qwen3

    dest.mkdir(parents=True)
    build_tiny_qwen3(dest, reranker=True)  # tokenizer files; the weights are replaced below
    config = Qwen3Config(vocab_size=151669, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960,
                         eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(dest)


def cross_encoder_source(dest: Path) -> None:
    """ms-marco-MiniLM-L-6-v2's shape: BERT 6 x 384, 12 heads, one logit; random weights."""
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from conftest import minilm_source

    dest.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (minilm_source() / name).is_file():
            shutil.copyfile(minilm_source() / name, dest / name)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(dest)


def torch_scorer(source: Path, provider, threads: int):
    """Scores from the transformers model in eager mode over the same token ids as
    edge-embed's, in request-order batches of 32, padded as the model pads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.set_num_threads(threads)
    manifest = provider.manifest
    causal = manifest.rerank.format == "template"
    loader = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = loader.from_pretrained(source, dtype=torch.float32).eval()
    from edge_embed.tokenization import model_inputs

    if causal:
        # Qwen3-Reranker's code pads on the left and reads position -1.
        manifest = dataclasses.replace(manifest, padding_side="left")

    def score(query: str, docs: list[str]) -> np.ndarray:
        seqs = provider.tokenize_pairs(query, docs)
        out = []
        with torch.inference_mode():
            for start in range(0, len(seqs), 32):
                feeds = {k: torch.from_numpy(v) for k, v in model_inputs(seqs[start:start + 32], manifest).items()}
                if causal:
                    # The whole LM, as Qwen3-Reranker's code runs it: vocabulary-wide logits
                    # at the last position, then the yes/no pair.
                    logits = model(**feeds, logits_to_keep=1).logits[:, -1]
                    pair = torch.log_softmax(logits[:, [manifest.rerank.no_token_id,
                                                        manifest.rerank.yes_token_id]], dim=1)
                    out.append(pair[:, 1].exp().numpy())
                else:
                    ids = feeds["input_ids"]
                    sep = (ids == 102).to(torch.int64)  # BERT's [SEP]: segment 1 follows the first
                    types = ((torch.cumsum(sep, 1) - sep) > 0).to(torch.int64)
                    out.append(torch.sigmoid(model(**feeds, token_type_ids=types).logits[:, 0]).numpy())
        return np.concatenate(out)

    return score


def in_turns(contenders: dict, query: str, docs: list[str], repeat: int) -> dict[str, tuple[float, np.ndarray]]:
    for fn in contenders.values():
        fn(query, docs[:4])  # warm-up
    best: dict[str, tuple[float, np.ndarray]] = {}
    for _ in range(repeat):
        for name, fn in contenders.items():
            start = time.perf_counter()
            scores = fn(query, docs)
            took = time.perf_counter() - start
            if name not in best or took < best[name][0]:
                best[name] = (took, scores)
    return best


def bench_model(name: str, source: Path, bundle: Path, threads: int, repeat: int) -> list[dict]:
    import edge_embed

    providers = {p: edge_embed.load(bundle, precision=p, threads=threads) for p in ("fp32", "int8")}

    def ranked_scores(provider):
        def run(query: str, docs: list[str]) -> np.ndarray:
            out = np.empty(len(docs))
            for r in provider.rerank(query, docs):
                out[r.index] = r.score
            return out
        return run

    contenders = {"torch eager": torch_scorer(source, providers["fp32"], threads),
                  "edge-embed fp32": ranked_scores(providers["fp32"]),
                  "edge-embed int8": ranked_scores(providers["int8"])}
    rows = []
    for count in (20, 100):
        docs = documents(count)
        tokens = sum(len(s) for s in providers["fp32"].tokenize_pairs(QUERY, docs))
        best = in_turns(contenders, QUERY, docs, repeat)
        torch_s, reference = best["torch eager"]
        for contender, (seconds, scores) in best.items():
            rows.append({
                "model": name, "documents": count, "tokens": tokens, "contender": contender,
                "pairs_per_s": round(count / seconds, 1), "vs_torch": round(torch_s / seconds, 2),
                "score_diff_max": round(float(np.abs(scores - reference).max()), 5),
                "top1_same": bool(np.argmax(scores) == np.argmax(reference)),
            })
    for provider in providers.values():
        provider.close()
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<34} {'docs':>5} {'tokens':>7} {'contender':<16} {'pairs/s':>8} {'vs torch':>9} "
          f"{'|score diff|':>13} {'top-1':>6}")
    for r in rows:
        print(f"{r['model']:<34} {r['documents']:>5} {r['tokens']:>7} {r['contender']:<16} {r['pairs_per_s']:>8} "
              f"{r['vs_torch']:>8}x {r['score_diff_max']:>13} {'same' if r['top1_same'] else 'DIFF':>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--qwen3-layers", type=int, default=4)
    parser.add_argument("--work", type=Path, help="keep sources and bundles here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rerank_throughput.json")
    args = parser.parse_args()

    from edge_embed.export import export

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        rows, exports = [], {}
        for name, build, model_id in (
                (f"Qwen3-Reranker-0.6B shape, {args.qwen3_layers} layers",
                 lambda d: qwen3_reranker_source(d, args.qwen3_layers), "qwen3-reranker-0.6b-shaped"),
                ("ms-marco-MiniLM-L-6 shape", cross_encoder_source, "ms-marco-minilm-l6-shaped")):
            source, bundle = work / f"{model_id}-source", work / model_id
            if not (bundle / "manifest.json").is_file():
                if not source.is_dir():
                    build(source)
                started = time.perf_counter()
                export(source, bundle, "fp32,int8", model_id=model_id, overwrite=True)
                exports[model_id] = round(time.perf_counter() - started, 1)
            rows += bench_model(name, source, bundle, args.threads, args.repeat)
    print_table(rows)
    result = {"machine": machine(), "threads": args.threads, "repeat": args.repeat, "export_s": exports,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['machine'].get('cpu')}, {', '.join(result['machine'].get('isa', []))})")


if __name__ == "__main__":
    main()
