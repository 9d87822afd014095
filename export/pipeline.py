"""Hugging Face model directory -> validated bundle. Nothing is written that missed its gate."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..batching import plan_batches
from ..bundle import GOLDEN_FILE, MANIFEST_FILE, file_sha256
from ..errors import ExportError, GateError
from ..manifest import (
    DEFAULT_EXPORT_PRECISIONS,
    PRECISIONS,
    Manifest,
    Parity,
    RetrievalParity,
    ScoreParity,
    Variant,
    variant_format,
)
from ..platform import usable_cpu_count
from ..tokenization import BundleTokenizer, model_inputs
from .onnx_files import data_files, move_graph, remove_graph
from .probes import PROBE_CATEGORIES, PROBE_LANGUAGES, probe_texts, rerank_probe_pairs, retrieval_probes
from .reference_cache import reference_path
from .source import SourceModel, read_source
from .torch_stage import RETRIEVAL_REFERENCE_FILE, run_torch_stage
from .writing import finish_bundle
from ..parity import (
    Gates,
    alone_vs_batch_cos,
    alone_vs_batch_diff,
    batch_probe_indices,
    check_gate,
    gate_failure,
    measure_parity,
    measure_retrieval,
    measure_score_parity,
    pair_name,
    scores_from_logits,
)

__all__ = ["export", "parse_precisions", "INT8_RECIPES"]

Progress = Callable[[str], None]
_REFERENCE_BATCH_TOKENS = 4096
_SENSITIVITY_PROBES = 32


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def console_progress() -> Progress:
    """Timestamped progress lines on stderr (stdout stays free for results)."""
    start = time.monotonic()

    def report(message: str) -> None:
        print(f"[export {time.monotonic() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    return report


def parse_precisions(value: str | Sequence[str]) -> tuple[str, ...]:
    """'fp32,int8' or a sequence -> a validated tuple in canonical order."""
    items = value.split(",") if isinstance(value, str) else list(value)
    wanted = {p.strip().lower() for p in items if p.strip()}
    unknown = wanted - set(PRECISIONS)
    if unknown or not wanted:
        raise ExportError(f"precisions must be a non-empty subset of {','.join(PRECISIONS)}, got {value!r}")
    return tuple(p for p in PRECISIONS if p in wanted)


def describe(parity: Parity | ScoreParity) -> str:
    """One progress line's worth of a variant's fidelity."""
    if isinstance(parity, ScoreParity):
        batch = "" if parity.batch_diff_max is None else f", alone vs in a batch {parity.batch_diff_max:.2g}"
        return (f"score diff max {parity.score_diff_max:.4f} mean {parity.score_diff_mean:.4f}, Kendall tau mean "
                f"{parity.kendall_tau_mean:.3f} min {parity.kendall_tau_min:.3f}, top-1 {parity.top1_agreement:.2f}"
                f"{batch}")
    batch = "" if parity.batch_cos_min is None else f", alone vs in a batch {parity.batch_cos_min:.6f}"
    return f"cos mean {parity.cos_mean:.4f} min {parity.cos_min:.6f}{batch}{describe_retrieval(parity.retrieval)}"


def describe_retrieval(retrieval: RetrievalParity | None) -> str:
    if retrieval is None:
        return ""
    return (f"; retrieval: top-{retrieval.topk} kept {retrieval.topk_kept:.3f}, Spearman {retrieval.spearman:.4f}, "
            f"MRR@{retrieval.topk} {retrieval.mrr_ratio:.2%} of the reference's ({retrieval.reference_mrr:.3f})")


def _quality(parity: Parity | ScoreParity) -> tuple[float, ...]:
    """Bigger is better: how recipes that all missed their gate are ranked (for an embedder,
    by the ranking it keeps first)."""
    if isinstance(parity, ScoreParity):
        return -parity.score_diff_max, parity.kendall_tau_mean
    ranking = (parity.retrieval.topk_kept, parity.retrieval.spearman) if parity.retrieval else ()
    return *ranking, parity.cos_min, parity.cos_mean


def _rerank_probes(tokenizer: BundleTokenizer) -> tuple[list[str], list[np.ndarray], np.ndarray, tuple]:
    """A reranker's probe pairs: their names, token ids (default instruction), query groups,
    and (queries, documents) for golden.npz."""
    queries, documents, groups = rerank_probe_pairs()
    seqs: list[np.ndarray] = []
    for g in sorted(set(groups)):
        rows = [i for i, x in enumerate(groups) if x == g]
        seqs += tokenizer.encode_pairs(queries[rows[0]], [documents[i] for i in rows])
    names = [pair_name(q, d) for q, d in zip(queries, documents)]
    return names, seqs, np.asarray(groups, dtype=np.int64), (queries, documents)


def _probe_set(tokenizer: BundleTokenizer, manifest: Manifest) -> list[str]:
    texts = probe_texts()
    if manifest.instruction_template:
        # Instruction-aware models are mostly fed formatted queries: probe those too.
        texts += tokenizer.format(list(PROBE_CATEGORIES["query"]), manifest.default_instruction)
    return texts


def probe_languages(manifest: Manifest) -> tuple[str, ...]:
    """The languages of the retrieval probe corpus a model is judged in: every language of
    the corpus for Qwen3 (multilingual), English for the BERT family, whose tokenizers and
    training are English."""
    return PROBE_LANGUAGES if manifest.architecture == "qwen3" else ("en",)


@dataclasses.dataclass
class _RetrievalSet:
    """The retrieval probe corpus as token ids (queries formatted as the model's default
    task asks), and the reference's vectors once the PyTorch stage has made them."""

    queries: list[str]
    query_seqs: list[np.ndarray]
    passage_seqs: list[np.ndarray]
    relevant: np.ndarray
    languages: tuple[str, ...]
    reference: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def build(cls, tokenizer: BundleTokenizer, manifest: Manifest, languages: tuple[str, ...]) -> _RetrievalSet:
        probes = retrieval_probes(languages)
        instruction = manifest.default_instruction if manifest.instruction_template else None
        return cls(queries=probes.queries, query_seqs=tokenizer.encode(probes.queries, instruction=instruction),
                   passage_seqs=tokenizer.encode(probes.passages), relevant=probes.relevant,
                   languages=tuple(languages))

    @property
    def seqs(self) -> list[np.ndarray]:
        return [*self.query_seqs, *self.passage_seqs]

    def split(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return vectors[: len(self.query_seqs)], vectors[len(self.query_seqs):]

    def measure(self, vectors: np.ndarray) -> RetrievalParity:
        return measure_retrieval(self.reference, self.split(vectors), self.relevant, self.queries, self.languages)


class _Runner:
    """Runs a candidate over the probe token ids with the runtime's own batching, and judges
    its outputs as the task does: vectors by cosine and by the ranking of the retrieval
    probe corpus, reranker logits by score and order."""

    def __init__(self, manifest: Manifest, seqs: list[np.ndarray], groups: np.ndarray | None = None,
                 retrieval: _RetrievalSet | None = None):
        self.manifest, self.seqs, self.groups, self.retrieval = manifest, seqs, groups, retrieval
        self.batches = plan_batches([len(s) for s in seqs], _REFERENCE_BATCH_TOKENS, 64)

    def vectors(self, forward: Callable[[dict[str, np.ndarray]], np.ndarray]) -> np.ndarray:
        out = np.empty((len(self.seqs), self.manifest.dim), dtype=np.float32)
        for batch in self.batches:
            out[batch] = forward(model_inputs([self.seqs[i] for i in batch], self.manifest))
        return out

    @staticmethod
    def _session(path: Path, config: dict[str, str] | None = None):
        """A CPU session as the runtime makes one for the variant (`config`: the session
        config entries its recipe asks for)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = usable_cpu_count()
        options.log_severity_level = 3
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, path: Path, *, alone: bool = False, session=None, config: dict | None = None) -> np.ndarray:
        """Vectors of an ONNX graph file; `alone` runs each text as its own batch, as the
        runtime does for variants whose vectors depend on their batch neighbours."""
        session = session or self._session(path, config)
        if not alone:
            return self.vectors(lambda feeds: session.run([self.manifest.graph_output], feeds)[0])
        return np.vstack([
            session.run([self.manifest.graph_output], model_inputs([seq], self.manifest))[0] for seq in self.seqs
        ])

    @property
    def rerank(self) -> bool:
        return self.manifest.task == "rerank"

    def batch_check(self, path: Path, session=None) -> float:
        """Probes alone against the same probes in one batch of 32 mixed lengths (padded as
        the model pads): the worst cosine of vectors (1.0: batch neighbours change nothing),
        or the largest |score diff| of a reranker (0.0: the same)."""
        session = session or self._session(path)
        picked = [self.seqs[i] for i in batch_probe_indices([len(s) for s in self.seqs])]
        output = self.manifest.graph_output
        alone = np.vstack([session.run([output], model_inputs([seq], self.manifest))[0] for seq in picked])
        batched = session.run([output], model_inputs(picked, self.manifest))[0]
        if self.rerank:
            return alone_vs_batch_diff(alone, batched, self.manifest.rerank.activation)
        return alone_vs_batch_cos(alone, batched)

    def measure(self, reference: np.ndarray, outputs: np.ndarray, texts: list[str]) -> Parity | ScoreParity:
        if self.rerank:
            return measure_score_parity(reference, outputs, self.groups, texts, self.manifest.rerank.activation)
        return measure_parity(reference, outputs, texts)

    def measure_retrieval(self, vectors: Callable[[_Runner], np.ndarray]) -> RetrievalParity | None:
        """The candidate's ranking of the retrieval probe corpus; `vectors` runs it over a
        runner of the corpus's token ids."""
        if self.retrieval is None or self.retrieval.reference is None:
            return None
        return self.retrieval.measure(vectors(_Runner(self.manifest, self.retrieval.seqs)))

    def errors(self, reference: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        """Per probe, how far a candidate's output is from the reference (bigger is worse)."""
        if self.rerank:
            activation = self.manifest.rerank.activation
            return np.abs(scores_from_logits(reference, activation) - scores_from_logits(outputs, activation))
        return 1.0 - _cosines(reference, outputs)

    def subset(self, rows: np.ndarray) -> _Runner:
        return _Runner(self.manifest, [self.seqs[i] for i in rows],
                       None if self.groups is None else self.groups[rows])

    def parity(self, path: Path, reference: np.ndarray, texts: list[str], recipe: dict, *,
               ranking: bool = False) -> Parity | ScoreParity:
        """Parity with the reference, run as the runtime will run it, plus the alone-vs-batch
        check for a variant that claims batch invariance (one session for both); with
        `ranking`, an embedder's ranking of the retrieval probe corpus too."""
        invariant = recipe.get("batch_invariant", True)
        session = self._session(path, recipe.get("session_config"))
        parity = self.measure(reference, self(path, alone=not invariant, session=session), texts)
        batch = self.batch_check(path, session) if invariant else None
        if self.rerank:
            parity = dataclasses.replace(parity, batch_diff_max=batch)
        else:
            retrieval = (self.measure_retrieval(lambda run: run(path, alone=not invariant, session=session))
                         if ranking else None)
            parity = dataclasses.replace(parity, batch_cos_min=batch, retrieval=retrieval)
        del session
        _release_freed_memory()
        return parity


INT8_RECIPES = ("per-token", "per-tensor")
SMOOTHQUANT_ALPHA = 0.5


def _search_int8(fp32_path: Path, work: Path, run: _Runner, reference: np.ndarray, texts: list[str],
                 gates: Gates, progress: Progress, *, recipe: str = "per-token") -> tuple[Path, dict, Parity | ScoreParity]:
    """Try INT8 recipes from fastest to most conservative; return the first that passes.

    `recipe` picks the activation quantization:
    - "per-token" (the default): one scale per token, batch-invariant by construction, so
      it batches like FP32; 8-bit weights, exact on every ISA (see quantize_per_token_int8),
      first with SmoothQuant (calibrated on the probe texts), then without.
    - "per-tensor": ONNX Runtime's dynamic quantization, one activation scale per batch
      tensor, so a text's vector depends on its batch neighbours and the runtime runs it
      one text per batch. Only on request. Tried with full and 7-bit weights.
    Then, for either, the MatMuls whose lone quantization hurts most are kept in FP32, the
    fewest that pass. Nothing else ships as int8: weight-only 8-bit runs FP32 arithmetic
    (measured 5x slower than FP32 on a 16-token Qwen3 query), which the name would hide.
    """
    from .quantize import activation_channel_max, quantize_dynamic_int8, quantize_per_token_int8

    if recipe not in INT8_RECIPES:
        raise ExportError(f"int8 recipe {recipe!r} is not one of {', '.join(INT8_RECIPES)}")

    def quantize(dst: Path, options: dict, exclude: tuple[str, ...]) -> dict:
        if recipe == "per-token":
            return quantize_per_token_int8(fp32_path, dst, exclude=exclude, **options)
        return quantize_dynamic_int8(fp32_path, dst, per_channel=True, exclude=exclude, **options)

    if recipe == "per-token":
        progress("int8: measuring activation ranges on the probe texts (SmoothQuant calibration)")
        calibration = activation_channel_max(
            fp32_path, (model_inputs([run.seqs[i] for i in batch], run.manifest) for batch in run.batches),
            usable_cpu_count())
        firsts = [("per-token, SmoothQuant", {"smoothing": calibration, "smooth_alpha": SMOOTHQUANT_ALPHA}),
                  ("per-token", {})]
    else:
        firsts = [("dynamic per-channel", {"reduce_range": False}),
                  ("dynamic per-channel reduce-range", {"reduce_range": True})]
    return _search("int8", fp32_path, work, run, reference, texts, gates, progress, firsts, quantize, "in fp32",
                   None)


def _search_int4(fp32_path: Path, work: Path, run: _Runner, reference: np.ndarray, texts: list[str],
                 gates: Gates, progress: Progress) -> tuple[Path, dict, Parity]:
    """Weight-only 4-bit: the block sizes in order, then the MatMuls 4 bits hurt most kept
    at 8 bits, the fewest that pass."""
    from .quantize import INT4_BLOCK_SIZES, quantize_int4

    def quantize(dst: Path, options: dict, exclude: tuple[str, ...]) -> dict:
        return quantize_int4(fp32_path, dst, keep_8bit=exclude, **options)

    firsts = [(f"4-bit blocks of {b}", {"block_size": b}) for b in INT4_BLOCK_SIZES]
    return _search("int4", fp32_path, work, run, reference, texts, gates, progress, firsts, quantize, "at 8 bits", None)


def _search(precision: str, fp32_path: Path, work: Path, run: _Runner, reference: np.ndarray, texts: list[str],
            gates: Gates,
            progress: Progress, firsts: list[tuple[str, dict]],
            quantize: Callable[[Path, dict, tuple[str, ...]], dict], kept_as: str,
            fallback: tuple[str, Callable[[Path], dict]] | None) -> tuple[Path, dict, Parity]:
    """The search shared by the quantized precisions: each full recipe in `firsts`; then,
    from the best of them, the MatMuls whose lone quantization hurts most are kept out
    (`exclude`), the fewest that pass; then `fallback`. Raises the best miss."""
    from .quantize import quantizable_matmuls

    candidate = work / f"candidate.{precision}.onnx"
    nodes = quantizable_matmuls(fp32_path)
    tried: list[tuple[dict, Parity, GateError | None]] = []

    def attempt(label: str, make: Callable[[], dict]) -> tuple[dict, Parity, GateError | None]:
        made = make()
        parity = run.parity(candidate, reference, texts, made, ranking=True)
        failure = gate_failure(precision, parity, gates)
        verdict = "passes" if failure is None else "misses the gate"
        progress(f"{precision} {label}: {describe(parity)} -> {verdict}")
        tried.append((made, parity, failure))
        return tried[-1]

    def finish(made: dict, parity: Parity) -> tuple[Path, dict, Parity]:
        final = work / f"model.{precision}.onnx"
        move_graph(candidate, final)
        return final, made, parity

    results = []
    for label, options in firsts:
        made, parity, failure = attempt(label, lambda o=options: quantize(candidate, o, ()))
        if failure is None:
            return finish(made, parity)
        results.append((parity, label, options, made.get("batch_invariant", True)))
    _, best_label, best, invariant = max(results, key=lambda r: _quality(r[0]))
    # Sensitivity is measured on the texts the best full recipe hurt most: they are the
    # ones the gate is decided on, and a small set keeps one pass per MatMul cheap.
    config = quantize(candidate, best, ()).get("session_config")
    error_per_probe = run.errors(reference, run(candidate, alone=not invariant, config=config))
    hardest = np.argsort(-error_per_probe, kind="stable")[:_SENSITIVITY_PROBES]
    run_hardest = run.subset(hardest)
    progress(f"{precision}: measuring the sensitivity of {len(nodes)} MatMuls on the {len(hardest)} hardest texts")
    damage = {}
    for i, node in enumerate(nodes, 1):
        quantize(candidate, best, tuple(n for n in nodes if n != node))
        damage[node] = float(run_hardest.errors(reference[hardest],
                                                run_hardest(candidate, alone=not invariant, config=config)).max())
        if i % 10 == 0 or i == len(nodes):
            progress(f"{precision} sensitivity: {i}/{len(nodes)} MatMuls")
    ranked = sorted(nodes, key=lambda n: -damage[n])

    def keep_out(k: int) -> tuple[dict, Parity, GateError | None]:
        excluded = tuple(ranked[:k])
        return attempt(f"{best_label}, {k} sensitive MatMuls {kept_as}", lambda: quantize(candidate, best, excluded))

    # Double the kept set until the gate passes, then bisect down to the fewest kept
    # MatMuls that still pass: each one kept costs speed or size.
    low, k, passing = 0, 1, None
    while k <= len(nodes) // 2:
        made, parity, failure = keep_out(k)
        if failure is None:
            passing = (k, made, parity)
            break
        low, k = k, k * 2
    if passing is not None:
        high = passing[0]
        while high - low > 1:
            mid = (low + high) // 2
            made, parity, failure = keep_out(mid)
            if failure is None:
                high, passing = mid, (mid, made, parity)
            else:
                low = mid
        if tried[-1][0] is not passing[1]:
            # The candidate file holds the last attempt; rebuild the one that ships.
            made, parity, _ = keep_out(passing[0])
            passing = (passing[0], made, parity)
        return finish(passing[1], passing[2])

    if fallback is not None:
        label, make = fallback
        made, parity, failure = attempt(label, lambda: make(candidate))
        if failure is None:
            return finish(made, parity)
    remove_graph(candidate)
    best_try = max(tried, key=lambda t: _quality(t[1]))
    raise best_try[2]


# Shapes (texts x tokens) a quantized variant is timed at against FP32 on the export
# machine: one short query, and a batch.
SPEED_SHAPES = ((1, 16), (8, 64))
_SPEED_SECONDS = 0.6


def _time_against_fp32(fp32: Path, variant: Path, recipe: dict, manifest: Manifest) -> dict:
    """How fast a variant runs against FP32 here: best of three paired rounds per shape,
    each round about `_SPEED_SECONDS` per graph. Recorded with the CPU and its int8 kernel
    class, which decide the ratio (x86 without VNNI runs int8 GEMMs no faster than FP32)."""
    from ..platform import this_cpu

    sessions = (_Runner._session(fp32), _Runner._session(variant, recipe.get("session_config")))
    rng = np.random.default_rng(0)
    ratios = {}
    for rows, width in SPEED_SHAPES:
        seqs = [rng.integers(100, 1000, width).astype(np.int64) for _ in range(rows)]
        feeds = model_inputs(seqs, manifest)
        best = [float("inf"), float("inf")]
        for _ in range(3):
            for k, session in enumerate(sessions):
                session.run(None, feeds)
                runs, start = 0, time.perf_counter()
                while runs < 3 or time.perf_counter() - start < _SPEED_SECONDS:
                    session.run(None, feeds)
                    runs += 1
                best[k] = min(best[k], (time.perf_counter() - start) / runs)
        ratios[f"{rows}x{width}"] = round(best[0] / best[1], 3)
    del sessions
    _release_freed_memory()
    cpu, kernels = this_cpu()
    return {"cpu": cpu, "int8_kernels": kernels, "threads": usable_cpu_count(), "vs_fp32": ratios}


def _warn_slower(precision: str, speed: dict) -> None:
    """Say so when a quantized variant runs slower than FP32 on the export machine: it still
    ships (its size, and its speed on other CPUs), but `auto` will not pick it on CPUs of
    this int8 kernel class, where it was measured slower."""
    import logging

    hint = {"avx2": "x86 without VNNI runs ONNX Runtime's int8 GEMMs no faster than FP32; CPUs with VNNI, AMX "
                    "or ARM dot-product run them faster"}.get(speed["int8_kernels"], "")
    everywhere = max(speed["vs_fp32"].values()) < 1.0
    consequence = ("precision='auto' picks fp32 over it on CPUs of this kind" if everywhere
                   else "precision='auto' still picks it, being faster at other shapes")
    message = (f"{precision} runs slower than fp32 {'at every shape' if everywhere else 'at some shapes'} on this "
               f"CPU ({speed['cpu']}, {speed['int8_kernels']} int8 kernels): {speed['vs_fp32']}x; {consequence}"
               f"{'. ' + hint if hint else ''}")
    logging.getLogger("edge_embed.export").warning(message)


def _check_mlx_can_export(manifest: Manifest) -> None:
    """MLX variants are checked with MLX: fail before the long ONNX steps if that cannot work."""
    from ..backends.mlx import SUPPORTED_ARCHITECTURES, MlxProvider

    if manifest.architecture not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"the MLX backend does not implement {manifest.architecture!r} "
            f"(it has {', '.join(SUPPORTED_ARCHITECTURES)}); export ONNX variants only"
        )
    reason = MlxProvider.unavailable_reason()
    if reason:
        raise ExportError(f"the MLX variants are checked with MLX at export time, and {reason}")


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output that is not a directory, or that holds anything but a bundle: overwrite
    replaces a bundle, never a folder of other files pointed at by mistake."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not _holds_bundle(out_dir):
        raise ExportError(f"{out_dir} is not empty and holds no edge-embed bundle (no bundle {MANIFEST_FILE}); "
                          "export replaces only a bundle, even with overwrite: choose a new or empty directory")
    if not overwrite:
        raise ExportError(f"{out_dir} already holds a bundle (pass overwrite to replace it)")


def _holds_bundle(folder: Path) -> bool:
    """A bundle's manifest, of any schema version: other tools write manifest.json files too."""
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "schema_version" in data and "variants" in data


def _move_into_place(work: Path, out_dir: Path) -> None:
    """Put the finished bundle at out_dir; a bundle it replaces is removed only once the new
    one is in place."""
    if not out_dir.exists():
        work.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.replaced-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    out_dir.rename(old)
    try:
        work.rename(out_dir)
    except OSError:
        old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export(
    source_dir: str | Path,
    out_dir: str | Path,
    precisions: str | Sequence[str] = DEFAULT_EXPORT_PRECISIONS,
    *,
    model_id: str | None = None,
    revision: str | None = None,
    max_length: int | None = None,
    gates: Gates = Gates(),
    overwrite: bool = False,
    progress: Progress | None = None,
    int8_recipe: str = "per-token",
    task: str | None = None,
    languages: Sequence[str] | None = None,
    max_pixels: int | None = None,
) -> Manifest:
    """Export, validate every variant against the PyTorch FP32 reference, write the bundle.

    `task` None detects from the model whether it embeds or reranks (see read_source).
    `languages` picks the languages of the retrieval probe corpus an embedder's variants
    are ranked in (None: by the model's family, see probe_languages). `max_pixels` pins a
    lower image size bound than the model's for a Qwen3-VL bundle (its vision attention grows
    with the square of an image's patches).
    The bundle is assembled in a sibling temporary directory and moved into place only
    when every requested variant has passed its gate. An existing `out_dir` must be empty,
    or hold a bundle that `overwrite` replaces; anything else is refused before any work.
    """
    wanted = parse_precisions(precisions)
    out_dir = Path(out_dir).expanduser().resolve()
    _check_target(out_dir, overwrite)
    progress = progress or console_progress()
    source = read_source(source_dir, model_id=model_id, revision=revision, max_length=max_length, task=task,
                         max_pixels=max_pixels)
    draft = source.manifest
    probe_langs = _languages(languages, draft)
    if "image" in draft.modalities and draft.vl is None and any(variant_format(p) == "mlx" for p in wanted):
        raise ExportError(f"{draft.model_id} is a dual encoder, and the MLX backend runs text models and the text "
                          "path of vision-language models only; export ONNX variants")
    if draft.task == "rerank" and any(variant_format(p) == "mlx" for p in wanted):
        raise ExportError(f"{draft.model_id} is a reranker, and the MLX backend runs embedders only; export ONNX "
                          "variants")
    if any(variant_format(p) == "mlx" for p in wanted):
        _check_mlx_can_export(draft)
    if draft.vl is not None:
        what = {"rerank": "reranker (queries and documents of texts, images or both; P(yes) against P(no) at the "
                          "last token)",
                "multivector": f"multi-vector model (a {draft.dim}-dim vector per token, scored by MaxSim; head "
                               f"{draft.multivector.head if draft.multivector else ''})",
                }.get(draft.task, f"embedder (texts, images and both in one input), dim {draft.dim}")
        progress(f"{draft.model_id}: {draft.architecture} {what}, max length {draft.max_length}, images "
                 f"{draft.image.min_pixels}..{draft.image.max_pixels} pixels ({draft.image.tokens} visual tokens at "
                 "most)")
        if task is None and draft.task != "multivector":
            progress(f"exported as {'a reranker' if draft.task == 'rerank' else 'an embedder'}, as its name says; "
                     "--task embed or --task rerank decides it")
    elif "image" in draft.modalities:
        h, w = draft.image.output_size
        progress(f"{draft.model_id}: {draft.architecture} dual encoder (text and images), dim {draft.dim}, text max "
                 f"length {draft.max_length}, images {w}x{h} ({draft.image.tokens} visual tokens)")
    elif draft.task == "rerank":
        scored = ("P(yes) against P(no) at the last token" if draft.rerank.format == "template"
                  else f"one classifier logit{', sigmoid' if draft.rerank.activation == 'sigmoid' else ''}")
        progress(f"{draft.model_id}: {draft.architecture} reranker, {scored}, {draft.padding_side} padding, "
                 f"max length {draft.max_length}")
    else:
        progress(
            f"{draft.model_id}: {draft.architecture}, {draft.pooling} pooling, {draft.padding_side} "
            f"padding, dim {draft.dim}, max length {draft.max_length}"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        manifest = _build(source, work, wanted, gates, progress, int8_recipe, probe_langs)
        _check_target(out_dir, overwrite)  # again: the folder may have changed during the export
        _move_into_place(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"bundle written to {out_dir}")
    return manifest


def _languages(asked: Sequence[str] | None, manifest: Manifest) -> tuple[str, ...]:
    if asked is None:
        return probe_languages(manifest)
    wanted = tuple(dict.fromkeys(lang.strip() for lang in asked if lang.strip()))
    unknown = [lang for lang in wanted if lang not in PROBE_LANGUAGES]
    if unknown or not wanted:
        raise ExportError(f"probe languages must be some of {', '.join(PROBE_LANGUAGES)}, got {list(asked)!r}")
    return wanted


def _release_freed_memory() -> None:
    """Collect cycles and hand freed heap pages back to the OS (glibc keeps them otherwise),
    so one variant's ONNX Runtime session stops counting before the next one loads."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _fuse(source: SourceModel, raw: Path, fp32: Path, quant_base: Path | None) -> dict:
    """The shipped FP32 graph, fully fused; and, for the quantized variants of a BERT-family
    model, the same graph with attention fused after its Q/K/V projections, which the INT8
    and INT4 recipes quantize (a fused Attention op would keep them in FP32)."""
    from .fusion import fuse_graph

    config = json.loads((source.path / "config.json").read_text())
    family = "qwen3" if source.manifest.architecture == "qwen3" else "bert"
    shape = {"num_heads": int(config.get("num_attention_heads", 0)), "hidden_size": int(config.get("hidden_size", 0))}
    # Qwen3's attention has no pattern the optimizer knows: the export wrote it fused
    # (export/attention.py); the optimizer fuses its norms.
    recipe = fuse_graph(raw, fp32, family=family, attention=family == "bert", **shape)
    if quant_base is not None and family == "bert":
        fuse_graph(raw, quant_base, family=family, for_quantization=True, **shape)
    return recipe


def _build(source: SourceModel, work: Path, wanted: tuple[str, ...], gates: Gates, progress: Progress,
           int8_recipe: str, languages: tuple[str, ...]) -> Manifest:
    from .graph import MIN_ONNXRUNTIME, ONNX_OPSET, exporter_name

    draft = source.manifest
    if draft.vl is not None:
        from .vl import build_vl

        return build_vl(source, work, wanted, gates, progress)
    if "image" in draft.modalities:
        from .dual import build_dual

        return build_dual(source, work, wanted, gates, progress)
    for name in source.copied_files:
        shutil.copyfile(source.path / name, work / name)
    tokenizer = BundleTokenizer(work / "tokenizer.json", draft)
    groups, pairs, retrieval = None, None, None
    if draft.task == "rerank":
        texts, seqs, groups, (queries, documents) = _rerank_probes(tokenizer)
        pairs = (queries, documents, groups)
        progress(f"{len(texts)} probe pairs: {len(set(queries))} queries x {len(texts) // len(set(queries))} documents")
    else:
        texts = _probe_set(tokenizer, draft)
        seqs = tokenizer.encode(texts)
    if draft.task == "embed" and gates.ranks({"int8", "int4"} & set(wanted)):
        # The quantized variants are judged by how they rank too (FP16 and FP32 keep cosine
        # >= 0.999, where the ranking does not move), unless every ranking floor is set to 0:
        # then the corpus (a PyTorch pass and one per candidate) is not run at all.
        retrieval = _RetrievalSet.build(tokenizer, draft, languages)
        progress(f"retrieval probes ({', '.join(languages)}): {len(retrieval.query_seqs)} queries against "
                 f"{len(retrieval.passage_seqs)} passages")

    mlx_wanted = tuple(p for p in wanted if variant_format(p) == "mlx")
    raw_path = work / "model.export.onnx"
    job = {"source": source, "work": work, "texts": texts, "seqs": seqs, "mlx_wanted": mlx_wanted,
           "raw_path": raw_path, "pairs": pairs, "batch_tokens": _REFERENCE_BATCH_TOKENS,
           "retrieval_seqs": retrieval.seqs if retrieval else [],
           "reference_path": reference_path(source, seqs, retrieval.seqs if retrieval else [],
                                            _REFERENCE_BATCH_TOKENS)}
    raw_external, mlx_recipes = run_torch_stage(job, work, progress)
    if retrieval is not None:
        retrieval.reference = retrieval.split(np.load(work / RETRIEVAL_REFERENCE_FILE))
        (work / RETRIEVAL_REFERENCE_FILE).unlink()
    with np.load(work / GOLDEN_FILE) as golden:
        reference = golden["logits"][:, None] if pairs is not None else golden["vectors"]
    mlx_weights = {p: (work / f"model.{p}.safetensors", mlx_recipes[p]) for p in mlx_wanted}
    progress("fusing the graph (ONNX Runtime transformer optimizer)")
    fp32_path, quant_base = work / "model.fp32.onnx", work / "model.quant-base.onnx"
    fusion = _fuse(source, raw_path, fp32_path, quant_base if {"int8", "int4"} & set(wanted) else None)
    for name in [raw_path.name, *raw_external]:
        (work / name).unlink()
    if not quant_base.exists():
        quant_base = fp32_path
    progress(f"fused: {', '.join(f'{n} {op}' for op, n in fusion['fused_ops'].items()) or 'no patterns matched'}")
    run = _Runner(draft, seqs, groups, retrieval)

    built: dict[str, tuple[Path, dict, Parity]] = {}
    recipe = {"method": f"torch.onnx.export ({exporter_name(source)})", **fusion, "batch_invariant": True}
    parity = run.parity(fp32_path, reference, texts, recipe)
    progress(f"fp32 parity: {describe(parity)}")
    check_gate("fp32", parity, gates)
    built["fp32"] = (fp32_path, recipe, parity)

    if "fp16" in wanted:
        from .quantize import to_fp16

        progress("converting to FP16")
        path = work / "model.fp16.onnx"
        recipe = to_fp16(fp32_path, path)
        parity = run.parity(path, reference, texts, recipe)
        progress(f"fp16 parity: {describe(parity)}")
        check_gate("fp16", parity, gates)
        built["fp16"] = (path, recipe, parity)

    if "int8" in wanted:
        progress("quantizing to INT8")
        built["int8"] = _search_int8(quant_base, work, run, reference, texts, gates, progress, recipe=int8_recipe)

    if "int4" in wanted:
        progress("quantizing to INT4 (weight-only)")
        built["int4"] = _search_int4(quant_base, work, run, reference, texts, gates, progress)
    for precision in ("int8", "int4"):
        if precision in built:
            path, recipe, parity = built[precision]
            speed = _time_against_fp32(fp32_path, path, recipe, draft)
            built[precision] = (path, {**recipe, "speed": speed}, parity)
            shown = ", ".join(f"{shape} {ratio:.2f}x" for shape, ratio in speed["vs_fp32"].items())
            progress(f"{precision} speed against fp32 here ({speed['cpu']}, {speed['int8_kernels']} int8 kernels, "
                     f"{speed['threads']} threads): {shown}")
            if min(speed["vs_fp32"].values()) < 1.0:
                _warn_slower(precision, speed)
    if quant_base != fp32_path:
        remove_graph(quant_base)

    for precision, (path, recipe) in mlx_weights.items():
        from .mlx_weights import mlx_encoder

        progress(f"checking the {precision} variant with MLX")
        parity = measure_parity(reference, run.vectors(mlx_encoder(work, path, draft)), texts)
        progress(f"{precision} parity: {describe(parity)}")
        check_gate(precision, parity, gates)
        built[precision] = (path, recipe, parity)

    if "fp32" not in wanted:
        remove_graph(fp32_path)
        del built["fp32"]

    variants = {}
    for precision, (path, recipe, parity) in built.items():
        recipe = {**recipe, "gate": gates.record(precision, draft.task)}
        onnx = variant_format(precision) == "onnx"
        extra = data_files(path) if onnx else ()
        variants[precision] = Variant(
            precision=precision,
            file=path.name,
            sha256=file_sha256(path),
            bytes=path.stat().st_size + sum((work / name).stat().st_size for name in extra),
            format=variant_format(precision),
            opset=recipe.get("opset", ONNX_OPSET) if onnx else None,
            min_onnxruntime=MIN_ONNXRUNTIME if onnx else None,
            recipe=recipe,
            parity=parity,
            external_data=extra,
        )
    return finish_bundle(work, draft, [*source.copied_files, GOLDEN_FILE], variants)
