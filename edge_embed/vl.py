"""Host-side pieces of Qwen3-VL that numpy computes before its graphs run.

M-RoPE: Qwen3-VL rotates each token by three positions (time, height, width). Text tokens
advance all three together, so text alone is ordinary 1-D RoPE; an image's merged patches
take their row and column in the image's grid, offset by where the image starts, and the
text after the image resumes past the image's larger side. These ids are inputs of the
decoder graph, computed per sequence from its token kinds and its images' grids.
"""

from __future__ import annotations

import itertools
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError
from .images import EncodedImage, Image
from .manifest import Manifest
from .tokenization import pad_batch

__all__ = ["mrope_positions", "TEXT_TOKEN", "IMAGE_TOKEN", "VLInput", "VLEncoder", "decoder_feeds", "text_feeds",
           "vision_feeds", "DECODER_INPUTS", "describe_parts", "vision_rotary_positions", "position_embedding_taps"]

# The decoder graph's inputs, in order (see export/vl.py).
DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids", "image_rows", "image_embeds", "deepstack")

TEXT_TOKEN, IMAGE_TOKEN = 0, 1


def mrope_positions(token_kinds: Sequence[int] | np.ndarray, grids: Sequence[tuple[int, int, int]],
                    merge_size: int) -> np.ndarray:
    """Position ids [3, len(token_kinds)] of one unpadded sequence.

    `token_kinds` marks each token TEXT_TOKEN or IMAGE_TOKEN (the image pad tokens);
    `grids` holds each image's (t, h, w) in patches, in order of appearance; an image's run
    of pad tokens must hold t * h * w / merge_size**2 tokens.
    """
    kinds = np.asarray(token_kinds, dtype=np.int64)
    out = np.empty((3, len(kinds)), dtype=np.int64)
    images = iter(grids)
    current, index = 0, 0
    for kind, run in itertools.groupby(kinds.tolist()):
        length = sum(1 for _ in run)
        if kind == TEXT_TOKEN:
            out[:, index:index + length] = np.arange(current, current + length)
            current += length
        else:
            t, h, w = next(images)
            gh, gw = h // merge_size, w // merge_size
            if t * gh * gw != length:
                raise ValueError(f"an image of grid {(t, h, w)} has {t * gh * gw} tokens, but its run holds {length}")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            out[0, index:index + length] = tt.reshape(-1) + current
            out[1, index:index + length] = hh.reshape(-1) + current
            out[2, index:index + length] = ww.reshape(-1) + current
            current += max(h, w) // merge_size
        index += length
    return out


def vision_rotary_positions(grid: tuple[int, int, int], merge_size: int) -> np.ndarray:
    """(row, column) of each patch [t * h * w, 2], in the merge-block order the patches
    arrive in: the vision tower's 2-D rotary positions."""
    t, h, w = grid
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge_size, merge_size, w // merge_size, merge_size)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=1), (t, 1)).astype(np.int64)


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (align_corners) into a `side`-long table for positions on an axis of
    `size`, in float32 as the model computes them."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.int64)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.maximum(np.float32(1) - distance, np.float32(0))


