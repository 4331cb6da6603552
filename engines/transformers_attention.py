"""SDPA attention that reads grouped-query keys and values where they are, on the CPU.

The library's SDPA attention copies each key/value head out once per query head it serves
(``repeat_kv``) whenever a mask is given and more than one token is computed: every prompt part
after the first, and every part the runners compute, since they always pass a mask. Deep in a
long prompt that copy is most of a part's cost beside the attention itself (the tiny model,
12,000 tokens in, 2 CPU cores: a 32-token part 15.3 ms with the copy, 13.1 ms without). SDPA's
``enable_gqa`` indexes the shared heads instead; PyTorch's CPU kernel takes it with a mask, where
CUDA's fast kernels do not (the library keeps its path there).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GROUPED_SDPA = "llmgrpc_grouped_sdpa"
# Implementations whose 4-D masks are booleans (True: attend); eager attention adds its mask.
BOOLEAN_MASKS = frozenset({"sdpa", GROUPED_SDPA})


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The library's SDPA attention, with enable_gqa for masked multi-token attention."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = (
        groups == 1
        or attention_mask is None
        or query.shape[2] == 1  # the library packs one token's heads without a copy
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    )
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


def attention_implementation(requested: str, device: torch.device) -> str:
    """The attn_implementation to load the model with: the grouped SDPA for sdpa on the CPU."""
    if requested != "sdpa" or device.type != "cpu":
        return requested
    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    return GROUPED_SDPA
