"""Fidelity figures of a variant against the FP32 reference, and the gates they must pass.

Used twice: by the export before a variant is written, and by the runtime at load, on
the device, against the bundle's golden vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import GateError
from .manifest import MultiVectorParity, Parity, RetrievalParity, ScoreParity

__all__ = ["Gates", "measure_parity", "measure_score_parity", "scores_from_logits", "gate_failure", "check_gate",
           "batch_probe_indices", "alone_vs_batch_cos", "alone_vs_batch_diff", "pair_name", "measure_retrieval", "fidelity_summary",
           "maxsim", "measure_multivector_parity", "alone_vs_batch_token_cos"]

BATCH_PROBES = 32


@dataclass(frozen=True, kw_only=True)
class Gates:
    """Minimum cosine similarity to the PyTorch FP32 reference, per precision."""

    fp32_cos_min: float = 0.9999
    fp16_cos_min: float = 0.999
    int8_cos_mean: float = 0.995
    int8_cos_min: float = 0.98
    # Weight-only 4-bit, for the large models where memory decides what fits.
    int4_cos_mean: float = 0.98
    int4_cos_min: float = 0.95
    # A text alone vs inside a batch of mixed lengths: the "same text, same vector" promise.
    batch_cos_min: float = 0.99999
    # Quantized embedders: the ranking of the retrieval probe corpus (RetrievalParity).
    # Set on MiniLM (AVX2): the per-token INT8 with 7-bit weights, which lost 1 % MRR on a
    # held-out set, keeps 0.936 of the top 10 with Spearman 0.968; 8-bit weights with
    # SmoothQuant keep 0.960 and 0.986. (FP16 and FP32 are judged by cosine: at >= 0.999
    # the ranking does not move.)
    int8_topk_kept: float = 0.95
    int8_spearman: float = 0.98
    # MiniLM INT4 (blocks of 32) keeps 0.855 and 0.873, and 99.8 % of the MRR.
    int4_topk_kept: float = 0.8
    int4_spearman: float = 0.85
    # MRR@10 of the labelled pairs against the reference's: losing 0.5 % refuses a variant
    # (int4: 2 %). Judged when the reference's MRR is at least `retrieval_min_reference_mrr`.
    quantized_mrr_ratio: float = 0.995
    int4_mrr_ratio: float = 0.98
    retrieval_min_reference_mrr: float = 0.5
    # Rerankers: the largest |score diff| on the probe pairs (scores in [0, 1] after the
    # sigmoid), per precision, and the order of each query's documents against FP32's.
    fp32_score_diff_max: float = 1e-3
    fp16_score_diff_max: float = 0.02
    int8_score_diff_max: float = 0.05
    int4_score_diff_max: float = 0.1
    rank_kendall_tau_mean: float = 0.9
    rank_top1_agreement: float = 0.9
    # A pair alone vs inside a batch: the "same pair, same score" promise.
    batch_score_diff_max: float = 1e-4
    # Multi-vector models: each token's vector by cosine (the cos_min floors above, FP32 and
    # FP16), the MaxSim scores of the probe queries against the probe pages relative to
    # FP32's, and, for every precision, each query's order of the pages (the rank_ floors).
    fp32_maxsim_rel_diff_max: float = 1e-4
    fp16_maxsim_rel_diff_max: float = 0.01

    def record(self, precision: str, task: str = "embed") -> dict[str, float]:
        """The figures a variant was exported under, kept in its recipe so every device
        judges it by the gate it was shipped with."""
        if task == "rerank":
            return {**self.limits(precision, task), "batch_diff_max": self.batch_score_diff_max}
        return {**self.limits(precision, task), "batch_cos_min": self.batch_cos_min}

    @classmethod
    def recorded(cls, precision: str, recipe: dict) -> Gates:
        """The gates a variant was exported under; bundles that predate the record were
        shipped under the INT8 gate of their time (cos mean 0.99, min 0.97)."""
        kept = recipe.get("gate")
        if not kept:
            return cls(int8_cos_mean=0.99, int8_cos_min=0.97)
        prefix = {"fp32": "fp32", "mlx-fp32": "fp32", "fp16": "fp16", "mlx-fp16": "fp16", "int4": "int4"}.get(
            precision, "int8")
        if "top1_agreement" in kept and "score_diff_max" not in kept:  # a multi-vector model
            values = {f"rank_{f}": kept[f] for f in ("kendall_tau_mean", "top1_agreement")}
            values.update({f"{prefix}_{f}": kept[f] for f in ("cos_min", "maxsim_rel_diff_max") if f in kept})
            values["batch_cos_min"] = kept.get("batch_cos_min", cls.batch_cos_min)
            return cls(**values)
        if "score_diff_max" in kept:
            values = {f"{prefix}_score_diff_max": kept["score_diff_max"]}
            values.update({f"rank_{f}": kept[f] for f in ("kendall_tau_mean", "top1_agreement") if f in kept})
            if "batch_diff_max" in kept:
                values["batch_score_diff_max"] = kept["batch_diff_max"]
            return cls(**values)
        # The ranking figures are judged at export only (the runtime has no probe corpus).
        values = {f"{prefix}_{figure}": value for figure, value in kept.items() if figure in ("cos_min", "cos_mean")}
        if "batch_cos_min" in kept:
            values["batch_cos_min"] = kept["batch_cos_min"]
        return cls(**values)

    def ranks(self, precisions) -> bool:
        """Whether a ranking figure can refuse one of `precisions` (a floor above zero)."""
        return any(limit > 0 for precision in precisions
                   for figure, limit in self.limits(precision).items() if figure in RETRIEVAL_FIGURES)

    def limits(self, precision: str, task: str = "embed") -> dict[str, float]:
        """The figures a precision is judged by: {"cos_min": x, ...}. Figures named
        `*_max` are ceilings, the others floors."""
        if task == "rerank":
            prefix = {"fp32": "fp32", "fp16": "fp16", "int4": "int4"}.get(precision, "int8")
            return {"score_diff_max": getattr(self, f"{prefix}_score_diff_max"),
                    "kendall_tau_mean": self.rank_kendall_tau_mean, "top1_agreement": self.rank_top1_agreement}
        if task == "multivector":
            # 16 and 32 bits by each token's vector and the MaxSim scores; the quantized
            # variants by the ranking MaxSim gives, which is what a retriever consumes.
            order = {"kendall_tau_mean": self.rank_kendall_tau_mean, "top1_agreement": self.rank_top1_agreement}
            if precision in ("fp32", "fp16"):
                return {"cos_min": getattr(self, f"{precision}_cos_min"),
                        "maxsim_rel_diff_max": getattr(self, f"{precision}_maxsim_rel_diff_max"), **order}
            return order
        if precision in ("fp32", "mlx-fp32"):
            return {"cos_min": self.fp32_cos_min}
        if precision in ("fp16", "mlx-fp16"):
            return {"cos_min": self.fp16_cos_min}
        if precision == "int4":
            return {"cos_mean": self.int4_cos_mean, "cos_min": self.int4_cos_min, "topk_kept": self.int4_topk_kept,
                    "spearman": self.int4_spearman, "mrr_ratio": self.int4_mrr_ratio}
        return {"cos_mean": self.int8_cos_mean, "cos_min": self.int8_cos_min, "topk_kept": self.int8_topk_kept,
                "spearman": self.int8_spearman, "mrr_ratio": self.quantized_mrr_ratio}


def _unit(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def measure_parity(reference: np.ndarray, candidate: np.ndarray, texts: list[str], topk: int = 10) -> Parity:
    """Cosine to the reference per text, and how often each text keeps its top-k neighbours."""
    ref, cand = _unit(reference), _unit(candidate)
    cos = np.sum(ref * cand, axis=1)
    k = max(1, min(topk, len(texts) - 1))
    agreement = 1.0
    if len(texts) > 1:
        sim_ref, sim_cand = ref @ ref.T, cand @ cand.T
        np.fill_diagonal(sim_ref, -np.inf)
        np.fill_diagonal(sim_cand, -np.inf)
        top_ref = np.argsort(-sim_ref, axis=1)[:, :k]
        top_cand = np.argsort(-sim_cand, axis=1)[:, :k]
        agreement = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_cand)]))
    worst = int(np.argmin(cos))
    return Parity(
        probes=len(texts),
        cos_min=round(float(cos[worst]), 6),
        cos_mean=round(float(cos.mean()), 6),
        topk=k,
        topk_agreement=round(agreement, 4),
        worst_text=texts[worst],
    )


RETRIEVAL_TOPK = 10
RETRIEVAL_FIGURES = ("topk_kept", "spearman", "mrr_ratio")
_SPEARMAN_DEPTH = 100


def _ranks_in(order: np.ndarray, items: np.ndarray) -> np.ndarray:
    """1-based rank of items[q] in each row of `order` (passage indices, best first)."""
    return np.argmax(order == items[:, None], axis=1) + 1


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)).astype(np.float64), np.argsort(np.argsort(b)).astype(np.float64)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else 1.0


def measure_retrieval(reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray],
                      relevant: np.ndarray, queries: list[str], languages: tuple[str, ...],
                      topk: int = RETRIEVAL_TOPK) -> RetrievalParity:
    """Rank the probe passages for every probe query with the reference's vectors and with
    the candidate's, and say how much of the reference's ranking the candidate keeps.

    `reference` and `candidate` are (query vectors, passage vectors); `relevant[q]` is the
    passage query q was written for. See RetrievalParity for the figures.
    """
    ref_q, ref_p = (_unit(v) for v in reference)
    cand_q, cand_p = (_unit(v) for v in candidate)
    ref_scores, cand_scores = ref_q @ ref_p.T, cand_q @ cand_p.T
    ref_order = np.argsort(-ref_scores, axis=1, kind="stable")
    cand_order = np.argsort(-cand_scores, axis=1, kind="stable")
    k = min(topk, ref_scores.shape[1])
    kept = np.array([len(set(a) & set(b)) / k for a, b in zip(ref_order[:, :k], cand_order[:, :k])])
    depth = min(_SPEARMAN_DEPTH, ref_scores.shape[1])
    spearman = [_spearman(ref_scores[q, ref_order[q, :depth]], cand_scores[q, ref_order[q, :depth]])
                for q in range(len(queries))]
    first = _ranks_in(cand_order, ref_order[:, 0])

    def mrr(order: np.ndarray) -> float:
        rank = _ranks_in(order, relevant)
        return float(np.mean(np.where(rank <= k, 1.0 / rank, 0.0)))

    reference_mrr = mrr(ref_order)
    return RetrievalParity(
        queries=len(queries),
        passages=ref_scores.shape[1],
        languages=tuple(languages),
        topk=k,
        topk_kept=round(float(kept.mean()), 5),
        spearman=round(float(np.mean(spearman)), 5),
        mrr_ratio=round(mrr(cand_order) / reference_mrr, 5) if reference_mrr > 0 else 1.0,
        reference_mrr=round(reference_mrr, 5),
        top1_rr=round(float(np.mean(np.where(first <= k, 1.0 / first, 0.0))), 5),
        worst_query=queries[int(np.argmin(kept))],
    )


def batch_probe_indices(lengths: list[int], count: int = BATCH_PROBES, max_tokens: int | None = None) -> list[int]:
    """`count` texts spread from the shortest to the longest: a batch of mixed lengths, so
    most rows carry padding (left or right, as the model pads). With `max_tokens`, only
    texts short enough that the padded batch stays within it (a device's token budget)."""
    limit = max_tokens // count if max_tokens is not None else None
    allowed = [i for i, n in enumerate(lengths) if limit is None or n <= limit] or [int(np.argmin(lengths))]
    order = [allowed[k] for k in np.argsort(np.asarray([lengths[i] for i in allowed]), kind="stable")]
    picks = np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int)
    return [int(order[i]) for i in sorted(set(picks.tolist()))]


