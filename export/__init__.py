"""The export pipeline: Hugging Face model directory -> validated edge-embed bundle.

Needs the `export` extra (torch, transformers, onnx, onnxscript); the runtime never
imports this package.
"""

from __future__ import annotations

__all__ = ["export", "Gates"]


def __getattr__(name: str):
    if name == "export":
        from .pipeline import export

        return export
    if name == "Gates":
        from ..parity import Gates

        return Gates
    raise AttributeError(name)
