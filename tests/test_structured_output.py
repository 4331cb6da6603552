"""Structured output (JSON Schema, regex, choice, grammar, JSON object) through the service, on the
Transformers and llama.cpp engines (the tiny model), and the formats it refuses."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest
from engine_pair import PROMPT, assert_refused_naming, generate
from rpc_helpers import rpc_error
from status_details import bad_request

from llmgrpc.clients import Client
from llmgrpc.v1 import generate_pb2

SEEDS = range(20)

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


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"structured_output": {"json_schema": '{"type": "nonsense"}'}}, "structured_output.json_schema"),
        ({"structured_output": {"json_schema": "{not json"}}, "structured_output.json_schema"),
        ({"structured_output": {"regex": "[0-9"}}, "structured_output.regex"),
        ({"structured_output": {"grammar": "start: undefined_rule"}}, "structured_output.grammar"),
        ({"structured_output": {"choice": {"choices": []}}}, "structured_output.choice.choices"),
        ({"structured_output": {}}, "structured_output"),
    ],
)
def test_bad_formats_are_invalid_argument_naming_the_field(client: Client, model_uid: str, fields, field):
    assert_refused_naming(client, model_uid, fields, field)


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
