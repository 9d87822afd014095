"""Images over the wire: a real CLIP bundle behind the real server, typed gRPC items and
OpenAI content parts over HTTP, equal to in-process bit for bit, and a hostile fuzz that
gets only INVALID_ARGUMENT / RESOURCE_EXHAUSTED and leaves the vectors and memory as they were."""

from __future__ import annotations

import base64
import io
import json
import random

import grpc
import numpy as np
import PIL.Image
import pytest

import edge_embed
from edge_embed.client import EmbedClient
from edge_embed.images import Image
from edge_embed.memory import rss_bytes
from edge_embed.v1 import embed_pb2 as pb
from edge_embed.v1 import embed_pb2_grpc

from .conftest import skimage_photo
from .servers import running_server
from .test_http import post
from .test_images import png_header_only

pytestmark = pytest.mark.slow

CAPTION = "an astronaut in a white suit"


@pytest.fixture(scope="module")
def clip(clip_bundle):
    return edge_embed.load(clip_bundle, precision="fp32")


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _http_embed(port: int, payload: dict) -> tuple[int, dict]:
    status, _, body = post(port, "/v1/embeddings", json.dumps(payload).encode())
    return status, body


def test_images_over_grpc_and_http_equal_in_process_bit_for_bit(clip):
    photo = skimage_photo("astronaut.png").read_bytes()
    jpeg = skimage_photo("rocket.jpg").read_bytes()
    local = clip.embed([CAPTION, Image.open(photo), Image.open(jpeg), CAPTION])
    # The seed smoke test: the dimension, and the same input twice gives cosine 1.0000.
    assert local.shape == (4, clip.info.dim) and float(local[0] @ local[3]) == pytest.approx(1.0, abs=1e-6)
    with running_server(clip, http_port=0) as (edge, target):
        with EmbedClient(target) as client:
            over_grpc = client.embed([CAPTION, Image.open(photo), Image.open(jpeg), CAPTION])
            assert np.array_equal(over_grpc, local)
            response = client.embed_response([Image.open(photo)])
            assert list(response.token_counts) == [clip.info.image_tokens]
            assert client.embed(["plain text inputs keep working"]).shape == (1, clip.info.dim)
        status, body = _http_embed(edge.http_port, {"input": [
            CAPTION,
            {"type": "image_url", "image_url": {"url": _data_uri(photo)}},
            [{"type": "image_url", "image_url": _data_uri(jpeg, "image/jpeg")}],
            [{"type": "text", "text": CAPTION}]]})
        assert status == 200, body
        over_http = np.array([row["embedding"] for row in body["data"]], dtype=np.float32)
        assert np.array_equal(over_http, local)
        status, body = _http_embed(edge.http_port, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_uri(photo)}}]}]})
        assert status == 200 and np.array_equal(np.array(body["data"][0]["embedding"], dtype=np.float32), local[1])


