"""The tiny model on both batching engines, as pytest fixtures: Transformers, and llama.cpp at full
precision (its logits then equal the Transformers engine's to about 1e-6).

conftest.py registers this module, so a test that takes ``model_uid`` runs on both engines.
"""

from __future__ import annotations

import grpc
import pytest
from conftest import TINY
from rpc_helpers import collect, rpc_error
from status_details import bad_request, reason

from llmgrpc.clients import Client

EXACT_LLAMACPP = {"kv_cache_type": "f32", "flash_attention": False}
PROMPT = "The answer is"


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
    """(token ids, text, messages) of one Generate call."""
    token_ids, text, messages = collect(client.generate(model_uid, prompt, timeout=120, **fields))
    return token_ids, text, messages


def assert_refused_naming(client: Client, model_uid: str, fields: dict, field: str) -> None:
    """A Generate with these fields is INVALID_ARGUMENT, its BadRequest naming the field."""
    error = rpc_error(lambda: list(client.generate(model_uid, PROMPT, max_tokens=4, timeout=60, **fields)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert reason(error) in ("INVALID_FIELD", "TOKEN_OUT_OF_VOCABULARY")
    assert field in [v.field for v in bad_request(error).field_violations]
