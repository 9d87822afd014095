"""ColQwen3: the Qwen3-VL split of export/vl.py, with the decoder graph ending in the
multi-vector head (every token through the projection, L2-normalized, zero on padding),
gated on each token's vector and on the MaxSim ranking of probe queries against probe pages
against the transformers model.

The reference is the model's own forward (Qwen3VLModel: vision tower, DeepStack, M-RoPE)
on each input alone, its last hidden states through the checkpoint's projection weights,
as ColQwen computes them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import GOLDEN_FILE
from ..errors import ExportError
from ..images import Image
from ..manifest import Manifest, MultiVectorParity
from ..parity import Gates, alone_vs_batch_token_cos, check_gate, measure_multivector_parity
from ..tokenization import BundleTokenizer
from ..vl import VLEncoder, VLInput
from .dual import _quiet_transformers
from .probes import PROBE_CATEGORIES, probe_images, probe_texts
from .vl import _Graphs, _reference, export_graphs, graph_variants
from .writing import finish_bundle, image_variant

__all__ = ["build_multivector", "multi_vectors"]

_QUERIES = 12
_BATCH = 8


def _projection(source: Any, hidden: int, dim: int) -> Any:
    """The checkpoint's head as a torch Linear (bias where it has one)."""
    import torch
    from safetensors import safe_open

    name = source.manifest.multivector.head
    bias_name = name.removesuffix(".weight") + ".bias"
    weight = bias = None
    for file in sorted(source.path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            keys = set(fh.keys())
            if name in keys:
                weight = fh.get_tensor(name).float()
            if bias_name in keys:
                bias = fh.get_tensor(bias_name).float()
    if weight is None:
        raise ExportError(f"{source.path}: the projection {name} is not in its safetensors files")
    linear = torch.nn.Linear(hidden, dim, bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.eval()


def multi_vectors(run: Callable[[list[VLInput]], np.ndarray], seqs: list[VLInput]) -> list[np.ndarray]:
    """Each input's token vectors [its tokens, dim], batches of similar lengths."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[np.ndarray] = [np.empty(0)] * len(seqs)
    for k in range(0, len(order), _BATCH):
        rows = order[k:k + _BATCH]
        tokens = run([seqs[i] for i in rows])
        for j, i in enumerate(rows):
            out[i] = np.ascontiguousarray(tokens[j, : len(seqs[i])], dtype=np.float32)
    return out


def _probes(encoder: VLEncoder) -> tuple[list[VLInput], list[list[Image]], list[str], list[int], list[int],
                                         list[dict], dict[str, bytes]]:
    """Queries (texts through the query template) and pages (the probe images, scans and
    rendered pages among them, and a few images with a caption) through the document
    template; also each input as golden.npz stores it and the images it names."""
    named = dict(probe_images())
    opened = {n: Image.open(data, field=f"probe image {n}") for n, data in named.items()}
    queries = list(PROBE_CATEGORIES["query"][:_QUERIES])
    captions = [t for t in probe_texts() if len(t) < 120]
    names = list(named)
    pages: list[list[tuple[str, str]]] = [[("image", n)] for n in names]
    pages += [[("image", names[i * 5 % len(names)]), ("text", captions[i])] for i in range(4)]
    seqs, originals, labels, stored = [], [], [], []
    for q in queries:
        seqs.append(encoder.encode(q, instruction=None, truncate=True, field="probe query", kind="query"))
        originals.append([])
        labels.append(f"query: {q}")
        stored.append({"kind": "query", "parts": [{"text": q}]})
    for page in pages:
        parts = [opened[v] if k == "image" else v for k, v in page]
        seqs.append(encoder.encode(parts if len(parts) > 1 else parts[0], instruction=None, truncate=True,
                                   field="probe page", kind="document"))
        originals.append([opened[v] for k, v in page if k == "image"])
        labels.append(" + ".join(f"image:{v}" if k == "image" else v for k, v in page))
        stored.append({"kind": "document", "parts": [{k: v} for k, v in page]})
    query_rows = list(range(len(queries)))
    page_rows = list(range(len(queries), len(seqs)))
    return seqs, originals, labels, query_rows, page_rows, stored, named


def save_golden_multivector(work: Path, stored: list[dict], vectors: list[np.ndarray],
                            images: dict[str, bytes]) -> None:
    """golden.npz of a multi-vector model: each input (its kind and JSON parts), every token
    vector of the FP32 reference in one array with each input's offsets, and the images."""
    offsets = np.cumsum([0] + [len(v) for v in vectors]).astype(np.int64)
    image_offsets = np.cumsum([0] + [len(d) for d in images.values()]).astype(np.int64)
    np.savez(work / GOLDEN_FILE, inputs=np.array([json.dumps(s, ensure_ascii=False) for s in stored]),
             token_vectors=np.concatenate(vectors).astype(np.float32), token_offsets=offsets,
             image_names=np.array(list(images)),
             image_bytes=np.frombuffer(b"".join(images.values()), dtype=np.uint8).copy(), image_offsets=image_offsets)


def build_multivector(source: Any, work: Path, wanted: tuple[str, ...], gates: Gates,
                      progress: Callable[[str], None]) -> Manifest:
    import torch
    from transformers import AutoImageProcessor, AutoModel

    draft = source.manifest
    unsupported = [p for p in wanted if p not in ("fp32", "fp16", "int8", "int4")]
    if unsupported:
        raise ExportError(f"{draft.model_id} is a multi-vector model; it exports fp32, fp16, int8 and int4 here, not "
                          f"{', '.join(unsupported)}")
    for name in source.copied_files:
        shutil.copyfile(source.path / name, work / name)
    encoder = VLEncoder(BundleTokenizer(work / "tokenizer.json", draft), draft)
    seqs, originals, names, query_rows, page_rows, stored, named = _probes(encoder)
    progress(f"{len(query_rows)} probe queries, {len(page_rows)} probe pages "
             f"({sum(len(seqs[i]) for i in page_rows):,} page tokens)")

    progress("running the PyTorch reference (the model's own forward and image processor, then its projection)")
    with _quiet_transformers():
        model = AutoModel.from_pretrained(str(source.path), dtype=torch.float32).eval()
        processor = AutoImageProcessor.from_pretrained(str(source.path), use_fast=False)
    projection = _projection(source, draft.vl.hidden_size, draft.dim)
    bounds = {"shortest_edge": draft.image.min_pixels, "longest_edge": draft.image.max_pixels}
    with torch.no_grad():
        reference = _reference(model, processor, seqs, originals, progress, bounds, projection=projection)

    vision_path, decoder_path = export_graphs(model, draft, seqs, work, progress, projection=projection)
    del model

    graphs = _Graphs(draft)
    batch_rows = sorted(set(query_rows[::3] + page_rows[::3]))

    def judge(precision: str, decoder: Path, vision: Path, recipe: dict) -> tuple[MultiVectorParity, MultiVectorParity]:
        run = graphs.runner(decoder, vision, recipe.get("session_config"))
        vectors = multi_vectors(run, seqs)
        picked = [seqs[i] for i in batch_rows]
        batched = run(picked)
        batch = alone_vs_batch_token_cos([multi_vectors(run, [s])[0] for s in picked],
                                         [batched[j, : len(s)] for j, s in enumerate(picked)])
        parity = dataclasses.replace(measure_multivector_parity(reference, vectors, names, query_rows, page_rows),
                                     batch_cos_min=batch)
        progress(f"{precision} parity on {parity.tokens:,} token vectors: cos min {parity.cos_min:.6f} mean "
                 f"{parity.cos_mean:.6f}; MaxSim of {parity.queries} queries x {parity.pages} pages: rel diff max "
                 f"{parity.maxsim_rel_diff_max:.2e}, Kendall tau min {parity.kendall_tau_min:.3f} mean "
                 f"{parity.kendall_tau_mean:.3f}, top-1 kept {parity.top1_agreement:.3f}; alone vs batch {batch}")
        check_gate(precision, parity, gates)
        # The pages are the inputs that hold images: one parity judges both graphs.
        return parity, parity

    built = graph_variants(work, wanted, decoder_path, vision_path, judge, progress)

    save_golden_multivector(work, stored, reference, named)
    variants = {
        precision: image_variant(precision, d_path, d_recipe, d_parity, v_path, v_recipe, v_parity, v_precision,
                                 gates, vision_gate=precision, task="multivector")
        for precision, (d_path, d_recipe, d_parity, v_path, v_recipe, v_parity, v_precision) in built.items()
    }
    return finish_bundle(work, draft, [*source.copied_files, GOLDEN_FILE], variants)