def test_what_the_wire_cannot_carry_is_refused_by_name(clip, minilm_bundle):
    photo = skimage_photo("coffee.png").read_bytes()
    with running_server(clip, http_port=0) as (edge, target):
        stub = embed_pb2_grpc.EmbeddingServiceStub(grpc.insecure_channel(target))
        for request, why in [
            (pb.EmbedRequest(inputs=["a"], items=[pb.Input(text="b")]), "inputs .texts. or items"),
            (pb.EmbedRequest(items=[pb.Input()]), r"items\[0\] is neither"),
            (pb.EmbedRequest(items=[pb.Input(parts=pb.Parts())]), r"items\[0\].parts is empty"),
            (pb.EmbedRequest(items=[pb.Input(parts=pb.Parts(parts=[pb.Part(text="a caption"),
                                                                  pb.Part(image=photo)]))]), "mixes parts"),
            (pb.EmbedRequest(items=[pb.Input(image=png_header_only(60_000, 60_000))]), "before decoding"),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                stub.Embed(request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert __import__("re").search(why, caught.value.details()), caught.value.details()
        for payload, why in [
            ({"input": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]},
             "does not fetch image URLs"),
            ({"input": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}, "base64 data URI"),
            ({"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]},
             "not valid base64"),
            ({"input": [{"type": "audio", "data": "x"}]}, "type must be one of"),
            ({"input": ["a"], "messages": [{"role": "user", "content": "b"}]}, "input or messages"),
        ]:
            status, body = _http_embed(edge.http_port, payload)
            assert status == 400 and why in body["error"]["message"], body
    text_only = edge_embed.load(minilm_bundle, precision="fp32")
    with running_server(text_only) as (edge, target), EmbedClient(target) as client:
        with pytest.raises(edge_embed.InvalidInputError, match="holds images, and .* reads text only"):
            client.embed([Image.open(photo)])


def grpc_code(call) -> str:
    """The gRPC status of one call: "OK", or its error's code name."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def http_code(status: int, body: object) -> str:
    """An HTTP answer named as the gRPC status it stands for (the fuzzes compare both)."""
    return {200: "OK", 400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 413: "RESOURCE_EXHAUSTED"}.get(
        status, f"HTTP {status}: {body}")


def _malformed(rng: random.Random, seeds: list[bytes]) -> bytes:
    """One hostile image: a real file cut, bit-flipped, spliced or re-headered, or a header
    that lies about its size."""
    data = bytearray(rng.choice(seeds))
    kind = rng.randrange(7)
    if kind == 0:
        return bytes(data[: rng.randrange(1, len(data))])
    if kind == 1:
        for _ in range(rng.randrange(1, 64)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 2:
        # Corrupt the header region, where the sizes and chunk lengths live.
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(min(64, len(data)))] = rng.randrange(256)
        return bytes(data)
    if kind == 3:
        return png_header_only(rng.choice([1, 2, 7, 60_000, 2**31 - 1]), rng.choice([1, 3, 40_000, 2**20]))
    if kind == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 512)))
    if kind == 5:
        other = rng.choice(seeds)
        return bytes(data[: len(data) // 2] + other[len(other) // 2:])
    return bytes(data[:16]) + bytes(rng.randrange(256) for _ in range(rng.randrange(16, 4096)))


def _seed_images() -> list[bytes]:
    out = []
    base = PIL.Image.open(skimage_photo("chelsea.png")).convert("RGB").resize((64, 48))
    for fmt, mode in [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "L"), ("JPEG", "RGB"), ("JPEG", "CMYK"),
                      ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGB")]:
        buf = io.BytesIO()
        base.convert(mode).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def test_a_fuzz_of_malformed_images_gets_only_clear_refusals_over_both_transports(clip):
    rng = random.Random(25)
    seeds = _seed_images()
    known = [CAPTION, Image.open(skimage_photo("astronaut.png"))]
    before = clip.embed(known)
    codes: dict[str, int] = {}
    with running_server(clip, http_port=0, max_image_pixels=4_000_000) as (edge, target):
        stub = embed_pb2_grpc.EmbeddingServiceStub(grpc.insecure_channel(target))
        rss_start = rss_bytes()
        for case in range(600):
            data = _malformed(rng, seeds)
            if case % 2:
                code = grpc_code(lambda: stub.Embed(pb.EmbedRequest(items=[pb.Input(text="ok"), pb.Input(image=data)]), timeout=30))
            else:
                status, body = _http_embed(edge.http_port, {"input": [
                    "ok", {"type": "image_url", "image_url": {"url": _data_uri(data)}}]})
                code = http_code(status, body)
            codes[code] = codes.get(code, 0) + 1
        grown = rss_bytes() - rss_start
        with EmbedClient(target) as client:
            after = client.embed(known)
    assert set(codes) <= {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, codes
    assert codes.get("INVALID_ARGUMENT", 0) >= 400, codes  # most of them are refused, not silently embedded
    assert np.array_equal(after, before)
    assert grown < 300 * 1024 * 1024, f"the server grew by {grown / 2**20:.0f} MiB over the fuzz"


def test_qwen3_vl_mixed_inputs_over_grpc_and_http_equal_in_process(qwen3_vl_bundle):
    """The seed smoke test over both transports: the dimension, cos(text, text) = 1.0000 and
    cos(mixed, mixed) = 1.0000, and the vectors in-process gives, bit for bit."""
    provider = edge_embed.load(qwen3_vl_bundle, precision="fp32")
    photo = skimage_photo("chelsea.png").read_bytes()
    inputs = [CAPTION, Image.open(photo), [Image.open(photo), "a cat"], CAPTION, [Image.open(photo), "a cat"]]
    local = provider.embed(inputs)
    assert local.shape == (5, provider.info.dim)
    assert round(float(local[0] @ local[3]), 4) == 1.0 and round(float(local[2] @ local[4]), 4) == 1.0
    with running_server(provider, http_port=0) as (edge, target):
        with EmbedClient(target) as client:
            assert np.array_equal(client.embed(inputs), local)
            info = client.info()
            assert info.instruction_aware and info.default_instruction == "Represent the user's input."
            assert list(info.modalities) == ["text", "image"]
        image_part = {"type": "image_url", "image_url": {"url": _data_uri(photo)}}
        status, body = _http_embed(edge.http_port, {"input": [
            CAPTION, image_part, [image_part, {"type": "text", "text": "a cat"}]]})
        assert status == 200, body
        assert np.array_equal(np.array([r["embedding"] for r in body["data"]], dtype=np.float32), local[:3])
        status, body = _http_embed(edge.http_port, {"messages": [{"role": "user", "content": [
            image_part, {"type": "text", "text": "a cat"}]}]})
        assert status == 200 and np.array_equal(np.array(body["data"][0]["embedding"], dtype=np.float32), local[2])
