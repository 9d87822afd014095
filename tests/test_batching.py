import numpy as np
import pytest

from edge_embed.batching import padded_share, plan_batches
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
