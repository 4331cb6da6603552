"""The sampler, and the request fields it and the batcher follow (logit bias, prompt truncation,
stops), through the service on the Transformers and llama.cpp engines."""

from __future__ import annotations

import json

import numpy as np
import pytest
from engine_pair import assert_refused_naming, generate

from llmgrpc.clients import Client
from llmgrpc.clients.client import SAMPLING_KNOBS
from llmgrpc.engines.base import GenerationRequest, LoadPlan, SamplingParams, SpecRef
from llmgrpc.engines.sampling import Sampler, token_logprobs
from llmgrpc.v1 import generate_pb2


def test_logit_bias_forces_and_bans_tokens(client: Client, model_uid: str):
    forced = client.tokenize(model_uid, " x").token_ids[-1]
    token_ids, _, _ = generate(client, model_uid, temperature=0, max_tokens=4, logit_bias={forced: 100})
    assert token_ids == [forced] * 4
    greedy, _, _ = generate(client, model_uid, temperature=0, max_tokens=1, ignore_eos=True)
    banned, _, _ = generate(
        client, model_uid, temperature=0, max_tokens=1, ignore_eos=True, logit_bias={greedy[0]: -100}
    )
    assert banned != greedy


def test_truncate_prompt_tokens_keeps_the_last_ones(client: Client, model_uid: str):
    text = "one two three four five six seven eight nine ten"
    ids = list(client.tokenize(model_uid, text).token_ids)
    truncated, _, messages = generate(
        client, model_uid, prompt=text, temperature=0, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=3
    )
    assert messages[-1].usage.prompt_tokens == 3
    same, _, _ = generate(client, model_uid, prompt=ids[-3:], temperature=0, max_tokens=4, ignore_eos=True)
    assert truncated == same


def test_the_last_message_names_the_stop(client: Client, model_uid: str):
    greedy, text, _ = generate(client, model_uid, temperature=0, max_tokens=8, ignore_eos=True)
    _, _, messages = generate(client, model_uid, temperature=0, max_tokens=8, stop_token_ids=[greedy[2]])
    assert messages[-1].WhichOneof("matched_stop") == "stop_token_id"
    assert messages[-1].stop_token_id == greedy[2]
    if text.strip():
        stop = text.strip()[-1]
        fields = dict(temperature=0, max_tokens=8, ignore_eos=True, stop=[stop])
        _, _, messages = generate(client, model_uid, **fields)
        assert messages[-1].stop_string == stop
        assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_STOP


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {10**9: 1.0}}, "logit_bias"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ],
)
def test_bad_sampling_fields_are_invalid_argument_naming_the_field(
    client: Client, model_uid: str, fields, field
):
    assert_refused_naming(client, model_uid, fields, field)


def test_sampler_adds_the_bias_masks_the_format_and_logprobs_stay_raw():
    logits = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0, logit_bias={0: 100.0}), []).sample(logits) == 0
    greedy = Sampler(SamplingParams(temperature=0), [])
    assert greedy.sample(logits, allowed=np.array([False, True, True, False])) == 2
    # min_tokens bans the one token the format allows (its end): the format wins.
    assert greedy.sample(logits, banned=[1], allowed=np.array([False, True, False, False])) == 1
    assert logits.tolist() == [0.0, 1.0, 2.0, 3.0]  # the row the logprobs come from is untouched
    logprob, top = token_logprobs(logits, 3, 2)
    assert [token for token, _ in top] == [3, 2] and logprob == top[0][1]
    assert np.exp([lp for _, lp in token_logprobs(logits, 0, 4)[1]]).sum() == pytest.approx(1.0)


def test_request_defaults_are_resolved_once_from_the_load_plan_without_touching_the_request():
    request = generate_pb2.GenerateRequest(model_uid="m", prompt="p", temperature=0.5)
    generation = GenerationRequest.from_pb(request, "r-1", default_max_tokens=7)
    assert generation.sampling.max_tokens == 7  # the server's default_max_tokens, by its load plan
    assert generation.sampling.temperature == 0.5 and generation.sampling.top_p == SamplingParams.top_p
    assert not request.HasField("max_tokens")  # the caller's message is read, not changed
    request.max_tokens = 3
    assert GenerationRequest.from_pb(request, "r-2", default_max_tokens=7).sampling.max_tokens == 3
    plan = LoadPlan(
        "m", "Transformers", SpecRef("m", "pytorch", "1", "none", "m"), "cpu", "", 1, default_max_tokens=9
    )
    assert LoadPlan.from_json_dict(json.loads(json.dumps(plan.to_json_dict()))).default_max_tokens == 9


def test_every_optional_number_of_the_request_is_a_sampling_knob():
    """The proto's optional numbers (what the CLI and the other protocols offer) and the domain's
    knobs (what is checked, defaulted and handed to the engines) are the same set, same types."""
    assert list(SAMPLING_KNOBS) == [name for name, _ in SamplingParams.knobs()]
    for name, kind in SAMPLING_KNOBS.items():
        default = SamplingParams.__dataclass_fields__[name].default
        assert default is None or isinstance(default, kind), name
