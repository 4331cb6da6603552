"""Tokenize and Detokenize through the service, on the Transformers and llama.cpp engines."""

from __future__ import annotations

import grpc
import pytest
from engine_pair import generate
from rpc_helpers import rpc_error
from status_details import bad_request

from llmgrpc.clients import Client


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
