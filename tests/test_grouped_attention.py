"""The CPU attention for grouped-query models: SDPA reading the shared key/value heads in place
gives the library's SDPA attention (which copies them per query head) to float rounding."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from llmgrpc.engines.transformers_attention import (
    GROUPED_SDPA,
    attention_implementation,
    grouped_sdpa_attention,
)


@pytest.mark.parametrize("query_tokens", [1, 7, 32])
def test_grouped_attention_equals_the_librarys_under_a_mask(query_tokens, monkeypatch):
    generator = torch.Generator().manual_seed(query_tokens)
    heads, kv_heads, dim, keys = 8, 2, 16, 300
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    query = torch.randn(1, heads, query_tokens, dim, generator=generator)
    key = torch.randn(1, kv_heads, keys, dim, generator=generator)
    value = torch.randn(1, kv_heads, keys, dim, generator=generator)
    # A part deep in a prompt: each token sees the prefix and the part up to itself, with a
    # masked-out hole as left padding leaves in a batch row.
    positions = torch.arange(keys - query_tokens, keys)
    allowed = torch.arange(keys)[None, :] <= positions[:, None]
    allowed[:, 10:20] = False
    mask = allowed[None, None]
    sdpa, grouped_calls = torch.nn.functional.scaled_dot_product_attention, []

    def recording(*args, **kwargs):
        grouped_calls.append(kwargs.get("enable_gqa", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    ours, _ = grouped_sdpa_attention(module, query, key, value, mask, scaling=dim**-0.5)
    # One token: the library's own path (it packs the heads without a copy); more: in place.
    assert grouped_calls == [query_tokens > 1]
    library, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=dim**-0.5)
    assert ours.shape == library.shape == (1, query_tokens, heads, dim)
    torch.testing.assert_close(ours, library, rtol=1e-5, atol=1e-6)


def test_the_grouped_attention_replaces_sdpa_on_the_cpu_only():
    assert attention_implementation("sdpa", torch.device("cpu")) == GROUPED_SDPA
    assert attention_implementation("sdpa", torch.device("cuda")) == "sdpa"
    assert attention_implementation("eager", torch.device("cpu")) == "eager"
