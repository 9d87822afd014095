"""`edge-embed`: export, embed and inspect bundles from the shell.

Errors print one line on stderr and exit with the error class's own exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import BackendUnavailableError, EdgeEmbedError, InvalidInputError, WrongTaskError
from .manifest import DEFAULT_EXPORT_PRECISIONS

__all__ = ["main"]


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"EDGE_EMBED_{name}", default)


def _int_at_least(minimum: int):
    """An argparse type: a positive integer (`minimum` 1) or a count that may be none (0)."""
    kind = {1: "positive", 0: "non-negative"}[minimum]

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not a {kind} integer")
        return number

    return parse


_positive_int = _int_at_least(1)
_count = _int_at_least(0)


def _size(value: str) -> int:
    from .server.config import parse_bytes

    try:
        return parse_bytes(value)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-embed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("export", help="export a Hugging Face model directory to a validated bundle")
    ex.add_argument("source", help="local Hugging Face model directory")
    ex.add_argument("out", help="bundle directory to write")
    ex.add_argument("--precision", default=",".join(DEFAULT_EXPORT_PRECISIONS),
                    help="comma-separated: fp32,fp16,int8,int4 (int4: weight-only, for large models)")
    ex.add_argument("--model-id", help="model id to record (default: the directory name)")
    ex.add_argument("--revision", help="source revision to record")
    ex.add_argument("--max-length", type=_positive_int, help="token limit to export for")
    ex.add_argument("--max-pixels", type=_positive_int,
                    help="Qwen3-VL: the most pixels an image is resized to, pinned in the bundle (default the "
                         "model's, 1800 x 32 x 32); a request may lower it, never raise it")
    ex.add_argument("--int8-cos-min", type=float, help="INT8 gate: minimum cosine (default 0.98)")
    ex.add_argument("--int8-cos-mean", type=float, help="INT8 gate: mean cosine (default 0.995)")
    ex.add_argument("--int8-recipe", choices=("per-token", "per-tensor"), default="per-token",
                    help="INT8 activations: per-token (default; batch-invariant, batches like FP32) or "
                         "per-tensor (a vector depends on its batch neighbours, so it runs one text per batch)")
    ex.add_argument("--int4-cos-min", type=float, help="INT4 gate: minimum cosine (default 0.95)")
    ex.add_argument("--int4-cos-mean", type=float, help="INT4 gate: mean cosine (default 0.98)")
    ex.add_argument("--fp16-cos-min", type=float, help="FP16 gate: minimum cosine (default 0.999)")
    ex.add_argument("--int8-topk-kept", type=float,
                    help="INT8 ranking gate: share of FP32's top 10 kept on the retrieval probe corpus (default 0.95)")
    ex.add_argument("--int8-spearman", type=float,
                    help="INT8 ranking gate: rank correlation over FP32's top 100 (default 0.98)")
    ex.add_argument("--mrr-ratio", type=float,
                    help="INT8 ranking gate: MRR@10 of the labelled probe pairs against FP32's (default 0.995)")
    ex.add_argument("--probe-languages",
                    help="languages of the retrieval probe corpus to rank in, comma-separated (default: Qwen3 all "
                         "of en,de,es,fr,ja,ru,zh; other models en)")
    ex.add_argument("--task", choices=("embed", "rerank", "multivector"),
                    help="what the model does (default: detected; *ForSequenceClassification and Qwen3 causal LMs "
                         "without sentence-transformers pooling are rerankers, Qwen3-VL models named *reranker* too; "
                         "a Qwen3-VL checkpoint with a ColQwen projection head is multi-vector)")
    ex.add_argument("--int8-score-diff-max", type=float,
                    help="reranker INT8 gate: largest |score diff| to FP32 (default 0.05)")
    ex.add_argument("--fp16-score-diff-max", type=float,
                    help="reranker FP16 gate: largest |score diff| to FP32 (default 0.02)")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace the bundle already at OUT (any other non-empty OUT is refused)")

    em = sub.add_parser("embed", help="embed texts and images; prints one JSON object per line")
    em.add_argument("texts", nargs="*", help="texts to embed; '-' reads one text per line from stdin")
    em.add_argument("--image", action="append", type=Path, default=[], metavar="FILE",
                    help="an image file to embed (repeatable; PNG, JPEG, WebP, GIF, BMP, TIFF): images come "
                         "first in the output, in the order given, then the texts")
    _bundle_options(em)
    em.add_argument("--dimensions", type=_positive_int, help="Matryoshka output width")
    group = em.add_mutually_exclusive_group()
    group.add_argument("--instruction", help="task instruction: embeds the texts as queries")
    group.add_argument("--query", action="store_true", help="embed as queries with the model's default task")
    em.add_argument("--no-normalize", action="store_true", help="return vectors without L2 normalization")
    em.add_argument("--no-truncate", action="store_true", help="refuse texts over the token limit")

    em.add_argument("--server", default=_env("SERVER"), help="HOST:PORT of an edge-embed server to ask instead")
    _client_options(em)

    rr = sub.add_parser("rerank", help="score documents against a query with a reranker; prints JSON lines, best first")
    rr.add_argument("query", help="the query")
    rr.add_argument("documents", nargs="*", help="documents to score; '-' reads one document per line from stdin")
    _bundle_options(rr, with_bundle=False)
    rr.add_argument("--bundle", type=Path, default=_env("RERANKER"),
                    help="reranker bundle directory (env EDGE_EMBED_RERANKER); or --server")
    rr.add_argument("--image-document", action="append", type=Path, default=[], metavar="FILE",
                    help="an image file as a document (repeatable; rerankers that read images): image documents "
                         "come first, in the order given, then the texts")
    rr.add_argument("--query-image", type=Path, metavar="FILE",
                    help="an image the query holds before its text (rerankers that read images)")
    rr.add_argument("--instruction", help="the task relevance is judged for (default: the model's own)")
    rr.add_argument("--top-n", type=_positive_int, help="print only the best N")
    rr.add_argument("--server", default=_env("SERVER"), help="HOST:PORT of an edge-embed server to ask instead")
    _client_options(rr)

    info = sub.add_parser("info", help="describe a bundle and what would run")
    _bundle_options(info)

    sv = sub.add_parser("serve", help="serve bundles over gRPC, and HTTP if asked (default: the default model)")
    sv.add_argument("--bundle", action="append", metavar="[NAME=]PATH[@PRECISION]",
                    help="a bundle to serve; repeat for several (requests pick one by `model`)")
    sv.add_argument("--models-dir", type=Path, help="serve every bundle folder in this folder, named by folder")
    sv.add_argument("--memory-budget", type=_size, help="process memory budget, e.g. 3GiB "
                    "(default: detected memory less a fifth)")
    sv.add_argument("--pin", action="append", metavar="NAME", help="load at start and never evict; repeatable")
    sv.add_argument("--load-wait-s", type=float, help="how long a request waits for its model to load (default 60)")
    _bundle_options(sv, env_defaults=False, with_bundle=False)
    sv.add_argument("--host", help="address to bind (default 127.0.0.1)")
    sv.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    sv.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default: off)")
    sv.add_argument("--http-port", type=int,
                    help="OpenAI-compatible HTTP API (/v1/embeddings, /v1/models, /health, /ready) on this port, "
                         "same batcher, limits, token and TLS as gRPC (default: off)")
    sv.add_argument("--max-batch-tokens", type=_positive_int, help="padded-token budget of one batch")
    sv.add_argument("--max-batch-size", type=_positive_int, help="texts in one batch at most")
    sv.add_argument("--max-wait-ms", type=float, help="how long a batch waits for company")
    sv.add_argument("--max-batch-ms", type=float,
                    help="a batch's model time at most, at the measured speed, so requests arriving meanwhile "
                         "wait about this long at most (default 250; 0: the token budget alone)")
    sv.add_argument("--max-queue-tokens", type=_positive_int,
                    help="tokens queued per model before RESOURCE_EXHAUSTED (default: 16 batches' worth)")
    sv.add_argument("--max-concurrent-rpcs", type=_positive_int,
                    help="model requests handled at once over gRPC and HTTP together; health and Info are never "
                         "refused (default 64)")
    sv.add_argument("--run-timeout-s", type=float,
                    help="a model run longer than this means the worker hung: stop serving (default 120)")
    sv.add_argument("--max-consecutive-failures", type=_positive_int,
                    help="batches failing in a row before the worker stops (default 5)")
    sv.add_argument("--max-inputs", type=_positive_int, help="texts per request at most")
    sv.add_argument("--max-text-chars", type=_positive_int, help="characters per text at most")
    sv.add_argument("--max-instruction-chars", type=_positive_int, help="characters per instruction at most")
    sv.add_argument("--max-message-bytes", type=_positive_int, help="request size at most")
    sv.add_argument("--max-image-pixels", type=_positive_int,
                    help="pixels an image may declare in its header, checked before decoding (default 50000000)")
    sv.add_argument("--body-timeout-s", type=float,
                    help="an HTTP request body must arrive within this, else 408 (default 15)")
    sv.add_argument("--token", help="require this bearer token (prefer EDGE_EMBED_TOKEN)")
    sv.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    sv.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    sv.add_argument("--tls-client-ca", type=Path, help="CA that client certificates must chain to (mTLS)")
    sv.add_argument("--grace-s", type=float, help="seconds in-flight requests get on shutdown")

    dr = sub.add_parser("doctor", help="what was detected, what would run and why")
    dr.add_argument("--bundle", type=Path, default=_env("BUNDLE"), help="bundle to check (default: the default model)")
    dr.add_argument("--backend", default=_env("BACKEND", "auto"), help="auto, onnx, mlx, cpu, cuda, tensorrt, acl")
    dr.add_argument("--json", action="store_true", help="machine-readable output")

    ck = sub.add_parser("check", help="can these models run on this device? a verdict per resource")
    ck.add_argument("targets", nargs="+", metavar="MODEL_OR_BUNDLE",
                    help="registry names or Hugging Face ids (`edge-embed models`), or bundle directories; "
                         "several are checked together")
    ck.add_argument("--precision", help="fp32, fp16, int8 or int4 (default: what would run here)")
    ck.add_argument("--max-batch-tokens", type=_positive_int, default=_env("MAX_BATCH_TOKENS", "4096"),
                    help="token budget of one batch (default: EDGE_EMBED_MAX_BATCH_TOKENS, as `serve`, or 4096)")
    ck.add_argument("--max-text-tokens", type=_positive_int, default=512,
                    help="longest text served, for registry estimates (bundles use their own limit)")
    ck.add_argument("--export-here", action="store_true",
                    help="count disk to download the source and export on this device too")
    ck.add_argument("--no-measure", action="store_true", help="estimate bundles instead of measuring them")
    ck.add_argument("--device", choices=("a100-40gb", "mac-16gb", "jetson-orin-8gb"),
                    help="judge for this device instead of this machine (bundles are then estimated)")
    ck.add_argument("--backend", default=_env("BACKEND", "auto"), help="backend to measure bundles on")
    ck.add_argument("--json", action="store_true", help="machine-readable output")

    ms = sub.add_parser("models", help="known models with their memory and disk estimates")
    ms.add_argument("--json", action="store_true", help="machine-readable output")

    wm = sub.add_parser("warm", help="build TensorRT engines (and warm caches) for the batching limits")
    _bundle_options(wm)
    wm.add_argument("--max-batch-tokens", type=_positive_int,
                    help="padded tokens in one batch at most, as `serve` is given (EDGE_EMBED_MAX_BATCH_TOKENS)")
    wm.add_argument("--max-batch-size", type=_positive_int,
                    help="texts in one batch at most, as `serve` is given (EDGE_EMBED_MAX_BATCH_SIZE)")

    bc = sub.add_parser("embed-corpus", help="embed a JSONL/Parquet corpus into Parquet shards, in process or on Ray")
    bc.add_argument("input", type=Path, help="a .jsonl/.parquet file, or a folder of them")
    bc.add_argument("output", type=Path, help="folder for the Parquet shards (a rerun resumes it)")
    _bundle_options(bc, with_backend=False)
    bc.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    bc.add_argument("--image-field", help="field holding an image (a path relative to the JSONL file, or bytes in a "
                                          "Parquet binary column), for bundles that read images; a row is its image, "
                                          "its text or both")
    bc.add_argument("--id-field", default="id", help="field holding the row id (default: id)")
    bc.add_argument("--dimensions", type=_positive_int, help="Matryoshka output width")
    bc.add_argument("--no-truncate", action="store_true", help="send texts over the token limit to the errors file")
    bc.add_argument("--rows-per-shard", type=_positive_int, default=10_000, help="rows per output shard (default 10000)")
    bc.add_argument("--ray", metavar="ADDRESS", help="run on Ray Data: a cluster address, 'auto', or 'local' to start one")
    bc.add_argument("--actors", type=_positive_int, help="with --ray: actors (default: cluster CPUs / --cpus-per-actor)")
    bc.add_argument("--cpus-per-actor", type=_positive_int, default=1, help="with --ray: CPUs and threads per actor")
    bc.add_argument("--ship-bundle", action="store_true",
                    help="with --ray: send the bundle through the object store instead of by path")

    bn = sub.add_parser("bench", help="measure a bundle's variants here: items/s, latency per batch, peak memory")
    bn.add_argument("--bundle", type=Path, default=_env("BUNDLE"), help="bundle directory (default: the default model)")
    bn.add_argument("--precision", help="variants to measure, comma-separated (default: every variant of the bundle)")
    bn.add_argument("--backend", default=_env("BACKEND") or "auto",
                    help="auto (default), onnx, cpu, cuda, tensorrt or acl; MLX variants run on mlx")
    bn.add_argument("--threads", type=_positive_int, default=_env("THREADS"), help="CPU threads (default: affinity mask)")
    bn.add_argument("--warmup", type=_count, default=3, help="batches run before measuring (default 3)")
    bn.add_argument("--steps", type=_positive_int, default=10, help="batches measured (default 10)")
    bn.add_argument("--text-samples", type=_positive_int, default=32,
                    help="texts (or a reranker's pairs) taken from the bundle's golden probes (default 32)")
    bn.add_argument("--batch-size", type=_positive_int, default=8, help="inputs per batch (default 8)")
    bn.add_argument("--images", type=_count, default=0,
                    help="also measure this many of the bundle's golden images (bundles that read images)")
    bn.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON too")

    hc = sub.add_parser("health", help="exit 0 when the server at --server reports SERVING")
    hc.add_argument("--server", default=_env("SERVER", "127.0.0.1:50051"), help="HOST:PORT")
    hc.add_argument("--timeout", type=float, default=3.0)
    _client_options(hc)
    return parser


def _client_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--model", metavar="NAME",
                     help="with --server: which of the server's models to ask "
                          "(embed and rerank: env EDGE_EMBED_MODEL; "
                          "default: the server's default model)")
    cmd.add_argument("--token", default=_env("TOKEN"), help="bearer token for the server")
    cmd.add_argument("--root-cert", type=Path, help="CA certificate to trust (enables TLS)")
    cmd.add_argument("--client-cert", type=Path, help="client certificate for mutual TLS")
    cmd.add_argument("--client-key", type=Path, help="client key for mutual TLS")


def _bundle_options(cmd: argparse.ArgumentParser, env_defaults: bool = True, with_bundle: bool = True,
                    with_backend: bool = True) -> None:
    """--bundle/--precision/--threads/--backend; `serve` resolves the environment in
    ServerConfig instead and takes several bundles."""
    env = _env if env_defaults else (lambda name, default=None: None)
    if with_bundle:
        cmd.add_argument("--bundle", type=Path, default=env("BUNDLE"),
                         help="bundle directory (default: the default model)")
    cmd.add_argument("--precision", default=env("PRECISION", "auto"), help="fp32, fp16, int8 or auto")
    cmd.add_argument("--threads", type=_positive_int, default=env("THREADS"), help="CPU threads (default: affinity mask)")
    if with_backend:
        cmd.add_argument("--backend", default=env("BACKEND"),
                         help="auto (default), onnx, mlx, cpu, cuda, tensorrt or acl; a forced one never falls back")


def _open(args: argparse.Namespace):
    from . import load
    from .default_model import ensure_default_bundle

    bundle = args.bundle or ensure_default_bundle()
    threads = int(args.threads) if args.threads else None
    return load(bundle, precision=args.precision, backend=getattr(args, "backend", None) or "auto",
                threads=threads)


def _read_texts(args: argparse.Namespace) -> list[str]:
    if args.texts == ["-"]:
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not args.texts:
        raise InvalidInputError("give texts to embed, or '-' to read them from stdin")
    return list(args.texts)


def _read_inputs(args: argparse.Namespace) -> list:
    """`embed`'s inputs: the --image files (headers checked, not decoded), then the texts."""
    from .images import Image

    images = [Image.open(path, field=f"--image {path}") for path in args.image]
    if images and not args.texts:
        return images
    return [*images, *_read_texts(args)]


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import Gates, export
    from .parity import fidelity_summary

    overrides = {
        "int8_cos_min": args.int8_cos_min,
        "int8_cos_mean": args.int8_cos_mean,
        "int4_cos_min": args.int4_cos_min,
        "int4_cos_mean": args.int4_cos_mean,
        "fp16_cos_min": args.fp16_cos_min,
        "int8_topk_kept": args.int8_topk_kept,
        "int8_spearman": args.int8_spearman,
        "quantized_mrr_ratio": args.mrr_ratio,
        "int8_score_diff_max": args.int8_score_diff_max,
        "fp16_score_diff_max": args.fp16_score_diff_max,
    }
    gates = Gates(**{k: v for k, v in overrides.items() if v is not None})
    manifest = export(
        args.source,
        args.out,
        args.precision,
        model_id=args.model_id,
        revision=args.revision,
        max_length=args.max_length,
        gates=gates,
        overwrite=args.overwrite,
        int8_recipe=args.int8_recipe,
        task=args.task,
        languages=args.probe_languages.split(",") if args.probe_languages else None,
        max_pixels=args.max_pixels,
    )
    for name, variant in manifest.variants.items():
        p = variant.parity
        if manifest.task == "rerank":
            print(f"{name}: {variant.bytes / 1e6:.1f} MB, score diff max {p.score_diff_max:.4f}, Kendall tau mean "
                  f"{p.kendall_tau_mean:.3f}, top-1 agreement {p.top1_agreement:.3f}")
            continue
        print(f"{name}: {variant.bytes / 1e6:.1f} MB, {fidelity_summary(p)}")


