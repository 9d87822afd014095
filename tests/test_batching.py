import numpy as np
import pytest

from edge_embed.batching import BatchLimits, padded_share, plan_batches
from edge_embed.errors import InvalidInputError


def test_every_index_once_and_budget_respected():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 200, size=500).tolist()
    batches = plan_batches(lengths, max_tokens=2048, max_batch=32)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(500))
    for batch in batches:
        assert len(batch) <= 32
        assert len(batch) * max(lengths[i] for i in batch) <= 2048


def test_overlong_text_gets_its_own_batch():
    batches = plan_batches([5000, 3, 4], max_tokens=100, max_batch=8)
    assert [b.tolist() for b in batches] == [[0], [2, 1]]


def test_sorted_batches_compute_far_less_padding_than_naive_ones():
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(8, 20, 300), rng.integers(100, 256, 100)])
    rng.shuffle(lengths)
    lengths = lengths.tolist()
    naive = [list(range(i, min(i + 32, len(lengths)))) for i in range(0, len(lengths), 32)]
    planned = plan_batches(lengths, max_tokens=8192, max_batch=32)
    assert padded_share(lengths, naive) > 0.4
    assert padded_share(lengths, planned) < 0.1


def test_invalid_limits():
    with pytest.raises(InvalidInputError):
        plan_batches([1, 2], max_tokens=0, max_batch=4)


def _qwen3_and_minilm_max_lengths() -> dict[str, int]:
    """The max lengths the two manifests get: MiniLM's from its own files, Qwen3's 32k
    context capped by the export rules."""
    from edge_embed.export.source import ARCHITECTURES, read_source

    from .conftest import minilm_source

    return {"qwen3": ARCHITECTURES["qwen3"].max_length_cap, "minilm": read_source(minilm_source()).manifest.max_length}


def test_tensorrt_profiles_come_from_the_token_budget():
    """Rows x width within max_batch_tokens for every profile but the single-row one, which
    reaches max_length; never max_batch_size x max_length."""
    from edge_embed.backends.onnx import trt_profile_options

    lengths = _qwen3_and_minilm_max_lengths()
    limits = BatchLimits()
    assert limits.profiles(lengths["qwen3"]) == [(32, 128), (16, 256), (8, 512), (4, 1024), (2, 2048), (1, 8192)]
    assert lengths["minilm"] == 256 and limits.profiles(lengths["minilm"]) == [(32, 128), (16, 256)]
    assert BatchLimits(max_batch_tokens=1024, max_batch_size=24).profiles(8192) == \
        [(24, 42), (16, 64), (8, 128), (4, 256), (2, 512), (1, 8192)]
    for max_length in lengths.values():
        for rows, width in limits.profiles(max_length):
            assert rows * width <= limits.max_batch_tokens or (rows == 1 and width == max_length)

    options = trt_profile_options(limits, lengths["qwen3"], ("input_ids", "attention_mask", "position_ids"))
    maxima = options["trt_profile_max_shapes"].split(",")
    assert len(maxima) == 3 * 6 and maxima[:3] == ["input_ids:32x128", "attention_mask:32x128", "position_ids:32x128"]
    assert maxima[-1] == "position_ids:1x8192" and "32x8192" not in options["trt_profile_max_shapes"]
    assert options["trt_profile_min_shapes"].split(",") == [f"{n}:1x1" for _ in range(6)
                                                           for n in ("input_ids", "attention_mask", "position_ids")]
    assert options["trt_profile_opt_shapes"].split(",")[-1] == "position_ids:1x4096"


@pytest.mark.parametrize("max_length", [256, 512, 8192])
def test_every_batch_falls_inside_a_profile_when_rows_are_stepped(max_length):
    """Under stepped rows, in-process plans and the server batcher's `fits` form only batches
    that one TensorRT profile holds; unstepped limits would form some that none does."""
    rng = np.random.default_rng(2)
    lengths = np.minimum(rng.integers(1, 3000, size=2000), max_length).tolist()
    stepped = BatchLimits(stepped_rows=True)
    profiles = stepped.profiles(max_length)

    def held(rows: int, width: int) -> bool:
        return any(rows <= r and width <= w for r, w in profiles)

    for batch in plan_batches(lengths, 4096, 32, stepped_rows=True):
        assert held(len(batch), max(lengths[i] for i in batch))
    for width in range(1, max_length + 1):
        rows = stepped.rows_for(width)
        assert held(rows, width) and stepped.fits(rows, width) == (rows * width <= 4096)
        assert not stepped.fits(rows + 1, width) or rows == 32
    assert not all(held(len(b), max(lengths[i] for i in b)) for b in plan_batches(lengths, 4096, 32))
