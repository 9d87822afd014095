"""PyTorch reference outputs kept between exports of the same model and probes.

The FP32 reference over the probe texts and the retrieval probe corpus is the longest
PyTorch step of a text export (about a minute for MiniLM on two cores). Exporting the same
source again (another variant, another INT8 recipe, an export that failed its gate and is
retried with other gates) reuses it instead of running PyTorch over ~2,000 texts again.

Reuse must never be silently wrong, so the key is a digest of everything the outputs
depend on: every file of the source model (content, not dates), the draft manifest, the
token ids fed, the batch plan, the code that loads and runs the reference, and the torch,
transformers and NumPy versions. A file that does not load, or whose shapes do not match what
is asked, is recomputed. The newest `KEEP` entries stay under $EDGE_EMBED_CACHE/references.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from ..bundle import file_sha256
from ..default_model import cache_dir
from .source import SourceModel

__all__ = ["reference_path", "load_references", "store_references"]

KEEP = 16
_EXPORT = Path(__file__).resolve().parent
# The code between the source files and the reference outputs.
_CODE = [_EXPORT / "graph.py", _EXPORT / "torch_stage.py", _EXPORT / "source.py", _EXPORT / "reference_cache.py"]
_RUNTIME_CODE = ("tokenization.py", "batching.py", "manifest.py")
_PACKAGES = ("torch", "transformers", "numpy")


def _code_files() -> list[Path]:
    from .. import batching

    runtime = Path(batching.__file__).resolve().parent
    return [*_CODE, *(runtime / name for name in _RUNTIME_CODE)]


def reference_path(source: SourceModel, seqs: list[np.ndarray], retrieval_seqs: list[np.ndarray],
                   batch_tokens: int) -> Path:
    """Where the reference outputs of this source over these token ids are kept."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    for path in sorted(p for p in source.path.rglob("*") if p.is_file()):
        add(f"source:{path.relative_to(source.path)}", file_sha256(path).encode())
    add("manifest", source.manifest.to_json().encode())
    for label, group in (("probe", seqs), ("retrieval", retrieval_seqs)):
        add(label, str(len(group)).encode())
        for seq in group:
            add("ids", np.asarray(seq, dtype=np.int64).tobytes())
    add("batch_tokens", str(batch_tokens).encode())
    for path in _code_files():
        add(f"code:{path.name}", path.read_bytes())
    for package in _PACKAGES:
        try:
            add(package, version(package).encode())
        except PackageNotFoundError:
            add(package, b"absent")
    return cache_dir() / "references" / f"{digest.hexdigest()[:32]}.npz"


def load_references(path: Path, probes: int, retrieval: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(probe outputs, retrieval outputs) kept at `path`, or None when absent or unusable."""
    try:
        with path.open("rb") as handle, np.load(handle, allow_pickle=False) as kept:
            probe, corpus = kept["probe"], kept["retrieval"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if len(probe) != probes or len(corpus) != retrieval or probe.dtype != np.float32:
        return None
    os.utime(path)  # recently used: kept longest
    return probe, corpus


def store_references(path: Path, probe: np.ndarray, retrieval: np.ndarray) -> None:
    """Keep the outputs (atomically: a reader never sees half a file); drop the oldest
    entries beyond KEEP. A cache that cannot be written costs the next export time only."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.npz")
        np.savez(partial, probe=probe, retrieval=retrieval)
        partial.replace(path)
        entries = sorted(path.parent.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in entries[KEEP:]:
            stale.unlink(missing_ok=True)
    except OSError:
        pass
