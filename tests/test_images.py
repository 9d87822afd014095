"""Image inputs without a model: what a hostile file gets (before and after decoding), and
preprocessing equal to the models' own image processors on real photos."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import PIL.Image
import pytest

from edge_embed.errors import BundleError, InvalidInputError
from edge_embed.images import MAX_ASPECT_RATIO, MIN_IMAGE_SIDE, Image, ImageSpec
from tests.conftest import skimage_photo

# Colour and greyscale photos and scans, an RGBA logo, a palette GIF, a two-page TIFF,
# sizes from 14x25 to 1411x1411.
PHOTOS = ("astronaut.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png", "horse.png",
          "hubble_deep_field.jpg", "logo.png", "microaneurysms.png", "motorcycle_left.png", "page.png",
          "retina.jpg", "rocket.jpg", "text.png", "no_time_for_that_tiny.gif", "multipage.tif")


def _png(im: PIL.Image.Image, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, format="PNG", **options)
    return out.getvalue()


def _encoded(im: PIL.Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and whose data is a few bytes: what a
    decompression bomb looks like before decoding."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def _processors():
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    clip, siglip = CLIPImageProcessorPil(), SiglipImageProcessorPil()
    return [
        (clip, ImageSpec(processor="clip", shortest_edge=224, crop_height=224, crop_width=224,
                         mean=tuple(clip.image_mean), std=tuple(clip.image_std), tokens=197)),
        (siglip, ImageSpec(processor="siglip", height=224, width=224, mean=tuple(siglip.image_mean),
                           std=tuple(siglip.image_std), tokens=196)),
    ]


def test_preprocessing_equals_the_models_own_processors_on_real_photos():
    """CLIP's (shortest edge 224, center crop) and SigLIP's (224x224) processors against
    ImageSpec, on 17 real files of every mode we meet: the processor reads the file as PIL
    opened it, ImageSpec reads edge-embed's decoding of the same bytes."""
    checked = 0
    for processor, spec in _processors():
        for name in PHOTOS:
            data = skimage_photo(name).read_bytes()
            ours = spec.encode(Image.open(data)).pixel_values
            with PIL.Image.open(io.BytesIO(data)) as raw:
                theirs = processor(images=raw, return_tensors="np")["pixel_values"][0]
            assert ours.dtype == np.float32 and ours.shape == theirs.shape == (3, 224, 224), name
            assert float(np.abs(ours - theirs).max()) <= 1e-5, f"{name}: {np.abs(ours - theirs).max()}"
            checked += 1
    assert checked == 2 * len(PHOTOS)


def test_image_header_is_checked_before_any_pixel_is_decoded():
    with pytest.raises(InvalidInputError, match="60000x1000 = 60000000 pixels; the limit is 50000000 .checked before"):
        Image.open(png_header_only(60_000, 1000))
    # A size PIL itself calls a bomb: still our clear message, never PIL's exception.
    with pytest.raises(InvalidInputError, match="10000000000 pixels.*limit is 50000000 pixels .checked before decoding"):
        Image.open(png_header_only(100_000, 100_000))
    with pytest.raises(InvalidInputError, match="limit is 1000"):
        Image.open(png_header_only(40, 40), max_pixels=1000)
    with pytest.raises(InvalidInputError, match="bytes; the limit is 10"):
        Image.open(png_header_only(40, 40), max_bytes=10)


@pytest.mark.parametrize("size, why", [
    ((1, 1), "each side must be at least"),
    ((MIN_IMAGE_SIDE - 1, 64), "each side must be at least"),
    ((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE * MAX_ASPECT_RATIO + 8), "aspect ratio over 200"),
])
def test_tiny_and_elongated_images_are_refused(size, why):
    with pytest.raises(InvalidInputError, match=why):
        Image.open(_png(PIL.Image.new("RGB", size, "red")))


@pytest.mark.parametrize("data, why", [
    (b"", "empty"),
    (b"hello, not an image", "not an image in a format"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "not an image in a format"),
    (b"%PDF-1.4\n1 0 obj\n", "not an image in a format"),
])
def test_what_is_not_an_image_we_read_is_refused_by_name(data, why):
    with pytest.raises(InvalidInputError, match=why):
        Image.open(data)


