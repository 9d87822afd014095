"""Fixed probe texts for checking exported variants against the FP32 reference.

The texts live in data files beside this module, read once on first use:
data/probes.json (the parity probes, by category) and data/retrieval_probes.json.gz (real
queries and passages in several languages for the retrieval-agreement gate, built by
scripts/build_probe_corpus.py).
"""

from __future__ import annotations

import functools
import gzip
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files

import numpy as np

__all__ = [
    "PROBE_CATEGORIES", "probe_texts", "RERANK_QUERIES", "RERANK_DOCUMENTS_PER_QUERY", "rerank_probe_pairs",
    "RetrievalProbes", "retrieval_probes", "PROBE_LANGUAGES", "probe_images", "PROBE_PHOTOS",
]

RERANK_QUERIES = 24
RERANK_DOCUMENTS_PER_QUERY = 8

# Read from the data files on first access (module __getattr__ below).
PROBE_CATEGORIES: dict[str, tuple[str, ...]]  # category -> texts: query, tiny, sentence, passage, code, multilingual, edge
PROBE_LANGUAGES: tuple[str, ...]  # languages of the retrieval probes, "en" first


def _data_file(name: str):
    return files("edge_embed.export") / "data" / name


@functools.cache
def _categories() -> dict[str, tuple[str, ...]]:
    """The probe categories in file order: passages are joined from their sentences and
    code blocks dedented here, every other category is stored as its final texts."""
    raw = json.loads(_data_file("probes.json").read_text(encoding="utf-8"))
    out: dict[str, tuple[str, ...]] = {}
    for name, texts in raw.items():
        if name == "passage":
            out[name] = tuple(" ".join(parts) for parts in texts)
        elif name == "code":
            out[name] = tuple(textwrap.dedent(block).strip("\n") for block in texts)
        else:
            out[name] = tuple(texts)
    return out


def probe_texts() -> list[str]:
    """All probes in a stable order (categories in PROBE_CATEGORIES order), deduplicated."""
    seen: set[str] = set()
    out: list[str] = []
    for texts in _categories().values():
        for text in texts:
            if text and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def rerank_probe_pairs() -> tuple[list[str], list[str], list[int]]:
    """(queries, documents, group) per probe pair: each of 24 queries (search queries and a
    few non-English ones) with 8 documents of every kind (sentences, passages, code, other
    languages, tiny texts), so a group's order is decided among mixed lengths and topics."""
    probes = _categories()
    multilingual = probes["multilingual"]
    queries = list(probes["query"][: RERANK_QUERIES - 4]) + [multilingual[i] for i in (0, 10, 27, 32)]
    pool = [*probes["sentence"], *probes["passage"], *probes["code"], *multilingual[::3], *probes["tiny"][::5]]
    out_q, out_d, group = [], [], []
    for g, query in enumerate(queries):
        for j in range(RERANK_DOCUMENTS_PER_QUERY):
            out_q.append(query)
            out_d.append(pool[(g * 11 + j * 17) % len(pool)])
            group.append(g)
    return out_q, out_d, group


@dataclass(frozen=True)
class RetrievalProbes:
    """Queries, each written for one passage, over passages that are the others' distractors
    (Debian package synopses and their long descriptions)."""

    queries: list[str]
    passages: list[str]
    relevant: np.ndarray  # int64, per query: the index of the passage it was written for
    query_languages: list[str]
    passage_languages: list[str]
    domains: list[str]  # per passage


@functools.cache
def _retrieval_data() -> dict:
    return json.loads(gzip.decompress(_data_file("retrieval_probes.json.gz").read_bytes()).decode("utf-8"))


def _probe_languages() -> tuple[str, ...]:
    present = {p["lang"] for p in _retrieval_data()["passages"]}
    return tuple(sorted(present, key=lambda lang: (lang != "en", lang)))


def retrieval_probes(languages: Sequence[str] | None = None) -> RetrievalProbes:
    """None = every language; else only those (indices remapped)."""
    data = _retrieval_data()
    if languages is None:
        wanted = set(_probe_languages())
    else:
        wanted = {languages} if isinstance(languages, str) else set(languages)
        unknown = sorted(wanted - set(_probe_languages()))
        if unknown:
            raise ValueError(f"no retrieval probes in {unknown}; there are {list(_probe_languages())}")
    kept = [i for i, p in enumerate(data["passages"]) if p["lang"] in wanted]
    index = {old: new for new, old in enumerate(kept)}
    passages = [data["passages"][i] for i in kept]
    queries = [q for q in data["queries"] if q["passage"] in index]
    relevant = np.array([index[q["passage"]] for q in queries], dtype=np.int64)
    relevant.setflags(write=False)
    return RetrievalProbes(
        queries=[q["text"] for q in queries],
        passages=[p["text"] for p in passages],
        relevant=relevant,
        query_languages=[q["lang"] for q in queries],
        passage_languages=[p["lang"] for p in passages],
        domains=[p["domain"] for p in passages],
    )


# scikit-image's bundled photos and scans (public domain or CC0, see its data/README.txt):
# colour photos, greyscale scans, a page of text, an RGBA logo, microscopy, astronomy.
PROBE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                "coffee.png", "coins.png", "color.png", "grass.png", "gravel.png", "horse.png",
                "hubble_deep_field.jpg", "ihc.png", "logo.png", "microaneurysms.png", "moon.png",
                "motorcycle_left.png", "page.png", "phantom.png", "retina.jpg", "rocket.jpg", "text.png",
                "chessboard_RGB.png")
_PROBE_SIDE = 160


@functools.cache
def probe_images() -> tuple[tuple[str, bytes], ...]:
    """(name, PNG bytes) of the image probes: real photos and scans at most 160 pixels on a
    side in their own modes (RGB, greyscale, RGBA), mirrored and cropped copies of some, and
    pages rendered from probe texts. Small, so the bundle carries them as golden inputs."""
    import io
    import os

    import PIL.Image
    import PIL.ImageDraw
    import PIL.ImageOps

    try:
        import skimage
    except ImportError as exc:
        raise ImportError("the image probes are scikit-image's photos: pip install 'edge-embed[export]'") from exc
    folder = os.path.join(os.path.dirname(skimage.__file__), "data")

    def png(im: PIL.Image.Image) -> bytes:
        out = io.BytesIO()
        im.save(out, format="PNG", optimize=False)
        return out.getvalue()

    out: list[tuple[str, bytes]] = []
    for index, name in enumerate(PROBE_PHOTOS):
        with PIL.Image.open(os.path.join(folder, name)) as im:
            im.load()
            im.thumbnail((_PROBE_SIDE, _PROBE_SIDE), PIL.Image.Resampling.LANCZOS)
            stem = name.rsplit(".", 1)[0]
            out.append((stem, png(im)))
            if index % 4 == 0:
                out.append((f"{stem} mirrored", png(PIL.ImageOps.mirror(im))))
                w, h = im.size
                out.append((f"{stem} crop", png(im.crop((w // 4, h // 4, w - w // 8, h - h // 8)))))
    texts = _categories()["sentence"][:4]
    for i, text in enumerate(texts):
        page = PIL.Image.new("RGB", (256, 160), "white")
        draw = PIL.ImageDraw.Draw(page)
        for row in range(0, len(text), 36):
            draw.text((8, 8 + 14 * (row // 36)), text[row:row + 36], fill=(20, 20, 20))
        out.append((f"rendered page {i}", png(page)))
    return tuple(out)


def __getattr__(name: str):
    if name == "PROBE_CATEGORIES":
        return _categories()
    if name == "PROBE_LANGUAGES":
        return _probe_languages()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