def _client(args: argparse.Namespace, timeout: float = 30.0):
    from .client import EmbedClient

    return EmbedClient(args.server, token=args.token, root_cert=args.root_cert, client_cert=args.client_cert,
                       client_key=args.client_key, timeout=timeout)


def _server_model(args: argparse.Namespace) -> str | None:
    """--model, else EDGE_EMBED_MODEL: one of a server's models, so the flag needs --server
    (the variable is only read when a server is asked)."""
    if args.model and not args.server:
        raise InvalidInputError("--model picks one of a server's models: give --server too, or only --bundle")
    return args.model or _env("MODEL") or None


@contextlib.contextmanager
def _naming_models_for(client, task: str):
    """A request sent to a model of the other task fails naming the server's models that do it."""
    try:
        yield
    except WrongTaskError as exc:
        try:
            names = [m.name for m in client.info().models if m.task == task]
        except EdgeEmbedError:
            names = []
        if not names:
            raise
        raise WrongTaskError(f"{exc}: " + " or ".join(f"--model {name}" for name in names)) from None


def _cmd_embed(args: argparse.Namespace) -> None:
    texts = _read_inputs(args)
    if args.server:
        model = _server_model(args)
        with _client(args) as client, _naming_models_for(client, "embed"):
            if client.info(model).task == "multivector":
                if args.instruction or args.dimensions or args.no_normalize:
                    raise InvalidInputError("a multi-vector model takes no --instruction, --dimensions or --no-normalize")
                _print_matrices(client.embed_multi(texts, input_type="query" if args.query else "document",
                                                   truncate=not args.no_truncate, model=model))
                return
            instruction = args.instruction
            if args.query:
                instruction = client.info(model).default_instruction or None
                if instruction is None:
                    raise InvalidInputError("the served model has no query instruction")
            vectors = client.embed(texts, instruction=instruction, dimensions=args.dimensions,
                                   normalize=not args.no_normalize, truncate=not args.no_truncate, model=model)
        _print_vectors(vectors)
        return
    _server_model(args)
    with _open(args) as provider:
        if provider.manifest.task == "multivector":
            if args.instruction or args.dimensions or args.no_normalize:
                raise InvalidInputError("a multi-vector model takes no --instruction, --dimensions or --no-normalize")
            _print_matrices(provider.embed_multi(texts, kind="query" if args.query else "document",
                                                 truncate=not args.no_truncate))
            return
        instruction = args.instruction
        if args.query:
            instruction = provider.manifest.default_instruction
            if instruction is None:
                raise InvalidInputError(f"{provider.manifest.model_id} has no query instruction")
        vectors = provider.embed(
            texts,
            instruction=instruction,
            dimensions=args.dimensions,
            normalize=not args.no_normalize,
            truncate=not args.no_truncate,
        )
    _print_vectors(vectors)


