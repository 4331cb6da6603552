"""Logprobs through the service: greedy tokens rank first, and both batching engines agree."""

from __future__ import annotations

import pytest
from engine_pair import assert_refused_naming, generate

from llmgrpc.clients import Client


def test_greedy_logprobs_rank_the_chosen_token_first(client: Client, model_uid: str):
    token_ids, _, messages = generate(
        client, model_uid, temperature=0, max_tokens=12, ignore_eos=True, logprobs=5
    )
    logprobs = [entry for message in messages for entry in message.logprobs]
    assert [entry.token_id for entry in logprobs] == token_ids
    for message in messages:
        assert len(message.logprobs) == len(message.token_ids)
    for entry in logprobs:
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token_id == entry.token_id
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.logprob <= 0
        assert all(top.logprob <= 0 for top in entry.top_logprobs)
        ordered = [top.logprob for top in entry.top_logprobs]
        assert ordered == sorted(ordered, reverse=True)


def test_llamacpp_and_transformers_logprobs_agree(client: Client, tiny, gguf_f32: str):
    fields = dict(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)
    ids_hf, _, hf = generate(client, tiny.model_uid, **fields)
    ids_cpp, _, cpp = generate(client, gguf_f32, **fields)
    assert ids_hf == ids_cpp
    hf_logprobs = [entry for message in hf for entry in message.logprobs]
    cpp_logprobs = [entry for message in cpp for entry in message.logprobs]
    for a, b in zip(hf_logprobs, cpp_logprobs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert [t.token_id for t in a.top_logprobs] == [t.token_id for t in b.top_logprobs]
        for x, y in zip(a.top_logprobs, b.top_logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-3)
            assert x.token == y.token


@pytest.mark.parametrize("logprobs", [21, -1])
def test_logprobs_outside_0_to_20_are_invalid_argument_naming_the_field(
    client: Client, model_uid: str, logprobs: int
):
    assert_refused_naming(client, model_uid, {"logprobs": logprobs}, "logprobs")