def alone_vs_batch_cos(alone: np.ndarray, batched: np.ndarray) -> float:
    """The worst cosine between each text's vector alone and in the batch."""
    return round(float(np.sum(_unit(alone) * _unit(batched), axis=1).min()), 7)


def pair_name(query: str, document: str) -> str:
    """How reports (and a variant's worst probe) name a reranker's probe pair."""
    return f"{query[:40]} || {document[:80]}"


def scores_from_logits(logits: np.ndarray, activation: str) -> np.ndarray:
    """A reranker graph's logits [n] or [n, 1] -> scores [n] (float64 for the comparisons)."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    return 1.0 / (1.0 + np.exp(-logits)) if activation == "sigmoid" else logits


def _kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b between two score lists of one query (ties in either count as neither)."""
    i, j = np.triu_indices(len(a), 1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    n_a, n_b = np.count_nonzero(da), np.count_nonzero(db)
    if n_a == 0 or n_b == 0:
        return 1.0 if n_a == n_b else 0.0
    return float(np.sum(da * db) / np.sqrt(n_a * n_b))


def measure_score_parity(reference: np.ndarray, candidate: np.ndarray, groups: np.ndarray, pairs: list[str],
                         activation: str) -> ScoreParity:
    """Scores against the reference's, and how each query's documents keep their order.

    `reference` and `candidate` are graph logits per pair; `groups[i]` is the query pair
    i belongs to; `pairs` names each pair for the report.
    """
    ref, cand = scores_from_logits(reference, activation), scores_from_logits(candidate, activation)
    diff = np.abs(ref - cand)
    taus, top1 = [], []
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        taus.append(_kendall_tau(ref[rows], cand[rows]))
        top1.append(float(np.argmax(ref[rows]) == np.argmax(cand[rows])))
    worst = int(np.argmax(diff))
    return ScoreParity(
        probes=len(pairs),
        queries=len(taus),
        score_diff_max=round(float(diff[worst]), 6),
        score_diff_mean=round(float(diff.mean()), 6),
        kendall_tau_min=round(float(min(taus)), 4),
        kendall_tau_mean=round(float(np.mean(taus)), 4),
        top1_agreement=round(float(np.mean(top1)), 4),
        worst_pair=pairs[worst],
    )


def alone_vs_batch_diff(alone: np.ndarray, batched: np.ndarray, activation: str) -> float:
    """The largest |score diff| between each pair scored alone and in the batch."""
    return round(float(np.abs(scores_from_logits(alone, activation) - scores_from_logits(batched, activation)).max()),
                 7)


def gate_failure(precision: str, parity: Parity | ScoreParity, gates: Gates) -> GateError | None:
    """The error for the first figure past its gate, or None when the variant passes."""
    task = ("rerank" if isinstance(parity, ScoreParity) else
            "multivector" if isinstance(parity, MultiVectorParity) else "embed")
    for figure, limit in gates.limits(precision, task).items():
        worst = parity.worst_text
        if figure in RETRIEVAL_FIGURES:
            retrieval = parity.retrieval
            if retrieval is None:  # measured at export only, on the retrieval probe corpus
                continue
            if figure == "mrr_ratio" and retrieval.reference_mrr < gates.retrieval_min_reference_mrr:
                continue
            value, worst = getattr(retrieval, figure), retrieval.worst_query
            figure = f"retrieval {figure}"
        else:
            value = getattr(parity, figure)
        above = figure.endswith("_max")
        if (value > limit) if above else (value < limit):
            return GateError(precision, figure, value, limit, worst, above=above)
    if isinstance(parity, ScoreParity):
        if parity.batch_diff_max is not None and parity.batch_diff_max > gates.batch_score_diff_max:
            return GateError(precision, "batch_diff_max (alone vs in a batch)", parity.batch_diff_max,
                             gates.batch_score_diff_max, parity.worst_text, above=True)
        return None
    if parity.batch_cos_min is not None and parity.batch_cos_min < gates.batch_cos_min:
        return GateError(precision, "batch_cos_min (alone vs in a batch)", parity.batch_cos_min,
                         gates.batch_cos_min, parity.worst_text)
    return None


def fidelity_summary(parity: Parity | ScoreParity | MultiVectorParity) -> str:
    """A variant's fidelity to FP32 in a few words: cosine (and, for a quantized embedder,
    the ranking it keeps) for vectors, score and order for scores."""
    if isinstance(parity, MultiVectorParity):
        return (f"token cos min {parity.cos_min:.4f}, MaxSim rel diff max {parity.maxsim_rel_diff_max:.2e}, "
                f"Kendall tau mean {parity.kendall_tau_mean:.3f}, top-1 {parity.top1_agreement:.3f}")
    if isinstance(parity, ScoreParity):
        return f"score diff max {parity.score_diff_max:.4f}, Kendall tau mean {parity.kendall_tau_mean:.3f}"
    text = f"cos min {parity.cos_min:.4f}"
    r = parity.retrieval
    if r is not None:
        text += (f", ranking of {r.queries} probe queries ({', '.join(r.languages)}): top-{r.topk} kept "
                 f"{r.topk_kept:.3f}, Spearman {r.spearman:.3f}, MRR {r.mrr_ratio:.1%} of FP32's")
    return text


def check_gate(precision: str, parity: Parity | ScoreParity, gates: Gates) -> None:
    failure = gate_failure(precision, parity, gates)
    if failure is not None:
        raise failure


def maxsim(query: np.ndarray, pages: list[np.ndarray]) -> np.ndarray:
    """ColBERT's late interaction: for each page, the sum over the query's token vectors of
    their best dot product with the page's token vectors (float32 [len(pages)]). Pages are
    scored on their own rows only: no padding row can win a max."""
    query = np.asarray(query, dtype=np.float32)
    return np.array([float((query @ np.asarray(page, dtype=np.float32).T).max(axis=1).sum()) for page in pages],
                    dtype=np.float32)


def measure_multivector_parity(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str],
                               queries: list[int], pages: list[int]) -> MultiVectorParity:
    """Each token's vector against the reference's (cosine, over every token of every input),
    and the MaxSim scores of `queries` against `pages` (indices into the inputs): their
    difference relative to the reference's largest score, and each query's order of the pages."""
    cos, owner = [], []
    for i, (ref, cand) in enumerate(zip(reference, candidate)):
        if ref.shape != cand.shape:
            raise ValueError(f"{names[i]!r}: {cand.shape} token vectors, the reference has {ref.shape}")
        cos.append((_unit(ref) * _unit(cand)).sum(axis=1))
        owner += [i] * len(ref)
    every = np.concatenate(cos)
    worst = owner[int(np.argmin(every))]
    ref_scores = np.stack([maxsim(reference[q], [reference[p] for p in pages]) for q in queries]).astype(np.float64)
    cand_scores = np.stack([maxsim(candidate[q], [candidate[p] for p in pages]) for q in queries]).astype(np.float64)
    scale = np.abs(ref_scores).max(axis=1, keepdims=True)
    rel = np.abs(cand_scores - ref_scores) / np.maximum(scale, 1e-12)
    taus = [_kendall_tau(r, c) for r, c in zip(ref_scores, cand_scores)]
    top1 = [float(np.argmax(r) == np.argmax(c)) for r, c in zip(ref_scores, cand_scores)]
    return MultiVectorParity(
        probes=len(reference), tokens=int(every.size), cos_min=round(float(every.min()), 6),
        cos_mean=round(float(every.mean()), 6), queries=len(queries), pages=len(pages),
        maxsim_rel_diff_max=round(float(rel.max()), 8), kendall_tau_min=round(float(min(taus)), 4),
        kendall_tau_mean=round(float(np.mean(taus)), 4), top1_agreement=round(float(np.mean(top1)), 4),
        worst_text=names[worst])


def alone_vs_batch_token_cos(alone: list[np.ndarray], batched: list[np.ndarray]) -> float:
    """The worst cosine between an input's token vectors alone and in a batch."""
    return round(float(min((_unit(a) * _unit(b)).sum(axis=1).min() for a, b in zip(alone, batched))), 7)
