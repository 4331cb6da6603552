"""Tokenize and Detokenize through the service, on the Transformers and llama.cpp engines."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from engine_pair import generate
from google.protobuf import any_pb2
from rpc_helpers import rpc_error
from status_details import bad_request

from llmgrpc.clients import Client
from llmgrpc.clients.errors import Unimplemented
from llmgrpc.v1 import models_pb2
from llmgrpc.worker import model_calls


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


def test_a_worker_refuses_a_call_it_does_not_serve_naming_those_it_does():
    """A public request of a type the worker has no model call for (a server and worker out of
    step) is UNIMPLEMENTED, never a silent empty answer."""
    packed = any_pb2.Any()
    packed.Pack(models_pb2.ListModelsRequest())
    with pytest.raises(Unimplemented, match="llmgrpc.v1.ListModelsRequest is not a model call") as raised:
        asyncio.run(model_calls.answer(None, packed))
    assert "llmgrpc.v1.TokenizeRequest" in str(raised.value)
