"""Structured output, logprobs, logit bias, prompt truncation, stops, Tokenize/Detokenize and
priority, through the service, on the Transformers and llama.cpp engines (the tiny model)."""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import numpy as np
import pytest
from conftest import TINY
from rpc_helpers import collect, rpc_error
from status_details import bad_request, reason

from llmgrpc.clients import Client
from llmgrpc.engines.base import SamplingParams
from llmgrpc.engines.sampling import Sampler, token_logprobs
from llmgrpc.server.launched import AdmissionGate
from llmgrpc.v1 import generate_pb2

# llama.cpp at full precision: its logits then equal the Transformers engine's to about 1e-6.
EXACT_LLAMACPP = {"kv_cache_type": "f32", "flash_attention": False}
SEEDS = range(20)
PROMPT = "The answer is"

SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["count", "color"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def gguf_f32(client: Client):
    pytest.importorskip("llama_cpp")
    model = client.launch(
        TINY,
        model_format="ggufv2",
        quantization="F32",
        model_engine="llama.cpp",
        model_uid="structured-f32",
        engine_options=EXACT_LLAMACPP,
        timeout=300,
    )
    yield model.model_uid
    client.terminate(model.model_uid)


@pytest.fixture(scope="module", params=["transformers", "llama.cpp"])
def model_uid(request, tiny) -> str:
    return tiny.model_uid if request.param == "transformers" else request.getfixturevalue("gguf_f32")


def generate(client: Client, model_uid: str, prompt=PROMPT, **fields):
    token_ids, text, messages = collect(client.generate(model_uid, prompt, timeout=120, **fields))
    return token_ids, text, messages


def sampled(client: Client, model_uid: str, structured_output: dict, max_tokens: int = 200, **fields):
    """(text, last message) for each of 20 seeds at temperature 1, 8 at a time."""

    def one(seed: int):
        _, text, messages = generate(
            client,
            model_uid,
            structured_output=structured_output,
            temperature=1.0,
            seed=seed,
            max_tokens=max_tokens,
            **fields,
        )
        return text, messages[-1]

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, SEEDS))


def test_regex_outputs_match_in_full_for_20_seeds(client: Client, model_uid: str):
    outputs = sampled(client, model_uid, {"regex": "[0-9]{3}-[0-9]{4}"})
    for text, last in outputs:
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text), text
        assert last.finish_reason == generate_pb2.FINISH_REASON_STOP


def test_json_schema_outputs_validate_for_20_seeds(client: Client, model_uid: str):
    outputs = sampled(client, model_uid, {"json_schema": json.dumps(SCHEMA)})
    for text, last in outputs:
        assert last.finish_reason == generate_pb2.FINISH_REASON_STOP, text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_outputs_parse_for_20_seeds(client: Client, model_uid: str):
    # Random weights write keys and strings that rarely end: favouring the tokens that close
    # them keeps outputs within max_tokens; what is tested is that every output is JSON.
    closers = {client.tokenize(model_uid, text).token_ids[-1]: 6.0 for text in ('"', "}")}
    outputs = sampled(client, model_uid, {"json_object": True}, max_tokens=400, logit_bias=closers)
    for text, last in outputs:
        assert last.finish_reason == generate_pb2.FINISH_REASON_STOP, text
        assert isinstance(json.loads(text), dict)


def test_choice_output_is_one_of_the_choices(client: Client, model_uid: str):
    choices = ["red", "green", "blue"]
    for text, _ in sampled(client, model_uid, {"choice": {"choices": choices}})[:5]:
        assert text in choices


def test_grammar_output_is_in_its_language(client: Client, model_uid: str):
    grammar = 'start: greeting " " name "!"\ngreeting: "hello" | "hi"\nname: /[a-z]{1,8}/'
    for text, _ in sampled(client, model_uid, {"grammar": grammar})[:5]:
        assert re.fullmatch(r"(hello|hi) [a-z]{1,8}!", text), text


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


@pytest.mark.parametrize("text", ["Hello, world", "héllo wörld — 日本語 🙂"])
def test_tokenize_counts_the_prompt_and_detokenize_inverts_it(client: Client, model_uid: str, text: str):
    tokens = client.tokenize(model_uid, text)
    assert len(tokens.tokens) == len(tokens.token_ids)
    _, _, messages = generate(client, model_uid, prompt=text, max_tokens=1)
    assert len(tokens.token_ids) == messages[-1].usage.prompt_tokens
    assert client.detokenize(model_uid, list(tokens.token_ids)) == text