def position_embedding_taps(grid: tuple[int, int, int], merge_size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each patch reads the vision tower's learned `side` x `side` position table,
    resampled bilinearly to the image's grid: (indices [n, 4] int64, weights [n, 4] float32)."""
    t, h, w = grid
    within = np.arange(t * h * w, dtype=np.int64) % (h * w)
    blocks_w = w // merge_size
    row = (within // (merge_size * merge_size * blocks_w)) * merge_size + (within // merge_size) % merge_size
    col = ((within // (merge_size * merge_size)) % blocks_w) * merge_size + within % merge_size
    h_taps, h_weights = _axis_taps(row, h, side)
    w_taps, w_weights = _axis_taps(col, w, side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return indices, weights.astype(np.float32)


@dataclass(frozen=True, eq=False)
class VLInput:
    """One input of a vision-language embedder, ready for its graphs: the chat's token ids,
    which of them are an image's visual tokens, and the images in order. Its length is its
    tokens (visual ones included): the batcher's unit."""

    ids: np.ndarray
    kinds: np.ndarray
    images: tuple[EncodedImage, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)


def _with_period(instruction: str) -> str:
    """Qwen3-VL-Embedding's rule: an instruction that does not end in punctuation gets a period."""
    text = instruction.strip()
    return text if unicodedata.category(text[-1]).startswith("P") else text + "."


@dataclass
class _Run:
    """A stretch of one chat's content: an image, or text joined from adjacent parts, whose
    first `fixed` characters (template text, a query) and last `suffix` characters (the
    template's text after the content) truncation never cuts."""

    text: str = ""
    image: EncodedImage | None = None
    fixed: int = 0
    suffix: int = 0


@dataclass(frozen=True)
class _Template:
    """A template around {content}: the text before it up to its last special token (`head`),
    the token ids after its first one (`tail_ids`), and the text that meets the content on
    either side without a special token between (`lead`, `trail`: tokenized with it, as the
    whole prompt would be)."""

    head: str
    lead: str
    trail: str
    tail_ids: tuple[int, ...]


class VLEncoder:
    """Inputs (a text, an image, or an ordered list of both) -> VLInput, through the
    manifest's chat template. Adjacent text parts are one text, as the template joins them;
    an over-long input loses the end of its text, never the template or an image.

    A reranker's (query, document) pair is one chat too: its rerank template (instruction,
    query, document) is the content, and only the document's text is ever cut."""

    def __init__(self, tokenizer, manifest: Manifest):
        spec = manifest.vl
        self._manifest, self._spec, self._tokenizer = manifest, spec, tokenizer
        self._image_id = tokenizer.token_id(spec.image_token)
        self._start_id, self._end_id = tokenizer.token_id(spec.vision_start), tokenizer.token_id(spec.vision_end)
        multi = manifest.multivector
        self._templates = {"default": self._template(spec.template)}
        if multi is not None:
            self._templates.update(query=self._template(multi.query_template),
                                   document=self._template(multi.document_template))
        self._heads: dict[tuple[str, str], list[int]] = {}

    def _template(self, template: str) -> _Template:
        head, tail = template.split("{content}")
        before, after = self._tokenizer.split_specials(head), self._tokenizer.split_specials(tail)
        lead, trail = before[-1], after[0]
        return _Template(head=head[: len(head) - len(lead)], lead=lead, trail=trail,
                         tail_ids=tuple(self._tokenizer.template_ids(tail[len(trail):], {})))

    def _head_ids(self, template: _Template, instruction: str) -> list[int]:
        key = (template.head, instruction)
        if key not in self._heads:
            if len(self._heads) > 64:
                self._heads.clear()
            self._heads[key] = self._tokenizer.template_ids(template.head, {"instruction": instruction})
        return self._heads[key]

    def _parts(self, item: object, field: str, max_pixels: int | None) -> list[str | EncodedImage]:
        """One input's parts, checked, its images decoded and preprocessed."""
        parts = list(item) if isinstance(item, (list, tuple)) else [item]
        if not parts:
            raise InvalidInputError(f"{field} is an empty list of parts")
        out: list[str | EncodedImage] = []
        for j, part in enumerate(parts):
            name = field if len(parts) == 1 else f"{field}[{j}]"
            if isinstance(part, (str, EncodedImage)):
                out.append(part)
            elif isinstance(part, Image):
                out.append(self._manifest.image.encode(part, field=name, max_pixels=max_pixels))
            else:
                raise InvalidInputError(f"{name} must be a string or an edge_embed.Image, got {type(part).__name__}")
        if all(isinstance(p, str) and not p.strip() for p in out):
            raise InvalidInputError(f"{field} is empty or only whitespace")
        return out

    def encode(self, item: str | Image | Sequence[str | Image], *, instruction: str | None, truncate: bool,
               field: str, max_pixels: int | None = None, kind: str = "default") -> VLInput:
        """One input through the chat template; a multi-vector model's `kind` is "query" or
        "document" (its two templates), and it takes no instruction."""
        if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
            raise InvalidInputError("instruction must be a non-empty string")
        template = self._templates[kind]
        if kind == "default":
            head = self._head_ids(template, _with_period(instruction or self._manifest.default_instruction))
        elif instruction is not None:
            raise InvalidInputError(f"{self._manifest.model_id} takes no instruction")
        else:
            head = self._head_ids(template, "")
        return self._assemble(head, [(template.lead, True), *((p, False) for p in self._parts(item, field, max_pixels))],
                              truncate, field, template)

    def encode_pairs(self, query: str | Image | Sequence[str | Image],
                     documents: Sequence[str | Image | Sequence[str | Image]], *, instruction: str | None,
                     truncate: bool, field: str = "documents") -> list[VLInput]:
        """A reranker's (query, document) pairs, each through the rerank template inside the
        chat; the query's images are decoded once for all its pairs."""
        spec = self._manifest.rerank
        if instruction is None:
            instruction = spec.default_instruction or ""
        elif not isinstance(instruction, str) or not instruction.strip():
            raise InvalidInputError("instruction must be a non-empty string")
        before_query, rest = spec.template.split("{query}", 1)
        between = rest.removesuffix("{document}")
        # Plain replacement, not str.format: braces in an instruction stay literal.
        template = self._templates["default"]
        lead = template.lead + instruction.join(before_query.split("{instruction}"))
        query_parts = [(p, True) for p in self._parts(query, "query", None)]
        head = self._head_ids(template, "")
        fixed = [(lead, True), *query_parts, (between, True)]
        return [self._assemble(head, fixed + [(p, False) for p in self._parts(doc, f"{field}[{i}]", None)],
                               truncate, f"{field}[{i}]", template)
                for i, doc in enumerate(documents)]

    def _assemble(self, head: list[int], parts: list[tuple[str | EncodedImage, bool]], truncate: bool,
                  field: str, template: _Template) -> VLInput:
        """Head, content parts (each marked fixed or cuttable; fixed ones come first) and the
        template's tail as one chat's tokens, cut to the model's limit from the end of the
        cuttable text. The template's text next to the content is tokenized with it."""
        runs: list[_Run] = []
        for part, fixed in [*parts, (template.trail, None)]:
            if not part:
                continue
            if isinstance(part, EncodedImage):
                runs.append(_Run(image=part))
            elif runs and runs[-1].image is None:
                run = runs[-1]
                if fixed and run.fixed < len(run.text):
                    raise ValueError("fixed content after cuttable content in one run")
                run.text += part
                run.fixed += len(part) if fixed else 0
                run.suffix = len(part) if fixed is None else 0
            else:
                runs.append(_Run(text=part, fixed=len(part) if fixed else 0, suffix=len(part) if fixed is None else 0))
        texts = {i: self._split(run) for i, run in enumerate(runs) if run.image is None}
        visual = sum(run.image.tokens + 2 for run in runs if run.image is not None)
        limit = self._manifest.max_length
        tail_ids = list(template.tail_ids)
        room = limit - len(head) - len(tail_ids) - visual
        if room < 0:
            raise InvalidInputError(f"{field}: its images take {visual} of {self._manifest.model_id}'s {limit} tokens "
                                    "with the template; send smaller images or fewer")
        excess = sum(len(ids) for ids, _, _ in texts.values()) - room
        cut: dict[int, int] = {}
        if excess > 0:
            if not truncate:
                raise InvalidInputError(f"{field} is longer than the model's {limit} tokens and truncate is false")
            for i in sorted(texts, reverse=True):  # the end of the content goes first
                ids, fixed, suffix = texts[i]
                cut[i] = min(excess, len(ids) - fixed - len(suffix))
                excess -= cut[i]
            if excess > 0:
                raise InvalidInputError(f"{field}: the query and the template take more than the model's {limit} "
                                        "tokens; send a shorter query or smaller images")
        ids, kinds, images = list(head), [TEXT_TOKEN] * len(head), []
        for i, run in enumerate(runs):
            if run.image is None:
                whole, _, suffix = texts[i]
                kept = whole
                if cut.get(i):  # the cut text, then the template's text after it on its own
                    kept = whole[: len(whole) - len(suffix) - cut[i]] + suffix
                ids += kept
                kinds += [TEXT_TOKEN] * len(kept)
            else:
                ids += [self._start_id] + [self._image_id] * run.image.tokens + [self._end_id]
                kinds += [TEXT_TOKEN] + [IMAGE_TOKEN] * run.image.tokens + [TEXT_TOKEN]
                images.append(run.image)
        ids += tail_ids
        kinds += [TEXT_TOKEN] * len(tail_ids)
        return VLInput(np.asarray(ids, dtype=np.int64), np.asarray(kinds, dtype=np.int8), tuple(images))

    def _split(self, run: _Run) -> tuple[list[int], int, list[int]]:
        """A text run's tokens (tokenized whole), how many of the first are fixed, and the
        tokens of its template suffix alone (what follows a cut)."""
        ids, fixed = self._tokenizer.user_text_split(run.text, run.fixed)
        suffix = self._tokenizer.user_text_ids(run.text[len(run.text) - run.suffix:]) if run.suffix else []
        return ids, fixed, suffix


def describe_parts(parts: str | Sequence[object]) -> str:
    """A readable name of one golden input (its texts, and `image:<name>` of each image), as
    the export named its probes: the gates' worst-probe reports and the golden pairs' names."""
    if isinstance(parts, str):
        return parts
    return " + ".join(p if isinstance(p, str) else f"image:{getattr(p, 'name', 'image')}" for p in parts)


def vision_feeds(image: EncodedImage, manifest: Manifest) -> dict[str, np.ndarray]:
    """The vision graph's inputs for one image."""
    spec = manifest.vl
    indices, weights = position_embedding_taps(image.grid, spec.merge_size, spec.position_table_side)
    return {"pixel_values": image.pixel_values, "interp_indices": indices, "interp_weights": weights,
            "rotary_positions": vision_rotary_positions(image.grid, spec.merge_size)}


def decoder_feeds(seqs: Sequence[VLInput], manifest: Manifest,
                  run_vision: Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """One batch's decoder inputs, right-padded: every image run alone through the vision
    graph (so an image's features never depend on its neighbours; an image that several
    inputs share, a reranker's query image, runs once), its rows gathered after a zero row
    that text positions read."""
    merged: list[np.ndarray] = []
    deep: list[np.ndarray] = []
    seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for seq in seqs:
        for image in seq.images:
            if id(image) not in seen:
                seen[id(image)] = run_vision(vision_feeds(image, manifest))
            features, deepstack = seen[id(image)]
            merged.append(features)
            deep.append(deepstack)
    width = max(len(s) for s in seqs)
    batch = len(seqs)
    ids = np.full((batch, width), manifest.pad_token_id, dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    rows = np.zeros((batch, width), dtype=np.int64)
    positions = np.zeros((3, batch, width), dtype=np.int64)
    next_row = 1
    for b, seq in enumerate(seqs):
        n = len(seq)
        ids[b, :n], mask[b, :n] = seq.ids, 1
        visual = np.flatnonzero(seq.kinds == IMAGE_TOKEN)
        rows[b, visual] = np.arange(next_row, next_row + len(visual))
        next_row += len(visual)
        positions[:, b, :n] = mrope_positions(seq.kinds, [img.grid for img in seq.images], manifest.vl.merge_size)
    hidden = manifest.vl.hidden_size or manifest.dim
    layers = manifest.vl.deepstack_layers
    image_embeds = np.concatenate([np.zeros((1, hidden), np.float32), *merged]) if merged else \
        np.zeros((1, hidden), np.float32)
    deepstack = np.concatenate([np.zeros((layers, 1, hidden), np.float32), *deep], axis=1) if deep else \
        np.zeros((layers, 1, hidden), np.float32)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "image_rows": rows,
            "image_embeds": image_embeds.astype(np.float32), "deepstack": deepstack.astype(np.float32)}


def text_feeds(seqs: Sequence[VLInput], manifest: Manifest) -> dict[str, np.ndarray]:
    """A batch of texts (no images) as a plain decoder reads them, right-padded: token ids and
    the mask. Without images M-RoPE is 1-D RoPE over positions 0..n-1, which a runner of the
    language model alone (the MLX text path) derives from the mask."""
    if any(seq.images for seq in seqs):
        raise ValueError("text_feeds takes texts only")
    ids, mask = pad_batch([seq.ids for seq in seqs], manifest.pad_token_id, "right")
    return {"input_ids": ids, "attention_mask": mask}
