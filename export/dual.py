"""Dual encoders (CLIP, SigLIP): a text graph and a vision graph that embed into one vector
space, exported, checked against PyTorch on text and image probes, written as one bundle.

The text graph is the bundle's model file (`model.<precision>.onnx`, input ids in, the
projected text vector out); every variant carries a vision graph (`vision.<precision>.onnx`,
`pixel_values` in, the projected image vector out). The PyTorch reference reads its
pixels through the model's own image processor (transformers), and the runtime through
edge_embed.images, so the gates cover the preprocessing as well as the graphs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..bundle import GOLDEN_FILE
from ..errors import ExportError, GateError
from ..images import Image, ImageSpec
from ..manifest import Manifest, Parity
from ..parity import Gates, alone_vs_batch_cos, batch_probe_indices, check_gate, measure_parity, measure_retrieval
from ..tokenization import BundleTokenizer, model_inputs
from .onnx_files import remove_graph
from .probes import probe_images, probe_texts
from .writing import finish_bundle, image_variant, save_golden_with_images

__all__ = ["DUAL_ARCHITECTURES", "read_dual_source", "build_dual"]

DUAL_ARCHITECTURES = ("clip", "siglip")
VISION_INPUT = "pixel_values"
_BATCH = 16
# Text probes ranked against the image probes for the quantized variants' ranking gate.
_RANKING_QUERIES = 64


def read_dual_source(path: Path, config: dict[str, Any], tokenizer: Tokenizer, tok_config: dict[str, Any], *,
                     model_id: str | None, revision: str | None, max_length: int | None,
                     copied: tuple[str, ...]) -> Any:
    """The draft manifest of a CLIP or SigLIP model directory: its text rules and its
    image processor, pinned."""
    from .source import SourceModel, _token_id

    arch = config["model_type"]
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    if not (path / "preprocessor_config.json").is_file():
        raise ExportError(f"{path} has no preprocessor_config.json: the image processor of a {arch} model must "
                          "travel with it")
    natural = int(text.get("max_position_embeddings") or (77 if arch == "clip" else 64))
    if max_length is not None and not 2 <= max_length <= natural:
        raise ExportError(f"max_length {max_length} is outside what the model supports (2..{natural})")
    pad_id = _token_id(tokenizer, tok_config.get("pad_token"))
    if pad_id is None:
        pad_id = text.get("pad_token_id") if isinstance(text.get("pad_token_id"), int) else 0
    if arch == "clip":
        dim = int(config.get("projection_dim") or 512)
        graph_inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    else:
        dim = int(text.get("projection_size") or text.get("hidden_size") or 768)
        # SigLIP's text tower reads every text padded to its 64 positions, with no mask, and
        # pools the last position: the runtime must pad exactly so.
        graph_inputs = ("input_ids",)
    spec = image_spec(path, arch, vision)
    manifest = Manifest(
        model_id=model_id or path.name,
        revision=revision,
        architecture=arch,
        pooling="head",
        padding_side="right",
        append_eos=False,
        eos_token_id=text.get("eos_token_id") if isinstance(text.get("eos_token_id"), int) else None,
        pad_token_id=int(pad_id),
        max_length=max_length or natural,
        dim=dim,
        matryoshka_min_dim=None,
        instruction_template=None,
        default_instruction=None,
        graph_inputs=graph_inputs,
        modalities=("text", "image"),
        image=spec,
        pad_to_max_length=arch == "siglip",
    )
    return SourceModel(path=path, copied_files=(*copied, "preprocessor_config.json"), manifest=manifest)


def image_spec(path: Path, arch: str, vision: dict[str, Any]) -> ImageSpec:
    """The model's image processor config as an ImageSpec; refused where it asks for steps
    the runtime does not reproduce exactly."""
    from .source import _read_json

    pre = _read_json(path / "preprocessor_config.json")
    for step in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if pre.get(step) is False:
            raise ExportError(f"{path}/preprocessor_config.json turns off {step}; edge-embed reproduces the "
                              "processor with every step on")
    if pre.get("do_pad"):
        raise ExportError(f"{path}/preprocessor_config.json pads images, which edge-embed does not reproduce")
    size, crop = pre.get("size"), pre.get("crop_size")
    fields: dict[str, Any] = {}
    if isinstance(size, int):
        size = {"shortest_edge": size} if arch == "clip" else {"height": size, "width": size}
    if not isinstance(size, dict):
        raise ExportError(f"{path}/preprocessor_config.json has no usable size: {size!r}")
    if size.get("shortest_edge") and not size.get("longest_edge"):
        fields["shortest_edge"] = int(size["shortest_edge"])
    elif size.get("height") and size.get("width"):
        fields.update(height=int(size["height"]), width=int(size["width"]))
    else:
        raise ExportError(f"{path}/preprocessor_config.json asks for a resize edge-embed does not reproduce: {size}")
    if pre.get("do_center_crop", arch == "clip"):
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        if not isinstance(crop, dict):
            raise ExportError(f"{path}/preprocessor_config.json crops without a crop_size")
        fields.update(crop_height=int(crop["height"]), crop_width=int(crop["width"]))
    image_size, patch = int(vision.get("image_size", 224)), int(vision.get("patch_size", 16))
    patches = (image_size // patch) ** 2
    defaults = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    if arch == "siglip":
        defaults = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    spec = ImageSpec(
        processor=arch, **fields, resample=int(pre.get("resample", 3)),
        rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
        mean=tuple(float(x) for x in pre.get("image_mean", defaults[0])),
        std=tuple(float(x) for x in pre.get("image_std", defaults[1])),
        # CLIP's vision tower prepends a class token; SigLIP pools the patches with a head.
        tokens=patches + (1 if arch == "clip" else 0),
    )
    if spec.output_size != (image_size, image_size):
        raise ExportError(f"{path}: the processor makes {spec.output_size} images but the vision tower reads "
                          f"{image_size}x{image_size}")
    return spec


# -- the PyTorch side ------------------------------------------------------------------


def _towers(model: Any) -> tuple[Any, Any]:
    """The model's text and image features as two modules with the graphs' inputs."""
    import torch

    class TextTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None):
            return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    class VisionTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    return TextTower().eval(), VisionTower().eval()


def _reference(source: Any, seqs: list[np.ndarray], images: list[Image]) -> tuple[Any, Any, np.ndarray, np.ndarray,
                                                                                  np.ndarray]:
    """The PyTorch modules and their FP32 vectors: texts through the graph's inputs, images
    through the model's own image processor (not edge-embed's)."""
    import torch
    from transformers import AutoImageProcessor, AutoModel

    with _quiet_transformers():
        model = AutoModel.from_pretrained(str(source.path), dtype=torch.float32).eval()
        processor = AutoImageProcessor.from_pretrained(str(source.path), use_fast=False)
    text, vision = _towers(model)
    manifest = source.manifest
    with torch.no_grad():
        text_vectors = np.concatenate([
            text(*[torch.from_numpy(a) for a in model_inputs(seqs[i:i + _BATCH], manifest).values()]).numpy()
            for i in range(0, len(seqs), _BATCH)])
        pixels = np.stack([np.asarray(processor(images=image.rgb(), return_tensors="np")["pixel_values"][0],
                                      dtype=np.float32) for image in images])
        image_vectors = np.concatenate([vision(torch.from_numpy(pixels[i:i + _BATCH])).numpy()
                                        for i in range(0, len(pixels), _BATCH)])
    return text, vision, text_vectors.astype(np.float32), image_vectors.astype(np.float32), pixels


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' loading chatter (progress bars, processor backend notes) stays off the console."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _export(module: Any, args: tuple, names: list[str], out: Path, axes: dict[str, dict[int, str]]) -> None:
    import torch

    from .graph import ONNX_OPSET

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.from_numpy(a) for a in args), str(out), input_names=names,
                          output_names=["sentence_embedding"],
                          dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False)


# -- the ONNX side ---------------------------------------------------------------------


class _Graphs:
    """Runs a text graph and a vision graph on the probes, in batches, as the runtime does."""

    def __init__(self, manifest: Manifest, seqs: list[np.ndarray], pixels: np.ndarray):
        self.manifest, self.seqs, self.pixels = manifest, seqs, pixels
        self._sessions: dict[tuple[str, str], Any] = {}

    def session(self, path: Path, config: dict[str, str] | None = None):
        """One ONNX Runtime session per graph (the last one only: a big graph's session is
        large, and each graph is judged in one go)."""
        key = (str(path), json.dumps(config or {}, sort_keys=True))
        if key not in self._sessions:
            import onnxruntime as ort

            self._sessions.clear()
            options = ort.SessionOptions()
            options.log_severity_level = 3
            for name, value in (config or {}).items():
                options.add_session_config_entry(name, str(value))
            self._sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def text(self, path: Path, config: dict | None = None, rows: list[int] | None = None) -> np.ndarray:
        session = self.session(path, config)
        seqs = self.seqs if rows is None else [self.seqs[i] for i in rows]
        return np.concatenate([session.run(["sentence_embedding"], model_inputs(seqs[i:i + _BATCH], self.manifest))[0]
                               for i in range(0, len(seqs), _BATCH)])

    def vision(self, path: Path, config: dict | None = None) -> np.ndarray:
        session = self.session(path, config)
        return np.concatenate([session.run(["sentence_embedding"], {VISION_INPUT: self.pixels[i:i + _BATCH]})[0]
                               for i in range(0, len(self.pixels), _BATCH)])

    def text_batch_cos(self, path: Path, config: dict | None = None) -> float:
        """Probe texts alone against the same texts in one batch of mixed lengths."""
        session = self.session(path, config)
        picked = [self.seqs[i] for i in batch_probe_indices([len(s) for s in self.seqs])]
        alone = np.vstack([session.run(["sentence_embedding"], model_inputs([s], self.manifest))[0] for s in picked])
        return alone_vs_batch_cos(alone, session.run(["sentence_embedding"], model_inputs(picked, self.manifest))[0])

    def vision_batch_cos(self, path: Path, config: dict | None = None) -> float:
        session = self.session(path, config)
        picked = self.pixels[: _BATCH]
        alone = np.vstack([session.run(["sentence_embedding"], {VISION_INPUT: p[None]})[0] for p in picked])
        return alone_vs_batch_cos(alone, session.run(["sentence_embedding"], {VISION_INPUT: picked})[0])


@dataclasses.dataclass
class _Probes:
    texts: list[str]
    image_names: list[str]
    images: list[Image]
    text_reference: np.ndarray
    image_reference: np.ndarray

    def parities(self, text_vectors: np.ndarray, image_vectors: np.ndarray, text_batch: float,
                 image_batch: float, ranked: bool) -> tuple[Parity, Parity]:
        """Text and image parity; with `ranked`, both carry how the candidate ranks the
        image probes for the first text probes against the reference's ranking."""
        retrieval = None
        if ranked:
            q = min(_RANKING_QUERIES, len(self.texts))
            retrieval = measure_retrieval((self.text_reference[:q], self.image_reference),
                                          (text_vectors[:q], image_vectors), np.zeros(q, dtype=np.int64),
                                          self.texts[:q], ("text->image",), topk=5)
        text = dataclasses.replace(measure_parity(self.text_reference, text_vectors, self.texts),
                                   batch_cos_min=text_batch, retrieval=retrieval)
        image = dataclasses.replace(measure_parity(self.image_reference, image_vectors, self.image_names),
                                    batch_cos_min=image_batch, retrieval=retrieval)
        return text, image