def test_detokenize_refuses_ids_outside_the_vocabulary(client: Client, model_uid: str):
    error = rpc_error(client.detokenize, model_uid, [10**9])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request(error).field_violations] == ["token_ids"]


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
        ({"structured_output": {"json_schema": '{"type": "nonsense"}'}}, "structured_output.json_schema"),
        ({"structured_output": {"json_schema": "{not json"}}, "structured_output.json_schema"),
        ({"structured_output": {"regex": "[0-9"}}, "structured_output.regex"),
        ({"structured_output": {"grammar": "start: undefined_rule"}}, "structured_output.grammar"),
        ({"structured_output": {"choice": {"choices": []}}}, "structured_output.choice.choices"),
        ({"structured_output": {}}, "structured_output"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {10**9: 1.0}}, "logit_bias"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ],
)
def test_bad_fields_are_invalid_argument_naming_the_field(client: Client, model_uid: str, fields, field):
    error = rpc_error(lambda: list(client.generate(model_uid, PROMPT, max_tokens=4, timeout=60, **fields)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert reason(error) in ("INVALID_FIELD", "TOKEN_OUT_OF_VOCABULARY")
    assert field in [v.field for v in bad_request(error).field_violations]


# Formats the grammar library cannot follow: once answered FINISH_REASON_STOP with output
# that does not match them ("a", "x", or nothing at all).
UNFOLLOWABLE = {
    "a regex a million characters long": ({"regex": "a" * 1_000_000}, "structured_output.regex"),
    "one choice of 3 MB": ({"choice": {"choices": ["x" * 3_000_000]}}, "structured_output.choice.choices"),
    "a regex that matches nothing": ({"regex": r"[^\s\S]"}, "structured_output.regex"),
    "a schema that refers to itself forever": (
        {"json_schema": json.dumps({"$ref": "#"})},
        "structured_output.json_schema",
    ),
    "a grammar whose rules refer to each other forever": (
        {"grammar": "start: a\na: b\nb: a"},
        "structured_output.grammar",
    ),
}


@pytest.mark.parametrize("structured_output, field", UNFOLLOWABLE.values(), ids=UNFOLLOWABLE)
def test_a_format_that_cannot_be_followed_is_refused_at_admission(
    client: Client, model_uid: str, structured_output, field
):
    error = rpc_error(
        lambda: list(
            client.generate(
                model_uid,
                PROMPT,
                max_tokens=8,
                temperature=0,
                structured_output=structured_output,
                timeout=120,
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in [v.field for v in bad_request(error).field_violations]


def test_a_format_the_library_gives_up_on_mid_output_ends_the_stream_naming_it(
    client: Client, model_uid: str
):
    # Twelve letters, then a rule of 2500 alternatives: beyond the library's 2000 a row, which
    # it finds only when the output reaches that rule.
    alternatives = " | ".join(json.dumps(f"w{i}") for i in range(2500))
    grammar = f"start: /[a-z]{{12}}/ x\nx: {alternatives}"
    received = []

    def stream():
        received.extend(
            client.generate(
                model_uid,
                PROMPT,
                max_tokens=64,
                temperature=0,
                structured_output={"grammar": grammar},
                timeout=120,
            )
        )

    error = rpc_error(stream)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert [v.field for v in bad_request(error).field_violations] == ["structured_output.grammar"]
    assert "gave up" in error.details()
    assert all(message.finish_reason != generate_pb2.FINISH_REASON_STOP for message in received)


def test_too_many_choices_are_refused_before_compiling_with_no_library_text(client: Client, tiny):
    choices = [f"choice {i}" for i in range(100_000)]
    error = rpc_error(
        lambda: list(
            client.generate(tiny.model_uid, PROMPT, structured_output={"choice": {"choices": choices}})
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request(error).field_violations] == ["structured_output.choice.choices"]
    assert "at most 1024" in error.details()
    assert "panic" not in error.details() and "backtrace" not in error.details()


def test_a_waiting_request_of_lower_priority_value_is_admitted_first():
    async def scenario() -> list[str]:
        gate = AdmissionGate(max_running=1, max_waiting=8)
        admitted: list[str] = []
        release = asyncio.Event()

        async def request(name: str, priority: int) -> None:
            async with gate.slot("m", priority):
                admitted.append(name)
                await release.wait()

        first = asyncio.create_task(request("running", 10))
        await asyncio.sleep(0)
        queued = [asyncio.create_task(request(f"p10-{i}", 10)) for i in range(5)]
        await asyncio.sleep(0)
        urgent = asyncio.create_task(request("p0", 0))
        await asyncio.sleep(0)
        assert gate.waiting == 6
        release.set()
        await asyncio.gather(first, *queued, urgent)
        return admitted

    assert asyncio.run(scenario()) == ["running", "p0", *(f"p10-{i}" for i in range(5))]


def test_a_waiter_that_leaves_gives_its_place_up():
    async def scenario() -> int:
        gate = AdmissionGate(max_running=1, max_waiting=2)
        release = asyncio.Event()

        async def hold() -> None:
            async with gate.slot("m"):
                await release.wait()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        leaver = asyncio.create_task(hold())
        await asyncio.sleep(0)
        leaver.cancel()
        await asyncio.gather(leaver, return_exceptions=True)
        waiting = gate.waiting
        release.set()
        await holder
        assert gate.running == 0
        return waiting

    assert asyncio.run(scenario()) == 0


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
