"""Qwen3-VL-Embedding: texts, images and mixed inputs in one vector space, exported as two
graphs, checked against the transformers model on text, image and mixed probes.

No exporter handles Qwen3-VL's DeepStack decoder, so the split is made here:
- the vision graph runs one image: its patches, where each patch reads the learned position
  table (4 bilinear taps) and its 2-D rotary positions (both computed on the host, see
  edge_embed/vl.py) -> the merged features and one feature set per DeepStack layer;
- the decoder graph reads the chat's token ids, the images' rows (gathered after a zero
  row: text positions add nothing), 3-row M-RoPE positions and the mask -> the last real
  token's hidden state after the final norm.
Two of the model's methods are swapped while tracing: the vision attention over the whole
image (one image per run, where the model splits a packed batch by image), written as ONNX
Runtime's MultiHeadAttention (flash attention on the CPU: no [heads, N, N] scores held),
and DeepStack's masked add as a gather of those rows (the same sums, with shapes the trace
can keep).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..bundle import GOLDEN_FILE, file_sha256
from ..errors import ExportError, GateError
from ..images import Image, ImageSpec
from ..manifest import MLX_PRECISIONS, Manifest, MultiVectorSpec, Parity, RerankSpec, ScoreParity, Variant, VLSpec
from ..parity import (Gates, alone_vs_batch_cos, alone_vs_batch_diff, check_gate, measure_parity,
                      measure_retrieval, measure_score_parity, pair_name)
from ..tokenization import BundleTokenizer
from ..vl import DECODER_INPUTS, VLEncoder, VLInput, decoder_feeds, text_feeds, vision_feeds
from .dual import _quiet_transformers
from .onnx_files import gather_external_data, remove_graph
from .probes import probe_images, probe_texts
from .writing import finish_bundle, image_variant, save_golden_pairs_with_images, save_golden_with_images

__all__ = ["VL_ARCHITECTURES", "read_vl_source", "build_vl", "VL_TEMPLATE", "VL_DEFAULT_INSTRUCTION", "exportable_qwen3_vl"]

VL_ARCHITECTURES = ("qwen3_vl",)
# Qwen3-VL-Embedding's chat (QwenLM/Qwen3-VL-Embedding, src/models/qwen3_vl_embedding.py):
# the instruction as the system turn, the input as the user turn, pooled at the end of the
# assistant's opening.
VL_TEMPLATE = ("<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"
               "<|im_start|>assistant\n")
VL_DEFAULT_INSTRUCTION = "Represent the user's input."
# Qwen3-VL-Reranker's chat (src/models/qwen3_vl_reranker.py and examples/reranker_template.jinja):
# the judge prompt as the system turn; the user turn's content is the rerank template, whose
# parts the processor's chat template joins with nothing between them; the score is read at
# the end of the assistant's opening.
VL_RERANK_CHAT = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                  "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
                  "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n")
VL_RERANK_TEMPLATE = "<Instruct>: {instruction}<Query>:{query}\n<Document>:{document}"
VL_RERANK_DEFAULT_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
# ColQwen's projection of every token: Tomoro's name, then colpali-engine's.
MULTIVECTOR_HEADS = ("embedding_proj_layer", "custom_text_proj")
# ColQwen's inputs as colpali-engine (transformers' ColQwen2Processor) writes them, where the
# model's processor_config.json does not say: a query with ten pad tokens as reasoning
# buffers, a page as a user turn asking to describe the image.
_MULTIVECTOR_QUERY_PREFIX = "Query: "
_MULTIVECTOR_VISUAL_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image."
                              "<|im_end|><|endoftext|>")
_MULTIVECTOR_QUERY_BUFFERS = 10


def multivector_head(path: Path) -> str | None:
    """The name of the projection weight a ColQwen checkpoint carries, or None."""
    import json

    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        keys = list(json.loads(index.read_text()).get("weight_map", {}))
    else:
        keys = []
        for file in files:
            with safe_open(str(file), framework="numpy") as fh:
                keys += list(fh.keys())
    for head in MULTIVECTOR_HEADS:
        found = [k for k in keys if k == f"{head}.weight" or k.endswith(f".{head}.weight")]
        if found:
            return found[0]
    return None
VISION_OUTPUTS = ("image_embeds", "deepstack")
_TEXT_PROBES = 48
_MIXED_PROBES = 12
_BATCH = 8
_DOCUMENTS_PER_QUERY = 6


def read_vl_source(path: Path, config: dict[str, Any], tokenizer: Tokenizer, tok_config: dict[str, Any], *,
                   model_id: str | None, revision: str | None, max_length: int | None,
                   copied: tuple[str, ...], max_pixels: int | None = None, task: str = "embed") -> Any:
    """The draft manifest of a Qwen3-VL embedding model directory, or of a Qwen3-VL-Reranker
    (`task` "rerank": the judge chat, and one logit, h_last . (W[yes] - W[no])).

    Image bounds: Qwen3-VL-Embedding's own (4 to 1800 blocks of 32 x 32 pixels, which its code
    passes to the processor over the directory's generic Qwen3-VL ones), unless the
    directory's preprocessor config names min_pixels/max_pixels, or `max_pixels` lowers them.
    """
    from .source import SourceModel, _read_json, _token_id

    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    hidden = int(text.get("hidden_size", 0))
    if int(vision.get("out_hidden_size", hidden)) != hidden:
        raise ExportError(f"{path}: the vision tower's output ({vision.get('out_hidden_size')}) is not the "
                          f"decoder's width ({hidden})")
    tokens = {"image_token": "<|image_pad|>", "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}
    for name, token in tokens.items():
        if tokenizer.token_to_id(token) is None:
            raise ExportError(f"{path}: the tokenizer has no {token}, which Qwen3-VL's inputs need")
    if config.get("image_token_id") not in (None, tokenizer.token_to_id(tokens["image_token"])):
        raise ExportError(f"{path}: config image_token_id {config['image_token_id']} is not the tokenizer's "
                          f"{tokens['image_token']}")
    if not (path / "preprocessor_config.json").is_file():
        raise ExportError(f"{path} has no preprocessor_config.json: the image processor must travel with the model")
    pre = _read_json(path / "preprocessor_config.json")
    merge = int(vision.get("spatial_merge_size", pre.get("merge_size", 2)))
    patch = int(vision.get("patch_size", pre.get("patch_size", 16)))
    block = (patch * merge) ** 2
    min_pixels = int(pre.get("min_pixels") or 4 * block)
    model_max = int(pre.get("max_pixels") or 1800 * block)
    if max_pixels is not None and not min_pixels <= max_pixels <= model_max:
        raise ExportError(f"max_pixels {max_pixels} is outside {min_pixels}..{model_max}, the model's bounds")
    max_pixels = max_pixels or model_max
    spec = ImageSpec(processor="qwen3_vl", resample=int(pre.get("resample", 3)),
                     rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
                     mean=tuple(float(x) for x in pre.get("image_mean", (0.5, 0.5, 0.5))),
                     std=tuple(float(x) for x in pre.get("image_std", (0.5, 0.5, 0.5))),
                     patch_size=patch, merge_size=merge, temporal_patch_size=int(pre.get("temporal_patch_size", 2)),
                     min_pixels=min_pixels, max_pixels=max_pixels, tokens=max_pixels // (patch * merge) ** 2)
    natural = min(8192, int(text.get("max_position_embeddings") or 8192))
    if max_length is not None and not 16 <= max_length <= int(text.get("max_position_embeddings") or max_length):
        raise ExportError(f"max_length {max_length} is outside what the model supports")
    pad_id = _token_id(tokenizer, tok_config.get("pad_token"))
    if pad_id is None:
        pad_id = tokenizer.token_to_id("<|endoftext|>") or 0
    side = int(round(int(vision.get("num_position_embeddings", 2304)) ** 0.5))
    vl = VLSpec(template=VL_TEMPLATE, merge_size=merge, position_table_side=side,
                deepstack_layers=len(vision.get("deepstack_visual_indexes") or (8, 16, 24)), **tokens)
    if task == "multivector":
        return _multivector_source(path, tokenizer, tok_config, manifest_fields=dict(
            model_id=model_id or path.name, revision=revision, architecture="qwen3_vl", padding_side="right",
            append_eos=False, eos_token_id=tokenizer.token_to_id("<|im_end|>"), pad_token_id=int(pad_id),
            max_length=max_length or natural, matryoshka_min_dim=None, instruction_template=None,
            default_instruction=None, graph_inputs=DECODER_INPUTS, modalities=("text", "image"), image=spec),
            vl=dataclasses.replace(vl, hidden_size=hidden), copied=(*copied, "preprocessor_config.json"))
    if task == "rerank":
        from .source import RERANK_OUTPUT

        yes, no = tokenizer.token_to_id("yes"), tokenizer.token_to_id("no")
        if yes is None or no is None:
            raise ExportError(f"{path}: a Qwen3-VL reranker scores the tokens 'yes' and 'no', and this tokenizer "
                              "has no single token for one of them")
        manifest = Manifest(
            task="rerank", model_id=model_id or path.name, revision=revision, architecture="qwen3_vl",
            pooling="last_token",
            # Right padding, where the reference pads left: alone and in a batch a pair's
            # attention runs over the same positions, so its score never moves with its neighbours.
            padding_side="right", append_eos=False, eos_token_id=tokenizer.token_to_id("<|im_end|>"),
            pad_token_id=int(pad_id), max_length=max_length or natural, dim=1, matryoshka_min_dim=None,
            instruction_template=None, default_instruction=None, graph_inputs=DECODER_INPUTS,
            graph_output=RERANK_OUTPUT, modalities=("text", "image"), image=spec,
            rerank=RerankSpec(format="template", template=VL_RERANK_TEMPLATE,
                              default_instruction=VL_RERANK_DEFAULT_INSTRUCTION, yes_token_id=yes, no_token_id=no),
            vl=dataclasses.replace(vl, template=VL_RERANK_CHAT, hidden_size=hidden))
        return SourceModel(path=path, copied_files=(*copied, "preprocessor_config.json"), manifest=manifest)
    manifest = Manifest(
        model_id=model_id or path.name,
        revision=revision,
        architecture="qwen3_vl",
        pooling="last_token",
        padding_side="right",
        append_eos=False,
        eos_token_id=tokenizer.token_to_id("<|im_end|>"),
        pad_token_id=int(pad_id),
        max_length=max_length or natural,
        dim=hidden,
        matryoshka_min_dim=64 if hidden > 64 else None,
        instruction_template=None,
        default_instruction=VL_DEFAULT_INSTRUCTION,
        graph_inputs=DECODER_INPUTS,
        modalities=("text", "image"),
        image=spec,
        vl=vl,
    )
    return SourceModel(path=path, copied_files=(*copied, "preprocessor_config.json"), manifest=manifest)


def _multivector_source(path: Path, tokenizer: Tokenizer, tok_config: dict[str, Any], *,
                        manifest_fields: dict[str, Any], vl: VLSpec, copied: tuple[str, ...]) -> Any:
    """The draft manifest of a ColQwen3 directory: its templates (the processor config's
    query prefix and visual prompt, else colpali-engine's), its head's width."""
    from safetensors import safe_open

    from .source import SourceModel, _optional_json, _token_id

    head = multivector_head(path)
    shape = None
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as fh:
            if head in fh.keys():
                shape = fh.get_slice(head).get_shape()
    if shape is None or len(shape) != 2 or shape[1] != vl.hidden_size:
        raise ExportError(f"{path}: the projection {head} has shape {shape}; a multi-vector head maps the decoder's "
                          f"{vl.hidden_size} dims to the vectors' width")
    processor = _optional_json(path / "processor_config.json")
    query_prefix = processor.get("query_prefix") or _MULTIVECTOR_QUERY_PREFIX
    visual = processor.get("visual_prompt_prefix") or _MULTIVECTOR_VISUAL_PROMPT
    image_slot = f"{vl.vision_start}{vl.image_token}{vl.vision_end}"
    if visual.count(image_slot) != 1:
        raise ExportError(f"{path}: the visual prompt {visual!r} must hold the image once ({image_slot})")
    buffer = tok_config.get("pad_token") if isinstance(tok_config.get("pad_token"), str) else "<|endoftext|>"
    if _token_id(tokenizer, buffer) is None:
        raise ExportError(f"{path}: the query buffer token {buffer!r} is not in the tokenizer")
    spec = MultiVectorSpec(query_template=query_prefix + "{content}" + buffer * _MULTIVECTOR_QUERY_BUFFERS + "\n",
                           document_template=visual.replace(image_slot, "{content}"), head=head)
    manifest = Manifest(task="multivector", pooling="tokens", dim=int(shape[0]), graph_output="token_embeddings",
                        multivector=spec, vl=dataclasses.replace(vl, template=spec.document_template),
                        **manifest_fields)
    return SourceModel(path=path, copied_files=copied, manifest=manifest)


# -- tracing ---------------------------------------------------------------------------------


@contextlib.contextmanager
def exportable_qwen3_vl():
    """Swap the two methods whose shapes a trace cannot keep (see the module docstring)."""
    import torch
    from transformers.models.qwen3_vl import modeling_qwen3_vl as mq

    from . import attention  # noqa: F401 - registers edge_embed::whole_sequence_attention

    def whole_image_attention(self, hidden_states, cu_seqlens=None, position_embeddings=None, max_seqlen=None,
                              **kwargs):
        length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = mq.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.reshape(1, length, -1) for t in (q, k, v))
        out = torch.ops.edge_embed.whole_sequence_attention(q, k, v, self.num_heads, float(self.scaling))
        return self.proj(out.reshape(length, -1))

    def gathered_deepstack(self, hidden_states, visual_pos_masks, visual_embeds):
        # `visual_pos_masks` carries each position's row (0: the zero row, a text position).
        return hidden_states + visual_embeds[visual_pos_masks]

    saved = mq.Qwen3VLVisionAttention.forward, mq.Qwen3VLTextModel._deepstack_process
    mq.Qwen3VLVisionAttention.forward = whole_image_attention
    mq.Qwen3VLTextModel._deepstack_process = gathered_deepstack
    try:
        yield
    finally:
        mq.Qwen3VLVisionAttention.forward, mq.Qwen3VLTextModel._deepstack_process = saved


def _graph_modules(model: Any, direction: Any = None, projection: Any = None) -> tuple[Any, Any]:
    """The vision and decoder graphs' modules; with `direction` (a reranker's W[yes] - W[no])
    the decoder's one output is the pair's logit, h_last . direction; with `projection` (a
    multi-vector model's head) every token's projected, L2-normalized vector, zero on padding."""
    import torch

    class VisionGraphModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = model.visual

        def forward(self, pixel_values, interp_indices, interp_weights, rotary_positions):
            out = self.visual(pixel_values, grid_thw=torch.zeros(1, 3, dtype=torch.long), interp_indices=interp_indices,
                              interp_weights=interp_weights, position_ids=rotary_positions,
                              cu_seqlens=torch.zeros(2, dtype=torch.int32), max_seqlen=0)
            return out.pooler_output, torch.stack(list(out.deepstack_features))

    class DecoderGraphModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = model.language_model
            self.projection = projection

        def forward(self, input_ids, attention_mask, position_ids, image_rows, image_embeds, deepstack):
            embeds = self.language_model.embed_tokens(input_ids)
            embeds = torch.where((image_rows > 0).unsqueeze(-1), image_embeds[image_rows], embeds)
            hidden = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                         position_ids=position_ids, visual_pos_masks=image_rows,
                                         deepstack_visual_embeds=list(deepstack.unbind(0))).last_hidden_state
            if projection is not None:
                tokens = projection(hidden)
                tokens = tokens / tokens.norm(dim=-1, keepdim=True)
                return tokens * attention_mask.unsqueeze(-1).to(tokens.dtype)
            last = hidden[torch.arange(hidden.shape[0]), attention_mask.sum(1) - 1]
            return last if direction is None else (last @ direction).unsqueeze(-1)

    return VisionGraphModule().eval(), DecoderGraphModule().eval()


def _export(module: Any, feeds: dict[str, np.ndarray], outputs: tuple[str, ...], out: Path,
            axes: dict[str, dict[int, str]]) -> None:
    import torch

    from .attention import traced_whole_sequence_attention
    from .graph import ONNX_OPSET

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # Past 2 GB the exporter writes a file per tensor beside the graph: in a folder of its
    # own, gathered into one data file.
    staging = out.with_name(out.name + ".export")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), \
                exportable_qwen3_vl(), traced_whole_sequence_attention(ONNX_OPSET):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(torch.from_numpy(a) for a in feeds.values()), str(staging / out.name),
                              input_names=list(feeds), output_names=list(outputs), dynamic_axes=axes,
                              opset_version=ONNX_OPSET, dynamo=False)
        gather_external_data(staging / out.name, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- the reference and the graphs on the probes ------------------------------------------------


def _reference(model: Any, processor: Any, inputs: list[VLInput], originals: list[list[Image]],
               progress: Callable[[str], None], bounds: dict[str, int], projection: Any = None) -> Any:
    """The transformers model's pooled vectors: its own forward (vision tower, DeepStack,
    M-RoPE from its get_rope_index) on each input alone, pixels from its own processor. With
    a multi-vector `projection`: every token's projected, L2-normalized vector, per input."""
    import torch

    out = []
    with torch.no_grad():
        for n, (seq, images) in enumerate(zip(inputs, originals)):
            extra: dict[str, Any] = {}
            if images:
                processed = processor(images=[img.rgb() for img in images], return_tensors="pt", size=bounds)
                ours = np.concatenate([img.pixel_values for img in seq.images])
                theirs = processed["pixel_values"].numpy()
                grids = [tuple(g) for g in processed["image_grid_thw"].tolist()]
                if grids != [img.grid for img in seq.images] or float(np.abs(ours - theirs).max()) > 1e-5:
                    raise ExportError("edge-embed's image preprocessing differs from the model's processor on a "
                                      "probe image; the bundle would not reproduce the model")
                extra = {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
            ids = torch.from_numpy(seq.ids)[None]
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           mm_token_type_ids=torch.from_numpy(seq.kinds.astype(np.int32))[None], **extra)
            if projection is not None:
                tokens = projection(hidden.last_hidden_state[0])
                out.append((tokens / tokens.norm(dim=-1, keepdim=True)).numpy().astype(np.float32))
            else:
                out.append(hidden.last_hidden_state[0, -1].numpy())
            if (n + 1) % 25 == 0:
                progress(f"reference vectors: {n + 1}/{len(inputs)} probes")
    return out if projection is not None else np.stack(out).astype(np.float32)