def _describe(what: str, parity: Parity) -> str:
    line = (f"{what}: cos min {parity.cos_min:.6f} mean {parity.cos_mean:.6f}, top-{parity.topk} agreement "
            f"{parity.topk_agreement:.3f}, alone vs batch {parity.batch_cos_min}")
    r = parity.retrieval
    if r is not None:
        line += f", text->image top-{r.topk} kept {r.topk_kept:.3f}, Spearman {r.spearman:.3f}"
    return line


def build_dual(source: Any, work: Path, wanted: tuple[str, ...], gates: Gates,
               progress: Callable[[str], None]) -> Manifest:
    """Export both towers, gate every variant on texts and images, write the bundle into `work`."""
    import shutil

    from .quantize import quantize_per_token_int8, to_fp16

    unsupported = [p for p in wanted if p not in ("fp32", "fp16", "int8")]
    if unsupported:
        raise ExportError(f"{source.manifest.model_id} is a {source.manifest.architecture} dual encoder; it exports "
                          f"fp32, fp16 and int8, not {', '.join(unsupported)}")
    draft = source.manifest
    for name in source.copied_files:
        shutil.copyfile(source.path / name, work / name)
    tokenizer = BundleTokenizer(work / "tokenizer.json", draft)
    texts = probe_texts()
    seqs = tokenizer.encode(texts)
    named = probe_images()
    images = [Image.open(data, field=f"probe image {name}") for name, data in named]
    progress(f"{len(texts)} probe texts, {len(images)} probe images")

    progress("running the PyTorch reference (texts, and images through the model's own processor)")
    text_tower, vision_tower, text_ref, image_ref, pixels = _reference(source, seqs, images)
    ours = np.stack([draft.image.encode(image).pixel_values for image in images])
    pixel_diff = float(np.abs(ours - pixels).max())
    if pixel_diff > 1e-5:
        raise ExportError(f"edge-embed's preprocessing differs from the model's processor by {pixel_diff:.2e} "
                          "on the probe images; the bundle would not reproduce the model")
    probes = _Probes(texts, [f"image:{n}" for n, _ in named], images, text_ref, image_ref)
    graphs = _Graphs(draft, seqs, ours)

    progress("exporting the text and vision graphs (TorchScript)")
    text_path, vision_path = work / "model.fp32.onnx", work / "vision.fp32.onnx"
    sample = model_inputs(seqs[:2], draft)
    _export(text_tower, tuple(sample.values()), list(sample), text_path,
            {n: {0: "batch", 1: "sequence"} for n in sample})
    _export(vision_tower, (ours[:2],), [VISION_INPUT], vision_path, {VISION_INPUT: {0: "batch"}})
    del text_tower, vision_tower

    built: dict[str, tuple[Path, dict, Parity, Path, dict, Parity]] = {}

    def judge(precision: str, text: Path, text_recipe: dict, vision: Path, vision_recipe: dict,
              vision_precision: str) -> tuple[Parity, Parity]:
        ranked = precision in ("int8", "int4")
        t_config, v_config = text_recipe.get("session_config"), vision_recipe.get("session_config")
        text_vectors, text_batch = graphs.text(text, t_config), graphs.text_batch_cos(text, t_config)
        image_vectors, image_batch = graphs.vision(vision, v_config), graphs.vision_batch_cos(vision, v_config)
        text_parity, image_parity = probes.parities(text_vectors, image_vectors, text_batch, image_batch, ranked)
        progress(f"{precision} text graph {_describe('parity', text_parity)}")
        progress(f"{precision} vision graph ({vision_precision}) {_describe('parity', image_parity)}")
        check_gate(precision, text_parity, gates)
        check_gate(vision_precision, image_parity, gates)
        return text_parity, image_parity

    fp32_recipe = {"method": "torch.onnx.export (TorchScript)", "batch_invariant": True}
    text_parity, image_parity = judge("fp32", text_path, fp32_recipe, vision_path, fp32_recipe, "fp32")
    built["fp32"] = (text_path, fp32_recipe, text_parity, vision_path, fp32_recipe, image_parity)

    if "fp16" in wanted:
        progress("converting to FP16")
        t16, v16 = work / "model.fp16.onnx", work / "vision.fp16.onnx"
        recipe = to_fp16(text_path, t16)
        v_recipe = to_fp16(vision_path, v16)
        tp, ip = judge("fp16", t16, recipe, v16, v_recipe, "fp16")
        built["fp16"] = (t16, recipe, tp, v16, v_recipe, ip)

    if "int8" in wanted:
        progress("quantizing to INT8 (per token)")
        t8, v8 = work / "model.int8.onnx", work / "vision.int8.onnx"
        recipe = {**quantize_per_token_int8(text_path, t8), "batch_invariant": True}
        v_recipe = {**quantize_per_token_int8(vision_path, v8), "batch_invariant": True}
        try:
            tp, ip = judge("int8", t8, recipe, v8, v_recipe, "int8")
            built["int8"] = (t8, recipe, tp, v8, v_recipe, ip)
        except GateError as exc:
            # The vision tower is the one that usually gives: keep it FP32 under the INT8 text graph.
            progress(f"int8 vision graph missed its gate ({exc}); trying the text graph alone in int8")
            remove_graph(v8)
            tp, ip = judge("int8", t8, recipe, vision_path, fp32_recipe, "fp32")
            built["int8"] = (t8, recipe, tp, vision_path, {**fp32_recipe, "kept": "fp32: int8 missed its gate"}, ip)

    if "fp32" not in wanted:
        kept_files = {p.name for name, v in built.items() if name != "fp32" for p in (v[0], v[3])}
        if vision_path.name not in kept_files:
            remove_graph(vision_path)
        remove_graph(text_path)
        del built["fp32"]

    save_golden_with_images(work, texts, text_ref, named, image_ref)
    variants = {}
    for precision, (t_path, t_recipe, t_parity, v_path, v_recipe, v_parity) in built.items():
        vision_precision = "fp32" if v_path.name == "vision.fp32.onnx" else precision
        variants[precision] = image_variant(precision, t_path, t_recipe, t_parity, v_path, v_recipe, v_parity,
                                            vision_precision, gates, vision_gate=vision_precision)
    return finish_bundle(work, draft, [*source.copied_files, GOLDEN_FILE], variants)
