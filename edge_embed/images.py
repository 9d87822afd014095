"""Images as model inputs: opened from hostile bytes, decoded once, preprocessed exactly as
the model's own image processor does, with PIL and numpy only (no torch on the runtime).

Everything about an image that can be learnt from its header (format, size, frame count)
is checked by `Image.open` before a single pixel is decoded: a decompression bomb costs
its header, never its pixels. Decoding then gives one canonical 8-bit RGB picture (EXIF
orientation applied, the first frame of an animation, transparency composited on white,
16-bit, greyscale, palette and CMYK converted), and `ImageSpec` turns that picture into
the vision graph's `pixel_values`.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError, InvalidInputError

__all__ = ["Image", "EncodedImage", "ImageSpec", "smart_resize", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "MIN_IMAGE_SIDE",
           "MAX_ASPECT_RATIO", "IMAGE_FORMATS"]

# An image file bigger than this is refused before it is read (a 24-megapixel JPEG is ~10 MB).
MAX_IMAGE_BYTES = 32 * 1024 * 1024
# Pixels an image may have, read from its header before decoding: a 48-megapixel phone
# photo decodes to 192 MB of RGBA; more than this is a bomb on a device with a few GB.
MAX_IMAGE_PIXELS = 50_000_000
# Below this many pixels on a side no model sees content (Qwen3-VL's grid needs 32).
MIN_IMAGE_SIDE = 8
# Longer side over shorter side; Qwen3-VL's processor refuses more than 200 as well.
MAX_ASPECT_RATIO = 200
# What PIL may parse. Everything else (SVG, PDF, PSD, ICO, and the many rarer decoders PIL
# carries) is refused before any decoder runs.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# 16-bit and 32-bit integer modes: the top 8 bits are kept.
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _pil():
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError as exc:  # pragma: no cover - pillow is a dependency
        raise InvalidInputError("images need Pillow (pip install pillow)") from exc
    return PIL


@dataclass(frozen=True, eq=False)
class Image:
    """An image input: its encoded bytes and what its header says, checked; not yet decoded.

    `Image.open(path_or_bytes)` is how callers make one; a str or Path is a file on disk
    (never a URL). The decoded pixels exist only inside `rgb()`, one image at a time.
    """

    data: bytes
    format: str
    width: int
    height: int
    frames: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @classmethod
    def open(cls, source: str | os.PathLike | bytes | bytearray | memoryview, *, field: str = "image",
             max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> Image:
        """Read and check an image's header: InvalidInputError for anything that is not an
        image we decode, too big, too small or too elongated, before any pixel is decoded."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        elif isinstance(source, (str, os.PathLike)):
            data = _read_file(Path(source), field, max_bytes)
        else:
            raise InvalidInputError(f"{field} must be image bytes or a file path, got {type(source).__name__}")
        if not data:
            raise InvalidInputError(f"{field} is empty: no image bytes")
        if len(data) > max_bytes:
            raise InvalidInputError(f"{field} has {len(data)} bytes; the limit is {max_bytes}")
        PIL = _pil()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
                with PIL.Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                    fmt, (width, height) = str(im.format), im.size
                    frames = 2 if getattr(im, "is_animated", False) else 1
        except PIL.UnidentifiedImageError:
            raise InvalidInputError(f"{field} is not an image in a format edge-embed reads "
                                    f"({', '.join(IMAGE_FORMATS)})") from None
        except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
            raise InvalidInputError(f"{field} is too big ({_reason(exc)}); the limit is {max_pixels} pixels "
                                    "(checked before decoding)") from None
        except MemoryError:
            raise InvalidInputError(f"{field} has a header that cannot be read in bounded memory") from None
        except Exception as exc:  # noqa: BLE001 - hostile bytes: every parser failure is bad input
            raise InvalidInputError(f"{field} has a corrupt header: {_reason(exc)}") from None
        return cls._checked(data, fmt, width, height, frames, field, max_pixels)

    @classmethod
    def _checked(cls, data: bytes, fmt: str, width: int, height: int, frames: int, field: str,
                 max_pixels: int) -> Image:
        if width < 1 or height < 1:
            raise InvalidInputError(f"{field} is {width}x{height}: an image without pixels")
        if width * height > max_pixels:
            raise InvalidInputError(f"{field} is {width}x{height} = {width * height} pixels; the limit is "
                                    f"{max_pixels} (checked before decoding)")
        if min(width, height) < MIN_IMAGE_SIDE:
            raise InvalidInputError(f"{field} is {width}x{height}; each side must be at least {MIN_IMAGE_SIDE} pixels")
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise InvalidInputError(f"{field} is {width}x{height}: an aspect ratio over {MAX_ASPECT_RATIO}")
        return cls(data=data, format=fmt, width=width, height=height, frames=frames)

    def rgb(self, *, field: str = "image") -> Any:
        """The decoded picture as 8-bit RGB (a PIL image): EXIF orientation applied, the first
        frame of an animation, transparency composited on white, other modes converted."""
        PIL = _pil()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
                with PIL.Image.open(io.BytesIO(self.data), formats=IMAGE_FORMATS) as im:
                    if im.size != (self.width, self.height):
                        raise InvalidInputError(f"{field} changed size while it was decoded")
                    im.load()
                    return to_rgb(PIL.ImageOps.exif_transpose(im))
        except InvalidInputError:
            raise
        except MemoryError:
            raise InvalidInputError(f"{field} cannot be decoded in bounded memory") from None
        except Exception as exc:  # noqa: BLE001 - hostile bytes: every decoder failure is bad input
            raise InvalidInputError(f"{field} cannot be decoded (corrupt or truncated): {_reason(exc)}") from None

    def __repr__(self) -> str:
        return f"Image({self.format} {self.width}x{self.height}, {len(self.data)} bytes)"


