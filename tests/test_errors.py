"""Bad input gets the right status and a message that says what is valid."""

from __future__ import annotations

import grpc
import pytest
from conftest import TINY
from rpc_helpers import rpc_error

from llmgrpc.clients import Client
from llmgrpc.v1 import models_pb2


def test_unknown_family_is_not_found(client: Client):
    error = rpc_error(client.launch, "llama-9")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "llama-3.1" in error.details()  # names the known families


def test_unknown_uid_is_not_found(client: Client):
    for call in (client.get_model, client.terminate):
        error = rpc_error(call, "no-such-model")
        assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(client.generate, "no-such-model", "Hello")
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "launch, valid",
    [
        ({"model_format": "ggufv3"}, "pytorch, ggufv2"),
        ({"size_in_billions": "13"}, "8, 70, 405"),
        ({"model_format": "ggufv2", "quantization": "Q9_K"}, "Q4_K_M"),
        ({"model_format": "pytorch", "model_engine": "llama.cpp"}, "vLLM, Transformers, SGLang"),
        ({"model_engine": "tensorrt"}, "Transformers, llama.cpp, vLLM, SGLang"),
    ],
)
def test_wrong_combination_is_invalid_and_names_the_valid_ones(client: Client, launch: dict, valid: str):
    error = rpc_error(client.launch, "llama-3.1", **launch)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert valid in error.details()


def test_405b_fails_fast_with_the_numbers(client: Client):
    error = rpc_error(
        client.launch, "llama-3.1", size_in_billions="405", model_engine="transformers", timeout=10
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "GiB" in error.details() and "free" in error.details()
    assert "llama-3.1-" not in " ".join(m.model_uid for m in client.list_models())


def test_engine_that_cannot_run_here_is_a_failed_precondition(client: Client):
    error = rpc_error(client.launch, TINY, model_engine="vllm")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "vllm" in error.details().lower()


def test_unknown_engine_option_names_the_valid_ones(client: Client):
    error = rpc_error(client.launch, TINY, engine_options={"n_thread": 2})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "n_threads" in error.details()


def test_bad_uid_and_device_are_invalid(client: Client):
    assert rpc_error(client.launch, TINY, model_uid="no spaces").code() == grpc.StatusCode.INVALID_ARGUMENT
    error = rpc_error(client.launch, TINY, device="tpu")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cuda:N" in error.details()


def test_duplicate_uid_already_exists(client: Client, tiny: models_pb2.ModelDescription):
    error = rpc_error(client.launch, TINY, model_uid="tiny")
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"stop": [""]}, "stop"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ],
)
def test_bad_sampling_parameters_are_invalid(client: Client, tiny, fields: dict, field: str):
    error = rpc_error(client.generate, "tiny", "Hello", **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()


def test_prompt_and_token_ids_are_exclusive(client: Client, tiny):
    request_both = client.generation.Generate
    from llmgrpc.v1 import generate_pb2

    both = generate_pb2.GenerateRequest(model_uid="tiny", prompt="Hi", prompt_token_ids=[1, 2])
    assert rpc_error(request_both, both).code() == grpc.StatusCode.INVALID_ARGUMENT
    neither = generate_pb2.GenerateRequest(model_uid="tiny")
    assert rpc_error(request_both, neither).code() == grpc.StatusCode.INVALID_ARGUMENT
    out_of_vocab = generate_pb2.GenerateRequest(model_uid="tiny", prompt_token_ids=[10**6])
    error = rpc_error(request_both, out_of_vocab)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vocabulary" in error.details()


def test_prompt_beyond_the_context_is_invalid(client: Client, tiny):
    error = rpc_error(client.generate, "tiny", [5] * (tiny.context_length + 10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(tiny.context_length) in error.details()
    # The model still serves afterwards.
    assert list(client.generate("tiny", "Hello", max_tokens=2))
