"""The Transformers engine's static-cache decode path (the CUDA default) gives the plain path's tokens.

On the CPU the compiled variant uses torch.compile without CUDA graphs; the same code
captures CUDA graphs on a GPU (tests/test_cuda.py, run by `make gpu-check`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from llmgrpc.clients import Client

TINY = "tiny-llama-3.1"
PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog, and then over the lazy dog again",
    "Beautiful is better than ugly.",
    "1 2 3",
]


def greedy(client: Client, uid: str, prompt: str, max_tokens: int = 48) -> list[int]:
    return [
        token
        for message in client.generate(uid, prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
        for token in message.token_ids
    ]


@pytest.mark.parametrize("decode", ["static", "compiled"])
def test_static_cache_decode_equals_the_plain_path(client: Client, tiny, decode: str):
    uid = f"tiny-{decode}"
    # A small cache makes sequences outgrow their columns, so realignment is exercised too.
    client.launch(TINY, model_uid=uid, engine_options={"decode": decode, "context_length": 96}, timeout=300)
    try:
        expected = [greedy(client, "tiny", prompt) for prompt in PROMPTS]
        assert [greedy(client, uid, prompt) for prompt in PROMPTS] == expected
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda prompt: greedy(client, uid, prompt), PROMPTS))
        assert together == expected
        assert client.get_model(uid).peak_batch_size > 1
    finally:
        client.terminate(uid)


def test_unknown_decode_mode_is_invalid(client: Client):
    import grpc

    with pytest.raises(grpc.RpcError) as error:
        client.launch(TINY, engine_options={"decode": "turbo"})
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "plain, static, compiled" in error.value.details()