def _read_file(path: Path, field: str, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InvalidInputError(f"{field}: {path} is not a file")
        if size > max_bytes:
            raise InvalidInputError(f"{field}: {path} has {size} bytes; the limit is {max_bytes}")
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{field}: cannot read {path}: {exc.strerror or exc}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def to_rgb(im: Any) -> Any:
    """Any decoded PIL image -> 8-bit RGB, as the models' processors convert (alpha and a
    palette's transparency composited on white); 16-bit greyscale keeps its top 8 bits."""
    PIL = _pil()
    if im.mode in _WIDE_INTEGER_MODES:
        wide = np.asarray(im).astype(np.int64)
        im = PIL.Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), mode="L")
    elif im.mode == "F":
        raise InvalidInputError("32-bit floating point images are not supported: send 8- or 16-bit images")
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


@dataclass(frozen=True, eq=False)
class EncodedImage:
    """One image ready for the vision graph: `pixel_values` [3, H, W] float32 for a fixed-size
    vision tower, or [patches, C*T*P*P] with its `grid` (t, h, w) in patches for Qwen3-VL's.
    Its length is the visual tokens it costs, which is what the batcher's token budget counts."""

    pixel_values: np.ndarray
    tokens: int
    grid: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return self.tokens


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's resize target: both sides multiples of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio kept as closely as that allows."""
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise InvalidInputError(f"an image of {width}x{height} has an aspect ratio over {MAX_ASPECT_RATIO}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True, kw_only=True)
class ImageSpec:
    """How the model's image processor turns a picture into `pixel_values`, pinned in the
    manifest: resize (shortest edge, a fixed size, or Qwen-VL's `smart_resize` to a
    multiple of patch x merge within min/max pixels) with PIL's filter `resample`, an
    optional center crop, rescale, then normalize per channel; Qwen-VL's patches are then
    cut in merge-block order, each repeated over `temporal_patch_size` frames.

    `tokens` is what one image costs the vision tower's output (patches, plus a class token
    where the model has one; for Qwen-VL the most an image at `max_pixels` costs): the
    batcher's unit.
    """

    processor: str
    shortest_edge: int | None = None
    height: int | None = None
    width: int | None = None
    crop_height: int | None = None
    crop_width: int | None = None
    resample: int = 3  # PIL bicubic
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    tokens: int = 0
    # Qwen-VL's dynamic resolution (processor "qwen3_vl").
    patch_size: int | None = None
    merge_size: int | None = None
    temporal_patch_size: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.dynamic:
            if None in (self.patch_size, self.merge_size, self.temporal_patch_size, self.min_pixels, self.max_pixels):
                raise BundleError("manifest image spec of a Qwen-VL model needs patch_size, merge_size, "
                                  "temporal_patch_size, min_pixels and max_pixels")
            if not 0 < self.min_pixels <= self.max_pixels:
                raise BundleError("manifest image spec needs 0 < min_pixels <= max_pixels")
        fixed = self.height is not None and self.width is not None
        if not self.dynamic and (self.shortest_edge is None) == (not fixed):
            raise BundleError("manifest image spec needs either shortest_edge or height and width")
        if (self.crop_height is None) != (self.crop_width is None):
            raise BundleError("manifest image spec needs both crop_height and crop_width, or neither")
        if self.crop_height is not None and self.shortest_edge is not None and (
                max(self.crop_height, self.crop_width) > self.shortest_edge):
            raise BundleError("manifest image spec crops beyond its resized shortest edge")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise BundleError("manifest image spec needs 3 means and 3 positive standard deviations")
        if self.tokens < 1:
            raise BundleError("manifest image spec needs the visual tokens an image costs")

    @property
    def dynamic(self) -> bool:
        """Whether the image keeps (about) its own size: Qwen-VL's patches and grid."""
        return self.processor == "qwen3_vl"

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of `pixel_values`."""
        if self.crop_height is not None:
            return self.crop_height, self.crop_width
        return self.height, self.width

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize: the shortest edge to `shortest_edge` keeping
        the aspect ratio (the long edge truncated, as the processors do), or the fixed size."""
        if self.shortest_edge is None:
            return self.height, self.width
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def pixel_values(self, rgb: Any) -> np.ndarray:
        """An RGB picture -> float32 [3, H, W], the same numbers as the model's processor."""
        new_h, new_w = self.resized_size(rgb.height, rgb.width)
        array = np.asarray(rgb.resize((new_w, new_h), resample=self.resample))
        if self.crop_height is not None:
            top, left = (new_h - self.crop_height) // 2, (new_w - self.crop_width) // 2
            array = array[top:top + self.crop_height, left:left + self.crop_width]
        scaled = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        normal = (scaled - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(normal.transpose(2, 0, 1))

    def patches(self, rgb: Any, max_pixels: int | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Qwen-VL: an RGB picture -> (pixel_values [grid_h * grid_w, 3 * T * P * P], grid
        (1, grid_h, grid_w)), the same numbers as the model's processor. `max_pixels` may
        lower the manifest's bound for one request, never raise it."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        limit = self.max_pixels if max_pixels is None else min(max_pixels, self.max_pixels)
        new_h, new_w = smart_resize(rgb.height, rgb.width, p * m, min(self.min_pixels, limit), limit)
        array = np.asarray(rgb.resize((new_w, new_h), resample=self.resample))
        scaled = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        normal = (scaled - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        gh, gw = new_h // p, new_w // p
        blocks = normal.transpose(2, 0, 1).reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
        return np.ascontiguousarray(frames.reshape(gh * gw, 3 * t * p * p)), (1, gh, gw)

    def encode(self, image: Image, *, field: str = "image", max_pixels: int | None = None) -> EncodedImage:
        rgb = image.rgb(field=field)
        if self.dynamic:
            pixels, grid = self.patches(rgb, max_pixels)
            return EncodedImage(pixels, grid[1] * grid[2] // self.merge_size ** 2, grid)
        return EncodedImage(self.pixel_values(rgb), self.tokens)
