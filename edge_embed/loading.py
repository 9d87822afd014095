"""From a bundle to a ready provider on this machine: which variant, which backend, and
the boot parity check that decides whether it may serve."""

from __future__ import annotations

import logging
from pathlib import Path

from .bundle import Bundle, load_bundle
from .errors import BackendUnavailableError
from .manifest import Manifest, variant_format
from .platform import PlatformInfo
from .provider import DEFAULT_PARITY_PROBES, BundleEmbedder

__all__ = ["load", "planned_precision"]

log = logging.getLogger(__name__)


def planned_precision(manifest: Manifest, precision: str = "auto", backend: str = "auto",
                      platform: PlatformInfo | None = None) -> str:
    """The variant `load` would run here, without loading it: what a memory charge must price.

    Follows load's own order (the detector's candidates, those that run a bundle's images
    first, skipping backends the bundle has no variant for); a load that then falls back may
    still run another one.
    """
    from .backends import backend_class
    from .platform import choose_backends, int8_kernel_class, snapshot_platform

    if precision != "auto":
        return precision
    formats = {variant_format(p) for p in manifest.variants}
    platform = platform or snapshot_platform()
    kernels = int8_kernel_class(platform.cpu_flags, platform.is_arm)
    candidates = [c for c in choose_backends(platform, backend) if c.chosen]
    for candidate in _images_first(candidates, manifest) if backend == "auto" else candidates:
        if backend != "auto" or candidate.backend in formats:
            chosen = backend_class(candidate.backend).auto_precision(manifest.variants, candidate.providers, kernels)
            if chosen is not None:
                return chosen
    return next(iter(manifest.variants))


def _images_first(candidates: list, manifest: Manifest) -> list:
    """For a bundle that reads images, the backends whose variants run images come first:
    `auto` never trades a model's images for speed (a Qwen3-VL bundle's MLX variants run its
    texts only; a named backend still runs them)."""
    if "image" not in manifest.modalities:
        return candidates
    with_images = {variant_format(p) for p, v in manifest.variants.items() if v.vision is not None}
    return sorted(candidates, key=lambda c: c.backend not in with_images)


def load(
    bundle: str | Path | Bundle,
    precision: str = "auto",
    backend: str = "auto",
    *,
    parity_probes: int = DEFAULT_PARITY_PROBES,
    enforce_parity: bool = True,
    platform: PlatformInfo | None = None,
    **options: object,
) -> BundleEmbedder:
    """Open a bundle and return a ready provider for this machine: an EmbeddingProvider, or
    for a reranker bundle (manifest task "rerank") one whose `rerank` scores documents.

    `backend="auto"` tries the platform detector's candidates in order (MLX on Apple
    Silicon, TensorRT/CUDA on NVIDIA, ACL, then the CPU; for a bundle that reads images,
    the backends that run its images first) and records every fallback in `info.fallback`.
    A named backend ("onnx", "mlx", "cpu", "cuda", "tensorrt", "acl") that cannot run raises BackendUnavailableError; it never falls back. The provider
    then embeds `parity_probes` golden texts and refuses the variant if it misses its
    gate here (`enforce_parity=False` accepts it; `parity_probes=0` skips the check); a
    refused provider is closed before the error reaches the caller.
    """
    from .backends import backend_class
    from .platform import choose_backends, snapshot_platform

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    forced = backend != "auto"
    candidates = [c for c in choose_backends(platform or snapshot_platform(), backend) if c.chosen]
    formats = {variant_format(p) for p in bundle.manifest.variants}
    skipped: list[str] = []
    text_only: list[str] = []
    if not forced:
        ordered = _images_first(candidates, bundle.manifest)
        # Backends that would have come first but run this bundle's texts only.
        text_only = [c.backend for c in candidates if c.backend in formats and ordered.index(c) > candidates.index(c)]
        candidates = ordered
    for candidate in candidates:
        if not forced and candidate.backend not in formats:
            skipped.append(f"{candidate.backend}: the bundle has no {candidate.backend} variant")
            continue
        kwargs = dict(options)
        if candidate.backend == "onnx":
            kwargs.setdefault("providers", candidate.providers)
            kwargs.setdefault("strict", forced)
        try:
            provider = backend_class(candidate.backend)(bundle, precision, **kwargs)
        except BackendUnavailableError as exc:
            if forced:
                raise
            skipped.append(f"{candidate.backend} {list(candidate.providers)}: {exc}")
            continue
        if text_only and provider.backend_name not in text_only:
            skipped = [f"{b}: its variants run this bundle's texts only (backend='{b}' runs them)"
                       for b in text_only] + skipped
        if skipped:
            provider.fallback = "; ".join(skipped + ([provider.fallback] if provider.fallback else []))
            log.warning("fell back to %s: %s", provider.info.execution_providers[0], provider.fallback)
        if parity_probes:
            try:
                provider.check_parity(parity_probes, enforce=enforce_parity)
            except BaseException:
                provider.close()
                raise
        return provider
    raise BackendUnavailableError(
        "no backend can run this bundle here: " + ("; ".join(skipped) or "no candidate was usable")
    )
