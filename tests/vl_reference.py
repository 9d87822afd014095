"""The transformers Qwen3-VL forward on a whole prompt, as the references of the VL tests read it."""

from __future__ import annotations

from typing import Any

from edge_embed.images import Image


def whole_prompt_hidden(model: Any, tokenizer: Any, processor: Any, bounds: dict, prompt: str,
                        images: list[Image]) -> tuple[list[int], Any]:
    """Qwen's tokenizer on the whole prompt (image pads already expanded) and the model's own
    forward on it, pixels from its own image processor: (ids, last hidden states [tokens, hidden])."""
    import torch

    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    extra = {}
    if images:
        extra = dict(processor(images=[im.rgb() for im in images], return_tensors="pt", size=bounds))
    t = torch.tensor([ids])
    image_id = tokenizer.token_to_id("<|image_pad|>")
    with torch.no_grad():
        hidden = model(input_ids=t, attention_mask=torch.ones_like(t), mm_token_type_ids=(t == image_id).int(),
                       **extra).last_hidden_state[0]
    return ids, hidden