def _print_matrices(matrices) -> None:
    """A multi-vector model's answer: per input its token count and token vectors."""
    out = sys.stdout
    for i, matrix in enumerate(matrices):
        rows = [[round(float(x), 7) for x in row] for row in matrix]
        out.write(json.dumps({"index": i, "tokens": len(rows), "embedding": rows}) + "\n")


def _print_vectors(vectors) -> None:
    out = sys.stdout
    for i, vector in enumerate(vectors):
        out.write(json.dumps({"index": i, "embedding": [round(float(x), 7) for x in vector]}) + "\n")


def _cmd_rerank(args: argparse.Namespace) -> None:
    from .images import Image

    if args.documents == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    else:
        texts = list(args.documents)
    images = [Image.open(path, field=f"--image-document {path}") for path in args.image_document]
    documents: list = [*images, *texts]
    if not documents:
        raise InvalidInputError("give documents to score, or '-' to read them from stdin")
    shown = [f"image:{path}" for path in args.image_document] + texts
    query = args.query
    if args.query_image is not None:
        query = [Image.open(args.query_image, field=f"--query-image {args.query_image}"), args.query]
    if args.server:
        model = _server_model(args)
        with _client(args) as client, _naming_models_for(client, "rerank"):
            response = client.rerank(query, documents, instruction=args.instruction, top_n=args.top_n,
                                     model=model)
        results = [(r.index, r.score) for r in response.results]
    else:
        _server_model(args)
        if args.bundle is None:
            raise InvalidInputError("give a reranker bundle (--bundle or EDGE_EMBED_RERANKER) or --server")
        with _open(args) as provider:
            results = [(r.index, r.score) for r in provider.rerank(query, documents,
                                                                  instruction=args.instruction, top_n=args.top_n)]
    for index, score in results:
        sys.stdout.write(json.dumps({"index": index, "score": round(float(score), 7),
                                     "document": shown[index]}, ensure_ascii=False) + "\n")


