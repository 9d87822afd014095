"""Qwen3-VL's host-side inputs, against transformers' own Qwen3-VL code."""

from __future__ import annotations

import numpy as np

from edge_embed.vl import IMAGE_TOKEN, TEXT_TOKEN, mrope_positions


def _tiny_qwen3_vl():
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLModel

    config = Qwen3VLConfig(
        text_config=dict(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, deepstack_visual_indexes=[0, 1]))
    torch.manual_seed(0)
    return Qwen3VLModel(config).eval()


def test_mrope_positions_equal_qwen3_vl_get_rope_index():
    """Two right-padded sequences: text, an image of 2x3 merged patches, text, an image of
    4x2, text; and text alone (ordinary RoPE positions)."""
    import torch

    model = _tiny_qwen3_vl()
    grids = [(1, 4, 6), (1, 8, 4)]
    kinds_a = [TEXT_TOKEN] * 5 + [IMAGE_TOKEN] * 6 + [TEXT_TOKEN] * 3 + [IMAGE_TOKEN] * 8 + [TEXT_TOKEN] * 4
    kinds_b = [TEXT_TOKEN] * 9
    width = len(kinds_a)
    types = torch.zeros(2, width, dtype=torch.int32)
    types[0] = torch.tensor(kinds_a)
    mask = torch.zeros(2, width, dtype=torch.long)
    mask[0] = 1
    mask[1, :len(kinds_b)] = 1
    ids = torch.full((2, width), 7, dtype=torch.long)
    theirs, _ = model.get_rope_index(ids, types, image_grid_thw=torch.tensor(grids), attention_mask=mask)
    ours_a = mrope_positions(kinds_a, grids, merge_size=2)
    ours_b = mrope_positions(kinds_b, [], merge_size=2)
    assert np.array_equal(theirs[:, 0].numpy(), ours_a)
    assert np.array_equal(theirs[:, 1, :len(kinds_b)].numpy(), ours_b)
    assert np.array_equal(ours_b, np.tile(np.arange(9), (3, 1)))  # text alone: 1-D positions


def test_vision_positions_and_position_table_taps_equal_transformers():
    import torch
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    from edge_embed.vl import position_embedding_taps, vision_rotary_positions

    for grid in [(1, 2, 2), (1, 4, 6), (1, 16, 10), (1, 58, 36), (1, 2, 96)]:
        for side in (8, 48):
            indices, weights = get_vision_interpolation_indices_and_weights(
                torch.tensor([grid]), num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2)
            ours_i, ours_w = position_embedding_taps(grid, 2, side)
            assert np.array_equal(ours_i, indices.numpy()) and np.array_equal(ours_w, weights.numpy()), (grid, side)
        assert np.array_equal(vision_rotary_positions(grid, 2), get_vision_position_ids(torch.tensor([grid]), 2).numpy())
