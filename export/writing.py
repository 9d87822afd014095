"""The last step of every export: the variants' manifest entries, golden files, and the
manifest itself, written into the work folder that becomes the bundle."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..bundle import GOLDEN_FILE, MANIFEST_FILE, file_sha256
from ..manifest import Manifest, Parity, ScoreParity, Variant, VisionGraph
from ..parity import Gates

__all__ = ["finish_bundle", "image_variant", "save_golden_with_images", "save_golden_pairs_with_images"]


def finish_bundle(work: Path, draft: Manifest, shared: list[str], variants: dict[str, Variant]) -> Manifest:
    """The manifest (shared files and the variants' external data hashed, variants, exporter
    versions) written into `work`, every file readable by all."""
    import onnxruntime
    import torch

    external = [name for v in variants.values() for name in v.data_files]
    manifest = dataclasses.replace(
        draft,
        files={name: file_sha256(work / name) for name in dict.fromkeys([*shared, *external])},
        variants=variants,
        exporter={"edge_embed": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    )
    manifest.write(work / MANIFEST_FILE)
    for path in work.iterdir():
        path.chmod(0o644)
    work.chmod(0o755)
    return manifest


def image_variant(precision: str, graph: Path, recipe: dict[str, Any], parity: Parity | ScoreParity, vision: Path,
                  vision_recipe: dict[str, Any], vision_parity: Parity | ScoreParity, vision_precision: str,
                  gates: Gates, *, vision_gate: str, task: str = "embed") -> Variant:
    """A variant of a bundle that reads images: its text or decoder graph, and its vision graph
    with the precision it runs at and the gate (`vision_gate`: a precision) its images are
    judged by. Its bytes are both graphs': what loading it reads. A reranker's parities are
    on scores (the vision graph's: the pairs that hold images). A graph past 2 GB keeps its
    weights in a data file beside it: the variant lists it."""
    from .graph import MIN_ONNXRUNTIME, ONNX_OPSET
    from .onnx_files import data_files

    external, vision_external = data_files(graph), data_files(vision)
    graph_bytes = sum((graph.parent / name).stat().st_size for name in (graph.name, *external))
    vision_bytes = sum((vision.parent / name).stat().st_size for name in (vision.name, *vision_external))
    return Variant(
        precision=precision, file=graph.name, sha256=file_sha256(graph), bytes=graph_bytes + vision_bytes,
        format="onnx", external_data=external,
        opset=recipe.get("opset", ONNX_OPSET), min_onnxruntime=MIN_ONNXRUNTIME,
        recipe={**recipe, "gate": gates.record(precision, task)}, parity=parity,
        vision=VisionGraph(file=vision.name, sha256=file_sha256(vision), bytes=vision_bytes, external_data=vision_external,
                           precision=vision_precision, parity=vision_parity,
                           recipe={**vision_recipe, "gate": gates.record(vision_gate, task)}),
    )


def save_golden_with_images(work: Path, texts: list[str], text_vectors: np.ndarray,
                            images: tuple[tuple[str, bytes], ...], image_vectors: np.ndarray) -> None:
    """golden.npz with the probe images themselves (encoded bytes in one uint8 array, since
    npz holds no list of bytes without pickle), so a device's boot check decodes them too."""
    offsets = np.cumsum([0] + [len(d) for _, d in images]).astype(np.int64)
    np.savez(work / GOLDEN_FILE, texts=np.array([str(t) for t in texts]), vectors=text_vectors,
             image_names=np.array([n for n, _ in images]),
             image_bytes=np.frombuffer(b"".join(d for _, d in images), dtype=np.uint8).copy(),
             image_offsets=offsets, image_vectors=image_vectors)


def save_golden_pairs_with_images(work: Path, queries: list[str], documents: list[str], groups: np.ndarray,
                                  logits: np.ndarray, images: dict[str, bytes]) -> None:
    """golden.npz of a vision-language reranker: each query and document as JSON parts
    ({"text": ...} or {"image": name}), the images they name (encoded bytes, as
    save_golden_with_images stores them), the query groups and the FP32 reference logits."""
    offsets = np.cumsum([0] + [len(d) for d in images.values()]).astype(np.int64)
    np.savez(work / GOLDEN_FILE, queries=np.array(queries), documents=np.array(documents),
             groups=np.asarray(groups, dtype=np.int64), logits=np.asarray(logits, dtype=np.float32).reshape(-1),
             image_names=np.array(list(images)),
             image_bytes=np.frombuffer(b"".join(images.values()), dtype=np.uint8).copy(), image_offsets=offsets)