class _Graphs:
    def __init__(self, manifest: Manifest):
        self.manifest = manifest

    @staticmethod
    def _session(path: Path, config: dict | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, str(value))
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def runner(self, decoder: Path, vision: Path, config: dict | None) -> Callable[[list[VLInput]], np.ndarray]:
        dec, vis = self._session(decoder, config), self._session(vision, config)

        def run(seqs: list[VLInput]) -> np.ndarray:
            feeds = decoder_feeds(seqs, self.manifest, lambda f: tuple(vis.run(None, f)))
            return dec.run([self.manifest.graph_output], feeds)[0]

        return run

    @staticmethod
    def vectors(run: Callable[[list[VLInput]], np.ndarray], seqs: list[VLInput]) -> np.ndarray:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = np.empty((len(seqs), 0), dtype=np.float32)
        for k in range(0, len(order), _BATCH):
            rows = order[k:k + _BATCH]
            vectors = run([seqs[i] for i in rows])
            if out.shape[1] == 0:
                out = np.empty((len(seqs), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
        return out

    @staticmethod
    def batch_cos(run: Callable[[list[VLInput]], np.ndarray], seqs: list[VLInput]) -> float:
        """Inputs alone against the same inputs in one batch of mixed lengths and kinds."""
        picked = [seqs[i] for i in np.linspace(0, len(seqs) - 1, min(_BATCH, len(seqs))).astype(int)]
        alone = np.vstack([run([s]) for s in picked])
        return alone_vs_batch_cos(alone, run(picked))


def _judge_mlx(precision: str, weights: Path, recipe: dict, manifest: Manifest, seqs: list[VLInput],
               reference: np.ndarray, names: list[str], gates: Gates, progress: Callable[[str], None]) -> Variant:
    """The MLX text path: the language model's weights through the MLX backend's encoder,
    gated on the text probes (alone and in batches) like any variant."""
    from .mlx_weights import mlx_encoder

    progress(f"checking the {precision} variant (the text path) with MLX")
    encoder = mlx_encoder(weights.parent, weights, manifest)

    def run(batch: list[VLInput]) -> np.ndarray:
        return encoder(text_feeds(batch, manifest))

    parity = dataclasses.replace(measure_parity(reference, _Graphs.vectors(run, seqs), names),
                                 batch_cos_min=_Graphs.batch_cos(run, seqs))
    progress(f"{precision} parity on texts: cos min {parity.cos_min:.6f} mean {parity.cos_mean:.6f}, alone vs "
             f"batch {parity.batch_cos_min}")
    check_gate(precision, parity, gates)
    return Variant(precision=precision, file=weights.name, sha256=file_sha256(weights), bytes=weights.stat().st_size,
                   format="mlx", opset=None, min_onnxruntime=None,
                   recipe={**recipe, "runs": "texts (the language model)", "gate": gates.record(precision)},
                   parity=parity)


@dataclasses.dataclass
class _Probes:
    """The probe inputs as the graphs read them, the images each holds in order (for the
    model's own processor), their names, and which rows the gates read."""

    seqs: list[VLInput]
    originals: list[list[Image]]
    names: list[str]
    text_rows: list[int]
    image_rows: list[int]


def _embed_probes(encoder: VLEncoder) -> tuple[_Probes, list[str], tuple[tuple[str, bytes], ...], list[int]]:
    """Texts, images and image+text inputs; also the texts, the named images and the rows of
    the images alone, which golden.npz and the retrieval gate read."""
    every = probe_texts()
    texts = every[:: max(1, len(every) // _TEXT_PROBES)][:_TEXT_PROBES]
    named = probe_images()
    images = [Image.open(data, field=f"probe image {name}") for name, data in named]
    captions = [t for t in every if len(t) < 120][:_MIXED_PROBES]
    mixed = [[images[i * 3 % len(images)], captions[i]] for i in range(min(_MIXED_PROBES, len(captions)))]
    inputs: list[Any] = [*texts, *images, *mixed]
    names = [*texts, *(f"image:{n}" for n, _ in named), *(f"image:{named[i * 3 % len(named)][0]} + {captions[i]}"
                                                           for i in range(len(mixed)))]
    seqs = [encoder.encode(item, instruction=None, truncate=True, field="probe") for item in inputs]
    originals = [[] if isinstance(item, str) else [item] if isinstance(item, Image) else [item[0]] for item in inputs]
    probes = _Probes(seqs, originals, names, list(range(len(texts))), list(range(len(texts), len(seqs))))
    return probes, texts, named, list(range(len(texts), len(texts) + len(images)))


def _pair_probes(encoder: VLEncoder) -> tuple[_Probes, np.ndarray, tuple[list[str], list[str]], dict[str, bytes]]:
    """A reranker's probe pairs: 8 queries (texts, images, an image with a text) with 6
    documents each (texts of every length, images, an image and a text in either order), so
    every group's order is decided among all kinds. Also the query groups, the queries and
    documents as golden.npz stores them (JSON parts) and the images they name."""
    import json

    from .probes import PROBE_CATEGORIES as categories
    named = dict(probe_images())
    names = list(named)
    opened = {n: Image.open(named[n], field=f"probe image {n}") for n in names}
    captions = [t for t in probe_texts() if len(t) < 120]
    pool = [*categories["sentence"], *categories["passage"], *categories["multilingual"][::4], *categories["tiny"][::4]]
    queries: list[list[tuple[str, str]]] = [[("text", q)] for q in categories["query"][:4]]
    queries += [[("image", names[3])], [("image", names[11])], [("image", names[7]), ("text", captions[0])],
                [("text", captions[1]), ("image", names[17])]]
    documents, groups = [], []
    for g in range(len(queries)):
        for j in range(_DOCUMENTS_PER_QUERY):
            image = ("image", names[(g * 5 + j * 7) % len(names)])
            text = ("text", pool[(g * 11 + j * 13) % len(pool)])
            caption = ("text", captions[(g * 3 + j + 2) % len(captions)])
            documents.append([[text], [image], [image, caption] if g % 2 else [caption, image]][j % 3])
            groups.append(g)

    def parts(spec: list[tuple[str, str]]) -> list[Any]:
        return [value if kind == "text" else opened[value] for kind, value in spec]

    def describe(spec: list[tuple[str, str]]) -> str:
        return " + ".join(value if kind == "text" else f"image:{value}" for kind, value in spec)

    seqs, originals, pair_names, pair_queries = [], [], [], []
    for g, query in enumerate(queries):
        rows = [i for i, x in enumerate(groups) if x == g]
        seqs += encoder.encode_pairs(parts(query), [parts(documents[i]) for i in rows], instruction=None,
                                     truncate=True, field="probe documents")
        for i in rows:
            originals.append([opened[v] for k, v in query + documents[i] if k == "image"])
            pair_names.append(pair_name(describe(query), describe(documents[i])))
            pair_queries.append(query)
    with_images = [i for i, o in enumerate(originals) if o]
    probes = _Probes(seqs, originals, pair_names, [i for i, o in enumerate(originals) if not o], with_images)

    def encoded(specs: list[list[tuple[str, str]]]) -> list[str]:
        return [json.dumps([{kind: value} for kind, value in spec], ensure_ascii=False) for spec in specs]

    used = sorted({v for spec in [*queries, *documents] for k, v in spec if k == "image"}, key=names.index)
    return (probes, np.asarray(groups, dtype=np.int64), (encoded(pair_queries), encoded(documents)),
            {n: named[n] for n in used})


def build_vl(source: Any, work: Path, wanted: tuple[str, ...], gates: Gates,
             progress: Callable[[str], None]) -> Manifest:
    """Export both graphs, gate every variant on text, image and mixed probes (an MLX variant,
    the text path, on the text probes), write the bundle. A reranker's variants are gated on
    the scores and order of text, image and mixed (query, document) pairs."""
    import torch
    from transformers import AutoImageProcessor, AutoModel

    draft = source.manifest
    if draft.task == "multivector":
        from .multivector import build_multivector

        return build_multivector(source, work, wanted, gates, progress)
    reranker = draft.task == "rerank"
    unsupported = [p for p in wanted if p not in ("fp32", "fp16", "int8", "int4", *(() if reranker else MLX_PRECISIONS))]
    if unsupported:
        what = ("a Qwen3-VL reranker; it exports fp32, fp16, int8 and int4" if reranker else
                f"a Qwen3-VL model; it exports fp32, fp16, int8, int4 and the MLX text path ({', '.join(MLX_PRECISIONS)})")
        raise ExportError(f"{draft.model_id} is {what} here, not {', '.join(unsupported)}")
    for name in source.copied_files:
        shutil.copyfile(source.path / name, work / name)
    encoder = VLEncoder(BundleTokenizer(work / "tokenizer.json", draft), draft)
    if reranker:
        probes, groups, golden_pairs, golden_images = _pair_probes(encoder)
        progress(f"{len(probes.seqs)} probe pairs: {len(set(groups.tolist()))} queries x "
                 f"{_DOCUMENTS_PER_QUERY} documents ({len(probes.image_rows)} with images)")
    else:
        probes, texts, named, just_images = _embed_probes(encoder)
        progress(f"{len(texts)} probe texts, {len(named)} probe images, {len(probes.image_rows) - len(named)} "
                 "image+text probes")
    seqs, names, text_rows, image_rows = probes.seqs, probes.names, probes.text_rows, probes.image_rows

    progress("running the PyTorch reference (the model's own forward and image processor)")
    direction = None
    with _quiet_transformers():
        if reranker:
            from transformers import Qwen3VLForConditionalGeneration

            full = Qwen3VLForConditionalGeneration.from_pretrained(str(source.path), dtype=torch.float32).eval()
            weight = full.get_output_embeddings().weight.detach()
            # Qwen3-VL-Reranker's score head: one row, logit(yes) - logit(no); the vocabulary-wide
            # head never ships.
            direction = (weight[draft.rerank.yes_token_id] - weight[draft.rerank.no_token_id]).clone()
            model = full.model
            del full, weight
        else:
            model = AutoModel.from_pretrained(str(source.path), dtype=torch.float32).eval()
        processor = AutoImageProcessor.from_pretrained(str(source.path), use_fast=False)
    bounds = {"shortest_edge": draft.image.min_pixels, "longest_edge": draft.image.max_pixels}
    reference = _reference(model, processor, seqs, probes.originals, progress, bounds)
    if direction is not None:
        with torch.no_grad():
            reference = (torch.from_numpy(reference) @ direction).unsqueeze(-1).numpy()
    mlx_wanted = [p for p in wanted if p in MLX_PRECISIONS]
    mlx_recipes: dict[str, dict] = {}
    if mlx_wanted:
        from .mlx_weights import save_mlx_weights

        # The language model's own tensors: the MLX backend runs the text path.
        mlx_recipes = {p: save_mlx_weights(model.language_model, work / f"model.{p}.safetensors",
                                           p.removeprefix("mlx-")) for p in mlx_wanted}

    vision_path, decoder_path = export_graphs(model, draft, seqs, work, progress, direction=direction)
    del model

    graphs = _Graphs(draft)
    batch_rows = sorted(set(text_rows[::6] + image_rows[::6]))

    def judge_vectors(precision: str, run: Callable[[list[VLInput]], np.ndarray]) -> tuple[Parity, Parity]:
        vectors = graphs.vectors(run, seqs)
        batch = graphs.batch_cos(run, [seqs[i] for i in batch_rows])
        retrieval = None
        if precision in ("int8", "int4"):
            query_rows = text_rows[: min(len(text_rows), 32)]
            retrieval = measure_retrieval((reference[query_rows], reference[just_images]),
                                          (vectors[query_rows], vectors[just_images]),
                                          np.zeros(len(query_rows), dtype=np.int64), [names[i] for i in query_rows],
                                          ("text->image",), topk=5)
        text_parity = dataclasses.replace(measure_parity(reference[text_rows], vectors[text_rows],
                                                         [names[i] for i in text_rows]),
                                          batch_cos_min=batch, retrieval=retrieval)
        image_parity = dataclasses.replace(measure_parity(reference[image_rows], vectors[image_rows],
                                                          [names[i] for i in image_rows]),
                                           batch_cos_min=batch, retrieval=retrieval)
        for what, parity in (("texts", text_parity), ("images and image+text", image_parity)):
            line = (f"{precision} parity on {what}: cos min {parity.cos_min:.6f} mean {parity.cos_mean:.6f}, "
                    f"alone vs batch {parity.batch_cos_min}")
            if retrieval is not None:
                line += f", text->image top-{retrieval.topk} kept {retrieval.topk_kept:.3f}"
            progress(line)
        return text_parity, image_parity

    def judge_scores(precision: str, run: Callable[[list[VLInput]], np.ndarray]) -> tuple[ScoreParity, ScoreParity]:
        logits = graphs.vectors(run, seqs)
        picked = [seqs[i] for i in batch_rows]
        batch = alone_vs_batch_diff(np.vstack([run([s]) for s in picked]), run(picked), draft.rerank.activation)
        every = dataclasses.replace(measure_score_parity(reference, logits, groups, names, draft.rerank.activation),
                                    batch_diff_max=batch)
        with_images = dataclasses.replace(
            measure_score_parity(reference[image_rows], logits[image_rows], groups[image_rows],
                                 [names[i] for i in image_rows], draft.rerank.activation), batch_diff_max=batch)
        progress(f"{precision} parity on {len(seqs)} pairs: score diff max {every.score_diff_max:.2e} mean "
                 f"{every.score_diff_mean:.2e}, Kendall tau min {every.kendall_tau_min:.3f} mean "
                 f"{every.kendall_tau_mean:.3f}, top-1 kept {every.top1_agreement:.3f}, alone vs batch "
                 f"{every.batch_diff_max:.2e}; pairs with images: score diff max {with_images.score_diff_max:.2e}")
        return every, with_images

    def judge(precision: str, decoder: Path, vision: Path, recipe: dict) -> tuple[Any, Any]:
        run = graphs.runner(decoder, vision, recipe.get("session_config"))
        whole, with_images = (judge_scores if reranker else judge_vectors)(precision, run)
        check_gate(precision, whole, gates)
        check_gate(precision, with_images, gates)
        return whole, with_images

    built = graph_variants(work, wanted, decoder_path, vision_path, judge, progress)
    mlx_built = {p: _judge_mlx(p, work / f"model.{p}.safetensors", mlx_recipes[p], draft,
                               [seqs[i] for i in text_rows], reference[text_rows], [names[i] for i in text_rows],
                               gates, progress)
                 for p in mlx_wanted}
    if reranker:
        save_golden_pairs_with_images(work, *golden_pairs, groups, reference, golden_images)
    else:
        save_golden_with_images(work, texts, reference[text_rows], named, reference[just_images])
    variants = {
        precision: image_variant(precision, d_path, d_recipe, d_parity, v_path, v_recipe, v_parity, v_precision,
                                 gates, vision_gate=precision, task=draft.task)  # images run through the decoder too
        for precision, (d_path, d_recipe, d_parity, v_path, v_recipe, v_parity, v_precision) in built.items()
    }
    variants.update(mlx_built)
    return finish_bundle(work, draft, [*source.copied_files, GOLDEN_FILE], variants)


def export_graphs(model: Any, draft: Manifest, seqs: list[VLInput], work: Path, progress: Callable[[str], None], *,
                  direction: Any = None, projection: Any = None) -> tuple[Path, Path]:
    """The FP32 vision and decoder graphs (the decoder ending as `_graph_modules` says), traced
    on the first probe with an image and a second input."""
    import torch

    progress("exporting the vision and decoder graphs (TorchScript)")
    vision_module, decoder_module = _graph_modules(model, direction, projection)
    first_image = next(s for s in seqs if s.images)
    vision_sample = vision_feeds(first_image.images[0], draft)
    vision_path, decoder_path = work / "vision.fp32.onnx", work / "model.fp32.onnx"
    _export(vision_module, vision_sample, VISION_OUTPUTS, vision_path,
            {**{n: {0: "patches"} for n in vision_sample}, "image_embeds": {0: "tokens"}, "deepstack": {1: "tokens"}})
    with torch.no_grad(), exportable_qwen3_vl():
        sample_vision = tuple(t.numpy() for t in vision_module(*(torch.from_numpy(a) for a in vision_sample.values())))
    sample = decoder_feeds([first_image, seqs[0]], draft, lambda f: sample_vision)
    output_axes = {0: "batch", 1: "sequence"} if projection is not None else {0: "batch"}
    _export(decoder_module, sample, (draft.graph_output,), decoder_path,
            {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
             "position_ids": {1: "batch", 2: "sequence"}, "image_rows": {0: "batch", 1: "sequence"},
             "image_embeds": {0: "rows"}, "deepstack": {1: "rows"}, draft.graph_output: output_axes})
    return vision_path, decoder_path


def graph_variants(work: Path, wanted: tuple[str, ...], decoder_path: Path, vision_path: Path,
                   judge: Callable[[str, Path, Path, dict], tuple[Any, Any]],
                   progress: Callable[[str], None]) -> dict[str, tuple[Path, dict, Any, Path, dict, Any, str]]:
    """The FP16, INT8 and INT4 pairs asked for (and FP32's), each judged (`judge` raises
    GateError on a miss): precision -> (decoder, its recipe, its parity, vision graph, its
    recipe, its parity, its precision). Graphs no variant uses are removed.

    INT8 quantizes the decoder per token, INT4 weight-only (blocks tried in order, the first
    that passes kept, else the finest's miss raised). Under both the vision tower runs per
    token in INT8 where the variant then passes its gate, else in FP32 (the recipe says
    why): on a CPU that is what takes the tower's memory down, since FP16 weights are
    widened to FP32 where a kernel has no FP16 (the 2B tower loads at 1.71 GB from FP32,
    1.87 GB from FP16 on x86, 0.48 GB from INT8: bench/graph_load.py)."""
    from .quantize import INT4_BLOCK_SIZES, quantize_int4, quantize_per_token_int8, to_fp16

    fp32_recipe = {"method": "torch.onnx.export (TorchScript), edge-embed's Qwen3-VL split", "batch_invariant": True}
    built: dict[str, tuple[Path, dict, Any, Path, dict, Any, str]] = {}
    tp, ip = judge("fp32", decoder_path, vision_path, fp32_recipe)
    built["fp32"] = (decoder_path, fp32_recipe, tp, vision_path, fp32_recipe, ip, "fp32")
    if "fp16" in wanted:
        progress("converting both graphs to FP16")
        d16, v16 = work / "model.fp16.onnx", work / "vision.fp16.onnx"
        recipe = to_fp16(decoder_path, d16)
        to_fp16(vision_path, v16)
        tp, ip = judge("fp16", d16, v16, recipe)
        built["fp16"] = (d16, recipe, tp, v16, recipe, ip, "fp16")
    v8, v8_recipe = work / "vision.int8.onnx", None
    if {"int8", "int4"} & set(wanted):
        progress("quantizing the vision tower to INT8 (per token)")
        v8_recipe = {**quantize_per_token_int8(vision_path, v8, gemms=True, tables=False), "batch_invariant": True}

    def with_a_tower(precision: str, decoder: Path, recipe: dict) -> tuple[Path, dict, Any, Path, dict, Any, str]:
        """The variant with the INT8 tower if it passes, else with the FP32 one."""
        try:
            tp, ip = judge(precision, decoder, v8, recipe)
            return decoder, recipe, tp, v8, v8_recipe, ip, "int8"
        except GateError as miss:
            progress(f"{precision} with the INT8 vision tower misses its gate ({miss}); trying the FP32 tower")
        tp, ip = judge(precision, decoder, vision_path, recipe)
        return decoder, recipe, tp, vision_path, {**fp32_recipe, "kept": "fp32: int8 missed its gate"}, ip, "fp32"

    if "int8" in wanted:
        progress("quantizing the decoder to INT8 (per token)")
        d8 = work / "model.int8.onnx"
        built["int8"] = with_a_tower("int8", d8, {**quantize_per_token_int8(decoder_path, d8), "batch_invariant": True})
    if "int4" in wanted:
        # Weight-only (W4A16's CPU form): what makes an 8B decoder fit a small device.
        d4, misses = work / "model.int4.onnx", []
        for block in INT4_BLOCK_SIZES:
            progress(f"quantizing the decoder to 4 bits (weight-only, blocks of {block})")
            recipe = quantize_int4(decoder_path, d4, block_size=block)
            try:
                built["int4"] = with_a_tower("int4", d4, recipe)
                break
            except GateError as miss:
                misses.append(miss)
        else:
            remove_graph(d4)
            remove_graph(v8)
            raise misses[-1]  # the finest blocks' miss
    if "fp32" not in wanted:
        del built["fp32"]
    used = {path for entry in built.values() for path in (entry[0], entry[3])}
    for path in (decoder_path, vision_path, v8):
        if path not in used:
            remove_graph(path)
    return built
