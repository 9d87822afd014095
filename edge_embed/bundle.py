"""Opening a bundle directory and proving its files are the ones the manifest names."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError
from .manifest import Manifest, Variant

__all__ = ["Bundle", "GoldenImage", "load_bundle", "file_sha256", "MANIFEST_FILE", "TOKENIZER_FILE", "GOLDEN_FILE"]

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
GOLDEN_FILE = "golden.npz"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory and its manifest."""

    path: Path
    manifest: Manifest

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    def variant(self, precision: str) -> Variant:
        try:
            return self.manifest.variants[precision]
        except KeyError:
            have = ", ".join(self.manifest.variants) or "none"
            raise BundleError(
                f"bundle {self.path} has no {precision} variant (it has: {have})"
            ) from None

    def verify_variant(self, precision: str) -> Path:
        """Check the variant's file (and external data) against the manifest; return its path."""
        variant = self.variant(precision)
        path = self.path / variant.file
        _verify(path, variant.sha256, f"{precision} model")
        for name in variant.external_data:
            _verify(self.path / name, self.manifest.files.get(name), f"{precision} external data")
        return path

    def verify_vision(self, precision: str) -> Path:
        """Check the variant's vision graph against the manifest; return its path."""
        vision = self.variant(precision).vision
        if vision is None:
            raise BundleError(f"the {precision} variant of {self.path} has no vision graph")
        path = self.path / vision.file
        _verify(path, vision.sha256, f"{precision} vision graph")
        for name in vision.external_data:
            _verify(self.path / name, self.manifest.files.get(name), f"{precision} vision graph's external data")
        return path

    def golden_images(self) -> tuple[list[str], list[bytes], np.ndarray]:
        """The probe images (names, encoded bytes) and their FP32 PyTorch reference vectors."""
        with np.load(self.path / GOLDEN_FILE, allow_pickle=False) as data:
            blob, offsets = data["image_bytes"].tobytes(), data["image_offsets"].tolist()
            images = [blob[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
            return [str(n) for n in data["image_names"]], images, data["image_vectors"].astype(np.float32)

    def golden(self) -> tuple[list[str], np.ndarray]:
        """The probe texts and their FP32 PyTorch reference vectors (pooled, not normalized)."""
        with np.load(self.path / GOLDEN_FILE, allow_pickle=False) as data:
            return [str(t) for t in data["texts"]], data["vectors"].astype(np.float32)

    def golden_pairs(self) -> tuple[list, list, np.ndarray, np.ndarray]:
        """A reranker's probe pairs: queries, documents, the query group of each pair and
        the FP32 PyTorch reference logits. A query or document is a text, or, for a
        vision-language reranker, a list of parts: texts and GoldenImage."""
        with np.load(self.path / GOLDEN_FILE, allow_pickle=False) as data:
            queries, documents = [str(t) for t in data["queries"]], [str(t) for t in data["documents"]]
            if "image_names" in data:
                names = [str(n) for n in data["image_names"]]
                blob, offsets = data["image_bytes"].tobytes(), data["image_offsets"].tolist()
                images = {n: GoldenImage(n, blob[a:b]) for n, a, b in zip(names, offsets[:-1], offsets[1:])}
                queries, documents = ([_golden_parts(x, images) for x in xs] for xs in (queries, documents))
            return (queries, documents, data["groups"].astype(np.int64),
                    data["logits"].astype(np.float32).reshape(-1))


    def golden_multivector(self) -> tuple[list[str], list[list], list[np.ndarray]]:
        """A multi-vector model's probes: each input's kind ("query" or "document"), its
        parts (texts and GoldenImage), and its FP32 reference token vectors."""
        with np.load(self.path / GOLDEN_FILE, allow_pickle=False) as data:
            names = [str(n) for n in data["image_names"]]
            blob, offsets = data["image_bytes"].tobytes(), data["image_offsets"].tolist()
            images = {n: GoldenImage(n, blob[a:b]) for n, a, b in zip(names, offsets[:-1], offsets[1:])}
            kinds, parts = [], []
            for encoded in data["inputs"]:
                try:
                    item = json.loads(str(encoded))
                    kinds.append(item["kind"])
                    parts.append([p["text"] if "text" in p else images[p["image"]] for p in item["parts"]])
                except (ValueError, TypeError, KeyError) as exc:
                    raise BundleError(f"golden input {str(encoded)[:60]!r} is malformed: {exc}") from exc
            vectors, bounds = data["token_vectors"].astype(np.float32), data["token_offsets"].tolist()
            return kinds, parts, [vectors[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass(frozen=True)
class GoldenImage:
    """One image of the golden pairs: its probe name and encoded bytes."""

    name: str
    data: bytes


def _golden_parts(encoded: str, images: dict[str, GoldenImage]) -> list:
    """A golden input stored as JSON parts ({"text": ...} or {"image": name}) -> texts and images."""
    try:
        parts = json.loads(encoded)
        return [p["text"] if "text" in p else images[p["image"]] for p in parts]
    except (ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"golden pair input {encoded[:60]!r} is malformed: {exc}") from exc


def _verify(path: Path, expected: str | None, what: str) -> None:
    if expected is None:
        raise BundleError(f"manifest lists no sha256 for {path.name} ({what})")
    if not path.is_file():
        raise BundleError(f"bundle file {path.name} ({what}) is missing from {path.parent}")
    actual = file_sha256(path)
    if actual != expected:
        raise BundleError(
            f"bundle file {path.name} ({what}) fails its checksum: sha256 {actual[:12]}... "
            f"but the manifest says {expected[:12]}...; the bundle is altered or corrupt"
        )


def load_bundle(path: str | Path) -> Bundle:
    """Read the manifest and verify every shared file (tokenizer, golden vectors, configs).

    Model files are verified when a variant is chosen, so that opening a bundle with
    three variants does not hash all three.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise BundleError(f"bundle {path} does not exist or is not a directory")
    manifest = Manifest.read(path / MANIFEST_FILE)
    if TOKENIZER_FILE not in manifest.files:
        raise BundleError(f"manifest of {path} lists no {TOKENIZER_FILE}")
    for name, digest in manifest.files.items():
        if not any(name in v.data_files for v in manifest.variants.values()):
            _verify(path / name, digest, "bundle file")
    return Bundle(path=path, manifest=manifest)