def test_truncated_and_corrupt_files_fail_as_bad_input_when_decoded():
    photo = skimage_photo("chelsea.png").read_bytes()
    jpeg = skimage_photo("rocket.jpg").read_bytes()
    for broken in (photo[: len(photo) // 2], jpeg[: len(jpeg) // 3],
                   photo[:100] + bytes(len(photo) - 100)):
        with pytest.raises(InvalidInputError, match="image"):
            Image.open(broken).rgb()


def test_modes_are_converted_as_the_processors_do():
    rgba = PIL.Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(Image.open(_png(rgba)).rgb())[0, 0].tolist() == [255, 255, 255]  # composited on white
    palette = PIL.Image.new("P", (16, 16), 0)  # palette entry 0 (black), marked transparent
    assert np.asarray(Image.open(_png(palette, transparency=0)).rgb())[0, 0].tolist() == [255, 255, 255]
    grey16 = PIL.Image.fromarray(np.full((16, 16), 0x8123, dtype=np.uint16))
    decoded = Image.open(_png(grey16)).rgb()
    assert decoded.mode == "RGB" and np.asarray(decoded)[0, 0].tolist() == [0x81] * 3  # the top 8 bits
    cmyk = PIL.Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    assert np.asarray(Image.open(_encoded(cmyk, "JPEG", quality=95)).rgb())[0, 0, 0] > 200  # red stays red
    grey = Image.open(skimage_photo("camera.png").read_bytes()).rgb()
    assert grey.mode == "RGB" and grey.size == (512, 512)


def test_exif_orientation_is_applied():
    wide = PIL.Image.new("RGB", (40, 20), "blue")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = Image.open(_encoded(wide, "JPEG", exif=exif.tobytes()))
    assert (image.width, image.height) == (40, 20)
    assert image.rgb().size == (20, 40)


def test_animated_gif_reads_its_first_frame_and_says_it_is_animated():
    frames = [PIL.Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = Image.open(out.getvalue())
    assert image.frames > 1
    first = np.asarray(image.rgb())[0, 0]
    assert first[0] > 200 and first[1] < 50 and first[2] < 50


def test_a_path_is_a_file_and_never_a_url(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(skimage_photo("coffee.png").read_bytes())
    assert Image.open(path).width == 600
    assert Image.open(str(path)).height == 400
    with pytest.raises(InvalidInputError, match="cannot read"):
        Image.open("https://example.com/cat.png")
    with pytest.raises(InvalidInputError, match="is not a file"):
        Image.open(tmp_path)
    with pytest.raises(InvalidInputError, match="must be image bytes or a file path"):
        Image.open(42)


def test_an_image_spec_that_cannot_be_reproduced_is_a_bundle_error():
    with pytest.raises(BundleError, match="shortest_edge or height and width"):
        ImageSpec(processor="clip", tokens=1)
    with pytest.raises(BundleError, match="crops beyond"):
        ImageSpec(processor="clip", shortest_edge=224, crop_height=256, crop_width=256, tokens=1)


@pytest.mark.parametrize("max_pixels", [16_777_216, 1280 * 32 * 32, 256 * 32 * 32])
def test_qwen3_vl_patches_and_grids_equal_its_processor_on_real_photos(max_pixels):
    """Qwen3-VL's processor (Qwen2-VL's, with 16-pixel patches, 2x2 merge, mean/std 0.5;
    its shipped min/max pixels, and two lower bounds that shrink big photos): the same
    pixel values in the same merge-block order, and the same grid, on 17 real files."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                         size={"shortest_edge": 65_536, "longest_edge": max_pixels})
    spec = ImageSpec(processor="qwen3_vl", patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=65_536,
                     max_pixels=max_pixels, tokens=max_pixels // (32 * 32))
    for name in PHOTOS:
        data = skimage_photo(name).read_bytes()
        encoded = spec.encode(Image.open(data))
        with PIL.Image.open(io.BytesIO(data)) as raw:
            theirs = processor(images=raw, return_tensors="np")
        assert encoded.grid == tuple(theirs["image_grid_thw"][0].tolist()), name
        assert encoded.pixel_values.shape == theirs["pixel_values"].shape, name
        assert float(np.abs(encoded.pixel_values - theirs["pixel_values"]).max()) <= 1e-5, name
        assert encoded.tokens == encoded.grid[1] * encoded.grid[2] // 4 <= spec.tokens


def test_a_request_may_lower_qwen3_vl_max_pixels_but_never_raise_it():
    spec = ImageSpec(processor="qwen3_vl", patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=4096,
                     max_pixels=64 * 32 * 32, tokens=64)
    photo = Image.open(skimage_photo("retina.jpg").read_bytes())  # 1411 x 1411
    assert spec.encode(photo).tokens <= 64
    assert spec.encode(photo, max_pixels=16 * 32 * 32).tokens <= 16
    assert spec.encode(photo, max_pixels=10**9).tokens == spec.encode(photo).tokens