def _cmd_info(args: argparse.Namespace) -> None:
    import dataclasses

    with _open(args) as provider:
        manifest = dataclasses.asdict(provider.manifest)
        report = {"provider": dataclasses.asdict(provider.info), "bundle": str(provider.bundle.path), "manifest": manifest}
    print(json.dumps(report, indent=2, ensure_ascii=False))


def _cmd_serve(args: argparse.Namespace) -> None:
    import asyncio

    from .default_model import ensure_default_bundle
    from .server import ServerConfig, serve
    from .server.pool import parse_model_sources, pool_from_config

    flags = dict(vars(args))
    flags["bundle"] = tuple(args.bundle) if args.bundle else None
    flags["pin"] = tuple(args.pin) if args.pin else None
    config = ServerConfig.from_sources(flags)
    sources = parse_model_sources(config.bundle, config.models_dir, config.precision)
    if not sources:
        sources = parse_model_sources((str(ensure_default_bundle()),), None, config.precision)

    async def run() -> None:
        await serve(config, pool_from_config(config, sources))

    asyncio.run(run())


def _cmd_health(args: argparse.Namespace) -> None:
    """The server's status; with --model, that model's: its own health service where the
    server registers one, else the server's status and the model's state from Info."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .client import health_service_name

    # The flag only: a container's HEALTHCHECK must keep meaning the whole server even where
    # EDGE_EMBED_MODEL is set for the other commands.
    if args.model and not args.server:
        raise InvalidInputError("--model picks one of a server's models: give --server too")
    model = args.model
    with _client(args, timeout=args.timeout) as client:
        stub = health_pb2_grpc.HealthStub(client._channel)

        def check(service: str) -> int | None:
            """`service`'s status; None for a model's name that the server does not register."""
            try:
                return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=args.timeout).status
            except grpc.RpcError as exc:
                if service and exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise BackendUnavailableError(f"{args.server}: {exc.code().name}: {exc.details()}") from None

        status = check(health_service_name(model)) if model else None
        served = None  # the model's pool status, where the server has no health entry for it
        if status is None:
            status = check("")
            if model and status == health_pb2.HealthCheckResponse.SERVING:
                served = _model_status(client, model)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    broken = served is not None and served.state in _BROKEN_STATES
    if broken:
        name = "NOT_SERVING"
    print(name if served is None else f"{name} ({served.name}: {served.state})")
    if broken:
        raise BackendUnavailableError(f"{args.server}: model {served.name} is {served.state}: "
                                      f"{served.error or 'no reason given'}")
    if status != health_pb2.HealthCheckResponse.SERVING:
        raise BackendUnavailableError(f"{args.server} is {name}")


# Pool states in which a model's requests fail: its last load failed (the pool tries again
# later), or its worker stopped. The others serve: loaded, or loaded on demand.
_BROKEN_STATES = ("failed", "stopped")


def _model_status(client, model: str):
    """One model's ModelStatus from Info (None where Info lists no models); Info raises
    ModelNotFoundError when the server has no such model."""
    info = client.info(model)
    return next((status for status in info.models if status.name == info.model), None)


def _cmd_doctor(args: argparse.Namespace) -> None:
    from .doctor import diagnose, render

    report = diagnose(args.bundle, backend=args.backend)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else render(report))
    problem = report.get("error") or report.get("bundle", {}).get("error") or report.get("would_run", {}).get("error")
    if problem:
        raise BackendUnavailableError(f"nothing can run: {problem}")


def _cmd_warm(args: argparse.Namespace) -> None:
    import time

    from . import load
    from .default_model import ensure_default_bundle
    from .server.config import ServerConfig

    started = time.monotonic()
    # The limits `serve` reads, from the same flags and variables: the engines built here
    # are the ones it asks for.
    limits = ServerConfig.from_sources({"max_batch_tokens": args.max_batch_tokens,
                                        "max_batch_size": args.max_batch_size}).limits
    provider = load(args.bundle or ensure_default_bundle(), precision=args.precision, backend=args.backend or "auto",
                    threads=int(args.threads) if args.threads else None, limits=limits)
    shapes = provider.warm_shapes()
    info = provider.info
    print(f"warmed {info.model_id} {info.precision} on {info.execution_providers[0]}: shapes {shapes} "
          f"in {time.monotonic() - started:.1f} s")


def _cmd_check(args: argparse.Namespace) -> int:
    from .check import NOT_FEASIBLE, check, render_check
    from .registry import Limits

    report = check(args.targets, args.precision, limits=Limits(args.max_batch_tokens, args.max_text_tokens),
                   export_here=args.export_here, measure=not args.no_measure, backend=args.backend,
                   device=args.device)
    print(json.dumps(report.as_dict(), indent=2) if args.json else render_check(report))
    return _NOT_FEASIBLE_EXIT if report.verdict == NOT_FEASIBLE else 0


def _cmd_embed_corpus(args: argparse.Namespace) -> None:
    from .corpus import ERRORS_FILE, embed_corpus
    from .default_model import ensure_default_bundle

    if args.ray is None and (args.actors or args.ship_bundle or args.cpus_per_actor != 1):
        raise InvalidInputError("--actors, --cpus-per-actor and --ship-bundle need --ray")
    report = embed_corpus(
        args.bundle or ensure_default_bundle(), args.input, args.output, text_field=args.text_field,
        id_field=args.id_field, image_field=args.image_field, precision=args.precision, dimensions=args.dimensions, truncate=not args.no_truncate,
        rows_per_shard=args.rows_per_shard, threads=int(args.threads) if args.threads else None, ray=args.ray,
        actors=args.actors, cpus_per_actor=args.cpus_per_actor, ship_bundle=args.ship_bundle,
    )
    errors = f", {report.errors:,} errors in {report.output / ERRORS_FILE}" if report.errors else ""
    print(f"{report.rows_out:,} of {report.rows_in:,} rows embedded into {report.units} shards in {report.output} "
          f"({report.model_id} {report.precision}, {report.units_skipped} shards from an earlier run{errors}) "
          f"in {report.seconds:.1f} s")


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchSettings, bench_bundle, format_table
    from .default_model import ensure_default_bundle

    settings = BenchSettings(warmup=args.warmup, steps=args.steps, text_samples=args.text_samples,
                             batch_size=args.batch_size, images=args.images, backend=args.backend,
                             threads=int(args.threads) if args.threads else None)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()] if args.precision else None
    if args.json and not args.json.resolve().parent.is_dir():  # before minutes of measuring, not after
        raise InvalidInputError(f"--json {args.json}: its folder does not exist")
    report = bench_bundle(args.bundle or ensure_default_bundle(), precisions, settings,
                          progress=lambda line: print(f"edge-embed: bench: {line}", file=sys.stderr, flush=True))
    print(format_table(report))
    if args.json:
        partial = args.json.with_name(f".{args.json.name}.partial")
        partial.write_text(json.dumps(report, indent=2) + "\n")
        partial.replace(args.json)
    return 1 if any("error" in row for row in report["rows"]) else 0  # a variant that cannot run here


def _cmd_models(args: argparse.Namespace) -> None:
    from .check import registry_rows
    from .registry import PRECISIONS

    rows = registry_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':<28} {'kind':<16} {'params':>7} {'dim':>5} {'context':>7}  "
          + "  ".join(f"{p + ' MB':>9}" for p in PRECISIONS) + "  planning MB")
    for r in rows:
        planning = f"{r['planning_mb']:,} ({r['planning_precision']})" if r["planning_mb"] else "-"
        print(f"{r['name']:<28} {r['kind']:<16} {r['params'] / 1e9:>6.2f}B {r['dim']:>5} {r['max_context']:>7}  "
              + "  ".join(f"{r['memory_bytes'][p] / 1e6:>9,.0f}" for p in PRECISIONS) + f"  {planning}")
    print("memory = process base + weights + runtime + activations at 4096 tokens/batch, texts <= 512 tokens "
          "(see `edge-embed check` and docs/models.md)")


_NOT_FEASIBLE_EXIT = 9


class _OurLinesFilter(logging.Filter):
    """The console shows edge-embed's own lines from INFO up, and other libraries' lines
    only when they are errors; EDGE_EMBED_LOG_LEVEL=debug shows everything."""

    def __init__(self, everything: bool):
        super().__init__()
        self.everything = everything

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "edge_embed" or record.name.startswith("edge_embed.")
        return self.everything or ours or record.levelno >= logging.ERROR


def _configure_logging() -> None:
    level_name = (_env("LOG_LEVEL") or "info").upper()
    level = logging.getLevelName(level_name)
    if not isinstance(level, int):
        raise InvalidInputError(f"EDGE_EMBED_LOG_LEVEL={level_name.lower()!r} is not a level (debug, info, warning)")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_OurLinesFilter(everything=level <= logging.DEBUG))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(min(level, logging.INFO))
    logging.getLogger("edge_embed").setLevel(level)
    logging.captureWarnings(True)  # library warnings are third-party detail too


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"export": _cmd_export, "embed": _cmd_embed, "rerank": _cmd_rerank, "info": _cmd_info, "serve": _cmd_serve,
                "health": _cmd_health, "doctor": _cmd_doctor, "warm": _cmd_warm, "check": _cmd_check,
                "models": _cmd_models, "embed-corpus": _cmd_embed_corpus, "bench": _cmd_bench}
    command = commands[args.command]
    try:
        _configure_logging()
        code = command(args)
    except EdgeEmbedError as exc:
        print(f"edge-embed: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
